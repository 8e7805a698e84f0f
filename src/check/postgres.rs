//! Checks of one `[postgres.<name>]` cluster: the server answers, WAL
//! reaches the repository (archiving works, or a streamer holds the slot),
//! and the backup mode can run from this host.

use std::time::Duration;

use super::Status;
use crate::config::{BackupMode, PgConfig, WalMode};

/// Longest a check waits for the server; a hung server must not hang `dr check`.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Every check of cluster `name`, as (check name, status, detail).
pub(super) async fn checks(name: &str, pg: &PgConfig) -> Vec<(String, Status, String)> {
    let mut out = Vec::new();
    let client = match crate::postgres::connect_to(&pg.conninfo, Some(TIMEOUT)).await {
        Ok(c) => c,
        Err(e) => {
            out.push((format!("postgres {name}"), Status::Fail, e.to_string()));
            return out;
        }
    };
    let (status, detail) = server_check(&client, name, pg).await;
    out.push((format!("postgres {name}"), status, detail));
    if status == Status::Fail {
        return out;
    }
    if pg.mode == BackupMode::Remote {
        let (status, detail) = replication_check(pg).await;
        out.push((format!("replication {name}"), status, detail));
    }
    out.push(match pg.wal {
        WalMode::Archive => {
            let (status, detail) = archive_check(&client).await;
            (format!("wal archive {name}"), status, detail)
        }
        WalMode::Stream => {
            let (status, detail) = stream_check(name, pg).await;
            (format!("wal stream {name}"), status, detail)
        }
    });
    out
}

/// The server answers, and in local mode this host holds its data directory.
async fn server_check(
    client: &tokio_postgres::Client,
    name: &str,
    pg: &PgConfig,
) -> (Status, String) {
    let row = match query(
        client,
        "SELECT current_setting('server_version'), pg_is_in_recovery()",
        "query the server",
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return (Status::Fail, e),
    };
    let (version, standby): (String, bool) = match (row.try_get(0), row.try_get(1)) {
        (Ok(v), Ok(s)) => (v, s),
        _ => return (Status::Fail, "unexpected answer from the server".into()),
    };
    let role = if standby { "standby" } else { "primary" };
    if pg.mode == BackupMode::Remote {
        return (Status::Ok, format!("PostgreSQL {version} ({role})"));
    }
    let data_dir = query(
        client,
        "SELECT current_setting('data_directory')",
        "read data_directory",
    )
    .await
    .and_then(|r| r.try_get::<_, String>(0).map_err(|e| e.to_string()));
    let data_dir = match data_dir {
        Ok(d) => d,
        Err(e) => {
            return (
                Status::Fail,
                format!(
                    "PostgreSQL {version} ({role}): {e}; local-mode backups need a superuser \
                     or a role with pg_read_all_settings and backup rights"
                ),
            );
        }
    };
    if let Err(e) = crate::postgres::backup::check_data_dir(name, &data_dir, pg) {
        return (Status::Fail, format!("PostgreSQL {version} ({role}): {e}"));
    }
    (
        Status::Ok,
        format!("PostgreSQL {version} ({role}), data in {data_dir}"),
    )
}

/// One row, or "cannot {what}: <the server's words>".
async fn query(
    client: &tokio_postgres::Client,
    sql: &str,
    what: &str,
) -> Result<tokio_postgres::Row, String> {
    tokio::time::timeout(TIMEOUT, client.query_one(sql, &[]))
        .await
        .map_err(|_| format!("cannot {what}: no answer within {}s", TIMEOUT.as_secs()))?
        .map_err(|e| format!("cannot {what}: {}", db_message(&e)))
}

/// The server's own words for a failed query.
fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// Remote mode: a replication connection opens and identifies the system.
async fn replication_check(pg: &PgConfig) -> (Status, String) {
    let conn = tokio::time::timeout(
        TIMEOUT,
        crate::postgres::replication::ReplicationConn::connect(&pg.conninfo, "dr_check"),
    )
    .await;
    let mut conn = match conn {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return (
                Status::Fail,
                crate::postgres::backup::replication_hint(e, pg).to_string(),
            );
        }
        Err(_) => {
            return (
                Status::Fail,
                format!("no answer within {}s", TIMEOUT.as_secs()),
            );
        }
    };
    match conn.identify_system().await {
        Ok(s) => (
            Status::Ok,
            format!(
                "replication connection works (system {}, timeline {})",
                s.system_id, s.timeline
            ),
        ),
        Err(e) => (
            Status::Fail,
            crate::postgres::backup::replication_hint(e, pg).to_string(),
        ),
    }
}

/// Archive mode: archiving is on, runs `dr wal-push`, and is not failing.
async fn archive_check(client: &tokio_postgres::Client) -> (Status, String) {
    let row = match query(
        client,
        "SELECT current_setting('archive_mode'), current_setting('archive_command'), \
                coalesce(last_archived_wal, ''), \
                coalesce(to_char(last_archived_time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS\"Z\"'), ''), \
                failed_count, coalesce(last_failed_wal, ''), \
                coalesce(to_char(last_failed_time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS\"Z\"'), ''), \
                coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false) \
         FROM pg_stat_archiver",
        "read pg_stat_archiver",
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return (Status::Fail, e),
    };
    let text = |i: usize| row.try_get::<_, String>(i).unwrap_or_default();
    let (mode, command, last_wal, last_time) = (text(0), text(1), text(2), text(3));
    let failed_count: i64 = row.try_get(4).unwrap_or(0);
    let (failed_wal, failed_time) = (text(5), text(6));
    let failing: bool = row.try_get(7).unwrap_or(false);
    if mode == "off" {
        return (
            Status::Fail,
            "archive_mode is off: no WAL reaches the repository and no backup can be \
             restored; set archive_mode = on and archive_command = 'dr wal-push %p', then \
             restart PostgreSQL (or set wal = \"stream\")"
                .into(),
        );
    }
    if failing {
        return (
            Status::Fail,
            format!(
                "archiving is failing: {failed_wal} failed at {failed_time} \
                 ({failed_count} failures so far) and nothing has been archived since; \
                 the PostgreSQL log shows why (run the archive_command by hand as the \
                 server's user to see the error)"
            ),
        );
    }
    if !command.contains("wal-push") {
        return (
            Status::Fail,
            format!(
                "archive_command is {command:?}, which does not run `dr wal-push %p`: \
                 WAL does not reach this repository"
            ),
        );
    }
    if last_wal.is_empty() {
        return (
            Status::Ok,
            format!(
                "archive_command runs dr wal-push; nothing archived yet (archive_mode = {mode})"
            ),
        );
    }
    (
        Status::Ok,
        format!(
            "last archived {last_wal} at {last_time}, {failed_count} failures since the statistics were reset"
        ),
    )
}

/// A streaming cluster: the slot exists and a streamer holds it, and how far
/// the durable position trails the server. A missing streamer is a failure
/// (WAL piles up on the server and nothing reaches the repository).
async fn stream_check(name: &str, pg: &PgConfig) -> (Status, String) {
    use crate::postgres::stream::{StreamStatus, server_view};
    let v = match server_view(pg, name).await {
        Ok(v) => v,
        Err(e) => return (Status::Fail, format!("cannot ask the server: {e}")),
    };
    let slot = pg.slot_name(name);
    if !v.slot_exists {
        return (
            Status::Fail,
            format!(
                "replication slot {slot} does not exist; start `dr wal-stream {name}` or the daemon (it creates the slot)"
            ),
        );
    }
    let retained = v
        .retained_bytes
        .map(|b| {
            format!(
                "; the slot holds {} MiB of WAL on the server",
                b / (1 << 20)
            )
        })
        .unwrap_or_default();
    if !v.slot_active {
        return (
            Status::Fail,
            format!(
                "no streamer is connected to slot {slot}{retained}; start `dr wal-stream {name}` or the daemon"
            ),
        );
    }
    let local = StreamStatus::load(pg, name)
        .map(|s| format!(", durable {} on timeline {}", s.durable_lsn, s.timeline))
        .unwrap_or_default();
    let lag = v.lag_bytes.unwrap_or(0);
    let detail = format!(
        "{} streamer on slot {slot}: {} bytes behind{}{local}",
        v.sync_state.as_deref().unwrap_or("unknown"),
        lag,
        v.flush_lag_seconds
            .map(|s| format!(" ({s:.3} s flush lag)"))
            .unwrap_or_default()
    );
    if pg.synchronous && v.sync_state.as_deref() != Some("sync") {
        return (
            Status::Warn,
            format!(
                "{detail}; synchronous = true but the server does not wait for it: add {} to synchronous_standby_names",
                pg.stream_application_name(name)
            ),
        );
    }
    let status = if lag > 64 << 20 {
        Status::Warn
    } else {
        Status::Ok
    };
    (status, detail)
}
