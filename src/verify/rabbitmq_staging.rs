//! Drills into staging RabbitMQ brokers (`[env.<env>.rabbitmq.<name>]` of an
//! environment with `allow_overwrite = true`): the same protection as the
//! other staging servers ([`super::staging`]) — a target at the address of
//! a `[rabbitmq.*]` source or of a broker of an environment that does not
//! allow overwriting is refused by config, and one that answers with the
//! node name of a production broker is refused before anything is touched —
//! then the snapshot is loaded (`POST /api/definitions`: created and
//! updated, nothing deleted; shovel and federation URIs pointed at nothing,
//! so staging never moves production's messages) and checked like a scratch
//! restore. The broker stays running with the restored definitions.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::report::{CheckResult, SourceReport};
use crate::config::{Config, DrillConfig, EnvConfig, RabbitConfig, RabbitTarget};
use crate::rabbitmq::api::{Api, password_from};
use crate::repo::Repository;

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Host and port a management URL reaches (loopback names as one).
pub fn endpoint(url: &str) -> Option<(String, u16)> {
    let u = url::Url::parse(url).ok()?;
    let host = u.host_str()?.trim_matches(['[', ']']).to_ascii_lowercase();
    let host = match host.as_str() {
        "localhost" | "::1" => "127.0.0.1".to_string(),
        h if h.starts_with("127.") => "127.0.0.1".to_string(),
        _ => host,
    };
    Some((host, u.port_or_known_default()?))
}

/// Reasons the drill's staging brokers may be protected ones, by address:
/// each names both.
pub fn refuse_protected(cfg: &Config, env: &str, e: &EnvConfig, d: &DrillConfig) -> Vec<String> {
    let mut protected: Vec<(String, Option<(String, u16)>)> = cfg
        .rabbitmq
        .iter()
        .map(|(n, r)| {
            (
                format!("the production broker [rabbitmq.{n}]"),
                endpoint(&r.get_ref().url),
            )
        })
        .collect();
    for (other, oe) in cfg
        .env
        .iter()
        .filter(|(n, oe)| n.as_str() != env && !oe.get_ref().allow_overwrite)
    {
        protected.extend(oe.get_ref().rabbitmq.iter().map(|(n, t)| {
            (
                format!("[env.{other}.rabbitmq.{n}] (its environment does not allow overwriting)"),
                endpoint(&t.get_ref().url),
            )
        }));
    }
    let mut why = Vec::new();
    for n in &d.rabbitmq {
        let Some(t) = e.rabbitmq.get(n) else { continue };
        let Some((h, p)) = endpoint(&t.get_ref().url) else {
            continue;
        };
        for (what, at) in &protected {
            if at.as_ref() == Some(&(h.clone(), p)) {
                why.push(format!(
                    "[env.{env}.rabbitmq.{n}] url reaches {h}:{p}, the address of {what}"
                ));
            }
        }
    }
    why
}

/// The management API of a staging broker.
fn staging_api(t: &RabbitTarget) -> Result<Api, String> {
    let password = password_from(t.password_env.as_deref(), t.password_file.as_deref())
        .map_err(|e| e.to_string())?;
    Api::new(
        &t.url,
        &t.user,
        password,
        t.ca_file.as_deref(),
        PROBE_TIMEOUT,
    )
    .map_err(|e| e.to_string())
}

/// Live checks before a drill touches anything: every staging broker
/// answers, and none answers with the node name (`rabbit@host`, its running
/// identity) of a production broker. Returns reasons to refuse; notes what
/// could not be told.
pub async fn preflight(
    cfg: &Config,
    env: &str,
    e: &EnvConfig,
    d: &DrillConfig,
    notes: &mut Vec<String>,
) -> Vec<String> {
    let mut why = Vec::new();
    if d.rabbitmq.is_empty() {
        return why;
    }
    let mut production = Vec::new();
    for (n, r) in &cfg.rabbitmq {
        let node = match Api::from_config(r.get_ref()) {
            Ok(api) => api
                .overview()
                .await
                .map(|o| o.node)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match node {
            Ok(node) => production.push((n.clone(), node)),
            Err(e) => notes.push(format!(
                "[rabbitmq.{n}] did not say who it is ({e}); told apart from staging by its url only"
            )),
        }
    }
    for n in &d.rabbitmq {
        let section = format!("[env.{env}.rabbitmq.{n}]");
        let Some(t) = e.rabbitmq.get(n) else {
            why.push(format!("no {section}"));
            continue;
        };
        let node = match staging_api(t.get_ref()) {
            Ok(api) => api
                .overview()
                .await
                .map(|o| o.node)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match node {
            Err(e) => why.push(format!("{section} does not answer: {e}")),
            Ok(node) => {
                for (p, pn) in &production {
                    if *pn == node {
                        why.push(format!(
                            "{section} answers as node {node}, the node of the production broker [rabbitmq.{p}]"
                        ));
                    }
                }
            }
        }
    }
    why
}

/// What a drill into `[env.<env>]` would do to each broker, for a dry run.
pub fn plan(env: &str, e: &EnvConfig, d: &DrillConfig) -> Vec<String> {
    d.rabbitmq
        .iter()
        .filter_map(|n| {
            let t = e.rabbitmq.get(n)?.get_ref();
            let (h, port) = endpoint(&t.url).unwrap_or_default();
            Some(format!(
                "[env.{env}.rabbitmq.{n}] {h}:{port}: load the definitions of [rabbitmq.{n}] as of {} \
                 (POST /api/definitions: creates and updates, deletes nothing; shovel and federation \
                 URIs pointed at nothing), check every item of the manifest and run the checks; it \
                 stays running",
                d.to
            ))
        })
        .collect()
}

/// Loads broker `name`'s snapshot into the staging broker `t` and checks it.
#[allow(clippy::too_many_arguments)]
pub async fn restore(
    repo: &Repository,
    env: &str,
    name: &str,
    cfg: &RabbitConfig,
    t: &RabbitTarget,
    target: Option<DateTime<Utc>>,
    t0: Instant,
    cancel: &CancellationToken,
) -> SourceReport {
    let mut rep = super::rabbitmq::new_report(name, target, "drill start (latest)");
    let (h, port) = endpoint(&t.url).unwrap_or_default();
    rep.port = Some(port);
    let server = format!("[env.{env}.rabbitmq.{name}] {h}:{port}");
    rep.staging = Some(server.clone());
    let work = async {
        let api = match staging_api(t) {
            Ok(a) => a,
            Err(e) => {
                rep.checks.push(CheckResult::fail("staging server", e, 0.0));
                return;
            }
        };
        let Some(snap) = super::rabbitmq::fetch(repo, name, target, t0, &mut rep).await else {
            return;
        };
        super::rabbitmq::load_and_check(&api, &snap, &server, cfg, t0, &mut rep).await;
    };
    let interrupted = super::interruptible(work, cancel, t0, super::INTERRUPTED).await;
    rep.checks.extend(interrupted);
    rep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_compare_loopback_names_as_one() {
        assert_eq!(
            endpoint("http://localhost:15672"),
            endpoint("http://127.0.0.1:15672/")
        );
        assert_eq!(
            endpoint("https://mq.internal"),
            Some(("mq.internal".into(), 443))
        );
        assert_ne!(
            endpoint("http://127.0.0.1:15672"),
            endpoint("http://127.0.0.1:15673")
        );
    }
}
