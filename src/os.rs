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
