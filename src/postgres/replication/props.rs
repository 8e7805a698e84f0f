//! Parsing of bytes from the network: never a panic, and what the server
//! would send reads back as sent in any split.

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Sent {
    XLog(u64, u64, Vec<u8>),
    Keepalive(u64, bool),
}

fn sent() -> impl Strategy<Value = Sent> {
    prop_oneof![
        (
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..600)
        )
            .prop_map(|(a, b, d)| Sent::XLog(a, b, d)),
        (any::<u64>(), any::<bool>()).prop_map(|(e, r)| Sent::Keepalive(e, r)),
    ]
}

/// The CopyData message ('d') a server sends for `m`.
fn encode(m: &Sent, out: &mut BytesMut) {
    let mut payload = BytesMut::new();
    match m {
        Sent::XLog(start, end, data) => {
            payload.put_u8(b'w');
            payload.put_u64(*start);
            payload.put_u64(*end);
            payload.put_i64(12345);
            payload.put_slice(data);
        }
        Sent::Keepalive(end, reply) => {
            payload.put_u8(b'k');
            payload.put_u64(*end);
            payload.put_i64(12345);
            payload.put_u8(u8::from(*reply));
        }
    }
    out.put_u8(b'd');
    out.put_u32(payload.len() as u32 + 4);
    out.put_slice(&payload);
}

fn matches(got: &ReplicationMessage, want: &Sent) -> bool {
    match (got, want) {
        (
            ReplicationMessage::XLogData {
                start,
                server_end,
                data,
            },
            Sent::XLog(s, e, d),
        ) => start.0 == *s && server_end.0 == *e && data.as_ref() == d.as_slice(),
        (ReplicationMessage::Keepalive { server_end, reply }, Sent::Keepalive(e, r)) => {
            server_end.0 == *e && reply == r
        }
        _ => false,
    }
}

/// Feeds `wire` in pieces cut at `cuts` and parses every frame.
fn read_all(wire: &[u8], cuts: &[usize]) -> Result<Vec<ReplicationMessage>, PgError> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    at.push(0);
    at.push(wire.len());
    at.sort_unstable();
    let mut rbuf = BytesMut::new();
    let mut out = Vec::new();
    for w in at.windows(2) {
        rbuf.extend_from_slice(&wire[w[0]..w[1]]);
        while let Some(f) = next_frame(&mut rbuf)? {
            if let Frame::Msg(backend::Message::CopyData(body)) = f
                && let Some(m) = stream_message(body.into_bytes())?
            {
                out.push(m);
            }
        }
    }
    Ok(out)
}

/// A `BASE_BACKUP` as a server sends it, in our terms.
#[derive(Debug, Clone)]
struct BbSent {
    start: u64,
    tli: u32,
    /// (oid, location, size): `None` oid is the main directory.
    spaces: Vec<(Option<u32>, Option<String>, Option<u64>)>,
    /// Archives: name, location, data pieces.
    archives: Vec<(String, String, Vec<Vec<u8>>)>,
    progress: Vec<u64>,
    manifest: Vec<Vec<u8>>,
    end: u64,
}

fn base_backup_sent() -> impl Strategy<Value = BbSent> {
    let piece = prop::collection::vec(any::<u8>(), 0..300);
    (
        any::<u64>(),
        1u32..,
        prop::collection::vec(
            (
                prop::option::of(any::<u32>()),
                prop::option::of("[a-z/]{1,20}"),
                prop::option::of(any::<u64>()),
            ),
            0..3,
        ),
        prop::collection::vec(
            (
                "[a-z0-9.]{1,12}",
                "[a-z/]{0,12}",
                prop::collection::vec(piece.clone(), 0..4),
            ),
            1..3,
        ),
        prop::collection::vec(0u64..(1 << 62), 0..3),
        prop::collection::vec(piece, 0..3),
        any::<u64>(),
    )
        .prop_map(
            |(start, tli, spaces, archives, progress, manifest, end)| BbSent {
                start,
                tli,
                spaces,
                archives,
                progress,
                manifest,
                end,
            },
        )
}

fn data_row(cols: &[Option<String>], out: &mut BytesMut) {
    let mut body = BytesMut::new();
    body.put_i16(cols.len() as i16);
    for c in cols {
        match c {
            Some(v) => {
                body.put_i32(v.len() as i32);
                body.put_slice(v.as_bytes());
            }
            None => body.put_i32(-1),
        }
    }
    message(b'D', &body, out);
}

fn message(tag: u8, body: &[u8], out: &mut BytesMut) {
    out.put_u8(tag);
    out.put_u32(body.len() as u32 + 4);
    out.put_slice(body);
}

fn base_backup_wire(b: &BbSent) -> BytesMut {
    let mut w = BytesMut::new();
    data_row(
        &[Some(Lsn(b.start).to_string()), Some(b.tli.to_string())],
        &mut w,
    );
    message(b'C', b"SELECT\0", &mut w);
    for (oid, loc, size) in &b.spaces {
        data_row(
            &[
                oid.map(|o| o.to_string()),
                loc.clone(),
                size.map(|s| s.to_string()),
            ],
            &mut w,
        );
    }
    message(b'C', b"SELECT\0", &mut w);
    message(b'H', &[0, 0, 0], &mut w);
    let copy = |payload: Vec<u8>, w: &mut BytesMut| message(b'd', &payload, w);
    for (name, loc, pieces) in &b.archives {
        copy(
            [b"n", name.as_bytes(), b"\0", loc.as_bytes(), b"\0"].concat(),
            &mut w,
        );
        for p in pieces {
            copy([b"d".as_slice(), p].concat(), &mut w);
        }
    }
    for p in &b.progress {
        copy(
            [b"p".as_slice(), &(*p as i64).to_be_bytes()].concat(),
            &mut w,
        );
    }
    copy(b"m".to_vec(), &mut w);
    for p in &b.manifest {
        copy([b"d".as_slice(), p].concat(), &mut w);
    }
    message(b'c', b"", &mut w);
    data_row(
        &[Some(Lsn(b.end).to_string()), Some(b.tli.to_string())],
        &mut w,
    );
    message(b'C', b"SELECT\0", &mut w);
    message(b'Z', b"I", &mut w);
    w
}

/// What the reader should make of `b`, in the reader's terms.
fn base_backup_expected(b: &BbSent) -> String {
    let start = BaseBackupStart {
        start_lsn: Lsn(b.start),
        timeline: b.tli,
        tablespaces: b
            .spaces
            .iter()
            .map(|(oid, location, size_kb)| BackupTablespace {
                oid: *oid,
                location: location.clone(),
                size_kb: *size_kb,
            })
            .collect(),
    };
    let mut msgs = Vec::new();
    for (name, loc, pieces) in &b.archives {
        msgs.push(BaseBackupMessage::NewArchive {
            name: name.clone(),
            location: (!loc.is_empty()).then(|| loc.clone()),
        });
        msgs.extend(
            pieces
                .iter()
                .map(|p| BaseBackupMessage::ArchiveData(Bytes::from(p.clone()))),
        );
    }
    msgs.extend(b.progress.iter().map(|p| BaseBackupMessage::Progress(*p)));
    msgs.extend(
        b.manifest
            .iter()
            .map(|p| BaseBackupMessage::ManifestData(Bytes::from(p.clone()))),
    );
    format!("{:?}", (start, msgs, (Lsn(b.end), b.tli)))
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

proptest! {
    #[test]
    fn messages_read_back_as_sent_in_any_split(
        msgs in prop::collection::vec(sent(), 0..10),
        cuts in prop::collection::vec(any::<usize>(), 0..20),
    ) {
        let mut wire = BytesMut::new();
        for m in &msgs {
            encode(m, &mut wire);
        }
        let got = read_all(&wire, &cuts).expect("valid stream");
        prop_assert_eq!(got.len(), msgs.len());
        for (g, w) in got.iter().zip(&msgs) {
            prop_assert!(matches(g, w), "{:?} read as {:?}", w, g);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        wire in prop::collection::vec(any::<u8>(), 0..300),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let _ = read_all(&wire, &cuts);
        let _ = stream_message(Bytes::from(wire));
    }

    #[test]
    fn damaged_frames_never_panic(
        msgs in prop::collection::vec(sent(), 1..5),
        flips in prop::collection::vec((any::<usize>(), 1u8..=255), 1..4),
        cut in any::<usize>(),
    ) {
        let mut wire = BytesMut::new();
        for m in &msgs {
            encode(m, &mut wire);
        }
        let mut wire = wire.to_vec();
        for (at, x) in &flips {
            let i = at % wire.len();
            wire[i] ^= x;
        }
        let _ = read_all(&wire, &[]);
        let len = cut % wire.len();
        let _ = read_all(&wire[..len], &[]);
    }

    #[test]
    fn short_payloads_are_errors(tag in prop::sample::select(vec![b'w', b'k']), len in 0usize..17) {
        let mut p = vec![tag];
        p.extend(std::iter::repeat_n(7u8, len));
        prop_assert!(stream_message(Bytes::from(p)).is_err());
    }
    /// A whole `BASE_BACKUP` response reads back as sent, whatever
    /// pieces it arrives in; any strict prefix of it is an error.
    #[test]
    fn base_backup_reads_back_in_any_split_and_cut_is_an_error(
        b in base_backup_sent(),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
        cut in any::<prop::sample::Index>(),
    ) {
        let wire = base_backup_wire(&b);
        let got = block_on(replay_base_backup(&wire, &cuts)).expect("valid response");
        prop_assert_eq!(format!("{got:?}"), base_backup_expected(&b));
        let short = &wire[..cut.index(wire.len())];
        prop_assert!(block_on(replay_base_backup(short, &cuts)).is_err());
    }

    /// A `START_REPLICATION` stream through the connection itself:
    /// messages as sent, then the server's CopyDone as the end.
    #[test]
    fn stream_reads_back_through_the_connection(
        msgs in prop::collection::vec(sent(), 0..8),
        cuts in prop::collection::vec(any::<usize>(), 0..16),
    ) {
        let mut wire = BytesMut::new();
        for m in &msgs {
            encode(m, &mut wire);
        }
        message(b'c', b"", &mut wire);
        let (got, end) = block_on(replay_stream(&wire, &cuts));
        prop_assert!(end.is_ok());
        prop_assert_eq!(got.len(), msgs.len() + 1);
        for (g, w) in got.iter().zip(&msgs) {
            prop_assert!(matches(g, w), "{:?} read as {:?}", w, g);
        }
        prop_assert!(matches!(got.last(), Some(ReplicationMessage::End)));
    }

    #[test]
    fn damaged_base_backups_never_panic(
        b in base_backup_sent(),
        flips in prop::collection::vec((any::<usize>(), 1u8..=255), 1..4),
    ) {
        let mut wire = base_backup_wire(&b).to_vec();
        for (at, x) in &flips {
            let i = at % wire.len();
            wire[i] ^= x;
        }
        let _ = block_on(replay_base_backup(&wire, &[]));
        let _ = block_on(replay_stream(&wire, &[]));
    }
}
