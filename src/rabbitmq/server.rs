//! A private `rabbitmq-server` for scratch restores: its own node name, data,
//! log and config under one directory, its own epmd, every listener on
//! loopback, the management plugin enabled and an administrator with a
//! random password. Every process it starts works inside that directory, so
//! removing the directory's processes (the verify scratch cleanup) stops it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::RabbitError;
use super::api::Api;
use crate::config::RabbitConfig;

/// A started scratch broker.
#[derive(Debug)]
pub struct ScratchBroker {
    /// Management API base URL (`http://127.0.0.1:PORT`).
    pub url: String,
    /// Administrator.
    pub user: String,
    /// Its password (random, used only for this broker).
    pub password: String,
    /// Erlang node name.
    pub node: String,
    /// The broker's OS pid (from its pid file).
    pub pid: Option<u32>,
    /// Its directory.
    pub dir: PathBuf,
}

impl ScratchBroker {
    /// A client of its management API.
    pub fn api(&self, timeout: Duration) -> Result<Api, RabbitError> {
        Api::new(&self.url, &self.user, self.password.clone(), None, timeout)
    }
}

/// Plugins a scratch broker runs: the management API, and the plugins whose
/// runtime parameters a definitions export may hold (a parameter of an
/// unknown component is refused on import).
const PLUGINS: &str = "[rabbitmq_management,rabbitmq_federation,rabbitmq_shovel].";

fn free_ports(n: usize) -> Result<Vec<u16>, RabbitError> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| RabbitError::Other(format!("cannot find free loopback ports: {e}")))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| RabbitError::Other(format!("cannot find free loopback ports: {e}")))
}

/// The epmd binary next to the broker's Erlang runtime.
fn epmd_bin() -> PathBuf {
    ["/usr/bin/epmd", "/usr/lib/erlang/bin/epmd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("epmd"))
}

/// Starts a broker in `dir` (which must exist, owned by `cfg.os_user` when
/// running as root) and waits up to `limit` for its management API.
pub async fn start_scratch(
    cfg: &RabbitConfig,
    dir: &Path,
    limit: Duration,
) -> Result<ScratchBroker, RabbitError> {
    use crate::os::{as_user, chown_to, is_root};
    let other = |why: String| RabbitError::Other(why);
    let dir = std::fs::canonicalize(dir).map_err(|e| other(format!("{}: {e}", dir.display())))?;
    let ports = free_ports(4)?;
    let (amqp, mgmt, dist, epmd) = (ports[0], ports[1], ports[2], ports[3]);
    let password = hex::encode(rand::random::<[u8; 16]>());
    let user = "dr-verify".to_string();
    let node = format!("dr-scratch-{mgmt}@localhost");
    for sub in ["mnesia", "log"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| other(format!("{e}")))?;
    }
    let conf = format!(
        "# written by dr for a scratch restore; removed with this directory\n\
         listeners.tcp.default = 127.0.0.1:{amqp}\n\
         management.tcp.port = {mgmt}\n\
         management.tcp.ip = 127.0.0.1\n\
         default_user = {user}\n\
         default_pass = {password}\n\
         default_user_tags.administrator = true\n\
         loopback_users = none\n"
    );
    write_private(&dir.join("rabbitmq.conf"), &conf)?;
    write_private(&dir.join("enabled_plugins"), &format!("{PLUGINS}\n"))?;
    let os_user = cfg.os_user.as_deref().filter(|_| is_root());
    if let Some(u) = os_user {
        chown_to(&dir, u).await.map_err(|e| other(e.to_string()))?;
    }
    let command = |program: &Path| {
        let mut c = match os_user {
            Some(u) => as_user(u, program),
            None => tokio::process::Command::new(program),
        };
        c.current_dir(&dir)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(false);
        c
    };
    let log = |name: &str| {
        std::fs::File::create(dir.join(name))
            .map(std::process::Stdio::from)
            .map_err(|e| other(format!("{}: {e}", dir.join(name).display())))
    };

    let mut epmd_cmd = command(&epmd_bin());
    epmd_cmd
        .arg("-port")
        .arg(epmd.to_string())
        .arg("-address")
        .arg("127.0.0.1")
        .stdout(log("epmd.log")?)
        .stderr(log("epmd.err")?);
    epmd_cmd
        .spawn()
        .map_err(|e| other(format!("cannot start epmd: {e}")))?;

    let mut server = command(&cfg.server_bin);
    server
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LANG", "C.UTF-8")
        .env("HOME", &dir)
        .env("RABBITMQ_NODENAME", &node)
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", amqp.to_string())
        .env("RABBITMQ_DIST_PORT", dist.to_string())
        .env("ERL_EPMD_PORT", epmd.to_string())
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
        .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
        .env("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid"))
        .stdout(log("server.log")?)
        .stderr(log("server.err")?);
    let mut child = server.spawn().map_err(|e| {
        other(format!(
            "cannot run {}: {e}; install rabbitmq-server or set server_bin in [rabbitmq.*]",
            cfg.server_bin.display()
        ))
    })?;

    let broker = ScratchBroker {
        url: format!("http://127.0.0.1:{mgmt}"),
        user,
        password,
        node,
        pid: None,
        dir: dir.clone(),
    };
    let api = broker.api(Duration::from_secs(5))?;
    let deadline = Instant::now() + limit;
    loop {
        if api.overview().await.is_ok() {
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(other(format!(
                "the scratch rabbitmq-server exited ({st}) before its management API answered: {}",
                tail(&dir.join("server.log"))
            )));
        }
        if Instant::now() > deadline {
            return Err(other(format!(
                "the scratch rabbitmq-server's management API did not answer within {}s: {}",
                limit.as_secs(),
                tail(&dir.join("server.log"))
            )));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let pid = std::fs::read_to_string(dir.join("rabbitmq.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok());
    Ok(ScratchBroker { pid, ..broker })
}

fn write_private(path: &Path, text: &str) -> Result<(), RabbitError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| RabbitError::Other(format!("{}: {e}", path.display())))
}

/// The last lines of a log, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(8).collect();
    if lines.is_empty() {
        format!("no output in {}", path.display())
    } else {
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

/// The definitions as a scratch broker loads them: shovels and federation
/// upstreams point at an unused loopback port, so loading a snapshot never
/// makes the scratch broker connect to (and consume from) real brokers.
pub fn neutralised(defs: &serde_json::Value) -> serde_json::Value {
    let mut out = defs.clone();
    if let Some(params) = out
        .get_mut("parameters")
        .and_then(serde_json::Value::as_array_mut)
    {
        for p in params {
            let component = p.get("component").and_then(|c| c.as_str()).unwrap_or("");
            if !component.starts_with("federation") && component != "shovel" {
                continue;
            }
            if let Some(v) = p.get_mut("value").and_then(|v| v.as_object_mut()) {
                for key in ["uri", "src-uri", "dest-uri"] {
                    if v.contains_key(key) {
                        v.insert(key.into(), serde_json::json!("amqp://127.0.0.1:1"));
                    }
                }
            }
        }
    }
    out
}
