//! RabbitMQ: the broker's topology (definitions) exported through the
//! management HTTP API, stored encrypted like every other object, and applied
//! back to a broker or written as a file for `load_definitions`.
//!
//! Messages are not backed up: see the README ("RabbitMQ").

pub mod api;
pub mod definitions;
pub mod manifest;
pub mod restore;
pub mod server;
pub mod snapshot;

use crate::config::{Config, ConfigError};
use crate::repo::RepoError;

/// RabbitMQ errors, each saying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum RabbitError {
    /// The settings are unusable (URL, password source, CA file).
    #[error("{0}")]
    Config(String),
    /// Nothing answered, or the connection broke.
    #[error("cannot reach the RabbitMQ management API at {url}: {why}")]
    Connect {
        /// Base URL.
        url: String,
        /// Cause and likely fix.
        why: String,
    },
    /// The server's certificate did not verify.
    #[error(
        "TLS to the RabbitMQ management API at {url} failed: {why}; the certificate must verify against the system roots or ca_file"
    )]
    Tls {
        /// Base URL.
        url: String,
        /// Cause.
        why: String,
    },
    /// 401: wrong user or password.
    #[error(
        "the RabbitMQ management API at {url} refused the credentials of user {user:?} (HTTP 401); check user and the password (password_env / password_file)"
    )]
    Auth {
        /// Base URL.
        url: String,
        /// The configured user.
        user: String,
    },
    /// Another HTTP error status.
    #[error("{method} {path} on {url} answered HTTP {status}: {body}{hint}")]
    Http {
        /// Base URL.
        url: String,
        /// GET / POST.
        method: &'static str,
        /// API path.
        path: String,
        /// Status code.
        status: u16,
        /// Start of the reply body (the API's `reason`).
        body: String,
        /// What to change, or empty.
        hint: String,
    },
    /// An answer that is not what the API documents.
    #[error("unexpected answer from the RabbitMQ management API at {url}: {why}")]
    Protocol {
        /// Base URL.
        url: String,
        /// What was wrong.
        why: String,
    },
    /// Repository problem.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// Anything else, already worded for the user.
    #[error("{0}")]
    Other(String),
}

impl RabbitError {
    /// True when retrying later may help (unreachable broker, repository
    /// hiccup); refused credentials or bad settings are permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            RabbitError::Connect { .. } => true,
            RabbitError::Http { status, .. } => *status >= 500,
            RabbitError::Repo(e) => e.is_transient(),
            RabbitError::Config(_)
            | RabbitError::Tls { .. }
            | RabbitError::Auth { .. }
            | RabbitError::Protocol { .. }
            | RabbitError::Other(_) => false,
        }
    }
}

/// Checks every `[rabbitmq.*]` URL, so a bad one is refused with its line
/// when the config is loaded (the password is read only when connecting).
pub fn check_config(cfg: &Config) -> Result<(), ConfigError> {
    for (name, r) in &cfg.rabbitmq {
        api::check_url(&r.get_ref().url)
            .map_err(|e| cfg.error_at(r.span(), format!("[rabbitmq.{name}]: {e}")))?;
    }
    for (env, e) in &cfg.env {
        for (name, t) in &e.get_ref().rabbitmq {
            let section = format!("[env.{env}.rabbitmq.{name}]");
            api::check_url(&t.get_ref().url)
                .map_err(|e| cfg.error_at(t.span(), format!("{section}: {e}")))?;
            let r = t.get_ref();
            if r.password_env.is_some() == r.password_file.is_some() {
                return Err(cfg.error_at(
                    t.span(),
                    format!("{section}: give the password once: password_env or password_file"),
                ));
            }
        }
    }
    Ok(())
}
