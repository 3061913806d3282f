//! `streampipe-publisher`: parse configuration, start telemetry, serve the
//! control API, the streams and the live page; on SIGTERM close streams with
//! 1001 and stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use streampipe_publisher::{context, serve, Config, Metrics};

/// How long shutdown waits for stream connections to close after telling
/// them to (1001): they only need to write a close frame.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves browsers: WebSocket and SSE streams of their channels, the REST
/// control API, and the live odds page.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "STREAMPIPE_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    brokers: String,
    /// Pipeline name (Redis prefix, default topic names).
    #[arg(long, env = "STREAMPIPE_PIPELINE", default_value = "streampipe")]
    pipeline: String,
    /// Command topic [default: <pipeline>.commands].
    #[arg(long, env = "STREAMPIPE_COMMAND_TOPIC")]
    command_topic: Option<String>,
    /// Redis URL.
    #[arg(
        long,
        env = "STREAMPIPE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// Redis is a Redis Cluster (the URL may then list several seed nodes, comma-separated).
    #[arg(long, env = "STREAMPIPE_REDIS_CLUSTER", default_value_t = false)]
    redis_cluster: bool,
    /// Address to serve on (API, streams, page, /metrics, /healthz, /readyz).
    #[arg(long, env = "STREAMPIPE_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Origins allowed to open streams (comma-separated); empty allows all.
    #[arg(long, env = "STREAMPIPE_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Markets the demo page shows (comma-separated).
    #[arg(long, env = "STREAMPIPE_DEMO_MARKETS", value_delimiter = ',')]
    demo_markets: Vec<String>,
    /// Close channels with no stream for this many seconds (and unsubscribe their markets).
    #[arg(long, env = "STREAMPIPE_CHANNEL_IDLE_TTL_SECONDS", default_value_t = streampipe_publisher::DEFAULT_CHANNEL_IDLE_TTL.as_secs())]
    channel_idle_ttl_seconds: u64,
    /// Extra librdkafka property, `key=value` (repeatable).
    #[arg(long = "kafka-option", env = "STREAMPIPE_KAFKA_OPTIONS", value_delimiter = ',', value_parser = parse_kv)]
    kafka_options: Vec<(String, String)>,
    /// Log format.
    #[arg(long, env = "STREAMPIPE_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args.log_format);
    let mut config = Config::new(&args.brokers, &args.pipeline, &args.redis_url);
    config.redis_cluster = args.redis_cluster;
    if let Some(t) = args.command_topic {
        config.command_topic = t;
    }
    config.kafka_options = args.kafka_options;
    config.allowed_origins = args
        .allowed_origins
        .into_iter()
        .filter(|o| !o.is_empty())
        .collect();
    config.demo_markets = args
        .demo_markets
        .into_iter()
        .filter(|m| !m.is_empty())
        .collect();

    let metrics = Arc::new(Metrics::new());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let ctx = context(config, metrics, stopped)
        .await
        .context("starting the publisher")?;
    let (addr, server) = serve(args.listen, ctx.clone()).await.context("binding")?;
    tracing::info!(%addr, "publisher listening");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: closing streams with 1001");
    let _ = stop.send(true);
    ctx.hub.close_all(1001, "publisher shutting down");
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while ctx.hub.member_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, server).await;
    Ok(())
}
