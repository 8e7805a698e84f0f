//! The fleet: daemons that share one config divide its scheduled jobs
//! through etcd, so one host is no longer a single point of failure for
//! backups (design.md §11).
//!
//! Keys under `<prefix>/fleet/`:
//! `nodes/<node>` (leased: a live daemon),
//! `jobs/<job>/run` (leased: the run going now, and who runs it),
//! `jobs/<job>/last` (the latest scheduled time claimed, and by whom).
//!
//! A run is claimed in one transaction that requires no `run` key and
//! `last` unchanged since it was read, so of several daemons exactly one
//! runs each scheduled time and a job never runs on two daemons at once.
//! The `run` key lives on its daemon's lease: when that daemon dies the key
//! is gone within `ttl`, and the next scheduled run goes to a live daemon.
//! A daemon that cannot renew its lease stops its runs before the lease can
//! expire ([`RunGuard::lost`]), so a run never outlives its key.
//!
//! Each job prefers one live daemon (jobs in name order dealt round the
//! nodes in name order, so they split evenly); the others wait `loop_wait`
//! and take the run only if the preferred daemon has not.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::HaError;
use super::dcs::Dcs;
use super::lease::keep_lease;
use crate::config::HaConfig;

/// The key space of the fleet under `[ha] prefix` (a reserved cluster name).
pub const FLEET: &str = "fleet";

/// Who runs a job now.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunRecord {
    node: String,
    scheduled: DateTime<Utc>,
    started: DateTime<Utc>,
}

/// The latest scheduled time claimed.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LastRecord {
    node: String,
    scheduled: DateTime<Utc>,
}

/// The outcome of [`Fleet::claim`].
#[derive(Debug)]
pub enum Claim {
    /// This daemon runs it; keep the guard for the whole run.
    Mine(Box<RunGuard>),
    /// Another daemon claimed this scheduled time (or a later one).
    Taken {
        /// That daemon.
        node: String,
    },
    /// The previous run is still going on `node`.
    Busy {
        /// That daemon.
        node: String,
    },
}

/// This daemon's membership of the fleet: its lease, renewed in the
/// background, and its node key.
#[derive(Debug, Clone)]
pub struct Fleet {
    node: String,
    /// Jobs this daemon runs now.
    active: Arc<Mutex<HashSet<String>>>,
    loop_wait: Duration,
    dcs: watch::Receiver<Option<Dcs>>,
    lease: watch::Receiver<Option<i64>>,
    deadline: watch::Receiver<Option<Instant>>,
}

/// What one read of a job's keys found.
struct JobView {
    nodes: Vec<String>,
    last: Option<(LastRecord, i64)>,
    run: Option<(RunRecord, i64)>,
}

impl Fleet {
    /// Joins the fleet as `node`: connects to etcd (retrying while it is
    /// down), then keeps a lease and the node key until `stop`. Returns at
    /// once; until connected, [`Fleet::claim`] fails.
    pub fn join(ha: &HaConfig, node: String, stop: CancellationToken) -> Fleet {
        let (dcs_tx, dcs) = watch::channel(None);
        let (lease_tx, lease) = watch::channel(None);
        let (deadline_tx, deadline) = watch::channel(None);
        let fleet = Fleet {
            node: node.clone(),
            active: Arc::default(),
            loop_wait: ha.loop_wait,
            dcs,
            lease: lease.clone(),
            deadline,
        };
        let ha = ha.clone();
        tokio::spawn(async move {
            let Some(dcs) = Dcs::connect_retrying(&ha, FLEET, &node, &stop).await else {
                return;
            };
            dcs_tx.send_replace(Some(dcs.clone()));
            tokio::spawn(keep_lease(
                dcs.clone(),
                ha.ttl,
                ha.loop_wait,
                lease_tx,
                deadline_tx,
                None,
                stop.clone(),
            ));
            register(dcs, node, lease, ha.loop_wait, stop).await;
        });
        fleet
    }

    /// This daemon's name in the fleet.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether this daemon holds a fleet lease now, so claims can be made.
    pub fn is_ready(&self) -> bool {
        self.connected().is_ok()
    }

    /// The connection and lease, while the lease is surely still held.
    fn connected(&self) -> Result<(Dcs, i64), HaError> {
        let not_yet = || {
            HaError::Etcd(
                "not run: this daemon holds no fleet lease in etcd, so it cannot make sure no \
                 other daemon runs the job; check that etcd ([ha] endpoints) is reachable"
                    .into(),
            )
        };
        let dcs = self.dcs.borrow().clone().ok_or_else(not_yet)?;
        let lease = (*self.lease.borrow()).ok_or_else(not_yet)?;
        match *self.deadline.borrow() {
            Some(d) if d > Instant::now() => Ok((dcs, lease)),
            _ => Err(not_yet()),
        }
    }

    /// Claims the run of `job` scheduled at `at`. `jobs` is every job of
    /// the config, which decides the daemon each job prefers.
    pub async fn claim(
        &self,
        job: &str,
        jobs: &[String],
        at: DateTime<Utc>,
    ) -> Result<Claim, HaError> {
        let mut waited = false;
        for _ in 0..4 {
            let (dcs, lease) = self.connected()?;
            let v = read(&dcs, job).await?;
            if let Some((l, _)) = &v.last
                && l.scheduled >= at
            {
                return Ok(Claim::Taken {
                    node: l.node.clone(),
                });
            }
            // A run key of this daemon's for a run no longer going here is
            // left over from a release that failed: it is taken over.
            if let Some((r, _)) = &v.run
                && (r.node != self.node || self.is_active(job))
            {
                return Ok(Claim::Busy {
                    node: r.node.clone(),
                });
            }
            if !waited && preferred(job, jobs, &v.nodes, &self.node) != self.node {
                waited = true;
                tokio::time::sleep(self.loop_wait).await;
                continue;
            }
            if let Some(guard) = self.try_take(&dcs, lease, job, at, &v).await? {
                return Ok(Claim::Mine(Box::new(guard)));
            }
            // Someone else changed the keys between the read and the
            // transaction: read again and say who.
            waited = true;
        }
        Err(HaError::Etcd(format!(
            "fleet: the keys of {job} kept changing while this daemon tried to claim its run; \
             not run"
        )))
    }

    fn is_active(&self, job: &str) -> bool {
        self.active.lock().is_ok_and(|a| a.contains(job))
    }

    async fn try_take(
        &self,
        dcs: &Dcs,
        lease: i64,
        job: &str,
        at: DateTime<Utc>,
        v: &JobView,
    ) -> Result<Option<RunGuard>, HaError> {
        let (run_key, last_key) = (job_key(dcs, job, "run"), job_key(dcs, job, "last"));
        let run = encode(
            "the run record",
            &RunRecord {
                node: self.node.clone(),
                scheduled: at,
                started: Utc::now(),
            },
        )?;
        let last = encode(
            "the claim record",
            &LastRecord {
                node: self.node.clone(),
                scheduled: at,
            },
        )?;
        let run_cmp = match &v.run {
            Some((_, rev)) => Compare::mod_revision(run_key.clone(), CompareOp::Equal, *rev),
            None => Compare::create_revision(run_key.clone(), CompareOp::Equal, 0),
        };
        let last_cmp = match &v.last {
            Some((_, rev)) => Compare::mod_revision(last_key.clone(), CompareOp::Equal, *rev),
            None => Compare::create_revision(last_key.clone(), CompareOp::Equal, 0),
        };
        let txn = Txn::new().when([run_cmp, last_cmp]).and_then([
            TxnOp::put(
                run_key.clone(),
                run,
                Some(PutOptions::new().with_lease(lease)),
            ),
            TxnOp::put(last_key, last, None),
        ]);
        let mut c = dcs.client();
        let r = dcs.bounded("claiming a job run", c.txn(txn)).await?;
        if !r.succeeded() {
            return Ok(None);
        }
        let rev = r.header().map(|h| h.revision()).unwrap_or_default();
        if let Ok(mut a) = self.active.lock() {
            a.insert(job.to_string());
        }
        Ok(Some(RunGuard::new(
            dcs.clone(),
            run_key,
            rev,
            (lease, self.lease.clone()),
            self.deadline.clone(),
            (self.active.clone(), job.to_string()),
        )))
    }
}

/// Keeps `nodes/<node>` on each lease the keeper takes.
async fn register(
    dcs: Dcs,
    node: String,
    mut lease: watch::Receiver<Option<i64>>,
    retry: Duration,
    stop: CancellationToken,
) {
    let key = dcs.key(&format!("nodes/{node}"));
    let body = serde_json::to_string(&NodeInfo {
        node: node.clone(),
        pid: std::process::id(),
        since: Utc::now(),
    })
    .unwrap_or_default();
    loop {
        let id = *lease.borrow_and_update();
        let mut ok = true;
        if let Some(id) = id {
            let mut c = dcs.client();
            let put = c.put(
                key.clone(),
                body.clone(),
                Some(PutOptions::new().with_lease(id)),
            );
            if let Err(e) = dcs.bounded("registering in the fleet", put).await {
                tracing::warn!("{e}");
                ok = false;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = lease.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(retry), if !ok => {}
        }
    }
}

fn job_key(dcs: &Dcs, job: &str, what: &str) -> String {
    dcs.key(&format!("jobs/{job}/{what}"))
}

/// Reads the live nodes and `job`'s keys.
async fn read(dcs: &Dcs, job: &str) -> Result<JobView, HaError> {
    let mut c = dcs.client();
    let nodes_prefix = dcs.key("nodes/");
    let r = dcs
        .bounded(
            "reading the fleet",
            c.get(
                nodes_prefix.clone(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ),
        )
        .await?;
    let nodes = r
        .kvs()
        .iter()
        .filter_map(|kv| kv.key_str().ok()?.strip_prefix(&nodes_prefix))
        .map(str::to_string)
        .collect();
    let prefix = job_key(dcs, job, "");
    let r = dcs
        .bounded(
            "reading a job's claim",
            c.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
    let mut v = JobView {
        nodes,
        last: None,
        run: None,
    };
    for kv in r.kvs() {
        // A value in a shape this version cannot read is treated as absent
        // for reading, but the transaction still compares its revision.
        match kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) {
            Some("last") => {
                let rec = serde_json::from_slice(kv.value()).unwrap_or(LastRecord {
                    node: "?".into(),
                    scheduled: DateTime::<Utc>::MIN_UTC,
                });
                v.last = Some((rec, kv.mod_revision()));
            }
            Some("run") => {
                let rec = serde_json::from_slice(kv.value()).unwrap_or(RunRecord {
                    node: "?".into(),
                    scheduled: DateTime::<Utc>::MIN_UTC,
                    started: DateTime::<Utc>::MIN_UTC,
                });
                v.run = Some((rec, kv.mod_revision()));
            }
            _ => {}
        }
    }
    Ok(v)
}

/// The node `job` prefers: the jobs in name order dealt round the live
/// nodes (and `me`) in name order. A job missing from `jobs` (another
/// config) goes to the first node.
pub fn preferred(job: &str, jobs: &[String], nodes: &[String], me: &str) -> String {
    let mut nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
    if !nodes.contains(&me) {
        nodes.push(me);
    }
    nodes.sort_unstable();
    nodes.dedup();
    let mut jobs: Vec<&str> = jobs.iter().map(String::as_str).collect();
    jobs.sort_unstable();
    let i = jobs.iter().position(|j| *j == job).unwrap_or(0);
    nodes[i % nodes.len()].to_string()
}

/// A claimed run: releases its key when done; says when the run must stop
/// because the lease that holds its key may be gone.
#[derive(Debug)]
pub struct RunGuard {
    dcs: Dcs,
    key: String,
    rev: i64,
    lost: CancellationToken,
    _watch: DropGuard,
    active: (Arc<Mutex<HashSet<String>>>, String),
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if let Ok(mut a) = self.active.0.lock() {
            a.remove(&self.active.1);
        }
    }
}

impl RunGuard {
    fn new(
        dcs: Dcs,
        key: String,
        rev: i64,
        (lease, mut leases): (i64, watch::Receiver<Option<i64>>),
        mut deadline: watch::Receiver<Option<Instant>>,
        active: (Arc<Mutex<HashSet<String>>>, String),
    ) -> RunGuard {
        let lost = CancellationToken::new();
        let done = CancellationToken::new();
        let (lost2, done2) = (lost.clone(), done.clone());
        tokio::spawn(async move {
            loop {
                if *leases.borrow_and_update() != Some(lease) {
                    lost2.cancel();
                    return;
                }
                let Some(d) = *deadline.borrow_and_update() else {
                    lost2.cancel();
                    return;
                };
                tokio::select! {
                    _ = done2.cancelled() => return,
                    _ = tokio::time::sleep_until(d.into()) => {
                        lost2.cancel();
                        return;
                    }
                    r = deadline.changed() => if r.is_err() { lost2.cancel(); return },
                    r = leases.changed() => if r.is_err() { lost2.cancel(); return },
                }
            }
        });
        RunGuard {
            dcs,
            key,
            rev,
            lost,
            _watch: done.drop_guard(),
            active,
        }
    }

    /// Cancelled when this daemon may have lost its lease (it could not
    /// renew it in time): the run must stop, since another daemon may take
    /// the job once the key expires.
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Deletes the run key, if it is still this run's. A failure is only
    /// logged: the key then expires with the lease, or this daemon's next
    /// claim takes it over.
    pub async fn release(&self) {
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                self.rev,
            )])
            .and_then([TxnOp::delete(self.key.clone(), None)]);
        let mut c = self.dcs.client();
        if let Err(e) = self.dcs.bounded("releasing a job run", c.txn(txn)).await {
            tracing::warn!("{e}");
        }
    }
}

fn encode<T: Serialize>(what: &str, r: &T) -> Result<Vec<u8>, HaError> {
    serde_json::to_vec(r).map_err(|e| HaError::Etcd(format!("encoding {what}: {e}")))
}

/// A live daemon of the fleet, as `dr ha fleet` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its name.
    pub node: String,
    /// Its process id on its host.
    pub pid: u32,
    /// When it joined.
    pub since: DateTime<Utc>,
}

/// One job's claims, as `dr ha fleet` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct JobInfo {
    /// Job name.
    pub job: String,
    /// The daemon running it now, its scheduled time and start.
    pub running: Option<(String, DateTime<Utc>, DateTime<Utc>)>,
    /// The daemon that claimed the latest scheduled time, and that time.
    pub last: Option<(String, DateTime<Utc>)>,
}

/// What etcd holds about the fleet: live daemons and each job's claims.
#[derive(Debug, Clone, Serialize)]
pub struct FleetView {
    /// Live daemons, by name.
    pub nodes: Vec<NodeInfo>,
    /// Jobs ever claimed, by name.
    pub jobs: Vec<JobInfo>,
}

/// Reads the fleet's keys in one request.
pub async fn view(ha: &HaConfig) -> Result<FleetView, HaError> {
    let dcs = Dcs::connect(ha, FLEET, ha.loop_wait.max(Duration::from_secs(5))).await?;
    let prefix = dcs.key("");
    let mut c = dcs.client();
    let r = dcs
        .bounded(
            "reading the fleet",
            c.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
    let mut v = FleetView {
        nodes: Vec::new(),
        jobs: Vec::new(),
    };
    let mut jobs: std::collections::BTreeMap<String, JobInfo> = Default::default();
    for kv in r.kvs() {
        let Some(k) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
            continue;
        };
        if k.starts_with("nodes/") {
            if let Ok(n) = serde_json::from_slice::<NodeInfo>(kv.value()) {
                v.nodes.push(n);
            }
            continue;
        }
        let Some((job, what)) = k.strip_prefix("jobs/").and_then(|j| j.rsplit_once('/')) else {
            continue;
        };
        let e = jobs.entry(job.to_string()).or_insert_with(|| JobInfo {
            job: job.to_string(),
            running: None,
            last: None,
        });
        match what {
            "run" => {
                if let Ok(r) = serde_json::from_slice::<RunRecord>(kv.value()) {
                    e.running = Some((r.node, r.scheduled, r.started));
                }
            }
            "last" => {
                if let Ok(l) = serde_json::from_slice::<LastRecord>(kv.value()) {
                    e.last = Some((l.node, l.scheduled));
                }
            }
            _ => {}
        }
    }
    v.nodes.sort_by(|a, b| a.node.cmp(&b.node));
    v.jobs = jobs.into_values().collect();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::preferred;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn jobs_are_dealt_evenly_and_every_node_agrees() {
        let jobs = s(&[
            "postgres.main.backup",
            "redis.cache.snapshot",
            "retention.expire",
        ]);
        let nodes = s(&["b", "a"]);
        let who: Vec<String> = jobs
            .iter()
            .map(|j| preferred(j, &jobs, &nodes, "a"))
            .collect();
        assert_eq!(who, s(&["a", "b", "a"]));
        // Node b computes the same, whatever order it read.
        let again: Vec<String> = jobs
            .iter()
            .map(|j| preferred(j, &jobs, &s(&["a", "b"]), "b"))
            .collect();
        assert_eq!(who, again);
        // A node not registered yet counts itself.
        assert_eq!(preferred("retention.expire", &jobs, &[], "z"), "z");
        // When b is gone, a prefers everything.
        assert!(
            jobs.iter()
                .all(|j| preferred(j, &jobs, &s(&["a"]), "a") == "a")
        );
    }
}
