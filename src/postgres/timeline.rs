//! Timelines: what a `TTTTTTTT.history` file says, and which timeline a
//! restore follows. Every promotion (a failover, or a restore that ends
//! recovery) starts a timeline that shares its parent's history up to a
//! switch point and then diverges; a restore must follow the branch whose
//! WAL actually holds the target, never PostgreSQL's "latest" by accident.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::Lsn;

/// One line of a history file: timeline `parent` ended at `switch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    /// The ancestor timeline.
    pub parent: u32,
    /// Where the ancestor ended and its child began.
    pub switch: Lsn,
}

crate::message_error!(
    /// A timeline history file that does not parse; names the line.
    HistoryError
);

/// Parses a timeline history file (`<parent>\t<X/X>\t<reason>` per line,
/// oldest ancestor first; `#` comments and blank lines allowed).
pub fn parse_history(text: &str) -> Result<Vec<HistoryEntry>, HistoryError> {
    let mut out: Vec<HistoryEntry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(tli), Some(lsn)) = (fields.next(), fields.next()) else {
            return Err(format!(
                "line {}: expected `<timeline> <LSN> <reason>`",
                i + 1
            ).into());
        };
        let parent = tli
            .parse::<u32>()
            .map_err(|_| format!("line {}: {tli:?} is not a timeline id", i + 1))?;
        let switch: Lsn = lsn.parse().map_err(|e| format!("line {}: {e}", i + 1))?;
        if let Some(prev) = out.last()
            && (parent <= prev.parent || switch < prev.switch)
        {
            return Err(format!(
                "line {}: timelines and switch points must increase",
                i + 1
            ).into());
        }
        out.push(HistoryEntry { parent, switch });
    }
    Ok(out)
}

/// What the repository knows of one timeline.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineInfo {
    /// Timeline id.
    pub id: u32,
    /// Ancestors, oldest first, each with the LSN where it was left
    /// (empty for timeline 1 or when no history file is archived).
    pub history: Vec<HistoryEntry>,
    /// When the history file was archived: an upper bound of the moment
    /// this timeline diverged from its parent.
    pub switch_time: Option<DateTime<Utc>>,
    /// First and last archived segment on this timeline.
    pub first_segment: Option<String>,
    /// Last archived segment on this timeline.
    pub last_segment: Option<String>,
    /// Archived segments on this timeline.
    pub segments: usize,
}

impl TimelineInfo {
    /// The parent timeline, if this one branched.
    pub fn parent(&self) -> Option<u32> {
        self.history.last().map(|h| h.parent)
    }

    /// The LSN where this timeline branched from its parent.
    pub fn switch_lsn(&self) -> Option<Lsn> {
        self.history.last().map(|h| h.switch)
    }

    /// Whether `tli` is this timeline or one of its ancestors.
    pub fn descends_from(&self, tli: u32) -> bool {
        tli == self.id || self.history.iter().any(|h| h.parent == tli)
    }

    /// The path from the oldest ancestor to this timeline: each timeline with
    /// the LSN where the path leaves it (`None` for this one).
    pub fn path(&self) -> Vec<(u32, Option<Lsn>)> {
        let mut p: Vec<(u32, Option<Lsn>)> = self
            .history
            .iter()
            .map(|h| (h.parent, Some(h.switch)))
            .collect();
        p.push((self.id, None));
        p
    }
}

/// Which timeline a restore follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimelineChoice {
    /// The timeline whose WAL holds the target (for `latest`: the one whose
    /// archive reaches furthest in time); refused when two diverged ones do.
    #[default]
    Auto,
    /// The timeline of the restored backup, as PostgreSQL's `current`.
    Current,
    /// The highest timeline with restorable WAL, as PostgreSQL's `latest`.
    Latest,
    /// This timeline.
    Id(u32),
}

impl std::str::FromStr for TimelineChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(TimelineChoice::Auto),
            "current" => Ok(TimelineChoice::Current),
            "latest" => Ok(TimelineChoice::Latest),
            n => n
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .map(TimelineChoice::Id)
                .ok_or_else(|| {
                    format!("--timeline {n:?}: expected a timeline id (1, 2, …), current or latest")
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_files_parse_as_postgres_writes_them() {
        let h = parse_history(
            "1\t0/3000000\tno recovery target specified\n\n2\t0/5A0B0C8\tbefore 2026-12-05 12:00:00.12+00\n",
        )
        .expect("parse");
        assert_eq!(
            h,
            vec![
                HistoryEntry {
                    parent: 1,
                    switch: "0/3000000".parse().expect("lsn")
                },
                HistoryEntry {
                    parent: 2,
                    switch: "0/5A0B0C8".parse().expect("lsn")
                },
            ]
        );
        let t = TimelineInfo {
            id: 3,
            history: h,
            switch_time: None,
            first_segment: None,
            last_segment: None,
            segments: 0,
        };
        assert_eq!(t.parent(), Some(2));
        assert!(t.descends_from(1) && t.descends_from(3) && !t.descends_from(4));
        assert_eq!(t.path().len(), 3);
        for bad in ["x\t0/1\tr", "1\tzz\tr", "2\t0/5\tr\n1\t0/6\tr", "1"] {
            assert!(parse_history(bad).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// History files round-trip, and any text either parses into
        /// increasing entries or is refused; never a panic.
        #[test]
        fn history_round_trips_and_garbage_is_refused(
            steps in proptest::collection::vec((1u32..5, 0u64..(1 << 40)), 0..6),
            junk in "\\PC{0,200}",
        ) {
            let mut text = String::new();
            let (mut tli, mut lsn) = (0u32, 0u64);
            for (dt, dl) in &steps {
                tli += dt;
                lsn += dl;
                text.push_str(&format!("{tli}\t{}\tno recovery target specified\n", Lsn(lsn)));
            }
            let h = parse_history(&text).expect("well-formed");
            proptest::prop_assert_eq!(h.len(), steps.len());
            proptest::prop_assert_eq!(h.last().map(|e| e.switch.0), (!steps.is_empty()).then_some(lsn));
            if let Ok(h) = parse_history(&junk) {
                for w in h.windows(2) {
                    proptest::prop_assert!(w[0].parent < w[1].parent && w[0].switch <= w[1].switch);
                }
            }
        }
    }

    #[test]
    fn timeline_choices() {
        assert_eq!("3".parse(), Ok(TimelineChoice::Id(3)));
        assert_eq!("current".parse(), Ok(TimelineChoice::Current));
        assert_eq!("latest".parse(), Ok(TimelineChoice::Latest));
        assert!("0".parse::<TimelineChoice>().is_err());
        assert!("two".parse::<TimelineChoice>().is_err());
    }
}
