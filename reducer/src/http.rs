//! The reducer's HTTP endpoints: `/metrics` (Prometheus text), `/healthz`
//! (the consumer thread is alive) and `/readyz` (the consumer is subscribed
//! and Redis answered the last round trip, at most a ping interval ago; see
//! [`crate::health`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use warp::http::StatusCode;
use warp::Filter;

use crate::health::Health;
use crate::metrics::Metrics;

/// The filters of the three endpoints.
pub fn routes(
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> impl Filter<Extract = (impl warp::Reply,), Error = warp::Rejection> + Clone {
    let m = warp::path!("metrics").and(warp::get()).map(move || {
        warp::reply::with_header(
            metrics.render(),
            "content-type",
            "text/plain; version=0.0.4",
        )
    });
    let h = health.clone();
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(move || status(h.alive.load(Ordering::SeqCst)));
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .map(move || status(health.is_ready()));
    m.or(healthz).or(readyz)
}

fn status(ok: bool) -> warp::reply::WithStatus<&'static str> {
    if ok {
        warp::reply::with_status("ok\n", StatusCode::OK)
    } else {
        warp::reply::with_status("not ready\n", StatusCode::SERVICE_UNAVAILABLE)
    }
}

/// Serves the endpoints on `addr` until `shutdown` resolves; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let server = warp::serve(routes(metrics, health))
        .incoming(listener)
        .graceful(shutdown)
        .run();
    tokio::spawn(server);
    Ok(local)
}
