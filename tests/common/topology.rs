//! Real replication topologies for failover tests: a PostgreSQL 15 primary
//! with streaming standbys (made with `pg_basebackup -R`, run as the
//! unprivileged OS user) and a Redis master with a replica. Loopback only;
//! every server is stopped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::pg::{chown, clone_standby, free_port, psql, run_as_in};
use super::require_env;

/// One PostgreSQL server.
#[derive(Debug, Clone)]
pub struct PgNode {
    /// PGDATA.
    pub data: PathBuf,
    /// Port on 127.0.0.1.
    pub port: u16,
}

/// A primary and its standbys.
pub struct PgTopology {
    /// Holds all data directories (owned by the OS user).
    pub dir: tempfile::TempDir,
    /// OS user running PostgreSQL.
    pub user: String,
    /// PostgreSQL binaries.
    pub bin: PathBuf,
    /// The primary.
    pub primary: PgNode,
    /// Streaming standbys of the primary.
    pub standbys: Vec<PgNode>,
}

fn ok(o: std::process::Output, what: &str) {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

impl PgTopology {
    /// initdb + start a primary, then `standbys` streaming standbys.
    pub fn new(standbys: usize) -> PgTopology {
        let user = require_env("DR_TEST_OS_USER", "PostgreSQL");
        let bin = PathBuf::from(require_env("DR_TEST_PG_BIN_DIR", "PostgreSQL"));
        let dir = tempfile::tempdir().expect("tempdir");
        chown(dir.path(), &user);
        let data = dir.path().join("primary");
        let s = |p: &Path| p.to_str().expect("utf8").to_string();
        ok(
            run_as_in(
                &user,
                &bin.join("initdb"),
                &[
                    "-D",
                    &s(&data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                Path::new("/"),
            ),
            "initdb",
        );
        // Standbys retry a lost primary every 200 ms instead of 5 s, so a
        // repointed standby starts streaming at once. pg_rewind needs hint
        // bits logged, and the WAL back to the last checkpoint before a fork,
        // which later checkpoints would otherwise recycle.
        let common = "listen_addresses = '127.0.0.1'\nunix_socket_directories = ''\n\
                      wal_level = replica\nmax_wal_senders = 10\nhot_standby = on\n\
                      wal_retrieve_retry_interval = '200ms'\nshared_buffers = '32MB'\n\
                      wal_log_hints = on\nwal_keep_size = '128MB'\n";
        append(&data.join("postgresql.conf"), common);
        let mut t = PgTopology {
            dir,
            user,
            bin,
            primary: PgNode {
                data,
                port: free_port(),
            },
            standbys: Vec::new(),
        };
        let primary = t.primary.clone();
        t.start(&primary);
        for i in 1..=standbys {
            let node = PgNode {
                data: t.dir.path().join(format!("standby{i}")),
                port: free_port(),
            };
            clone_standby(&t.user, &t.bin, primary.port, &node.data);
            t.start(&node);
            t.standbys.push(node);
        }
        for sb in &t.standbys {
            t.wait_streaming(sb.port, primary.port);
        }
        t
    }

    /// Ports of the primary and the first two standbys.
    pub fn ports(&self) -> (u16, u16, u16) {
        (
            self.primary.port,
            self.standbys[0].port,
            self.standbys[1].port,
        )
    }

    /// Starts `node` on its port (the port is appended to its config, so it
    /// survives restarts by pg_ctl without options).
    pub fn start(&self, node: &PgNode) {
        append(
            &node.data.join("postgresql.conf"),
            &format!("port = {}\n", node.port),
        );
        self.pg_ctl(node, &["-w", "start"]);
    }

    /// Restarts `node` with pg_ctl (fast shutdown), as the OS user.
    pub fn restart(&self, node: &PgNode) {
        self.pg_ctl(node, &["-m", "fast", "-w", "restart"]);
    }

    /// Runs `pg_ctl -D <data> -l <log> args…` as the OS user; panics on failure.
    fn pg_ctl(&self, node: &PgNode, args: &[&str]) {
        let log = self.dir.path().join(format!("{}.log", node.port));
        let mut all = vec![
            "-D",
            node.data.to_str().expect("utf8"),
            "-l",
            log.to_str().expect("utf8"),
        ];
        all.extend_from_slice(args);
        ok(
            run_as_in(&self.user, &self.bin.join("pg_ctl"), &all, Path::new("/")),
            "pg_ctl",
        );
    }

    /// Runs SQL on `port`: Ok(trimmed output) or Err(psql's message).
    pub fn try_sql(&self, port: u16, sql: &str) -> Result<String, String> {
        psql(&self.bin, port, sql)
    }

    /// Runs SQL on `port`, panicking on failure.
    pub fn sql(&self, port: u16, sql: &str) -> String {
        self.try_sql(port, sql)
            .unwrap_or_else(|e| panic!("psql on {port}: {sql}: {e}"))
    }

    /// True when the server on `port` is in recovery.
    pub fn in_recovery(&self, port: u16) -> bool {
        self.sql(port, "SELECT pg_is_in_recovery()") == "t"
    }

    /// Polls `sql` on `port` until it prints `want`.
    pub fn wait_for(&self, port: u16, sql: &str, want: &str, timeout: Duration) {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            match self.try_sql(port, sql) {
                Ok(v) if v == want => return,
                Ok(v) => last = v,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{sql} on {port}: wanted {want:?}, last saw {last:?} after {timeout:?}");
    }

    /// Waits until the standby on `port` streams from `from_port`.
    pub fn wait_streaming(&self, port: u16, from_port: u16) {
        self.wait_for(
            port,
            "SELECT status || ':' || sender_port FROM pg_stat_wal_receiver",
            &format!("streaming:{from_port}"),
            Duration::from_secs(30),
        );
    }

    /// `[env.<name>.postgres.*]` TOML: `primary`, `standby1`, `standby2`, …
    pub fn env_toml(&self, env: &str) -> String {
        let mut nodes = vec![("primary".to_string(), &self.primary)];
        for (i, s) in self.standbys.iter().enumerate() {
            nodes.push((format!("standby{}", i + 1), s));
        }
        nodes
            .into_iter()
            .map(|(name, n)| self.server_toml(&format!("env.{env}.postgres.{name}"), n))
            .collect()
    }

    /// A `[table]` with the keys `dr` needs to act on `n` (conninfo,
    /// data_dir, bin_dir, os_user), as playbook servers and `[ha]` members
    /// have them.
    pub fn server_toml(&self, table: &str, n: &PgNode) -> String {
        format!(
            "[{table}]\nconninfo = \"host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=disable\"\ndata_dir = \"{}\"\nbin_dir = \"{}\"\nos_user = \"{}\"\n\n",
            n.port,
            n.data.display(),
            self.bin.display(),
            self.user
        )
    }

    fn stop(&self, data: &Path) {
        let _ = run_as_in(
            &self.user,
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().expect("utf8"),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
            Path::new("/"),
        );
    }
}

impl Drop for PgTopology {
    fn drop(&mut self) {
        // Stopping a server that is already down just fails; ignore it.
        for n in self.standbys.iter().chain(std::iter::once(&self.primary)) {
            self.stop(&n.data);
        }
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open conf");
    f.write_all(text.as_bytes()).expect("append conf");
}

/// A redis-server child process, killed (by PID) on drop.
pub struct RedisNode {
    child: Child,
    /// Port on 127.0.0.1.
    pub port: u16,
}

impl RedisNode {
    /// A connection.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .expect("url")
            .get_connection()
            .expect("connect to redis")
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `INFO replication` field.
    pub fn info(&self, key: &str) -> String {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut self.conn())
            .expect("INFO");
        info.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(&format!("{key}:"))
                    .map(str::to_string)
            })
            .unwrap_or_default()
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis master and one replica.
pub struct RedisPair {
    /// Temp dir holding both servers' files.
    pub dir: tempfile::TempDir,
    /// The master.
    pub master: RedisNode,
    /// Its replica.
    pub replica: RedisNode,
}

/// Starts `redis-server` in `dir/name` on a free port, as a replica of
/// `replicaof` when given, and waits until it answers.
pub fn start_redis(dir: &Path, name: &str, replicaof: Option<u16>) -> RedisNode {
    let bin = require_env("DR_TEST_REDIS_SERVER_BIN", "Redis");
    let port = free_port();
    let d = dir.join(name);
    std::fs::create_dir_all(&d).expect("mkdir");
    let mut cmd = Command::new(bin);
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(&d)
        .arg("--logfile")
        .arg(d.join("redis.log"))
        // No persistence; full syncs streamed at once (Redis 7 waits 5 s by default).
        .args(["--save", "", "--appendonly", "no"])
        .args([
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(m) = replicaof {
        cmd.args(["--replicaof", "127.0.0.1", &m.to_string()]);
    }
    let child = cmd.spawn().expect("start redis-server");
    let node = RedisNode { child, port };
    let start = Instant::now();
    loop {
        let pong = redis::Client::open(node.url())
            .ok()
            .and_then(|c| c.get_connection().ok())
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c).ok());
        if pong.as_deref() == Some("PONG") {
            return node;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "redis-server on {port} did not answer; see {}",
            d.join("redis.log").display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl RedisPair {
    /// Starts a master and a replica and waits until the link is up.
    pub fn new() -> RedisPair {
        let dir = tempfile::tempdir().expect("tempdir");
        let master = start_redis(dir.path(), "master", None);
        let replica = start_redis(dir.path(), "replica", Some(master.port));
        let p = RedisPair {
            dir,
            master,
            replica,
        };
        p.wait_link(&p.replica, p.master.port);
        p
    }

    /// Waits until `node` replicates from `master_port` with the link up.
    pub fn wait_link(&self, node: &RedisNode, master_port: u16) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if node.info("master_port") == master_port.to_string()
                && node.info("master_link_status") == "up"
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "redis on {} has no link to {master_port}: role {}, link {}",
            node.port,
            node.info("role"),
            node.info("master_link_status")
        );
    }

    /// `[env.<name>.redis.*]` TOML: `master` and `replica`.
    pub fn env_toml(&self, env: &str) -> String {
        format!(
            "[env.{env}.redis.master]\nurl = \"{}\"\n\n[env.{env}.redis.replica]\nurl = \"{}\"\n\n",
            self.master.url(),
            self.replica.url()
        )
    }
}
