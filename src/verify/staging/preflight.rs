//! The live half of the safety checks: the server answering at each target's
//! address is the one on its data directory, and not a protected server
//! reached under another name.

use super::*;

/// Who a running PostgreSQL server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PgIdentity {
    system_id: String,
    started: String,
    data_dir: Option<String>,
}

pub(super) async fn pg_identity(conninfo: &str) -> Result<PgIdentity, String> {
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
pub(super) fn postmaster_running(data_dir: &Path) -> Option<u32> {
    let pid = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: u32 = pid.lines().next()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// Who a running Redis server is, and where it keeps its data.
#[derive(Debug, Default)]
pub(super) struct RedisIdentity {
    pub(super) run_id: String,
    pub(super) pid: Option<u32>,
    pub(super) config_file: Option<String>,
    pub(super) role: String,
    pub(super) dir: Option<String>,
    pub(super) dbfilename: Option<String>,
}

pub(super) fn info_map(text: &str) -> std::collections::HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `Ok(None)` when nothing answers; `Err` when a server answers but will
/// not say who it is.
pub(super) async fn redis_identity(
    client: &redis::Client,
) -> Result<Option<RedisIdentity>, String> {
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
pub(super) fn source_client(r: &RedisConfig) -> Result<redis::Client, String> {
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
pub(super) struct Answering<T> {
    name: String,
    /// Reached over loopback or a socket: on this host.
    local: bool,
    id: T,
}

/// Whether an endpoint is reached over loopback or a socket.
pub(super) fn on_this_host(endpoint: Option<(String, u16)>) -> bool {
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
    why.extend(crate::verify::rabbitmq_staging::preflight(cfg, env, e, d, &mut notes).await);
    if why.is_empty() { Ok(notes) } else { Err(why) }
}

/// The production servers that said who they are; a silent one is noted,
/// as it is then told apart from staging by its configured address only.
pub(super) fn answered<T>(
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
pub(super) fn servers<'a, T>(
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

pub(super) async fn pg_target_problems(
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

pub(super) async fn redis_target_problems(
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
