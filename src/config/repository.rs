//! `[repository]` and `[[region]]`: encryption, write policy and the storage
//! regions, with secrets read from the environment or files.

use super::*;

crate::message_error!(
    /// A secret that cannot be read from its environment variable or file.
    SecretError
);

/// A validated region: its name and backend.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionSpec {
    /// Unique region name.
    pub name: String,
    /// Backend settings.
    pub kind: RegionKind,
}

fn pick_secret(
    literal: &Option<String>,
    env: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<SecretSource>, ()> {
    let mut out = Vec::new();
    if let Some(v) = literal {
        out.push(SecretSource::Literal(v.clone()));
    }
    if let Some(v) = env {
        out.push(SecretSource::Env(v.clone()));
    }
    if let Some(v) = file {
        out.push(SecretSource::File(v.clone()));
    }
    match out.len() {
        0 => Ok(None),
        1 => Ok(out.pop()),
        _ => Err(()),
    }
}

/// `[repository]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// age recipients (public keys). Backup hosts need only these.
    #[serde(default = "no_recipients")]
    pub recipients: Spanned<Vec<String>>,
    /// age identity file (private key); needed only where restores run.
    #[serde(default)]
    pub identity_file: Option<Spanned<PathBuf>>,
    /// zstd level (1..=19).
    #[serde(default = "default_level")]
    pub compression_level: Spanned<i32>,
    /// zstd level for WAL segments, where archive latency matters more than size.
    #[serde(default = "default_wal_level")]
    pub wal_compression_level: Spanned<i32>,
    /// Regions that must hold an object durably before a write counts.
    #[serde(default = "default_min_regions")]
    pub min_regions: Spanned<usize>,
    /// A region that takes no data of a write for this long is stalled: its
    /// write is abandoned and the region counts as failed for that write.
    #[serde(default = "default_stall_timeout", with = "humantime_serde")]
    pub stall_timeout: std::time::Duration,
}

/// How long a region may take no data of a write before it counts as
/// stalled, unless `[repository] stall_timeout` says otherwise.
pub const DEFAULT_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn default_stall_timeout() -> std::time::Duration {
    DEFAULT_STALL_TIMEOUT
}

fn no_recipients() -> Spanned<Vec<String>> {
    Spanned::new(0..0, Vec::new())
}

fn default_level() -> Spanned<i32> {
    Spanned::new(0..0, 3)
}

fn default_wal_level() -> Spanned<i32> {
    Spanned::new(0..0, 1)
}

fn default_min_regions() -> Spanned<usize> {
    Spanned::new(0..0, 1)
}

/// One `[[region]]`. Kept flat (no serde `flatten`) so that unknown keys are
/// rejected and every key keeps its line number.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Unique name, used in messages and `--region`.
    pub name: Spanned<String>,
    /// `"fs"` or `"s3"`.
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    /// fs: directory that holds the repository.
    pub path: Option<PathBuf>,
    /// s3: endpoint URL; omitted means AWS.
    pub endpoint: Option<String>,
    /// s3: bucket name.
    pub bucket: Option<String>,
    /// s3: key prefix inside the bucket.
    pub prefix: Option<String>,
    /// s3: signing region.
    pub s3_region: Option<String>,
    /// s3: path-style addressing (most S3-compatible servers want this).
    pub path_style: Option<bool>,
    /// s3: literal access key id (prefer `_env` or `_file`).
    pub access_key_id: Option<String>,
    /// s3: environment variable holding the access key id.
    pub access_key_id_env: Option<String>,
    /// s3: file holding the access key id.
    pub access_key_id_file: Option<PathBuf>,
    /// s3: literal secret key (prefer `_env` or `_file`).
    pub secret_access_key: Option<String>,
    /// s3: environment variable holding the secret key.
    pub secret_access_key_env: Option<String>,
    /// s3: file holding the secret key.
    pub secret_access_key_file: Option<PathBuf>,
    /// s3: multipart part size in MiB.
    pub part_size_mib: Option<usize>,
    /// s3: write every object with S3 Object Lock retention of this many days
    /// (the bucket must have Object Lock enabled).
    pub object_lock_days: Option<u32>,
    /// s3: `"compliance"` (default; nobody can shorten it) or `"governance"`.
    pub object_lock_mode: Option<String>,
}

/// A validated region backend.
#[derive(Debug, Clone, PartialEq)]
pub enum RegionKind {
    /// A local (or mounted) filesystem directory.
    Fs {
        /// Directory that holds the repository.
        path: PathBuf,
    },
    /// An S3-compatible bucket.
    S3(S3Region),
}

/// Validated `type = "s3"` settings.
#[derive(Clone, PartialEq)]
pub struct S3Region {
    /// Endpoint URL; `None` means AWS.
    pub endpoint: Option<String>,
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing '/').
    pub prefix: String,
    /// Signing region.
    pub s3_region: String,
    /// Path-style addressing.
    pub path_style: bool,
    /// Where the access key id comes from; `None` = standard AWS chain.
    pub access_key_id: Option<SecretSource>,
    /// Where the secret key comes from.
    pub secret_access_key: Option<SecretSource>,
    /// Multipart part size in bytes.
    pub part_size: usize,
    /// Object Lock retention written with every object, if any.
    pub object_lock: Option<ObjectLock>,
}

/// S3 Object Lock retention applied to every object a region stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    /// Retention period.
    pub days: u32,
    /// COMPLIANCE (true) or GOVERNANCE mode.
    pub compliance: bool,
}

/// Where a secret is read from.
#[derive(Clone, PartialEq)]
pub enum SecretSource {
    /// Written in the config (discouraged).
    Literal(String),
    /// An environment variable name.
    Env(String),
    /// A file path.
    File(PathBuf),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Literal(_) => f.write_str("Literal([redacted])"),
            SecretSource::Env(n) => write!(f, "Env({n})"),
            SecretSource::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

impl SecretSource {
    /// Resolves the secret; the error says which variable or file is missing.
    pub fn resolve(&self) -> Result<String, SecretError> {
        match self {
            SecretSource::Literal(s) => Ok(s.clone()),
            SecretSource::Env(n) => std::env::var(n)
                .map_err(|_| {
                    format!(
                        "environment variable {n} is not set; export it or use a *_file setting"
                    )
                })
                .map_err(Into::into),
            SecretSource::File(p) => std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("cannot read {}: {e}", p.display()))
                .map_err(Into::into),
        }
    }
}

impl fmt::Debug for S3Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Region")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("s3_region", &self.s3_region)
            .field("path_style", &self.path_style)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key)
            .field("part_size", &self.part_size)
            .field("object_lock", &self.object_lock)
            .finish()
    }
}

impl fmt::Debug for RegionConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionConfig")
            .field("name", self.name.get_ref())
            .field("type", self.kind.get_ref())
            .finish_non_exhaustive()
    }
}

impl Config {
    pub(super) fn region_kind(
        &self,
        text: &str,
        region: &Spanned<RegionConfig>,
    ) -> Result<RegionKind, ConfigError> {
        let r = region.get_ref();
        let name = r.name.get_ref();
        let fail =
            |msg: String| Err(self.err(text, region.span(), format!("region {name:?}: {msg}")));
        let s3_keys = [
            ("endpoint", r.endpoint.is_some()),
            ("bucket", r.bucket.is_some()),
            ("prefix", r.prefix.is_some()),
            ("s3_region", r.s3_region.is_some()),
            ("path_style", r.path_style.is_some()),
            ("access_key_id", r.access_key_id.is_some()),
            ("access_key_id_env", r.access_key_id_env.is_some()),
            ("access_key_id_file", r.access_key_id_file.is_some()),
            ("secret_access_key", r.secret_access_key.is_some()),
            ("secret_access_key_env", r.secret_access_key_env.is_some()),
            ("secret_access_key_file", r.secret_access_key_file.is_some()),
            ("part_size_mib", r.part_size_mib.is_some()),
            ("object_lock_days", r.object_lock_days.is_some()),
            ("object_lock_mode", r.object_lock_mode.is_some()),
        ];
        match r.kind.get_ref().as_str() {
            "fs" => {
                if let Some((k, _)) = s3_keys.iter().find(|(_, set)| *set) {
                    return fail(format!("`{k}` only applies to type = \"s3\"; remove it"));
                }
                match &r.path {
                    None => {
                        fail("type = \"fs\" needs a path; add `path = \"/var/lib/dr/repo\"`".into())
                    }
                    Some(p) if !p.is_absolute() => fail(format!(
                        "path {} is relative; use an absolute path",
                        p.display()
                    )),
                    Some(p) => Ok(RegionKind::Fs { path: p.clone() }),
                }
            }
            "s3" => {
                if r.path.is_some() {
                    return fail(
                        "`path` only applies to type = \"fs\"; use bucket and prefix".into(),
                    );
                }
                let bucket = r.bucket.clone().unwrap_or_default();
                if bucket.is_empty() {
                    return fail("type = \"s3\" needs a bucket; add `bucket = \"…\"`".into());
                }
                let key = pick_secret(
                    &r.access_key_id,
                    &r.access_key_id_env,
                    &r.access_key_id_file,
                );
                let secret = pick_secret(
                    &r.secret_access_key,
                    &r.secret_access_key_env,
                    &r.secret_access_key_file,
                );
                let (Ok(key), Ok(secret)) = (key, secret) else {
                    return fail(
                        "set at most one of access_key_id / access_key_id_env / access_key_id_file \
                         (and of the secret_access_key settings)"
                            .into(),
                    );
                };
                if key.is_some() != secret.is_some() {
                    return fail(
                        "set both an access key id and a secret access key, or neither to use \
                         the standard AWS credential chain"
                            .into(),
                    );
                }
                let part_mib = r.part_size_mib.unwrap_or(8);
                if !(5..=4096).contains(&part_mib) {
                    return fail(format!(
                        "part_size_mib = {part_mib} is out of range; S3 needs 5 to 4096"
                    ));
                }
                let prefix = r.prefix.clone().unwrap_or_default();
                if prefix.starts_with('/') || prefix.split('/').any(|c| c == "..") {
                    return fail(format!(
                        "prefix {prefix:?} must be relative and must not contain '..'"
                    ));
                }
                if let Some(ep) = &r.endpoint
                    && !(ep.starts_with("http://") || ep.starts_with("https://"))
                {
                    return fail(format!(
                        "endpoint {ep:?} must start with http:// or https://"
                    ));
                }
                let object_lock = match (r.object_lock_days, r.object_lock_mode.as_deref()) {
                    (None, None) => None,
                    (None, Some(_)) => {
                        return fail(
                            "object_lock_mode needs object_lock_days (the retention period)".into(),
                        );
                    }
                    (Some(0), _) => {
                        return fail("object_lock_days must be at least 1".into());
                    }
                    (Some(days), mode) => {
                        let compliance = match mode.unwrap_or("compliance") {
                            "compliance" => true,
                            "governance" => false,
                            m => {
                                return fail(format!(
                                    "object_lock_mode {m:?} is unknown; use \"compliance\" or \"governance\""
                                ));
                            }
                        };
                        Some(ObjectLock { days, compliance })
                    }
                };
                Ok(RegionKind::S3(S3Region {
                    object_lock,
                    endpoint: r.endpoint.clone(),
                    bucket,
                    prefix: prefix.trim_matches('/').to_string(),
                    s3_region: r.s3_region.clone().unwrap_or_else(|| "us-east-1".into()),
                    path_style: r.path_style.unwrap_or(false),
                    access_key_id: key,
                    secret_access_key: secret,
                    part_size: part_mib << 20,
                }))
            }
            other => Err(self.err(
                text,
                r.kind.span(),
                format!("region {name:?}: unknown type {other:?}; use \"fs\" or \"s3\""),
            )),
        }
    }
}
