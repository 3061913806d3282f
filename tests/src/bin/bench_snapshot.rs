//! Snapshot benchmark (`scripts/bench-snapshot.sh`): one market set's
//! snapshot (`GET /v1/snapshot?markets=`) served by the publisher itself
//! (origin) and by nginx `proxy_cache` in front of it, in the same run,
//! alternating, by this load generator in its own process: closed loop,
//! `--connections` keep-alive HTTP/1.1 connections, each sending its next
//! request when the previous answer is read. Prints requests/s and
//! p50/p99/max latency per target and round.
//!
//! The publisher runs as its own process (the script starts it, anonymous,
//! on the stack's Redis); this binary writes the markets' states into
//! Redis (as the reducer stores them) and runs nginx as a child.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use streampipe_contract::keys::Keys;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    /// The publisher's public address.
    #[arg(long)]
    publisher: SocketAddr,
    /// Redis URL (the publisher's).
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// The publisher's pipeline name.
    #[arg(long, default_value = "bench")]
    pipeline: String,
    /// Markets in the snapshot.
    #[arg(long, default_value_t = 20)]
    markets: usize,
    /// Payload bytes per market.
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds of load per target and round.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Rounds (origin then cache in each).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// The publisher's internal address: count the snapshots it built.
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

fn seed(args: &Args) -> Result<String> {
    let keys = Keys::new(&args.pipeline);
    let client = redis::Client::open(args.redis_url.as_str())?;
    let mut con = client.get_connection()?;
    let mut ids: Vec<String> = (0..args.markets)
        .map(|i| format!("bench.snapshot.{i:04}:match_odds"))
        .collect();
    ids.sort();
    let pad = "x".repeat(args.payload_bytes.saturating_sub(40));
    for (i, m) in ids.iter().enumerate() {
        let version = 1000 + i as u64;
        let ts = 1_765_000_000_000u64 + i as u64;
        let msg = format!(
            r#"{{"type":"update","market":"{m}","version":{version},"ts":{ts},"payload":{{"home":1.95,"away":4.2,"pad":"{pad}"}}}}"#
        );
        redis::cmd("HSET")
            .arg(keys.market_state(m))
            .arg("v")
            .arg(version)
            .arg("ts")
            .arg(ts)
            .arg("msg")
            .arg(msg)
            .query::<()>(&mut con)?;
    }
    Ok(format!("/v1/snapshot?markets={}", ids.join(",")))
}

/// One request on a keep-alive connection; returns the status.
async fn request(r: &mut BufReader<TcpStream>, req: &[u8], body: &mut Vec<u8>) -> Result<u16> {
    r.get_mut().write_all(req).await?;
    let mut line = String::new();
    r.read_line(&mut line).await?;
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("status line")?;
    let mut len = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            bail!("connection closed");
        }
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse()?;
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                bail!("chunked answers are not expected");
            }
        }
    }
    body.resize(len, 0);
    r.read_exact(body).await?;
    Ok(status)
}

struct Run {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

async fn load(addr: SocketAddr, path: &str, args: &Args) -> Result<Run> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n");
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let req = req.clone().into_bytes();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            let mut body = Vec::new();
            'conn: while Instant::now() < deadline {
                let Ok(s) = TcpStream::connect(addr).await else {
                    errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = s.set_nodelay(true);
                let mut r = BufReader::new(s);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match request(&mut r, &req, &mut body).await {
                        Ok(200) => lat.push(t.elapsed()),
                        _ => {
                            errors += 1;
                            continue 'conn;
                        }
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        latencies.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Ok(Run {
        requests: latencies.len(),
        errors,
        elapsed,
        latencies,
    })
}

fn pct(l: &[Duration], p: f64) -> f64 {
    if l.is_empty() {
        return f64::NAN;
    }
    let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
    l[i].as_secs_f64() * 1000.0
}

async fn origin_builds(metrics: Option<SocketAddr>) -> Option<f64> {
    let addr = metrics?;
    let text = tokio::task::spawn_blocking(move || {
        streampipe_tests::try_http_request(&addr.to_string(), "GET", "/metrics").ok()
    })
    .await
    .ok()??;
    // Snapshots built and revalidations answered (304): every origin answer.
    let count = |result: &str| -> f64 {
        let prefix = format!("streampipe_publisher_snapshots_total{{result=\"{result}\"}}");
        text.lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    Some(count("ok") + count("not_modified"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let path = seed(&args)?;
    let nginx = streampipe_tests::nginx::Nginx::start_cache(args.publisher);
    // Warm the cache once (and check both answer).
    let mut probe = BufReader::new(TcpStream::connect(nginx.addr).await?);
    let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", nginx.addr);
    let mut body = Vec::new();
    let s = request(&mut probe, req.as_bytes(), &mut body).await?;
    if s != 200 {
        bail!("nginx answered {s}: {}", nginx.error_log());
    }
    println!(
        "snapshot: {} markets, {} bytes; {} connections, {} s per run; load generator in its own process",
        args.markets,
        body.len(),
        args.connections,
        args.seconds
    );
    println!("| round | target | requests/s | p50 ms | p99 ms | max ms | errors | origin answers (200 + 304) |");
    println!("|---|---|---|---|---|---|---|---|");
    for round in 1..=args.rounds {
        for (name, addr) in [
            ("origin (publisher)", args.publisher),
            ("nginx cache", nginx.addr),
        ] {
            let before = origin_builds(args.metrics).await;
            let run = load(addr, &path, &args).await?;
            let built = match (before, origin_builds(args.metrics).await) {
                (Some(b), Some(a)) => format!("{:.0}", a - b),
                _ => "?".to_owned(),
            };
            println!(
                "| {round} | {name} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {built} |",
                run.requests as f64 / run.elapsed.as_secs_f64(),
                pct(&run.latencies, 0.50),
                pct(&run.latencies, 0.99),
                run.latencies
                    .last()
                    .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
                run.errors
            );
        }
    }
    Ok(())
}
