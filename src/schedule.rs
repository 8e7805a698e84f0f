//! Cron schedules. Always evaluated in UTC: a backup host's local time zone
//! and its daylight-saving jumps must not move (or repeat) a backup.
//!
//! Both the classic 5-field form (`minute hour day-of-month month
//! day-of-week`) and a 6-field form with seconds first are accepted. Day-of-week
//! numbers mean what they mean in crontab(5) — 0 or 7 is Sunday, 1 Monday … 6
//! Saturday — in both forms. The `cron` crate counts 1 = Sunday, so the field
//! is translated here rather than silently shifting every weekly job by a day.

use chrono::{DateTime, Utc};

/// A parsed cron expression.
#[derive(Debug, Clone)]
pub struct Cron {
    expr: String,
    schedule: cron::Schedule,
}

impl PartialEq for Cron {
    fn eq(&self, other: &Self) -> bool {
        self.expr == other.expr
    }
}

const HINT: &str = "use 5 fields (minute hour day-of-month month day-of-week, e.g. \"0 2 * * *\") \
                    or 6 with seconds first (e.g. \"*/30 * * * * *\"); times are UTC";

crate::message_error!(
    /// A cron expression dr cannot schedule; says what to write instead.
    ScheduleError
);

impl Cron {
    /// Parses a 5- or 6-field expression (or `@daily`-style shorthand); the
    /// error says what to write instead.
    pub fn parse(expr: &str) -> Result<Cron, ScheduleError> {
        let trimmed = expr.trim();
        let translated = if trimmed.starts_with('@') {
            trimmed.to_string()
        } else {
            let mut fields: Vec<String> = trimmed.split_whitespace().map(String::from).collect();
            match fields.len() {
                5 => fields.insert(0, "0".into()),
                6 => {}
                n => return Err(format!("has {n} fields; {HINT}").into()),
            }
            for (field, (name, lo, hi)) in fields.iter().zip(BOUNDS) {
                in_range(field, name, lo, hi)?;
            }
            fields[5] = weekdays(&fields[5])?;
            fields.join(" ")
        };
        let schedule = translated
            .parse::<cron::Schedule>()
            .map_err(|e| format!("not a valid cron expression ({}); {HINT}", last_line(&e)))?;
        if schedule.upcoming(Utc).next().is_none() {
            return Err("never fires (no future time matches)".into());
        }
        Ok(Cron {
            expr: trimmed.to_string(),
            schedule,
        })
    }

    /// The first time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule.after(&t).next()
    }

    /// The longest gap, in seconds, between consecutive times of the next
    /// `n + 1` after `t`: how old the newest run's result may get when every
    /// run happens (a weekday schedule allows three days over a weekend).
    pub fn longest_interval(&self, t: DateTime<Utc>, n: usize) -> Option<f64> {
        let times: Vec<DateTime<Utc>> = self.schedule.after(&t).take(n + 1).collect();
        times
            .windows(2)
            .map(|w| (w[1] - w[0]).num_milliseconds() as f64 / 1000.0)
            .reduce(f64::max)
    }

    /// The expression as written.
    pub fn expr(&self) -> &str {
        &self.expr
    }
}

/// Each field of the 6-field form (seconds first) with its bounds as
/// crontab(5) states them; day-of-week is checked by [`weekdays`].
const BOUNDS: [(&str, u32, u32); 5] = [
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
];

/// Checks the numbers of one field against its bounds, so the message
/// names the field and the true range (the `cron` crate says "Hours must be
/// less than 23" of a field that accepts 23). Names (JAN) are left to it.
fn in_range(field: &str, name: &str, lo: u32, hi: u32) -> Result<(), String> {
    for item in field.split(',') {
        let range = item.split_once('/').map_or(item, |(r, _)| r);
        for n in range.split('-') {
            if let Ok(v) = n.parse::<u32>()
                && !(lo..=hi).contains(&v)
            {
                return Err(format!("{name} {v} is out of range ({lo}-{hi}); {HINT}"));
            }
        }
    }
    Ok(())
}

/// The `cron` crate's message without the echo of the (translated, 6-field)
/// expression and the caret line it puts above it: one line, and no
/// fields the user did not write.
fn last_line(e: &cron::error::Error) -> String {
    let text = e.to_string();
    text.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("unreadable")
        .to_string()
}

/// Translates a crontab(5) day-of-week field (0/7 = Sunday) into the list of
/// `cron` crate ordinals (1 = Sunday).
fn weekdays(field: &str) -> Result<String, String> {
    if field == "*" || field == "?" {
        return Ok(field.to_string());
    }
    let day = |s: &str| -> Result<u32, String> {
        const NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
        let l = s.to_ascii_lowercase();
        if let Some(i) = NAMES.iter().position(|n| l.starts_with(n) && l.len() >= 3) {
            return Ok(i as u32);
        }
        match s.parse::<u32>() {
            Ok(n) if n <= 7 => Ok(n),
            _ => Err(format!(
                "day-of-week {s:?} is not 0-7 (0 and 7 are Sunday) or a name (MON, TUE, …)"
            )),
        }
    };
    let mut days = [false; 7];
    for item in field.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => match s.parse::<u32>() {
                Ok(s) if s > 0 => (r, s),
                _ => return Err(format!("day-of-week step in {item:?} must be a number ≥ 1")),
            },
            None => (item, 1),
        };
        let (from, to) = match range {
            "*" | "?" => (0, 6),
            r => match r.split_once('-') {
                Some((a, b)) => (day(a)?, day(b)?),
                // `3/2` means from 3 to the end, as in crontab.
                None if item.contains('/') => (day(r)?, 6),
                None => {
                    let d = day(r)?;
                    (d, d)
                }
            },
        };
        if from > to {
            return Err(format!(
                "day-of-week range {range:?} runs backwards; write it as two ranges"
            ));
        }
        for d in (from..=to).step_by(step as usize) {
            days[(d % 7) as usize] = true;
        }
    }
    let list: Vec<String> = (0..7)
        .filter(|&d| days[d])
        .map(|d| (d + 1).to_string())
        .collect();
    Ok(list.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike, Weekday};

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn longest_interval_spans_the_weekend_of_a_weekday_schedule() {
        let c = Cron::parse("0 2 * * 1-5").expect("parse");
        let gap = c.longest_interval(at("2026-11-25T00:00:00Z"), 32);
        assert_eq!(gap, Some(3.0 * 86400.0));
        let c = Cron::parse("*/2 * * * * *").expect("parse");
        assert_eq!(c.longest_interval(at("2026-11-25T00:00:00Z"), 8), Some(2.0));
    }

    #[test]
    fn five_fields_get_second_zero() {
        let c = Cron::parse("0 2 * * *").expect("parse");
        let n = c.next_after(at("2026-03-01T03:00:00Z")).expect("next");
        assert_eq!(n, at("2026-03-02T02:00:00Z"));
    }

    #[test]
    fn six_fields_have_seconds() {
        let c = Cron::parse("*/5 * * * * *").expect("parse");
        let n = c.next_after(at("2026-03-01T03:00:01Z")).expect("next");
        assert_eq!(n, at("2026-03-01T03:00:05Z"));
    }

    #[test]
    fn weekdays_follow_crontab_numbering() {
        let sunday = Utc
            .with_ymd_and_hms(2026, 3, 1, 0, 0, 0)
            .single()
            .expect("t");
        assert_eq!(sunday.weekday(), Weekday::Sun);
        for expr in ["30 3 * * 0", "30 3 * * 7", "30 3 * * SUN", "30 3 * * sun"] {
            let n = Cron::parse(expr)
                .expect(expr)
                .next_after(sunday - chrono::Duration::days(3))
                .expect("next");
            assert_eq!(n.weekday(), Weekday::Sun, "{expr}");
            assert_eq!((n.hour(), n.minute()), (3, 30), "{expr}");
        }
        let monday = Cron::parse("0 1 * * 1").expect("mon");
        assert_eq!(
            monday.next_after(sunday).expect("n").weekday(),
            Weekday::Mon
        );
        let workdays = Cron::parse("0 1 * * 1-5").expect("1-5");
        let mut t = sunday;
        let mut seen = Vec::new();
        for _ in 0..5 {
            t = workdays.next_after(t).expect("n");
            seen.push(t.weekday());
        }
        assert_eq!(
            seen,
            [
                Weekday::Mon,
                Weekday::Tue,
                Weekday::Wed,
                Weekday::Thu,
                Weekday::Fri
            ]
        );
        let weekend = Cron::parse("0 1 * * 6-7").expect("6-7");
        let t = weekend
            .next_after(sunday + chrono::Duration::days(1))
            .expect("n");
        assert_eq!(t.weekday(), Weekday::Sat);
        assert_eq!(weekend.next_after(t).expect("n").weekday(), Weekday::Sun);
    }

    #[test]
    fn bad_expressions_say_what_to_write() {
        let e = Cron::parse("0 2 * *").unwrap_err();
        assert!(e.contains("has 4 fields") && e.contains("UTC"), "{e}");
        let e = Cron::parse("0 24 * * *").unwrap_err();
        assert!(e.starts_with("hour 24 is out of range (0-23)"), "{e}");
        assert!(Cron::parse("0 23 * * *").is_ok());
        let e = Cron::parse("61 2 * * *").unwrap_err();
        assert!(e.starts_with("minute 61 is out of range (0-59)"), "{e}");
        let e = Cron::parse("0 2 0 * *").unwrap_err();
        assert!(
            e.starts_with("day-of-month 0 is out of range (1-31)"),
            "{e}"
        );
        let e = Cron::parse("0 2 * 1-13 *").unwrap_err();
        assert!(e.starts_with("month 13 is out of range (1-12)"), "{e}");
        // What only the cron crate catches is one line, without the
        // 6-field translation of a 5-field expression.
        let e = Cron::parse("0 2 * FOO *").unwrap_err();
        assert!(
            e.contains("not a valid cron expression") && !e.contains('\n'),
            "{e}"
        );
        assert!(!e.contains("0 0 2"), "{e}");
        let e = Cron::parse("0 2 * * 8").unwrap_err();
        assert!(e.contains("0 and 7 are Sunday"), "{e}");
        let e = Cron::parse("0 2 * * 5-1").unwrap_err();
        assert!(e.contains("backwards"), "{e}");
        assert!(Cron::parse("@daily").is_ok());
    }
}
