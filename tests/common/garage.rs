//! A Garage (S3) server of a test's own, which the test may SIGKILL and
//! start again (the shared server of `scripts/testenv.sh` is never killed:
//! other tests use it). Single node, loopback, state in a temp dir.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::pg::stable_port;

/// One Garage server and the bucket and key it serves.
pub struct OwnGarage {
    /// State (config, metadata, data, log).
    pub dir: tempfile::TempDir,
    conf: PathBuf,
    child: Option<Child>,
    /// S3 endpoint port on 127.0.0.1.
    pub port: u16,
    /// Access key id.
    pub key_id: String,
    /// Secret key.
    pub secret: String,
}

fn hex(n: usize) -> String {
    (0..n)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

fn garage_bin() -> PathBuf {
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let p = cargo_home.join("bin/garage");
    if p.exists() {
        p
    } else {
        PathBuf::from("garage")
    }
}

impl OwnGarage {
    /// Starts a server with bucket `dr-chaos` and a key allowed on it.
    pub fn start() -> OwnGarage {
        let dir = tempfile::tempdir().expect("tempdir");
        let (port, rpc, admin) = (stable_port(), stable_port(), stable_port());
        let conf = dir.path().join("garage.toml");
        std::fs::write(
            &conf,
            format!(
                "metadata_dir = \"{0}/meta\"\ndata_dir = \"{0}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\ncompression_level = \"none\"\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{1}\"\n[s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{port}\"\nroot_domain = \".s3.garage.localhost\"\n[admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\nadmin_token = \"{2}\"\n",
                dir.path().display(),
                hex(32),
                hex(32)
            ),
        )
        .expect("garage.toml");
        let mut g = OwnGarage {
            dir,
            conf,
            child: None,
            port,
            key_id: format!("GK{}", hex(12)),
            secret: hex(32),
        };
        g.run();
        let node = g.cli(&["node", "id", "-q"]);
        let node = node.split('@').next().expect("node id").trim().to_string();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g.cli(&["layout", "apply", "--version", "1"]);
        let (id, secret) = (g.key_id.clone(), g.secret.clone());
        g.cli(&["key", "import", "--yes", "-n", "chaos", &id, &secret]);
        g.cli(&["bucket", "create", "dr-chaos"]);
        g.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", "dr-chaos", "--key", &id,
        ]);
        g.wait_s3();
        g
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("garage.log")
    }

    /// Starts the server process (again) and waits until its RPC answers.
    pub fn run(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("log");
        let child = Command::new(garage_bin())
            .arg("-c")
            .arg(&self.conf)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start garage");
        self.child = Some(child);
        let start = Instant::now();
        while Command::new(garage_bin())
            .arg("-c")
            .arg(&self.conf)
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "garage did not start: {}",
                std::fs::read_to_string(self.log()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the S3 port accepts connections (after a restart).
    pub fn wait_s3(&self) {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(start.elapsed() < Duration::from_secs(60), "garage S3 port");
            std::thread::sleep(Duration::from_millis(100));
        }
        // The first requests after a start can fail while tables load.
        std::thread::sleep(Duration::from_millis(500));
    }

    /// SIGKILLs the server (this test's own, by its PID).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let o = Command::new(garage_bin())
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .expect("garage cli");
        assert!(
            o.status.success(),
            "garage {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    /// TOML of a region on this server under a fresh prefix, with the
    /// credentials in files the test OS user can read.
    pub fn region_toml(&self, name: &str, extra: &str) -> String {
        format!(
            "[[region]]\nname = \"{name}\"\ntype = \"s3\"\nendpoint = \"http://127.0.0.1:{}\"\nbucket = \"dr-chaos\"\nprefix = \"{}\"\ns3_region = \"garage\"\npath_style = true\naccess_key_id_file = \"{}\"\nsecret_access_key_file = \"{}\"\n{extra}\n",
            self.port,
            super::unique("repo"),
            self.secret_file("key", &self.key_id).display(),
            self.secret_file("secret", &self.secret).display(),
        )
    }

    fn secret_file(&self, name: &str, value: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, value).expect("secret file");
        let user = super::require_env("DR_TEST_OS_USER", "PostgreSQL");
        super::pg::chown(&p, &user);
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        // The OS user must reach the file.
        std::fs::set_permissions(
            self.dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        p
    }

    /// Whether the server process is running.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The state directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for OwnGarage {
    fn drop(&mut self) {
        self.kill();
    }
}
