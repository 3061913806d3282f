//! Reads the reducers' consumer lag straight from Kafka (not from the
//! reducers' metrics, so it works with zero reducers): the data topic's
//! partitions, each partition's high watermark and the group's committed
//! offset. Blocking librdkafka calls; run it on a blocking thread.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::ClientContext;
use rdkafka::{Offset, TopicPartitionList};
use streampipe_contract::deploy::{KafkaSecurity, Pem, Secret as Secret_};

use crate::crd::KafkaSpec;

/// The lag reader's TLS and SASL for a pipeline: the same settings the
/// pods get, read through the API (certificates inline, as librdkafka's
/// `ssl.*.pem`), since the operator has no volumes of the pipeline's.
/// Errors name the Secret or ConfigMap and key, never a value.
pub async fn kafka_security(
    client: &kube::Client,
    ns: &str,
    spec: &KafkaSpec,
) -> Result<KafkaSecurity, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let secret_key = |name: String, key: String| {
        let secrets = secrets.clone();
        async move {
            let s = secrets
                .get(&name)
                .await
                .map_err(|e| format!("Secret {name:?}: {e}"))?;
            s.data
                .and_then(|d| {
                    d.get(&key)
                        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                })
                .ok_or_else(|| format!("Secret {name:?} has no key {key:?}"))
        }
    };
    let mut out = KafkaSecurity {
        protocol: spec.protocol(),
        ..Default::default()
    };
    if let Some(sasl) = spec.sasl() {
        out.mechanism = Some(sasl.mechanism.parse().map_err(|e| format!("{e}"))?);
        out.username = Some(secret_key(sasl.secret_name.clone(), sasl.username_key.clone()).await?);
        out.password = Some(Secret_::new(
            secret_key(sasl.secret_name.clone(), sasl.password_key.clone()).await?,
        ));
    }
    if let Some(tls) = &spec.tls {
        if let Some(ca) = &tls.ca {
            let pem = match (&ca.secret, &ca.config_map) {
                (Some(s), _) => secret_key(s.name.clone(), s.key.clone()).await?,
                (None, Some(c)) => {
                    let m = maps
                        .get(&c.name)
                        .await
                        .map_err(|e| format!("ConfigMap {:?}: {e}", c.name))?;
                    m.data
                        .and_then(|d| d.get(&c.key).cloned())
                        .ok_or_else(|| format!("ConfigMap {:?} has no key {:?}", c.name, c.key))?
                }
                (None, None) => return Err("spec.kafka.tls.ca names no source".into()),
            };
            out.ca = Some(Pem::Inline(pem));
        }
        if let Some(c) = &tls.client_cert {
            out.cert = Some(Pem::Inline(
                secret_key(c.secret_name.clone(), c.cert_key.clone()).await?,
            ));
            out.key = Some(Pem::Inline(
                secret_key(c.secret_name.clone(), c.key_key.clone()).await?,
            ));
        }
    }
    out.properties().map_err(|e| e.to_string())?;
    Ok(out)
}

/// Keeps the first error librdkafka reported for the lag reader's client
/// (the root cause; "all brokers down" follows it).
#[derive(Default)]
struct LagContext {
    last_error: Arc<Mutex<Option<String>>>,
}

impl ClientContext for LagContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Error as i32) {
            if let Ok(mut e) = self.last_error.lock() {
                e.get_or_insert_with(|| format!("{fac}: {log_message}"));
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Ok(mut e) = self.last_error.lock() {
            e.get_or_insert_with(|| format!("{error}: {reason}"));
        }
    }
}

impl ConsumerContext for LagContext {}

/// Removes the password from a message, should any server or library echo it.
fn redact(msg: String, security: &KafkaSecurity) -> String {
    match security.password.as_ref().map(|p| p.expose()) {
        Some(p) if !p.is_empty() => msg.replace(p, "<redacted>"),
        _ => msg,
    }
}

/// How long a failed request waits for librdkafka to report why (logs and
/// errors reach the context only when its queue is served).
const CAUSE_WAIT: Duration = Duration::from_millis(500);
/// How long each serving of the queue blocks.
const CAUSE_POLL: Duration = Duration::from_millis(20);

/// How long one Kafka request of the lag reader may take.
pub const KAFKA_TIMEOUT: Duration = Duration::from_secs(5);

/// How a partition without a committed offset counts (like KEDA's
/// `offsetResetPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uncommitted {
    /// The group will start at the earliest offset (the reducers'
    /// `auto.offset.reset`): everything retained is lag.
    Earliest,
    /// The group will start at the end: no lag.
    Latest,
}

/// Lag of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// Partition number.
    pub partition: i32,
    /// High watermark.
    pub high: i64,
    /// The group's committed offset, if any.
    pub committed: Option<i64>,
    /// `high - committed` (or by the [`Uncommitted`] policy), never negative.
    pub lag: i64,
}

/// The lag of a group on a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LagReport {
    /// Partitions of the topic.
    pub partitions: i32,
    /// Per-partition lag.
    pub per_partition: Vec<PartitionLag>,
    /// Sum of lags.
    pub total: i64,
    /// Largest partition lag.
    pub max: i64,
}

/// Reads the lag of `group` on `topic`, connecting with `security` (the
/// pipeline's TLS and SASL, certificates inline). Errors are messages for
/// status and Events and never contain the password or a key.
pub fn read_lag(
    brokers: &str,
    topic: &str,
    group: &str,
    security: &KafkaSecurity,
    policy: Uncommitted,
) -> Result<LagReport, String> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("client.id", "streampipe-operator-lag");
    for (k, v) in security.properties().map_err(|e| e.to_string())? {
        cfg.set(k, v);
    }
    let context = LagContext::default();
    let cause = context.last_error.clone();
    // Not subscribed: this client never joins the group, it only reads offsets.
    let c: BaseConsumer<LagContext> = cfg
        .create_with_context(context)
        .map_err(|e| format!("kafka client: {e}"))?;
    // librdkafka's request errors only say "transport failure"; the cause
    // (TLS handshake, SASL authentication) comes through the error callback.
    let with_cause = |e: String| {
        // rdkafka hands logs and errors over on the client's queue: serve
        // it for a moment to learn why.
        let deadline = std::time::Instant::now() + CAUSE_WAIT;
        let cause = loop {
            let found = cause.lock().ok().and_then(|c| c.clone());
            if found.is_some() || std::time::Instant::now() >= deadline {
                break found;
            }
            let _ = c.poll(CAUSE_POLL);
        };
        let msg = match cause {
            Some(c) => format!("{e} (broker connection: {c})"),
            None => e,
        };
        redact(msg, security)
    };
    let md = c
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .map_err(|e| with_cause(format!("metadata: {e}")))?;
    let t = md
        .topics()
        .first()
        .ok_or_else(|| format!("topic {topic:?} not in metadata"))?;
    if let Some(err) = t.error() {
        return Err(format!("topic {topic:?}: {err:?}"));
    }
    if t.partitions().is_empty() {
        return Err(format!("topic {topic:?} has no partitions (missing?)"));
    }
    let mut tpl = TopicPartitionList::new();
    for p in t.partitions() {
        tpl.add_partition(topic, p.id());
    }
    let committed = c
        .committed_offsets(tpl, KAFKA_TIMEOUT)
        .map_err(|e| with_cause(format!("committed offsets of group {group:?}: {e}")))?;
    let mut per_partition = Vec::new();
    for p in t.partitions() {
        let (low, high) = c
            .fetch_watermarks(topic, p.id(), KAFKA_TIMEOUT)
            .map_err(|e| with_cause(format!("watermarks of {topic}/{}: {e}", p.id())))?;
        let committed = committed
            .find_partition(topic, p.id())
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let lag = match (committed, policy) {
            (Some(o), _) => high - o,
            (None, Uncommitted::Earliest) => high - low,
            (None, Uncommitted::Latest) => 0,
        }
        .max(0);
        per_partition.push(PartitionLag {
            partition: p.id(),
            high,
            committed,
            lag,
        });
    }
    per_partition.sort_by_key(|p| p.partition);
    let total = per_partition.iter().map(|p| p.lag).sum();
    let max = per_partition.iter().map(|p| p.lag).max().unwrap_or(0);
    Ok(LagReport {
        partitions: per_partition.len() as i32,
        per_partition,
        total,
        max,
    })
}
