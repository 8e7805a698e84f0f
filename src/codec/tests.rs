//! Unit and property tests of encoding and decoding.

use super::*;

fn codec() -> (Codec, age::x25519::Identity) {
    let id = age::x25519::Identity::generate();
    let c = Codec::new(vec![id.to_public()], Some(vec![id.clone()]), 3);
    (c, id)
}

fn sample(n: usize) -> Bytes {
    let mut v = Vec::with_capacity(n);
    let mut x = 0x1234_5678u32;
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        // Half compressible, half noise.
        v.push(if (i / 4096) % 2 == 0 {
            (i % 7) as u8
        } else {
            x as u8
        });
    }
    Bytes::from(v)
}

#[tokio::test]
async fn round_trip_checks_hash_and_sizes() {
    let (c, _) = codec();
    let data = sample(3 << 20);
    let (stored, enc) = c.encode_bytes(data.clone(), None).await.expect("encode");
    assert_eq!(enc.plain_size, data.len() as u64);
    assert_eq!(enc.stored_size, stored.len() as u64);
    assert!(stored.len() < data.len());
    let back = c
        .decode_bytes(crate::store::once(stored), Expect::from_encoded("k", &enc))
        .await
        .expect("decode");
    assert_eq!(back, data);
}

#[tokio::test]
async fn wrong_key_truncation_and_bitflip_are_distinct() {
    let (c, _) = codec();
    let data = sample(2 << 20);
    let (stored, enc) = c.encode_bytes(data, None).await.expect("encode");
    let expect = Expect::from_encoded("obj", &enc);

    let (other, _) = codec();
    let other = Codec {
        recipients: c.recipients.clone(),
        ..other
    };
    let e = other
        .decode_bytes(crate::store::once(stored.clone()), expect.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, CodecError::WrongKey { .. }), "{e}");

    let cut = stored.slice(..stored.len() - 1000);
    let e = c
        .decode_bytes(crate::store::once(cut), expect.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, CodecError::Truncated { .. }), "{e}");

    let mut flipped = stored.to_vec();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let e = c
        .decode_bytes(crate::store::once(Bytes::from(flipped)), expect.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, CodecError::Corrupt { .. }), "{e}");

    let e = c
        .decode_bytes(
            crate::store::once(Bytes::from_static(b"{\"hello\": 1}")),
            expect,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, CodecError::Foreign { .. }), "{e}");
}

#[tokio::test]
async fn objects_checked_by_pieces_refuse_other_content() {
    let (c, _) = codec();
    let data = sample(3 << 20);
    let cuts = [
        (0u64, 128u64 << 10),
        (128 << 10, 1 << 20),
        (2 << 20, 1 << 20),
    ];
    let pieces: Vec<PieceHash> = cuts
        .iter()
        .map(|&(o, l)| PieceHash {
            offset: o,
            len: l,
            hash: piece_hash(&data[o as usize..(o + l) as usize]),
        })
        .collect();
    let expect = |enc: &Encoded| Expect {
        plain_hash: None,
        pieces: Some(normalize_pieces(pieces.clone()).expect("pieces")),
        ..Expect::from_encoded("obj", enc)
    };
    let (stored, enc) = c
        .encode_bytes(data.clone(), Some("extents".into()))
        .await
        .expect("encode");
    let back = c
        .decode_bytes(crate::store::once(stored.clone()), expect(&enc))
        .await
        .expect("intact");
    assert_eq!(back, data);
    let streamed = crate::store::collect(c.decode(crate::store::once(stored), expect(&enc)))
        .await
        .expect("intact, streamed");
    assert_eq!(streamed, data);

    // Valid encryption, one byte changed inside a piece: refused both ways.
    let mut other = data.to_vec();
    other[(2 << 20) + 5] ^= 1;
    let (forged, enc2) = c
        .encode_bytes(Bytes::from(other), Some("extents".into()))
        .await
        .expect("encode");
    let e = c
        .decode_bytes(crate::store::once(forged.clone()), expect(&enc2))
        .await
        .unwrap_err();
    assert!(matches!(e, CodecError::Corrupt { .. }), "{e}");
    let e = crate::store::collect(c.decode(crate::store::once(forged), expect(&enc2)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("the manifest records"), "{e}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Any single bit flip or truncation of a stored object is an error,
    /// with the expectations a manifest records and with only the hash a
    /// WAL object name carries; never a panic, never the wrong bytes.
    #[test]
    fn any_damage_is_an_error(
        len in 0usize..70_000,
        at in proptest::prelude::any::<proptest::sample::Index>(),
        bit in 0u8..8,
        truncate in proptest::prelude::any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let (c, _) = codec();
            let data = sample(len);
            let (stored, enc) = c.encode_bytes(data, None).await.expect("encode");
            let mut bad = stored.to_vec();
            let i = at.index(bad.len());
            if truncate {
                bad.truncate(i);
            } else {
                bad[i] ^= 1 << bit;
            }
            let full = Expect::from_encoded("obj", &enc);
            let hash_only = Expect {
                key: "obj".into(),
                plain_hash: Some(enc.plain_hash.clone()),
                ..Expect::default()
            };
            for expect in [full, hash_only] {
                let r = c.decode_bytes(crate::store::once(Bytes::from(bad.clone())), expect).await;
                proptest::prop_assert!(r.is_err(), "damage at {} (truncate {}) decoded", i, truncate);
            }
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn failing_input_never_yields_a_clean_stream() {
    let (c, _) = codec();
    let input: ByteStream = Box::pin(futures::stream::iter(vec![
        Ok(sample(1 << 20)),
        Err(io::Error::other("source died")),
    ]));
    let (s, done) = c.encode(input, None);
    assert!(crate::store::collect(s).await.is_err());
    assert!(done.await.map(|r| r.is_err()).unwrap_or(true));
}
