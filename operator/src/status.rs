//! The pipeline's status as a pure function of what one reconcile pass saw.
//!
//! Every pass — healthy, invalid, conflicting or failed — ends in a
//! [`Pass`], and [`status`] turns it into the whole status, so even a
//! pipeline that fails on its very first pass gets conditions and a READY
//! column. Two server constraints shape it: Kubernetes 1.20 turns an empty
//! string in a server-side-applied custom resource status into `null` and
//! then rejects it, so no string here is ever empty; and a condition keeps
//! its `lastTransitionTime` while its status does not change, so an
//! unchanged pass yields an equal status (and no write).

use k8s_openapi::api::apps::v1::Deployment;

use crate::autoscale::Limit;
use crate::crd::{AutoscalingDecision, Condition, RoleStatus, StreamPipelineStatus};
use crate::plan::Scaling;
use crate::sharing::Sharing;

/// Condition types.
pub const READY: &str = "Ready";
/// See [`READY`].
pub const PROGRESSING: &str = "Progressing";
/// See [`READY`].
pub const DEGRADED: &str = "Degraded";
/// A child's name is taken by an object this pipeline does not control.
pub const CONFLICT: &str = "Conflict";
/// Another pipeline in the namespace uses the same consumer group (a
/// warning: it does not make the pipeline Degraded or not Ready).
pub const SHARED_CONSUMER_GROUP: &str = "SharedConsumerGroup";
/// See [`READY`].
pub const SCALING_ACTIVE: &str = "ScalingActive";
/// See [`READY`].
pub const SCALING_LIMITED: &str = "ScalingLimited";
/// A partition's committed offset stays put while it has lag (autoscaler).
pub const PARTITIONS_STUCK: &str = "PartitionsStuck";

/// The Deployment condition reason that means a rollout stopped progressing.
pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";

/// What a pass saw of one role's Deployment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rollout {
    /// The Deployment, for messages.
    pub name: String,
    /// Replicas wanted.
    pub desired: i32,
    /// Ready replicas.
    pub ready: i32,
    /// A rollout is under way.
    pub rolling: bool,
    /// The Deployment gave up progressing (`ProgressDeadlineExceeded`): its message.
    pub stalled: Option<String>,
}

impl Rollout {
    /// Reads a live Deployment (absent: nothing ready yet).
    pub fn of(name: &str, desired: i32, d: Option<&Deployment>) -> Self {
        let Some(d) = d else {
            return Rollout {
                name: name.into(),
                desired,
                ..Default::default()
            };
        };
        let st = d.status.clone().unwrap_or_default();
        let generation = d.metadata.generation.unwrap_or(0);
        let want = d.spec.replicas.unwrap_or(1);
        let stalled = st
            .conditions
            .iter()
            .flatten()
            .find(|c| {
                c.type_.as_deref() == Some("Progressing")
                    && c.status.as_deref() == Some("False")
                    && c.reason.as_deref() == Some(PROGRESS_DEADLINE_EXCEEDED)
            })
            .map(|c| {
                c.message
                    .clone()
                    .filter(|m| !m.is_empty())
                    .unwrap_or_else(|| "progress deadline exceeded".into())
            });
        Rollout {
            name: name.into(),
            desired,
            ready: st.ready_replicas.unwrap_or(0),
            rolling: st.observed_generation.unwrap_or(0) < generation
                || st.updated_replicas.unwrap_or(0) < want,
            stalled,
        }
    }

    /// What the previous status said (for passes that did not look).
    pub fn from_previous(name: &str, desired: i32, prev: &RoleStatus) -> Self {
        Rollout {
            name: name.into(),
            desired,
            ready: prev.ready_replicas,
            ..Default::default()
        }
    }

    fn role_status(&self) -> RoleStatus {
        RoleStatus {
            replicas: self.desired,
            ready_replicas: self.ready,
            summary: format!("{}/{}", self.ready, self.desired),
        }
    }
}

/// Why a pass could not do its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `InvalidSpec`, `ApplyFailed`, `ReconcileFailed`.
    pub reason: &'static str,
    /// For people.
    pub message: String,
}

/// Everything a pass learned.
#[derive(Debug, Clone, Default)]
pub struct Pass<'a> {
    /// The generation the pass worked on.
    pub generation: Option<i64>,
    /// The reducer pods' selector.
    pub selector: String,
    /// Reducer Deployment.
    pub reducer: Rollout,
    /// Publisher Deployment.
    pub publisher: Rollout,
    /// What stopped the pass, if anything did.
    pub problem: Option<Problem>,
    /// Children left alone because someone else controls their name.
    pub conflicts: Vec<String>,
    /// The autoscaler's view, when it ran this pass.
    pub scaling: Option<&'a Scaling>,
    /// Autoscaling is on (keep the previous scaling status when it did not run).
    pub autoscaling: bool,
    /// Whether other pipelines share the consumer group.
    pub sharing: Sharing,
    /// Now, RFC 3339 (transition times).
    pub now: String,
}

fn non_empty(s: String, fallback: &str) -> String {
    if s.trim().is_empty() {
        fallback.to_owned()
    } else {
        s
    }
}

/// A condition, keeping the previous transition time when its status did not change.
pub fn condition(
    prev: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &str,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let last_transition_time = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_owned());
    Condition {
        type_: type_.into(),
        status,
        reason: non_empty(reason.into(), "Unknown"),
        message: non_empty(message, "-"),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The autoscaler's conditions.
pub fn scaling_conditions(
    prev: &[Condition],
    s: &Scaling,
    generation: Option<i64>,
    now: &str,
) -> Vec<Condition> {
    let d = &s.decision;
    let active = d.limit != Limit::KafkaUnavailable;
    let (limited, reason) = (d.limit != Limit::None, d.limit.reason());
    let active_reason = if active {
        "LagRead"
    } else {
        "KafkaUnavailable"
    };
    let stuck = d.inputs.as_ref().map(|i| &i.estimate.stuck);
    let stuck_condition = match stuck {
        Some(s) if !s.is_empty() => {
            let list: Vec<String> = s
                .iter()
                .map(|p| {
                    let at = p
                        .committed
                        .map_or("no committed offset".to_owned(), |o| format!("offset {o}"));
                    format!(
                        "partition {} at {at} for {} s, lag {}",
                        p.partition, p.seconds, p.lag
                    )
                })
                .collect();
            condition(
                prev,
                PARTITIONS_STUCK,
                true,
                "CommittedOffsetNotMoving",
                format!("{}; not counted in the replica estimate", list.join("; ")),
                generation,
                now,
            )
        }
        Some(_) => condition(
            prev,
            PARTITIONS_STUCK,
            false,
            "AllPartitionsProgressing",
            "every partition with lag is being consumed".into(),
            generation,
            now,
        ),
        // Kafka unread: keep what was known.
        None => prev
            .iter()
            .find(|c| c.type_ == PARTITIONS_STUCK)
            .cloned()
            .unwrap_or_else(|| {
                condition(
                    prev,
                    PARTITIONS_STUCK,
                    false,
                    "Unknown",
                    "lag not read yet".into(),
                    generation,
                    now,
                )
            }),
    };
    vec![
        condition(
            prev,
            SCALING_ACTIVE,
            active,
            active_reason,
            d.reason.clone(),
            generation,
            now,
        ),
        condition(
            prev,
            SCALING_LIMITED,
            limited,
            reason,
            d.reason.clone(),
            generation,
            now,
        ),
        stuck_condition,
    ]
}

/// The status view of a decision and its inputs (rates to 0.1 record/s,
/// so an unchanged pipeline does not rewrite its status for noise).
pub fn decision_status(s: &Scaling) -> Option<AutoscalingDecision> {
    let d = &s.decision;
    let i = d.inputs.as_ref()?;
    let e = &i.estimate;
    let round = |x: f64| (x * 10.0).round() / 10.0;
    Some(AutoscalingDecision {
        policy: i.policy.to_owned(),
        lag: e.lag,
        arrival_rate: e.arrival.map(round),
        consumption_rate: e.consumption.map(round),
        reducer_rate: e.capacity.as_ref().map(|c| round(c.per_reducer)),
        drain_seconds: i.drain_seconds.map(round),
        estimate: i.raw,
        replicas: d.replicas,
        limit: d.limit.reason().to_owned(),
        stuck_partitions: e.stuck.iter().map(|p| p.partition).collect(),
    })
}

/// The whole status after `pass`, given the previous one.
pub fn status(prev: &StreamPipelineStatus, pass: &Pass) -> StreamPipelineStatus {
    let g = pass.generation;
    let pc = &prev.conditions;
    let now = pass.now.as_str();
    let (r, p) = (&pass.reducer, &pass.publisher);
    let summary = format!(
        "reducers {}/{}, publishers {}/{} ready",
        r.ready, r.desired, p.ready, p.desired
    );
    let stalled: Vec<String> = [r, p]
        .iter()
        .filter_map(|x| {
            x.stalled
                .as_ref()
                .map(|m| format!("Deployment {}: {m}", x.name))
        })
        .collect();
    let conflict = (!pass.conflicts.is_empty()).then(|| pass.conflicts.join("; "));
    let replicas_ready = r.ready >= r.desired && p.ready >= p.desired;

    // Degraded: the pass's own problem first, then conflicts, then stalled rollouts.
    let degraded: Option<(&str, String)> = match (&pass.problem, &conflict) {
        (Some(pr), _) => Some((pr.reason, pr.message.clone())),
        (None, Some(c)) => Some(("Conflict", c.clone())),
        (None, None) if !stalled.is_empty() => {
            Some((PROGRESS_DEADLINE_EXCEEDED, stalled.join("; ")))
        }
        _ => None,
    };
    let ready = degraded.is_none() && replicas_ready;
    let ready_reason = match &degraded {
        Some((reason, _)) => reason,
        None if ready => "AllReplicasReady",
        None => "ReplicasNotReady",
    };
    let (progressing, progressing_reason, progressing_message) = match (&pass.problem, &stalled) {
        (Some(pr), _) => (
            false,
            pr.reason,
            "nothing is rolled out until this is fixed; see Degraded".to_owned(),
        ),
        (None, s) if !s.is_empty() => (false, PROGRESS_DEADLINE_EXCEEDED, s.join("; ")),
        // Not everything could be applied: "RolledOut" would be a lie.
        _ if conflict.is_some() => (
            false,
            "Conflict",
            "not every child could be applied; see Conflict".to_owned(),
        ),
        _ if r.rolling || p.rolling => (true, "RollingOut", summary.clone()),
        _ => (false, "RolledOut", summary.clone()),
    };
    let mut conditions = vec![
        condition(pc, READY, ready, ready_reason, summary.clone(), g, now),
        condition(
            pc,
            PROGRESSING,
            progressing,
            progressing_reason,
            progressing_message,
            g,
            now,
        ),
        match &degraded {
            Some((reason, message)) => {
                condition(pc, DEGRADED, true, reason, message.clone(), g, now)
            }
            None => condition(
                pc,
                DEGRADED,
                false,
                "AsExpected",
                "children applied".into(),
                g,
                now,
            ),
        },
        match &conflict {
            Some(c) => condition(pc, CONFLICT, true, "Conflict", c.clone(), g, now),
            None => condition(
                pc,
                CONFLICT,
                false,
                "NoConflict",
                "every child is controlled by this pipeline".into(),
                g,
                now,
            ),
        },
    ];
    match &pass.sharing {
        Sharing::Shared(m) => conditions.push(condition(
            pc,
            SHARED_CONSUMER_GROUP,
            true,
            SHARED_CONSUMER_GROUP,
            m.clone(),
            g,
            now,
        )),
        Sharing::Exclusive => conditions.push(condition(
            pc,
            SHARED_CONSUMER_GROUP,
            false,
            "ExclusiveConsumerGroup",
            "no other pipeline in this namespace uses this consumer group".into(),
            g,
            now,
        )),
        Sharing::Unchecked => conditions.extend(
            pc.iter()
                .filter(|c| c.type_ == SHARED_CONSUMER_GROUP)
                .cloned(),
        ),
    }
    let mut status = StreamPipelineStatus {
        observed_generation: g,
        ready: Some(if ready { "True" } else { "False" }.into()),
        reducer: r.role_status(),
        publisher: p.role_status(),
        selector: Some(non_empty(pass.selector.clone(), "-")),
        ..Default::default()
    };
    match pass.scaling {
        Some(s) => {
            match &s.report {
                Some(rep) => {
                    status.partitions = Some(rep.partitions);
                    status.total_lag = Some(rep.total);
                    status.max_partition_lag = Some(rep.max);
                }
                None => {
                    status.partitions = prev.partitions;
                    status.total_lag = prev.total_lag;
                    status.max_partition_lag = prev.max_partition_lag;
                }
            }
            status.desired_replicas = Some(s.decision.replicas);
            status.autoscaling_decision =
                decision_status(s).or_else(|| prev.autoscaling_decision.clone());
            status.last_scale_time = s
                .last_scale_time
                .clone()
                .or_else(|| prev.last_scale_time.clone());
            conditions.extend(scaling_conditions(pc, s, g, now));
        }
        None if pass.autoscaling => {
            status.partitions = prev.partitions;
            status.total_lag = prev.total_lag;
            status.max_partition_lag = prev.max_partition_lag;
            status.desired_replicas = prev.desired_replicas;
            status.last_scale_time = prev.last_scale_time.clone();
            status.autoscaling_decision = prev.autoscaling_decision.clone();
            conditions.extend(
                pc.iter()
                    .filter(|c| {
                        [SCALING_ACTIVE, SCALING_LIMITED, PARTITIONS_STUCK]
                            .contains(&c.type_.as_str())
                    })
                    .cloned(),
            );
        }
        None => {}
    }
    status.conditions = conditions;
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentSpec, DeploymentStatus};

    fn pass() -> Pass<'static> {
        Pass {
            generation: Some(2),
            selector: "app=x".into(),
            reducer: Rollout {
                name: "odds-reducer".into(),
                desired: 2,
                ready: 2,
                ..Default::default()
            },
            publisher: Rollout {
                name: "odds-publisher".into(),
                desired: 1,
                ready: 1,
                ..Default::default()
            },
            now: "2026-01-01T00:00:00Z".into(),
            ..Default::default()
        }
    }

    fn cond<'a>(s: &'a StreamPipelineStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn healthy_pass_is_ready_and_not_degraded() {
        let s = status(&Default::default(), &pass());
        assert_eq!(s.ready.as_deref(), Some("True"));
        assert_eq!(s.reducer.summary, "2/2");
        assert_eq!(cond(&s, READY).reason, "AllReplicasReady");
        assert_eq!(cond(&s, DEGRADED).status, "False");
        assert_eq!(cond(&s, CONFLICT).status, "False");
        assert_eq!(cond(&s, PROGRESSING).reason, "RolledOut");
        // The same pass again is the same status (no write): transition times kept.
        let mut later = pass();
        later.now = "2026-01-02T00:00:00Z".into();
        assert_eq!(status(&s, &later), s);
    }

    #[test]
    fn a_failed_first_pass_still_has_every_string_and_a_ready_column() {
        let mut p = pass();
        p.reducer = Rollout::from_previous("odds-reducer", 2, &Default::default());
        p.publisher = Rollout::from_previous("odds-publisher", 1, &Default::default());
        p.problem = Some(Problem {
            reason: "ApplyFailed",
            message: String::new(),
        });
        let s = status(&Default::default(), &p);
        assert_eq!(s.ready.as_deref(), Some("False"));
        assert_eq!(s.reducer.summary, "0/2");
        assert_eq!(s.publisher.summary, "0/1");
        let v = serde_json::to_value(&s).unwrap();
        fn no_empty_strings(v: &serde_json::Value) {
            match v {
                serde_json::Value::String(s) => assert!(!s.is_empty()),
                serde_json::Value::Array(a) => a.iter().for_each(no_empty_strings),
                serde_json::Value::Object(o) => o.values().for_each(no_empty_strings),
                _ => {}
            }
        }
        no_empty_strings(&v);
        assert_eq!(cond(&s, DEGRADED).reason, "ApplyFailed");
        assert_eq!(cond(&s, PROGRESSING).reason, "ApplyFailed");
    }

    #[test]
    fn conflicts_degrade_and_name_the_object() {
        let mut p = pass();
        p.conflicts =
            vec!["ConfigMap odds-config exists and is not controlled by this pipeline".into()];
        let s = status(&Default::default(), &p);
        assert_eq!(cond(&s, CONFLICT).status, "True");
        assert!(cond(&s, CONFLICT).message.contains("ConfigMap odds-config"));
        assert_eq!(
            (
                cond(&s, DEGRADED).status.as_str(),
                cond(&s, DEGRADED).reason.as_str()
            ),
            ("True", "Conflict")
        );
        assert_eq!(s.ready.as_deref(), Some("False"));
        assert_eq!(cond(&s, PROGRESSING).reason, "Conflict");
    }

    #[test]
    fn progress_deadline_exceeded_is_degraded_not_rolled_out() {
        let d = Deployment {
            spec: DeploymentSpec {
                replicas: Some(2),
                ..Default::default()
            },
            status: Some(DeploymentStatus {
                updated_replicas: Some(2),
                conditions: Some(vec![DeploymentCondition {
                    type_: Some("Progressing".into()),
                    status: Some("False".into()),
                    reason: Some(PROGRESS_DEADLINE_EXCEEDED.into()),
                    message: Some(
                        "ReplicaSet \"odds-reducer-1\" has timed out progressing.".into(),
                    ),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut p = pass();
        p.reducer = Rollout::of("odds-reducer", 2, Some(&d));
        let s = status(&Default::default(), &p);
        let prog = cond(&s, PROGRESSING);
        assert_eq!(
            (prog.status.as_str(), prog.reason.as_str()),
            ("False", PROGRESS_DEADLINE_EXCEEDED)
        );
        let deg = cond(&s, DEGRADED);
        assert_eq!(
            (deg.status.as_str(), deg.reason.as_str()),
            ("True", PROGRESS_DEADLINE_EXCEEDED)
        );
        assert!(deg.message.contains("Deployment odds-reducer"));
    }

    #[test]
    fn a_shared_group_is_a_warning_condition_not_degraded() {
        let mut p = pass();
        p.sharing = Sharing::Shared("consumer group \"g\" is also used by pipeline b".into());
        let s = status(&Default::default(), &p);
        let c = cond(&s, SHARED_CONSUMER_GROUP);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", SHARED_CONSUMER_GROUP)
        );
        assert!(c.message.contains("pipeline b"));
        assert_eq!(cond(&s, DEGRADED).status, "False");
        assert_eq!(s.ready.as_deref(), Some("True"));
        // Unchecked keeps what was there; exclusive clears it.
        let mut unchecked = pass();
        unchecked.sharing = Sharing::Unchecked;
        assert_eq!(cond(&status(&s, &unchecked), SHARED_CONSUMER_GROUP), c);
        assert!(status(&Default::default(), &unchecked)
            .conditions
            .iter()
            .all(|c| c.type_ != SHARED_CONSUMER_GROUP));
        let mut alone = pass();
        alone.sharing = Sharing::Exclusive;
        assert_eq!(
            cond(&status(&s, &alone), SHARED_CONSUMER_GROUP).status,
            "False"
        );
    }

    #[test]
    fn a_decision_shows_its_inputs_stuck_partitions_and_saturation() {
        use crate::autoscale::Decision;
        use crate::drain::{Capacity, Estimate, Inputs, Saturation, Stuck};
        let saturation = Saturation {
            from: 2,
            before: 1000.0,
            to: 4,
            after: 1010.0,
        };
        let scaling = Scaling {
            decision: Decision {
                replicas: 4,
                recommendation: 4,
                limit: Limit::Saturated(4),
                reason: saturation.note(),
                inputs: Some(Inputs {
                    policy: "drainTime",
                    estimate: Estimate {
                        partitions: 8,
                        total_lag: 9000,
                        lag: 5000,
                        arrival: Some(1200.04),
                        consumption: Some(1010.0),
                        capacity: Some(Capacity {
                            per_reducer: 252.5,
                            replicas: 4,
                        }),
                        stuck: vec![Stuck {
                            partition: 3,
                            committed: Some(77),
                            lag: 4000,
                            seconds: 90,
                        }],
                        saturation: Some(saturation),
                        ..Default::default()
                    },
                    raw: 9,
                    drain_seconds: None,
                }),
            },
            report: None,
            last_scale_time: None,
        };
        let mut p = pass();
        p.scaling = Some(&scaling);
        p.autoscaling = true;
        let s = status(&Default::default(), &p);
        let d = s.autoscaling_decision.as_ref().unwrap();
        assert_eq!(
            (
                d.policy.as_str(),
                d.lag,
                d.estimate,
                d.replicas,
                d.limit.as_str()
            ),
            ("drainTime", 5000, 9, 4, "DownstreamSaturated")
        );
        assert_eq!(d.arrival_rate, Some(1200.0), "rounded to 0.1");
        assert_eq!(d.reducer_rate, Some(252.5));
        assert_eq!(d.stuck_partitions, vec![3]);
        let limited = cond(&s, SCALING_LIMITED);
        assert_eq!(
            (limited.status.as_str(), limited.reason.as_str()),
            ("True", "DownstreamSaturated")
        );
        assert!(
            limited.message.contains("2 reducers consumed 1000"),
            "{}",
            limited.message
        );
        let stuck = cond(&s, PARTITIONS_STUCK);
        assert_eq!(stuck.status, "True");
        assert!(
            stuck.message.contains("partition 3 at offset 77"),
            "{}",
            stuck.message
        );
        // A pass without the autoscaler keeps all of it.
        let mut idle = pass();
        idle.autoscaling = true;
        let kept = status(&s, &idle);
        assert_eq!(kept.autoscaling_decision, s.autoscaling_decision);
        assert_eq!(cond(&kept, PARTITIONS_STUCK), stuck);
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let prev = vec![condition(&[], READY, false, "X", "m".into(), None, "t1")];
        assert_eq!(
            condition(&prev, READY, false, "Y", "n".into(), None, "t2").last_transition_time,
            "t1"
        );
        assert_eq!(
            condition(&prev, READY, true, "Y", "n".into(), None, "t2").last_transition_time,
            "t2"
        );
    }
}
