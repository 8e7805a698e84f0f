//! Scratch directories for verification restores, and their cleanup.
//!
//! A scratch restore holds a full copy of production data and runs a server
//! on it, so leaving either behind is a leak of both disk and data. Cleanup
//! therefore does not trust its own bookkeeping alone: besides stopping the
//! server it started, it finds every process whose command line or working
//! directory lies inside the (uniquely named) scratch directory and ends it,
//! which also catches a server whose start was interrupted half-way.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::postgres::server::{as_user, chown_to, is_root};

crate::message_error!(
    /// A scratch environment that could not be set up or removed: what is left and where.
    ScratchError
);

/// One scratch directory and the servers that may run in it.
#[derive(Debug)]
pub struct Scratch {
    root: PathBuf,
    pg: Option<PgServer>,
}

/// How to stop a PostgreSQL server started in the scratch directory.
#[derive(Debug, Clone)]
struct PgServer {
    bin_dir: PathBuf,
    os_user: String,
    data: PathBuf,
}

impl Scratch {
    /// Creates `<parent>/<prefix>-<random>` (mode 0700), owned by `os_user`
    /// when running as root so the server that user runs can write it.
    pub async fn create(
        parent: &Path,
        prefix: &str,
        os_user: Option<&str>,
    ) -> Result<Scratch, ScratchError> {
        std::fs::create_dir_all(parent).map_err(|e| {
            format!(
                "cannot create the scratch parent {}: {e}; set scratch_dir in the verify settings",
                parent.display()
            )
        })?;
        // The parent must let the server's user through to its own directory.
        if is_root()
            && let Ok(md) = std::fs::metadata(parent)
            && md.permissions().mode() & 0o001 == 0
        {
            let _ = std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711));
        }
        let root = parent.join(format!(
            "{prefix}-{}",
            crate::repo::layout::BackupId::new(chrono::Utc::now())
        ));
        std::fs::create_dir(&root)
            .and_then(|()| std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let scratch = Scratch { root, pg: None };
        if let Some(u) = os_user
            && let Err(e) = chown_to(&scratch.root, u).await
        {
            let _ = std::fs::remove_dir_all(&scratch.root);
            return Err(e.to_string().into());
        }
        Ok(scratch)
    }

    /// The scratch directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Records that a PostgreSQL server may run on `data`, so cleanup stops
    /// it with `pg_ctl` (a clean stop) before anything harsher.
    pub fn set_pg(&mut self, bin_dir: &Path, os_user: &str, data: &Path) {
        self.pg = Some(PgServer {
            bin_dir: bin_dir.to_path_buf(),
            os_user: os_user.to_string(),
            data: data.to_path_buf(),
        });
    }

    /// Stops every server in the scratch directory and removes it. The
    /// result says what, if anything, could not be cleaned up.
    pub async fn cleanup(&self) -> Result<String, ScratchError> {
        let mut notes = Vec::new();
        if let Some(pg) = &self.pg
            && pg.data.join("postmaster.pid").exists()
        {
            let st = as_user(&pg.os_user, &pg.bin_dir.join("pg_ctl"))
                .arg("-D")
                .arg(&pg.data)
                .args(["-m", "fast", "-w", "-t", "60", "stop"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .await;
            match st {
                Ok(s) if s.success() => notes.push("PostgreSQL stopped".to_string()),
                Ok(s) => notes.push(format!("pg_ctl stop exited with {s}")),
                Err(e) => notes.push(format!("pg_ctl stop: {e}")),
            }
        }
        let redis_pid = self.root.join("redis.pid");
        if let Some(pid) = std::fs::read_to_string(&redis_pid)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            && alive(pid)
        {
            signal(pid, "TERM").await;
            if wait_gone(&[pid], Duration::from_secs(10)).await {
                notes.push("redis-server stopped".to_string());
            }
        }
        let left = processes_under(&self.root);
        if !left.is_empty() {
            for &p in &left {
                signal(p, "TERM").await;
            }
            if !wait_gone(&left, Duration::from_secs(10)).await {
                for &p in &left {
                    signal(p, "KILL").await;
                }
                wait_gone(&left, Duration::from_secs(5)).await;
            }
            notes.push(format!("ended {} leftover process(es)", left.len()));
        }
        let mut last = None;
        for _ in 0..5 {
            match tokio::fs::remove_dir_all(&self.root).await {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let still = processes_under(&self.root);
        match (last, still.is_empty()) {
            (None, true) => Ok(format!(
                "removed {}{}",
                self.root.display(),
                if notes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", notes.join("; "))
                }
            )),
            (err, _) => Err(format!(
                "scratch {} was not fully cleaned up: {}{}; remove it by hand",
                self.root.display(),
                err.map(|e| format!("{e}; ")).unwrap_or_default(),
                if still.is_empty() {
                    "no process left".to_string()
                } else {
                    format!("processes {still:?} still run there")
                }
            )
            .into()),
        }
    }
}

/// True while `pid` runs (a zombie, waiting for its parent to reap it, has
/// already let go of everything and counts as gone).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Sends a signal with kill(1): the crate forbids the unsafe libc call.
async fn signal(pid: u32, sig: &str) {
    let _ = tokio::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await;
}

async fn wait_gone(pids: &[u32], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if pids.iter().all(|&p| !alive(p)) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Processes (other than this one) whose command line mentions `dir` or
/// whose working directory is inside it: PostgreSQL is started with `-D dir`
/// and chdirs into it; redis-server renames itself but works in its `--dir`.
pub fn processes_under(dir: &Path) -> Vec<u32> {
    let me = std::process::id();
    let needle = dir.to_string_lossy().into_owned();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let in_cmdline = std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(&needle))
            .unwrap_or(false);
        let in_cwd = std::fs::read_link(e.path().join("cwd"))
            .map(|c| c.starts_with(dir))
            .unwrap_or(false);
        if in_cmdline || in_cwd {
            out.push(pid);
        }
    }
    out
}

/// A free TCP port on 127.0.0.1 (the listener is closed again at once).
pub fn free_port() -> Result<u16, ScratchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free loopback port: {e}"))
        .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cleanup_ends_processes_working_inside_and_removes_the_dir() {
        let parent = tempfile::tempdir().expect("tempdir");
        let s = Scratch::create(parent.path(), "t", None)
            .await
            .expect("create");
        let child = std::process::Command::new("sleep")
            .arg("600")
            .current_dir(s.root())
            .spawn()
            .expect("spawn sleep");
        assert_eq!(processes_under(s.root()), vec![child.id()]);
        let root = s.root().to_path_buf();
        let note = s.cleanup().await.expect("cleanup");
        assert!(note.contains("leftover"), "{note}");
        assert!(!root.exists());
        let mut child = child;
        let _ = child.wait();
    }
}
