//! Unit tests of parsing and validation.

use super::*;

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
    /// The shipped example configs, damaged anywhere (a line dropped,
    /// bytes replaced), are parsed or refused with an error naming a
    /// line; never a panic.
    #[test]
    fn damaged_configs_never_panic(
        which in 0usize..2,
        drop_line in proptest::prelude::any::<proptest::sample::Index>(),
        at in proptest::prelude::any::<proptest::sample::Index>(),
        junk in "[\\[\\]=\"a-z0-9. \\n{}#-]{0,12}",
    ) {
        let text = [
            include_str!("../../config/dr.toml"),
            include_str!("../../config/dr-multi-region.toml"),
        ][which];
        let mut lines: Vec<&str> = text.lines().collect();
        if !lines.is_empty() {
            lines.remove(drop_line.index(lines.len()));
        }
        let mut t = lines.join("\n");
        let mut i = at.index(t.len() + 1);
        while !t.is_char_boundary(i) {
            i -= 1;
        }
        t.insert_str(i, &junk);
        if let Err(e) = crate::validate::parse(&t, Path::new("fuzz.toml")) {
            let msg = e.to_string();
            proptest::prop_assert!(!msg.is_empty());
        }
    }
}

const RCPT: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";

fn parse(t: &str) -> Result<Config, ConfigError> {
    crate::validate::parse(t, Path::new("dr.toml"))
}

fn base() -> String {
    format!(
        "[repository]\nrecipients = [\"{RCPT}\"]\n\n[[region]]\nname = \"local\"\ntype = \"fs\"\npath = \"/tmp/x\"\n"
    )
}

#[test]
fn redis_sync_mode_defaults_to_auto_and_names_the_choices() {
    let redis = |extra: &str| base() + "[redis.cache]\nurl = \"redis://127.0.0.1:6379\"\n" + extra;
    let c = parse(&redis("")).expect("no sync key");
    assert_eq!(c.redis["cache"].get_ref().sync, RedisSyncMode::Auto);
    let c = parse(&redis("sync = \"disk\"\n")).expect("disk");
    assert_eq!(c.redis["cache"].get_ref().sync, RedisSyncMode::Disk);
    let e = parse(&redis("sync = \"fast\"\n"))
        .expect_err("fast")
        .to_string();
    assert!(
        e.contains("dr.toml:10") && e.contains("`auto`, `disk`, `diskless`"),
        "{e}"
    );
}

#[test]
fn backup_mode_decides_what_is_required() {
    let remote = base() + "[postgres.main]\nmode = \"remote\"\nconninfo = \"host=db1 user=dr\"\n";
    let c = parse(&remote).expect("remote mode needs no data_dir");
    assert_eq!(c.postgres["main"].get_ref().mode, BackupMode::Remote);
    let local = base() + "[postgres.main]\nconninfo = \"host=db1 user=dr\"\n";
    let e = parse(&local)
        .expect_err("local mode needs data_dir")
        .to_string();
    assert!(
        e.contains("data_dir is missing") && e.contains("mode = \"remote\""),
        "{e}"
    );
    let no_conn = base() + "[postgres.main]\nmode = \"remote\"\n";
    let e = parse(&no_conn).expect_err("conninfo").to_string();
    assert!(e.contains("REPLICATION"), "{e}");
    let bad = base() + "[postgres.main]\nmode = \"ssh\"\nconninfo = \"host=x\"\n";
    assert!(parse(&bad).is_err());
}

#[test]
fn minimal_config_parses() {
    let c = parse(&base()).expect("valid");
    assert_eq!(c.regions.len(), 1);
    assert_eq!(*c.repository.compression_level.get_ref(), 3);
}

#[test]
fn unknown_key_names_line_and_key() {
    let t = base() + "compresion = 3\n";
    let e = parse(&t).unwrap_err().to_string();
    assert!(e.starts_with("dr.toml:8:"), "{e}");
    assert!(e.contains("compresion"), "{e}");
    assert!(e.contains("remove or correct"), "{e}");
}

#[test]
fn wrong_value_type_says_what_to_write() {
    let t = base().replace("[[region]]", "compression_level = \"3\"\n\n[[region]]");
    let e = parse(&t).unwrap_err().to_string();
    assert!(
        e.contains("expected i32") && e.contains("write a whole number"),
        "{e}"
    );
}

#[test]
fn missing_recipients() {
    let t = "[repository]\n\n[[region]]\nname = \"a\"\ntype = \"fs\"\npath = \"/x\"\n";
    let e = parse(t).unwrap_err().to_string();
    assert!(e.contains("no recipients"), "{e}");
    assert!(e.contains("dr keygen"), "{e}");
}

#[test]
fn bad_recipient() {
    let t = "[repository]\nrecipients = [\"age1nope\"]\n[[region]]\nname = \"a\"\ntype = \"fs\"\npath = \"/x\"\n";
    let e = parse(t).unwrap_err().to_string();
    assert!(e.starts_with("dr.toml:2:"), "{e}");
    assert!(e.contains("not an age X25519 public key"), "{e}");
}

#[test]
fn region_without_path() {
    let t = format!(
        "[repository]\nrecipients = [\"{RCPT}\"]\n[[region]]\nname = \"a\"\ntype = \"fs\"\n"
    );
    let e = parse(&t).unwrap_err().to_string();
    assert!(e.contains("needs a path"), "{e}");
    assert!(e.starts_with("dr.toml:3:"), "{e}");
}

#[test]
fn duplicate_region_name() {
    let t = base() + "[[region]]\nname = \"local\"\ntype = \"fs\"\npath = \"/tmp/y\"\n";
    let e = parse(&t).unwrap_err().to_string();
    assert!(e.starts_with("dr.toml:9:"), "{e}");
    assert!(
        e.contains("duplicate region name \"local\" (first used on line 5)"),
        "{e}"
    );
}

#[test]
fn min_regions_out_of_range() {
    let t = format!(
        "[repository]\nrecipients = [\"{RCPT}\"]\nmin_regions = 2\n[[region]]\nname = \"a\"\ntype = \"fs\"\npath = \"/x\"\n"
    );
    let e = parse(&t).unwrap_err().to_string();
    assert!(e.starts_with("dr.toml:3:"), "{e}");
    assert!(e.contains("min_regions = 2"), "{e}");
}

#[test]
fn unknown_region_type() {
    let t = format!(
        "[repository]\nrecipients = [\"{RCPT}\"]\n[[region]]\nname = \"a\"\ntype = \"ftp\"\n"
    );
    let e = parse(&t).unwrap_err().to_string();
    assert!(e.contains("\"fs\" or \"s3\""), "{e}");
}

#[test]
fn s3_half_credentials_rejected() {
    let t = format!(
        "[repository]\nrecipients = [\"{RCPT}\"]\n[[region]]\nname = \"a\"\ntype = \"s3\"\nbucket = \"b\"\naccess_key_id_env = \"K\"\n"
    );
    let e = parse(&t).unwrap_err().to_string();
    assert!(e.contains("set both an access key id"), "{e}");
}

#[test]
fn env_targets_parse_and_are_checked() {
    let t = base()
        + "[env.prod]\nstate_dir = \"/tmp/s\"\n[env.prod.postgres.primary]\nconninfo = \"host=127.0.0.1 port=5432\"\ndata_dir = \"/d\"\n[env.prod.redis.cache]\nurl = \"redis://127.0.0.1:6379\"\n";
    let c = parse(&t).expect("valid");
    let e = c.environment("prod").expect("prod");
    assert_eq!(e.postgres["primary"].get_ref().os_user, "postgres");
    assert!(e.redis.contains_key("cache"));
    let missing = c.environment("staging").unwrap_err().to_string();
    assert!(missing.contains("configured: prod"), "{missing}");

    let t = base() + "[env.prod.postgres.primary]\nconninfo = \"host=x\"\ndatadir = \"/d\"\n";
    let e = parse(&t).unwrap_err().to_string();
    assert!(e.starts_with("dr.toml:10:") && e.contains("datadir"), "{e}");

    let t = base() + "[env.prod.redis.cache]\nurl = \"http://x\"\n";
    let e = parse(&t).unwrap_err().to_string();
    assert!(e.starts_with("dr.toml:8:"), "{e}");
    assert!(
        e.contains("[env.prod.redis.cache]: url is not a Redis URL"),
        "{e}"
    );

    let t = base() + "[env.prod.postgres.primary]\nconninfo = \"host=x\"\ndata_dir = \"rel\"\n";
    let e = parse(&t).unwrap_err().to_string();
    assert!(e.contains("must be absolute"), "{e}");
}

#[test]
fn verify_checks_and_drills_parse_and_are_checked() {
    let pg = "[postgres.main]\nconninfo = \"host=127.0.0.1\"\ndata_dir = \"/d\"\n";
    let redis = "[redis.cache]\nurl = \"redis://127.0.0.1:6379\"\n";
    let t = base()
        + pg
        + "[postgres.main.verify]\nmax_replay_lag_seconds = 60\n[[postgres.main.verify.check]]\nname = \"users\"\ndatabase = \"app\"\nsql = \"SELECT true\"\n"
        + redis
        + "[[redis.cache.verify.check]]\nname = \"size\"\ncommand = [\"DBSIZE\"]\nexpect = \"1\"\n"
        + "[drill.nightly]\npostgres = [\"main\"]\nredis = [\"cache\"]\nrto_seconds = 600\nreport_dir = \"/r\"\n";
    let c = parse(&t).expect("valid");
    let v = &c.postgres["main"].get_ref().verify;
    assert_eq!(v.max_replay_lag_seconds, 60);
    assert_eq!(v.user, "postgres");
    assert_eq!(v.check[0].database, "app");
    assert_eq!(
        c.redis["cache"].get_ref().verify.check[0].command,
        ["DBSIZE"]
    );
    let d = c.drill("nightly").expect("drill");
    assert_eq!(
        (d.to.as_str(), d.environment.as_str()),
        ("latest", "scratch")
    );
    assert!(
        c.drill("weekly")
            .unwrap_err()
            .to_string()
            .contains("configured: nightly")
    );

    let e =
        parse(&(base() + pg + "[[postgres.main.verify.check]]\nname = \"x\"\nsq = \"SELECT 1\"\n"))
            .unwrap_err()
            .to_string();
    assert!(e.starts_with("dr.toml:13:") && e.contains("sq"), "{e}");
    let drill = |body: &str| {
        parse(&(base() + pg + redis + "[drill.d]\n" + body))
            .unwrap_err()
            .to_string()
    };
    let e = drill("postgres = [\"other\"]\nreport_dir = \"/r\"\n");
    assert!(
        e.starts_with("dr.toml:13:") && e.contains("names no [postgres.other]"),
        "{e}"
    );
    let e = drill("redis = [\"cache\"]\nto = \"yesterday\"\nreport_dir = \"/r\"\n");
    assert!(e.contains("neither \"latest\" nor a time"), "{e}");
    let e = drill("redis = [\"cache\"]\nrto_seconds = 0\nreport_dir = \"/r\"\n");
    assert!(e.contains("rto_seconds must be a positive"), "{e}");
    let e = drill("redis = [\"cache\"]\nreport_dir = \"r\"\n");
    assert!(e.contains("must be absolute"), "{e}");
    let e = drill("redis = [\"cache\"]\nenvironment = \"prod\"\nreport_dir = \"/r\"\n");
    assert!(e.contains("neither \"scratch\" nor an [env.<name>]"), "{e}");
    let e = parse(&(base() + pg + "[postgres.main.verify]\nscratch_dir = \"/a b\"\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("free of spaces"), "{e}");
}

#[test]
fn staging_drills_need_an_overwritable_environment_apart_from_production() {
    let sources = "[postgres.main]\nconninfo = \"host=127.0.0.1 port=5432\"\ndata_dir = \"/srv/pg/main\"\n\
                   [redis.cache]\nurl = \"redis://127.0.0.1:6379\"\n\
                   [env.prod.postgres.main]\nconninfo = \"host=10.0.0.1\"\ndata_dir = \"/srv/pg/prod\"\n";
    let drill = "[drill.d]\npostgres = [\"main\"]\nredis = [\"cache\"]\nenvironment = \"staging\"\nreport_dir = \"/r\"\n";
    let with = |env: &str| parse(&(base() + sources + env + drill));
    let good_pg = "[env.staging.postgres.main]\nconninfo = \"host=localhost port=5433\"\ndata_dir = \"/srv/pg/staging\"\n";
    let good_redis = "[env.staging.redis.cache]\nurl = \"redis://127.0.0.1:6380\"\nconfig_file = \"/etc/redis/staging.conf\"\ndir = \"/srv/redis/staging\"\n";
    let ok = format!("[env.staging]\nallow_overwrite = true\n{good_pg}{good_redis}");
    let c = with(&ok).expect("valid staging drill");
    assert_eq!(c.drill("d").expect("drill").staging(), Some("staging"));
    assert_eq!(
        c.env["staging"].get_ref().redis["cache"]
            .get_ref()
            .dbfilename,
        "dump.rdb"
    );

    let e = with(&format!("[env.staging]\n{good_pg}{good_redis}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not set allow_overwrite = true"), "{e}");
    let e = with(&format!("[env.staging]\nallow_overwrite = true\n{good_pg}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no server [env.staging.redis.cache]"), "{e}");
    let e = with(&ok.replace("/srv/pg/staging", "/srv/pg/main"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("data_dir /srv/pg/main is (or overlaps) /srv/pg/main")
            && e.contains("[postgres.main]"),
        "{e}"
    );
    let e = with(&ok.replace("/srv/pg/staging", "/srv/pg/prod/sub"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[env.prod.postgres.main]"), "{e}");
    let e = with(&ok.replace("port=5433", "port=5432"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("reaches local:5432"), "{e}");
    let e = with(&ok.replace("127.0.0.1:6380", "localhost:6379"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("the production instance [redis.cache]"), "{e}");
    let e = with(&ok.replace("config_file = \"/etc/redis/staging.conf\"\n", ""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs config_file and dir"), "{e}");
    let e = parse(&(base() + "[env.scratch.redis.a]\nurl = \"redis://127.0.0.1:1\"\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("reserved"), "{e}");
}

#[test]
fn s3_debug_redacts_secrets() {
    let t = format!(
        "[repository]\nrecipients = [\"{RCPT}\"]\n[[region]]\nname = \"a\"\ntype = \"s3\"\nbucket = \"b\"\naccess_key_id = \"AKIDSECRETVALUE\"\nsecret_access_key = \"TOPSECRETVALUE\"\n"
    );
    let c = parse(&t).expect("valid");
    let dbg = format!("{c:?}");
    assert!(
        !dbg.contains("TOPSECRETVALUE") && !dbg.contains("AKIDSECRETVALUE"),
        "{dbg}"
    );
}

#[test]
fn ha_without_clusters_is_a_fleet_and_the_fleet_name_is_reserved() {
    let ha = "[ha]\nendpoints = [\"http://127.0.0.1:2379\"]\nttl = \"10s\"\nloop_wait = \"3s\"\n";
    let c = parse(&format!("{}{ha}", base())).expect("a fleet-only [ha] parses");
    assert!(c.ha().is_some_and(|h| h.fleet && h.postgres.is_empty()));
    let e = parse(&format!("{}{ha}fleet = false\n", base())).expect_err("nothing to do");
    assert!(e.to_string().contains("fleet = false"), "{e}");
    let member = "conninfo = \"host=127.0.0.1\"\ndata_dir = \"/d\"\n";
    let e = parse(&format!(
        "{}{ha}[ha.postgres.fleet.member.a]\n{member}[ha.postgres.fleet.member.b]\n{member}",
        base()
    ))
    .expect_err("reserved name");
    assert!(e.to_string().contains("another name"), "{e}");
}
