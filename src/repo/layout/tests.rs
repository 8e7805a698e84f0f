//! Unit tests.

use super::*;
use rand::RngExt;

fn random_name(rng: &mut impl rand::Rng) -> String {
    const CH: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";
    let n = rng.random_range(1..=64);
    (0..n)
        .map(|_| CH[rng.random_range(0..CH.len())] as char)
        .collect()
}

fn random_id(rng: &mut impl rand::Rng) -> BackupId {
    let secs = rng.random_range(0..4_000_000_000i64);
    BackupId::new(DateTime::from_timestamp(secs, 0).unwrap_or_default())
}

#[test]
fn keys_round_trip() {
    let mut rng = rand::rng();
    for _ in 0..2000 {
        let cluster = random_name(&mut rng);
        let system_id: u64 = rng.random();
        let seg = WalSegmentName {
            timeline: TimelineId(rng.random_range(1..u32::MAX)),
            log: rng.random(),
            seg: rng.random_range(0..256),
        };
        let keys = [
            ObjectKey::RepoInfo,
            ObjectKey::PgManifest {
                cluster: cluster.clone(),
                system_id,
                backup: random_id(&mut rng),
            },
            ObjectKey::PgData {
                cluster: cluster.clone(),
                system_id,
                backup: random_id(&mut rng),
                n: rng.random(),
            },
            ObjectKey::PgStarted {
                cluster: cluster.clone(),
                system_id,
                backup: random_id(&mut rng),
            },
            ObjectKey::Wal {
                cluster: cluster.clone(),
                system_id,
                segment: seg,
                suffix: [
                    WalSuffix::None,
                    WalSuffix::Partial,
                    WalSuffix::Backup(rng.random()),
                    WalSuffix::Stream {
                        start: 0x2000,
                        end: 0x1000000,
                    },
                    WalSuffix::Journal { start: 0 },
                ][rng.random_range(0..5)],
                hash: hex::encode(rng.random::<[u8; 32]>()),
            },
            ObjectKey::TimelineHistory {
                cluster,
                system_id,
                timeline: seg.timeline,
                hash: hex::encode(rng.random::<[u8; 32]>()),
            },
            ObjectKey::RedisManifest {
                instance: random_name(&mut rng),
                snapshot: random_id(&mut rng),
            },
            ObjectKey::RedisRdb {
                instance: random_name(&mut rng),
                snapshot: random_id(&mut rng),
            },
            ObjectKey::RedisStarted {
                instance: random_name(&mut rng),
                snapshot: random_id(&mut rng),
            },
            ObjectKey::RabbitManifest {
                instance: random_name(&mut rng),
                snapshot: random_id(&mut rng),
            },
            ObjectKey::RabbitStarted {
                instance: random_name(&mut rng),
                snapshot: random_id(&mut rng),
            },
            ObjectKey::RabbitDefinitions {
                instance: random_name(&mut rng),
                snapshot: random_id(&mut rng),
            },
            ObjectKey::Audit {
                id: random_id(&mut rng),
            },
            ObjectKey::Selftest {
                id: random_id(&mut rng),
            },
            ObjectKey::VerifyReport {
                id: random_id(&mut rng),
            },
            ObjectKey::DrillReport {
                id: random_id(&mut rng),
            },
        ];
        for k in keys {
            let s = k.to_string();
            crate::store::validate_key(&s).expect("valid store key");
            assert_eq!(s.parse::<ObjectKey>(), Ok(k.clone()), "{s}");
        }
    }
}

#[test]
fn ids_sort_by_time() {
    let a = BackupId::new(DateTime::from_timestamp(1_000, 0).unwrap_or_default());
    let b = BackupId::new(DateTime::from_timestamp(2_000, 0).unwrap_or_default());
    assert!(a.to_string() < b.to_string());
    assert!(a < b);
}

#[test]
fn foreign_keys_are_rejected() {
    for s in [
        "pg/main/1/backups/nope/manifest",
        "pg/ma in/1/backups/20261125T184412Z-abcdef/manifest",
        "pg/main/01/backups/20261125T184412Z-abcdef/manifest",
        "pg/main/1/wal/00000001/00000000/000000020000000000000001",
        "pg/main/1/wal/00000001/00000001/000000010000000000000001",
        "pg/main/1/wal/00000001/00000000/000000010000000000000001-abc",
        "pg/main/1/wal/00000001/00000000/000000010000000000000001.gz-0000000000000000000000000000000000000000000000000000000000000000",
        "pg/main/1/wal/0000000g.history",
        "pg/main/1/wal/00000002.history",
        "reports/verify/2026/12/20261125T184412Z-abcdef",
        "reports/drill/2026/11/20261125T184412Z-abcde",
        "reports/other/2026/11/20261125T184412Z-abcdef",
        "random/thing",
        // Found by the properties below: names that parsed to a key
        // whose canonical name is another string.
        "pg/main/1/backups/197 0101T000000Z-000000/manifest",
        "pg/main/1/backups/+2026112T184412Z-abcdef/manifest",
        "pg/main/+1/backups/20261125T184412Z-abcdef/manifest",
        "pg/main/1/backups/20261125T184412Z-abcdef/data/0000000A",
        "pg/main/1/backups/20261125T184412Z-abcdef/data/+000000a",
        "pg/main/1/wal/0000000a.history-0000000000000000000000000000000000000000000000000000000000000000",
        "pg/main/1/wal/00000001/00000000/000000010000000000000100-0000000000000000000000000000000000000000000000000000000000000000",
        "pg/main/1/wal/+0000001.history-0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        assert!(s.parse::<ObjectKey>().is_err(), "{s} accepted");
    }
}
