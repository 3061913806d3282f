//! The drain-time autoscaling policy (`policy: drainTime`), as pure
//! functions over a short history of lag samples.
//!
//! Raw lag says how far behind the reducers are, not whether they are
//! catching up: a burst the current reducers drain in seconds scales the
//! lag rule up anyway (and every scale step is a consumer-group rebalance).
//! So from successive samples this module estimates the **arrival rate**
//! (high-watermark deltas) and what one reducer **consumes** (committed-
//! offset deltas, measured only while the reducers had a backlog, i.e.
//! were busy), and asks for the fewest reducers that keep up with the
//! arrivals and drain the backlog within the target:
//! `ceil((arrival + lag / target) / perReducerRate)`. The result goes
//! through the same clamp, activation, even spread and stabilization as the
//! lag rule ([`crate::autoscale`]).
//!
//! Three things the history shows that one sample cannot:
//! - **saturation**: a larger reducer count that consumed hardly more than
//!   a smaller one (the bottleneck is downstream) caps the count at that
//!   larger number for as long as the evidence stays in the history;
//! - **stuck partitions**: a committed offset that stays put for
//!   [`STUCK_AFTER`] while the partition has lag and others move; its lag
//!   and arrivals are left out of the estimate (more reducers cannot
//!   unstick it);
//! - **no progress**: nothing consumed over the last poll (reducers
//!   restarting or rebalancing): replicas are held.
//!
//! The history is kept for the lag rule as well: its decisions carry the
//! same explanation (rates, stuck partitions), though it sizes by raw lag.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::autoscale::{
    activation_note, below_activation, clamp, clamp_note, lag_estimate, recommend, Autoscaler,
    Decision, Limit, Policy,
};
use crate::crd::{POLICY_DRAIN_TIME, POLICY_LAG};
use crate::lag::LagReport;

/// Samples kept per pipeline: 256 × the poll interval (43 min at the
/// default 10 s) holds the saturation evidence well past a scale-down
/// window, and bounds memory (one sample is a few bytes per partition).
pub const HISTORY_MAX: usize = 256;
/// Rates are averaged over the last minute: long enough to smooth the
/// reducers' commit steps (librdkafka auto-commits every 5 s), short
/// enough to follow a ramp.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);
/// A partition whose committed offset has not moved for this long while it
/// has lag (and others move) is stuck: longer than a rebalance plus a few
/// commit intervals.
pub const STUCK_AFTER: Duration = Duration::from_secs(60);
/// Reducers count as busy (their consumption is their capacity) while the
/// backlog exceeds this many seconds of arrivals; below it a consumer that
/// keeps up still trails by its commit interval and fetch batches.
pub const IDLE_LAG_SECONDS: f64 = 10.0;
/// Reducers are sized to this share of their measured rate: at 100 % a
/// consumer has no room for a blip and the count flaps at the boundary.
pub const HEADROOM: f64 = 0.9;
/// What a scale step costs in consumption: a new pod starting and the
/// group rebalancing. A proposed change must also drain the arrivals of
/// that pause, or the step itself pushes the count back (flapping).
pub const REBALANCE_PAUSE: Duration = Duration::from_secs(10);
/// More reducers that raised consumption by less than this share of the
/// proportional gain mean the bottleneck is elsewhere (2 → 4 reducers must
/// gain at least 25 %, not 100 %: partitions are rarely spread evenly).
pub const SATURATION_SHARE: f64 = 0.25;

/// One poll: the lag read and the reducers that were running.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// When it was read.
    pub at: Instant,
    /// Reducer replicas while it was read.
    pub replicas: i32,
    /// What Kafka said.
    pub report: LagReport,
}

/// The recent samples of one pipeline, oldest first, at most [`HISTORY_MAX`].
#[derive(Debug, Default, Clone)]
pub struct History {
    samples: VecDeque<Sample>,
}

impl History {
    /// Adds `s`. A changed partition count (or a clock going back) starts
    /// over: deltas across it mean nothing.
    pub fn push(&mut self, s: Sample) {
        if self.samples.back().is_some_and(|b| {
            b.report.partitions != s.report.partitions
                || b.at > s.at
                || b.report
                    .per_partition
                    .iter()
                    .zip(&s.report.per_partition)
                    .any(|(x, y)| x.partition != y.partition)
        }) {
            self.samples.clear();
        }
        self.samples.push_back(s);
        while self.samples.len() > HISTORY_MAX {
            self.samples.pop_front();
        }
    }

    /// The newest sample.
    pub fn latest(&self) -> Option<&Sample> {
        self.samples.back()
    }

    /// Number of samples held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no sample is held.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// A partition whose committed offset stays put while it has lag.
#[derive(Debug, Clone, PartialEq)]
pub struct Stuck {
    /// Partition number.
    pub partition: i32,
    /// The offset it is stuck at (none: never committed).
    pub committed: Option<i64>,
    /// Its lag now.
    pub lag: i64,
    /// How long it has not moved (at least, as far as the history goes).
    pub seconds: u64,
}

/// More reducers did not raise consumption.
#[derive(Debug, Clone, PartialEq)]
pub struct Saturation {
    /// Fewer reducers …
    pub from: i32,
    /// … consumed this many records/s …
    pub before: f64,
    /// … and this many reducers …
    pub to: i32,
    /// … hardly more.
    pub after: f64,
}

impl Saturation {
    /// For people (stable while the evidence is: a repeated Event folds).
    pub fn note(&self) -> String {
        format!(
            "{} reducers consumed {:.0} records/s, {} consumed {:.0}/s: downstream saturated, not scaling above {}",
            self.from, self.before, self.to, self.after, self.to
        )
    }
}

/// What the reducers consume when busy, from the newest busy measurement.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    /// Records/s per reducer.
    pub per_reducer: f64,
    /// Reducers during the measurement.
    pub replicas: i32,
}

/// Everything the history says now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Estimate {
    /// Partitions of the topic.
    pub partitions: i32,
    /// Lag of all partitions.
    pub total_lag: i64,
    /// Lag of the partitions that are not stuck (what reducers can drain).
    pub lag: i64,
    /// Records/s arriving on those partitions (needs two samples).
    pub arrival: Option<f64>,
    /// Records/s consumed from them at the current replicas.
    pub consumption: Option<f64>,
    /// Busy throughput per reducer, if ever measured within the history.
    pub capacity: Option<Capacity>,
    /// Nothing consumed over the last poll while there was a backlog.
    pub no_progress: bool,
    /// Stuck partitions.
    pub stuck: Vec<Stuck>,
    /// Evidence that more reducers do not help.
    pub saturation: Option<Saturation>,
}

/// A decision's inputs, for the status and the Event.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs {
    /// `lag` or `drainTime`.
    pub policy: &'static str,
    /// The estimate behind it.
    pub estimate: Estimate,
    /// Reducers wanted before clamping.
    pub raw: i32,
    /// Seconds the current reducers need to drain the lag (none: never, or unknown).
    pub drain_seconds: Option<f64>,
}

impl Inputs {
    /// One line for an Event.
    pub fn note(&self) -> String {
        let e = &self.estimate;
        let rate = |r: Option<f64>| r.map_or("?".to_owned(), |r| format!("{r:.0}/s"));
        let mut s = format!(
            "policy {}: lag {}, arrivals {}, consumption {}, per reducer {}, estimate {}",
            self.policy,
            e.lag,
            rate(e.arrival),
            rate(e.consumption),
            rate(e.capacity.as_ref().map(|c| c.per_reducer)),
            self.raw,
        );
        if let Some(d) = self.drain_seconds {
            s.push_str(&format!(", drains in {d:.0} s"));
        }
        if !e.stuck.is_empty() {
            let p: Vec<String> = e.stuck.iter().map(|s| s.partition.to_string()).collect();
            s.push_str(&format!(", stuck partitions {}", p.join(",")));
        }
        s
    }
}

fn committed(s: &Sample, i: usize) -> Option<i64> {
    s.report.per_partition.get(i).and_then(|p| p.committed)
}
fn high(s: &Sample, i: usize) -> i64 {
    s.report.per_partition.get(i).map_or(0, |p| p.high)
}
fn part_lag(s: &Sample, i: usize) -> i64 {
    s.report.per_partition.get(i).map_or(0, |p| p.lag)
}

/// Records/s arriving on (high-watermark delta) and consumed from
/// (committed-offset delta) the partitions `healthy` between `a` and `b`.
fn rates(a: &Sample, b: &Sample, healthy: &[bool]) -> Option<(f64, f64)> {
    let dt = b.at.saturating_duration_since(a.at).as_secs_f64();
    if dt <= 0.0 {
        return None;
    }
    let (mut arrived, mut consumed) = (0i64, 0i64);
    for (i, _) in healthy.iter().enumerate().filter(|(_, h)| **h) {
        arrived += (high(b, i) - high(a, i)).max(0);
        if let (Some(x), Some(y)) = (committed(a, i), committed(b, i)) {
            consumed += (y - x).max(0);
        }
    }
    Some((arrived as f64 / dt, consumed as f64 / dt))
}

fn healthy_lag(s: &Sample, healthy: &[bool]) -> i64 {
    healthy
        .iter()
        .enumerate()
        .filter(|(_, h)| **h)
        .map(|(i, _)| part_lag(s, i))
        .sum()
}

/// Stuck partitions at the newest sample.
fn stuck(samples: &[&Sample]) -> Vec<Stuck> {
    let Some(newest) = samples.last() else {
        return Vec::new();
    };
    let Some(start) = samples
        .iter()
        .rposition(|s| newest.at.saturating_duration_since(s.at) >= STUCK_AFTER)
    else {
        return Vec::new();
    };
    let span = &samples[start..];
    if span.iter().any(|s| s.replicas == 0) {
        return Vec::new();
    }
    let n = newest.report.per_partition.len();
    let still = |i: usize| {
        span.iter()
            .all(|s| committed(s, i) == committed(newest, i) && part_lag(s, i) > 0)
    };
    let stopped: Vec<bool> = (0..n).map(still).collect();
    // Only when others move: if nothing does, the reducers are down, not a partition.
    let moving = (0..n).any(|i| committed(span[0], i) != committed(newest, i));
    if !moving {
        return Vec::new();
    }
    (0..n)
        .filter(|&i| stopped[i])
        .map(|i| {
            let since = samples
                .iter()
                .rev()
                .take_while(|s| committed(s, i) == committed(newest, i) && part_lag(s, i) > 0)
                .last()
                .map_or(newest.at, |s| s.at);
            Stuck {
                partition: newest.report.per_partition[i].partition,
                committed: committed(newest, i),
                lag: part_lag(newest, i),
                seconds: newest.at.saturating_duration_since(since).as_secs(),
            }
        })
        .collect()
}

/// Busy throughput by replica count: for each count, the newest run of
/// samples at that count, over its busy intervals (backlog above
/// [`IDLE_LAG_SECONDS`] of arrivals at both ends, something consumed),
/// up to [`RATE_WINDOW`]. Intervals across a replica change (a rebalance)
/// are left out. Returns (replicas → (records/s, when measured)).
fn busy_rates(samples: &[&Sample], healthy: &[bool]) -> BTreeMap<i32, (f64, Instant)> {
    // replicas → (records, seconds, run index, newest time)
    let mut acc: BTreeMap<i32, (f64, f64, usize, Instant)> = BTreeMap::new();
    let mut run = 0usize;
    for w in samples.windows(2).rev() {
        let (a, b) = (w[0], w[1]);
        if a.replicas != b.replicas {
            run += 1;
            continue;
        }
        if b.replicas <= 0 {
            continue;
        }
        let Some((arrival, consumption)) = rates(a, b, healthy) else {
            continue;
        };
        let idle = arrival * IDLE_LAG_SECONDS;
        let busy = healthy_lag(a, healthy) as f64 > idle
            && healthy_lag(b, healthy) as f64 > idle
            && healthy_lag(b, healthy) > 0;
        if !busy || consumption <= 0.0 {
            continue;
        }
        let dt = b.at.saturating_duration_since(a.at).as_secs_f64();
        let e = acc.entry(b.replicas).or_insert((0.0, 0.0, run, b.at));
        if e.2 == run && e.1 < RATE_WINDOW.as_secs_f64() {
            e.0 += consumption * dt;
            e.1 += dt;
        }
    }
    acc.into_iter()
        .filter(|(_, (_, secs, _, _))| *secs > 0.0)
        .map(|(n, (records, secs, _, at))| (n, (records / secs, at)))
        .collect()
}

/// The smallest larger count that consumed hardly more than a smaller one.
fn saturation(busy: &BTreeMap<i32, (f64, Instant)>) -> Option<Saturation> {
    busy.iter()
        .flat_map(|(&to, &(after, _))| {
            busy.range(..to).filter_map(move |(&from, &(before, _))| {
                let expected = f64::from(to) / f64::from(from) - 1.0;
                (after < before * (1.0 + SATURATION_SHARE * expected)).then_some(Saturation {
                    from,
                    before,
                    to,
                    after,
                })
            })
        })
        .min_by_key(|s| (s.to, s.from))
}

/// What the history says at its newest sample.
pub fn estimate(history: &History) -> Estimate {
    let samples: Vec<&Sample> = history.samples.iter().collect();
    let Some(newest) = samples.last() else {
        return Estimate::default();
    };
    let stuck = stuck(&samples);
    let healthy: Vec<bool> = newest
        .report
        .per_partition
        .iter()
        .map(|p| !stuck.iter().any(|s| s.partition == p.partition))
        .collect();
    let lag = healthy_lag(newest, &healthy);
    // The oldest sample within the rate window, and within the current run.
    let window_start = samples
        .iter()
        .position(|s| newest.at.saturating_duration_since(s.at) <= RATE_WINDOW)
        .filter(|&i| i + 1 < samples.len());
    // The median interval's arrivals: a burst is one interval's worth and
    // already in the lag; averaged in, it would be counted twice.
    let arrival = window_start.and_then(|w| {
        let mut r: Vec<f64> = samples[w..]
            .windows(2)
            .filter_map(|p| rates(p[0], p[1], &healthy).map(|r| r.0))
            .collect();
        r.sort_by(f64::total_cmp);
        r.get(r.len() / 2).copied()
    });
    let run_start = window_start.map(|w| {
        let same = samples
            .iter()
            .rposition(|s| s.replicas != newest.replicas)
            .map_or(0, |i| i + 1);
        w.max(same)
    });
    let consumption = run_start
        .filter(|&i| i + 1 < samples.len())
        .and_then(|i| rates(samples[i], newest, &healthy).map(|r| r.1));
    let no_progress = samples.len() >= 2 && newest.replicas > 0 && lag > 0 && {
        let prev = samples[samples.len() - 2];
        prev.replicas == newest.replicas
            && rates(prev, newest, &healthy).is_some_and(|(_, c)| c <= 0.0)
    };
    let busy = busy_rates(&samples, &healthy);
    let capacity = busy
        .iter()
        .max_by_key(|(_, (_, at))| *at)
        .map(|(&n, &(rate, _))| Capacity {
            per_reducer: rate / f64::from(n),
            replicas: n,
        });
    Estimate {
        partitions: newest.report.partitions,
        total_lag: newest.report.total,
        lag,
        arrival,
        consumption,
        capacity,
        no_progress,
        stuck,
        saturation: saturation(&busy),
    }
}

/// The drain-time policy's unstabilized recommendation.
pub fn recommend_drain(
    policy: &Policy,
    target: Duration,
    e: &Estimate,
    current: i32,
) -> (i32, Limit, String, i32) {
    let lag = e.lag;
    if below_activation(policy, lag) {
        return (0, Limit::BelowActivation, activation_note(policy, lag), 0);
    }
    let arrival = e.arrival.unwrap_or(0.0).max(0.0);
    let t = target.as_secs_f64().max(1.0);
    let busy = lag > 0 && lag as f64 > arrival * IDLE_LAG_SECONDS;
    let hold = |limit: Limit, why: String| (current, limit, why, current);
    if e.no_progress && current > 0 {
        return hold(
            Limit::NoProgress,
            format!(
                "lag {lag} but nothing consumed since the last poll: holding {current} reducers"
            ),
        );
    }
    let (raw, mut reason) = match &e.capacity {
        Some(c) if c.per_reducer > 0.0 => {
            let size = |lag: f64| {
                let need = arrival + lag / t;
                (need / (c.per_reducer * HEADROOM))
                    .ceil()
                    .min(f64::from(i32::MAX)) as i32
            };
            let mut raw = size(lag as f64);
            if raw != current {
                raw = size(lag as f64 + arrival * REBALANCE_PAUSE.as_secs_f64());
            }
            (
                raw,
                format!(
                    "lag {lag}, arrivals {arrival:.0}/s, {:.0}/s per reducer: {raw} reducers drain it within {}s",
                    c.per_reducer,
                    target.as_secs()
                ),
            )
        }
        _ if busy && current > 0 => {
            return hold(
                Limit::Measuring,
                format!("lag {lag}: measuring what {current} reducers consume before scaling"),
            )
        }
        _ if busy => (1, format!("lag {lag}: starting one reducer to measure its rate")),
        _ if e.arrival.is_none() => {
            return hold(
                Limit::Measuring,
                format!("lag {lag}: first sample, measuring arrivals before scaling"),
            )
        }
        _ if lag == 0 && arrival == 0.0 => (0, "no lag and nothing arriving".to_owned()),
        // Keeping up, the rate of a busy reducer never measured (within the
        // history): fewer might do, but a guess would cost rebalances.
        _ => (
            current,
            format!("lag {lag}, arrivals {arrival:.0}/s: {current} reducers keep up (their full rate not yet measured)"),
        ),
    };
    let (mut n, mut limit) = clamp(policy, e.partitions, raw);
    let note = clamp_note(raw, &limit);
    if !note.is_empty() {
        reason = format!("{reason}; {note}");
    }
    if let Some(s) = &e.saturation {
        if n > s.to {
            n = s.to.max(policy.min_replicas.min(n));
            limit = Limit::Saturated(s.to);
            reason = format!("{reason}; {}", s.note());
        }
    }
    (n, limit, reason, raw)
}

/// Partitions of `s` with lag that are not stuck: the most reducers that
/// can each have something to read.
pub fn partitions_with_lag(e: &Estimate, s: &Sample) -> i32 {
    s.report
        .per_partition
        .iter()
        .filter(|p| p.lag > 0 && !e.stuck.iter().any(|x| x.partition == p.partition))
        .count() as i32
}

/// `limitToPartitionsWithLag`: no more reducers than partitions with lag
/// (`minReplicas` still holds); applied after the even spread, which it
/// overrides, and before the stabilization windows.
fn cap_to_lagging(
    policy: &Policy,
    e: &Estimate,
    latest: &Sample,
    (rec, limit, reason): (i32, Limit, String),
) -> (i32, Limit, String) {
    if !policy.limit_to_lagging {
        return (rec, limit, reason);
    }
    let lagging = partitions_with_lag(e, latest);
    let cap = lagging.max(policy.min_replicas.min(e.partitions));
    if rec <= cap {
        return (rec, limit, reason);
    }
    (
        cap,
        Limit::PartitionsWithLag(lagging),
        format!("{reason}; capped at {cap}: {lagging} partitions have lag"),
    )
}

/// Decides with `policy` from the history (its newest sample is this
/// poll's), stabilized by `scaler`; the decision carries its inputs.
pub fn decide(
    policy: &Policy,
    scaler: &mut Autoscaler,
    history: &History,
    now: Instant,
    current: i32,
) -> Option<Decision> {
    let latest = history.latest()?;
    let e = estimate(history);
    let (rec, limit, reason, raw, name) = match policy.drain_target {
        Some(t) => {
            let (n, l, r, raw) = recommend_drain(policy, t, &e, current);
            (n, l, r, raw, POLICY_DRAIN_TIME)
        }
        None => {
            let (n, l, r) = recommend(policy, latest.report.partitions, latest.report.total);
            let raw = lag_estimate(policy, latest.report.total);
            (n, l, r, raw, POLICY_LAG)
        }
    };
    let (rec, limit, reason) = cap_to_lagging(policy, &e, latest, (rec, limit, reason));
    let drain_seconds = e.capacity.as_ref().and_then(|c| {
        let spare = f64::from(current) * c.per_reducer - e.arrival.unwrap_or(0.0);
        // (At the full measured rate, not the headroom: this is a forecast.)
        (spare > 0.0).then(|| e.lag as f64 / spare)
    });
    let mut d = scaler.stabilize(policy, now, current, e.partitions, (rec, limit, reason));
    d.inputs = Some(Inputs {
        policy: name,
        estimate: e,
        raw,
        drain_seconds,
    });
    Some(d)
}

#[cfg(test)]
#[path = "drain_tests.rs"]
mod tests;
