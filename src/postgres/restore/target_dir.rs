//! The restore target directory: what may be restored into, what a
//! `--delta` restore keeps or prunes, and the marker of an unfinished restore.

use super::*;

/// Reads the `keep` files of `dir` (those that exist), before a delta
/// restore replaces them.
pub(super) fn read_kept(dir: &Path, keep: &[String]) -> Result<Vec<(PathBuf, Vec<u8>)>, PgError> {
    let mut out = Vec::new();
    for k in keep {
        if !safe_relative_path(k) {
            return Err(PgError::Other(format!(
                "kept file {k:?} must be a relative path inside the target"
            )));
        }
        let p = dir.join(k);
        match std::fs::read(&p) {
            Ok(b) => out.push((p, b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(PgError::io(&p, e)),
        }
    }
    Ok(out)
}

/// Writes the kept files back over what the backup restored.
pub(super) fn put_back(dir: &Path, kept: &[(PathBuf, Vec<u8>)]) -> std::io::Result<()> {
    for (p, body) in kept {
        std::fs::write(p, body)?;
        std::fs::File::open(p)?.sync_all()?;
    }
    if !kept.is_empty() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A `--tablespace-map` directory must be empty or absent (then created).
pub(super) fn check_target_dir(dir: &Path) -> Result<(), PgError> {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(PgError::Other(format!(
                    "--tablespace-map directory {} is not empty; map the tablespace to an \
                     empty or new directory (dr never overwrites an existing one)",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| PgError::io(dir, e))
        }
        Err(e) => Err(PgError::io(dir, e)),
    }
}

/// What a restore target holds, read before anything is written.
#[derive(Debug)]
pub(super) enum Found {
    /// Nothing there: the restore creates it.
    Absent,
    /// An empty directory.
    Empty,
    /// A data directory (`PG_VERSION` and `global/pg_control`), or what an
    /// interrupted restore left (its marker names the system).
    DataDir {
        /// The system identifier it belongs to.
        system_id: u64,
        /// Left by a restore that did not finish.
        interrupted: bool,
    },
    /// Anything else, described for the user.
    Other(String),
}

/// Marks a target a restore is writing, with the backup's system identifier,
/// so a restore that was killed is recognised (its `pg_control` may still be
/// zeros) and can be finished with `--delta`. Removed once the restore is
/// complete.
pub(super) const INCOMPLETE: &str = "dr-restore-incomplete";

/// Reads what `dir` holds, without changing anything.
pub(super) fn inspect_target(dir: &Path) -> Result<Found, PgError> {
    if !dir.is_absolute() {
        return Err(PgError::Other(format!(
            "--target {} must be an absolute path",
            dir.display()
        )));
    }
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Absent),
        Err(e) => return Err(PgError::io(dir, e)),
    };
    if names.is_empty() {
        return Ok(Found::Empty);
    }
    if let Some(id) = std::fs::read_to_string(dir.join(INCOMPLETE))
        .ok()
        .and_then(|t| t.trim().parse().ok())
    {
        return Ok(Found::DataDir {
            system_id: id,
            interrupted: true,
        });
    }
    if dir.join("PG_VERSION").is_file() {
        return Ok(match crate::postgres::system_id(dir) {
            Ok(id) => Found::DataDir {
                system_id: id,
                interrupted: false,
            },
            Err(e) => Found::Other(format!("PG_VERSION but no usable global/pg_control: {e}")),
        });
    }
    names.sort();
    let shown: Vec<&str> = names.iter().take(3).map(String::as_str).collect();
    Ok(Found::Other(format!(
        "{} entries such as {}, and no PG_VERSION",
        names.len(),
        shown.join(", ")
    )))
}

/// Refuses a target the restore must not write into: a non-empty one
/// without `--delta`, and with `--delta` anything but a stopped data
/// directory of the backup's cluster (`backup_system`).
pub(super) fn accept_target(
    dir: &Path,
    found: &Found,
    backup_system: u64,
    opts: &RestoreOptions,
) -> Result<(), PgError> {
    let d = dir.display();
    let err = |m: String| Err(PgError::Other(m));
    match (found, opts.delta) {
        (Found::Absent | Found::Empty, _) => Ok(()),
        (
            Found::DataDir {
                system_id,
                interrupted,
            },
            false,
        ) => {
            let what = if *interrupted {
                "the partial data directory of an interrupted restore"
            } else {
                "a data directory"
            };
            if *system_id == backup_system {
                err(format!(
                    "--target {d} is not empty: it holds {what} of this cluster (system \
                     identifier {system_id}); add --delta to bring it to the backup (only \
                     blocks that differ are rewritten), or remove it (rm -rf {d}) and restore again"
                ))
            } else {
                err(format!(
                    "--target {d} is not empty: it holds {what} of another cluster (system \
                     identifier {system_id}; the backup's is {backup_system}); remove it or \
                     restore into an empty or new directory"
                ))
            }
        }
        (Found::Other(what), false) => err(format!(
            "--target {d} is not empty ({what}); restore into an empty or new directory, \
             or remove what is there (dr never overwrites an existing directory)"
        )),
        (Found::Other(what), true) => err(format!(
            "--delta --target {d}: not a PostgreSQL data directory ({what}); --delta removes \
             every file the backup lacks, so it only updates a data directory of the same \
             cluster. Nothing was changed: restore into an empty or new directory instead, \
             or point --target at the data directory"
        )),
        (Found::DataDir { system_id, .. }, true)
            if *system_id != backup_system && !opts.replace_other_cluster =>
        {
            err(format!(
                "--delta --target {d} holds the data directory of another cluster (system \
                 identifier {system_id}; the backup's is {backup_system}); --delta would \
                 replace it entirely, so nothing was changed: remove it (rm -rf {d}) or \
                 restore into an empty or new directory"
            ))
        }
        (Found::DataDir { .. }, true) => refuse_running(dir),
    }
}

/// `--delta` needs a data directory that no server is using.
pub(super) fn refuse_running(dir: &Path) -> Result<(), PgError> {
    if let Ok(pid) = std::fs::read_to_string(dir.join("postmaster.pid")) {
        let pid = pid.lines().next().unwrap_or("").trim().to_string();
        if !pid.is_empty() && Path::new("/proc").join(&pid).exists() {
            return Err(PgError::Other(format!(
                "a PostgreSQL server (pid {pid}) is running on {}; stop it before a --delta restore",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Removes the [`INCOMPLETE`] marker of a finished restore, durably.
pub(super) fn complete(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(INCOMPLETE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Removes everything under `dir` that the manifest does not list (never
/// following symlinks). Returns how many entries were removed.
pub(super) fn prune(dir: &Path, m: &PgManifest) -> Result<usize, PgError> {
    let keep_files: std::collections::HashSet<&str> =
        m.files.iter().map(|f| f.path.as_str()).collect();
    let keep_dirs: std::collections::HashSet<&str> =
        m.dirs.iter().map(|d| d.path.as_str()).collect();
    let mut removed = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        let rd = std::fs::read_dir(&abs).map_err(|e| PgError::io(&abs, e))?;
        for e in rd.flatten() {
            let child = rel.join(e.file_name());
            if child.as_os_str() == INCOMPLETE {
                continue;
            }
            let key = child.to_string_lossy().into_owned();
            let path = e.path();
            let ft = e.file_type().map_err(|err| PgError::io(&path, err))?;
            if ft.is_dir() {
                if keep_dirs.contains(key.as_str()) {
                    stack.push(child);
                } else {
                    std::fs::remove_dir_all(&path).map_err(|err| PgError::io(&path, err))?;
                    removed += 1;
                }
            } else if !(ft.is_file() && keep_files.contains(key.as_str())) {
                std::fs::remove_file(&path).map_err(|err| PgError::io(&path, err))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

pub(super) fn clear_dir(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let _ = if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}
