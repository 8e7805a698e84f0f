//! Files that hold decrypted data or audit records: created owner-only
//! (0600 files in 0700 directories) whatever the umask of the caller, since
//! `wal-fetch` and restores run from shells and services with umask 022.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Mode of files holding plaintext or audit records.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of directories dr creates for such files.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Creates `dir` and any missing parents with mode 0700 (existing ones are
/// left as they are).
pub fn create_private_dir_all(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
}

/// Options that create a file with mode 0600.
pub fn private_file() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.mode(PRIVATE_FILE_MODE);
    o
}

/// The async form of [`private_file`].
pub fn private_file_async() -> tokio::fs::OpenOptions {
    let mut o = tokio::fs::OpenOptions::new();
    o.mode(PRIVATE_FILE_MODE);
    o
}

/// Whether this process could append to `path`, or create it and its
/// missing directories, judged without leaving anything behind (a probe
/// file in the nearest existing directory is removed again).
pub fn can_append(path: &Path) -> bool {
    if path.exists() {
        return std::fs::OpenOptions::new().append(true).open(path).is_ok();
    }
    let Some(dir) = path.ancestors().skip(1).find(|d| d.exists()) else {
        return false;
    };
    let probe = dir.join(format!(".dr-probe-{}", std::process::id()));
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .is_ok();
    if ok {
        let _ = std::fs::remove_file(&probe);
    }
    ok
}

/// True when this process runs as root.
pub fn is_root() -> bool {
    // Read from /proc: no unsafe libc call needed (the crate forbids unsafe).
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A command that runs `program` as `os_user` (through runuser when root;
/// as this process's own user otherwise).
pub fn as_user(os_user: &str, program: &Path) -> tokio::process::Command {
    if is_root() {
        let mut c = tokio::process::Command::new("runuser");
        c.arg("-u").arg(os_user).arg("--").arg(program);
        c
    } else {
        tokio::process::Command::new(program)
    }
}

/// Gives `dir` (recursively) to `os_user` when running as root; a no-op
/// otherwise (an unprivileged process already owns what it created).
pub async fn chown_to(dir: &Path, os_user: &str) -> std::io::Result<()> {
    if !is_root() {
        return Ok(());
    }
    let st = tokio::process::Command::new("chown")
        .arg("-R")
        .arg(format!("{os_user}:"))
        .arg(dir)
        .status()
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("chown {}: {e}", dir.display())))?;
    if !st.success() {
        return Err(std::io::Error::other(format!(
            "chown -R {os_user}: {} failed; does the OS user {os_user} exist?",
            dir.display()
        )));
    }
    Ok(())
}

/// The effective uid of this process.
pub fn current_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Login name and home directory of `uid` from `/etc/passwd`, if it has an
/// entry there.
pub fn passwd_entry(uid: u32) -> Option<(String, PathBuf)> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[2].parse::<u32>().ok() == Some(uid))
            .then(|| (f[0].to_string(), PathBuf::from(f[5])))
    })
}

/// The primary group of `uid` and every group that lists it as a member
/// (from `/etc/passwd` and `/etc/group`).
pub fn groups_of(uid: u32) -> Vec<u32> {
    let Ok(passwd) = std::fs::read_to_string("/etc/passwd") else {
        return Vec::new();
    };
    let Some((name, gid)) = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[2].parse::<u32>().ok() == Some(uid))
            .then(|| (f[0].to_string(), f[3].parse::<u32>().ok()))
    }) else {
        return Vec::new();
    };
    let mut gids: Vec<u32> = gid.into_iter().collect();
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    for l in groups.lines() {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() >= 4
            && f[3].split(',').any(|m| m == name)
            && let Ok(g) = f[2].parse::<u32>()
        {
            gids.push(g);
        }
    }
    gids
}

/// Whether `uid` could create files in `path` or, while `path` does not
/// exist, create it: decided by the mode bits of `path` or of its nearest
/// existing ancestor, which is returned with the answer. Reads only.
pub fn writable_by(path: &Path, uid: u32) -> (PathBuf, bool) {
    use std::os::unix::fs::MetadataExt;
    let mut dir = path;
    let meta = loop {
        match std::fs::metadata(dir) {
            Ok(m) => break Some(m),
            Err(_) => match dir.parent() {
                Some(p) => dir = p,
                None => break None,
            },
        }
    };
    let Some(m) = meta else {
        return (dir.to_path_buf(), false);
    };
    let ok = m.is_dir()
        && (uid == 0
            || if m.uid() == uid {
                m.mode() & 0o200 != 0
            } else if groups_of(uid).contains(&m.gid()) {
                m.mode() & 0o020 != 0
            } else {
                m.mode() & 0o002 != 0
            });
    (dir.to_path_buf(), ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn root_has_a_passwd_entry() {
        assert_eq!(passwd_entry(0).map(|(n, _)| n).as_deref(), Some("root"));
        assert!(current_uid().is_some());
    }

    #[test]
    fn writable_by_reads_the_nearest_existing_directory() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let missing = d.path().join("a/b");
        let (dir, ok) = writable_by(&missing, 0);
        assert_eq!((dir.as_path(), ok), (d.path(), true));
        // Some other user: not the owner (root, or whoever runs the tests).
        let other = current_uid().map_or(65534, |u| if u == 65534 { 65533 } else { 65534 });
        assert!(!writable_by(&missing, other).1);
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert!(writable_by(&missing, other).1);
        assert!(!writable_by(std::path::Path::new("/proc/self/x"), other).1);
    }

    #[test]
    fn private_whatever_the_umask_allows() {
        let d = tempfile::tempdir().expect("tempdir");
        let nested = d.path().join("a/b");
        create_private_dir_all(&nested).expect("mkdir");
        for p in [d.path().join("a"), nested.clone()] {
            let m = std::fs::metadata(&p).expect("meta").permissions().mode();
            assert_eq!(m & 0o777, 0o700, "{}", p.display());
        }
        let f = nested.join("f");
        private_file()
            .write(true)
            .create_new(true)
            .open(&f)
            .expect("create");
        let m = std::fs::metadata(&f).expect("meta").permissions().mode();
        assert_eq!(m & 0o777, 0o600);
    }
}
