//! The reducer autoscaling decision, as a pure function of lag and time.
//!
//! `desired = ceil(totalLag / lagThreshold)`, clamped **in replica space**
//! to `[min, min(max, partitions)]` (clamping the metric instead is what
//! leaves KEDA one pod short of the partition count), optionally rounded up
//! to a divisor of the partition count so partitions spread evenly. Scaling
//! follows the HPA's stabilization: a scale-up takes the lowest
//! recommendation of the scale-up window (default 0 s: at once), a
//! scale-down the highest recommendation of the scale-down window (default
//! 300 s). Zero replicas only when `min` is 0 and the lag is below the
//! activation threshold. When Kafka cannot be read, replicas are held.
//!
//! The clamping and the stabilization are shared with the drain-time
//! policy ([`crate::drain`]), which only computes its raw estimate
//! differently.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The autoscaling settings of a pipeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// Fewest reducers.
    pub min_replicas: i32,
    /// Most reducers (further capped at the partition count).
    pub max_replicas: i32,
    /// Target lag per reducer.
    pub lag_threshold: i64,
    /// Below this total lag, a pipeline with `min_replicas = 0` scales to zero.
    pub activation_lag_threshold: i64,
    /// Scale-up stabilization window.
    pub scale_up_window: Duration,
    /// Scale-down stabilization window.
    pub scale_down_window: Duration,
    /// Round desired replicas up to a divisor of the partition count.
    pub even_spread: bool,
    /// The drain-time policy's target (`None`: the lag-threshold policy).
    pub drain_target: Option<Duration>,
    /// Never above the number of partitions with lag (stuck ones excluded).
    pub limit_to_lagging: bool,
}

/// What Kafka said this poll.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// Lag was read.
    Lag {
        /// Partitions of the data topic.
        partitions: i32,
        /// Sum of per-partition lag.
        total: i64,
    },
    /// Kafka could not be read (unreachable, topic missing): hold.
    Unavailable(String),
}

/// Why the replicas are what they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Limit {
    /// Not limited.
    None,
    /// Capped at the partition count.
    Partitions(i32),
    /// Capped at `maxReplicas`.
    Max(i32),
    /// Raised to `minReplicas`.
    Min(i32),
    /// Held at zero: lag below the activation threshold.
    BelowActivation,
    /// Held: Kafka could not be read.
    KafkaUnavailable,
    /// Held by the stabilization window.
    Stabilizing,
    /// Not above this many: more reducers did not raise consumption.
    Saturated(i32),
    /// Held: the backlog's drain rate is being measured (drain-time policy).
    Measuring,
    /// Held: the reducers consumed nothing over the last poll (restarting,
    /// rebalancing); more of them would not help.
    NoProgress,
    /// Capped at the partitions that have lag (`limitToPartitionsWithLag`).
    PartitionsWithLag(i32),
}

impl Limit {
    /// The `ScalingLimited` condition reason (and `status.autoscalingDecision.limit`).
    pub fn reason(&self) -> &'static str {
        match self {
            Limit::None => "WithinRange",
            Limit::Partitions(_) => "CappedAtPartitions",
            Limit::Max(_) => "CappedAtMaxReplicas",
            Limit::Min(_) => "RaisedToMinReplicas",
            Limit::BelowActivation => "BelowActivationThreshold",
            Limit::KafkaUnavailable => "KafkaUnavailable",
            Limit::Stabilizing => "Stabilizing",
            Limit::Saturated(_) => "DownstreamSaturated",
            Limit::Measuring => "MeasuringThroughput",
            Limit::NoProgress => "NoConsumption",
            Limit::PartitionsWithLag(_) => "CappedAtPartitionsWithLag",
        }
    }
}

/// One decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Replicas to run now.
    pub replicas: i32,
    /// The unstabilized recommendation of this poll.
    pub recommendation: i32,
    /// What limited it.
    pub limit: Limit,
    /// For people: status message and Event note.
    pub reason: String,
    /// What it was computed from (absent when Kafka could not be read).
    pub inputs: Option<crate::drain::Inputs>,
}

fn ceil_div(a: i64, b: i64) -> i64 {
    if a <= 0 {
        0
    } else {
        (a + b - 1) / b
    }
}

/// `raw` clamped in replica space to `[min, min(max, partitions)]` and,
/// with even spread, rounded up to a divisor of the partition count.
pub fn clamp(policy: &Policy, partitions: i32, raw: i32) -> (i32, Limit) {
    let cap = policy.max_replicas.min(partitions).max(0);
    let floor = policy.min_replicas.min(cap);
    let (mut n, limit) = if raw > cap {
        let l = if cap == partitions && partitions <= policy.max_replicas {
            Limit::Partitions(partitions)
        } else {
            Limit::Max(policy.max_replicas)
        };
        (cap, l)
    } else if raw < floor {
        (floor, Limit::Min(policy.min_replicas))
    } else {
        (raw, Limit::None)
    };
    if policy.even_spread && n > 0 && partitions > 0 {
        // The smallest divisor of the partition count at or above n, within the cap.
        if let Some(d) = (n..=cap).find(|d| partitions % d == 0) {
            n = d;
        }
    }
    (n, limit)
}

/// How a clamp changed the estimate `raw`, for people (empty: not at all).
pub fn clamp_note(raw: i32, limit: &Limit) -> String {
    match limit {
        Limit::Partitions(p) => format!("wants {raw} reducers: capped at {p} partitions"),
        Limit::Max(m) => format!("wants {raw} reducers: capped at maxReplicas {m}"),
        Limit::Min(m) => format!("wants {raw} reducers: raised to minReplicas {m}"),
        _ => String::new(),
    }
}

/// Whether `total_lag` keeps a pipeline that may scale to zero at zero.
pub fn below_activation(policy: &Policy, total_lag: i64) -> bool {
    policy.min_replicas == 0 && total_lag < policy.activation_lag_threshold
}

/// The reason of a scale-to-zero.
pub fn activation_note(policy: &Policy, total_lag: i64) -> String {
    format!(
        "lag {total_lag} below activation threshold {}: scaled to zero",
        policy.activation_lag_threshold
    )
}

/// The lag rule's raw estimate: `ceil(total_lag / lag_threshold)`.
pub fn lag_estimate(policy: &Policy, total_lag: i64) -> i32 {
    ceil_div(total_lag, policy.lag_threshold.max(1)).min(i64::from(i32::MAX)) as i32
}

/// The unstabilized recommendation for one observation.
pub fn recommend(policy: &Policy, partitions: i32, total_lag: i64) -> (i32, Limit, String) {
    if below_activation(policy, total_lag) {
        return (
            0,
            Limit::BelowActivation,
            activation_note(policy, total_lag),
        );
    }
    let raw = lag_estimate(policy, total_lag);
    let (n, limit) = clamp(policy, partitions, raw);
    let note = clamp_note(raw, &limit);
    let reason = if note.is_empty() {
        format!(
            "lag {total_lag} / threshold {} → {n} reducers",
            policy.lag_threshold
        )
    } else {
        format!("lag {total_lag} {note}")
    };
    (n, limit, reason)
}

/// The stateful part: recommendation history for the stabilization windows.
#[derive(Debug, Default, Clone)]
pub struct Autoscaler {
    history: VecDeque<(Instant, i32)>,
}

impl Autoscaler {
    /// Decides the replicas at `now`, given the current replicas.
    pub fn decide(
        &mut self,
        policy: &Policy,
        now: Instant,
        current: i32,
        obs: &Observation,
    ) -> Decision {
        let (partitions, total) = match obs {
            Observation::Lag { partitions, total } => (*partitions, *total),
            Observation::Unavailable(why) => {
                return Decision {
                    replicas: current,
                    recommendation: current,
                    limit: Limit::KafkaUnavailable,
                    reason: format!("Kafka unreachable ({why}): holding {current} replicas"),
                    inputs: None,
                }
            }
        };
        let (rec, limit, reason) = recommend(policy, partitions, total);
        self.stabilize(policy, now, current, partitions, (rec, limit, reason))
    }

    /// Stabilizes the recommendation `(rec, limit, reason)` of this poll
    /// (HPA windows) and caps the result at the partition count.
    pub fn stabilize(
        &mut self,
        policy: &Policy,
        now: Instant,
        current: i32,
        partitions: i32,
        (rec, limit, reason): (i32, Limit, String),
    ) -> Decision {
        self.history.push_back((now, rec));
        let keep = policy.scale_up_window.max(policy.scale_down_window);
        while self
            .history
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > keep)
        {
            self.history.pop_front();
        }
        let within = |w: Duration| {
            self.history
                .iter()
                .filter(move |(t, _)| now.duration_since(*t) <= w)
                .map(|(_, r)| *r)
        };
        let replicas = if rec > current {
            // Up: the lowest recommendation of the window, but never down.
            within(policy.scale_up_window)
                .min()
                .unwrap_or(rec)
                .max(current)
        } else if rec < current {
            // Down: the highest recommendation of the window, never up.
            within(policy.scale_down_window)
                .max()
                .unwrap_or(rec)
                .min(current)
        } else {
            current
        };
        // Never beyond the partition count, whatever the history says.
        let replicas = replicas.min(
            policy
                .max_replicas
                .min(partitions)
                .max(policy.min_replicas.min(partitions)),
        );
        let (limit, reason) = if replicas != rec && limit != Limit::BelowActivation {
            (
                Limit::Stabilizing,
                format!("{reason}; holding {replicas} within the stabilization window"),
            )
        } else {
            (limit, reason)
        };
        Decision {
            replicas,
            recommendation: rec,
            limit,
            reason,
            inputs: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            lag_threshold: 100,
            activation_lag_threshold: 10,
            ..Policy::default()
        }
    }

    #[test]
    fn recommendation_table() {
        let p = policy();
        // (partitions, lag) → replicas, limit
        let cases = [
            (8, 0, 1, Limit::Min(1)),
            (8, 1, 1, Limit::None),
            (8, 100, 1, Limit::None),
            (8, 101, 2, Limit::None),
            (8, 750, 8, Limit::None),
            (8, 801, 8, Limit::Partitions(8)),
            (8, 1_000_000, 8, Limit::Partitions(8)),
            (16, 1_000_000, 10, Limit::Max(10)),
        ];
        for (parts, lag, want, limit) in cases {
            let (n, l, _) = recommend(&p, parts, lag);
            assert_eq!((n, l), (want, limit), "partitions {parts}, lag {lag}");
        }
    }

    #[test]
    fn partition_cap_is_reached_exactly() {
        // KEDA clamps the metric and stalls at partitions - 1; we clamp replicas.
        let p = Policy {
            max_replicas: 100,
            ..policy()
        };
        for lag in [799, 800, 801, 5_000] {
            let (n, _, _) = recommend(&p, 8, lag);
            assert_eq!(n, 8, "lag {lag}");
        }
    }

    #[test]
    fn scale_to_zero_only_below_activation_with_min_zero() {
        let p = Policy {
            min_replicas: 0,
            ..policy()
        };
        assert_eq!(recommend(&p, 8, 9).0, 0);
        assert_eq!(recommend(&p, 8, 9).1, Limit::BelowActivation);
        assert_eq!(recommend(&p, 8, 10).0, 1);
        assert_eq!(
            recommend(&policy(), 8, 0).0,
            1,
            "min 1 never scales to zero"
        );
    }

    #[test]
    fn even_spread_rounds_up_to_a_divisor() {
        let p = Policy {
            even_spread: true,
            max_replicas: 100,
            ..policy()
        };
        assert_eq!(recommend(&p, 12, 500).0, 6, "5 → 6 (12 % 6 == 0)");
        assert_eq!(recommend(&p, 12, 700).0, 12, "7 → 12");
        assert_eq!(recommend(&p, 8, 300).0, 4);
        let capped = Policy {
            max_replicas: 10,
            ..p
        };
        assert_eq!(
            recommend(&capped, 12, 700).0,
            7,
            "no divisor within the cap: keep 7"
        );
    }

    /// A lag series in → a replica series out.
    fn timeline(p: &Policy, start: i32, series: &[Observation], step: Duration) -> Vec<i32> {
        let mut a = Autoscaler::default();
        let t0 = Instant::now();
        let mut current = start;
        series
            .iter()
            .enumerate()
            .map(|(i, obs)| {
                current = a.decide(p, t0 + step * i as u32, current, obs).replicas;
                current
            })
            .collect()
    }

    fn lag(total: i64) -> Observation {
        Observation::Lag {
            partitions: 8,
            total,
        }
    }

    #[test]
    fn spike_scales_up_in_one_poll_and_down_only_after_the_window() {
        let p = policy();
        let step = Duration::from_secs(10);
        let mut series = vec![lag(50), lag(800)];
        series.extend((0..40).map(|_| lag(50)));
        let out = timeline(&p, 1, &series, step);
        assert_eq!(out[1], 8, "up in one poll");
        // Down only once 300 s passed since the spike (poll 1 at t=10 s → t > 310 s).
        let first_down = 2 + out[2..].iter().position(|&r| r < 8).unwrap();
        // The spike was seen at t = 10 s; down only once it left the 300 s window.
        assert!(
            (first_down - 1) * 10 > 300,
            "scaled down at poll {first_down}: {out:?}"
        );
        assert!(
            out[2..first_down].iter().all(|&r| r == 8),
            "held at 8 until then: {out:?}"
        );
        assert_eq!(*out.last().unwrap(), 1);
    }

    #[test]
    fn a_one_poll_dip_does_not_flap() {
        let p = policy();
        let out = timeline(
            &p,
            4,
            &[lag(400), lag(0), lag(400), lag(0), lag(400)],
            Duration::from_secs(10),
        );
        assert_eq!(out, vec![4, 4, 4, 4, 4]);
    }

    #[test]
    fn a_one_poll_spike_does_not_flap() {
        // With a scale-up window, a spike seen in one poll only is ignored.
        let p = Policy {
            scale_up_window: Duration::from_secs(30),
            ..policy()
        };
        let out = timeline(
            &p,
            2,
            &[lag(200), lag(800), lag(200), lag(200), lag(200)],
            Duration::from_secs(10),
        );
        assert_eq!(out, vec![2, 2, 2, 2, 2]);
        // A sustained rise still scales up once it fills the window.
        let out = timeline(
            &p,
            2,
            &[lag(200), lag(800), lag(800), lag(800), lag(800), lag(800)],
            Duration::from_secs(10),
        );
        assert_eq!(out[..4], [2, 2, 2, 2], "{out:?}");
        assert_eq!(*out.last().unwrap(), 8, "{out:?}");
    }

    #[test]
    fn kafka_errors_hold_replicas() {
        let p = policy();
        let out = timeline(
            &p,
            5,
            &[
                Observation::Unavailable("broker down".into()),
                lag(800),
                Observation::Unavailable("x".into()),
            ],
            Duration::from_secs(10),
        );
        assert_eq!(out, vec![5, 8, 8]);
        let mut a = Autoscaler::default();
        let d = a.decide(
            &p,
            Instant::now(),
            3,
            &Observation::Unavailable("topic missing".into()),
        );
        assert_eq!((d.replicas, d.limit), (3, Limit::KafkaUnavailable));
        assert!(d.reason.contains("holding 3 replicas"));
    }

    #[test]
    fn reasons_say_why() {
        let mut a = Autoscaler::default();
        let d = a.decide(&policy(), Instant::now(), 1, &lag(10_000));
        assert_eq!(d.replicas, 8);
        assert!(d.reason.contains("capped at 8 partitions"), "{}", d.reason);
    }
}
