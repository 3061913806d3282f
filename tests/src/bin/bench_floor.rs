//! The floor under the publisher's CPU per delivered message when every
//! message is its own frame: what the machine charges for one small
//! WebSocket frame written to one of N loopback TCP connections, with no
//! publisher logic at all. The publisher's figure (issue #8: target ≤ 5 µs)
//! is read against it in the same script (`scripts/bench-floor.sh`).
//!
//! `streampipe-bench-floor write` accepts N connections from a reader child
//! process (the load generator in its own process, as the benchmarks rule
//! asks), then writes `rate` frames per second for `seconds`, round robin
//! over the connections, one `write` per frame, and prints its own CPU and
//! the reader's per message. Two writers:
//! - `blocking`: one thread, blocking `write(2)` per frame: the bare
//!   syscall + loopback TCP cost (the receiver's softirq work is charged to
//!   the sender on loopback);
//! - `tasks`: tokio, one task per connection fed through a bounded channel,
//!   as the publisher's hub → outbox → connection task path is shaped: the
//!   floor of that architecture (wake-up, scheduling, epoll).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use streampipe_tests::proc_cpu_secs;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A connection task's queue, in frames: bounded like the publisher's
/// outboxes (a stalled reader must not grow the writer without bound).
const TASK_QUEUE: usize = 64;

/// Pacing tick: frames of one tick are written back to back.
const TICK: Duration = Duration::from_millis(1);

#[derive(Parser)]
#[command(about = "Loopback floor for one WebSocket frame per message")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept the reader's connections and write frames; prints the figures.
    Write(WriteArgs),
    /// Connect and read until the writer closes (started by `write`).
    Read {
        /// The writer's port.
        #[arg(long)]
        port: u16,
        /// Connections to open.
        #[arg(long)]
        connections: usize,
    },
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Mode {
    Blocking,
    Tasks,
}

#[derive(clap::Args)]
struct WriteArgs {
    /// Connections (each gets every N-th frame).
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Frames per second, comma-separated for several steps.
    #[arg(long, value_delimiter = ',', default_value = "10000,20000")]
    rates: Vec<u64>,
    /// Seconds per step.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Payload bytes per frame (a typical update message is ~120).
    #[arg(long, default_value_t = 120)]
    bytes: usize,
    /// Writers to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "blocking,tasks")]
    modes: Vec<Mode>,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Read { port, connections } => read(port, connections),
        Cmd::Write(a) => write(a),
    }
}

/// One unmasked server → client text frame of `bytes` payload bytes.
fn frame(bytes: usize) -> Vec<u8> {
    let mut f = vec![0x81u8];
    if bytes < 126 {
        f.push(bytes as u8);
    } else {
        f.push(126);
        f.extend_from_slice(&(bytes as u16).to_be_bytes());
    }
    f.extend(std::iter::repeat_n(b'x', bytes));
    f
}

fn read(port: u16, connections: usize) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut tasks = Vec::with_capacity(connections);
        for _ in 0..connections {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .context("connect")?;
            tasks.push(tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        anyhow::Ok(())
    })
}

fn write(a: WriteArgs) -> anyhow::Result<()> {
    let frame = frame(a.bytes);
    println!(
        "floor: {} connections, {}-byte frames ({} on the wire), {} s per step",
        a.connections,
        a.bytes,
        frame.len(),
        a.seconds
    );
    println!(
        "| writer | frames/s offered | written/s | writer CPU µs/frame | reader CPU µs/frame |"
    );
    println!("|---|---|---|---|---|");
    for mode in &a.modes {
        for &rate in &a.rates {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let port = listener.local_addr()?.port();
            let mut child = std::process::Command::new(std::env::current_exe()?)
                .args(["read", "--port", &port.to_string()])
                .args(["--connections", &a.connections.to_string()])
                .spawn()
                .context("start the reader")?;
            let mut conns = Vec::with_capacity(a.connections);
            for _ in 0..a.connections {
                let (s, _) = listener.accept()?;
                s.set_nodelay(true)?;
                conns.push(s);
            }
            let total = rate * a.seconds;
            let (me, reader) = (std::process::id(), child.id());
            let (c0, r0, t0) = (proc_cpu_secs(me), proc_cpu_secs(reader), Instant::now());
            let written = match mode {
                Mode::Blocking => {
                    let w = write_blocking(&mut conns, &frame, rate, total);
                    drop(conns);
                    w
                }
                Mode::Tasks => write_tasks(conns, &frame, rate, total)?,
            };
            let secs = t0.elapsed().as_secs_f64();
            let (c1, r1) = (proc_cpu_secs(me), proc_cpu_secs(reader));
            let per = |cpu: f64| cpu / written.max(1) as f64 * 1e6;
            println!(
                "| {mode:?} | {rate} | {:.0} | {:.1} | {:.1} |",
                written as f64 / secs,
                per(c1 - c0),
                per(r1 - r0)
            );
            // The writers dropped their sockets: the reader sees EOF and exits.
            let _ = child.wait();
        }
    }
    Ok(())
}

/// Paces `total` frames at `rate`, calling `send(i)` for frame i.
fn paced(rate: u64, total: u64, mut send: impl FnMut(u64)) {
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            send(sent);
            sent += 1;
        }
        std::thread::sleep(TICK);
    }
}

fn write_blocking(conns: &mut [TcpStream], frame: &[u8], rate: u64, total: u64) -> u64 {
    let n = conns.len() as u64;
    let mut written = 0;
    paced(rate, total, |i| {
        if conns[(i % n) as usize].write_all(frame).is_ok() {
            written += 1;
        }
    });
    written
}

fn write_tasks(conns: Vec<TcpStream>, frame: &[u8], rate: u64, total: u64) -> anyhow::Result<u64> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let written = Arc::new(AtomicU64::new(0));
    let frame: Arc<[u8]> = Arc::from(frame);
    let mut txs = Vec::with_capacity(conns.len());
    let mut tasks = Vec::with_capacity(conns.len());
    for c in conns {
        c.set_nonblocking(true)?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Arc<[u8]>>(TASK_QUEUE);
        let w = written.clone();
        let mut s = rt.block_on(async { tokio::net::TcpStream::from_std(c) })?;
        tasks.push(rt.spawn(async move {
            while let Some(f) = rx.recv().await {
                if s.write_all(&f).await.is_err() {
                    break;
                }
                w.fetch_add(1, Ordering::Relaxed);
            }
        }));
        txs.push(tx);
    }
    let n = txs.len() as u64;
    paced(rate, total, |i| {
        // A full queue drops the frame, as a conflating outbox would.
        let _ = txs[(i % n) as usize].try_send(frame.clone());
    });
    drop(txs);
    rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    Ok(written.load(Ordering::Relaxed))
}
