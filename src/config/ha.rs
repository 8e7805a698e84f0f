//! `[ha]`: automatic failover of PostgreSQL clusters, coordinated through
//! etcd. Plain data and the checks that need no engine knowledge; the
//! behaviour lives in `crate::ha`.

use super::*;

/// `[ha]`: the etcd cluster, the leader lease and the clusters it protects.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// etcd client URLs, e.g. `["https://10.0.0.1:2379"]`.
    pub endpoints: Vec<String>,
    /// PEM CA bundle that signed the etcd servers' certificates (enables TLS).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for etcd clusters that require one.
    pub cert_file: Option<PathBuf>,
    /// PEM key of `cert_file` (refused when others may read it).
    pub key_file: Option<PathBuf>,
    /// etcd user (password from `password_env` or `password_file`).
    pub user: Option<String>,
    /// Environment variable holding the etcd password.
    pub password_env: Option<String>,
    /// File holding the etcd password.
    pub password_file: Option<PathBuf>,
    /// Key prefix; every key of a cluster is under `<prefix>/<cluster>/`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Lease of the leader key: how long a primary whose daemon stopped
    /// renewing stays leader before a standby may take over.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: std::time::Duration,
    /// How often the daemon observes its server and renews its lease. Must
    /// be below `ttl / 2`, so a renewal can fail once and still be retried.
    #[serde(default = "default_loop_wait", with = "humantime_serde")]
    pub loop_wait: std::time::Duration,
    /// Which member this host is (overridden by `--member` / `DR_HA_MEMBER`).
    /// Without clusters, it only names this daemon in the fleet.
    pub member: Option<String>,
    /// Daemons sharing this config divide its scheduled jobs through etcd
    /// (`crate::ha::fleet`): each run on exactly one of them. Default true.
    #[serde(default = "default_fleet")]
    pub fleet: bool,
    /// Protected PostgreSQL clusters (`[ha.postgres.<cluster>]`).
    #[serde(default)]
    pub postgres: std::collections::BTreeMap<String, Spanned<HaPgCluster>>,
    /// Protected Redis groups (`[ha.redis.<group>]`).
    #[serde(default)]
    pub redis: std::collections::BTreeMap<String, Spanned<HaRedisGroup>>,
}

/// `[ha.postgres.<cluster>]`: the members of one replicated cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaPgCluster {
    /// Members by name (`[ha.postgres.<cluster>.member.<name>]`): the same
    /// keys as a playbook's PostgreSQL server.
    #[serde(default)]
    pub member: std::collections::BTreeMap<String, Spanned<PgTarget>>,
    /// A standby further behind the last position the leader published is
    /// not promoted automatically (default 1 MiB, as Patroni's).
    #[serde(default = "default_max_lag")]
    pub max_lag_bytes: u64,
    /// How long the leader's daemon tries to start its stopped server
    /// before it gives up the leader key (default: `ttl`).
    #[serde(default, with = "humantime_serde_opt")]
    pub restart_timeout: Option<std::time::Duration>,
    /// Actions run by the new leader after a promotion, in order
    /// (`[[ha.postgres.<cluster>.hook]]`, the playbook action types:
    /// `exec`, `http`, `sql`, …). Checked when the config is loaded.
    #[serde(default)]
    pub hook: Vec<Spanned<toml::Table>>,
}

fn default_prefix() -> String {
    "/dr".into()
}

fn default_fleet() -> bool {
    true
}

fn default_ttl() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

fn default_loop_wait() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

fn default_max_lag() -> u64 {
    1 << 20
}

impl HaPgCluster {
    /// How long a leader retries starting its server.
    pub fn restart_timeout(&self, ha: &HaConfig) -> std::time::Duration {
        self.restart_timeout.unwrap_or(ha.ttl)
    }
}

impl HaConfig {
    /// The member this daemon is: `cli` (from `--member`) or `[ha] member`.
    pub fn member_name<'a>(&'a self, cli: Option<&'a str>) -> Option<&'a str> {
        cli.or(self.member.as_deref())
    }
}

impl Config {
    /// The `[ha]` section, if configured.
    pub fn ha(&self) -> Option<&HaConfig> {
        self.ha.as_ref().map(|h| h.get_ref())
    }

    /// Checks `[ha]` for what needs no engine: endpoints, timing, TLS and
    /// password pairs, member names.
    pub(super) fn validate_ha(&self, text: &str) -> Result<(), ConfigError> {
        let Some(ha) = &self.ha else { return Ok(()) };
        let span = ha.span();
        let h = ha.get_ref();
        let err = |m: String| Err(self.err(text, span.clone(), m));
        if h.endpoints.is_empty() {
            return err("[ha] endpoints is empty; list the etcd client URLs, e.g. endpoints = [\"http://127.0.0.1:2379\"]".into());
        }
        for e in &h.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return err(format!(
                    "[ha] endpoints: {e:?} is not an etcd URL; write http://host:port or https://host:port"
                ));
            }
            if e.starts_with("https://") && h.ca_file.is_none() {
                return err(format!(
                    "[ha] endpoints: {e:?} uses TLS but [ha] ca_file is not set; set it to the CA that signed the etcd certificates"
                ));
            }
        }
        if h.ttl < std::time::Duration::from_secs(2) {
            return err(format!(
                "[ha] ttl = {:?} is below etcd's shortest lease (2s); set ttl = \"2s\" or more",
                h.ttl
            ));
        }
        if h.loop_wait.is_zero() || h.loop_wait * 2 >= h.ttl {
            return err(format!(
                "[ha] loop_wait = {:?} must be above 0 and below ttl / 2 ({:?}), or a primary \
                 could lose its lease between two renewals; lower loop_wait or raise ttl \
                 (e.g. ttl = \"30s\", loop_wait = \"10s\")",
                h.loop_wait,
                h.ttl / 2
            ));
        }
        if h.cert_file.is_some() != h.key_file.is_some() {
            return err("[ha] cert_file and key_file go together; set both (client certificate and its key) or neither".into());
        }
        if h.password_env.is_some() && h.password_file.is_some() {
            return err("[ha] sets both password_env and password_file; keep one of them".into());
        }
        if h.user.is_none() && (h.password_env.is_some() || h.password_file.is_some()) {
            return err("[ha] has a password but no user; set [ha] user".into());
        }
        if h.user.is_some() && h.password_env.is_none() && h.password_file.is_none() {
            return err(
                "[ha] user is set without a password; set password_env or password_file".into(),
            );
        }
        if h.prefix.is_empty() || !h.prefix.starts_with('/') || h.prefix.ends_with('/') {
            return err(format!(
                "[ha] prefix = {:?} must start with '/' and not end with one, e.g. \"/dr\"",
                h.prefix
            ));
        }
        if h.postgres.is_empty() && h.redis.is_empty() && !h.fleet {
            return err("[ha] protects no cluster and has fleet = false, so it does nothing; add [ha.postgres.<cluster>.member.<name>] sections (conninfo, data_dir) or [ha.redis.<group>.member.<name>] sections (url) for each member, or remove fleet = false to share the scheduled jobs between daemons".into());
        }
        for (cluster, c) in &h.postgres {
            let cerr = |m: String| Err(self.err(text, c.span(), m));
            if !layout_name_ok(cluster) || cluster.contains('/') {
                return cerr(format!(
                    "[ha.postgres.{cluster}]: use letters, digits, '-' and '_' in the cluster name"
                ));
            }
            if cluster == "fleet" {
                return cerr(
                    "[ha.postgres.fleet]: \"fleet\" names the keys of the daemons' shared jobs; give the cluster another name".into(),
                );
            }
            if c.get_ref().member.len() < 2 {
                return cerr(format!(
                    "[ha.postgres.{cluster}] has {} member(s); failover needs a primary and at least one standby \
                     ([ha.postgres.{cluster}.member.<name>] with conninfo and data_dir)",
                    c.get_ref().member.len()
                ));
            }
            for (name, m) in &c.get_ref().member {
                if !layout_name_ok(name) || name.contains('/') {
                    return Err(self.err(
                        text,
                        m.span(),
                        format!("[ha.postgres.{cluster}.member.{name}]: use letters, digits, '-' and '_' in the member name"),
                    ));
                }
                if m.get_ref().data_dir.is_none() {
                    return Err(self.err(
                        text,
                        m.span(),
                        format!("[ha.postgres.{cluster}.member.{name}] has no data_dir; its daemon needs it to promote, fence and rejoin the server"),
                    ));
                }
            }
        }
        self.validate_ha_redis(text, h)?;
        if let Some(m) = &h.member
            && !(h.postgres.is_empty() && h.redis.is_empty())
            && !h.member_names().contains(m)
        {
            return err(format!(
                "[ha] member = {m:?} is not a member of any [ha.postgres.<cluster>] or [ha.redis.<group>]; use one of the names under member."
            ));
        }
        Ok(())
    }
}
