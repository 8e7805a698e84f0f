//! A replicated PostgreSQL cluster under automatic failover: the
//! [`PgTopology`] servers and an [`HaDaemons`]: one real `dr daemon` per
//! member, each reaching the real etcd of `scripts/testenv.sh` through its
//! own [`Gate`] so a test can cut one member off from etcd, and an operator
//! config that reaches etcd directly. Redis groups reuse [`HaDaemons`].

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::pg::free_port;
use super::topology::{PgNode, PgTopology};
use super::{Gate, dr_bin, endpoint_port, require_env, unique};

/// A valid age recipient: failover needs no repository, but dr.toml does.
const RECIPIENT: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

/// Lease in the tests: short, so a failover takes seconds.
pub const TTL: Duration = Duration::from_secs(6);
/// Loop period in the tests.
pub const LOOP_WAIT: Duration = Duration::from_secs(1);

/// Members `a` (the primary), `b`, `c`, … with their daemons (the
/// [`HaDaemons`] fields and methods are reached through `Deref`).
pub struct HaCluster {
    /// The daemons (dropped, so killed, first).
    pub d: HaDaemons,
    /// The servers.
    pub topo: PgTopology,
    /// Each member's server.
    pub nodes: Vec<PgNode>,
}

impl std::ops::Deref for HaCluster {
    type Target = HaDaemons;
    fn deref(&self) -> &HaDaemons {
        &self.d
    }
}

impl std::ops::DerefMut for HaCluster {
    fn deref_mut(&mut self) -> &mut HaDaemons {
        &mut self.d
    }
}

/// Members named `a`, `b`, … with one `dr daemon` each, their configs,
/// gates to etcd, logs and the shared audit log.
pub struct HaDaemons {
    /// Configs, daemon logs, audit log.
    pub dir: tempfile::TempDir,
    /// Member names, `a` first.
    pub names: Vec<String>,
    /// Each member's way to etcd.
    pub gates: Vec<Gate>,
    /// Running daemons.
    pub daemons: Vec<Option<Child>>,
    /// Each member's config.
    pub cfgs: Vec<PathBuf>,
    /// Each member's daemon's `/metrics` port.
    pub listens: Vec<u16>,
    /// Config for `dr ha` commands (direct to etcd, no member).
    pub op_cfg: PathBuf,
    /// The shared audit log.
    pub audit: PathBuf,
}

impl HaCluster {
    /// A primary and `standbys` streaming standbys, configs written, no
    /// daemon started yet, coordinated through the etcd of
    /// `scripts/testenv.sh`.
    pub fn new(standbys: usize) -> HaCluster {
        HaCluster::with_etcd(standbys, &require_env("DR_TEST_ETCD_ENDPOINTS", "etcd"))
    }

    /// As [`HaCluster::new`], through the etcd at `etcd` (a URL).
    pub fn with_etcd(standbys: usize, etcd: &str) -> HaCluster {
        HaCluster::with_more(standbys, etcd, "")
    }

    /// As [`HaCluster::with_etcd`], with `more` `[ha]` TOML in every config
    /// (e.g. a Redis group of the same members).
    pub fn with_more(standbys: usize, etcd: &str, more: &str) -> HaCluster {
        let topo = PgTopology::new(standbys);
        let mut nodes = vec![topo.primary.clone()];
        nodes.extend(topo.standbys.iter().cloned());
        let names = member_names(nodes.len());
        let members: String = names
            .iter()
            .zip(&nodes)
            .map(|(n, node)| topo.server_toml(&format!("ha.postgres.main.member.{n}"), node))
            .collect();
        HaCluster {
            d: HaDaemons::new(names, etcd, &format!("{members}{more}")),
            topo,
            nodes,
        }
    }

    /// Port of member `name`'s server.
    pub fn port(&self, name: &str) -> u16 {
        self.nodes[self.idx(name)].port
    }

    /// Starts every member's daemon and waits until `a` leads and the
    /// others stream from it.
    pub fn start_all(&mut self, timeout: Duration) {
        for n in self.names.clone() {
            self.start_daemon(&n);
        }
        let others: Vec<&str> = self.names[1..].iter().map(String::as_str).collect();
        self.wait_settled("a", &others, timeout);
    }

    /// Stops member `name`'s server the hard way (`pg_ctl -m immediate`),
    /// as a crash would.
    pub fn crash_server(&self, name: &str) {
        let node = &self.nodes[self.idx(name)];
        let o = super::pg::run_as_in(
            &self.topo.user,
            &self.topo.bin.join("pg_ctl"),
            &[
                "-D",
                node.data.to_str().expect("utf8"),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
            std::path::Path::new("/"),
        );
        assert!(
            o.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Names every server after its member (`cluster_name`, the
    /// `application_name` its WAL receiver reports) and sets
    /// `synchronous_standby_names` to `names` on all of them (a server never
    /// waits for itself), then restarts them. Before any daemon starts.
    pub fn synchronous(&self, names: &str) {
        for (n, node) in self.names.iter().zip(&self.nodes) {
            // One statement each: ALTER SYSTEM refuses a transaction block.
            for sql in [
                format!("ALTER SYSTEM SET cluster_name = '{n}'"),
                format!("ALTER SYSTEM SET synchronous_standby_names = '{names}'"),
            ] {
                self.topo.sql(node.port, &sql);
            }
            self.topo.restart(node);
        }
        let p = self.nodes[0].port;
        for node in &self.nodes[1..] {
            self.topo.wait_streaming(node.port, p);
        }
    }

    /// Sends `signal` (`STOP`, `CONT`, `KILL`) to member `name`'s daemon.
    pub fn signal_daemon(&self, name: &str, signal: &str) {
        let pid = self.daemons[self.idx(name)]
            .as_ref()
            .unwrap_or_else(|| panic!("daemon {name} is not running"))
            .id();
        send_signal(pid, signal);
    }

    /// SIGKILLs member `name`'s postmaster (its pid from `postmaster.pid`),
    /// as a crash of the server would.
    pub fn kill_postmaster(&self, name: &str) {
        let pidfile = self.nodes[self.idx(name)].data.join("postmaster.pid");
        let text = std::fs::read_to_string(&pidfile).expect("postmaster.pid");
        let pid: u32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {}: {text:?}", pidfile.display()));
        send_signal(pid, "KILL");
    }

    /// Member `name`'s daemon's `/metrics`, or None when it does not answer.
    pub fn metrics(&self, name: &str) -> Option<String> {
        super::http_get(self.listens[self.idx(name)], "/metrics")
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| body)
    }

    /// The sample `family{cluster="main",member=name,labels…}` of member
    /// `name`'s daemon.
    pub fn metric(&self, name: &str, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut all = vec![("cluster", "main"), ("member", name)];
        all.extend_from_slice(labels);
        super::sample(&self.metrics(name)?, family, &all)
    }

    /// `dr ha status --json --cluster main`.
    pub fn status(&self) -> serde_json::Value {
        self.status_json(&["--cluster", "main"])
    }

    /// Polls until `f` holds, or fails the test with the daemons' logs.
    pub fn wait(&self, what: &str, timeout: Duration, f: impl FnMut(&HaCluster) -> bool) {
        self.d.wait_with(self, what, timeout, f)
    }

    /// Waits until `leader` holds the key and each of `followers` is a
    /// healthy standby (as its daemon published) streaming from it.
    pub fn wait_settled(&self, leader: &str, followers: &[&str], timeout: Duration) {
        let lp = self.port(leader);
        let what = format!("{leader} leads, {followers:?} stream from it");
        self.wait(&what, timeout, |c| {
            let s = c.status();
            let role = |n: &str| {
                s["members"]
                    .as_array()
                    .and_then(|ms| ms.iter().find(|m| m["name"] == n))
                    .filter(|m| m["healthy"] == true)
                    .and_then(|m| m["role"].as_str())
                    .map(str::to_string)
            };
            s["leader"] == leader
                && role(leader).as_deref() == Some("primary")
                && followers.iter().all(|n| {
                    role(n).as_deref() == Some("standby")
                        && c.topo
                            .try_sql(
                                c.port(n),
                                "SELECT status || ':' || sender_port FROM pg_stat_wal_receiver",
                            )
                            .is_ok_and(|v| v == format!("streaming:{lp}"))
                })
        });
    }

    /// True when the server of `name` accepts a write.
    pub fn writable(&self, name: &str) -> bool {
        self.topo
            .try_sql(
                self.port(name),
                "CREATE TEMP TABLE w (i int); INSERT INTO w VALUES (1)",
            )
            .is_ok()
    }
}

/// `a`, `b`, … for `n` members.
pub fn member_names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| char::from(b'a' + i as u8).to_string())
        .collect()
}

impl HaDaemons {
    /// Configs for members `names` whose `[ha]` member sections are
    /// `members` (TOML), each daemon reaching the etcd at `etcd` through
    /// its own gate; no daemon started yet.
    pub fn new(names: Vec<String>, etcd: &str, members: &str) -> HaDaemons {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = format!("/t{}", unique("ha"));
        let audit = dir.path().join("audit.jsonl");
        let base = |endpoint: &str, extra: &str| {
            format!(
                "[repository]\nrecipients = [\"{RECIPIENT}\"]\n\n[[region]]\nname = \"local\"\ntype = \"fs\"\npath = \"{}\"\n\n[audit]\npath = \"{}\"\n\n{extra}[ha]\nendpoints = [\"{endpoint}\"]\nprefix = \"{prefix}\"\nttl = \"{}s\"\nloop_wait = \"{}s\"\n\n{members}",
                dir.path().join("repo").display(),
                audit.display(),
                TTL.as_secs(),
                LOOP_WAIT.as_secs(),
            )
        };
        let op_cfg = dir.path().join("operator.toml");
        std::fs::write(&op_cfg, base(etcd, "")).expect("write config");
        let etcd_port = endpoint_port(etcd);
        let mut gates = Vec::new();
        let mut cfgs = Vec::new();
        let mut listens = Vec::new();
        for n in &names {
            let gate = Gate::start(etcd_port);
            let listen = free_port();
            listens.push(listen);
            let daemon = format!(
                "[daemon]\nlisten = \"127.0.0.1:{listen}\"\nstate_dir = \"{}\"\n\n",
                dir.path().join(format!("state-{n}")).display()
            );
            let p = dir.path().join(format!("{n}.toml"));
            std::fs::write(
                &p,
                base(&format!("http://127.0.0.1:{}", gate.port), &daemon),
            )
            .expect("write config");
            gates.push(gate);
            cfgs.push(p);
        }
        HaDaemons {
            daemons: names.iter().map(|_| None).collect(),
            dir,
            names,
            gates,
            cfgs,
            listens,
            op_cfg,
            audit,
        }
    }

    /// Index of member `name`.
    pub fn idx(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no member {name}"))
    }

    /// Starts `dr daemon --member name`, logging to `daemon-<name>.log`.
    pub fn start_daemon(&mut self, name: &str) {
        let i = self.idx(name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("daemon-{name}.log")))
            .expect("log");
        let child = Command::new(dr_bin())
            .arg("--config")
            .arg(&self.cfgs[i])
            .args(["-v", "daemon", "--member", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dr daemon");
        self.daemons[i] = Some(child);
    }

    /// SIGKILLs member `name`'s daemon.
    pub fn kill_daemon(&mut self, name: &str) {
        let i = self.idx(name);
        if let Some(mut c) = self.daemons[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `dr --config <operator config> args…`.
    pub fn dr(&self, args: &[&str]) -> Output {
        Command::new(dr_bin())
            .arg("--config")
            .arg(&self.op_cfg)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run dr")
    }

    /// The daemons' logs, for failure messages.
    pub fn logs(&self) -> String {
        self.names
            .iter()
            .map(|n| {
                let p = self.dir.path().join(format!("daemon-{n}.log"));
                let t = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = t.lines().collect();
                let head = &lines[..lines.len().min(25)];
                let tail = &lines[lines.len().saturating_sub(25).max(head.len())..];
                format!(
                    "---- daemon {n} ----\n{}\n…\n{}\n",
                    head.join("\n"),
                    tail.join("\n")
                )
            })
            .collect()
    }

    /// Finished, successful audit records with action `action`.
    pub fn audited_ok(&self, action: &str) -> Vec<serde_json::Value> {
        self.audit_records(action)
            .into_iter()
            .filter(|r| r["phase"] == "finished" && r["outcome"] == "ok")
            .collect()
    }

    /// Audit records (both phases) with action `action`.
    pub fn audit_records(&self, action: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["action"] == action)
            .collect()
    }

    /// `dr --json ha status <args…>`, parsed.
    pub fn status_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json", "ha", "status"];
        all.extend_from_slice(args);
        let o = self.dr(&all);
        assert!(
            o.status.success(),
            "dr ha status: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).expect("status json")
    }

    /// Polls until `f(ctx)` holds, or fails the test with the daemons' logs.
    pub fn wait_with<T>(
        &self,
        ctx: &T,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&T) -> bool,
    ) {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if f(ctx) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{what}: not within {timeout:?}\n{}", self.logs());
    }
}

/// An etcd of the test's own (one member on loopback, data in a temporary
/// directory), for tests that stop it: the shared one of
/// `scripts/testenv.sh` keeps serving the other tests.
pub struct OwnEtcd {
    /// Client URL.
    pub endpoint: String,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl OwnEtcd {
    /// Starts it and waits until it answers `/health`.
    pub fn start() -> OwnEtcd {
        let client_port = free_port();
        let mut e = OwnEtcd {
            endpoint: format!("http://127.0.0.1:{client_port}"),
            dir: tempfile::tempdir().expect("tempdir"),
            client_port,
            peer_port: free_port(),
            child: None,
        };
        e.resume();
        e
    }

    /// The etcd binary: `DR_TEST_ETCD_BIN`, else Debian's.
    fn bin() -> PathBuf {
        let bin = PathBuf::from(
            std::env::var("DR_TEST_ETCD_BIN").unwrap_or_else(|_| "/usr/bin/etcd".into()),
        );
        assert!(
            bin.is_file(),
            "{} not found: this test runs an etcd of its own. Install it with `scripts/setup.sh` \
             (Debian package etcd-server) or set DR_TEST_ETCD_BIN to an etcd binary",
            bin.display()
        );
        bin
    }

    /// Starts it again on the same ports and data (after [`OwnEtcd::kill`]).
    pub fn resume(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .expect("etcd log");
        let child = Command::new(OwnEtcd::bin())
            .args(["--name", "own", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.endpoint])
            .args(["--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("own={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let start = Instant::now();
        while !self.healthy() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "etcd did not answer on {} within 30s; its log: {}",
                self.endpoint,
                self.dir.path().join("etcd.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs it, as a crash or a power cut would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.client_port));
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut reply = String::new();
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_ok()
            && s.read_to_string(&mut reply).is_ok()
            && reply.contains("\"health\":\"true\"")
    }
}

impl Drop for OwnEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `kill -s <signal> <pid>`: one process, by its id.
fn send_signal(pid: u32, signal: &str) {
    let o = Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .output()
        .expect("kill");
    assert!(
        o.status.success(),
        "kill -s {signal} {pid}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Drop for HaDaemons {
    fn drop(&mut self) {
        for c in self.daemons.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
