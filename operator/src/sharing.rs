//! Pipelines that share a Kafka consumer group: a warning, not an error.
//!
//! Two pipelines whose reducers join one consumer group split the
//! partitions between them (same data topic) or share one group across two
//! subscriptions (different topics); either way each sees only part of its
//! data, and nothing fails loudly. The schema cannot see other objects, so
//! the reconciler compares the pipeline with the others in its namespace —
//! from the controller's pipeline cache when it has one, else with a LIST —
//! and reports a `SharedConsumerGroup` condition and a Warning Event; the
//! pipeline is still applied (a shared group can be deliberate).

use kube::api::{Api, ListParams};
use kube::ResourceExt;
use streampipe_contract::deploy;
use tracing::warn;

use crate::context::Context;
use crate::crd::StreamPipeline;

/// What a pass learned about the pipeline's consumer group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Sharing {
    /// Not checked this pass (the list failed): keep what the status said.
    #[default]
    Unchecked,
    /// No other pipeline in the namespace uses the group.
    Exclusive,
    /// Other pipelines use it: the message names them.
    Shared(String),
}

/// The consumer group the reducers join (`spec.kafka.consumerGroup` or the default).
pub fn effective_group(sp: &StreamPipeline) -> String {
    sp.spec
        .kafka
        .consumer_group
        .clone()
        .unwrap_or_else(|| deploy::default_group(&sp.name_any()))
}

/// Compares `sp` with `others` (any namespace; itself and pipelines being
/// deleted are skipped).
pub fn sharing<'a>(
    sp: &StreamPipeline,
    others: impl IntoIterator<Item = &'a StreamPipeline>,
) -> Sharing {
    let ns = sp.namespace();
    let name = sp.name_any();
    let group = effective_group(sp);
    let mut same_topic = Vec::new();
    let mut other_topic = Vec::new();
    for o in others {
        if o.namespace() != ns
            || o.name_any() == name
            || o.metadata.deletion_timestamp.is_some()
            || effective_group(o) != group
        {
            continue;
        }
        if o.spec.kafka.data_topic == sp.spec.kafka.data_topic {
            same_topic.push(o.name_any());
        } else {
            other_topic.push(format!(
                "{} (topic {})",
                o.name_any(),
                o.spec.kafka.data_topic
            ));
        }
    }
    if same_topic.is_empty() && other_topic.is_empty() {
        return Sharing::Exclusive;
    }
    same_topic.sort();
    other_topic.sort();
    let mut parts = Vec::new();
    if !same_topic.is_empty() {
        parts.push(format!(
            "{} on the same data topic {}: the reducers of both split its partitions, each pipeline sees only part of the data",
            same_topic.join(", "),
            sp.spec.kafka.data_topic
        ));
    }
    if !other_topic.is_empty() {
        parts.push(format!(
            "{}: one group across different subscriptions, rebalancing together and sharing committed offsets",
            other_topic.join(", ")
        ));
    }
    Sharing::Shared(format!(
        "consumer group {group:?} is also used by pipeline {}; set spec.kafka.consumerGroup to a group of its own",
        parts.join("; and ")
    ))
}

/// The check against the namespace's other pipelines: from the controller's
/// cache, else a LIST; a failed LIST leaves it unchecked (it is a warning).
pub async fn check(sp: &StreamPipeline, ctx: &Context) -> Sharing {
    let Some(ns) = sp.namespace() else {
        return Sharing::Unchecked;
    };
    if let Some(store) = ctx.pipelines(&ns) {
        let all = store.state();
        return sharing(sp, all.iter().map(|p| p.as_ref()));
    }
    let api: Api<StreamPipeline> = Api::namespaced(ctx.client.clone(), &ns);
    match api.list(&ListParams::default()).await {
        Ok(list) => sharing(sp, list.items.iter()),
        Err(e) => {
            warn!(pipeline = %format!("{ns}/{}", sp.name_any()), error = %e, "could not list the pipelines to compare consumer groups");
            Sharing::Unchecked
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sp(ns: &str, name: &str, topic: &str, group: Option<&str>) -> StreamPipeline {
        let mut kafka = json!({"bootstrapServers": "kafka:9092", "dataTopic": topic, "commandTopic": format!("{topic}.commands")});
        if let Some(g) = group {
            kafka["consumerGroup"] = json!(g);
        }
        serde_json::from_value(json!({
            "apiVersion": "streampipe.dev/v1alpha1", "kind": "StreamPipeline",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"kafka": kafka, "redis": {"urlSecret": {"name": "redis", "key": "url"}}},
        }))
        .unwrap()
    }

    #[test]
    fn shared_groups_are_named_and_others_are_not() {
        let a = sp("prod", "a", "odds", Some("g"));
        let b = sp("prod", "b", "odds", Some("g"));
        let c = sp("prod", "c", "scores", Some("g"));
        let d = sp("prod", "d", "odds", None);
        let other_ns = sp("dev", "elsewhere", "odds", Some("g"));
        let all = [a.clone(), b.clone(), c.clone(), d.clone(), other_ns.clone()];
        let Sharing::Shared(m) = sharing(&a, &all) else {
            panic!("a shares g")
        };
        assert!(
            m.contains("\"g\"") && m.contains("b on the same data topic odds"),
            "{m}"
        );
        assert!(m.contains("c (topic scores)"), "{m}");
        assert!(
            !m.contains("elsewhere"),
            "another namespace is not compared: {m}"
        );
        // d's default group d.reducers is its own; a default can collide too.
        assert_eq!(sharing(&d, &all), Sharing::Exclusive);
        let explicit = sp("prod", "x", "odds", Some("d.reducers"));
        assert!(matches!(sharing(&d, [&explicit]), Sharing::Shared(_)));
        // Alone (itself in the list) is exclusive; a pipeline being deleted does not count.
        assert_eq!(sharing(&a, [&a]), Sharing::Exclusive);
        let mut gone = b.clone();
        gone.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
        );
        assert_eq!(sharing(&a, [&gone]), Sharing::Exclusive);
    }
}
