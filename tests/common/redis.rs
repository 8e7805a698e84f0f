//! Per-test Redis servers (run as the unprivileged test OS user) and a `dr`
//! setup pointing at them.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::pg::{chown, free_port, run_as_in};
use super::{dr_bin, require_env};

/// A redis-server of its own, stopped on drop.
pub struct TestRedis {
    /// Working directory (config, log, pid file).
    pub dir: tempfile::TempDir,
    /// Port on 127.0.0.1.
    pub port: u16,
    /// Password for the default user, if set.
    pub password: Option<String>,
}

impl TestRedis {
    /// Starts a server with extra `redis.conf` lines.
    pub fn start(extra: &[&str]) -> TestRedis {
        let bin = PathBuf::from(require_env("DR_TEST_REDIS_SERVER_BIN", "Redis"));
        let user = require_env("DR_TEST_OS_USER", "Redis");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let d = dir.path().to_path_buf();
        let d = d.as_path();
        let mut conf = format!(
            "bind 127.0.0.1\nport {port}\ndaemonize yes\npidfile {0}/redis.pid\nlogfile {0}/redis.log\ndir {0}\nsave \"\"\nappendonly no\n",
            d.display()
        );
        let mut password = None;
        for l in extra {
            if let Some(p) = l.strip_prefix("requirepass ") {
                password = Some(p.to_string());
            }
            conf.push_str(l);
            conf.push('\n');
        }
        std::fs::write(d.join("redis.conf"), conf).expect("conf");
        chown(d, &user);
        let o = run_as_in(
            &user,
            &bin,
            &[d.join("redis.conf").to_str().expect("utf8")],
            d,
        );
        assert!(o.status.success(), "redis-server: {o:?}");
        let r = TestRedis {
            dir,
            port,
            password,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if r.try_conn().is_ok() {
                return r;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "redis-server did not start on port {port}: {}",
            std::fs::read_to_string(d.join("redis.log")).unwrap_or_default()
        );
    }

    /// `redis://` URL as the default user (with the password, if any).
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        let mut c = redis::Client::open(self.url())?.get_connection()?;
        redis::cmd("PING").query::<String>(&mut c)?;
        Ok(c)
    }

    /// A connection as the default user.
    pub fn conn(&self) -> redis::Connection {
        self.try_conn().expect("redis connection")
    }

    /// Runs one command and returns its reply.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut c = self.conn();
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c)
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// Fills the server with `n` keys spread over strings, hashes, lists, sets,
    /// sorted sets and streams, some with a TTL; a few keys in db 1 too.
    pub fn populate(&self, n: u64) {
        let script = r#"
            local from, to = tonumber(ARGV[1]), tonumber(ARGV[2])
            for i = from, to do
                local k = 'k:' .. i
                local t = i % 6
                if t == 0 then
                    redis.call('SET', k, 'value-' .. i)
                elseif t == 1 then
                    redis.call('HSET', k, 'a', i, 'b', 'x' .. i, 'c', i * 3)
                elseif t == 2 then
                    redis.call('RPUSH', k, i, i + 1, 'tail-' .. i)
                elseif t == 3 then
                    redis.call('SADD', k, 'm' .. i, 'n' .. i, 'o')
                elseif t == 4 then
                    redis.call('ZADD', k, i, 'a' .. i, i / 7, 'b', 0.5, 'c')
                else
                    redis.call('XADD', k, '1-' .. (i % 1000 + 1), 'f', i)
                    redis.call('XADD', k, '2-1', 'g', 'v' .. i)
                end
                if i % 97 == 0 then redis.call('EXPIRE', k, 86400) end
            end
            return to
        "#;
        let mut c = self.conn();
        let batch = 50_000;
        let mut from = 0;
        while from < n {
            let to = (from + batch).min(n) - 1;
            let _: i64 = redis::cmd("EVAL")
                .arg(script)
                .arg(0)
                .arg(from)
                .arg(to)
                .query(&mut c)
                .expect("populate");
            from = to + 1;
        }
        let _: () = redis::cmd("SELECT").arg(1).query(&mut c).expect("select");
        for i in 0..10 {
            let _: () = redis::cmd("SET")
                .arg(format!("db1:{i}"))
                .arg(i)
                .query(&mut c)
                .expect("set db1");
        }
    }

    /// Keys per database from `DBSIZE`.
    pub fn dbsize(&self, db: u32) -> u64 {
        let mut c = self.conn();
        let _: () = redis::cmd("SELECT").arg(db).query(&mut c).expect("select");
        redis::cmd("DBSIZE").query(&mut c).expect("dbsize")
    }
}

/// The logical value of `key` in a type-independent form, for comparing servers.
pub fn value_of(c: &mut redis::Connection, key: &str) -> String {
    let t: String = redis::cmd("TYPE").arg(key).query(c).expect("type");
    let v = match t.as_str() {
        "string" => redis::cmd("GET").arg(key).query::<String>(c).expect("get"),
        "hash" => {
            let mut v: Vec<(String, String)> =
                redis::cmd("HGETALL").arg(key).query(c).expect("hgetall");
            v.sort();
            format!("{v:?}")
        }
        "list" => format!(
            "{:?}",
            redis::cmd("LRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query::<Vec<String>>(c)
                .expect("lrange")
        ),
        "set" => {
            let mut v: Vec<String> = redis::cmd("SMEMBERS").arg(key).query(c).expect("smembers");
            v.sort();
            format!("{v:?}")
        }
        "zset" => format!(
            "{:?}",
            redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query::<Vec<String>>(c)
                .expect("zrange")
        ),
        "stream" => format!(
            "{:?}",
            redis::cmd("XRANGE")
                .arg(key)
                .arg("-")
                .arg("+")
                .query::<redis::Value>(c)
                .expect("xrange")
        ),
        other => panic!("unexpected type {other} for {key}"),
    };
    let ttl: i64 = redis::cmd("TTL").arg(key).query(c).expect("ttl");
    format!("{t}:{v}:ttl={}", ttl > 0)
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Ok(p) = std::fs::read_to_string(self.dir.path().join("redis.pid")) {
            let pid = p.trim().to_string();
            let _ = Command::new("kill").arg(&pid).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A `dr` config with a fresh key pair, an audit log and the given regions.
pub struct DrSetup {
    /// Holds the key, config and audit log.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub cfg: PathBuf,
}

impl DrSetup {
    /// Writes the config: `regions` and `sections` are TOML.
    pub fn new(regions: &str, sections: &str) -> DrSetup {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = dir.path().join("identity.txt");
        let o = Command::new(dr_bin())
            .args(["--json", "keygen", "--output", id.to_str().expect("utf8")])
            .output()
            .expect("keygen");
        assert!(o.status.success(), "keygen: {o:?}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        let rcpt = v["recipient"].as_str().expect("recipient");
        let cfg = dir.path().join("dr.toml");
        std::fs::write(
            &cfg,
            format!(
                "[repository]\nrecipients = [\"{rcpt}\"]\nidentity_file = \"{}\"\n\n[audit]\npath = \"{}\"\n\n{regions}\n{sections}\n",
                id.display(),
                dir.path().join("audit.jsonl").display()
            ),
        )
        .expect("config");
        let s = DrSetup { dir, cfg };
        s.dr(&["repo", "init"]);
        s
    }

    /// Runs dr; returns the output whatever the status.
    pub fn dr_raw(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run dr")
    }

    /// A `dr` command with this config.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(dr_bin());
        c.arg("--config").arg(&self.cfg).args(args);
        c
    }

    /// Runs dr and panics on failure.
    pub fn dr(&self, args: &[&str]) -> Output {
        let o = self.dr_raw(args);
        assert!(
            o.status.success(),
            "dr {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    /// Runs dr with --json and parses stdout.
    pub fn dr_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_slice(&self.dr(&all).stdout).expect("json output")
    }

    /// A fresh directory under the setup's temp dir (not created).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// What the proxy does once `budget` bytes went from server to client.
#[derive(Clone, Copy, PartialEq)]
pub enum AfterBudget {
    /// Close both sides (a dropped connection).
    Cut,
    /// Stop forwarding but keep the connection open (a stalled transfer).
    Stall,
    /// Flip the next byte, then keep forwarding (corruption in transit).
    Flip,
}

/// A TCP proxy to a real server that misbehaves after `budget` bytes on a
/// connection, to break streams at a chosen point.
pub struct Proxy {
    /// Port on 127.0.0.1.
    pub port: u16,
    /// Most bytes forwarded server→client on any one connection.
    pub forwarded: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Starts a proxy to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16, budget: u64, after: AfterBudget) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        l.set_nonblocking(true).expect("nonblocking");
        let forwarded = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (forwarded.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                            continue;
                        };
                        let (c2, s2) = (
                            client.try_clone().expect("clone"),
                            server.try_clone().expect("clone"),
                        );
                        std::thread::spawn(move || copy_all(c2, s2));
                        let (f, s) = (f.clone(), s.clone());
                        std::thread::spawn(move || {
                            copy_budget(server, client, budget, after, &f, &s)
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Proxy {
            port,
            forwarded,
            stop,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn copy_all(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn copy_budget(
    mut from: TcpStream,
    mut to: TcpStream,
    budget: u64,
    after: AfterBudget,
    seen: &AtomicU64,
    stop: &AtomicBool,
) {
    let mut buf = [0u8; 16 << 10];
    let mut sent = 0u64;
    while sent < budget {
        let want = buf.len().min((budget - sent) as usize);
        match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
                sent += n as u64;
                seen.fetch_max(sent, Ordering::Relaxed);
            }
        }
    }
    match after {
        AfterBudget::Cut => {
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        }
        AfterBudget::Stall => {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        AfterBudget::Flip => {
            let mut first = true;
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if first {
                    buf[0] ^= 0x20;
                    first = false;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        }
    }
}
