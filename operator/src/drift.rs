//! Whether a live child already is what the operator would apply, judged
//! the way server-side apply works — so that a pass either writes because
//! something really changed, or not at all.
//!
//! Two checks, both needed:
//! - **everything desired is live** ([`contains`]): extra live fields are
//!   server defaults or other managers' business, and lists of objects are
//!   matched element by element regardless of position, so a foreign env
//!   var next to ours is not drift (a PATCH would not remove it anyway);
//! - **everything we own is still desired** ([`owned_within`]): a field our
//!   field manager applied before but no longer sends (an env var dropped
//!   from the spec) is drift, and the next apply removes it.
//!
//! Desired values are compared in the server's normal form: quantities are
//! normalised before (see [`crate::quantity`]), numbers compare by value,
//! and an empty string, list or map equals an absent one.

use serde_json::{Map, Value};

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Whether every field of `desired` is in `live` with the same value.
pub fn contains(desired: &Value, live: &Value) -> bool {
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d.iter().all(|(k, dv)| match l.get(k) {
            Some(lv) => contains(dv, lv),
            None => is_empty(dv),
        }),
        (Value::Array(d), Value::Array(l)) if d.iter().all(Value::is_object) => {
            // A list of objects (env, containers, ports): each desired
            // element is in the live list; foreign elements may be there too.
            d.iter().all(|de| l.iter().any(|le| contains(de, le)))
        }
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(a, b)| contains(a, b))
        }
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Null, b) => is_empty(b),
        (a, b) => a == b,
    }
}

/// The `fieldsV1` of what `manager` owns through server-side apply, merged
/// over its entries (`None`: it owns nothing).
pub fn owned_fields(live: &Value, manager: &str) -> Option<Value> {
    let entries = live["metadata"]["managedFields"].as_array()?;
    let mut owned: Option<Value> = None;
    for e in entries {
        if e["manager"] == manager && e["operation"] == "Apply" {
            let f = e["fieldsV1"].clone();
            owned = Some(match owned {
                None => f,
                Some(mut o) => {
                    merge(&mut o, &f);
                    o
                }
            });
        }
    }
    owned
}

fn merge(into: &mut Value, other: &Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, other) {
        for (k, v) in b {
            match a.get_mut(k) {
                Some(existing) => merge(existing, v),
                None => {
                    a.insert(k.clone(), v.clone());
                }
            }
        }
    }
}

fn key_matches(key: &Map<String, Value>, element: &Value) -> bool {
    key.iter().all(|(k, v)| match (element.get(k), v) {
        (Some(Value::Number(a)), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Some(e), v) => e == v,
        (None, _) => false,
    })
}

/// Whether every field in the `fieldsV1` set `owned` is still in `desired`.
///
/// `f:name` is a map field, `k:{...}` a list element by its keys, `v:...` a
/// set element, `.` the element itself.
pub fn owned_within(owned: &Value, desired: &Value) -> bool {
    let Some(fields) = owned.as_object() else {
        return true;
    };
    fields.iter().all(|(path, sub)| {
        if path == "." {
            return true;
        }
        if let Some(name) = path.strip_prefix("f:") {
            return match desired.get(name) {
                Some(v) if !v.is_null() => owned_within(sub, v),
                _ => false,
            };
        }
        if let Some(key) = path.strip_prefix("k:") {
            let Ok(Value::Object(key)) = serde_json::from_str::<Value>(key) else {
                return true;
            };
            return desired
                .as_array()
                .and_then(|a| a.iter().find(|e| key_matches(&key, e)))
                .is_some_and(|e| owned_within(sub, e));
        }
        if let Some(value) = path.strip_prefix("v:") {
            let Ok(value) = serde_json::from_str::<Value>(value) else {
                return true;
            };
            return desired.as_array().is_some_and(|a| a.contains(&value));
        }
        // Positional (`i:`) and unknown entries: atomic lists compare in `contains`.
        true
    })
}

/// Whether applying `desired` would change nothing `manager` cares about.
pub fn in_sync(desired: &Value, live: &Value, manager: &str) -> bool {
    contains(desired, live)
        && owned_fields(live, manager).is_none_or(|owned| owned_within(&owned, desired))
}

/// Lists the operator defines whole (a foreign element there is not left
/// alone but removed), as paths into the object: the Service's ports, whose
/// names must be unique — an edited port left next to ours would make every
/// apply fail on the duplicate name.
pub const WHOLE_LISTS: &[(&str, &[&str])] = &[("Service", &["spec", "ports"])];

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, p| v.get(*p))
}

/// A JSON merge patch that sets every [`WHOLE_LISTS`] list of `kind` where
/// `live` has elements `desired` lacks to the desired list, or `None`.
///
/// Server-side apply cannot do this: force takes over only *conflicting*
/// fields, so an element another manager also set (with the same values)
/// stays shared and survives our apply without it. A merge patch replaces
/// a list whole.
pub fn whole_list_repair(kind: &str, desired: &Value, live: &Value) -> Option<Value> {
    let mut patch = Value::Object(Map::new());
    let mut needed = false;
    for (k, path) in WHOLE_LISTS {
        if *k != kind {
            continue;
        }
        let (Some(Value::Array(want)), Some(Value::Array(have))) =
            (at(desired, path), at(live, path))
        else {
            continue;
        };
        if have.iter().any(|h| !want.iter().any(|w| contains(w, h))) {
            needed = true;
            let mut slot = &mut patch;
            for p in *path {
                slot = &mut slot[*p];
            }
            *slot = Value::Array(want.clone());
        }
    }
    needed.then_some(patch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(env: Value) -> Value {
        json!({"metadata": {"name": "d", "labels": {"a": "b"}},
               "spec": {"replicas": 2, "template": {"spec": {"containers": [
                   {"name": "c", "image": "i", "env": env}]}}}})
    }

    /// What the API server records for our apply of [`deployment`].
    fn managed(env_names: &[&str]) -> Value {
        let mut env = serde_json::Map::new();
        for n in env_names {
            env.insert(
                format!("k:{{\"name\":\"{n}\"}}"),
                json!({".": {}, "f:name": {}, "f:value": {}}),
            );
        }
        json!([{"manager": "op", "operation": "Apply", "fieldsV1": {
            "f:metadata": {"f:labels": {"f:a": {}}},
            "f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {
                "k:{\"name\":\"c\"}": {".": {}, "f:name": {}, "f:image": {}, "f:env": env}}}}}}},
            {"manager": "kubectl-edit", "operation": "Update", "fieldsV1": {"f:spec": {"f:paused": {}}}}])
    }

    #[test]
    fn server_defaults_and_foreign_fields_are_not_drift() {
        let desired = deployment(json!([{"name": "A", "value": "1"}]));
        let mut live = deployment(json!([
            {"name": "A", "value": "1"},
            {"name": "FOREIGN", "value": "x"}
        ]));
        live["metadata"]["managedFields"] = managed(&["A"]);
        live["spec"]["progressDeadlineSeconds"] = json!(600);
        live["spec"]["paused"] = json!(false);
        live["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = json!("Always");
        assert!(in_sync(&desired, &live, "op"));
    }

    #[test]
    fn changed_values_are_drift() {
        let desired = deployment(json!([{"name": "A", "value": "1"}]));
        let mut live = deployment(json!([{"name": "A", "value": "2"}]));
        live["metadata"]["managedFields"] = managed(&["A"]);
        assert!(!in_sync(&desired, &live, "op"));
        let mut live = desired.clone();
        live["spec"]["replicas"] = json!(3);
        assert!(!in_sync(&desired, &live, "op"));
    }

    #[test]
    fn a_field_we_applied_before_and_dropped_is_drift() {
        let desired = deployment(json!([{"name": "A", "value": "1"}]));
        let mut live = deployment(json!([
            {"name": "A", "value": "1"},
            {"name": "OLD", "value": "x"}
        ]));
        live["metadata"]["managedFields"] = managed(&["A", "OLD"]);
        assert!(!in_sync(&desired, &live, "op"), "OLD is ours: remove it");
        live["metadata"]["managedFields"] = managed(&["A"]);
        assert!(in_sync(&desired, &live, "op"), "not ours: leave it");
    }

    #[test]
    fn numbers_and_empty_values_compare_in_normal_form() {
        assert!(contains(&json!({"a": 1, "b": ""}), &json!({"a": 1.0})));
        assert!(!contains(&json!({"a": "x"}), &json!({})));
        assert!(contains(
            &json!({"l": ["x", "y"]}),
            &json!({"l": ["x", "y"]})
        ));
        assert!(!contains(&json!({"l": ["x"]}), &json!({"l": ["x", "y"]})));
    }

    #[test]
    fn an_edited_service_port_is_replaced_whole() {
        let desired = json!({"spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}});
        let live = json!({"spec": {"ports": [{"name": "http", "port": 81, "protocol": "TCP", "targetPort": "http"}]}});
        assert!(!contains(&desired, &live));
        let patch = whole_list_repair("Service", &desired, &live).expect("replace the edited port");
        assert_eq!(patch, json!({"spec": {"ports": desired["spec"]["ports"]}}));
        let same = json!({"spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}]}});
        assert!(whole_list_repair("Service", &desired, &same).is_none());
        assert!(whole_list_repair("Deployment", &desired, &live).is_none());
    }
}
