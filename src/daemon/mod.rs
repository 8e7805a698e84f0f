//! `dr daemon`: runs backups and snapshots on cron schedules (UTC), serves
//! `/metrics` and `/healthz`, reloads its config on SIGHUP and stops
//! gracefully on SIGTERM/SIGINT.
//!
//! Each concern is one supervised loop with a cancellation token: the
//! scheduler, the probes (WAL archive lag, region reachability) and the HTTP
//! endpoint. One daemon runs per state directory, enforced by an OS file lock.

pub mod fleet;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod probe;
pub mod scheduler;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError};
use metrics::Shared;
use scheduler::{Ctx, Plan};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config is invalid or schedules something this build cannot run.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Another daemon holds the lock.
    #[error(
        "another dr daemon is already running with {path} ({holder}); stop it first \
         (e.g. `systemctl stop dr`), or give this config its own [daemon] state_dir"
    )]
    AlreadyRunning {
        /// The lock file.
        path: String,
        /// What the lock file says about its holder.
        holder: String,
    },
    /// The lock file cannot be created or locked.
    #[error(
        "cannot lock {path}: {source}; create the directory and make it writable for this user, \
         or set [daemon] state_dir"
    )]
    Lock {
        /// The lock file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The metrics address cannot be bound.
    #[error("cannot listen on {addr}: {source}; set [daemon] listen to a free address")]
    Listen {
        /// The address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// `[ha]` is configured but this daemon does not know which member it is.
    #[error(
        "[ha] is configured but this daemon is no member: pass --member NAME (or set DR_HA_MEMBER, \
         or [ha] member) naming one of: {0}"
    )]
    NoMember(String),
}

/// What one daemon sets on its command line over the shared config, so
/// several daemons (a fleet, or HA members on one host) can share one file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Its `[ha]` member (over `[ha] member`).
    pub member: Option<String>,
    /// Its metrics address (over `[daemon] listen`).
    pub listen: Option<String>,
    /// Its state directory (over `[daemon] state_dir`).
    pub state_dir: Option<std::path::PathBuf>,
}

impl Overrides {
    fn apply(&self, cfg: &mut Config) {
        if self.listen.is_none() && self.state_dir.is_none() {
            return;
        }
        let mut d = cfg.daemon();
        if let Some(l) = &self.listen {
            d.listen = l.clone();
        }
        if let Some(s) = &self.state_dir {
            d.state_dir = s.clone();
        }
        let span = cfg.daemon.as_ref().map(|d| d.span()).unwrap_or(0..0);
        cfg.daemon = Some(toml::Spanned::new(span, d));
    }
}

/// Loads `path` and the jobs it schedules.
pub fn load_plan(path: &Path) -> Result<Plan, ConfigError> {
    load_plan_with(path, &Overrides::default())
}

/// Loads `path` with this daemon's `overrides`, and the jobs it schedules.
pub fn load_plan_with(path: &Path, overrides: &Overrides) -> Result<Plan, ConfigError> {
    let mut cfg = crate::validate::load(path)?;
    overrides.apply(&mut cfg);
    let jobs = jobs::plan(&cfg)?;
    Ok(Plan {
        cfg: Arc::new(cfg),
        jobs,
    })
}

/// Takes the exclusive lock `<state_dir>/daemon.lock` (released when the
/// returned value drops, or the process dies), or says who holds it.
pub fn lock(state_dir: &Path, config: &Path) -> Result<crate::lockfile::HeldLock, DaemonError> {
    use crate::lockfile::LockFailure;
    let path = state_dir.join("daemon.lock");
    let config = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
    let note = format!("pid {} config {}\n", std::process::id(), config.display());
    crate::lockfile::try_lock(&path, &note).map_err(|e| match e {
        LockFailure::Busy(holder) => DaemonError::AlreadyRunning {
            path: path.display().to_string(),
            holder,
        },
        LockFailure::Io(source) => DaemonError::Lock {
            path: path.display().to_string(),
            source,
        },
    })
}

/// Restarts `make`'s loop if it panics, until `stop` is cancelled; a bug in
/// one concern must not silently end scheduling or metrics.
fn supervise<F, Fut>(
    name: &'static str,
    stop: CancellationToken,
    mut make: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match tokio::spawn(make()).await {
                Ok(()) => return,
                Err(_) if stop.is_cancelled() => return,
                Err(e) => {
                    tracing::error!(task = name, "loop crashed ({e}); restarting it in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    })
}

/// The member this daemon is in `[ha]`: `cli` (from `--member`) or
/// `[ha] member`, which must name a configured member; `None` without `[ha]`.
pub fn ha_member(cfg: &Config, cli: Option<&str>) -> Result<Option<String>, DaemonError> {
    let Some(ha) = cfg
        .ha()
        .filter(|h| !h.postgres.is_empty() || !h.redis.is_empty())
    else {
        return Ok(None);
    };
    let names = ha.member_names();
    match ha.member_name(cli) {
        Some(m) if names.iter().any(|n| n == m) => Ok(Some(m.to_string())),
        _ => Err(DaemonError::NoMember(names.join(", "))),
    }
}

/// Runs the daemon for the config at `path` until SIGTERM or SIGINT; with
/// `[ha]`, also the automatic-failover loop of member `member`.
pub async fn run(path: &Path, overrides: &Overrides) -> Result<(), DaemonError> {
    let member = overrides.member.as_deref();
    let plan = load_plan_with(path, overrides)?;
    let ha_member = ha_member(&plan.cfg, member)?;
    let settings = plan.cfg.daemon();
    let _lock = lock(&settings.state_dir, path)?;
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: settings.listen.clone(),
            source,
        })?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;

    let state = Arc::new(Shared::new(settings.unhealthy_after_failures));
    state.set_jobs(&plan.jobs);
    announce(&plan, &settings.listen);
    // The fleet lease outlives `stop`: running jobs keep their claims
    // through the shutdown grace period.
    let fleet_stop = CancellationToken::new();
    let ctx = Arc::new(Ctx {
        fleet: fleet::join(&plan.cfg, member, fleet_stop.clone()),
        state: state.clone(),
        slots: Arc::new(Semaphore::new(settings.max_concurrent_jobs)),
        stop: CancellationToken::new(),
        abort: CancellationToken::new(),
        tracker: TaskTracker::new(),
    });
    let (plan_tx, plan_rx) = watch::channel(Arc::new(plan));

    let loops = [
        supervise("scheduler", ctx.stop.clone(), {
            let (ctx, rx) = (ctx.clone(), plan_rx.clone());
            move || scheduler::run(ctx.clone(), rx.clone())
        }),
        supervise("probe", ctx.stop.clone(), {
            let (state, rx, stop) = (state.clone(), plan_rx.clone(), ctx.stop.clone());
            move || probe_loop(state.clone(), rx.clone(), stop.clone())
        }),
    ];
    spawn_streamers(plan_rx.clone(), &ctx);
    // Automatic failover runs with the config the daemon started with: a
    // reload must not change who the members are under a running loop.
    let ha_task = ha_member.map(|member| {
        let (cfg, stop) = (plan_rx.borrow().cfg.clone(), ctx.stop.clone());
        let stats = state.with(|s| s.ha.clone());
        supervise("ha", stop.clone(), move || {
            let (cfg, member, stop) = (cfg.clone(), member.clone(), stop.clone());
            let stats = stats.clone();
            async move {
                if let Err(e) = crate::ha::run(cfg, member, stats, stop).await {
                    tracing::error!("automatic failover stopped: {e}");
                }
            }
        })
    });
    let listener = Arc::new(tokio::sync::Mutex::new(Some(listener)));
    let http_task = supervise("http", ctx.stop.clone(), {
        let (state, stop, listen) = (state.clone(), ctx.stop.clone(), settings.listen.clone());
        move || {
            let (listener, state, stop) = (listener.clone(), state.clone(), stop.clone());
            let listen = listen.clone();
            async move {
                // The listener moves into the first run; after a crash the
                // socket is bound again.
                let l = listener.lock().await.take();
                let l = match l {
                    Some(l) => l,
                    None => match tokio::net::TcpListener::bind(&listen).await {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("cannot listen on {listen} again: {e}");
                            return;
                        }
                    },
                };
                http::serve(l, state, stop).await
            }
        }
    });

    let signal_name = loop {
        tokio::select! {
            _ = hup.recv() => reload(path, overrides, &plan_tx, &state),
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
        }
    };
    let grace = Duration::from_secs(plan_tx.borrow().cfg.daemon().grace_seconds);
    let running = ctx.tracker.len();
    tracing::info!(
        signal = signal_name,
        running,
        "stopping: no new jobs; running jobs get {}s to finish (a second SIGTERM or SIGINT aborts them now)",
        grace.as_secs()
    );
    state.with(|s| s.stopping = true);
    ctx.stop.cancel();
    ctx.tracker.close();
    // An operator who signals twice wants the daemon gone now, not after
    // the grace period (as with most service managers and shells).
    let finished = tokio::select! {
        r = tokio::time::timeout(grace, ctx.tracker.wait()) => r.is_ok(),
        s = async {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        } => {
            tracing::warn!(signal = s, "second signal: not waiting for the grace period");
            false
        }
    };
    if !finished {
        tracing::warn!(
            "aborting {} running job(s) (grace period {}s over or cut short)",
            ctx.tracker.len(),
            grace.as_secs()
        );
        ctx.abort.cancel();
        if tokio::time::timeout(Duration::from_secs(10), ctx.tracker.wait())
            .await
            .is_err()
        {
            tracing::error!("jobs did not stop within 10s of being aborted; exiting anyway");
        }
    }
    fleet_stop.cancel();
    for l in loops {
        let _ = l.await;
    }
    if let Some(t) = ha_task {
        let _ = t.await;
    }
    let _ = http_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Runs a WAL streamer for every `wal = "stream"` cluster, and on each
/// config reload starts new ones, stops removed ones and restarts those whose
/// cluster, repository or regions changed (the old one drains and releases
/// the slot first). Streamers reconnect on their own.
fn spawn_streamers(plans: watch::Receiver<Arc<Plan>>, ctx: &Arc<Ctx>) {
    let ctx2 = ctx.clone();
    ctx.tracker.spawn(async move {
        let ctx = ctx2;
        let mut plans = plans;
        let mut running: HashMap<String, (StreamerSettings, CancellationToken, JoinHandle<()>)> =
            HashMap::new();
        loop {
            let cfg = plans.borrow_and_update().cfg.clone();
            let wanted: HashMap<String, StreamerSettings> = cfg
                .streaming_clusters()
                .into_iter()
                .filter_map(|n| {
                    let s = StreamerSettings::of(&cfg, &n)?;
                    Some((n, s))
                })
                .collect();
            let stale: Vec<String> = running
                .iter()
                .filter(|(n, (fp, _, _))| wanted.get(*n) != Some(fp))
                .map(|(n, _)| n.clone())
                .collect();
            for name in stale {
                if let Some((_, token, handle)) = running.remove(&name) {
                    tracing::info!(cluster = %name, "config changed: stopping the WAL streamer");
                    token.cancel();
                    let _ = handle.await;
                    if !wanted.contains_key(&name) {
                        ctx.state.with(|s| {
                            s.streams.remove(&name);
                        });
                    }
                }
            }
            for (name, fp) in wanted {
                if running.contains_key(&name) {
                    continue;
                }
                let token = ctx.stop.child_token();
                let handle = ctx.tracker.spawn(run_streamer(
                    cfg.clone(),
                    name.clone(),
                    ctx.clone(),
                    token.clone(),
                ));
                running.insert(name, (fp, token, handle));
            }
            tokio::select! {
                changed = plans.changed() => if changed.is_err() { break },
                _ = ctx.stop.cancelled() => break,
            }
        }
        for (_, (_, _, handle)) in running {
            let _ = handle.await;
        }
    });
}

/// Everything a running WAL streamer was started with; a reload that changes
/// any of it restarts the streamer.
#[derive(Debug, PartialEq)]
struct StreamerSettings {
    /// The cluster's section (derived `Debug`, so every field counts).
    postgres: String,
    /// `[repository]` (keys, compression, min_regions).
    repository: String,
    /// The resolved regions (backend, bucket, endpoint, path, prefix,
    /// credentials), compared as values: `RegionConfig`'s `Debug` shows only
    /// names and types, so a moved region went unnoticed.
    regions: Vec<crate::config::RegionSpec>,
}

impl StreamerSettings {
    fn of(cfg: &Config, cluster: &str) -> Option<StreamerSettings> {
        let pg = cfg.postgres.get(cluster)?.get_ref();
        Some(StreamerSettings {
            postgres: format!("{pg:?}"),
            repository: format!("{:?}", cfg.repository),
            regions: cfg.region_specs.clone(),
        })
    }
}

/// One cluster's streamer until `stop`; in a fleet, on one daemon at a time.
async fn run_streamer(cfg: Arc<Config>, name: String, ctx: Arc<Ctx>, stop: CancellationToken) {
    let retry = cfg.ha().map(|h| h.loop_wait).unwrap_or_default();
    let job = format!("postgres.{name}.wal-stream");
    fleet::singleton(ctx.fleet.as_ref(), &job, retry, &stop, |run| {
        stream_wal(cfg.clone(), name.clone(), ctx.state.clone(), run)
    })
    .await;
}

/// Streams one cluster's WAL until `stop`.
async fn stream_wal(cfg: Arc<Config>, name: String, state: Arc<Shared>, stop: CancellationToken) {
    let Some(pg) = cfg.postgres.get(&name).map(|p| p.get_ref().clone()) else {
        return;
    };
    state.with(|s| {
        s.streams.entry(name.clone()).or_default();
    });
    let repo = loop {
        match crate::repo::Repository::open(&cfg).await {
            Ok(r) => break r,
            Err(e) => {
                tracing::error!(cluster = %name, error = %e, "WAL streamer cannot open the repository; retrying in 10s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    };
    tracing::info!(cluster = %name, "WAL streamer started");
    crate::postgres::stream::supervise(&repo, &name, &pg, &stop, |e| {
        tracing::error!(cluster = %name, error = %e, "WAL streaming failed; reconnecting");
        state.with(|s| {
            let st = s.streams.entry(name.clone()).or_default();
            st.failures += 1;
            st.last_error = Some(e.to_string());
        });
    })
    .await;
    tracing::info!(cluster = %name, "WAL streamer stopped");
}

/// Logs what will run and when; schedules are UTC, said once so nobody
/// has to guess.
fn announce(plan: &Plan, listen: &str) {
    let now = chrono::Utc::now();
    tracing::info!(
        listen,
        jobs = plan.jobs.len(),
        "dr daemon started; schedules are in UTC (now {})",
        now.format("%Y-%m-%dT%H:%M:%SZ")
    );
    let streams = plan.cfg.streaming_clusters();
    for c in &streams {
        tracing::info!(cluster = %c, "WAL of [postgres.{c}] is streamed continuously");
    }
    if plan.jobs.is_empty() && streams.is_empty() {
        tracing::warn!(
            "no job is scheduled; add e.g. [postgres.<name>.schedule] backup = \"0 2 * * *\""
        );
    }
    for j in &plan.jobs {
        tracing::info!(
            job = %j.name,
            schedule = j.cron.expr(),
            next = %j.cron.next_after(now).map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_else(|| "never".into()),
            "scheduled (UTC)"
        );
    }
}

/// SIGHUP: apply the config on disk if it is valid, else keep the running one.
fn reload(path: &Path, overrides: &Overrides, plans: &watch::Sender<Arc<Plan>>, state: &Shared) {
    match load_plan_with(path, overrides) {
        Ok(plan) => {
            let old = plans.borrow().cfg.daemon();
            let new = plan.cfg.daemon();
            if old.listen != new.listen
                || old.state_dir != new.state_dir
                || old.max_concurrent_jobs != new.max_concurrent_jobs
            {
                tracing::warn!(
                    "[daemon] listen, state_dir and max_concurrent_jobs take effect at the next restart"
                );
            }
            state.set_jobs(&plan.jobs);
            state.with(|s| {
                s.reloads.0 += 1;
                s.reload_error = None;
                s.unhealthy_after = new.unhealthy_after_failures;
            });
            announce(&plan, &old.listen);
            tracing::info!(jobs = plan.jobs.len(), "config reloaded");
            let _ = plans.send(Arc::new(plan));
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                "config reload rejected; the previous config and schedules stay in effect"
            );
            state.with(|s| {
                s.reloads.1 += 1;
                s.reload_error = Some(e.to_string());
            });
        }
    }
}

async fn probe_loop(
    state: Arc<Shared>,
    plans: watch::Receiver<Arc<Plan>>,
    stop: CancellationToken,
) {
    // The repository's catalogs are read when a job finished since the last
    // read (a backup, an expiry, a verification changed them), when the
    // config changed, and otherwise every CATALOG_EVERY.
    const CATALOG_EVERY: Duration = Duration::from_secs(300);
    let mut catalog_seen: Option<(u64, usize, std::time::Instant)> = None;
    let mut audit = probe::AuditTail::default();
    loop {
        let cfg = plans.borrow().cfg.clone();
        tokio::select! {
            _ = probe::probe_all(&cfg, &state) => {}
            _ = stop.cancelled() => return,
        }
        audit.poll(crate::audit::AuditLog::from_config(&cfg).path(), &state);
        let runs = state.with(|s| s.finished_runs);
        let cfg_id = Arc::as_ptr(&cfg) as usize;
        let due = catalog_seen
            .is_none_or(|(r, c, t)| r != runs || c != cfg_id || t.elapsed() >= CATALOG_EVERY);
        if due {
            tokio::select! {
                _ = probe::probe_catalogs(&cfg, &state) => {}
                _ = stop.cancelled() => return,
            }
            catalog_seen = Some((runs, cfg_id, std::time::Instant::now()));
        }
        let every = Duration::from_secs(cfg.daemon().probe_seconds);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}
