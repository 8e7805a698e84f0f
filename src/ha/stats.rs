//! What each running member loop reports about itself: role, leadership,
//! lease, lag and counters of what it did. The daemon renders it on
//! `/metrics`; `ha` sits below the daemon, so it only fills this in.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Counts of an operation by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Finished successfully.
    pub ok: u64,
    /// Failed.
    pub failed: u64,
}

impl Outcomes {
    fn add(&mut self, ok: bool) {
        if ok {
            self.ok += 1;
        } else {
            self.failed += 1;
        }
    }
}

/// One member of one cluster, as its own loop last saw it.
#[derive(Debug, Clone, Default)]
pub struct MemberStats {
    /// `primary`, `standby` or `down`; empty before the first look.
    pub role: String,
    /// This member holds the leader key.
    pub leader: bool,
    /// Who held the leader key at the last read, if anyone.
    pub leader_name: Option<String>,
    /// Automatic actions are paused.
    pub paused: bool,
    /// Timeline of the member's server (0 when down).
    pub timeline: u32,
    /// Bytes the member's server is behind the leader's position.
    pub lag_bytes: Option<u64>,
    /// `max_lag_bytes` of the cluster: a standby further behind is never promoted.
    pub max_lag_bytes: u64,
    /// The member's own lease cannot outlive this (`ttl` after the last
    /// renewal sent); `None` while it holds none.
    pub lease_expires: Option<Instant>,
    /// Lease renewals (and grants).
    pub renewals: Outcomes,
    /// Renewals that found the lease already expired.
    pub renewals_expired: u64,
    /// Promotions after a failure.
    pub failovers: Outcomes,
    /// Promotions of a planned switchover.
    pub switchovers: Outcomes,
    /// Times this member stopped its own server to avoid a second primary.
    pub fences: u64,
    /// Rejoins as a standby of another leader.
    pub rejoins: Outcomes,
}

/// Every member loop of this daemon, by (cluster, member).
#[derive(Debug, Default)]
pub struct HaStats(Mutex<BTreeMap<(String, String), MemberStats>>);

impl HaStats {
    /// A copy of what every loop last reported.
    pub fn snapshot(&self) -> BTreeMap<(String, String), MemberStats> {
        match self.0.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Changes what member `member` of `cluster` reports.
    pub fn update(&self, cluster: &str, member: &str, f: impl FnOnce(&mut MemberStats)) {
        // Plain counters: a poisoned lock still holds a usable state.
        let mut g = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(g.entry((cluster.to_string(), member.to_string()))
            .or_default());
    }
}

/// The handle one member loop reports through.
#[derive(Debug, Clone)]
pub(super) struct Report {
    stats: Arc<HaStats>,
    cluster: String,
    member: String,
}

impl Report {
    pub(super) fn new(stats: Arc<HaStats>, cluster: &str, member: &str) -> Report {
        Report {
            stats,
            cluster: cluster.into(),
            member: member.into(),
        }
    }

    pub(super) fn set(&self, f: impl FnOnce(&mut MemberStats)) {
        self.stats.update(&self.cluster, &self.member, f)
    }

    pub(super) fn renewal(&self, ok: bool, expires: Option<Instant>) {
        self.set(|s| {
            s.renewals.add(ok);
            if ok {
                s.lease_expires = expires;
            }
        })
    }

    pub(super) fn promotion(&self, switchover: bool, ok: bool) {
        self.set(|s| {
            if switchover {
                s.switchovers.add(ok)
            } else {
                s.failovers.add(ok)
            }
        })
    }

    pub(super) fn fence(&self) {
        self.set(|s| s.fences += 1)
    }

    pub(super) fn rejoin(&self, ok: bool) {
        self.set(|s| s.rejoins.add(ok))
    }
}
