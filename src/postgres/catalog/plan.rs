//! Choosing the backup and timeline for a target, and saying plainly why a
//! target cannot be reached.

use super::*;

impl Catalog {
    /// The backup to restore for `target` (None = latest): the newest one that
    /// ended before the target and whose WAL reaches it, on the timeline that
    /// holds the target. `latest` is refused when it would stop short of
    /// archived WAL (see [`Catalog::plan`]).
    pub fn pick(&self, target: Option<DateTime<Utc>>) -> Result<&PgManifest, PgError> {
        self.plan(target, false, TimelineChoice::Auto)
            .map(|p| p.backup)
    }

    /// What a restore to `target` (None = latest) replays: the backup, the
    /// timeline to follow, and for `latest` what stands between the newest
    /// reachable point and the newest archived WAL (refused unless
    /// `accept_gap`, then returned so the report says what was given up).
    pub fn plan(
        &self,
        target: Option<DateTime<Utc>>,
        accept_gap: bool,
        choice: TimelineChoice,
    ) -> Result<Plan<'_>, PgError> {
        let covers = |w: &&Window| target.is_none_or(|t| w.from <= t && t <= w.to);
        let own = |w: &Window| {
            self.backups
                .iter()
                .any(|b| b.id == w.backup && b.timeline == w.timeline)
        };
        let timeline = match choice {
            TimelineChoice::Id(n) => {
                if !self.windows.iter().any(|w| w.timeline == n) {
                    return Err(PgError::Other(format!(
                        "--timeline {n}: no backup reaches timeline {n} through archived WAL; {}",
                        self.timelines_text()
                    )));
                }
                n
            }
            TimelineChoice::Latest => match self.windows.iter().map(|w| w.timeline).max() {
                Some(n) => n,
                None => return Err(PgError::Other(self.outside_message(target))),
            },
            TimelineChoice::Current => {
                match self.windows.iter().rev().filter(|w| own(w)).find(covers) {
                    Some(w) => w.timeline,
                    None => return Err(PgError::Other(self.outside_message(target))),
                }
            }
            TimelineChoice::Auto => self.auto_timeline(target)?,
        };
        let chosen = self
            .windows
            .iter()
            .rev()
            .filter(|w| w.timeline == timeline)
            .filter(|w| choice != TimelineChoice::Current || own(w))
            .find(covers);
        let Some(w) = chosen else {
            return Err(PgError::Other(format!(
                "{} on timeline {timeline}",
                self.outside_message(target)
            )));
        };
        let backup = self
            .backups
            .iter()
            .find(|b| b.id == w.backup)
            .ok_or_else(|| PgError::Other("catalog inconsistency".into()))?;
        let shortfall = if target.is_none() {
            self.shortfall(w)
        } else {
            None
        };
        match shortfall {
            Some(s) if !accept_gap => Err(PgError::Other(format!(
                "--to latest would stop short: {s}. Restore to a time inside the window \
                 (`dr list pg`), repair the repository (`dr repo sync` from a region that \
                 holds the objects), or pass --accept-gap to restore up to {} and give \
                 the rest up",
                w.to.format("%Y-%m-%dT%H:%M:%SZ")
            ))),
            gave_up => Ok(Plan {
                backup,
                timeline,
                gave_up,
                stop_at_backup_end: target.is_some() && w.end_basis == WindowEnd::BackupEnd,
                stop_after_lsn: w.end_lsn.filter(|_| target.is_some_and(|t| t >= w.to)),
            }),
        }
    }

    /// The timeline that holds `target`: among those with a window covering
    /// it, a branch is set aside for its ancestor while the target precedes
    /// the branch, and for `latest` an ancestor is set aside for a branch
    /// when it holds no WAL past the switch point. Two left means two
    /// histories diverge there: refused, naming both.
    pub(super) fn auto_timeline(&self, target: Option<DateTime<Utc>>) -> Result<u32, PgError> {
        let covering: Vec<&Window> = self
            .windows
            .iter()
            .filter(|w| target.is_none_or(|t| w.from <= t && t <= w.to))
            .collect();
        let mut candidates: Vec<u32> = covering.iter().map(|w| w.timeline).collect();
        candidates.sort_unstable();
        candidates.dedup();
        let info = |t: u32| self.timelines.get(&t);
        let keep: Vec<u32> = candidates
            .iter()
            .copied()
            .filter(|&y| match target {
                Some(t) => {
                    // Before the branch, its history is its ancestor's.
                    let before_branch =
                        info(y).and_then(|i| i.switch_time).is_some_and(|st| t < st);
                    let ancestor_covers = candidates
                        .iter()
                        .any(|&x| x != y && info(y).is_some_and(|i| i.descends_from(x)));
                    !(before_branch && ancestor_covers)
                }
                None => !candidates
                    .iter()
                    .any(|&z| z != y && self.superseded_by(y, z)),
            })
            .collect();
        match keep.as_slice() {
            [] => Err(PgError::Other(self.outside_message(target))),
            [one] => Ok(*one),
            many => {
                let fmt = |d: &DateTime<Utc>| d.format("%Y-%m-%dT%H:%M:%SZ").to_string();
                let list = many
                    .iter()
                    .map(|t| {
                        let end = covering
                            .iter()
                            .filter(|w| w.timeline == *t)
                            .map(|w| w.to)
                            .max();
                        let branch = info(*t)
                            .and_then(|i| Some((i.parent()?, i.switch_lsn()?)))
                            .map(|(p, l)| format!(", branched from {p} at {l}"))
                            .unwrap_or_default();
                        format!(
                            "timeline {t} (WAL to {}{branch})",
                            end.map(|e| fmt(&e)).unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" and ");
                let what = match target {
                    Some(t) => format!("target {}", t.format("%Y-%m-%dT%H:%M:%S%.3fZ")),
                    None => "latest".to_string(),
                };
                Err(PgError::Other(format!(
                    "{what} is ambiguous: {list} both hold WAL for it after they diverged. \
                     Choose one with --timeline {} (`dr list pg` shows every timeline)",
                    many.iter()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join(" or --timeline ")
                )))
            }
        }
    }

    /// Whether timeline `x` committed nothing after `y` (one of its
    /// descendants) branched off it, so `y` simply continues its history:
    /// judged by `x`'s last commit where it is known, else by segment (no
    /// WAL past the switch segment).
    pub(super) fn superseded_by(&self, x: u32, y: u32) -> bool {
        let Some(yi) = self.timelines.get(&y) else {
            return false;
        };
        let Some(leave) = yi
            .path()
            .iter()
            .find(|(t, _)| *t == x)
            .and_then(|(_, l)| *l)
        else {
            return false;
        };
        let per_log = 0x1_0000_0000u64 / WAL_SEGMENT_SIZE;
        self.windows.iter().filter(|w| w.timeline == x).all(|w| {
            match (w.end_lsn, w.end_basis) {
                // The last commit on `x` is known: diverged only if it
                // committed after `y` branched off.
                (Some(last_commit), _) => last_commit < leave,
                (None, WindowEnd::BackupEnd) => self
                    .backups
                    .iter()
                    .any(|b| b.id == w.backup && b.stop_lsn <= leave),
                // Otherwise by segment: nothing past the switch segment.
                _ => w.last_segment.parse::<WalSegmentName>().is_ok_and(|s| {
                    u64::from(s.log) * per_log + u64::from(s.seg) <= leave.0 / WAL_SEGMENT_SIZE
                }),
            }
        })
    }

    /// One line per timeline, for errors.
    pub(super) fn timelines_text(&self) -> String {
        let list: Vec<String> = self
            .timelines
            .values()
            .map(|t| {
                let windows: Vec<String> = self
                    .windows
                    .iter()
                    .filter(|w| w.timeline == t.id)
                    .map(|w| {
                        format!(
                            "{} .. {}",
                            w.from.format("%Y-%m-%dT%H:%M:%SZ"),
                            w.to.format("%Y-%m-%dT%H:%M:%SZ")
                        )
                    })
                    .collect();
                format!(
                    "timeline {}: {}",
                    t.id,
                    if windows.is_empty() {
                        "not restorable".to_string()
                    } else {
                        windows.join(", ")
                    }
                )
            })
            .collect();
        format!("timelines: {}", list.join("; "))
    }

    /// What the newest point reachable from `w` leaves behind: WAL archived
    /// on its timeline beyond a missing segment, with the manifests that
    /// could not be read (they may be backups that would bridge the gap).
    pub fn shortfall(&self, w: &Window) -> Option<String> {
        let end = w.last_segment.parse::<WalSegmentName>().ok()?;
        if let Some(why) = self.damaged_tails.get(&end).filter(|_| w.streamed_tail) {
            return Some(format!(
                "the streamed WAL of unfinished segment {end} cannot be read, so replay ends \
                 at {}: {why}",
                w.to.format("%Y-%m-%dT%H:%M:%SZ")
            ));
        }
        let missing = next_segment(end);
        let later: Vec<(&WalSegmentName, &WalEntry)> = self
            .wal
            .range(missing..)
            .filter(|(l, _)| l.timeline == end.timeline)
            .collect();
        let (newest, entry) = later.last()?;
        let fmt = |d: &DateTime<Utc>| d.format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let lost = entry
            .archived
            .map(|a| {
                let secs = (a - w.to).num_seconds().max(0);
                format!(
                    ", archived {} ({} of WAL after the reachable end {})",
                    fmt(&a),
                    humantime::format_duration(std::time::Duration::from_secs(secs as u64)),
                    fmt(&w.to)
                )
            })
            .unwrap_or_default();
        let mut s = format!(
            "WAL segment {missing} is missing in every region, so replay ends at {end}; \
             {} later segment(s) are archived up to {newest}{lost}",
            later.len()
        );
        if !self.unreadable.is_empty() {
            let keys: Vec<&str> = self.unreadable.iter().map(|(k, _)| k.as_str()).collect();
            s.push_str(&format!(
                "; unreadable manifest(s): {} ({})",
                keys.join(", "),
                self.unreadable[0].1
            ));
        }
        Some(s)
    }

    pub(super) fn outside_message(&self, target: Option<DateTime<Utc>>) -> String {
        if self.windows.is_empty() {
            return format!(
                "no restorable backup: {} backup(s), none with the WAL it needs archived{}; \
                 take one with `dr backup pg` and check archive_command",
                self.backups.len(),
                if self.unreadable.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({} manifest(s) unreadable: {})",
                        self.unreadable.len(),
                        self.unreadable[0].1
                    )
                }
            );
        }
        let Some(t) = target else {
            return "no restorable backup".into();
        };
        let fmt = |d: &DateTime<Utc>| d.format("%Y-%m-%dT%H:%M:%SZ").to_string();
        let windows = self
            .windows
            .iter()
            .map(|w| format!("{} .. {}", fmt(&w.from), fmt(&w.to)))
            .collect::<Vec<_>>()
            .join(", ");
        let first = self.windows.iter().map(|w| w.from).min().unwrap_or(t);
        let last = self.windows.iter().map(|w| w.to).max().unwrap_or(t);
        let why = if t < first {
            format!(
                "is before the end of the oldest usable backup ({})",
                fmt(&first)
            )
        } else if t > last {
            // Segments archived beyond the window mean one in between is gone.
            let newest_window = self.windows.iter().max_by_key(|w| w.to);
            let beyond = newest_window.and_then(|w| {
                let end = w.last_segment.parse::<WalSegmentName>().ok()?;
                let later = self
                    .wal
                    .range(next_segment(end)..)
                    .find(|(l, _)| l.timeline == end.timeline)?;
                Some((next_segment(end), later))
            });
            // An unreadable streamed tail holds the WAL the target needs.
            let damaged = newest_window.filter(|w| w.streamed_tail).and_then(|w| {
                let end = w.last_segment.parse::<WalSegmentName>().ok()?;
                let why = self.damaged_tails.get(&end)?;
                Some(format!(
                    "is beyond what can be read: the streamed WAL of unfinished segment {end} \
                     cannot be read, so replay stops at {}: {why}",
                    fmt(&last)
                ))
            });
            match (damaged, beyond) {
                (Some(d), _) => d,
                (None, Some((missing, (later, e)))) => format!(
                    "is beyond a gap in the archived WAL: segment {missing} is missing in every region, \
                     so replay stops at {} although {later} was archived{}",
                    fmt(&last),
                    e.archived
                        .map(|a| format!(" ({})", fmt(&a)))
                        .unwrap_or_default()
                ),
                (None, None) => format!("is after the last archived WAL ({})", fmt(&last)),
            }
        } else {
            let before = self
                .windows
                .iter()
                .filter(|w| w.to < t)
                .max_by_key(|w| w.to);
            let after = self
                .windows
                .iter()
                .filter(|w| w.from > t)
                .min_by_key(|w| w.from);
            match (before, after) {
                (Some(b), Some(a)) => format!(
                    "is in no recoverable window: the nearest points are {} (where replay from \
                     backup {} stops) and {} (when backup {} ended)",
                    fmt(&b.to),
                    b.backup,
                    fmt(&a.from),
                    a.backup
                ),
                _ => "is in no recoverable window".into(),
            }
        };
        format!(
            "target {} {why}; the recoverable window is: {windows}",
            t.format("%Y-%m-%dT%H:%M:%S%.3fZ")
        )
    }
}
