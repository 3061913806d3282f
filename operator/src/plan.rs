//! The autoscaler's plan between Kafka reads, as pure functions: when the
//! next read is due, and what a decision means for the reducer replicas.
//!
//! The state of each pipeline lives in [`Scalers`], which hands it out and
//! takes it back: nothing holds a lock while Kafka, Secrets or the API
//! server are read, so one slow Kafka delays only its own pipeline. (The
//! controller never reconciles the same pipeline twice at once, so taking
//! the state out cannot lose an update.)

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::autoscale::{Autoscaler, Decision, Policy};
use crate::crd::AutoscalingSpec;
use crate::drain::History;
use crate::lag::LagReport;

/// Longest pause between Kafka reads while Kafka is unreachable.
pub const KAFKA_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// A poll counts as due this much early: requeues are not exact.
const DUE_SLACK: Duration = Duration::from_millis(200);

/// What the autoscaler remembers about one pipeline between reconciles.
#[derive(Debug, Default, Clone)]
pub struct ScalerState {
    /// Stabilization history.
    pub scaler: Autoscaler,
    /// When Kafka was last read.
    pub last_poll: Option<Instant>,
    /// Replicas the autoscaler last wrote (to notice manual scaling).
    pub last_written: Option<i32>,
    /// When it last changed the replicas (RFC 3339).
    pub last_scale_time: Option<String>,
    /// The last decision and report, reused between polls.
    pub last: Option<(Decision, Option<LagReport>)>,
    /// Consecutive failed Kafka reads: the next read backs off.
    pub kafka_failures: u32,
    /// Recent lag samples (rates, stuck partitions, saturation).
    pub history: History,
    /// The saturation last reported (an Event only when it changes).
    pub saturation_reported: Option<String>,
    /// Stuck partitions last reported (Events and metric series to clear).
    pub stuck_reported: Vec<i32>,
}

/// The autoscaler's view for the status.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaling {
    /// This pass's (or the last) decision.
    pub decision: Decision,
    /// The lag read, when it succeeded.
    pub report: Option<LagReport>,
    /// When the replicas last changed.
    pub last_scale_time: Option<String>,
}

/// Per-pipeline autoscaler state, lent out for the length of one pass.
#[derive(Default)]
pub struct Scalers {
    states: Mutex<HashMap<String, ScalerState>>,
}

impl Scalers {
    /// The state of `key` (fresh if unknown), out of the map until [`Scalers::put`].
    pub fn take(&self, key: &str) -> ScalerState {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key)
            .unwrap_or_default()
    }

    /// Forgets every pipeline `keep` says no to (deleted ones); returns
    /// their keys and last states (metric series to remove).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) -> Vec<(String, ScalerState)> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let gone: Vec<String> = states.keys().filter(|k| !keep(k)).cloned().collect();
        gone.into_iter()
            .filter_map(|k| states.remove(&k).map(|s| (k, s)))
            .collect()
    }

    /// Returns the state of `key`.
    pub fn put(&self, key: String, state: ScalerState) {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, state);
    }
}

/// The policy an `AutoscalingSpec` describes.
pub fn policy_of(a: &AutoscalingSpec) -> Policy {
    Policy {
        min_replicas: a.min_replicas,
        max_replicas: a.max_replicas,
        lag_threshold: a.lag_threshold,
        activation_lag_threshold: a.activation_lag_threshold,
        scale_up_window: Duration::from_secs(a.scale_up_stabilization_seconds.into()),
        scale_down_window: Duration::from_secs(a.scale_down_stabilization_seconds.into()),
        even_spread: a.even_partition_spread,
        drain_target: (a.policy == crate::crd::POLICY_DRAIN_TIME)
            .then(|| Duration::from_secs(a.target_drain_seconds.max(1).into())),
        limit_to_lagging: a.limit_to_partitions_with_lag,
    }
}

impl Default for Policy {
    /// The policy of the CRD's defaults (`spec.autoscaling: {}`).
    fn default() -> Self {
        policy_of(&AutoscalingSpec::default())
    }
}

/// The poll interval of `a` (at least a second).
pub fn interval(a: &AutoscalingSpec) -> Duration {
    Duration::from_secs(a.poll_interval_seconds.max(1).into())
}

/// Time between reads: the interval, doubled per consecutive failure, ≤ 60 s
/// (or the interval, if that is longer).
pub fn poll_wait(interval: Duration, failures: u32) -> Duration {
    if failures == 0 {
        interval
    } else {
        (interval * 2u32.saturating_pow(failures.min(10))).min(KAFKA_BACKOFF_MAX.max(interval))
    }
}

/// Whether Kafka should be read now.
pub fn due(state: &ScalerState, interval: Duration, now: Instant) -> bool {
    let wait = poll_wait(interval, state.kafka_failures);
    state.last.is_none()
        || state
            .last_poll
            .is_none_or(|t| now.saturating_duration_since(t) + DUE_SLACK >= wait)
}

/// What a decision means for the replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Replicas stay.
    Keep,
    /// Write `to` through the scale subresource.
    Scale {
        /// Replicas now.
        from: i32,
        /// Replicas wanted.
        to: i32,
        /// Someone scaled by hand after the autoscaler wrote this value.
        overridden: Option<i32>,
    },
}

/// The step for `decision` with `current` replicas.
pub fn step(state: &ScalerState, current: i32, decision: &Decision) -> Step {
    if decision.replicas == current {
        return Step::Keep;
    }
    Step::Scale {
        from: current,
        to: decision.replicas,
        overridden: state.last_written.filter(|w| *w != current),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::Limit;

    fn decision(replicas: i32) -> Decision {
        Decision {
            replicas,
            recommendation: replicas,
            limit: Limit::None,
            reason: "r".into(),
            inputs: None,
        }
    }

    #[test]
    fn reads_back_off_while_kafka_fails_and_are_due_on_time() {
        let i = Duration::from_secs(2);
        assert_eq!(poll_wait(i, 0), i);
        assert_eq!(poll_wait(i, 1), Duration::from_secs(4));
        assert_eq!(poll_wait(i, 20), KAFKA_BACKOFF_MAX);
        assert_eq!(
            poll_wait(Duration::from_secs(120), 3),
            Duration::from_secs(120)
        );
        let t0 = Instant::now();
        let mut s = ScalerState::default();
        assert!(due(&s, i, t0), "first poll is due");
        s.last_poll = Some(t0);
        s.last = Some((decision(1), None));
        assert!(!due(&s, i, t0 + Duration::from_secs(1)));
        assert!(due(&s, i, t0 + Duration::from_secs(2)));
        s.kafka_failures = 1;
        assert!(!due(&s, i, t0 + Duration::from_secs(3)));
    }

    #[test]
    fn steps_notice_manual_scaling() {
        let mut s = ScalerState::default();
        assert_eq!(step(&s, 2, &decision(2)), Step::Keep);
        assert_eq!(
            step(&s, 2, &decision(4)),
            Step::Scale {
                from: 2,
                to: 4,
                overridden: None
            }
        );
        s.last_written = Some(4);
        assert_eq!(
            step(&s, 1, &decision(4)),
            Step::Scale {
                from: 1,
                to: 4,
                overridden: Some(4)
            }
        );
    }

    #[test]
    fn state_is_lent_out_and_returned() {
        let scalers = Scalers::default();
        let mut s = scalers.take("ns/a");
        s.kafka_failures = 3;
        scalers.put("ns/a".into(), s);
        assert_eq!(scalers.take("ns/a").kafka_failures, 3);
        assert_eq!(scalers.take("ns/a").kafka_failures, 0, "taken out");
        scalers.put("ns/a".into(), ScalerState::default());
        scalers.put("ns/b".into(), ScalerState::default());
        let gone: Vec<String> = scalers
            .retain(|k| k == "ns/b")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(gone, vec!["ns/a".to_owned()]);
    }
}
