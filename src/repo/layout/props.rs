//! Round trips of every key kind, both ways: a key displays to a name that
//! parses back to it, and a name that parses is the canonical name of what
//! it parses to (so two names never mean one object: a listing that reads a
//! key and a delete that writes it back name the same object).

use super::*;
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_-]{1,64}"
}

fn id() -> impl Strategy<Value = BackupId> {
    (0i64..253_402_300_799, 0u32..0x100_0000).prop_map(|(secs, s)| BackupId {
        time: DateTime::from_timestamp(secs, 0).expect("time").naive_utc(),
        suffix: format!("{s:06x}"),
    })
}

fn segment() -> impl Strategy<Value = WalSegmentName> {
    (1u32.., any::<u32>(), 0u32..256).prop_map(|(t, log, seg)| WalSegmentName {
        timeline: TimelineId(t),
        log,
        seg,
    })
}

fn suffix() -> impl Strategy<Value = WalSuffix> {
    prop_oneof![
        Just(WalSuffix::None),
        Just(WalSuffix::Partial),
        any::<u32>().prop_map(WalSuffix::Backup),
        (any::<u32>(), any::<u32>())
            .prop_filter("start < end", |(a, b)| a < b)
            .prop_map(|(start, end)| WalSuffix::Stream { start, end }),
        any::<u32>().prop_map(|start| WalSuffix::Journal { start }),
    ]
}

fn hash() -> impl Strategy<Value = String> {
    "[0-9a-f]{64}"
}

fn key() -> impl Strategy<Value = ObjectKey> {
    prop_oneof![
        Just(ObjectKey::RepoInfo),
        (name(), any::<u64>(), id()).prop_map(|(cluster, system_id, backup)| {
            ObjectKey::PgManifest {
                cluster,
                system_id,
                backup,
            }
        }),
        (name(), any::<u64>(), id()).prop_map(|(cluster, system_id, backup)| {
            ObjectKey::PgStarted {
                cluster,
                system_id,
                backup,
            }
        }),
        (
            name(),
            any::<u64>(),
            (id(), any::<u32>(), any::<u64>(), any::<u64>()),
            (segment(), segment(), 0i64.., 0i64..),
            proptest::option::of((any::<u64>(), any::<u64>(), any::<u64>()))
        )
            .prop_map(
                |(cluster, system_id, (backup, timeline, a, b), (s, e, t0, t1), z)| {
                    ObjectKey::PgSummary {
                        cluster,
                        system_id,
                        summary: BackupSummary {
                            backup,
                            timeline,
                            start_lsn: a,
                            stop_lsn: b,
                            start_segment: s,
                            stop_segment: e,
                            start_time: DateTime::from_timestamp_nanos(t0),
                            stop_time: DateTime::from_timestamp_nanos(t1),
                            sizes: z.map(|(size, stored_size, files)| BackupSizes {
                                size,
                                stored_size,
                                files,
                            }),
                        },
                    }
                }
            ),
        (
            name(),
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            hash(),
            hash(),
            0i64..,
            0i64..
        )
            .prop_map(|(cluster, system_id, tli, log, a, b, t0, t1)| {
                ObjectKey::WalPrefixSummary {
                    cluster,
                    system_id,
                    timeline: TimelineId(tli),
                    summary: WalPrefixSummary {
                        log,
                        first_hash: a,
                        last_hash: b,
                        first_time: DateTime::from_timestamp_nanos(t0),
                        last_time: DateTime::from_timestamp_nanos(t1),
                    },
                }
            }),
        (name(), any::<u64>(), id(), any::<u32>()).prop_map(|(cluster, system_id, backup, n)| {
            ObjectKey::PgData {
                cluster,
                system_id,
                backup,
                n,
            }
        }),
        (name(), any::<u64>(), segment(), suffix(), hash()).prop_map(
            |(cluster, system_id, segment, suffix, hash)| ObjectKey::Wal {
                cluster,
                system_id,
                segment,
                suffix,
                hash,
            }
        ),
        (name(), any::<u64>(), 1u32.., hash()).prop_map(|(cluster, system_id, t, hash)| {
            ObjectKey::TimelineHistory {
                cluster,
                system_id,
                timeline: TimelineId(t),
                hash,
            }
        }),
        (name(), id())
            .prop_map(|(instance, snapshot)| ObjectKey::RedisManifest { instance, snapshot }),
        (name(), id())
            .prop_map(|(instance, snapshot)| ObjectKey::RedisStarted { instance, snapshot }),
        (name(), id()).prop_map(|(instance, snapshot)| ObjectKey::RedisRdb { instance, snapshot }),
        id().prop_map(|id| ObjectKey::Audit { id }),
        id().prop_map(|id| ObjectKey::VerifyReport { id }),
        id().prop_map(|id| ObjectKey::DrillReport { id }),
        id().prop_map(|id| ObjectKey::Selftest { id }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn every_key_round_trips(k in key()) {
        let s = k.to_string();
        crate::store::validate_key(&s).expect("a valid store key");
        prop_assert_eq!(s.parse::<ObjectKey>(), Ok(k));
    }

    /// A real key with one character replaced by one a careless or
    /// foreign writer might use: the result is refused or is the
    /// canonical name of the key it parses to.
    #[test]
    fn a_name_that_parses_is_canonical(
        k in key(),
        at in any::<prop::sample::Index>(),
        c in prop::sample::select(vec!['+', '-', '0', '1', 'a', 'A', 'f', 'F', 'g', ' ', '/', '.', 'Z', 'T', '9']),
        insert in any::<bool>(),
    ) {
        let mut s: Vec<char> = k.to_string().chars().collect();
        let i = at.index(s.len() + 1);
        if insert || i == s.len() {
            s.insert(i, c);
        } else {
            s[i] = c;
        }
        let s: String = s.into_iter().collect();
        if let Ok(parsed) = s.parse::<ObjectKey>() {
            prop_assert_eq!(parsed.to_string(), s);
        }
    }

    #[test]
    fn wal_names_round_trip(seg in segment(), sfx in suffix()) {
        prop_assert_eq!(seg.to_string().parse::<WalSegmentName>(), Ok(seg));
        prop_assert_eq!(WalSuffix::parse(&sfx.to_string()), Some(sfx));
    }

    #[test]
    fn ids_and_timelines_are_canonical(s in "[0-9a-fA-F+ -]{6,10}|[+0-9]{8}T[0-9]{6}Z-[0-9a-f+]{6}") {
        if let Ok(t) = s.parse::<TimelineId>() {
            prop_assert_eq!(t.to_string(), s.clone());
        }
        if let Ok(id) = s.parse::<BackupId>() {
            prop_assert_eq!(id.to_string(), s);
        }
    }
}
