//! `streampipe-bench-fanout`: the "hot market" fan-out benchmark. N
//! watchers each own a channel on **one** market; a producer writes that
//! market's updates at 1/10/100 updates/s; the benchmark measures what one
//! update costs Redis and what the watchers get.
//!
//! How it measures:
//! - `run` is the coordinator. It runs the same-run baselines
//!   (`redis-benchmark ... PUBLISH ch <payload>` and `SPUBLISH`, payload of
//!   the published message's size), starts the client swarm as child
//!   processes (`swarm`, at most `--per-process` sockets each, because the
//!   sandbox caps open files per process), produces a warm-up update, then
//!   for each rate step produces `rate × seconds` updates of the market to
//!   the data topic (key = market, murmur2 partitioner, increasing versions,
//!   `ts` = now in ms), waits a grace period and collects one JSON report
//!   line per swarm process (the delivery figures), then drains: waits
//!   until the step's updates are applied, delivered (or delivery stalled)
//!   and Redis is idle, so a backlog neither hides its cost nor spills into
//!   the next step.
//! - Redis cost per update: `INFO cpu` (`used_cpu_sys + used_cpu_user`)
//!   from the step's start to the end of its drain, divided by the updates
//!   Redis applied (the market's version from `GET /v1/markets/<id>`), also
//!   net of Redis' idle CPU and of the benchmark's own probes;
//!   `INFO commandstats` deltas (calls, µs per call) of the costliest
//!   commands; the pub/sub connections' output buffers (`CLIENT LIST omem`,
//!   sampled every 250 ms) and a timeline of their (re)connections.
//! - `swarm` opens its share of the N WebSocket clients, spread over the
//!   publishers: each creates its own channel (`POST /v1/channels
//!   {"markets":[M]}`, bounded concurrency over keep-alive connections),
//!   connects to `/v1/stream/<id>`, sends `{"type":"begin"}` after the
//!   `subscribed` frame, and counts as ready once the warm-up version
//!   arrived. Every `update` frame of the market is recorded: latency from
//!   its `ts` (ms resolution: up to +1 ms), versions received in order,
//!   duplicates, out-of-order, `reset` frames and close codes.
//! - Loss follows the target "every watcher receives every update or a
//!   conflated newer one": produced version v is *covered* for a client once
//!   it received some version ≥ v. A client that has not received the
//!   step's last version by the end of the grace period counts as lost, and
//!   the (client, version) pairs never covered are reported. Freshness is
//!   the time from a version's scheduled production to its cover.
//!
//! Everything runs on 127.0.0.1; every loop is bounded in count and time.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Hot-market fan-out benchmark.
#[derive(Debug, Parser)]
#[command(about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Coordinator: baselines, swarm processes, producer, Redis figures.
    Run(RunArgs),
    /// One process of the client swarm (started by `run`; JSON lines on stdin/stdout).
    Swarm(SwarmArgs),
}

/// Where the clients go and how they are set up (shared by `run` and `swarm`).
#[derive(Debug, Clone, Args)]
struct ClientArgs {
    /// Publisher addresses (comma-separated); client i uses publisher i mod P.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:28281")]
    publishers: Vec<SocketAddr>,
    /// The hot market every channel watches (with `--markets` > 1, the prefix of the markets' names).
    #[arg(long, default_value = "hot")]
    market: String,
    /// Markets the clients spread over: client g watches market g mod K and
    /// the producer writes them round robin (1: the hot-market benchmark;
    /// K = clients: the end-to-end ramp, one market per watcher).
    #[arg(long, default_value_t = 1)]
    markets: usize,
    /// Channel creations in flight per swarm process (one keep-alive connection each).
    #[arg(long, default_value_t = 64)]
    create_concurrency: usize,
    /// WebSocket handshakes in flight per swarm process.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// How long a swarm process may take to create, connect and see every client ready.
    #[arg(long, default_value_t = 900)]
    setup_timeout_secs: u64,
    /// Tokio worker threads per swarm process.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    clients_args: ClientArgs,
    /// Watchers (one channel and one WebSocket each).
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Most client sockets per swarm process (the sandbox allows 20 000 open files per process).
    #[arg(long, default_value_t = 18_000)]
    per_process: usize,
    /// Update rates of the steps, updates/s (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    rates: Vec<u32>,
    /// Seconds of production per step.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Seconds after a step's last update before the swarm reports.
    #[arg(long, default_value_t = 5)]
    grace_secs: u64,
    /// Longest drain after the grace period (until the step's updates are applied, delivered or stalled for 3 s, and Redis idle).
    #[arg(long, default_value_t = 60)]
    drain_secs: u64,
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:29192")]
    brokers: String,
    /// Data topic.
    #[arg(long, default_value = "fanout.data")]
    data_topic: String,
    /// Redis URL of the pipeline; on a Redis Cluster every node's URL
    /// (comma-separated): CPU, command and output figures are summed over
    /// them, the baselines run on the master of the benchmark channel's slot.
    #[arg(
        long = "redis-url",
        value_delimiter = ',',
        default_value = "redis://127.0.0.1:26479"
    )]
    redis_urls: Vec<String>,
    /// `redis-benchmark` binary for the baselines ("" skips them).
    #[arg(long, default_value = "redis-benchmark")]
    redis_benchmark: String,
    /// Requests per baseline command.
    #[arg(long, default_value_t = 200_000)]
    baseline_requests: u64,
    /// The producer's `linger.ms`. The dev broker returns one producer
    /// batch per partition per fetch (FACTS.md), so at thousands of
    /// records/s a 1 ms linger measures the broker's fetch loop, not the
    /// pipeline; a real producer at such rates batches too.
    #[arg(long, default_value_t = 1)]
    linger_ms: u32,
    /// Processes whose CPU to report per step, `name=pid` (repeatable; equal names are summed).
    #[arg(long = "pid", value_parser = parse_pid)]
    pids: Vec<(String, u32)>,
}

impl ClientArgs {
    /// Name of market `j` (`--market` itself when there is one market).
    fn market_name(&self, j: usize) -> String {
        if self.markets <= 1 {
            self.market.clone()
        } else {
            format!("{}-{j}", self.market)
        }
    }

    /// Index of the market global client (or produced record) `g` uses.
    fn market_of(&self, g: u64) -> u64 {
        g % self.markets.max(1) as u64
    }
}

/// Versions `first..=last` of a step go round robin over `k` markets
/// (version `first + n` to market `n mod k`): the step's versions of market
/// `j` are `first + j, first + j + k, …`. Returns the last of them, if any.
fn last_of_market(first: u64, last: u64, k: u64, j: u64) -> Option<u64> {
    let own_first = first + j;
    (own_first <= last).then(|| own_first + (last - own_first) / k * k)
}

/// The first version of market `j` at or above `v` (see `last_of_market`).
fn next_of_market(first: u64, k: u64, j: u64, v: u64) -> u64 {
    let own_first = first + j;
    if v <= own_first {
        own_first
    } else {
        own_first + (v - own_first).div_ceil(k) * k
    }
}

#[derive(Debug, Args)]
struct SwarmArgs {
    #[command(flatten)]
    clients_args: ClientArgs,
    /// Global index of this process' first client (spreads publishers and source addresses).
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Clients of this process.
    #[arg(long, default_value_t = 1_000)]
    count: usize,
    /// A client is ready once it received this version (the coordinator's warm-up update).
    #[arg(long, default_value_t = 1)]
    ready_version: u64,
}

fn parse_pid(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("expected name=pid, got {s:?}"))?;
    Ok((
        name.to_owned(),
        pid.parse().map_err(|e| format!("{s:?}: {e}"))?,
    ))
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}

// ---------------------------------------------------------------------------
// Latency histogram: log buckets 1.5% wide from 1 µs to ~18 min. Atomic, so
// every client of a swarm records into one without a lock, and sparse
// `[bucket, count]` lists merge across processes.

const HIST_BUCKETS: usize = 1_400;
const HIST_LN_STEP: f64 = 0.014_888_612_493_750_65; // ln(1.015)

struct Hist(Vec<AtomicU64>);

impl Hist {
    fn new() -> Self {
        Hist((0..HIST_BUCKETS).map(|_| AtomicU64::new(0)).collect())
    }
    fn record(&self, us: u64) {
        let i = ((us as f64 + 1.0).ln() / HIST_LN_STEP) as usize;
        self.0[i.min(HIST_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }
    fn reset(&self) {
        for b in &self.0 {
            b.store(0, Ordering::Relaxed);
        }
    }
    fn sparse(&self) -> Vec<(usize, u64)> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let n = b.load(Ordering::Relaxed);
                (n > 0).then_some((i, n))
            })
            .collect()
    }
}

/// Percentile `p` (0..=1) in ms of merged sparse buckets.
fn percentile_ms(buckets: &BTreeMap<usize, u64>, p: f64) -> Option<f64> {
    let total: u64 = buckets.values().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * p).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (&i, &n) in buckets {
        seen += n;
        if seen >= rank {
            // Geometric middle of the bucket.
            let us = ((i as f64 + 0.5) * HIST_LN_STEP).exp() - 1.0;
            return Some(us / 1000.0);
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Swarm.

/// The current step, as the coordinator announced it.
#[derive(Default)]
struct StepInfo {
    first: AtomicU64,
    last: AtomicU64,
    /// When version `first` is due (µs since the epoch).
    t0_us: AtomicU64,
    interval_us: AtomicU64,
}

/// One client's record.
#[derive(Default)]
struct ClientState {
    connected: bool,
    ready: bool,
    /// Highest version received.
    max_version: u64,
    /// Close code, once the stream ended (1006: no close frame).
    closed: Option<u16>,
    /// `reset` frames received (since the start, not per step).
    resets: u32,
    // Per step:
    in_order: u32,
    duplicates: u32,
    out_of_order: u32,
    first_recv_us: u64,
    last_recv_us: u64,
}

impl ClientState {
    fn reset_step(&mut self) {
        self.in_order = 0;
        self.duplicates = 0;
        self.out_of_order = 0;
        self.first_recv_us = 0;
        self.last_recv_us = 0;
    }
}

struct Swarm {
    args: SwarmArgs,
    step: StepInfo,
    clients: Vec<Mutex<ClientState>>,
    latency: Hist,
    freshness: Hist,
    other_frames: AtomicU64,
    bad_frames: AtomicU64,
    create_failed: AtomicU64,
    connect_failed: AtomicU64,
    handshakes_done: AtomicU64,
}

/// The value of top-level field `key` of a server frame (string contents or
/// a number), found by scanning rather than parsing: frames are compact JSON
/// whose head (`type`, `market`, `version`, `ts`) precedes the payload, and
/// a full parse per message would make the swarm, not the server, the
/// bottleneck.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let b = text.as_bytes();
    let mut from = 0;
    loop {
        let at = from + text[from..].find(key)?;
        from = at + key.len();
        if at == 0 || b[at - 1] != b'"' || b.get(from) != Some(&b'"') {
            continue;
        }
        let Some(rest) = text[from + 1..].trim_start().strip_prefix(':') else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(s) = rest.strip_prefix('"') {
            return s.split('"').next();
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '-'))
            .unwrap_or(rest.len());
        return Some(&rest[..end]);
    }
}

impl Swarm {
    fn on_update(&self, i: usize, version: u64, ts_ms: Option<u64>) {
        let now = now_us();
        let first = self.step.first.load(Ordering::Relaxed);
        let last = self.step.last.load(Ordering::Relaxed);
        let in_step = first > 0 && (first..=last).contains(&version);
        let mut c = self.clients[i].lock().expect("client lock");
        if version > c.max_version {
            if in_step {
                c.in_order += 1;
                if c.first_recv_us == 0 {
                    c.first_recv_us = now;
                }
                c.last_recv_us = now;
                if let Some(ts) = ts_ms {
                    self.latency.record(now.saturating_sub(ts * 1000));
                }
            }
            // Every step version of this client's market up to this one is
            // now covered (received or conflated into this newer one).
            if first > 0 {
                let t0 = self.step.t0_us.load(Ordering::Relaxed);
                let iv = self.step.interval_us.load(Ordering::Relaxed);
                let (k, j) = self.market_of(i);
                let from = next_of_market(first, k, j, (c.max_version + 1).max(first));
                let to = version.min(last);
                let mut v = from;
                while v <= to {
                    self.freshness
                        .record(now.saturating_sub(t0 + (v - first) * iv));
                    v += k;
                }
            }
            c.max_version = version;
            if !c.ready && version >= self.args.ready_version {
                c.ready = true;
            }
        } else if in_step {
            if version == c.max_version {
                c.duplicates += 1;
            } else {
                c.out_of_order += 1;
            }
        }
    }

    /// (markets, index of local client `i`'s market).
    fn market_of(&self, i: usize) -> (u64, u64) {
        let a = &self.args.clients_args;
        (
            a.markets.max(1) as u64,
            a.market_of((self.args.first + i) as u64),
        )
    }

    fn report(&self) -> Value {
        let first = self.step.first.load(Ordering::Relaxed);
        let step_last = self.step.last.load(Ordering::Relaxed);
        let (mut ready, mut open, mut got_last, mut lost, mut uncovered) = (0u64, 0u64, 0, 0, 0);
        let (mut in_order, mut dups, mut ooo, mut resets, mut reset_clients) = (0u64, 0, 0, 0, 0);
        let mut lost_open = 0u64;
        let (mut first_recv, mut last_recv) = (u64::MAX, 0u64);
        let mut closes: BTreeMap<String, u64> = BTreeMap::new();
        for (i, c) in self.clients.iter().enumerate() {
            let c = c.lock().expect("client lock");
            if !c.ready {
                continue;
            }
            let (k, j) = self.market_of(i);
            // A market the step did not reach (more markets than updates)
            // has nothing to lose.
            let last = last_of_market(first, step_last, k, j).unwrap_or(0);
            ready += 1;
            if c.closed.is_none() {
                open += 1;
            }
            if let Some(code) = c.closed {
                *closes.entry(code.to_string()).or_default() += 1;
            }
            if first > 0 {
                if c.max_version >= last {
                    got_last += 1;
                } else {
                    lost += 1;
                    lost_open += u64::from(c.closed.is_none());
                    let from = next_of_market(first, k, j, c.max_version.max(first - 1) + 1);
                    uncovered += (last - from) / k + 1;
                }
            }
            in_order += u64::from(c.in_order);
            dups += u64::from(c.duplicates);
            ooo += u64::from(c.out_of_order);
            resets += u64::from(c.resets);
            reset_clients += u64::from(c.resets > 0);
            if c.first_recv_us > 0 {
                first_recv = first_recv.min(c.first_recv_us);
                last_recv = last_recv.max(c.last_recv_us);
            }
        }
        json!({
            "event": "report",
            "clients": self.clients.len(),
            "ready": ready,
            "open": open,
            "got_last": got_last,
            "lost_open": lost_open,
            "lost": lost,
            "uncovered": uncovered,
            "in_order": in_order,
            "duplicates": dups,
            "out_of_order": ooo,
            "resets": resets,
            "reset_clients": reset_clients,
            "closes": closes,
            "first_recv_us": if first_recv == u64::MAX { 0 } else { first_recv },
            "last_recv_us": last_recv,
            "latency": self.latency.sparse(),
            "freshness": self.freshness.sparse(),
            "other_frames": self.other_frames.load(Ordering::Relaxed),
            "bad_frames": self.bad_frames.load(Ordering::Relaxed),
        })
    }
}

/// A keep-alive HTTP/1.1 connection for the control API (enough of HTTP for
/// warp's JSON replies, which carry a Content-Length).
struct Http {
    addr: SocketAddr,
    conn: Option<tokio::io::BufReader<TcpStream>>,
}

impl Http {
    async fn post_json(&mut self, path: &str, body: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        let res = self.try_post(path, body).await;
        if res.is_err() {
            self.conn = None;
        }
        res
    }

    async fn try_post(&mut self, path: &str, body: &str) -> anyhow::Result<(u16, Vec<u8>)> {
        if self.conn.is_none() {
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.conn = Some(tokio::io::BufReader::new(s));
        }
        let conn = self.conn.as_mut().expect("just set");
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        conn.get_mut().write_all(req.as_bytes()).await?;
        let mut line = String::new();
        conn.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {line:?}"))?;
        let (mut len, mut close) = (None, false);
        for _ in 0..100 {
            line.clear();
            if conn.read_line(&mut line).await? == 0 {
                bail!("connection closed in headers");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
                if k == "content-length" {
                    len = v.parse::<usize>().ok();
                } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                    close = true;
                }
            }
        }
        let len = len.context("reply without Content-Length")?;
        let mut body = vec![0; len];
        conn.read_exact(&mut body).await?;
        if close {
            self.conn = None;
        }
        Ok((status, body))
    }
}

/// Creates the channels of clients `indices` (one worker, one connection
/// per publisher); returns (local index, channel id).
async fn create_channels(
    sw: Arc<Swarm>,
    indices: Vec<usize>,
    deadline: Instant,
) -> Vec<(usize, String)> {
    let a = &sw.args.clients_args;
    let mut conns: HashMap<SocketAddr, Http> = HashMap::new();
    let mut out = Vec::with_capacity(indices.len());
    for i in indices {
        let addr = a.publishers[(sw.args.first + i) % a.publishers.len()];
        let market = a.market_name(a.market_of((sw.args.first + i) as u64) as usize);
        let body = json!({ "markets": [market] }).to_string();
        let http = conns.entry(addr).or_insert(Http { addr, conn: None });
        let mut created = None;
        // Bounded retries: 429 (the pod's command bucket) and transient errors.
        for attempt in 0..30u64 {
            if Instant::now() > deadline {
                break;
            }
            match http.post_json("/v1/channels", &body).await {
                Ok((201, reply)) => {
                    created = serde_json::from_slice::<Value>(&reply)
                        .ok()
                        .and_then(|v| v["channel"].as_str().map(str::to_owned));
                    break;
                }
                Ok((status, reply)) => {
                    if attempt == 0 || status != 429 {
                        eprintln!(
                            "swarm: create channel: HTTP {status}: {}",
                            String::from_utf8_lossy(&reply)
                        );
                    }
                }
                Err(e) => eprintln!("swarm: create channel: {e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(100 * (attempt + 1).min(10))).await;
        }
        match created {
            Some(id) => out.push((i, id)),
            None => {
                sw.create_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    out
}

/// Source address of global client `g`: 20 000 clients per 127.0.0.x, so no
/// source address runs out of ephemeral ports (28 000 on this machine).
fn source(g: usize) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (g / 20_000) as u8)),
        0,
    )
}

fn ws_config() -> WebSocketConfig {
    // The swarm must not be the memory hog: small buffers (frames are ~200 B).
    WebSocketConfig::default()
        .read_buffer_size(2048)
        .write_buffer_size(0)
}

/// One watcher: connect, `begin` after `subscribed`, record every frame
/// until the stream ends. The handshake permit is released once connected.
async fn watcher(
    sw: Arc<Swarm>,
    i: usize,
    channel: String,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let a = &sw.args.clients_args;
    let g = sw.args.first + i;
    let addr = a.publishers[g % a.publishers.len()];
    let market = a.market_name(a.market_of(g as u64) as usize);
    let connected = async {
        let sock = TcpSocket::new_v4()?;
        sock.bind(source(g))?;
        let tcp = sock.connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            format!("ws://{addr}/v1/stream/{channel}"),
            tokio_tungstenite::MaybeTlsStream::Plain(tcp),
            Some(ws_config()),
        )
        .await?;
        anyhow::Ok(ws)
    };
    let mut ws = match tokio::time::timeout(Duration::from_secs(30), connected).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            eprintln!("swarm: client {g}: connect: {e:#}");
            sw.connect_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Err(_) => {
            sw.connect_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    drop(permit);
    sw.handshakes_done.fetch_add(1, Ordering::Relaxed);
    sw.clients[i].lock().expect("client lock").connected = true;
    let mut code = 1006;
    while let Some(msg) = ws.next().await {
        let text = match msg {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(frame)) => {
                code = frame.map_or(1005, |f| u16::from(f.code));
                break;
            }
            Ok(_) => continue, // pings are answered by tungstenite
            Err(_) => break,
        };
        let text = text.as_str();
        let Some(kind) = field(text, "type") else {
            sw.bad_frames.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        match kind {
            "update" if field(text, "market") == Some(market.as_str()) => {
                match field(text, "version").and_then(|v| v.parse().ok()) {
                    Some(v) => {
                        let ts = field(text, "ts").and_then(|t| t.parse().ok());
                        sw.on_update(i, v, ts);
                    }
                    None => {
                        sw.bad_frames.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            "subscribed" => {
                if ws.send(Message::text(r#"{"type":"begin"}"#)).await.is_err() {
                    break;
                }
            }
            "reset" => sw.clients[i].lock().expect("client lock").resets += 1,
            _ => {
                sw.other_frames.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    sw.clients[i].lock().expect("client lock").closed = Some(code);
}

/// Prints one JSON line to the coordinator.
fn emit(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

async fn swarm(args: SwarmArgs) -> anyhow::Result<()> {
    let a = args.clients_args.clone();
    anyhow::ensure!(!a.publishers.is_empty(), "--publishers is empty");
    let sw = Arc::new(Swarm {
        clients: (0..args.count).map(|_| Mutex::default()).collect(),
        args,
        step: StepInfo::default(),
        latency: Hist::new(),
        freshness: Hist::new(),
        other_frames: AtomicU64::new(0),
        bad_frames: AtomicU64::new(0),
        create_failed: AtomicU64::new(0),
        connect_failed: AtomicU64::new(0),
        handshakes_done: AtomicU64::new(0),
    });
    let n = sw.args.count;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(a.setup_timeout_secs);

    // Channels first, in bulk: `create_concurrency` workers, interleaved.
    let workers = a.create_concurrency.clamp(1, n.max(1));
    let mut jobs = Vec::new();
    for w in 0..workers {
        let indices: Vec<usize> = (w..n).step_by(workers).collect();
        jobs.push(tokio::spawn(create_channels(sw.clone(), indices, deadline)));
    }
    let mut channels = Vec::with_capacity(n);
    for j in jobs {
        channels.extend(j.await?);
    }
    channels.sort_unstable();
    let create_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "swarm {}: {} channels created in {create_secs:.1} s ({} failed)",
        sw.args.first,
        channels.len(),
        sw.create_failed.load(Ordering::Relaxed)
    );

    // Then the streams, `connect_concurrency` handshakes at a time.
    let sem = Arc::new(tokio::sync::Semaphore::new(a.connect_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(channels.len());
    for (i, id) in channels {
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => p?,
            _ = tokio::time::sleep_until(deadline.into()) => break,
        };
        tasks.push(tokio::spawn(watcher(sw.clone(), i, id, permit)));
    }
    let connect_secs = started.elapsed().as_secs_f64() - create_secs;
    // Ready: the warm-up version arrived (subscription applied, begin replayed).
    loop {
        let (mut ready, mut ended) = (0usize, 0usize);
        for c in &sw.clients {
            let c = c.lock().expect("client lock");
            ready += usize::from(c.ready);
            ended += usize::from(!c.ready && c.closed.is_some());
        }
        let failed = (sw.create_failed.load(Ordering::Relaxed)
            + sw.connect_failed.load(Ordering::Relaxed)) as usize;
        if ready + ended + failed >= n || Instant::now() > deadline {
            emit(&json!({
                "event": "ready",
                "clients": n,
                "ready": ready,
                "closed_before_ready": ended,
                "create_failed": sw.create_failed.load(Ordering::Relaxed),
                "connect_failed": sw.connect_failed.load(Ordering::Relaxed),
                "create_secs": create_secs,
                "connect_secs": connect_secs,
                "setup_secs": started.elapsed().as_secs_f64(),
            }));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Commands from the coordinator, one JSON object per line, until EOF.
    // (A plain thread reads stdin: the workspace's tokio has no `io-std`.)
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = lines.recv().await {
        let cmd: Value = serde_json::from_str(&line).context("coordinator command")?;
        match cmd["cmd"].as_str() {
            Some("step") => {
                for c in &sw.clients {
                    c.lock().expect("client lock").reset_step();
                }
                sw.latency.reset();
                sw.freshness.reset();
                let s = &sw.step;
                s.last
                    .store(cmd["last"].as_u64().unwrap_or(0), Ordering::Relaxed);
                s.t0_us
                    .store(cmd["t0_us"].as_u64().unwrap_or(0), Ordering::Relaxed);
                s.interval_us
                    .store(cmd["interval_us"].as_u64().unwrap_or(0), Ordering::Relaxed);
                s.first
                    .store(cmd["first"].as_u64().unwrap_or(0), Ordering::Relaxed);
                emit(&json!({"event": "step"}));
            }
            Some("report") => emit(&sw.report()),
            Some("quit") => break,
            other => bail!("unknown command {other:?}"),
        }
    }
    for t in tasks {
        t.abort();
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Coordinator.

/// Counts failed deliveries of the producer.
#[derive(Default)]
struct CountFailures(Arc<AtomicU64>);

impl ClientContext for CountFailures {}

impl ProducerContext for CountFailures {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        if r.is_err() {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A swarm child process and its stdin.
struct SwarmProc {
    child: Child,
    stdin: ChildStdin,
}

/// `INFO <section>` as key → value.
/// `BUSY` replies the benchmark got: Redis answers nothing else while a
/// script runs longer than its busy threshold (5 s), which a fan-out script
/// over many thousand channels does.
static BUSY_REPLIES: AtomicU64 = AtomicU64::new(0);

/// Runs `cmd`, waiting out `BUSY` replies (and counting them) for up to two
/// minutes.
fn query_patiently<T: redis::FromRedisValue>(
    redis: &mut redis::Connection,
    cmd: &redis::Cmd,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match cmd.query(redis) {
            Err(e) if e.code() == Some("BUSY") && Instant::now() < deadline => {
                BUSY_REPLIES.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(250));
            }
            other => return Ok(other?),
        }
    }
}

fn info(redis: &mut redis::Connection, section: &str) -> anyhow::Result<HashMap<String, String>> {
    let text: String = query_patiently(redis, redis::cmd("INFO").arg(section))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect())
}

/// Seconds of CPU the Redis nodes used (sys + user, all threads), summed.
fn redis_cpu(nodes: &mut [redis::Connection]) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for redis in nodes {
        let i = info(redis, "cpu")?;
        let f = |k: &str| i.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        sum += f("used_cpu_sys") + f("used_cpu_user");
    }
    Ok(sum)
}

/// `INFO commandstats` as command → (calls, µs), summed over the nodes.
fn commandstats(nodes: &mut [redis::Connection]) -> anyhow::Result<HashMap<String, (u64, u64)>> {
    let mut sum: HashMap<String, (u64, u64)> = HashMap::new();
    for redis in nodes {
        for (k, v) in info(redis, "commandstats")? {
            let Some(cmd) = k.strip_prefix("cmdstat_") else {
                continue;
            };
            let field = |name: &str| {
                v.split(',')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|x| x.parse::<u64>().ok())
            };
            if let (Some(calls), Some(usec)) = (field("calls"), field("usec")) {
                let e = sum.entry(cmd.to_owned()).or_default();
                e.0 += calls;
                e.1 += usec;
            }
        }
    }
    Ok(sum)
}

/// Bytes the Redis nodes wrote to their clients (`total_net_output_bytes`), summed.
fn net_output(nodes: &mut [redis::Connection]) -> anyhow::Result<u64> {
    let mut sum = 0;
    for redis in nodes {
        sum += stat_u64(&info(redis, "stats")?, "total_net_output_bytes");
    }
    Ok(sum)
}

/// `host:port` of a `redis://host:port[/db]` URL.
fn host_port(url: &str) -> anyhow::Result<(String, String)> {
    url.strip_prefix("redis://")
        .and_then(|r| r.split('/').next())
        .and_then(|r| r.rsplit_once(':'))
        .map(|(h, p)| (h.to_owned(), p.to_owned()))
        .with_context(|| format!("expected redis://host:port, got {url}"))
}

/// Index of the node (in `urls`) that masters `key`'s slot: the only one
/// when there is one node, else per `CLUSTER SLOTS` of the first.
fn master_of(urls: &[String], nodes: &mut [redis::Connection], key: &str) -> anyhow::Result<usize> {
    if nodes.len() == 1 {
        return Ok(0);
    }
    let slot = i64::from(streampipe_contract::slot(key.as_bytes()));
    let slots: Vec<(i64, i64, (String, i64))> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query::<Vec<redis::Value>>(&mut nodes[0])?
        .into_iter()
        .filter_map(|r| {
            let redis::Value::Array(r) = r else {
                return None;
            };
            let from = redis::from_redis_value::<i64>(r.first()?.clone()).ok()?;
            let to = redis::from_redis_value::<i64>(r.get(1)?.clone()).ok()?;
            // [host, port, node id, …]: the first two.
            let redis::Value::Array(m) = r.get(2)? else {
                return None;
            };
            let master = (
                redis::from_redis_value::<String>(m.first()?.clone()).ok()?,
                redis::from_redis_value::<i64>(m.get(1)?.clone()).ok()?,
            );
            Some((from, to, master))
        })
        .collect();
    let (_, _, (host, port)) = slots
        .into_iter()
        .find(|(a, b, _)| (*a..=*b).contains(&slot))
        .with_context(|| format!("no master for slot {slot}"))?;
    urls.iter()
        .position(|u| host_port(u).is_ok_and(|(h, p)| h == host && p == port.to_string()))
        .with_context(|| format!("master {host}:{port} is not among --redis-url"))
}

fn stat_u64(i: &HashMap<String, String>, k: &str) -> u64 {
    i.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Commands by µs spent between two `commandstats` snapshots: (name, calls, µs).
fn command_delta(
    before: &HashMap<String, (u64, u64)>,
    after: &HashMap<String, (u64, u64)>,
) -> Vec<(String, u64, u64)> {
    let mut v: Vec<(String, u64, u64)> = after
        .iter()
        .filter_map(|(k, &(calls, usec))| {
            let (c0, u0) = before.get(k).copied().unwrap_or((0, 0));
            (calls > c0).then(|| (k.clone(), calls - c0, usec.saturating_sub(u0)))
        })
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.2));
    v
}

fn describe_commands(delta: &[(String, u64, u64)], top: usize) -> String {
    delta
        .iter()
        .take(top)
        .map(|(k, calls, usec)| {
            format!(
                "{k} {calls} calls × {:.1} µs",
                *usec as f64 / (*calls).max(1) as f64
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the pub/sub connections looked like during a step.
#[derive(Debug, Default, Clone)]
struct PubsubSample {
    /// Largest output buffer (omem) of a pub/sub connection, bytes.
    max_omem: u64,
    /// Fewest pub/sub connections seen at once.
    min_conns: usize,
    /// Most pub/sub connections seen at once.
    max_conns: usize,
    /// Pub/sub connection ids seen.
    ids: std::collections::HashSet<u64>,
    /// Changes of the set of pub/sub connections, "+12.3 s: 1 (ids 6)".
    timeline: Vec<String>,
}

/// Samples `CLIENT LIST` of every node every 250 ms until `stop`.
fn sample_pubsub(urls: Vec<String>, stop: Arc<AtomicBool>) -> anyhow::Result<PubsubSample> {
    let mut nodes = connect_all(&urls)?;
    let mut s = PubsubSample {
        min_conns: usize::MAX,
        ..Default::default()
    };
    let started = Instant::now();
    let mut previous: Option<Vec<u64>> = None;
    // Bounded by `stop`, and by a hard cap of one hour of samples.
    for _ in 0..14_400 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut ids = Vec::new();
        let mut omem = 0;
        let mut lists = Vec::new();
        for (n, redis) in nodes.iter_mut().enumerate() {
            let list: String = query_patiently(redis, redis::cmd("CLIENT").arg("LIST"))?;
            lists.push((n as u64, list));
        }
        // Client ids are per node: node n's id i counts as n·2^40 + i.
        for (line, node) in lists
            .iter()
            .flat_map(|(n, l)| l.lines().map(move |line| (line, *n << 40)))
        {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|x| x.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            if field("sub") + field("psub") + field("ssub") > 0 {
                ids.push(node + field("id"));
                omem = omem.max(field("omem"));
                s.ids.insert(node + field("id"));
            }
        }
        ids.sort_unstable();
        s.max_omem = s.max_omem.max(omem);
        s.min_conns = s.min_conns.min(ids.len());
        s.max_conns = s.max_conns.max(ids.len());
        if previous.as_ref() != Some(&ids) && s.timeline.len() < 40 {
            s.timeline.push(format!(
                "+{:.1} s: {} (ids {:?})",
                started.elapsed().as_secs_f64(),
                ids.len(),
                ids
            ));
        }
        previous = Some(ids);
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(s)
}

/// The market's version as the publisher's snapshot endpoint
/// (`GET /v1/markets/<id>`) reports it: how far Redis applied the updates.
fn market_version(addr: SocketAddr, market: &str) -> Option<u64> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /v1/markets/{market} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    s.take(1 << 20).read_to_string(&mut reply).ok()?;
    let (_, body) = reply.split_once("\r\n\r\n")?;
    field(body, "version")?.parse().ok()
}

/// Peak RSS (VmHWM) in KB per process name.
fn group_rss(pids: &[(String, u32)], swarm: &[u32]) -> Vec<(String, u64)> {
    let hwm = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    };
    let mut out: Vec<(String, u64)> = Vec::new();
    for (n, p) in pids {
        match out.iter_mut().find(|(m, _)| m == n) {
            Some(e) => e.1 += hwm(*p),
            None => out.push((n.clone(), hwm(*p))),
        }
    }
    out.push(("swarm".into(), swarm.iter().map(|p| hwm(*p)).sum()));
    out
}

/// A published update as the pipeline encodes it (for the baseline payload size).
fn record_value(market: &str, version: u64, ts_ms: u64, seq: u64) -> String {
    format!(
        r#"{{"v":1,"market":"{market}","version":{version},"ts":{ts_ms},"payload":{{"event":"Hot v Market","home":1.95,"draw":3.40,"away":4.20,"status":"open","seq":{seq}}}}}"#
    )
}

/// Connections to every node.
fn connect_all(urls: &[String]) -> anyhow::Result<Vec<redis::Connection>> {
    urls.iter()
        .map(|u| Ok(redis::Client::open(u.as_str())?.get_connection()?))
        .collect()
}

/// One `redis-benchmark` baseline on the master of the channel `ch`:
/// prints its line, Redis CPU and µs per call.
fn baseline(
    a: &RunArgs,
    nodes: &mut [redis::Connection],
    cmd: &str,
    payload_len: usize,
) -> anyhow::Result<Value> {
    let n = master_of(&a.redis_urls, nodes, "ch")?;
    let (host, port) = host_port(&a.redis_urls[n])?;
    let redis = std::slice::from_mut(&mut nodes[n]);
    let payload = "x".repeat(payload_len);
    let cpu0 = redis_cpu(redis)?;
    let stats0 = commandstats(redis)?;
    let out = Command::new(&a.redis_benchmark)
        .args(["-h", &host, "-p", &port])
        .args(["-n", &a.baseline_requests.to_string(), "-q"])
        .args([cmd, "ch", &payload])
        .output()
        .with_context(|| format!("running {}", a.redis_benchmark))?;
    let cpu = redis_cpu(redis)? - cpu0;
    let delta = command_delta(&stats0, &commandstats(redis)?);
    // `-q` prints "PUBLISH ch xxx…: 123456.78 requests per second, p50=…",
    // with carriage-return progress lines before it.
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .split(['\r', '\n'])
        .rfind(|l| l.contains("requests per second"))
        .unwrap_or("")
        .to_owned();
    let rps = line
        .split(": ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse::<f64>().ok())
        .unwrap_or(0.0);
    let key = cmd.to_ascii_lowercase();
    let per_call = delta
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, calls, usec)| *usec as f64 / (*calls).max(1) as f64)
        .unwrap_or(f64::NAN);
    let n = a.baseline_requests as f64;
    let summary = line
        .split_once(": ")
        .map(|(_, r)| r.trim().to_owned())
        .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_owned());
    println!(
        "baseline `redis-benchmark -n {} -q {cmd} ch <{payload_len} B>`: {summary}; Redis CPU {:.2} µs per call (INFO cpu), {per_call:.2} µs per call (commandstats)",
        a.baseline_requests,
        cpu * 1e6 / n
    );
    Ok(json!({"cmd": cmd, "rps": rps, "redis_cpu_us": cpu * 1e6 / n, "usec_per_call": per_call}))
}

/// Receives the next line of every swarm process that is an `event`.
fn collect(
    rx: &mpsc::Receiver<(usize, Value)>,
    procs: usize,
    event: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + timeout;
    let mut got: Vec<Option<Value>> = vec![None; procs];
    while got.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let (i, v) = rx
            .recv_timeout(left)
            .with_context(|| format!("waiting for the swarm's {event:?} lines"))?;
        if v["event"] == event {
            got[i] = Some(v);
        }
    }
    Ok(got.into_iter().map(|v| v.expect("all present")).collect())
}

fn send(procs: &mut [SwarmProc], cmd: &Value) -> anyhow::Result<()> {
    for p in procs.iter_mut() {
        writeln!(p.stdin, "{cmd}")?;
        p.stdin.flush()?;
    }
    Ok(())
}

fn sum(reports: &[Value], k: &str) -> u64 {
    reports.iter().map(|r| r[k].as_u64().unwrap_or(0)).sum()
}

fn merge_hist(reports: &[Value], k: &str) -> BTreeMap<usize, u64> {
    let mut m = BTreeMap::new();
    for r in reports {
        for b in r[k].as_array().into_iter().flatten() {
            if let (Some(i), Some(n)) = (b[0].as_u64(), b[1].as_u64()) {
                *m.entry(i as usize).or_default() += n;
            }
        }
    }
    m
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_owned(), |x| format!("{x:.1}"))
}

/// The latency a ramp step must keep to count as sustained (issue #8: p99 ≤ 100 ms end to end).
const P99_TARGET_MS: f64 = 100.0;

fn run(a: RunArgs) -> anyhow::Result<()> {
    let c = &a.clients_args;
    anyhow::ensure!(
        !c.publishers.is_empty() && a.clients > 0,
        "need publishers and clients"
    );
    anyhow::ensure!(a.rates.iter().all(|&r| r > 0), "rates must be positive");
    let mut nodes = connect_all(&a.redis_urls)?;
    let redis = &mut nodes[..];
    let server = info(&mut redis[0], "server")?;
    let node_note = if redis.len() > 1 {
        format!(" (figures summed over {} nodes)", redis.len())
    } else {
        String::new()
    };
    println!(
        "== fan-out: {} watchers of {} over {} publisher(s); steps {:?} updates/s × {} s (+{} s grace); Redis {}{node_note}",
        a.clients,
        if c.markets <= 1 {
            format!("{:?}", c.market)
        } else {
            format!("{} markets {:?}-0…", c.markets, c.market)
        },
        c.publishers.len(),
        a.rates,
        a.seconds,
        a.grace_secs,
        server.get("redis_version").map_or("?", String::as_str)
    );

    // Same-run baselines, with a payload as large as a published update.
    let payload_len = format!(
        r#"{{"type":"update","market":"{}","version":{},"ts":{},"payload":{{"event":"Hot v Market","home":1.95,"draw":3.40,"away":4.20,"status":"open","seq":1000}}}}"#,
        c.market,
        now_us() / 1000,
        now_us() / 1000
    )
    .len();
    let mut baselines = Vec::new();
    if !a.redis_benchmark.is_empty() {
        for cmd in ["PUBLISH", "SPUBLISH"] {
            baselines.push(baseline(&a, redis, cmd, payload_len)?);
        }
    }

    let failures = Arc::new(AtomicU64::new(0));
    let producer: ThreadedProducer<CountFailures> = ClientConfig::new()
        .set("bootstrap.servers", &a.brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", a.linger_ms.to_string())
        .create_with_context(CountFailures(failures.clone()))?;
    // Versions start at the wall clock in ms: above any earlier run's on the
    // same Redis, whatever the state layout, and far below 2^53.
    let mut version = now_us() / 1000;
    let names: Vec<String> = (0..c.markets.max(1)).map(|j| c.market_name(j)).collect();
    // Record `seq` of a step goes to market `seq mod K` (see `last_of_market`).
    let produce = |version: u64, seq: u64| -> anyhow::Result<()> {
        let market = &names[c.market_of(seq) as usize];
        let value = record_value(market, version, now_us() / 1000, seq);
        let mut rec = BaseRecord::<str, str>::to(&a.data_topic)
            .key(market)
            .payload(&value);
        // A full local queue clears within milliseconds; bounded retries.
        for _ in 0..100 {
            match producer.send(rec) {
                Ok(()) => return Ok(()),
                Err((e, r)) => {
                    eprintln!("produce: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(20));
                    rec = r;
                }
            }
        }
        bail!("produce kept failing")
    };
    // Warm-up: the market has a state before anyone watches, so every `begin`
    // replays it and tells the swarm the client is wired end to end.
    let warm = version;
    for j in 0..names.len() as u64 {
        produce(warm, j)?;
    }
    producer.flush(Duration::from_secs(10))?;

    // The swarm: ≤ per_process clients per process.
    let procs_n = a.clients.div_ceil(a.per_process.max(1));
    let per = a.clients.div_ceil(procs_n);
    let exe = std::env::current_exe()?;
    let (tx, rx) = mpsc::channel::<(usize, Value)>();
    let mut procs = Vec::new();
    let mut swarm_pids = Vec::new();
    for p in 0..procs_n {
        let first = p * per;
        let count = per.min(a.clients - first);
        let publishers: Vec<String> = c.publishers.iter().map(ToString::to_string).collect();
        let mut child = Command::new(&exe)
            .arg("swarm")
            .args(["--publishers", &publishers.join(",")])
            .args(["--market", &c.market])
            .args(["--markets", &c.markets.to_string()])
            .args(["--create-concurrency", &c.create_concurrency.to_string()])
            .args(["--connect-concurrency", &c.connect_concurrency.to_string()])
            .args(["--setup-timeout-secs", &c.setup_timeout_secs.to_string()])
            .args(["--threads", &c.threads.to_string()])
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .args(["--ready-version", &warm.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a swarm process")?;
        swarm_pids.push(child.id());
        let stdout = child.stdout.take().expect("piped");
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    if tx.send((p, v)).is_err() {
                        break;
                    }
                }
            }
        });
        let stdin = child.stdin.take().expect("piped");
        procs.push(SwarmProc { child, stdin });
    }
    // Only the readers hold senders now: if every swarm dies, `collect` fails at once.
    drop(tx);
    let setup = collect(
        &rx,
        procs_n,
        "ready",
        Duration::from_secs(c.setup_timeout_secs + 60),
    )?;
    let ready = sum(&setup, "ready");
    let slowest = setup
        .iter()
        .filter_map(|r| r["setup_secs"].as_f64())
        .fold(0.0, f64::max);
    println!(
        "swarm: {procs_n} process(es); {ready} of {} watchers ready (warm-up version received) in {slowest:.0} s; create failed {}, connect failed {}, closed before ready {}",
        a.clients,
        sum(&setup, "create_failed"),
        sum(&setup, "connect_failed"),
        sum(&setup, "closed_before_ready"),
    );
    for r in &setup {
        eprintln!("  swarm setup: {r}");
    }

    // Idle Redis CPU, to read the steps against.
    let cpu0 = redis_cpu(redis)?;
    std::thread::sleep(Duration::from_secs(3));
    let idle = (redis_cpu(redis)? - cpu0) / 3.0;
    println!(
        "Redis idle: {:.1}% of a core ({} keys, {} used memory)",
        idle * 100.0,
        redis
            .iter_mut()
            .map(|r| redis::cmd("DBSIZE").query::<u64>(r))
            .sum::<Result<u64, _>>()?,
        info(&mut redis[0], "memory")?
            .get("used_memory_human")
            .cloned()
            .unwrap_or_default()
    );

    let mut groups: Vec<String> = Vec::new();
    for (n, _) in &a.pids {
        if !groups.contains(n) {
            groups.push(n.clone());
        }
    }
    let group_cpu = |pids: &[(String, u32)], swarm: &[u32]| -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = groups
            .iter()
            .map(|n| {
                let s = pids
                    .iter()
                    .filter(|(m, _)| m == n)
                    .map(|(_, p)| streampipe_tests::proc_cpu_secs(*p))
                    .sum();
                (n.clone(), s)
            })
            .collect();
        out.push((
            "swarm".into(),
            swarm
                .iter()
                .map(|p| streampipe_tests::proc_cpu_secs(*p))
                .sum(),
        ));
        out
    };

    let mut rows = Vec::new();
    let (mut resets_before, mut closes_before) = (0u64, 0u64);
    for &rate in &a.rates {
        let count = u64::from(rate) * a.seconds;
        let first = version + 1;
        let last = first + count - 1;
        let interval_us = 1_000_000 / u64::from(rate);
        let t0_us = now_us() + 300_000;
        send(
            &mut procs,
            &json!({"cmd": "step", "first": first, "last": last, "t0_us": t0_us, "interval_us": interval_us}),
        )?;
        collect(&rx, procs_n, "step", Duration::from_secs(30))?;
        let cpu_before = redis_cpu(redis)?;
        let cmd_before = commandstats(redis)?;
        let out_before = net_output(redis)?;
        let procs_before = group_cpu(&a.pids, &swarm_pids);
        let failed_before = failures.load(Ordering::Relaxed);
        let busy_before = BUSY_REPLIES.load(Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (urls, stop) = (a.redis_urls.clone(), stop.clone());
            std::thread::spawn(move || sample_pubsub(urls, stop))
        };
        let wall = Instant::now();
        for k in 0..count {
            let due = t0_us + k * interval_us;
            let now = now_us();
            if due > now {
                std::thread::sleep(Duration::from_micros(due - now));
            }
            produce(first + k, k)?;
        }
        producer.flush(Duration::from_secs(10))?;
        version = last;
        std::thread::sleep(Duration::from_secs(a.grace_secs));
        // Delivery figures: what the watchers had at the end of the grace period.
        send(&mut procs, &json!({"cmd": "report"}))?;
        let reports = collect(&rx, procs_n, "report", Duration::from_secs(60))?;
        // Applied: read from the market of the step's last record, which
        // Kafka delivers after the records before it on its partition.
        let last_market = &names[c.market_of(count - 1) as usize];
        let applied_at_grace = market_version(c.publishers[0], last_market)
            .map(|v| v.saturating_sub(first - 1).min(count));

        // Drain: Redis cost is counted until the step's updates are all
        // applied and delivered (or delivery stalled), so a backlog neither
        // hides the cost nor spills into the next step.
        let drain_until = Instant::now() + Duration::from_secs(a.drain_secs);
        let (mut progress, mut stalled) = (sum(&reports, "in_order"), 0);
        let mut drained = reports.clone();
        let mut applied = applied_at_grace;
        while Instant::now() < drain_until {
            let c0 = redis_cpu(redis)?;
            std::thread::sleep(Duration::from_secs(1));
            let busy = redis_cpu(redis)? - c0;
            send(&mut procs, &json!({"cmd": "report"}))?;
            drained = collect(&rx, procs_n, "report", Duration::from_secs(60))?;
            applied = market_version(c.publishers[0], last_market)
                .map(|v| v.saturating_sub(first - 1).min(count))
                .or(applied);
            let now_progress = sum(&drained, "in_order");
            stalled = if now_progress == progress {
                stalled + 1
            } else {
                0
            };
            progress = now_progress;
            let all_applied = applied.is_none_or(|n| n >= count);
            let all_delivered = sum(&drained, "lost_open") == 0;
            if all_applied && busy < 0.05 && (all_delivered || stalled >= 3) {
                break;
            }
        }
        let span = wall.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let pubsub = sampler
            .join()
            .map_err(|_| anyhow::anyhow!("sampler panicked"))??;
        let redis_secs = redis_cpu(redis)? - cpu_before;
        let cmds = command_delta(&cmd_before, &commandstats(redis)?);
        let out_after = net_output(redis)?;
        let procs_after = group_cpu(&a.pids, &swarm_pids);

        let ready = sum(&reports, "ready");
        let in_order = sum(&reports, "in_order");
        let first_recv = reports
            .iter()
            .filter_map(|r| r["first_recv_us"].as_u64().filter(|&t| t > 0))
            .min();
        let last_recv = reports
            .iter()
            .filter_map(|r| r["last_recv_us"].as_u64())
            .max()
            .unwrap_or(0);
        // Delivered msg/s over the production window, or longer if
        // deliveries trailed into the grace period.
        let window = (last_recv.saturating_sub(t0_us) as f64 / 1e6).max(a.seconds as f64);
        let lat = merge_hist(&reports, "latency");
        let fresh = merge_hist(&reports, "freshness");
        // Per update Redis applied; every update if the version could not be read.
        let applied_n = applied.unwrap_or(count).max(1);
        let redis_us_per_update = redis_secs.max(0.0) * 1e6 / applied_n as f64;
        let idle_us_per_update = idle * span * 1e6 / applied_n as f64;
        // Net: without Redis' idle housekeeping (measured before the steps)
        // and without this benchmark's own INFO / CLIENT LIST calls.
        let probes_us: u64 = cmds
            .iter()
            .filter(|(k, _, _)| k == "info" || k == "client|list")
            .map(|(_, _, usec)| usec)
            .sum();
        let net_us_per_update =
            (redis_us_per_update - idle_us_per_update - probes_us as f64 / applied_n as f64)
                .max(0.0);
        let evalsha = cmds.iter().find(|(k, _, _)| k == "evalsha");
        let mut closes: BTreeMap<String, u64> = BTreeMap::new();
        for r in &drained {
            for (k, v) in r["closes"].as_object().into_iter().flatten() {
                *closes.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
            }
        }
        let (resets_now, closes_now) = (sum(&drained, "resets"), closes.values().sum::<u64>());
        let rss = group_rss(&a.pids, &swarm_pids);
        let mut row = json!({
            "rate": rate,
            "updates": count,
            "applied_at_grace": applied_at_grace,
            "applied": applied,
            "ready": ready,
            "redis_cpu_s": redis_secs,
            "redis_us_per_update": redis_us_per_update,
            "redis_idle_us_per_update": idle_us_per_update,
            "redis_net_us_per_update": net_us_per_update,
            "redis_core_share": redis_secs / span,
            "busy_replies": BUSY_REPLIES.load(Ordering::Relaxed) - busy_before,
            "evalsha_calls": evalsha.map(|e| e.1),
            "evalsha_usec_per_call": evalsha.map(|e| e.2 as f64 / e.1.max(1) as f64),
            "net_out_bytes_per_update": out_after.saturating_sub(out_before) / applied_n,
            "pubsub_max_omem": pubsub.max_omem,
            "pubsub_conns_min": if pubsub.min_conns == usize::MAX { 0 } else { pubsub.min_conns },
            "pubsub_conns_max": pubsub.max_conns,
            "pubsub_conn_ids": pubsub.ids.len(),
            "pubsub_timeline": pubsub.timeline,
        });
        // (Two literals: one would exceed serde_json's macro recursion limit.)
        let delivery = json!({
            // Each update goes to the watchers of one market: ready / K of them.
            "offered_msgs": count * ready / c.markets.max(1) as u64,
            "delivered_in_order": in_order,
            "delivered_per_s": in_order as f64 / window,
            "delivery_window_s": window,
            "first_delivery_ms": first_recv.map(|t| (t as f64 - t0_us as f64) / 1000.0),
            "lost_clients": sum(&reports, "lost"),
            "uncovered": sum(&reports, "uncovered"),
            "lost_clients_after_drain": sum(&drained, "lost"),
            "delivered_after_drain": sum(&drained, "in_order"),
            "duplicates": sum(&drained, "duplicates"),
            "out_of_order": sum(&drained, "out_of_order"),
            "resets": resets_now - resets_before,
            "closes_total": closes,
            "closes": closes_now - closes_before,
            "open": sum(&drained, "open"),
            "p50_ms": percentile_ms(&lat, 0.5),
            "p99_ms": percentile_ms(&lat, 0.99),
            "max_ms": percentile_ms(&lat, 1.0),
            "fresh_p50_ms": percentile_ms(&fresh, 0.5),
            "fresh_p99_ms": percentile_ms(&fresh, 0.99),
            "produce_failures": failures.load(Ordering::Relaxed) - failed_before,
            "cpu_s": procs_after.iter().zip(&procs_before).map(|((n, b), (_, a0))| (n.clone(), json!(b - a0))).collect::<serde_json::Map<_, _>>(),
            "peak_rss_mb": rss.into_iter().map(|(n, kb)| (n, json!(kb / 1024))).collect::<serde_json::Map<_, _>>(),
            "span_s": span,
        });
        if let (Some(r), Value::Object(d)) = (row.as_object_mut(), delivery) {
            r.extend(d);
        }
        // Publisher CPU per message it delivered (the issue's ≤ 5 µs target).
        let delivered_all = row["delivered_after_drain"].as_u64().unwrap_or(0).max(1);
        let publisher_us = row["cpu_s"]["publisher"]
            .as_f64()
            .map(|s| s * 1e6 / delivered_all as f64);
        row["publisher_us_per_msg"] = json!(publisher_us);
        (resets_before, closes_before) = (resets_now, closes_now);
        println!(
            "-- {rate} updates/s × {} s: {count} updates to {ready} watchers; Redis had applied {} by the end of the grace period, {} after {:.0} s",
            a.seconds,
            applied_at_grace.map_or("?".into(), |n| n.to_string()),
            applied.map_or("?".into(), |n| n.to_string()),
            span
        );
        println!(
            "   Redis CPU per applied update: {:.0} µs, {:.0} µs net of idle and probes (INFO cpu over {span:.1} s; idle share {:.0} µs; Redis busy {:.0}% of a core); {}",
            redis_us_per_update,
            net_us_per_update,
            idle_us_per_update,
            100.0 * redis_secs / span,
            describe_commands(&cmds, 4)
        );
        println!(
            "   pub/sub connections: {}–{} ({} ids seen: {}), max output buffer {} KB; Redis output {} KB per update; BUSY replies to the benchmark's probes: {}",
            row["pubsub_conns_min"],
            pubsub.max_conns,
            pubsub.ids.len(),
            pubsub.timeline.join("; "),
            pubsub.max_omem / 1024,
            row["net_out_bytes_per_update"].as_u64().unwrap_or(0) / 1024,
            row["busy_replies"]
        );
        println!(
            "   by the end of the grace period: delivered {in_order} of {} ({:.1}%), {:.0} msg/s; lost (no final version) {} clients, {} (client, version) pairs never covered",
            row["offered_msgs"],
            100.0 * in_order as f64 / row["offered_msgs"].as_f64().unwrap_or(1.0).max(1.0),
            row["delivered_per_s"].as_f64().unwrap_or(0.0),
            row["lost_clients"],
            row["uncovered"],
        );
        println!(
            "   after the drain: delivered {}, lost {} clients; resets {}, closes {} (all so far {}), open {}",
            row["delivered_after_drain"],
            row["lost_clients_after_drain"],
            row["resets"],
            row["closes"],
            row["closes_total"],
            row["open"]
        );
        println!(
            "   latency ts → client p50 {} / p99 {} / max {} ms; freshness (version produced → covered) p50 {} / p99 {} ms",
            ms(row["p50_ms"].as_f64()),
            ms(row["p99_ms"].as_f64()),
            ms(row["max_ms"].as_f64()),
            ms(row["fresh_p50_ms"].as_f64()),
            ms(row["fresh_p99_ms"].as_f64()),
        );
        println!(
            "   CPU s: {}; publisher CPU per delivered message: {}; peak RSS MB: {}",
            row["cpu_s"],
            publisher_us.map_or("–".into(), |u| format!("{u:.1} µs")),
            row["peak_rss_mb"]
        );
        rows.push(row);
    }

    println!();
    println!("| updates/s | watchers ready | Redis CPU per update (net of idle) | EVALSHA µs/call | max pub/sub omem | delivered msg/s | delivered by end + grace | lost clients (end + grace / after drain) | resets | p50 / p99 ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} µs ({:.0} µs) | {} | {} KB | {:.0} | {:.1}% | {} / {} | {} | {} / {} |",
            r["rate"],
            r["ready"],
            r["redis_us_per_update"].as_f64().unwrap_or(0.0),
            r["redis_net_us_per_update"].as_f64().unwrap_or(0.0),
            r["evalsha_usec_per_call"]
                .as_f64()
                .map_or("–".into(), |x| format!("{x:.0}")),
            r["pubsub_max_omem"].as_u64().unwrap_or(0) / 1024,
            r["delivered_per_s"].as_f64().unwrap_or(0.0),
            100.0 * r["delivered_in_order"].as_f64().unwrap_or(0.0)
                / r["offered_msgs"].as_f64().unwrap_or(1.0).max(1.0),
            r["lost_clients"],
            r["lost_clients_after_drain"],
            r["resets"],
            ms(r["p50_ms"].as_f64()),
            ms(r["p99_ms"].as_f64()),
        );
    }
    // The ramp's answer: the highest step every watcher got completely
    // (nothing lost after the grace period) with p99 ≤ P99_TARGET_MS.
    let best = rows
        .iter()
        .filter(|r| {
            r["lost_clients"].as_u64() == Some(0)
                && r["p99_ms"].as_f64().is_some_and(|p| p <= P99_TARGET_MS)
        })
        .max_by_key(|r| r["rate"].as_u64().unwrap_or(0));
    match best {
        Some(r) => println!(
            "highest step with p99 ≤ {P99_TARGET_MS} ms and no client lost: {} updates/s, {:.0} msg/s delivered, publisher {} µs CPU per message",
            r["rate"],
            r["delivered_per_s"].as_f64().unwrap_or(0.0),
            r["publisher_us_per_msg"]
                .as_f64()
                .map_or("–".into(), |u| format!("{u:.1}"))
        ),
        None => println!("no step met p99 ≤ {P99_TARGET_MS} ms with no client lost"),
    }
    println!(
        "{}",
        json!({"clients": a.clients, "publishers": c.publishers.len(), "markets": c.markets, "swarm_processes": procs_n, "baselines": baselines, "steps": rows})
    );

    let _ = send(&mut procs, &json!({"cmd": "quit"}));
    for mut p in procs {
        drop(p.stdin);
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.child.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => run(a),
        Cmd::Swarm(a) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(a.clients_args.threads.max(1))
            .enable_all()
            .build()?
            .block_on(swarm(a)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_of_a_market_in_a_round_robin_step() {
        // Versions 10..=19 over 3 markets: market 0 gets 10, 13, 16, 19;
        // market 1 gets 11, 14, 17; market 2 gets 12, 15, 18.
        assert_eq!(last_of_market(10, 19, 3, 0), Some(19));
        assert_eq!(last_of_market(10, 19, 3, 1), Some(17));
        assert_eq!(last_of_market(10, 19, 3, 2), Some(18));
        // More markets than versions: market 5 is not reached.
        assert_eq!(last_of_market(10, 12, 6, 5), None);
        assert_eq!(next_of_market(10, 3, 1, 0), 11);
        assert_eq!(next_of_market(10, 3, 1, 12), 14);
        assert_eq!(next_of_market(10, 3, 1, 14), 14);
        // One market: every version.
        assert_eq!(last_of_market(10, 19, 1, 0), Some(19));
        assert_eq!(next_of_market(10, 1, 0, 15), 15);
    }
}
