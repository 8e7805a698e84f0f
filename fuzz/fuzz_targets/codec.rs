//! Codec decode: arbitrary stored bytes never panic and never decode; any
//! damage (bit flips, cuts) to a real encoded object is an `Err`, with the
//! expectations a manifest records and with only the hash a WAL key carries.
#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use dr::codec::{Codec, Encoded, Expect};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    rt: tokio::runtime::Runtime,
    codec: Codec,
    stored: Vec<u8>,
    encoded: Encoded,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let id = age::x25519::Identity::generate();
        let codec = Codec::new(vec![id.to_public()], Some(vec![id]), 3);
        // Two age chunks (64 KiB each) and some compressible text.
        let plain: Vec<u8> = (0..70_000u32)
            .map(|i| if i % 3 == 0 { (i % 251) as u8 } else { b'a' })
            .collect();
        let (stored, encoded) = rt
            .block_on(codec.encode_bytes(Bytes::from(plain), None))
            .expect("encode");
        Fixture {
            rt,
            codec,
            stored: stored.to_vec(),
            encoded,
        }
    })
}

fn expectations(f: &Fixture) -> [Expect; 4] {
    [
        Expect {
            key: "obj".into(),
            ..Expect::default()
        },
        Expect::from_encoded("obj", &f.encoded),
        Expect {
            key: "obj".into(),
            plain_hash: Some(f.encoded.plain_hash.clone()),
            ..Expect::default()
        },
        Expect {
            key: "obj".into(),
            plain_hash: Some(f.encoded.plain_hash.clone()),
            plain_size: Some(f.encoded.plain_size),
            ..Expect::default()
        },
    ]
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let input = if mode & 1 == 0 {
        // Arbitrary bytes as a stored object.
        rest.to_vec()
    } else {
        // The real object, damaged: (position u32, xor u8) triples, and a
        // cut when the mode says so.
        let mut bad = f.stored.clone();
        for d in rest.chunks_exact(5) {
            let at = u32::from_le_bytes([d[0], d[1], d[2], d[3]]) as usize % bad.len();
            bad[at] ^= d[4];
        }
        if mode & 2 != 0 && rest.len() >= 4 {
            let at = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            bad.truncate(at % bad.len());
        }
        if bad == f.stored {
            return;
        }
        bad
    };
    for expect in expectations(f) {
        let r = f.rt.block_on(
            f.codec
                .decode_bytes(dr::store::once(Bytes::from(input.clone())), expect.clone()),
        );
        assert!(r.is_err(), "damaged object decoded (decode_bytes)");
        // decode spawns its tasks at once: call it inside the runtime.
        let r = f.rt.block_on(async {
            dr::store::collect(
                f.codec
                    .decode(dr::store::once(Bytes::from(input.clone())), expect),
            )
            .await
        });
        assert!(r.is_err(), "damaged object decoded (decode)");
    }
});
