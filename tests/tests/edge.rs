//! The publisher as an internet-facing edge (issue 9, item 4): slow and
//! oversized clients, protocol abuse, origins, internal endpoints. Every
//! test talks raw TCP or a WebSocket client to a real publisher (Redis and
//! the dev broker behind it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use streampipe_publisher::server::{BODY_READ_TIMEOUT, HEADER_READ_TIMEOUT};
use streampipe_publisher::Config;
use streampipe_tests::publisher::{blocking, http, InProcess};
use streampipe_tests::{redis_url, Broker, Pipeline};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A publisher for a fresh pipeline (no reducer: these tests need none),
/// with `tune` applied to its configuration.
async fn publisher(tune: impl FnOnce(&mut Config)) -> (Arc<Pipeline>, InProcess) {
    let p = Arc::new(blocking(|| Pipeline::new(Broker::Dev, 2)).await);
    let mut config = Config::new(&p.broker.bootstrap(), &p.name, &redis_url());
    config.command_topic = p.config.command_topic.clone();
    tune(&mut config);
    let publ = InProcess::start_with_config(config).await;
    (p, publ)
}

/// Reads until the server closes the connection (or `limit` passes);
/// returns what was read and when the close came.
async fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, Option<Duration>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return (
                    String::from_utf8_lossy(&got).into_owned(),
                    Some(start.elapsed()),
                )
            }
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), None),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_heads_and_bodies_are_cut_at_their_bounds() {
    let (_p, publ) = publisher(|_| {}).await;
    let a = publ.addr;

    // A head that never ends: one header line, then silence.
    let mut head = TcpStream::connect(a).await.unwrap();
    head.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        .await
        .unwrap();
    // A connection that sends nothing at all.
    let mut silent = TcpStream::connect(a).await.unwrap();
    // A complete head whose announced body never arrives.
    let mut body = TcpStream::connect(a).await.unwrap();
    body.write_all(
        b"POST /v1/channels HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{\"markets\":",
    )
    .await
    .unwrap();

    let limit = HEADER_READ_TIMEOUT.max(BODY_READ_TIMEOUT) + Duration::from_secs(5);
    let (h, b, s) = tokio::join!(
        read_until_closed(&mut head, limit),
        read_until_closed(&mut body, limit),
        read_until_closed(&mut silent, limit),
    );
    let (_, head_closed) = h;
    let head_closed = head_closed.expect("a dribbled head is dropped");
    assert!(
        head_closed >= HEADER_READ_TIMEOUT - Duration::from_secs(1)
            && head_closed <= HEADER_READ_TIMEOUT + Duration::from_secs(3),
        "head dropped after {head_closed:?}, bound {HEADER_READ_TIMEOUT:?}"
    );
    let silent_closed = s.1.expect("a silent connection is dropped");
    assert!(silent_closed <= HEADER_READ_TIMEOUT + Duration::from_secs(3));
    let (reply, body_closed) = b;
    let body_closed = body_closed.expect("a trickled body is dropped");
    assert!(
        body_closed >= BODY_READ_TIMEOUT - Duration::from_secs(1)
            && body_closed <= BODY_READ_TIMEOUT + Duration::from_secs(3),
        "body dropped after {body_closed:?}, bound {BODY_READ_TIMEOUT:?}"
    );
    assert!(
        reply.starts_with("HTTP/1.1 408"),
        "a body timeout is answered 408: {reply}"
    );
    assert!(reply.contains("body_timeout"), "{reply}");
    // The pod still serves.
    assert_eq!(http(a, "GET", "/healthz", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_http2_is_not_spoken() {
    let (_p, publ) = publisher(|_| {}).await;
    // Prior knowledge: the HTTP/2 connection preface, then an empty SETTINGS frame.
    let mut s = TcpStream::connect(publ.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let (reply, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed.is_some(), "the connection is closed");
    // An HTTP/2 server answers with its own SETTINGS frame (type 4 at byte 3).
    let bytes = reply.as_bytes();
    assert!(
        !(bytes.len() >= 9 && bytes[3] == 4),
        "answered as HTTP/2: {bytes:?}"
    );
    // Upgrade: h2c is ignored: the request is served as HTTP/1.1.
    let mut s = TcpStream::connect(publ.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_get_503_and_are_counted() {
    const CAP: usize = 3;
    let (_p, publ) = publisher(|c| c.max_connections = CAP).await;
    let a = publ.addr;
    // Fill the cap with idle connections (they hold their slot until the
    // header timeout cuts them).
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(TcpStream::connect(a).await.unwrap());
    }
    let gauge = &publ.ctx.metrics.http_connections;
    let t = Instant::now();
    while gauge.get() < CAP as i64 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(gauge.get(), CAP as i64);

    let r = http(a, "GET", "/healthz", None).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.error_code(), "unavailable");
    assert_eq!(publ.ctx.metrics.connections_refused.get(), 1);
    let metrics = http(publ.internal, "GET", "/metrics", None).await.body;
    assert!(
        metrics.contains("streampipe_publisher_connections_refused_total 1"),
        "{metrics}"
    );

    // A slot frees when its socket closes.
    held.pop();
    let t = Instant::now();
    loop {
        let r = http(a, "GET", "/healthz", None).await;
        if r.status == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "slot never freed: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_live_on_the_internal_port_only() {
    let (_p, publ) = publisher(|_| {}).await;
    assert_eq!(http(publ.addr, "GET", "/metrics", None).await.status, 404);
    let r = http(publ.internal, "GET", "/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("streampipe_publisher_http_connections"));
    assert_eq!(
        http(publ.internal, "GET", "/healthz", None).await.status,
        200
    );
    // The internal port serves nothing else.
    assert_eq!(http(publ.internal, "GET", "/", None).await.status, 404);
    assert_eq!(
        http(publ.internal, "POST", "/v1/channels", Some("{}"))
            .await
            .status,
        404
    );
}
