//! RabbitMQ definitions: backup, list, restore (to a broker, --dry-run,
//! --file) and the failures that must write nothing, against the real broker
//! of `scripts/testenv.sh`. Each test works in vhosts and users of its own
//! (random names), so tests share the broker without touching each other.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use chrono::{FixedOffset, Utc};
use common::redis::DrSetup;
use serde_json::{Value, json};

/// The test broker's management API.
struct Broker {
    url: String,
    user: String,
    password: String,
}

impl Broker {
    fn from_env() -> Broker {
        Broker {
            url: common::require_env("DR_TEST_RABBITMQ_URL", "RabbitMQ"),
            user: common::require_env("DR_TEST_RABBITMQ_USER", "RabbitMQ"),
            password: common::require_env("DR_TEST_RABBITMQ_PASSWORD", "RabbitMQ"),
        }
    }

    /// `METHOD /api/<path>` with `body`; returns (status, reply).
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
        let mut c = Command::new("curl");
        c.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method])
            .args(["-u", &format!("{}:{}", self.user, self.password)])
            .args(["-H", "content-type: application/json"]);
        if let Some(b) = body {
            c.args(["--data-binary", &b.to_string()]);
        }
        let o = c
            .arg(format!("{}/api/{path}", self.url))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let (reply, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), reply.to_string())
    }

    fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> String {
        let (code, reply) = self.call(method, path, body);
        assert!(
            (200..300).contains(&code),
            "{method} /api/{path}: HTTP {code}: {reply}"
        );
        reply
    }

    /// The broker's definitions in the scope of `vhosts`, normalised.
    fn scoped(&self, vhosts: &[String]) -> Value {
        let all: Value = serde_json::from_str(&self.ok("GET", "definitions", None)).expect("json");
        dr::rabbitmq::definitions::normalised(&dr::rabbitmq::definitions::scope(&all, Some(vhosts)))
    }
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// A topology in two vhosts (one named with a slash): users with tags and
/// permissions, an exchange of each type, quorum and classic queues with
/// arguments, queue and exchange bindings, policies and a parameter.
fn topology(a: &str, b: &str, app: &str, ro: &str) -> Value {
    let perm = |user: &str, vhost: &str, c: &str, w: &str, r: &str| json!({"user": user, "vhost": vhost, "configure": c, "write": w, "read": r});
    let ex = |vhost: &str, name: &str, ty: &str, args: Value| json!({"name": name, "vhost": vhost, "type": ty, "durable": true, "auto_delete": false, "internal": false, "arguments": args});
    let q = |vhost: &str, name: &str, args: Value| json!({"name": name, "vhost": vhost, "durable": true, "auto_delete": false, "arguments": args});
    let bind = |vhost: &str, src: &str, dst: &str, ty: &str, key: &str, args: Value| json!({"source": src, "vhost": vhost, "destination": dst, "destination_type": ty, "routing_key": key, "arguments": args});
    json!({
        "users": [
            {"name": app, "password": "app-secret", "tags": ["management", "policymaker"], "limits": {}},
            {"name": ro, "password": "ro-secret", "tags": ["monitoring"], "limits": {}}
        ],
        "vhosts": [{"name": a}, {"name": b}],
        "permissions": [
            perm(app, a, ".*", ".*", ".*"),
            perm(app, b, "^app\\.", ".*", ".*"),
            perm(ro, a, "", "", ".*")
        ],
        "topic_permissions": [
            {"user": app, "vhost": a, "exchange": "events", "write": "^orders\\.", "read": ".*"}
        ],
        "parameters": [
            {"vhost": a, "component": "federation-upstream", "name": "other-region",
             "value": {"uri": "amqp://other-region.invalid", "ack-mode": "on-confirm"}}
        ],
        "global_parameters": [],
        "policies": [
            {"vhost": a, "name": "ttl", "pattern": "^classic\\.", "apply-to": "queues",
             "definition": {"message-ttl": 60000}, "priority": 1},
            {"vhost": b, "name": "limit", "pattern": ".*", "apply-to": "queues",
             "definition": {"max-length": 1000}, "priority": 0}
        ],
        "queues": [
            q(a, "orders.q", json!({"x-queue-type": "quorum", "x-delivery-limit": 5})),
            q(a, "classic.q", json!({"x-queue-type": "classic", "x-max-length": 100, "x-dead-letter-exchange": "dlx"})),
            q(a, "dead", json!({})),
            q(b, "app.work", json!({"x-queue-type": "quorum"}))
        ],
        "exchanges": [
            ex(a, "events", "topic", json!({})),
            ex(a, "dlx", "fanout", json!({})),
            ex(a, "direct.x", "direct", json!({"alternate-exchange": "dlx"})),
            ex(a, "headers.x", "headers", json!({})),
            ex(b, "app.in", "direct", json!({}))
        ],
        "bindings": [
            bind(a, "events", "orders.q", "queue", "orders.#", json!({})),
            bind(a, "dlx", "dead", "queue", "", json!({})),
            bind(a, "events", "direct.x", "exchange", "audit.*", json!({})),
            bind(a, "headers.x", "classic.q", "queue", "", json!({"x-match": "all", "kind": "report"})),
            bind(b, "app.in", "app.work", "queue", "work", json!({}))
        ]
    })
}

struct Fixture {
    broker: Broker,
    vhosts: Vec<String>,
    users: Vec<String>,
    dr: DrSetup,
    /// Holds the two region directories.
    regions: tempfile::TempDir,
}

impl Fixture {
    /// Two fs regions, no retention.
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let regions = common::fs_region_toml("local", &dir.path().join("repo"))
            + &common::fs_region_toml("second", &dir.path().join("repo2"));
        Fixture::with(dir, &regions, "")
    }

    /// The topology on the broker, and dr with `regions` (under `dir`) and
    /// `extra` in the broker's section.
    fn with(dir: tempfile::TempDir, regions: &str, extra: &str) -> Fixture {
        let broker = Broker::from_env();
        let u = common::unique("dr");
        let (a, b) = (format!("{u}-a"), format!("{u}/b"));
        let (app, ro) = (format!("{u}-app"), format!("{u}-ro"));
        broker.ok("POST", "definitions", Some(&topology(&a, &b, &app, &ro)));
        let section = rabbit_section(&broker.url, &[&a, &b], "DR_TEST_RABBITMQ_PASSWORD", extra);
        let dr = DrSetup::new(regions, &section);
        Fixture {
            broker,
            vhosts: vec![a, b],
            users: vec![app, ro],
            dr,
            regions: dir,
        }
    }

    fn delete_all(&self) {
        for v in &self.vhosts {
            self.broker
                .ok("DELETE", &format!("vhosts/{}", enc(v)), None);
        }
        for u in &self.users {
            self.broker.ok("DELETE", &format!("users/{}", enc(u)), None);
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for v in &self.vhosts {
            let _ = self
                .broker
                .call("DELETE", &format!("vhosts/{}", enc(v)), None);
        }
        for u in &self.users {
            let _ = self
                .broker
                .call("DELETE", &format!("users/{}", enc(u)), None);
        }
    }
}

fn rabbit_section(url: &str, vhosts: &[&str], password_env: &str, extra: &str) -> String {
    let list = if vhosts.is_empty() {
        String::new()
    } else {
        format!(
            "vhosts = [{}]\n",
            vhosts
                .iter()
                .map(|v| format!("{v:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        "[rabbitmq.mq]\nurl = \"{url}\"\nuser = \"{}\"\npassword_env = \"{password_env}\"\ntimeout_seconds = 10\n{list}{extra}\n",
        common::require_env("DR_TEST_RABBITMQ_USER", "RabbitMQ"),
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every object key under a region directory.
fn objects(region: &Path) -> Vec<String> {
    common::walk_files(region)
        .into_iter()
        .filter_map(|p| {
            p.strip_prefix(region)
                .ok()
                .map(|r| r.to_string_lossy().into_owned())
        })
        .collect()
}

#[test]
fn backup_delete_restore_round_trip_with_point_in_time_dry_run_and_file() {
    let f = Fixture::new();
    let original = f.broker.scoped(&f.vhosts);
    assert_eq!(original["queues"].as_array().map(Vec::len), Some(4));

    let first = f.dr.dr_json(&["backup", "rabbitmq"]);
    let snap = &first["snapshot"];
    assert_eq!(snap["counts"]["vhosts"], 2, "{first}");
    // The two users, and the administrator: RabbitMQ grants the user that
    // creates a vhost full permissions on it.
    assert_eq!(snap["counts"]["users"], 3);
    assert_eq!(snap["counts"]["permissions"], 5);
    assert_eq!(snap["counts"]["topic_permissions"], 1);
    assert_eq!(snap["counts"]["exchanges"], 5);
    assert_eq!(snap["counts"]["queues"], 4);
    assert_eq!(snap["counts"]["bindings"], 5);
    assert_eq!(snap["counts"]["policies"], 2);
    assert_eq!(snap["counts"]["parameters"], 1);
    assert_eq!(snap["counts"]["global_parameters"], 0);
    assert_eq!(snap["regions"], json!(["local", "second"]));
    assert!(!snap["server_version"].as_str().unwrap_or("").is_empty());

    // Nothing in the repository shows the topology or a password hash.
    let repo = f.regions.path().join("repo");
    for key in objects(&repo) {
        assert!(
            !key.contains(&f.vhosts[0]) && !key.contains("orders"),
            "{key}"
        );
        let body = std::fs::read(repo.join(&key)).expect("object");
        let text = String::from_utf8_lossy(&body);
        assert!(
            !text.contains("orders.q") && !text.contains("password_hash"),
            "{key} is not encrypted"
        );
    }

    std::thread::sleep(std::time::Duration::from_millis(1100));
    let between = Utc::now();
    std::thread::sleep(std::time::Duration::from_millis(1100));

    // Changes: a new queue, a policy gone, a queue argument-free binding added.
    let a = enc(&f.vhosts[0]);
    f.broker.ok(
        "PUT",
        &format!("queues/{a}/extra"),
        Some(&json!({"durable": true, "arguments": {"x-queue-type": "quorum"}})),
    );
    f.broker.ok("DELETE", &format!("policies/{a}/ttl"), None);
    let changed = f.broker.scoped(&f.vhosts);
    assert_ne!(changed, original);
    let second = f.dr.dr_json(&["backup", "rabbitmq"]);
    assert_eq!(second["snapshot"]["counts"]["queues"], 5);

    let list = f.dr.dr_json(&["list", "rabbitmq"]);
    assert_eq!(
        list["snapshots"].as_array().map(Vec::len),
        Some(2),
        "{list}"
    );

    // The time between the snapshots, written with an offset.
    let ist = FixedOffset::east_opt(5 * 3600 + 1800).expect("offset");
    let to = between.with_timezone(&ist).to_rfc3339();
    assert!(to.ends_with("+05:30"), "{to}");

    // Dry runs list exactly the differences and change nothing.
    let dry =
        f.dr.dr_json(&["restore", "rabbitmq", "--to", "latest", "--dry-run"]);
    assert_eq!(dry["restore"]["diff"], json!({}), "{dry}");
    let dry =
        f.dr.dr_json(&["restore", "rabbitmq", "--to", &to, "--dry-run"]);
    let r = &dry["restore"];
    assert_eq!(r["snapshot"], first["snapshot"]["id"], "{dry}");
    let diff = r["diff"].as_object().expect("diff");
    assert_eq!(
        diff.keys().collect::<Vec<_>>(),
        ["policies", "queues"],
        "{dry}"
    );
    assert_eq!(
        r["diff"]["policies"],
        json!({"added": [format!("[{}] \"ttl\"", f.vhosts[0])], "removed": [], "changed": []})
    );
    assert_eq!(
        r["diff"]["queues"],
        json!({"added": [], "removed": [format!("[{}] \"extra\"", f.vhosts[0])], "changed": []})
    );
    let human = f.dr.dr(&["restore", "rabbitmq", "--to", &to, "--dry-run"]);
    let text = stdout(&human);
    assert!(
        text.contains("policies: 1 to add, 0 to change, 0 only on the broker"),
        "{text}"
    );
    assert!(
        text.contains("- [") && text.contains("\"extra\" (left as is"),
        "{text}"
    );
    assert_eq!(
        f.broker.scoped(&f.vhosts),
        changed,
        "a dry run changed the broker"
    );

    // Lose everything, then restore the first state.
    f.delete_all();
    let gone = f.broker.scoped(&f.vhosts);
    assert_eq!(gone["vhosts"], json!([]));
    let restored = f.dr.dr_json(&["restore", "rabbitmq", "--to", &to]);
    assert_eq!(restored["restore"]["snapshot"], first["snapshot"]["id"]);
    assert_eq!(f.broker.scoped(&f.vhosts), original);
    // Password hashes came back too: the restored user can log in.
    let login = Broker {
        url: f.broker.url.clone(),
        user: f.users[0].clone(),
        password: "app-secret".into(),
    };
    assert_eq!(login.call("GET", "whoami", None).0, 200);

    // Latest brings the second state back over it.
    f.dr.dr(&["restore", "rabbitmq", "--to", "latest"]);
    assert_eq!(f.broker.scoped(&f.vhosts)["queues"], changed["queues"]);

    // --file writes the first snapshot, private, for load_definitions.
    let file = f.dr.path("defs.json");
    let o = f.dr.dr(&[
        "restore",
        "rabbitmq",
        "--to",
        &to,
        "--file",
        file.to_str().expect("utf8"),
    ]);
    assert!(stdout(&o).contains("mode 0600"), "{}", stdout(&o));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).expect("file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let written: Value =
        serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("json");
    assert_eq!(dr::rabbitmq::definitions::normalised(&written), original);
    // …and never over an existing file.
    let again = f.dr.dr_raw(&[
        "restore",
        "rabbitmq",
        "--to",
        &to,
        "--file",
        file.to_str().expect("utf8"),
    ]);
    assert!(!again.status.success() && stderr(&again).contains("already exists"));

    // Restores are audited.
    let audit = std::fs::read_to_string(f.dr.path("audit.jsonl")).expect("audit");
    assert!(audit.matches("restore.rabbitmq").count() >= 7, "{audit}");
    assert!(!audit.contains("password_hash"));
}

/// A backup that fails before the broker answered writes nothing.
fn assert_fails_writing_nothing(section: &str, envs: &[(&str, &str)], expect: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let region = dir.path().join("repo");
    let dr = DrSetup::new(&common::fs_region_toml("local", &region), section);
    let before = objects(&region);
    let mut c = dr.command(&["backup", "rabbitmq"]);
    for (k, v) in envs {
        c.env(k, v);
    }
    let o = c.output().expect("run dr");
    let err = stderr(&o);
    assert!(!o.status.success(), "backup succeeded: {}", stdout(&o));
    for e in expect {
        assert!(err.contains(e), "expected {e:?} in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(objects(&region), before, "a failed backup wrote objects");
}

#[test]
fn refused_credentials_unreachable_url_and_bad_certificate_write_nothing() {
    let broker = Broker::from_env();
    // Wrong password.
    assert_fails_writing_nothing(
        &rabbit_section(&broker.url, &[], "DR_TEST_WRONG_PASSWORD", ""),
        &[("DR_TEST_WRONG_PASSWORD", "not-the-password")],
        &["refused the credentials", "HTTP 401"],
    );
    // Nothing listens.
    let port = common::pg::free_port();
    assert_fails_writing_nothing(
        &rabbit_section(
            &format!("http://127.0.0.1:{port}"),
            &[],
            "DR_TEST_RABBITMQ_PASSWORD",
            "",
        ),
        &[],
        &[
            "cannot reach the RabbitMQ management API",
            "is the broker running",
        ],
    );
    // A TLS server whose certificate is signed by a CA the client does not trust.
    let tls = tempfile::tempdir().expect("tempdir");
    common::test_certificates(tls.path());
    let port = common::pg::free_port();
    let mut server = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(port.to_string())
        .args(["-cert", "server.crt", "-key", "server.key"])
        .current_dir(tls.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "s_server did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let url = format!("https://127.0.0.1:{port}");
    let other_ca = tls.path().join("other-ca.crt");
    assert_fails_writing_nothing(
        &rabbit_section(
            &url,
            &[],
            "DR_TEST_RABBITMQ_PASSWORD",
            &format!("ca_file = \"{}\"\n", other_ca.display()),
        ),
        &[],
        &["TLS to the RabbitMQ management API", "certificate"],
    );
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn plain_http_off_loopback_and_missing_vhosts_are_refused() {
    let broker = Broker::from_env();
    let d = tempfile::tempdir().expect("tempdir");
    let region = d.path().join("repo");
    let setup = DrSetup::new(
        &common::fs_region_toml("local", &region),
        &rabbit_section(&broker.url, &[], "DR_TEST_RABBITMQ_PASSWORD", ""),
    );
    let text = std::fs::read_to_string(&setup.cfg).expect("config");
    let plain = setup.path("plain.toml");
    std::fs::write(
        &plain,
        text.replace(&broker.url, "http://mq.example.com:15672"),
    )
    .expect("config");
    let o = Command::new(common::dr_bin())
        .args([
            "--config",
            plain.to_str().expect("utf8"),
            "list",
            "rabbitmq",
        ])
        .output()
        .expect("dr");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("http:// is allowed only for a loopback host"),
        "{}",
        stderr(&o)
    );

    let missing = common::unique("no-such-vhost");
    let d = tempfile::tempdir().expect("tempdir");
    let region = d.path().join("repo");
    let setup = DrSetup::new(
        &common::fs_region_toml("local", &region),
        &rabbit_section(&broker.url, &[&missing], "DR_TEST_RABBITMQ_PASSWORD", ""),
    );
    let before = objects(&region);
    let o = setup.dr_raw(&["backup", "rabbitmq"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("the broker has no vhost \"{missing}\"")),
        "{}",
        stderr(&o)
    );
    assert_eq!(objects(&region), before);
}

#[test]
fn region_down_retention_verify_and_sync() {
    let garage = common::require_env("DR_TEST_S3_ENDPOINT", "Garage (S3)");
    let gate = common::Gate::start(common::endpoint_port(&garage));
    let dir = tempfile::tempdir().expect("tempdir");
    let regions = format!(
        "{}\n{}",
        common::fs_region_toml("local", &dir.path().join("repo")),
        common::s3_region_toml(
            "garage",
            &format!("http://127.0.0.1:{}", gate.port),
            &common::require_env("DR_TEST_S3_BUCKET", "Garage (S3)"),
            &common::unique("mq"),
            &common::require_env("DR_TEST_S3_REGION", "Garage (S3)"),
            "DR_TEST_S3_ACCESS_KEY_ID",
            "DR_TEST_S3_SECRET_ACCESS_KEY",
            "",
        ),
    );
    let f = Fixture::with(
        dir,
        &regions,
        "[rabbitmq.mq.retention]\nkeep_snapshots = 1\n",
    );
    let first = f.dr.dr_json(&["backup", "rabbitmq"]);
    assert_eq!(first["snapshot"]["regions"], json!(["local", "garage"]));

    // Garage is unreachable: with min_regions = 1 the snapshot still lands.
    gate.set_open(false);
    let second = f.dr.dr_json(&["backup", "rabbitmq"]);
    assert_eq!(second["snapshot"]["regions"], json!(["local"]), "{second}");
    assert_eq!(second["degraded"][0]["region"], "garage", "{second}");
    gate.set_open(true);

    // verify names what garage lacks; sync copies it; then all is clean.
    let o = f.dr.dr_raw(&["--json", "verify", "rabbitmq", "--list"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    let garage_tally = v["verify"]["regions"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["region"] == "garage"))
        .cloned()
        .expect("garage tally");
    assert_eq!(garage_tally["missing"], 2, "manifest and definitions: {v}");
    let synced = f.dr.dr_json(&["repo", "sync"]);
    assert_eq!(synced["ok"], true, "{synced}");
    let v = f.dr.dr_json(&["verify", "rabbitmq", "--read-data"]);
    assert_eq!(v["ok"], true, "{v}");

    // The second snapshot restores from garage alone.
    let local = f.regions.path().join("repo");
    let moved = f.regions.path().join("repo-away");
    std::fs::rename(&local, &moved).expect("take the fs region away");
    let dry =
        f.dr.dr_json(&["restore", "rabbitmq", "--to", "latest", "--dry-run"]);
    assert_eq!(dry["restore"]["snapshot"], second["snapshot"]["id"]);
    assert_eq!(dry["restore"]["region"], "garage", "{dry}");
    // The restore's audit record went to the regions, recreating the fs one.
    std::fs::remove_dir_all(&local).expect("remove the recreated region");
    std::fs::rename(&moved, &local).expect("bring it back");

    // Retention keeps the newest snapshot only, in both regions.
    let e = f.dr.dr_json(&["expire"]);
    assert_eq!(e["ok"], true, "{e}");
    let list = f.dr.dr_json(&["list", "rabbitmq"]);
    let ids: Vec<&Value> = list["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .map(|s| &s["id"])
        .collect();
    assert_eq!(ids, [&second["snapshot"]["id"]], "{list}");
    let v = f.dr.dr_json(&["verify", "rabbitmq", "--read-data"]);
    assert_eq!(v["ok"], true, "{v}");
    let first_id = first["snapshot"]["id"].as_str().expect("id");
    assert!(
        !objects(&local).iter().any(|k| k.contains(first_id)),
        "the expired snapshot is still in the fs region"
    );
}

/// Processes (pid, command line) whose command line or working directory
/// is under `dir`.
fn processes_under(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let cwd_in = std::fs::read_link(e.path().join("cwd")).is_ok_and(|c| c.starts_with(dir));
        if cmd.contains(&needle) || cwd_in {
            out.push((pid, cmd));
        }
    }
    out
}

/// Runs `program args` with `input` on stdin; returns stdout.
fn pipe(program: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut c = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    c.stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write");
    let o = c.wait_with_output().expect("wait");
    assert!(o.status.success(), "{program} {args:?} failed");
    o.stdout
}

#[test]
fn verify_restore_on_a_scratch_broker_passes_then_names_a_tampered_item() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The broker runs as the unprivileged test user, who must reach the scratch dir.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let scratch = dir.path().join("scratch");
    let region = dir.path().join("repo");
    let extra = format!(
        "server_bin = \"{}\"\nos_user = \"{}\"\n[rabbitmq.mq.verify]\nscratch_dir = \"{}\"\n",
        common::require_env("DR_TEST_RABBITMQ_SERVER_BIN", "RabbitMQ"),
        common::require_env("DR_TEST_OS_USER", "RabbitMQ"),
        scratch.display()
    );
    let f = Fixture::with(dir, &common::fs_region_toml("local", &region), &extra);
    let a = &f.vhosts[0];
    let mut cfg = std::fs::read_to_string(&f.dr.cfg).expect("config");
    cfg.push_str(&format!(
        "[[rabbitmq.mq.verify.check]]\nname = \"orders queue is quorum\"\nkind = \"queue\"\nvhost = \"{a}\"\nitem = \"orders.q\"\narguments = {{ \"x-queue-type\" = \"quorum\", \"x-delivery-limit\" = 5 }}\n\
         [[rabbitmq.mq.verify.check]]\nname = \"app user\"\nkind = \"user\"\nitem = \"{}\"\n",
        f.users[0]
    ));
    std::fs::write(&f.dr.cfg, cfg).expect("config");
    let snap = f.dr.dr_json(&["backup", "rabbitmq"]);
    let id = snap["snapshot"]["id"].as_str().expect("id").to_string();

    let v = f.dr.dr_json(&["verify", "rabbitmq", "--restore"]);
    let rep = &v["verify_restore"]["sources"][0];
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(rep["kind"], "rabbitmq");
    assert_eq!(rep["backup"], id.as_str());
    let checks: Vec<(&str, bool)> = rep["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| (c["name"].as_str().unwrap_or(""), c["ok"] == true))
        .collect();
    assert_eq!(
        checks,
        [
            ("restore", true),
            ("definitions", true),
            ("orders queue is quorum", true),
            ("app user", true),
            ("cleanup", true)
        ],
        "{rep}"
    );
    assert!(rep["rto_seconds"].as_f64().is_some() && rep["rpo_seconds"].as_f64().is_some());
    // The scratch broker and its directory are gone.
    assert_eq!(std::fs::read_dir(&scratch).expect("scratch").count(), 0);
    assert!(
        processes_under(&scratch).is_empty(),
        "{:?}",
        processes_under(&scratch)
    );

    // A manifest that names a queue the snapshot does not hold fails, naming it.
    let mkey = region.join(format!("rabbitmq/mq/snapshots/{id}/manifest"));
    let identity = f.dr.path("identity.txt");
    let plain = pipe(
        "age",
        &["-d", "-i", identity.to_str().expect("utf8")],
        &std::fs::read(&mkey).expect("manifest"),
    );
    let mut m: Value = serde_json::from_slice(&pipe("zstd", &["-d", "-c"], &plain)).expect("json");
    let ghost = format!("[{a}] \"ghost\"");
    m["items"]["queues"]
        .as_array_mut()
        .expect("queues")
        .push(json!(ghost));
    let cfg = std::fs::read_to_string(&f.dr.cfg).expect("config");
    let rcpt = cfg
        .split('"')
        .find(|s| s.starts_with("age1"))
        .expect("recipient");
    let packed = pipe("zstd", &["-c", "-q"], m.to_string().as_bytes());
    let sealed = pipe("age", &["-r", rcpt], &packed);
    std::fs::remove_file(&mkey).expect("remove");
    std::fs::write(&mkey, sealed).expect("tamper");
    let o = f.dr.dr_raw(&["--json", "verify", "rabbitmq", "--restore"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    let defs = v["verify_restore"]["sources"][0]["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "definitions"))
        .cloned()
        .expect("definitions check");
    assert_eq!(defs["ok"], false);
    let detail = defs["detail"].as_str().expect("detail");
    assert!(detail.contains(&format!("queue {ghost}")), "{detail}");
    assert!(detail.starts_with("1 of "), "{detail}");
    assert_eq!(std::fs::read_dir(&scratch).expect("scratch").count(), 0);
    assert!(processes_under(&scratch).is_empty());
}

#[test]
fn playbook_gates_see_the_broker_and_its_queues() {
    let dir = tempfile::tempdir().expect("tempdir");
    let region = common::fs_region_toml("local", &dir.path().join("repo"));
    let broker = Broker::from_env();
    let env = format!(
        "[env.test.rabbitmq.mq]\nurl = \"{}\"\nuser = \"{}\"\npassword_env = \"DR_TEST_RABBITMQ_PASSWORD\"\n",
        broker.url, broker.user
    );
    let f = Fixture::with(dir, &region, &env);
    let playbook = |name: &str, queue: &str| {
        let p = f.dr.path(&format!("{name}.toml"));
        std::fs::write(
            &p,
            format!(
                "name = \"{name}\"\nenv = \"test\"\n[defaults]\ntimeout = \"2s\"\ninterval = \"200ms\"\n\
                 [[step]]\nname = \"broker up\"\npre = [\n  {{ type = \"rabbitmq.reachable\", target = \"mq\" }},\n  \
                 {{ type = \"rabbitmq.queue_exists\", target = \"mq\", vhost = \"{}\", queue = \"{queue}\" }},\n]\n",
                f.vhosts[0]
            ),
        )
        .expect("playbook");
        p
    };
    let run = |p: &Path| {
        let o =
            f.dr.command(&[
                "failover",
                p.to_str().expect("utf8"),
                "--env",
                "test",
                "--yes",
                "--json",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("dr failover");
        let v: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{e}: {} {}", stdout(&o), stderr(&o)));
        (o, v)
    };
    let (o, v) = run(&playbook("present", "orders.q"));
    assert!(o.status.success(), "{v}");
    let text = v.to_string();
    assert!(text.contains("answers (RabbitMQ 3."), "{text}");
    assert!(text.contains("quorum queue"), "{text}");

    let (o, v) = run(&playbook("absent", "ghost"));
    assert!(!o.status.success(), "{v}");
    let text = v.to_string();
    assert!(
        text.contains(&format!(
            "no queue \\\"ghost\\\" in vhost \\\"{}\\\"",
            f.vhosts[0]
        )),
        "{text}"
    );
}

/// Ends every process working in `dir` (a broker the test started).
fn stop_processes_under(dir: &Path) {
    for sig in ["-TERM", "-KILL"] {
        let left = processes_under(dir);
        if left.is_empty() {
            return;
        }
        for (pid, _) in left {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        }
        std::thread::sleep(std::time::Duration::from_secs(8));
    }
}

#[test]
fn drill_into_a_staging_broker_and_refusing_production() {
    // The staging broker: a private rabbitmq-server started through dr's own launcher.
    let stage_dir = tempfile::tempdir().expect("tempdir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(stage_dir.path(), std::fs::Permissions::from_mode(0o711))
        .expect("chmod");
    let broker_dir = stage_dir.path().join("broker");
    std::fs::create_dir(&broker_dir).expect("mkdir");
    let launcher: dr::config::RabbitConfig = toml::from_str(&format!(
        "url = \"http://127.0.0.1:1\"\nuser = \"x\"\npassword_env = \"X\"\nserver_bin = \"{}\"\nos_user = \"{}\"\n",
        common::require_env("DR_TEST_RABBITMQ_SERVER_BIN", "RabbitMQ"),
        common::require_env("DR_TEST_OS_USER", "RabbitMQ"),
    ))
    .expect("launcher config");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let staging = rt
        .block_on(dr::rabbitmq::server::start_scratch(
            &launcher,
            &broker_dir,
            std::time::Duration::from_secs(120),
        ))
        .expect("staging broker");
    struct Stop(std::path::PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            stop_processes_under(&self.0);
        }
    }
    let _stop = Stop(broker_dir.clone());

    let dir = tempfile::tempdir().expect("tempdir");
    let region = common::fs_region_toml("local", &dir.path().join("repo"));
    let reports = dir.path().join("reports");
    let f = Fixture::with(dir, &region, "");
    let mut cfg = std::fs::read_to_string(&f.dr.cfg).expect("config");
    cfg.push_str(&format!(
        "[env.staging]\nallow_overwrite = true\n[env.staging.rabbitmq.mq]\nurl = \"{}\"\nuser = \"{}\"\npassword_env = \"DR_TEST_STAGING_PASSWORD\"\n\
         [drill.stage]\nrabbitmq = [\"mq\"]\nenvironment = \"staging\"\nreport_dir = \"{}\"\n",
        staging.url,
        staging.user,
        reports.display()
    ));
    std::fs::write(&f.dr.cfg, &cfg).expect("config");
    f.dr.dr(&["backup", "rabbitmq"]);
    let probe = Broker {
        url: staging.url.clone(),
        user: staging.user.clone(),
        password: staging.password.clone(),
    };
    let (code, body) = probe.call("GET", "overview", None);
    assert_eq!(code, 200, "staging broker login: {body}");
    let o =
        f.dr.command(&["--json", "drill", "stage"])
            .env("DR_TEST_STAGING_PASSWORD", &staging.password)
            .output()
            .expect("dr drill");
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {} {}", stdout(&o), stderr(&o)));
    assert!(o.status.success(), "{v:#}");
    let src = &v["drill"]["sources"][0];
    assert_eq!(src["kind"], "rabbitmq");
    assert!(
        src["staging"]
            .as_str()
            .is_some_and(|s| s.starts_with("[env.staging.rabbitmq.mq]"))
    );
    assert!(
        v["drill"]["achieved"]["rto_seconds"].as_f64().is_some(),
        "{v:#}"
    );
    // The staging broker holds the production topology (federation URIs
    // pointed at nothing), and it is still running.
    let on_staging = Broker {
        url: staging.url.clone(),
        user: staging.user.clone(),
        password: staging.password.clone(),
    };
    let expected = {
        let all: Value =
            serde_json::from_str(&f.broker.ok("GET", "definitions", None)).expect("json");
        let scoped = dr::rabbitmq::definitions::scope(&all, Some(&f.vhosts));
        dr::rabbitmq::definitions::normalised(&dr::rabbitmq::server::neutralised(&scoped))
    };
    let got = on_staging.scoped(&f.vhosts);
    for kind in [
        "vhosts",
        "queues",
        "exchanges",
        "bindings",
        "policies",
        "parameters",
    ] {
        assert_eq!(got[kind], expected[kind], "{kind}");
    }

    // A staging broker at production's address is refused by the config…
    let at_prod = cfg.replace(&staging.url, &f.broker.url);
    let p = f.dr.path("at-prod.toml");
    std::fs::write(&p, at_prod).expect("config");
    let o = Command::new(common::dr_bin())
        .args([
            "--config",
            p.to_str().expect("utf8"),
            "drill",
            "stage",
            "--dry-run",
        ])
        .output()
        .expect("dr");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("the address of the production broker [rabbitmq.mq]"),
        "{}",
        stderr(&o)
    );
    // …and production reached under another address is refused by its node name.
    let gate = common::Gate::start(common::endpoint_port(&f.broker.url));
    let other = cfg
        .replace(&staging.url, &format!("http://127.0.0.1:{}", gate.port))
        .replace(
            &format!("user = \"{}\"", staging.user),
            &format!("user = \"{}\"", f.broker.user),
        );
    let p = f.dr.path("other-name.toml");
    std::fs::write(&p, other).expect("config");
    let o = Command::new(common::dr_bin())
        .args([
            "--config",
            p.to_str().expect("utf8"),
            "--json",
            "drill",
            "stage",
        ])
        .env("DR_TEST_STAGING_PASSWORD", &f.broker.password)
        .output()
        .expect("dr");
    assert!(!o.status.success());
    let err = stderr(&o) + &stdout(&o);
    assert!(
        err.contains("answers as node")
            && err.contains("[rabbitmq.mq]")
            && err.contains("nothing was touched"),
        "{err}"
    );
}
