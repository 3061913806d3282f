//! The reducer's command line: every flag with its environment variable,
//! named by the deployment contract ([`streampipe_contract::deploy`]) so the
//! operator sets exactly what is read here, and its translation to [`Config`].

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use streampipe_contract::deploy::{env, parse_kafka_option, KafkaSecurityArgs, RedisTlsArgs};

use crate::config::{Config, DEFAULT_BATCH_MAX_DELAY, DEFAULT_BATCH_MAX_RECORDS};
use crate::error::{Error, Result};

/// How much earlier than the grace period the reducer gives up on a clean
/// shutdown and exits: covers the delay between the kubelet's SIGTERM and
/// ours and the process teardown, so the exit is ours (logged) and not the
/// kubelet's SIGKILL.
pub const SHUTDOWN_EXIT_MARGIN: Duration = Duration::from_secs(2);

/// Default listen address of the HTTP endpoints (port
/// [`streampipe_contract::deploy::REDUCER_HTTP_PORT`], checked by a test).
const DEFAULT_LISTEN: &str = "0.0.0.0:9090";

/// Consumes a pipeline's data and command topics, stores each market's state
/// in Redis and publishes every update of a watched market once to its topic.
#[derive(Debug, Parser)]
#[command(name = "streampipe-reducer", version, about)]
pub struct Args {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = env::KAFKA_BROKERS,
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,
    /// Pipeline name: Redis key prefix and default for topics and group.
    #[arg(long, env = env::PIPELINE, default_value = "streampipe")]
    pub pipeline: String,
    /// Kubernetes namespace of the pipeline, part of every Redis key (the
    /// operator sets it; unset, keys are `sp:<pipeline>:...`).
    #[arg(long, env = env::KEY_NAMESPACE)]
    pub key_namespace: Option<String>,
    /// Data topic [default: <pipeline>.data].
    #[arg(long, env = env::DATA_TOPIC)]
    pub data_topic: Option<String>,
    /// Command topic, co-partitioned with the data topic [default: <pipeline>.commands].
    #[arg(long, env = env::COMMAND_TOPIC)]
    pub command_topic: Option<String>,
    /// Dead-letter topic [default: <pipeline>.dead-letter]; "" disables dead-lettering.
    #[arg(long, env = env::DEAD_LETTER_TOPIC)]
    pub dead_letter_topic: Option<String>,
    /// Consumer group [default: <pipeline>.reducers].
    #[arg(long, env = env::GROUP)]
    pub group: Option<String>,
    /// Redis URL; with --redis-cluster, a comma-separated list of seed nodes.
    #[arg(
        long,
        env = env::REDIS_URL,
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Redis is a Redis Cluster (keys routed by hash slot, SPUBLISH, WAIT
    /// for a replica after each batch).
    #[arg(long, env = env::REDIS_CLUSTER, default_value_t = false)]
    pub redis_cluster: bool,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = env::LISTEN, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Most records per Redis batch.
    #[arg(long, env = env::BATCH_MAX_RECORDS, default_value_t = DEFAULT_BATCH_MAX_RECORDS)]
    pub batch_max_records: usize,
    /// Longest time a record waits in a batch, in milliseconds.
    #[arg(long, env = env::BATCH_MAX_DELAY_MS, default_value_t = DEFAULT_BATCH_MAX_DELAY.as_millis() as u64)]
    pub batch_max_delay_ms: u64,
    /// Consumer group session timeout in milliseconds.
    #[arg(long, env = env::SESSION_TIMEOUT_MS, default_value_t = 10_000)]
    pub session_timeout_ms: u64,
    /// Seconds from SIGTERM to exit at the latest, whatever the broker's
    /// state: the pod's terminationGracePeriodSeconds (the reducer gives up
    /// on the clean leave 2 s before it; offsets not committed by then are
    /// redelivered, which the version guard makes harmless).
    #[arg(long, env = env::SHUTDOWN_GRACE_SECONDS,
        default_value_t = streampipe_contract::deploy::TERMINATION_GRACE_SECONDS)]
    pub shutdown_grace_seconds: u64,
    /// Largest version jump accepted over a market's stored version; a record further
    /// ahead is dead-lettered (`version_jump`). Lower it for sequence-numbered producers.
    #[arg(long, env = env::MAX_VERSION_JUMP, default_value_t = crate::store::DEFAULT_MAX_VERSION_JUMP)]
    pub max_version_jump: u64,
    /// Comma-separated market-id prefixes whose markets keep an event history, a capped
    /// Redis Stream of every applied update (`*`: every market; empty: none).
    #[arg(long, env = env::HISTORY_MARKET_PREFIXES, default_value = "")]
    pub history_market_prefixes: String,
    /// Entries kept per history market (`XADD MAXLEN ~`; 0: the default).
    #[arg(long, env = env::HISTORY_MAX_LEN, default_value_t = streampipe_contract::history::DEFAULT_MAX_LEN)]
    pub history_max_len: u64,
    /// Extra librdkafka property for tuning, `key=value` (repeatable; comma-separated in
    /// the variable). Security settings are refused here: they have their own flags.
    #[arg(long = "kafka-option", env = env::KAFKA_OPTIONS, value_delimiter = ',', value_parser = parse_kafka_option)]
    pub kafka_options: Vec<(String, String)>,
    /// Kafka TLS and SASL.
    #[command(flatten)]
    pub kafka_security: KafkaSecurityArgs,
    /// Redis password and TLS files.
    #[command(flatten)]
    pub redis_tls: RedisTlsArgs,
    /// Log format.
    #[arg(long, env = env::LOG_FORMAT, default_value = "json", value_parser = ["json", "text"])]
    pub log_format: String,
}

impl Args {
    /// How long after SIGTERM the reducer exits at the latest: the grace
    /// period less [`SHUTDOWN_EXIT_MARGIN`] (half of it when it is shorter
    /// than twice the margin).
    pub fn shutdown_deadline(&self) -> Duration {
        let grace = Duration::from_secs(self.shutdown_grace_seconds);
        grace.saturating_sub(SHUTDOWN_EXIT_MARGIN).max(grace / 2)
    }

    /// The reducer configuration these flags describe.
    pub fn config(&self) -> Result<Config> {
        let redis_url = self
            .redis_tls
            .url_with_password(&self.redis_url)
            .map_err(|e| Error::Config(e.to_string()))?;
        let mut config = Config::new(&self.brokers, &self.pipeline, &redis_url);
        config.key_namespace = self.key_namespace.clone().filter(|n| !n.is_empty());
        if let Some(t) = &self.data_topic {
            config.data_topic = t.clone();
        }
        if let Some(t) = &self.command_topic {
            config.command_topic = t.clone();
        }
        if let Some(t) = &self.dead_letter_topic {
            config.dead_letter_topic = (!t.is_empty()).then(|| t.clone());
        }
        if let Some(g) = &self.group {
            config.group = g.clone();
        }
        config.redis_cluster = self.redis_cluster;
        config.redis_tls = self.redis_tls.tls();
        config.batch_max_records = self.batch_max_records;
        config.batch_max_delay = Duration::from_millis(self.batch_max_delay_ms);
        config.session_timeout = Duration::from_millis(self.session_timeout_ms);
        config.max_version_jump = self.max_version_jump.max(1);
        config.history = streampipe_contract::History::parse(
            &self.history_market_prefixes,
            self.history_max_len,
        )
        .map_err(|e| Error::Config(e.to_string()))?;
        config.kafka_options = self.kafka_options.clone();
        config.kafka_security = self
            .kafka_security
            .security()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_default_uses_the_contract_port() {
        assert!(DEFAULT_LISTEN.ends_with(&format!(
            ":{}",
            streampipe_contract::deploy::REDUCER_HTTP_PORT
        )));
    }

    #[test]
    fn shutdown_deadline_ends_before_the_grace_period() {
        let a = Args::try_parse_from(["reducer"]).unwrap();
        assert_eq!(
            a.shutdown_grace_seconds,
            streampipe_contract::deploy::TERMINATION_GRACE_SECONDS
        );
        assert_eq!(a.shutdown_deadline(), Duration::from_secs(28));
        let a = Args::try_parse_from(["reducer", "--shutdown-grace-seconds", "2"]).unwrap();
        assert_eq!(a.shutdown_deadline(), Duration::from_secs(1));
        let a = Args::try_parse_from(["reducer", "--shutdown-grace-seconds", "0"]).unwrap();
        assert_eq!(a.shutdown_deadline(), Duration::ZERO);
    }

    #[test]
    fn security_options_are_refused_without_echoing_the_value() {
        let e = parse_kafka_option("sasl.password=hunter2").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(parse_kafka_option("linger.ms=5").is_ok());
        let r = Args::try_parse_from(["reducer", "--kafka-option", "ssl.key.password=x"]);
        assert!(r.is_err());
    }

    #[test]
    fn a_password_with_a_comma_reaches_the_config_whole() {
        let a = Args::try_parse_from([
            "reducer",
            "--kafka-security-protocol",
            "SASL_PLAINTEXT",
            "--kafka-sasl-mechanism",
            "SCRAM-SHA-256",
            "--kafka-sasl-username",
            "u",
            "--kafka-sasl-password",
            "a,b=c",
        ])
        .unwrap();
        let c = a.config().unwrap();
        let props = c.kafka_security.properties().unwrap();
        assert!(props.contains(&("sasl.password", "a,b=c".to_owned())));
        assert!(!format!("{a:?}").contains("a,b=c"), "Debug redacts");
    }
}
