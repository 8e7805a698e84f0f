//! Redis catalog (`dr list redis`) and restore (`dr restore redis`): the newest
//! snapshot at or before a time is decoded into `DIR/dump.rdb` (via a temp file
//! and a rename, so a failed restore never leaves a half-written dump), and
//! optionally served by a scratch `redis-server` whose key count is checked
//! against the manifest.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use super::RedisError;
use super::manifest::{DbKeys, RedisManifest, parse_keyspace};
use super::rdb::RdbCheck;
use crate::codec::Expect;
use crate::config::RedisConfig;
use crate::progress::Progress;
use crate::repo::Repository;
use crate::repo::layout::ObjectKey;

/// Snapshots of one instance, oldest first, plus manifests that could not be read.
pub type RedisCatalog = crate::repo::snapshots::Catalog<RedisManifest>;

/// What to restore and where.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Restore the newest snapshot at or before this time (`None`: newest).
    pub target: Option<DateTime<Utc>>,
    /// Directory for `dump.rdb` (created if absent).
    pub dir: PathBuf,
    /// Start `redis-server` on 127.0.0.1 at this port.
    pub start: Option<u16>,
}

/// Result of a restore.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// Snapshot restored.
    pub snapshot: String,
    /// Point in time of the snapshot.
    pub snapshot_time: DateTime<Utc>,
    /// Requested target (`None`: latest, reported as `"latest"`).
    #[serde(serialize_with = "target_or_latest")]
    pub target: Option<DateTime<Utc>>,
    /// The written dump.
    pub file: String,
    /// RDB bytes.
    pub size: u64,
    /// Region the data came from.
    pub region: String,
    /// Seconds to fetch, decode and write.
    pub restore_seconds: f64,
    /// Keys per database in the manifest.
    pub expected: std::collections::BTreeMap<u32, DbKeys>,
    /// Keys per database counted just after the fork (for [`compare_keys`]).
    #[serde(skip)]
    pub expected_after: std::collections::BTreeMap<u32, DbKeys>,
    /// Whether a server was started.
    pub started: bool,
    /// Its port.
    pub port: Option<u16>,
    /// Its pid.
    pub pid: Option<u32>,
    /// Seconds from start to answering with the dataset loaded.
    pub load_seconds: Option<f64>,
    /// Keys per database the started server reports.
    pub found: Option<std::collections::BTreeMap<u32, DbKeys>>,
    /// `None` when not started; otherwise whether the counts match (keys
    /// with a TTL may have expired since the snapshot).
    pub keys_match: Option<bool>,
    /// What the key check saw, for people.
    pub key_check: Option<String>,
}

/// Restores `instance` as described by `opts`.
pub async fn restore(
    repo: &Repository,
    instance: &str,
    cfg: &RedisConfig,
    opts: &RestoreOptions,
    progress: Arc<Progress>,
) -> Result<RestoreReport, RedisError> {
    let t0 = Instant::now();
    let cat = RedisCatalog::load(repo, instance).await?;
    let m = cat.pick(opts.target)?.clone();
    let file = opts.dir.join("dump.rdb");
    if file.exists() {
        return Err(RedisError::Other(format!(
            "{} already exists; restore into an empty directory or move the file away",
            file.display()
        )));
    }
    let created = !opts.dir.exists();
    crate::os::create_private_dir_all(&opts.dir)
        .map_err(|e| RedisError::Other(format!("cannot create {}: {e}", opts.dir.display())))?;
    progress.add_total(m.rdb.plain_size);
    let region = match fetch(repo, instance, &m, &opts.dir, &file, &progress).await {
        Ok(r) => r,
        Err(e) => {
            if created {
                let _ = tokio::fs::remove_dir_all(&opts.dir).await;
            }
            return Err(e);
        }
    };
    let mut report = RestoreReport {
        snapshot: m.id.clone(),
        snapshot_time: m.time,
        target: opts.target,
        file: file.display().to_string(),
        size: m.rdb.plain_size,
        region,
        restore_seconds: t0.elapsed().as_secs_f64(),
        expected: m.keyspace.clone(),
        expected_after: m
            .keyspace_after
            .clone()
            .unwrap_or_else(|| m.keyspace.clone()),
        started: false,
        port: None,
        pid: None,
        load_seconds: None,
        found: None,
        keys_match: None,
        key_check: None,
    };
    if let Some(port) = opts.start {
        let s = Instant::now();
        let pid = start_server(cfg, &opts.dir, port, m.rdb.plain_size).await?;
        let found = keyspace_of(&format!("redis://127.0.0.1:{port}/")).await?;
        let (ok, why) = compare_keys(&report.expected, &report.expected_after, &found);
        report.started = true;
        report.port = Some(port);
        report.pid = pid;
        report.load_seconds = Some(s.elapsed().as_secs_f64());
        report.found = Some(found);
        report.keys_match = Some(ok);
        report.key_check = Some(why);
    }
    Ok(report)
}

/// Decodes the RDB into a temp file, trying regions in order, then renames it.
/// Returns the serving region.
async fn fetch(
    repo: &Repository,
    instance: &str,
    m: &RedisManifest,
    dir: &Path,
    file: &Path,
    progress: &Progress,
) -> Result<String, RedisError> {
    let key = ObjectKey::RedisRdb {
        instance: instance.to_string(),
        snapshot: m
            .id
            .parse()
            .map_err(|e| RedisError::Other(format!("manifest has a bad snapshot id: {e}")))?,
    };
    let tmp = dir.join(format!(".dump.rdb.dr-partial-{}", std::process::id()));
    let expect = Expect::from_encoded(&key.to_string(), &m.rdb);
    let mut errors = Vec::new();
    for r in repo.regions.iter() {
        match fetch_from(repo, &r.name, &key, expect.clone(), &tmp, progress).await {
            Ok(()) => {
                tokio::fs::rename(&tmp, file)
                    .await
                    .map_err(|e| RedisError::Other(format!("rename to {}: {e}", file.display())))?;
                if let Ok(d) = tokio::fs::File::open(dir).await {
                    let _ = d.sync_all().await;
                }
                return Ok(r.name.clone());
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                tracing::warn!(region = %r.name, error = %e, "snapshot unreadable here; trying the next region");
                errors.push(format!("[{}] {e}", r.name));
            }
        }
    }
    Err(RedisError::Other(format!(
        "snapshot {} could not be read from any region: {}",
        m.id,
        errors.join("; ")
    )))
}

async fn fetch_from(
    repo: &Repository,
    region: &str,
    key: &ObjectKey,
    expect: Expect,
    tmp: &Path,
    progress: &Progress,
) -> Result<(), String> {
    let mut stream = repo
        .get_decoded_from(region, key, expect)
        .await
        .map_err(|e| e.to_string())?;
    let mut f = crate::os::private_file_async()
        .write(true)
        .create_new(true)
        .open(tmp)
        .await
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    let mut check = RdbCheck::new();
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        check.update(&chunk).map_err(|e| e.to_string())?;
        f.write_all(&chunk)
            .await
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        n += chunk.len() as u64;
        progress.add(chunk.len() as u64);
    }
    check.finish().map_err(|e| e.to_string())?;
    f.sync_all()
        .await
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    tracing::debug!(region, bytes = n, "snapshot decoded");
    Ok(())
}

/// Starts `redis-server` on `dir/dump.rdb`, loopback only, no persistence of
/// its own, and waits until the dataset is loaded. Returns its pid.
async fn start_server(
    cfg: &RedisConfig,
    dir: &Path,
    port: u16,
    size: u64,
) -> Result<Option<u32>, RedisError> {
    use crate::os::{as_user, chown_to, is_root};
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| RedisError::Other(format!("{}: {e}", dir.display())))?;
    let mut cmd = match &cfg.os_user {
        Some(u) if is_root() => {
            chown_to(&dir, u)
                .await
                .map_err(|e| RedisError::Other(e.to_string()))?;
            as_user(u, &cfg.server_bin)
        }
        _ => tokio::process::Command::new(&cfg.server_bin),
    };
    let pidfile = dir.join("redis.pid");
    let log = dir.join("redis.log");
    cmd.arg("--port")
        .arg(port.to_string())
        .arg("--bind")
        .arg("127.0.0.1")
        .arg("--protected-mode")
        .arg("yes")
        .arg("--dir")
        .arg(&dir)
        .arg("--dbfilename")
        .arg("dump.rdb")
        .arg("--save")
        .arg("")
        .arg("--appendonly")
        .arg("no")
        .arg("--daemonize")
        .arg("yes")
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("--logfile")
        .arg(&log)
        .stdin(std::process::Stdio::null());
    let out = cmd.output().await.map_err(|e| {
        RedisError::Other(format!(
            "cannot run {}: {e}; set server_bin in [redis.*]",
            cfg.server_bin.display()
        ))
    })?;
    if !out.status.success() {
        return Err(RedisError::Other(format!(
            "{} failed to start: {}{}",
            cfg.server_bin.display(),
            String::from_utf8_lossy(&out.stderr).trim(),
            log_tail(&log)
        )));
    }
    // Loading speed is well above 20 MiB/s; allow generously for big datasets.
    let limit = Duration::from_secs(60 + size / (20 << 20));
    let deadline = Instant::now() + limit;
    let url = format!("redis://127.0.0.1:{port}/");
    let mut last = String::new();
    while Instant::now() < deadline {
        let pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        if let Some(p) = pid
            && !Path::new(&format!("/proc/{p}")).exists()
        {
            return Err(RedisError::Other(format!(
                "redis-server exited while loading {}{}",
                dir.join("dump.rdb").display(),
                log_tail(&log)
            )));
        }
        match ping(&url).await {
            // The pid file can appear just after the server answers.
            Ok(()) => return Ok(pid.or(wait_for_pid(&pidfile).await)),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(RedisError::Other(format!(
        "redis-server on port {port} did not answer within {}s (last: {last}){}",
        limit.as_secs(),
        log_tail(&log)
    )))
}

async fn wait_for_pid(pidfile: &Path) -> Option<u32> {
    for _ in 0..100 {
        if let Some(p) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            return Some(p);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

async fn ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let _: String = redis::cmd("PING")
        .query_async(&mut c)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Keys per database of the server at `url` (`INFO keyspace`).
pub async fn keyspace_of(url: &str) -> Result<std::collections::BTreeMap<u32, DbKeys>, RedisError> {
    let err = |e: redis::RedisError| {
        RedisError::Other(format!("INFO keyspace on the restored server: {e}"))
    };
    let client = redis::Client::open(url).map_err(err)?;
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .map_err(err)?;
    let info: String = redis::cmd("INFO")
        .arg("keyspace")
        .query_async(&mut c)
        .await
        .map_err(err)?;
    Ok(parse_keyspace(&info))
}

/// Compares key counts with the two counts taken around the fork; keys with
/// a TTL may legitimately have expired since.
pub fn compare_keys(
    before: &std::collections::BTreeMap<u32, DbKeys>,
    after: &std::collections::BTreeMap<u32, DbKeys>,
    found: &std::collections::BTreeMap<u32, DbKeys>,
) -> (bool, String) {
    let mut problems = Vec::new();
    let mut expired = 0;
    let dbs: std::collections::BTreeSet<u32> = before
        .keys()
        .chain(after.keys())
        .chain(found.keys())
        .copied()
        .collect();
    for db in dbs {
        let b = before.get(&db).copied().unwrap_or_default();
        let a = after.get(&db).copied().unwrap_or_default();
        let (lo, hi) = (b.keys.min(a.keys), b.keys.max(a.keys));
        let ttl = b.expires.max(a.expires);
        let f = found.get(&db).map(|d| d.keys).unwrap_or(0);
        if (lo..=hi).contains(&f) {
            continue;
        }
        if f < lo && lo - f <= ttl {
            expired += lo - f;
            continue;
        }
        let expect = if lo == hi {
            format!("{lo}")
        } else {
            format!("{lo}..{hi}")
        };
        problems.push(format!("db{db}: manifest {expect} keys, server {f}"));
    }
    if !problems.is_empty() {
        return (
            false,
            format!("key count mismatch: {}", problems.join(", ")),
        );
    }
    let total: u64 = found.values().map(|d| d.keys).sum();
    if expired > 0 {
        (
            true,
            format!("{total} keys, matching the manifest ({expired} with a TTL expired since)"),
        )
    } else {
        (true, format!("{total} keys, matching the manifest"))
    }
}

fn log_tail(log: &Path) -> String {
    match std::fs::read_to_string(log) {
        Ok(s) => {
            let lines: Vec<&str> = s.lines().rev().take(5).collect();
            let tail: Vec<&str> = lines.into_iter().rev().collect();
            format!("; last lines of {}:\n{}", log.display(), tail.join("\n"))
        }
        Err(_) => String::new(),
    }
}

/// A JSON reader must tell "the newest snapshot" from a missing field.
fn target_or_latest<S: serde::Serializer>(
    t: &Option<DateTime<Utc>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => serde::Serialize::serialize(t, s),
        None => s.serialize_str("latest"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_counts_allow_only_expired_keys_to_be_missing() {
        let e = |k, x| DbKeys {
            keys: k,
            expires: x,
        };
        let exp = [(0, e(100, 5)), (1, e(3, 0))].into_iter().collect();
        let same = [(0, e(100, 5)), (1, e(3, 0))].into_iter().collect();
        assert!(compare_keys(&exp, &exp, &same).0);
        let expired = [(0, e(96, 1)), (1, e(3, 0))].into_iter().collect();
        let (ok, why) = compare_keys(&exp, &exp, &expired);
        assert!(ok, "{why}");
        assert!(why.contains("4 with a TTL"), "{why}");
        let lost = [(0, e(90, 0)), (1, e(3, 0))].into_iter().collect();
        assert!(!compare_keys(&exp, &exp, &lost).0);
        let extra = [(0, e(100, 5)), (1, e(3, 0)), (2, e(1, 0))]
            .into_iter()
            .collect();
        assert!(!compare_keys(&exp, &exp, &extra).0);
        // Writes between the two counts: anything in between is fine.
        let grew = [(0, e(110, 5)), (1, e(3, 0))].into_iter().collect();
        let mid = [(0, e(104, 5)), (1, e(3, 0))].into_iter().collect();
        assert!(compare_keys(&exp, &grew, &mid).0);
        let over = [(0, e(120, 0)), (1, e(3, 0))].into_iter().collect();
        let (ok, why) = compare_keys(&exp, &grew, &over);
        assert!(!ok && why.contains("100..110"), "{why}");
    }
}
