//! Unit tests of the daemon's state and its Prometheus text.

use super::*;
use crate::schedule::Cron;

fn job(name: &str, kind: JobKind) -> JobSpec {
    JobSpec {
        name: name.into(),
        kind,
        source: "main".into(),
        cron: Cron::parse("* * * * * *").expect("cron"),
    }
}

#[test]
fn runs_show_in_metrics_and_health() {
    let s = Shared::new(2);
    s.set_jobs(&[job("postgres.main.backup", JobKind::PgBackup)]);
    assert!(s.try_start("postgres.main.backup"));
    assert!(
        !s.try_start("postgres.main.backup"),
        "overlap must be refused"
    );
    let ok = JobOutcome {
        id: "x".into(),
        bytes: 1234,
        regions: vec!["a".into(), "b".into()],
        degraded: vec![("b".into(), "connection refused".into())],
        rto_seconds: None,
        rpo_seconds: None,
    };
    s.finish("postgres.main.backup", 2.5, Ok(&ok));
    let text = s.with(|st| st.render(Utc::now()));
    let labels = r#"{name="postgres.main.backup",kind="backup",source="main"}"#;
    assert!(
        text.contains(&format!("dr_job_last_bytes{labels} 1234\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("dr_job_skipped_total{labels} 1\n")),
        "{text}"
    );
    assert!(
        text.contains(&format!("dr_job_running{labels} 0\n")),
        "{text}"
    );
    assert!(
        text.contains("dr_region_write_degraded{region=\"b\"} 1\n"),
        "{text}"
    );
    assert!(!text.contains("dr_verified_restore_rto_seconds"), "{text}");
    let p = s.with(|st| st.problems(Utc::now()));
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("region b missed writes"), "{p:?}");

    for _ in 0..2 {
        assert!(s.try_start("postgres.main.backup"));
        s.finish("postgres.main.backup", 0.1, Err("refused".into()));
    }
    let p = s.with(|st| st.problems(Utc::now()));
    assert!(
        p.iter()
            .any(|m| m.contains("failed 2 times in a row; last error: refused")),
        "{p:?}"
    );
    let text = s.with(|st| st.render(Utc::now()));
    assert!(
        text.contains(&format!("dr_job_failures_total{labels} 2\n")),
        "{text}"
    );
    assert!(text.contains("dr_daemon_healthy 0\n"), "{text}");
}

#[test]
fn verify_gauges_appear_once_a_verify_job_succeeds() {
    let s = Shared::new(3);
    s.set_jobs(&[job("postgres.main.verify", JobKind::PgVerify)]);
    assert!(s.try_start("postgres.main.verify"));
    let ok = JobOutcome {
        rto_seconds: Some(42.0),
        ..Default::default()
    };
    s.finish("postgres.main.verify", 50.0, Ok(&ok));
    let text = s.with(|st| st.render(Utc::now()));
    assert!(
        text.contains("dr_verified_restore_rto_seconds{source=\"main\"} 42\n"),
        "{text}"
    );
}

#[test]
fn catalog_failover_and_schedule_gauges_render_with_their_labels() {
    let s = Shared::new(3);
    s.set_jobs(&[JobSpec {
        cron: Cron::parse("0 2 * * 1-5").expect("cron"),
        ..job("postgres.main.backup", JobKind::PgBackup)
    }]);
    let t = DateTime::from_timestamp(1_700_000_000, 0).expect("time");
    s.with(|st| {
        st.catalogs.insert(
            ("postgres".into(), "main".into()),
            CatalogStats {
                window_start: Some(t),
                window_end: Some(t + chrono::Duration::seconds(60)),
                newest_backup: Some(t),
                backups: 2,
                wal_gaps: 1,
                error: None,
            },
        );
        st.catalogs.insert(
            ("redis".into(), "cache".into()),
            CatalogStats {
                error: Some("unreachable".into()),
                ..Default::default()
            },
        );
        st.failovers.insert(("prod".into(), "ok".into()), 2);
        st.last_failover.insert("prod".into(), t);
    });
    let text = s.with(|st| st.render(Utc::now()));
    for want in [
        "dr_job_schedule_interval_seconds{name=\"postgres.main.backup\",kind=\"backup\",source=\"main\"} 259200\n",
        "dr_recoverable_window_start_timestamp_seconds{engine=\"postgres\",source=\"main\"} 1700000000\n",
        "dr_recoverable_window_end_timestamp_seconds{engine=\"postgres\",source=\"main\"} 1700000060\n",
        "dr_last_backup_timestamp_seconds{engine=\"postgres\",source=\"main\"} 1700000000\n",
        "dr_repository_backups{engine=\"postgres\",source=\"main\"} 2\n",
        "dr_wal_gap_segments{engine=\"postgres\",source=\"main\"} 1\n",
        "dr_catalog_up{engine=\"redis\",source=\"cache\"} 0\n",
        "dr_failovers_total{env=\"prod\",outcome=\"ok\"} 2\n",
        "dr_last_failover_timestamp_seconds{env=\"prod\"} 1700000000\n",
    ] {
        assert!(text.contains(want), "{want} missing in:\n{text}");
    }
    // An unreadable catalog reports no count and no window.
    assert!(
        !text.contains("dr_repository_backups{engine=\"redis\""),
        "{text}"
    );
    assert!(
        !text.contains("dr_wal_gap_segments{engine=\"redis\""),
        "{text}"
    );
}

#[test]
fn failover_members_show_in_metrics_only_with_ha() {
    let s = Shared::new(2);
    let text = s.with(|st| st.render(Utc::now()));
    assert!(!text.contains("dr_ha_"), "{text}");
    let ha = s.with(|st| st.ha.clone());
    ha.update("main", "b", |m| {
        m.role = "primary".into();
        m.leader = true;
        m.timeline = 2;
        m.lag_bytes = Some(0);
        m.failovers.ok = 1;
        m.renewals.ok = 7;
        m.renewals.failed = 1;
        m.lease_expires = Some(std::time::Instant::now() + std::time::Duration::from_secs(60));
    });
    let text = s.with(|st| st.render(Utc::now()));
    let b = r#"cluster="main",member="b""#;
    for want in [
        format!("dr_ha_leader{{{b}}} 1\n"),
        format!("dr_ha_timeline{{{b}}} 2\n"),
        format!("dr_ha_member_role{{{b},role=\"primary\"}} 1\n"),
        format!("dr_ha_member_role{{{b},role=\"standby\"}} 0\n"),
        format!("dr_ha_failovers_total{{{b},outcome=\"ok\"}} 1\n"),
        format!("dr_ha_failovers_total{{{b},outcome=\"failed\"}} 0\n"),
        format!("dr_ha_lease_renewals_total{{{b},outcome=\"failed\"}} 1\n"),
        format!("dr_ha_fences_total{{{b}}} 0\n"),
    ] {
        assert!(text.contains(&want), "no {want:?} in {text}");
    }
    let left = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("dr_ha_lease_seconds_left{{{b}}} ")))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(left.is_some_and(|l| l > 50.0 && l <= 60.0), "{left:?}");
}

#[test]
fn start_delays_are_a_cumulative_histogram() {
    let s = Shared::new(2);
    s.set_jobs(&[job("redis.cache.snapshot", JobKind::RedisSnapshot)]);
    for d in [0.01, 0.3, 1.5, 400.0] {
        s.started("redis.cache.snapshot", d);
    }
    let text = s.with(|st| st.render(Utc::now()));
    let l = r#"name="redis.cache.snapshot",kind="snapshot",source="main""#;
    for (le, n) in [
        ("0.05", 1),
        ("0.5", 2),
        ("1", 2),
        ("2.5", 3),
        ("300", 3),
        ("+Inf", 4),
    ] {
        let line = format!("dr_job_start_delay_seconds_bucket{{{l},le=\"{le}\"}} {n}\n");
        assert!(text.contains(&line), "missing {line} in {text}");
    }
    assert!(text.contains(&format!("dr_job_start_delay_seconds_count{{{l}}} 4\n")));
    assert!(text.contains(&format!("dr_job_start_delay_seconds_sum{{{l}}} 401.81\n")));
}
