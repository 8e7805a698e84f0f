//! A host that holds only the public keys (no `identity_file`), against a
//! real PostgreSQL and Redis: `dr list` shows what the object names tell,
//! while `verify --list` and `expire`, which need the encrypted manifests,
//! refuse and say why.

mod common;

use std::path::{Path, PathBuf};

use common::pg::{TestPg, fs_repo};
use common::redis::{DrSetup, TestRedis};

/// The same config without `identity_file`, owned like the original.
fn without_identity(cfg: &Path, name: &str, owner: Option<&str>) -> PathBuf {
    let text = std::fs::read_to_string(cfg).expect("read config");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("identity_file"))
        .collect();
    assert!(
        kept.len() < text.lines().count(),
        "no identity_file in {text}"
    );
    let out = cfg.with_file_name(name);
    std::fs::write(&out, kept.join("\n") + "\n").expect("write config");
    if let Some(user) = owner {
        common::pg::chown(&out, user);
    }
    out
}

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

#[test]
fn a_backup_only_host_lists_by_name_and_says_why_verify_and_expire_need_the_key() {
    let repo = tempfile::tempdir().expect("tempdir");
    let pg = TestPg::new(&fs_repo(&repo));
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.dr(&["backup", "pg"]);
    pg.pgbench(&["-t", "100", "-n"]);
    pg.archive_now();
    let with_key = json(&pg.dr(&["--json", "list", "pg"]));
    let id = with_key["backups"][0]["id"].as_str().expect("backup id");
    let cfg = without_identity(&pg.cfg, "public.toml", Some(&pg.user));

    let v = json(&pg.dr_with(&cfg, &["--json", "list", "pg"]));
    assert_eq!(v["keys_only"], true, "{v}");
    assert!(
        v["note"]
            .as_str()
            .is_some_and(|n| n.contains("private key")),
        "{v}"
    );
    let b = &v["backups"][0];
    assert_eq!(b["id"], id, "{v}");
    assert_eq!(b["complete"], true, "{v}");
    assert!(b["objects"].as_u64().is_some_and(|n| n >= 2), "{v}");
    assert!(b["stored_bytes"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert_eq!(v["wal_segments"], with_key["wal_segments"], "{v}");
    let ranges = v["wal_ranges"].as_array().expect("wal ranges");
    assert!(
        !ranges.is_empty() && ranges.iter().all(|r| r["timeline"] == 1),
        "{v}"
    );
    let text = pg.dr_with(&cfg, &["list", "pg"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(id) && text.contains("timeline 1: ") && text.contains("note: "),
        "{text}"
    );

    for (args, says) in [
        (&["verify", "--list"][..], "verify needs the private key"),
        (&["expire"][..], "expire needs the private key"),
        (&["expire", "--dry-run"][..], "expire needs the private key"),
    ] {
        let o = pg.dr_raw_with(&cfg, args);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "dr {args:?} must refuse: {e}");
        assert!(e.contains(says) && e.contains("identity_file"), "{e}");
    }
}

#[test]
fn a_backup_only_host_lists_redis_snapshots_by_name() {
    let redis = TestRedis::start(&[]);
    redis.populate(100);
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = DrSetup::new(
        &common::fs_region_toml("local", &dir.path().join("repo")),
        &format!("[redis.cache]\nurl = \"{}\"\n", redis.url()),
    );
    setup.dr(&["backup", "redis"]);
    let with_key = json(&setup.dr(&["--json", "list", "redis"]));
    let id = with_key["snapshots"][0]["id"]
        .as_str()
        .expect("snapshot id");
    let cfg = without_identity(&setup.cfg, "public.toml", None);
    let o = std::process::Command::new(common::dr_bin())
        .arg("--config")
        .arg(&cfg)
        .args(["--json", "list", "redis"])
        .output()
        .expect("run dr");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = json(&o);
    assert_eq!(v["keys_only"], true, "{v}");
    assert_eq!(v["snapshots"][0]["id"], id, "{v}");
    assert_eq!(v["snapshots"][0]["complete"], true, "{v}");
    assert!(
        v["snapshots"][0]["objects"]
            .as_u64()
            .is_some_and(|n| n >= 2),
        "{v}"
    );
}
