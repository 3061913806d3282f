//! `streampipe-reducer`: parse configuration, start telemetry, run the
//! consumer and the HTTP endpoints, stop gracefully on SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use streampipe_reducer::cli::Args;
use streampipe_reducer::{http, spawn, Metrics};

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

    let config = args.config().context("configuration")?;

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
