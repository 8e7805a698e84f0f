//! The jobs the daemon runs: what each kind calls in the library, which
//! failures are worth retrying, and the retry loop with backoff and jitter.
//!
//! A new kind is a [`JobKind`] variant, a row in [`JobKind::from_schedule`]
//! and an arm in [`run_once`].

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, DaemonConfig};
use crate::postgres::PgError;
use crate::progress::Progress;
use crate::redis::RedisError;
use crate::repo::{RepoError, Repository};
use crate::schedule::Cron;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobKind {
    /// PostgreSQL base backup (`dr backup pg`).
    PgBackup,
    /// Redis snapshot (`dr backup redis`).
    RedisSnapshot,
    /// RabbitMQ definitions snapshot (`dr backup rabbitmq`).
    RabbitSnapshot,
    /// Scheduled scratch-restore verification of a PostgreSQL cluster.
    PgVerify,
    /// Retention (`dr expire`).
    Expire,
    /// Region catch-up (`dr repo sync`): copies what a region missed while
    /// it was down.
    RepoSync,
}

impl JobKind {
    /// The kind for a `section` / `key` of the config's schedules.
    fn from_schedule(section: &str, key: &str) -> Option<JobKind> {
        match (section, key) {
            ("postgres", "backup") => Some(JobKind::PgBackup),
            ("postgres", "verify") => Some(JobKind::PgVerify),
            ("redis", "snapshot") => Some(JobKind::RedisSnapshot),
            ("rabbitmq", "snapshot") => Some(JobKind::RabbitSnapshot),
            ("retention", "schedule") => Some(JobKind::Expire),
            ("sync", "schedule") => Some(JobKind::RepoSync),
            _ => None,
        }
    }

    /// Short name used in job names, logs and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            JobKind::PgBackup => "backup",
            JobKind::RedisSnapshot | JobKind::RabbitSnapshot => "snapshot",
            JobKind::PgVerify => "verify",
            JobKind::Expire => "expire",
            JobKind::RepoSync => "sync",
        }
    }
}

/// One scheduled job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// Unique name, e.g. `postgres.main.backup` or `retention.expire`.
    pub name: String,
    /// What it does.
    pub kind: JobKind,
    /// Cluster or instance name (empty for repository-wide jobs).
    pub source: String,
    /// When it runs (UTC).
    pub cron: Cron,
}

/// Reads the jobs a config schedules. A schedule for a kind this build
/// cannot run is an error naming the key, not a job that never runs.
pub fn plan(cfg: &Config) -> Result<Vec<JobSpec>, ConfigError> {
    let mut jobs = Vec::new();
    for e in cfg.schedules() {
        let at = || cfg.location_of(e.expr.span());
        let Some(kind) = JobKind::from_schedule(e.section, e.key) else {
            continue;
        };
        let cron = Cron::parse(e.expr.get_ref()).map_err(|why| ConfigError {
            location: at(),
            message: format!("{} {}: {why}", e.table(), e.key),
        })?;
        let name = match e.source.as_str() {
            "" => format!("{}.{}", e.section, kind.label()),
            s => format!("{}.{s}.{}", e.section, kind.label()),
        };
        jobs.push(JobSpec {
            name,
            kind,
            source: e.source,
            cron,
        });
    }
    Ok(jobs)
}

/// A failed run.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// PostgreSQL or its backup failed.
    #[error(transparent)]
    Pg(#[from] PgError),
    /// Redis or its snapshot failed.
    #[error(transparent)]
    Redis(#[from] RedisError),
    /// RabbitMQ or its snapshot failed.
    #[error(transparent)]
    Rabbit(#[from] crate::rabbitmq::RabbitError),
    /// The repository could not be opened.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The source is not (or no longer) in the config.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A verification ran and found problems, or an expiry could not delete
    /// everything it planned to.
    #[error("{0}")]
    Failed(String),
}

impl JobError {
    /// True when the same run may succeed if tried again shortly.
    pub fn is_transient(&self) -> bool {
        match self {
            JobError::Pg(e) => e.is_transient(),
            JobError::Redis(e) => e.is_transient(),
            JobError::Rabbit(e) => e.is_transient(),
            JobError::Repo(e) => e.is_transient(),
            JobError::Config(_) | JobError::Failed(_) => false,
        }
    }
}

/// What a successful run produced.
#[derive(Debug, Clone, Default)]
pub struct JobOutcome {
    /// Id of the backup or snapshot written.
    pub id: String,
    /// Plaintext bytes read from the source.
    pub bytes: u64,
    /// Every region of the repository.
    pub regions: Vec<String>,
    /// Regions that missed writes in this run, with the reason.
    pub degraded: Vec<(String, String)>,
    /// Recovery time of a verified restore, for verify jobs.
    pub rto_seconds: Option<f64>,
    /// Recovery point of a verified restore (target minus recovered point).
    pub rpo_seconds: Option<f64>,
}

/// Runs `job` once with the library functions the CLI uses. `abort` is
/// cancelled when the daemon gives up on running jobs; verification uses it
/// to stop its scratch server and remove its directory before returning.
pub async fn run_once(
    cfg: &Config,
    job: &JobSpec,
    abort: &CancellationToken,
) -> Result<JobOutcome, JobError> {
    match job.kind {
        JobKind::PgBackup => {
            let (cluster, pg) = cfg.pg(Some(&job.source))?;
            let repo = Repository::open(cfg).await?;
            let r = crate::postgres::backup::backup(&repo, &cluster, pg, false, Progress::new())
                .await?;
            Ok(outcome(&repo, r.id, r.size))
        }
        JobKind::RedisSnapshot => {
            let (instance, rc) = cfg.redis(Some(&job.source))?;
            let repo = Repository::open(cfg).await?;
            let r = crate::redis::snapshot::snapshot(&repo, &instance, rc, Progress::new()).await?;
            Ok(outcome(&repo, r.id, r.size))
        }
        JobKind::RabbitSnapshot => {
            let (broker, rc) = cfg.rabbitmq(Some(&job.source))?;
            let repo = Repository::open(cfg).await?;
            let r = crate::rabbitmq::snapshot::snapshot(&repo, &broker, rc).await?;
            Ok(outcome(&repo, r.id, r.size))
        }
        JobKind::PgVerify => verify_job(cfg, job, abort).await,
        JobKind::RepoSync => sync_job(cfg).await,
        JobKind::Expire => {
            let (repo, run) = send_boxed(crate::maintenance::expire::run(
                cfg,
                chrono::Utc::now(),
                "daemon",
            ))
            .await
            .map_err(|e| match e {
                crate::maintenance::expire::ExpireError::Plan(e) => JobError::Repo(e),
                e => JobError::Failed(e.to_string()),
            })?;
            for (k, why) in run.expire.iter().flat_map(|r| &r.locked) {
                tracing::info!(job = %job.name, key = %k, "kept: {why}");
            }
            if !run.ok() {
                let failed: Vec<String> = run
                    .expire
                    .iter()
                    .flat_map(|r| r.failed.iter().map(|(k, e)| format!("{k}: {e}")))
                    .chain(
                        run.temp_failed
                            .iter()
                            .map(|(f, e)| format!("[{}] .tmp/{}: {e}", f.region, f.name)),
                    )
                    .collect();
                return Err(JobError::Failed(failed.join("; ")));
            }
            Ok(outcome(&repo, format!("{} deleted", run.deleted()), 0))
        }
    }
}

/// A scheduled `dr repo sync` of every region.
async fn sync_job(cfg: &Config) -> Result<JobOutcome, JobError> {
    let repo = Repository::open(cfg).await?;
    // Authoritative sizes from the manifests when the identity is here.
    let expected =
        crate::maintenance::sync::manifests(&repo, &crate::maintenance::verify::Sources::of(cfg))
            .await?;
    let rep = crate::maintenance::sync::sync(&repo, None, expected.as_ref(), false).await?;
    let copied: u64 = rep.regions.iter().map(|r| r.copied + r.replaced).sum();
    let bytes: u64 = rep.regions.iter().map(|r| r.bytes).sum();
    if !rep.complete() {
        let why: Vec<String> = rep
            .regions
            .iter()
            .flat_map(|r| {
                r.unreachable
                    .iter()
                    .map(move |e| format!("{}: {e}", r.region))
                    .chain(r.failed.iter().map(move |f| format!("{}: {f}", r.region)))
            })
            .collect();
        return Err(JobError::Failed(format!(
            "{copied} object(s) copied, but regions are still incomplete: {}",
            why.join("; ")
        )));
    }
    Ok(outcome(&repo, format!("{copied} copied"), bytes))
}

/// A scheduled scratch-restore verification of one cluster.
async fn verify_job(
    cfg: &Config,
    job: &JobSpec,
    abort: &CancellationToken,
) -> Result<JobOutcome, JobError> {
    let (cluster, _) = cfg.pg(Some(&job.source))?;
    let repo = Repository::open(cfg).await?;
    let dr_command = crate::postgres::quote::current_dr_command(&cfg.source)
        .map_err(|e| JobError::Failed(e.to_string()))?;
    let sources = [crate::verify::Source::Pg(cluster)];
    let (run, warnings) = crate::verify::run(&repo, cfg, &sources, None, &dr_command, abort)
        .await
        .map_err(|e| JobError::Failed(e.to_string()))?;
    for w in warnings {
        tracing::warn!(job = %job.name, "{w}");
    }
    let rto = run
        .sources
        .iter()
        .filter_map(|s| s.rto_seconds)
        .reduce(f64::max);
    let rpo = run
        .sources
        .iter()
        .filter_map(|s| s.rpo_seconds)
        .reduce(f64::max);
    if !run.ok {
        let failed: Vec<String> = run
            .sources
            .iter()
            .flat_map(|s| {
                s.checks
                    .iter()
                    .filter(|c| !c.ok)
                    .map(|c| format!("{}: {}", c.name, c.detail))
            })
            .collect();
        return Err(JobError::Failed(format!(
            "verification {} failed: {}",
            run.id,
            failed.join("; ")
        )));
    }
    let bytes = run.sources.iter().map(|s| s.bytes).sum();
    let mut out = outcome(&repo, run.id, bytes);
    out.rto_seconds = rto;
    out.rpo_seconds = rpo;
    Ok(out)
}

/// Boxes a future as `Send` where its lifetimes are concrete; the compiler
/// cannot prove `Send` for some library futures (streams of borrowing
/// closures) through the spawned job's generic layers.
fn send_boxed<'a, T>(
    f: impl std::future::Future<Output = T> + Send + 'a,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>> {
    Box::pin(f)
}

fn outcome(repo: &Repository, id: String, bytes: u64) -> JobOutcome {
    JobOutcome {
        id,
        bytes,
        regions: repo.regions.iter().map(|r| r.name.clone()).collect(),
        degraded: repo.regions.degraded(),
        rto_seconds: None,
        rpo_seconds: None,
    }
}

/// How failed attempts are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub retries: u32,
    /// Delay before the first retry.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl From<&DaemonConfig> for RetryPolicy {
    fn from(d: &DaemonConfig) -> Self {
        RetryPolicy {
            retries: d.retries,
            initial: Duration::from_secs(d.retry_initial_seconds),
            max: Duration::from_secs(d.retry_max_seconds),
        }
    }
}

impl RetryPolicy {
    /// Delay before retry number `n` (0-based): exponential, capped, with
    /// "equal jitter" (half fixed, half random) so that jobs failing together
    /// do not retry together.
    pub fn delay(&self, n: u32) -> Duration {
        let exp = self
            .initial
            .saturating_mul(2u32.saturating_pow(n.min(20)))
            .min(self.max);
        let half = exp / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// Runs `op` until it succeeds, fails permanently, runs out of retries, or
/// `stop` is cancelled (no new attempt starts during shutdown).
/// `on_retry(attempt, error, delay)` is called before each wait.
pub async fn retry<T, E, F, Fut>(
    policy: &RetryPolicy,
    stop: &CancellationToken,
    is_transient: impl Fn(&E) -> bool,
    mut on_retry: impl FnMut(u32, &E, Duration),
    mut op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut n = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if n < policy.retries && is_transient(&e) && !stop.is_cancelled() => {
                let delay = policy.delay(n);
                on_retry(n + 1, &e, delay);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return Err(e),
                }
                n += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const RCPT: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

    fn cfg(extra: &str) -> Result<Config, ConfigError> {
        crate::validate::parse(
            &format!(
                "[repository]\nrecipients = [\"{RCPT}\"]\n[[region]]\nname = \"a\"\ntype = \"fs\"\npath = \"/x\"\n{extra}"
            ),
            Path::new("dr.toml"),
        )
    }

    #[test]
    fn schedules_become_jobs() {
        let c = cfg("[postgres.main]\nconninfo = \"host=127.0.0.1\"\ndata_dir = \"/d\"\n[postgres.main.schedule]\nbackup = \"0 2 * * *\"\n[redis.cache]\nurl = \"redis://127.0.0.1:6379\"\n[redis.cache.schedule]\nsnapshot = \"*/10 * * * * *\"\n").expect("config");
        let jobs = plan(&c).expect("plan");
        let names: Vec<_> = jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(names, ["postgres.main.backup", "redis.cache.snapshot"]);
        assert_eq!(jobs[1].kind, JobKind::RedisSnapshot);
        assert_eq!(jobs[1].source, "cache");
        let c = cfg("[rabbitmq.events]\nurl = \"https://mq.internal:15671\"\nuser = \"dr\"\npassword_env = \"P\"\n[rabbitmq.events.schedule]\nsnapshot = \"0 * * * *\"\n").expect("config");
        let jobs = plan(&c).expect("plan");
        assert_eq!(jobs[0].name, "rabbitmq.events.snapshot");
        assert_eq!(jobs[0].kind, JobKind::RabbitSnapshot);
    }

    #[test]
    fn verify_and_expire_schedules_become_jobs() {
        let c = cfg("[postgres.main]\nconninfo = \"host=127.0.0.1\"\ndata_dir = \"/d\"\n[postgres.main.schedule]\nverify = \"30 3 * * 0\"\n[retention]\nschedule = \"0 4 * * *\"\n").expect("config");
        let jobs = plan(&c).expect("plan");
        let kinds: Vec<_> = jobs.iter().map(|j| (j.name.as_str(), j.kind)).collect();
        assert_eq!(
            kinds,
            [
                ("postgres.main.verify", JobKind::PgVerify),
                ("retention.expire", JobKind::Expire)
            ]
        );
    }

    #[test]
    fn bad_schedule_is_a_config_error_with_line() {
        let e = cfg("[redis.cache]\nurl = \"redis://127.0.0.1:6379\"\n[redis.cache.schedule]\nsnapshot = \"every hour\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("dr.toml:10:"), "{e}");
        assert!(e.contains("[redis.cache.schedule] snapshot"), "{e}");
        let e = cfg("[daemon]\nmax_concurrent_jobs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_concurrent_jobs = 0"), "{e}");
        let e = cfg("[daemon]\nlisten = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("127.0.0.1:8597"), "{e}");
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let p = RetryPolicy {
            retries: 5,
            initial: Duration::from_secs(10),
            max: Duration::from_secs(60),
        };
        for _ in 0..50 {
            let d0 = p.delay(0);
            assert!(d0 >= Duration::from_secs(5) && d0 <= Duration::from_secs(10));
            let d2 = p.delay(2);
            assert!(d2 >= Duration::from_secs(20) && d2 <= Duration::from_secs(40));
            assert!(p.delay(30) <= Duration::from_secs(60));
        }
    }

    #[tokio::test]
    async fn retry_stops_on_permanent_errors_and_after_the_budget() {
        let p = RetryPolicy {
            retries: 2,
            initial: Duration::from_millis(2),
            max: Duration::from_millis(4),
        };
        let stop = CancellationToken::new();
        let mut calls = 0;
        let r: Result<(), &str> = retry(
            &p,
            &stop,
            |_| true,
            |_, _, _| {},
            || {
                calls += 1;
                async { Err("transient") }
            },
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 3);
        let mut calls = 0;
        let r: Result<(), &str> = retry(
            &p,
            &stop,
            |_| false,
            |_, _, _| {},
            || {
                calls += 1;
                async { Err("permanent") }
            },
        )
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1);
        let mut calls = 0;
        let r = retry(
            &p,
            &stop,
            |_: &&str| true,
            |_, _, _| {},
            || {
                calls += 1;
                let ok = calls == 2;
                async move { if ok { Ok(calls) } else { Err("once") } }
            },
        )
        .await;
        assert_eq!(r, Ok(2));
    }
}
