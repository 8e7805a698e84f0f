//! `dr report`: what the repository can restore, drawn as one self-contained
//! HTML page (inline CSS and SVG, no script, no external asset): per source a
//! timeline of the recoverable window (backups, WAL coverage, gaps,
//! timelines), the latest verification and drill, and the RTO/RPO trend of
//! every verification and drill report stored in the repository.

use std::fmt::Write;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;

use crate::codec::Expect;
use crate::config::Config;
use crate::postgres::catalog::{Catalog, WalGap};
use crate::redis::restore::RedisCatalog;
use crate::repo::Repository;
use crate::verify::drill::DrillReport;
use crate::verify::html::{self, escape, raw, stat, verdict};
use crate::verify::report::{SourceReport, VerifyRun, secs, time};

mod page;

pub use page::html;

/// One backup or snapshot on the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct BackupPoint {
    /// Backup or snapshot id.
    pub id: String,
    /// When it started.
    pub start: DateTime<Utc>,
    /// When it ended (a PostgreSQL backup is restorable from here on).
    pub end: DateTime<Utc>,
    /// Plaintext bytes.
    pub bytes: u64,
    /// Timeline it was taken on (PostgreSQL).
    pub timeline: Option<u32>,
}

/// A span a PostgreSQL restore can reach.
#[derive(Debug, Clone, Serialize)]
pub struct Span {
    /// Earliest restorable time.
    pub from: DateTime<Utc>,
    /// Latest restorable time.
    pub to: DateTime<Utc>,
    /// Timeline it ends on.
    pub timeline: u32,
    /// Backup that starts it.
    pub backup: String,
}

/// A timeline with archived WAL.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineView {
    /// Timeline id.
    pub id: u32,
    /// The timeline it branched from.
    pub parent: Option<u32>,
    /// When it branched (history file time).
    pub switch_time: Option<DateTime<Utc>>,
    /// Segments archived on it.
    pub segments: usize,
    /// First and last archived segment.
    pub first_segment: Option<String>,
    /// Last archived segment.
    pub last_segment: Option<String>,
    /// Archive time of its first and last segment: the WAL coverage drawn.
    pub archived: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

/// A verification or drill result of one source, for the trend.
#[derive(Debug, Clone, Serialize)]
pub struct Result1 {
    /// `verify` or `drill`.
    pub kind: String,
    /// Report id.
    pub id: String,
    /// Drill name, for drills.
    pub drill: Option<String>,
    /// When the run started.
    pub started: DateTime<Utc>,
    /// The source's report.
    pub source: SourceReport,
}

/// Everything drawn for one source.
#[derive(Debug, Clone, Serialize)]
pub struct SourceView {
    /// `postgres` or `redis`.
    pub engine: String,
    /// Config name.
    pub name: String,
    /// Backups or snapshots, oldest first.
    pub backups: Vec<BackupPoint>,
    /// Restorable spans (PostgreSQL): one per backup and timeline.
    pub windows: Vec<Span>,
    /// Earliest and latest restorable point over all spans or snapshots.
    pub window: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// Archived WAL segments (PostgreSQL).
    pub wal_segments: usize,
    /// Missing WAL between archived segments (PostgreSQL).
    pub gaps: Vec<WalGap>,
    /// Timelines (PostgreSQL).
    pub timelines: Vec<TimelineView>,
    /// Verification and drill results, oldest first.
    pub results: Vec<Result1>,
    /// What could not be read.
    pub errors: Vec<String>,
}

impl SourceView {
    fn empty(engine: &str, name: &str) -> SourceView {
        SourceView {
            engine: engine.into(),
            name: name.into(),
            backups: Vec::new(),
            windows: Vec::new(),
            window: None,
            wal_segments: 0,
            gaps: Vec::new(),
            timelines: Vec::new(),
            results: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// The newest verification, if any.
    pub fn latest_verify(&self) -> Option<&Result1> {
        self.results.iter().rev().find(|r| r.kind == "verify")
    }

    /// The newest drill, if any.
    pub fn latest_drill(&self) -> Option<&Result1> {
        self.results.iter().rev().find(|r| r.kind == "drill")
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When it was made.
    pub generated: DateTime<Utc>,
    /// The repository, as configured.
    pub repository: String,
    /// Each configured source.
    pub sources: Vec<SourceView>,
    /// Verification runs stored (newest last).
    pub verify_runs: usize,
    /// Drill reports stored, newest last: (id, drill, started, ok, RTO, RPO).
    pub drills: Vec<DrillSummary>,
    /// Reports that could not be read.
    pub errors: Vec<String>,
}

/// One stored drill, in short.
#[derive(Debug, Clone, Serialize)]
pub struct DrillSummary {
    /// Report id.
    pub id: String,
    /// Drill name.
    pub drill: String,
    /// Start.
    pub started: DateTime<Utc>,
    /// Passed.
    pub ok: bool,
    /// Achieved RTO.
    pub rto_seconds: Option<f64>,
    /// Achieved RPO.
    pub rpo_seconds: Option<f64>,
    /// RTO objective.
    pub rto_objective: Option<f64>,
    /// RPO objective.
    pub rpo_objective: Option<f64>,
}

/// Reads the catalogs of every configured source and every stored
/// verification and drill report.
pub async fn build(repo: &Repository, cfg: &Config) -> Report {
    let mut sources = Vec::new();
    for name in cfg.postgres.keys() {
        sources.push(pg_view(repo, name).await);
    }
    for name in cfg.redis.keys() {
        sources.push(redis_view(repo, name).await);
    }
    let mut errors = Vec::new();
    let runs: Vec<VerifyRun> = read_reports(repo, "reports/verify/", &mut errors).await;
    let mut drills: Vec<DrillReport> = read_reports(repo, "reports/drill/", &mut errors).await;
    drills.sort_by_key(|d| d.started);
    let engine_of = |kind: &str| if kind == "pg" { "postgres" } else { "redis" };
    for run in &runs {
        for s in &run.sources {
            if let Some(v) = sources
                .iter_mut()
                .find(|v| v.engine == engine_of(&s.kind) && v.name == s.name)
            {
                v.results.push(Result1 {
                    kind: "verify".into(),
                    id: run.id.clone(),
                    drill: None,
                    started: run.started,
                    source: s.clone(),
                });
            }
        }
    }
    for d in &drills {
        for s in &d.sources {
            if let Some(v) = sources
                .iter_mut()
                .find(|v| v.engine == engine_of(&s.kind) && v.name == s.name)
            {
                v.results.push(Result1 {
                    kind: "drill".into(),
                    id: d.id.clone(),
                    drill: Some(d.drill.clone()),
                    started: d.started,
                    source: s.clone(),
                });
            }
        }
    }
    for v in &mut sources {
        v.results.sort_by_key(|r| r.started);
    }
    Report {
        generated: Utc::now(),
        repository: format!(
            "{} region(s): {}",
            repo.regions.iter().count(),
            repo.regions
                .iter()
                .map(|r| r.name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        sources,
        verify_runs: runs.len(),
        drills: drills
            .iter()
            .map(|d| DrillSummary {
                id: d.id.clone(),
                drill: d.drill.clone(),
                started: d.started,
                ok: d.ok,
                rto_seconds: d.achieved.rto_seconds,
                rpo_seconds: d.achieved.rpo_seconds,
                rto_objective: d.objectives.rto_seconds,
                rpo_objective: d.objectives.rpo_seconds,
            })
            .collect(),
        errors,
    }
}

async fn pg_view(repo: &Repository, name: &str) -> SourceView {
    let mut v = SourceView::empty("postgres", name);
    let cat = match Catalog::load(repo, name).await {
        Ok(c) => c,
        Err(e) => {
            v.errors.push(e.to_string());
            return v;
        }
    };
    v.backups = cat
        .backups
        .iter()
        .map(|b| BackupPoint {
            id: b.id.to_string(),
            start: b.start_time,
            end: b.stop_time,
            bytes: b.size,
            timeline: Some(b.timeline),
        })
        .collect();
    v.windows = cat
        .windows
        .iter()
        .map(|w| Span {
            from: w.from,
            to: w.to,
            timeline: w.timeline,
            backup: w.backup.clone(),
        })
        .collect();
    v.window = cat
        .windows
        .iter()
        .map(|w| w.from)
        .min()
        .zip(cat.windows.iter().map(|w| w.to).max());
    v.wal_segments = cat.wal.len();
    v.gaps = cat.wal_gaps();
    v.timelines = cat
        .timelines
        .values()
        .map(|t| TimelineView {
            id: t.id,
            parent: t.parent(),
            switch_time: t.switch_time,
            segments: t.segments,
            first_segment: t.first_segment.clone(),
            last_segment: t.last_segment.clone(),
            archived: {
                let times: Vec<DateTime<Utc>> = cat
                    .wal
                    .iter()
                    .filter(|(seg, _)| seg.timeline.0 == t.id)
                    .filter_map(|(_, e)| e.archived)
                    .collect();
                times.iter().min().copied().zip(times.iter().max().copied())
            },
        })
        .collect();
    v.errors
        .extend(cat.unreadable.iter().map(|(k, e)| format!("{k}: {e}")));
    v
}

async fn redis_view(repo: &Repository, name: &str) -> SourceView {
    let mut v = SourceView::empty("redis", name);
    match RedisCatalog::load(repo, name).await {
        Ok(cat) => {
            v.backups = cat
                .snapshots
                .iter()
                .map(|s| BackupPoint {
                    id: s.id.clone(),
                    start: s.time,
                    end: s.finished.max(s.time),
                    bytes: s.rdb.plain_size,
                    timeline: None,
                })
                .collect();
            v.window = cat
                .snapshots
                .iter()
                .map(|s| s.time)
                .min()
                .zip(cat.snapshots.iter().map(|s| s.time).max());
            v.errors
                .extend(cat.unreadable.iter().map(|(k, e)| format!("{k}: {e}")));
        }
        Err(e) => v.errors.push(e.to_string()),
    }
    v
}

/// Reads and decodes every JSON report under `prefix`; unreadable ones are
/// named in `errors`.
async fn read_reports<T: serde::de::DeserializeOwned>(
    repo: &Repository,
    prefix: &str,
    errors: &mut Vec<String>,
) -> Vec<T> {
    let objects = match repo.regions.list(prefix).await {
        Ok((_, o)) => o,
        Err(e) => {
            errors.push(format!("cannot list {prefix}: {e}"));
            return Vec::new();
        }
    };
    let read: Vec<(String, Result<T, String>)> = futures::stream::iter(objects)
        .map(|o| async move {
            let expect = Expect {
                key: o.key.clone(),
                stored_size: Some(o.size),
                plain_hash: None,
                plain_size: None,
                pieces: None,
            };
            let res = match repo.get_verified(&o.key, expect).await {
                Ok((_, body)) => serde_json::from_slice(&body).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            (o.key, res)
        })
        .buffered(8)
        .collect()
        .await;
    let mut out = Vec::new();
    for (key, r) in read {
        match r {
            Ok(v) => out.push(v),
            Err(e) => errors.push(format!("{key}: {e}")),
        }
    }
    out
}
