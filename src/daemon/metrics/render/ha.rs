//! Automatic failover: what each member loop of this daemon reports.

use std::time::Instant;

use super::Metrics;
use crate::ha::stats::{MemberStats, Outcomes};

fn flag(b: bool) -> f64 {
    f64::from(u8::from(b))
}

/// Renders the member loops of this daemon (nothing without `[ha]`).
pub(super) fn render(stats: &crate::ha::HaStats, m: &mut Metrics, now: Instant) {
    let all = stats.snapshot();
    if all.is_empty() {
        return;
    }
    type Get = fn(&MemberStats, Instant) -> Option<f64>;
    let gauges: [(&str, &str, Get); 6] = [
        (
            "dr_ha_leader",
            "1 when this member holds its cluster's leader key.",
            |s, _| Some(flag(s.leader)),
        ),
        (
            "dr_ha_paused",
            "1 when the cluster is paused (dr ha pause): no automatic action.",
            |s, _| Some(flag(s.paused)),
        ),
        (
            "dr_ha_timeline",
            "Timeline of the member's server (0 when it is down).",
            |s, _| Some(f64::from(s.timeline)),
        ),
        (
            "dr_ha_replication_lag_bytes",
            "Bytes the member's server is behind the leader's position (0 on the leader).",
            |s, _| s.lag_bytes.map(|b| b as f64),
        ),
        (
            "dr_ha_max_lag_bytes",
            "max_lag_bytes of the cluster: a standby further behind is never promoted automatically.",
            |s, _| Some(s.max_lag_bytes as f64),
        ),
        (
            "dr_ha_lease_seconds_left",
            "Seconds the member's lease holds at most without another renewal (a leader fences itself loop_wait before).",
            |s, now| {
                s.lease_expires
                    .map(|e| e.saturating_duration_since(now).as_secs_f64())
            },
        ),
    ];
    for (name, help, get) in gauges {
        m.family(name, "gauge", help);
        for ((cluster, member), s) in &all {
            if let Some(v) = get(s, now) {
                m.sample(&[("cluster", cluster), ("member", member)], v);
            }
        }
    }
    m.family(
        "dr_ha_member_role",
        "gauge",
        "1 for the role the member's server plays now (primary, standby or down).",
    );
    for ((cluster, member), s) in &all {
        for role in ["primary", "standby", "down"] {
            let labels = [
                ("cluster", cluster.as_str()),
                ("member", member),
                ("role", role),
            ];
            m.sample(&labels, flag(s.role == role));
        }
    }
    type Count = fn(&MemberStats) -> Outcomes;
    let counters: [(&str, &str, Count); 4] = [
        (
            "dr_ha_lease_renewals_total",
            "Lease grants and renewals sent to etcd, by outcome.",
            |s| s.renewals,
        ),
        (
            "dr_ha_failovers_total",
            "Promotions of this member after the leader key was lost, by outcome.",
            |s| s.failovers,
        ),
        (
            "dr_ha_switchovers_total",
            "Promotions of this member in a planned switchover, by outcome.",
            |s| s.switchovers,
        ),
        (
            "dr_ha_rejoins_total",
            "Rejoins of this member's server as a standby of another leader, by outcome.",
            |s| s.rejoins,
        ),
    ];
    for (name, help, get) in counters {
        m.family(name, "counter", help);
        for ((cluster, member), s) in &all {
            let o = get(s);
            for (outcome, n) in [("ok", o.ok), ("failed", o.failed)] {
                let labels = [
                    ("cluster", cluster.as_str()),
                    ("member", member),
                    ("outcome", outcome),
                ];
                m.sample(&labels, n as f64);
            }
        }
    }
    type Plain = fn(&MemberStats) -> u64;
    let plain: [(&str, &str, Plain); 2] = [
        (
            "dr_ha_lease_expired_total",
            "Renewals that found the member's lease already expired in etcd (it takes a new one).",
            |s| s.renewals_expired,
        ),
        (
            "dr_ha_fences_total",
            "Times this member stopped its own server so that it could not be a second primary.",
            |s| s.fences,
        ),
    ];
    for (name, help, get) in plain {
        m.family(name, "counter", help);
        for ((cluster, member), s) in &all {
            m.sample(&[("cluster", cluster), ("member", member)], get(s) as f64);
        }
    }
}
