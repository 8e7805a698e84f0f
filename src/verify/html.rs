//! Self-contained HTML for reports: one file, inline CSS and SVG, no script,
//! no external asset, so it opens offline and can be mailed or attached to a
//! ticket. `dr drill` writes its report this way beside the JSON and
//! Markdown; `dr report` builds its page from the same pieces.

use std::fmt::Write;

use chrono::{DateTime, Utc};

use super::report::{DrillReport, SourceReport, secs, time};

/// `s` escaped for HTML text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "\
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1d2330;background:#f5f6f8}\
header{background:#1d2330;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}\
header p{margin:4px 0 0;color:#b8c0cc;font-size:13px}\
main{padding:16px 24px;max-width:1200px}\
section{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:12px 16px;margin:0 0 16px}\
h2{font-size:17px;margin:4px 0 10px}h3{font-size:14px;margin:14px 0 6px}\
table{border-collapse:collapse;width:100%;margin:4px 0 8px;font-size:13px}\
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eceef2;vertical-align:top}\
th{background:#f0f2f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}\
.ok{color:#17803d;font-weight:600}.fail{color:#c62828;font-weight:600}.muted{color:#6b7380}\
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}\
.badge.ok{background:#e3f4e8}.badge.fail{background:#fde7e7}.badge.warn{background:#fff3d6;color:#8a5a00}\
.stats{display:flex;gap:12px;flex-wrap:wrap;margin:6px 0 10px}\
.stat{border:1px solid #eceef2;border-radius:6px;padding:6px 12px;min-width:120px}\
.stat b{display:block;font-size:18px}.stat span{color:#6b7380;font-size:12px}\
svg{display:block;max-width:100%;height:auto}svg text{font:11px system-ui,sans-serif;fill:#3b4250}\
code{font:12px ui-monospace,monospace;background:#f0f2f5;padding:0 3px;border-radius:3px}";

/// A whole page: `title` in the header with `subtitle` under it, `body` in
/// the main column.
pub fn page(title: &str, subtitle: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t}</title><style>{STYLE}</style></head>\n<body><header><h1>{t}</h1><p>{s}</p></header>\
         <main>\n{body}</main></body></html>\n",
        t = escape(title),
        s = escape(subtitle),
    )
}

/// A `badge` saying ok or FAILED.
pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "<span class=\"badge ok\">ok</span>"
    } else {
        "<span class=\"badge fail\">FAILED</span>"
    }
}

/// One small figure with a caption.
pub fn stat(value: &str, label: &str) -> String {
    format!(
        "<div class=\"stat\"><b>{}</b><span>{}</span></div>",
        escape(value),
        escape(label)
    )
}

/// Marks prebuilt HTML for [`table`], which escapes every other cell.
pub fn raw(html: &str) -> String {
    format!("{RAW}{html}")
}

const RAW: char = '\u{E000}';

/// A table; cells are escaped unless made with [`raw`].
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::from("<table>");
    if header.iter().any(|h| !h.is_empty()) {
        out.push_str("<thead><tr>");
        for h in header {
            let _ = write!(out, "<th>{}</th>", escape(h));
        }
        out.push_str("</tr></thead>");
    }
    out.push_str("<tbody>");
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            if let Some(html) = c.strip_prefix(RAW) {
                let _ = write!(out, "<td>{html}</td>");
            } else {
                let _ = write!(out, "<td>{}</td>", escape(c));
            }
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// One restored source: figures and its checks.
pub fn source(s: &SourceReport) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<h3>{} <code>{}</code> {}</h3><div class=\"stats\">{}{}{}{}</div>",
        escape(&s.kind),
        escape(&s.name),
        verdict(s.ok()),
        stat(&secs(s.rto_seconds), "RTO"),
        stat(&secs(s.rpo_seconds), "RPO"),
        stat(&time(s.recovered_point), "recovered point"),
        stat(s.backup.as_deref().unwrap_or("-"), "backup restored"),
    );
    let rows: Vec<Vec<String>> = s
        .checks
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                raw(if c.ok {
                    "<span class=\"ok\">pass</span>"
                } else {
                    "<span class=\"fail\">FAIL</span>"
                }),
                c.detail.clone(),
                format!("{:.2}s", c.seconds),
            ]
        })
        .collect();
    out.push_str(&table(&["check", "result", "detail", "took"], &rows));
    out
}

/// A trend of RTO and RPO over time as an inline SVG line chart; points
/// without a value are left out of that line.
pub fn trend_svg(points: &[(DateTime<Utc>, Option<f64>, Option<f64>)]) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 200.0, 56.0, 12.0, 14.0, 34.0);
    if points.is_empty() {
        return "<p class=\"muted\">No verified restore or drill stored yet.</p>".into();
    }
    let t0 = points.iter().map(|p| p.0).min().unwrap_or_else(Utc::now);
    let t1 = points.iter().map(|p| p.0).max().unwrap_or_else(Utc::now);
    let span = ((t1 - t0).num_milliseconds() as f64 / 1000.0).max(1.0);
    let vmax = points
        .iter()
        .flat_map(|p| [p.1, p.2])
        .flatten()
        .fold(0.0f64, f64::max)
        .max(1.0)
        * 1.1;
    let x = |t: DateTime<Utc>| {
        if points.len() == 1 {
            left + (w - left - right) / 2.0
        } else {
            left + (w - left - right) * ((t - t0).num_milliseconds() as f64 / 1000.0) / span
        }
    };
    let y = |v: f64| top + (h - top - bottom) * (1.0 - v / vmax);
    let mut out = format!(
        "<svg class=\"trend\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" \
         aria-label=\"RTO and RPO over time\">"
    );
    for i in 0..=4 {
        let v = vmax * f64::from(i) / 4.0;
        let _ = write!(
            out,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eceef2\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            w - right,
            left - 6.0,
            y(v) + 4.0,
            short_secs(v),
            y = y(v)
        );
    }
    let _ = write!(
        out,
        "<text x=\"{left}\" y=\"{}\">{}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
        h - 8.0,
        t0.format("%Y-%m-%d %H:%M"),
        w - right,
        h - 8.0,
        t1.format("%Y-%m-%d %H:%M")
    );
    for (pick, color, name) in [(1usize, "#2f6fdb", "RTO"), (2, "#d9822b", "RPO")] {
        let pts: Vec<(f64, f64, f64)> = points
            .iter()
            .filter_map(|p| {
                let v = if pick == 1 { p.1 } else { p.2 }?;
                Some((x(p.0), y(v), v))
            })
            .collect();
        if pts.len() > 1 {
            let path: Vec<String> = pts
                .iter()
                .map(|(a, b, _)| format!("{a:.1},{b:.1}"))
                .collect();
            let _ = write!(
                out,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                path.join(" ")
            );
        }
        for (a, b, v) in &pts {
            let _ = write!(
                out,
                "<circle class=\"{}\" cx=\"{a:.1}\" cy=\"{b:.1}\" r=\"3.5\" fill=\"{color}\"><title>{name} {}</title></circle>",
                name.to_lowercase(),
                short_secs(*v)
            );
        }
    }
    let _ = write!(
        out,
        "<rect x=\"{}\" y=\"4\" width=\"10\" height=\"10\" fill=\"#2f6fdb\"/><text x=\"{}\" y=\"13\">RTO</text>\
         <rect x=\"{}\" y=\"4\" width=\"10\" height=\"10\" fill=\"#d9822b\"/><text x=\"{}\" y=\"13\">RPO</text></svg>",
        w - 110.0,
        w - 96.0,
        w - 60.0,
        w - 46.0
    );
    out
}

/// Seconds in the shortest readable unit.
pub fn short_secs(v: f64) -> String {
    if v >= 86400.0 {
        format!("{:.1}d", v / 86400.0)
    } else if v >= 3600.0 {
        format!("{:.1}h", v / 3600.0)
    } else if v >= 60.0 {
        format!("{:.1}m", v / 60.0)
    } else {
        format!("{v:.1}s")
    }
}

/// A drill report as a page.
pub fn drill(rep: &DrillReport) -> String {
    let mut body = String::new();
    let _ = write!(
        body,
        "<section><h2>Drill <code>{}</code> {}</h2><div class=\"stats\">{}{}{}{}</div>",
        escape(&rep.drill),
        verdict(rep.ok),
        stat(&secs(rep.achieved.rto_seconds), "RTO achieved"),
        stat(&secs(rep.objectives.rto_seconds), "RTO objective"),
        stat(&secs(rep.achieved.rpo_seconds), "RPO achieved"),
        stat(&secs(rep.objectives.rpo_seconds), "RPO objective"),
    );
    let facts = vec![
        vec!["report id".into(), rep.id.clone()],
        vec!["target".into(), rep.target.clone()],
        vec!["environment".into(), rep.environment.clone()],
        vec!["started".into(), time(Some(rep.started))],
        vec!["finished".into(), time(Some(rep.finished))],
    ];
    body.push_str(&table(&["", ""], &facts));
    let rows: Vec<Vec<String>> = rep
        .checks
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                raw(if c.ok {
                    "<span class=\"ok\">pass</span>"
                } else {
                    "<span class=\"fail\">FAIL</span>"
                }),
                c.detail.clone(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        body.push_str("<h3>Drill checks</h3>");
        body.push_str(&table(&["check", "result", "detail"], &rows));
    }
    for w in &rep.warnings {
        let _ = write!(
            body,
            "<p><span class=\"badge warn\">warning</span> {}</p>",
            escape(w)
        );
    }
    body.push_str("</section><section><h2>Sources</h2>");
    for s in &rep.sources {
        body.push_str(&source(s));
    }
    body.push_str("</section>");
    page(
        &format!("dr drill {}", rep.drill),
        &format!(
            "{} · {} · report {}",
            if rep.ok { "PASSED" } else { "FAILED" },
            rep.started.format("%Y-%m-%d %H:%M:%S UTC"),
            rep.id
        ),
        &body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_the_page_has_no_external_reference() {
        let p = page(
            "a <b> & \"c\"",
            "sub",
            &table(&["x"], &[vec!["<i>".into(), raw("<em>y</em>")]]),
        );
        assert!(p.contains("a &lt;b&gt; &amp; &quot;c&quot;"), "{p}");
        assert!(p.contains("<td>&lt;i&gt;</td><td><em>y</em></td>"), "{p}");
        for bad in ["http://", "https://", "src=", "<script", "<link"] {
            assert!(!p.contains(bad), "{bad} in {p}");
        }
    }

    #[test]
    fn a_trend_draws_both_lines() {
        let t = Utc::now();
        let svg = trend_svg(&[
            (t - chrono::Duration::hours(2), Some(30.0), Some(2.0)),
            (t, Some(40.0), None),
        ]);
        assert_eq!(svg.matches("<polyline").count(), 1, "{svg}");
        assert_eq!(svg.matches("class=\"rto\"").count(), 2);
        assert_eq!(svg.matches("class=\"rpo\"").count(), 1);
    }
}
