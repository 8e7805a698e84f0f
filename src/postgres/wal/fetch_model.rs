//! Recovery against a model of PostgreSQL's `restore_command` loop: an
//! archive of consecutive segments in a filesystem region, one archived
//! object damaged (a bit flipped, cut short, emptied) or deleted, then
//! segments asked for in order as PostgreSQL does, reading each exit status
//! as it does (0 replay, 1..=125 end of archive and promote, above 125
//! abort). Recovery may end only at a segment that is really not archived:
//! a damaged one aborts it, never ends it early.

use super::*;
use crate::postgres::WAL_SEGMENT_SIZE;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Damage {
    Flip(prop::sample::Index, u8),
    Cut(prop::sample::Index),
    Empty,
    Delete,
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Damage::Flip(i, b)),
        2 => any::<prop::sample::Index>().prop_map(Damage::Cut),
        1 => Just(Damage::Empty),
        1 => Just(Damage::Delete),
    ]
}

const SYSTEM: u64 = 7_301_000_000_000_000_001;

fn segment(n: u32) -> (WalSegmentName, Vec<u8>) {
    let name = WalSegmentName {
        timeline: TimelineId(1),
        log: 0,
        seg: n,
    };
    let mut d = vec![0u8; WAL_SEGMENT_SIZE as usize];
    d[0..2].copy_from_slice(&0xd110u16.to_le_bytes());
    d[2..4].copy_from_slice(&2u16.to_le_bytes());
    d[4..8].copy_from_slice(&1u32.to_le_bytes());
    d[8..16].copy_from_slice(&(u64::from(n) * WAL_SEGMENT_SIZE).to_le_bytes());
    d[24..32].copy_from_slice(&SYSTEM.to_le_bytes());
    d[32..36].copy_from_slice(&(WAL_SEGMENT_SIZE as u32).to_le_bytes());
    d[36..40].copy_from_slice(&8192u32.to_le_bytes());
    // Some content unique to the segment, spread over its pages.
    for p in (40..d.len()).step_by(8192 * 64) {
        d[p..p + 4].copy_from_slice(&n.to_le_bytes());
    }
    (name, d)
}

async fn repository(dir: &Path) -> Repository {
    let id = age::x25519::Identity::generate();
    let key = dir.join("restore.key");
    {
        use age::secrecy::ExposeSecret;
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .expect("key file");
        writeln!(f, "{}", id.to_string().expose_secret()).expect("write key");
    }
    let text = format!(
        "[repository]\nrecipients = [\"{}\"]\nidentity_file = \"{}\"\n\n[[region]]\nname = \"local\"\ntype = \"fs\"\npath = \"{}\"\n",
        id.to_public(),
        key.display(),
        dir.join("repo").display()
    );
    let cfg = crate::config::Config::parse(&text, Path::new("dr.toml")).expect("config");
    Repository::init(&cfg).await.expect("init");
    Repository::open(&cfg).await.expect("open")
}

/// The stored object of segment `n` under `root`.
fn object_of(root: &Path, name: &WalSegmentName) -> PathBuf {
    let dir = root.join(format!("repo/pg/main/{SYSTEM}/wal/00000001/00000000"));
    std::fs::read_dir(&dir)
        .expect("wal dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&format!("{name}-")))
        })
        .expect("archived object")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    #[test]
    fn recovery_never_ends_early_on_a_damaged_segment(
        archived in 2u32..4,
        damaged in any::<prop::sample::Index>(),
        how in damage(),
        prefetch in 0usize..3,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let repo = repository(dir.path()).await;
            let mut segs = Vec::new();
            for n in 1..=archived {
                let (name, data) = segment(n);
                let file = WalFile::Segment(name, WalSuffix::None);
                push_bytes(&repo, "main", SYSTEM, file, &name.to_string(), data.clone())
                    .await
                    .expect("push");
                segs.push((name, data));
            }
            let victim = damaged.index(segs.len());
            let path = object_of(dir.path(), &segs[victim].0);
            let mut bytes = std::fs::read(&path).expect("object");
            match &how {
                Damage::Flip(i, bit) => {
                    let i = i.index(bytes.len());
                    bytes[i] ^= 1 << bit;
                    std::fs::write(&path, &bytes).expect("write");
                }
                Damage::Cut(i) => {
                    bytes.truncate(i.index(bytes.len()));
                    std::fs::write(&path, &bytes).expect("write");
                }
                Damage::Empty => std::fs::write(&path, b"").expect("write"),
                Damage::Delete => std::fs::remove_file(&path).expect("delete"),
            }
            // PostgreSQL's loop: ask for the next segment until told it is
            // not archived (promote) or the command fails (abort).
            let spool = dir.path().join("spool");
            std::fs::create_dir_all(&spool).expect("spool");
            let dest = dir.path().join("RECOVERYXLOG");
            let mut replayed = 0usize;
            let ended = loop {
                let (name, _) = segment(replayed as u32 + 1);
                let r = fetch(&repo, "main", SYSTEM, &name.to_string(), &dest, &spool, prefetch, None).await;
                match fetch_status(&r) {
                    0 => {
                        let got = std::fs::read(&dest).expect("fetched file");
                        prop_assert!(got == segs[replayed].1, "{} fetched with other content", name);
                        replayed += 1;
                    }
                    1..=125 => break "promoted",
                    _ => break "aborted",
                }
            };
            if matches!(how, Damage::Delete) {
                // A real gap: recovery ends where the archive ends for it.
                prop_assert_eq!((ended, replayed), ("promoted", victim));
            } else {
                prop_assert_eq!(
                    (ended, replayed),
                    ("aborted", victim),
                    "damage {:?} to segment {} of {}", how, victim + 1, archived
                );
            }
            Ok(())
        })?;
    }
}
