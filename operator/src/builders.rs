//! Desired child objects of a `StreamPipeline`, as pure functions.
//!
//! Each builder returns the *partial* object the operator owns, as JSON, for
//! server-side apply: only the fields we set are sent, so defaults the API
//! server adds and fields other managers own are left alone. (Typed k8s-openapi
//! structs would serialise empty required fields such as `spec`, claiming
//! fields we do not mean to own.) Nothing here talks to a cluster.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use kube::{Resource, ResourceExt};
use serde_json::{json, Value};

use streampipe_contract::deploy::{self, env as names};

use crate::crd::{
    RoleSpec, StreamPipeline, TlsSpec, DEFAULT_PUBLISHER_IMAGE, DEFAULT_REDUCER_IMAGE,
};

/// The field manager of every server-side apply by the operator.
pub const FIELD_MANAGER: &str = "streampipe-operator";

/// Port of the reducer's `/metrics`, `/healthz`, `/readyz`.
pub const REDUCER_PORT: i32 = deploy::REDUCER_HTTP_PORT as i32;
/// Port of the publisher's public side (API, streams, page, probes).
pub const PUBLISHER_PORT: i32 = deploy::PUBLISHER_HTTP_PORT as i32;
/// Port of the publisher's internal side (`/metrics`, probes): a container
/// port for Prometheus, never a port of the publisher Service.
pub const PUBLISHER_METRICS_PORT: i32 = deploy::PUBLISHER_METRICS_PORT as i32;
/// Where the Kafka CA bundle is mounted (read-only).
pub const KAFKA_CA_DIR: &str = "/etc/streampipe/kafka-ca";
/// Where the Kafka client certificate and key are mounted (read-only).
pub const KAFKA_CLIENT_DIR: &str = "/etc/streampipe/kafka-client";
/// Where the Redis CA bundle is mounted (read-only).
pub const REDIS_CA_DIR: &str = "/etc/streampipe/redis-ca";
/// Where the Redis client certificate and key are mounted (read-only).
pub const REDIS_CLIENT_DIR: &str = "/etc/streampipe/redis-client";
/// File names inside those directories (volume `items` map the user's keys to them).
const CA_FILE: &str = "ca.crt";
const CERT_FILE: &str = "tls.crt";
const KEY_FILE: &str = "tls.key";
/// Port of the publisher Service.
pub const SERVICE_PORT: i32 = 80;
/// UID the containers run as: the distroless `nonroot` user.
pub const RUN_AS_USER: i64 = 65532;
/// Seconds a pod gets to finish its batch and leave the group on SIGTERM
/// (the contract's value, which the reducer's shutdown deadline also uses).
pub const TERMINATION_GRACE_SECONDS: i64 =
    streampipe_contract::deploy::TERMINATION_GRACE_SECONDS as i64;

/// Which child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Kafka consumer-group members.
    Reducer,
    /// Browser edge.
    Publisher,
}

impl Role {
    /// `reducer` / `publisher`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reducer => "reducer",
            Role::Publisher => "publisher",
        }
    }
}

/// Name of a role's Deployment (and the publisher Service).
pub fn child_name(sp: &StreamPipeline, role: Role) -> String {
    format!("{}-{}", sp.name_any(), role.as_str())
}

/// Name of the pipeline's ConfigMap.
pub fn config_name(sp: &StreamPipeline) -> String {
    format!("{}-config", sp.name_any())
}

/// Labels selecting a role's pods.
pub fn selector_labels(sp: &StreamPipeline, role: Role) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "streampipe".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), sp.name_any()),
        (
            "app.kubernetes.io/component".to_owned(),
            role.as_str().to_owned(),
        ),
    ])
}

/// The reducer pods' label selector as a string (status `.selector`, for
/// the scale subresource and an HPA/KEDA).
pub fn reducer_selector(sp: &StreamPipeline) -> String {
    selector_labels(sp, Role::Reducer)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn object_labels(sp: &StreamPipeline, role: Option<Role>) -> Value {
    let mut l = serde_json::Map::new();
    l.insert("app.kubernetes.io/name".into(), "streampipe".into());
    l.insert("app.kubernetes.io/instance".into(), sp.name_any().into());
    l.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
    if let Some(r) = role {
        l.insert("app.kubernetes.io/component".into(), r.as_str().into());
    }
    Value::Object(l)
}

fn owner_reference(sp: &StreamPipeline) -> Value {
    let oref = sp
        .controller_owner_ref(&())
        .expect("a StreamPipeline read from the API server has a name and uid");
    serde_json::to_value(oref).expect("owner reference serialises")
}

fn metadata(sp: &StreamPipeline, name: String, role: Option<Role>) -> Value {
    json!({
        "name": name,
        "namespace": sp.namespace().unwrap_or_default(),
        "labels": object_labels(sp, role),
        "ownerReferences": [owner_reference(sp)],
    })
}

/// The pipeline's settings shared by both roles, as environment variables
/// (no secrets: those are `secretKeyRef`s in [`env`], files in volumes).
pub fn config_data(sp: &StreamPipeline) -> BTreeMap<String, String> {
    let k = &sp.spec.kafka;
    let name = sp.name_any();
    let mut d = BTreeMap::new();
    let mut set = |key: &str, v: String| {
        d.insert(key.to_owned(), v);
    };
    set(names::PIPELINE, name.clone());
    set(names::KEY_NAMESPACE, sp.namespace().unwrap_or_default());
    set(names::KAFKA_BROKERS, k.bootstrap_servers.clone());
    set(names::DATA_TOPIC, k.data_topic.clone());
    set(names::COMMAND_TOPIC, k.command_topic.clone());
    set(
        names::DEAD_LETTER_TOPIC,
        k.dead_letter_topic
            .clone()
            .unwrap_or_else(|| deploy::default_dead_letter_topic(&name)),
    );
    set(
        names::GROUP,
        k.consumer_group
            .clone()
            .unwrap_or_else(|| deploy::default_group(&name)),
    );
    set(names::LOG_FORMAT, "json".into());
    if let Some(topic) = &k.delivery_log_topic {
        set(names::DELIVERY_LOG_TOPIC, topic.clone());
    }
    // Both roles: the reducers append, the publishers replay (and never
    // conflate) the same markets.
    if let Some(h) = &sp.spec.history {
        set(names::HISTORY_MARKET_PREFIXES, h.market_prefixes.join(","));
        set(names::HISTORY_MAX_LEN, h.max_len.to_string());
    }
    set(names::REDIS_CLUSTER, sp.spec.redis.cluster.to_string());
    // `spec.publisher.auth` (anonymous when absent); keys never go here.
    for (k, v) in crate::publisher_auth::config_entries(sp) {
        set(k, v);
    }
    set(
        names::ALLOWED_ORIGINS,
        sp.spec.publisher.allowed_origins.join(","),
    );
    let protocol = k.protocol();
    if protocol != deploy::SecurityProtocol::Plaintext {
        set(names::KAFKA_SECURITY_PROTOCOL, protocol.as_str().into());
    }
    if let Some(sasl) = k.sasl() {
        set(names::KAFKA_SASL_MECHANISM, sasl.mechanism.clone());
    }
    let files = |tls: &Option<TlsSpec>, ca_dir: &str, client_dir: &str| {
        let ca = tls
            .as_ref()
            .and_then(|t| t.ca.as_ref())
            .map(|_| format!("{ca_dir}/{CA_FILE}"));
        let client = tls.as_ref().and_then(|t| t.client_cert.as_ref()).map(|_| {
            (
                format!("{client_dir}/{CERT_FILE}"),
                format!("{client_dir}/{KEY_FILE}"),
            )
        });
        (ca, client)
    };
    let (ca, client) = files(&k.tls, KAFKA_CA_DIR, KAFKA_CLIENT_DIR);
    if let Some(ca) = ca {
        set(names::KAFKA_TLS_CA_FILE, ca);
    }
    if let Some((cert, key)) = client {
        set(names::KAFKA_TLS_CERT_FILE, cert);
        set(names::KAFKA_TLS_KEY_FILE, key);
    }
    let (ca, client) = files(&sp.spec.redis.tls, REDIS_CA_DIR, REDIS_CLIENT_DIR);
    if let Some(ca) = ca {
        set(names::REDIS_TLS_CA_FILE, ca);
    }
    if let Some((cert, key)) = client {
        set(names::REDIS_TLS_CERT_FILE, cert);
        set(names::REDIS_TLS_KEY_FILE, key);
    }
    d
}

/// The ConfigMap holding [`config_data`].
pub fn config_map(sp: &StreamPipeline) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(sp, config_name(sp), None),
        "data": config_data(sp),
    })
}

/// A stable hash of the configuration, put on the pod template so that a
/// configuration change rolls the pods (env from a ConfigMap is read at start).
pub fn config_hash(sp: &StreamPipeline) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    config_data(sp).hash(&mut h);
    sp.spec.redis.url_secret.name.hash(&mut h);
    sp.spec.redis.url_secret.key.hash(&mut h);
    // Which Secrets and ConfigMaps feed the pods (hashed only when set, so
    // a pipeline without them keeps its hash across operator versions).
    let k = &sp.spec.kafka;
    if let Some(sasl) = k.sasl() {
        serde_json::to_string(sasl).unwrap_or_default().hash(&mut h);
    }
    for t in [&k.tls, &sp.spec.redis.tls].into_iter().flatten() {
        serde_json::to_string(t).unwrap_or_default().hash(&mut h);
    }
    if let Some(p) = &sp.spec.redis.password_secret {
        serde_json::to_string(p).unwrap_or_default().hash(&mut h);
    }
    if let Some(a) = &sp.spec.publisher.auth {
        serde_json::to_string(a).unwrap_or_default().hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

fn secret_env(name: &str, secret: &str, key: &str) -> Value {
    json!({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
}

fn env(sp: &StreamPipeline, role: &RoleSpec, listen_port: i32) -> Value {
    let redis = &sp.spec.redis;
    let mut env = vec![
        json!({"name": names::LISTEN, "value": format!("0.0.0.0:{listen_port}")}),
        secret_env(
            names::REDIS_URL,
            &redis.url_secret.name,
            &redis.url_secret.key,
        ),
    ];
    if let Some(p) = &redis.password_secret {
        env.push(secret_env(names::REDIS_PASSWORD, &p.name, &p.key));
    }
    // Each credential is its own variable straight from its Secret: no
    // `$(VAR)` expansion into a list, so no character of it is special.
    if let Some(c) = sp.spec.kafka.sasl() {
        env.push(secret_env(
            names::KAFKA_SASL_USERNAME,
            &c.secret_name,
            &c.username_key,
        ));
        env.push(secret_env(
            names::KAFKA_SASL_PASSWORD,
            &c.secret_name,
            &c.password_key,
        ));
    }
    for e in &role.env {
        env.push(serde_json::to_value(e).expect("EnvVar serialises"));
    }
    Value::Array(env)
}

/// The read-only volumes (and their mounts) of the TLS material: each
/// user key is mapped to the fixed file name [`config_data`] points at.
fn tls_volumes(sp: &StreamPipeline) -> (Vec<Value>, Vec<Value>) {
    let (mut volumes, mut mounts) = (Vec::new(), Vec::new());
    let mut add = |name: &str, dir: &str, source: Value| {
        volumes.push(json!({"name": name}));
        let v = volumes.last_mut().expect("just pushed");
        for (k, val) in source.as_object().expect("a volume source object") {
            v[k] = val.clone();
        }
        mounts.push(json!({"name": name, "mountPath": dir, "readOnly": true}));
    };
    for (prefix, tls, ca_dir, client_dir) in [
        ("kafka", &sp.spec.kafka.tls, KAFKA_CA_DIR, KAFKA_CLIENT_DIR),
        ("redis", &sp.spec.redis.tls, REDIS_CA_DIR, REDIS_CLIENT_DIR),
    ] {
        let Some(tls) = tls else { continue };
        if let Some(ca) = &tls.ca {
            let items = |key: &str| json!([{"key": key, "path": CA_FILE}]);
            let source = match (&ca.secret, &ca.config_map) {
                (Some(s), _) => {
                    json!({"secret": {"secretName": s.name, "items": items(&s.key)}})
                }
                (None, Some(c)) => {
                    json!({"configMap": {"name": c.name, "items": items(&c.key)}})
                }
                // Refused by `crd::validate` before anything is built.
                (None, None) => continue,
            };
            add(&format!("{prefix}-tls-ca"), ca_dir, source);
        }
        if let Some(c) = &tls.client_cert {
            add(
                &format!("{prefix}-tls-client"),
                client_dir,
                json!({"secret": {"secretName": c.secret_name, "items": [
                    {"key": c.cert_key, "path": CERT_FILE},
                    {"key": c.key_key, "path": KEY_FILE},
                ]}}),
            );
        }
    }
    (volumes, mounts)
}

/// CPU a reducer pod requests when the spec gives no resources: one
/// consumer thread and a Redis writer, mostly waiting on I/O.
pub const DEFAULT_REDUCER_CPU_REQUEST: &str = "100m";
/// Memory a reducer pod requests by default: its market↔channel maps and
/// batches (tens of MB at 10 000 markets) with headroom.
pub const DEFAULT_REDUCER_MEMORY_REQUEST: &str = "128Mi";
/// CPU a publisher pod requests by default: fan-out to its connections.
pub const DEFAULT_PUBLISHER_CPU_REQUEST: &str = "250m";
/// Memory a publisher pod requests by default: ~10 KB per connection plus
/// the pod's 64 MiB outbox budget (213 MB peak measured with 10 000
/// connections under overload, docs/benchmarks.md).
pub const DEFAULT_PUBLISHER_MEMORY_REQUEST: &str = "256Mi";

/// Requests (no limits) for a role whose spec gives no resources, so pods
/// are not BestEffort — the first evicted under node pressure. No limits:
/// a CPU limit throttles fan-out bursts, a memory limit is the user's call.
fn default_resources(role: Role) -> Value {
    let (cpu, memory) = match role {
        Role::Reducer => (DEFAULT_REDUCER_CPU_REQUEST, DEFAULT_REDUCER_MEMORY_REQUEST),
        Role::Publisher => (
            DEFAULT_PUBLISHER_CPU_REQUEST,
            DEFAULT_PUBLISHER_MEMORY_REQUEST,
        ),
    };
    json!({"requests": {"cpu": cpu, "memory": memory}})
}

fn deployment(sp: &StreamPipeline, role: Role) -> Value {
    // The reducer serves metrics on its only port; the publisher on its
    // internal one.
    let (spec, image, port, metrics_port) = match role {
        Role::Reducer => (
            &sp.spec.reducer,
            DEFAULT_REDUCER_IMAGE,
            REDUCER_PORT,
            REDUCER_PORT,
        ),
        Role::Publisher => (
            &sp.spec.publisher.role,
            DEFAULT_PUBLISHER_IMAGE,
            PUBLISHER_PORT,
            PUBLISHER_METRICS_PORT,
        ),
    };
    let selector = selector_labels(sp, role);
    let mut pod_labels = spec.labels.clone();
    pod_labels.extend(selector.clone());
    let mut annotations = spec.annotations.clone();
    annotations.insert("prometheus.io/scrape".into(), "true".into());
    annotations.insert("prometheus.io/port".into(), metrics_port.to_string());
    annotations.insert("prometheus.io/path".into(), "/metrics".into());
    annotations.insert("streampipe.dev/config-hash".into(), config_hash(sp));
    let mut container = json!({
        "name": role.as_str(),
        "image": spec.image.clone().unwrap_or_else(|| image.to_owned()),
        "envFrom": [{"configMapRef": {"name": config_name(sp)}}],
        "env": env(sp, spec, port),
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "failureThreshold": 6},
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "capabilities": {"drop": ["ALL"]},
        },
    });
    if metrics_port != port {
        container["ports"]
            .as_array_mut()
            .expect("ports")
            .push(json!({"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"}));
        container["env"].as_array_mut().expect("env").push(
            json!({"name": names::METRICS_LISTEN, "value": format!("0.0.0.0:{metrics_port}")}),
        );
    }
    container["resources"] = match &spec.resources {
        Some(r) => serde_json::to_value(r).expect("resources serialise"),
        None => default_resources(role),
    };
    let (mut volumes, mut mounts) = tls_volumes(sp);
    if role == Role::Publisher {
        let (v, m) = crate::publisher_auth::volumes(sp);
        volumes.extend(v);
        mounts.extend(m);
        container["env"]
            .as_array_mut()
            .expect("env")
            .extend(crate::publisher_auth::env(sp));
    }
    if !mounts.is_empty() {
        container["volumeMounts"] = Value::Array(mounts);
    }
    let mut d = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(sp, child_name(sp, role), Some(role)),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": annotations},
                "spec": {
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
                    // Neither binary talks to the API server: no token to steal.
                    "automountServiceAccountToken": false,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": RUN_AS_USER,
                        "runAsGroup": RUN_AS_USER,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                },
            },
        },
    });
    if !volumes.is_empty() {
        d["spec"]["template"]["spec"]["volumes"] = Value::Array(volumes);
    }
    d
}

/// The reducer Deployment.
pub fn reducer_deployment(sp: &StreamPipeline) -> Value {
    deployment(sp, Role::Reducer)
}

/// The publisher Deployment.
pub fn publisher_deployment(sp: &StreamPipeline) -> Value {
    deployment(sp, Role::Publisher)
}

/// The publisher Service.
pub fn publisher_service(sp: &StreamPipeline) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(sp, child_name(sp, Role::Publisher), Some(Role::Publisher)),
        "spec": {
            "type": sp.spec.publisher.service_type.clone().unwrap_or_else(|| "ClusterIP".into()),
            "selector": selector_labels(sp, Role::Publisher),
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    })
}

/// The role's NetworkPolicy (`networking.k8s.io/v1`): ingress to the role's
/// pods only on their HTTP ports (publishers: API and streams, and the
/// internal metrics port; reducers: metrics and probes), from anywhere — nothing else listens, and a port
/// opened later by mistake stays closed. Egress is left open: the Kafka and
/// Redis addresses are outside what the operator knows. Policies add up, so
/// a cluster that needs more (a mesh sidecar port) adds its own.
pub fn network_policy(sp: &StreamPipeline, role: Role) -> Value {
    let ports = match role {
        Role::Reducer => json!([{"protocol": "TCP", "port": REDUCER_PORT}]),
        Role::Publisher => json!([
            {"protocol": "TCP", "port": PUBLISHER_PORT},
            {"protocol": "TCP", "port": PUBLISHER_METRICS_PORT},
        ]),
    };
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(sp, child_name(sp, role), Some(role)),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(sp, role)},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": ports}],
        },
    })
}

/// The publishers' PodDisruptionBudget (`policy/v1`): a voluntary eviction
/// takes at most one publisher at a time, so browsers reconnect gradually.
pub fn publisher_pdb(sp: &StreamPipeline) -> Value {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(sp, child_name(sp, Role::Publisher), Some(Role::Publisher)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(sp, Role::Publisher)},
        },
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::StreamPipelineSpec;

    pub(crate) fn pipeline(spec: serde_json::Value) -> StreamPipeline {
        let spec: StreamPipelineSpec = serde_json::from_value(spec).unwrap();
        let mut sp = StreamPipeline::new("odds", spec);
        sp.metadata.namespace = Some("prod".into());
        sp.metadata.uid = Some("1234-uid".into());
        sp.metadata.generation = Some(3);
        sp
    }

    pub(crate) fn sample() -> StreamPipeline {
        pipeline(json!({
            "kafka": {"bootstrapServers": "kafka:9092", "dataTopic": "odds", "commandTopic": "odds.commands",
                      "credentials": {"secretName": "kafka-user"}},
            "redis": {"urlSecret": {"name": "redis", "key": "url"}},
            "reducer": {"replicas": 4, "image": "example/reducer:1", "env": [{"name": "RUST_LOG", "value": "debug"}],
                        "labels": {"team": "trading"}},
            "publisher": {"replicas": 2, "allowedOrigins": ["https://odds.example"]},
        }))
    }

    #[test]
    fn deployments_carry_owner_labels_replicas_and_image() {
        let sp = sample();
        let d = reducer_deployment(&sp);
        assert_eq!(d["metadata"]["name"], "odds-reducer");
        assert_eq!(d["metadata"]["namespace"], "prod");
        let owner = &d["metadata"]["ownerReferences"][0];
        assert_eq!(
            (
                owner["kind"].as_str(),
                owner["uid"].as_str(),
                owner["controller"].as_bool()
            ),
            (Some("StreamPipeline"), Some("1234-uid"), Some(true))
        );
        assert_eq!(d["spec"]["replicas"], 4);
        assert_eq!(
            d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
            "reducer"
        );
        let tpl = &d["spec"]["template"];
        assert_eq!(tpl["metadata"]["labels"]["team"], "trading");
        assert_eq!(
            tpl["metadata"]["labels"]["app.kubernetes.io/instance"],
            "odds"
        );
        let c = &tpl["spec"]["containers"][0];
        assert_eq!(c["image"], "example/reducer:1");
        assert_eq!(
            publisher_deployment(&sp)["spec"]["template"]["spec"]["containers"][0]["image"],
            DEFAULT_PUBLISHER_IMAGE
        );
        assert_eq!(publisher_deployment(&sp)["spec"]["replicas"], 2);
    }

    #[test]
    fn redis_cluster_mode_reaches_both_roles_and_rolls_them() {
        let standalone = sample();
        assert_eq!(
            config_data(&standalone)["STREAMPIPE_REDIS_CLUSTER"],
            "false"
        );
        let mut cluster = sample();
        cluster.spec.redis.cluster = true;
        assert_eq!(config_data(&cluster)["STREAMPIPE_REDIS_CLUSTER"], "true");
        assert_ne!(config_hash(&standalone), config_hash(&cluster));
        // Both roles read the ConfigMap.
        for d in [reducer_deployment(&cluster), publisher_deployment(&cluster)] {
            let c = &d["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(c["envFrom"][0]["configMapRef"]["name"], "odds-config");
        }
    }

    #[test]
    fn pods_are_locked_down_and_probed() {
        let d = publisher_deployment(&sample());
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["runAsUser"], RUN_AS_USER);
        let c = &pod["containers"][0];
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        let ann = &d["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(ann["prometheus.io/scrape"], "true");
        assert_eq!(
            ann["prometheus.io/port"],
            PUBLISHER_METRICS_PORT.to_string()
        );
        // /metrics has its own container port, which the Service leaves out.
        assert_eq!(
            c["ports"],
            json!([
                {"name": "http", "containerPort": PUBLISHER_PORT, "protocol": "TCP"},
                {"name": "metrics", "containerPort": PUBLISHER_METRICS_PORT, "protocol": "TCP"},
            ])
        );
        assert_eq!(
            env_of(&d, names::METRICS_LISTEN)["value"],
            format!("0.0.0.0:{PUBLISHER_METRICS_PORT}")
        );
        let svc = publisher_service(&sample());
        let ports = svc["spec"]["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0]["targetPort"], "http");
        // The reducer keeps one port for everything.
        let r = reducer_deployment(&sample());
        assert_eq!(container(&r)["ports"].as_array().unwrap().len(), 1);
        assert_eq!(
            r["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"],
            REDUCER_PORT.to_string()
        );
        assert_eq!(pod["automountServiceAccountToken"], false);
    }

    #[test]
    fn pods_request_resources_unless_the_spec_says() {
        // Not BestEffort by default (the first pods evicted).
        for (d, cpu, mem) in [
            (
                reducer_deployment(&sample()),
                DEFAULT_REDUCER_CPU_REQUEST,
                DEFAULT_REDUCER_MEMORY_REQUEST,
            ),
            (
                publisher_deployment(&sample()),
                DEFAULT_PUBLISHER_CPU_REQUEST,
                DEFAULT_PUBLISHER_MEMORY_REQUEST,
            ),
        ] {
            let r = &container(&d)["resources"];
            assert_eq!(r["requests"], json!({"cpu": cpu, "memory": mem}));
            assert!(r.get("limits").is_none());
        }
        let mut s = serde_json::to_value(&sample().spec).unwrap();
        s["reducer"]["resources"] = json!({"limits": {"memory": "1Gi"}});
        let d = reducer_deployment(&pipeline(s));
        assert_eq!(
            container(&d)["resources"],
            json!({"limits": {"memory": "1Gi"}})
        );
    }

    #[test]
    fn network_policies_admit_only_the_http_port() {
        for (role, ports) in [
            (Role::Reducer, vec![REDUCER_PORT]),
            (
                Role::Publisher,
                vec![PUBLISHER_PORT, PUBLISHER_METRICS_PORT],
            ),
        ] {
            let np = network_policy(&sample(), role);
            assert_eq!(np["metadata"]["name"], child_name(&sample(), role));
            assert_eq!(
                np["spec"]["podSelector"]["matchLabels"],
                json!(selector_labels(&sample(), role))
            );
            assert_eq!(np["spec"]["policyTypes"], json!(["Ingress"]));
            assert_eq!(
                np["spec"]["ingress"],
                json!([{"ports": ports
                    .iter()
                    .map(|p| json!({"protocol": "TCP", "port": p}))
                    .collect::<Vec<_>>()}])
            );
            assert!(np["metadata"]["ownerReferences"].is_array());
        }
    }

    #[test]
    fn the_history_setting_reaches_both_roles_only_when_set() {
        let d = config_data(&sample());
        assert!(!d.contains_key(names::HISTORY_MARKET_PREFIXES));
        assert!(!d.contains_key(names::HISTORY_MAX_LEN));
        let mut s = serde_json::to_value(&sample().spec).unwrap();
        s["history"] = json!({"marketPrefixes": ["bets.", "acct:"]});
        let d = config_data(&pipeline(s.clone()));
        assert_eq!(d[names::HISTORY_MARKET_PREFIXES], "bets.,acct:");
        assert_eq!(d[names::HISTORY_MAX_LEN], "1000");
        s["history"]["maxLen"] = json!(50);
        assert_eq!(config_data(&pipeline(s))[names::HISTORY_MAX_LEN], "50");
    }

    #[test]
    fn the_delivery_log_topic_reaches_the_pods_only_when_set() {
        assert!(!config_data(&sample()).contains_key(names::DELIVERY_LOG_TOPIC));
        let mut s = serde_json::to_value(&sample().spec).unwrap();
        s["kafka"]["deliveryLogTopic"] = json!("odds.delivered");
        assert_eq!(
            config_data(&pipeline(s))[names::DELIVERY_LOG_TOPIC],
            "odds.delivered"
        );
    }

    #[test]
    fn redis_keys_are_scoped_by_namespace() {
        let sp = sample();
        assert_eq!(
            config_data(&sp)[names::KEY_NAMESPACE],
            sp.namespace().unwrap()
        );
    }

    fn container(d: &Value) -> &Value {
        &d["spec"]["template"]["spec"]["containers"][0]
    }

    fn env_of(d: &Value, n: &str) -> Value {
        container(d)["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("no env {n}"))
    }

    #[test]
    fn credentials_come_from_secrets() {
        let d = reducer_deployment(&sample());
        assert_eq!(
            env_of(&d, names::REDIS_URL)["valueFrom"]["secretKeyRef"],
            json!({"name": "redis", "key": "url"})
        );
        assert_eq!(
            env_of(&d, names::KAFKA_SASL_PASSWORD)["valueFrom"]["secretKeyRef"],
            json!({"name": "kafka-user", "key": "password"})
        );
        assert_eq!(
            env_of(&d, names::KAFKA_SASL_USERNAME)["valueFrom"]["secretKeyRef"],
            json!({"name": "kafka-user", "key": "username"})
        );
        // The deprecated `credentials` means SASL_SSL + its mechanism.
        let data = config_data(&sample());
        assert_eq!(data[names::KAFKA_SECURITY_PROTOCOL], "SASL_SSL");
        assert_eq!(data[names::KAFKA_SASL_MECHANISM], "SCRAM-SHA-512");
        assert_eq!(env_of(&d, "RUST_LOG")["value"], "debug", "user env kept");
        let all = serde_json::to_string(&d).unwrap();
        assert!(!all.contains(names::KAFKA_OPTIONS), "no option list");
        assert!(!all.contains("$("), "no variable expansion");
    }

    fn tls_pipeline() -> StreamPipeline {
        pipeline(json!({
            "kafka": {"bootstrapServers": "kafka:9093", "dataTopic": "odds", "commandTopic": "odds.commands",
                      "securityProtocol": "SSL",
                      "tls": {"ca": {"configMap": {"name": "kafka-ca", "key": "bundle.pem"}},
                              "clientCert": {"secretName": "kafka-client"}}},
            "redis": {"urlSecret": {"name": "redis", "key": "url"},
                      "passwordSecret": {"name": "redis-auth", "key": "password"},
                      "tls": {"ca": {"secret": {"name": "redis-ca", "key": "ca.crt"}}}},
        }))
    }

    #[test]
    fn tls_material_is_mounted_read_only_and_named_by_env() {
        let sp = tls_pipeline();
        let data = config_data(&sp);
        assert_eq!(data[names::KAFKA_SECURITY_PROTOCOL], "SSL");
        assert!(!data.contains_key(names::KAFKA_SASL_MECHANISM));
        assert_eq!(
            data[names::KAFKA_TLS_CA_FILE],
            format!("{KAFKA_CA_DIR}/ca.crt")
        );
        assert_eq!(
            data[names::KAFKA_TLS_KEY_FILE],
            format!("{KAFKA_CLIENT_DIR}/tls.key")
        );
        assert_eq!(
            data[names::REDIS_TLS_CA_FILE],
            format!("{REDIS_CA_DIR}/ca.crt")
        );
        assert!(!data.contains_key(names::REDIS_TLS_CERT_FILE));
        for d in [reducer_deployment(&sp), publisher_deployment(&sp)] {
            let vols = d["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
            assert_eq!(vols.len(), 3);
            let ca = vols.iter().find(|v| v["name"] == "kafka-tls-ca").unwrap();
            assert_eq!(
                ca["configMap"],
                json!({"name": "kafka-ca", "items": [{"key": "bundle.pem", "path": "ca.crt"}]})
            );
            let client = vols
                .iter()
                .find(|v| v["name"] == "kafka-tls-client")
                .unwrap();
            assert_eq!(client["secret"]["secretName"], "kafka-client");
            assert_eq!(
                client["secret"]["items"][1],
                json!({"key": "tls.key", "path": "tls.key"})
            );
            let mounts = container(&d)["volumeMounts"].as_array().unwrap();
            assert_eq!(mounts.len(), 3);
            assert!(mounts.iter().all(|m| m["readOnly"] == true));
            assert_eq!(
                env_of(&d, names::REDIS_PASSWORD)["valueFrom"]["secretKeyRef"],
                json!({"name": "redis-auth", "key": "password"})
            );
        }
        assert_ne!(config_hash(&sp), config_hash(&sample()));
        // No TLS: no volumes at all.
        let plain = reducer_deployment(&sample());
        assert!(plain["spec"]["template"]["spec"].get("volumes").is_none());
        assert!(container(&plain).get("volumeMounts").is_none());
    }

    #[test]
    fn sasl_plaintext_and_sasl_ssl_are_expressible() {
        let sp = pipeline(json!({
            "kafka": {"bootstrapServers": "kafka:9092", "dataTopic": "odds", "commandTopic": "odds.commands",
                      "securityProtocol": "SASL_PLAINTEXT",
                      "sasl": {"secretName": "kafka-user", "mechanism": "SCRAM-SHA-256"}},
            "redis": {"urlSecret": {"name": "redis", "key": "url"}},
        }));
        assert!(crate::crd::validate(&sp.spec).is_empty());
        let data = config_data(&sp);
        assert_eq!(data[names::KAFKA_SECURITY_PROTOCOL], "SASL_PLAINTEXT");
        assert_eq!(data[names::KAFKA_SASL_MECHANISM], "SCRAM-SHA-256");
        let sp = pipeline(json!({
            "kafka": {"bootstrapServers": "kafka:9092", "dataTopic": "odds", "commandTopic": "odds.commands",
                      "sasl": {"secretName": "kafka-user", "mechanism": "PLAIN"},
                      "tls": {"ca": {"secret": {"name": "ca", "key": "ca.crt"}}}},
            "redis": {"urlSecret": {"name": "redis", "key": "url"}},
        }));
        assert_eq!(config_data(&sp)[names::KAFKA_SECURITY_PROTOCOL], "SASL_SSL");
        let plain = pipeline(json!({
            "kafka": {"bootstrapServers": "kafka:9092", "dataTopic": "odds", "commandTopic": "odds.commands"},
            "redis": {"urlSecret": {"name": "redis", "key": "url"}},
        }));
        assert!(!config_data(&plain).contains_key(names::KAFKA_SECURITY_PROTOCOL));
    }

    #[test]
    fn contradictory_security_settings_are_invalid() {
        let bad = [
            json!({"securityProtocol": "SASL_SSL"}),
            json!({"securityProtocol": "PLAINTEXT", "sasl": {"secretName": "u"}}),
            json!({"securityProtocol": "SASL_PLAINTEXT", "sasl": {"secretName": "u"},
                   "tls": {"ca": {"secret": {"name": "ca", "key": "k"}}}}),
            json!({"tls": {"ca": {"secret": {"name": "ca", "key": "k"}, "configMap": {"name": "ca", "key": "k"}}}}),
            json!({"sasl": {"secretName": "u"}, "credentials": {"secretName": "u"}}),
        ];
        for extra in bad {
            let mut kafka = json!({"bootstrapServers": "kafka:9092", "dataTopic": "odds", "commandTopic": "odds.commands"});
            for (k, v) in extra.as_object().unwrap() {
                kafka[k] = v.clone();
            }
            let sp = pipeline(
                json!({"kafka": kafka, "redis": {"urlSecret": {"name": "redis", "key": "url"}}}),
            );
            assert!(!crate::crd::validate(&sp.spec).is_empty(), "{extra}");
        }
    }

    #[test]
    fn config_map_and_hash_follow_the_spec() {
        let sp = sample();
        let cm = config_map(&sp);
        assert_eq!(cm["data"]["STREAMPIPE_DATA_TOPIC"], "odds");
        assert_eq!(cm["data"]["STREAMPIPE_GROUP"], "odds.reducers");
        assert_eq!(
            cm["data"]["STREAMPIPE_DEAD_LETTER_TOPIC"],
            "odds.dead-letter"
        );
        assert_eq!(
            cm["data"]["STREAMPIPE_ALLOWED_ORIGINS"],
            "https://odds.example"
        );
        let mut other = sample();
        other.spec.kafka.data_topic = "odds2".into();
        assert_ne!(
            config_hash(&sp),
            config_hash(&other),
            "a config change rolls the pods"
        );
        assert_eq!(config_hash(&sp), config_hash(&sample()), "stable");
    }

    #[test]
    fn service_and_pdb_select_publishers() {
        let sp = sample();
        let s = publisher_service(&sp);
        assert_eq!(
            s["spec"]["selector"]["app.kubernetes.io/component"],
            "publisher"
        );
        assert_eq!(s["spec"]["ports"][0]["targetPort"], "http");
        assert_eq!(s["spec"]["type"], "ClusterIP");
        assert_eq!(publisher_pdb(&sp)["spec"]["maxUnavailable"], 1);
        assert_eq!(reducer_selector(&sp), "app.kubernetes.io/component=reducer,app.kubernetes.io/instance=odds,app.kubernetes.io/name=streampipe");
    }
}
