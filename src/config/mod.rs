//! TOML configuration: parsing, validation and error reporting with file:line.
//!
//! Every struct denies unknown fields so a typo is an error that names the key and
//! the line, never a silently ignored setting.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

mod daemon;
mod drill;
mod durations;
mod ha;
mod ha_redis;
mod postgres;
mod redis;
mod repository;
#[cfg(test)]
mod tests;
mod validate;

use durations::{humantime_serde, humantime_serde_opt};
use validate::layout_name_ok;

pub mod rabbitmq;
pub use rabbitmq::{RabbitCheck, RabbitConfig, RabbitTarget, RabbitVerifyConfig};

pub use daemon::*;
pub use drill::*;
pub use ha::*;
pub use ha_redis::*;
pub use postgres::*;
pub use redis::*;
pub use repository::*;

/// A configuration error, already formatted as `file:line: message` plus a hint.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {message}")]
pub struct ConfigError {
    /// `path:line` (or just the path when no position is known).
    pub location: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// The whole `dr.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Encryption and write policy shared by all regions.
    pub repository: RepositoryConfig,
    /// Storage regions; the first listed is preferred for reads.
    #[serde(rename = "region", default)]
    pub regions: Vec<Spanned<RegionConfig>>,
    /// PostgreSQL clusters, by name (`[postgres.<name>]`).
    #[serde(default)]
    pub postgres: std::collections::BTreeMap<String, Spanned<PgConfig>>,
    /// Redis instances, by name (`[redis.<name>]`).
    #[serde(default)]
    pub redis: std::collections::BTreeMap<String, Spanned<RedisConfig>>,
    /// RabbitMQ brokers, by name (`[rabbitmq.<name>]`): their definitions.
    #[serde(default)]
    pub rabbitmq: std::collections::BTreeMap<String, Spanned<RabbitConfig>>,
    /// Audit log settings.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Failover environments, by name (`[env.<name>]`): the servers playbooks act on.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, Spanned<EnvConfig>>,
    /// `dr daemon` settings (`[daemon]`).
    #[serde(default)]
    pub daemon: Option<Spanned<DaemonConfig>>,
    /// Retention (`[retention]`): when the daemon runs `dr expire`.
    #[serde(default)]
    pub retention: Option<Spanned<RetentionConfig>>,
    /// Region catch-up (`[sync]`): when the daemon runs `dr repo sync`.
    #[serde(default)]
    pub sync: Option<Spanned<SyncConfig>>,
    /// Disaster-recovery drills, by name (`[drill.<name>]`), run by `dr drill NAME`.
    #[serde(default)]
    pub drill: std::collections::BTreeMap<String, Spanned<DrillConfig>>,
    /// Automatic failover through etcd (`[ha]`).
    #[serde(default)]
    pub ha: Option<Spanned<HaConfig>>,
    /// Where this file was loaded from (for messages).
    #[serde(skip)]
    pub source: PathBuf,
    /// Validated regions, in preference order.
    #[serde(skip)]
    pub region_specs: Vec<RegionSpec>,
    /// Byte offsets where each line of the file starts, to name the line of
    /// a key after parsing (the text itself may hold secrets, so it is not kept).
    #[serde(skip)]
    line_starts: Vec<usize>,
}

/// Where to look for the config when `--config` is not given.
pub fn default_config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("DR_CONFIG") {
        return PathBuf::from(p);
    }
    let local = PathBuf::from("dr.toml");
    if local.exists() {
        return local;
    }
    PathBuf::from("/etc/dr/dr.toml")
}

impl Config {
    /// Clusters whose WAL the daemon streams (`wal = "stream"`).
    pub fn streaming_clusters(&self) -> Vec<String> {
        self.postgres
            .iter()
            .filter(|(_, p)| p.get_ref().wal == WalMode::Stream)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The PostgreSQL cluster named `name`, or the only one when `name` is `None`.
    pub fn pg(&self, name: Option<&str>) -> Result<(String, &PgConfig), ConfigError> {
        self.pick(
            &self.postgres,
            name,
            "postgres",
            "PostgreSQL clusters",
            "conninfo and data_dir",
        )
    }

    /// The named Redis instance, or the only one when `name` is `None`.
    pub fn redis(&self, name: Option<&str>) -> Result<(String, &RedisConfig), ConfigError> {
        self.pick(&self.redis, name, "redis", "Redis instances", "a url")
    }

    /// The named RabbitMQ broker, or the only one when `name` is `None`.
    pub fn rabbitmq(&self, name: Option<&str>) -> Result<(String, &RabbitConfig), ConfigError> {
        self.pick(
            &self.rabbitmq,
            name,
            "rabbitmq",
            "RabbitMQ brokers",
            "url, user and password_env or password_file",
        )
    }

    fn pick<'a, T>(
        &self,
        map: &'a std::collections::BTreeMap<String, Spanned<T>>,
        name: Option<&str>,
        section: &str,
        what: &str,
        needs: &str,
    ) -> Result<(String, &'a T), ConfigError> {
        let names: Vec<&String> = map.keys().collect();
        let pick = match name {
            Some(n) => map.get_key_value(n),
            None if names.len() == 1 => map.iter().next(),
            None => None,
        };
        match pick {
            Some((n, c)) => Ok((n.clone(), c.get_ref())),
            None => Err(ConfigError {
                location: self.source.display().to_string(),
                message: match (name, names.is_empty()) {
                    (_, true) => {
                        format!("no [{section}.<name>] section is configured; add one with {needs}")
                    }
                    (Some(n), false) => format!(
                        "no [{section}.{n}] in the config; configured: {}",
                        join(&names)
                    ),
                    (None, false) => {
                        format!("several {what} are configured ({}); name one", join(&names))
                    }
                },
            }),
        }
    }
}

impl Config {
    /// The drill named `name`; the error lists the configured ones.
    pub fn drill(&self, name: &str) -> Result<&DrillConfig, ConfigError> {
        self.drill.get(name).map(|d| d.get_ref()).ok_or_else(|| {
            let names: Vec<&String> = self.drill.keys().collect();
            ConfigError {
                location: self.source.display().to_string(),
                message: if names.is_empty() {
                    format!("no [drill.{name}] in the config; add one with postgres/redis sources and report_dir")
                } else {
                    format!("no [drill.{name}] in the config; configured: {}", join(&names))
                },
            }
        })
    }

    /// The environment named `name`; the error lists the configured ones.
    pub fn environment(&self, name: &str) -> Result<&EnvConfig, ConfigError> {
        self.env.get(name).map(|e| e.get_ref()).ok_or_else(|| {
            let names: Vec<&String> = self.env.keys().collect();
            ConfigError {
                location: self.source.display().to_string(),
                message: if names.is_empty() {
                    format!("no [env.{name}] in the config; add one naming its servers, e.g. [env.{name}.postgres.primary] conninfo = \"…\"")
                } else {
                    format!("no [env.{name}] in the config; configured: {}", join(&names))
                },
            }
        })
    }
}

fn join(v: &[&String]) -> String {
    v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}

fn with_hint(msg: &str) -> String {
    if msg.starts_with("unknown field") {
        format!("{msg}; remove or correct the key (see config/dr.toml for every supported key)")
    } else if msg.starts_with("missing field") {
        format!("{msg}; add it (see config/dr.toml)")
    } else if msg.contains("unknown variant") {
        format!("{msg}; use one of the values listed (see config/dr.toml)")
    } else if let Some((_, expected)) = msg
        .strip_prefix("invalid type: ")
        .and_then(|m| m.split_once(", expected "))
    {
        // serde names Rust types ("expected i32"); say what to write.
        let want = match expected.trim() {
            "i8" | "i16" | "i32" | "i64" => "a whole number, without quotes (e.g. 3)",
            "u8" | "u16" | "u32" | "u64" | "usize" => {
                "a whole number of 0 or more, without quotes (e.g. 4)"
            }
            "f32" | "f64" => "a number, without quotes (e.g. 1.5)",
            "a boolean" => "true or false, without quotes",
            "a string" => "a quoted string (e.g. \"…\")",
            "a sequence" => "a list in brackets (e.g. [\"a\", \"b\"])",
            _ => return format!("{msg}; see config/dr.toml for the expected form"),
        };
        format!("{msg}; write {want}")
    } else {
        msg.to_string()
    }
}

pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn location(path: &Path, text: &str, span: Option<Range<usize>>) -> String {
    match span {
        Some(s) if s.end > 0 => format!("{}:{}", path.display(), line_of(text, s.start)),
        _ => path.display().to_string(),
    }
}

impl Config {
    /// Reads and parses a config file, checking everything that needs no
    /// engine knowledge. Parse-only: entry points load through
    /// `dr::validate::load`, which also runs the engines' checks.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            location: path.display().to_string(),
            message: format!(
                "cannot read config: {e}; pass --config FILE, set DR_CONFIG, or create ./dr.toml \
                 (see config/dr.toml for an example)"
            ),
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text and checks what needs no engine knowledge; `path`
    /// is used in messages only. Entry points use `dr::validate::parse`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let span = e.span();
            ConfigError {
                location: location(path, text, span.clone()),
                message: with_hint(e.message().trim()),
            }
        })?;
        cfg.source = path.to_path_buf();
        cfg.line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        if let Ok(id) = std::env::var("DR_IDENTITY_FILE")
            && !id.is_empty()
        {
            cfg.repository.identity_file = Some(Spanned::new(0..0, PathBuf::from(id)));
        }
        cfg.validate(text)?;
        Ok(cfg)
    }

    fn err(&self, text: &str, span: Range<usize>, message: String) -> ConfigError {
        ConfigError {
            location: location(&self.source, text, Some(span)),
            message,
        }
    }

    /// `path:line` of a key's span in this config, for messages about it.
    pub fn location_of(&self, span: Range<usize>) -> String {
        if span.end == 0 || self.line_starts.is_empty() {
            return self.source.display().to_string();
        }
        let line = self.line_starts.partition_point(|&s| s <= span.start);
        format!("{}:{line}", self.source.display())
    }

    /// An error about the config text at `span`, for checks that run after
    /// parsing (the engines' own checks).
    pub fn error_at(&self, span: Range<usize>, message: String) -> ConfigError {
        ConfigError {
            location: self.location_of(span),
            message,
        }
    }

    /// The identity file, if configured.
    pub fn identity_file(&self) -> Option<&Path> {
        self.repository
            .identity_file
            .as_ref()
            .map(|s| s.get_ref().as_path())
    }
}
