//! Shared helpers for integration tests. Servers are started by
//! `scripts/testenv.sh`; a missing server is a test failure with instructions,
//! never a skip.

#![allow(dead_code)]

use std::path::Path;

use dr::config::{S3Region, SecretSource};
use dr::store::{S3Store, Store};

/// Reads a variable exported by `scripts/testenv.sh`, or fails the test saying
/// which server is missing and how to start it.
pub fn require_env(var: &str, server: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{var} is not set, so the {server} test server is not available. \
             Run the suite with `scripts/test.sh`, or start the servers with \
             `scripts/testenv.sh start` and `source \"${{DR_TESTENV_DIR:-/tmp/dr-testenv}}/env.sh\"`."
        ),
    }
}

/// A random lowercase id for isolating test data.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// S3 settings for the Garage test server, under a fresh prefix.
pub fn garage_region(prefix: &str) -> S3Region {
    S3Region {
        endpoint: Some(require_env("DR_TEST_S3_ENDPOINT", "Garage (S3)")),
        bucket: require_env("DR_TEST_S3_BUCKET", "Garage (S3)"),
        prefix: prefix.to_string(),
        s3_region: require_env("DR_TEST_S3_REGION", "Garage (S3)"),
        path_style: true,
        access_key_id: Some(SecretSource::Literal(require_env(
            "DR_TEST_S3_ACCESS_KEY_ID",
            "Garage (S3)",
        ))),
        secret_access_key: Some(SecretSource::Literal(require_env(
            "DR_TEST_S3_SECRET_ACCESS_KEY",
            "Garage (S3)",
        ))),
        part_size: 8 << 20,
    }
}

/// A store on the Garage test server under a fresh prefix.
pub async fn garage_store() -> Store {
    let cfg = garage_region(&unique("t"));
    Store::S3(S3Store::connect(&cfg).await.expect("S3 client"))
}

/// TOML for a Garage region named `name` (credentials inline, prefix fresh).
pub fn garage_region_toml(name: &str) -> String {
    format!(
        "[[region]]\nname = \"{name}\"\ntype = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\nprefix = \"{}\"\ns3_region = \"{}\"\npath_style = true\naccess_key_id_env = \"DR_TEST_S3_ACCESS_KEY_ID\"\nsecret_access_key_env = \"DR_TEST_S3_SECRET_ACCESS_KEY\"\n",
        require_env("DR_TEST_S3_ENDPOINT", "Garage (S3)"),
        require_env("DR_TEST_S3_BUCKET", "Garage (S3)"),
        unique("repo"),
        require_env("DR_TEST_S3_REGION", "Garage (S3)"),
    )
}

/// TOML for an fs region.
pub fn fs_region_toml(name: &str, path: &Path) -> String {
    format!(
        "[[region]]\nname = \"{name}\"\ntype = \"fs\"\npath = \"{}\"\n",
        path.display()
    )
}

/// Path of the built `dr` binary.
pub mod pg;
pub mod topology;

/// Path of the built `dr` binary.
pub fn dr_bin() -> &'static str {
    env!("CARGO_BIN_EXE_dr")
}
