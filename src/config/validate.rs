//! Checks of the parsed file that need no engine knowledge: names, paths,
//! ranges and cross-references, each error naming its line.

use super::*;

/// Scratch paths end up in `pg_ctl -o` settings; keep them plain.
pub(super) fn scratch_path_ok(p: &Path) -> bool {
    p.is_absolute()
        && !p
            .to_string_lossy()
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '\'' | '"' | '\\' | '$' | '`'))
}

pub(super) fn layout_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Config {
    /// Every check of the parsed file; fills `region_specs` on success.
    pub(super) fn validate(&mut self, text: &str) -> Result<(), ConfigError> {
        let specs = self.validate_repository(text)?;
        self.validate_redis_names(text)?;
        for (name, r) in &self.rabbitmq {
            rabbitmq::check(name, r, layout_name_ok)
                .map_err(|m| self.err(text, r.span(), m.into()))?;
        }
        self.validate_postgres(text)?;
        for (name, env) in &self.env {
            self.validate_env(text, name, env)?;
        }
        self.validate_verify(text)?;
        for (name, d) in &self.drill {
            self.validate_drill(text, name, d)?;
        }
        self.validate_daemon(text)?;
        self.validate_ha(text)?;
        self.region_specs = specs;
        Ok(())
    }

    /// `[repository]` and `[[region]]`: keys, levels, region names and kinds.
    fn validate_repository(&self, text: &str) -> Result<Vec<RegionSpec>, ConfigError> {
        let mut specs = Vec::new();
        let repo = &self.repository;
        if repo.recipients.get_ref().is_empty() {
            return Err(self.err(
                text,
                repo.recipients.span(),
                "[repository] has no recipients; add `recipients = [\"age1…\"]` \
                 (create a key pair with `dr keygen --output identity.txt`)"
                    .into(),
            ));
        }
        for r in repo.recipients.get_ref() {
            if r.parse::<age::x25519::Recipient>().is_err() {
                return Err(self.err(
                    text,
                    repo.recipients.span(),
                    format!(
                        "recipient {r:?} is not an age X25519 public key (expected \"age1…\"); \
                         `dr keygen` prints one"
                    ),
                ));
            }
        }
        for (name, l) in [
            ("compression_level", &repo.compression_level),
            ("wal_compression_level", &repo.wal_compression_level),
        ] {
            let level = *l.get_ref();
            if !(1..=19).contains(&level) {
                return Err(self.err(
                    text,
                    l.span(),
                    format!("{name} = {level} is out of range; use 1 (fastest) to 19"),
                ));
            }
        }
        if self.regions.is_empty() {
            return Err(ConfigError {
                location: self.source.display().to_string(),
                message: "no [[region]] is configured; add one, e.g. \
                          [[region]] name = \"local\" type = \"fs\" path = \"/var/lib/dr/repo\""
                    .into(),
            });
        }
        let min = *repo.min_regions.get_ref();
        if min == 0 || min > self.regions.len() {
            return Err(self.err(
                text,
                repo.min_regions.span(),
                format!(
                    "min_regions = {min} but {} region(s) are configured; use a value from 1 to {}",
                    self.regions.len(),
                    self.regions.len()
                ),
            ));
        }
        for (i, region) in self.regions.iter().enumerate() {
            let r = region.get_ref();
            let name = r.name.get_ref();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(self.err(
                    text,
                    r.name.span(),
                    format!("region name {name:?} must be non-empty and use only letters, digits, '-' and '_'"),
                ));
            }
            if let Some(prev) = self.regions[..i]
                .iter()
                .find(|p| p.get_ref().name.get_ref() == name)
            {
                let prev_line = line_of(text, prev.get_ref().name.span().start);
                return Err(self.err(
                    text,
                    r.name.span(),
                    format!(
                        "duplicate region name {name:?} (first used on line {prev_line}); \
                         give each [[region]] a unique name"
                    ),
                ));
            }
            let spec = self.region_kind(text, region)?;
            specs.push(RegionSpec {
                name: name.clone(),
                kind: spec,
            });
        }
        Ok(specs)
    }

    /// `[redis.<name>]`: names usable in object keys, sane timeouts.
    fn validate_redis_names(&self, text: &str) -> Result<(), ConfigError> {
        for (name, r) in &self.redis {
            if !layout_name_ok(name) {
                return Err(self.err(
                    text,
                    r.span(),
                    format!(
                        "[redis.{name}]: names may use only letters, digits, '-' and '_' (max 64)"
                    ),
                ));
            }
            if r.get_ref().timeout_seconds == 0 {
                return Err(self.err(
                    text,
                    r.span(),
                    format!("[redis.{name}]: timeout_seconds must be at least 1"),
                ));
            }
        }
        Ok(())
    }

    /// `[postgres.<name>]`: names, paths, modes and streaming settings.
    fn validate_postgres(&self, text: &str) -> Result<(), ConfigError> {
        for (name, pg) in &self.postgres {
            let p = pg.get_ref();
            if !layout_name_ok(name) {
                return Err(self.err(
                    text,
                    pg.span(),
                    format!("[postgres.{name}]: names may use only letters, digits, '-' and '_' (max 64)"),
                ));
            }
            if p.data_dir.as_os_str().is_empty() && p.mode == BackupMode::Local {
                return Err(self.err(
                    text,
                    pg.span(),
                    format!(
                        "[postgres.{name}]: data_dir is missing; local-mode backups read PGDATA \
                         (set data_dir), or set mode = \"remote\" to back up over the \
                         replication protocol"
                    ),
                ));
            }
            if !p.data_dir.as_os_str().is_empty() && !p.data_dir.is_absolute() {
                return Err(self.err(
                    text,
                    pg.span(),
                    format!(
                        "[postgres.{name}]: data_dir {} must be absolute",
                        p.data_dir.display()
                    ),
                ));
            }
            if p.conninfo.trim().is_empty() {
                let what = match p.mode {
                    BackupMode::Remote => {
                        "mode = \"remote\" needs conninfo naming the server and a user with \
                         the REPLICATION attribute (e.g. \"host=db1 user=dr_backup dbname=postgres\")"
                    }
                    BackupMode::Local => {
                        "conninfo is missing (e.g. \"host=127.0.0.1 port=5432 user=postgres dbname=postgres\")"
                    }
                };
                return Err(self.err(text, pg.span(), format!("[postgres.{name}]: {what}")));
            }
            if p.parallel == 0 || p.parallel > 64 {
                return Err(self.err(
                    text,
                    pg.span(),
                    format!(
                        "[postgres.{name}]: parallel = {} is out of range; use 1 to 64",
                        p.parallel
                    ),
                ));
            }
            let slot = p.slot_name(name);
            if slot.is_empty()
                || slot.len() > 63
                || !slot
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(self.err(
                    text,
                    pg.span(),
                    format!(
                        "[postgres.{name}]: slot {slot:?} is not a replication slot name; \
                         use lower-case letters, digits and '_' (max 63)"
                    ),
                ));
            }
            if p.stream_flush_interval.is_zero() {
                return Err(self.err(
                    text,
                    pg.span(),
                    format!("[postgres.{name}]: stream_flush_interval must be above zero"),
                ));
            }
            if p.synchronous && p.wal != WalMode::Stream {
                return Err(self.err(
                    text,
                    pg.span(),
                    format!(
                        "[postgres.{name}]: synchronous = true needs wal = \"stream\" \
                         (archive_command cannot make commits wait)"
                    ),
                ));
            }
        }
        Ok(())
    }

    pub(super) fn validate_verify(&self, text: &str) -> Result<(), ConfigError> {
        for (name, pg) in &self.postgres {
            let v = &pg.get_ref().verify;
            let fail = |msg: String| {
                Err(self.err(text, pg.span(), format!("[postgres.{name}.verify]: {msg}")))
            };
            if let Some(d) = v.scratch_dir.as_ref().filter(|d| !scratch_path_ok(d)) {
                return fail(format!(
                    "scratch_dir {} must be absolute and free of spaces and quotes",
                    d.display()
                ));
            }
            for c in &v.check {
                if c.name.trim().is_empty() || c.sql.trim().is_empty() {
                    return fail(
                        "every [[check]] needs a name and sql, e.g. name = \"users exist\" sql = \"SELECT count(*) > 0 FROM users\"".into(),
                    );
                }
            }
        }
        for (name, r) in &self.redis {
            let v = &r.get_ref().verify;
            let fail = |msg: String| {
                Err(self.err(text, r.span(), format!("[redis.{name}.verify]: {msg}")))
            };
            if let Some(d) = v.scratch_dir.as_ref().filter(|d| !scratch_path_ok(d)) {
                return fail(format!(
                    "scratch_dir {} must be absolute and free of spaces and quotes",
                    d.display()
                ));
            }
            for c in &v.check {
                if c.name.trim().is_empty() || c.command.is_empty() {
                    return fail(
                        "every [[check]] needs a name and a command, e.g. command = [\"DBSIZE\"] expect = \"42\"".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// Checks `[daemon]` and every cron expression, so `dr check` reports a
    /// bad schedule with its line before the daemon ever reads it.
    pub(super) fn validate_daemon(&self, text: &str) -> Result<(), ConfigError> {
        for e in self.schedules() {
            crate::schedule::Cron::parse(e.expr.get_ref()).map_err(|why| {
                self.err(
                    text,
                    e.expr.span(),
                    format!("{} {} = {:?}: {why}", e.table(), e.key, e.expr.get_ref()),
                )
            })?;
        }
        let Some(d) = &self.daemon else {
            return Ok(());
        };
        let c = d.get_ref();
        let fail = |msg: String| Err(self.err(text, d.span(), format!("[daemon]: {msg}")));
        if c.listen.parse::<std::net::SocketAddr>().is_err() {
            return fail(format!(
                "listen = {:?} is not an address and port; use e.g. \"127.0.0.1:8597\"",
                c.listen
            ));
        }
        if !(1..=64).contains(&c.max_concurrent_jobs) {
            return fail(format!(
                "max_concurrent_jobs = {} is out of range; use 1 to 64",
                c.max_concurrent_jobs
            ));
        }
        if c.retry_initial_seconds == 0 || c.retry_max_seconds < c.retry_initial_seconds {
            return fail(
                "retry_initial_seconds must be at least 1 and at most retry_max_seconds".into(),
            );
        }
        if c.unhealthy_after_failures == 0 || c.probe_seconds == 0 {
            return fail("unhealthy_after_failures and probe_seconds must be at least 1".into());
        }
        if !c.state_dir.is_absolute() {
            return fail(format!(
                "state_dir {} must be absolute",
                c.state_dir.display()
            ));
        }
        Ok(())
    }
}
