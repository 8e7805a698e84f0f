//! A throwaway PostgreSQL 15 cluster per test, run as the unprivileged OS user
//! from `scripts/testenv.sh` (PostgreSQL refuses root), archiving with `dr`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::require_env;

/// A cluster plus a `dr` setup that archives it.
pub struct TestPg {
    /// Temp dir holding everything (readable by the OS user).
    pub dir: tempfile::TempDir,
    /// PGDATA.
    pub data: PathBuf,
    /// Server port on 127.0.0.1.
    pub port: u16,
    /// `dr` binary copied where the OS user can run it.
    pub dr: PathBuf,
    /// The config file.
    pub cfg: PathBuf,
    /// OS user running PostgreSQL and dr.
    pub user: String,
    /// PostgreSQL binaries.
    pub bin: PathBuf,
    /// Servers to stop on drop.
    pub started: Vec<PathBuf>,
}

/// A free loopback port.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A free loopback port below the kernel's ephemeral range, for a server
/// that is killed and started again on the same port many times: between
/// two starts any `bind(0)` or outgoing connection on the machine may be
/// handed a port from the ephemeral range (chaos runs lost a Garage and a
/// daemon's metrics port that way, "Address already in use"); below that
/// range only an explicit choice like this one takes a port.
pub fn stable_port() -> u16 {
    let low_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (lo, hi) = (10_000u16, low_ephemeral.max(12_000));
    for _ in 0..1000 {
        let port = lo + rand::random::<u16>() % (hi - lo);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {lo}..{hi}");
}

fn run_as(user: &str, program: &Path, args: &[&str]) -> Output {
    run_as_in(user, program, args, Path::new("/"))
}

/// Runs `program` as `user` in working directory `cwd`.
pub fn run_as_in(user: &str, program: &Path, args: &[&str], cwd: &Path) -> Output {
    Command::new("runuser")
        .arg("-u")
        .arg(user)
        .arg("--")
        .arg(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("runuser")
}

impl TestPg {
    /// initdb + start, with archive_command = dr wal-push; `regions` is TOML.
    pub fn new(regions: &str) -> TestPg {
        TestPg::build(regions, true, "")
    }

    /// initdb + start with archiving off and `extra` appended to
    /// `[postgres.main]`, for `wal = "stream"` setups.
    pub fn streaming(regions: &str, extra: &str) -> TestPg {
        TestPg::build(regions, false, &format!("wal = \"stream\"\n{extra}"))
    }

    /// initdb + start, archiving with dr wal-push, with `mode = "remote"`
    /// and no `data_dir` in the config: backups go over the replication
    /// protocol and never read PGDATA.
    pub fn remote(regions: &str) -> TestPg {
        let t = TestPg::build(regions, true, "mode = \"remote\"\n");
        let text = std::fs::read_to_string(&t.cfg).expect("read cfg");
        let text = text.replace(&format!("data_dir = \"{}\"\n", t.data.display()), "");
        std::fs::write(&t.cfg, text).expect("write cfg");
        t
    }

    fn build(regions: &str, archive: bool, extra: &str) -> TestPg {
        let user = require_env("DR_TEST_OS_USER", "PostgreSQL");
        let bin = PathBuf::from(require_env("DR_TEST_PG_BIN_DIR", "PostgreSQL"));
        let dir = tempfile::tempdir().expect("tempdir");
        chown(dir.path(), &user);
        let dr = dir.path().join("dr");
        std::fs::copy(super::dr_bin(), &dr).expect("copy dr");
        let data = dir.path().join("data");
        initdb(&user, &bin, &data, &["--data-checksums"]);
        let id = dir.path().join("identity.txt");
        let o = run_as(
            &user,
            &dr,
            &["keygen", "--json", "--output", id.to_str().expect("utf8")],
        );
        assert!(
            o.status.success(),
            "keygen: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        let rcpt = v["recipient"].as_str().expect("recipient").to_string();
        let port = free_port();
        let cfg = dir.path().join("dr.toml");
        let cfg_text = format!(
            "[repository]\nrecipients = [\"{rcpt}\"]\nidentity_file = \"{}\"\n\n[audit]\npath = \"{}\"\n\n{regions}\n[postgres.main]\nconninfo = \"host=127.0.0.1 port={port} user=postgres dbname=postgres\"\ndata_dir = \"{}\"\nbin_dir = \"{}\"\nos_user = \"{user}\"\nstate_dir = \"{}\"\n{extra}",
            id.display(),
            dir.path().join("audit.jsonl").display(),
            data.display(),
            bin.display(),
            dir.path().join("state").display()
        );
        std::fs::write(&cfg, cfg_text).expect("config");
        chown(&cfg, &user);
        let archiving = if archive {
            format!(
                "archive_mode = on\narchive_command = '{} --config {} wal-push %p'\n",
                dr.display(),
                cfg.display()
            )
        } else {
            "archive_mode = off\n".to_string()
        };
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\nwal_level = replica\n{archiving}max_wal_senders = 4\nfsync = on\n"
        );
        let mut pc = std::fs::read_to_string(data.join("postgresql.conf")).expect("read conf");
        pc.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), pc).expect("write conf");
        let mut t = TestPg {
            dir,
            data: data.clone(),
            port,
            dr,
            cfg,
            user,
            bin,
            started: Vec::new(),
        };
        pg_ctl_start(&t.user, &t.bin, &data, &t.dir.path().join("pg.log"));
        t.started.push(data);
        t.dr(&["repo", "init"]);
        t
    }

    /// Runs `dr --config <cfg> args…` as the OS user; panics on failure.
    pub fn dr(&self, args: &[&str]) -> Output {
        let o = self.dr_raw(args);
        assert!(
            o.status.success(),
            "dr {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    /// Runs dr and returns the output whatever the status.
    pub fn dr_raw(&self, args: &[&str]) -> Output {
        let mut all = vec!["--config", self.cfg.to_str().expect("utf8")];
        all.extend_from_slice(args);
        run_as(&self.user, &self.dr, &all)
    }

    /// Runs SQL on 127.0.0.1:`port` and returns the trimmed output.
    pub fn sql_at(&self, port: u16, sql: &str) -> String {
        psql(&self.bin, port, sql).unwrap_or_else(|e| panic!("psql {sql}: {e}"))
    }

    /// SQL on the primary.
    pub fn sql(&self, sql: &str) -> String {
        self.sql_at(self.port, sql)
    }

    /// Runs pgbench against the primary.
    pub fn pgbench(&self, args: &[&str]) {
        self.pgbench_at(self.port, args)
    }

    /// Forces a WAL switch and waits until the archiver has pushed it.
    pub fn archive_now(&self) {
        self.archive_now_at(self.port)
    }

    /// A fresh path for a restore target (not created).
    pub fn target(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Registers a restored data dir to stop on drop.
    pub fn track(&mut self, data: PathBuf) {
        self.started.push(data);
    }

    /// Stops the server on `data`.
    pub fn stop(&self, data: &Path) {
        let _ = run_as(
            &self.user,
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                data.to_str().expect("utf8"),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        for d in &self.started {
            self.stop(d);
        }
    }
}

/// initdb of `data` as `user`: superuser postgres, trust, UTF8, C locale,
/// plus `extra` options.
pub fn initdb(user: &str, bin: &Path, data: &Path, extra: &[&str]) {
    let mut args = vec![
        "-D",
        data.to_str().expect("utf8"),
        "-U",
        "postgres",
        "--auth=trust",
        "-E",
        "UTF8",
        "--locale=C",
    ];
    args.extend_from_slice(extra);
    let o = run_as(user, &bin.join("initdb"), &args);
    assert!(
        o.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `pg_ctl start` on `data` as `user`, logging to `log`; fails the test
/// with the log when the server does not start.
pub fn pg_ctl_start(user: &str, bin: &Path, data: &Path, log: &Path) {
    let o = run_as(
        user,
        &bin.join("pg_ctl"),
        &[
            "-D",
            data.to_str().expect("utf8"),
            "-l",
            log.to_str().expect("utf8"),
            "-w",
            "start",
        ],
    );
    assert!(
        o.status.success(),
        "pg_ctl start: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// `pg_basebackup -R` (a standby's copy with primary_conninfo) of the server
/// on 127.0.0.1:`from_port` into `data`, as `user`; panics on failure.
pub fn clone_standby(user: &str, bin: &Path, from_port: u16, data: &Path) {
    let o = run_as(
        user,
        &bin.join("pg_basebackup"),
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &from_port.to_string(),
            "-U",
            "postgres",
            "-D",
            data.to_str().expect("utf8"),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        ],
    );
    assert!(
        o.status.success(),
        "pg_basebackup: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs SQL with psql on 127.0.0.1:`port`: the trimmed output, or psql's error.
pub fn psql(bin: &Path, port: u16, sql: &str) -> Result<String, String> {
    psql_as(bin, port, sql, None)
}

/// [`psql`] with the password of user postgres, for a cluster whose
/// pg_hba.conf asks TCP clients for one.
pub fn psql_as(bin: &Path, port: u16, sql: &str, password: Option<&str>) -> Result<String, String> {
    let mut cmd = Command::new(bin.join("psql"));
    if let Some(p) = password {
        cmd.env("PGPASSWORD", p);
    }
    let o = cmd
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-XAtq",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .output()
        .expect("psql");
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
    }
}

/// Gives `p` to `user` (recursively).
pub fn chown(p: &Path, user: &str) {
    let st = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:"))
        .arg(p)
        .status()
        .expect("chown");
    assert!(st.success());
}

impl TestPg {
    /// Runs pgbench against 127.0.0.1:`port`.
    pub fn pgbench_at(&self, port: u16, args: &[&str]) {
        let port = port.to_string();
        let mut all = vec!["-h", "127.0.0.1", "-p", &port, "-U", "postgres"];
        all.extend_from_slice(args);
        all.push("postgres");
        let o = Command::new(self.bin.join("pgbench"))
            .args(&all)
            .output()
            .expect("pgbench");
        assert!(
            o.status.success(),
            "pgbench: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Forces a WAL switch on `port` and waits until it is archived.
    pub fn archive_now_at(&self, port: u16) {
        let seg = self.sql_at(port, "SELECT pg_walfile_name(pg_switch_wal())");
        // The last archived name alone can trail the segment: a backup
        // history file (`<older segment>.<offset>.backup`) archived after it
        // sorts lower. The segment's `.done` status file settles it.
        let archived = format!(
            "SELECT coalesce(last_archived_wal, '') >= '{seg}' OR EXISTS \
             (SELECT 1 FROM pg_ls_dir('pg_wal/archive_status') f WHERE f = '{seg}.done') \
             FROM pg_stat_archiver"
        );
        for _ in 0..300 {
            if self.sql_at(port, &archived) == "t" {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let archiver = self.sql_at(
            port,
            "SELECT last_archived_wal || ' failed ' || failed_count || ' ' || coalesce(last_failed_wal, '') FROM pg_stat_archiver",
        );
        let log = std::fs::read_to_string(self.dir.path().join("pg.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        panic!(
            "segment {seg} was not archived within 30s (archiver: {archiver}); pg.log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    /// Writes a copy of the config with another data dir and port, as the
    /// config of a host whose primary now lives there; returns its path.
    pub fn config_for(&self, data: &Path, port: u16, name: &str) -> PathBuf {
        let text = std::fs::read_to_string(&self.cfg).expect("read cfg");
        let text = text
            .replace(
                &format!("data_dir = \"{}\"", self.data.display()),
                &format!("data_dir = \"{}\"", data.display()),
            )
            .replace(&format!("port={} ", self.port), &format!("port={port} "));
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write cfg");
        chown(&p, &self.user);
        p
    }

    /// Clones the primary with `pg_basebackup -R` into `name` and starts it
    /// as a hot standby on a free port (stopped on drop): its PGDATA and port.
    pub fn start_standby(&mut self, name: &str) -> (PathBuf, u16) {
        let data = self.dir.path().join(name);
        let port = free_port();
        clone_standby(&self.user, &self.bin, self.port, &data);
        let conf = data.join("postgresql.conf");
        let mut pc = std::fs::read_to_string(&conf).expect("read conf");
        pc.push_str(&format!(
            "\nport = {port}\nhot_standby = on\nwal_receiver_status_interval = '1s'\n"
        ));
        std::fs::write(&conf, pc).expect("write conf");
        self.pg_ctl(&data, &["-w", "start"]);
        self.track(data.clone());
        (data, port)
    }

    /// `pg_ctl -D data -l <data>.log args…` as the OS user; panics on failure.
    pub fn pg_ctl(&self, data: &Path, args: &[&str]) {
        let log = data.with_extension("log");
        let mut all = vec![
            "-D",
            data.to_str().expect("utf8"),
            "-l",
            log.to_str().expect("utf8"),
        ];
        all.extend_from_slice(args);
        let o = run_as(&self.user, &self.bin.join("pg_ctl"), &all);
        assert!(
            o.status.success(),
            "pg_ctl {args:?}: {}{}",
            String::from_utf8_lossy(&o.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Runs dr with another config as the OS user; panics on failure.
    pub fn dr_with(&self, cfg: &Path, args: &[&str]) -> Output {
        let o = self.dr_raw_with(cfg, args);
        assert!(
            o.status.success(),
            "dr {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    /// Runs dr with another config and returns the output whatever the status.
    pub fn dr_raw_with(&self, cfg: &Path, args: &[&str]) -> Output {
        let mut all = vec!["--config", cfg.to_str().expect("utf8")];
        all.extend_from_slice(args);
        run_as(&self.user, &self.dr, &all)
    }

    /// Runs `dr check --json` with `cfg` and returns whether it passed and
    /// its entry named `name`.
    pub fn check_item(&self, cfg: &Path, name: &str) -> (bool, serde_json::Value) {
        let o = self.dr_raw_with(cfg, &["--json", "check"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "check json ({e}): {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        });
        let item = v["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no `{name}` check: {v}"));
        (o.status.success(), item)
    }
}

/// Data at a moment, to compare a restore against.
pub struct Mark {
    /// The moment, RFC 3339 UTC.
    pub at: String,
    /// sum(abalance).
    pub balance: String,
    /// count(*) of pgbench_history.
    pub history: String,
}

/// Records the moment between two quiet gaps, and the data at it.
pub fn mark(pg: &TestPg) -> Mark {
    // Quiet gaps around the mark so the target falls between commits.
    std::thread::sleep(std::time::Duration::from_millis(600));
    let at = pg.sql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    let balance = pg.sql("SELECT sum(abalance) FROM pgbench_accounts");
    let history = pg.sql("SELECT count(*) FROM pgbench_history");
    std::thread::sleep(std::time::Duration::from_millis(600));
    Mark {
        at,
        balance,
        history,
    }
}

/// Restores to `to` with --start and checks the data, a promoted server and
/// amcheck on every btree index.
pub fn restore_and_check(pg: &mut TestPg, to: &str, name: &str, balance: &str, history: &str) {
    let (port, dir, v) = restore_started(pg, to, name);
    assert_eq!(v["restore"]["started"], true);
    eprintln!(
        "restored {to}: expect balance {balance} history {history}; report {}",
        v["restore"]
    );
    assert_eq!(
        pg.sql_at(port, "SELECT sum(abalance) FROM pgbench_accounts"),
        balance,
        "balance at {to}"
    );
    assert_eq!(
        pg.sql_at(port, "SELECT count(*) FROM pgbench_history"),
        history,
        "history at {to}"
    );
    assert_eq!(pg.sql_at(port, "SELECT pg_is_in_recovery()"), "f");
    pg.sql_at(port, "CREATE EXTENSION IF NOT EXISTS amcheck");
    let bad = pg.sql_at(
        port,
        "SELECT count(*) FROM (SELECT bt_index_check(c.oid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         JOIN pg_am a ON a.oid = c.relam WHERE a.amname = 'btree' AND c.relpersistence <> 't') x",
    );
    assert!(!bad.is_empty());
    pg.stop(&dir);
}

/// `dr restore pg --to <to> --start` into a fresh target `name` on a free
/// port (stopped when `pg` drops): the port, the directory and the report.
pub fn restore_started(pg: &mut TestPg, to: &str, name: &str) -> (u16, PathBuf, serde_json::Value) {
    let dir = pg.target(name);
    let port = free_port();
    pg.track(dir.clone());
    let o = pg.dr(&[
        "--json",
        "restore",
        "pg",
        "--to",
        to,
        "--target",
        dir.to_str().expect("utf8"),
        "--start",
        "--port",
        &port.to_string(),
        "--no-archive",
    ]);
    let v = serde_json::from_slice(&o.stdout).expect("restore json");
    (port, dir, v)
}

/// An fs region the PostgreSQL OS user can write (archive_command runs as it).
pub fn fs_repo(dir: &tempfile::TempDir) -> String {
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo).expect("mkdir");
    chown(&repo, &super::require_env("DR_TEST_OS_USER", "PostgreSQL"));
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    super::fs_region_toml("local", &repo)
}

impl TestPg {
    /// `dr restore pg --to <to> --target <dir> extra…` as the OS user,
    /// whatever its outcome.
    pub fn restore_raw(&self, to: &str, dir: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "restore",
            "pg",
            "--to",
            to,
            "--target",
            dir.to_str().expect("utf8"),
        ];
        args.extend_from_slice(extra);
        self.dr_raw(&args)
    }
}

/// The numeric uid (`flag = "-u"`) or gid (`"-g"`) of OS user `user`.
pub fn os_id(user: &str, flag: &str) -> u32 {
    let o = std::process::Command::new("id")
        .args([flag, user])
        .output()
        .expect("id");
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .expect("numeric id")
}
