//! The public HTTP server: our own accept loop over hyper's HTTP/1
//! connection builder instead of `warp::serve`, for the limits an
//! internet-facing edge needs and warp's server does not offer:
//!
//! - **HTTP/1.1 only.** warp serves with hyper-util's `auto` builder, which
//!   also speaks cleartext HTTP/2 (h2c prior knowledge) to anyone who asks:
//!   a second protocol stack with its own resource rules that the streams do
//!   not need. TLS and HTTP/2 towards browsers belong to the ingress.
//! - **Header read timeout** ([`HEADER_READ_TIMEOUT`]): a client that opens a
//!   connection and dribbles a request head (slowloris), or idles on a
//!   keep-alive connection, is dropped. Bodies have their own bound
//!   ([`BODY_READ_TIMEOUT`], enforced where a body is read).
//! - **Connection cap** per pod (`--max-connections`): beyond it a new
//!   connection gets `503` and is closed, counted in
//!   `streampipe_publisher_connections_refused_total`. A connection holds its
//!   slot for as long as its socket lives, including after a WebSocket
//!   upgrade (the slot travels with the socket, see [`Counted`]).
//! - **Quiet aborts**: a client that resets or times out is routine on the
//!   internet; it is logged at debug, never as an error.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tracing::debug;
use warp::{Filter, Reply};

use crate::metrics::GaugeGuard;

/// What a listener counts: open connections and over-cap refusals.
#[derive(Clone)]
pub struct ConnMetrics {
    /// Open connections.
    pub open: prometheus::IntGauge,
    /// Connections refused at the cap.
    pub refused: prometheus::IntCounter,
}

impl ConnMetrics {
    /// Counters that are not exported (the internal port's).
    pub fn unexported() -> Self {
        ConnMetrics {
            open: prometheus::IntGauge::new("internal_connections", "-").expect("valid"),
            refused: prometheus::IntCounter::new("internal_refused", "-").expect("valid"),
        }
    }
}

/// Longest time a client may take to send a complete request head (and
/// longest a keep-alive connection may idle between requests): a browser
/// sends its head in one packet, so this only ever cuts slowloris clients
/// and forgotten keep-alive sockets.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest time a client may take to send a request body once its head
/// arrived (bodies are at most [`crate::api::MAX_BODY_BYTES`]).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// hyper's read buffer, which bounds a request head: our longest legitimate
/// head is a stream URL with a 4 KiB `since` plus browser headers.
pub const MAX_HEAD_BUFFER: usize = 16 * 1024;

/// Default connection cap per pod: the benchmarks' 10 000 WebSocket clients
/// per pod with room for API calls and reconnect bursts; memory per idle
/// stream is a few KiB, so this bounds a pod's socket memory well below its
/// limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;

/// A small kernel send buffer per client socket (`SO_SNDBUF`; Linux
/// doubles it), for `--socket-send-buffer-bytes`: left to autotuning, a
/// socket whose reader stalls may hold up to `tcp_wmem`'s maximum (4 MiB
/// on Debian) of framed updates no conflation can touch, so a pod with
/// many stalled clients can pin gigabytes of kernel memory; this size keeps
/// that backlog in the conflating outbox instead.
pub const SMALL_SOCKET_SEND_BUFFER: usize = 64 * 1024;

/// Default: 0, the kernel's autotuning. Measured (docs/benchmarks.md), the
/// small buffer above bought no latency on the hot market and cost 40% of
/// the delivered rate in the many-market ramp (more write-readiness round
/// trips per socket), so it is an opt-in memory bound, not the default.
pub const DEFAULT_SOCKET_SEND_BUFFER: usize = 0;

/// Over-cap connections being answered `503` at once, at most; beyond this
/// they are closed without an answer (a flood must not turn the refusals
/// themselves into unbounded work).
pub const MAX_REFUSALS_IN_FLIGHT: usize = 256;

/// How long an over-cap connection may take to send its request and read
/// the `503`.
pub const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

/// The body of the over-cap `503`.
const REFUSAL_BODY: &str =
    r#"{"error":{"code":"unavailable","message":"the server is at capacity; retry shortly"}}"#;

/// A socket that holds its connection slot and its gauge for as long as it
/// lives, wherever it goes (hyper hands it to the WebSocket task on upgrade).
pub struct Counted {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
    _gauge: GaugeGuard,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The HTTP/1-only connection builder with the edge's limits.
fn builder(header_timeout: Duration) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEAD_BUFFER);
    b
}

/// The peer address of the connection a request came on (a request
/// extension; see [`crate::api::Caller`]).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Serves `filter` on `listener` until `shutdown` turns true, with at most
/// `max_connections` open connections; then stops accepting, asks open
/// connections to finish, and returns when they have.
pub async fn run<F, R>(
    listener: TcpListener,
    filter: F,
    max_connections: usize,
    metrics: ConnMetrics,
    mut shutdown: watch::Receiver<bool>,
) where
    F: Filter<Extract = (R,), Error = Infallible> + Clone + Send + Sync + 'static,
    R: Reply,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.refused.inc();
            if let Ok(permit) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(tcp).await;
                    drop(permit);
                });
            }
            continue;
        };
        let io = Counted {
            io: tcp,
            _slot: slot,
            _gauge: GaugeGuard::inc(metrics.open.clone()),
        };
        let inner = TowerToHyperService::new(warp::service(filter.clone()));
        // Each request carries its connection's peer address (per-IP limits).
        let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            req.extensions_mut().insert(PeerAddr(peer));
            hyper::service::Service::call(&inner, req)
        });
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let conn = builder(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stopped(&mut stop) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                // Resets, timeouts, garbage: the client's business.
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    // Every connection returns its slot when its socket closes (streams are
    // told to close by the shutdown signal too).
    let _ = slots.acquire_many(max_connections as u32).await;
}

/// Resolves once the shutdown flag is true (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Answers one request on an over-cap connection with `503` and closes it.
async fn refuse(tcp: TcpStream) {
    let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .status(503)
                .header("content-type", "application/json")
                .header("retry-after", "1")
                .header("connection", "close")
                .body(REFUSAL_BODY.to_owned())
                .expect("valid response"),
        )
    });
    let mut b = builder(REFUSAL_TIMEOUT);
    b.keep_alive(false);
    let conn = b.serve_connection(TokioIo::new(tcp), svc);
    match tokio::time::timeout(REFUSAL_TIMEOUT, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "refused connection ended with an error"),
        Err(_) => debug!("refused connection timed out"),
    }
}
