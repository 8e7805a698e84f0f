//! Checks run against a restored scratch server: amcheck over every btree
//! index, user SQL checks, and user Redis command checks.

use std::time::{Duration, Instant};

use crate::config::{PgCheck, RedisCheck};
use crate::postgres::server::connect_local_at;

use super::report::CheckResult;

crate::message_error!(
    /// A check that could not run against a restored server: what failed.
    CheckError
);

/// Where a restored PostgreSQL server is reached.
#[derive(Debug, Clone)]
pub struct PgAt {
    /// Socket directory (or 127.0.0.1).
    pub host: String,
    /// Port (names the socket file too).
    pub port: u16,
    /// User to connect as.
    pub user: String,
    /// A conninfo to connect with instead (a staging server, reached as it
    /// is configured, password and TLS included).
    pub conninfo: Option<String>,
}

impl PgAt {
    /// Connects to `db`.
    pub async fn connect(&self, db: &str) -> Result<tokio_postgres::Client, CheckError> {
        if let Some(c) = &self.conninfo {
            return crate::postgres::connect_db(c, Some(db), Some(Duration::from_secs(10)))
                .await
                .map_err(|e| CheckError(crate::postgres::pg_cause(&e)));
        }
        connect_local_at(
            &self.host,
            self.port,
            &self.user,
            db,
            Duration::from_secs(10),
        )
        .await
        .map_err(|e| CheckError(crate::postgres::pg_cause(&e)))
    }
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Databases that accept connections, `template0` excluded by that rule.
pub async fn databases(at: &PgAt) -> Result<Vec<String>, CheckError> {
    let c = at.connect("postgres").await?;
    let rows = c
        .query(
            "SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname",
            &[],
        )
        .await
        .map_err(|e| crate::postgres::sql_cause(&e))?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// amcheck's `bt_index_check` over every valid btree index of `db` (temporary
/// relations skipped: they belong to sessions that no longer exist). Creating
/// the extension can fail (not installed on this host): then the check is
/// reported as skipped, not failed, because it proves nothing either way.
pub async fn amcheck(at: &PgAt, db: &str) -> CheckResult {
    let t = Instant::now();
    let name = format!("amcheck {db}");
    let c = match at.connect(db).await {
        Ok(c) => c,
        Err(e) => return CheckResult::fail(name, format!("cannot connect: {e}"), secs(t)),
    };
    if let Err(e) = c
        .batch_execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        .await
    {
        return CheckResult::pass(
            name,
            format!(
                "skipped: the amcheck extension cannot be created here ({}); install the PostgreSQL contrib package on the verify host",
                crate::postgres::sql_cause(&e)
            ),
            secs(t),
        );
    }
    let schema: String = match c
        .query_one(
            "SELECT n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'amcheck'",
            &[],
        )
        .await
    {
        Ok(r) => r.get(0),
        Err(e) => return CheckResult::fail(name, crate::postgres::sql_cause(&e), secs(t)),
    };
    let indexes = match c
        .query(
            "SELECT c.oid, c.oid::regclass::text FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam \
             WHERE a.amname = 'btree' AND c.relpersistence <> 't' AND i.indisready AND i.indisvalid \
             ORDER BY c.oid",
            &[],
        )
        .await
    {
        Ok(rows) => rows,
        Err(e) => return CheckResult::fail(name, crate::postgres::sql_cause(&e), secs(t)),
    };
    let mut bad = Vec::new();
    for r in &indexes {
        let oid: u32 = r.get(0);
        let index: String = r.get(1);
        let sql = format!(
            "SELECT {}.bt_index_check({oid}::regclass)",
            quote_ident(&schema)
        );
        if let Err(e) = c.batch_execute(&sql).await {
            bad.push(format!("{index}: {}", crate::postgres::sql_cause(&e)));
        }
    }
    if bad.is_empty() {
        CheckResult::pass(
            name,
            format!("{} btree indexes checked, no corruption", indexes.len()),
            secs(t),
        )
    } else {
        CheckResult::fail(
            name,
            format!(
                "{} of {} btree indexes failed: {}",
                bad.len(),
                indexes.len(),
                bad.join("; ")
            ),
            secs(t),
        )
    }
}

/// A user SQL check: exactly one row with one boolean column, true to pass.
pub async fn pg_user_check(at: &PgAt, check: &PgCheck) -> CheckResult {
    let t = Instant::now();
    let name = check.name.clone();
    let c = match at.connect(&check.database).await {
        Ok(c) => c,
        Err(e) => {
            return CheckResult::fail(
                name,
                format!("cannot connect to database {}: {e}", check.database),
                secs(t),
            );
        }
    };
    let rows = match c.query(check.sql.as_str(), &[]).await {
        Ok(r) => r,
        Err(e) => {
            return CheckResult::fail(
                name,
                format!("{}: {}", check.sql, crate::postgres::sql_cause(&e)),
                secs(t),
            );
        }
    };
    let value = match rows.as_slice() {
        [row] if row.len() == 1 => row.try_get::<_, Option<bool>>(0).map_err(|_| {
            format!(
                "{} returns {}, not a boolean",
                check.sql,
                row.columns()[0].type_()
            )
        }),
        _ => Err(format!(
            "{} must return one row with one boolean column; it returned {} row(s)",
            check.sql,
            rows.len()
        )),
    };
    match value {
        Ok(Some(true)) => CheckResult::pass(name, format!("{} is true", check.sql), secs(t)),
        Ok(v) => CheckResult::fail(
            name,
            format!(
                "{} is {} in database {}",
                check.sql,
                if v.is_some() { "false" } else { "NULL" },
                check.database
            ),
            secs(t),
        ),
        Err(e) => CheckResult::fail(name, e, secs(t)),
    }
}

/// Renders a reply as text for comparison with `expect`.
pub fn reply_text(v: &redis::Value) -> String {
    use redis::Value;
    match v {
        Value::Nil => "(nil)".into(),
        Value::Int(i) => i.to_string(),
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Okay => "OK".into(),
        Value::Boolean(b) => b.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Array(items) | Value::Set(items) => {
            items.iter().map(reply_text).collect::<Vec<_>>().join("\n")
        }
        Value::ServerError(e) => format!("(error) {}", e.details().unwrap_or_default()),
        other => format!("{other:?}"),
    }
}

/// A user Redis check on the server at `url`: the command's reply, as text,
/// must equal `expect`.
pub async fn redis_user_check(url: &str, check: &RedisCheck) -> CheckResult {
    let t = Instant::now();
    let name = check.name.clone();
    let run = async {
        let client = redis_client(url, check.db)?;
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| format!("cannot connect: {}", crate::redis::client_cause(&e, url)))?;
        let mut cmd = redis::cmd(&check.command[0]);
        for a in &check.command[1..] {
            cmd.arg(a);
        }
        cmd.query_async::<redis::Value>(&mut c)
            .await
            .map_err(|e| format!("{}: {e}", check.command.join(" ")))
    };
    match run.await {
        Ok(v) => {
            let got = reply_text(&v);
            if got == check.expect {
                CheckResult::pass(
                    name,
                    format!("{} = {got:?}", check.command.join(" ")),
                    secs(t),
                )
            } else {
                CheckResult::fail(
                    name,
                    format!(
                        "{} replied {got:?}, expected {:?} (db {})",
                        check.command.join(" "),
                        check.expect,
                        check.db
                    ),
                    secs(t),
                )
            }
        }
        Err(e) => CheckResult::fail(name, e, secs(t)),
    }
}

/// A client for `url` on database `db` (whatever database the URL names).
pub fn redis_client(url: &str, db: u32) -> Result<redis::Client, CheckError> {
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()
        .map_err(|e| format!("bad Redis URL: {e}"))?;
    let settings = info.redis_settings().clone().set_db(i64::from(db));
    redis::Client::open(info.set_redis_settings(settings))
        .map_err(|e| e.to_string())
        .map_err(Into::into)
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_render_as_expected_text() {
        use redis::Value;
        assert_eq!(reply_text(&Value::Int(42)), "42");
        assert_eq!(reply_text(&Value::Nil), "(nil)");
        assert_eq!(reply_text(&Value::Okay), "OK");
        assert_eq!(reply_text(&Value::BulkString(b"v".to_vec())), "v");
        assert_eq!(
            reply_text(&Value::Array(vec![Value::Int(1), Value::Int(2)])),
            "1\n2"
        );
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
