//! Publisher test support: an in-process publisher on a free port, a child
//! process publisher (for kill tests), HTTP with bodies, WebSocket and SSE
//! clients.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use streampipe_publisher::{context, serve, serve_internal, Config, Context, Metrics};
use streampipe_reducer::ReducerHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{free_port, redis_url, workspace_bin, Broker, Pipeline};

/// A publisher running in this process.
pub struct InProcess {
    /// Its public address.
    pub addr: SocketAddr,
    /// Its internal address (`/metrics`, probes).
    pub internal: SocketAddr,
    /// Its shared context (metrics, hub).
    pub ctx: Arc<Context>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl InProcess {
    /// Starts a publisher for the pipeline on a free loopback port.
    pub async fn start(p: &Pipeline) -> Self {
        Self::start_with_redis(p, &redis_url()).await
    }

    /// Like [`InProcess::start`], on another Redis.
    pub async fn start_with_redis(p: &Pipeline, redis: &str) -> Self {
        let mut config = config_for(p);
        config.redis_url = redis.to_owned();
        Self::start_with_config(config).await
    }

    /// A publisher with this configuration.
    /// Token mode without keys gets the test key and default limits get
    /// relaxed ones ([`crate::auth::prepare`]).
    pub async fn start_with_config(mut config: Config) -> Self {
        crate::auth::prepare(&mut config);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let ctx = context(config, Arc::new(Metrics::new()), stopped)
            .await
            .expect("publisher context");
        let (addr, _server) = serve("127.0.0.1:0".parse().unwrap(), ctx.clone())
            .await
            .expect("serve");
        let (internal, _internal_server) =
            serve_internal("127.0.0.1:0".parse().unwrap(), ctx.clone())
                .await
                .expect("serve internal");
        InProcess {
            addr,
            internal,
            ctx,
            stop,
        }
    }

    /// `http://addr`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        self.ctx.hub.close_all(1001, "test over");
    }
}

/// A publisher running as a child process (for kill tests).
pub struct PublisherProcess {
    /// The child.
    pub child: Child,
    /// Its address.
    pub addr: SocketAddr,
}

impl PublisherProcess {
    /// Starts `streampipe-publisher` for the pipeline on `port` (0: a free one).
    pub fn spawn(p: &Pipeline, port: u16, demo_markets: &[String]) -> Self {
        Self::spawn_with(p, port, demo_markets, &[])
    }

    /// Like [`PublisherProcess::spawn`] with extra flags; in token mode
    /// (the default) with the test secret from its environment variable.
    pub fn spawn_with(p: &Pipeline, port: u16, demo_markets: &[String], extra: &[&str]) -> Self {
        let port = if port == 0 { free_port() } else { port };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(workspace_bin("streampipe-publisher"))
            .arg("--brokers")
            .arg(p.broker.bootstrap())
            .arg("--pipeline")
            .arg(&p.name)
            .arg("--redis-url")
            .arg(redis_url())
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--demo-markets")
            .arg(demo_markets.join(","))
            .arg("--log-format")
            .arg("text")
            .args(extra)
            .env(
                streampipe_contract::deploy::env::AUTH_HS256_SECRET,
                crate::auth::TEST_SECRET,
            )
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn publisher");
        let me = PublisherProcess { child, addr };
        crate::wait_for(Duration::from_secs(30), "publisher ready", || {
            crate::try_http_request(&me.addr.to_string(), "GET", "/readyz")
                .ok()?
                .starts_with("HTTP/1.1 200")
                .then_some(())
        });
        me
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PublisherProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An HTTP response: status, body.
#[derive(Debug)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Body text.
    pub body: String,
}

impl Resp {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// `error.code` of a JSON error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// One HTTP/1.1 request with an optional JSON body (no client dependency
/// needed), carrying the harness's default token ([`crate::auth::token`]).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Resp {
    http_as(addr, method, path, body, Some(&crate::auth::token())).await
}

/// Like [`http`] with this bearer token, or none.
pub async fn http_as(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Resp {
    let (status, _, body) = http_full(addr, method, path, body, token).await;
    Resp { status, body }
}

/// Like [`http_as`], also returning the response head (lower-cased).
pub async fn http_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, String, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    let (status, head, body) = http_with_headers(addr, method, path, body, &headers).await;
    (status, head.to_ascii_lowercase(), body)
}

/// One HTTP/1.1 request with these extra headers (e.g. `If-None-Match`);
/// returns status, head (as sent) and body.
pub async fn http_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let body = body.unwrap_or("");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    (status, head.to_owned(), body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Creates a channel for `markets`; returns its id.
pub async fn create_channel(addr: SocketAddr, markets: &[&str]) -> String {
    let body = serde_json::json!({ "markets": markets }).to_string();
    let r = http(addr, "POST", "/v1/channels", Some(&body)).await;
    assert_eq!(r.status, 201, "create channel: {}", r.body);
    r.json()["channel"].as_str().unwrap().to_owned()
}

/// A WebSocket client.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens `/v1/stream/<channel><query>` with the harness's default token
/// in the subprotocol.
pub async fn ws_connect(addr: SocketAddr, channel: &str, query: &str) -> Ws {
    ws_connect_as(addr, channel, query, Some(&crate::auth::token())).await
}

/// Opens `/v1/stream/<channel><query>` offering `streampipe.v2` and, with
/// a token, `bearer.<token>`.
pub async fn ws_connect_as(
    addr: SocketAddr,
    channel: &str,
    query: &str,
    token: Option<&str>,
) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("ws://{addr}/v1/stream/{channel}{query}");
    let mut req = url.into_client_request().expect("request");
    let protocols = match token {
        Some(t) => format!("streampipe.v2, bearer.{t}"),
        None => "streampipe.v2".to_owned(),
    };
    req.headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().expect("header"));
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket connect");
    ws
}

/// A one-time SSE ticket of `channel` for the harness's default token;
/// returns the SSE path with `?ticket=` (append `&...` for more).
pub async fn sse_path(addr: SocketAddr, channel: &str) -> String {
    let r = http(
        addr,
        "POST",
        &format!("/v1/channels/{channel}/tickets"),
        None,
    )
    .await;
    assert_eq!(r.status, 201, "ticket: {}", r.body);
    r.json()["sse"].as_str().expect("sse path").to_owned()
}

/// What a WebSocket client read next.
#[derive(Debug)]
pub enum Frame {
    /// A JSON text frame.
    Json(serde_json::Value),
    /// A close frame with its code.
    Closed(u16),
}

/// Reads the next JSON frame or close, waiting at most `timeout`.
pub async fn ws_next(ws: &mut Ws, timeout: Duration) -> Option<Frame> {
    // One deadline for the whole call: the server's pings (skipped below)
    // must not restart the clock, or a silent stream never times out.
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.ok()??;
        match msg {
            Ok(Message::Text(t)) => {
                return Some(Frame::Json(
                    serde_json::from_str(t.as_str()).expect("JSON frame"),
                ))
            }
            Ok(Message::Close(c)) => {
                return Some(Frame::Closed(c.map(|c| u16::from(c.code)).unwrap_or(1005)))
            }
            Ok(_) => continue,
            Err(_) => return Some(Frame::Closed(1006)),
        }
    }
}

/// Reads frames until a close arrives; returns its code.
pub async fn ws_close_code(ws: &mut Ws, timeout: Duration) -> u16 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws_next(ws, left).await {
            Some(Frame::Closed(c)) => return c,
            Some(Frame::Json(_)) => continue,
            None => panic!("no close frame within {timeout:?}"),
        }
    }
}

/// Sends a text frame.
pub async fn ws_send(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_owned())).await.expect("send");
}

/// Opens `/v1/stream/<channel>`, waits for `subscribed`, sends `begin`.
pub async fn open_stream(addr: SocketAddr, channel: &str) -> Ws {
    let mut ws = ws_connect(addr, channel, "").await;
    match ws_next(&mut ws, Duration::from_secs(20)).await {
        Some(Frame::Json(v)) if v["type"] == "subscribed" => {}
        other => panic!("expected subscribed, got {other:?}"),
    }
    ws_send(&mut ws, r#"{"type":"begin"}"#).await;
    ws
}

/// Runs blocking work (Redis checks, producing) off the runtime's threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// A pipeline on the dev broker with an in-process reducer and publisher.
pub async fn setup(partitions: i32) -> (Arc<Pipeline>, ReducerHandle, InProcess) {
    let (p, reducer) = with_reducer(partitions).await;
    let publisher = InProcess::start(&p).await;
    (p, reducer, publisher)
}

/// A pipeline on the dev broker with an in-process reducer (start the
/// publisher with [`config_for`] and [`InProcess::start_with_config`] when
/// it needs other settings).
pub async fn with_reducer(partitions: i32) -> (Arc<Pipeline>, ReducerHandle) {
    with_reducer_using(partitions, |_| {}).await
}

/// [`with_reducer`] with reducer settings changed by `adjust` first (the
/// pipeline keeps them in `config`, for a restarted reducer).
pub async fn with_reducer_using(
    partitions: i32,
    adjust: impl FnOnce(&mut streampipe_reducer::Config) + Send + 'static,
) -> (Arc<Pipeline>, ReducerHandle) {
    blocking(move || {
        let mut p = Pipeline::new(Broker::Dev, partitions);
        adjust(&mut p.config);
        let r = streampipe_reducer::spawn(
            p.config.clone(),
            Arc::new(streampipe_reducer::Metrics::new()),
        )
        .unwrap();
        (Arc::new(p), r)
    })
    .await
}

/// The default publisher configuration for `p` (its broker, pipeline,
/// command topic and the test Redis).
pub fn config_for(p: &Pipeline) -> Config {
    let mut config = Config::new(&p.broker.bootstrap(), &p.name, &redis_url());
    config.command_topic = p.config.command_topic.clone();
    config
}

/// Reads updates until `pred` holds on everything read so far.
pub async fn read_updates(
    ws: &mut Ws,
    got: &mut Vec<serde_json::Value>,
    what: &str,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !pred(got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match ws_next(ws, left).await {
            Some(Frame::Json(v)) if v["type"] == "update" => got.push(v),
            Some(Frame::Json(_)) => {}
            other => panic!("waiting for {what}: got {other:?} after {got:?}"),
        }
    }
}

/// Whether `got` holds `market` at `version`.
pub fn has(got: &[serde_json::Value], market: &str, version: u64) -> bool {
    got.iter()
        .any(|u| u["market"] == market && u["version"] == version)
}

/// Versions never go backwards per market in `got`.
pub fn assert_increasing(got: &[serde_json::Value]) {
    let mut last: HashMap<String, u64> = HashMap::new();
    for u in got {
        let m = u["market"].as_str().unwrap().to_owned();
        let v = u["version"].as_u64().unwrap();
        if let Some(prev) = last.insert(m.clone(), v) {
            assert!(v > prev, "{m}: version {v} after {prev}: {got:?}");
        }
    }
}
