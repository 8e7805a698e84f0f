//! `dr verify pg --restore`: restore a cluster into a scratch directory, start
//! it isolated from production, replay WAL to the target, run the checks,
//! and always clean up.

use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::checks::{self, PgAt};
use super::report::{CheckResult, SourceReport};
use super::scratch::{Scratch, free_port};
use crate::config::{DEFAULT_SCRATCH_DIR, PgConfig};
use crate::postgres::restore::{self, RestoreOptions, Target};
use crate::repo::Repository;

/// A restored cluster still running in its scratch directory.
#[derive(Debug)]
pub struct PgScratch {
    /// The directory (and the server in it).
    pub scratch: Scratch,
    /// Where checks and playbooks reach the server.
    pub at: PgAt,
    /// The restored PGDATA.
    pub data: PathBuf,
}

/// Settings that cut a restored server off from everything production
/// configured: no archiving, no replication, no connection to a primary, no
/// commands run at recovery end, no files written outside the scratch
/// directory, and connections only through a 0700 socket directory (trust)
/// or loopback with the cluster's own passwords.
///
/// `max_wal_senders`, `max_connections` and the other settings recovery
/// compares with the primary's are kept: lowering them stops hot standby.
pub fn isolation_settings(root: &Path, data: &Path, socket: &Path, port: u16) -> Vec<String> {
    let p = |x: &Path| x.display().to_string();
    vec![
        format!("port={port}"),
        "listen_addresses=127.0.0.1".into(),
        format!(
            "unix_socket_directories={}",
            crate::postgres::quote::list_element(socket)
        ),
        "unix_socket_permissions=0700".into(),
        format!("hba_file={}", p(&root.join("pg_hba.conf"))),
        format!("data_directory={}", p(data)),
        "external_pid_file=".into(),
        "archive_mode=off".into(),
        "archive_command=".into(),
        "archive_library=".into(),
        "archive_cleanup_command=".into(),
        "recovery_end_command=".into(),
        "primary_conninfo=".into(),
        "primary_slot_name=".into(),
        "synchronous_standby_names=".into(),
        "hot_standby=on".into(),
        "ssl=off".into(),
        "logging_collector=off".into(),
        "log_destination=stderr".into(),
        "cluster_name=dr-verify".into(),
    ]
}

/// The access rules of a scratch server: anyone who can open the 0700 socket
/// directory (the server's OS user and root) gets in; over loopback only the
/// cluster's own password does, so nobody gains access they lacked.
pub const SCRATCH_HBA: &str = "local all all trust\nhost all all 127.0.0.1/32 md5\n";

/// Verifies one cluster end to end; the scratch server and directory are
/// gone when this returns.
pub async fn verify(
    repo: &Repository,
    cluster: &str,
    cfg: &PgConfig,
    target: &Target,
    dr_command: &str,
    cancel: &CancellationToken,
) -> SourceReport {
    let t0 = Instant::now();
    let (mut rep, scratch) =
        restore_and_check(repo, cluster, cfg, target, dr_command, t0, cancel).await;
    if let Some(s) = scratch {
        super::record_cleanup(&mut rep, &s.scratch).await;
    }
    rep.seconds = t0.elapsed().as_secs_f64();
    rep
}

/// Restores and checks, leaving the server running for the caller (a drill
/// runs a playbook against it) unless the restore itself failed. The caller
/// must clean the returned scratch up. `t0` is when the recovery started,
/// for the RTO.
pub async fn restore_and_check(
    repo: &Repository,
    cluster: &str,
    cfg: &PgConfig,
    target: &Target,
    dr_command: &str,
    t0: Instant,
    cancel: &CancellationToken,
) -> (SourceReport, Option<PgScratch>) {
    let mut rep = SourceReport::new("pg", cluster, &target_text(target));
    let parent = cfg
        .verify
        .scratch_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SCRATCH_DIR));
    let mut scratch = match Scratch::create(&parent, "pg", Some(&cfg.os_user)).await {
        Ok(s) => s,
        Err(e) => {
            rep.checks
                .push(CheckResult::fail("scratch directory", e, 0.0));
            return (rep, None);
        }
    };
    let root = scratch.root().to_path_buf();
    let data = root.join("data");
    scratch.set_pg(&cfg.bin_dir, &cfg.os_user, &data);
    rep.scratch_dir = Some(root.display().to_string());
    let socket = root.join("socket");
    let at = PgAt {
        host: socket.display().to_string(),
        port: 0,
        user: cfg.verify.user.clone(),
        conninfo: None,
    };
    let mut out = PgScratch { scratch, at, data };
    let work = run(
        repo, cluster, cfg, target, dr_command, t0, &mut out, &mut rep,
    );
    let interrupted = super::interruptible(work, cancel, t0, super::INTERRUPTED).await;
    rep.checks.extend(interrupted);
    (rep, Some(out))
}

pub(super) fn target_text(target: &Target) -> String {
    match target {
        Target::Latest => "latest".into(),
        Target::Time(t) => t.to_rfc3339(),
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    repo: &Repository,
    cluster: &str,
    cfg: &PgConfig,
    target: &Target,
    dr_command: &str,
    t0: Instant,
    out: &mut PgScratch,
    rep: &mut SourceReport,
) {
    let root = out.scratch.root().to_path_buf();
    let socket = PathBuf::from(&out.at.host);
    let prepared = std::fs::create_dir(&socket)
        .and_then(|()| std::fs::write(root.join("pg_hba.conf"), SCRATCH_HBA))
        .map_err(|e| format!("cannot prepare {}: {e}", root.display()));
    let prepared = match prepared {
        Ok(()) => crate::postgres::server::chown_to(&root, &cfg.os_user)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let port = prepared.and_then(|()| free_port().map_err(String::from));
    let port = match port {
        Ok(p) => p,
        Err(e) => {
            rep.checks
                .push(CheckResult::fail("scratch directory", e, 0.0));
            return;
        }
    };
    out.at.port = port;
    rep.port = Some(port);
    let opts = RestoreOptions {
        start: Some(port),
        no_archive: true,
        // Tablespaces stay inside the scratch directory.
        settings: isolation_settings(&root, &out.data, &socket, port),
        connect_host: Some(out.at.host.clone()),
        connect_user: cfg.verify.user.clone(),
        ..RestoreOptions::new(
            target.clone(),
            out.data.clone(),
            crate::postgres::quote::wal_fetch_command(dr_command, cluster),
        )
    };
    restore_then_check(repo, cluster, cfg, &opts, &out.at, t0, rep).await;
}

/// Restores as `opts` says (starting the server), then runs the built-in
/// and user checks against the server at `at`. Shared by scratch and
/// staging restores, so both prove the same things.
pub(super) async fn restore_then_check(
    repo: &Repository,
    cluster: &str,
    cfg: &PgConfig,
    opts: &RestoreOptions,
    at: &PgAt,
    t0: Instant,
    rep: &mut SourceReport,
) {
    let target = &opts.target;
    // `latest` is fixed when the verification starts: WAL archived while it
    // replays belongs to the next run, and replaying it would put the
    // recovered point after the target on any busy cluster.
    let pin = match target {
        Target::Latest => match pin_latest(repo, cluster).await {
            Ok(p) => p,
            Err(e) => {
                rep.checks.push(CheckResult::fail(
                    "restore",
                    e.to_string(),
                    t0.elapsed().as_secs_f64(),
                ));
                return;
            }
        },
        Target::Time(_) => None,
    };
    let mut pinned_opts;
    let opts = match &pin {
        Some(p) => {
            pinned_opts = opts.clone();
            // A gap fails the target check below, after proving what can
            // be restored up to it.
            pinned_opts.accept_gap = true;
            pinned_opts
                .restore_command
                .push_str(&format!(" --until {}", p.segment));
            &pinned_opts
        }
        None => opts,
    };
    let progress = crate::progress::Progress::new();
    let r = match restore::restore(repo, cluster, cfg, opts, progress).await {
        Ok(r) => r,
        Err(e) => {
            rep.checks.push(CheckResult::fail(
                "restore",
                format!("{e}"),
                t0.elapsed().as_secs_f64(),
            ));
            return;
        }
    };
    rep.backup = Some(r.backup.clone());
    rep.bytes = r.bytes;
    rep.files = r.files;
    rep.restore_seconds = Some(r.restore_seconds);
    rep.checks.push(CheckResult::pass(
        "restore",
        format!(
            "backup {} ({} bytes in {} files) rebuilt in {:.2}s, WAL replayed in {:.2}s",
            r.backup,
            r.bytes,
            r.files,
            r.restore_seconds,
            r.recovery_seconds.unwrap_or_default()
        ),
        r.restore_seconds + r.recovery_seconds.unwrap_or_default(),
    ));
    let t = Instant::now();
    let client = match at.connect("postgres").await {
        Ok(c) => c,
        Err(e) => {
            rep.checks.push(CheckResult::fail(
                "promoted",
                format!("cannot connect: {e}"),
                0.0,
            ));
            return;
        }
    };
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), extract(epoch FROM pg_last_xact_replay_timestamp())::float8",
            &[],
        )
        .await;
    let (in_recovery, replayed) = match row {
        Ok(r) => (r.get::<_, bool>(0), r.get::<_, Option<f64>>(1)),
        Err(e) => {
            rep.checks.push(CheckResult::fail(
                "promoted",
                crate::postgres::sql_cause(&e),
                t.elapsed().as_secs_f64(),
            ));
            return;
        }
    };
    // The server answered a query after promotion: recovery time ends here.
    rep.rto_seconds = Some(t0.elapsed().as_secs_f64());
    rep.checks.push(if in_recovery {
        CheckResult::fail("promoted", "pg_is_in_recovery() is true", 0.0)
    } else {
        CheckResult::pass(
            "promoted",
            "consistent, promoted, pg_is_in_recovery() = false",
            t.elapsed().as_secs_f64(),
        )
    });
    recovered_point(
        rep,
        target,
        pin.as_ref(),
        &r,
        replayed,
        cfg.verify.max_replay_lag_seconds,
    );
    let dbs = match checks::databases(at).await {
        Ok(d) => d,
        Err(e) => {
            rep.checks.push(CheckResult::fail("amcheck", e, 0.0));
            Vec::new()
        }
    };
    for db in &dbs {
        rep.checks.push(checks::amcheck(at, db).await);
    }
    for c in &cfg.verify.check {
        rep.checks.push(checks::pg_user_check(at, c).await);
    }
}

/// The newest point of `latest` when a verification starts: the last
/// segment reachable without a gap, and when it was archived.
#[derive(Debug, Clone)]
struct Pin {
    segment: String,
    archived: DateTime<Utc>,
    /// Archived WAL beyond a missing segment, which `latest` cannot reach.
    shortfall: Option<String>,
}

async fn pin_latest(repo: &Repository, cluster: &str) -> Result<Option<Pin>, String> {
    let catalog = crate::postgres::catalog::Catalog::load(repo, cluster)
        .await
        .map_err(|e| e.to_string())?;
    let plan = catalog
        .plan(None, true, crate::postgres::timeline::TimelineChoice::Auto)
        .map_err(|e| e.to_string())?;
    Ok(catalog
        .windows
        .iter()
        .find(|w| w.backup == plan.backup.id && w.timeline == plan.timeline)
        .map(|w| Pin {
            segment: w.last_segment.clone(),
            archived: w.to,
            shortfall: plan.gave_up.clone(),
        }))
}

/// The built-in target checks: the target was reached (for `latest`: the
/// WAL archived when the verification started was replayed without a gap)
/// and the last replayed transaction lies within `max_lag` seconds of the
/// target.
fn recovered_point(
    rep: &mut SourceReport,
    target: &Target,
    pin: Option<&Pin>,
    r: &restore::RestoreReport,
    replayed: Option<f64>,
    max_lag: u64,
) {
    let replayed =
        replayed.and_then(|s| DateTime::<Utc>::from_timestamp_millis((s * 1000.0) as i64));
    (rep.recovered_point, rep.recovered_basis) = match replayed {
        Some(t) => (
            Some(t),
            "last replayed transaction (pg_last_xact_replay_timestamp)".into(),
        ),
        None => (
            Some(r.backup_stop_time),
            "no transaction replayed after the backup: the backup's end".into(),
        ),
    };
    match (target, pin) {
        (Target::Time(t), _) => {
            rep.target_time = Some(*t);
            rep.target_basis = "requested target time".into();
            rep.checks.push(CheckResult::pass(
                "target reached",
                format!(
                    "recovery stopped at the target {} and promoted",
                    super::report::time(Some(*t))
                ),
                0.0,
            ));
        }
        (Target::Latest, Some(p)) => {
            rep.target_time = Some(p.archived);
            rep.target_basis = format!(
                "archive time of the newest WAL segment when verification started ({})",
                p.segment
            );
            let reached = r.wal_last_contiguous.as_deref() >= Some(p.segment.as_str());
            rep.checks.push(if let Some(gap) = &p.shortfall {
                // What was archived beyond the gap is the real target.
                if let Some((_, at)) = &r.wal_newest {
                    rep.target_time = Some(*at);
                    rep.target_basis = "archive time of the newest WAL segment".into();
                }
                CheckResult::fail(
                    "target reached",
                    format!("`latest` stops short: {gap} (`dr verify pg --list` names the gaps)"),
                    0.0,
                )
            } else if reached {
                CheckResult::pass(
                    "target reached",
                    format!("replayed the archived WAL through {}", p.segment),
                    0.0,
                )
            } else {
                CheckResult::fail(
                    "target reached",
                    format!(
                        "replay could only reach {} but {} was archived when verification \
                         started; the segments in between are missing in every region \
                         (`dr verify pg --list` names them)",
                        r.wal_last_contiguous.as_deref().unwrap_or("?"),
                        p.segment
                    ),
                    0.0,
                )
            });
        }
        (Target::Latest, None) => {
            let newest = r.wal_newest.clone();
            rep.target_time = newest.as_ref().map(|(_, at)| *at);
            rep.target_basis = match &newest {
                Some((seg, _)) => format!("archive time of the newest WAL segment ({seg})"),
                None => "no WAL archived after the backup".into(),
            };
            let reached = newest.as_ref().map(|(s, _)| s) == r.wal_last_contiguous.as_ref()
                || newest.is_none();
            rep.checks.push(if reached {
                CheckResult::pass(
                    "target reached",
                    format!(
                        "replayed all archived WAL (to {})",
                        r.wal_last_contiguous
                            .as_deref()
                            .unwrap_or("the backup's end")
                    ),
                    0.0,
                )
            } else {
                CheckResult::fail(
                    "target reached",
                    format!(
                        "archived WAL has a gap: replay could only reach {} but {} was archived; \
                         the segments in between are missing in every region \
                         (`dr verify pg --list` names them)",
                        r.wal_last_contiguous.as_deref().unwrap_or("?"),
                        newest.map(|(s, _)| s).unwrap_or_default()
                    ),
                    0.0,
                )
            });
        }
    }
    rep.set_rpo();
    let name = "recovered point";
    rep.checks.push(match rep.rpo_seconds {
        Some(rpo) if rpo < -1.0 => CheckResult::fail(
            name,
            format!(
                "last replayed transaction {} is {:.1}s after the target",
                super::report::time(rep.recovered_point),
                -rpo
            ),
            0.0,
        ),
        Some(rpo) if rpo > max_lag as f64 => CheckResult::fail(
            name,
            format!(
                "{} is {rpo:.1}s before the target, more than max_replay_lag_seconds = {max_lag}; \
                 WAL is missing or archiving lags (raise the bound for a quiet database)",
                super::report::time(rep.recovered_point)
            ),
            0.0,
        ),
        Some(rpo) => CheckResult::pass(
            name,
            format!(
                "{} ({rpo:.1}s before the target, bound {max_lag}s)",
                super::report::time(rep.recovered_point)
            ),
            0.0,
        ),
        None => CheckResult::pass(name, "no target time to compare with", 0.0),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_servers_cannot_reach_outside() {
        let root = Path::new("/s");
        let s = isolation_settings(root, &root.join("data"), &root.join("socket"), 5999);
        for must in [
            "archive_mode=off",
            "archive_command=",
            "archive_library=",
            "primary_conninfo=",
            "primary_slot_name=",
            "synchronous_standby_names=",
            "recovery_end_command=",
            "archive_cleanup_command=",
            "external_pid_file=",
            "listen_addresses=127.0.0.1",
            "unix_socket_directories=\"/s/socket\"",
            "hba_file=/s/pg_hba.conf",
            "data_directory=/s/data",
            "port=5999",
        ] {
            assert!(s.iter().any(|x| x == must), "{must} missing from {s:?}");
        }
        // Recovery refuses to run with these below the primary's values.
        assert!(!s.iter().any(|x| x.starts_with("max_wal_senders")));
        assert!(SCRATCH_HBA.lines().all(|l| !l.contains("0.0.0.0")));
    }
}
