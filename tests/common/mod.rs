//! Shared helpers for integration tests. Servers are started by
//! `scripts/testenv.sh`; a missing server is a test failure with instructions,
//! never a skip.

#![allow(dead_code)]

use std::path::Path;

use dr::config::{S3Region, SecretSource};
use dr::store::{S3Store, Store};

/// Reads a variable exported by `scripts/testenv.sh`, or fails the test saying
/// which server is missing and how to start it.
pub fn require_env(var: &str, server: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{var} is not set, so the {server} test server is not available. \
             Run the suite with `scripts/test.sh`, or start the servers with \
             `scripts/testenv.sh start` and `source \"${{DR_TESTENV_DIR:-/tmp/dr-testenv}}/env.sh\"`."
        ),
    }
}

/// A random lowercase id for isolating test data.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// S3 settings for the Garage test server, under a fresh prefix.
pub fn garage_region(prefix: &str) -> S3Region {
    S3Region {
        endpoint: Some(require_env("DR_TEST_S3_ENDPOINT", "Garage (S3)")),
        bucket: require_env("DR_TEST_S3_BUCKET", "Garage (S3)"),
        prefix: prefix.to_string(),
        s3_region: require_env("DR_TEST_S3_REGION", "Garage (S3)"),
        path_style: true,
        access_key_id: Some(SecretSource::Literal(require_env(
            "DR_TEST_S3_ACCESS_KEY_ID",
            "Garage (S3)",
        ))),
        secret_access_key: Some(SecretSource::Literal(require_env(
            "DR_TEST_S3_SECRET_ACCESS_KEY",
            "Garage (S3)",
        ))),
        part_size: 8 << 20,
        object_lock: None,
    }
}

/// A store on the Garage test server under a fresh prefix.
pub async fn garage_store() -> Store {
    let cfg = garage_region(&unique("t"));
    Store::S3(S3Store::connect(&cfg).await.expect("S3 client"))
}

/// TOML for a Garage region named `name` (credentials inline, prefix fresh).
pub fn garage_region_toml(name: &str) -> String {
    format!(
        "[[region]]\nname = \"{name}\"\ntype = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\nprefix = \"{}\"\ns3_region = \"{}\"\npath_style = true\naccess_key_id_env = \"DR_TEST_S3_ACCESS_KEY_ID\"\nsecret_access_key_env = \"DR_TEST_S3_SECRET_ACCESS_KEY\"\n",
        require_env("DR_TEST_S3_ENDPOINT", "Garage (S3)"),
        require_env("DR_TEST_S3_BUCKET", "Garage (S3)"),
        unique("repo"),
        require_env("DR_TEST_S3_REGION", "Garage (S3)"),
    )
}

/// TOML for an fs region.
pub fn fs_region_toml(name: &str, path: &Path) -> String {
    format!(
        "[[region]]\nname = \"{name}\"\ntype = \"fs\"\npath = \"{}\"\n",
        path.display()
    )
}

/// Path of the built `dr` binary.
pub mod catalog_fixture;
pub mod chaos;
pub mod garage;
pub mod ha;
pub mod ha_redis;
pub mod load;
pub mod pg;
pub mod redis;
pub mod tls;
pub mod topology;

/// Path of the built `dr` binary.
pub fn dr_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dr")
}

/// Writes a test CA (`ca.crt`), an unrelated CA (`other-ca.crt`) and a server
/// certificate for 127.0.0.1 signed by the first (`server.crt`, `server.key`)
/// into `tls`.
pub fn test_certificates(tls: &Path) {
    for ca in ["ca", "other-ca"] {
        openssl(
            tls,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=dr test {ca}"),
            ],
        );
    }
    openssl(
        tls,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(tls.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    openssl(
        tls,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

/// Runs openssl in `dir`; panics with its stderr on failure.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let o = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A TCP forwarder to a real server that can be switched off, so a region
/// becomes unreachable (connections refused) and comes back, as a network
/// outage would, without stopping the server other tests share.
pub struct Gate {
    /// Port on 127.0.0.1.
    pub port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Gate {
    /// Forwards 127.0.0.1:`port` to 127.0.0.1:`upstream`, open.
    pub fn start(upstream: u16) -> Gate {
        use std::sync::atomic::Ordering;
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        l.set_nonblocking(true).expect("nonblocking");
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (o, s) = (open.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((client, _)) = l.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                };
                if !o.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                let _ = client.set_nonblocking(false);
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                for (mut from, mut to, o) in [
                    (client.try_clone(), server.try_clone(), o.clone()),
                    (server.try_clone(), client.try_clone(), o.clone()),
                ]
                .into_iter()
                .filter_map(|(a, b, o)| Some((a.ok()?, b.ok()?, o)))
                {
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 64 << 10];
                        // A closed gate also cuts connections already open.
                        let _ = from.set_read_timeout(Some(std::time::Duration::from_millis(200)));
                        loop {
                            if !o.load(Ordering::Relaxed) {
                                break;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Gate { port, open, stop }
    }

    /// Opens or closes the gate.
    pub fn set_open(&self, open: bool) {
        self.open.store(open, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// TOML for an S3 region; credentials are read from the named variables.
#[allow(clippy::too_many_arguments)]
pub fn s3_region_toml(
    name: &str,
    endpoint: &str,
    bucket: &str,
    prefix: &str,
    s3_region: &str,
    key_env: &str,
    secret_env: &str,
    extra: &str,
) -> String {
    format!(
        "[[region]]\nname = \"{name}\"\ntype = \"s3\"\nendpoint = \"{endpoint}\"\nbucket = \"{bucket}\"\nprefix = \"{prefix}\"\ns3_region = \"{s3_region}\"\npath_style = true\naccess_key_id_env = \"{key_env}\"\nsecret_access_key_env = \"{secret_env}\"\n{extra}\n"
    )
}

/// The port of an `http://127.0.0.1:PORT` endpoint.
pub fn endpoint_port(endpoint: &str) -> u16 {
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in endpoint {endpoint}"))
}

/// Every file under `p`, recursively (none if `p` does not exist).
pub fn walk_files(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walk_files(&path));
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Archived WAL segment objects of an fs region rooted at `repo`, in
/// segment order.
pub fn wal_objects(repo: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<std::path::PathBuf> = walk_files(repo)
        .into_iter()
        .filter(|p| {
            let s = p.to_string_lossy();
            s.contains("/wal/") && !s.contains(".history") && !s.contains(".backup")
        })
        .collect();
    v.sort_by_key(|p| p.file_name().map(|f| f.to_os_string()));
    v
}

/// The 24-character WAL segment name an archived object is stored under.
pub fn segment_of(object: &Path) -> String {
    object
        .file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| f.get(..24))
        .expect("segment name")
        .to_string()
}

/// Parses a command's stdout as JSON, or fails showing both streams.
pub fn json_of(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// (status, body) of an HTTP/1.0 GET on 127.0.0.1 (no chunking), or None.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// The value of the sample `name{labels}` (every label given must match;
/// others may be present) in a Prometheus text exposition.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
        let ok = n == name
            && labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        ok.then(|| value.parse().ok()).flatten()
    })
}
