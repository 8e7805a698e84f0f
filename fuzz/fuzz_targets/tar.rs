//! The tar push parser of `BASE_BACKUP` archives: never a panic; the same
//! result whatever the split; and what it accepts, the `tar` crate reads
//! the same way when it reads the archive at all.
#![no_main]

use std::io::Read;

use dr::postgres::backup::{TarEntry, read_archive};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fn clean(p: &str) -> String {
    p.strip_prefix("./")
        .unwrap_or(p)
        .trim_end_matches('/')
        .to_string()
}

/// What the `tar` crate reads, in the parser's terms; `None` when it fails
/// or meets a member type the parser does not support.
fn oracle(archive: &[u8]) -> Option<Vec<(TarEntry, Vec<u8>)>> {
    let mut a = tar::Archive::new(archive);
    let mut out = Vec::new();
    for e in a.entries().ok()? {
        let mut e = e.ok()?;
        let path = clean(&String::from_utf8_lossy(&e.path_bytes()));
        let mode = e.header().mode().ok()? & 0o7777;
        let entry = match e.header().entry_type() {
            tar::EntryType::Directory => TarEntry::Dir { path, mode },
            tar::EntryType::Symlink => TarEntry::Symlink {
                path,
                target: String::from_utf8_lossy(&e.link_name_bytes()?).into_owned(),
            },
            tar::EntryType::Regular | tar::EntryType::Continuous => TarEntry::File {
                path,
                mode,
                size: e.size(),
            },
            tar::EntryType::XGlobalHeader => continue,
            _ => return None,
        };
        let mut body = Vec::new();
        e.read_to_end(&mut body).ok()?;
        out.push((entry, body));
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let Some((head, archive)) = common::split(data, 2) else {
        return;
    };
    let whole = read_archive(archive, &[]);
    let pieces = read_archive(archive, &common::cuts(archive.len(), head[0], head[1]));
    match (&whole, &pieces) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "the split changed what was read"),
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!("the split changed the outcome: {whole:?} vs {pieces:?}"),
    }
    if let Ok(ours) = whole
        && let Some(theirs) = oracle(archive)
    {
        assert_eq!(ours, theirs, "the tar crate reads this archive otherwise");
    }
});
