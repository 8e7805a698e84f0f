//! Restore target times as people type them.

use chrono::{DateTime, Utc};

crate::message_error!(
    /// A time that is not a restore target dr can read; says which forms are.
    TimeError
);

/// Parses a restore target time: RFC 3339 (`2026-11-25T18:44:12Z`, offsets) or
/// `YYYY-MM-DD HH:MM:SS[.fff][+TZ]`; without an offset the time is local.
/// Returns the instant and whether it was interpreted as local time.
pub fn parse_time(s: &str) -> Result<(DateTime<Utc>, bool), TimeError> {
    use chrono::{Local, NaiveDateTime, TimeZone};
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok((t.with_timezone(&Utc), false));
    }
    for f in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%d %H:%M:%S%.f %#z",
    ] {
        if let Ok(t) = DateTime::parse_from_str(s, f) {
            return Ok((t.with_timezone(&Utc), false));
        }
    }
    if let Some(rest) = s.strip_suffix('Z').or_else(|| s.strip_suffix(" UTC")) {
        for f in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
            if let Ok(n) = NaiveDateTime::parse_from_str(rest, f) {
                return Ok((n.and_utc(), false));
            }
        }
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(n) = NaiveDateTime::parse_from_str(s, f) {
            return match Local.from_local_datetime(&n).single() {
                Some(t) => Ok((t.with_timezone(&Utc), true)),
                None => Err(format!(
                    "{s:?} does not exist or is ambiguous in local time (a DST change); add an offset like +01:00"
                ).into()),
            };
        }
    }
    Err(format!(
        "{s:?} is not a time; use RFC 3339 (2026-11-25T18:44:12Z, 2026-11-25T19:44:12+01:00), \
         'YYYY-MM-DD HH:MM:SS[+TZ]' (local time without an offset), or 'latest'"
    ).into())
}
