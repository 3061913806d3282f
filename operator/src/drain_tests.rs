//! Timeline tests of the drain-time policy: each workload of issue #14
//! replayed against the simulated consumer group ([`crate::replay`]),
//! both policies, plus the history's rules on hand-made samples.

use super::*;
use crate::lag::PartitionLag;
use crate::replay::{replay, traces, Outcome, Trace};

fn policy(drain: Option<u64>) -> Policy {
    Policy {
        drain_target: drain.map(Duration::from_secs),
        ..Policy::default()
    }
}

const TARGET: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_secs(10);

fn trace(name: &str) -> Trace {
    traces().into_iter().find(|t| t.name == name).unwrap()
}

fn both(name: &str) -> (Outcome, Outcome) {
    let t = trace(name);
    (
        replay(&t, &policy(None), POLL, TARGET),
        replay(&t, &policy(Some(60)), POLL, TARGET),
    )
}

fn replicas(o: &Outcome) -> Vec<i32> {
    o.decisions.iter().map(|(_, d)| d.replicas).collect()
}

#[test]
fn a_burst_the_current_reducers_drain_in_time_scales_nothing_up() {
    let (lag, drain) = both("burst");
    assert!(
        lag.max_replicas >= 8,
        "lag rule scales up: {:?}",
        replicas(&lag)
    );
    assert!(drain.max_replicas <= 2, "{:?}", replicas(&drain));
    assert_eq!(drain.seconds_over, 0, "drained within the target");
    assert!(drain.steps < lag.steps, "{} vs {}", drain.steps, lag.steps);
}

#[test]
fn a_steady_ramp_is_followed_to_arrivals_over_capacity() {
    let (_, drain) = both("steady ramp");
    // 3 000 records/s at 500 per reducer: at least 6.
    assert!(drain.final_replicas >= 6, "{:?}", replicas(&drain));
    // Upward only while the ramp rises: no down-and-up again.
    let r = replicas(&drain);
    assert!(r.windows(2).all(|w| w[1] >= w[0]), "{r:?}");
}

#[test]
fn a_restart_spike_is_held_not_scaled() {
    let (lag, drain) = both("restart spike");
    assert!(
        lag.max_replicas > 4,
        "lag rule scales up: {:?}",
        replicas(&lag)
    );
    assert_eq!(
        drain.max_replicas,
        4,
        "never above the start: {:?}",
        replicas(&drain)
    );
    assert!(
        drain
            .decisions
            .iter()
            .any(|(_, d)| d.limit == Limit::NoProgress),
        "the outage is seen as no progress"
    );
}

#[test]
fn a_saturated_downstream_stops_the_scale_up() {
    let (lag, drain) = both("saturated downstream");
    assert!(lag.max_replicas >= 8, "{:?}", replicas(&lag));
    let saturated = drain
        .decisions
        .iter()
        .find(|(_, d)| matches!(d.limit, Limit::Saturated(_)))
        .unwrap_or_else(|| panic!("never saturated: {:?}", replicas(&drain)));
    let cap = drain.max_replicas;
    assert!(cap <= 4, "{:?}", replicas(&drain));
    // Once seen, it stays: no flapping up and down.
    let after: Vec<i32> = drain
        .decisions
        .iter()
        .filter(|(t, _)| *t >= saturated.0)
        .map(|(_, d)| d.replicas)
        .collect();
    assert!(after.iter().all(|&r| r == after[0]), "{after:?}");
    let i = saturated.1.inputs.as_ref().unwrap();
    let s = i.estimate.saturation.as_ref().unwrap();
    assert!(s.to > s.from && s.after < s.before * 1.2, "{s:?}");
    assert!(drain.steps <= 2, "{}", drain.steps);
}

#[test]
fn a_stuck_partition_is_reported_and_not_counted() {
    let (lag, drain) = both("stuck partition");
    assert!(lag.max_replicas >= 8, "{:?}", replicas(&lag));
    assert!(drain.max_replicas <= 2, "{:?}", replicas(&drain));
    let (t, d) = drain
        .decisions
        .iter()
        .find(|(_, d)| {
            d.inputs
                .as_ref()
                .is_some_and(|i| !i.estimate.stuck.is_empty())
        })
        .expect("reported");
    let e = &d.inputs.as_ref().unwrap().estimate;
    assert_eq!(e.stuck.len(), 1);
    assert_eq!(e.stuck[0].partition, 3);
    // Stuck from 120 s: reported after STUCK_AFTER, not long after.
    assert!((180..=200).contains(t), "at {t}");
    assert!(e.total_lag > e.lag, "its lag is left out");
    assert_eq!(e.total_lag - e.lag, e.stuck[0].lag);
}

fn sample(at: u64, replicas: i32, parts: &[(i64, Option<i64>)]) -> Sample {
    let t0 = *T0.get_or_init(Instant::now);
    let per_partition: Vec<PartitionLag> = parts
        .iter()
        .enumerate()
        .map(|(i, &(high, committed))| PartitionLag {
            partition: i as i32,
            high,
            committed,
            lag: (high - committed.unwrap_or(0)).max(0),
        })
        .collect();
    Sample {
        at: t0 + Duration::from_secs(at),
        replicas,
        report: LagReport {
            partitions: parts.len() as i32,
            total: per_partition.iter().map(|p| p.lag).sum(),
            max: per_partition.iter().map(|p| p.lag).max().unwrap_or(0),
            per_partition,
        },
    }
}

static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

#[test]
fn rates_come_from_watermark_and_commit_deltas() {
    let mut h = History::default();
    h.push(sample(0, 2, &[(5000, Some(0)), (5000, Some(0))]));
    h.push(sample(10, 2, &[(6000, Some(500)), (6000, Some(700))]));
    let e = estimate(&h);
    assert_eq!(e.arrival, Some(200.0), "2 000 records in 10 s");
    assert_eq!(e.consumption, Some(120.0));
    assert_eq!(e.lag, 5500 + 5300);
    // Busy (backlog far above 10 s of arrivals): 60 records/s per reducer.
    assert_eq!(e.capacity.as_ref().map(|c| c.per_reducer), Some(60.0));
}

#[test]
fn a_partition_is_stuck_only_while_others_move() {
    let mut h = History::default();
    for (i, at) in [0u64, 30, 60].into_iter().enumerate() {
        let moved = 100 * i as i64;
        h.push(sample(
            at,
            2,
            &[(1000 + moved, Some(moved)), (1000 + moved, Some(5))],
        ));
    }
    let e = estimate(&h);
    assert_eq!(e.stuck.len(), 1);
    assert_eq!((e.stuck[0].partition, e.stuck[0].committed), (1, Some(5)));
    assert_eq!(e.stuck[0].seconds, 60);
    // Nothing moves at all: the reducers are down, not a partition stuck.
    let mut h = History::default();
    for at in [0u64, 30, 60] {
        h.push(sample(at, 2, &[(1000, Some(3)), (1000, Some(5))]));
    }
    let e = estimate(&h);
    assert!(e.stuck.is_empty());
    assert!(e.no_progress);
    // A changed partition count starts the history over.
    h.push(sample(70, 2, &[(1000, Some(3))]));
    assert_eq!(h.len(), 1);
}

#[test]
fn more_reducers_that_consume_no_more_are_saturation() {
    let t0 = Instant::now();
    let busy: BTreeMap<i32, (f64, Instant)> =
        [(2, (1000.0, t0)), (4, (1100.0, t0))].into_iter().collect();
    let s = saturation(&busy).unwrap();
    assert_eq!((s.from, s.to), (2, 4));
    let fine: BTreeMap<i32, (f64, Instant)> =
        [(2, (1000.0, t0)), (4, (1800.0, t0))].into_iter().collect();
    assert!(saturation(&fine).is_none());
}

#[test]
fn decisions_explain_themselves() {
    let mut h = History::default();
    h.push(sample(0, 2, &[(10_000, Some(0)), (10_000, Some(0))]));
    h.push(sample(
        10,
        2,
        &[(12_000, Some(5_000)), (12_000, Some(5_000))],
    ));
    let mut a = Autoscaler::default();
    let t = *T0.get().unwrap() + Duration::from_secs(10);
    let d = decide(&policy(Some(60)), &mut a, &h, t, 2).unwrap();
    let i = d.inputs.as_ref().unwrap();
    assert_eq!(i.policy, "drainTime");
    // 400/s arriving, 14 000 lag over 60 s → 633/s; 450/s per reducer
    // (500 measured, 90 % headroom) → 2.
    assert_eq!(i.raw, 2, "{}", d.reason);
    assert_eq!(d.replicas, 2);
    assert!(i.note().contains("arrivals 400/s"), "{}", i.note());
    assert!(d.reason.contains("500/s per reducer"), "{}", d.reason);
}

#[test]
fn limit_to_partitions_with_lag_caps_either_policy() {
    // 8 partitions, 2 of them with a large backlog: the lag rule wants the
    // partition count, yet only 2 reducers can have anything to read.
    let parts: Vec<(i64, Option<i64>)> = (0..8)
        .map(|i| {
            if i < 2 {
                (50_000, Some(0))
            } else {
                (100, Some(100))
            }
        })
        .collect();
    let mut h = History::default();
    h.push(sample(0, 1, &parts));
    let t = *T0.get().unwrap();
    let off = decide(&policy(None), &mut Autoscaler::default(), &h, t, 1).unwrap();
    assert_eq!(off.replicas, 8, "{}", off.reason);
    let on = Policy {
        limit_to_lagging: true,
        ..policy(None)
    };
    let d = decide(&on, &mut Autoscaler::default(), &h, t, 1).unwrap();
    assert_eq!(d.replicas, 2, "{}", d.reason);
    assert_eq!(d.limit, Limit::PartitionsWithLag(2));
    assert_eq!(d.limit.reason(), "CappedAtPartitionsWithLag");
    assert!(d.reason.contains("2 partitions have lag"), "{}", d.reason);
    // minReplicas still holds.
    let min3 = Policy {
        min_replicas: 3,
        ..on
    };
    assert_eq!(
        decide(&min3, &mut Autoscaler::default(), &h, t, 3)
            .unwrap()
            .replicas,
        3
    );
    // Below the cap nothing changes.
    let mut small = History::default();
    small.push(sample(
        0,
        1,
        &parts
            .iter()
            .map(|&(h, _)| (h.min(1_500), Some(0)))
            .collect::<Vec<_>>(),
    ));
    let d = decide(&on, &mut Autoscaler::default(), &small, t, 1).unwrap();
    assert_ne!(d.limit, Limit::PartitionsWithLag(8));
}

#[test]
fn stuck_partitions_do_not_count_as_partitions_with_lag() {
    let mut h = History::default();
    for (i, at) in [0u64, 30, 60, 90].into_iter().enumerate() {
        let moved = 1000 * i as i64;
        h.push(sample(
            at,
            1,
            &[
                (90_000 + moved, Some(moved)),
                (90_000 + moved, Some(5)),
                (0, Some(0)),
            ],
        ));
    }
    let e = estimate(&h);
    assert_eq!(e.stuck.len(), 1, "partition 1 is stuck");
    assert_eq!(partitions_with_lag(&e, h.latest().unwrap()), 1);
    let on = Policy {
        limit_to_lagging: true,
        ..policy(None)
    };
    let t = *T0.get().unwrap() + Duration::from_secs(90);
    let d = decide(&on, &mut Autoscaler::default(), &h, t, 1).unwrap();
    assert_eq!(d.replicas, 1, "{}", d.reason);
}
