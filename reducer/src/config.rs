//! The reducer's settings and their defaults (the binary fills them from
//! flags and environment, named in the deployment contract).

use std::time::Duration;

use rdkafka::config::ClientConfig;
use streampipe_contract::deploy::{self, KafkaSecurity, RedisTls};

use crate::error::{Error, Result};

/// Default most records per batch: large enough to amortise a Redis round
/// trip, small enough that one batch is a few milliseconds of work.
pub const DEFAULT_BATCH_MAX_RECORDS: usize = 1000;

/// Default longest time a record waits in a batch: bounds the latency the
/// batching adds when traffic is light.
pub const DEFAULT_BATCH_MAX_DELAY: Duration = Duration::from_millis(5);

/// Reducer settings (the binary fills them from flags and environment).
#[derive(Debug, Clone)]
pub struct Config {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// The partitioned data topic.
    pub data_topic: String,
    /// The co-partitioned command topic.
    pub command_topic: String,
    /// Where malformed records go; `None` only counts and skips them.
    pub dead_letter_topic: Option<String>,
    /// The consumer group all reducers of the pipeline share.
    pub group: String,
    /// Redis URL; with `redis_cluster`, a comma-separated seed list.
    pub redis_url: String,
    /// Whether `redis_url` names a Redis Cluster (keys routed by slot,
    /// `SPUBLISH`, `WAIT` for a replica after each batch).
    pub redis_cluster: bool,
    /// Pipeline name, the Redis key prefix.
    pub pipeline: String,
    /// Kubernetes namespace of the pipeline, part of the Redis key prefix.
    pub key_namespace: Option<String>,
    /// Most records per batch.
    pub batch_max_records: usize,
    /// Longest time a record waits in a batch.
    pub batch_max_delay: Duration,
    /// Consumer group session timeout.
    pub session_timeout: Duration,
    /// librdkafka statistics interval (per-partition lag metrics).
    pub statistics_interval: Duration,
    /// Extra librdkafka properties (tuning; the binary refuses security keys here).
    pub kafka_options: Vec<(String, String)>,
    /// Kafka TLS and SASL, each its own setting.
    pub kafka_security: KafkaSecurity,
    /// TLS files for a `rediss://` URL.
    pub redis_tls: RedisTls,
    /// Largest version jump over a market's stored version; a record
    /// further ahead is dead-lettered (`version_jump`).
    pub max_version_jump: u64,
    /// Which markets keep an event history (a capped stream per market,
    /// appended in the state write's script); off by default.
    pub history: streampipe_contract::History,
}

impl Config {
    /// A configuration with the documented defaults.
    pub fn new(brokers: &str, pipeline: &str, redis_url: &str) -> Self {
        Config {
            brokers: brokers.into(),
            data_topic: deploy::default_data_topic(pipeline),
            command_topic: deploy::default_command_topic(pipeline),
            dead_letter_topic: Some(deploy::default_dead_letter_topic(pipeline)),
            group: deploy::default_group(pipeline),
            redis_url: redis_url.into(),
            redis_cluster: false,
            pipeline: pipeline.into(),
            key_namespace: None,
            batch_max_records: DEFAULT_BATCH_MAX_RECORDS,
            batch_max_delay: DEFAULT_BATCH_MAX_DELAY,
            session_timeout: Duration::from_secs(10),
            statistics_interval: Duration::from_secs(5),
            kafka_options: Vec::new(),
            kafka_security: KafkaSecurity::default(),
            redis_tls: RedisTls::default(),
            max_version_jump: crate::store::DEFAULT_MAX_VERSION_JUMP,
            history: streampipe_contract::History::off(),
        }
    }

    /// The base client configuration: brokers, security, user options.
    pub(crate) fn client_config(&self) -> Result<ClientConfig> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        let security = self
            .kafka_security
            .properties()
            .map_err(|e| Error::Config(e.to_string()))?;
        for (k, v) in security {
            c.set(k, v);
        }
        for (k, v) in &self.kafka_options {
            deploy::check_kafka_option(k).map_err(|e| Error::Config(e.to_string()))?;
            c.set(k, v);
        }
        Ok(c)
    }
}
