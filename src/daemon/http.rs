//! A minimal HTTP/1.1 server for `/metrics` and `/healthz`: GET and HEAD,
//! one request per connection. Scrapers need nothing more, and it keeps an
//! HTTP framework out of a backup tool.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::metrics::Shared;

/// Largest request head read; anything longer is refused.
const MAX_HEAD: usize = 8 << 10;
/// Time a client gets to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: Arc<Shared>, stop: CancellationToken) {
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let state = state.clone();
                tokio::spawn(async move {
                    if let Err(e) =
                        tokio::time::timeout(CLIENT_TIMEOUT, handle(stream, &state)).await
                    {
                        tracing::debug!("http client timed out: {e}");
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, state: &Shared) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() > MAX_HEAD {
            let _ = respond(
                &mut stream,
                431,
                "text/plain",
                "request head too large\n",
                false,
            )
            .await;
            return;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let _ = respond(&mut stream, 405, "text/plain", "only GET and HEAD\n", false).await;
        return;
    }
    let now = chrono::Utc::now();
    let (status, ctype, body) = match path {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            state.with(|s| s.render(now)),
        ),
        "/healthz" => {
            let problems = state.with(|s| s.problems(now));
            if problems.is_empty() {
                (200, "text/plain; charset=utf-8", "ok\n".to_string())
            } else {
                let mut b = String::from("unhealthy\n");
                for p in problems {
                    b.push_str("- ");
                    b.push_str(&p);
                    b.push('\n');
                }
                (503, "text/plain; charset=utf-8", b)
            }
        }
        _ => (
            404,
            "text/plain; charset=utf-8",
            "not found; try /metrics or /healthz\n".to_string(),
        ),
    };
    let _ = respond(&mut stream, status, ctype, &body, head_only).await;
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    ctype: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        body.len()
    );
    if status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await
}
