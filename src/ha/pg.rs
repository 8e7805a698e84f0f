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

fn data_dir(t: &PgTarget) -> Result<&Path, HaError> {
    t.data_dir
        .as_deref()
        .ok_or_else(|| HaError::Config("member has no data_dir".into()))
}

/// The position of the last checkpoint of a stopped server (its shutdown
/// checkpoint after `pg_ctl stop`), from `pg_controldata`.
pub async fn final_lsn(t: &PgTarget) -> Result<Lsn, HaError> {
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
    parse_checkpoint(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| {
        HaError::Pg(format!(
            "pg_controldata on {} printed no \"Latest checkpoint location\"",
            dir.display()
        ))
    })
}

/// "Latest checkpoint location:  0/3000028" from pg_controldata's output.
fn parse_checkpoint(text: &str) -> Option<Lsn> {
    text.lines()
        .find_map(|l| l.strip_prefix("Latest checkpoint location:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Configuration files pg_rewind would replace with the source's copies,
/// which hold this server's own port and settings.
const OWN_FILES: [&str; 4] = [
    "postgresql.conf",
    "postgresql.auto.conf",
    "pg_hba.conf",
    "pg_ident.conf",
];

/// Makes the stopped server at `t` a standby of `leader`: pg_rewind from
/// the leader (a no-op when it did not diverge), its own config files put
/// back, `standby.signal` and `primary_conninfo` written. The caller starts
/// it. Returns pg_rewind's last line.
pub async fn make_standby(t: &PgTarget, leader: &PgTarget) -> Result<String, HaError> {
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
        return Err(HaError::Pg(format!(
            "pg_rewind of {} from the leader failed: {}; rebuild this member with pg_basebackup \
             (wal_log_hints = on or data checksums are needed for pg_rewind)",
            dir.display(),
            text.trim()
        )));
    }
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
    std::fs::write(&auto, conf)
        .map_err(|e| HaError::Pg(format!("writing {}: {e}", auto.display())))?;
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
        assert_eq!(parse_checkpoint(text), Some(Lsn(0x3000028)));
        assert_eq!(parse_checkpoint("nothing"), None);
    }
}
