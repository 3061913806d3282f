//! The publisher's command line: every flag with its environment variable,
//! named by the deployment contract ([`streampipe_contract::deploy`]) so the
//! operator sets exactly what is read here, and its translation to [`Config`].

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use std::path::PathBuf;

use streampipe_contract::deploy::{
    auth_mode, env, parse_kafka_option, KafkaSecurityArgs, RedisTlsArgs, Secret,
};

use crate::auth::{AuthConfig, Mode, TokenKeys};

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
    /// Comma-separated market-id prefixes whose markets keep an event history (`*`: all;
    /// empty: none); must match the reducers' setting.
    #[arg(long, env = env::HISTORY_MARKET_PREFIXES, default_value = "")]
    pub history_market_prefixes: String,
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
    /// Kernel send buffer per client socket in bytes; 0 (default) leaves it to the
    /// kernel's autotuning; e.g. 65536 bounds what stalled clients pin in the kernel
    /// (at a throughput cost, see docs/benchmarks.md).
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
    /// `max-age` of snapshots (`GET /v1/snapshot`), seconds (at most 3600).
    #[arg(long, env = env::SNAPSHOT_MAX_AGE_SECONDS, default_value_t = crate::snapshot_core::DEFAULT_MAX_AGE.as_secs())]
    pub snapshot_max_age_seconds: u64,
    /// `stale-while-revalidate` of snapshots, seconds (at most 3600).
    #[arg(long, env = env::SNAPSHOT_STALE_WHILE_REVALIDATE_SECONDS, default_value_t = crate::snapshot_core::DEFAULT_STALE_WHILE_REVALIDATE.as_secs())]
    pub snapshot_stale_while_revalidate_seconds: u64,
    /// Token mode: declare the odds public, so snapshots are `Cache-Control: public`
    /// and a CDN serves them without checking tokens (see docs/security.md).
    #[arg(long, env = env::SNAPSHOT_PUBLIC, default_value_t = false)]
    pub snapshot_public: bool,
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
    /// Authentication: "token" (every request carries a signed token) or
    /// "anonymous" (public odds, limits per client IP).
    #[arg(long, env = env::AUTH_MODE, default_value = auth_mode::TOKEN, value_parser = [auth_mode::TOKEN, auth_mode::ANONYMOUS])]
    pub auth_mode: String,
    /// HS256 secret (prefer the environment variable, from a Secret, or the file).
    #[arg(long, env = env::AUTH_HS256_SECRET, hide_env_values = true)]
    pub auth_hs256_secret: Option<Secret>,
    /// File holding the HS256 secret (trailing newline ignored).
    #[arg(long, env = env::AUTH_HS256_SECRET_FILE)]
    pub auth_hs256_secret_file: Option<PathBuf>,
    /// PEM file of the RSA public key verifying RS256 tokens.
    #[arg(long, env = env::AUTH_RSA_PUBLIC_KEY_FILE)]
    pub auth_rsa_public_key_file: Option<PathBuf>,
    /// PEM file of the EC P-256 public key verifying ES256 tokens.
    #[arg(long, env = env::AUTH_EC_PUBLIC_KEY_FILE)]
    pub auth_ec_public_key_file: Option<PathBuf>,
    /// Required `aud` claim (unset: not checked).
    #[arg(long, env = env::AUTH_AUDIENCE)]
    pub auth_audience: Option<String>,
    /// Required `iss` claim (unset: not checked).
    #[arg(long, env = env::AUTH_ISSUER)]
    pub auth_issuer: Option<String>,
    /// Development only: POST /v1/dev/token mints HS256 tokens for anyone.
    #[arg(long, env = env::DEV_TOKENS, default_value_t = false)]
    pub dev_tokens: bool,
    /// Header a trusted proxy sets to the client's address (e.g. X-Real-IP);
    /// unset: the peer address. Only set it behind a proxy that overwrites it.
    #[arg(long, env = env::CLIENT_IP_HEADER)]
    pub client_ip_header: Option<String>,
    /// Most open streams per client (subject, or IP when anonymous) on this pod.
    #[arg(long, env = env::MAX_STREAMS_PER_CLIENT, default_value_t = crate::clients::MAX_STREAMS_PER_CLIENT)]
    pub max_streams_per_client: usize,
    /// Most channels per client (all pods).
    #[arg(long, env = env::MAX_CHANNELS_PER_CLIENT, default_value_t = crate::clients::MAX_CHANNELS_PER_CLIENT)]
    pub max_channels_per_client: usize,
    /// Benchmarks only: no per-client rate limits or caps.
    #[arg(long, env = env::BENCH_NO_CLIENT_LIMITS, default_value_t = false)]
    pub bench_no_client_limits: bool,
    /// The reducers' consumer group (its command lag sheds load) [default: <pipeline>.reducers].
    #[arg(long, env = env::GROUP)]
    pub reducer_group: Option<String>,
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
        config.history = streampipe_contract::History::parse(&self.history_market_prefixes, 0)
            .map_err(|e| Error::Config(e.to_string()))?;
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
        config.snapshot = crate::snapshot_core::CachePolicy::from_seconds(
            self.snapshot_max_age_seconds,
            self.snapshot_stale_while_revalidate_seconds,
            self.snapshot_public,
        );
        config.max_connections = self.max_connections.max(1);
        config.socket_send_buffer = self.socket_send_buffer_bytes;
        config.auth = self.auth()?;
        config.client_limits.max_streams = self.max_streams_per_client.max(1);
        config.client_limits.max_channels = self.max_channels_per_client.max(1);
        if self.bench_no_client_limits {
            config.client_limits = crate::clients::ClientLimits::unlimited();
        }
        if let Some(g) = self.reducer_group.as_ref().filter(|g| !g.is_empty()) {
            config.reducer_group = g.clone();
        }
        Ok(config)
    }

    /// The authentication settings (key files are read here: a missing or
    /// unreadable one stops start-up, naming the setting, never its content).
    pub fn auth(&self) -> Result<AuthConfig> {
        let read = |path: &PathBuf, var: &str| {
            std::fs::read(path).map_err(|e| Error::Config(format!("{var} {}: {e}", path.display())))
        };
        let mode = if self.auth_mode == auth_mode::ANONYMOUS {
            Mode::Anonymous
        } else {
            let hs256 = match (&self.auth_hs256_secret, &self.auth_hs256_secret_file) {
                (Some(_), Some(_)) => {
                    return Err(Error::Config(format!(
                        "set {} or {}, not both",
                        env::AUTH_HS256_SECRET,
                        env::AUTH_HS256_SECRET_FILE
                    )))
                }
                (Some(s), None) => Some(s.clone()),
                (None, Some(f)) => {
                    let bytes = read(f, env::AUTH_HS256_SECRET_FILE)?;
                    let text = String::from_utf8(bytes).map_err(|_| {
                        Error::Config(format!("{}: not UTF-8", env::AUTH_HS256_SECRET_FILE))
                    })?;
                    Some(Secret::new(text.trim_end_matches(['\r', '\n'])))
                }
                (None, None) => None,
            };
            Mode::Token(TokenKeys {
                hs256,
                rsa_public_pem: self
                    .auth_rsa_public_key_file
                    .as_ref()
                    .map(|f| read(f, env::AUTH_RSA_PUBLIC_KEY_FILE))
                    .transpose()?,
                ec_public_pem: self
                    .auth_ec_public_key_file
                    .as_ref()
                    .map(|f| read(f, env::AUTH_EC_PUBLIC_KEY_FILE))
                    .transpose()?,
                audience: self.auth_audience.clone().filter(|a| !a.is_empty()),
                issuer: self.auth_issuer.clone().filter(|i| !i.is_empty()),
            })
        };
        let config = AuthConfig {
            mode,
            dev_tokens: self.dev_tokens,
            client_ip_header: self.client_ip_header.clone().filter(|h| !h.is_empty()),
        };
        // Token mode without keys fails here, before any connection.
        crate::auth::Auth::new(&config)?;
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
    fn token_mode_needs_a_key_and_anonymous_is_explicit() {
        let e = Args::try_parse_from(["p"]).unwrap().config().unwrap_err();
        assert!(e.to_string().contains("needs a key"), "{e}");
        let a = Args::try_parse_from(["p", "--auth-mode", "anonymous"]).unwrap();
        assert!(matches!(a.config().unwrap().auth.mode, Mode::Anonymous));
        let a = Args::try_parse_from(["p", "--auth-hs256-secret", "s3cr3t-value"]).unwrap();
        let c = a.config().unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t-value"));
        assert!(Args::try_parse_from(["p", "--auth-mode", "none"]).is_err());
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
            "--auth-mode",
            "anonymous",
        ])
        .unwrap();
        let props = a.config().unwrap().kafka_security.properties().unwrap();
        assert!(props.contains(&("security.protocol", "SASL_SSL".to_owned())));
        assert!(props.contains(&("sasl.password", "x,security.protocol=PLAINTEXT".to_owned())));
    }
}
