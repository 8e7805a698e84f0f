//! Checks of one `[redis.<name>]` source: the server answers at its URL,
//! accepts the credentials, and lets this user start replication (PSYNC),
//! which every snapshot needs.

use std::time::Duration;

use super::Status;
use crate::config::RedisConfig;

/// Longest the check waits for the server.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The check of one Redis source, as (status, detail).
pub(super) async fn check(rc: &RedisConfig) -> (Status, String) {
    match crate::redis::snapshot::probe(rc, TIMEOUT.min(Duration::from_secs(rc.timeout_seconds)))
        .await
    {
        Ok(p) => {
            let psync = match p.psync {
                Some(_) => "PSYNC allowed",
                None => {
                    "REPLCONF allowed (whether PSYNC is cannot be asked: needs ACL DRYRUN, Redis 7+)"
                }
            };
            (
                Status::Ok,
                format!(
                    "Redis {} at {} ({}): credentials accepted, {psync}",
                    p.version, p.addr, p.role
                ),
            )
        }
        Err(e) => (Status::Fail, e.to_string()),
    }
}
