//! The validate phase: everything about a pipeline the API server would
//! reject only later, on a child — checked before anything is applied, so
//! the user gets a `Degraded` condition and a Warning Event naming the
//! field instead of a child that fails to apply on every retry.
//!
//! On top of [`crate::crd::validate`] (the spec's own rules): the name
//! (children are called `<name>-publisher` etc., and the Service name must
//! be a DNS-1035 label of at most 63 characters: so at most 53, no dot),
//! pod label and annotation keys and values, env var names, resource
//! quantities, and the syntax of the Kafka and image fields — the same
//! patterns the CRD schema carries ([`crate::crd::TOPIC_PATTERN`] etc.), so
//! a pipeline created before the schema had them, or on a server that
//! skipped them, is judged the same way, with a sharper message.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use crate::crd::{
    validate as validate_spec, Invalid, RoleSpec, StreamPipeline, BOOTSTRAP_SERVERS_PATTERN,
    IMAGE_MAX, IMAGE_PATTERN, TOPIC_MAX, TOPIC_PATTERN,
};
use crate::quantity;
use kube::ResourceExt;
use regex::Regex;

fn compiled(pattern: &str) -> Regex {
    Regex::new(pattern).expect("the schema's patterns compile")
}

static BOOTSTRAP: LazyLock<Regex> = LazyLock::new(|| compiled(BOOTSTRAP_SERVERS_PATTERN));
static TOPIC: LazyLock<Regex> = LazyLock::new(|| compiled(TOPIC_PATTERN));
static IMAGE: LazyLock<Regex> = LazyLock::new(|| compiled(IMAGE_PATTERN));

/// Longest repository name of an image (distribution's limit).
const IMAGE_NAME_MAX: usize = 255;

/// One `host:port` entry of a bootstrap list (spaces already trimmed).
fn server_problem(entry: &str) -> Option<String> {
    let Some((host, port)) = entry.rsplit_once(':') else {
        return Some("not host:port".into());
    };
    let port_ok = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && !port.starts_with('0')
        && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
    if !port_ok {
        return Some(format!("port {port:?} is not a number 1–65535"));
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner
            .parse::<Ipv6Addr>()
            .is_err()
            .then(|| format!("{host} is not an IPv6 address"));
    }
    let not_a_host = || {
        Some(format!(
            "host {host:?} is not a hostname, IPv4 address or [IPv6] address (IPv6 goes in brackets)"
        ))
    };
    if host.is_empty() || host.len() > 253 {
        return not_a_host();
    }
    let labels_ok = host.split('.').all(|l| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_'))
    });
    if !labels_ok {
        return not_a_host();
    }
    let numeric = host
        .split('.')
        .all(|l| l.bytes().all(|b| b.is_ascii_digit()));
    if numeric && host.parse::<Ipv4Addr>().is_err() {
        return Some(format!("host {host:?} is not an IPv4 address"));
    }
    None
}

/// Why `servers` is not a bootstrap-server list (`host:port[,host:port...]`).
pub fn bootstrap_servers_problem(servers: &str) -> Option<String> {
    if servers.contains(';') {
        return Some(format!(
            "{servers:?}: separate the servers with ',', not ';'"
        ));
    }
    if servers.contains("://") {
        return Some(format!(
            "{servers:?}: give host:port without a scheme, not a URL"
        ));
    }
    for (i, entry) in servers.split(',').enumerate() {
        let entry = entry.trim_matches(' ');
        if let Some(p) = server_problem(entry) {
            return Some(format!("entry {i} ({entry:?}): {p}"));
        }
    }
    // Everything the schema's pattern rejects is caught above; this is the
    // guarantee that both agree.
    (!BOOTSTRAP.is_match(servers)).then(|| format!("{servers:?} is not host:port[,host:port...]"))
}

/// Why `topic` is not a Kafka topic name.
pub fn topic_problem(topic: &str) -> Option<String> {
    if topic.is_empty() || topic.len() > TOPIC_MAX as usize {
        return Some(format!("{topic:?} must be 1–{TOPIC_MAX} characters long"));
    }
    if topic == "." || topic == ".." {
        return Some(format!("{topic:?} is not allowed as a Kafka topic name"));
    }
    if !TOPIC.is_match(topic) {
        return Some(format!(
            "{topic:?} may contain only ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    None
}

/// Why `group` is not a consumer group id.
pub fn group_problem(group: &str) -> Option<String> {
    if group.trim().is_empty() {
        return Some("must not be blank (leave it out for the default <name>.reducers)".into());
    }
    (group.len() > TOPIC_MAX as usize).then(|| format!("longer than {TOPIC_MAX} characters"))
}

/// Why `image` is not a container image reference.
pub fn image_problem(image: &str) -> Option<String> {
    if image.is_empty() || image.len() > IMAGE_MAX as usize {
        return Some(format!("{image:?} must be 1–{IMAGE_MAX} characters long"));
    }
    let (name, _digest) = image.split_once('@').unwrap_or((image, ""));
    let name = match name.rsplit_once(':') {
        Some((n, tag)) if !tag.contains('/') => n,
        _ => name,
    };
    if !IMAGE.is_match(image) {
        // The first component may be a registry host (any case); the path may not.
        let path = name.split_once('/').map_or(name, |(_, p)| p);
        let hint = if path.bytes().any(|b| b.is_ascii_uppercase()) {
            "the repository path must be lower case"
        } else {
            "expected [registry[:port]/]path[:tag][@sha256:<64 hex>], path components of [a-z0-9] joined by '.', '_', '__' or '-', the tag [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
        };
        return Some(format!(
            "{image:?} is not a container image reference: {hint}"
        ));
    }
    (name.len() > IMAGE_NAME_MAX).then(|| {
        format!("{image:?}: the repository name is longer than {IMAGE_NAME_MAX} characters")
    })
}

/// The syntax of the Kafka fields and the images.
fn syntax(out: &mut Vec<Invalid>, sp: &StreamPipeline) {
    let k = &sp.spec.kafka;
    if let Some(message) = bootstrap_servers_problem(&k.bootstrap_servers) {
        out.push(Invalid {
            field: "spec.kafka.bootstrapServers",
            message,
        });
    }
    let topics = [
        ("spec.kafka.dataTopic", Some(&k.data_topic)),
        ("spec.kafka.commandTopic", Some(&k.command_topic)),
        ("spec.kafka.deadLetterTopic", k.dead_letter_topic.as_ref()),
    ];
    for (field, topic) in topics {
        if let Some(message) = topic.and_then(|t| topic_problem(t)) {
            out.push(Invalid { field, message });
        }
    }
    if let Some(message) = k.consumer_group.as_deref().and_then(group_problem) {
        out.push(Invalid {
            field: "spec.kafka.consumerGroup",
            message,
        });
    }
    for (field, role) in [
        ("spec.reducer.image", &sp.spec.reducer),
        ("spec.publisher.image", &sp.spec.publisher.role),
    ] {
        if let Some(message) = role.image.as_deref().and_then(image_problem) {
            out.push(Invalid { field, message });
        }
    }
}

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
    syntax(&mut out, sp);
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
    if let Some(message) = crate::publisher_auth::problem(sp) {
        out.push(Invalid {
            field: "spec.publisher.auth",
            message,
        });
    }
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

    fn with_kafka(kafka: serde_json::Value, reducer_image: Option<&str>) -> StreamPipeline {
        let mut k = json!({"bootstrapServers": "kafka:9092", "dataTopic": "odds", "commandTopic": "odds.commands"});
        for (key, v) in kafka.as_object().unwrap() {
            k[key] = v.clone();
        }
        let reducer = match reducer_image {
            Some(i) => json!({"image": i}),
            None => json!({}),
        };
        let mut sp = pipeline("odds", reducer);
        sp.spec.kafka = serde_json::from_value(k).unwrap();
        sp
    }

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// (input, accepted, the schema's pattern alone rejects it too)
    const BOOTSTRAP_CASES: &[(&str, bool, bool)] = &[
        ("kafka:9092", true, true),
        ("kafka-0.kafka:9092,10.0.0.1:9093,[::1]:9092", true, true),
        ("kafka:9092, kafka2:9092", true, true),
        ("b-1.msk.eu-west-1.amazonaws.com:9096", true, true),
        ("my_broker:1,[2001:db8::1]:65535", true, true),
        ("kafka:9092;kafka2:9092", false, true),
        ("http://kafka:9092", false, true),
        ("kafka", false, true),
        ("", false, true),
        ("kafka:0", false, true),
        ("kafka:65536", false, true),
        ("kafka:09092", false, true),
        (":9092", false, true),
        ("kafka:9092,", false, true),
        ("kafka :9092", false, true),
        ("::1:9092", false, true),
        ("-kafka:9092", false, true),
        ("[zz::1]:9092", false, true),
        // Only the operator's check sees these.
        ("[1:2]:9092", false, false),
        ("999.0.0.1:9092", false, false),
    ];

    #[test]
    fn bootstrap_server_lists() {
        let schema = compiled(BOOTSTRAP_SERVERS_PATTERN);
        for &(input, ok, schema_agrees) in BOOTSTRAP_CASES {
            let problem = bootstrap_servers_problem(input);
            assert_eq!(problem.is_none(), ok, "{input:?}: {problem:?}");
            if schema_agrees {
                assert_eq!(schema.is_match(input), ok, "schema pattern on {input:?}");
            }
            let sp = with_kafka(json!({"bootstrapServers": input}), None);
            let want: Vec<&str> = if ok {
                vec![]
            } else {
                vec!["spec.kafka.bootstrapServers"]
            };
            assert_eq!(fields(&sp), want, "{input:?}");
        }
        let semi = bootstrap_servers_problem("kafka:9092;kafka2:9092").unwrap();
        assert!(semi.contains("not ';'"), "{semi}");
        let url = bootstrap_servers_problem("http://kafka:9092").unwrap();
        assert!(url.contains("without a scheme"), "{url}");
        let long = format!("{}.example:9092", "a".repeat(64));
        assert!(
            bootstrap_servers_problem(&long).is_some(),
            "a DNS label is at most 63"
        );
    }

    #[test]
    fn topic_names() {
        let schema = compiled(TOPIC_PATTERN);
        let longest = "t".repeat(249);
        let too_long = "t".repeat(250);
        let cases: &[(&str, bool)] = &[
            ("odds", true),
            ("odds.commands", true),
            ("A-b_c.d", true),
            ("_x", true),
            ("...", true),
            (&longest, true),
            (".", false),
            ("..", false),
            ("", false),
            ("a b", false),
            ("odds/x", false),
            ("ödds", false),
            (&too_long, false),
        ];
        for &(t, ok) in cases {
            assert_eq!(topic_problem(t).is_none(), ok, "{t:?}");
            if t.len() <= 249 {
                assert_eq!(schema.is_match(t), ok, "schema pattern on {t:?}");
            }
            for field in ["dataTopic", "commandTopic", "deadLetterTopic"] {
                // Keep the three topics distinct so only the syntax is judged.
                let mut k = json!({"dataTopic": "d", "commandTopic": "c", "deadLetterTopic": "dl"});
                k[field] = json!(t);
                let sp = with_kafka(k, None);
                let f = format!("spec.kafka.{field}");
                let want: Vec<&str> = if ok { vec![] } else { vec![f.as_str()] };
                assert_eq!(fields(&sp), want, "{field} = {t:?}");
            }
        }
        assert!(topic_problem("..").unwrap().contains("not allowed"));
    }

    #[test]
    fn consumer_groups() {
        let schema = compiled(crate::crd::GROUP_PATTERN);
        for (g, ok) in [
            ("g", true),
            ("odds.reducers", true),
            ("", false),
            ("   ", false),
            ("\t", false),
        ] {
            assert_eq!(group_problem(g).is_none(), ok, "{g:?}");
            assert_eq!(schema.is_match(g), ok);
            let sp = with_kafka(json!({"consumerGroup": g}), None);
            let want: Vec<&str> = if ok {
                vec![]
            } else {
                vec!["spec.kafka.consumerGroup"]
            };
            assert_eq!(fields(&sp), want, "{g:?}");
        }
        // Left out, the default applies: fine.
        assert!(fields(&with_kafka(json!({}), None)).is_empty());
    }

    #[test]
    fn image_references() {
        let schema = compiled(IMAGE_PATTERN);
        let pinned = format!("registry.example.com:5000/team/app@{DIGEST}");
        let tagged_pinned = format!("repo/app:v1.2@{DIGEST}");
        let long_tag = format!("busybox:{}", "t".repeat(128));
        let too_long_tag = format!("busybox:{}", "t".repeat(129));
        let long_name = format!("{}/app:1", "a".repeat(260));
        let cases: &[(&str, bool)] = &[
            ("busybox", true),
            ("busybox:1.36", true),
            ("ghcr.io/streampipe/streampipe-reducer:0.1.0", true),
            ("localhost:5000/a/b:tag", true),
            ("Registry.Example.com/app:1", true),
            ("a__b/c-d--e.f:_T", true),
            (&pinned, true),
            (&tagged_pinned, true),
            (&long_tag, true),
            ("UPPER/Case:1", false),
            ("Busybox", false),
            ("busybox:", false),
            ("busybox:-bad", false),
            ("busybox@sha256:abc", false),
            ("a//b", false),
            ("-a/b", false),
            ("a/b_/c", false),
            (" busybox", false),
            ("busybox:1 ", false),
            ("https://ghcr.io/app:1", false),
            (&too_long_tag, false),
            (&long_name, false),
        ];
        for &(i, ok) in cases {
            assert_eq!(
                image_problem(i).is_none(),
                ok,
                "{i:?}: {:?}",
                image_problem(i)
            );
            if i != long_name {
                assert_eq!(schema.is_match(i), ok, "schema pattern on {i:?}");
            }
            let sp = with_kafka(json!({}), Some(i));
            let want: Vec<&str> = if ok {
                vec![]
            } else {
                vec!["spec.reducer.image"]
            };
            assert_eq!(fields(&sp), want, "{i:?}");
        }
        assert!(image_problem("UPPER/Case:1")
            .unwrap()
            .contains("lower case"));
    }

    #[test]
    fn the_crd_schema_carries_the_patterns() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(StreamPipeline::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"];
        let kafka = &spec["kafka"]["properties"];
        assert_eq!(
            kafka["bootstrapServers"]["pattern"],
            BOOTSTRAP_SERVERS_PATTERN
        );
        for t in ["dataTopic", "commandTopic", "deadLetterTopic"] {
            assert_eq!(kafka[t]["pattern"], TOPIC_PATTERN, "{t}");
            assert_eq!(kafka[t]["maxLength"], 249, "{t}");
        }
        assert_eq!(kafka["consumerGroup"]["pattern"], crate::crd::GROUP_PATTERN);
        for role in ["reducer", "publisher"] {
            assert_eq!(
                spec[role]["properties"]["image"]["pattern"], IMAGE_PATTERN,
                "{role}"
            );
            assert_eq!(
                spec[role]["properties"]["image"]["maxLength"], IMAGE_MAX,
                "{role}"
            );
        }
    }
}
