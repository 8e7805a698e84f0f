//! Periodic probes: WAL archive lag from each cluster's `pg_stat_archiver`,
//! and whether each region still serves the repository descriptor.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::metrics::{CatalogStats, Shared, WalStats};
use crate::config::{Config, PgConfig};
use crate::repo::layout::ObjectKey;

/// Longest a single probe may take; a hung server must not stall the loop.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Probes every cluster and region of `cfg` once and records the results.
pub async fn probe_all(cfg: &Config, state: &Shared) {
    let mut wal = Vec::new();
    for (name, pg) in &cfg.postgres {
        let stream_app = (pg.get_ref().wal == crate::config::WalMode::Stream)
            .then(|| pg.get_ref().stream_application_name(name));
        let w = match tokio::time::timeout(
            PROBE_TIMEOUT,
            archiver(pg.get_ref(), stream_app.as_deref()),
        )
        .await
        {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => WalStats {
                error: Some(e),
                ..Default::default()
            },
            Err(_) => WalStats {
                error: Some(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
                ..Default::default()
            },
        };
        let mut w = w;
        if pg.get_ref().wal == crate::config::WalMode::Stream
            && let Some(st) = crate::postgres::stream::StreamStatus::load(pg.get_ref(), name)
        {
            let now = Utc::now();
            w.stream_lag_bytes = Some(st.lag_bytes as f64);
            w.stream_lag_seconds = Some(st.lag_seconds(now));
            w.stream_status_age_seconds =
                Some((now - st.updated).num_milliseconds().max(0) as f64 / 1000.0);
        }
        w.stream_sync_expected = pg.get_ref().synchronous;
        wal.push((name.clone(), w));
    }
    let mut regions = Vec::new();
    match crate::store::Regions::from_config(cfg).await {
        Ok(rs) => {
            let key = ObjectKey::RepoInfo.to_string();
            for r in rs.iter() {
                let res = match tokio::time::timeout(PROBE_TIMEOUT, r.store.head(&key)).await {
                    Ok(Ok(Some(_))) => None,
                    Ok(Ok(None)) => Some(format!(
                        "{} holds no repository (no {key}); run `dr repo init` or `dr repo sync`",
                        r.store.describe()
                    )),
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
                };
                regions.push((r.name.clone(), res));
            }
        }
        Err(e) => tracing::warn!("cannot set up regions for probing: {e}"),
    }
    let now = Utc::now();
    state.with(|s| {
        s.wal.retain(|name, _| cfg.postgres.contains_key(name));
        for (name, mut w) in wal {
            w.probed = Some(now);
            s.wal.insert(name, w);
        }
        s.regions
            .retain(|name, _| cfg.region_specs.iter().any(|r| &r.name == name));
        for (name, res) in regions {
            let r = s.regions.entry(name).or_default();
            r.probe_error = Some(res);
            r.probed = Some(now);
        }
    });
}

/// Reads `pg_stat_archiver` and the current WAL file of one cluster, and
/// with `stream_app` set, how the server sees the streamer of that
/// `application_name` in `pg_stat_replication`.
async fn archiver(pg: &PgConfig, stream_app: Option<&str>) -> Result<WalStats, String> {
    let client = crate::postgres::connect_to(&pg.conninfo, Some(PROBE_TIMEOUT))
        .await
        .map_err(|e| e.to_string())?;
    // On a standby pg_current_wal_lsn() fails; it archives nothing of its own.
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), \
                    CASE WHEN pg_is_in_recovery() THEN NULL \
                         ELSE pg_walfile_name(pg_current_wal_lsn()) END, \
                    last_archived_wal, \
                    extract(epoch FROM last_archived_time)::float8, \
                    failed_count, last_failed_wal, \
                    extract(epoch FROM last_failed_time)::float8 \
             FROM pg_stat_archiver",
            &[],
        )
        .await
        .map_err(|e| format!("querying pg_stat_archiver: {e}"))?;
    let get_err = |e: tokio_postgres::Error| format!("reading pg_stat_archiver: {e}");
    let in_recovery: bool = row.try_get(0).map_err(get_err)?;
    let current: Option<String> = row.try_get(1).map_err(get_err)?;
    let last_wal: Option<String> = row.try_get(2).map_err(get_err)?;
    let last_time: Option<f64> = row.try_get(3).map_err(get_err)?;
    let failed_count: i64 = row.try_get(4).map_err(get_err)?;
    let failed_wal: Option<String> = row.try_get(5).map_err(get_err)?;
    let failed_time: Option<f64> = row.try_get(6).map_err(get_err)?;
    let last_archived = last_time.and_then(from_epoch);
    let failed_at = failed_time.and_then(from_epoch);
    let lag_segments = match (&current, &last_wal) {
        (Some(c), Some(l)) => lag(c, l),
        _ => None,
    };
    let lag_seconds = match (lag_segments, last_archived) {
        (Some(0), _) => Some(0.0),
        (Some(_), Some(t)) => Some((Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0),
        _ => None,
    };
    let failing = match (failed_at, last_archived) {
        (Some(f), l) if l.is_none_or(|l| f > l) => Some(format!(
            "archive_command failed for {} at {} and has not succeeded since; see the PostgreSQL log",
            failed_wal.as_deref().unwrap_or("?"),
            f.format("%Y-%m-%d %H:%M:%SZ")
        )),
        _ => None,
    };
    let (mut stream_connected, mut stream_synchronous) = (None, None);
    if let Some(app) = stream_app {
        let rows = client
            .query(
                "SELECT state = 'streaming', sync_state IN ('sync', 'quorum') \
                 FROM pg_stat_replication WHERE application_name = $1",
                &[&app],
            )
            .await
            .map_err(|e| format!("querying pg_stat_replication: {e}"))?;
        let mut connected = false;
        let mut sync = false;
        for r in rows {
            connected |= r
                .try_get::<_, Option<bool>>(0)
                .ok()
                .flatten()
                .unwrap_or(false);
            sync |= r
                .try_get::<_, Option<bool>>(1)
                .ok()
                .flatten()
                .unwrap_or(false);
        }
        stream_connected = Some(connected);
        stream_synchronous = Some(sync);
    }
    Ok(WalStats {
        stream_connected,
        stream_synchronous,
        probed: None,
        error: None,
        in_recovery,
        lag_segments,
        lag_seconds,
        last_archived,
        failed_count,
        failing,
        ..WalStats::default()
    })
}

/// Reads what the repository holds for every source of `cfg`: recoverable
/// window, newest backup, count, WAL gaps. Slower than the other probes (it
/// lists the repository and reads manifests), so the daemon runs it after
/// jobs finish and every few minutes, not every probe.
pub async fn probe_catalogs(cfg: &Config, state: &Shared) {
    let mut out = Vec::new();
    let repo = crate::repo::Repository::open(cfg).await;
    for name in cfg.postgres.keys() {
        let st = match &repo {
            Err(e) => CatalogStats {
                error: Some(e.to_string()),
                ..Default::default()
            },
            Ok(repo) => match crate::postgres::catalog::Catalog::load_backups(repo, name).await {
                Err(e) => CatalogStats {
                    error: Some(e.to_string()),
                    ..Default::default()
                },
                Ok(cat) => CatalogStats {
                    window_start: cat.windows.iter().map(|w| w.from).min(),
                    window_end: cat.windows.iter().map(|w| w.to).max(),
                    newest_backup: cat.backups.iter().map(|b| b.stop_time).max(),
                    backups: cat.backups.len() as u64,
                    wal_gaps: cat.wal_gaps().iter().map(|g| g.missing).sum(),
                    error: None,
                },
            },
        };
        out.push((("postgres".to_string(), name.clone()), st));
    }
    for name in cfg.redis.keys() {
        let st = match &repo {
            Err(e) => CatalogStats {
                error: Some(e.to_string()),
                ..Default::default()
            },
            Ok(repo) => match crate::redis::restore::RedisCatalog::load(repo, name).await {
                Err(e) => CatalogStats {
                    error: Some(e.to_string()),
                    ..Default::default()
                },
                Ok(cat) => CatalogStats {
                    window_start: cat.snapshots.iter().map(|s| s.time).min(),
                    window_end: cat.snapshots.iter().map(|s| s.time).max(),
                    newest_backup: cat.snapshots.iter().map(|s| s.time).max(),
                    backups: cat.snapshots.len() as u64,
                    wal_gaps: 0,
                    error: None,
                },
            },
        };
        out.push((("redis".to_string(), name.clone()), st));
    }
    state.with(|s| {
        s.catalogs = out.into_iter().collect();
    });
}

/// Follows the audit log for failovers: reads what was appended since the
/// last call (from the start again when the file shrank, e.g. rotated).
#[derive(Debug, Default)]
pub struct AuditTail {
    path: Option<std::path::PathBuf>,
    offset: u64,
    partial: Vec<u8>,
}

impl AuditTail {
    /// Reads new records of `path` and counts finished failovers into `state`.
    pub fn poll(&mut self, path: &std::path::Path, state: &Shared) {
        use std::io::{Read, Seek, SeekFrom};
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if self.path.as_deref() != Some(path) || len < self.offset {
            *self = AuditTail {
                path: Some(path.to_path_buf()),
                ..Default::default()
            };
            state.with(|s| {
                s.failovers.clear();
                s.last_failover.clear();
            });
        }
        if len == self.offset {
            return;
        }
        let Ok(mut f) = std::fs::File::open(path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.take(len - self.offset).read_to_end(&mut buf).is_err() {
            return;
        }
        self.offset += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        let mut seen = Vec::new();
        for line in complete.split(|b| *b == b'\n') {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            if v["action"] == "failover" && v["phase"] == "finished" {
                let env = v["target"].as_str().unwrap_or("").to_string();
                let outcome = v["outcome"].as_str().unwrap_or("").to_string();
                let time = v["time"]
                    .as_str()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc));
                seen.push((env, outcome, time));
            }
        }
        if seen.is_empty() {
            return;
        }
        state.with(|s| {
            for (env, outcome, time) in seen {
                *s.failovers.entry((env.clone(), outcome)).or_default() += 1;
                if let Some(t) = time {
                    let last = s.last_failover.entry(env).or_insert(t);
                    *last = (*last).max(t);
                }
            }
        });
    }
}

fn from_epoch(secs: f64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis((secs * 1000.0) as i64)
}

/// Completed segments between the last archived one and the one being
/// written: `current` is still open, so it does not count.
fn lag(current: &str, last_archived: &str) -> Option<u64> {
    let cur = segment_number(current)?;
    // After a promotion the archiver's last file may be a history file or a
    // `.partial`; the lag is then unknown until the next segment is archived.
    let last = segment_number(last_archived)?;
    Some(cur.saturating_sub(last).saturating_sub(1))
}

/// Position of a WAL file name (`TTTTTTTTXXXXXXXXYYYYYYYY`) in the sequence
/// of 16 MiB segments, ignoring the timeline. A backup history file
/// (`…YYYYYYYY.00000028.backup`) is archived after its segment, and a
/// `.partial` stands for its segment, so both count as that segment.
fn segment_number(name: &str) -> Option<u64> {
    let name = name.get(..24)?;
    if !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some(log * 0x100 + seg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_completed_segments_across_log_boundaries() {
        assert_eq!(
            lag("000000010000000000000005", "000000010000000000000004"),
            Some(0)
        );
        assert_eq!(
            lag("000000010000000000000005", "000000010000000000000002"),
            Some(2)
        );
        assert_eq!(
            lag("000000010000000100000001", "0000000100000000000000FF"),
            Some(1)
        );
        assert_eq!(
            lag("000000020000000000000009", "000000010000000000000007"),
            Some(1)
        );
        assert_eq!(lag("000000020000000000000009", "00000002.history"), None);
        assert_eq!(
            lag(
                "000000010000000000000005",
                "000000010000000000000004.00000028.backup"
            ),
            Some(0)
        );
        assert_eq!(
            lag("000000010000000000000005", "000000010000000000000005"),
            Some(0)
        );
    }

    #[test]
    fn the_audit_tail_counts_finished_failovers_once_and_restarts_on_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let rec = |action: &str, phase: &str, outcome: &str, time: &str| {
            format!(
                "{{\"action\":\"{action}\",\"phase\":\"{phase}\",\"target\":\"prod\",\"outcome\":\"{outcome}\",\"time\":\"{time}\"}}\n"
            )
        };
        let state = Shared::new(3);
        let mut tail = AuditTail::default();
        let mut text = rec("failover", "started", "running", "2026-11-25T18:00:00Z")
            + &rec("failover", "finished", "ok", "2026-11-25T18:00:05Z")
            + &rec("failover.dry-run", "finished", "ok", "2026-11-25T18:01:00Z");
        // Half a line: counted once it is complete.
        let half = rec(
            "failover",
            "finished",
            "rolled_back",
            "2026-11-25T19:00:00Z",
        );
        text.push_str(&half[..20]);
        std::fs::write(&path, &text).expect("write");
        tail.poll(&path, &state);
        tail.poll(&path, &state);
        let counts = |s: &Shared| s.with(|st| st.failovers.clone());
        assert_eq!(counts(&state).get(&("prod".into(), "ok".into())), Some(&1));
        assert_eq!(counts(&state).len(), 1);
        text.push_str(&half[20..]);
        std::fs::write(&path, &text).expect("write");
        tail.poll(&path, &state);
        assert_eq!(
            counts(&state).get(&("prod".into(), "rolled_back".into())),
            Some(&1)
        );
        let last = state.with(|st| st.last_failover.get("prod").copied());
        assert_eq!(
            last.map(|t| t.to_rfc3339()),
            Some("2026-11-25T19:00:00+00:00".into())
        );
        // Rotated: the new file is read from its start, the counts anew.
        std::fs::write(
            &path,
            rec("failover", "finished", "ok", "2026-11-26T00:00:00Z"),
        )
        .expect("write");
        tail.poll(&path, &state);
        assert_eq!(counts(&state).len(), 1, "{:?}", counts(&state));
    }
}
