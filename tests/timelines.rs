//! Restoring again and again: every `--start` with archiving left on pushes
//! a new timeline into the repository, and the next restore must still land
//! exactly on the history that holds its target. Real PostgreSQL 15, fs
//! repository.

mod common;

use common::pg::{Mark, TestPg, free_port, fs_repo, mark};

/// `dr restore pg --to <to> --start` with archiving left on (the restored
/// server archives into the same repository), checked against `m`.
fn restore_exact_archiving(
    pg: &mut TestPg,
    to: &str,
    name: &str,
    m: &Mark,
) -> (u16, serde_json::Value) {
    let dir = pg.target(name);
    let port = free_port();
    pg.track(dir.clone());
    let o = pg.restore_raw(
        to,
        &dir,
        &["--json", "--start", "--port", &port.to_string()],
    );
    assert!(
        o.status.success(),
        "restore {to}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        pg.sql_at(port, "SELECT sum(abalance) FROM pgbench_accounts"),
        m.balance,
        "balance at {to}: {v}"
    );
    assert_eq!(
        pg.sql_at(port, "SELECT count(*) FROM pgbench_history"),
        m.history,
        "history at {to}"
    );
    (port, v["restore"].clone())
}

#[test]
fn successive_restores_with_archiving_land_on_the_right_timeline() {
    let fs = tempfile::tempdir().expect("tempdir");
    let mut pg = TestPg::new(&fs_repo(&fs));
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    let mut marks = Vec::new();
    for _ in 0..3 {
        pg.pgbench(&["-t", "200", "-n"]);
        marks.push(mark(&pg));
    }
    // A commit after the last mark, so recovery can see it was reached.
    pg.pgbench(&["-t", "20", "-n"]);
    pg.archive_now();

    // Three restores in a row, each promoted with archiving on: each leaves
    // a timeline behind, and none may mislead the next.
    for (i, m) in marks.iter().enumerate() {
        let (port, r) = restore_exact_archiving(&mut pg, &m.at, &format!("r{i}"), m);
        assert_eq!(r["recovery_timeline"], 1, "{r}");
        assert_eq!(r["timeline"], i as u64 + 2, "{r}");
        assert_ne!(r["archive_mode"], "off", "{r}");
        if i == 2 {
            // This copy lives on and archives WAL of its own: a real branch.
            pg.pgbench_at(port, &["-t", "100", "-n"]);
            pg.archive_now_at(port);
        }
        pg.stop(&pg.target(&format!("r{i}")));
    }

    // Production goes on, on timeline 1.
    pg.pgbench(&["-t", "200", "-n"]);
    let last = mark(&pg);
    pg.pgbench(&["-t", "20", "-n"]);
    let final_history = pg.sql("SELECT count(*) FROM pgbench_history");
    pg.archive_now();

    let o = pg.dr(&["--json", "list", "pg"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let tls = v["timelines"].as_array().expect("timelines");
    let t4 = tls
        .iter()
        .find(|t| t["id"] == 4)
        .unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(t4["history"][0]["parent"], 1, "{t4}");
    assert!(
        t4["switch_time"].is_string() && t4["segments"].as_u64() >= Some(1),
        "{t4}"
    );
    let o = pg.dr(&["list", "pg"]);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        text.contains("TIMELINE") && text.contains("SWITCH LSN"),
        "{text}"
    );

    // The marks again: timeline 1 holds them, whatever branches exist now.
    for (i, m) in marks.iter().enumerate() {
        let (_, r) = restore_exact_archiving(&mut pg, &m.at, &format!("again{i}"), m);
        assert_eq!(r["recovery_timeline"], 1, "{r}");
        pg.stop(&pg.target(&format!("again{i}")));
    }

    // `latest`: two histories diverged and both went on; dr will not guess.
    let dir = pg.target("latest");
    let o = pg.restore_raw("latest", &dir, &[]);
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("ambiguous")
            && e.contains("timeline 1")
            && e.contains("timeline 4")
            && e.contains("--timeline"),
        "{e}"
    );
    assert!(!dir.exists(), "nothing written");
    let dir = pg.target("latest1");
    let port = free_port();
    pg.track(dir.clone());
    let p = port.to_string();
    let o = pg.restore_raw(
        "latest",
        &dir,
        &[
            "--json",
            "--timeline",
            "1",
            "--start",
            "--port",
            &p,
            "--no-archive",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        pg.sql_at(port, "SELECT count(*) FROM pgbench_history"),
        final_history
    );
    let r = &v["restore"];
    assert_eq!(r["recovery_timeline"], 1, "{r}");
    assert_eq!(
        r["archive_mode"], "off",
        "--no-archive copies archive nothing: {r}"
    );

    // A target on the branch's own stretch: named, not guessed either.
    let bad = pg.restore_raw(&last.at, &pg.target("t4"), &["--timeline", "4"]);
    let e = String::from_utf8_lossy(&bad.stderr).into_owned();
    assert!(!bad.status.success() && e.contains("timeline 4"), "{e}");
}
