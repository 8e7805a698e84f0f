//! Automatic failover (`[ha]`) against real servers: PostgreSQL 15 primary
//! and standbys on loopback, the real etcd of `scripts/testenv.sh`, and one
//! real `dr daemon` per member.

mod common;

use std::time::{Duration, Instant};

use common::ha::{HaCluster, LOOP_WAIT, OwnEtcd, TTL};

const SETTLE: Duration = Duration::from_secs(40);

/// Rows written to the primary before a failure; all must survive it.
fn write_rows(c: &HaCluster, on: &str, n: u32) {
    c.topo.sql(
        c.port(on),
        &format!("CREATE TABLE IF NOT EXISTS kept (i int); INSERT INTO kept SELECT generate_series(1, {n})"),
    );
}

fn rows(c: &HaCluster, on: &str) -> String {
    c.topo.sql(c.port(on), "SELECT count(*) FROM kept")
}

#[test]
fn killing_the_primary_and_its_daemon_promotes_the_standby_with_every_commit() {
    let mut c = HaCluster::new(1);
    c.start_all(SETTLE);
    // Synchronous: a commit is acknowledged only once b has it.
    c.topo.sql(
        c.port("a"),
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
    );
    c.topo.sql(c.port("a"), "SELECT pg_reload_conf()");
    write_rows(&c, "a", 1000);

    c.kill_daemon("a");
    c.crash_server("a");
    let lost = Instant::now();
    c.wait(
        "b accepts writes",
        TTL + LOOP_WAIT * 4 + Duration::from_secs(10),
        |c| c.writable("b"),
    );
    let took = lost.elapsed();
    eprintln!(
        "failover: primary lost → b accepts writes in {:.2}s",
        took.as_secs_f64()
    );
    let s = c.status();
    assert_eq!(s["leader"], "b", "{s}");
    assert_eq!(rows(&c, "b"), "1000");
    // The record is finished after the repoints and hooks.
    c.wait("the failover is audited", SETTLE, |c| {
        c.audit_records("ha.failover")
            .iter()
            .any(|r| r["phase"] == "finished")
    });
    let done: Vec<_> = c
        .audit_records("ha.failover")
        .into_iter()
        .filter(|r| r["phase"] == "finished")
        .collect();
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0]["outcome"], "ok");
    assert_eq!(done[0]["target"], "main");
    assert_eq!(done[0]["details"]["member"], "b");
    assert_eq!(done[0]["details"]["previous_leader"], "a");
    assert!(done[0]["details"]["promote_seconds"].as_f64().is_some());

    // The old primary's daemon comes back: its crashed server is rewound
    // and follows b.
    c.start_daemon("a");
    c.wait_settled("b", &["a"], SETTLE);
    c.topo.sql(c.port("b"), "INSERT INTO kept VALUES (0)");
    c.topo
        .wait_for(c.port("a"), "SELECT count(*) FROM kept", "1001", SETTLE);
}

#[test]
fn a_leader_cut_off_from_etcd_fences_itself_before_a_standby_promotes_and_rejoins() {
    let mut c = HaCluster::new(1);
    c.start_all(SETTLE);
    write_rows(&c, "a", 10);

    c.gates[c.idx("a")].set_open(false);
    let cut = Instant::now();
    let mut a_down: Option<Duration> = None;
    let mut b_primary: Option<Duration> = None;
    let limit = TTL + LOOP_WAIT * 4 + Duration::from_secs(10);
    while cut.elapsed() < limit && b_primary.is_none() {
        // Checked in this order, so when b is first seen writable, a's
        // state was read just before.
        let a_writes = c.writable("a");
        let b_writes = c.writable("b");
        if !a_writes && a_down.is_none() {
            a_down = Some(cut.elapsed());
        }
        if b_writes {
            assert!(!a_writes, "a and b both accepted writes\n{}", c.logs());
            b_primary = Some(cut.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (Some(fenced), Some(promoted)) = (a_down, b_primary) else {
        panic!(
            "a stopped at {a_down:?}, b promoted at {b_primary:?}\n{}",
            c.logs()
        );
    };
    eprintln!("cut at 0s: a fenced at {fenced:.2?}, b writable at {promoted:.2?}");
    assert!(
        fenced < TTL,
        "a was fenced after its lease could expire ({fenced:?})"
    );
    assert!(fenced < promoted);
    assert!(!c.writable("a"), "the old primary accepts writes again");
    assert_eq!(rows(&c, "b"), "10");

    // Connectivity returns: a becomes a standby of b and replicates from it.
    c.gates[c.idx("a")].set_open(true);
    c.wait_settled("b", &["a"], SETTLE);
    c.topo.sql(c.port("b"), "INSERT INTO kept VALUES (11)");
    c.topo
        .wait_for(c.port("a"), "SELECT count(*) FROM kept", "11", SETTLE);
    assert_eq!(c.topo.sql(c.port("a"), "SELECT pg_is_in_recovery()"), "t");
    assert!(
        !c.audited_ok("ha.fence").is_empty(),
        "{:?}",
        c.audit_records("ha.fence")
    );
    assert!(
        !c.audited_ok("ha.rejoin").is_empty(),
        "{:?}",
        c.audit_records("ha.rejoin")
    );
}

#[test]
fn with_etcd_down_nobody_is_promoted_the_primary_stops_and_serves_again_when_etcd_returns() {
    let mut etcd = OwnEtcd::start();
    let mut c = HaCluster::with_etcd(1, &etcd.endpoint);
    c.start_all(SETTLE);
    write_rows(&c, "a", 10);

    etcd.kill();
    let down = Instant::now();
    // The documented rule: a leader that cannot renew its lease stops its
    // server before the lease could expire, etcd down or not.
    c.wait("a stops serving", TTL, |c| !c.writable("a"));
    let fenced = down.elapsed();
    // Two leases long, nobody serves writes: no standby can take the key.
    while down.elapsed() < TTL * 2 {
        assert!(
            !c.writable("b"),
            "b was promoted without etcd\n{}",
            c.logs()
        );
        assert!(
            !c.writable("a"),
            "a serves again without etcd\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    etcd.resume();
    let back = Instant::now();
    // etcd extends every lease when it starts, so a still holds the key and
    // its daemon starts its server again.
    c.wait("a serves again", SETTLE, |c| c.writable("a"));
    eprintln!(
        "etcd down: a fenced after {fenced:.2?}; etcd back: a writable after {:.2?}",
        back.elapsed()
    );
    assert!(!c.writable("b"), "b was promoted\n{}", c.logs());
    c.wait_settled("a", &["b"], SETTLE);
    assert_eq!(rows(&c, "a"), "10");
    c.topo.sql(c.port("a"), "INSERT INTO kept VALUES (11)");
    c.topo
        .wait_for(c.port("b"), "SELECT count(*) FROM kept", "11", SETTLE);
    assert!(c.audit_records("ha.failover").is_empty());
    assert!(
        !c.audited_ok("ha.fence").is_empty(),
        "the fence is not audited"
    );
}

#[test]
fn an_old_primary_that_diverged_is_rewound_and_follows_the_new_one() {
    let mut c = HaCluster::new(1);
    c.start_all(SETTLE);
    write_rows(&c, "a", 100);
    c.topo
        .wait_for(c.port("b"), "SELECT count(*) FROM kept", "100", SETTLE);
    c.kill_daemon("a");
    c.crash_server("a");
    c.wait("b accepts writes", TTL + SETTLE, |c| c.writable("b"));
    c.topo.sql(c.port("b"), "INSERT INTO kept VALUES (101)");

    // The old primary comes back without its daemon (a host rebooted with
    // PostgreSQL enabled), takes writes b never sees, and crashes: its
    // history forks from b's.
    c.topo.start(&c.nodes[c.idx("a")]);
    assert_eq!(c.topo.sql(c.port("a"), "SELECT pg_is_in_recovery()"), "f");
    c.topo.sql(
        c.port("a"),
        "INSERT INTO kept SELECT -generate_series(1, 5000)",
    );
    c.crash_server("a");

    c.start_daemon("a");
    c.wait_settled("b", &["a"], SETTLE);
    c.topo.sql(c.port("b"), "INSERT INTO kept VALUES (102)");
    c.topo
        .wait_for(c.port("a"), "SELECT count(*) FROM kept", "102", SETTLE);
    assert_eq!(
        c.topo
            .sql(c.port("a"), "SELECT count(*) FROM kept WHERE i < 0"),
        "0",
        "the diverged writes survived the rejoin"
    );
    // A rejoin that fails is tried again at the next loop; the one that
    // succeeded rewound: pg_rewind copied blocks back ("Done!"), not "no
    // rewind required".
    let all = c.audit_records("ha.rejoin");
    let done = c.audited_ok("ha.rejoin");
    assert_eq!(done.len(), 1, "{all:?}\n{}", c.logs());
    let d = &done[0]["details"];
    assert!(
        d["pg_rewind"].as_str().is_some_and(|s| s.contains("Done")),
        "{all:?}"
    );
    // The crash was recovered first, by this attempt or a failed earlier one.
    let failed = all
        .iter()
        .filter(|r| r["phase"] == "finished" && r["outcome"] != "ok")
        .count();
    assert!(d["recovered_crash"] == true || failed > 0, "{all:?}");
    if failed > 0 {
        eprintln!("rejoin attempts before the one that succeeded: {all:?}");
    }
}

#[test]
fn switchover_loses_no_commit_and_the_old_primary_follows() {
    let mut c = HaCluster::new(1);
    c.start_all(SETTLE);
    // Asynchronous replication: only the switchover's wait keeps these.
    write_rows(&c, "a", 20000);
    let o = c.dr(&["--json", "ha", "switchover", "--to", "b"]);
    assert!(
        o.status.success(),
        "switchover: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        c.logs()
    );
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    eprintln!("switchover RTO {}s", r["rto_seconds"]);
    assert_eq!(r["to"], "b");
    // How long it takes is measured by scripts/bench-ha.sh, not here: on a
    // loaded machine the old primary's shutdown checkpoint alone can take
    // seconds.
    assert!(r["rto_seconds"].as_f64().is_some_and(|s| s > 0.0), "{r}");
    assert_eq!(rows(&c, "b"), "20000");
    assert!(c.writable("b"));
    c.wait_settled("b", &["a"], SETTLE);
    let done = |a: &str| !c.audited_ok(a).is_empty();
    assert!(done("ha.switchover.request") && done("ha.switchover") && done("ha.handover"));
    // Back again: the old primary, now a standby, takes over as cleanly.
    let o = c.dr(&["ha", "switchover", "--to", "a"]);
    assert!(
        o.status.success(),
        "switchover back: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        c.logs()
    );
    assert_eq!(rows(&c, "a"), "20000");
}

#[test]
fn while_paused_nothing_is_promoted_and_resume_lets_failover_happen() {
    let mut c = HaCluster::new(1);
    c.start_all(SETTLE);
    let o = c.dr(&["ha", "pause"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    c.wait("status shows paused", SETTLE, |c| {
        c.status()["paused"] == true
    });

    c.kill_daemon("a");
    c.crash_server("a");
    // Long enough for the lease to expire and b to act, were it allowed.
    c.wait("a's lease expired", TTL * 2, |c| {
        c.status()["leader"].is_null()
    });
    std::thread::sleep(LOOP_WAIT * 3);
    assert!(
        !c.writable("b"),
        "b was promoted while paused\n{}",
        c.logs()
    );
    assert!(c.audit_records("ha.failover").is_empty());

    let o = c.dr(&["ha", "resume"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    c.wait("b promoted after resume", SETTLE, |c| c.writable("b"));
    assert_eq!(c.status()["leader"], "b");
    for a in ["ha.pause", "ha.resume"] {
        assert!(
            c.audit_records(a).iter().any(|r| r["outcome"] == "ok"),
            "no {a} record"
        );
    }
}

#[test]
fn of_two_standbys_exactly_one_is_promoted_and_the_other_follows_it() {
    let mut c = HaCluster::new(2);
    c.start_all(SETTLE);
    write_rows(&c, "a", 100);
    c.kill_daemon("a");
    c.crash_server("a");
    c.wait("a standby is promoted", TTL + SETTLE, |c| {
        c.writable("b") || c.writable("c")
    });
    let winner = if c.writable("b") { "b" } else { "c" };
    let other = if winner == "b" { "c" } else { "b" };
    c.wait_settled(winner, &[other], SETTLE);
    assert!(!c.writable(other), "both standbys accept writes");
    assert_eq!(c.status()["leader"], winner);
    c.topo.sql(c.port(winner), "INSERT INTO kept VALUES (101)");
    c.topo
        .wait_for(c.port(other), "SELECT count(*) FROM kept", "101", SETTLE);
    let ok: Vec<_> = c.audited_ok("ha.failover");
    assert_eq!(ok.len(), 1, "{ok:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_members_exactly_one_takes_the_leader_key() {
    let etcd = common::require_env("DR_TEST_ETCD_ENDPOINTS", "etcd");
    let ha: dr::config::HaConfig = toml::from_str(&format!(
        "endpoints = [\"{etcd}\"]\nprefix = \"/t{}\"\n",
        common::unique("race")
    ))
    .expect("ha config");
    let dcs = dr::ha::dcs::Dcs::connect(&ha, "main", Duration::from_secs(5))
        .await
        .expect("connect");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let d = dcs.clone();
        tasks.spawn(async move {
            let lease = d.grant(Duration::from_secs(10)).await.expect("lease");
            (
                i,
                d.try_acquire(&format!("m{i}"), lease).await.expect("txn"),
            )
        });
    }
    let mut winners = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (i, won) = r.expect("task");
        if won {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let view = dcs.view().await.expect("view");
    assert_eq!(
        view.leader.map(|l| l.name),
        Some(format!("m{}", winners[0]))
    );
    // Only the holder can release it.
    let other = (winners[0] + 1) % 8;
    assert!(!dcs.release(&format!("m{other}")).await.expect("txn"));
    assert!(dcs.release(&format!("m{}", winners[0])).await.expect("txn"));
}

#[test]
fn a_bad_ha_config_is_refused_naming_the_key_and_the_fix() {
    let c = HaCluster::new(1);
    let text = std::fs::read_to_string(&c.cfgs[0]).expect("cfg");
    let write = |name: &str, t: String| {
        let p = c.dir.path().join(name);
        std::fs::write(&p, t).expect("write");
        p
    };
    // A daemon that wrongly starts is killed after 15s, failing the test.
    let run = |p: &std::path::Path, args: &[&str]| {
        let mut child = std::process::Command::new(common::dr_bin())
            .arg("--config")
            .arg(p)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("dr");
        let start = Instant::now();
        while child.try_wait().expect("wait").is_none() {
            if start.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                panic!("dr {args:?} started instead of refusing the config");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().expect("output")
    };
    let slow = write(
        "slow.toml",
        text.replace("loop_wait = \"1s\"", "loop_wait = \"3s\""),
    );
    let o = run(&slow, &["daemon", "--member", "a"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("loop_wait") && err.contains("ttl / 2") && err.contains("lower loop_wait"),
        "{err}"
    );
    let typo = write("typo.toml", text.replace("ttl = ", "tll = "));
    let o = run(&typo, &["daemon", "--check", "--member", "a"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("tll") && err.contains("typo.toml:"), "{err}");
    let o = run(&c.cfgs[0], &["daemon", "--member", "z"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("--member") && err.contains("a, b"), "{err}");
    // Nothing started: no member ever published itself.
    let s = c.status();
    assert!(
        s["members"]
            .as_array()
            .expect("members")
            .iter()
            .all(|m| m["role"] == "unknown"),
        "{s}"
    );
    assert!(s["leader"].is_null());
}
