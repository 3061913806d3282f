//! `streampipe-bench-publisher`: opens N WebSocket clients against a
//! publisher (streampipe, or Socket.IO with its Redis adapter as the peer
//! baseline), measures the server's RSS per idle connection, then drives
//! updates through Redis and reports delivered messages/s and p50/p99
//! latency from the emitter's timestamp to the client.
//!
//! Workload: N clients over C channels (N/C clients watch each channel);
//! R updates/s in total, each to one channel, round robin, so the delivered
//! rate is R × N/C. For streampipe the bench publishes straight to the
//! channels' Redis pub/sub (what reducers do), after registering the
//! channels in Redis (what the control API does). For Socket.IO an external
//! emitter (`tests/bench/socketio/emitter.js`) publishes through the adapter.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Publisher load benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// `streampipe` or `socketio`.
    #[arg(long, default_value = "streampipe")]
    target: String,
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:38080")]
    addr: SocketAddr,
    /// The publisher's internal address (`/metrics`) [default: --addr].
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Server process id (for RSS).
    #[arg(long)]
    pid: u32,
    /// Redis URL (streampipe: registry and publishing).
    #[arg(long, default_value = "redis://127.0.0.1:36379")]
    redis_url: String,
    /// Pipeline name of the streampipe publisher.
    #[arg(long, default_value = "bench")]
    pipeline: String,
    /// Clients.
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Channels (rooms); clients are spread evenly over them.
    #[arg(long, default_value_t = 1_000)]
    channels: usize,
    /// Updates per second in total.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Markets (versions increase per market).
    #[arg(long, default_value_t = 1_000)]
    markets: usize,
    /// Connections opened at once.
    #[arg(long, default_value_t = 500)]
    connect_concurrency: usize,
    /// Command that emits the Socket.IO load (run with --rooms/--rate/--seconds/--markets appended).
    #[arg(long)]
    emitter: Option<String>,
    /// During the load and its 2 s tail, print the server's RSS every N
    /// seconds (streampipe: also its conflation, close and reconnect
    /// counters from `/metrics`), then RSS at start / middle / end; 0 = off.
    #[arg(long, default_value_t = 0)]
    rss_every: u64,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `GET /metrics` of the publisher (HTTP/1.0, so the body ends with the connection).
async fn scrape_metrics(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
            .await?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await?;
        anyhow::Ok(String::from_utf8_lossy(&body).into_owned())
    };
    match tokio::time::timeout(Duration::from_secs(2), get).await {
        Ok(Ok(body)) => body,
        _ => String::new(),
    }
}

/// Sum of a metric's samples over all its label sets (0 if absent).
fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |sum, v| sum + v) // not sum(): an empty f64 sum is -0
}

/// Shared counters of all clients.
#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    ready: AtomicU64,
    received: AtomicU64,
    failed: AtomicU64,
    /// `reset` frames received.
    resets: AtomicU64,
    /// Connections that ended before the benchmark stopped them.
    closed: AtomicU64,
    measuring: AtomicBool,
    latencies: Mutex<Vec<u32>>,
}

/// Source address for client `i`: spread over 127.0.0.x so that more
/// connections than one address's ephemeral ports can be opened.
fn source(i: usize) -> SocketAddr {
    let host = 1 + (i / 25_000) as u8;
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)), 0)
}

fn client_config() -> WebSocketConfig {
    // The load tool must not be the memory hog: small buffers here too.
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

fn latency_of(text: &str) -> Option<u64> {
    let i = text.find("sent_us")?;
    let digits: String = text[i + 9..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    let sent: u64 = digits.parse().ok()?;
    Some(now_us().saturating_sub(sent))
}

async fn client(i: usize, a: Arc<Args>, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
    let channel = i % a.channels;
    let (url, socketio) = match a.target.as_str() {
        "socketio" => (
            format!(
                "ws://{}/socket.io/?EIO=4&transport=websocket&room=ch{channel}",
                a.addr
            ),
            true,
        ),
        _ => (
            format!("ws://{}/v1/stream/bench-ch{channel}", a.addr),
            false,
        ),
    };
    let sock = TcpSocket::new_v4().unwrap();
    if sock.bind(source(i)).is_err() {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let tcp = match sock.connect(a.addr).await {
        Ok(t) => t,
        Err(_) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let ws = tokio_tungstenite::client_async_with_config(
        url,
        tokio_tungstenite::MaybeTlsStream::Plain(tcp),
        Some(client_config()),
    )
    .await;
    let Ok((mut ws, _)) = ws else {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    stats.connected.fetch_add(1, Ordering::Relaxed);
    let mut ready = false;
    // Runs until the task is aborted at the end of the benchmark.
    while let Some(Ok(msg)) = ws.next().await {
        let Message::Text(t) = msg else { continue };
        let t = t.as_str();
        if socketio {
            // engine.io v4: "0{..}" open → answer "40" (join the default
            // namespace); "40{..}" joined; "2" ping → "3" pong; "42[..]" event.
            if t.starts_with('0') {
                let _ = ws.send(Message::text("40")).await;
                continue;
            }
            if t == "2" {
                let _ = ws.send(Message::text("3")).await;
                continue;
            }
            if t.starts_with("40") {
                if !ready {
                    ready = true;
                    stats.ready.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
        } else if !ready && t.contains("\"subscribed\"") {
            ready = true;
            stats.ready.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if !socketio && t.contains("\"reset\"") {
            stats.resets.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if t.contains("update") {
            stats.received.fetch_add(1, Ordering::Relaxed);
            // Sample a quarter of the clients for latency, to keep the vector modest.
            if i.is_multiple_of(4) && stats.measuring.load(Ordering::Relaxed) {
                if let Some(l) = latency_of(t) {
                    stats
                        .latencies
                        .lock()
                        .unwrap()
                        .push(l.min(u32::MAX as u64) as u32);
                }
            }
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
    }
    if !stop.load(Ordering::Relaxed) {
        stats.closed.fetch_add(1, Ordering::Relaxed);
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Arc::new(Args::parse());
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let streampipe = a.target != "socketio";
    let keys = streampipe_contract::Keys::new(&a.pipeline);
    let mut redis = redis::Client::open(a.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    if streampipe {
        // What the control API does for each channel: register its markets.
        let mut pipe = redis::pipe();
        for c in 0..a.channels {
            pipe.cmd("SADD")
                .arg(keys.channel_registry(&format!("bench-ch{c}")))
                .arg(format!("m{}", c % a.markets))
                .ignore();
        }
        let _: () = pipe.query_async(&mut redis).await?;
    }

    let rss0 = rss_kb(a.pid);
    let t = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(a.connect_concurrency));
    let mut tasks = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        let permit = sem.clone().acquire_owned().await?;
        let (a2, s2, st2) = (a.clone(), stats.clone(), stop.clone());
        let s3 = stats.clone();
        tasks.push(tokio::spawn(async move {
            let fut = client(i, a2, s2, st2);
            tokio::pin!(fut);
            // Hold the permit until the client is connected (or failed).
            let mut permit = Some(permit);
            loop {
                tokio::select! {
                    _ = &mut fut => break,
                    _ = tokio::time::sleep(Duration::from_millis(20)), if permit.is_some() => {
                        if s3.connected.load(Ordering::Relaxed) + s3.failed.load(Ordering::Relaxed) > i as u64 {
                            permit.take();
                        }
                    }
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while stats.ready.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed)
        < a.clients as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss1 = rss_kb(a.pid);
    let ready = stats.ready.load(Ordering::Relaxed);
    println!(
        "== {} : {} clients over {} channels",
        a.target, a.clients, a.channels
    );
    println!(
        "connected and subscribed: {ready} (failed {}) in {connect_secs:.1} s",
        stats.failed.load(Ordering::Relaxed)
    );
    println!(
        "server RSS: {} MB idle-before, {} MB with {} idle connections → {:.1} KB per idle connection",
        rss0 / 1024,
        rss1 / 1024,
        ready,
        (rss1.saturating_sub(rss0)) as f64 / ready.max(1) as f64
    );

    // Load.
    let received0 = stats.received.load(Ordering::Relaxed);
    let cpu0 = streampipe_tests::proc_cpu_secs(a.pid);
    stats.measuring.store(true, Ordering::Relaxed);
    let t = Instant::now();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = (a.rss_every > 0).then(|| {
        let (a, sampling, stats) = (a.clone(), sampling.clone(), stats.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let every = Duration::from_secs(a.rss_every);
            let mut next = t;
            while sampling.load(Ordering::Relaxed) {
                let rss = rss_kb(a.pid);
                samples.push(rss);
                let counters = if streampipe {
                    let m = scrape_metrics(a.metrics_addr.unwrap_or(a.addr)).await;
                    format!(
                        ", hub_conflated {}, conflated {}, hub_pending {}, closes {}, slow closed {}, redis reconnects {}",
                        metric(&m, "streampipe_publisher_hub_conflated_total"),
                        metric(&m, "streampipe_publisher_conflated_total"),
                        metric(&m, "streampipe_publisher_hub_pending"),
                        metric(&m, "streampipe_publisher_closes_total"),
                        metric(&m, "streampipe_publisher_slow_clients_closed_total"),
                        metric(&m, "streampipe_publisher_redis_reconnects_total"),
                    )
                } else {
                    String::new()
                };
                println!(
                    "  t={:>4.1} s RSS {:>6.1} MB, received {}, resets {}, closed {}{counters}",
                    t.elapsed().as_secs_f64(),
                    rss as f64 / 1024.0,
                    stats.received.load(Ordering::Relaxed),
                    stats.resets.load(Ordering::Relaxed),
                    stats.closed.load(Ordering::Relaxed),
                );
                next += every;
                tokio::time::sleep_until(next.into()).await;
            }
            samples
        })
    });
    let mut sent = 0u64;
    if streampipe {
        let interval = Duration::from_secs_f64(1.0 / a.rate as f64);
        let mut versions = vec![0u64; a.markets];
        let total = a.rate * a.seconds;
        let batch = (a.rate / 1000).max(1); // publish in 1 ms slices
        while sent < total {
            let due = t + interval * sent as u32;
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
            let mut pipe = redis::pipe();
            for _ in 0..batch {
                // One update per market in turn: it reaches every channel
                // holding the market (channel c holds market c % markets).
                let m = (sent % a.markets as u64) as usize;
                versions[m] += 1;
                let msg = format!(
                    r#"{{"type":"update","market":"m{m}","version":{},"ts":{},"payload":{{"sent_us":{},"home":1.95,"draw":3.4,"away":4.2}}}}"#,
                    versions[m],
                    now_us() / 1000,
                    now_us()
                );
                pipe.cmd("PUBLISH")
                    .arg(keys.market_topic(&format!("m{m}")))
                    .arg(msg)
                    .ignore();
                sent += 1;
            }
            let _: () = pipe.query_async(&mut redis).await?;
        }
    } else if let Some(cmd) = &a.emitter {
        let out = tokio::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "{cmd} --rooms {} --rate {} --seconds {} --markets {}",
                a.channels, a.rate, a.seconds, a.markets
            ))
            .output()
            .await?;
        let line = String::from_utf8_lossy(&out.stdout);
        sent = line
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find_map(|v| v["sent"].as_u64())
            .unwrap_or(0);
    }
    let send_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stats.measuring.store(false, Ordering::Relaxed);
    let elapsed = t.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    if let Some(sampler) = sampler {
        let rss = sampler.await?;
        if let (Some(first), Some(last)) = (rss.first(), rss.last()) {
            println!(
                "server RSS during load: start {:.1} MB, middle {:.1} MB, end {:.1} MB, max {:.1} MB ({} samples)",
                *first as f64 / 1024.0,
                rss[rss.len() / 2] as f64 / 1024.0,
                *last as f64 / 1024.0,
                rss.iter().max().copied().unwrap_or(0) as f64 / 1024.0,
                rss.len()
            );
        }
    }
    let delivered = stats.received.load(Ordering::Relaxed) - received0;
    let cpu = streampipe_tests::proc_cpu_secs(a.pid) - cpu0;
    // Clients spread evenly over channels, channels over markets.
    let expected = sent * (a.clients / a.markets) as u64;
    let mut lat = std::mem::take(&mut *stats.latencies.lock().unwrap());
    lat.sort_unstable();
    println!("updates sent: {sent} in {send_secs:.1} s ({:.0}/s); messages delivered: {delivered} of {expected} expected", sent as f64 / send_secs);
    println!(
        "delivered msg/s: {:.0}",
        delivered as f64 / send_secs.max(1e-9).min(elapsed)
    );
    println!(
        "latency emitter → client: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples)",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0),
        lat.len()
    );
    println!(
        "server CPU during load: {:.2} s ({:.0}% of one core)",
        cpu,
        100.0 * cpu / elapsed
    );
    println!(
        "client side: {} resets, {} connections closed by the server",
        stats.resets.load(Ordering::Relaxed),
        stats.closed.load(Ordering::Relaxed)
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    Ok(())
}
