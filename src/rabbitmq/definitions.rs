//! The definitions document of RabbitMQ (`GET /api/definitions`): selecting
//! the configured vhosts, counting and naming its items, and comparing two
//! documents item by item. Comparisons name items and fields, never values:
//! a user's `password_hash` is a secret.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{Map, Value};

/// The kinds of item in a definitions document, in the order RabbitMQ
/// applies them on import.
pub const KINDS: &[&str] = &[
    "users",
    "vhosts",
    "permissions",
    "topic_permissions",
    "parameters",
    "global_parameters",
    "policies",
    "queues",
    "exchanges",
    "bindings",
];

/// Global parameters that identify one broker rather than describe its
/// topology: not backed up, compared or restored.
const BROKER_IDENTITY: &[&str] = &["internal_cluster_id"];

/// The kinds that live inside a vhost (keyed by its `vhost` field).
const PER_VHOST: &[&str] = &[
    "permissions",
    "topic_permissions",
    "parameters",
    "policies",
    "queues",
    "exchanges",
    "bindings",
];

fn items<'a>(defs: &'a Value, kind: &str) -> &'a [Value] {
    defs.get(kind)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn text<'a>(item: &'a Value, field: &str) -> &'a str {
    item.get(field).and_then(Value::as_str).unwrap_or("")
}

/// What is backed up of an export: every kind (and the version fields),
/// without broker-identity parameters; with `vhosts`, only those vhosts,
/// what is in them, and the users with permissions in them. Errors name a
/// listed vhost the broker does not have.
pub fn select(defs: &Value, vhosts: Option<&[String]>) -> Result<Value, String> {
    if !defs.is_object() {
        return Err("the definitions are not a JSON object".into());
    }
    if let Some(wanted) = vhosts {
        let present: BTreeSet<&str> = items(defs, "vhosts")
            .iter()
            .map(|v| text(v, "name"))
            .collect();
        let missing: Vec<String> = wanted
            .iter()
            .filter(|v| !present.contains(v.as_str()))
            .map(|v| format!("{v:?}"))
            .collect();
        if !missing.is_empty() {
            let have: Vec<String> = present.iter().map(|v| format!("{v:?}")).collect();
            return Err(format!(
                "the broker has no vhost {}; it has {}",
                missing.join(", "),
                have.join(", ")
            ));
        }
    }
    Ok(scope(defs, vhosts))
}

/// [`select`] without the check that the vhosts exist: the part of a live
/// broker that a snapshot of `vhosts` is compared with.
pub fn scope(defs: &Value, vhosts: Option<&[String]>) -> Value {
    let mut out = Map::new();
    if let Some(obj) = defs.as_object() {
        for (k, v) in obj {
            // rabbit_version, rabbitmq_version, product_name, …
            if !KINDS.contains(&k.as_str()) && v.is_string() {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    for kind in KINDS {
        let mut list: Vec<Value> = items(defs, kind).to_vec();
        if *kind == "global_parameters" {
            list.retain(|p| !BROKER_IDENTITY.contains(&text(p, "name")));
        }
        out.insert(kind.to_string(), Value::Array(list));
    }
    let Some(wanted) = vhosts else {
        return Value::Object(out);
    };
    let keep = |v: &Value| wanted.iter().any(|w| w == text(v, "vhost"));
    let mut users = BTreeSet::new();
    for kind in PER_VHOST {
        if let Some(Value::Array(list)) = out.get_mut(*kind) {
            list.retain(keep);
            if kind.ends_with("permissions") {
                users.extend(list.iter().map(|p| text(p, "user").to_string()));
            }
        }
    }
    if let Some(Value::Array(list)) = out.get_mut("vhosts") {
        list.retain(|v| wanted.iter().any(|w| w == text(v, "name")));
    }
    if let Some(Value::Array(list)) = out.get_mut("users") {
        list.retain(|u| users.contains(text(u, "name")));
    }
    out.insert("global_parameters".into(), Value::Array(Vec::new()));
    Value::Object(out)
}

/// The vhost part of an item's name.
fn in_vhost(item: &Value, name: &str) -> String {
    format!("[{}] {name}", text(item, "vhost"))
}

/// The name that identifies `item` of `kind` (unique within the kind).
pub fn identity(kind: &str, item: &Value) -> String {
    match kind {
        "users" | "vhosts" | "global_parameters" => text(item, "name").to_string(),
        "permissions" => in_vhost(item, &format!("user {:?}", text(item, "user"))),
        "topic_permissions" => in_vhost(
            item,
            &format!(
                "user {:?} exchange {:?}",
                text(item, "user"),
                text(item, "exchange")
            ),
        ),
        "parameters" => in_vhost(
            item,
            &format!("{} {:?}", text(item, "component"), text(item, "name")),
        ),
        "policies" | "queues" | "exchanges" => in_vhost(item, &format!("{:?}", text(item, "name"))),
        "bindings" => {
            let args = item
                .get("arguments")
                .filter(|a| a.as_object().is_some_and(|o| !o.is_empty()))
                .map(|a| format!(" arguments {}", canonical(a)))
                .unwrap_or_default();
            in_vhost(
                item,
                &format!(
                    "{:?} -> {} {:?} key {:?}{args}",
                    text(item, "source"),
                    text(item, "destination_type"),
                    text(item, "destination"),
                    text(item, "routing_key"),
                ),
            )
        }
        _ => canonical(item),
    }
}

/// JSON with object keys sorted, whatever the map order of the build.
pub fn canonical(v: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let b: BTreeMap<&String, Value> = m.iter().map(|(k, v)| (k, sorted(v))).collect();
                Value::Object(b.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(v).to_string()
}

/// Items of each kind by identity.
pub fn index(defs: &Value) -> BTreeMap<&'static str, BTreeMap<String, &Value>> {
    KINDS
        .iter()
        .map(|k| {
            let m = items(defs, k).iter().map(|i| (identity(k, i), i)).collect();
            (*k, m)
        })
        .collect()
}

/// Number of items of each kind.
pub fn counts(defs: &Value) -> BTreeMap<String, u64> {
    KINDS
        .iter()
        .map(|k| (k.to_string(), items(defs, k).len() as u64))
        .collect()
}

/// Identities of the items of each kind, sorted.
pub fn names(defs: &Value) -> BTreeMap<String, Vec<String>> {
    index(defs)
        .into_iter()
        .map(|(k, m)| (k.to_string(), m.into_keys().collect()))
        .collect()
}

/// `defs` with every kind's items sorted by identity and object keys sorted:
/// two exports of the same topology are equal as values and as text.
pub fn normalised(defs: &Value) -> Value {
    let mut out = Map::new();
    for kind in KINDS {
        let mut list: Vec<(String, Value)> = items(defs, kind)
            .iter()
            .map(|i| {
                (
                    identity(kind, i),
                    serde_json::from_str(&canonical(i)).unwrap_or(Value::Null),
                )
            })
            .collect();
        list.sort_by(|a, b| a.0.cmp(&b.0));
        out.insert(
            kind.to_string(),
            Value::Array(list.into_iter().map(|(_, v)| v).collect()),
        );
    }
    Value::Object(out)
}

/// One item that differs.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Changed {
    /// Its identity.
    pub item: String,
    /// The fields whose values differ (values are not shown: some are secret).
    pub fields: Vec<String>,
}

/// Differences of one kind between a snapshot and a live broker.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct KindDiff {
    /// In the snapshot, not on the broker: a restore creates them.
    pub added: Vec<String>,
    /// On the broker, not in the snapshot: a restore leaves them (it never deletes).
    pub removed: Vec<String>,
    /// On both, different: a restore sets them as in the snapshot.
    pub changed: Vec<Changed>,
}

impl KindDiff {
    /// No difference.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Differences by kind (kinds without any are left out).
pub fn diff(snapshot: &Value, live: &Value) -> BTreeMap<String, KindDiff> {
    let (a, b) = (index(snapshot), index(live));
    let mut out = BTreeMap::new();
    for kind in KINDS {
        let (sa, sb) = (&a[kind], &b[kind]);
        let mut d = KindDiff::default();
        for (id, item) in sa {
            match sb.get(id) {
                None => d.added.push(id.clone()),
                Some(other) => {
                    let fields = changed_fields(item, other);
                    if !fields.is_empty() {
                        d.changed.push(Changed {
                            item: id.clone(),
                            fields,
                        });
                    }
                }
            }
        }
        d.removed = sb
            .keys()
            .filter(|id| !sa.contains_key(*id))
            .cloned()
            .collect();
        if !d.is_empty() {
            out.insert(kind.to_string(), d);
        }
    }
    out
}

fn changed_fields(a: &Value, b: &Value) -> Vec<String> {
    let empty = Map::new();
    let (ma, mb) = (
        a.as_object().unwrap_or(&empty),
        b.as_object().unwrap_or(&empty),
    );
    let keys: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
    keys.into_iter()
        .filter(|k| ma.get(*k) != mb.get(*k))
        .map(|k| k.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "rabbitmq_version": "3.10.8",
            "users": [
                {"name": "app", "password_hash": "SECRET", "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["monitoring"], "limits": {}},
                {"name": "other", "password_hash": "X", "tags": [], "limits": {}}
            ],
            "vhosts": [{"name": "a"}, {"name": "b"}],
            "permissions": [
                {"user": "app", "vhost": "a", "configure": ".*", "write": ".*", "read": ".*"},
                {"user": "other", "vhost": "b", "configure": "", "write": "", "read": ".*"}
            ],
            "topic_permissions": [],
            "parameters": [],
            "global_parameters": [{"name": "internal_cluster_id", "value": "rabbitmq-cluster-id-x"}, {"name": "cluster_tags", "value": []}],
            "policies": [{"vhost": "a", "name": "ttl", "pattern": "^t", "apply-to": "queues", "definition": {"message-ttl": 1000}, "priority": 0}],
            "queues": [{"name": "q", "vhost": "a", "durable": true, "auto_delete": false, "arguments": {"x-queue-type": "quorum"}}],
            "exchanges": [{"name": "x", "vhost": "b", "type": "topic", "durable": true, "auto_delete": false, "internal": false, "arguments": {}}],
            "bindings": [{"source": "x", "vhost": "b", "destination": "q", "destination_type": "queue", "routing_key": "k", "arguments": {}}]
        })
    }

    #[test]
    fn select_keeps_the_listed_vhosts_and_their_users() {
        let all = select(&sample(), None).expect("all");
        assert_eq!(
            counts(&all)["global_parameters"],
            1,
            "cluster id is dropped"
        );
        let a = select(&sample(), Some(&["a".to_string()])).expect("a");
        let c = counts(&a);
        assert_eq!(
            (c["vhosts"], c["users"], c["queues"], c["exchanges"]),
            (1, 1, 1, 0)
        );
        assert_eq!(names(&a)["users"], vec!["app".to_string()]);
        let e = select(&sample(), Some(&["nope".to_string()])).expect_err("missing");
        assert!(e.contains("\"nope\""), "{e}");
    }

    #[test]
    fn diff_names_items_and_fields_never_values() {
        let snap = select(&sample(), None).expect("select");
        let mut live = snap.clone();
        live["users"][0]["password_hash"] = json!("CHANGED");
        live["queues"] = json!([]);
        live["vhosts"]
            .as_array_mut()
            .expect("array")
            .push(json!({"name": "c"}));
        let d = diff(&snap, &live);
        assert_eq!(d["queues"].added, vec!["[a] \"q\"".to_string()]);
        assert_eq!(d["vhosts"].removed, vec!["c".to_string()]);
        assert_eq!(
            d["users"].changed,
            vec![Changed {
                item: "app".into(),
                fields: vec!["password_hash".into()]
            }]
        );
        assert_eq!(d.len(), 3);
        let shown = serde_json::to_string(&d).expect("json");
        assert!(!shown.contains("SECRET") && !shown.contains("CHANGED"));
        assert!(diff(&snap, &snap).is_empty());
    }

    #[test]
    fn normalised_ignores_order() {
        let a = select(&sample(), None).expect("select");
        let mut b = a.clone();
        b["users"].as_array_mut().expect("array").reverse();
        assert_eq!(normalised(&a), normalised(&b));
    }
}
