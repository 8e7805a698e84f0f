//! HTTP(S) requests for hooks, health checks and management APIs: reqwest
//! over the project's one rustls stack (`tls::client_config`), so a server is
//! verified against the system roots or a `ca_file` exactly as PostgreSQL and
//! Redis servers are.
//!
//! Header values that are secrets (tokens) come from the environment or a
//! file at request time, never from the text of a playbook or config: such
//! text is printed in plans, kept in version control and copied into tickets.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::tls;

crate::message_error!(
    /// An HTTP(S) request that cannot be made or was not answered as expected: the URL (secrets redacted) and the cause.
    HttpError
);

/// Bodies beyond this are cut: a health check or hook reply needs the first
/// bytes only, and an endless body must not fill memory.
pub const MAX_BODY: usize = 1 << 20;

/// How long opening the TCP connection may take, at most (the request's
/// own timeout may be shorter).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a header's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    /// Written in the playbook (refused for secret-looking headers).
    Literal(String),
    /// The value of an environment variable of the `dr` process.
    Env(String),
    /// The contents of a file, trailing newline removed.
    File(PathBuf),
}

impl fmt::Display for HeaderValue {
    /// What plans and reports may show: a literal, or where a secret comes
    /// from, never the secret itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderValue::Literal(v) => write!(f, "{v:?}"),
            HeaderValue::Env(name) => write!(f, "${name}"),
            HeaderValue::File(path) => write!(f, "<{}>", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for HeaderValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Literal(String),
            Source(BTreeMap<String, String>),
        }
        let bad = || {
            serde::de::Error::custom(
                "a header value is a string, { env = \"VARIABLE\" } or { file = \"/path/to/file\" }",
            )
        };
        match Raw::deserialize(d).map_err(|_: D::Error| bad())? {
            Raw::Literal(v) => Ok(HeaderValue::Literal(v)),
            Raw::Source(t) if t.len() == 1 => match t.into_iter().next() {
                Some((k, v)) if k == "env" => Ok(HeaderValue::Env(v)),
                Some((k, v)) if k == "file" => Ok(HeaderValue::File(PathBuf::from(v))),
                _ => Err(bad()),
            },
            Raw::Source(_) => Err(bad()),
        }
    }
}

/// Header names whose values are credentials. A name containing one of
/// these (case-insensitive) must take its value from `env` or `file`.
const SECRET_NAMES: &[&str] = &[
    "authorization",
    "cookie",
    "token",
    "secret",
    "api-key",
    "apikey",
    "password",
    "signature",
];

fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    SECRET_NAMES.iter().any(|s| n.contains(s))
}

/// Checks a request as written, before anything runs: the URL is http(s)
/// with a host and no password, header names are valid, and secret headers
/// do not hold a literal value. Errors say what to write instead.
pub fn check_request(url: &str, headers: &BTreeMap<String, HeaderValue>) -> Result<(), HttpError> {
    let parsed = url::Url::parse(url).map_err(|e| {
        format!(
            "url {:?} is not a URL ({e}); write e.g. \"https://host:8443/health\"",
            redact_url(url)
        )
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || !parsed.has_host() {
        return Err(format!(
            "url {:?} must start with https:// or http:// and name a host",
            redact_url(url)
        )
        .into());
    }
    if parsed.password().is_some() {
        return Err(format!(
            "url {:?} holds a password; send it as a header instead, e.g. \
             headers = {{ Authorization = {{ env = \"HOOK_TOKEN\" }} }}",
            redact_url(url)
        )
        .into());
    }
    for (name, value) in headers {
        reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("header name {name:?} is not a valid HTTP header name"))?;
        match value {
            HeaderValue::Literal(_) if is_secret_name(name) => {
                return Err(format!(
                    "header {name} holds its value in the playbook text, where plans, logs and \
                     version control show it; take it from the environment or a file: \
                     {name} = {{ env = \"HOOK_TOKEN\" }} or {name} = {{ file = \"/etc/dr/hook-token\" }}"
                ).into());
            }
            HeaderValue::Literal(v) => {
                reqwest::header::HeaderValue::from_str(v)
                    .map_err(|_| format!("header {name}: the value holds a control character"))?;
            }
            HeaderValue::Env(var) if var.is_empty() || var.contains('=') => {
                return Err(
                    format!("header {name}: {var:?} is not an environment variable name").into(),
                );
            }
            HeaderValue::Env(_) | HeaderValue::File(_) => {}
        }
    }
    Ok(())
}

/// `url` with any password replaced by `***`, for messages.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Reads a header's value. Errors name the header and the source, never
/// the value.
fn resolve(name: &str, value: &HeaderValue) -> Result<reqwest::header::HeaderValue, String> {
    let text = match value {
        HeaderValue::Literal(v) => v.clone(),
        HeaderValue::Env(var) => std::env::var(var).map_err(|e| {
            format!(
                "header {name}: environment variable {var} {}",
                match e {
                    std::env::VarError::NotPresent => "is not set; export it for dr".to_string(),
                    std::env::VarError::NotUnicode(_) => "is not valid UTF-8".to_string(),
                }
            )
        })?,
        HeaderValue::File(path) => {
            read_secret_file(path).map_err(|e| format!("header {name}: {e}"))?
        }
    };
    if text.is_empty() {
        return Err(format!("header {name}: the value from {value} is empty"));
    }
    let mut v = reqwest::header::HeaderValue::from_str(&text)
        .map_err(|_| format!("header {name}: the value from {value} holds a control character"))?;
    v.set_sensitive(is_secret_name(name) || !matches!(value, HeaderValue::Literal(_)));
    Ok(v)
}

/// A secret file's contents without the trailing newline; refused when
/// anyone may read it, like a TLS client key.
pub fn read_secret_file(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
    if mode & 0o007 != 0 {
        return Err(format!(
            "{} is readable by others (mode {:o}); run: chmod o-rwx {}",
            path.display(),
            mode & 0o777,
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

/// A client that verifies servers against `ca_file` (PEM; only those CAs) or
/// the system roots, does not follow redirects (the status checked is the
/// URL's own), and gives up connecting after `connect_timeout`.
pub fn client(
    ca_file: Option<&Path>,
    connect_timeout: Duration,
) -> Result<reqwest::Client, HttpError> {
    let tls = tls::client_config(ca_file, None).map_err(String::from)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("dr/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("HTTP client setup: {}", causes(&e)))
        .map_err(Into::into)
}

/// One request as a playbook writes it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `GET`, `POST`, …
    pub method: &'a str,
    /// `https://host[:port]/path`.
    pub url: &'a str,
    /// Extra headers.
    pub headers: &'a BTreeMap<String, HeaderValue>,
    /// Request body.
    pub body: Option<&'a str>,
    /// CA bundle to verify the server with instead of the system roots.
    pub ca_file: Option<&'a Path>,
    /// Limit on the whole exchange, reading the body included.
    pub timeout: Duration,
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body (lossy UTF-8, de-chunked, at most [`MAX_BODY`] bytes).
    pub body: String,
}

/// Sends one request and reads the response (Content-Length or chunked),
/// all within `req.timeout`. Errors name the method, the URL (password
/// redacted) and the cause, e.g. the certificate problem.
pub async fn request(req: &Request<'_>) -> Result<Response, HttpError> {
    let shown = redact_url(req.url);
    let what = format!("{} {shown}", req.method);
    let method = reqwest::Method::from_bytes(req.method.as_bytes())
        .map_err(|_| format!("{what}: {:?} is not an HTTP method", req.method))?;
    let mut headers = reqwest::header::HeaderMap::new();
    for (name, value) in req.headers {
        let n = reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{what}: {name:?} is not a valid header name"))?;
        headers.insert(n, resolve(name, value).map_err(|e| format!("{what}: {e}"))?);
    }
    let client = client(req.ca_file, CONNECT_TIMEOUT.min(req.timeout))
        .map_err(|e| format!("{what}: {e}"))?;
    let mut builder = client.request(method, req.url).headers(headers);
    if let Some(body) = req.body {
        builder = builder.body(body.to_string());
    }
    let work = async {
        let mut resp = builder
            .send()
            .await
            .map_err(|e| format!("{what}: {}", causes(&e.without_url())))?;
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        while body.len() < MAX_BODY {
            match resp.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(e) => {
                    return Err(format!(
                        "{what}: reading the response body: {}",
                        causes(&e.without_url())
                    ));
                }
            }
        }
        body.truncate(MAX_BODY);
        Ok(Response {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(req.timeout, work)
        .await
        .map_err(|_| {
            format!(
                "{what}: no response within {}",
                humantime::format_duration(req.timeout)
            )
        })?
        .map_err(Into::into)
}

/// The error and its causes, each said once, with a hint when the cause is
/// a certificate the client does not accept.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut hint = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        // io::Error::source() skips the error it wraps (here an io::Error
        // around rustls's): look inside, as deep as the wrapping goes.
        let mut inner = Some(err);
        while let Some(e) = inner {
            if let Some(rustls::Error::InvalidCertificate(c)) = e.downcast_ref() {
                hint = Some(certificate_hint(c));
            }
            inner = e
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map(|i| i as &(dyn std::error::Error + 'static));
        }
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    let mut out = parts.join(": ");
    if let Some(h) = hint {
        out.push_str("; ");
        out.push_str(&h);
    }
    out
}

/// What a refused server certificate means and what to do about it.
fn certificate_hint(e: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match e {
        C::UnknownIssuer => "the server's certificate is self-signed or signed by a CA that is                              not trusted; if a private CA signed it, set ca_file to that CA's                              PEM certificate"
            .into(),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "the server's certificate is not issued for this host name; use the name it was              issued for in the URL"
                .into()
        }
        C::Expired | C::ExpiredContext { .. } => "the server's certificate has expired".into(),
        C::NotValidYet | C::NotValidYetContext { .. } => {
            "the server's certificate is not valid yet (check the clocks)".into()
        }
        other => format!("the server's certificate is not accepted ({other:?}); check ca_file"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, HeaderValue)]) -> BTreeMap<String, HeaderValue> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn literal_secrets_are_refused_and_sources_allowed() {
        let lit = |v: &str| HeaderValue::Literal(v.into());
        let e = check_request(
            "https://h/",
            &headers(&[("Authorization", lit("Bearer abc"))]),
        )
        .unwrap_err();
        assert!(
            e.contains("env = \"HOOK_TOKEN\"") && !e.contains("abc"),
            "{e}"
        );
        assert!(check_request("https://h/", &headers(&[("X-Api-Key", lit("k"))])).is_err());
        let ok = headers(&[
            ("Authorization", HeaderValue::Env("HOOK_TOKEN".into())),
            ("X-Auth-Token", HeaderValue::File("/etc/dr/t".into())),
            ("Content-Type", lit("application/json")),
        ]);
        assert_eq!(check_request("http://127.0.0.1:8080/x", &ok), Ok(()));
        assert!(check_request("https://h/", &headers(&[("Bad Name", lit("x"))])).is_err());
    }

    #[test]
    fn urls_are_checked_and_passwords_redacted() {
        let none = BTreeMap::new();
        assert!(
            check_request("ftp://h/", &none)
                .unwrap_err()
                .contains("https://")
        );
        assert!(check_request("not a url", &none).is_err());
        let e = check_request("https://u:hunter2@h/", &none).unwrap_err();
        assert!(e.contains("***") && !e.contains("hunter2"), "{e}");
        assert_eq!(redact_url("https://h:1/p?q"), "https://h:1/p?q");
    }

    #[test]
    fn shown_values_never_include_secrets() {
        assert_eq!(HeaderValue::Env("T".into()).to_string(), "$T");
        assert_eq!(HeaderValue::File("/t".into()).to_string(), "</t>");
    }

    #[test]
    fn header_values_parse_from_toml() {
        #[derive(Deserialize)]
        struct H {
            h: BTreeMap<String, HeaderValue>,
        }
        let h: H = toml::from_str("h = { A = \"x\", B = { env = \"T\" }, C = { file = \"/f\" } }")
            .expect("parses");
        assert_eq!(h.h["A"], HeaderValue::Literal("x".into()));
        assert_eq!(h.h["B"], HeaderValue::Env("T".into()));
        assert_eq!(h.h["C"], HeaderValue::File("/f".into()));
        let e = toml::from_str::<H>("h = { B = { vault = \"T\" } }")
            .err()
            .expect("refused");
        assert!(e.to_string().contains("{ env = "), "{e}");
    }
}
