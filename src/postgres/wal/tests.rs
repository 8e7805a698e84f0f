//! Unit tests.

use super::*;

#[test]
fn walfile_name_is_pg_walfile_name() {
    let name = |l: &str| walfile_name(1, l.parse().expect("lsn")).to_string();
    assert_eq!(name("0/2000028"), "000000010000000000000002");
    // A segment boundary belongs to the segment before it.
    assert_eq!(name("0/3000000"), "000000010000000000000002");
    assert_eq!(name("1/0"), "0000000100000000000000FF");
}

#[test]
fn wal_file_names() {
    assert!(matches!(
        WalFile::parse("000000010000000000000001"),
        Some(WalFile::Segment(_, WalSuffix::None))
    ));
    assert!(matches!(
        WalFile::parse("000000010000000000000001.partial"),
        Some(WalFile::Segment(_, WalSuffix::Partial))
    ));
    assert!(matches!(
        WalFile::parse("000000010000000000000002.00000028.backup"),
        Some(WalFile::Segment(_, WalSuffix::Backup(0x28)))
    ));
    assert_eq!(
        WalFile::parse("00000002.history"),
        Some(WalFile::History(TimelineId(2)))
    );
    for bad in [
        "RECOVERYXLOG",
        "00000001000000000000000",
        "000000010000000000000001.gz",
        "x.history",
    ] {
        assert_eq!(WalFile::parse(bad), None, "{bad}");
    }
    let s: WalSegmentName = "0000000100000000000000FF".parse().expect("seg");
    assert_eq!(next_segment(s).to_string(), "000000010000000100000000");
}
