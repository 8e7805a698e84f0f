//! Reading a playbook: TOML into the checked model, with every error naming
//! the file, the line and the fix.

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::model::*;
use crate::config::{ConfigError, EnvConfig, line_of};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlaybook {
    name: String,
    #[serde(default)]
    description: String,
    env: Option<String>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(rename = "step", default)]
    steps: Vec<Spanned<RawStep>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDefaults {
    #[serde(default, deserialize_with = "de_opt_duration")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    interval: Option<Duration>,
    on_failure: Option<OnFailure>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStep {
    name: String,
    #[serde(default)]
    pre: Vec<Spanned<toml::Table>>,
    action: Option<Spanned<toml::Table>>,
    #[serde(default)]
    post: Vec<Spanned<toml::Table>>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    timeout: Option<Duration>,
    #[serde(default)]
    retries: u32,
    #[serde(default, deserialize_with = "de_opt_duration")]
    retry_delay: Option<Duration>,
    on_failure: Option<OnFailure>,
    #[serde(default)]
    rollback: Vec<Spanned<toml::Table>>,
}

/// Gate timeout when neither the gate, its step nor `[defaults]` set one.
pub const DEFAULT_GATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Gate poll interval when none is set.
pub const DEFAULT_GATE_INTERVAL: Duration = Duration::from_millis(250);

impl Playbook {
    /// Reads and parses a playbook file.
    pub fn load(path: &Path) -> Result<Playbook, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            location: path.display().to_string(),
            message: format!("cannot read playbook: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Parses playbook text; `path` is used in messages only.
    pub fn parse(text: &str, path: &Path) -> Result<Playbook, ConfigError> {
        let at = |span: Option<Range<usize>>, message: String| ConfigError {
            location: match span {
                Some(s) if s.end > 0 => format!("{}:{}", path.display(), line_of(text, s.start)),
                _ => path.display().to_string(),
            },
            message,
        };
        let raw: RawPlaybook =
            toml::from_str(text).map_err(|e| at(e.span(), hint(e.message().trim())))?;
        if raw.steps.is_empty() {
            return Err(at(
                None,
                "the playbook has no steps; add at least one [[step]] with a name and an action"
                    .into(),
            ));
        }
        let d = &raw.defaults;
        let mut steps = Vec::new();
        for s in &raw.steps {
            let span = s.span();
            let r = s.get_ref();
            let line = line_of(text, span.start);
            if let Some(prev) = steps.iter().find(|p: &&Step| p.name == r.name) {
                return Err(at(
                    Some(span),
                    format!(
                        "duplicate step name {:?} (first used on line {}); give each step a unique name",
                        r.name, prev.line
                    ),
                ));
            }
            let timeout = r.timeout.or(d.timeout).unwrap_or(DEFAULT_GATE_TIMEOUT);
            let interval = d.interval.unwrap_or(DEFAULT_GATE_INTERVAL);
            let gates = |list: &[Spanned<toml::Table>], which: &str| {
                list.iter()
                    .map(|g| {
                        let line = line_of(text, g.span().start);
                        parse_gate(g, timeout, interval, line).map_err(|m| {
                            at(
                                Some(g.span()),
                                format!("step {:?}, {which} gate: {m}", r.name),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            let action = |t: &Spanned<toml::Table>, which: &str| {
                parse_action(t)
                    .map_err(|m| at(Some(t.span()), format!("step {:?}, {which}: {m}", r.name)))
            };
            let step = Step {
                name: r.name.clone(),
                line,
                pre: gates(&r.pre, "pre")?,
                action: r.action.as_ref().map(|a| action(a, "action")).transpose()?,
                post: gates(&r.post, "post")?,
                retries: r.retries,
                retry_delay: r.retry_delay.unwrap_or(Duration::from_secs(1)),
                on_failure: r.on_failure.or(d.on_failure).unwrap_or(OnFailure::Abort),
                rollback: r
                    .rollback
                    .iter()
                    .map(|a| action(a, "rollback action"))
                    .collect::<Result<_, _>>()?,
            };
            if step.action.is_none() && !step.post.is_empty() {
                return Err(at(
                    Some(span),
                    format!(
                        "step {:?} has post gates but no action; make them pre gates, or add an action",
                        r.name
                    ),
                ));
            }
            if step.action.is_none() && step.pre.is_empty() {
                return Err(at(
                    Some(span),
                    format!("step {:?} does nothing; add an action or gates", r.name),
                ));
            }
            steps.push(step);
        }
        Ok(Playbook {
            name: raw.name,
            description: raw.description,
            env: raw.env,
            steps,
            source: path.to_path_buf(),
        })
    }

    /// Checks that every server the playbook names exists in `env`, naming
    /// the playbook line of the first one that does not.
    pub fn check_targets(&self, env_name: &str, env: &EnvConfig) -> Result<(), ConfigError> {
        for step in &self.steps {
            let gates = step.pre.iter().chain(&step.post);
            let named = gates
                .flat_map(|g| g.check.targets().into_iter().map(move |t| (t, g.line)))
                .chain(
                    step.action
                        .iter()
                        .chain(&step.rollback)
                        .flat_map(|a| a.targets().into_iter().map(move |t| (t, step.line))),
                );
            for ((kind, name), line) in named {
                let (known, section): (Vec<&String>, _) = match kind {
                    TargetKind::Postgres => (env.postgres.keys().collect(), "postgres"),
                    TargetKind::Redis => (env.redis.keys().collect(), "redis"),
                    TargetKind::Rabbitmq => (env.rabbitmq.keys().collect(), "rabbitmq"),
                };
                if !known.iter().any(|k| *k == name) {
                    return Err(ConfigError {
                        location: format!("{}:{line}", self.source.display()),
                        message: format!(
                            "step {:?}: no server {name:?} in [env.{env_name}.{section}] (configured: {}); \
                             add [env.{env_name}.{section}.{name}] to the config or fix the name",
                            step.name,
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known
                                    .iter()
                                    .map(|s| s.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            }
                        ),
                    });
                }
            }
            // pg_ctl needs the data directory: say so now, not mid-failover.
            for a in step.action.iter().chain(&step.rollback) {
                if let Action::PgFence {
                    target,
                    mode: FenceMode::Stop,
                }
                | Action::PgUnfence {
                    target,
                    mode: FenceMode::Stop,
                } = a
                {
                    let has_dir = env
                        .postgres
                        .get(target)
                        .is_some_and(|t| t.get_ref().data_dir.is_some());
                    if !has_dir {
                        return Err(ConfigError {
                            location: format!("{}:{}", self.source.display(), step.line),
                            message: format!(
                                "step {:?}: mode = \"stop\" runs pg_ctl, which needs data_dir in \
                                 [env.{env_name}.postgres.{target}] (and dr on that host); add it, \
                                 or fence with mode = \"read_only\"",
                                step.name
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

pub(super) fn parse_gate(
    t: &Spanned<toml::Table>,
    step_timeout: Duration,
    interval: Duration,
    line: usize,
) -> Result<Gate, String> {
    let mut table = t.get_ref().clone();
    let mut take_duration = |key: &str| -> Result<Option<Duration>, String> {
        match table.remove(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => humantime::parse_duration(&s)
                .map(Some)
                .map_err(|e| format!("{key} = {s:?} is not a duration ({e}); write e.g. \"10s\"")),
            Some(v) => Err(format!(
                "{key} must be a duration string such as \"10s\", not {v}"
            )),
        }
    };
    let timeout = take_duration("timeout")?.unwrap_or(step_timeout);
    let interval = take_duration("interval")?.unwrap_or(interval);
    let negate = match table.remove("negate") {
        None => false,
        Some(toml::Value::Boolean(b)) => b,
        Some(v) => return Err(format!("negate must be true or false, not {v}")),
    };
    if interval.is_zero() {
        return Err("interval must be greater than zero".into());
    }
    let check: Check = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| hint(e.message().trim()))?;
    Ok(Gate {
        check,
        timeout,
        interval,
        negate,
        line,
    })
}

pub(super) fn parse_action(t: &Spanned<toml::Table>) -> Result<Action, String> {
    let a: Action = toml::Value::Table(t.get_ref().clone())
        .try_into()
        .map_err(|e: toml::de::Error| hint(e.message().trim()))?;
    if let Action::Exec { argv, shell, .. } = &a {
        if argv.is_empty() {
            return Err("exec needs argv = [\"program\", \"arg\", …]".into());
        }
        if *shell && argv.len() != 1 {
            return Err("with shell = true, argv must be one string: the script sh -c runs".into());
        }
    }
    Ok(a)
}

pub(super) fn hint(msg: &str) -> String {
    if msg.contains("missing field `type`") {
        format!("{msg}; every gate and action needs a type, e.g. type = \"pg.promote\"")
    } else if msg.starts_with("unknown field") {
        format!("{msg}; remove or correct the key (README.md, section Failover, lists every key)")
    } else if msg.starts_with("missing field") {
        format!("{msg}; add it (README.md, section Failover)")
    } else {
        msg.to_string()
    }
}
