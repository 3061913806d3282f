//! `streampipe-reducer`: parse configuration, start telemetry, run the
//! consumer and the HTTP endpoints, stop gracefully on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use streampipe_reducer::{http, spawn, Config, Metrics};

/// Consumes a pipeline's data and command topics, stores each market's state
/// in Redis and publishes every update of a watched market once to its topic.
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
    /// Pipeline name: Redis key prefix and default for topics and group.
    #[arg(long, env = "STREAMPIPE_PIPELINE", default_value = "streampipe")]
    pipeline: String,
    /// Data topic [default: <pipeline>.data].
    #[arg(long, env = "STREAMPIPE_DATA_TOPIC")]
    data_topic: Option<String>,
    /// Command topic, co-partitioned with the data topic [default: <pipeline>.commands].
    #[arg(long, env = "STREAMPIPE_COMMAND_TOPIC")]
    command_topic: Option<String>,
    /// Dead-letter topic [default: <pipeline>.dead-letter]; "" disables dead-lettering.
    #[arg(long, env = "STREAMPIPE_DEAD_LETTER_TOPIC")]
    dead_letter_topic: Option<String>,
    /// Consumer group [default: <pipeline>.reducers].
    #[arg(long, env = "STREAMPIPE_GROUP")]
    group: Option<String>,
    /// Redis URL; with --redis-cluster, a comma-separated list of seed nodes.
    #[arg(
        long,
        env = "STREAMPIPE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// Redis is a Redis Cluster (keys routed by hash slot, SPUBLISH, WAIT
    /// for a replica after each batch).
    #[arg(long, env = "STREAMPIPE_REDIS_CLUSTER", default_value_t = false)]
    redis_cluster: bool,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "STREAMPIPE_LISTEN", default_value = "0.0.0.0:9090")]
    listen: SocketAddr,
    /// Most records per Redis batch.
    #[arg(long, env = "STREAMPIPE_BATCH_MAX_RECORDS", default_value_t = streampipe_reducer::consumer::DEFAULT_BATCH_MAX_RECORDS)]
    batch_max_records: usize,
    /// Longest time a record waits in a batch, in milliseconds.
    #[arg(long, env = "STREAMPIPE_BATCH_MAX_DELAY_MS", default_value_t = streampipe_reducer::consumer::DEFAULT_BATCH_MAX_DELAY.as_millis() as u64)]
    batch_max_delay_ms: u64,
    /// Consumer group session timeout in milliseconds.
    #[arg(long, env = "STREAMPIPE_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    session_timeout_ms: u64,
    /// Extra librdkafka property, `key=value` (repeatable; credentials, TLS).
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
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args.log_format);

    let mut config = Config::new(&args.brokers, &args.pipeline, &args.redis_url);
    if let Some(t) = args.data_topic {
        config.data_topic = t;
    }
    if let Some(t) = args.command_topic {
        config.command_topic = t;
    }
    if let Some(t) = args.dead_letter_topic {
        config.dead_letter_topic = (!t.is_empty()).then_some(t);
    }
    if let Some(g) = args.group {
        config.group = g;
    }
    config.redis_cluster = args.redis_cluster;
    config.batch_max_records = args.batch_max_records;
    config.batch_max_delay = Duration::from_millis(args.batch_max_delay_ms);
    config.session_timeout = Duration::from_millis(args.session_timeout_ms);
    config.kafka_options = args.kafka_options;

    let metrics = Arc::new(Metrics::new());
    let reducer = tokio::task::spawn_blocking({
        let metrics = metrics.clone();
        move || spawn(config, metrics)
    })
    .await?
    .context("starting the reducer")?;

    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let addr = http::serve(args.listen, metrics, reducer.health.clone(), async {
        let _ = http_stopped.await;
    })
    .await
    .context("binding the HTTP endpoints")?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");

    // Stop on a signal, or when the consumer thread ends on its own.
    loop {
        tokio::select! {
            _ = shutdown_signal() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if reducer.is_finished() { break; }
            }
        }
    }
    tracing::info!("stopping");
    let res = tokio::task::spawn_blocking(move || reducer.shutdown()).await?;
    let _ = stop_http.send(());
    res.context("reducer")?;
    Ok(())
}
