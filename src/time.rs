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
    parse_time_in(s, &chrono::Local)
}

/// [`parse_time`] with `zone` as the local time zone (tests use a zone
/// with daylight saving time of their own).
pub fn parse_time_in<Tz: chrono::TimeZone>(
    s: &str,
    zone: &Tz,
) -> Result<(DateTime<Utc>, bool), TimeError> {
    use chrono::NaiveDateTime;
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
            return match zone.from_local_datetime(&n).single() {
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
    )
    .into())
}

/// `parse_time` against the instants it must produce: any instant written
/// with any offset in every accepted spelling reads back as that instant;
/// local times in a zone with daylight saving time read as the zone says,
/// and the hour that does not exist or happens twice is refused; times
/// with impossible fields are refused.
#[cfg(test)]
mod props {
    use super::*;
    use chrono::{FixedOffset, LocalResult, NaiveDate, NaiveDateTime, TimeZone};
    use proptest::prelude::*;

    /// A zone like central Europe's: +01:00, and +02:00 from the last
    /// Sunday of March 01:00 UTC to the last Sunday of October 01:00 UTC.
    #[derive(Debug, Clone, Copy)]
    struct Cet;

    fn last_sunday(year: i32, month: u32) -> NaiveDate {
        let mut d = NaiveDate::from_ymd_opt(year, month + 1, 1)
            .expect("date")
            .pred_opt()
            .expect("date");
        while d.format("%u").to_string() != "7" {
            d = d.pred_opt().expect("date");
        }
        d
    }

    fn offset_at(utc: &NaiveDateTime) -> FixedOffset {
        let y = utc.date().format("%Y").to_string().parse().expect("year");
        let start = last_sunday(y, 3).and_hms_opt(1, 0, 0).expect("time");
        let end = last_sunday(y, 10).and_hms_opt(1, 0, 0).expect("time");
        let h = if *utc >= start && *utc < end { 2 } else { 1 };
        FixedOffset::east_opt(h * 3600).expect("offset")
    }

    impl TimeZone for Cet {
        type Offset = FixedOffset;
        fn from_offset(_: &FixedOffset) -> Cet {
            Cet
        }
        fn offset_from_local_date(&self, local: &NaiveDate) -> LocalResult<FixedOffset> {
            self.offset_from_local_datetime(&local.and_hms_opt(12, 0, 0).expect("noon"))
        }
        fn offset_from_local_datetime(&self, local: &NaiveDateTime) -> LocalResult<FixedOffset> {
            let fits: Vec<FixedOffset> = [1, 2]
                .into_iter()
                .map(|h| FixedOffset::east_opt(h * 3600).expect("offset"))
                .filter(|o| {
                    offset_at(&(*local - chrono::Duration::seconds(o.local_minus_utc().into())))
                        == *o
                })
                .collect();
            match fits.as_slice() {
                [] => LocalResult::None,
                [o] => LocalResult::Single(*o),
                [a, b] => LocalResult::Ambiguous(*b, *a),
                _ => unreachable!(),
            }
        }
        fn offset_from_utc_date(&self, utc: &NaiveDate) -> FixedOffset {
            offset_at(&utc.and_hms_opt(12, 0, 0).expect("noon"))
        }
        fn offset_from_utc_datetime(&self, utc: &NaiveDateTime) -> FixedOffset {
            offset_at(utc)
        }
    }

    fn instant() -> impl Strategy<Value = DateTime<Utc>> {
        // 1970..2100, whole seconds or milliseconds.
        (0i64..4_102_444_800, prop::option::of(0u32..1000)).prop_map(|(s, ms)| {
            DateTime::from_timestamp(s, ms.unwrap_or(0) * 1_000_000).expect("time")
        })
    }

    fn fraction(t: &DateTime<Utc>) -> String {
        match t.timestamp_subsec_millis() {
            0 => String::new(),
            ms => format!(".{ms:03}"),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]
        #[test]
        fn offsets_in_every_spelling(t in instant(), minutes in -14 * 60i32..=14 * 60) {
            let o = FixedOffset::east_opt(minutes * 60).expect("offset");
            let l = t.with_timezone(&o);
            let base = l.format("%Y-%m-%d %H:%M:%S").to_string();
            let f = fraction(&t);
            let sign = if minutes < 0 { '-' } else { '+' };
            let (h, m) = (minutes.abs() / 60, minutes.abs() % 60);
            let mut forms = vec![
                l.to_rfc3339(),
                format!("{base}{f}{sign}{h:02}:{m:02}"),
                format!("{base}{f}{sign}{h:02}{m:02}"),
                format!("{base}{f} {sign}{h:02}:{m:02}"),
                format!("  {}  ", l.to_rfc3339()),
            ];
            if minutes == 0 {
                forms.push(format!("{}{f}Z", t.format("%Y-%m-%d %H:%M:%S")));
                forms.push(format!("{}{f}Z", t.format("%Y-%m-%dT%H:%M:%S")));
                forms.push(format!("{}{f} UTC", t.format("%Y-%m-%d %H:%M:%S")));
            }
            if m == 0 {
                forms.push(format!("{base}{f}{sign}{h:02}"));
            }
            for s in forms {
                prop_assert_eq!(parse_time_in(&s, &Cet), Ok((t, false)), "{}", s);
            }
        }

        #[test]
        fn local_times_across_dst(t in instant(), near_switch in any::<bool>(), minute in 0i64..240) {
            // Half the cases within two hours of a switch.
            let t = if near_switch {
                let y = t.format("%Y").to_string().parse().expect("year");
                let month = if t.timestamp() % 2 == 0 { 3 } else { 10 };
                let switch = last_sunday(y, month).and_hms_opt(1, 0, 0).expect("time").and_utc();
                switch + chrono::Duration::minutes(minute - 120)
            } else {
                t
            };
            let naive = t.with_timezone(&Cet).naive_local();
            for s in [
                naive.format("%Y-%m-%d %H:%M:%S%.f").to_string(),
                naive.format("%Y-%m-%dT%H:%M:%S%.f").to_string(),
            ] {
                let got = parse_time_in(&s, &Cet);
                match Cet.from_local_datetime(&naive) {
                    LocalResult::Single(_) => prop_assert_eq!(got, Ok((t, true)), "{}", s),
                    // The hour repeated in autumn: refused, never a guess.
                    _ => prop_assert!(got.as_ref().is_err_and(|e| e.contains("DST")), "{} -> {:?}", s, got),
                }
            }
            // The hour skipped in spring does not exist: refused.
            let y = t.format("%Y").to_string().parse().expect("year");
            let gap = last_sunday(y, 3).and_hms_opt(2, (minute % 60) as u32, 0).expect("time");
            let s = gap.format("%Y-%m-%d %H:%M:%S").to_string();
            let got = parse_time_in(&s, &Cet);
            prop_assert!(got.as_ref().is_err_and(|e| e.contains("DST")), "{} -> {:?}", s, got);
        }

        #[test]
        fn impossible_fields_are_refused(
            t in instant(),
            field in 0usize..5,
            bad in 0u32..100,
            zone in prop::sample::select(vec!["", "Z", "+01:00", " UTC"]),
        ) {
            let mut parts = [
                t.format("%Y").to_string().parse::<u32>().expect("year"),
                t.format("%m").to_string().parse().expect("month"),
                t.format("%d").to_string().parse().expect("day"),
                t.format("%H").to_string().parse().expect("hour"),
                t.format("%M").to_string().parse().expect("minute"),
            ];
            // Out of range for the field (a 60th second is a leap second).
            let limit = [0, 13, 32, 24, 60][field];
            if field == 0 {
                return Ok(());
            }
            parts[field] = limit + bad % (100 - limit);
            let s = format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:00{zone}",
                parts[0], parts[1], parts[2], parts[3], parts[4]
            );
            prop_assert!(parse_time_in(&s, &Cet).is_err(), "{} accepted", s);
        }

        #[test]
        fn words_and_junk_are_refused(t in instant(), junk in "[a-z ]{1,6}|[0-9]{1,3}|[:/.]") {
            prop_assert!(parse_time_in(&junk, &Cet).is_err());
            let s = format!("{}{junk}", t.to_rfc3339());
            if !junk.trim().is_empty() {
                prop_assert!(parse_time_in(&s, &Cet).is_err(), "{} accepted", s);
            }
        }
    }
}
