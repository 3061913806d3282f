//! The deployment contract: environment variable names, ports and naming
//! defaults that the operator's builders set and the binaries read, defined
//! once so the two cannot drift apart (they did: the dead-letter default).
//!
//! It also holds the connection-security settings every Kafka and Redis
//! client of the project shares ([`KafkaSecurity`], [`RedisTls`]): each
//! setting is its own flag and variable, secrets are never spliced into a
//! list of options, and the types redact secrets in `Debug`. With the `cli`
//! feature the clap argument groups ([`KafkaSecurityArgs`],
//! [`RedisTlsArgs`]) are defined here too, so both binaries spell the flags
//! the same way.

use std::fmt;
use std::path::PathBuf;

use crate::message::ContractError;

/// Port of the reducer's `/metrics`, `/healthz`, `/readyz`.
pub const REDUCER_HTTP_PORT: u16 = 9090;
/// Port of the publisher's public side (API, streams, page, probes).
pub const PUBLISHER_HTTP_PORT: u16 = 8080;
/// Port of the publisher's internal side (`/metrics`, probes): never
/// exposed through the Service browsers reach.
pub const PUBLISHER_METRICS_PORT: u16 = 9090;

/// Seconds a pod gets between SIGTERM and SIGKILL: the operator's
/// `terminationGracePeriodSeconds` and the default of the reducer's
/// `--shutdown-grace-seconds`, which ends the process before it (a batch is
/// milliseconds, a commit and a leave a few round trips when the broker
/// answers; when it does not, nothing waits for it beyond this).
pub const TERMINATION_GRACE_SECONDS: u64 = 30;

/// Every environment variable the operator may set on a pod, by name.
pub mod env {
    /// Pipeline name (Redis key prefix, default topic and group names).
    pub const PIPELINE: &str = "STREAMPIPE_PIPELINE";
    /// Kubernetes namespace of the pipeline: part of every Redis key, so
    /// same-named pipelines of two namespaces sharing one Redis stay apart.
    pub const KEY_NAMESPACE: &str = "STREAMPIPE_KEY_NAMESPACE";
    /// Publisher: the delivery log's Kafka topic (unset or "": no log).
    pub const DELIVERY_LOG_TOPIC: &str = "STREAMPIPE_DELIVERY_LOG_TOPIC";
    /// Reducer and publisher: comma-separated market-id prefixes whose
    /// markets keep an event history (`*`: all; unset or "": none).
    pub const HISTORY_MARKET_PREFIXES: &str = "STREAMPIPE_HISTORY_MARKET_PREFIXES";
    /// Reducer: entries kept per history market's stream (`MAXLEN ~`).
    pub const HISTORY_MAX_LEN: &str = "STREAMPIPE_HISTORY_MAX_LEN";
    /// Kafka bootstrap servers.
    pub const KAFKA_BROKERS: &str = "STREAMPIPE_KAFKA_BROKERS";
    /// Data topic.
    pub const DATA_TOPIC: &str = "STREAMPIPE_DATA_TOPIC";
    /// Command topic.
    pub const COMMAND_TOPIC: &str = "STREAMPIPE_COMMAND_TOPIC";
    /// Dead-letter topic ("" disables dead-lettering).
    pub const DEAD_LETTER_TOPIC: &str = "STREAMPIPE_DEAD_LETTER_TOPIC";
    /// Consumer group of the reducers.
    pub const GROUP: &str = "STREAMPIPE_GROUP";
    /// Redis URL (`redis://` or `rediss://`; a seed list with cluster mode).
    pub const REDIS_URL: &str = "STREAMPIPE_REDIS_URL";
    /// `true` when Redis is a Redis Cluster.
    pub const REDIS_CLUSTER: &str = "STREAMPIPE_REDIS_CLUSTER";
    /// Listen address of the HTTP endpoints.
    pub const LISTEN: &str = "STREAMPIPE_LISTEN";
    /// `json` or `text`.
    pub const LOG_FORMAT: &str = "STREAMPIPE_LOG_FORMAT";
    /// Publisher: cross-origin pages allowed to use the API and streams.
    pub const ALLOWED_ORIGINS: &str = "STREAMPIPE_ALLOWED_ORIGINS";
    /// Publisher: `true` allows every origin (development only).
    pub const DEV_ANY_ORIGIN: &str = "STREAMPIPE_DEV_ANY_ORIGIN";
    /// Publisher: address of the internal port (`/metrics`, probes).
    pub const METRICS_LISTEN: &str = "STREAMPIPE_METRICS_LISTEN";
    /// Publisher: most open connections per pod.
    pub const MAX_CONNECTIONS: &str = "STREAMPIPE_MAX_CONNECTIONS";
    /// Publisher: kernel send buffer per client socket in bytes (0: the kernel's autotuning).
    pub const SOCKET_SEND_BUFFER_BYTES: &str = "STREAMPIPE_SOCKET_SEND_BUFFER_BYTES";
    /// Publisher: longest life of an SSE stream, seconds.
    pub const SSE_MAX_LIFETIME_SECONDS: &str = "STREAMPIPE_SSE_MAX_LIFETIME_SECONDS";
    /// Publisher: `max-age` of snapshots, seconds.
    pub const SNAPSHOT_MAX_AGE_SECONDS: &str = "STREAMPIPE_SNAPSHOT_MAX_AGE_SECONDS";
    /// Publisher: `stale-while-revalidate` of snapshots, seconds.
    pub const SNAPSHOT_STALE_WHILE_REVALIDATE_SECONDS: &str =
        "STREAMPIPE_SNAPSHOT_STALE_WHILE_REVALIDATE_SECONDS";
    /// Publisher: `true` declares the odds public in token mode (snapshots
    /// become `Cache-Control: public`).
    pub const SNAPSHOT_PUBLIC: &str = "STREAMPIPE_SNAPSHOT_PUBLIC";
    /// Reducer: most records per Redis batch.
    pub const BATCH_MAX_RECORDS: &str = "STREAMPIPE_BATCH_MAX_RECORDS";
    /// Reducer: longest time a record waits in a batch (ms).
    pub const BATCH_MAX_DELAY_MS: &str = "STREAMPIPE_BATCH_MAX_DELAY_MS";
    /// Reducer: consumer group session timeout (ms).
    pub const SESSION_TIMEOUT_MS: &str = "STREAMPIPE_SESSION_TIMEOUT_MS";
    /// Reducer: seconds from SIGTERM to exit at the latest.
    pub const SHUTDOWN_GRACE_SECONDS: &str = "STREAMPIPE_SHUTDOWN_GRACE_SECONDS";
    /// Reducer: largest version jump over a market's stored version.
    pub const MAX_VERSION_JUMP: &str = "STREAMPIPE_MAX_VERSION_JUMP";
    /// Publisher: markets the demo page shows.
    pub const DEMO_MARKETS: &str = "STREAMPIPE_DEMO_MARKETS";
    /// Publisher: idle channel lifetime (s).
    pub const CHANNEL_IDLE_TTL_SECONDS: &str = "STREAMPIPE_CHANNEL_IDLE_TTL_SECONDS";
    /// Extra librdkafka properties (tuning only; security keys are refused).
    pub const KAFKA_OPTIONS: &str = "STREAMPIPE_KAFKA_OPTIONS";
    /// Kafka `security.protocol`.
    pub const KAFKA_SECURITY_PROTOCOL: &str = "STREAMPIPE_KAFKA_SECURITY_PROTOCOL";
    /// Kafka SASL mechanism.
    pub const KAFKA_SASL_MECHANISM: &str = "STREAMPIPE_KAFKA_SASL_MECHANISM";
    /// Kafka SASL user name.
    pub const KAFKA_SASL_USERNAME: &str = "STREAMPIPE_KAFKA_SASL_USERNAME";
    /// Kafka SASL password (from a Secret).
    pub const KAFKA_SASL_PASSWORD: &str = "STREAMPIPE_KAFKA_SASL_PASSWORD";
    /// PEM file of the CAs that sign the brokers' certificates.
    pub const KAFKA_TLS_CA_FILE: &str = "STREAMPIPE_KAFKA_TLS_CA_FILE";
    /// PEM file of the client certificate (mutual TLS).
    pub const KAFKA_TLS_CERT_FILE: &str = "STREAMPIPE_KAFKA_TLS_CERT_FILE";
    /// PEM file of the client key (mutual TLS).
    pub const KAFKA_TLS_KEY_FILE: &str = "STREAMPIPE_KAFKA_TLS_KEY_FILE";
    /// Redis password (from a Secret); overrides one in the URL.
    pub const REDIS_PASSWORD: &str = "STREAMPIPE_REDIS_PASSWORD";
    /// PEM file of the CAs that sign Redis' certificate (`rediss://`).
    pub const REDIS_TLS_CA_FILE: &str = "STREAMPIPE_REDIS_TLS_CA_FILE";
    /// PEM file of the client certificate for Redis.
    pub const REDIS_TLS_CERT_FILE: &str = "STREAMPIPE_REDIS_TLS_CERT_FILE";
    /// PEM file of the client key for Redis.
    pub const REDIS_TLS_KEY_FILE: &str = "STREAMPIPE_REDIS_TLS_KEY_FILE";
    /// Publisher: `token` (default: every request carries a signed token)
    /// or `anonymous` (public odds, per-IP limits).
    pub const AUTH_MODE: &str = "STREAMPIPE_AUTH_MODE";
    /// Publisher: the HS256 secret itself (from a Secret; never logged).
    pub const AUTH_HS256_SECRET: &str = "STREAMPIPE_AUTH_HS256_SECRET";
    /// Publisher: a file holding the HS256 secret (a mounted Secret).
    pub const AUTH_HS256_SECRET_FILE: &str = "STREAMPIPE_AUTH_HS256_SECRET_FILE";
    /// Publisher: PEM file of the RSA public key that verifies RS256 tokens.
    pub const AUTH_RSA_PUBLIC_KEY_FILE: &str = "STREAMPIPE_AUTH_RSA_PUBLIC_KEY_FILE";
    /// Publisher: PEM file of the EC (P-256) public key that verifies ES256 tokens.
    pub const AUTH_EC_PUBLIC_KEY_FILE: &str = "STREAMPIPE_AUTH_EC_PUBLIC_KEY_FILE";
    /// Publisher: the `aud` tokens must carry (unset: not checked).
    pub const AUTH_AUDIENCE: &str = "STREAMPIPE_AUTH_AUDIENCE";
    /// Publisher: the `iss` tokens must carry (unset: not checked).
    pub const AUTH_ISSUER: &str = "STREAMPIPE_AUTH_ISSUER";
    /// Publisher, development only: `POST /v1/dev/token` mints HS256 tokens
    /// for anyone who asks (the live page and the demo use it).
    pub const DEV_TOKENS: &str = "STREAMPIPE_DEV_TOKENS";
    /// Publisher: most open streams per client per pod.
    pub const MAX_STREAMS_PER_CLIENT: &str = "STREAMPIPE_MAX_STREAMS_PER_CLIENT";
    /// Publisher: most channels per client.
    pub const MAX_CHANNELS_PER_CLIENT: &str = "STREAMPIPE_MAX_CHANNELS_PER_CLIENT";
    /// Publisher, benchmarks only: no per-client rate limits or caps (a
    /// load generator is one client opening thousands of streams).
    pub const BENCH_NO_CLIENT_LIMITS: &str = "STREAMPIPE_BENCH_NO_CLIENT_LIMITS";
    /// Publisher: a header carrying the client's address, set by a trusted
    /// proxy in front (e.g. `X-Real-IP`); unset: the peer address.
    pub const CLIENT_IP_HEADER: &str = "STREAMPIPE_CLIENT_IP_HEADER";
}

/// Publisher authentication modes (`STREAMPIPE_AUTH_MODE`).
pub mod auth_mode {
    /// Every API call and stream carries a signed token (the default).
    pub const TOKEN: &str = "token";
    /// No tokens: public odds, channels bound to nobody, per-IP limits.
    pub const ANONYMOUS: &str = "anonymous";
}

/// WebSocket subprotocol of the stream protocol version 2 (the server
/// echoes only this; the token rides next to it as `bearer.<jwt>`).
pub const WS_PROTOCOL: &str = "streampipe.v2";
/// Prefix of the subprotocol entry that carries a token.
pub const WS_BEARER_PREFIX: &str = "bearer.";

/// Default data topic of a pipeline.
pub fn default_data_topic(pipeline: &str) -> String {
    format!("{pipeline}.data")
}

/// Default command topic of a pipeline.
pub fn default_command_topic(pipeline: &str) -> String {
    format!("{pipeline}.commands")
}

/// Default dead-letter topic of a pipeline (the operator used to derive it
/// from the data topic while the binaries used the pipeline; this is the one).
pub fn default_dead_letter_topic(pipeline: &str) -> String {
    format!("{pipeline}.dead-letter")
}

/// Default consumer group of a pipeline's reducers.
pub fn default_group(pipeline: &str) -> String {
    format!("{pipeline}.reducers")
}

/// A secret string: usable, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// Kafka `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecurityProtocol {
    /// No TLS, no SASL.
    #[default]
    Plaintext,
    /// TLS, no SASL.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// Every value, for help texts and the CRD schema.
    pub const ALL: [&'static str; 4] = ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"];

    /// librdkafka's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "PLAINTEXT",
            Self::Ssl => "SSL",
            Self::SaslPlaintext => "SASL_PLAINTEXT",
            Self::SaslSsl => "SASL_SSL",
        }
    }

    /// Whether the protocol authenticates with SASL.
    pub fn sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    /// Whether the protocol runs over TLS.
    pub fn tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }
}

impl std::str::FromStr for SecurityProtocol {
    type Err = ContractError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "PLAINTEXT" => Ok(Self::Plaintext),
            "SSL" => Ok(Self::Ssl),
            "SASL_PLAINTEXT" => Ok(Self::SaslPlaintext),
            "SASL_SSL" => Ok(Self::SaslSsl),
            _ => Err(ContractError::Config(format!(
                "unknown Kafka security protocol {s:?}; expected one of {:?}",
                Self::ALL
            ))),
        }
    }
}

/// Kafka SASL mechanism (those librdkafka supports without cyrus-sasl).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    /// `PLAIN` (only sensible over TLS).
    Plain,
    /// `SCRAM-SHA-256`.
    ScramSha256,
    /// `SCRAM-SHA-512`.
    ScramSha512,
}

impl SaslMechanism {
    /// Every value, for help texts and the CRD schema.
    pub const ALL: [&'static str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

    /// librdkafka's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

impl std::str::FromStr for SaslMechanism {
    type Err = ContractError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "PLAIN" => Ok(Self::Plain),
            "SCRAM-SHA-256" => Ok(Self::ScramSha256),
            "SCRAM-SHA-512" => Ok(Self::ScramSha512),
            _ => Err(ContractError::Config(format!(
                "unknown SASL mechanism {s:?}; expected one of {:?}",
                Self::ALL
            ))),
        }
    }
}

/// A PEM document: a file the client reads, or its text (the operator's lag
/// reader gets certificates from the API server, not from files).
#[derive(Clone, PartialEq, Eq)]
pub enum Pem {
    /// Path of a PEM file.
    File(PathBuf),
    /// The PEM text itself.
    Inline(String),
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pem::File(p) => write!(f, "File({})", p.display()),
            Pem::Inline(_) => f.write_str("Inline(<redacted>)"),
        }
    }
}

/// How a Kafka client authenticates and encrypts. Validated by
/// [`KafkaSecurity::properties`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KafkaSecurity {
    /// `security.protocol`.
    pub protocol: SecurityProtocol,
    /// SASL mechanism (required with a SASL protocol).
    pub mechanism: Option<SaslMechanism>,
    /// SASL user name.
    pub username: Option<String>,
    /// SASL password.
    pub password: Option<Secret>,
    /// CAs that sign the brokers' certificates; the system's when absent.
    pub ca: Option<Pem>,
    /// Client certificate (mutual TLS).
    pub cert: Option<Pem>,
    /// Client key (mutual TLS).
    pub key: Option<Pem>,
}

/// Prefixes of librdkafka properties that only [`KafkaSecurity`] may set:
/// through the generic option list they would bypass its validation and put
/// secrets where they get logged.
pub const RESERVED_KAFKA_OPTION_PREFIXES: [&str; 4] = ["security.", "sasl.", "ssl.", "ssl_"];

/// Checks one generic librdkafka property (`--kafka-option`): security
/// settings have their own flags and are refused here. The error names the
/// key only, never the value.
pub fn check_kafka_option(key: &str) -> Result<(), ContractError> {
    let k = key.trim().to_ascii_lowercase();
    if k.is_empty() {
        return Err(ContractError::Config("empty Kafka option key".into()));
    }
    if RESERVED_KAFKA_OPTION_PREFIXES
        .iter()
        .any(|p| k.starts_with(p))
    {
        return Err(ContractError::Config(format!(
            "Kafka option {key:?} is a security setting; use the dedicated --kafka-security-protocol / --kafka-sasl-* / --kafka-tls-* flags"
        )));
    }
    Ok(())
}

/// Splits one generic librdkafka option `key=value` (the `--kafka-option`
/// value parser of both binaries); security keys are refused (they have
/// their own flags), and errors never echo the value.
pub fn parse_kafka_option(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| "expected key=value".to_owned())?;
    check_kafka_option(k).map_err(|e| e.to_string())?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

impl KafkaSecurity {
    /// The librdkafka properties for these settings, after checking they
    /// make sense together. Errors never contain the password or a key.
    pub fn properties(&self) -> Result<Vec<(&'static str, String)>, ContractError> {
        let bad = |m: &str| Err(ContractError::Config(format!("Kafka security: {m}")));
        let p = self.protocol;
        let mut out = vec![("security.protocol", p.as_str().to_owned())];
        if p.sasl() {
            let (Some(m), Some(u), Some(pw)) = (self.mechanism, &self.username, &self.password)
            else {
                return bad(&format!(
                    "{} needs a SASL mechanism, user name and password",
                    p.as_str()
                ));
            };
            if u.is_empty() {
                return bad("the SASL user name is empty");
            }
            out.push(("sasl.mechanism", m.as_str().to_owned()));
            out.push(("sasl.username", u.clone()));
            out.push(("sasl.password", pw.expose().to_owned()));
        } else if self.mechanism.is_some() || self.username.is_some() || self.password.is_some() {
            return bad(&format!(
                "SASL settings given but the protocol is {}",
                p.as_str()
            ));
        }
        if !p.tls() && (self.ca.is_some() || self.cert.is_some() || self.key.is_some()) {
            return bad(&format!(
                "TLS files given but the protocol is {}",
                p.as_str()
            ));
        }
        if self.cert.is_some() != self.key.is_some() {
            return bad("a client certificate needs its key and the other way round");
        }
        let mut pem = |pem: &Option<Pem>, location: &'static str, inline: &'static str| match pem {
            Some(Pem::File(f)) => out.push((location, f.display().to_string())),
            Some(Pem::Inline(t)) => out.push((inline, t.clone())),
            None => {}
        };
        pem(&self.ca, "ssl.ca.location", "ssl.ca.pem");
        pem(
            &self.cert,
            "ssl.certificate.location",
            "ssl.certificate.pem",
        );
        pem(&self.key, "ssl.key.location", "ssl.key.pem");
        Ok(out)
    }
}

/// TLS settings of a `rediss://` connection. Plain `redis://` URLs must
/// not come with them (checked by [`RedisTls::load`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// CAs that sign Redis' certificate; the system's when absent.
    pub ca_file: Option<PathBuf>,
    /// Client certificate.
    pub cert_file: Option<PathBuf>,
    /// Client key.
    pub key_file: Option<PathBuf>,
}

/// Redis TLS material read from files: the CA bundle and the client
/// certificate and key, PEM. `Debug` shows only which parts are present.
#[derive(Clone, Default)]
pub struct RedisTlsPem {
    /// CA bundle.
    pub ca: Option<Vec<u8>>,
    /// Client certificate and key.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for RedisTlsPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTlsPem")
            .field("ca", &self.ca.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

/// The URLs of a Redis address setting: one URL, or a Redis Cluster's
/// comma-separated seed list (blanks around and between entries ignored).
pub fn redis_urls(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// Every rotation of a cluster's seed list, the given order first. Cluster
/// clients ask the seeds in order on each (re)connect, so a frozen first
/// seed (it accepts connections and answers nothing) would cost a timeout
/// every time; a client per rotation lets each reconnect start elsewhere.
pub fn seed_rotations(url: &str) -> Vec<Vec<&str>> {
    let seeds = redis_urls(url);
    (0..seeds.len().max(1))
        .map(|r| {
            let mut rotated = seeds.clone();
            rotated.rotate_left(r.min(seeds.len()));
            rotated
        })
        .collect()
}

/// Whether a Redis URL (or each of a comma-separated list) is `rediss://`.
pub fn redis_url_is_tls(url: &str) -> bool {
    redis_urls(url).iter().all(|u| u.starts_with("rediss://"))
}

impl RedisTls {
    /// Whether any file is configured.
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Reads the files for a connection to `url`. `None` for a plain URL;
    /// an error when files are given for a plain URL, when a list mixes
    /// schemes, when only one of certificate and key is given, or when a
    /// file cannot be read (named by path, its content never shown).
    pub fn load(&self, url: &str) -> Result<Option<RedisTlsPem>, ContractError> {
        let urls = redis_urls(url);
        let tls = urls.iter().filter(|u| u.starts_with("rediss://")).count();
        if tls != 0 && tls != urls.len() {
            return Err(ContractError::Config(
                "Redis URLs mix redis:// and rediss://".into(),
            ));
        }
        if tls == 0 {
            if self.is_set() {
                return Err(ContractError::Config(
                    "Redis TLS files given but the URL is not rediss://".into(),
                ));
            }
            return Ok(None);
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(ContractError::Config(
                "a Redis client certificate needs its key and the other way round".into(),
            ));
        }
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| {
                ContractError::Config(format!("reading Redis TLS file {}: {e}", p.display()))
            })
        };
        let ca = self.ca_file.as_ref().map(read).transpose()?;
        let client = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        Ok(Some(RedisTlsPem { ca, client }))
    }
}

/// Sets the password of a `redis[s]://` URL (a password from its own Secret
/// wins over one in the URL). The URL then holds a secret: never log it.
pub fn redis_url_with_password(url: &str, password: &Secret) -> Result<String, ContractError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| ContractError::Config("the Redis URL has no scheme".into()))?;
    let (userinfo, host) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let user = userinfo
        .map(|u| u.split_once(':').map_or(u, |(user, _)| user))
        .unwrap_or("");
    Ok(format!(
        "{scheme}://{user}:{}@{host}",
        percent_encode(password.expose())
    ))
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so any
/// password survives URL parsing.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(feature = "cli")]
mod cli {
    use std::path::PathBuf;

    use super::{env, KafkaSecurity, Pem, RedisTls, SaslMechanism, Secret};
    use crate::message::ContractError;

    /// Kafka security flags, shared by the reducer and the publisher.
    #[derive(Debug, Clone, clap::Args)]
    pub struct KafkaSecurityArgs {
        /// Kafka security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.
        #[arg(long, env = env::KAFKA_SECURITY_PROTOCOL, default_value = "PLAINTEXT")]
        pub kafka_security_protocol: String,
        /// SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
        #[arg(long, env = env::KAFKA_SASL_MECHANISM)]
        pub kafka_sasl_mechanism: Option<String>,
        /// SASL user name.
        #[arg(long, env = env::KAFKA_SASL_USERNAME)]
        pub kafka_sasl_username: Option<String>,
        /// SASL password (prefer the environment variable, from a Secret).
        #[arg(long, env = env::KAFKA_SASL_PASSWORD, hide_env_values = true)]
        pub kafka_sasl_password: Option<Secret>,
        /// PEM file of the CAs that sign the brokers' certificates [default: the system's].
        #[arg(long, env = env::KAFKA_TLS_CA_FILE)]
        pub kafka_tls_ca_file: Option<PathBuf>,
        /// PEM file of the client certificate (mutual TLS).
        #[arg(long, env = env::KAFKA_TLS_CERT_FILE)]
        pub kafka_tls_cert_file: Option<PathBuf>,
        /// PEM file of the client key (mutual TLS).
        #[arg(long, env = env::KAFKA_TLS_KEY_FILE)]
        pub kafka_tls_key_file: Option<PathBuf>,
    }

    impl KafkaSecurityArgs {
        /// The validated settings.
        pub fn security(&self) -> Result<KafkaSecurity, ContractError> {
            let s = KafkaSecurity {
                protocol: self.kafka_security_protocol.parse()?,
                mechanism: self
                    .kafka_sasl_mechanism
                    .as_deref()
                    .filter(|m| !m.is_empty())
                    .map(str::parse::<SaslMechanism>)
                    .transpose()?,
                username: self.kafka_sasl_username.clone().filter(|u| !u.is_empty()),
                password: self
                    .kafka_sasl_password
                    .clone()
                    .filter(|p| !p.expose().is_empty()),
                ca: self.kafka_tls_ca_file.clone().map(Pem::File),
                cert: self.kafka_tls_cert_file.clone().map(Pem::File),
                key: self.kafka_tls_key_file.clone().map(Pem::File),
            };
            s.properties()?;
            Ok(s)
        }
    }

    /// Redis TLS and password flags, shared by the reducer and the publisher.
    #[derive(Debug, Clone, clap::Args)]
    pub struct RedisTlsArgs {
        /// Redis password; overrides one in the URL (prefer the environment variable, from a Secret).
        #[arg(long, env = env::REDIS_PASSWORD, hide_env_values = true)]
        pub redis_password: Option<Secret>,
        /// PEM file of the CAs that sign Redis' certificate (rediss:// URLs) [default: the system's].
        #[arg(long, env = env::REDIS_TLS_CA_FILE)]
        pub redis_tls_ca_file: Option<PathBuf>,
        /// PEM file of the client certificate for Redis.
        #[arg(long, env = env::REDIS_TLS_CERT_FILE)]
        pub redis_tls_cert_file: Option<PathBuf>,
        /// PEM file of the client key for Redis.
        #[arg(long, env = env::REDIS_TLS_KEY_FILE)]
        pub redis_tls_key_file: Option<PathBuf>,
    }

    impl RedisTlsArgs {
        /// The TLS files.
        pub fn tls(&self) -> RedisTls {
            RedisTls {
                ca_file: self.redis_tls_ca_file.clone(),
                cert_file: self.redis_tls_cert_file.clone(),
                key_file: self.redis_tls_key_file.clone(),
            }
        }

        /// `url` (each of a comma-separated list) with the password set, if one is given.
        pub fn url_with_password(&self, url: &str) -> Result<String, ContractError> {
            match self
                .redis_password
                .as_ref()
                .filter(|p| !p.expose().is_empty())
            {
                None => Ok(url.to_owned()),
                Some(pw) => Ok(url
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(|u| super::redis_url_with_password(u, pw))
                    .collect::<Result<Vec<_>, _>>()?
                    .join(",")),
            }
        }
    }
}

#[cfg(feature = "cli")]
pub use cli::{KafkaSecurityArgs, RedisTlsArgs};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_lists_are_parsed_and_rotated() {
        assert_eq!(
            redis_urls(" redis://a:1 ,, redis://b:2,"),
            ["redis://a:1", "redis://b:2"]
        );
        assert_eq!(
            seed_rotations("redis://a,redis://b,redis://c"),
            [
                vec!["redis://a", "redis://b", "redis://c"],
                vec!["redis://b", "redis://c", "redis://a"],
                vec!["redis://c", "redis://a", "redis://b"],
            ]
        );
        assert_eq!(seed_rotations("redis://one"), [vec!["redis://one"]]);
        assert_eq!(seed_rotations(""), [Vec::<&str>::new()]);
    }

    fn sasl() -> KafkaSecurity {
        KafkaSecurity {
            protocol: SecurityProtocol::SaslSsl,
            mechanism: Some(SaslMechanism::ScramSha512),
            username: Some("alice".into()),
            password: Some(Secret::new("pa,ss=w0rd")),
            ca: Some(Pem::File("/etc/ca.pem".into())),
            ..Default::default()
        }
    }

    #[test]
    fn sasl_ssl_yields_dedicated_properties_and_keeps_commas() {
        let p = sasl().properties().unwrap();
        assert!(p.contains(&("security.protocol", "SASL_SSL".into())));
        assert!(p.contains(&("sasl.mechanism", "SCRAM-SHA-512".into())));
        assert!(p.contains(&("sasl.password", "pa,ss=w0rd".into())));
        assert!(p.contains(&("ssl.ca.location", "/etc/ca.pem".into())));
    }

    #[test]
    fn secrets_are_redacted_and_never_in_errors() {
        let s = sasl();
        assert!(!format!("{s:?}").contains("w0rd"));
        let mut bad = s.clone();
        bad.mechanism = None;
        let e = bad.properties().unwrap_err().to_string();
        assert!(!e.contains("w0rd"), "{e}");
        let mut bad = s;
        bad.protocol = SecurityProtocol::Ssl;
        let e = bad.properties().unwrap_err().to_string();
        assert!(!e.contains("w0rd"), "{e}");
        let inline = Pem::Inline("-----BEGIN PRIVATE KEY-----".into());
        assert!(!format!("{inline:?}").contains("PRIVATE"));
    }

    #[test]
    fn invalid_combinations_are_refused() {
        let plain = KafkaSecurity::default();
        assert_eq!(plain.properties().unwrap().len(), 1);
        let mut cert_only = KafkaSecurity {
            protocol: SecurityProtocol::Ssl,
            cert: Some(Pem::File("c".into())),
            ..Default::default()
        };
        assert!(cert_only.properties().is_err());
        cert_only.key = Some(Pem::Inline("k".into()));
        let p = cert_only.properties().unwrap();
        assert!(p.contains(&("ssl.key.pem", "k".into())));
        let tls_on_plain = KafkaSecurity {
            ca: Some(Pem::File("ca".into())),
            ..Default::default()
        };
        assert!(tls_on_plain.properties().is_err());
        assert!("sasl_ssl".parse::<SecurityProtocol>().is_ok());
        assert!("TLS".parse::<SecurityProtocol>().is_err());
        assert!("GSSAPI".parse::<SaslMechanism>().is_err());
    }

    #[test]
    fn generic_options_cannot_set_security() {
        for k in [
            "sasl.password",
            "SSL.key.location",
            "security.protocol",
            "ssl_engine_id",
        ] {
            assert!(check_kafka_option(k).is_err(), "{k}");
        }
        assert!(check_kafka_option("linger.ms").is_ok());
        assert!(check_kafka_option(" ").is_err());
    }

    #[test]
    fn redis_tls_needs_rediss_and_pairs() {
        let none = RedisTls::default();
        assert!(none.load("redis://h:1").unwrap().is_none());
        let ca = RedisTls {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        assert!(ca.load("redis://h:1").is_err(), "files without TLS");
        let e = ca.load("rediss://h:1").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        assert!(none.load("rediss://a:1,redis://b:2").is_err(), "mixed");
        let half = RedisTls {
            cert_file: Some("c".into()),
            ..Default::default()
        };
        assert!(half.load("rediss://h:1").is_err());
        assert!(redis_url_is_tls("rediss://a:1, rediss://b:2"));
    }

    #[test]
    fn redis_password_is_encoded_into_the_url() {
        let pw = Secret::new("p@ss:w/rd,x");
        assert_eq!(
            redis_url_with_password("rediss://h:6380/0", &pw).unwrap(),
            "rediss://:p%40ss%3Aw%2Frd%2Cx@h:6380/0"
        );
        assert_eq!(
            redis_url_with_password("redis://bob:old@h:1", &pw).unwrap(),
            "redis://bob:p%40ss%3Aw%2Frd%2Cx@h:1"
        );
    }

    #[test]
    fn defaults_follow_the_pipeline_name() {
        assert_eq!(default_dead_letter_topic("odds"), "odds.dead-letter");
        assert_eq!(default_group("odds"), "odds.reducers");
        assert_eq!(default_data_topic("odds"), "odds.data");
        assert_eq!(default_command_topic("odds"), "odds.commands");
    }
}
