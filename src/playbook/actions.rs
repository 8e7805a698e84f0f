//! Actions: the changes a playbook makes. Each returns a short account of
//! what it did, or why it failed; each is safe to repeat (promoting a
//! primary or stopping a stopped server is a success), so retries are safe.

use std::process::Stdio;
use std::time::{Duration, Instant};

use super::Targets;
use super::model::{Action, FenceMode};
use crate::config::PgTarget;
use crate::http;
use crate::postgres::server::as_user;
use crate::postgres::sql_cause;

/// What an action run needs besides the targets: names for hook programs.
#[derive(Debug, Clone)]
pub struct ActionContext {
    /// Playbook name (`DR_FAILOVER_PLAYBOOK` for exec hooks).
    pub playbook: String,
    /// Step name (`DR_FAILOVER_STEP`).
    pub step: String,
}

/// How often state is polled while waiting for a change (promotion, streaming).
const POLL: Duration = Duration::from_millis(20);

/// Runs `action`: `Ok(what was done)` or `Err(why it failed)`.
pub async fn run(
    action: &Action,
    t: &Targets,
    ctx: &ActionContext,
) -> Result<String, super::StepError> {
    perform(action, t, ctx).await.map_err(super::StepError)
}

/// What `run` does, its failure as text.
async fn perform(action: &Action, t: &Targets, ctx: &ActionContext) -> Result<String, String> {
    match action {
        Action::PgPromote { target, timeout } => pg_promote(t, target, *timeout).await,
        Action::PgFence { target, mode } => match mode {
            FenceMode::Stop => pg_ctl_stop(t, target).await,
            FenceMode::ReadOnly => set_read_only(t, target, true).await,
        },
        Action::PgUnfence { target, mode } => match mode {
            FenceMode::Stop => pg_ctl_start(t, target).await,
            FenceMode::ReadOnly => set_read_only(t, target, false).await,
        },
        Action::PgRepoint {
            target,
            primary,
            timeout,
        } => pg_repoint(t, target, primary, *timeout).await,
        Action::RedisPromote { target } => {
            let mut conn = t.redis_conn(target).await?;
            let _: () = redis::cmd("REPLICAOF")
                .arg("NO")
                .arg("ONE")
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("REPLICAOF NO ONE on {target}: {e}"))?;
            let info = t.redis_replication(target).await?;
            match info.get("role").map(String::as_str) {
                Some("master") => Ok(format!(
                    "{target} is now a master (offset {})",
                    info.get("master_repl_offset")
                        .map(String::as_str)
                        .unwrap_or("?")
                )),
                other => Err(format!(
                    "{target} still reports role {}",
                    other.unwrap_or("unknown")
                )),
            }
        }
        Action::RedisReplicaof {
            target,
            master,
            timeout,
        } => redis_replicaof(t, target, master, *timeout).await,
        Action::Exec {
            argv,
            env,
            timeout,
            shell,
        } => exec(argv, env, *timeout, *shell, t, ctx).await,
        Action::Http {
            url,
            method,
            body,
            headers,
            ca_file,
            status,
            timeout,
        } => {
            let r = http::request(&http::Request {
                method,
                url,
                headers,
                body: body.as_deref(),
                ca_file: ca_file.as_deref(),
                timeout: *timeout,
            })
            .await?;
            let snippet: String = r.body.chars().take(120).collect();
            let url = http::redact_url(url);
            if r.status == *status {
                Ok(format!("{method} {url} answered {}", r.status))
            } else {
                Err(format!(
                    "{method} {url} answered {} (expected {status}): {snippet:?}",
                    r.status
                ))
            }
        }
        Action::Sql { target, statement } => {
            let client = t.pg_client(target).await?;
            client
                .batch_execute(statement)
                .await
                .map_err(|e| format!("{target}: {}", sql_cause(&e)))?;
            Ok(format!("ran on {target}"))
        }
        Action::Sleep { duration } => {
            tokio::time::sleep(*duration).await;
            Ok(format!("slept {duration:?}"))
        }
    }
}

async fn pg_promote(t: &Targets, target: &str, timeout: Duration) -> Result<String, String> {
    let client = t.pg_client(target).await?;
    let q = |e: tokio_postgres::Error| format!("{target}: {}", sql_cause(&e));
    async fn in_recovery(c: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
        c.query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map(|r| r.get::<_, bool>(0))
    }
    if !in_recovery(&client).await.map_err(q)? {
        return Ok(format!("{target} is already a primary"));
    }
    // Signal and poll ourselves: pg_promote(wait => true) checks only every
    // 100 ms, which is a large share of a sub-second promotion.
    client
        .query_one("SELECT pg_promote(wait => false)", &[])
        .await
        .map_err(q)?;
    let start = Instant::now();
    while start.elapsed() < timeout {
        if !in_recovery(&client).await.map_err(q)? {
            return Ok(format!(
                "{target} promoted in {:.2}s",
                start.elapsed().as_secs_f64()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    Err(format!(
        "{target} was still in recovery {timeout:?} after pg_promote(); see its server log"
    ))
}

/// Data directory of a target, needed by pg_ctl.
fn data_dir<'a>(
    t: &'a Targets,
    target: &str,
) -> Result<(&'a PgTarget, &'a std::path::Path), String> {
    let pg = t.pg(target)?;
    let dir = pg.data_dir.as_deref().ok_or_else(|| {
        format!(
            "{target} has no data_dir in [env.{}.postgres.{target}]; pg_ctl needs it \
             (and dr must run on that host)",
            t.env()
        )
    })?;
    Ok((pg, dir))
}

/// True when pg_ctl reports a server running on the target's data directory.
async fn pg_running(pg: &PgTarget, dir: &std::path::Path) -> Result<bool, String> {
    let st = as_user(&pg.os_user, &pg.bin_dir.join("pg_ctl"))
        .arg("-D")
        .arg(dir)
        .arg("status")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("cannot run {}/pg_ctl: {e}", pg.bin_dir.display()))?;
    // pg_ctl status: 0 running, 3 not running, 4 no data directory.
    match st.code() {
        Some(0) => Ok(true),
        Some(3) => Ok(false),
        other => Err(format!(
            "pg_ctl status on {} exited with {other:?}; is it a data directory?",
            dir.display()
        )),
    }
}

async fn pg_ctl_stop(t: &Targets, target: &str) -> Result<String, String> {
    let (pg, dir) = data_dir(t, target)?;
    if !pg_running(pg, dir).await? {
        return Ok(format!("{target} is already stopped"));
    }
    // Fast mode: sessions end at once, and the walsenders still ship the
    // final WAL to the standbys before the server exits.
    let out = as_user(&pg.os_user, &pg.bin_dir.join("pg_ctl"))
        .arg("-D")
        .arg(dir)
        .args(["-m", "fast", "-w", "-t", "60", "stop"])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run pg_ctl: {e}"))?;
    if out.status.success() {
        Ok(format!("{target} stopped"))
    } else {
        Err(format!(
            "pg_ctl stop on {target} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

async fn pg_ctl_start(t: &Targets, target: &str) -> Result<String, String> {
    let (pg, dir) = data_dir(t, target)?;
    if pg_running(pg, dir).await? {
        return Ok(format!("{target} is already running"));
    }
    // The server inherits pg_ctl's stdout/stderr; pipes would keep this call
    // waiting for as long as the server runs, so they go nowhere and the
    // server logs where its own configuration says.
    let st = as_user(&pg.os_user, &pg.bin_dir.join("pg_ctl"))
        .arg("-D")
        .arg(dir)
        .args(["-w", "-t", "60", "start"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("cannot run pg_ctl: {e}"))?;
    if st.success() {
        Ok(format!("{target} started"))
    } else {
        Err(format!(
            "pg_ctl start on {target} failed ({st}); see the server log in {}",
            dir.display()
        ))
    }
}

/// Fences (`on`) or unfences a primary through default_transaction_read_only.
async fn set_read_only(t: &Targets, target: &str, on: bool) -> Result<String, String> {
    let client = t.pg_client(target).await?;
    let q = |e: tokio_postgres::Error| format!("{target}: {}", sql_cause(&e));
    let stmt = if on {
        "ALTER SYSTEM SET default_transaction_read_only = on"
    } else {
        "ALTER SYSTEM RESET default_transaction_read_only"
    };
    client.batch_execute(stmt).await.map_err(q)?;
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .map_err(q)?;
    // The reload is asynchronous: wait until this session sees the new value,
    // so sessions ended below reconnect under it.
    let want = if on { "on" } else { "off" };
    let start = Instant::now();
    loop {
        let row = client
            .query_one(
                "SELECT current_setting('default_transaction_read_only')",
                &[],
            )
            .await
            .map_err(q)?;
        if row.get::<_, String>(0) == want {
            break;
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "{target}: default_transaction_read_only is still not {want} 10s after the reload"
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    if !on {
        return Ok(format!("{target} accepts writes again"));
    }
    let row = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .map_err(q)?;
    Ok(format!(
        "{target} is read-only; {} client session(s) ended",
        row.get::<_, i64>(0)
    ))
}

/// Quotes a string literal for SQL that cannot take parameters (ALTER SYSTEM).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Host and port a conninfo points at, to recognise it in pg_stat_wal_receiver.
fn conninfo_endpoint(conninfo: &str) -> Option<(String, u16)> {
    let split = crate::postgres::tls::split(conninfo).ok()?;
    let cfg: tokio_postgres::Config = split.conninfo.parse().ok()?;
    let host = match cfg.get_hosts().first()? {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    Some((host, port))
}

async fn pg_repoint(
    t: &Targets,
    target: &str,
    primary: &str,
    timeout: Duration,
) -> Result<String, String> {
    let conninfo = t.pg(primary)?.replication_conninfo().to_string();
    let client = t.pg_client(target).await?;
    let q = |e: tokio_postgres::Error| format!("{target}: {}", sql_cause(&e));
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('recovery_target_timeline')",
            &[],
        )
        .await
        .map_err(q)?;
    if !row.get::<_, bool>(0) {
        return Err(format!(
            "{target} is a primary; only a standby can follow {primary} (rebuild it, or pg_rewind it, first)"
        ));
    }
    // primary_conninfo is reloadable since PostgreSQL 13; the timeline
    // setting is not, and without `latest` the standby would stay on the old
    // timeline instead of following the promotion.
    let follows_latest = row.get::<_, String>(1) == "latest";
    client
        .batch_execute(&format!(
            "ALTER SYSTEM SET primary_conninfo = {}",
            quote_literal(&conninfo)
        ))
        .await
        .map_err(q)?;
    let mut how = "reloaded";
    if follows_latest {
        client
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .map_err(q)?;
    } else {
        client
            .batch_execute("ALTER SYSTEM SET recovery_target_timeline = 'latest'")
            .await
            .map_err(q)?;
        drop(client);
        pg_ctl_restart(t, target).await?;
        how = "restarted (recovery_target_timeline = latest)";
    }
    let endpoint = conninfo_endpoint(&conninfo);
    let start = Instant::now();
    let mut last = String::from("no WAL receiver yet");
    while start.elapsed() < timeout {
        match streaming_from(t, target).await {
            Ok(Some((status, host, port))) => {
                let same = endpoint
                    .as_ref()
                    .is_none_or(|(h, p)| *h == host && *p == port);
                if status == "streaming" && same {
                    return Ok(format!(
                        "{target} streams from {primary} ({host}:{port}); {how} in {:.2}s",
                        start.elapsed().as_secs_f64()
                    ));
                }
                last = format!("WAL receiver {status} from {host}:{port}");
            }
            Ok(None) => last = "no WAL receiver running".into(),
            Err(e) => last = e,
        }
        tokio::time::sleep(POLL).await;
    }
    Err(format!(
        "{target} does not stream from {primary} {timeout:?} after the change ({last}); \
         check that {primary} allows replication connections (pg_hba.conf) and that \
         primary_slot_name, if set, exists there"
    ))
}

/// `(status, sender_host, sender_port)` of the standby's WAL receiver.
async fn streaming_from(
    t: &Targets,
    target: &str,
) -> Result<Option<(String, String, u16)>, String> {
    let rows = t
        .pg_rows(
            target,
            "SELECT status, coalesce(sender_host, ''), coalesce(sender_port, 0) FROM pg_stat_wal_receiver",
        )
        .await?;
    Ok(rows.first().map(|r| {
        (
            r.get::<_, String>(0),
            r.get::<_, String>(1),
            u16::try_from(r.get::<_, i32>(2)).unwrap_or(0),
        )
    }))
}

async fn pg_ctl_restart(t: &Targets, target: &str) -> Result<(), String> {
    pg_ctl_stop(t, target).await?;
    pg_ctl_start(t, target).await.map(|_| ())
}

async fn redis_replicaof(
    t: &Targets,
    target: &str,
    master: &str,
    timeout: Duration,
) -> Result<String, String> {
    let (host, port) = t.redis_addr(master)?;
    let mut conn = t.redis_conn(target).await?;
    let _: () = redis::cmd("REPLICAOF")
        .arg(&host)
        .arg(port)
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("REPLICAOF {host} {port} on {target}: {e}"))?;
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < timeout {
        let info = t.redis_replication(target).await?;
        let get = |k: &str| info.get(k).map(String::as_str).unwrap_or("");
        if get("role") == "slave"
            && get("master_host") == host
            && get("master_port") == port.to_string()
            && get("master_link_status") == "up"
        {
            return Ok(format!(
                "{target} replicates from {master} ({host}:{port}), link up after {:.2}s",
                start.elapsed().as_secs_f64()
            ));
        }
        last = format!(
            "role {}, master {}:{}, link {}",
            get("role"),
            get("master_host"),
            get("master_port"),
            get("master_link_status")
        );
        tokio::time::sleep(POLL).await;
    }
    Err(format!(
        "{target} has no link to {master} {timeout:?} after REPLICAOF ({last}); \
         check masterauth and that {master} is reachable from {target}"
    ))
}

async fn exec(
    argv: &[String],
    env: &std::collections::BTreeMap<String, String>,
    timeout: Duration,
    shell: bool,
    t: &Targets,
    ctx: &ActionContext,
) -> Result<String, String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("exec has an empty argv".into());
    };
    let mut cmd = if shell {
        let mut c = tokio::process::Command::new("/bin/sh");
        c.arg("-c").arg(program);
        c
    } else {
        let mut c = tokio::process::Command::new(program);
        c.args(args);
        c
    };
    cmd.env("DR_FAILOVER_ENV", t.env())
        .env("DR_FAILOVER_PLAYBOOK", &ctx.playbook)
        .env("DR_FAILOVER_STEP", &ctx.step)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(r) => r.map_err(|e| format!("{program}: {e}"))?,
        Err(_) => {
            return Err(format!(
                "{program} did not finish within {timeout:?}; killed"
            ));
        }
    };
    let tail = |b: &[u8]| {
        let s = String::from_utf8_lossy(b);
        let s = s.trim();
        let start = s.char_indices().rev().nth(299).map(|(i, _)| i).unwrap_or(0);
        s[start..].to_string()
    };
    if out.status.success() {
        let o = tail(&out.stdout);
        Ok(if o.is_empty() {
            format!("{program} succeeded")
        } else {
            format!("{program} succeeded: {o}")
        })
    } else {
        Err(format!(
            "{program} failed ({}): {}",
            out.status,
            tail(&out.stderr)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_endpoints() {
        assert_eq!(quote_literal("a'b"), "'a''b'");
        assert_eq!(
            conninfo_endpoint("host=127.0.0.1 port=5433 user=postgres"),
            Some(("127.0.0.1".into(), 5433))
        );
        assert_eq!(
            conninfo_endpoint("postgresql://u@db.example:6000/x?sslmode=require"),
            Some(("db.example".into(), 6000))
        );
    }

    #[tokio::test]
    async fn exec_reports_exit_status_stderr_and_timeout() {
        let t = Targets::new("test", &toml::from_str("").expect("empty env"));
        let ctx = ActionContext {
            playbook: "p".into(),
            step: "s".into(),
        };
        let a: Action = toml::from_str(
            "type = \"exec\"\nargv = [\"echo $DR_FAILOVER_STEP $X; echo oops >&2; exit 3\"]\nshell = true\nenv = { X = \"y\" }\n",
        )
        .expect("action");
        let e = run(&a, &t, &ctx).await.expect_err("exit 3");
        assert!(e.contains("exit status: 3") && e.contains("oops"), "{e}");
        let a: Action =
            toml::from_str("type = \"exec\"\nargv = [\"/bin/sh\", \"-c\", \"echo $DR_FAILOVER_STEP $X\"]\nenv = { X = \"y\" }\n")
                .expect("action");
        let ok = run(&a, &t, &ctx).await.expect("ok");
        assert!(ok.ends_with("s y"), "{ok}");
        let a: Action =
            toml::from_str("type = \"exec\"\nargv = [\"sleep\", \"5\"]\ntimeout = \"100ms\"\n")
                .expect("action");
        let e = run(&a, &t, &ctx).await.expect_err("timeout");
        assert!(e.contains("killed"), "{e}");
    }
}
