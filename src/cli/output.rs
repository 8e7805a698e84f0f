//! Printing: human tables or JSON, and one-line errors.

use serde::Serialize;

/// Output mode for a command.
pub struct Out {
    /// Print JSON on stdout instead of text.
    pub json: bool,
}

impl Out {
    /// Prints `value` as pretty JSON.
    pub fn json<T: Serialize>(&self, value: &T) {
        match serde_json::to_string_pretty(value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot encode output as JSON: {e}"),
        }
    }

    /// Prints an error: a one-line cause on stderr, and a JSON object on stdout
    /// in `--json` mode so scripts always get a parseable answer.
    pub fn error(&self, e: &anyhow::Error) {
        let msg = one_line(e);
        if self.json {
            self.json(&serde_json::json!({ "ok": false, "error": msg }));
        }
        eprintln!("error: {msg}");
    }
}

/// An error and its causes on one line, each said once: a cause whose words
/// its parent already printed (or only the driver's bare "db error") is
/// left out.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for c in e.chain() {
        let t = c.to_string();
        let words = t.split_once(": ").map_or(t.as_str(), |(_, rest)| rest);
        let said = msg.contains(&t) || (words.len() >= 12 && msg.contains(words));
        if t.is_empty() || t == "db error" || said {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&t);
    }
    msg
}

/// Renders rows as an aligned text table.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = vec![line(header.to_vec())];
    for r in rows {
        out.push(line(r.iter().map(String::as_str).collect()));
    }
    out.join("\n")
}

/// Formats a byte count for humans.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Shows a progress line on stderr while `work` runs, if stderr is a terminal
/// and output is not JSON.
pub async fn with_progress<T>(
    out: &Out,
    label: &str,
    progress: std::sync::Arc<dr::progress::Progress>,
    work: impl std::future::Future<Output = T>,
) -> T {
    use std::io::IsTerminal;
    if out.json || !std::io::stderr().is_terminal() {
        return work.await;
    }
    let start = std::time::Instant::now();
    let ticker = async {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let (done, total) = progress.get();
            let secs = start.elapsed().as_secs_f64().max(1e-3);
            let pct = if total > 0 {
                done as f64 * 100.0 / total as f64
            } else {
                0.0
            };
            eprint!(
                "\r{label}: {} / {} ({pct:.0}%), {:.0} MB/s   ",
                bytes(done),
                bytes(total),
                done as f64 / 1e6 / secs
            );
        }
    };
    let result = tokio::select! {
        r = work => r,
        _ = ticker => unreachable!("the ticker never ends"),
    };
    eprint!("\r\x1b[2K");
    result
}

/// Backups or snapshots listed from their keys alone (no identity here).
pub fn stored_table(first: &str, items: &[dr::maintenance::inventory::StoredBackup]) -> String {
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                b.time.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                if b.complete {
                    "complete"
                } else {
                    "no manifest (running or abandoned)"
                }
                .to_string(),
                b.objects.to_string(),
                bytes(b.stored_bytes),
            ]
        })
        .collect();
    table(&[first, "STARTED", "STATE", "OBJECTS", "STORED"], &rows)
}

#[cfg(test)]
mod tests {
    #[test]
    fn causes_are_said_once() {
        let io = std::io::Error::from_raw_os_error(20);
        let e = anyhow::Error::new(std::io::Error::new(io.kind(), io.to_string()))
            .context(format!("/x/y: {io}"));
        let line = super::one_line(&e);
        assert_eq!(line.matches("os error 20").count(), 1, "{line}");
        let e = anyhow::anyhow!("invalid configuration").context("invalid configuration");
        assert_eq!(super::one_line(&e), "invalid configuration");
    }
}
