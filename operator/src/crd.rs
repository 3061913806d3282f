//! The `StreamPipeline` custom resource (`streampipe.dev/v1alpha1`).
//!
//! Defined in Rust; `crdgen` writes `crds/streampipeline.yaml` from these
//! types (a test fails when the committed file differs). The schema carries
//! what it can check per field (required fields, ranges, lengths, and
//! patterns: topic names, bootstrap-server lists, image references, Secret
//! names); the cross-field rules are checked in reconcile ([`validate`],
//! [`crate::validate`], which also re-checks the patterns) and reported as a
//! `Degraded` condition plus a Warning Event naming the field. No CEL
//! (`x-kubernetes-validations`): kubectl refuses a CRD with it on the
//! Kubernetes 1.20 the project supports (see docs/operations.md).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use streampipe_contract::deploy::SecurityProtocol;

/// Default container image of the reducer.
pub const DEFAULT_REDUCER_IMAGE: &str = "ghcr.io/streampipe/streampipe-reducer:0.1.0";
/// Default container image of the publisher.
pub const DEFAULT_PUBLISHER_IMAGE: &str = "ghcr.io/streampipe/streampipe-publisher:0.1.0";

/// Kafka bootstrap servers (schema `pattern`): `host:port[,host:port...]`,
/// host a hostname, IPv4 address or `[IPv6]`, port 1–65535, no scheme, `,`
/// between entries (spaces around them allowed, as librdkafka skips them).
/// RE2 and ECMA-262 alike: the API server compiles it with Go's `regexp`.
/// [`crate::validate`] checks the same pattern, plus label lengths and the
/// IP addresses, at reconcile.
pub const BOOTSTRAP_SERVERS_PATTERN: &str = concat!(
    r"^ *",
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])",
    r":(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])",
    r" *(?:, *",
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])",
    r":(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])",
    r" *)*$"
);

/// A Kafka topic name: 1–249 of `[A-Za-z0-9._-]`, but not `.` or `..`
/// (Kafka's own rule), written without look-ahead (RE2 has none).
pub const TOPIC_PATTERN: &str = r"^(?:[A-Za-z0-9._-]*[A-Za-z0-9_-][A-Za-z0-9._-]*|\.{3,})$";

/// Longest Kafka topic name.
pub const TOPIC_MAX: u32 = 249;

/// A consumer group, when given: not blank (some non-space character).
pub const GROUP_PATTERN: &str = r"\S";

/// A container image reference (the distribution/reference grammar):
/// `[registry[:port]/]path[:tag][@sha256:digest]`, the path components
/// lower case, the tag `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub const IMAGE_PATTERN: &str = concat!(
    r"^(?:(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])(?:\.(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]))*(?::[0-9]+)?/)?",
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*",
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?",
    r"(?:@sha256:[0-9a-f]{64})?$"
);

/// Longest image reference the schema admits (name ≤ 255, tag, digest).
pub const IMAGE_MAX: u32 = 512;

/// A streaming pipeline: reducers consuming a partitioned Kafka topic into
/// Redis, and publishers streaming it to browsers.
// Several `printcolumn(type_ = ...)` entries look like duplicated attributes to clippy.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "streampipe.dev",
    version = "v1alpha1",
    kind = "StreamPipeline",
    namespaced,
    shortname = "spl",
    category = "streampipe",
    doc = "A streampipe pipeline: Kafka → reducers → Redis → publishers → browsers",
    status = "StreamPipelineStatus",
    derive = "PartialEq",
    scale(
        spec_replicas_path = ".spec.reducer.replicas",
        status_replicas_path = ".status.reducer.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.ready"),
    printcolumn(
        name = "Reducers",
        type_ = "string",
        json_path = ".status.reducer.summary"
    ),
    printcolumn(
        name = "Publishers",
        type_ = "string",
        json_path = ".status.publisher.summary"
    ),
    printcolumn(
        name = "Partitions",
        type_ = "integer",
        json_path = ".status.partitions"
    ),
    printcolumn(name = "Lag", type_ = "integer", json_path = ".status.totalLag"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct StreamPipelineSpec {
    /// Where the data and commands are.
    pub kafka: KafkaSpec,
    /// Where state and pub/sub live.
    pub redis: RedisSpec,
    /// The reducers (Kafka consumer-group members).
    #[serde(default)]
    pub reducer: RoleSpec,
    /// The publishers (browser edge).
    #[serde(default)]
    pub publisher: PublisherSpec,
    /// Reducer autoscaling from Kafka consumer lag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    /// Event history for market classes where the latest value is not
    /// enough (bet settlements, account messages): off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<HistorySpec>,
}

/// Event history: every applied update of the matching markets is kept in
/// a capped Redis Stream per market, and a client resuming with `since`
/// gets the events it missed in order (docs/protocol.md, "Event history").
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistorySpec {
    /// Market-id prefixes whose markets keep a history (`*`: every market).
    #[schemars(
        length(min = 1, max = 64),
        inner(
            length(min = 1, max = 128),
            regex(pattern = r"^(\*|[A-Za-z0-9._:-]+)$")
        )
    )]
    pub market_prefixes: Vec<String>,
    /// Entries kept per market (approximate: `XADD MAXLEN ~`); Redis memory
    /// per market is about this times an entry's size.
    #[serde(default = "history_max_len")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_len: u64,
}

fn history_max_len() -> u64 {
    streampipe_contract::history::DEFAULT_MAX_LEN
}

/// Reducer autoscaling from Kafka consumer lag (HPA semantics, capped at the
/// partition count).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// Turns autoscaling on; off, `kubectl scale` sets the reducers.
    #[serde(default)]
    pub enabled: bool,
    /// Fewest reducers (0 allows scale to zero below the activation threshold).
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 10000))]
    pub min_replicas: i32,
    /// Most reducers; the partition count caps it further.
    #[serde(default = "ten")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_replicas: i32,
    /// Target lag (records) per reducer.
    #[serde(default = "thousand")]
    #[schemars(range(min = 1))]
    pub lag_threshold: i64,
    /// Total lag below which a pipeline with `minReplicas: 0` runs no reducer.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub activation_lag_threshold: i64,
    /// Scale-up stabilization window (seconds).
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_up_stabilization_seconds: u32,
    /// Scale-down stabilization window (seconds).
    #[serde(default = "three_hundred")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: u32,
    /// How often lag is read from Kafka (seconds).
    #[serde(default = "ten_u32")]
    #[schemars(range(min = 1, max = 3600))]
    pub poll_interval_seconds: u32,
    /// Round replicas up to a divisor of the partition count, so every
    /// reducer owns as many partitions as the others.
    #[serde(default)]
    pub even_partition_spread: bool,
    /// How a partition without a committed offset counts: `earliest` (all
    /// retained records are lag, as the reducers start there) or `latest` (none).
    #[serde(default = "earliest")]
    #[schemars(regex(pattern = r"^(earliest|latest)$"))]
    pub uncommitted_offset_policy: String,
    /// How the reducer count is sized: `lag` (`ceil(totalLag /
    /// lagThreshold)`) or `drainTime` (the fewest reducers that keep up
    /// with the measured arrivals and drain the backlog within
    /// `targetDrainSeconds`, from measured throughput; stops at a
    /// saturated downstream and leaves stuck partitions out).
    #[serde(default = "lag_policy")]
    #[schemars(regex(pattern = r"^(lag|drainTime)$"))]
    pub policy: String,
    /// `drainTime`: the backlog must be gone within this many seconds.
    #[serde(default = "sixty")]
    #[schemars(range(min = 1, max = 86400))]
    pub target_drain_seconds: u32,
    /// Never run more reducers than partitions that have lag (stuck ones
    /// left out): a partition is read by one reducer, so beyond that count
    /// a scale step buys a rebalance and no throughput (KEDA's
    /// `limitToPartitionsWithLag`). Either policy; `minReplicas` still holds.
    #[serde(default)]
    pub limit_to_partitions_with_lag: bool,
}

impl Default for AutoscalingSpec {
    /// The CRD's defaults, from the same serde defaults an empty
    /// `spec.autoscaling: {}` gets (so they are written once).
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every field has a default")
    }
}

/// `spec.autoscaling.policy` of the lag-threshold rule (the default).
pub const POLICY_LAG: &str = "lag";
/// `spec.autoscaling.policy` of the drain-time rule.
pub const POLICY_DRAIN_TIME: &str = "drainTime";

fn lag_policy() -> String {
    POLICY_LAG.into()
}
fn sixty() -> u32 {
    60
}

fn ten() -> i32 {
    10
}
fn thousand() -> i64 {
    1000
}
fn three_hundred() -> u32 {
    300
}
fn ten_u32() -> u32 {
    10
}
fn earliest() -> String {
    "earliest".into()
}

/// Kafka settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSpec {
    /// Bootstrap servers, `host:port[,host:port...]` (hostname, IPv4 or
    /// `[IPv6]`; no scheme, `,` between entries).
    #[schemars(length(min = 1, max = 4096), regex(pattern = BOOTSTRAP_SERVERS_PATTERN))]
    pub bootstrap_servers: String,
    /// The partitioned data topic (key = market id).
    #[schemars(length(min = 1, max = TOPIC_MAX), regex(pattern = TOPIC_PATTERN))]
    pub data_topic: String,
    /// The command topic; must have the data topic's partition count.
    #[schemars(length(min = 1, max = TOPIC_MAX), regex(pattern = TOPIC_PATTERN))]
    pub command_topic: String,
    /// Dead-letter topic for malformed records [default: `<name>.dead-letter`,
    /// the binaries' default].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = TOPIC_MAX), regex(pattern = TOPIC_PATTERN))]
    pub dead_letter_topic: Option<String>,
    /// Delivery log topic: the publishers record every update they hand to
    /// browsers there (market, version, ts, connections, pod) for audit;
    /// no log when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = TOPIC_MAX), regex(pattern = TOPIC_PATTERN))]
    pub delivery_log_topic: Option<String>,
    /// Consumer group of the reducers [default: `<name>.reducers`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = GROUP_PATTERN))]
    pub consumer_group: Option<String>,
    /// Deprecated: SASL credentials, always over TLS. Same as
    /// `securityProtocol: SASL_SSL` with `sasl` holding these fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<KafkaCredentials>,
    /// `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL` [default:
    /// `SASL_SSL` with `sasl`, `SSL` with only `tls`, else `PLAINTEXT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(PLAINTEXT|SSL|SASL_PLAINTEXT|SASL_SSL)$"))]
    pub security_protocol: Option<String>,
    /// SASL authentication; the user name and password come from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<KafkaCredentials>,
    /// TLS: the CA bundle that signs the brokers' certificates and an
    /// optional client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// SASL credentials by Secret reference.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaCredentials {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub secret_name: String,
    /// Key holding the user name.
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub username_key: String,
    /// Key holding the password.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub password_key: String,
    /// SASL mechanism.
    #[serde(default = "default_mechanism")]
    #[schemars(regex(pattern = r"^(PLAIN|SCRAM-SHA-256|SCRAM-SHA-512)$"))]
    pub mechanism: String,
}

fn default_username_key() -> String {
    "username".into()
}
fn default_password_key() -> String {
    "password".into()
}
fn default_mechanism() -> String {
    "SCRAM-SHA-512".into()
}

/// TLS material of a Kafka or Redis connection, by reference. Pods get it
/// as read-only mounted files, the operator's lag reader through the API.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// CA bundle (PEM) that signs the server certificates [default: the
    /// image's system CAs].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaSource>,
    /// Client certificate and key (PEM) for mutual TLS, from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<ClientCertRef>,
}

/// Where a CA bundle is: a key of a Secret or of a ConfigMap (exactly one).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaSource {
    /// A Secret holding the bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretKeyRef>,
    /// A ConfigMap holding the bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<SecretKeyRef>,
}

/// A Secret with a client certificate and its key (a `kubernetes.io/tls`
/// Secret by default).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertRef {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub secret_name: String,
    /// Key holding the certificate (chain).
    #[serde(default = "default_cert_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub cert_key: String,
    /// Key holding the private key.
    #[serde(default = "default_key_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key_key: String,
}

fn default_cert_key() -> String {
    "tls.crt".into()
}
fn default_key_key() -> String {
    "tls.key".into()
}

impl KafkaSpec {
    /// The SASL settings: `sasl`, or the deprecated `credentials`.
    pub fn sasl(&self) -> Option<&KafkaCredentials> {
        self.sasl.as_ref().or(self.credentials.as_ref())
    }

    /// The effective security protocol (see `securityProtocol`).
    pub fn protocol(&self) -> SecurityProtocol {
        if let Some(p) = self
            .security_protocol
            .as_deref()
            .and_then(|p| p.parse().ok())
        {
            return p;
        }
        match (self.sasl().is_some(), self.tls.is_some()) {
            (true, _) => SecurityProtocol::SaslSsl,
            (false, true) => SecurityProtocol::Ssl,
            (false, false) => SecurityProtocol::Plaintext,
        }
    }
}

/// Redis settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// The Secret key holding the Redis URL (it may contain a password);
    /// for a Redis Cluster, a comma-separated list of seed node URLs.
    pub url_secret: SecretKeyRef,
    /// The Redis is a Redis Cluster (≥ 7): reducers group their scripts by
    /// hash slot and publish with `SPUBLISH`, publishers hold one sharded
    /// subscription per master. Standalone Redis when absent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
    /// A Secret key holding the Redis password; it overrides one in the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<SecretKeyRef>,
    /// TLS files for a `rediss://` URL (the URL's scheme turns TLS on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// A key of a Secret in the resource's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Key in the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// Settings of one role's Deployment.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleSpec {
    /// Container image [default: the project's image of this version]:
    /// `[registry[:port]/]path[:tag][@sha256:digest]`, the path lower case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = IMAGE_MAX), regex(pattern = IMAGE_PATTERN))]
    pub image: Option<String>,
    /// Replicas. Reducers beyond the partition count would sit idle.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: i32,
    /// Compute resources of the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Extra labels for the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations for the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn one() -> i32 {
    1
}

impl Default for RoleSpec {
    fn default() -> Self {
        RoleSpec {
            image: None,
            replicas: 1,
            resources: None,
            env: Vec::new(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }
}

/// The publishers: a role plus its Service.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublisherSpec {
    /// Deployment settings.
    #[serde(flatten)]
    pub role: RoleSpec,
    /// Origins allowed to open streams; empty allows all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    /// Service type (`ClusterIP`, `NodePort`, `LoadBalancer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(ClusterIP|NodePort|LoadBalancer)$"))]
    pub service_type: Option<String>,
    /// How browsers authenticate (docs/security.md). Absent: anonymous
    /// (public odds, per-IP limits), as before tokens existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<PublisherAuthSpec>,
}

/// `spec.publisher.auth`: signed tokens (JWT) or explicit anonymous mode.
/// Keys come only from Secrets: the HS256 secret as a `secretKeyRef`
/// variable, public keys as read-only files.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublisherAuthSpec {
    /// `token` (every call and stream carries a signed token) or
    /// `anonymous` (public odds).
    #[schemars(regex(pattern = r"^(token|anonymous)$"))]
    pub mode: String,
    /// HS256 shared secret (≥ 32 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret: Option<SecretKeyRef>,
    /// RS256 public key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rs256_public_key: Option<SecretKeyRef>,
    /// ES256 public key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub es256_public_key: Option<SecretKeyRef>,
    /// Required `aud` claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub audience: Option<String>,
    /// Required `iss` claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub issuer: Option<String>,
}

impl PublisherAuthSpec {
    /// Whether any verification key is configured.
    pub fn has_key(&self) -> bool {
        self.hs256_secret.is_some()
            || self.rs256_public_key.is_some()
            || self.es256_public_key.is_some()
    }
}

/// Observed state.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
// No schema defaults in the status (the operator writes it whole), but
// tolerate missing fields when reading.
#[serde(rename_all = "camelCase", default)]
#[schemars(transform = no_defaults)]
pub struct StreamPipelineStatus {
    /// The generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `True` / `False`, mirrors the Ready condition (printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Reducer replicas.
    pub reducer: RoleStatus,
    /// Publisher replicas.
    pub publisher: RoleStatus,
    /// Label selector of the reducer pods (scale subresource, HPA/KEDA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Partitions of the data topic (from the autoscaler, when it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partitions: Option<i32>,
    /// Total consumer lag (from the autoscaler, when it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_lag: Option<i64>,
    /// Largest partition lag (autoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_partition_lag: Option<i64>,
    /// Reducers the autoscaler wants now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// When the autoscaler last changed the replicas (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
    /// The autoscaler's last decision and what it was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling_decision: Option<AutoscalingDecision>,
    /// Conditions: Ready, Progressing, Degraded, Conflict, SharedConsumerGroup
    /// (a warning), and ScalingActive/ScalingLimited/PartitionsStuck with
    /// autoscaling.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One autoscaling decision and its inputs (readable in `kubectl describe`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
#[schemars(transform = no_defaults)]
pub struct AutoscalingDecision {
    /// `lag` or `drainTime`.
    pub policy: String,
    /// Lag counted (without stuck partitions).
    pub lag: i64,
    /// Records/s arriving (high-watermark deltas over the last minute).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arrival_rate: Option<f64>,
    /// Records/s consumed (committed-offset deltas at the current replicas).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumption_rate: Option<f64>,
    /// Records/s one reducer consumed while busy (last measurement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reducer_rate: Option<f64>,
    /// Seconds the current reducers need to drain the lag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_seconds: Option<f64>,
    /// Reducers the policy asked for, before clamping.
    pub estimate: i32,
    /// Reducers decided.
    pub replicas: i32,
    /// What clamped or held it (the `ScalingLimited` reason).
    pub limit: String,
    /// Partitions whose committed offset stays put while they have lag.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stuck_partitions: Vec<i32>,
}

/// Replica counts of a role.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
#[schemars(transform = no_defaults)]
pub struct RoleStatus {
    /// Desired replicas.
    pub replicas: i32,
    /// Ready replicas.
    pub ready_replicas: i32,
    /// `ready/desired`, for `kubectl get`.
    pub summary: String,
}

/// Removes `default` from a schema, recursively. Status is written by the
/// operator in full, and Kubernetes 1.20 rejects the empty-string defaults
/// schemars derives from `#[serde(default)]` there.
fn no_defaults(schema: &mut schemars::Schema) {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.remove("default");
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = schema.clone().to_value();
    strip(&mut v);
    if let Ok(s) = schemars::Schema::try_from(v) {
        *schema = s;
    }
}

/// A status condition (the shape of `metav1.Condition`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Progressing`, `Degraded`, `Conflict`, `SharedConsumerGroup`, ...
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False`, `Unknown`.
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// For people.
    pub message: String,
    /// Generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
}

/// The CRD as YAML, exactly as committed in `crds/streampipeline.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    format!(
        "# Generated by `cargo run -p streampipe-operator --bin crdgen`; do not edit.\n{}",
        serde_yaml::to_string(&StreamPipeline::crd()).expect("the CRD serialises")
    )
}

/// A problem the schema could not catch, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// JSON path of the field, e.g. `spec.kafka.commandTopic`.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

/// Checks what the schema cannot express.
pub fn validate(spec: &StreamPipelineSpec) -> Vec<Invalid> {
    let mut out = Vec::new();
    if spec.kafka.data_topic == spec.kafka.command_topic {
        out.push(Invalid {
            field: "spec.kafka.commandTopic",
            message: "must differ from spec.kafka.dataTopic (commands and data are separate co-partitioned topics)".into(),
        });
    }
    if let Some(a) = &spec.autoscaling {
        if a.min_replicas > a.max_replicas {
            out.push(Invalid {
                field: "spec.autoscaling.minReplicas",
                message: format!("{} is above maxReplicas {}", a.min_replicas, a.max_replicas),
            });
        }
    }
    if spec.kafka.dead_letter_topic.as_deref() == Some(spec.kafka.data_topic.as_str()) {
        out.push(Invalid {
            field: "spec.kafka.deadLetterTopic",
            message: "must differ from spec.kafka.dataTopic".into(),
        });
    }
    if let Some(log) = &spec.kafka.delivery_log_topic {
        if [&spec.kafka.data_topic, &spec.kafka.command_topic].contains(&log) {
            out.push(Invalid {
                field: "spec.kafka.deliveryLogTopic",
                message: "must differ from spec.kafka.dataTopic and commandTopic".into(),
            });
        }
    }
    if let Some(h) = &spec.history {
        if let Err(e) = streampipe_contract::History::parse(&h.market_prefixes.join(","), h.max_len)
        {
            out.push(Invalid {
                field: "spec.history",
                message: e.to_string(),
            });
        }
    }
    out.extend(validate_security(spec));
    out
}

/// Checks that the Kafka and Redis security settings fit together.
fn validate_security(spec: &StreamPipelineSpec) -> Vec<Invalid> {
    let mut out = Vec::new();
    let k = &spec.kafka;
    let p = k.protocol();
    if k.sasl.is_some() && k.credentials.is_some() {
        out.push(Invalid {
            field: "spec.kafka.credentials",
            message: "give either sasl or the deprecated credentials, not both".into(),
        });
    }
    if p.sasl() && k.sasl().is_none() {
        out.push(Invalid {
            field: "spec.kafka.sasl",
            message: format!("securityProtocol {} needs sasl", p.as_str()),
        });
    }
    if !p.sasl() && k.sasl().is_some() {
        out.push(Invalid {
            field: "spec.kafka.securityProtocol",
            message: format!("{} does not use the sasl settings given", p.as_str()),
        });
    }
    if !p.tls() && k.tls.is_some() {
        out.push(Invalid {
            field: "spec.kafka.securityProtocol",
            message: format!("{} does not use the tls settings given", p.as_str()),
        });
    }
    for (field, tls) in [
        ("spec.kafka.tls.ca", &k.tls),
        ("spec.redis.tls.ca", &spec.redis.tls),
    ] {
        if let Some(ca) = tls.as_ref().and_then(|t| t.ca.as_ref()) {
            if ca.secret.is_some() == ca.config_map.is_some() {
                out.push(Invalid {
                    field,
                    message: "give exactly one of secret and configMap".into(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    pub(crate) fn spec() -> StreamPipelineSpec {
        serde_json::from_value(serde_json::json!({
            "kafka": {"bootstrapServers": "kafka:9092", "dataTopic": "odds", "commandTopic": "odds.commands"},
            "redis": {"urlSecret": {"name": "redis", "key": "url"}},
        }))
        .unwrap()
    }

    #[test]
    fn defaults_apply() {
        let s = spec();
        assert_eq!(s.reducer.replicas, 1);
        assert_eq!(s.publisher.role.replicas, 1);
        assert!(validate(&s).is_empty());
    }

    #[test]
    fn validation_names_the_field() {
        let mut s = spec();
        s.kafka.command_topic = "odds".into();
        let errs = validate(&s);
        let fields: Vec<&str> = errs.iter().map(|e| e.field).collect();
        assert_eq!(fields, vec!["spec.kafka.commandTopic"]);
        // History settings the schema lets through but the binaries refuse.
        let mut s = spec();
        s.history = Some(HistorySpec {
            market_prefixes: vec!["bets.".into(), "a{b".into()],
            max_len: 2_000_000,
        });
        let fields: Vec<&str> = validate(&s).iter().map(|e| e.field).collect();
        assert_eq!(fields, vec!["spec.history"]);
        s.history.as_mut().unwrap().market_prefixes = vec!["bets.".into()];
        s.history.as_mut().unwrap().max_len = 50;
        assert!(validate(&s).is_empty());
    }

    #[test]
    fn committed_crd_matches_the_types() {
        let committed = include_str!("../../crds/streampipeline.yaml");
        assert!(
            committed == crd_yaml(),
            "crds/streampipeline.yaml is stale: run `cargo run -p streampipe-operator --bin crdgen > crds/streampipeline.yaml`"
        );
    }

    #[test]
    fn crd_has_no_field_kubernetes_1_20_refuses() {
        // kubectl validates a CRD against the server's OpenAPI: on 1.20 an
        // `x-kubernetes-validations` (CEL) anywhere fails the whole install.
        let yaml = crd_yaml();
        assert!(!yaml.contains("x-kubernetes-validations"));
        // 1.20 also refuses defaults in the status schema.
        let crd = serde_json::to_value(StreamPipeline::crd()).unwrap();
        let status =
            &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"];
        assert!(!status.to_string().contains("\"default\""));
    }

    #[test]
    fn crd_has_subresources_columns_and_schema_rules() {
        let crd = serde_json::to_value(StreamPipeline::crd()).unwrap();
        let v = &crd["spec"]["versions"][0];
        assert_eq!(
            crd["spec"]["names"]["shortNames"],
            serde_json::json!(["spl"])
        );
        assert_eq!(
            v["subresources"]["scale"]["specReplicasPath"],
            ".spec.reducer.replicas"
        );
        assert_eq!(
            v["subresources"]["scale"]["labelSelectorPath"],
            ".status.selector"
        );
        assert!(v["subresources"]["status"].is_object());
        let cols: Vec<&str> = v["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            cols,
            vec![
                "Ready",
                "Reducers",
                "Publishers",
                "Partitions",
                "Lag",
                "Age"
            ]
        );
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(
            spec["properties"]["reducer"]["properties"]["replicas"]["minimum"].as_f64(),
            Some(0.0)
        );
        assert_eq!(
            spec["properties"]["kafka"]["properties"]["dataTopic"]["minLength"].as_u64(),
            Some(1)
        );
        assert!(spec["required"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("kafka")));
    }
}
