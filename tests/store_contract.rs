//! One contract suite, run unchanged against every backend: the local
//! filesystem and a real Garage S3 server.

mod common;

use std::time::Duration;

use bytes::Bytes;
use dr::codec::{Codec, Expect};
use dr::store::{FaultPlan, FaultyStore, FsStore, Store, StoreError, collect, generated};
use futures::StreamExt;

async fn small_round_trip(store: Store) {
    let key = "a/b/object-1";
    assert_eq!(store.head(key).await.expect("head"), None);
    let n = store
        .put_bytes(key, Bytes::from_static(b"hello, repository"))
        .await
        .expect("put");
    assert_eq!(n, 17);
    assert_eq!(store.head(key).await.expect("head"), Some(17));
    assert_eq!(
        store.get_bytes(key).await.expect("get"),
        Bytes::from_static(b"hello, repository")
    );
    let missing = store.get("a/b/missing", None).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "missing object must be NotFound"
    );
}

async fn ranged_read(store: Store) {
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251) as u8).collect();
    store
        .put_bytes("ranged/obj", Bytes::from(data.clone()))
        .await
        .expect("put");
    let s = store
        .get("ranged/obj", Some(1_000_000..2_500_001))
        .await
        .expect("get range");
    let got = collect(s).await.expect("read");
    assert_eq!(&got[..], &data[1_000_000..2_500_001]);
    let tail = collect(
        store
            .get(
                "ranged/obj",
                Some(data.len() as u64 - 10..data.len() as u64),
            )
            .await
            .expect("tail"),
    )
    .await
    .expect("read tail");
    assert_eq!(&tail[..], &data[data.len() - 10..]);
}

async fn list_many(store: Store) {
    // > 1000 keys forces S3 pagination.
    let keys: Vec<String> = (0..1100).map(|i| format!("many/k{i:05}")).collect();
    futures::stream::iter(keys.iter().cloned())
        .for_each_concurrent(32, |k| {
            let store = &store;
            async move {
                store
                    .put_bytes(&k, Bytes::from(k.clone().into_bytes()))
                    .await
                    .expect("put");
            }
        })
        .await;
    store
        .put_bytes("manyother/x", Bytes::from_static(b"x"))
        .await
        .expect("put");
    let listed = store.list("many/").await.expect("list");
    assert_eq!(listed.len(), 1100);
    let names: Vec<&str> = listed.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(names, keys.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(listed.iter().all(|o| o.size == 11));
    assert_eq!(store.list("many").await.expect("list").len(), 1101);
    assert!(store.list("nothing/").await.expect("list").is_empty());
}

async fn one_level_listing(store: Store) {
    // > 1000 directories forces S3 pagination of common prefixes too.
    let keys: Vec<String> = (0..1050)
        .map(|i| format!("tree/d{i:05}/x"))
        .chain([
            "tree/d00001/y/z".into(),
            "tree/top".into(),
            "treetop".into(),
        ])
        .collect();
    futures::stream::iter(keys.iter().cloned())
        .for_each_concurrent(32, |k| {
            let store = &store;
            async move {
                store
                    .put_bytes(&k, Bytes::from_static(b"12"))
                    .await
                    .expect("put");
            }
        })
        .await;
    let l = store.list_dirs("tree/").await.expect("list dirs");
    let dirs: Vec<String> = (0..1050).map(|i| format!("tree/d{i:05}/")).collect();
    assert_eq!(l.dirs, dirs, "every directory once, sorted");
    let objects: Vec<&str> = l.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(objects, ["tree/top"]);
    assert_eq!(l.objects[0].size, 2);
    let l = store.list_dirs("tree/d00001/").await.expect("list dirs");
    assert_eq!(l.dirs, ["tree/d00001/y/"]);
    assert_eq!(l.objects.len(), 1);
    assert_eq!(
        store.list_dirs("nothing/").await.expect("list dirs"),
        Default::default()
    );
}

async fn delete_is_idempotent(store: Store) {
    store
        .put_bytes("del/x", Bytes::from_static(b"1"))
        .await
        .expect("put");
    store.delete("del/x").await.expect("delete");
    assert_eq!(store.head("del/x").await.expect("head"), None);
    store.delete("del/x").await.expect("delete missing");
}

async fn crash_mid_put_leaves_nothing(store: Store) {
    // A writer that dies after 20 MiB of a larger object (several S3 parts).
    let faulty = Store::Faulty(Box::new(FaultyStore::new(
        store,
        FaultPlan {
            fail_put_after: Some(20 << 20),
            ..FaultPlan::default()
        },
    )));
    let err = faulty
        .put("crash/obj", generated(64 << 20))
        .await
        .expect_err("put must fail");
    assert!(matches!(err, StoreError::Source { .. }), "{err}");
    let Store::Faulty(f) = &faulty else {
        unreachable!()
    };
    assert_eq!(f.inner().head("crash/obj").await.expect("head"), None);
    assert!(f.inner().list("crash/").await.expect("list").is_empty());
    // The same key can be written afterwards.
    f.set_plan(FaultPlan::default());
    faulty
        .put_bytes("crash/obj", Bytes::from_static(b"ok"))
        .await
        .expect("put after crash");
}

async fn gib_through_codec(store: Store) {
    let id = age::x25519::Identity::generate();
    let codec = Codec::new(vec![id.to_public()], Some(vec![id]), 3);
    let size = 1u64 << 30;
    let (stream, done) = codec.encode(generated(size), Some(size));
    let stored = store.put("big/gib", stream).await.expect("put 1 GiB");
    let enc = done.await.expect("encoder").expect("encode");
    assert_eq!(enc.plain_size, size);
    assert_eq!(enc.stored_size, stored);
    let expected_hash = {
        let mut h = blake3::Hasher::new();
        let mut g = generated(size);
        while let Some(c) = g.next().await {
            h.update(&c.expect("gen"));
        }
        h.finalize().to_hex().to_string()
    };
    assert_eq!(enc.plain_hash, expected_hash);
    let mut plain = codec.decode(
        store.get("big/gib", None).await.expect("get"),
        Expect::from_encoded("big/gib", &enc),
    );
    let mut h = blake3::Hasher::new();
    let mut n = 0u64;
    while let Some(c) = plain.next().await {
        let c = c.expect("decode");
        n += c.len() as u64;
        h.update(&c);
    }
    assert_eq!(n, size);
    assert_eq!(h.finalize().to_hex().to_string(), expected_hash);
}

macro_rules! contract {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread")]
            async fn small_round_trip() {
                let (store, _guard) = $make;
                super::small_round_trip(store).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn ranged_read() {
                let (store, _guard) = $make;
                super::ranged_read(store).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn list_many() {
                let (store, _guard) = $make;
                super::list_many(store).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn one_level_listing() {
                let (store, _guard) = $make;
                super::one_level_listing(store).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn delete_is_idempotent() {
                let (store, _guard) = $make;
                super::delete_is_idempotent(store).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn crash_mid_put_leaves_nothing() {
                let (store, _guard) = $make;
                super::crash_mid_put_leaves_nothing(store).await
            }
            #[tokio::test(flavor = "multi_thread")]
            async fn gib_through_codec() {
                let (store, _guard) = $make;
                tokio::time::timeout(Duration::from_secs(900), super::gib_through_codec(store))
                    .await
                    .expect("1 GiB round trip took over 15 minutes")
            }
        }
    };
}

/// An fs store in a temp dir that is removed when the guard drops.
fn fs_store() -> (Store, Option<tempfile::TempDir>) {
    let dir = tempfile::tempdir().expect("tempdir");
    (Store::Fs(FsStore::new(dir.path())), Some(dir))
}

contract!(fs, fs_store());
contract!(
    s3,
    (common::garage_store().await, None::<tempfile::TempDir>)
);

#[tokio::test]
async fn fs_objects_are_create_only() {
    let (store, _guard) = fs_store();
    store
        .put_bytes("once", Bytes::from_static(b"first"))
        .await
        .expect("put");
    let err = store
        .put_bytes("once", Bytes::from_static(b"second"))
        .await
        .expect_err("overwrite must fail");
    assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    assert_eq!(
        store.get_bytes("once").await.expect("get"),
        Bytes::from_static(b"first")
    );
}

/// The fs store writes a buffer in one blocking call and a stream through
/// a channel: both publish only a whole, synced file, refuse an existing
/// name, and leave no temp file behind either way.
#[tokio::test]
async fn fs_buffer_and_stream_puts_are_create_only_and_leave_no_temp_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fs = FsStore::new(dir.path());
    let store = Store::Fs(FsStore::new(dir.path()));
    store
        .put_bytes("d/buffer", Bytes::from_static(b"buffer"))
        .await
        .expect("buffer put");
    store
        .put("d/stream", dr::store::once(Bytes::from_static(b"stream")))
        .await
        .expect("stream put");
    for key in ["d/buffer", "d/stream"] {
        let err = store
            .put_bytes(key, Bytes::from_static(b"other"))
            .await
            .expect_err("a buffer put over an existing object");
        assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
        let err = store
            .put(key, dr::store::once(Bytes::from_static(b"other")))
            .await
            .expect_err("a stream put over an existing object");
        assert!(matches!(err, StoreError::AlreadyExists { .. }), "{err}");
    }
    assert_eq!(store.get_bytes("d/buffer").await.expect("get"), "buffer");
    assert_eq!(store.get_bytes("d/stream").await.expect("get"), "stream");
    let left = fs.temp_files().await.expect("temp files");
    assert!(left.is_empty(), "temp files left behind: {left:?}");
}

/// S3 puts are create-only (`If-None-Match: *`) on servers that honour it,
/// as moto does (Garage ignores the header): a second put of a key fails as
/// the fs store's does, single-part and multipart alike, and `hide` clears
/// the key for a replacement (what `dr repo sync` does with a bad copy).
#[tokio::test(flavor = "multi_thread")]
async fn s3_objects_are_create_only_where_the_server_enforces_it() {
    let server = "moto (S3 with Object Lock)";
    let cfg = dr::config::S3Region {
        endpoint: Some(common::require_env("DR_TEST_MOTO_ENDPOINT", server)),
        bucket: common::require_env("DR_TEST_MOTO_LOCK_BUCKET", server),
        prefix: common::unique("create-only"),
        s3_region: common::require_env("DR_TEST_MOTO_REGION", server),
        path_style: true,
        access_key_id: Some(dr::config::SecretSource::Literal(common::require_env(
            "DR_TEST_MOTO_ACCESS_KEY_ID",
            server,
        ))),
        secret_access_key: Some(dr::config::SecretSource::Literal(common::require_env(
            "DR_TEST_MOTO_SECRET_ACCESS_KEY",
            server,
        ))),
        part_size: 5 << 20,
        object_lock: None,
    };
    let store = Store::S3(dr::store::S3Store::connect(&cfg).await.expect("S3 client"));
    let big = |b: u8| Bytes::from(vec![b; 6 << 20]); // two parts: multipart
    for (key, first, second) in [
        (
            "small",
            Bytes::from_static(b"first"),
            Bytes::from_static(b"second"),
        ),
        ("multipart", big(1), big(2)),
    ] {
        store.put_bytes(key, first.clone()).await.expect("put");
        let err = store
            .put_bytes(key, second.clone())
            .await
            .expect_err("overwrite must fail");
        assert!(
            matches!(err, StoreError::AlreadyExists { .. }),
            "{key}: {err}"
        );
        assert_eq!(store.get_bytes(key).await.expect("get"), first, "{key}");
        store.hide(key).await.expect("hide");
        store
            .put_bytes(key, second.clone())
            .await
            .expect("put after hide");
        assert_eq!(store.get_bytes(key).await.expect("get"), second, "{key}");
    }
}
