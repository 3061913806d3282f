//! The deployment contract, checked from both sides: every environment
//! variable the operator puts on a pod (its own env list and the shared
//! ConfigMap) is one the binary in that pod reads, as its clap definition
//! says. Pure: no broker, Redis or API server.

use std::collections::BTreeSet;

use clap::CommandFactory;
use serde_json::{json, Value};
use streampipe_contract::deploy::env as names;
use streampipe_operator::builders::{config_data, publisher_deployment, reducer_deployment};
use streampipe_operator::crd::{StreamPipeline, StreamPipelineSpec};

/// The variables a binary reads, from its clap definition.
fn reads(cmd: clap::Command) -> BTreeSet<String> {
    cmd.get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

fn pipeline(kafka: Value, redis: Value) -> StreamPipeline {
    let spec: StreamPipelineSpec = serde_json::from_value(json!({
        "kafka": kafka, "redis": redis,
        // A user's own variable is the user's business, not the contract's.
        "reducer": {"env": [{"name": "RUST_LOG", "value": "debug"}]},
    }))
    .unwrap();
    let mut sp = StreamPipeline::new("odds", spec);
    sp.metadata.namespace = Some("prod".into());
    sp.metadata.uid = Some("uid".into());
    sp
}

/// Pipelines that together use every security option the CRD has.
fn pipelines() -> Vec<StreamPipeline> {
    let base = json!({"bootstrapServers": "kafka:9092", "dataTopic": "feed", "commandTopic": "feed.commands"});
    let with = |extra: Value| {
        let mut k = base.clone();
        for (key, v) in extra.as_object().unwrap() {
            k[key] = v.clone();
        }
        k
    };
    let redis_plain = json!({"urlSecret": {"name": "redis", "key": "url"}});
    let redis_tls = json!({"urlSecret": {"name": "redis", "key": "url"}, "cluster": true,
        "passwordSecret": {"name": "redis-auth", "key": "password"},
        "tls": {"ca": {"configMap": {"name": "redis-ca", "key": "ca.crt"}},
                "clientCert": {"secretName": "redis-client"}}});
    vec![
        pipeline(base.clone(), redis_plain.clone()),
        pipeline(
            with(json!({"credentials": {"secretName": "kafka-user"}})),
            redis_plain,
        ),
        pipeline(
            with(json!({"securityProtocol": "SASL_SSL",
                "sasl": {"secretName": "kafka-user", "mechanism": "SCRAM-SHA-256"},
                "tls": {"ca": {"secret": {"name": "kafka-ca", "key": "ca.crt"}},
                        "clientCert": {"secretName": "kafka-client"}}})),
            redis_tls,
        ),
    ]
}

fn env_names(deployment: &Value) -> BTreeSet<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .filter(|n| n != "RUST_LOG")
        .collect()
}

#[test]
fn the_operator_sets_only_variables_the_binaries_read() {
    let reducer = reads(streampipe_reducer::cli::Args::command());
    let publisher = reads(streampipe_publisher::cli::Args::command());
    let either: BTreeSet<String> = reducer.union(&publisher).cloned().collect();
    let mut seen = BTreeSet::new();
    for sp in pipelines() {
        for (role, deployment, read) in [
            ("reducer", reducer_deployment(&sp), &reducer),
            ("publisher", publisher_deployment(&sp), &publisher),
        ] {
            for name in env_names(&deployment) {
                assert!(
                    read.contains(&name),
                    "{role} is given {name} but reads no such variable"
                );
                seen.insert(name);
            }
        }
        // The ConfigMap goes to both roles; each key must be read by one.
        for name in config_data(&sp).into_keys() {
            assert!(
                either.contains(&name),
                "ConfigMap key {name} is read by neither binary"
            );
            seen.insert(name);
        }
    }
    // Settings that must reach both roles are read by both.
    for name in [
        names::PIPELINE,
        names::KAFKA_BROKERS,
        names::COMMAND_TOPIC,
        names::REDIS_URL,
        names::REDIS_CLUSTER,
        names::REDIS_PASSWORD,
        names::REDIS_TLS_CA_FILE,
        names::REDIS_TLS_CERT_FILE,
        names::REDIS_TLS_KEY_FILE,
        names::KAFKA_SECURITY_PROTOCOL,
        names::KAFKA_SASL_MECHANISM,
        names::KAFKA_SASL_USERNAME,
        names::KAFKA_SASL_PASSWORD,
        names::KAFKA_TLS_CA_FILE,
        names::KAFKA_TLS_CERT_FILE,
        names::KAFKA_TLS_KEY_FILE,
        names::LISTEN,
    ] {
        assert!(seen.contains(name), "the test pipelines never set {name}");
        assert!(reducer.contains(name), "reducer does not read {name}");
        assert!(publisher.contains(name), "publisher does not read {name}");
    }
}

#[test]
fn the_dead_letter_default_is_the_binaries_default() {
    let sp = pipelines().remove(0);
    let data = config_data(&sp);
    let binary =
        streampipe_reducer::Config::new("kafka:9092", "odds", "redis://r:6379").dead_letter_topic;
    assert_eq!(Some(data[names::DEAD_LETTER_TOPIC].clone()), binary);
    assert_eq!(
        data[names::GROUP],
        streampipe_reducer::Config::new("k", "odds", "r").group
    );
}
