//! `dr report` and the drill's HTML report in a real headless browser
//! (Debian's chromium): a repository with backups, archived WAL with a gap,
//! a verified restore and a drill; the pages load without a console message
//! (they carry no script, so any message is a failure: a blocked resource,
//! a parse error), show the expected sources, gaps and numbers, reach
//! nothing outside the file, and a screenshot of each lands in the CI
//! artifacts directory.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg::{TestPg, chown, fs_repo};

/// `${DR_ARTIFACTS_DIR:-$CARGO_TARGET_DIR/artifacts}` (created).
fn artifacts_dir() -> PathBuf {
    let dir = match std::env::var_os("DR_ARTIFACTS_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("target")
                .into()
        }))
        .join("artifacts"),
    };
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

fn chromium_bin() -> PathBuf {
    for p in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!(
        "chromium is not installed: run scripts/setup.sh (or apt-get install chromium); \
         the report tests need a real browser and are not skipped"
    );
}

/// What headless Chromium made of one page.
struct Rendered {
    /// The DOM after load (`--dump-dom`).
    dom: String,
    /// Console messages and page errors from Chromium's log.
    console: Vec<String>,
}

/// Runs headless Chromium on `page` with a fresh profile, no network
/// services, logging to stderr; `extra` adds e.g. `--screenshot=…`.
fn chromium(page: &Path, extra: &[String]) -> (String, String) {
    let profile = tempfile::tempdir().expect("profile dir");
    let mut child = Command::new(chromium_bin())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 120 s on {}", page.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (
        reader.join().expect("stdout reader"),
        err_reader.join().expect("stderr reader"),
    )
}

/// Loads `page`, dumps its DOM and takes a screenshot to `shot`.
fn render(page: &Path, shot: &Path) -> Rendered {
    let (dom, log) = chromium(page, &["--dump-dom".to_string()]);
    let console = console_lines(&log);
    let (_, log2) = chromium(
        page,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,2600".to_string(),
            "--hide-scrollbars".to_string(),
        ],
    );
    let mut console = console;
    console.extend(console_lines(&log2));
    let png =
        std::fs::read(shot).unwrap_or_else(|e| panic!("no screenshot {}: {e}", shot.display()));
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} is not a real screenshot ({} bytes)",
        shot.display(),
        png.len()
    );
    Rendered { dom, console }
}

/// Console messages (any level: the pages carry no script) and uncaught
/// errors from Chromium's stderr log.
fn console_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            l.contains(":CONSOLE") || l.contains("Uncaught") || l.contains("ERR_FILE_NOT_FOUND")
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn the_console_check_catches_a_page_that_logs_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let page = dir.path().join("bad.html");
    std::fs::write(
        &page,
        "<!DOCTYPE html><html><body><p>x</p><img src=\"missing.png\"><script>console.error('boom')</script></body></html>",
    )
    .expect("page");
    let (_, log) = chromium(&page, &["--dump-dom".to_string()]);
    let lines = console_lines(&log);
    assert!(
        lines.iter().any(|l| l.contains("boom")),
        "a console.error must be seen: {lines:?}\n{log}"
    );
}

#[test]
fn report_and_drill_html_render_in_a_real_browser_with_windows_gaps_and_numbers() {
    let artifacts = artifacts_dir();
    let repo = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&repo));
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "200", "-n"]);
    pg.archive_now();
    let scratch = pg.dir.path().join("scratch");
    let drills = pg.dir.path().join("drills");
    for d in [&scratch, &drills] {
        std::fs::create_dir_all(d).expect("mkdir");
        chown(d, &pg.user);
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&pg.cfg)
        .expect("config");
    std::io::Write::write_all(
        &mut f,
        format!(
            "[postgres.main.verify]\nscratch_dir = \"{}\"\nmax_replay_lag_seconds = 3600\n\n\
             [drill.nightly]\npostgres = [\"main\"]\nto = \"latest\"\nrto_seconds = 900\nrpo_seconds = 3600\nreport_dir = \"{}\"\n",
            scratch.display(),
            drills.display()
        )
        .as_bytes(),
    )
    .expect("append");
    drop(f);

    let v = common::json_of(&pg.dr(&["--json", "verify", "pg", "main", "--restore"]));
    let verify_rto = v["verify_restore"]["sources"][0]["rto_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("verify JSON without an RTO: {v:#}"));
    let o = pg.dr(&["--json", "drill", "nightly"]);
    let drill = common::json_of(&o);
    assert_eq!(drill["drill"]["ok"], true, "{drill:#}");
    let files: Vec<String> = drill["drill"]["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    let drill_html = files
        .iter()
        .find(|f| f.ends_with(".html"))
        .unwrap_or_else(|| panic!("the drill wrote no HTML: {files:?}"));
    assert!(files.iter().any(|f| f.ends_with(".json")) && files.iter().any(|f| f.ends_with(".md")));

    // More WAL, then one archived segment in the middle goes missing.
    for i in 0..4 {
        pg.sql(&format!(
            "CREATE TABLE gap{i} AS SELECT generate_series(1, 1000) AS n"
        ));
        pg.archive_now();
    }
    let wal = common::wal_objects(&repo.path().join("repo"));
    assert!(wal.len() >= 5, "{wal:?}");
    let victim = &wal[wal.len() - 3];
    let missing = common::segment_of(victim);
    std::fs::remove_file(victim).expect("remove a segment");

    let out = pg.dir.path().join("report.html");
    let r = common::json_of(&pg.dr(&["--json", "report", "--out", out.to_str().expect("utf8")]));
    let src = &r["report"]["sources"][0];
    assert_eq!(src["engine"], "postgres", "{r:#}");
    assert_eq!(src["name"], "main");
    assert_eq!(src["backups"].as_array().map(Vec::len), Some(1), "{src:#}");
    let gaps = src["gaps"].as_array().expect("gaps");
    assert_eq!(gaps.len(), 1, "{src:#}");
    assert_eq!(gaps[0]["first_missing"], missing.as_str());
    assert_eq!(gaps[0]["missing"], 1);
    let kinds: Vec<&str> = src["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter_map(|x| x["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["verify", "drill"], "{src:#}");
    assert_eq!(r["report"]["drills"].as_array().map(Vec::len), Some(1));

    let html = std::fs::read_to_string(&out).expect("report file");
    for external in [
        "http://", "https://", "src=", "<link", "<script", "@import", "url(",
    ] {
        assert!(
            !html.contains(external),
            "the report refers outside itself: {external}"
        );
    }
    let page = render(&out, &artifacts.join("dr-report.png"));
    assert!(
        page.console.is_empty(),
        "console messages: {:#?}",
        page.console
    );
    let dom = &page.dom;
    for want in [
        "data-source=\"main\"",
        "class=\"gap\"",
        "WAL gaps: no restore can replay across these",
        missing.as_str(),
        "Latest verification",
        "Latest drill",
        "class=\"trend\"",
        "class=\"rto\"",
        "class=\"window\"",
        "class=\"wal\"",
        "timeline 1",
        &dr::verify::report::secs(Some(verify_rto)),
    ] {
        assert!(dom.contains(want), "the rendered report lacks {want:?}");
    }
    // The archived WAL is drawn in two pieces, broken at the gap.
    assert_eq!(dom.matches("class=\"wal\"").count(), 2);
    // Two results on the trend: the verification and the drill.
    assert_eq!(dom.matches("class=\"rto\"").count(), 2);

    let drill_page = render(Path::new(drill_html), &artifacts.join("dr-drill.png"));
    assert!(
        drill_page.console.is_empty(),
        "console messages: {:#?}",
        drill_page.console
    );
    for want in ["nightly", "PASSED", "RTO objective", "promoted"] {
        assert!(
            drill_page.dom.contains(want),
            "the drill page lacks {want:?}"
        );
    }
    eprintln!(
        "screenshots: {} {}",
        artifacts.join("dr-report.png").display(),
        artifacts.join("dr-drill.png").display()
    );
}
