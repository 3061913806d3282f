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
    // (With a valid token: without one the request is refused with 401
    // before any of its body is read.)
    body.write_all(
        format!(
            "POST /v1/channels HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{{\"markets\":",
            streampipe_tests::auth::token()
        )
        .as_bytes(),
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

/// One raw HTTP/1.1 request with extra headers; returns (status, head, body).
async fn raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        req.push_str("Connection: close\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
    {
        let t = streampipe_tests::auth::token();
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let (text, _) = read_until_closed(&mut s, Duration::from_secs(10)).await;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Opens a WebSocket by hand (so the test can then send broken frames);
/// returns the socket after the 101.
async fn raw_ws(addr: std::net::SocketAddr, channel: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /v1/stream/{channel} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Protocol: streampipe.v2, bearer.{}\r\n\r\n",
        streampipe_tests::auth::token()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// A masked client frame.
fn frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![
        0x80 | opcode,
        payload.len() as u8 | if masked { 0x80 } else { 0 },
    ];
    if masked {
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

/// Reads server frames until a close frame; returns its code.
async fn server_close_code(s: &mut TcpStream) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut h = [0u8; 2];
        tokio::time::timeout_at(deadline, s.read_exact(&mut h))
            .await
            .ok()?
            .ok()?;
        let mut len = (h[1] & 0x7f) as usize;
        if len == 126 {
            let mut l = [0u8; 2];
            s.read_exact(&mut l).await.ok()?;
            len = u16::from_be_bytes(l) as usize;
        } else if len == 127 {
            let mut l = [0u8; 8];
            s.read_exact(&mut l).await.ok()?;
            len = u64::from_be_bytes(l) as usize;
        }
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.ok()?;
        if h[0] & 0x0f == 0x8 {
            return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

async fn channel(a: std::net::SocketAddr) -> String {
    streampipe_tests::publisher::create_channel(a, &["edge.m1"]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_handshakes_are_validated() {
    let (_p, publ) = publisher(|_| {}).await;
    let a = publ.addr;
    let ch = channel(a).await;
    let path = format!("/v1/stream/{ch}");
    let up = [("Connection", "Upgrade"), ("Upgrade", "websocket")];
    for (key, want) in [
        ("not-base64!!", "invalid_websocket_key"),
        ("dGhlIHNhbXBsZSBub25jZR==", "invalid_websocket_key"),
        ("dGhl", "invalid_websocket_key"),
    ] {
        let mut h = up.to_vec();
        h.extend([("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", key)]);
        let (status, _, body) = raw(a, "GET", &path, &h, "").await;
        assert_eq!(status, 400, "{key}: {body}");
        assert!(body.contains(want), "{body}");
    }
    let mut h = up.to_vec();
    h.extend([("Sec-WebSocket-Version", "8"), ("Sec-WebSocket-Key", KEY)]);
    let (status, head, _) = raw(a, "GET", &path, &h, "").await;
    assert_eq!(status, 426);
    assert!(head.contains("sec-websocket-version: 13"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_protocol_errors_and_client_closes_get_close_frames() {
    let (_p, publ) = publisher(|_| {}).await;
    let a = publ.addr;
    let ch = channel(a).await;

    // An unmasked client frame: protocol error.
    let mut s = raw_ws(a, &ch).await;
    s.write_all(&frame(0x1, b"{}", false)).await.unwrap();
    assert_eq!(server_close_code(&mut s).await, Some(1002));

    // A reserved opcode: protocol error.
    let mut s = raw_ws(a, &ch).await;
    s.write_all(&frame(0x3, b"x", true)).await.unwrap();
    assert_eq!(server_close_code(&mut s).await, Some(1002));

    // Invalid UTF-8 in a text frame: invalid payload.
    let mut s = raw_ws(a, &ch).await;
    s.write_all(&frame(0x1, &[0xff, 0xfe, 0x80], true))
        .await
        .unwrap();
    assert_eq!(server_close_code(&mut s).await, Some(1007));

    // The client closes: the server answers with a close frame.
    let mut s = raw_ws(a, &ch).await;
    s.write_all(&frame(0x8, &1000u16.to_be_bytes(), true))
        .await
        .unwrap();
    assert_eq!(server_close_code(&mut s).await, Some(1000));

    let m = &publ.ctx.metrics.rejected;
    assert_eq!(m.with_label_values(&["protocol_error"]).get(), 2);
    assert_eq!(m.with_label_values(&["invalid_utf8"]).get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_are_closed_by_default_and_opened_explicitly() {
    let body = r#"{"markets":["edge.m1"]}"#;
    let evil = [("Origin", "https://evil.example")];

    // Default: other origins refused everywhere; our own origin and
    // requests without Origin work.
    let (_p, publ) = publisher(|_| {}).await;
    let a = publ.addr;
    let (status, _, b) = raw(a, "POST", "/v1/channels", &evil, body).await;
    assert_eq!(status, 403, "{b}");
    assert!(b.contains("origin_not_allowed"));
    let own = format!("http://{a}");
    let (status, head, b) = raw(a, "POST", "/v1/channels", &[("Origin", &own)], body).await;
    assert_eq!(status, 201, "{b}");
    assert!(!head.contains("access-control-allow-origin"));
    let ch = serde_json::from_str::<serde_json::Value>(&b).unwrap()["channel"]
        .as_str()
        .unwrap()
        .to_owned();
    let pre = [
        ("Origin", "https://evil.example"),
        ("Access-Control-Request-Method", "POST"),
    ];
    let (status, head, _) = raw(a, "OPTIONS", "/v1/channels", &pre, "").await;
    assert_eq!(status, 403);
    assert!(!head.contains("access-control-allow-origin"));
    let (status, _, _) = raw(a, "GET", &format!("/v1/sse/{ch}"), &evil, "").await;
    assert_eq!(status, 403);
    // WebSocket: the handshake succeeds and the stream closes with 4403.
    let mut s = TcpStream::connect(a).await.unwrap();
    s.write_all(format!("GET /v1/stream/{ch} HTTP/1.1\r\nHost: {a}\r\nOrigin: https://evil.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert_eq!(server_close_code(&mut s).await, Some(4403));
    // The page and the client script are still served (no Origin on navigations).
    assert_eq!(http(a, "GET", "/", None).await.status, 200);
    assert_eq!(http(a, "GET", "/streampipe.js", None).await.status, 200);
    drop(publ);

    // An allow-list.
    let (_p, publ) = publisher(|c| c.origins.allowed = vec!["https://book.example".into()]).await;
    let a = publ.addr;
    let book = [("Origin", "https://book.example")];
    let (status, head, _) = raw(a, "POST", "/v1/channels", &book, body).await;
    assert_eq!(status, 201);
    assert!(
        head.contains("access-control-allow-origin: https://book.example"),
        "{head}"
    );
    let pre = [
        ("Origin", "https://book.example"),
        ("Access-Control-Request-Method", "POST"),
    ];
    let (status, head, _) = raw(a, "OPTIONS", "/v1/channels", &pre, "").await;
    assert_eq!(status, 204);
    assert!(head.contains("access-control-allow-methods"), "{head}");
    let (status, _, _) = raw(a, "POST", "/v1/channels", &evil, body).await;
    assert_eq!(status, 403);
    drop(publ);

    // Development mode: anything.
    let (_p, publ) = publisher(|c| c.origins.any = true).await;
    let (status, head, _) = raw(publ.addr, "POST", "/v1/channels", &evil, body).await;
    assert_eq!(status, 201);
    assert!(head.contains("access-control-allow-origin: https://evil.example"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_end_at_their_lifetime_with_4411() {
    let lifetime = Duration::from_secs(2);
    let (_p, publ) = publisher(|c| c.sse_max_lifetime = lifetime).await;
    let a = publ.addr;
    let ch = channel(a).await;
    let mut s = TcpStream::connect(a).await.unwrap();
    let path = streampipe_tests::publisher::sse_path(a, &ch).await;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // The response is chunked on a keep-alive connection: read until the
    // close event rather than EOF.
    let t = Instant::now();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.contains("\"code\":4411") {
        let left = (lifetime + Duration::from_secs(5)).saturating_sub(t.elapsed());
        let n = tokio::time::timeout(left, s.read(&mut buf))
            .await
            .expect("the stream ends within its lifetime")
            .unwrap();
        assert!(n > 0, "closed early: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let ended = t.elapsed();
    assert!(text.contains("subscribed"), "{text}");
    assert!(
        ended >= lifetime - lifetime / 10 - Duration::from_millis(100)
            && ended <= lifetime + Duration::from_secs(2),
        "ended after {ended:?}"
    );
    assert_eq!(
        publ.ctx.metrics.closes.with_label_values(&["4411"]).get(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_data_records_are_dead_lettered_and_a_frozen_market_can_be_reset() {
    use streampipe_contract::{CommandKind, MAX_RECORD_BYTES};
    let metrics = Arc::new(streampipe_reducer::Metrics::new());
    let (p, reducer) = blocking({
        let metrics = metrics.clone();
        move || {
            let mut p = Pipeline::new(Broker::Dev, 2);
            p.config.max_version_jump = 1000;
            let r = streampipe_reducer::spawn(p.config.clone(), metrics).unwrap();
            (Arc::new(p), r)
        }
    })
    .await;
    let q = p.clone();
    blocking(move || {
        let p = q;
        p.update("hostile.m", 1, "1");
        let big = format!(r#""{}""#, "x".repeat(MAX_RECORD_BYTES));
        p.update("hostile.m", 2, &big);
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        p.update("hostile.m", 3, &deep);
        // Far beyond the stored version: refused, the market keeps flowing.
        p.update("hostile.m", (1 << 53) - 1, "1");
        p.update("hostile.m", 4, "1");
        p.flush();
        streampipe_tests::wait_for(Duration::from_secs(30), "version 4 stored", || {
            (p.state_version("hostile.m") == 4).then_some(())
        });
        let dlq = p.read_topic(p.config.dead_letter_topic.as_deref().unwrap(), 3);
        let reasons: Vec<String> = dlq
            .iter()
            .map(|m| {
                use rdkafka::message::{Headers, Message};
                let h = m.headers().unwrap();
                let e = h.iter().find(|h| h.key == "streampipe.error").unwrap();
                String::from_utf8_lossy(e.value.unwrap()).into_owned()
            })
            .collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(reasons[0].contains("at most"), "{reasons:?}");
        assert!(reasons[1].contains("deeper"), "{reasons:?}");
        assert!(
            reasons[2].contains("ahead of the stored version"),
            "{reasons:?}"
        );

        // A market frozen by a version within the bound (or one stored
        // before any bound) is freed by the operator's reset.
        p.update("hostile.m", 900, "1");
        p.update("hostile.m", 5, "1");
        p.flush();
        streampipe_tests::wait_for(Duration::from_secs(30), "version 900 stored", || {
            (p.state_version("hostile.m") == 900).then_some(())
        });
        p.command(CommandKind::ResetMarket, "", "hostile.m");
        p.flush();
        // Commands and data are separate topics: wait for the reset itself.
        streampipe_tests::wait_for(Duration::from_secs(30), "state deleted", || {
            (p.state_version("hostile.m") == 0).then_some(())
        });
        p.update("hostile.m", 6, "1");
        p.flush();
        streampipe_tests::wait_for(Duration::from_secs(30), "version 6 after reset", || {
            (p.state_version("hostile.m") == 6).then_some(())
        });
    })
    .await;
    let m = &metrics.malformed;
    assert_eq!(m.with_label_values(&["data", "too_large"]).get(), 1);
    assert_eq!(m.with_label_values(&["data", "too_deep"]).get(), 1);
    assert_eq!(m.with_label_values(&["data", "version_jump"]).get(), 1);
    assert_eq!(
        metrics.commands.with_label_values(&["reset_market"]).get(),
        1
    );
    blocking(move || reducer.shutdown().unwrap()).await;
}
