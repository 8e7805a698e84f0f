//! Replication protocol: a `START_REPLICATION` stream (XLogData,
//! keepalives, CopyData framing) and a whole `BASE_BACKUP` response (result
//! sets, archive, manifest and progress messages, end position) from
//! arbitrary server bytes: never a panic, and the same result whatever the
//! pieces the bytes arrive in.
#![no_main]

use std::sync::OnceLock;

use dr::postgres::replication::{replay_base_backup, replay_stream};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((head, wire)) = common::split(data, 3) else {
        return;
    };
    let cuts = common::cuts(wire.len(), head[1], head[2]);
    if head[0] & 1 == 0 {
        let (a, ra) = rt().block_on(replay_stream(wire, &[]));
        let (b, rb) = rt().block_on(replay_stream(wire, &cuts));
        assert_eq!(
            format!("{a:?}"),
            format!("{b:?}"),
            "the split changed the messages"
        );
        assert_eq!(
            format!("{ra:?}"),
            format!("{rb:?}"),
            "the split changed the outcome"
        );
    } else {
        let a = rt().block_on(replay_base_backup(wire, &[]));
        let b = rt().block_on(replay_base_backup(wire, &cuts));
        assert_eq!(
            format!("{a:?}"),
            format!("{b:?}"),
            "the split changed the result"
        );
    }
});
