//! Automatic failover of Redis groups (`[ha.redis.<group>]`) against real
//! servers: `redis-server` master and replicas on loopback, the real etcd of
//! `scripts/testenv.sh`, and one real `dr daemon` per member.

mod common;

use std::time::{Duration, Instant};

use common::ha::{HaCluster, LOOP_WAIT, OwnEtcd, TTL};
use common::ha_redis::RedisGroup;
use common::topology::start_redis;

const SETTLE: Duration = Duration::from_secs(40);

/// Writes `n` keys to `on` and waits until `replicas` replicas acknowledged
/// them (`WAIT`): these writes must survive any failover.
fn write_acked(g: &RedisGroup, on: &str, n: u32, replicas: u32) {
    let mut c = g.conn(on);
    for i in 0..n {
        redis::cmd("SET")
            .arg(format!("kept:{i}"))
            .arg(i)
            .query::<()>(&mut c)
            .expect("SET");
    }
    let acked: u32 = redis::cmd("WAIT")
        .arg(replicas)
        .arg(5000)
        .query(&mut c)
        .expect("WAIT");
    assert!(
        acked >= replicas,
        "only {acked} replica(s) acknowledged the writes"
    );
}

fn kept(g: &RedisGroup, on: &str) -> u64 {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("kept:*")
        .query(&mut g.conn(on))
        .expect("KEYS");
    keys.len() as u64
}

/// The one finished `ha.failover` record, after waiting for it.
fn one_failover(g: &RedisGroup) -> serde_json::Value {
    g.wait_with(g, "the failover is audited", SETTLE, |g| {
        g.audit_records("ha.failover")
            .iter()
            .any(|r| r["phase"] == "finished")
    });
    let done: Vec<_> = g
        .audit_records("ha.failover")
        .into_iter()
        .filter(|r| r["phase"] == "finished")
        .collect();
    assert_eq!(done.len(), 1, "{done:?}\n{}", g.logs());
    assert_eq!(done[0]["outcome"], "ok", "{:?}", done[0]);
    assert_eq!(done[0]["target"], "redis/cache");
    done[0].clone()
}

#[test]
fn killing_the_master_and_its_daemon_promotes_a_replica_with_every_acknowledged_write() {
    let mut g = RedisGroup::new(2);
    g.start_all(SETTLE);
    write_acked(&g, "a", 1000, 2);

    g.kill_daemon("a");
    g.kill_server("a");
    let lost = Instant::now();
    let mut winner = None;
    g.wait_with(
        &g,
        "b or c accepts writes",
        TTL + LOOP_WAIT * 4 + SETTLE,
        |g| {
            winner = ["b", "c"]
                .into_iter()
                .find(|n| g.set(n, "after", "1").is_ok());
            winner.is_some()
        },
    );
    let winner = winner.expect("a winner");
    eprintln!(
        "failover: master lost → {winner} accepts writes in {:.2}s",
        lost.elapsed().as_secs_f64()
    );
    let other = if winner == "b" { "c" } else { "b" };
    assert_eq!(g.status()["leader"], winner);
    assert_eq!(kept(&g, winner), 1000, "acknowledged writes lost");
    let rec = one_failover(&g);
    assert_eq!(rec["details"]["member"], winner);
    assert_eq!(rec["details"]["previous_leader"], "a");
    assert!(
        rec["details"]["promote_seconds"].as_f64().is_some(),
        "{rec}"
    );
    // The other replica follows the new master and gets its writes.
    g.wait_link(other, winner);
    g.set(winner, "kept:new", "x")
        .expect("write to the new master");
    g.wait_with(&g, "the other replica has the new write", SETTLE, |g| {
        kept(g, other) == 1001
    });
    assert!(
        g.set(other, "x", "1").is_err(),
        "the other replica accepts writes"
    );
}

#[test]
fn a_master_cut_off_from_etcd_fences_itself_before_a_replica_is_promoted_and_rejoins() {
    let mut g = RedisGroup::new(1);
    g.start_all(SETTLE);
    write_acked(&g, "a", 10, 1);

    g.gates[g.idx("a")].set_open(false);
    let cut = Instant::now();
    let mut a_fenced: Option<Duration> = None;
    let mut b_master: Option<Duration> = None;
    let limit = TTL + LOOP_WAIT * 4 + Duration::from_secs(10);
    while cut.elapsed() < limit && b_master.is_none() {
        // a first: when b is first seen writable, a was read just before.
        let a_writes = g.set("a", "probe", "a").is_ok();
        let b_writes = g.set("b", "probe", "b").is_ok();
        if !a_writes && a_fenced.is_none() {
            a_fenced = Some(cut.elapsed());
        }
        if b_writes {
            assert!(!a_writes, "a and b both accepted writes\n{}", g.logs());
            b_master = Some(cut.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (Some(fenced), Some(promoted)) = (a_fenced, b_master) else {
        panic!(
            "a fenced at {a_fenced:?}, b promoted at {b_master:?}\n{}",
            g.logs()
        );
    };
    eprintln!("cut at 0s: a fenced at {fenced:.2?}, b writable at {promoted:.2?}");
    assert!(
        fenced < TTL,
        "a was fenced after its lease could expire ({fenced:?})"
    );
    assert!(fenced < promoted);
    // a's own watchdog fenced it, not b's promotion.
    let fences = g.audited_ok("ha.fence");
    assert!(
        fences.iter().any(|r| r["details"]["member"] == "a"
            && r["details"]["reason"] == "leader lease not renewed in time"),
        "{fences:?}\n{}",
        g.logs()
    );
    let err = g
        .set("a", "late", "1")
        .expect_err("the old master accepts writes");
    assert!(err.to_lowercase().contains("readonly"), "{err}");
    assert_eq!(kept(&g, "b"), 10);
    one_failover(&g);

    // Connectivity returns: a stays a replica of b and replicates from it.
    g.gates[g.idx("a")].set_open(true);
    g.wait_link("a", "b");
    g.wait_with(&g, "a's daemon publishes it as b's replica", SETTLE, |g| {
        let s = g.status();
        let a = g.member(&s, "a");
        s["leader"] == "b" && a["role"] == "replica" && a["link_up"] == true && a["fenced"] == false
    });
    g.set("b", "kept:back", "1").expect("write to b");
    g.wait_with(&g, "a has b's new write", SETTLE, |g| kept(g, "a") == 11);
    // Several loops later a is still b's replica and refuses writes.
    std::thread::sleep(LOOP_WAIT * 3);
    assert!(g.follows("a", "b"));
    assert!(g.set("a", "x", "1").is_err());
}

#[test]
fn two_replicas_racing_for_a_lost_master_exactly_one_is_promoted() {
    let mut g = RedisGroup::new(2);
    g.start_all(SETTLE);
    write_acked(&g, "a", 100, 2);
    // Paused, nobody acts: both replicas see the key vanish, and both are
    // woken by the same resume.
    let o = g.dr(&["ha", "pause", "--group", "cache"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    g.kill_daemon("a");
    g.kill_server("a");
    g.wait_with(&g, "a's lease expires", TTL * 2 + SETTLE, |g| {
        let s = g.status();
        s["leader"].is_null() && g.member(&s, "a")["role"] == "unknown"
    });
    std::thread::sleep(LOOP_WAIT * 2);
    assert!(
        g.audit_records("ha.failover").is_empty(),
        "a paused group failed over"
    );
    assert!(g.set("b", "x", "1").is_err() && g.set("c", "x", "1").is_err());
    let o = g.dr(&["ha", "resume", "--group", "cache"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    one_failover(&g);
    let s = g.status();
    let winner = s["leader"].as_str().expect("a leader").to_string();
    let other = if winner == "b" { "c" } else { "b" };
    assert!(g.set(&winner, "kept:new", "1").is_ok());
    g.wait_link(other, &winner);
    assert!(
        g.set(other, "x", "1").is_err(),
        "both replicas accept writes"
    );
    assert_eq!(kept(&g, &winner), 101);
    let paused: Vec<_> = g.audited_ok("ha.pause");
    assert_eq!(paused.len(), 1, "{paused:?}");
    assert_eq!(paused[0]["target"], "redis/cache");
}

#[test]
fn a_bad_redis_ha_config_is_refused_naming_the_key_and_the_fix() {
    let g = RedisGroup::new(1);
    let text = std::fs::read_to_string(&g.cfgs[0]).expect("cfg");
    let check = |name: &str, t: String, member: &str| {
        let p = g.dir.path().join(name);
        std::fs::write(&p, t).expect("write");
        let o = std::process::Command::new(common::dr_bin())
            .arg("--config")
            .arg(&p)
            .args(["daemon", "--check", "--member", member])
            .output()
            .expect("dr");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // The configs as written pass: a Redis-only [ha] is a valid one.
    let (ok, err) = check("good.toml", text.clone(), "b");
    assert!(ok, "{err}");
    // One member only.
    let b_at = text.find("[ha.redis.cache.member.b]").expect("member b");
    let (ok, err) = check("one.toml", text[..b_at].to_string(), "a");
    assert!(!ok);
    assert!(
        err.contains("[ha.redis.cache] has 1 member") && err.contains("at least one replica"),
        "{err}"
    );
    // Not a Redis URL.
    let (ok, err) = check(
        "url.toml",
        text.replacen("url = \"redis://", "url = \"http://", 1),
        "a",
    );
    assert!(!ok);
    assert!(
        err.contains("not a Redis URL") && err.contains("redis://"),
        "{err}"
    );
    // A PostgreSQL cluster named like the Redis groups' etcd keys.
    let clash = format!(
        "{text}[ha.postgres.redis.member.p]\nconninfo = \"host=127.0.0.1\"\ndata_dir = \"/tmp/p\"\n\n\
         [ha.postgres.redis.member.q]\nconninfo = \"host=127.0.0.1\"\ndata_dir = \"/tmp/q\"\n"
    );
    let (ok, err) = check("clash.toml", clash, "a");
    assert!(!ok);
    assert!(
        err.contains("[ha.postgres.redis]") && err.contains("rename"),
        "{err}"
    );
    // An unknown key.
    let (ok, err) = check("typo.toml", text.replacen("url =", "ulr =", 1), "a");
    assert!(!ok);
    assert!(err.contains("ulr") && err.contains("typo.toml:"), "{err}");
    // A hook that is no playbook action.
    let hook = format!("{text}[[ha.redis.cache.hook]]\ntype = \"teleport\"\n");
    let (ok, err) = check("hook.toml", hook, "a");
    assert!(!ok);
    assert!(
        err.contains("[[ha.redis.cache.hook]]") && err.contains("playbook action"),
        "{err}"
    );
    // No daemon runs: the status names the group and has no leader; a
    // switchover is refused as PostgreSQL-only.
    let o = g.dr(&["ha", "status"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("redis group cache") && out.contains("no leader"),
        "{out}"
    );
    let o = g.dr(&["ha", "switchover", "--to", "b"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("PostgreSQL-only") && err.contains("--group"),
        "{err}"
    );
    // One daemon may be a member of a PostgreSQL cluster and a Redis group;
    // the status then lists both engines.
    let both = format!(
        "{text}[ha.postgres.main.member.a]\nconninfo = \"host=127.0.0.1\"\ndata_dir = \"/tmp/a\"\n\n\
         [ha.postgres.main.member.p]\nconninfo = \"host=127.0.0.1\"\ndata_dir = \"/tmp/p\"\n"
    );
    let (ok, err) = check("both.toml", both.clone(), "a");
    assert!(ok, "{err}");
    let op = std::fs::read_to_string(&g.op_cfg).expect("operator cfg");
    let both_op = g.dir.path().join("both-op.toml");
    std::fs::write(&both_op, format!("{op}{}", &both[text.len()..])).expect("write");
    let o = std::process::Command::new(common::dr_bin())
        .arg("--config")
        .arg(&both_op)
        .args(["--json", "ha", "status"])
        .output()
        .expect("dr");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(s["postgres"][0]["cluster"], "main", "{s}");
    assert_eq!(s["redis"][0]["group"], "cache", "{s}");
    assert_eq!(s["redis"][0]["members"][1]["role"], "unknown", "{s}");
    // A member that is in no group.
    let (ok, err) = check("member.toml", text.clone(), "z");
    assert!(!ok);
    assert!(err.contains("--member") && err.contains("a, b"), "{err}");
}

#[test]
fn one_daemon_per_host_fails_over_both_its_postgres_cluster_and_its_redis_group() {
    let etcd = common::require_env("DR_TEST_ETCD_ENDPOINTS", "etcd");
    let dir = tempfile::tempdir().expect("tempdir");
    let ra = start_redis(dir.path(), "a", None);
    let rb = start_redis(dir.path(), "b", Some(ra.port));
    let redis = format!(
        "[ha.redis.cache.member.a]\nurl = \"{}\"\n\n[ha.redis.cache.member.b]\nurl = \"{}\"\n\n",
        ra.url(),
        rb.url()
    );
    let mut c = HaCluster::with_more(1, &etcd, &redis);
    c.start_all(SETTLE);
    c.wait("a leads the Redis group too", SETTLE, |c| {
        let s = c.status_json(&["--group", "cache"]);
        s["leader"] == "a" && s["members"][1]["link_up"] == true
    });
    let set = |port: u16| {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .and_then(|mut c| redis::cmd("SET").arg("k").arg("v").query::<()>(&mut c))
            .is_ok()
    };
    let b_port = rb.port;

    c.kill_daemon("a");
    c.crash_server("a");
    drop(ra);
    c.wait(
        "b accepts writes in both engines",
        TTL + LOOP_WAIT * 4 + SETTLE,
        |c| c.writable("b") && set(b_port),
    );
    c.wait("both failovers are audited", SETTLE, |c| {
        c.audited_ok("ha.failover").len() == 2
    });
    let mut targets: Vec<String> = c
        .audited_ok("ha.failover")
        .iter()
        .map(|r| format!("{}:{}", r["target"], r["details"]["member"]))
        .collect();
    targets.sort();
    assert_eq!(targets, ["\"main\":\"b\"", "\"redis/cache\":\"b\""]);
    drop(rb);
}

#[test]
fn with_etcd_down_nobody_is_promoted_the_master_fences_itself_and_serves_again_when_etcd_returns() {
    let mut etcd = OwnEtcd::start();
    let mut g = RedisGroup::with_etcd(1, &etcd.endpoint);
    g.start_all(SETTLE);
    write_acked(&g, "a", 10, 1);

    etcd.kill();
    let down = Instant::now();
    g.wait_with(&g, "a fences itself", TTL + SETTLE, |g| {
        g.set("a", "x", "1").is_err()
    });
    let fenced = down.elapsed();
    eprintln!("etcd down at 0s: a fenced at {fenced:.2?}");
    assert!(
        fenced < TTL,
        "a was fenced after its lease could expire ({fenced:?})"
    );
    // Well past the lease: nobody was promoted.
    while down.elapsed() < TTL + LOOP_WAIT * 3 {
        assert!(
            g.set("b", "x", "1").is_err(),
            "b was promoted without etcd\n{}",
            g.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    etcd.resume();
    g.wait_with(&g, "a serves writes again", SETTLE, |g| {
        g.set("a", "kept:back", "1").is_ok()
    });
    assert!(g.set("b", "x", "1").is_err(), "b accepts writes");
    g.wait_link("b", "a");
    g.wait_with(&g, "b has a's new write", SETTLE, |g| kept(g, "b") == 11);
    let s = g.status();
    assert_eq!(s["leader"], "a", "{s}");
    // a lifted its own fence (REPLICAOF NO ONE), audited as its promotion.
    g.wait_with(&g, "a's unfencing is audited", SETTLE, |g| {
        !g.audited_ok("ha.failover").is_empty()
    });
    let lifted = g.audited_ok("ha.failover");
    assert!(
        !lifted.is_empty() && lifted.iter().all(|r| r["details"]["member"] == "a"),
        "{lifted:?}"
    );
}
