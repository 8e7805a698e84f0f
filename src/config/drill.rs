//! `[drill.<name>]` and `[env.<name>]`: drills and the staging environments
//! they restore into, with the checks that keep staging away from production.

use super::*;

/// Where scratch restores go when no `scratch_dir` is configured.
pub const DEFAULT_SCRATCH_DIR: &str = "/var/tmp/dr-verify";

/// `[drill.<name>]`: a rehearsed recovery of several sources, with objectives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    /// PostgreSQL clusters to restore (names of `[postgres.*]`).
    #[serde(default)]
    pub postgres: Vec<String>,
    /// Redis instances to restore (names of `[redis.*]`).
    #[serde(default)]
    pub redis: Vec<String>,
    /// RabbitMQ brokers whose definitions to restore (names of `[rabbitmq.*]`).
    #[serde(default)]
    pub rabbitmq: Vec<String>,
    /// Recovery target: `latest` or a time (RFC 3339).
    #[serde(default = "default_drill_to")]
    pub to: String,
    /// Where the sources are restored: `scratch` (servers dr starts on
    /// loopback and removes afterwards) or the name of an `[env.<name>]`
    /// with `allow_overwrite = true` whose servers, named after the sources,
    /// are overwritten and left running.
    #[serde(default = "default_drill_environment")]
    pub environment: String,
    /// Failover playbook run once every source answers (name or path).
    pub playbook: Option<String>,
    /// Environment the playbook acts on; default: the restored servers,
    /// named after their sources (the staging environment itself, or the
    /// scratch servers).
    pub env: Option<String>,
    /// Recovery-time objective: drill start to every source answering (and
    /// the playbook's RTO point, when one runs).
    pub rto_seconds: Option<f64>,
    /// Recovery-point objective: the largest target-to-recovered-point gap.
    pub rpo_seconds: Option<f64>,
    /// Directory for the JSON and Markdown reports.
    pub report_dir: PathBuf,
}

fn default_drill_to() -> String {
    "latest".into()
}

fn default_drill_environment() -> String {
    SCRATCH.into()
}

/// The drill environment of servers dr starts and removes; reserved, so no
/// `[env.scratch]` can make it ambiguous.
pub const SCRATCH: &str = "scratch";

impl DrillConfig {
    /// The `[env.<name>]` the drill restores into, `None` for scratch servers.
    pub fn staging(&self) -> Option<&str> {
        (self.environment != SCRATCH).then_some(self.environment.as_str())
    }
}

pub(super) fn yes() -> bool {
    true
}

/// `[env.<name>]`: the servers of one environment, named so that playbooks
/// can refer to them (`target = "standby1"`) without holding addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvConfig {
    /// Holds the failover lock of this environment (default: /var/lib/dr/state).
    pub state_dir: Option<PathBuf>,
    /// Drills may replace the data of these servers (`[drill.*] environment`
    /// naming this environment). Never set it on an environment with data
    /// that matters.
    #[serde(default)]
    pub allow_overwrite: bool,
    /// PostgreSQL servers, by name (`[env.<name>.postgres.<server>]`).
    #[serde(default)]
    pub postgres: std::collections::BTreeMap<String, Spanned<PgTarget>>,
    /// Redis servers, by name (`[env.<name>.redis.<server>]`).
    #[serde(default)]
    pub redis: std::collections::BTreeMap<String, Spanned<RedisTarget>>,
    /// RabbitMQ brokers, by name (`[env.<name>.rabbitmq.<server>]`).
    #[serde(default)]
    pub rabbitmq: std::collections::BTreeMap<String, Spanned<RabbitTarget>>,
}

impl EnvConfig {
    /// Where the failover lock lives.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/dr/state"))
    }
}

/// One PostgreSQL server a playbook may act on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgTarget {
    /// How `dr` connects (libpq key=value or URL; sslmode honoured).
    pub conninfo: String,
    /// What standbys put in `primary_conninfo` to stream from this server
    /// (`pg.repoint`); default: `conninfo`. Differs when standbys reach it by
    /// another address or user.
    pub replication_conninfo: Option<String>,
    /// PGDATA, for actions that run pg_ctl (`pg.fence mode = "stop"`, restarts).
    /// Those actions only work when `dr` runs on this server's host.
    pub data_dir: Option<PathBuf>,
    /// Directory holding `pg_ctl`.
    #[serde(default = "default_pg_bin")]
    pub bin_dir: PathBuf,
    /// Unprivileged OS user pg_ctl runs as.
    #[serde(default = "default_os_user")]
    pub os_user: String,
}

impl PgTarget {
    /// The conninfo standbys stream from.
    pub fn replication_conninfo(&self) -> &str {
        self.replication_conninfo
            .as_deref()
            .unwrap_or(&self.conninfo)
    }
}

/// One Redis server a playbook may act on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisTarget {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    pub url: String,
    /// The server's own config file, which a drill restarts it with (the
    /// snapshot loads only at start-up). Needed for drills into this server.
    pub config_file: Option<PathBuf>,
    /// Its `dir`: where a drill places the restored snapshot.
    pub dir: Option<PathBuf>,
    /// Its `dbfilename`.
    #[serde(default = "default_dbfilename")]
    pub dbfilename: String,
    /// `redis-server` binary a drill restarts it with.
    #[serde(default = "default_redis_server")]
    pub server_bin: PathBuf,
    /// OS user the server runs as (default: the current user).
    pub os_user: Option<String>,
}

impl RedisTarget {
    /// A server known only by its URL (playbooks need no more).
    pub fn at_url(url: String) -> RedisTarget {
        RedisTarget {
            url,
            config_file: None,
            dir: None,
            dbfilename: default_dbfilename(),
            server_bin: default_redis_server(),
            os_user: None,
        }
    }
}

fn default_dbfilename() -> String {
    "dump.rdb".into()
}

impl Config {
    pub(super) fn validate_drill(
        &self,
        text: &str,
        name: &str,
        d: &Spanned<DrillConfig>,
    ) -> Result<(), ConfigError> {
        let fail = |msg: String| Err(self.err(text, d.span(), format!("[drill.{name}]: {msg}")));
        let c = d.get_ref();
        if !layout_name_ok(name) {
            return fail("names may use only letters, digits, '-' and '_' (max 64)".into());
        }
        if c.postgres.is_empty() && c.redis.is_empty() && c.rabbitmq.is_empty() {
            return fail(
                "restores nothing; add postgres = [\"main\"], redis = [\"cache\"] and/or rabbitmq = [\"events\"]".into(),
            );
        }
        for r in &c.rabbitmq {
            if !self.rabbitmq.contains_key(r) {
                return fail(format!("rabbitmq = [{r:?}] names no [rabbitmq.{r}]"));
            }
        }
        for p in &c.postgres {
            if !self.postgres.contains_key(p) {
                return fail(format!("postgres = [{p:?}] names no [postgres.{p}]"));
            }
        }
        for r in &c.redis {
            if !self.redis.contains_key(r) {
                return fail(format!("redis = [{r:?}] names no [redis.{r}]"));
            }
        }
        if c.to != "latest" && crate::time::parse_time(&c.to).is_err() {
            return fail(format!(
                "to = {:?} is neither \"latest\" nor a time like \"2026-11-25T18:44:12Z\"",
                c.to
            ));
        }
        if let Some(env) = c.staging() {
            self.validate_staging(env, c).or_else(fail)?;
        }
        if let Some(e) = &c.env
            && !self.env.contains_key(e)
        {
            return fail(format!("env = {e:?} names no [env.{e}]"));
        }
        if c.env.is_some() && c.playbook.is_none() {
            return fail(
                "env is only used by a playbook; add playbook = \"…\" or remove env".into(),
            );
        }
        for (k, v) in [
            ("rto_seconds", c.rto_seconds),
            ("rpo_seconds", c.rpo_seconds),
        ] {
            // NaN fails too: it is not a finite positive number.
            if v.is_some_and(|v| !v.is_finite() || v <= 0.0) {
                return fail(format!("{k} must be a positive number of seconds"));
            }
        }
        if !c.report_dir.is_absolute() {
            return fail(format!(
                "report_dir {} must be absolute",
                c.report_dir.display()
            ));
        }
        Ok(())
    }

    /// A drill into `[env.<env>]`: the environment exists, allows
    /// overwriting, has a server for every source with what the restore
    /// needs, and none of them is (or lies inside) a protected server.
    pub(super) fn validate_staging(&self, env: &str, d: &DrillConfig) -> Result<(), String> {
        let e = self.env.get(env).map(|e| e.get_ref()).ok_or_else(|| {
            let names: Vec<&String> = self.env.keys().collect();
            format!(
                "environment = {env:?} is neither \"scratch\" nor an [env.<name>]{}",
                if names.is_empty() {
                    String::new()
                } else {
                    format!(" (configured: {})", join(&names))
                }
            )
        })?;
        if !e.allow_overwrite {
            return Err(format!(
                "environment = {env:?}: the drill replaces the data of every server it restores into, \
                 and [env.{env}] does not set allow_overwrite = true; set it only on a staging environment"
            ));
        }
        for p in &d.postgres {
            let t = e.postgres.get(p).map(|t| t.get_ref()).ok_or_else(|| {
                format!("postgres = [{p:?}] has no server [env.{env}.postgres.{p}] to restore into")
            })?;
            if t.data_dir.is_none() {
                return Err(format!(
                    "[env.{env}.postgres.{p}] needs data_dir (and bin_dir, os_user): the drill stops the server, \
                     restores into its data directory and starts it again"
                ));
            }
        }
        for r in &d.rabbitmq {
            if !e.rabbitmq.contains_key(r) {
                return Err(format!(
                    "rabbitmq = [{r:?}] has no broker [env.{env}.rabbitmq.{r}] to restore into"
                ));
            }
        }
        for r in &d.redis {
            let t = e.redis.get(r).map(|t| t.get_ref()).ok_or_else(|| {
                format!("redis = [{r:?}] has no server [env.{env}.redis.{r}] to restore into")
            })?;
            if t.config_file.is_none() || t.dir.is_none() {
                return Err(format!(
                    "[env.{env}.redis.{r}] needs config_file and dir: the drill places the snapshot in dir \
                     and restarts the server with its config file"
                ));
            }
        }
        Ok(())
    }

    pub(super) fn validate_env(
        &self,
        text: &str,
        name: &str,
        env: &Spanned<EnvConfig>,
    ) -> Result<(), ConfigError> {
        let fail = |span: Range<usize>, msg: String| Err(self.err(text, span, msg));
        let check_name = |n: &str, section: &str, span: Range<usize>| {
            if layout_name_ok(n) {
                Ok(())
            } else {
                fail(
                    span,
                    format!("{section}: names may use only letters, digits, '-' and '_' (max 64)"),
                )
            }
        };
        check_name(name, &format!("[env.{name}]"), env.span())?;
        if name == SCRATCH {
            return fail(
                env.span(),
                "[env.scratch]: the name is reserved for the servers drills start and remove; rename the environment".into(),
            );
        }
        let e = env.get_ref();
        if e.postgres.is_empty() && e.redis.is_empty() && e.rabbitmq.is_empty() {
            return fail(
                env.span(),
                format!(
                    "[env.{name}] names no server; add [env.{name}.postgres.<server>] with conninfo, [env.{name}.redis.<server>] with url or [env.{name}.rabbitmq.<server>] with url and user"
                ),
            );
        }
        for (server, t) in &e.rabbitmq {
            check_name(server, &format!("[env.{name}.rabbitmq.{server}]"), t.span())?;
        }
        for (server, t) in &e.postgres {
            let section = format!("[env.{name}.postgres.{server}]");
            check_name(server, &section, t.span())?;
            let p = t.get_ref();
            if let Some(d) = p.data_dir.as_ref().filter(|d| !d.is_absolute()) {
                return fail(
                    t.span(),
                    format!("{section}: data_dir {} must be absolute", d.display()),
                );
            }
        }
        for (server, t) in &e.redis {
            let section = format!("[env.{name}.redis.{server}]");
            check_name(server, &section, t.span())?;
            let r = t.get_ref();
            for (k, p) in [("config_file", &r.config_file), ("dir", &r.dir)] {
                if let Some(p) = p.as_ref().filter(|p| !p.is_absolute()) {
                    return fail(
                        t.span(),
                        format!("{section}: {k} {} must be absolute", p.display()),
                    );
                }
            }
            if r.dbfilename.is_empty() || r.dbfilename.contains('/') {
                return fail(
                    t.span(),
                    format!(
                        "{section}: dbfilename {:?} must be a plain file name",
                        r.dbfilename
                    ),
                );
            }
            if let Err(err) = ::redis::Client::open(t.get_ref().url.as_str()) {
                return fail(
                    t.span(),
                    format!(
                        "{section}: url is not a Redis URL ({err}); use e.g. \"redis://127.0.0.1:6379\""
                    ),
                );
            }
        }
        Ok(())
    }
}
