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
}
