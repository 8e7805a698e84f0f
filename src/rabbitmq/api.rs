//! A small client for the RabbitMQ management HTTP API: the overview (version,
//! cluster name), definitions export and import, and single items for checks.
//! `https://` is verified with the project's rustls setup (system roots or
//! `ca_file`); `http://` is refused unless the host is a loopback address.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::RabbitError;
use crate::config::RabbitConfig;

/// What `GET /api/overview` says about the broker.
#[derive(Debug, Clone)]
pub struct Overview {
    /// `rabbitmq_version`.
    pub version: String,
    /// `cluster_name`.
    pub cluster_name: String,
    /// `node`.
    pub node: String,
}

/// One management API endpoint with its credentials.
pub struct Api {
    base: url::Url,
    user: String,
    password: String,
    client: reqwest::Client,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("url", &self.base.as_str())
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Checks that `url` is an `https://` URL, or `http://` to a loopback host.
pub fn check_url(url: &str) -> Result<url::Url, RabbitError> {
    let bad = |why: String| RabbitError::Config(format!("url {url:?}: {why}"));
    let u = url::Url::parse(url).map_err(|e| {
        bad(format!(
            "{e} (expected the management API's base, e.g. https://mq.internal:15671)"
        ))
    })?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err(bad(
            "put no credentials in the url; use user and password_env or password_file".into(),
        ));
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err(bad("the url takes no query or fragment".into()));
    }
    let loopback = match u.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => return Err(bad("no host".into())),
    };
    match u.scheme() {
        "https" => Ok(u),
        "http" if loopback => Ok(u),
        "http" => Err(bad(
            "http:// is allowed only for a loopback host: the password and the exported password hashes would cross the network in clear; use https://".into(),
        )),
        s => Err(bad(format!("scheme {s:?} is not https:// (or http:// on loopback)"))),
    }
}

/// Reads the password from `password_env` or `password_file`.
pub fn password(cfg: &RabbitConfig) -> Result<String, RabbitError> {
    password_from(cfg.password_env.as_deref(), cfg.password_file.as_deref())
}

/// Reads a password from an environment variable or a file (first line).
pub fn password_from(env: Option<&str>, file: Option<&Path>) -> Result<String, RabbitError> {
    if let Some(var) = env {
        return std::env::var(var).map_err(|_| {
            RabbitError::Config(format!(
                "password_env = {var:?} but that environment variable is not set"
            ))
        });
    }
    if let Some(f) = file {
        let s = std::fs::read_to_string(f)
            .map_err(|e| RabbitError::Config(format!("password_file {}: {e}", f.display())))?;
        return Ok(s.lines().next().unwrap_or_default().to_string());
    }
    Err(RabbitError::Config(
        "no password; set password_env or password_file".into(),
    ))
}

impl Api {
    /// The API of a configured broker.
    pub fn from_config(cfg: &RabbitConfig) -> Result<Api, RabbitError> {
        Api::new(
            &cfg.url,
            &cfg.user,
            password(cfg)?,
            cfg.ca_file.as_deref(),
            Duration::from_secs(cfg.timeout_seconds),
        )
    }

    /// The API at `url` with these credentials.
    pub fn new(
        url: &str,
        user: &str,
        password: String,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Api, RabbitError> {
        let mut base = check_url(url)?;
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let b = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none());
        // reqwest builds a TLS setup even for http:// and has no crypto
        // provider of its own: it always gets the project's (for http://
        // it is never used).
        let https = base.scheme() == "https";
        let tls = crate::tls::client_config(ca_file.filter(|_| https), None)
            .map_err(|e| RabbitError::Config(format!("ca_file: {e}")))?;
        let b = b.use_preconfigured_tls(tls).https_only(https);
        let client = b
            .build()
            .map_err(|e| RabbitError::Config(format!("HTTP client: {e}")))?;
        Ok(Api {
            base,
            user: user.to_string(),
            password,
            client,
        })
    }

    /// The base URL, for messages.
    pub fn url(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_string()
    }

    /// `api/<segments…>`, each segment percent-encoded (a vhost `/` is `%2F`).
    fn endpoint(&self, segments: &[&str]) -> url::Url {
        let mut u = self.base.clone();
        if let Ok(mut p) = u.path_segments_mut() {
            p.pop_if_empty().push("api");
            for s in segments {
                p.push(s);
            }
        }
        u
    }

    fn transport_error(&self, e: reqwest::Error) -> RabbitError {
        let mut chain = Vec::new();
        let mut cur: Option<&dyn std::error::Error> = Some(&e);
        let mut tls = false;
        while let Some(err) = cur {
            let text = err.to_string();
            if err.downcast_ref::<rustls::Error>().is_some()
                || text.contains("certificate")
                || text.contains("InvalidCertificate")
            {
                tls = true;
            }
            if chain.last() != Some(&text) {
                chain.push(text);
            }
            cur = err.source();
        }
        let why = chain.join(": ");
        if tls {
            return RabbitError::Tls {
                url: self.url(),
                why,
            };
        }
        let hint = if e.is_timeout() {
            "; no answer in time: check the host, the port and any firewall"
        } else if e.is_connect() {
            "; is the broker running with the management plugin, and are host and port in the url right?"
        } else {
            ""
        };
        RabbitError::Connect {
            url: self.url(),
            why: format!("{why}{hint}"),
        }
    }

    async fn send(
        &self,
        method: &'static str,
        segments: &[&str],
        body: Option<&Value>,
    ) -> Result<reqwest::Response, RabbitError> {
        let u = self.endpoint(segments);
        let path = u.path().to_string();
        let req = match body {
            Some(b) => self.client.post(u).json(b),
            None => self.client.get(u),
        };
        let resp = req
            .basic_auth(&self.user, Some(&self.password))
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        let status = resp.status().as_u16();
        if status == 401 {
            return Err(RabbitError::Auth {
                url: self.url(),
                user: self.user.clone(),
            });
        }
        if !(200..300).contains(&status) && status != 404 {
            let text = resp.text().await.unwrap_or_default();
            let reason = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(String::from))
                .unwrap_or(text);
            let hint = match status {
                403 => format!(
                    "; user {:?} needs the administrator tag to export and import definitions",
                    self.user
                ),
                _ => String::new(),
            };
            return Err(RabbitError::Http {
                url: self.url(),
                method,
                path,
                status,
                body: reason.chars().take(400).collect(),
                hint,
            });
        }
        Ok(resp)
    }

    /// GET `api/<segments>` as JSON; `None` on 404.
    pub async fn get(&self, segments: &[&str]) -> Result<Option<Value>, RabbitError> {
        let resp = self.send("GET", segments, None).await?;
        if resp.status().as_u16() == 404 {
            return Ok(None);
        }
        let v = resp
            .json::<Value>()
            .await
            .map_err(|e| RabbitError::Protocol {
                url: self.url(),
                why: format!("GET /api/{}: {e}", segments.join("/")),
            })?;
        Ok(Some(v))
    }

    async fn get_required(&self, segments: &[&str]) -> Result<Value, RabbitError> {
        self.get(segments).await?.ok_or_else(|| RabbitError::Protocol {
            url: self.url(),
            why: format!(
                "GET /api/{} answered 404; is this the management API (port 15672/15671 by default)?",
                segments.join("/")
            ),
        })
    }

    /// Version and cluster name.
    pub async fn overview(&self) -> Result<Overview, RabbitError> {
        let v = self.get_required(&["overview"]).await?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
        let version = field("rabbitmq_version");
        if version.is_empty() {
            return Err(RabbitError::Protocol {
                url: self.url(),
                why: "GET /api/overview has no rabbitmq_version".into(),
            });
        }
        Ok(Overview {
            version,
            cluster_name: field("cluster_name"),
            node: field("node"),
        })
    }

    /// `GET /api/definitions`: the whole broker.
    pub async fn definitions(&self) -> Result<Value, RabbitError> {
        let v = self.get_required(&["definitions"]).await?;
        if !v.is_object() {
            return Err(RabbitError::Protocol {
                url: self.url(),
                why: "GET /api/definitions is not a JSON object".into(),
            });
        }
        Ok(v)
    }

    /// `GET /api/definitions/<vhost>`: one vhost's exchanges, queues,
    /// bindings, policies and parameters (`None`: no such vhost).
    pub async fn vhost_definitions(&self, vhost: &str) -> Result<Option<Value>, RabbitError> {
        self.get(&["definitions", vhost]).await
    }

    /// `POST /api/definitions`: creates or updates everything in `defs`;
    /// nothing is deleted.
    pub async fn load_definitions(&self, defs: &Value) -> Result<(), RabbitError> {
        let resp = self.send("POST", &["definitions"], Some(defs)).await?;
        if resp.status().as_u16() == 404 {
            return Err(RabbitError::Protocol {
                url: self.url(),
                why: "POST /api/definitions answered 404".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_need_tls_off_loopback() {
        for ok in [
            "https://mq.internal:15671",
            "http://127.0.0.1:15672",
            "http://localhost:15672/",
            "http://[::1]:15672",
            "https://10.0.0.5/rabbit/",
        ] {
            assert!(check_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://mq.internal:15672",
            "http://10.0.0.5:15672",
            "amqp://127.0.0.1",
            "https://u:p@mq.internal",
            "not a url",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn vhost_segments_are_escaped() {
        let api = Api::new(
            "http://127.0.0.1:15672/prefix",
            "u",
            "p".into(),
            None,
            Duration::from_secs(1),
        )
        .expect("api");
        assert_eq!(
            api.endpoint(&["definitions", "/"]).as_str(),
            "http://127.0.0.1:15672/prefix/api/definitions/%2F"
        );
        assert!(!format!("{api:?}").contains("\"p\""));
    }
}
