//! The validate phase: everything about a pipeline the API server would
//! reject only later, on a child — checked before anything is applied, so
//! the user gets a `Degraded` condition and a Warning Event naming the
//! field instead of a child that fails to apply on every retry.
//!
//! On top of [`crate::crd::validate`] (the spec's own rules): the name
//! (children are called `<name>-publisher` etc., and the Service name must
//! be a DNS-1035 label of at most 63 characters: so at most 53, no dot),
//! pod label and annotation keys and values, env var names, and resource
//! quantities.

use crate::crd::{validate as validate_spec, Invalid, RoleSpec, StreamPipeline};
use crate::quantity;
use kube::ResourceExt;

/// Longest pipeline name: its longest child suffix is `-publisher` (10).
pub const MAX_NAME: usize = 53;

fn is_dns_label(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|part| {
            let b = part.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// A label value or the name part of a qualified name: ≤ 63, alphanumeric
/// at both ends, `-_.` inside.
fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    b.is_empty()
        || (b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')))
}

fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_dns_subdomain) && !name.is_empty() && is_label_value(name)
}

fn is_env_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && !b[0].is_ascii_digit()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn role(out: &mut Vec<Invalid>, fields: [&'static str; 4], r: &RoleSpec) {
    let [labels, annotations, env, resources] = fields;
    for (k, v) in &r.labels {
        if !is_qualified_name(k) {
            out.push(Invalid {
                field: labels,
                message: format!("key {k:?} is not a valid label key (optional DNS prefix/, then ≤ 63 of [A-Za-z0-9-_.], alphanumeric at both ends)"),
            });
        }
        if !is_label_value(v) {
            out.push(Invalid {
                field: labels,
                message: format!("value {v:?} of {k:?} is not a valid label value (≤ 63 of [A-Za-z0-9-_.], alphanumeric at both ends)"),
            });
        }
    }
    for k in r.annotations.keys() {
        if !is_qualified_name(k) {
            out.push(Invalid {
                field: annotations,
                message: format!("key {k:?} is not a valid annotation key"),
            });
        }
    }
    for e in &r.env {
        if !is_env_name(&e.name) {
            out.push(Invalid {
                field: env,
                message: format!(
                    "{:?} is not a valid environment variable name ([-._a-zA-Z][-._a-zA-Z0-9]*)",
                    e.name
                ),
            });
        }
    }
    if let Some(res) = &r.resources {
        for (part, map) in [("limits", &res.limits), ("requests", &res.requests)] {
            for (k, q) in map.iter().flatten() {
                if !quantity::is_valid(&q.0) {
                    out.push(Invalid {
                        field: resources,
                        message: format!("{part}.{k}: {:?} is not a quantity", q.0),
                    });
                }
            }
        }
    }
}

/// Every problem of `sp` that would otherwise surface only on a child.
pub fn validate(sp: &StreamPipeline) -> Vec<Invalid> {
    let mut out = Vec::new();
    let name = sp.name_any();
    if !is_dns_label(&name, MAX_NAME) {
        out.push(Invalid {
            field: "metadata.name",
            message: format!("{name:?} must be at most {MAX_NAME} characters of [a-z0-9-], start with a letter and end alphanumeric (no dots): it names the Service <name>-publisher, a DNS label"),
        });
    }
    out.extend(validate_spec(&sp.spec));
    role(
        &mut out,
        [
            "spec.reducer.labels",
            "spec.reducer.annotations",
            "spec.reducer.env",
            "spec.reducer.resources",
        ],
        &sp.spec.reducer,
    );
    role(
        &mut out,
        [
            "spec.publisher.labels",
            "spec.publisher.annotations",
            "spec.publisher.env",
            "spec.publisher.resources",
        ],
        &sp.spec.publisher.role,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pipeline(name: &str, reducer: serde_json::Value) -> StreamPipeline {
        serde_json::from_value(json!({
            "apiVersion": "streampipe.dev/v1alpha1", "kind": "StreamPipeline",
            "metadata": {"name": name, "namespace": "prod"},
            "spec": {
                "kafka": {"bootstrapServers": "kafka:9092", "dataTopic": "odds", "commandTopic": "odds.commands"},
                "redis": {"urlSecret": {"name": "redis", "key": "url"}},
                "reducer": reducer,
            }
        }))
        .unwrap()
    }

    fn fields(sp: &StreamPipeline) -> Vec<&'static str> {
        validate(sp).iter().map(|i| i.field).collect()
    }

    #[test]
    fn a_good_pipeline_passes() {
        let sp = pipeline(
            "odds",
            json!({"labels": {"team": "a", "example.com/tier": "gold", "empty": ""},
                   "env": [{"name": "RUST_LOG", "value": "x"}, {"name": "my.var-1", "value": "y"}],
                   "resources": {"limits": {"cpu": "0.5", "memory": "1024Mi"}}}),
        );
        assert!(validate(&sp).is_empty(), "{:?}", validate(&sp));
    }

    #[test]
    fn names_that_cannot_name_the_children_are_invalid() {
        assert_eq!(
            fields(&pipeline(&"a".repeat(54), json!({}))),
            vec!["metadata.name"]
        );
        assert!(fields(&pipeline(&"a".repeat(53), json!({}))).is_empty());
        assert_eq!(
            fields(&pipeline("odds.v2", json!({}))),
            vec!["metadata.name"]
        );
    }

    #[test]
    fn bad_labels_env_names_and_quantities_name_the_field() {
        let sp = pipeline(
            "odds",
            json!({"labels": {"bad key!": "x", "ok": "-bad-"},
                   "env": [{"name": "1ST", "value": "x"}, {"name": "A B", "value": "y"}],
                   "resources": {"requests": {"cpu": "lots"}}}),
        );
        assert_eq!(
            fields(&sp),
            vec![
                "spec.reducer.labels",
                "spec.reducer.labels",
                "spec.reducer.env",
                "spec.reducer.env",
                "spec.reducer.resources"
            ]
        );
        assert!(validate(&sp)[4].message.contains("lots"));
    }
}
