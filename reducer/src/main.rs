//! `streampipe-reducer`: parse configuration, start telemetry, run the
//! consumer and the HTTP endpoints, stop gracefully on SIGTERM/SIGINT.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use streampipe_reducer::cli::Args;
use streampipe_reducer::{http, spawn, Metrics};

/// Exit status when the shutdown deadline cut the clean stop short: not 0,
/// so the abnormal end shows in the pod's status, and not a signal's.
const SHUTDOWN_TIMED_OUT_EXIT_CODE: i32 = 3;

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
    // A clean stop (last batch, commit, leave) needs the broker; an
    // unreachable one can hold librdkafka's commit and close for minutes.
    // Nothing is lost by not waiting: offsets are stored only for batches
    // Redis has, so whatever is not committed is redelivered.
    let deadline = args.shutdown_deadline();
    tracing::info!(?deadline, "stopping");
    let stopping = tokio::task::spawn_blocking(move || reducer.shutdown());
    let res = match tokio::time::timeout(deadline, stopping).await {
        Ok(res) => res?,
        Err(_) => {
            tracing::error!(
                ?deadline,
                "clean shutdown did not finish in time (is the broker reachable?); \
                 exiting now: offsets not committed are redelivered"
            );
            std::process::exit(SHUTDOWN_TIMED_OUT_EXIT_CODE);
        }
    };
    let _ = stop_http.send(());
    res.context("reducer")?;
    Ok(())
}
