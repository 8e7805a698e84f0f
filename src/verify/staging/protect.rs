//! Which servers a staging drill must never touch, decided from the config
//! alone: every source, and every server of an environment without
//! `allow_overwrite`, by address and by data directory.

use super::*;

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

pub(super) fn normal_host(h: &str) -> String {
    let h = h.to_ascii_lowercase();
    match h.as_str() {
        "" | "localhost" | "::1" | "0.0.0.0" | "::" => "local".into(),
        _ if h.starts_with("127.") || h.starts_with('/') => "local".into(),
        _ => h,
    }
}

/// `p` without `.` and `..` components (no file system access).
pub(super) fn lexical(p: &Path) -> PathBuf {
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
pub(super) fn resolved(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| lexical(p))
}

/// True when one directory is the other or lies inside it.
pub(super) fn overlaps(a: &Path, b: &Path) -> bool {
    let (a, b) = (resolved(a), resolved(b));
    a.starts_with(&b) || b.starts_with(&a)
}

/// A server as the config describes it: a staging target, or one the drill
/// must never touch.
pub(super) struct Server {
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
pub(super) fn protected(cfg: &Config, staging_env: &str) -> (Vec<Server>, Vec<Server>) {
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
pub(super) fn clashes(target: &Server, protected: &[Server], addr: &str, dir: &str) -> Vec<String> {
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
    why.extend(crate::verify::rabbitmq_staging::refuse_protected(
        cfg, env, e, d,
    ));
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
