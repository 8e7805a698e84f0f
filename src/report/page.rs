//! The report as one self-contained HTML page: inline CSS and SVG, no
//! script and no external assets, so it opens offline and in a mail.

use super::*;

/// The report as one HTML page.
pub fn html(rep: &Report) -> String {
    let mut body = String::new();
    let problems: usize = rep
        .sources
        .iter()
        .map(|s| s.gaps.len() + s.errors.len() + usize::from(s.backups.is_empty()))
        .sum::<usize>()
        + rep.errors.len();
    let _ = write!(
        body,
        "<section><h2>Summary</h2><div class=\"stats\">{}{}{}{}</div>",
        stat(&rep.sources.len().to_string(), "sources"),
        stat(&rep.verify_runs.to_string(), "verification runs stored"),
        stat(&rep.drills.len().to_string(), "drills stored"),
        stat(
            &problems.to_string(),
            "problems (gaps, missing backups, unreadable objects)"
        ),
    );
    let rows: Vec<Vec<String>> = rep
        .sources
        .iter()
        .map(|s| {
            vec![
                s.engine.clone(),
                s.name.clone(),
                s.backups.len().to_string(),
                s.window
                    .map(|(a, b)| format!("{} .. {}", time(Some(a)), time(Some(b))))
                    .unwrap_or_else(|| "-".into()),
                s.gaps.len().to_string(),
                match s.latest_verify() {
                    Some(r) => raw(&format!(
                        "{} {}",
                        verdict(r.source.ok()),
                        escape(&time(Some(r.started)))
                    )),
                    None => "never".into(),
                },
                match s.latest_drill() {
                    Some(r) => raw(&format!(
                        "{} {}",
                        verdict(r.source.ok()),
                        escape(&time(Some(r.started)))
                    )),
                    None => "never".into(),
                },
            ]
        })
        .collect();
    body.push_str(&html::table(
        &[
            "engine",
            "source",
            "backups",
            "recoverable window",
            "WAL gaps",
            "last verification",
            "last drill",
        ],
        &rows,
    ));
    for e in &rep.errors {
        let _ = write!(
            body,
            "<p><span class=\"badge warn\">unreadable</span> {}</p>",
            escape(e)
        );
    }
    body.push_str("</section>");
    for s in &rep.sources {
        body.push_str(&source_section(s, rep.generated));
    }
    if !rep.drills.is_empty() {
        body.push_str("<section><h2>Drills</h2>");
        let rows: Vec<Vec<String>> = rep
            .drills
            .iter()
            .rev()
            .map(|d| {
                vec![
                    d.drill.clone(),
                    d.id.clone(),
                    time(Some(d.started)),
                    raw(verdict(d.ok)),
                    format!("{} / {}", secs(d.rto_seconds), secs(d.rto_objective)),
                    format!("{} / {}", secs(d.rpo_seconds), secs(d.rpo_objective)),
                ]
            })
            .collect();
        body.push_str(&html::table(
            &[
                "drill",
                "report",
                "started",
                "result",
                "RTO / objective",
                "RPO / objective",
            ],
            &rows,
        ));
        body.push_str("</section>");
    }
    html::page(
        "dr report",
        &format!(
            "Generated {} · repository: {}",
            rep.generated.format("%Y-%m-%d %H:%M:%S UTC"),
            rep.repository
        ),
        &body,
    )
}

pub(super) fn source_section(s: &SourceView, now: DateTime<Utc>) -> String {
    let mut out = format!(
        "<section class=\"source\" id=\"{e}-{n}\" data-engine=\"{e}\" data-source=\"{n}\"><h2>{e} <code>{n}</code></h2>",
        e = escape(&s.engine),
        n = escape(&s.name)
    );
    let newest = s.backups.iter().map(|b| b.end).max();
    let _ = write!(
        out,
        "<div class=\"stats\">{}{}{}{}{}</div>",
        stat(&s.backups.len().to_string(), "backups"),
        stat(
            &newest
                .map(|t| html::short_secs((now - t).num_milliseconds() as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            "age of the newest backup"
        ),
        stat(
            &s.window
                .map(|(a, b)| html::short_secs((b - a).num_milliseconds() as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            "recoverable window"
        ),
        stat(&s.gaps.len().to_string(), "WAL gaps"),
        stat(&s.timelines.len().to_string(), "timelines"),
    );
    for e in &s.errors {
        let _ = write!(
            out,
            "<p><span class=\"badge fail\">error</span> {}</p>",
            escape(e)
        );
    }
    out.push_str("<h3>Recoverable window</h3>");
    out.push_str(&timeline_svg(s, now));
    if !s.gaps.is_empty() {
        let rows: Vec<Vec<String>> = s
            .gaps
            .iter()
            .map(|g| {
                vec![
                    g.timeline.to_string(),
                    g.first_missing.clone(),
                    g.missing.to_string(),
                    format!("{} .. {}", time(g.after), time(g.before)),
                ]
            })
            .collect();
        out.push_str("<h3 class=\"fail\">WAL gaps: no restore can replay across these</h3>");
        out.push_str(&html::table(
            &[
                "timeline",
                "first missing segment",
                "segments missing",
                "between",
            ],
            &rows,
        ));
    }
    if !s.timelines.is_empty() {
        let rows: Vec<Vec<String>> = s
            .timelines
            .iter()
            .map(|t| {
                vec![
                    t.id.to_string(),
                    t.parent
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "-".into()),
                    time(t.switch_time),
                    t.segments.to_string(),
                    format!(
                        "{} .. {}",
                        t.first_segment.as_deref().unwrap_or("-"),
                        t.last_segment.as_deref().unwrap_or("-")
                    ),
                ]
            })
            .collect();
        out.push_str("<h3>Timelines</h3>");
        out.push_str(&html::table(
            &["timeline", "parent", "branched", "segments", "archived"],
            &rows,
        ));
    }
    let rows: Vec<Vec<String>> = s
        .backups
        .iter()
        .rev()
        .map(|b| {
            vec![
                b.id.clone(),
                time(Some(b.start)),
                time(Some(b.end)),
                bytes(b.bytes),
                b.timeline
                    .map(|t| t.to_string())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str("<h3>Backups</h3>");
    if rows.is_empty() {
        out.push_str("<p class=\"fail\">No backup in the repository: nothing can be restored.</p>");
    } else {
        out.push_str(&html::table(
            &["id", "started", "ended", "size", "timeline"],
            &rows,
        ));
    }
    for (label, r) in [
        ("Latest verification", s.latest_verify()),
        ("Latest drill", s.latest_drill()),
    ] {
        let _ = write!(out, "<h3>{label}</h3>");
        match r {
            Some(r) => {
                let _ = write!(
                    out,
                    "<p class=\"muted\">report {}{} · started {}</p>",
                    escape(&r.id),
                    r.drill
                        .as_ref()
                        .map(|d| format!(" · drill {}", escape(d)))
                        .unwrap_or_default(),
                    escape(&time(Some(r.started)))
                );
                out.push_str(&html::source(&r.source));
            }
            None => out.push_str("<p class=\"muted\">none stored</p>"),
        }
    }
    out.push_str("<h3>RTO and RPO over time (verifications and drills)</h3>");
    let points: Vec<(DateTime<Utc>, Option<f64>, Option<f64>)> = s
        .results
        .iter()
        .map(|r| (r.started, r.source.rto_seconds, r.source.rpo_seconds))
        .collect();
    out.push_str(&html::trend_svg(&points));
    out.push_str("</section>\n");
    out
}

/// The recoverable window of one source as an SVG timeline: a lane per
/// timeline with its restorable spans, backups as ticks, WAL gaps in red,
/// snapshots (Redis) as points.
pub(super) fn timeline_svg(s: &SourceView, now: DateTime<Utc>) -> String {
    let mut times: Vec<DateTime<Utc>> = s.backups.iter().flat_map(|b| [b.start, b.end]).collect();
    times.extend(s.windows.iter().flat_map(|w| [w.from, w.to]));
    times.extend(s.gaps.iter().flat_map(|g| [g.after, g.before]).flatten());
    times.extend(
        s.timelines
            .iter()
            .filter_map(|t| t.archived)
            .flat_map(|(a, b)| [a, b]),
    );
    let (Some(t0), Some(t1)) = (times.iter().min().copied(), times.iter().max().copied()) else {
        return "<p class=\"muted\">Nothing to draw: no backup stored.</p>".into();
    };
    let t1 = t1.max(t0 + chrono::Duration::seconds(1));
    let lanes: Vec<Option<u32>> = if s.engine == "postgres" {
        let mut l: Vec<u32> = s.windows.iter().map(|w| w.timeline).collect();
        l.extend(s.backups.iter().filter_map(|b| b.timeline));
        l.extend(s.gaps.iter().map(|g| g.timeline));
        l.sort_unstable();
        l.dedup();
        l.into_iter().map(Some).collect()
    } else {
        vec![None]
    };
    let lanes = if lanes.is_empty() { vec![None] } else { lanes };
    let (w, left, right, lane_h, top) = (960.0, 92.0, 16.0, 36.0, 10.0);
    let h = top + lane_h * lanes.len() as f64 + 30.0;
    let span = (t1 - t0).num_milliseconds() as f64;
    let x =
        |t: DateTime<Utc>| left + (w - left - right) * ((t - t0).num_milliseconds() as f64 / span);
    let mut out = format!(
        "<svg class=\"timeline\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" \
         aria-label=\"recoverable window of {} {}\">",
        escape(&s.engine),
        escape(&s.name)
    );
    for (i, lane) in lanes.iter().enumerate() {
        let y = top + lane_h * i as f64;
        let label = match lane {
            Some(t) => format!("timeline {t}"),
            None => "snapshots".into(),
        };
        let _ = write!(
            out,
            "<rect x=\"{left}\" y=\"{:.1}\" width=\"{:.1}\" height=\"20\" fill=\"#f0f2f5\"/>\
             <text x=\"6\" y=\"{:.1}\">{}</text>",
            y + 6.0,
            w - left - right,
            y + 20.0,
            escape(&label)
        );
        for win in s.windows.iter().filter(|win| Some(win.timeline) == *lane) {
            let (a, b) = (x(win.from), x(win.to));
            let _ = write!(
                out,
                "<rect class=\"window\" x=\"{a:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"20\" fill=\"#3d9a5b\" fill-opacity=\"0.55\">\
                 <title>restorable {} .. {} from backup {}</title></rect>",
                y + 6.0,
                (b - a).max(2.0),
                time(Some(win.from)),
                time(Some(win.to)),
                escape(&win.backup)
            );
        }
        for t in s.timelines.iter().filter(|t| Some(t.id) == *lane) {
            let Some((first, last)) = t.archived else {
                continue;
            };
            // The archived WAL, broken where segments are missing.
            let mut pieces = Vec::new();
            let mut from = first;
            let mut holes: Vec<&WalGap> = s.gaps.iter().filter(|g| g.timeline == t.id).collect();
            holes.sort_by_key(|g| g.after);
            for g in holes {
                if let (Some(ga), Some(gb)) = (g.after, g.before) {
                    pieces.push((from, ga));
                    from = gb;
                }
            }
            pieces.push((from, last));
            for (a, b) in pieces {
                let _ = write!(
                    out,
                    "<rect class=\"wal\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"4\" fill=\"#7a8699\">\
                     <title>WAL archived on timeline {}: {} .. {}</title></rect>",
                    x(a),
                    y + 27.0,
                    (x(b) - x(a)).max(2.0),
                    t.id,
                    time(Some(a)),
                    time(Some(b))
                );
            }
        }
        for g in s.gaps.iter().filter(|g| Some(g.timeline) == *lane) {
            let (Some(ga), Some(gb)) = (g.after, g.before) else {
                continue;
            };
            let (a, b) = (x(ga), x(gb));
            let _ = write!(
                out,
                "<rect class=\"gap\" x=\"{a:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"20\" fill=\"#c62828\">\
                 <title>WAL gap: {} segment(s) missing from {}</title></rect>",
                y + 6.0,
                (b - a).max(3.0),
                g.missing,
                escape(&g.first_missing)
            );
        }
        for b in s.backups.iter().filter(|b| b.timeline == *lane) {
            let (a, e) = (x(b.start), x(b.end));
            let _ = write!(
                out,
                "<rect class=\"backup\" x=\"{a:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"8\" fill=\"#2f6fdb\">\
                 <title>{} {} .. {}</title></rect>",
                y + 2.0,
                (e - a).max(3.0),
                escape(&b.id),
                time(Some(b.start)),
                time(Some(b.end))
            );
        }
    }
    let base = top + lane_h * lanes.len() as f64 + 14.0;
    let _ = write!(
        out,
        "<text x=\"{left}\" y=\"{base:.1}\">{}</text><text x=\"{:.1}\" y=\"{base:.1}\" text-anchor=\"end\">{}</text>",
        t0.format("%Y-%m-%d %H:%M:%S"),
        w - right,
        t1.format("%Y-%m-%d %H:%M:%S")
    );
    let _ = write!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" class=\"muted\">{} before now</text></svg>",
        (left + w - right) / 2.0,
        base,
        html::short_secs((now - t1).num_milliseconds().max(0) as f64 / 1000.0)
    );
    out.push_str(
        "<p class=\"muted\"><span style=\"color:#3d9a5b\">■</span> restorable · \
         <span style=\"color:#2f6fdb\">■</span> backup · <span style=\"color:#7a8699\">■</span> WAL archived · \
         <span style=\"color:#c62828\">■</span> WAL gap</p>",
    );
    out
}

pub(super) fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}
