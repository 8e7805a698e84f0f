//! A write load on a real server: a thread that commits one row per
//! transaction, as fast as the server acknowledges, and records every
//! commit the server acknowledged and when. A commit that fails, or gets no
//! answer within [`COMMIT_TIMEOUT`], is not acknowledged: the client never
//! saw it succeed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// How long a commit may wait for its answer (a synchronous commit whose
/// standbys are gone waits forever); the writer then tries a new connection.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(3);

/// A commit the server acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    /// The row's id.
    pub id: i64,
    /// When the acknowledgement arrived.
    pub at: SystemTime,
}

/// The writer thread; stopped (within [`COMMIT_TIMEOUT`]) when dropped.
pub struct Writer {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
    attempts: Arc<Mutex<i64>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Inserts ids `first`, `first + 1`, … into `table` (one column `id
    /// bigint`) of the server on `port`, one transaction each, reconnecting
    /// after any failure, until stopped.
    pub fn start(port: u16, table: &str, first: i64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acks = Arc::new(Mutex::new(Vec::new()));
        let attempts = Arc::new(Mutex::new(0));
        let conninfo = format!(
            "host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable \
             application_name=load"
        );
        let sql = format!("INSERT INTO {table} VALUES ($1)");
        let thread = std::thread::spawn({
            let (stop, acks, attempts) = (stop.clone(), acks.clone(), attempts.clone());
            move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(write_until(&conninfo, &sql, first, &stop, &acks, &attempts))
            }
        });
        Writer {
            stop,
            acks,
            attempts,
            thread: Some(thread),
        }
    }

    /// Acknowledged commits so far.
    pub fn acked(&self) -> Vec<Ack> {
        self.acks.lock().expect("acks").clone()
    }

    /// Commits tried so far (acknowledged or not).
    pub fn attempts(&self) -> i64 {
        *self.attempts.lock().expect("attempts")
    }

    /// Stops the thread and returns every acknowledged commit.
    pub fn stop(mut self) -> Vec<Ack> {
        self.halt();
        self.acked()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("writer thread");
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.halt();
    }
}

async fn write_until(
    conninfo: &str,
    sql: &str,
    first: i64,
    stop: &AtomicBool,
    acks: &Mutex<Vec<Ack>>,
    attempts: &Mutex<i64>,
) {
    let mut id = first;
    while !stop.load(Ordering::SeqCst) {
        let Ok(client) = dr::postgres::connect_to(conninfo, Some(COMMIT_TIMEOUT)).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while !stop.load(Ordering::SeqCst) {
            *attempts.lock().expect("attempts") += 1;
            let r = tokio::time::timeout(COMMIT_TIMEOUT, client.execute(sql, &[&id])).await;
            let this = id;
            id += 1;
            match r {
                Ok(Ok(_)) => acks.lock().expect("acks").push(Ack {
                    id: this,
                    at: SystemTime::now(),
                }),
                // Failed or unanswered: not acknowledged; a new connection.
                _ => break,
            }
        }
    }
}

/// True when `sql` commits on the server at `port` within [`COMMIT_TIMEOUT`].
pub fn commits(port: u16, sql: &str) -> bool {
    let conninfo =
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let Ok(c) = dr::postgres::connect_to(&conninfo, Some(COMMIT_TIMEOUT)).await else {
            return false;
        };
        matches!(
            tokio::time::timeout(COMMIT_TIMEOUT, c.batch_execute(sql)).await,
            Ok(Ok(()))
        )
    })
}
