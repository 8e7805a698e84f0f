//! Unit tests of the staging safety checks.

use super::*;

#[test]
fn endpoints_compare_loopback_names_and_sockets_as_one_host() {
    let pg = |c| pg_endpoint(c).expect("conninfo");
    assert_eq!(pg("host=127.0.0.1 port=5433"), ("local".into(), 5433));
    assert_eq!(
        pg("host=localhost port=5433"),
        pg("host=/run/postgresql port=5433")
    );
    assert_eq!(
        pg("postgresql://db1.example:6000/app"),
        ("db1.example".into(), 6000)
    );
    assert_eq!(pg("host=DB1.example").1, 5432);
    let r = |u| redis_endpoint(u).expect("url");
    assert_eq!(
        r("redis://:pw@localhost:6380/1"),
        r("redis://127.0.0.1:6380")
    );
    assert_eq!(r("redis://[::1]"), ("local".into(), 6379));
    assert_ne!(r("redis://cache.example:6379"), r("redis://127.0.0.1:6379"));
}

#[test]
fn directories_overlap_when_equal_or_nested() {
    assert!(overlaps(
        Path::new("/srv/pg/main"),
        Path::new("/srv/pg/main/")
    ));
    assert!(overlaps(Path::new("/srv/pg"), Path::new("/srv/pg/main")));
    assert!(overlaps(
        Path::new("/srv/pg/x/../main"),
        Path::new("/srv/pg/main")
    ));
    assert!(!overlaps(
        Path::new("/srv/pg/main"),
        Path::new("/srv/pg/main-staging")
    ));
}

#[test]
fn aof_setting_is_read_from_the_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("redis.conf");
    std::fs::write(&f, "port 1\nappendonly yes\n# appendonly no\n").expect("write");
    assert!(wants_aof(&f));
    std::fs::write(&f, "appendonly yes\nAPPENDONLY \"no\"\n").expect("write");
    assert!(!wants_aof(&f));
    assert!(!wants_aof(&dir.path().join("missing.conf")));
}
