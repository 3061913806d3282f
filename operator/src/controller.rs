//! The reconciler: one `reconcile(Arc<StreamPipeline>, Arc<Context>)`, in
//! the shape of kube-rs' controller-rs, and the controller loop around it.
//!
//! A pass runs three named phases — **validate** ([`crate::validate`]),
//! **apply children** ([`crate::apply`], after the autoscaler in
//! [`crate::scaling`] picked the reducer replicas), **observe status**
//! ([`crate::status`]) — and every way out of it, a failure included, ends
//! in a status write (only when the status changed) and Events for what the
//! user should see (de-duplicated by [`crate::events`]). A pass on an
//! unchanged pipeline makes no write at all.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tracing::{info, warn};

use crate::apply::{apply_children, Applied, Report};
use crate::builders::{self, Role, FIELD_MANAGER};
use crate::context::{ChildStores, Context, Features};
use crate::crd::{Invalid, StreamPipeline, StreamPipelineStatus};
use crate::error::{Error, Result};
use crate::plan::Scaling;
use crate::scaling::autoscale;
use crate::scope::WatchScope;
use crate::sharing::{self, Sharing};
use crate::status::{self, Pass, Problem, Rollout};
use crate::validate::validate;

/// Periodic resync: status follows the Deployments even without events.
pub const RESYNC: Duration = Duration::from_secs(300);

/// Re-check of a pipeline whose child name is taken by a foreign object
/// (which is not watched, so its removal does not trigger a pass).
pub const CONFLICT_RECHECK: Duration = Duration::from_secs(30);

/// Backoff after failed reconciles: first and largest delay.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// See [`BACKOFF_MIN`].
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The label every child carries; the children watches select on it.
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The label naming the pipeline of a child.
const INSTANCE: &str = "app.kubernetes.io/instance";

fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

fn key(sp: &StreamPipeline) -> String {
    format!("{}/{}", sp.namespace().unwrap_or_default(), sp.name_any())
}

fn autoscaling_on(sp: &StreamPipeline) -> bool {
    sp.spec.autoscaling.as_ref().is_some_and(|a| a.enabled)
}

async fn write_status(
    ctx: &Context,
    sp: &StreamPipeline,
    status: StreamPipelineStatus,
) -> Result<()> {
    if sp.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let ns = sp.namespace().ok_or(Error::MissingField("namespace"))?;
    let api: Api<StreamPipeline> = Api::namespaced(ctx.client.clone(), &ns);
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

/// A pass that did not look at the Deployments: their counts as last seen.
fn unobserved_pass(sp: &StreamPipeline, problem: Problem, sharing: Sharing) -> Pass<'static> {
    let prev = sp.status.clone().unwrap_or_default();
    Pass {
        generation: sp.metadata.generation,
        selector: builders::reducer_selector(sp),
        reducer: Rollout::from_previous(
            &builders::child_name(sp, Role::Reducer),
            sp.spec.reducer.replicas,
            &prev.reducer,
        ),
        publisher: Rollout::from_previous(
            &builders::child_name(sp, Role::Publisher),
            sp.spec.publisher.role.replicas,
            &prev.publisher,
        ),
        problem: Some(problem),
        autoscaling: autoscaling_on(sp),
        sharing,
        now: now_rfc3339(),
        ..Default::default()
    }
}

/// Reconciles one `StreamPipeline`.
pub async fn reconcile(sp: Arc<StreamPipeline>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let res = reconcile_inner(&sp, &ctx).await;
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    match &res {
        Ok(_) => {
            ctx.failures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key(&sp));
        }
        Err(e) => {
            ctx.metrics.reconciles.with_label_values(&["error"]).inc();
            ctx.metrics
                .failures
                .with_label_values(&[e.metric_label()])
                .inc();
            let message = e.to_string();
            ctx.event(
                &sp,
                EventType::Warning,
                "ReconcileFailed",
                "Reconcile",
                message.clone(),
            )
            .await;
            // The failure shows in the status too, first pass included.
            let problem = Problem {
                reason: e.condition_reason(),
                message: crate::events::truncate(&message, crate::events::NOTE_MAX),
            };
            let prev = sp.status.clone().unwrap_or_default();
            let status = status::status(&prev, &unobserved_pass(&sp, problem, Sharing::Unchecked));
            if let Err(w) = write_status(&ctx, &sp, status).await {
                warn!(pipeline = %key(&sp), error = %w, "could not write the failure status");
            }
        }
    }
    res
}

/// Phase 1: what the schema could not check. `Some` ends the pass.
async fn validate_phase(
    sp: &StreamPipeline,
    ctx: &Context,
    sharing: &Sharing,
) -> Result<Option<Action>> {
    if let Sharing::Shared(note) = sharing {
        // A warning only: the pass goes on (the recorder folds repeats).
        ctx.event(
            sp,
            EventType::Warning,
            status::SHARED_CONSUMER_GROUP,
            "Validate",
            note.clone(),
        )
        .await;
    }
    let problems: Vec<Invalid> = validate(sp);
    if problems.is_empty() {
        return Ok(None);
    }
    let message = problems
        .iter()
        .map(|p| format!("{}: {}", p.field, p.message))
        .collect::<Vec<_>>()
        .join("; ");
    // One Event per problem; the recorder folds repeats into a series.
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
    let problem = Problem {
        reason: "InvalidSpec",
        message: crate::events::truncate(&message, crate::events::NOTE_MAX),
    };
    let prev = sp.status.clone().unwrap_or_default();
    write_status(
        ctx,
        sp,
        status::status(&prev, &unobserved_pass(sp, problem, sharing.clone())),
    )
    .await?;
    ctx.metrics.reconciles.with_label_values(&["invalid"]).inc();
    info!(pipeline = %key(sp), %message, "invalid spec; children left as they are");
    Ok(Some(Action::await_change()))
}

/// Phase 2: Events for what the apply phase did.
async fn report_changes(sp: &StreamPipeline, ctx: &Context, report: &Report) {
    let ns = sp.namespace().unwrap_or_default();
    for c in &report.changes {
        let (reason, action) = match c.applied {
            Applied::Unchanged => continue,
            Applied::Created => ("Created", "created"),
            Applied::Updated => ("Updated", "updated"),
        };
        ctx.metrics
            .writes
            .with_label_values(&[c.kind, action])
            .inc();
        let note = format!("{} {} {action}", c.kind, c.name);
        ctx.event_about(
            sp,
            EventType::Normal,
            reason,
            "Apply",
            note,
            Some(c.object_ref(&ns)),
        )
        .await;
    }
    for c in &report.conflicts {
        let related = Some(c.object_ref(&ns));
        ctx.event_about(
            sp,
            EventType::Warning,
            "Conflict",
            "Apply",
            c.message(),
            related,
        )
        .await;
    }
    let want = sp.spec.reducer.replicas;
    if let Some(old) = report.old_reducers.filter(|o| *o != want) {
        ctx.event(
            sp,
            EventType::Normal,
            "Scaled",
            "Scale",
            format!("reducers {old} → {want}"),
        )
        .await;
    }
}

/// Phase 3: the status from what was observed.
fn observe(
    sp: &StreamPipeline,
    report: &Report,
    scaling: Option<&Scaling>,
    sharing: Sharing,
) -> StreamPipelineStatus {
    let prev = sp.status.clone().unwrap_or_default();
    let pass = Pass {
        generation: sp.metadata.generation,
        selector: builders::reducer_selector(sp),
        reducer: Rollout::of(
            &builders::child_name(sp, Role::Reducer),
            sp.spec.reducer.replicas,
            report.reducer.as_ref(),
        ),
        publisher: Rollout::of(
            &builders::child_name(sp, Role::Publisher),
            sp.spec.publisher.role.replicas,
            report.publisher.as_ref(),
        ),
        problem: None,
        conflicts: report.conflicts.iter().map(|c| c.message()).collect(),
        scaling,
        autoscaling: autoscaling_on(sp),
        sharing,
        now: now_rfc3339(),
    };
    status::status(&prev, &pass)
}

async fn reconcile_inner(sp: &StreamPipeline, ctx: &Context) -> Result<Action> {
    let sharing = sharing::check(sp, ctx).await;
    if let Some(done) = validate_phase(sp, ctx, &sharing).await? {
        return Ok(done);
    }

    // The autoscaler first: the reducer Deployment gets the replicas it decided.
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

    let report = apply_children(sp, ctx).await?;
    report_changes(sp, ctx, &report).await;

    let status = observe(sp, &report, scaling.as_ref(), sharing);
    // A stalled rollout is news worth an Event too (repeats fold into one).
    if let Some(c) = status
        .conditions
        .iter()
        .find(|c| c.type_ == status::DEGRADED && c.reason == status::PROGRESS_DEADLINE_EXCEEDED)
    {
        let note = c.message.clone();
        ctx.event(
            sp,
            EventType::Warning,
            status::PROGRESS_DEADLINE_EXCEEDED,
            "Observe",
            note,
        )
        .await;
    }
    write_status(ctx, sp, status).await?;
    ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
    let next = match sp.spec.autoscaling.as_ref().filter(|a| a.enabled) {
        Some(a) => crate::plan::interval(a),
        None => RESYNC,
    };
    Ok(Action::requeue(if report.conflicts.is_empty() {
        next
    } else {
        next.min(CONFLICT_RECHECK)
    }))
}

/// Requeues a failed object with exponential backoff (1 s doubling to 5 min).
pub fn error_policy(sp: Arc<StreamPipeline>, err: &Error, ctx: Arc<Context>) -> Action {
    let key = key(&sp);
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

/// The pipelines a child belongs to: its controller owner reference, and
/// its instance label — so a child whose owner reference was removed still
/// triggers its pipeline's reconcile (which restores the reference).
fn pipelines_of<K: Resource>(child: &K) -> Vec<ObjectRef<StreamPipeline>> {
    let Some(ns) = child.meta().namespace.as_deref() else {
        return Vec::new();
    };
    let mut out: Vec<ObjectRef<StreamPipeline>> = child
        .meta()
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.controller == Some(true) && o.kind == "StreamPipeline")
        .map(|o| ObjectRef::new(&o.name).within(ns))
        .collect();
    if let Some(name) = child.meta().labels.as_ref().and_then(|l| l.get(INSTANCE)) {
        let r = ObjectRef::new(name).within(ns);
        if !out.contains(&r) {
            out.push(r);
        }
    }
    out
}

fn api<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A cached watch of our children of kind `K`: the store, and the stream
/// that keeps it current and triggers their pipelines.
fn children<K>(
    client: &Client,
    namespace: &Option<String>,
) -> (
    reflector::Store<K>,
    impl futures_util::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let cfg = watcher::Config::default().labels(&format!("{MANAGED_BY}={FIELD_MANAGER}"));
    let stream = reflector::reflector(writer, watcher(api::<K>(client, namespace), cfg))
        .default_backoff()
        .touched_objects();
    (store, stream)
}

/// One namespace's (or, with `None`, every namespace's) controller: the
/// pipelines watch and the cached watches of their children.
fn controller_for(
    ctx: &Context,
    namespace: &Option<String>,
) -> (Controller<StreamPipeline>, ChildStores) {
    let client = ctx.client.clone();
    let pipelines: Api<StreamPipeline> = api(&client, namespace);
    let (deployments, dep_stream) = children::<Deployment>(&client, namespace);
    let (config_maps, cm_stream) = children::<ConfigMap>(&client, namespace);
    let (services, svc_stream) = children::<Service>(&client, namespace);
    let (network_policies, np_stream) = children::<NetworkPolicy>(&client, namespace);
    let mut controller = Controller::new(pipelines, watcher::Config::default())
        .watches_stream(dep_stream, |d| pipelines_of(&d))
        .watches_stream(cm_stream, |c| pipelines_of(&c))
        .watches_stream(svc_stream, |s| pipelines_of(&s))
        .watches_stream(np_stream, |n| pipelines_of(&n));
    let mut pdbs = None;
    if ctx.features.pdb {
        let (store, stream) = children::<PodDisruptionBudget>(&client, namespace);
        controller = controller.watches_stream(stream, |p| pipelines_of(&p));
        pdbs = Some(store);
    }
    let stores = ChildStores {
        deployments,
        config_maps,
        services,
        network_policies,
        pdbs,
    };
    (controller, stores)
}

/// Runs the controllers of `scope` until `shutdown` resolves.
///
/// A namespace-scoped install runs one controller per watched namespace,
/// each with namespaced watches only (so a RoleBinding per namespace is all
/// the rights it needs); all of them share the one `reconcile` and the
/// context. A namespace whose rights are missing only stalls its own
/// controller (its watches retry with backoff); the others carry on.
pub async fn run(
    ctx: Arc<Context>,
    scope: WatchScope,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use futures_util::FutureExt as _;
    let shutdown = (Box::pin(shutdown)
        as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>)
        .shared();
    let mut runs = Vec::new();
    let mut pipeline_stores = Vec::new();
    for namespace in scope.watches() {
        let (controller, stores) = controller_for(&ctx, &namespace);
        pipeline_stores.push((namespace.clone(), controller.store()));
        ctx.set_stores(namespace.clone(), Some(stores));
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let (listed, stopped) = (controller.store(), shutdown.clone());
        let pipelines = controller.store();
        // A controller whose pipelines were never listed (its namespace's
        // RoleBinding is missing) has nothing in flight, but its graceful
        // shutdown would wait for that first list forever: it is dropped.
        let abandoned = async move {
            stopped.await;
            if matches!(listed.wait_until_ready().now_or_never(), Some(Ok(()))) {
                std::future::pending::<()>().await;
            }
        };
        runs.push(async move {
            let run = controller
                .graceful_shutdown_on(shutdown)
                .run(reconcile, error_policy, ctx.clone())
                .for_each(|res| {
                    let namespace = namespace.clone();
                    async move {
                        if let Err(e) = res {
                            warn!(namespace = namespace.as_deref().unwrap_or("*"), error = %e, "controller event");
                        }
                    }
                });
            // Once listed, consumer groups are compared on this cache.
            let cache = async {
                if pipelines.wait_until_ready().await.is_ok() {
                    ctx.set_pipelines(namespace.clone(), Some(pipelines));
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                _ = run => {}
                _ = abandoned => {}
                _ = cache => {}
            }
            // A later leadership term starts with fresh caches.
            ctx.set_stores(namespace, None);
        });
    }
    info!(%scope, "watching");
    let pruner = tokio::spawn(prune_forgotten(ctx.clone(), pipeline_stores));
    futures_util::future::join_all(runs).await;
    pruner.abort();
}

/// How often per-pipeline memory of deleted pipelines is dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Drops what the operator remembers per pipeline (autoscaler state,
/// failure count, metric series) once the pipeline is gone: a deleted
/// pipeline gets no last reconcile to clean up after itself.
async fn prune_forgotten(
    ctx: Arc<Context>,
    pipelines: Vec<(Option<String>, reflector::Store<StreamPipeline>)>,
) {
    use futures_util::FutureExt as _;
    loop {
        tokio::time::sleep(PRUNE_EVERY).await;
        // Before a namespace's first list an empty store would mean "all
        // deleted" (its rights may be missing): its entries are kept.
        let mut live = std::collections::HashSet::new();
        let mut unlisted = Vec::new();
        for (namespace, store) in &pipelines {
            if matches!(store.wait_until_ready().now_or_never(), Some(Ok(()))) {
                live.extend(store.state().iter().map(|sp| key(sp)));
            } else {
                unlisted.push(namespace.clone());
            }
        }
        let keep = |k: &str| kept(k, &live, &unlisted);
        for (gone, state) in ctx.scalers.retain(|k| keep(k)) {
            if let Some((ns, name)) = gone.split_once('/') {
                let _ = ctx.metrics.lag.remove_label_values(&[ns, name]);
                let _ = ctx
                    .metrics
                    .desired_replicas
                    .remove_label_values(&[ns, name]);
                for p in state.stuck_reported {
                    let _ = ctx.metrics.stuck_partition_lag.remove_label_values(&[
                        ns,
                        name,
                        &p.to_string(),
                    ]);
                }
            }
        }
        ctx.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| keep(k));
    }
}

/// Whether the memory of pipeline `key` (`namespace/name`) is kept: it is
/// live, or its namespace (`None`: every namespace) was not listed yet.
fn kept(key: &str, live: &std::collections::HashSet<String>, unlisted: &[Option<String>]) -> bool {
    live.contains(key)
        || unlisted.iter().any(|ns| match ns {
            None => true,
            Some(ns) => key.split_once('/').is_some_and(|(n, _)| n == ns),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    #[test]
    fn memory_of_pipelines_is_kept_while_their_namespace_is_unlisted() {
        let live: std::collections::HashSet<String> = ["a/live".to_owned()].into();
        assert!(kept("a/live", &live, &[]));
        assert!(!kept("a/gone", &live, &[]));
        assert!(kept("b/x", &live, &[Some("b".into())]), "b not listed yet");
        assert!(!kept("bb/x", &live, &[Some("b".into())]));
        assert!(
            kept("a/gone", &live, &[None]),
            "cluster-wide not listed yet"
        );
    }

    #[test]
    fn children_map_to_their_pipeline_by_owner_and_by_label() {
        let mut cm = ConfigMap::default();
        cm.metadata.namespace = Some("prod".into());
        assert!(pipelines_of(&cm).is_empty());
        cm.metadata.labels = Some([(INSTANCE.to_owned(), "odds".to_owned())].into());
        assert_eq!(
            pipelines_of(&cm),
            vec![ObjectRef::new("odds").within("prod")]
        );
        cm.metadata.owner_references = Some(vec![OwnerReference {
            kind: "StreamPipeline".into(),
            name: "odds".into(),
            controller: Some(true),
            ..Default::default()
        }]);
        assert_eq!(pipelines_of(&cm).len(), 1, "the same pipeline once");
        cm.metadata.labels = Some([(INSTANCE.to_owned(), "other".to_owned())].into());
        assert_eq!(pipelines_of(&cm).len(), 2, "both are told");
    }
}
