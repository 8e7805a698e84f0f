//! Automatic failover of three members under a running write load, with
//! synchronous replication (`ANY 1` of the members): a primary lost with its
//! daemon, and a primary whose daemon freezes while its server runs on. What
//! must hold: every commit a client saw acknowledged is on the new primary,
//! and the old primary acknowledges nothing once a standby is promoted. The
//! daemons' `/metrics` and `dr ha status` tell the same story throughout.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use common::ha::{HaCluster, LOOP_WAIT, TTL};
use common::load::{Ack, COMMIT_TIMEOUT, Writer, commits};

const SETTLE: Duration = Duration::from_secs(60);

/// Primary `a`, standbys `b` and `c`, each commit waiting for one of them;
/// daemons started; a writer committing into table `load` on `a` until it
/// has at least 200 acknowledged commits.
fn loaded_cluster() -> (HaCluster, Writer) {
    let mut c = HaCluster::new(2);
    c.synchronous("ANY 1 (a, b, c)");
    c.start_all(SETTLE);
    c.topo
        .sql(c.port("a"), "CREATE TABLE load (id bigint PRIMARY KEY)");
    let w = Writer::start(c.port("a"), "load", 1);
    c.wait("the writer commits on a", SETTLE, |_| {
        w.acked().len() >= 200
    });
    (c, w)
}

/// Waits until `b` or `c` is a primary; returns (winner, the other).
fn promoted(c: &HaCluster) -> (&'static str, &'static str) {
    let primary = |c: &HaCluster, n: &str| {
        c.topo
            .try_sql(c.port(n), "SELECT pg_is_in_recovery()")
            .is_ok_and(|v| v == "f")
    };
    c.wait("b or c is promoted", TTL * 2 + SETTLE, |c| {
        primary(c, "b") || primary(c, "c")
    });
    if primary(c, "b") {
        ("b", "c")
    } else {
        ("c", "b")
    }
}

/// Every acknowledged commit is on `on`.
fn all_on(c: &HaCluster, on: &str, acks: &[Ack]) {
    let rows: BTreeSet<i64> = c
        .topo
        .sql(c.port(on), "SELECT id FROM load")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let lost: Vec<i64> = acks
        .iter()
        .map(|a| a.id)
        .filter(|id| !rows.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged commits are not on {on}: {lost:?}\n{}",
        lost.len(),
        acks.len(),
        c.logs()
    );
}

/// Waits until each daemon of `members` shows on `/metrics` what `dr ha
/// status --json` shows: who leads, the member's role and timeline.
fn metrics_agree_with_status(c: &HaCluster, members: &[&str]) {
    let mut last = String::new();
    let agree = |c: &HaCluster, last: &mut String| {
        let s = c.status();
        members.iter().all(|n| {
            let Some(m) = s["members"]
                .as_array()
                .and_then(|ms| ms.iter().find(|m| m["name"] == *n))
            else {
                return false;
            };
            let leads = f64::from(u8::from(s["leader"] == *n));
            let role = m["role"].as_str().unwrap_or("?");
            let got = (
                c.metric(n, "dr_ha_leader", &[]),
                c.metric(n, "dr_ha_member_role", &[("role", role)]),
                c.metric(n, "dr_ha_timeline", &[]),
            );
            *last = format!("{n}: status {m}, leader {:?}; metrics {got:?}", s["leader"]);
            got == (Some(leads), Some(1.0), m["timeline"].as_f64())
        })
    };
    let start = std::time::Instant::now();
    while start.elapsed() < SETTLE {
        if agree(c, &mut last) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("metrics and dr ha status disagree: {last}\n{}", c.logs());
}

#[test]
fn killing_the_primary_and_its_daemon_under_load_promotes_a_standby_with_every_acknowledged_commit()
{
    let (mut c, w) = loaded_cluster();
    metrics_agree_with_status(&c, &["a", "b", "c"]);
    for n in ["a", "b", "c"] {
        let leads = if n == "a" { 1.0 } else { 0.0 };
        assert_eq!(c.metric(n, "dr_ha_leader", &[]), Some(leads), "{n}");
        let ok = [("outcome", "ok")];
        assert_eq!(c.metric(n, "dr_ha_failovers_total", &ok), Some(0.0));
        assert!(c.metric(n, "dr_ha_lease_renewals_total", &ok) > Some(0.0));
        assert!(c.metric(n, "dr_ha_lease_seconds_left", &[]) > Some(0.0));
        assert!(c.metric(n, "dr_ha_replication_lag_bytes", &[]).is_some());
    }

    c.kill_daemon("a");
    c.kill_postmaster("a");
    let (winner, other) = promoted(&c);
    // The other standby follows the new primary, which then acknowledges
    // commits again (they need one synchronous standby).
    c.wait_settled(winner, &[other], SETTLE);
    c.topo.wait_for(
        c.port(winner),
        "SELECT string_agg(application_name || ':' || state || ':' || sync_state, ',') \
         FROM pg_stat_replication",
        &format!("{other}:streaming:quorum"),
        SETTLE,
    );
    assert!(commits(c.port(winner), "INSERT INTO load VALUES (-1)"));
    let acks = w.stop();
    eprintln!(
        "{} commits acknowledged by a before it was killed; {winner} promoted",
        acks.len()
    );
    all_on(&c, winner, &acks);
    c.topo.wait_for(
        c.port(other),
        "SELECT count(*) FROM load WHERE id = -1",
        "1",
        SETTLE,
    );

    // The metrics moved with the leader key.
    metrics_agree_with_status(&c, &[winner, other]);
    let ok = [("outcome", "ok")];
    assert_eq!(c.metric(winner, "dr_ha_leader", &[]), Some(1.0));
    assert_eq!(c.metric(winner, "dr_ha_failovers_total", &ok), Some(1.0));
    assert_eq!(c.metric(other, "dr_ha_leader", &[]), Some(0.0));
    assert_eq!(c.metric(other, "dr_ha_failovers_total", &ok), Some(0.0));
    assert!(c.metrics("a").is_none(), "a's daemon still answers");
    assert_eq!(c.audited_ok("ha.failover").len(), 1);

    // The old primary's daemon returns: its crashed server rejoins as a
    // standby of the new primary.
    c.start_daemon("a");
    c.wait_settled(winner, &[other, "a"], SETTLE);
    all_on(&c, "a", &acks);
    metrics_agree_with_status(&c, &["a", winner, other]);
    assert_eq!(
        c.metric("a", "dr_ha_rejoins_total", &[("outcome", "ok")]),
        Some(1.0)
    );
}

#[test]
fn a_frozen_primary_daemon_loses_the_key_and_its_running_server_acknowledges_nothing_after_the_promotion()
 {
    let (c, w) = loaded_cluster();
    c.signal_daemon("a", "STOP");
    let (winner, other) = promoted(&c);
    c.wait("the failover is audited", SETTLE, |c| {
        !c.audited_ok("ha.failover").is_empty()
    });
    let rec = &c.audited_ok("ha.failover")[0];
    let started: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(rec["started"].clone()).expect("started");
    let secs = rec["details"]["promote_seconds"]
        .as_f64()
        .expect("promote_seconds");
    // pg_promote returned by then: the winner was a primary.
    let promoted_by =
        SystemTime::from(started) + Duration::from_secs_f64(secs) + Duration::from_millis(1);
    // The old primary keeps running and its clients keep trying.
    c.wait_settled(winner, &[other], SETTLE);
    let tried = w.attempts();
    std::thread::sleep(LOOP_WAIT * 2 + COMMIT_TIMEOUT * 2);
    assert!(w.attempts() > tried, "the writer stopped trying");
    assert_eq!(
        c.topo.sql(c.port("a"), "SELECT pg_is_in_recovery()"),
        "f",
        "a's server was stopped although its daemon is frozen"
    );
    let late: Vec<Ack> = w
        .acked()
        .into_iter()
        .filter(|a| a.at > promoted_by)
        .collect();
    assert!(
        late.is_empty(),
        "a acknowledged {} commits after {winner} was promoted: {late:?}\n{}",
        late.len(),
        c.logs()
    );
    assert!(commits(c.port(winner), "INSERT INTO load VALUES (-1)"));

    // Thawed, the old daemon finds another leader: it stops its server
    // (every commit still waiting fails) and rejoins as a standby.
    c.signal_daemon("a", "CONT");
    c.wait_settled(winner, &[other, "a"], SETTLE);
    let acks = w.stop();
    eprintln!(
        "{} commits acknowledged by a, none after {winner}'s promotion",
        acks.len()
    );
    all_on(&c, winner, &acks);
    all_on(&c, "a", &acks);
    metrics_agree_with_status(&c, &["a", winner, other]);
    assert!(c.metric("a", "dr_ha_fences_total", &[]) >= Some(1.0));
    assert_eq!(
        c.metric(winner, "dr_ha_failovers_total", &[("outcome", "ok")]),
        Some(1.0)
    );
    assert!(!c.audited_ok("ha.fence").is_empty());
    assert!(!c.audited_ok("ha.rejoin").is_empty());
}
