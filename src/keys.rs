//! age key handling: generation, identity files, recipient fingerprints.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use age::secrecy::ExposeSecret;

/// Errors reading or writing key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The identity file is readable by group or others.
    #[error(
        "identity file {path} is readable by group or others (mode {mode:o}); \
         run `chmod 600 {path}`"
    )]
    TooOpen {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The identity file cannot be read.
    #[error("cannot read identity file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The identity file holds no usable key.
    #[error(
        "identity file {path} holds no age X25519 identity (a line starting with \
         AGE-SECRET-KEY-1); create one with `dr keygen --output {path}`"
    )]
    NoIdentity {
        /// The file.
        path: String,
    },
    /// A line looked like a key but did not parse.
    #[error("identity file {path}, line {line}: not a valid age secret key")]
    BadLine {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
    },
    /// The output file for keygen already exists.
    #[error("{path} already exists; refusing to overwrite a key (move it away first)")]
    Exists {
        /// The file.
        path: String,
    },
    /// Writing the key failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Loads every X25519 identity from an age identity file (as written by
/// `age-keygen` or `dr keygen`), after checking its permissions.
pub fn load_identities(path: &Path) -> Result<Vec<age::x25519::Identity>, KeyError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
        path: shown.clone(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen { path: shown, mode });
    }
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.parse::<age::x25519::Identity>() {
            Ok(id) => out.push(id),
            Err(_) => {
                return Err(KeyError::BadLine {
                    path: shown,
                    line: i + 1,
                });
            }
        }
    }
    if out.is_empty() {
        return Err(KeyError::NoIdentity { path: shown });
    }
    Ok(out)
}

/// Parses recipients already validated by the config.
pub fn parse_recipients(list: &[String]) -> Vec<age::x25519::Recipient> {
    list.iter().filter_map(|r| r.parse().ok()).collect()
}

/// A short, stable fingerprint of a recipient (safe to store in plaintext).
pub fn fingerprint(recipient: &str) -> String {
    let h = blake3::hash(recipient.as_bytes());
    hex::encode(&h.as_bytes()[..8])
}

/// A freshly generated key pair written to disk.
pub struct GeneratedKey {
    /// Where the identity was written.
    pub path: PathBuf,
    /// The public key to put in `recipients`.
    pub recipient: String,
}

/// Generates an identity and writes it with mode 0600, never overwriting.
pub fn keygen(path: &Path) -> Result<GeneratedKey, KeyError> {
    let shown = path.display().to_string();
    let id = age::x25519::Identity::generate();
    let recipient = id.to_public().to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: shown.clone(),
                }
            } else {
                KeyError::Write {
                    path: shown.clone(),
                    source,
                }
            }
        })?;
    let created = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let body = format!(
        "# created: {created}\n# public key: {recipient}\n{}\n",
        id.to_string().expose_secret()
    );
    f.write_all(body.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|source| KeyError::Write {
            path: shown,
            source,
        })?;
    Ok(GeneratedKey {
        path: path.to_path_buf(),
        recipient,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_0600_and_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("id.txt");
        let k = keygen(&p).expect("keygen");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let ids = load_identities(&p).expect("load");
        assert_eq!(ids[0].to_public().to_string(), k.recipient);
        assert!(matches!(keygen(&p), Err(KeyError::Exists { .. })));
    }

    #[test]
    fn world_readable_identity_is_refused_with_chmod_hint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("id.txt");
        keygen(&p).expect("keygen");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let Err(e) = load_identities(&p) else {
            panic!("world-readable identity accepted")
        };
        let e = e.to_string();
        assert!(e.contains(&format!("chmod 600 {}", p.display())), "{e}");
    }
}
