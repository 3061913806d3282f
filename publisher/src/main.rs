//! `streampipe-publisher`: parse configuration, start telemetry, serve the
//! control API, the streams and the live page; on SIGTERM close streams with
//! 1001 and stop.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use streampipe_publisher::cli::Args;
use streampipe_publisher::{context, serve, serve_internal, Metrics};

/// How long shutdown waits for stream connections to close after telling
/// them to (1001): they only need to write a close frame.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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
    let config = args.config().context("configuration")?;

    let metrics = Arc::new(Metrics::new());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let ctx = context(config, metrics, stopped)
        .await
        .context("starting the publisher")?;
    let (addr, server) = serve(args.listen, ctx.clone()).await.context("binding")?;
    let (internal, _internal_server) = serve_internal(args.metrics_listen, ctx.clone())
        .await
        .context("binding the internal port")?;
    tracing::info!(%addr, %internal, "publisher listening (public, internal)");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down: closing streams with 1001");
    let _ = stop.send(true);
    ctx.hub.close_all(
        streampipe_contract::close::GOING_AWAY,
        "publisher shutting down",
    );
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while ctx.hub.member_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, server).await;
    Ok(())
}
