//! Gates: conditions checked by polling until they hold or time out. A check
//! returns what it saw either way, so a failing gate says why
//! ("replay lag 12.3 MiB > limit 1.0 MiB on standby1").

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::time::timeout;

use super::Targets;
use super::model::{Check, Gate, PgRole, RedisRole, human_bytes};
use crate::http;
use crate::postgres::Lsn;
use crate::postgres::sql_cause;

/// How a gate ended.
#[derive(Debug, Clone, Serialize)]
pub struct GateResult {
    /// The gate as written (`pg.role standby1 = primary`).
    pub gate: String,
    /// Line in the playbook.
    pub line: usize,
    /// True when the gate passed.
    pub ok: bool,
    /// What the last poll saw.
    pub observed: String,
    /// Number of polls.
    pub polls: u32,
    /// Time spent polling.
    pub seconds: f64,
}

/// Polls `gate` until it passes or its timeout expires.
pub async fn evaluate(gate: &Gate, targets: &Targets) -> GateResult {
    let start = Instant::now();
    let deadline = start + gate.timeout;
    let mut polls = 0;
    // What the last poll that got an answer saw: a last poll cut short by
    // the deadline on a slow server must not hide why the gate failed.
    let mut answered: Option<String> = None;
    loop {
        polls += 1;
        let (ok, mut observed, got_answer) = poll(gate, targets, deadline).await;
        let now = Instant::now();
        if ok || now + gate.interval >= deadline {
            if let (false, false, Some(seen)) = (ok, got_answer, &answered) {
                observed = format!("{seen}; then {observed}");
            }
            let observed = if ok || polls == 1 {
                observed
            } else {
                format!(
                    "{observed} (still failing after {polls} polls in {:.1}s)",
                    start.elapsed().as_secs_f64()
                )
            };
            return GateResult {
                gate: describe(gate),
                line: gate.line,
                ok,
                observed,
                polls,
                seconds: start.elapsed().as_secs_f64(),
            };
        }
        if got_answer {
            answered = Some(observed);
        }
        tokio::time::sleep(gate.interval).await;
    }
}

/// Checks `gate` once (for dry runs: no waiting for conditions to change).
pub async fn evaluate_once(gate: &Gate, targets: &Targets) -> GateResult {
    let start = Instant::now();
    let (ok, observed, _) = poll(gate, targets, start + gate.timeout).await;
    GateResult {
        gate: describe(gate),
        line: gate.line,
        ok,
        observed,
        polls: 1,
        seconds: start.elapsed().as_secs_f64(),
    }
}

fn describe(gate: &Gate) -> String {
    if gate.negate {
        format!("not {}", gate.check.describe())
    } else {
        gate.check.describe()
    }
}

/// One poll, bounded by the deadline; `negate` applied. The third value is
/// false when the check got no answer before the deadline.
async fn poll(gate: &Gate, targets: &Targets, deadline: Instant) -> (bool, String, bool) {
    let budget = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    let (r, answered) = match timeout(budget, observe(&gate.check, targets)).await {
        Ok(r) => (r, true),
        Err(_) => (Err(format!("no answer within {budget:.1?}")), false),
    };
    let (ok, seen) = match (r, gate.negate) {
        (Ok(seen), false) => (true, seen),
        (Err(seen), false) => (false, seen),
        (Ok(seen), true) => (false, format!("{seen} (the gate requires this to fail)")),
        (Err(seen), true) => (true, seen),
    };
    (ok, seen, answered)
}

/// The RabbitMQ gates, through the broker's management API.
async fn rabbitmq(c: &Check, t: &Targets) -> Result<String, String> {
    match c {
        Check::RabbitReachable { target } => {
            let api = t.rabbitmq_api(target)?;
            let o = api.overview().await.map_err(|e| format!("{target}: {e}"))?;
            Ok(format!(
                "{target} answers (RabbitMQ {}, cluster {}, node {})",
                o.version, o.cluster_name, o.node
            ))
        }
        Check::RabbitQueueExists {
            target,
            vhost,
            queue,
        } => {
            let api = t.rabbitmq_api(target)?;
            match api.get(&["queues", vhost, queue]).await {
                Ok(Some(q)) => Ok(format!(
                    "{target}: queue {queue:?} in vhost {vhost:?} exists ({} queue, state {}, {} message(s))",
                    q.get("type").and_then(|v| v.as_str()).unwrap_or("classic"),
                    q.get("state").and_then(|v| v.as_str()).unwrap_or("unknown"),
                    q.get("messages").and_then(|v| v.as_u64()).unwrap_or(0),
                )),
                Ok(None) => Err(format!("{target}: no queue {queue:?} in vhost {vhost:?}")),
                Err(e) => Err(format!("{target}: {e}")),
            }
        }
        _ => Err(format!("{} is not a RabbitMQ gate", c.kind())),
    }
}

/// Runs one check: `Ok(what it saw)` when it holds, `Err(what it saw)` otherwise.
pub async fn check(c: &Check, t: &Targets) -> Result<String, super::StepError> {
    observe(c, t).await.map_err(super::StepError)
}

/// What `check` sees, as text either way.
async fn observe(c: &Check, t: &Targets) -> Result<String, String> {
    match c {
        Check::PgReachable { target } => {
            let row = t
                .pg_row(
                    target,
                    "SELECT pg_is_in_recovery(), current_setting('server_version')",
                )
                .await?;
            let standby: bool = row.get(0);
            let version: String = row.get(1);
            Ok(format!(
                "{target} answers (PostgreSQL {version}, {})",
                if standby { "standby" } else { "primary" }
            ))
        }
        Check::PgRole { target, role } => {
            let actual = pg_role(t, target).await?;
            let name = |r: PgRole| match r {
                PgRole::Primary => "primary",
                PgRole::Standby => "standby",
            };
            if actual == *role {
                Ok(format!("{target} is a {}", name(actual)))
            } else {
                Err(format!(
                    "{target} is a {}, expected {}",
                    name(actual),
                    name(*role)
                ))
            }
        }
        Check::PgReplayLag {
            target,
            primary,
            max,
        } => replay_lag(t, target, primary.as_deref(), *max).await,
        Check::PgWritable { target } => {
            let client = t.pg_client(target).await?;
            // No SET or BEGIN READ WRITE: the probe must fail on a fenced
            // (read-only) server exactly as an application write would.
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS dr_failover_probe \
                       (id int PRIMARY KEY, written_at timestamptz NOT NULL); \
                     INSERT INTO dr_failover_probe VALUES (1, now()) \
                       ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at",
                )
                .await
                .map_err(|e| format!("write on {target} failed: {}", sql_cause(&e)))?;
            Ok(format!("{target} accepted a write"))
        }
        Check::RedisReachable { target } => {
            let mut conn = t.redis_conn(target).await?;
            let pong: String = redis::cmd("PING")
                .query_async(&mut conn)
                .await
                .map_err(|e| format!("PING {target}: {e}"))?;
            Ok(format!("{target} answers {pong}"))
        }
        Check::RabbitReachable { .. } | Check::RabbitQueueExists { .. } => rabbitmq(c, t).await,
        Check::RedisRole { target, role } => {
            let info = t.redis_replication(target).await?;
            let actual = info.get("role").map(String::as_str).unwrap_or("unknown");
            let want = match role {
                RedisRole::Master => "master",
                RedisRole::Replica => "slave",
            };
            let shown = |r: &str| if r == "slave" { "replica" } else { r }.to_string();
            if actual == want {
                Ok(format!("{target} is a {}", shown(actual)))
            } else {
                Err(format!(
                    "{target} is a {}, expected {}",
                    shown(actual),
                    shown(want)
                ))
            }
        }
        Check::RedisLag {
            target,
            master,
            max,
        } => redis_lag(t, target, master.as_deref(), *max).await,
        Check::Http {
            url,
            method,
            headers,
            ca_file,
            status,
            body_contains,
        } => {
            // The gate's own timeout bounds the polling around this call.
            let r = http::request(&http::Request {
                method,
                url,
                headers,
                body: None,
                ca_file: ca_file.as_deref(),
                timeout: Duration::from_secs(3600),
            })
            .await?;
            let url = http::redact_url(url);
            let snippet: String = r.body.chars().take(120).collect();
            if r.status != *status {
                return Err(format!(
                    "{url} answered {} (expected {status}): {snippet:?}",
                    r.status
                ));
            }
            match body_contains {
                Some(want) if !r.body.contains(want.as_str()) => Err(format!(
                    "{url} answered {} but the body lacks {want:?}: {snippet:?}",
                    r.status
                )),
                _ => Ok(format!("{url} answered {}", r.status)),
            }
        }
        Check::Tcp { address } => tokio::net::TcpStream::connect(address.as_str())
            .await
            .map(|_| format!("{address} accepts connections"))
            .map_err(|e| format!("cannot connect to {address}: {e}")),
        Check::Sql { target, query } => {
            let first = t.pg_row(target, query).await?;
            match first.try_get::<_, Option<bool>>(0) {
                Ok(Some(true)) => Ok(format!("{target}: query returned true")),
                Ok(Some(false)) => Err(format!("{target}: query returned false")),
                Ok(None) => Err(format!("{target}: query returned NULL")),
                Err(e) => Err(format!(
                    "{target}: the query must return one boolean column ({e})"
                )),
            }
        }
    }
}

async fn pg_role(t: &Targets, target: &str) -> Result<PgRole, String> {
    let row = t.pg_row(target, "SELECT pg_is_in_recovery()").await?;
    Ok(if row.get::<_, bool>(0) {
        PgRole::Standby
    } else {
        PgRole::Primary
    })
}

async fn replay_lag(
    t: &Targets,
    target: &str,
    primary: Option<&str>,
    max: u64,
) -> Result<String, String> {
    let row = t
        .pg_row(
            target,
            "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, \
                    pg_last_wal_receive_lsn()::text",
        )
        .await?;
    if !row.get::<_, bool>(0) {
        return Err(format!(
            "{target} is not a standby, so it has no replay lag"
        ));
    }
    let lsn = |s: Option<String>| s.and_then(|s| s.parse::<Lsn>().ok());
    let replayed = lsn(row.get(1)).ok_or_else(|| format!("{target} has replayed no WAL yet"))?;
    let received = lsn(row.get(2));
    // The primary's position is the truth when it answers; when it does not
    // (the usual reason to fail over), the standby can only be measured
    // against what it has received.
    let mut unreachable = None;
    let reference = match primary {
        Some(p) => match primary_lsn(t, p).await {
            Ok(l) => Some((l, format!("{p} is at {l}"))),
            Err(e) => {
                unreachable = Some(e);
                None
            }
        },
        None => None,
    };
    let (reference, basis) = match reference {
        Some(r) => r,
        None => {
            let r = received.unwrap_or(replayed);
            let why = unreachable
                .map(|e| format!("primary not usable ({e}); "))
                .unwrap_or_default();
            (r, format!("{why}received up to {r}"))
        }
    };
    let lag = reference.0.saturating_sub(replayed.0);
    let seen = format!(
        "replay lag {} {} limit {} on {target} (replayed {replayed}, {basis})",
        human_bytes(lag),
        if lag > max { ">" } else { "<=" },
        human_bytes(max)
    );
    if lag > max { Err(seen) } else { Ok(seen) }
}

async fn primary_lsn(t: &Targets, primary: &str) -> Result<Lsn, String> {
    let row = t
        .pg_row(
            primary,
            "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END",
        )
        .await?;
    row.get::<_, Option<String>>(0)
        .ok_or_else(|| format!("{primary} is itself a standby"))?
        .parse()
        .map_err(|e| format!("{primary}: {e}"))
}

async fn redis_lag(
    t: &Targets,
    target: &str,
    master: Option<&str>,
    max: u64,
) -> Result<String, String> {
    let info = t.redis_replication(target).await?;
    if info.get("role").map(String::as_str) != Some("slave") {
        return Err(format!("{target} is not a replica, so it has no lag"));
    }
    let num = |m: &std::collections::HashMap<String, String>, k: &str| {
        m.get(k).and_then(|v| v.trim().parse::<u64>().ok())
    };
    let offset = num(&info, "slave_repl_offset")
        .ok_or_else(|| format!("{target} reports no slave_repl_offset"))?;
    let link = info
        .get("master_link_status")
        .cloned()
        .unwrap_or_else(|| "unknown".into());
    let master_offset = match master {
        Some(m) => match t.redis_replication(m).await {
            Ok(mi) => {
                num(&mi, "master_repl_offset").ok_or_else(|| format!("{m}: no master_repl_offset"))
            }
            Err(e) => Err(e.into()),
        },
        None => Err("no master named".into()),
    };
    match master_offset {
        Ok(mo) => {
            let lag = mo.saturating_sub(offset);
            let seen = format!(
                "replication lag {} {} limit {} on {target} (offset {offset}, master at {mo}, link {link})",
                human_bytes(lag),
                if lag > max { ">" } else { "<=" },
                human_bytes(max)
            );
            if lag > max { Err(seen) } else { Ok(seen) }
        }
        // Redis applies what it receives at once: with the master gone there
        // is nothing received-but-unapplied to measure.
        Err(e) => Ok(format!(
            "lag unknown ({e}); {target} is at offset {offset}, link {link}"
        )),
    }
}

#[cfg(test)]
mod answer_tests {
    use super::*;
    use crate::config::EnvConfig;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers its first request with 503 and then stops
    /// answering, as a loaded server may: the failed gate still says 503.
    #[tokio::test]
    async fn a_last_poll_without_answer_keeps_the_last_answer() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            let mut first = true;
            while let Ok((mut c, _)) = l.accept().await {
                if first {
                    first = false;
                    let mut buf = [0u8; 1024];
                    let _ = c.read(&mut buf).await;
                    let _ = c
                        .write_all(b"HTTP/1.1 503 Busy\r\ncontent-length: 0\r\n\r\n")
                        .await;
                } else {
                    held.push(c);
                }
            }
        });
        let gate = Gate {
            check: Check::Http {
                url: format!("http://{addr}/health"),
                method: "GET".into(),
                headers: Default::default(),
                ca_file: None,
                status: 200,
                body_contains: None,
            },
            timeout: Duration::from_millis(800),
            interval: Duration::from_millis(50),
            negate: false,
            line: 1,
        };
        let env: EnvConfig = toml::from_str("").expect("empty env");
        let r = evaluate(&gate, &Targets::new("t", &env)).await;
        assert!(!r.ok);
        assert!(
            r.observed.contains("answered 503") && r.observed.contains("no answer within"),
            "{}",
            r.observed
        );
    }
}
