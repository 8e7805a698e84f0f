//! The distributed configuration store: etcd keys of one cluster.
//!
//! `<prefix>/<cluster>/leader` (leased; the leader's name),
//! `<prefix>/<cluster>/members/<name>` (leased; [`MemberState`] as JSON),
//! `<prefix>/<cluster>/optime` (the last position the leader published),
//! `<prefix>/<cluster>/pause` and `<prefix>/<cluster>/switchover`. A Redis
//! group's keys are the same under `<prefix>/redis/<group>/`, with its own
//! member and optime shapes ([`ClusterView`] is generic over them).
//! Every call is bounded by a timeout, so a cut-off daemon notices in time
//! to fence its server.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::HaError;
use crate::config::HaConfig;
use crate::postgres::Lsn;

/// What a member's daemon last saw of its server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    /// Member name.
    pub name: String,
    /// `primary`, `standby` or `down`.
    pub role: String,
    /// Timeline of the server (0 when unknown).
    pub timeline: u32,
    /// Primary: flushed position; standby: last received.
    pub received_lsn: Option<Lsn>,
    /// Standby: last replayed position.
    pub replayed_lsn: Option<Lsn>,
    /// The server answered queries.
    pub healthy: bool,
    /// Primary only: `application_name`s of its synchronous standbys.
    #[serde(default)]
    pub sync_standbys: Vec<String>,
}

/// A published member state, known by its member's name.
pub trait Named {
    /// The member's name.
    fn name(&self) -> &str;
}

impl Named for MemberState {
    fn name(&self) -> &str {
        &self.name
    }
}

/// The position the leader last published, kept after its lease ends so
/// candidates can judge their lag against it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Optime {
    /// Who published it.
    pub leader: String,
    /// Flushed WAL position.
    pub lsn: Lsn,
    /// Its synchronous standbys then (member names = application names).
    #[serde(default)]
    pub sync_standbys: Vec<String>,
}

/// A planned handover requested by `dr ha switchover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switchover {
    /// The leader that hands over.
    pub from: String,
    /// The standby that takes over.
    pub to: String,
    /// When it was requested (Unix seconds), to drop a stale request.
    pub requested_at: i64,
    /// The old primary's final position, once it has stopped: the target
    /// takes over only after replaying past it.
    pub final_lsn: Option<Lsn>,
}

/// The leader key as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// Member name.
    pub name: String,
    /// Its lease.
    pub lease: i64,
}

/// One read of a cluster's keys: PostgreSQL's member states and positions
/// by default, another engine's with `M` and `O`.
#[derive(Debug, Clone)]
pub struct ClusterView<M = MemberState, O = Optime> {
    /// The leader key, if held.
    pub leader: Option<Leader>,
    /// Live members (their leases hold).
    pub members: Vec<M>,
    /// Last published leader position.
    pub optime: Option<O>,
    /// Automatic actions are paused.
    pub paused: bool,
    /// A pending planned switchover.
    pub switchover: Option<Switchover>,
}

impl<M, O> Default for ClusterView<M, O> {
    fn default() -> Self {
        ClusterView {
            leader: None,
            members: Vec::new(),
            optime: None,
            paused: false,
            switchover: None,
        }
    }
}

impl<M: Named, O> ClusterView<M, O> {
    /// The live state of member `name`.
    pub fn member(&self, name: &str) -> Option<&M> {
        self.members.iter().find(|m| m.name() == name)
    }
}

impl ClusterView {
    /// The newest position known of the leader: its live state, else the
    /// position it last published.
    pub fn leader_lsn(&self) -> Option<Lsn> {
        self.leader
            .as_ref()
            .and_then(|l| self.member(&l.name))
            .and_then(|m| m.received_lsn)
            .or(self.optime.as_ref().map(|o| o.lsn))
    }

    /// Bytes `received` is behind [`ClusterView::leader_lsn`].
    pub fn lag_bytes(&self, received: Option<Lsn>) -> Option<u64> {
        Some(self.leader_lsn()?.0.saturating_sub(received?.0))
    }

    /// The standby that should take over when nobody leads: healthy, within
    /// `max_lag` of the last published leader position, synchronous standbys
    /// first, then the most received WAL, then the name (so every member
    /// computes the same answer). `None` before any leader has published.
    pub fn best_candidate(&self, max_lag: u64) -> Option<&MemberState> {
        let optime = self.optime.as_ref()?;
        self.members
            .iter()
            .filter(|m| m.role == "standby" && m.healthy)
            .filter(|m| {
                m.received_lsn
                    .is_some_and(|r| optime.lsn.0.saturating_sub(r.0) <= max_lag)
            })
            .max_by(|a, b| {
                let sync = |m: &MemberState| optime.sync_standbys.contains(&m.name);
                (sync(a), a.received_lsn, std::cmp::Reverse(&a.name)).cmp(&(
                    sync(b),
                    b.received_lsn,
                    std::cmp::Reverse(&b.name),
                ))
            })
    }
}

/// A connection to etcd scoped to one cluster's keys.
#[derive(Clone)]
pub struct Dcs {
    client: Client,
    root: String,
    timeout: Duration,
}

impl std::fmt::Debug for Dcs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dcs").field("root", &self.root).finish()
    }
}

fn etcd(what: &str, e: impl std::fmt::Display) -> HaError {
    HaError::Etcd(format!("{what}: {e}"))
}

impl Dcs {
    /// Connects to the endpoints of `[ha]` for `cluster`. `timeout` bounds
    /// each request.
    pub async fn connect(ha: &HaConfig, cluster: &str, timeout: Duration) -> Result<Dcs, HaError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(timeout, timeout);
        if let Some(user) = &ha.user {
            let password = password(ha)?;
            opts = opts.with_user(user.clone(), password);
        }
        if let Some(ca) = &ha.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| HaError::Config(format!("[ha] ca_file {}: {e}", ca.display())))?;
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(pem));
            if let (Some(cert), Some(key)) = (&ha.cert_file, &ha.key_file) {
                let c = std::fs::read(cert).map_err(|e| {
                    HaError::Config(format!("[ha] cert_file {}: {e}", cert.display()))
                })?;
                let k = crate::http::read_secret_file(key)
                    .map_err(|e| HaError::Config(format!("[ha] key_file {e}")))?;
                tls = tls.identity(etcd_client::Identity::from_pem(c, k));
            }
            opts = opts.with_tls(tls);
        }
        let client = tokio::time::timeout(timeout, Client::connect(&ha.endpoints, Some(opts)))
            .await
            .map_err(|_| {
                HaError::Etcd(format!(
                    "no answer from etcd at {} within {timeout:?}",
                    ha.endpoints.join(", ")
                ))
            })?
            .map_err(|e| etcd(&format!("connecting to {}", ha.endpoints.join(", ")), e))?;
        Ok(Dcs {
            client,
            root: format!("{}/{cluster}", ha.prefix),
            timeout,
        })
    }

    /// Connects as [`Dcs::connect`] does, retrying every `loop_wait` while
    /// etcd is down (a daemon may start before it); `None` once `stop` fires.
    pub async fn connect_retrying(
        ha: &HaConfig,
        scope: &str,
        who: &str,
        stop: &CancellationToken,
    ) -> Option<Dcs> {
        loop {
            match Dcs::connect(ha, scope, ha.loop_wait).await {
                Ok(d) => return Some(d),
                Err(e) => {
                    tracing::warn!(member = who, "{e}; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(ha.loop_wait) => {}
                    }
                }
            }
        }
    }

    /// The full name of key `k` under this connection's root.
    pub(super) fn key(&self, k: &str) -> String {
        format!("{}/{k}", self.root)
    }

    /// The leader key's full name.
    pub fn leader_key(&self) -> String {
        self.key("leader")
    }

    /// A client for requests this type has no method for.
    pub(super) fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs `f`, bounded by the request timeout.
    pub(super) async fn bounded<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, HaError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(|e| etcd(what, e)),
            Err(_) => Err(HaError::Etcd(format!(
                "{what}: no answer from etcd within {:?}",
                self.timeout
            ))),
        }
    }

    /// Grants a lease of `ttl`.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, HaError> {
        let mut c = self.client.clone();
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let r = self
            .bounded("granting a lease", c.lease_grant(secs, None))
            .await?;
        Ok(r.id())
    }

    /// Renews `lease`: `Ok(false)` when it has already expired.
    pub async fn renew(&self, lease: i64) -> Result<bool, HaError> {
        let mut c = self.client.clone();
        let fut = async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(r)) => Ok(r.is_some_and(|r| r.ttl() > 0)),
            // An expired lease is an answer, not a failure: the caller
            // takes a new one.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => {
                Ok(false)
            }
            Ok(Err(e)) => Err(etcd("renewing the lease", e)),
            Err(_) => Err(HaError::Etcd(format!(
                "renewing the lease: no answer from etcd within {:?}",
                self.timeout
            ))),
        }
    }

    /// Seconds left on `lease` (`None` when it has expired).
    pub async fn lease_left(&self, lease: i64) -> Result<Option<i64>, HaError> {
        let mut c = self.client.clone();
        let r = self
            .bounded("reading a lease", c.lease_time_to_live(lease, None))
            .await?;
        Ok((r.ttl() > 0).then_some(r.ttl()))
    }

    /// Revokes `lease`, deleting the keys attached to it.
    pub async fn revoke(&self, lease: i64) -> Result<(), HaError> {
        let mut c = self.client.clone();
        self.bounded("revoking the lease", c.lease_revoke(lease))
            .await
            .map(|_| ())
    }

    /// Publishes a member's state under `lease`.
    pub async fn put_member<S: Serialize + Named>(&self, lease: i64, s: &S) -> Result<(), HaError> {
        let body = serde_json::to_vec(s).map_err(|e| etcd("encoding member state", e))?;
        let mut c = self.client.clone();
        let key = self.key(&format!("members/{}", s.name()));
        self.bounded(
            "publishing member state",
            c.put(key, body, Some(PutOptions::new().with_lease(lease))),
        )
        .await
        .map(|_| ())
    }

    /// Takes the leader key for `name` if nobody holds it (create revision 0):
    /// of several racing members exactly one gets `true`.
    pub async fn try_acquire(&self, name: &str, lease: i64) -> Result<bool, HaError> {
        let key = self.leader_key();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                name,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let mut c = self.client.clone();
        let r = self.bounded("taking the leader key", c.txn(txn)).await?;
        Ok(r.succeeded())
    }

    /// As [`Dcs::try_acquire`], and publishes `optime` in the same
    /// transaction: a leader that dies right after taking the key has still
    /// published the position its successors are judged against.
    pub async fn try_acquire_with_optime<O: Serialize>(
        &self,
        name: &str,
        lease: i64,
        optime: &O,
    ) -> Result<bool, HaError> {
        let body = serde_json::to_vec(optime).map_err(|e| etcd("encoding optime", e))?;
        let key = self.leader_key();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(key, name, Some(PutOptions::new().with_lease(lease))),
                TxnOp::put(self.key("optime"), body, None),
            ]);
        let mut c = self.client.clone();
        let r = self.bounded("taking the leader key", c.txn(txn)).await?;
        Ok(r.succeeded())
    }

    /// Deletes the leader key if `name` holds it.
    pub async fn release(&self, name: &str) -> Result<bool, HaError> {
        let key = self.leader_key();
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, name)])
            .and_then([TxnOp::delete(key, None)]);
        let mut c = self.client.clone();
        let r = self.bounded("releasing the leader key", c.txn(txn)).await?;
        Ok(r.succeeded())
    }

    /// Publishes the leader's position (no lease: it outlives the leader).
    pub async fn put_optime<O: Serialize>(&self, o: &O) -> Result<(), HaError> {
        let body = serde_json::to_vec(o).map_err(|e| etcd("encoding optime", e))?;
        let mut c = self.client.clone();
        self.bounded("publishing optime", c.put(self.key("optime"), body, None))
            .await
            .map(|_| ())
    }

    /// Sets or clears the pause flag.
    pub async fn set_paused(&self, paused: bool) -> Result<(), HaError> {
        let mut c = self.client.clone();
        let key = self.key("pause");
        if paused {
            let at = chrono::Utc::now().to_rfc3339();
            self.bounded("pausing", c.put(key, at, None)).await?;
        } else {
            self.bounded("resuming", c.delete(key, None)).await?;
        }
        Ok(())
    }

    /// Writes (or with `None` deletes) the switchover request.
    pub async fn set_switchover(&self, s: Option<&Switchover>) -> Result<(), HaError> {
        let mut c = self.client.clone();
        let key = self.key("switchover");
        match s {
            Some(s) => {
                let body = serde_json::to_vec(s).map_err(|e| etcd("encoding switchover", e))?;
                self.bounded("requesting a switchover", c.put(key, body, None))
                    .await?;
            }
            None => {
                self.bounded("clearing the switchover", c.delete(key, None))
                    .await?;
            }
        }
        Ok(())
    }

    /// Wakes `wake` whenever the leader, switchover or pause key changes (an
    /// expired lease deletes the leader key), so members act at once rather
    /// than at their next `loop_wait`. Runs until `stop`; a broken watch is
    /// opened again after `retry`, with one wake-up for what it may have
    /// missed.
    pub async fn watch_changes(&self, wake: Arc<Notify>, retry: Duration, stop: CancellationToken) {
        let prefix = format!("{}/", self.root);
        let wanted = ["leader", "switchover", "pause"].map(|k| self.key(k).into_bytes());
        loop {
            let mut c = self.client.clone();
            let opts = WatchOptions::new().with_prefix();
            match self
                .bounded("watching the cluster", c.watch(prefix.clone(), Some(opts)))
                .await
            {
                Ok(mut stream) => loop {
                    let msg = tokio::select! {
                        _ = stop.cancelled() => return,
                        m = stream.message() => m,
                    };
                    match msg {
                        Ok(Some(r)) => {
                            let hit = r.events().iter().filter_map(|e| e.kv());
                            if hit
                                .into_iter()
                                .any(|kv| wanted.iter().any(|w| w == kv.key()))
                            {
                                wake.notify_one();
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!("{}", etcd("watching the cluster", e));
                            break;
                        }
                    }
                },
                Err(e) => tracing::debug!("{e}"),
            }
            wake.notify_one();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
        }
    }

    /// Reads every key of a PostgreSQL cluster in one request (one revision).
    pub async fn view(&self) -> Result<ClusterView, HaError> {
        self.view_as().await
    }

    /// Reads every key in one request (one revision), member states and
    /// the optime parsed as `M` and `O`.
    pub async fn view_as<M: Named + DeserializeOwned, O: DeserializeOwned>(
        &self,
    ) -> Result<ClusterView<M, O>, HaError> {
        let mut c = self.client.clone();
        let prefix = format!("{}/", self.root);
        let r = self
            .bounded(
                "reading the cluster",
                c.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        let mut v = ClusterView::<M, O>::default();
        for kv in r.kvs() {
            let Some(k) = kv.key_str().ok().and_then(|k| k.strip_prefix(&prefix)) else {
                continue;
            };
            let val = kv.value();
            // A value another version wrote in another shape is skipped,
            // never fatal: the loop must keep renewing.
            match k {
                "leader" => {
                    v.leader = Some(Leader {
                        name: String::from_utf8_lossy(val).into_owned(),
                        lease: kv.lease(),
                    })
                }
                "optime" => v.optime = serde_json::from_slice(val).ok(),
                "pause" => v.paused = true,
                "switchover" => v.switchover = serde_json::from_slice(val).ok(),
                m if m.starts_with("members/") => {
                    if let Ok(s) = serde_json::from_slice(val) {
                        v.members.push(s);
                    }
                }
                _ => {}
            }
        }
        v.members.sort_by(|a, b| a.name().cmp(b.name()));
        Ok(v)
    }
}

/// The etcd password from `password_env` or `password_file`; never printed.
fn password(ha: &HaConfig) -> Result<String, HaError> {
    if let Some(var) = &ha.password_env {
        return std::env::var(var).map_err(|_| {
            HaError::Config(format!(
                "[ha] password_env = {var:?} but that variable is not set; export it for dr"
            ))
        });
    }
    if let Some(f) = &ha.password_file {
        return crate::http::read_secret_file(f)
            .map_err(|e| HaError::Config(format!("[ha] password_file {e}")));
    }
    Err(HaError::Config(
        "[ha] user is set without a password; set password_env or password_file".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::Lsn;

    fn m(name: &str, role: &str, lsn: u64, healthy: bool) -> MemberState {
        MemberState {
            name: name.into(),
            role: role.into(),
            timeline: 1,
            received_lsn: Some(Lsn(lsn)),
            replayed_lsn: Some(Lsn(lsn)),
            healthy,
            sync_standbys: vec![],
        }
    }

    #[test]
    fn the_most_caught_up_eligible_standby_wins_sync_first() {
        let mut v = ClusterView {
            optime: Some(Optime {
                leader: "a".into(),
                lsn: Lsn(1000),
                sync_standbys: vec![],
            }),
            members: vec![
                m("a", "down", 0, false),
                m("b", "standby", 900, true),
                m("c", "standby", 990, true),
                m("d", "standby", 999, false),
            ],
            ..Default::default()
        };
        assert_eq!(v.best_candidate(200).map(|m| m.name.as_str()), Some("c"));
        // Too far behind: nobody.
        assert_eq!(v.best_candidate(5).map(|m| m.name.as_str()), None);
        // A synchronous standby goes first, even if behind.
        if let Some(o) = v.optime.as_mut() {
            o.sync_standbys = vec!["b".into()];
        }
        assert_eq!(v.best_candidate(200).map(|m| m.name.as_str()), Some("b"));
        // Equal positions: the name decides, the same on every member.
        if let Some(o) = v.optime.as_mut() {
            o.sync_standbys.clear();
        }
        v.members[1].received_lsn = Some(Lsn(990));
        assert_eq!(v.best_candidate(200).map(|m| m.name.as_str()), Some("b"));
        // Before any leader published a position, nobody runs.
        v.optime = None;
        assert!(v.best_candidate(200).is_none());
    }
}
