//! Manifest decode: the JSON of a PostgreSQL or Redis manifest and the
//! repository descriptor, as read back from the repository. Never a panic,
//! not in decoding nor in what the catalog asks of a manifest, and an
//! accepted manifest writes out and reads back to the same JSON.
#![no_main]

use dr::postgres::manifest::{PgManifest, safe_relative_path};
use dr::redis::manifest::RedisManifest;
use libfuzzer_sys::fuzz_target;

fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) {
    let once = serde_json::to_vec(v).expect("serialize");
    let back: T = serde_json::from_slice(&once).expect("what was written reads back");
    let twice = serde_json::to_vec(&back).expect("serialize");
    assert_eq!(once, twice, "the manifest changed on a round trip");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = serde_json::from_slice::<PgManifest>(data) {
        let _ = m.backup_id();
        let _ = m.base_time();
        let _ = m.own_stored_size();
        for o in &m.objects {
            let _ = m.owner(&o.backup);
        }
        for f in &m.files {
            let _ = safe_relative_path(&f.path);
        }
        round_trip(&m);
    }
    if let Ok(m) = serde_json::from_slice::<RedisManifest>(data) {
        let _ = m.total_keys();
        round_trip(&m);
    }
    let _ = dr::repo::parse_info("fuzz", data);
});
