//! Redis: snapshots taken by acting as a replica (the RDB streams straight from
//! the server's replication socket into the codec), and restores of the newest
//! snapshot at or before a time.

pub mod manifest;
pub mod rdb;
pub mod restore;
pub mod snapshot;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::{Config, ConfigError, RedisConfig};
use crate::repo::RepoError;

/// Redis errors, each saying what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The URL or password settings are unusable.
    #[error("{0}")]
    Config(String),
    /// TCP/TLS connection failed.
    #[error("cannot connect to Redis at {addr}: {why}")]
    Connect {
        /// host:port.
        addr: String,
        /// Cause.
        why: String,
    },
    /// AUTH was refused.
    #[error(
        "Redis at {addr} refused the credentials{user}: {reply}; check the user and password in the url (or password_env / password_file)"
    )]
    Auth {
        /// host:port.
        addr: String,
        /// " for user X", or empty.
        user: String,
        /// Server reply.
        reply: String,
    },
    /// The server refused to act as our master.
    #[error("Redis at {addr} refused replication: {reply}. {hint}")]
    Refused {
        /// host:port.
        addr: String,
        /// Server reply.
        reply: String,
        /// What to change.
        hint: String,
    },
    /// The replication stream broke or was invalid.
    #[error(
        "snapshot stream from {addr} failed after {received} bytes: {why}; no snapshot was recorded"
    )]
    Stream {
        /// host:port.
        addr: String,
        /// Payload bytes received.
        received: u64,
        /// Cause.
        why: String,
    },
    /// Unexpected protocol data.
    #[error("unexpected reply from Redis at {addr}: {why}")]
    Protocol {
        /// host:port.
        addr: String,
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

/// The `redis` crate's error for a server reached through `url`, with the
/// likely fix: its "Incompatible type - Parse error at 1 Unexpected `84`"
/// means whatever answers there does not speak the Redis protocol.
pub fn client_cause(e: &redis::RedisError, url: &str) -> String {
    let addr = redis::Client::open(url)
        .ok()
        .map(|c| c.get_connection_info().addr().to_string())
        .unwrap_or_else(|| "the url".into());
    if e.kind() == redis::ErrorKind::Parse {
        format!(
            "{addr} did not answer in the Redis protocol; is it a Redis server (host and port in the url)?"
        )
    } else if e.is_connection_refusal() {
        format!(
            "{addr}: {e}; nothing listens there: is the server running, and are host and port in the url right?"
        )
    } else if e.is_timeout() {
        format!("{addr}: {e}; no answer in time: check the host and any firewall")
    } else {
        format!("{addr}: {e}")
    }
}

impl RedisError {
    /// True when retrying later may help: the server was unreachable or the
    /// stream broke. Refused credentials or replication are permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            RedisError::Connect { .. } | RedisError::Stream { .. } => true,
            RedisError::Repo(e) => e.is_transient(),
            RedisError::Config(_)
            | RedisError::Auth { .. }
            | RedisError::Refused { .. }
            | RedisError::Protocol { .. }
            | RedisError::Other(_) => false,
        }
    }
}

/// Where and how to reach one Redis server.
#[derive(Clone)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `rediss://`.
    pub tls: bool,
    /// ACL user, if any.
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<String>,
    /// CA bundle for TLS.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Endpoint {
    /// Checks the URL and password settings without reading any secret (for
    /// config validation: a missing variable matters only when connecting).
    pub fn check(c: &RedisConfig) -> Result<(), RedisError> {
        Endpoint::parse(c).map(|_| ())
    }

    /// Parses the URL and resolves the password source.
    pub fn from_config(c: &RedisConfig) -> Result<Endpoint, RedisError> {
        let (mut e, in_url) = Endpoint::parse(c)?;
        e.password = if let Some(p) = in_url {
            Some(p)
        } else if let Some(var) = &c.password_env {
            Some(std::env::var(var).map_err(|_| {
                RedisError::Config(format!(
                    "password_env = {var:?} but that environment variable is not set"
                ))
            })?)
        } else if let Some(f) = &c.password_file {
            let s = std::fs::read_to_string(f)
                .map_err(|e| RedisError::Config(format!("password_file {}: {e}", f.display())))?;
            Some(s.trim_end_matches(['\r', '\n']).to_string())
        } else {
            None
        };
        Ok(e)
    }

    fn parse(c: &RedisConfig) -> Result<(Endpoint, Option<String>), RedisError> {
        let bad = |why: &str| RedisError::Config(format!("url: {why}"));
        let u = url::Url::parse(&c.url).map_err(|e| {
            bad(&format!(
                "{e} (expected redis://[user[:password]@]host[:port])"
            ))
        })?;
        let tls = match u.scheme() {
            "redis" => false,
            "rediss" => true,
            s => return Err(bad(&format!("scheme {s:?} is not redis:// or rediss://"))),
        };
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let username = Some(decode(u.username())).filter(|s| !s.is_empty());
        let in_url = u.password().map(decode);
        let sources = [
            in_url.is_some(),
            c.password_env.is_some(),
            c.password_file.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            return Err(RedisError::Config(
                "the password is given more than once; use one of: the url, password_env, password_file".into(),
            ));
        }
        if username.is_some() && !sources.contains(&true) {
            return Err(RedisError::Config(
                "the url names a user but no password is given".into(),
            ));
        }
        let e = Endpoint {
            host,
            port: u.port().unwrap_or(6379),
            tls,
            username,
            password: None,
            ca_file: c.ca_file.clone(),
        };
        Ok((e, in_url))
    }

    /// `host:port`, for messages.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Opens a TCP (and, for `rediss://`, verified TLS) connection.
    pub async fn connect(&self, timeout: Duration) -> Result<Box<dyn Conn>, RedisError> {
        let err = |why: String| RedisError::Connect {
            addr: self.addr(),
            why,
        };
        let tcp =
            tokio::time::timeout(timeout, TcpStream::connect((self.host.as_str(), self.port)))
                .await
                .map_err(|_| err(format!("no answer within {}s", timeout.as_secs())))?
                .map_err(|e| err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        if !self.tls {
            return Ok(Box::new(tcp));
        }
        let cfg = crate::tls::client_config(self.ca_file.as_deref(), None)
            .map_err(|e| RedisError::Config(format!("ca_file: {e}")))?;
        let name = rustls_pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| err(format!("invalid TLS server name: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| err(format!("TLS handshake: {e}")))?;
        Ok(Box::new(tls))
    }
}

/// A bidirectional byte stream (plain TCP or TLS).
pub trait Conn: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Conn for T {}

/// Checks every `[redis.*]` source's URL and password settings, so a bad
/// one is refused with its line when the config is loaded.
pub fn check_config(cfg: &Config) -> Result<(), ConfigError> {
    for (name, r) in &cfg.redis {
        Endpoint::check(r.get_ref())
            .map_err(|e| cfg.error_at(r.span(), format!("[redis.{name}]: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            password_env: None,
            password_file: None,
            ca_file: None,
            server_bin: "/usr/bin/redis-server".into(),
            os_user: None,
            timeout_seconds: 60,
            sync: Default::default(),
            retention: None,
            verify: Default::default(),
            schedule: None,
        }
    }

    #[test]
    fn urls_parse_with_users_and_escapes() {
        let e = Endpoint::from_config(&cfg("rediss://backup:p%40ss%3Aw@cache.internal:6380"))
            .expect("parse");
        assert!(e.tls);
        assert_eq!(e.port, 6380);
        assert_eq!(e.username.as_deref(), Some("backup"));
        assert_eq!(e.password.as_deref(), Some("p@ss:w"));
        assert!(!format!("{e:?}").contains("p@ss"));
        let e = Endpoint::from_config(&cfg("redis://:secret@127.0.0.1")).expect("parse");
        assert_eq!((e.port, e.username.clone()), (6379, None));
        assert_eq!(e.password.as_deref(), Some("secret"));
        for bad in ["http://x", "redis://", "redis://user@host", "not a url"] {
            assert!(Endpoint::from_config(&cfg(bad)).is_err(), "{bad}");
        }
        let mut c = cfg("redis://:a@h");
        c.password_env = Some("X".into());
        assert!(Endpoint::from_config(&c).is_err());
    }
}
