//! Controlling a staging Redis server: stop it, put the snapshot in place,
//! start it again and wait until the data is loaded.

use super::*;

#[allow(clippy::too_many_arguments)]
pub(super) async fn redis_steps(
    repo: &Repository,
    instance: &str,
    cfg: &RedisConfig,
    t: &RedisTarget,
    dir: &Path,
    conf: &Path,
    target: Option<DateTime<Utc>>,
    t0: Instant,
    rep: &mut SourceReport,
) -> Result<(), (&'static str, String)> {
    use crate::redis::restore::{self, RestoreOptions as RedisRestore};
    // Decoded next to the data file so the move into place is a rename.
    let tmp = dir.join(format!(
        ".dr-drill-{}",
        crate::repo::layout::BackupId::new(Utc::now())
    ));
    let opts = RedisRestore {
        target,
        dir: tmp.clone(),
        start: None,
    };
    let progress = crate::progress::Progress::new();
    let mut r = match restore::restore(repo, instance, cfg, &opts, progress).await {
        Ok(r) => r,
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            return Err(("restore", e.to_string()));
        }
    };
    let client = redis::Client::open(t.url.as_str()).map_err(|e| ("restore", e.to_string()))?;
    let s = Instant::now();
    let shutdown = shutdown_redis(&client).await;
    let placed = shutdown.and_then(|note| {
        let file = dir.join(&t.dbfilename);
        std::fs::rename(tmp.join("dump.rdb"), &file)
            .map_err(|e| format!("cannot move the snapshot to {}: {e}", file.display()))?;
        let _ = std::fs::remove_dir_all(&tmp);
        Ok(note)
    });
    match placed {
        Ok(note) => rep.checks.push(CheckResult::pass(
            "staging stopped",
            note,
            s.elapsed().as_secs_f64(),
        )),
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            return Err(("staging stopped", e));
        }
    }
    let s = Instant::now();
    let file = dir.join(&t.dbfilename);
    if let Some(u) = &t.os_user {
        crate::postgres::server::chown_to(&file, u)
            .await
            .map_err(|e| ("start", e.to_string()))?;
    }
    start_redis(t, dir, conf).await.map_err(|e| ("start", e))?;
    wait_loaded(&client, r.size)
        .await
        .map_err(|e| ("start", e))?;
    let found = restore::keyspace_of(&t.url)
        .await
        .map_err(|e| ("key counts", e.to_string()))?;
    let (ok, why) = restore::compare_keys(&r.expected, &r.expected_after, &found);
    r.started = true;
    r.load_seconds = Some(s.elapsed().as_secs_f64());
    r.found = Some(found);
    r.keys_match = Some(ok);
    r.key_check = Some(why);
    crate::verify::redis::record_restore(rep, &r, t0, &t.url, cfg).await;
    if wants_aof(conf) {
        let s = Instant::now();
        rep.checks.push(match enable_aof(&client).await {
            Ok(()) => CheckResult::pass(
                "append-only file",
                "appendonly turned back on as the config file wants: the AOF was rewritten from the restored data",
                s.elapsed().as_secs_f64(),
            ),
            Err(e) => CheckResult::fail("append-only file", e, s.elapsed().as_secs_f64()),
        });
    }
    Ok(())
}

pub(super) async fn conn(
    client: &redis::Client,
) -> Result<redis::aio::MultiplexedConnection, String> {
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(PROBE_TIMEOUT))
        .set_response_timeout(Some(Duration::from_secs(60)));
    client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .map_err(|e| e.to_string())
}

/// `SHUTDOWN NOSAVE` and wait until the server is gone. A server that does
/// not answer is taken as stopped (it will be started on the snapshot).
pub(super) async fn shutdown_redis(client: &redis::Client) -> Result<String, String> {
    let Ok(mut c) = conn(client).await else {
        return Ok("the staging server was not running".into());
    };
    let pid = redis_identity(client)
        .await
        .ok()
        .flatten()
        .and_then(|i| i.pid);
    // The server closes the connection instead of replying.
    let _: Result<(), _> = redis::cmd("SHUTDOWN")
        .arg("NOSAVE")
        .query_async(&mut c)
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let gone = match pid {
            Some(p) => !Path::new(&format!("/proc/{p}")).exists(),
            None => conn(client).await.is_err(),
        };
        if gone {
            return Ok(format!(
                "stopped the staging server{} with SHUTDOWN NOSAVE",
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
            ));
        }
        if Instant::now() > deadline {
            return Err("the staging server still runs 60s after SHUTDOWN NOSAVE".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) async fn start_redis(t: &RedisTarget, dir: &Path, conf: &Path) -> Result<(), String> {
    use crate::postgres::server::{as_user, is_root};
    let mut cmd = match &t.os_user {
        Some(u) if is_root() => as_user(u, &t.server_bin),
        _ => tokio::process::Command::new(&t.server_bin),
    };
    // Daemonized, so it outlives the drill and no signal to dr reaches it.
    let out = cmd
        .arg(conf)
        .args(["--daemonize", "yes", "--appendonly", "no"])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}; set server_bin", t.server_bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed: {}{}",
            t.server_bin.display(),
            conf.display(),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    Ok(())
}

/// Waits until the server answers PING (it replies LOADING until then).
pub(super) async fn wait_loaded(client: &redis::Client, size: u64) -> Result<(), String> {
    let limit = Duration::from_secs(60 + size / (20 << 20));
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(mut c) = conn(client).await {
            match redis::cmd("PING").query_async::<String>(&mut c).await {
                Ok(_) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "the staging server did not answer with the snapshot loaded within {}s (last: {last}); see its log",
        limit.as_secs()
    ))
}

/// Whether the config file turns the append-only file on (last setting wins).
pub(super) fn wants_aof(conf: &Path) -> bool {
    let text = std::fs::read_to_string(conf).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some(k), Some(v)) if k.eq_ignore_ascii_case("appendonly") => {
                    Some(v.trim_matches('"').eq_ignore_ascii_case("yes"))
                }
                _ => None,
            }
        })
        .next_back()
        .unwrap_or(false)
}

pub(super) async fn enable_aof(client: &redis::Client) -> Result<(), String> {
    let mut c = conn(client).await?;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendonly")
        .arg("yes")
        .query_async(&mut c)
        .await
        .map_err(|e| format!("CONFIG SET appendonly yes: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(&mut c)
            .await
            .map_err(|e| format!("INFO persistence: {e}"))?;
        let m = info_map(&info);
        let is = |k: &str, v: &str| m.get(k).is_some_and(|x| x == v);
        if is("aof_enabled", "1")
            && is("aof_rewrite_in_progress", "0")
            && is("aof_rewrite_scheduled", "0")
        {
            return if is("aof_last_bgrewrite_status", "ok") {
                Ok(())
            } else {
                Err("the AOF rewrite failed; see the server's log".into())
            };
        }
        if Instant::now() > deadline {
            return Err("the AOF rewrite did not finish within 600s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
