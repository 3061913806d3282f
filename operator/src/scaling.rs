//! The autoscaler's I/O: read the lag from Kafka when [`crate::plan`] says
//! a poll is due, decide, and write the reducer replicas through the scale
//! subresource (as an HPA would), with Events saying why.
//!
//! The pipeline's state is taken out of [`crate::plan::Scalers`] for the
//! pass and put back at the end, so no lock is held across the Secret/ConfigMap reads,
//! the (blocking, seconds-long) Kafka read, Events or the scale patch.

use std::time::Instant;

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::ResourceExt;
use serde_json::json;

use crate::autoscale::{Decision, Observation};
use crate::builders;
use crate::context::Context;
use crate::crd::{AutoscalingSpec, StreamPipeline, POLICY_DRAIN_TIME};
use crate::drain::Sample;
use crate::error::{Error, Result};
use crate::lag::{read_lag, Uncommitted};
use crate::plan::{self, ScalerState, Scaling, Step};
use streampipe_contract::deploy::KafkaSecurity;

/// The lag reader's TLS and SASL, read from the pipeline's Secrets/ConfigMaps.
async fn kafka_security(
    sp: &StreamPipeline,
    ctx: &Context,
) -> std::result::Result<KafkaSecurity, String> {
    let ns = sp.namespace().ok_or("resource has no namespace")?;
    crate::lag::kafka_security(&ctx.client, &ns, &sp.spec.kafka).await
}

/// Polls Kafka when due, decides, and scales. Returns the effective
/// reducer replicas and the view for the status.
pub async fn autoscale(
    sp: &StreamPipeline,
    a: &AutoscalingSpec,
    ctx: &Context,
) -> Result<(i32, Scaling)> {
    let ns = sp.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = sp.name_any();
    let key = format!("{ns}/{name}");
    let mut state = ctx.scalers.take(&key);
    let res = pass(sp, a, ctx, &ns, &name, &mut state).await;
    ctx.scalers.put(key, state);
    res
}

async fn pass(
    sp: &StreamPipeline,
    a: &AutoscalingSpec,
    ctx: &Context,
    ns: &str,
    name: &str,
    state: &mut ScalerState,
) -> Result<(i32, Scaling)> {
    let current = sp.spec.reducer.replicas;
    if !plan::due(state, plan::interval(a), Instant::now()) {
        if let Some((d, r)) = &state.last {
            let scaling = Scaling {
                decision: d.clone(),
                report: r.clone(),
                last_scale_time: state.last_scale_time.clone(),
            };
            return Ok((current, scaling));
        }
    }
    state.last_poll = Some(Instant::now());
    let brokers = sp.spec.kafka.bootstrap_servers.clone();
    let topic = sp.spec.kafka.data_topic.clone();
    let group = builders::config_data(sp)[streampipe_contract::deploy::env::GROUP].clone();
    let uncommitted = if a.uncommitted_offset_policy == "latest" {
        Uncommitted::Latest
    } else {
        Uncommitted::Earliest
    };
    let report = match kafka_security(sp, ctx).await {
        Ok(security) => tokio::task::spawn_blocking(move || {
            read_lag(&brokers, &topic, &group, &security, uncommitted)
        })
        .await
        .unwrap_or_else(|e| Err(format!("lag reader: {e}"))),
        Err(e) => Err(format!("kafka security: {e}")),
    };
    let obs = match &report {
        Ok(r) => {
            state.kafka_failures = 0;
            Observation::Lag {
                partitions: r.partitions,
                total: r.total,
            }
        }
        Err(e) => {
            state.kafka_failures += 1;
            // Once per outage: the status follows it from then on.
            if state.kafka_failures == 1 {
                let note = format!("cannot read lag: {e}; holding {current} reducers");
                ctx.event(
                    sp,
                    EventType::Warning,
                    "KafkaUnavailable",
                    "Autoscale",
                    note,
                )
                .await;
            }
            Observation::Unavailable(e.clone())
        }
    };
    let policy = plan::policy_of(a);
    let now = Instant::now();
    let decision = match &report {
        Ok(r) => {
            state.history.push(Sample {
                at: now,
                replicas: current,
                report: r.clone(),
            });
            crate::drain::decide(&policy, &mut state.scaler, &state.history, now, current)
        }
        Err(_) => None,
    }
    .unwrap_or_else(|| state.scaler.decide(&policy, now, current, &obs));
    let labels = [ns, name];
    if let Ok(r) = &report {
        ctx.metrics.lag.with_label_values(&labels).set(r.total);
    }
    report_findings(sp, ctx, ns, name, state, &decision).await;
    ctx.metrics
        .desired_replicas
        .with_label_values(&labels)
        .set(i64::from(decision.replicas));
    let mut effective = current;
    match plan::step(state, current, &decision) {
        Step::Keep => {
            state.last_written.get_or_insert(current);
        }
        Step::Scale {
            from,
            to,
            overridden,
        } => {
            if let Some(w) = overridden {
                ctx.event(sp, EventType::Normal, "ManualScaleOverridden", "Autoscale", format!(
                    "reducers were set to {from} by hand (autoscaler had {w}); autoscaling is on and sets {to}")).await;
            }
            let api: Api<StreamPipeline> = Api::namespaced(ctx.client.clone(), ns);
            // A merge patch: server-side apply on /scale crashes Kubernetes 1.20.
            api.patch_scale(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": to}})),
            )
            .await?;
            let inputs = match (&report, &decision.inputs) {
                (Ok(r), Some(i)) => format!(
                    "{}; total lag {}, max partition lag {}, {} partitions",
                    i.note(),
                    r.total,
                    r.max,
                    r.partitions
                ),
                (Ok(r), None) => format!(
                    "total lag {}, max partition lag {}, {} partitions",
                    r.total, r.max, r.partitions
                ),
                (Err(e), _) => e.clone(),
            };
            ctx.event(
                sp,
                EventType::Normal,
                "Autoscaled",
                "Autoscale",
                format!("reducers {from} → {to}: {} ({inputs})", decision.reason),
            )
            .await;
            state.last_written = Some(to);
            state.last_scale_time = Some(jiff::Timestamp::now().to_string());
            effective = to;
        }
    }
    let report = report.ok();
    state.last = Some((decision.clone(), report.clone()));
    Ok((
        effective,
        Scaling {
            decision,
            report,
            last_scale_time: state.last_scale_time.clone(),
        },
    ))
}

/// Events and the metric for what the history showed: a saturated
/// downstream (once per new evidence, so a standing limit does not flap)
/// and stuck partitions (once per partition and offset).
async fn report_findings(
    sp: &StreamPipeline,
    ctx: &Context,
    ns: &str,
    name: &str,
    state: &mut ScalerState,
    decision: &Decision,
) {
    let Some(inputs) = &decision.inputs else {
        return;
    };
    let e = &inputs.estimate;
    // Per piece of evidence, not per decision it limits: the limit comes
    // and goes with the lag, the evidence stays for the history's span.
    let saturation = e
        .saturation
        .as_ref()
        .filter(|_| inputs.policy == POLICY_DRAIN_TIME)
        .map(|s| s.note());
    if saturation != state.saturation_reported {
        if let Some(note) = &saturation {
            let note = format!("{note} ({})", inputs.note());
            ctx.event(sp, EventType::Warning, "ScalingLimited", "Autoscale", note)
                .await;
        }
        state.saturation_reported = saturation;
    }
    let now: Vec<i32> = e.stuck.iter().map(|s| s.partition).collect();
    for p in &e.stuck {
        ctx.metrics
            .stuck_partition_lag
            .with_label_values(&[ns, name, &p.partition.to_string()])
            .set(p.lag);
        if !state.stuck_reported.contains(&p.partition) {
            let at = p
                .committed
                .map_or("no committed offset".to_owned(), |o| format!("offset {o}"));
            let note = format!(
                "partition {} has lag {} but its committed offset has not moved from {at} for {} s while others did; not counted in the replica estimate",
                p.partition, p.lag, p.seconds
            );
            ctx.event(sp, EventType::Warning, "PartitionStuck", "Autoscale", note)
                .await;
        }
    }
    for p in state.stuck_reported.iter().filter(|p| !now.contains(p)) {
        let _ = ctx
            .metrics
            .stuck_partition_lag
            .remove_label_values(&[ns, name, &p.to_string()]);
    }
    state.stuck_reported = now;
}
