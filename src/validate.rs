//! Loading a config as every entry point must: `config` parses and checks
//! what needs no engine knowledge, then each engine checks its own
//! sections. This layer sits above the engines and `verify` so that
//! `config` itself imports nothing above it.

use std::path::Path;

use crate::config::{Config, ConfigError};

/// Reads, parses and fully checks a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let cfg = Config::load(path)?;
    check(&cfg)?;
    Ok(cfg)
}

/// Parses and fully checks config text; `path` is used in messages only.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let cfg = Config::parse(text, path)?;
    check(&cfg)?;
    Ok(cfg)
}

/// The checks that need engine knowledge, on an already parsed config.
pub fn check(cfg: &Config) -> Result<(), ConfigError> {
    crate::redis::check_config(cfg)?;
    crate::rabbitmq::check_config(cfg)?;
    crate::postgres::check_config(cfg)?;
    crate::ha::check_config(cfg)?;
    crate::verify::staging::check_config(cfg)
}
