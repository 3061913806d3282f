//! Replays an autoscaling policy over a synthetic trace against a simulated
//! consumer group, second by second, so policies can be compared on the
//! same input (the drain-time policy's timeline tests and
//! `examples/autoscale_replay.rs`).
//!
//! The model is deliberately simple: arrivals spread evenly over the
//! partitions; reducer `r` of `n` owns the partitions `p` with
//! `p % n == r` and consumes up to its rate from those with a backlog; a
//! downstream limit caps the whole group; offsets are committed every
//! [`COMMIT_EVERY`] seconds (as librdkafka's auto-commit); and every change
//! of the replica count stops all consumption for [`REBALANCE`] seconds
//! (pod start plus an eager consumer-group rebalance). The operator polls
//! every `poll` seconds, seeing only what Kafka would show it: high
//! watermarks and committed offsets.

use std::time::{Duration, Instant};

use crate::autoscale::{Autoscaler, Decision, Policy};
use crate::drain::{decide, History, Sample};
use crate::lag::{LagReport, PartitionLag};

/// Seconds nobody consumes after a scale step: a new pod starting and the
/// group rebalancing (an eager rebalance revokes every partition).
pub const REBALANCE: u32 = 10;
/// Seconds between offset commits (librdkafka's `auto.commit.interval.ms`).
pub const COMMIT_EVERY: u32 = 5;
/// The second within [`COMMIT_EVERY`] at which commits happen.
const COMMIT_PHASE: u32 = 2;

/// A synthetic workload.
#[derive(Clone)]
pub struct Trace {
    /// Short name for the table.
    pub name: &'static str,
    /// Length of the run.
    pub seconds: u32,
    /// Partitions of the topic.
    pub partitions: i32,
    /// Reducers at the start.
    pub start_replicas: i32,
    /// Records/s one reducer consumes at most.
    pub per_reducer: f64,
    /// Records/s the downstream (Redis) accepts from all reducers together.
    pub downstream: Option<f64>,
    /// Records/s arriving at second `t`.
    pub arrivals: fn(u32) -> f64,
    /// Extra records arriving at once: `(second, records)`.
    pub bursts: Vec<(u32, i64)>,
    /// Seconds `[from, to)` in which the reducers consume nothing (restart).
    pub outage: Option<(u32, u32)>,
    /// A partition that stops being consumed from a second on.
    pub stuck: Option<(i32, u32)>,
}

/// What a replay measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Replica changes (each one a rebalance).
    pub steps: u32,
    /// Largest total lag Kafka showed.
    pub peak_lag: i64,
    /// Seconds in which a record of a partition that is not stuck had
    /// waited longer than the drain target.
    pub seconds_over: u32,
    /// Most reducers at any time.
    pub max_replicas: i32,
    /// Reducers at the end.
    pub final_replicas: i32,
    /// Every poll's decision, by second.
    pub decisions: Vec<(u32, Decision)>,
}

struct Partition {
    high: i64,
    /// Consumed position (fractional: rates need not be whole records/s).
    pos: f64,
    committed: i64,
    /// High watermark at the end of each second (for the waiting time).
    highs: Vec<i64>,
    carry: f64,
}

/// Runs `policy` over `trace`, polling every `poll`; `target` is the drain
/// target the waiting time is judged against (for either policy).
pub fn replay(trace: &Trace, policy: &Policy, poll: Duration, target: Duration) -> Outcome {
    let p_count = trace.partitions.max(1) as usize;
    let mut parts: Vec<Partition> = (0..p_count)
        .map(|_| Partition {
            high: 0,
            pos: 0.0,
            committed: 0,
            highs: Vec::with_capacity(trace.seconds as usize),
            carry: 0.0,
        })
        .collect();
    let t0 = Instant::now();
    let poll_s = poll.as_secs().max(1) as u32;
    let mut n = trace.start_replicas;
    let mut paused_until = 0u32;
    let mut history = History::default();
    let mut scaler = Autoscaler::default();
    let mut out = Outcome {
        steps: 0,
        peak_lag: 0,
        seconds_over: 0,
        max_replicas: n,
        final_replicas: n,
        decisions: Vec::new(),
    };
    for t in 0..trace.seconds {
        // Arrivals.
        let burst: i64 = trace
            .bursts
            .iter()
            .filter(|(at, _)| *at == t)
            .map(|b| b.1)
            .sum();
        let each = ((trace.arrivals)(t) + burst as f64) / p_count as f64;
        for p in parts.iter_mut() {
            p.carry += each;
            let whole = p.carry.floor();
            p.carry -= whole;
            p.high += whole as i64;
        }
        // Consumption.
        let down = trace.outage.is_some_and(|(a, b)| (a..b).contains(&t));
        let stuck = |i: usize| {
            trace
                .stuck
                .is_some_and(|(p, from)| p as usize == i && t >= from)
        };
        if !down && t >= paused_until && n > 0 {
            let mut take = vec![0.0f64; p_count];
            for r in 0..n as usize {
                let owned: Vec<usize> = (0..p_count)
                    .filter(|&i| i % n as usize == r && !stuck(i))
                    .collect();
                let mut budget = trace.per_reducer;
                // Water-filling: an even share, then the leftover again.
                for _ in 0..2 {
                    let open: Vec<usize> = owned
                        .iter()
                        .copied()
                        .filter(|&i| parts[i].high as f64 - parts[i].pos - take[i] > 1e-9)
                        .collect();
                    if open.is_empty() || budget <= 0.0 {
                        break;
                    }
                    let share = budget / open.len() as f64;
                    for i in open {
                        let x = share.min(parts[i].high as f64 - parts[i].pos - take[i]);
                        take[i] += x;
                        budget -= x;
                    }
                }
            }
            let total: f64 = take.iter().sum();
            let scale = match trace.downstream {
                Some(d) if total > d => d / total,
                _ => 1.0,
            };
            for (p, x) in parts.iter_mut().zip(take) {
                p.pos += x * scale;
            }
        }
        for p in parts.iter_mut() {
            // Commits out of phase with the polls (which come every 10 s):
            // a poll sees the 2 s of records consumed since the last commit.
            if t % COMMIT_EVERY == COMMIT_PHASE {
                p.committed = p.pos.floor() as i64;
            }
            p.highs.push(p.high);
        }
        // What Kafka shows, and the waiting time of the oldest record.
        let lag: i64 = parts.iter().map(|p| p.high - p.committed).sum();
        out.peak_lag = out.peak_lag.max(lag);
        let oldest_wait = parts
            .iter()
            .enumerate()
            .filter(|(i, _)| !stuck(*i))
            .filter_map(|(_, p)| {
                let next = p.pos.floor() as i64;
                (next < p.high).then(|| {
                    let arrived = p.highs.partition_point(|h| *h <= next) as u32;
                    t.saturating_sub(arrived)
                })
            })
            .max()
            .unwrap_or(0);
        if u64::from(oldest_wait) > target.as_secs() {
            out.seconds_over += 1;
        }
        // The operator's poll.
        if (t + 1) % poll_s == 0 {
            let per_partition: Vec<PartitionLag> = parts
                .iter()
                .enumerate()
                .map(|(i, p)| PartitionLag {
                    partition: i as i32,
                    high: p.high,
                    committed: Some(p.committed),
                    lag: (p.high - p.committed).max(0),
                })
                .collect();
            let max = per_partition.iter().map(|p| p.lag).max().unwrap_or(0);
            let report = LagReport {
                partitions: p_count as i32,
                total: per_partition.iter().map(|p| p.lag).sum(),
                max,
                per_partition,
            };
            let now = t0 + Duration::from_secs(u64::from(t + 1));
            history.push(Sample {
                at: now,
                replicas: n,
                report,
            });
            if let Some(d) = decide(policy, &mut scaler, &history, now, n) {
                if d.replicas != n {
                    out.steps += 1;
                    n = d.replicas;
                    paused_until = t + 1 + REBALANCE;
                    out.max_replicas = out.max_replicas.max(n);
                }
                out.decisions.push((t + 1, d));
            }
        }
    }
    out.final_replicas = n;
    out
}

/// Records/s of the traces below.
fn steady_200(_: u32) -> f64 {
    200.0
}
fn ramp(t: u32) -> f64 {
    // 100 → 3 000 records/s over 15 minutes, then flat.
    100.0 + 2900.0 * (f64::from(t.min(900)) / 900.0)
}
fn steady_1000(_: u32) -> f64 {
    1000.0
}
fn steady_1200(_: u32) -> f64 {
    1200.0
}
fn steady_800(_: u32) -> f64 {
    800.0
}

/// The five workloads of issue #14 (8 partitions, 500 records/s per
/// reducer, 20 minutes each).
pub fn traces() -> Vec<Trace> {
    let base = Trace {
        name: "",
        seconds: 1200,
        partitions: 8,
        start_replicas: 2,
        per_reducer: 500.0,
        downstream: None,
        arrivals: steady_200,
        bursts: Vec::new(),
        outage: None,
        stuck: None,
    };
    vec![
        Trace {
            name: "burst",
            bursts: vec![(300, 30_000)],
            ..base.clone()
        },
        Trace {
            name: "steady ramp",
            arrivals: ramp,
            start_replicas: 1,
            ..base.clone()
        },
        Trace {
            name: "restart spike",
            arrivals: steady_1000,
            start_replicas: 4,
            outage: Some((300, 330)),
            ..base.clone()
        },
        Trace {
            name: "saturated downstream",
            arrivals: steady_1200,
            downstream: Some(1000.0),
            ..base.clone()
        },
        Trace {
            name: "stuck partition",
            arrivals: steady_800,
            stuck: Some((3, 120)),
            ..base
        },
    ]
}
