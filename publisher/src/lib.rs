//! streampipe's publisher: the browser edge.
//!
//! - [`api`]: the REST control API (channels, markets, begin, close) that
//!   turns requests into Kafka commands, plus market snapshots.
//! - [`ws`] and [`sse`]: the streams, opened alike by [`opening`] (checks,
//!   ownership, stream cap, join, first begin); each connection joins its channel on
//!   the pod's multiplexed Redis subscription ([`hub`]: per-market topics,
//!   kept by the [`subscriber`] task, routed by the [`table`] through the
//!   bounded [`ingest`] queue) and drains
//!   its own bounded, conflating [`outbox`].
//! - [`registry`], [`commands`]: Redis and Kafka adapters ([`redis_conn`]:
//!   the registry's connection, rebuilt when a cluster one stops answering); [`pubsub`] and
//!   [`resp`]: our own bounded subscribed-mode Redis connection.
//! - [`limits`]: the control API's bounds and its token bucket.
//! - [`epoch`]: noticing a Redis that lost its data and writing this pod's
//!   channels back.
//! - [`cli`]: flags and environment (names from the deployment contract).
//! - The live odds page and the JS client are embedded static files.

// warp's composed filter types are deep; release builds need a higher limit.
#![recursion_limit = "256"]

pub mod api;
pub mod auth;
pub mod channels;
pub mod cli;
pub mod clients;
pub mod commands;
pub mod delivery_log;
pub mod epoch;
pub mod error;
pub mod frames;
pub mod history;
pub mod hub;
pub mod ingest;
pub mod janitor;
pub mod lag;
pub mod limits;
pub mod metrics;
pub mod opening;
pub mod origin;
pub mod outbox;
pub mod pubsub;
pub mod queries;
pub mod reconcile;
pub mod redis_conn;
pub mod registry;
pub mod resp;
pub mod server;
pub mod snapshot;
pub mod snapshot_core;
pub mod sse;
pub mod subscriber;
pub mod table;
pub mod ws;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Deserialize;
use streampipe_contract::deploy::{self, KafkaSecurity, RedisTls};
use streampipe_contract::Keys;
use tokio::sync::watch;
use warp::http::StatusCode;
use warp::{Filter, Reply};

pub use error::{Error, Result};
pub use metrics::Metrics;

/// Publisher settings (the binary fills them from flags and environment).
#[derive(Debug, Clone)]
pub struct Config {
    /// Pipeline name (Redis prefix).
    pub pipeline: String,
    /// Kubernetes namespace of the pipeline, part of the Redis key prefix.
    pub key_namespace: Option<String>,
    /// Kafka topic of the delivery log; `None`: no log.
    pub delivery_log_topic: Option<String>,
    /// Which markets keep an event history (replayed on `begin` with
    /// `since`, never conflated; see [`history`]).
    pub history: streampipe_contract::History,
    /// Redis URL (with `redis_cluster`: comma-separated seed node URLs).
    pub redis_url: String,
    /// Redis is a Redis Cluster: sharded topics, one subscription per master.
    pub redis_cluster: bool,
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// The command topic.
    pub command_topic: String,
    /// Extra librdkafka properties (tuning; security keys are refused).
    pub kafka_options: Vec<(String, String)>,
    /// Kafka TLS and SASL, each its own setting.
    pub kafka_security: KafkaSecurity,
    /// TLS files for a `rediss://` URL.
    pub redis_tls: RedisTls,
    /// Which web pages may use the API and streams (see [`origin`]).
    pub origins: origin::OriginPolicy,
    /// Longest life of an SSE stream (see [`sse`]).
    pub sse_max_lifetime: std::time::Duration,
    /// Markets the demo page shows (`GET /v1/demo/markets`).
    pub demo_markets: Vec<String>,
    /// A channel with no stream for this long is closed.
    pub channel_idle_ttl: std::time::Duration,
    /// How often pods mark live channels and one of them sweeps idle ones.
    pub janitor_interval: std::time::Duration,
    /// Most open connections on the public port (see [`server`]).
    pub max_connections: usize,
    /// Kernel send buffer per client socket, 0 for the kernel's autotuning
    /// (see [`server::DEFAULT_SOCKET_SEND_BUFFER`]).
    pub socket_send_buffer: usize,
    /// Tokens or anonymous (see [`auth`]).
    pub auth: auth::AuthConfig,
    /// Per-client limits (see [`clients`]).
    pub client_limits: clients::ClientLimits,
    /// The reducers' consumer group (its command lag is read, see [`lag`]).
    pub reducer_group: String,
    /// Command lag beyond which command paths answer 429.
    pub max_command_lag: i64,
    /// How snapshots may be cached (see [`snapshot`]).
    pub snapshot: snapshot_core::CachePolicy,
}

/// Default channel TTL: a tab left closed for a day does not come back to
/// the same channel; one that does gets 4404 and makes a new one.
pub const DEFAULT_CHANNEL_IDLE_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Default janitor period: marks cost one ZADD per pod per period.
pub const DEFAULT_JANITOR_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

impl Config {
    /// Defaults for a pipeline.
    pub fn new(brokers: &str, pipeline: &str, redis_url: &str) -> Self {
        Config {
            pipeline: pipeline.into(),
            key_namespace: None,
            delivery_log_topic: None,
            history: streampipe_contract::History::off(),
            redis_url: redis_url.into(),
            redis_cluster: false,
            brokers: brokers.into(),
            command_topic: deploy::default_command_topic(pipeline),
            kafka_options: Vec::new(),
            kafka_security: KafkaSecurity::default(),
            redis_tls: RedisTls::default(),
            origins: origin::OriginPolicy::default(),
            sse_max_lifetime: sse::DEFAULT_MAX_LIFETIME,
            demo_markets: Vec::new(),
            channel_idle_ttl: DEFAULT_CHANNEL_IDLE_TTL,
            janitor_interval: DEFAULT_JANITOR_INTERVAL,
            max_connections: server::DEFAULT_MAX_CONNECTIONS,
            socket_send_buffer: server::DEFAULT_SOCKET_SEND_BUFFER,
            auth: auth::AuthConfig::default(),
            client_limits: clients::ClientLimits::default(),
            reducer_group: deploy::default_group(pipeline),
            max_command_lag: lag::MAX_COMMAND_LAG,
            snapshot: snapshot_core::CachePolicy::default(),
        }
    }
}

/// Everything the handlers share.
pub struct Context {
    /// Settings.
    pub config: Config,
    /// Redis registry and state reads.
    pub registry: registry::Registry,
    /// Kafka command producer.
    pub commands: commands::Commands,
    /// The multiplexed Redis subscription.
    pub hub: hub::Hub,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Command rate limit.
    pub limiter: api::RateLimiter,
    /// Token verification (or anonymous).
    pub auth: auth::Auth,
    /// Per-client buckets and stream counts.
    pub clients: Arc<clients::Clients>,
    /// The reducers' command lag, read in the background.
    pub command_lag: Arc<lag::CommandLag>,
    /// Bytes queued in all of this pod's outboxes (see [`outbox::Budget`]).
    pub outbox_budget: Arc<outbox::Budget>,
    /// Becomes true when the publisher shuts down.
    pub shutdown: watch::Receiver<bool>,
}

impl Context {
    /// Whether a stream request from `origin` (to `host`) may connect.
    pub fn origin_allowed(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        self.config.origins.allows(origin, host)
    }
}

/// Query parameters of the stream endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct StreamParams {
    /// `begin=1`: publish the current state at once.
    #[serde(default, deserialize_with = "flag")]
    pub begin: bool,
    /// `since=m1@12,m2@5`: resume after these versions.
    #[serde(default)]
    pub since: Option<String>,
    /// `from_ms=<ms>`: resume history markets without a `since` entry from
    /// this time (see `history`).
    #[serde(default)]
    pub from_ms: Option<u64>,
    /// SSE: the one-time ticket from `POST /v1/channels/<id>/tickets`.
    #[serde(default)]
    pub ticket: Option<String>,
    /// Refused: tokens never go in a URL (logs, history, Referer).
    #[serde(default)]
    pub token: Option<String>,
    /// Refused like `token`.
    #[serde(default)]
    pub access_token: Option<String>,
}

fn flag<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    let s = String::deserialize(d)?;
    Ok(matches!(s.as_str(), "1" | "true" | "yes"))
}

impl StreamParams {
    /// Whether the URL carries a token (refused with 400 `token_in_url`).
    pub fn token_in_url(&self) -> bool {
        self.token.is_some() || self.access_token.is_some()
    }

    /// Parses `since` (`market@version,…`) into market → version, checked
    /// like a begin frame's ([`frames::checked_since`]).
    pub fn since(&self) -> std::result::Result<HashMap<Arc<str>, u64>, String> {
        let Some(s) = self.since.as_deref().filter(|s| !s.is_empty()) else {
            return Ok(HashMap::new());
        };
        let mut entries = Vec::new();
        for part in s.split(',') {
            let (m, v) = part
                .rsplit_once('@')
                .ok_or_else(|| format!("since entry {part:?} is not market@version"))?;
            let v: u64 = v
                .parse()
                .map_err(|_| format!("since version {v:?} is not a number"))?;
            entries.push((m, v));
        }
        frames::checked_since(entries)
    }
}

/// Builds the shared context: connects Redis, creates the producer, starts the hub.
pub async fn context(
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<Arc<Context>> {
    // First: a publisher in token mode without keys must not start.
    let auth = auth::Auth::new(&config.auth)?;
    let keys = Keys::scoped(config.key_namespace.as_deref(), &config.pipeline);
    let tls = config
        .redis_tls
        .load(&config.redis_url)
        .map_err(|e| Error::Config(e.to_string()))?;
    let registry = registry::Registry::connect(
        &config.redis_url,
        keys.clone(),
        config.redis_cluster,
        tls.as_ref(),
        metrics.redis_cluster_rebuilds.clone(),
    )
    .await?;
    let commands = commands::Commands::new(
        &config.brokers,
        &config.command_topic,
        &config.kafka_security,
        &config.kafka_options,
    )?;
    let target = pubsub::Target::from_url(&config.redis_url, config.redis_cluster, tls.as_ref())?;
    let delivery_log = match config.delivery_log_topic.as_deref() {
        Some(topic) => Some(delivery_log::start(
            &config.brokers,
            topic,
            &config.kafka_security,
            &config.kafka_options,
            metrics.clone(),
        )?),
        None => None,
    };
    let hub = hub::Hub::start(
        target,
        keys,
        registry.clone(),
        metrics.clone(),
        delivery_log,
        Some(commands.clone()),
        config.history.clone(),
    )?;
    let command_lag = Arc::new(lag::CommandLag::default());
    lag::spawn(
        commands::producer_config(
            &config.brokers,
            &config.kafka_security,
            &config.kafka_options,
        )?,
        &config.reducer_group,
        config.command_topic.clone(),
        command_lag.clone(),
        shutdown.clone(),
    )?;
    let clients = Arc::new(clients::Clients::new(config.client_limits));
    let ctx = Arc::new(Context {
        auth,
        clients,
        command_lag,
        config,
        registry,
        commands,
        hub,
        metrics,
        limiter: api::RateLimiter::new(api::MAX_COMMANDS_PER_SECOND),
        outbox_budget: Arc::default(),
        shutdown,
    });
    janitor::spawn(ctx.clone());
    epoch::spawn(ctx.hub.clone(), ctx.shutdown.clone());
    Ok(ctx)
}

const INDEX_HTML: &str = include_str!("../static/index.html");
const CLIENT_JS: &str = include_str!("../static/streampipe.js");

fn static_file(body: &'static str, content_type: &'static str) -> warp::reply::Response {
    warp::reply::with_header(body, "content-type", content_type).into_response()
}

type Route = warp::filters::BoxedFilter<(warp::reply::Response,)>;

/// `/healthz` and `/readyz`: served on both ports (the public one for
/// load balancers, the internal one next to `/metrics`).
fn probes(ctx: &Arc<Context>) -> (Route, Route) {
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::with_status("ok\n", StatusCode::OK).into_response())
        .boxed();
    let c = ctx.clone();
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .map(move || {
            if c.hub.is_connected() && !*c.shutdown.borrow() {
                warp::reply::with_status("ok\n", StatusCode::OK).into_response()
            } else {
                warp::reply::with_status("not ready\n", StatusCode::SERVICE_UNAVAILABLE)
                    .into_response()
            }
        })
        .boxed();
    (healthz, readyz)
}

/// The internal port's routes: `/metrics` (never on the public port: it
/// names channels' counts, error reasons and backend state) and the probes.
pub fn internal_routes(
    ctx: Arc<Context>,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let m = ctx.metrics.clone();
    let metrics = warp::path!("metrics").and(warp::get()).map(move || {
        warp::reply::with_header(m.render(), "content-type", "text/plain; version=0.0.4")
            .into_response()
    });
    let (healthz, readyz) = probes(&ctx);
    metrics
        .or(healthz)
        .unify()
        .or(readyz)
        .unify()
        .recover(|_| async {
            Ok::<_, Infallible>(
                warp::reply::with_status("not found\n", StatusCode::NOT_FOUND).into_response(),
            )
        })
        .unify()
}

/// Every public route of the publisher.
pub fn routes(
    ctx: Arc<Context>,
) -> impl Filter<Extract = (impl Reply,), Error = Infallible> + Clone {
    let c = ctx.clone();
    let with_ctx = warp::any().map(move || c.clone());
    let stream = warp::path!("v1" / "stream" / String)
        .and(warp::get())
        .and(warp::header::optional::<String>("connection"))
        .and(warp::header::optional::<String>("upgrade"))
        .and(warp::header::optional::<String>("sec-websocket-version"))
        .and(warp::header::optional::<String>("sec-websocket-key"))
        .and(warp::header::optional::<String>("origin"))
        .and(warp::header::optional::<String>("host"))
        .and(warp::header::optional::<String>("sec-websocket-protocol"))
        .map(
            |ch: String, connection, upgrade, version, key, origin, host, protocol| {
                (
                    ch,
                    ws::Upgrade {
                        connection,
                        upgrade,
                        version,
                        key,
                        origin,
                        host,
                        protocol,
                    },
                )
            },
        )
        .untuple_one()
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<server::PeerAddr>())
        .and(warp::query::<StreamParams>())
        .and(warp::ext::optional::<hyper::upgrade::OnUpgrade>())
        .and(with_ctx.clone())
        .and_then(ws::handle)
        .boxed();
    let sse = warp::path!("v1" / "sse" / String)
        .and(warp::get())
        .and(warp::query::<StreamParams>())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<server::PeerAddr>())
        .and(with_ctx.clone())
        .and_then(sse::handle)
        .boxed();
    let index = warp::path::end()
        .and(warp::get())
        .map(|| static_file(INDEX_HTML, "text/html; charset=utf-8"));
    let client = warp::path!("streampipe.js")
        .and(warp::get())
        .map(|| static_file(CLIENT_JS, "text/javascript; charset=utf-8"));
    let (healthz, readyz) = probes(&ctx);
    let m = ctx.metrics.clone();
    let log = warp::log::custom(move |info| {
        let route = api::route_label(info.method().as_str(), info.path());
        m.requests
            .with_label_values(&[route, info.status().as_str()])
            .inc();
    });
    let recover_ctx = ctx.clone();
    // Origins: the stream endpoint answers a refused origin itself (close
    // 4403 after the upgrade, so the JS client sees the code); every other
    // route is guarded before routing (403) and gets CORS headers for an
    // allowed cross-origin page.
    let policy = ctx.config.origins.clone();
    let guarded = origin::guard(policy.clone())
        .and(
            sse.or(api::routes(ctx))
                .unify()
                .or(index)
                .unify()
                .or(client)
                .unify()
                .or(healthz)
                .unify()
                .or(readyz)
                .unify(),
        )
        .map(origin::with_cors);
    origin::preflight(policy)
        .or(stream)
        .unify()
        .or(guarded)
        .unify()
        .recover(move |err| api::recover(recover_ctx.clone(), err))
        .unify()
        .with(log)
}

/// Pending connections the kernel queues before `accept`: a reconnect storm
/// after a pod restart arrives in bursts of thousands.
pub const LISTEN_BACKLOG: u32 = 4096;

/// The listening socket. `TCP_NODELAY` set on it is inherited by every
/// accepted connection (Linux): without it, Nagle's algorithm holds a small
/// update frame back until the client ACKs the previous one, and delayed
/// ACKs turn that into tens of milliseconds of latency per update. The hub
/// and the write buffer already coalesce what can be coalesced. So is a
/// `send_buffer` above 0 (`SO_SNDBUF`, see
/// [`server::SMALL_SOCKET_SEND_BUFFER`]).
fn listen(addr: SocketAddr, send_buffer: usize) -> Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    if send_buffer > 0 {
        socket.set_send_buffer_size(u32::try_from(send_buffer).unwrap_or(u32::MAX))?;
    }
    socket.bind(addr)?;
    Ok(socket.listen(LISTEN_BACKLOG)?)
}

/// Connections the internal port serves at once: Prometheus and probes.
pub const MAX_INTERNAL_CONNECTIONS: usize = 64;

/// Serves the publisher's public routes on `addr` until `shutdown` turns
/// true (see [`server`] for the limits); returns the bound address and the
/// server task.
pub async fn serve(
    addr: SocketAddr,
    ctx: Arc<Context>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = listen(addr, ctx.config.socket_send_buffer)?;
    let local = listener.local_addr()?;
    let server = server::run(
        listener,
        routes(ctx.clone()),
        ctx.config.max_connections,
        server::ConnMetrics {
            open: ctx.metrics.http_connections.clone(),
            refused: ctx.metrics.connections_refused.clone(),
        },
        ctx.shutdown.clone(),
    );
    Ok((local, tokio::spawn(server)))
}

/// Serves `/metrics`, `/healthz` and `/readyz` on the internal `addr`
/// (port [`streampipe_contract::deploy::PUBLISHER_METRICS_PORT`] in a pod).
pub async fn serve_internal(
    addr: SocketAddr,
    ctx: Arc<Context>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = listen(addr, 0)?;
    let local = listener.local_addr()?;
    let server = server::run(
        listener,
        internal_routes(ctx.clone()),
        MAX_INTERNAL_CONNECTIONS,
        server::ConnMetrics::unexported(),
        ctx.shutdown.clone(),
    );
    Ok((local, tokio::spawn(server)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SO_SNDBUF` of a connection accepted on a listener made by [`listen`].
    async fn accepted_send_buffer(send_buffer: usize) -> u32 {
        let listener = listen("127.0.0.1:0".parse().unwrap(), send_buffer).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY is inherited");
        let socket = tokio::net::TcpSocket::from_std_stream(accepted.into_std().unwrap());
        socket.send_buffer_size().unwrap()
    }

    /// The URL's `since` follows the begin frame's rules (one checker).
    #[test]
    fn url_since_is_checked_like_a_begin_frame() {
        let p = |s: &str| {
            StreamParams {
                since: Some(s.to_owned()),
                ..Default::default()
            }
            .since()
        };
        let ok = p("m1@7,m2@0").unwrap();
        assert_eq!(ok.get("m1"), Some(&7));
        assert_eq!(ok.len(), 2);
        assert!(p("m1@9007199254740992").unwrap_err().contains("above"));
        assert!(p("bad id@1").is_err());
        assert!(p("m1").unwrap_err().contains("market@version"));
        let many: Vec<String> = (0..=api::MAX_MARKETS_PER_CHANNEL)
            .map(|i| format!("m{i}@1"))
            .collect();
        assert!(p(&many.join(",")).unwrap_err().contains("more than"));
        // Repeats of one market are one entry.
        let repeats = vec!["m1@1"; api::MAX_MARKETS_PER_CHANNEL + 5].join(",");
        assert_eq!(p(&repeats).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_the_small_send_buffer() {
        let set = server::SMALL_SOCKET_SEND_BUFFER;
        let got = accepted_send_buffer(set).await as usize;
        // Linux reports twice the value set (its bookkeeping share).
        assert!(
            (set..=2 * set).contains(&got),
            "SO_SNDBUF {got} for {set} set"
        );
        let autotuned = accepted_send_buffer(0).await as usize;
        assert_ne!(autotuned, got, "0 leaves the kernel default");
    }
}
