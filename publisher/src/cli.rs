//! The publisher's command line: every flag with its environment variable,
//! named by the deployment contract ([`streampipe_contract::deploy`]) so the
//! operator sets exactly what is read here, and its translation to [`Config`].

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use streampipe_contract::deploy::{env, parse_kafka_option, KafkaSecurityArgs, RedisTlsArgs};

use crate::error::{Error, Result};
use crate::{Config, DEFAULT_CHANNEL_IDLE_TTL};

/// Default listen address (port [`streampipe_contract::deploy::PUBLISHER_HTTP_PORT`], checked by a test).
const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

/// Default internal address (port [`streampipe_contract::deploy::PUBLISHER_METRICS_PORT`], checked by a test).
const DEFAULT_METRICS_LISTEN: &str = "0.0.0.0:9090";

/// Serves browsers: WebSocket and SSE streams of their channels, the REST
/// control API, and the live odds page.
#[derive(Debug, Parser)]
#[command(name = "streampipe-publisher", version, about)]
pub struct Args {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = env::KAFKA_BROKERS,
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,
    /// Pipeline name (Redis prefix, default topic names).
    #[arg(long, env = env::PIPELINE, default_value = "streampipe")]
    pub pipeline: String,
    /// Kubernetes namespace of the pipeline, part of every Redis key (the
    /// operator sets it; unset, keys are `sp:<pipeline>:...`).
    #[arg(long, env = env::KEY_NAMESPACE)]
    pub key_namespace: Option<String>,
    /// Kafka topic of the delivery log (a record per update handed to
    /// browsers, for audit); unset or "": no log.
    #[arg(long, env = env::DELIVERY_LOG_TOPIC)]
    pub delivery_log_topic: Option<String>,
    /// Command topic [default: <pipeline>.commands].
    #[arg(long, env = env::COMMAND_TOPIC)]
    pub command_topic: Option<String>,
    /// Redis URL.
    #[arg(
        long,
        env = env::REDIS_URL,
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,
    /// Redis is a Redis Cluster (the URL may then list several seed nodes, comma-separated).
    #[arg(long, env = env::REDIS_CLUSTER, default_value_t = false)]
    pub redis_cluster: bool,
    /// Public address (API, streams, page, /healthz, /readyz).
    #[arg(long, env = env::LISTEN, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Internal address (/metrics, /healthz, /readyz): keep it off the public Service.
    #[arg(long, env = env::METRICS_LISTEN, default_value = DEFAULT_METRICS_LISTEN)]
    pub metrics_listen: SocketAddr,
    /// Most open connections on the public address; beyond it new ones get 503.
    #[arg(long, env = env::MAX_CONNECTIONS, default_value_t = crate::server::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Kernel send buffer per client socket in bytes; 0 leaves it to the kernel's
    /// autotuning (up to megabytes per socket, which no conflation can reach).
    #[arg(long, env = env::SOCKET_SEND_BUFFER_BYTES, default_value_t = crate::server::DEFAULT_SOCKET_SEND_BUFFER)]
    pub socket_send_buffer_bytes: usize,
    /// Cross-origin pages allowed to use the API and streams (comma-separated exact
    /// origins, e.g. https://odds.example). The publisher's own pages are always allowed;
    /// empty allows no other.
    #[arg(long, env = env::ALLOWED_ORIGINS, value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Development only: allow every origin.
    #[arg(long, env = env::DEV_ANY_ORIGIN, default_value_t = false)]
    pub dev_any_origin: bool,
    /// Longest life of an SSE stream in seconds; the client then reconnects with `since`.
    #[arg(long, env = env::SSE_MAX_LIFETIME_SECONDS, default_value_t = crate::sse::DEFAULT_MAX_LIFETIME.as_secs())]
    pub sse_max_lifetime_seconds: u64,
    /// Markets the demo page shows (comma-separated).
    #[arg(long, env = env::DEMO_MARKETS, value_delimiter = ',')]
    pub demo_markets: Vec<String>,
    /// Close channels with no stream for this many seconds (and unsubscribe their markets).
    #[arg(long, env = env::CHANNEL_IDLE_TTL_SECONDS, default_value_t = DEFAULT_CHANNEL_IDLE_TTL.as_secs())]
    pub channel_idle_ttl_seconds: u64,
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
    /// The publisher configuration these flags describe.
    pub fn config(&self) -> Result<Config> {
        let redis_url = self
            .redis_tls
            .url_with_password(&self.redis_url)
            .map_err(|e| Error::Config(e.to_string()))?;
        let mut config = Config::new(&self.brokers, &self.pipeline, &redis_url);
        config.key_namespace = self.key_namespace.clone().filter(|n| !n.is_empty());
        config.delivery_log_topic = self.delivery_log_topic.clone().filter(|t| !t.is_empty());
        config.redis_cluster = self.redis_cluster;
        config.redis_tls = self.redis_tls.tls();
        if let Some(t) = &self.command_topic {
            config.command_topic = t.clone();
        }
        config.kafka_options = self.kafka_options.clone();
        config.kafka_security = self
            .kafka_security
            .security()
            .map_err(|e| Error::Config(e.to_string()))?;
        config.origins.allowed = self
            .allowed_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_owned())
            .filter(|o| !o.is_empty())
            .collect();
        config.origins.any = self.dev_any_origin;
        config.sse_max_lifetime = Duration::from_secs(self.sse_max_lifetime_seconds.max(1));
        config.demo_markets = self
            .demo_markets
            .iter()
            .filter(|m| !m.is_empty())
            .cloned()
            .collect();
        config.channel_idle_ttl = Duration::from_secs(self.channel_idle_ttl_seconds);
        config.max_connections = self.max_connections.max(1);
        config.socket_send_buffer = self.socket_send_buffer_bytes;
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
            streampipe_contract::deploy::PUBLISHER_HTTP_PORT
        )));
    }

    #[test]
    fn metrics_listen_default_uses_the_contract_port() {
        assert!(DEFAULT_METRICS_LISTEN.ends_with(&format!(
            ":{}",
            streampipe_contract::deploy::PUBLISHER_METRICS_PORT
        )));
    }

    #[test]
    fn security_options_are_refused_and_passwords_kept_whole() {
        assert!(Args::try_parse_from(["p", "--kafka-option", "sasl.username=x"]).is_err());
        let a = Args::try_parse_from([
            "p",
            "--kafka-security-protocol",
            "SASL_SSL",
            "--kafka-sasl-mechanism",
            "PLAIN",
            "--kafka-sasl-username",
            "u",
            "--kafka-sasl-password",
            "x,security.protocol=PLAINTEXT",
        ])
        .unwrap();
        let props = a.config().unwrap().kafka_security.properties().unwrap();
        assert!(props.contains(&("security.protocol", "SASL_SSL".to_owned())));
        assert!(props.contains(&("sasl.password", "x,security.protocol=PLAINTEXT".to_owned())));
    }
}
