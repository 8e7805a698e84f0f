//! Unit tests of target directories and recovery settings.

use super::*;
use crate::time::parse_time;

#[test]
fn recovery_targets_are_checked_as_postgresql_reads_them() {
    let lsn = |l: &str| ExtraTarget {
        lsn: Some(l.into()),
        ..Default::default()
    };
    let xid = |x: &str| ExtraTarget {
        xid: Some(x.into()),
        ..Default::default()
    };
    let name = |n: &str| ExtraTarget {
        name: Some(n.into()),
        ..Default::default()
    };
    for ok in ["0/16B3748", "FFFFFFFF/ffffffff", "1/0"] {
        assert!(lsn(ok).validate().is_ok(), "{ok}");
    }
    for bad in ["zz", "0/", "/1", "0/1/2", "123456789/0", "+1/0", "0/1 "] {
        assert!(lsn(bad).validate().is_err(), "{bad}");
    }
    for ok in ["3", "7431", "18446744073709551615"] {
        assert!(xid(ok).validate().is_ok(), "{ok}");
    }
    for bad in [
        "abc",
        "",
        "0",
        "2",
        "-5",
        "+7",
        "0x10",
        "18446744073709551616",
    ] {
        assert!(xid(bad).validate().is_err(), "{bad}");
    }
    assert!(name("a'b\\c").validate().is_ok());
    for bad in ["", "a\nb", "a\0b", &"x".repeat(64)] {
        assert!(name(bad).validate().is_err(), "{bad:?}");
    }
}

#[test]
fn time_formats() {
    let utc = |s: &str| parse_time(s).map(|(t, _)| t.to_rfc3339());
    assert_eq!(
        utc("2026-11-25T18:44:12Z").as_deref(),
        Ok("2026-11-25T18:44:12+00:00")
    );
    assert_eq!(
        utc("2026-11-25T19:44:12+01:00").as_deref(),
        Ok("2026-11-25T18:44:12+00:00")
    );
    assert_eq!(
        utc("2026-11-25 19:44:12+01").as_deref(),
        Ok("2026-11-25T18:44:12+00:00")
    );
    assert_eq!(
        utc("2026-11-25 18:44:12.250Z").as_deref(),
        Ok("2026-11-25T18:44:12.250+00:00")
    );
    assert!(parse_time("2026-11-25 18:44:12").is_ok_and(|(_, local)| local));
    assert!(parse_time("yesterday").is_err());
    assert!(parse_time("2026-13-01 00:00:00").is_err());
}
