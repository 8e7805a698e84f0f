//! What a member's daemon does to its own PostgreSQL server beyond the
//! playbook actions it reuses (promote, fence, start, repoint): observing
//! it, reading its final position, and turning it into a standby of the
//! leader (pg_rewind when it diverged).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use super::HaError;
use crate::config::PgTarget;
use crate::os::as_user;
use crate::postgres::Lsn;

/// The role a member's server plays right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts writes.
    Primary,
    /// In recovery.
    Standby,
    /// Does not answer.
    Down,
}

impl Role {
    /// `primary`, `standby` or `down`.
    pub fn label(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
            Role::Down => "down",
        }
    }
}

/// One look at a server.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Its role.
    pub role: Role,
    /// Timeline of the last checkpoint (0 when down).
    pub timeline: u32,
    /// Primary: flushed position; standby: last received (or replayed when
    /// nothing was streamed).
    pub received: Option<Lsn>,
    /// Standby: last replayed position.
    pub replayed: Option<Lsn>,
    /// Standby: the primary_conninfo it streams with.
    pub primary_conninfo: String,
    /// Primary: application names of synchronous standbys.
    pub sync_standbys: Vec<String>,
    /// Why it is down.
    pub error: Option<String>,
}

/// Observes the server at `t`, within `timeout`. Never fails: a server that
/// cannot be queried is `Down`.
pub async fn observe(t: &PgTarget, timeout: Duration) -> Observed {
    match tokio::time::timeout(timeout, query(t, timeout)).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => down(e),
        Err(_) => down(format!("no answer within {timeout:?}")),
    }
}

fn down(e: String) -> Observed {
    Observed {
        role: Role::Down,
        timeline: 0,
        received: None,
        replayed: None,
        primary_conninfo: String::new(),
        sync_standbys: Vec::new(),
        error: Some(e),
    }
}

async fn query(t: &PgTarget, timeout: Duration) -> Result<Observed, String> {
    let c = crate::postgres::connect_to(&t.conninfo, Some(timeout))
        .await
        .map_err(|e| crate::postgres::pg_cause(&e))?;
    let q = |e: tokio_postgres::Error| crate::postgres::sql_cause(&e);
    let row = c
        .query_one(
            "SELECT pg_is_in_recovery(), \
                    (SELECT timeline_id FROM pg_control_checkpoint()), \
                    (CASE WHEN pg_is_in_recovery() \
                          THEN coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) \
                          ELSE pg_current_wal_flush_lsn() END)::text, \
                    pg_last_wal_replay_lsn()::text, \
                    current_setting('primary_conninfo')",
            &[],
        )
        .await
        .map_err(q)?;
    let standby: bool = row.get(0);
    let lsn = |i: usize| {
        row.get::<_, Option<String>>(i)
            .and_then(|s| s.parse::<Lsn>().ok())
    };
    let sync_standbys = if standby {
        Vec::new()
    } else {
        c.query(
            "SELECT application_name FROM pg_stat_replication \
             WHERE sync_state IN ('sync', 'quorum') ORDER BY 1",
            &[],
        )
        .await
        .map_err(q)?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
    };
    Ok(Observed {
        role: if standby {
            Role::Standby
        } else {
            Role::Primary
        },
        timeline: u32::try_from(row.get::<_, i32>(1)).unwrap_or(0),
        received: lsn(2),
        replayed: lsn(3),
        primary_conninfo: row.get(4),
        sync_standbys,
        error: None,
    })
}

/// Stops the standby at `t` from streaming (an empty `primary_conninfo`)
/// and returns the last position it received and flushed, once its WAL
/// receiver has exited: from then on it cannot acknowledge a commit of the
/// primary it streamed from. `None` when the server is no standby.
pub async fn detach(t: &PgTarget, timeout: Duration) -> Result<Option<Lsn>, String> {
    let c = crate::postgres::connect_to(&t.conninfo, Some(timeout))
        .await
        .map_err(|e| crate::postgres::pg_cause(&e))?;
    let q = |e: tokio_postgres::Error| crate::postgres::sql_cause(&e);
    let standby: bool = c
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(q)?
        .get(0);
    if !standby {
        return Ok(None);
    }
    c.batch_execute("ALTER SYSTEM SET primary_conninfo = ''")
        .await
        .map_err(q)?;
    c.batch_execute("SELECT pg_reload_conf()")
        .await
        .map_err(q)?;
    let start = std::time::Instant::now();
    loop {
        // The receiver's flushed position outlives it; read it once the
        // receiver is gone, so nothing arrives after it.
        let row = c
            .query_one(
                "SELECT (SELECT count(*) FROM pg_stat_wal_receiver), \
                        coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::text",
                &[],
            )
            .await
            .map_err(q)?;
        if row.get::<_, i64>(0) == 0 {
            return Ok(row.get::<_, Option<String>>(1).and_then(|s| s.parse().ok()));
        }
        if start.elapsed() > timeout {
            return Err(format!("its WAL receiver still runs after {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn data_dir(t: &PgTarget) -> Result<&Path, HaError> {
    t.data_dir
        .as_deref()
        .ok_or_else(|| HaError::Config("member has no data_dir".into()))
}

/// `pg_controldata`'s report on a stopped server.
async fn controldata(t: &PgTarget) -> Result<String, HaError> {
    let dir = data_dir(t)?;
    let out = as_user(&t.os_user, &t.bin_dir.join("pg_controldata"))
        .arg("-D")
        .arg(dir)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| HaError::Pg(format!("cannot run pg_controldata: {e}")))?;
    if !out.status.success() {
        return Err(HaError::Pg(format!(
            "pg_controldata on {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// The position of the last checkpoint of a stopped server (its shutdown
/// checkpoint after `pg_ctl stop`).
pub async fn final_lsn(t: &PgTarget) -> Result<Lsn, HaError> {
    let text = controldata(t).await?;
    field(&text, "Latest checkpoint location")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            HaError::Pg("pg_controldata printed no \"Latest checkpoint location\"".into())
        })
}

/// True when the stopped server was shut down cleanly (as a primary or a
/// standby), so pg_rewind reads it as it is instead of recovering it first.
pub async fn shut_down_cleanly(t: &PgTarget) -> Result<bool, HaError> {
    let text = controldata(t).await?;
    Ok(matches!(
        field(&text, "Database cluster state"),
        Some("shut down" | "shut down in recovery")
    ))
}

/// Configuration files pg_rewind would replace with the source's copies,
/// which hold this server's own port and settings.
const OWN_FILES: [&str; 4] = [
    "postgresql.conf",
    "postgresql.auto.conf",
    "pg_hba.conf",
    "pg_ident.conf",
];

/// Writes `standby.signal` and points `primary_conninfo` at `leader`
/// (timeline `latest`, to follow its promotion).
pub fn write_standby_conf(t: &PgTarget, leader: &PgTarget) -> Result<(), HaError> {
    let dir = data_dir(t)?;
    let signal = dir.join("standby.signal");
    std::fs::write(&signal, b"")
        .map_err(|e| HaError::Pg(format!("writing {}: {e}", signal.display())))?;
    let auto = dir.join("postgresql.auto.conf");
    let mut conf = std::fs::read_to_string(&auto).unwrap_or_default();
    if !conf.is_empty() && !conf.ends_with('\n') {
        conf.push('\n');
    }
    // Later lines win: these override any earlier setting in the file.
    conf.push_str(&format!(
        "primary_conninfo = {}\nrecovery_target_timeline = 'latest'\n",
        crate::playbook::actions::quote_literal(leader.replication_conninfo())
    ));
    std::fs::write(&auto, conf).map_err(|e| HaError::Pg(format!("writing {}: {e}", auto.display())))
}

/// pg_rewind of the cleanly stopped server at `t` from `leader` (a no-op
/// when it did not diverge), then its own config files put back and the
/// standby settings written again. Returns pg_rewind's last line.
pub async fn rewind(t: &PgTarget, leader: &PgTarget) -> Result<String, HaError> {
    let dir = data_dir(t)?;
    let mut saved = Vec::new();
    for f in OWN_FILES {
        if let Ok(b) = std::fs::read(dir.join(f)) {
            saved.push((f, b));
        }
    }
    let out = as_user(&t.os_user, &t.bin_dir.join("pg_rewind"))
        .arg("--target-pgdata")
        .arg(dir)
        .arg("--source-server")
        .arg(&leader.conninfo)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| HaError::Pg(format!("cannot run pg_rewind: {e}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for (f, b) in &saved {
        std::fs::write(dir.join(f), b)
            .map_err(|e| HaError::Pg(format!("restoring {}: {e}", dir.join(f).display())))?;
    }
    if !out.status.success() {
        // pg_rewind reads this server's WAL back to the last checkpoint
        // before the fork; a later checkpoint may have recycled it.
        let hint = if text.contains("could not open file") && text.contains("pg_wal") {
            "this server no longer has the WAL since the fork: set wal_keep_size on every member \
             so checkpoints keep it"
        } else {
            "pg_rewind needs wal_log_hints = on or data checksums"
        };
        return Err(HaError::Pg(format!(
            "pg_rewind of {} from the leader failed: {}; rebuild this member with pg_basebackup \
             ({hint})",
            dir.display(),
            text.trim()
        )));
    }
    write_standby_conf(t, leader)?;
    Ok(text.trim().lines().last().unwrap_or("").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_location_is_read_from_controldata() {
        let text = "pg_control version number:            1300\n\
                    Latest checkpoint location:           0/3000028\n\
                    Latest checkpoint's REDO location:    0/3000028\n";
        let lsn = field(text, "Latest checkpoint location").and_then(|v| v.parse().ok());
        assert_eq!(lsn, Some(Lsn(0x3000028)));
        assert_eq!(field("nothing", "Latest checkpoint location"), None);
        let state = "Database cluster state:               shut down in recovery\n";
        assert_eq!(
            field(state, "Database cluster state"),
            Some("shut down in recovery")
        );
    }
}
