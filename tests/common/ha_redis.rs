//! A Redis master (`a`) and its replicas (`b`, `c`, …) under automatic
//! failover: real `redis-server` processes on loopback and one real
//! `dr daemon` per member ([`HaDaemons`]), coordinated through the etcd of
//! `scripts/testenv.sh`.

use std::time::Duration;

use super::ha::{HaDaemons, member_names};
use super::require_env;
use super::topology::{RedisNode, start_redis};

/// Members with their servers and daemons.
pub struct RedisGroup {
    /// The daemons (dropped, so killed, first).
    pub d: HaDaemons,
    /// Each member's server; `None` once killed.
    pub nodes: Vec<Option<RedisNode>>,
    /// Each member's port (kept after a kill).
    pub ports: Vec<u16>,
    /// The servers' files.
    pub dir: tempfile::TempDir,
}

impl std::ops::Deref for RedisGroup {
    type Target = HaDaemons;
    fn deref(&self) -> &HaDaemons {
        &self.d
    }
}

impl std::ops::DerefMut for RedisGroup {
    fn deref_mut(&mut self) -> &mut HaDaemons {
        &mut self.d
    }
}

impl RedisGroup {
    /// A master `a` and `replicas` replicas of it in group `cache`, links
    /// up, configs written, no daemon started.
    pub fn new(replicas: usize) -> RedisGroup {
        RedisGroup::with_etcd(replicas, &require_env("DR_TEST_ETCD_ENDPOINTS", "etcd"))
    }

    /// As [`RedisGroup::new`], through the etcd at `etcd` (a URL).
    pub fn with_etcd(replicas: usize, etcd: &str) -> RedisGroup {
        let dir = tempfile::tempdir().expect("tempdir");
        let names = member_names(replicas + 1);
        let master = start_redis(dir.path(), "a", None);
        let mut nodes = vec![master];
        for n in &names[1..] {
            nodes.push(start_redis(dir.path(), n, Some(nodes[0].port)));
        }
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        let members: String = names
            .iter()
            .zip(&nodes)
            .map(|(n, node)| format!("[ha.redis.cache.member.{n}]\nurl = \"{}\"\n\n", node.url()))
            .collect();
        let g = RedisGroup {
            d: HaDaemons::new(names, etcd, &members),
            nodes: nodes.into_iter().map(Some).collect(),
            ports,
            dir,
        };
        for n in &g.names[1..] {
            g.wait_link(n, "a");
        }
        g
    }

    /// Port of member `name`'s server.
    pub fn port(&self, name: &str) -> u16 {
        self.ports[self.idx(name)]
    }

    /// The live server of member `name`.
    pub fn node(&self, name: &str) -> &RedisNode {
        self.nodes[self.idx(name)]
            .as_ref()
            .unwrap_or_else(|| panic!("{name}'s server was killed"))
    }

    /// A connection to member `name`'s server.
    pub fn conn(&self, name: &str) -> redis::Connection {
        self.node(name).conn()
    }

    /// A field of `INFO replication` of `name`.
    pub fn info(&self, name: &str, key: &str) -> String {
        self.node(name).info(key)
    }

    /// True when `name` replicates from `master` with the link up.
    pub fn follows(&self, name: &str, master: &str) -> bool {
        self.info(name, "master_port") == self.port(master).to_string()
            && self.info(name, "master_link_status") == "up"
    }

    /// Waits until `name` replicates from `master` with the link up.
    pub fn wait_link(&self, name: &str, master: &str) {
        let what = format!("{name} replicates from {master}");
        self.wait_with(self, &what, Duration::from_secs(30), |g| {
            g.follows(name, master)
        });
    }

    /// `SET key value` on `name`: the server's error when it refuses.
    pub fn set(&self, name: &str, key: &str, value: &str) -> Result<(), String> {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{}", self.port(name)))
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query::<()>(&mut c)
            .map_err(|e| e.to_string())
    }

    /// SIGKILLs member `name`'s server.
    pub fn kill_server(&mut self, name: &str) {
        let i = self.idx(name);
        self.nodes[i] = None;
    }

    /// `dr ha status --json --group cache`.
    pub fn status(&self) -> serde_json::Value {
        self.status_json(&["--group", "cache"])
    }

    /// Member `name` as the status shows it.
    pub fn member(&self, s: &serde_json::Value, name: &str) -> serde_json::Value {
        s["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == name))
            .cloned()
            .unwrap_or_default()
    }

    /// Starts every daemon and waits until `a` leads and the others
    /// replicate from it, as their daemons published.
    pub fn start_all(&mut self, timeout: Duration) {
        for n in self.names.clone() {
            self.start_daemon(&n);
        }
        self.wait_with(self, "a leads, the others replicate", timeout, |g| {
            let s = g.status();
            s["leader"] == "a"
                && g.member(&s, "a")["role"] == "master"
                && g.names[1..].iter().all(|n| {
                    let m = g.member(&s, n);
                    m["role"] == "replica" && m["link_up"] == true && m["healthy"] == true
                })
        });
    }
}
