//! The reconciler: one `reconcile(Arc<StreamPipeline>, Arc<Context>)`, in
//! the shape of kube-rs' controller-rs.
//!
//! Each pass validates what the schema cannot, applies the children built by
//! [`crate::builders`] with server-side apply (one field manager, owner
//! references) *only where the live object differs*, derives the status from
//! what it observed on the owned Deployments, writes the status only when it
//! changed, and records an Event for every user-visible decision. A pass on
//! an unchanged pipeline makes no write at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::autoscale::{Autoscaler, Decision, Limit, Observation, Policy};
use crate::builders::{self, is_subset, Role, FIELD_MANAGER};
use crate::crd::{
    validate, AutoscalingSpec, Condition, RoleStatus, StreamPipeline, StreamPipelineStatus,
};
use crate::error::{Error, Result};
use crate::lag::{read_lag, LagReport, Uncommitted};
use crate::metrics::Metrics;
use streampipe_contract::deploy::KafkaSecurity;

/// Periodic resync: status follows the Deployments even without events.
pub const RESYNC: Duration = Duration::from_secs(300);

/// Backoff after failed reconciles: first and largest delay.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// See [`BACKOFF_MIN`].
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// What the API server offers (checked at start).
#[derive(Debug, Clone, Copy, Default)]
pub struct Features {
    /// `policy/v1` is served (Kubernetes ≥ 1.21): publishers get a PDB.
    pub pdb: bool,
}

/// Shared state of the reconciler.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Event recorder (events.k8s.io/v1).
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// API server capabilities.
    pub features: Features,
    /// Consecutive failures per object, for the error backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Autoscaler state per pipeline (stabilization history, last poll).
    autoscalers: tokio::sync::Mutex<HashMap<String, ScalerState>>,
}

/// What the autoscaler remembers about one pipeline between reconciles.
#[derive(Default)]
struct ScalerState {
    scaler: Autoscaler,
    last_poll: Option<Instant>,
    /// Replicas the autoscaler last wrote (to notice manual scaling).
    last_written: Option<i32>,
    last_scale_time: Option<String>,
    last: Option<(Decision, Option<LagReport>)>,
    /// Consecutive failed Kafka reads: the next read backs off.
    kafka_failures: u32,
}

/// Longest pause between Kafka reads while Kafka is unreachable.
pub const KAFKA_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The autoscaler's view for the status.
struct Scaling {
    decision: Decision,
    report: Option<LagReport>,
    last_scale_time: Option<String>,
}

impl Context {
    /// A context for `client`; `reporter` names this operator instance in Events.
    pub fn new(
        client: Client,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        features: Features,
    ) -> Self {
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            features,
            failures: Mutex::new(HashMap::new()),
            autoscalers: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    async fn event(
        &self,
        sp: &StreamPipeline,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        self.event_about(sp, type_, reason, action, note, None)
            .await
    }

    /// Records an Event; `secondary` names the child it is about (Events
    /// about different children are separate series).
    async fn event_about(
        &self,
        sp: &StreamPipeline,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
        secondary: Option<ObjectReference>,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary,
        };
        if let Err(e) = self.recorder.publish(&ev, &sp.object_ref(&())).await {
            warn!(error = %e, reason, "could not record event");
        }
    }
}

/// How a child apply went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Live object already matched.
    Unchanged,
    /// Did not exist; created.
    Created,
    /// Differed; updated.
    Updated,
}

/// Applies `desired` unless the live object already has all its fields;
/// returns how, the live object before (if it existed) and after the call.
async fn apply_if_changed<K>(api: &Api<K>, desired: &Value) -> Result<(Applied, Option<K>, K)>
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let name = desired["metadata"]["name"]
        .as_str()
        .ok_or(Error::MissingField("child name"))?;
    let live = api.get_opt(name).await?;
    if let Some(live) = &live {
        if is_subset(desired, &serde_json::to_value(live)?) {
            return Ok((Applied::Unchanged, Some(live.clone()), live.clone()));
        }
    }
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let after = api.patch(name, &pp, &Patch::Apply(desired)).await?;
    Ok((
        if live.is_some() {
            Applied::Updated
        } else {
            Applied::Created
        },
        live,
        after,
    ))
}

fn role_status(desired: i32, d: &Deployment) -> RoleStatus {
    let ready = d
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    RoleStatus {
        replicas: desired,
        ready_replicas: ready,
        summary: format!("{ready}/{desired}"),
    }
}

fn rolling(d: &Deployment) -> bool {
    let generation = d.metadata.generation.unwrap_or(0);
    let st = d.status.clone().unwrap_or_default();
    let desired = d.spec.replicas.unwrap_or(1);
    st.observed_generation.unwrap_or(0) < generation || st.updated_replicas.unwrap_or(0) < desired
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

/// Builds a condition, keeping the previous transition time when the status did not change.
fn condition(
    prev: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_owned();
    let last_transition_time = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(now_rfc3339);
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

async fn write_status(
    api: &Api<StreamPipeline>,
    sp: &StreamPipeline,
    status: StreamPipelineStatus,
) -> Result<()> {
    if sp.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": "streampipe.dev/v1alpha1",
        "kind": "StreamPipeline",
        "status": status,
    });
    api.patch_status(
        &sp.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Reconciles one `StreamPipeline`.
pub async fn reconcile(sp: Arc<StreamPipeline>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let res = reconcile_inner(&sp, &ctx).await;
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    let key = format!("{}/{}", sp.namespace().unwrap_or_default(), sp.name_any());
    match &res {
        Ok(_) => {
            ctx.failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        }
        Err(e) => {
            ctx.metrics.reconciles.with_label_values(&["error"]).inc();
            ctx.metrics
                .failures
                .with_label_values(&[e.metric_label()])
                .inc();
            ctx.event(
                &sp,
                EventType::Warning,
                "ReconcileFailed",
                "Reconcile",
                e.to_string(),
            )
            .await;
            // Best effort: say so in the status too.
            let api: Api<StreamPipeline> =
                Api::namespaced(ctx.client.clone(), &sp.namespace().unwrap_or_default());
            let mut status = sp.status.clone().unwrap_or_default();
            let prev = status.conditions.clone();
            let g = sp.metadata.generation;
            status.conditions.retain(|c| c.type_ != "Degraded");
            status.conditions.push(condition(
                &prev,
                "Degraded",
                true,
                "ReconcileFailed",
                e.to_string(),
                g,
            ));
            let _ = write_status(&api, &sp, status).await;
        }
    }
    res
}

/// The lag reader's TLS and SASL, read from the pipeline's Secrets/ConfigMaps.
async fn kafka_security(sp: &StreamPipeline, ctx: &Context) -> Result<KafkaSecurity, String> {
    let ns = sp.namespace().ok_or("resource has no namespace")?;
    crate::lag::kafka_security(&ctx.client, &ns, &sp.spec.kafka).await
}

fn policy_of(a: &AutoscalingSpec) -> Policy {
    Policy {
        min_replicas: a.min_replicas,
        max_replicas: a.max_replicas,
        lag_threshold: a.lag_threshold,
        activation_lag_threshold: a.activation_lag_threshold,
        scale_up_window: Duration::from_secs(a.scale_up_stabilization_seconds.into()),
        scale_down_window: Duration::from_secs(a.scale_down_stabilization_seconds.into()),
        even_spread: a.even_partition_spread,
    }
}

/// Polls Kafka when due, decides, and writes the reducer replicas through
/// the scale subresource (as an HPA would). Returns the effective replicas.
async fn autoscale(
    sp: &StreamPipeline,
    a: &AutoscalingSpec,
    ctx: &Context,
) -> Result<(i32, Scaling)> {
    let ns = sp.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = sp.name_any();
    let key = format!("{ns}/{name}");
    let current = sp.spec.reducer.replicas;
    let interval = Duration::from_secs(a.poll_interval_seconds.max(1).into());
    let mut all = ctx.autoscalers.lock().await;
    let state = all.entry(key).or_default();
    // Unreachable Kafka is retried with backoff: interval × 2^failures, ≤ 60 s.
    let wait = if state.kafka_failures == 0 {
        interval
    } else {
        (interval * 2u32.saturating_pow(state.kafka_failures.min(10)))
            .min(KAFKA_BACKOFF_MAX.max(interval))
    };
    let due = state
        .last_poll
        .is_none_or(|t| t.elapsed() + Duration::from_millis(200) >= wait);
    if !due {
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
    let group = builders::config_data(sp)["STREAMPIPE_GROUP"].clone();
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
    let decision = state
        .scaler
        .decide(&policy_of(a), Instant::now(), current, &obs);
    let labels = [ns.as_str(), name.as_str()];
    if let Ok(r) = &report {
        ctx.metrics.lag.with_label_values(&labels).set(r.total);
    }
    ctx.metrics
        .desired_replicas
        .with_label_values(&labels)
        .set(i64::from(decision.replicas));
    let mut effective = current;
    if decision.replicas != current {
        if let Some(w) = state.last_written.filter(|w| *w != current) {
            ctx.event(sp, EventType::Normal, "ManualScaleOverridden", "Autoscale", format!(
                "reducers were set to {current} by hand (autoscaler had {w}); autoscaling is on and sets {}", decision.replicas)).await;
        }
        let api: Api<StreamPipeline> = Api::namespaced(ctx.client.clone(), &ns);
        // A merge patch: server-side apply on /scale crashes Kubernetes 1.20.
        api.patch_scale(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": decision.replicas}})),
        )
        .await?;
        let inputs = match &report {
            Ok(r) => format!(
                "total lag {}, max partition lag {}, {} partitions",
                r.total, r.max, r.partitions
            ),
            Err(e) => e.clone(),
        };
        ctx.event(
            sp,
            EventType::Normal,
            "Autoscaled",
            "Autoscale",
            format!(
                "reducers {current} → {}: {} ({inputs})",
                decision.replicas, decision.reason
            ),
        )
        .await;
        state.last_written = Some(decision.replicas);
        state.last_scale_time = Some(now_rfc3339());
        effective = decision.replicas;
    } else if state.last_written.is_none() {
        state.last_written = Some(current);
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

fn scaling_conditions(prev: &[Condition], s: &Scaling, generation: Option<i64>) -> Vec<Condition> {
    let d = &s.decision;
    let active = d.limit != Limit::KafkaUnavailable;
    let (limited, reason) = match d.limit {
        Limit::None => (false, "WithinRange"),
        Limit::Partitions(_) => (true, "CappedAtPartitions"),
        Limit::Max(_) => (true, "CappedAtMaxReplicas"),
        Limit::Min(_) => (true, "RaisedToMinReplicas"),
        Limit::BelowActivation => (true, "BelowActivationThreshold"),
        Limit::KafkaUnavailable => (true, "KafkaUnavailable"),
        Limit::Stabilizing => (true, "Stabilizing"),
    };
    vec![
        condition(
            prev,
            "ScalingActive",
            active,
            if active {
                "LagRead"
            } else {
                "KafkaUnavailable"
            },
            d.reason.clone(),
            generation,
        ),
        condition(
            prev,
            "ScalingLimited",
            limited,
            reason,
            d.reason.clone(),
            generation,
        ),
    ]
}

async fn reconcile_inner(sp: &StreamPipeline, ctx: &Context) -> Result<Action> {
    let ns = sp.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = sp.name_any();
    let generation = sp.metadata.generation;
    let api: Api<StreamPipeline> = Api::namespaced(ctx.client.clone(), &ns);
    let prev = sp.status.clone().unwrap_or_default();

    let problems = validate(&sp.spec);
    if !problems.is_empty() {
        let message = problems
            .iter()
            .map(|p| format!("{}: {}", p.field, p.message))
            .collect::<Vec<_>>()
            .join("; ");
        let mut status = prev.clone();
        status.observed_generation = generation;
        status.ready = Some("False".into());
        let already = prev.conditions.iter().any(|c| {
            c.type_ == "Degraded"
                && c.reason == "InvalidSpec"
                && c.message == message
                && c.observed_generation == generation
        });
        status.conditions = vec![
            condition(
                &prev.conditions,
                "Ready",
                false,
                "InvalidSpec",
                "the spec is invalid; see Degraded".into(),
                generation,
            ),
            condition(
                &prev.conditions,
                "Progressing",
                false,
                "InvalidSpec",
                "nothing is rolled out while the spec is invalid".into(),
                generation,
            ),
            condition(
                &prev.conditions,
                "Degraded",
                true,
                "InvalidSpec",
                message.clone(),
                generation,
            ),
        ];
        if !already {
            for p in &problems {
                ctx.event(
                    sp,
                    EventType::Warning,
                    "InvalidSpec",
                    "Validate",
                    format!("{}: {}", p.field, p.message),
                )
                .await;
            }
        }
        write_status(&api, sp, status).await?;
        ctx.metrics.reconciles.with_label_values(&["invalid"]).inc();
        info!(%name, %message, "invalid spec; children left as they are");
        return Ok(Action::await_change());
    }

    // Autoscaling first: the Deployment below gets the replicas it decided.
    let mut scaling = None;
    let mut effective;
    let sp = match sp.spec.autoscaling.as_ref().filter(|a| a.enabled) {
        Some(a) => {
            let (replicas, s) = autoscale(sp, a, ctx).await?;
            scaling = Some(s);
            effective = sp.clone();
            effective.spec.reducer.replicas = replicas;
            &effective
        }
        None => sp,
    };

    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let deps: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let svcs: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);

    // (how, kind, apiVersion, name)
    let mut changes: Vec<(Applied, &str, &str, String)> = Vec::new();
    let (a, _, _) = apply_if_changed(&cms, &builders::config_map(sp)).await?;
    changes.push((a, "ConfigMap", "v1", builders::config_name(sp)));
    let (a, before, reducer) = apply_if_changed(&deps, &builders::reducer_deployment(sp)).await?;
    let old_reducers = before.and_then(|d| d.spec.replicas);
    changes.push((
        a,
        "Deployment",
        "apps/v1",
        builders::child_name(sp, Role::Reducer),
    ));
    let (a, _, publisher) = apply_if_changed(&deps, &builders::publisher_deployment(sp)).await?;
    changes.push((
        a,
        "Deployment",
        "apps/v1",
        builders::child_name(sp, Role::Publisher),
    ));
    let (a, _, _) = apply_if_changed(&svcs, &builders::publisher_service(sp)).await?;
    changes.push((
        a,
        "Service",
        "v1",
        builders::child_name(sp, Role::Publisher),
    ));
    if ctx.features.pdb {
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);
        let (a, _, _) = apply_if_changed(&pdbs, &builders::publisher_pdb(sp)).await?;
        changes.push((
            a,
            "PodDisruptionBudget",
            "policy/v1",
            builders::child_name(sp, Role::Publisher),
        ));
    }
    for (applied, kind, api_version, child) in &changes {
        let (reason, action) = match applied {
            Applied::Unchanged => continue,
            Applied::Created => ("Created", "created"),
            Applied::Updated => ("Updated", "updated"),
        };
        ctx.metrics.writes.with_label_values(&[kind, action]).inc();
        let child_ref = ObjectReference {
            api_version: Some((*api_version).into()),
            kind: Some((*kind).into()),
            name: Some(child.clone()),
            namespace: Some(ns.clone()),
            ..Default::default()
        };
        ctx.event_about(
            sp,
            EventType::Normal,
            reason,
            "Apply",
            format!("{kind} {child} {action}"),
            Some(child_ref),
        )
        .await;
    }
    let want = sp.spec.reducer.replicas;
    if let Some(old) = old_reducers.filter(|o| *o != want) {
        ctx.event(
            sp,
            EventType::Normal,
            "Scaled",
            "Scale",
            format!("reducers {old} → {want}"),
        )
        .await;
    }

    // Status from what was observed.
    let r = role_status(want, &reducer);
    let p = role_status(sp.spec.publisher.role.replicas, &publisher);
    let ready = r.ready_replicas >= r.replicas && p.ready_replicas >= p.replicas;
    let progressing = rolling(&reducer) || rolling(&publisher);
    let mut status = StreamPipelineStatus {
        observed_generation: generation,
        ready: Some(if ready { "True" } else { "False" }.into()),
        selector: Some(builders::reducer_selector(sp)),
        partitions: None,
        total_lag: None,
        max_partition_lag: None,
        desired_replicas: None,
        last_scale_time: None,
        conditions: Vec::new(),
        reducer: r.clone(),
        publisher: p.clone(),
    };
    if let Some(s) = &scaling {
        if let Some(rep) = &s.report {
            status.partitions = Some(rep.partitions);
            status.total_lag = Some(rep.total);
            status.max_partition_lag = Some(rep.max);
        } else {
            status.partitions = prev.partitions;
            status.total_lag = prev.total_lag;
            status.max_partition_lag = prev.max_partition_lag;
        }
        status.desired_replicas = Some(s.decision.replicas);
        status.last_scale_time = s.last_scale_time.clone().or(prev.last_scale_time.clone());
    }
    let summary = format!("reducers {}, publishers {} ready", r.summary, p.summary);
    status.conditions = vec![
        condition(
            &prev.conditions,
            "Ready",
            ready,
            if ready {
                "AllReplicasReady"
            } else {
                "ReplicasNotReady"
            },
            summary.clone(),
            generation,
        ),
        condition(
            &prev.conditions,
            "Progressing",
            progressing,
            if progressing {
                "RollingOut"
            } else {
                "RolledOut"
            },
            summary,
            generation,
        ),
        condition(
            &prev.conditions,
            "Degraded",
            false,
            "AsExpected",
            "children applied".into(),
            generation,
        ),
    ];
    if let Some(s) = &scaling {
        status
            .conditions
            .extend(scaling_conditions(&prev.conditions, s, generation));
    }
    write_status(&api, sp, status).await?;
    ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
    match sp.spec.autoscaling.as_ref().filter(|a| a.enabled) {
        Some(a) => Ok(Action::requeue(Duration::from_secs(
            a.poll_interval_seconds.max(1).into(),
        ))),
        None => Ok(Action::requeue(RESYNC)),
    }
}

/// Requeues a failed object with exponential backoff (1 s doubling to 5 min).
pub fn error_policy(sp: Arc<StreamPipeline>, err: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", sp.namespace().unwrap_or_default(), sp.name_any());
    let n = {
        let mut f = ctx.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(key.clone()).or_insert(0);
        *n += 1;
        *n
    };
    let delay = (BACKOFF_MIN * 2u32.saturating_pow(n.saturating_sub(1).min(16))).min(BACKOFF_MAX);
    warn!(%key, error = %err, attempt = n, ?delay, "reconcile failed; backing off");
    Action::requeue(delay)
}

/// Checks what the API server serves.
pub async fn detect_features(client: &Client) -> Features {
    Features {
        pdb: client.list_api_group_resources("policy/v1").await.is_ok(),
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (pipelines, deps, cms, svcs): (
        Api<StreamPipeline>,
        Api<Deployment>,
        Api<ConfigMap>,
        Api<Service>,
    ) = match &namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let owned =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=streampipe-operator");
    Controller::new(pipelines, watcher::Config::default())
        .owns(deps, owned.clone())
        .owns(cms, owned.clone())
        .owns(svcs, owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(error = %e, "controller event");
            }
        })
        .await;
}
