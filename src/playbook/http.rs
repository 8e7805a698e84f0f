//! A minimal HTTP/1.1 client for `http` gates and actions: one request per
//! connection, plain `http://` only. Health endpoints and service-discovery
//! hooks need no more, and a failover should not depend on a large client.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::StepError;

/// Bodies beyond this are cut: a health check needs the first bytes only.
const MAX_RESPONSE: u64 = 1 << 20;

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body (lossy UTF-8, de-chunked).
    pub body: String,
}

/// A parsed `http://host[:port]/path` URL.
#[derive(Debug, PartialEq)]
struct Url {
    host: String,
    port: u16,
    path: String,
}

fn parse_url(url: &str) -> Result<Url, String> {
    let rest = match url.strip_prefix("http://") {
        Some(r) => r,
        None if url.starts_with("https://") => {
            return Err(format!(
                "{url}: https is not supported by the built-in HTTP client; \
                 use an exec action (e.g. curl) for TLS endpoints"
            ));
        }
        None => return Err(format!("{url}: the URL must start with http://")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url}: unterminated IPv6 address"))?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| format!("{url}: {p:?} is not a port number"))?,
        None => 80,
    };
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    Ok(Url {
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

/// Sends one request and reads the whole response, all within `timeout`.
pub async fn request(
    method: &str,
    url: &str,
    headers: &BTreeMap<String, String>,
    body: Option<&str>,
    timeout: Duration,
) -> Result<Response, super::StepError> {
    let u = parse_url(url)?;
    let work = async {
        let mut stream = tokio::net::TcpStream::connect((u.host.as_str(), u.port))
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", u.host, u.port))?;
        let host_header = if u.host.contains(':') {
            format!("[{}]:{}", u.host, u.port)
        } else {
            format!("{}:{}", u.host, u.port)
        };
        let body = body.unwrap_or("");
        let mut req = format!(
            "{method} {} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: dr/{}\r\nConnection: close\r\nContent-Length: {}\r\n",
            u.path,
            env!("CARGO_PKG_VERSION"),
            body.len()
        );
        for (k, v) in headers {
            if k.contains(['\r', '\n', ':']) || v.contains(['\r', '\n']) {
                return Err(format!("header {k:?} contains a line break or colon"));
            }
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("cannot send the request to {url}: {e}"))?;
        let mut raw = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("cannot read the response from {url}: {e}"))?;
        parse_response(&raw).map_err(|e| format!("{url}: {e}"))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("{method} {url}: no response within {timeout:?}"))?
        .map_err(StepError)
}

fn parse_response(raw: &[u8]) -> Result<Response, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("incomplete HTTP response (no end of headers)")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/"))
        .ok_or_else(|| format!("not an HTTP status line: {status_line:?}"))?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
        })
    });
    let payload = &raw[end + 4..];
    let body = if chunked {
        dechunk(payload)?
    } else {
        payload.to_vec()
    };
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut p: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = p
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunked body")?;
        let size_text = String::from_utf8_lossy(&p[..eol]);
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_hex:?}"))?;
        p = &p[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = p.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        p = p.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:8080/health?x=1"),
            Ok(Url {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/health?x=1".into()
            })
        );
        assert_eq!(parse_url("http://[::1]/").map(|u| u.host), Ok("::1".into()));
        assert_eq!(
            parse_url("http://h").map(|u| (u.port, u.path)),
            Ok((80, "/".into()))
        );
        assert!(parse_url("https://h/").unwrap_err().contains("exec"));
        assert!(parse_url("ftp://h/").is_err());
    }

    #[test]
    fn responses() {
        let r =
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\nA: b\r\n\r\ndown").expect("ok");
        assert_eq!((r.status, r.body.as_str()), (503, "down"));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nheal\r\n3;x=y\r\nthy\r\n0\r\n\r\n",
        )
        .expect("ok");
        assert_eq!(r.body, "healthy");
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }
}
