//! The HTTPS client of `http` gates and actions against a real TLS server on
//! loopback, whose certificates the test makes: one signed by a private CA
//! (trusted through `ca_file`) and one self-signed (refused). Replies come
//! with Content-Length and chunked; one path never answers.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dr::http::{HeaderValue, Request, request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Certificates from `common::test_certificates`: a private CA (`ca.crt`)
/// that signed the server's certificate for 127.0.0.1; and a self-signed
/// server certificate for 127.0.0.1 (`self.crt`).
struct Pki {
    dir: tempfile::TempDir,
    ca_pem: PathBuf,
}

impl Pki {
    fn signed(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("server.crt"),
            self.dir.path().join("server.key"),
        )
    }

    fn self_signed(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("self.crt"),
            self.dir.path().join("self.key"),
        )
    }
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tempdir");
    common::test_certificates(dir.path());
    common::openssl(
        dir.path(),
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "self.key",
            "-out",
            "self.crt",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ],
    );
    let ca_pem = dir.path().join("ca.crt");
    Pki { dir, ca_pem }
}

/// A TLS server presenting `identity`. Paths: `/len` answers with a
/// Content-Length body, `/chunked` with a chunked one sent in pieces,
/// `/hang` never answers, anything else 200 "ok". Each request's head and
/// body are kept in `requests`.
struct Server {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

fn serve((cert, key): (PathBuf, PathBuf)) -> Server {
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    let port = common::tls::serve(&cert, &key, move |conn| answer(conn, seen.clone()));
    Server { port, requests }
}

async fn answer(mut tls: common::tls::Conn, seen: Arc<Mutex<Vec<String>>>) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while raw.len() < head_end + length {
        match tls.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    seen.lock()
        .expect("lock")
        .push(String::from_utf8_lossy(&raw).to_string());
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let pieces: Vec<&[u8]> = match path.as_str() {
        "/len" => vec![b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nhealthy"],
        "/chunked" => vec![
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            b"4\r\nheal\r\n",
            b"3;ext=1\r\nthy\r\n",
            b"0\r\n\r\n",
        ],
        "/hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return;
        }
        _ => vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"],
    };
    for p in pieces {
        if tls.write_all(p).await.is_err() || tls.flush().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tls.shutdown().await;
}

fn get<'a>(
    url: &'a str,
    ca: Option<&'a Path>,
    headers: &'a BTreeMap<String, HeaderValue>,
) -> Request<'a> {
    Request {
        method: "GET",
        url,
        headers,
        body: None,
        ca_file: ca,
        timeout: Duration::from_secs(10),
    }
}

#[tokio::test]
async fn private_ca_in_ca_file_is_trusted_for_content_length_and_chunked_replies() {
    let pki = pki();
    let server = serve(pki.signed());
    let none = BTreeMap::new();
    for path in ["len", "chunked"] {
        let url = format!("https://127.0.0.1:{}/{path}", server.port);
        let r = request(&get(&url, Some(&pki.ca_pem), &none))
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!((r.status, r.body.as_str()), (200, "healthy"), "{url}");
    }
    // The same server is not trusted through the system roots.
    let url = format!("https://127.0.0.1:{}/len", server.port);
    let e = request(&get(&url, None, &none)).await.unwrap_err();
    assert!(e.contains("UnknownIssuer") && e.contains("ca_file"), "{e}");
}

#[tokio::test]
async fn self_signed_certificate_is_refused_naming_the_problem() {
    let pki = pki();
    let server = serve(pki.self_signed());
    let none = BTreeMap::new();
    let url = format!("https://127.0.0.1:{}/len", server.port);
    for ca in [Some(pki.ca_pem.as_path()), None] {
        let e = request(&get(&url, ca, &none)).await.unwrap_err();
        assert!(e.starts_with(&format!("GET {url}: ")), "{e}");
        assert!(
            e.contains("invalid peer certificate") && e.contains("UnknownIssuer"),
            "{e}"
        );
        assert!(e.contains("self-signed") && e.contains("ca_file"), "{e}");
    }
    assert!(
        server.requests.lock().expect("lock").is_empty(),
        "no request may be sent over a refused connection"
    );
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let pki = pki();
    let server = serve(pki.signed());
    let none = BTreeMap::new();
    let url = format!("https://127.0.0.1:{}/hang", server.port);
    let mut req = get(&url, Some(&pki.ca_pem), &none);
    req.timeout = Duration::from_millis(700);
    let started = Instant::now();
    let e = request(&req).await.unwrap_err();
    assert!(e.contains("no response within 700ms"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_token_file_others_can_read_is_refused_without_showing_it() {
    let pki = pki();
    let server = serve(pki.signed());
    let token = pki.dir.path().join("token");
    std::fs::write(&token, "s3cr3t-file\n").expect("write token");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let headers = BTreeMap::from([("X-Token".to_string(), HeaderValue::File(token.clone()))]);
    let url = format!("https://127.0.0.1:{}/hook", server.port);
    let e = request(&get(&url, Some(&pki.ca_pem), &headers))
        .await
        .unwrap_err();
    assert!(
        e.contains("readable by others") && e.contains("chmod"),
        "{e}"
    );
    assert!(!e.contains("s3cr3t"), "{e}");
    assert!(server.requests.lock().expect("lock").is_empty());
}

/// A dr.toml with an environment `test`; `http` gates and actions name no
/// server, but an environment must have one, which nothing contacts.
fn config(dir: &Path) -> PathBuf {
    let cfg = dir.join("dr.toml");
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nrecipients = [\"age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p\"]\n\n\
             [[region]]\nname = \"local\"\ntype = \"fs\"\npath = \"{}\"\n\n[audit]\npath = \"{}\"\n\n\
             [env.test]\nstate_dir = \"{}\"\n\n\
             [env.test.redis.unused]\nurl = \"redis://127.0.0.1:9\"\n",
            dir.join("repo").display(),
            dir.join("audit.jsonl").display(),
            dir.join("state").display(),
        ),
    )
    .expect("write config");
    cfg
}

fn failover(cfg: &Path, playbook: &Path, extra: &[&str]) -> Output {
    Command::new(common::dr_bin())
        .arg("--config")
        .arg(cfg)
        .arg("failover")
        .arg(playbook)
        .args(["--env", "test"])
        .args(extra)
        .env("DR_TEST_HOOK_TOKEN", "Bearer s3cr3t-env")
        .stdin(Stdio::null())
        .output()
        .expect("run dr")
}

#[test]
fn playbook_sends_tokens_from_env_and_file_over_https_and_never_prints_them() {
    let pki = pki();
    let server = serve(pki.signed());
    let dir = pki.dir.path();
    let token = dir.join("token");
    std::fs::write(&token, "s3cr3t-file\n").expect("write token");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let cfg = config(dir);
    let playbook = dir.join("hooks.toml");
    let base = format!("https://127.0.0.1:{}", server.port);
    let ca = pki.ca_pem.display();
    std::fs::write(
        &playbook,
        format!(
            r#"name = "hooks"

[[step]]
name = "notify"
pre = [{{ type = "http", url = "{base}/chunked", ca_file = "{ca}", body_contains = "healthy", headers = {{ X-Token = {{ file = "{}" }} }} }}]
action = {{ type = "http", url = "{base}/hook", ca_file = "{ca}", body = "{{}}", headers = {{ Authorization = {{ env = "DR_TEST_HOOK_TOKEN" }}, Content-Type = "application/json" }} }}
"#,
            token.display()
        ),
    )
    .expect("write playbook");

    let dry = failover(&cfg, &playbook, &["--dry-run"]);
    let run = failover(&cfg, &playbook, &["--yes", "--json"]);
    let text = |o: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(run.status.success(), "{}", text(&run));
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).expect("JSON report");
    assert_eq!(report["ok"], true, "{report}");

    let seen = server.requests.lock().expect("lock").clone();
    let hook = seen
        .iter()
        .find(|r| r.starts_with("POST /hook "))
        .unwrap_or_else(|| panic!("no POST /hook among {seen:?}"));
    assert!(
        hook.contains("authorization: Bearer s3cr3t-env\r\n"),
        "{hook}"
    );
    assert!(hook.ends_with("\r\n\r\n{}"), "{hook}");
    let gate = seen
        .iter()
        .find(|r| r.starts_with("GET /chunked "))
        .unwrap_or_else(|| panic!("no GET /chunked among {seen:?}"));
    assert!(gate.contains("x-token: s3cr3t-file\r\n"), "{gate}");

    let audit = std::fs::read_to_string(dir.join("audit.jsonl")).expect("audit log");
    for shown in [text(&dry), text(&run), audit] {
        assert!(!shown.contains("s3cr3t"), "a secret was printed: {shown}");
    }
}

#[test]
fn a_literal_secret_header_in_a_playbook_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());
    let playbook = dir.path().join("leak.toml");
    std::fs::write(
        &playbook,
        "name = \"leak\"\n\n[[step]]\nname = \"notify\"\n\
         action = { type = \"http\", url = \"https://127.0.0.1:9/hook\", headers = { Authorization = \"Bearer s3cr3t\" } }\n",
    )
    .expect("write playbook");
    let o = failover(&cfg, &playbook, &["--dry-run"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("leak.toml:5"), "{err}");
    assert!(err.contains("Authorization = { env = "), "{err}");
    assert!(!err.contains("s3cr3t"), "{err}");
}

/// An S3 region behind HTTPS: a TLS proxy with the private CA's
/// certificate in front of the Garage test server. The S3 client uses the
/// same rustls stack with the system roots, which `SSL_CERT_FILE` extends.
#[test]
fn s3_region_over_https_is_trusted_through_ssl_cert_file_and_refused_without() {
    let pki = pki();
    let endpoint = common::require_env("DR_TEST_S3_ENDPOINT", "Garage (S3)");
    let upstream = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let (cert, key) = pki.signed();
    let port = common::tls::serve(&cert, &key, move |mut conn| {
        let upstream = upstream.clone();
        async move {
            if let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
            }
        }
    });
    let region =
        common::garage_region_toml("tls").replace(&endpoint, &format!("https://127.0.0.1:{port}"));
    assert!(region.contains("https://"), "{region}");
    let cfg = pki.dir.path().join("dr.toml");
    std::fs::write(
        &cfg,
        format!(
            "[repository]\nrecipients = [\"age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p\"]\n\n{region}"
        ),
    )
    .expect("write config");
    let init = |ca: Option<&Path>| {
        let mut c = Command::new(common::dr_bin());
        c.arg("--config").arg(&cfg).args(["repo", "init", "--json"]);
        c.env_remove("SSL_CERT_FILE").env_remove("SSL_CERT_DIR");
        if let Some(ca) = ca {
            c.env("SSL_CERT_FILE", ca);
        }
        c.stdin(Stdio::null()).output().expect("run dr")
    };

    let refused = init(None);
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!refused.status.success(), "{err}");
    assert!(err.contains("certificate"), "{err}");

    let ok = init(Some(&pki.ca_pem));
    assert!(
        ok.status.success(),
        "{}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
}
