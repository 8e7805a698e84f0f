//! Drills into an existing staging environment (`[drill.*] environment =
//! "<env>"`): each source is restored into the `[env.<env>]` server of the
//! same name, which is stopped, overwritten and started again on the
//! restored data, and stays running afterwards.
//!
//! The drill destroys the staging servers' data, so before anything is
//! touched every target must pass [`preflight`]: the environment allows
//! overwriting, no target is (or lies inside) a protected server — any
//! `[postgres.*]`/`[redis.*]` source or a server of an environment without
//! `allow_overwrite` — by address or data directory, and the server that
//! answers at a target's address is the one on its data directory and is
//! not a production server reached under another name. A restored staging
//! cluster shares production's system identifier, so identity is the pair
//! (system identifier, postmaster start time) for PostgreSQL and `run_id`
//! for Redis: both belong to one running process.

use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::checks::PgAt;
use super::report::{CheckResult, SourceReport};
use crate::config::{
    Config, ConfigError, DrillConfig, PgConfig, PgTarget, RedisConfig, RedisTarget,
};
use crate::postgres::restore::{ExtraTarget, RestoreOptions, Target};
use crate::repo::Repository;

/// Files of a staging cluster that stay its own: without them the restored
/// cluster would start with production's port, access rules and archiving.
pub const KEPT_PG_FILES: [&str; 4] = [
    "postgresql.conf",
    "postgresql.auto.conf",
    "pg_hba.conf",
    "pg_ident.conf",
];

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

const INTERRUPTED_PG: &str = "stopped by a signal before the checks finished; \
                              the staging server may be left stopped or recovering";
const INTERRUPTED_REDIS: &str =
    "stopped by a signal before the checks finished; the staging server may be left stopped";

/// Host and port a PostgreSQL conninfo reaches, the host normalised so that
/// loopback names and socket directories compare equal (`local`).
pub fn pg_endpoint(conninfo: &str) -> Option<(String, u16)> {
    let split = crate::postgres::tls::split(conninfo).ok()?;
    let pc: tokio_postgres::Config = split.conninfo.parse().ok()?;
    let host = match pc.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => normal_host(h),
        _ => "local".to_string(),
    };
    Some((host, pc.get_ports().first().copied().unwrap_or(5432)))
}

/// Host and port a Redis URL reaches, normalised as [`pg_endpoint`] does.
pub fn redis_endpoint(url: &str) -> Option<(String, u16)> {
    let u = url::Url::parse(url).ok()?;
    let host = u.host_str()?.trim_start_matches('[').trim_end_matches(']');
    Some((normal_host(host), u.port().unwrap_or(6379)))
}

fn normal_host(h: &str) -> String {
    let h = h.to_ascii_lowercase();
    match h.as_str() {
        "" | "localhost" | "::1" | "0.0.0.0" | "::" => "local".into(),
        _ if h.starts_with("127.") || h.starts_with('/') => "local".into(),
        _ => h,
    }
}

/// `p` without `.` and `..` components (no file system access).
fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The path with symlinks resolved when it exists, else lexically cleaned.
fn resolved(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| lexical(p))
}

/// True when one directory is the other or lies inside it.
fn overlaps(a: &Path, b: &Path) -> bool {
    let (a, b) = (resolved(a), resolved(b));
    a.starts_with(&b) || b.starts_with(&a)
}

/// A server as the config describes it: a staging target, or one the drill
/// must never touch.
struct Server {
    what: String,
    endpoint: Option<(String, u16)>,
    dir: Option<PathBuf>,
}

impl Server {
    fn pg(what: String, t: &PgTarget) -> Server {
        Server {
            what,
            endpoint: pg_endpoint(&t.conninfo),
            dir: t.data_dir.clone(),
        }
    }

    fn redis(what: String, t: &RedisTarget) -> Server {
        Server {
            what,
            endpoint: redis_endpoint(&t.url),
            dir: t.dir.clone(),
        }
    }
}

/// Every source, and every server of an environment that does not allow
/// overwriting: (PostgreSQL, Redis).
fn protected(cfg: &Config, staging_env: &str) -> (Vec<Server>, Vec<Server>) {
    let mut pg: Vec<Server> = cfg
        .postgres
        .iter()
        .map(|(n, p)| Server {
            what: format!("the production cluster [postgres.{n}]"),
            endpoint: pg_endpoint(&p.get_ref().conninfo),
            dir: Some(p.get_ref().data_dir.clone()),
        })
        .collect();
    let mut redis: Vec<Server> = cfg
        .redis
        .iter()
        .map(|(n, r)| Server {
            what: format!("the production instance [redis.{n}]"),
            endpoint: redis_endpoint(&r.get_ref().url),
            dir: None,
        })
        .collect();
    let kept = " (its environment does not allow overwriting)";
    for (env, e) in cfg
        .env
        .iter()
        .filter(|(n, e)| n.as_str() != staging_env && !e.get_ref().allow_overwrite)
    {
        let e = e.get_ref();
        pg.extend(
            e.postgres
                .iter()
                .map(|(n, t)| Server::pg(format!("[env.{env}.postgres.{n}]{kept}"), t.get_ref())),
        );
        redis.extend(
            e.redis
                .iter()
                .map(|(n, t)| Server::redis(format!("[env.{env}.redis.{n}]{kept}"), t.get_ref())),
        );
    }
    (pg, redis)
}

/// Why `target` may be a protected server: the same address or an
/// overlapping directory. `addr` and `dir` name the config keys.
fn clashes(target: &Server, protected: &[Server], addr: &str, dir: &str) -> Vec<String> {
    let mut why = Vec::new();
    for p in protected {
        if let Some((h, port)) = target
            .endpoint
            .as_ref()
            .filter(|e| Some(*e) == p.endpoint.as_ref())
        {
            why.push(format!(
                "{} {addr} reaches {h}:{port}, the address of {}",
                target.what, p.what
            ));
        }
        if let (Some(a), Some(b)) = (&target.dir, &p.dir)
            && overlaps(a, b)
        {
            why.push(format!(
                "{} {dir} {} is (or overlaps) {}, the {dir} of {}",
                target.what,
                a.display(),
                b.display(),
                p.what
            ));
        }
    }
    why
}

/// The configured targets of drill `d` in `[env.<env>]`, checked against
/// every protected server by address and directory. Returns every reason
/// to refuse, each naming both servers.
pub fn refuse_protected(cfg: &Config, env: &str, d: &DrillConfig) -> Result<(), Vec<String>> {
    let Some(e) = cfg.env.get(env).map(|e| e.get_ref()) else {
        return Err(vec![format!("no [env.{env}]")]);
    };
    let (pg, redis) = protected(cfg, env);
    let mut why = Vec::new();
    for n in &d.postgres {
        if let Some(t) = e.postgres.get(n) {
            let s = Server::pg(format!("[env.{env}.postgres.{n}]"), t.get_ref());
            why.extend(clashes(&s, &pg, "conninfo", "data_dir"));
        }
    }
    for n in &d.redis {
        if let Some(t) = e.redis.get(n) {
            let s = Server::redis(format!("[env.{env}.redis.{n}]"), t.get_ref());
            why.extend(clashes(&s, &redis, "url", "dir"));
        }
    }
    why.extend(super::rabbitmq_staging::refuse_protected(cfg, env, e, d));
    if why.is_empty() { Ok(()) } else { Err(why) }
}

/// Refuses, with the drill's line, a staging drill whose targets are (or
/// lie inside) a protected server; the rest of a drill's settings are
/// checked by `config` itself.
pub fn check_config(cfg: &Config) -> Result<(), ConfigError> {
    for (name, d) in &cfg.drill {
        if let Some(env) = d.get_ref().staging() {
            refuse_protected(cfg, env, d.get_ref()).map_err(|why| {
                cfg.error_at(d.span(), format!("[drill.{name}]: {}", why.join("; ")))
            })?;
        }
    }
    Ok(())
}

/// Who a running PostgreSQL server is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PgIdentity {
    system_id: String,
    started: String,
    data_dir: Option<String>,
}

async fn pg_identity(conninfo: &str) -> Result<PgIdentity, String> {
    let c = crate::postgres::connect_to(conninfo, Some(PROBE_TIMEOUT))
        .await
        .map_err(|e| crate::postgres::pg_cause(&e))?;
    let row = c
        .query_one(
            "SELECT (SELECT system_identifier FROM pg_control_system())::text, pg_postmaster_start_time()::text",
            &[],
        )
        .await
        .map_err(|e| crate::postgres::sql_cause(&e))?;
    // Reading data_directory needs superuser or pg_read_all_settings.
    let data_dir = c
        .query_one("SELECT current_setting('data_directory')", &[])
        .await
        .ok()
        .map(|r| r.get::<_, String>(0));
    Ok(PgIdentity {
        system_id: row.get(0),
        started: row.get(1),
        data_dir,
    })
}

/// The pid in `postmaster.pid` when that process runs.
fn postmaster_running(data_dir: &Path) -> Option<u32> {
    let pid = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: u32 = pid.lines().next()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// Who a running Redis server is, and where it keeps its data.
#[derive(Debug, Default)]
struct RedisIdentity {
    run_id: String,
    pid: Option<u32>,
    config_file: Option<String>,
    role: String,
    dir: Option<String>,
    dbfilename: Option<String>,
}

fn info_map(text: &str) -> std::collections::HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `Ok(None)` when nothing answers; `Err` when a server answers but will
/// not say who it is.
async fn redis_identity(client: &redis::Client) -> Result<Option<RedisIdentity>, String> {
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(PROBE_TIMEOUT))
        .set_response_timeout(Some(PROBE_TIMEOUT));
    let mut c = match client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
    {
        Ok(c) => c,
        Err(e) if e.is_connection_refusal() || e.is_timeout() => return Ok(None),
        // It answered, e.g. refusing the password: someone is there.
        Err(e) => return Err(e.to_string()),
    };
    let mut m = std::collections::HashMap::new();
    for section in ["server", "replication"] {
        let info: String = redis::cmd("INFO")
            .arg(section)
            .query_async(&mut c)
            .await
            .map_err(|e| format!("INFO {section}: {e}"))?;
        m.extend(info_map(&info));
    }
    let mut id = RedisIdentity {
        run_id: m.get("run_id").cloned().unwrap_or_default(),
        pid: m.get("process_id").and_then(|p| p.parse().ok()),
        config_file: m.get("config_file").cloned().filter(|f| !f.is_empty()),
        role: m.get("role").cloned().unwrap_or_default(),
        ..RedisIdentity::default()
    };
    // CONFIG may be renamed away on hardened servers: then dir is unknown.
    for (k, slot) in [("dir", &mut id.dir), ("dbfilename", &mut id.dbfilename)] {
        let v: Result<Vec<String>, _> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(k)
            .query_async(&mut c)
            .await;
        *slot = v.ok().and_then(|v| v.get(1).cloned());
    }
    Ok(Some(id))
}

/// A client for a source instance, with the password from wherever the
/// config keeps it.
fn source_client(r: &RedisConfig) -> Result<redis::Client, String> {
    use redis::IntoConnectionInfo;
    let e = crate::redis::Endpoint::from_config(r).map_err(|e| e.to_string())?;
    let info = r
        .url
        .as_str()
        .into_connection_info()
        .map_err(|e| e.to_string())?;
    let mut settings = info.redis_settings().clone();
    if let Some(p) = e.password {
        settings = settings.set_password(p);
    }
    redis::Client::open(info.set_redis_settings(settings)).map_err(|e| e.to_string())
}

/// A production server that answered, and who it said it is.
struct Answering<T> {
    name: String,
    /// Reached over loopback or a socket: on this host.
    local: bool,
    id: T,
}

/// Whether an endpoint is reached over loopback or a socket.
fn on_this_host(endpoint: Option<(String, u16)>) -> bool {
    endpoint.is_some_and(|(h, _)| h == "local")
}

/// Checks every target of drill `d` in `[env.<env>]` before anything is
/// touched. `Err` lists every reason to refuse; `Ok` carries notes for the
/// report (e.g. a production server that could not be asked who it is).
pub async fn preflight(
    cfg: &Config,
    env: &str,
    d: &DrillConfig,
) -> Result<Vec<String>, Vec<String>> {
    let e = cfg.environment(env).map_err(|e| vec![e.to_string()])?;
    if !e.allow_overwrite {
        return Err(vec![format!(
            "[env.{env}] does not set allow_overwrite = true; a drill replaces the data of its servers"
        )]);
    }
    let mut why = match refuse_protected(cfg, env, d) {
        Ok(()) => Vec::new(),
        Err(w) => w,
    };
    // Production's running servers, as they answer now.
    let mut notes = Vec::new();
    let pg_ids = futures::future::join_all(cfg.postgres.iter().map(|(n, p)| async move {
        let c = &p.get_ref().conninfo;
        (n, on_this_host(pg_endpoint(c)), pg_identity(c).await)
    }))
    .await;
    let prod_pg = answered(pg_ids, "postgres", &mut notes);
    let redis_ids = futures::future::join_all(cfg.redis.iter().map(|(n, r)| async move {
        let id = match source_client(r.get_ref()) {
            Ok(c) => redis_identity(&c)
                .await
                .and_then(|i| i.ok_or_else(|| "no answer".to_string())),
            Err(e) => Err(e),
        };
        (n, on_this_host(redis_endpoint(&r.get_ref().url)), id)
    }))
    .await;
    let prod_redis = answered(redis_ids, "redis", &mut notes);
    for (n, t) in servers(&e.postgres, &d.postgres, env, "postgres", &mut why) {
        why.extend(pg_target_problems(env, n, t, &prod_pg).await);
    }
    for (n, t) in servers(&e.redis, &d.redis, env, "redis", &mut why) {
        why.extend(redis_target_problems(env, n, t, &prod_redis).await);
    }
    why.extend(super::rabbitmq_staging::preflight(cfg, env, e, d, &mut notes).await);
    if why.is_empty() { Ok(notes) } else { Err(why) }
}

/// The production servers that said who they are; a silent one is noted,
/// as it is then told apart from staging by its configured address only.
fn answered<T>(
    ids: Vec<(&String, bool, Result<T, String>)>,
    kind: &str,
    notes: &mut Vec<String>,
) -> Vec<Answering<T>> {
    let mut out = Vec::new();
    for (n, local, id) in ids {
        match id {
            Ok(id) => out.push(Answering {
                name: n.clone(),
                local,
                id,
            }),
            Err(err) => notes.push(format!(
                "[{kind}.{n}] did not answer ({err}); it was told apart from staging \
                 by its configured address and directory only"
            )),
        }
    }
    out
}

/// The `[env.<env>.<kind>.<name>]` server of each source name.
fn servers<'a, T>(
    map: &'a std::collections::BTreeMap<String, toml::Spanned<T>>,
    names: &'a [String],
    env: &str,
    kind: &str,
    why: &mut Vec<String>,
) -> Vec<(&'a String, &'a T)> {
    let mut out = Vec::new();
    for n in names {
        match map.get(n) {
            Some(t) => out.push((n, t.get_ref())),
            None => why.push(format!("no [env.{env}.{kind}.{n}]")),
        }
    }
    out
}

async fn pg_target_problems(
    env: &str,
    n: &str,
    t: &PgTarget,
    prod: &[Answering<PgIdentity>],
) -> Vec<String> {
    let section = format!("[env.{env}.postgres.{n}]");
    let mut why = Vec::new();
    let Some(data) = &t.data_dir else {
        return vec![format!("{section} has no data_dir")];
    };
    if !data.join("PG_VERSION").is_file() {
        return vec![format!(
            "{section} data_dir {} is not a PostgreSQL data directory; create and configure the staging \
             cluster first (initdb): the drill keeps its {}",
            data.display(),
            KEPT_PG_FILES.join(", ")
        )];
    }
    let running = postmaster_running(data);
    let local = on_this_host(pg_endpoint(&t.conninfo));
    match (pg_identity(&t.conninfo).await, running) {
        (Ok(id), Some(_)) => {
            match &id.data_dir {
                Some(dd) if resolved(Path::new(dd)) != resolved(data) => why.push(format!(
                    "{section}: the server at its conninfo runs on {dd}, not on data_dir {}; \
                     conninfo and data_dir must name the same server",
                    data.display()
                )),
                Some(_) => {}
                None => why.push(format!(
                    "{section}: cannot read data_directory through its conninfo (connect as a superuser \
                     or a member of pg_read_all_settings) to prove it is the server on {}",
                    data.display()
                )),
            }
            for Answering {
                name: pn, id: pid, ..
            } in prod
            {
                if pid.system_id == id.system_id && pid.started == id.started {
                    why.push(format!(
                        "{section}: the server at its conninfo is the running production cluster [postgres.{pn}] \
                         (system identifier {}, started {})",
                        id.system_id, id.started
                    ));
                }
            }
        }
        (Ok(_), None) => why.push(format!(
            "{section}: a server answers at its conninfo but none runs on data_dir {}; \
             conninfo and data_dir must name the same server",
            data.display()
        )),
        (Err(e), Some(pid)) => why.push(format!(
            "{section}: PostgreSQL (pid {pid}) runs on {} but its conninfo fails ({e}); \
             dr will not stop a server it cannot identify",
            data.display()
        )),
        (Err(_), None) => {}
    }
    // A production server on this host, wherever its config says it lives.
    for Answering {
        name: pn,
        local: prod_local,
        id: pid,
    } in prod
    {
        let same_host = local && *prod_local;
        if let (true, Some(dd)) = (same_host, &pid.data_dir)
            && overlaps(Path::new(dd), data)
        {
            why.push(format!(
                "{section} data_dir {} is (or overlaps) {dd}, where the running production cluster \
                 [postgres.{pn}] keeps its data",
                data.display()
            ));
        }
    }
    why
}

async fn redis_target_problems(
    env: &str,
    n: &str,
    t: &RedisTarget,
    prod: &[Answering<RedisIdentity>],
) -> Vec<String> {
    let section = format!("[env.{env}.redis.{n}]");
    let mut why = Vec::new();
    let (Some(dir), Some(conf)) = (&t.dir, &t.config_file) else {
        return vec![format!("{section} needs config_file and dir")];
    };
    if !conf.is_file() {
        why.push(format!(
            "{section} config_file {} does not exist",
            conf.display()
        ));
    }
    let staging_file = dir.join(&t.dbfilename);
    let client = redis::Client::open(t.url.as_str()).map_err(|e| e.to_string());
    let id = match client {
        Ok(c) => redis_identity(&c).await,
        Err(e) => Err(e),
    };
    let id = match id {
        Ok(id) => id,
        Err(e) => {
            why.push(format!(
                "{section}: a server answers at its url but cannot be identified ({e}); \
                 dr will not stop a server it cannot identify"
            ));
            None
        }
    };
    if let Some(id) = &id {
        if let Some(f) = &id.config_file
            && resolved(Path::new(f)) != resolved(conf)
        {
            why.push(format!(
                "{section}: the server at its url runs with {f}, not config_file {}",
                conf.display()
            ));
        }
        if let (Some(d), Some(f)) = (&id.dir, &id.dbfilename)
            && resolved(&Path::new(d).join(f)) != resolved(&staging_file)
        {
            why.push(format!(
                "{section}: the server at its url keeps its data in {d}/{f}, not {}",
                staging_file.display()
            ));
        }
        if id.role != "master" {
            why.push(format!(
                "{section}: the server at its url is a {} (a full sync from its master would replace \
                 the restored data); make it a master in its config file",
                id.role
            ));
        }
        for Answering {
            name: pn, id: pid, ..
        } in prod
        {
            if !pid.run_id.is_empty() && pid.run_id == id.run_id {
                why.push(format!(
                    "{section}: the server at its url is the running production instance [redis.{pn}] (run_id {})",
                    id.run_id
                ));
            }
        }
    }
    let local = on_this_host(redis_endpoint(&t.url));
    for Answering {
        name: pn,
        local: prod_local,
        id: pid,
    } in prod
    {
        let same_host = local && *prod_local;
        if let (true, Some(d), Some(f)) = (same_host, &pid.dir, &pid.dbfilename)
            && resolved(&Path::new(d).join(f)) == resolved(&staging_file)
        {
            why.push(format!(
                "{section}: {} is the data file of the running production instance [redis.{pn}]",
                staging_file.display()
            ));
        }
    }
    why
}

/// What a drill into `[env.<env>]` would do to each server, for a dry run.
pub fn plan(cfg: &Config, env: &str, d: &DrillConfig) -> Vec<String> {
    let Ok(e) = cfg.environment(env) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for n in &d.postgres {
        if let Some(t) = e.postgres.get(n).map(|t| t.get_ref()) {
            out.push(format!(
                "{}: stop it (pg_ctl stop -m fast as {}), restore [postgres.{n}] as of {} into its data \
                 directory with --delta keeping its {}, start it as configured with archive_mode=off, \
                 wait for promotion through its conninfo, run the checks; it stays running",
                pg_server(env, n, t),
                t.os_user,
                d.to,
                KEPT_PG_FILES.join(", ")
            ));
        }
    }
    out.extend(super::rabbitmq_staging::plan(env, e, d));
    for n in &d.redis {
        if let Some(t) = e.redis.get(n).map(|t| t.get_ref()) {
            let dir = t.dir.as_deref().unwrap_or(Path::new("?"));
            let (h, port) = redis_endpoint(&t.url).unwrap_or_default();
            out.push(format!(
                "[env.{env}.redis.{n}] {h}:{port}: decode [redis.{n}] as of {} into {}, SHUTDOWN NOSAVE, \
                 rename it to {}, start {} {} --daemonize yes --appendonly no{}, check key counts and \
                 run the checks; it stays running",
                d.to,
                dir.join(".dr-drill-<id>").display(),
                dir.join(&t.dbfilename).display(),
                t.server_bin.display(),
                t.config_file.as_deref().unwrap_or(Path::new("?")).display(),
                if t.config_file.as_deref().is_some_and(wants_aof) {
                    ", then CONFIG SET appendonly yes (AOF rewritten from the restored data)"
                } else {
                    ""
                }
            ));
        }
    }
    out
}

/// Describes a staging PostgreSQL server for reports.
fn pg_server(env: &str, n: &str, t: &PgTarget) -> String {
    let (h, p) = pg_endpoint(&t.conninfo).unwrap_or_default();
    format!(
        "[env.{env}.postgres.{n}] {h}:{p} data_dir {}",
        t.data_dir.as_deref().unwrap_or(Path::new("?")).display()
    )
}

/// Restores cluster `cluster` into the staging server `t`: stop it, delta
/// restore into its data directory keeping its own configuration, start it
/// as configured (without archiving: it shares production's system
/// identifier, so its WAL must never reach production's archive), wait for
/// the target, and run the same checks as a scratch restore.
#[allow(clippy::too_many_arguments)]
pub async fn restore_pg(
    repo: &Repository,
    env: &str,
    cluster: &str,
    cfg: &PgConfig,
    t: &PgTarget,
    target: &Target,
    dr_command: &str,
    t0: Instant,
    cancel: &CancellationToken,
) -> SourceReport {
    let mut rep = SourceReport::new("pg", cluster, &super::pg::target_text(target));
    rep.staging = Some(pg_server(env, cluster, t));
    let port = pg_endpoint(&t.conninfo).map_or(5432, |(_, p)| p);
    rep.port = Some(port);
    let Some(data) = t.data_dir.clone() else {
        rep.checks
            .push(CheckResult::fail("staging server", "no data_dir", 0.0));
        return rep;
    };
    let work = async {
        // A restore that cannot work must fail before staging is stopped.
        if let Err(e) = restorable(repo, cluster, target).await {
            rep.checks
                .push(CheckResult::fail("restore", e, t0.elapsed().as_secs_f64()));
            return;
        }
        if let Some(pid) = postmaster_running(&data) {
            let s = Instant::now();
            match crate::postgres::server::stop(&t.bin_dir, &t.os_user, &data).await {
                Ok(()) => rep.checks.push(CheckResult::pass(
                    "staging stopped",
                    format!(
                        "stopped the staging server (pid {pid}) on {}",
                        data.display()
                    ),
                    s.elapsed().as_secs_f64(),
                )),
                Err(e) => {
                    rep.checks.push(CheckResult::fail(
                        "staging stopped",
                        e.to_string(),
                        s.elapsed().as_secs_f64(),
                    ));
                    return;
                }
            }
        }
        // The staging server's own binaries and OS user run it.
        let mut pg = cfg.clone();
        pg.bin_dir = t.bin_dir.clone();
        pg.os_user = t.os_user.clone();
        let opts = RestoreOptions {
            target: target.clone(),
            extra: ExtraTarget::default(),
            dir: data.clone(),
            start: Some(port),
            no_archive: true,
            restore_command: crate::postgres::quote::wal_fetch_command(dr_command, cluster),
            delta: true,
            // allow_overwrite consented to replacing the staging cluster.
            replace_other_cluster: true,
            tablespace_map: Vec::new(),
            settings: vec!["hot_standby=on".into()],
            connect_host: None,
            connect_user: String::new(),
            timeline: crate::postgres::timeline::TimelineChoice::Auto,
            accept_gap: false,
            keep_files: KEPT_PG_FILES.iter().map(|s| s.to_string()).collect(),
            conninfo: Some(t.conninfo.clone()),
        };
        let at = PgAt {
            host: String::new(),
            port,
            user: String::new(),
            conninfo: Some(t.conninfo.clone()),
        };
        super::pg::restore_then_check(repo, cluster, &pg, &opts, &at, t0, &mut rep).await;
    };
    let interrupted = super::interruptible(work, cancel, t0, INTERRUPTED_PG).await;
    rep.checks.extend(interrupted);
    rep
}

/// Whether `cluster` has a backup for `target` that a delta restore into
/// a staging data directory can use (no tablespaces).
async fn restorable(repo: &Repository, cluster: &str, target: &Target) -> Result<(), String> {
    let catalog = crate::postgres::catalog::Catalog::load(repo, cluster)
        .await
        .map_err(|e| e.to_string())?;
    let when = match target {
        Target::Latest => None,
        Target::Time(t) => Some(*t),
    };
    let m = catalog.pick(when).map_err(|e| e.to_string())?;
    if m.tablespaces.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "backup {} has tablespaces, which a restore into a staging data directory does not \
             support yet; the staging server was left as it was",
            m.id
        ))
    }
}

/// Restores instance `instance` into the staging server `t`: decode the
/// snapshot next to its data file, stop it with `SHUTDOWN NOSAVE` (so it
/// cannot write its old dataset over the snapshot), move the snapshot into
/// place, start `redis-server` with its own config file (AOF off while it
/// loads, since Redis prefers an AOF over the RDB at start-up; turned back
/// on afterwards when the config wants it, which rewrites the AOF from the
/// restored data), then check key counts and run the user checks.
#[allow(clippy::too_many_arguments)]
pub async fn restore_redis(
    repo: &Repository,
    env: &str,
    instance: &str,
    cfg: &RedisConfig,
    t: &RedisTarget,
    target: Option<DateTime<Utc>>,
    t0: Instant,
    cancel: &CancellationToken,
) -> SourceReport {
    let mut rep = super::redis::new_report(instance, target, "drill start (latest)");
    let (h, port) = redis_endpoint(&t.url).unwrap_or_default();
    rep.port = Some(port);
    let (Some(dir), Some(conf)) = (t.dir.clone(), t.config_file.clone()) else {
        rep.checks.push(CheckResult::fail(
            "staging server",
            "config_file and dir are needed",
            0.0,
        ));
        return rep;
    };
    rep.staging = Some(format!(
        "[env.{env}.redis.{instance}] {h}:{port} {}",
        dir.join(&t.dbfilename).display()
    ));
    let work = async {
        if let Err(e) = redis_steps(repo, instance, cfg, t, &dir, &conf, target, t0, &mut rep).await
        {
            rep.checks
                .push(CheckResult::fail(e.0, e.1, t0.elapsed().as_secs_f64()));
        }
    };
    let interrupted = super::interruptible(work, cancel, t0, INTERRUPTED_REDIS).await;
    rep.checks.extend(interrupted);
    rep
}

#[allow(clippy::too_many_arguments)]
async fn redis_steps(
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
            let _ = std::fs::remove_dir_all(&tmp);
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
            let _ = std::fs::remove_dir_all(&tmp);
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
    super::redis::record_restore(rep, &r, t0, &t.url, cfg).await;
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

async fn conn(client: &redis::Client) -> Result<redis::aio::MultiplexedConnection, String> {
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
async fn shutdown_redis(client: &redis::Client) -> Result<String, String> {
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

async fn start_redis(t: &RedisTarget, dir: &Path, conf: &Path) -> Result<(), String> {
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
async fn wait_loaded(client: &redis::Client, size: u64) -> Result<(), String> {
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
fn wants_aof(conf: &Path) -> bool {
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

async fn enable_aof(client: &redis::Client) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_compare_loopback_names_and_sockets_as_one_host() {
        let pg = |c| pg_endpoint(c).expect("conninfo");
        assert_eq!(pg("host=127.0.0.1 port=5433"), ("local".into(), 5433));
        assert_eq!(
            pg("host=localhost port=5433"),
            pg("host=/run/postgresql port=5433")
        );
        assert_eq!(
            pg("postgresql://db1.example:6000/app"),
            ("db1.example".into(), 6000)
        );
        assert_eq!(pg("host=DB1.example").1, 5432);
        let r = |u| redis_endpoint(u).expect("url");
        assert_eq!(
            r("redis://:pw@localhost:6380/1"),
            r("redis://127.0.0.1:6380")
        );
        assert_eq!(r("redis://[::1]"), ("local".into(), 6379));
        assert_ne!(r("redis://cache.example:6379"), r("redis://127.0.0.1:6379"));
    }

    #[test]
    fn directories_overlap_when_equal_or_nested() {
        assert!(overlaps(
            Path::new("/srv/pg/main"),
            Path::new("/srv/pg/main/")
        ));
        assert!(overlaps(Path::new("/srv/pg"), Path::new("/srv/pg/main")));
        assert!(overlaps(
            Path::new("/srv/pg/x/../main"),
            Path::new("/srv/pg/main")
        ));
        assert!(!overlaps(
            Path::new("/srv/pg/main"),
            Path::new("/srv/pg/main-staging")
        ));
    }

    #[test]
    fn aof_setting_is_read_from_the_config_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("redis.conf");
        std::fs::write(&f, "port 1\nappendonly yes\n# appendonly no\n").expect("write");
        assert!(wants_aof(&f));
        std::fs::write(&f, "appendonly yes\nAPPENDONLY \"no\"\n").expect("write");
        assert!(!wants_aof(&f));
        assert!(!wants_aof(&dir.path().join("missing.conf")));
    }
}
