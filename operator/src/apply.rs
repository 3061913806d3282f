//! The apply phase: bring each child to what [`crate::builders`] describes,
//! with server-side apply under one field manager, writing only on real
//! drift and never touching an object this pipeline does not control.
//!
//! Per child: read the live object from the controller's cache (a GET only
//! when the cache does not have it, e.g. the name is taken by an unlabelled
//! object of someone else, or in tests); if it exists and is not ours
//! ([`crate::ownership`]) leave it alone and report a conflict; if it is in
//! sync ([`crate::drift`]) do nothing; otherwise apply with `force` (we own
//! exactly what we send). A Service whose port was edited first gets its
//! port list replaced whole (a merge patch), since an apply would keep the
//! edited port next to ours and fail on the duplicate name. An apply that changed nothing
//! (same `resourceVersion`) does not count as an update.
//!
//! The Deployments read their settings from the ConfigMap, so while the
//! ConfigMap's name is taken by a foreign object they are not applied
//! either: pods must not start on someone else's configuration.

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use tracing::debug;

use crate::builders::{self, Role, FIELD_MANAGER};
use crate::context::{Context, Written};
use crate::crd::StreamPipeline;
use crate::drift;
use crate::error::{Error, Result};
use crate::ownership::{classify, Owner};
use crate::quantity;

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

/// One child's outcome.
#[derive(Debug, Clone)]
pub struct Change {
    /// How.
    pub applied: Applied,
    /// `ConfigMap`, `Deployment`, ...
    pub kind: &'static str,
    /// Its `apiVersion`.
    pub api_version: &'static str,
    /// Its name.
    pub name: String,
}

/// A reference to a child object in `ns`, for Events.
fn child_ref(api_version: &str, kind: &str, name: &str, ns: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some(api_version.into()),
        kind: Some(kind.into()),
        name: Some(name.into()),
        namespace: Some(ns.into()),
        ..Default::default()
    }
}

impl Change {
    /// A reference to the child, for Events.
    pub fn object_ref(&self, ns: &str) -> ObjectReference {
        child_ref(self.api_version, self.kind, &self.name, ns)
    }
}

/// A child left alone because someone else controls its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Kind.
    pub kind: &'static str,
    /// `apiVersion`.
    pub api_version: &'static str,
    /// Name.
    pub name: String,
    /// Whose it is, for people.
    pub why: String,
}

impl Conflict {
    /// A reference to the object, for Events.
    pub fn object_ref(&self, ns: &str) -> ObjectReference {
        child_ref(self.api_version, self.kind, &self.name, ns)
    }

    /// For the condition and the Event.
    pub fn message(&self) -> String {
        format!(
            "{} {} exists and is not controlled by this pipeline ({}); it is left alone — rename or delete it",
            self.kind, self.name, self.why
        )
    }
}

/// What the apply phase did and saw.
#[derive(Debug, Default)]
pub struct Report {
    /// Children applied (or found in sync).
    pub changes: Vec<Change>,
    /// Children left alone.
    pub conflicts: Vec<Conflict>,
    /// The reducer Deployment as live after the phase.
    pub reducer: Option<Deployment>,
    /// The publisher Deployment as live after the phase.
    pub publisher: Option<Deployment>,
    /// Reducer replicas before the phase (to report a scale).
    pub old_reducers: Option<i32>,
}

enum Outcome<K> {
    Done {
        applied: Applied,
        before: Option<K>,
        after: K,
    },
    Conflict(String),
}

fn written_key(kind: &str, ns: &str, name: &str) -> String {
    format!("{kind}/{ns}/{name}")
}

/// The live child: from the cache (or our own newer write), else a GET.
async fn live<K>(
    api: &Api<K>,
    store: Option<&Store<K>>,
    written: &Written,
    kind: &str,
    ns: &str,
    name: &str,
) -> Result<Option<K>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    if let Some(obj) = store.and_then(|s| s.get(&ObjectRef::new(name).within(ns))) {
        let key = written_key(kind, ns, name);
        if let Some(newer) = written.newer_than(&key, obj.resource_version().as_deref()) {
            return Ok(Some(serde_json::from_value(newer)?));
        }
        return Ok(Some((*obj).clone()));
    }
    Ok(api.get_opt(name).await?)
}

async fn apply_child<K>(
    api: &Api<K>,
    store: Option<&Store<K>>,
    written: &Written,
    sp: &StreamPipeline,
    kind: &'static str,
    mut desired: Value,
) -> Result<Outcome<K>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
{
    quantity::normalise_resources(&mut desired);
    let ns = sp.namespace().ok_or(Error::MissingField("namespace"))?;
    let uid = sp.uid().ok_or(Error::MissingField("uid"))?;
    let name = desired["metadata"]["name"]
        .as_str()
        .ok_or(Error::MissingField("child name"))?
        .to_owned();
    let before = live(api, store, written, kind, &ns, &name).await?;
    let wrap = |source| Error::Apply {
        kind,
        name: name.clone(),
        source,
    };
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    if let Some(b) = &before {
        if let Owner::Foreign(why) = classify(b.meta(), &sp.name_any(), &uid) {
            return Ok(Outcome::Conflict(why));
        }
        let live_json = serde_json::to_value(b)?;
        if drift::in_sync(&desired, &live_json, FIELD_MANAGER) {
            return Ok(Outcome::Done {
                applied: Applied::Unchanged,
                before: before.clone(),
                after: b.clone(),
            });
        }
        if let Some(mut repair) = drift::whole_list_repair(kind, &desired, &live_json) {
            // Guarded by the resourceVersion we judged: a concurrent edit fails it (409, retried).
            repair["metadata"] = json!({"resourceVersion": b.resource_version()});
            let mp = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            api.patch(&name, &mp, &Patch::Merge(&repair))
                .await
                .map_err(wrap)?;
        }
    }
    debug!(kind, %name, exists = before.is_some(), "applying");
    let after = api
        .patch(&name, &pp, &Patch::Apply(&desired))
        .await
        .map_err(wrap)?;
    if store.is_some() {
        written.record(
            written_key(kind, &ns, &name),
            before.as_ref().and_then(|b| b.resource_version()),
            serde_json::to_value(&after)?,
        );
    }
    let applied = match &before {
        None => Applied::Created,
        Some(b) if b.resource_version() == after.resource_version() => Applied::Unchanged,
        Some(_) => Applied::Updated,
    };
    Ok(Outcome::Done {
        applied,
        before,
        after,
    })
}

/// One apply phase: what every child's apply needs, and the report.
struct Phase<'a> {
    sp: &'a StreamPipeline,
    written: &'a Written,
    report: Report,
}

impl Phase<'_> {
    /// Applies one child and records the outcome; the live object before
    /// and after when it was applied (or found in sync).
    async fn one<K>(
        &mut self,
        api: &Api<K>,
        store: Option<&Store<K>>,
        kind: &'static str,
        api_version: &'static str,
        desired: Value,
    ) -> Result<Option<(Option<K>, K)>>
    where
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
    {
        let name = desired["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        Ok(
            match apply_child(api, store, self.written, self.sp, kind, desired).await? {
                Outcome::Done {
                    applied,
                    before,
                    after,
                } => {
                    self.report.changes.push(Change {
                        applied,
                        kind,
                        api_version,
                        name,
                    });
                    Some((before, after))
                }
                Outcome::Conflict(why) => {
                    self.report.conflicts.push(Conflict {
                        kind,
                        api_version,
                        name,
                        why,
                    });
                    None
                }
            },
        )
    }
}

/// Applies every child of `sp`.
pub async fn apply_children(sp: &StreamPipeline, ctx: &Context) -> Result<Report> {
    let ns = sp.namespace().ok_or(Error::MissingField("namespace"))?;
    let stores = ctx.stores(&ns);
    let client = &ctx.client;
    let mut phase = Phase {
        sp,
        written: &ctx.written,
        report: Report::default(),
    };

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let store = stores.as_ref().map(|s| &s.config_maps);
    let config = builders::config_map(sp);
    let config_ok = phase
        .one(&cms, store, "ConfigMap", "v1", config)
        .await?
        .is_some();

    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let store = stores.as_ref().map(|s| &s.deployments);
    for role in [Role::Reducer, Role::Publisher] {
        let current = if config_ok {
            let desired = match role {
                Role::Reducer => builders::reducer_deployment(sp),
                Role::Publisher => builders::publisher_deployment(sp),
            };
            let done = phase
                .one(&deps, store, "Deployment", "apps/v1", desired)
                .await?;
            done.map(|(before, after)| {
                if role == Role::Reducer {
                    phase.report.old_reducers = before.and_then(|d| d.spec.replicas);
                }
                after
            })
        } else {
            // Not applied, but observed for the status (if it is ours).
            let name = builders::child_name(sp, role);
            let uid = sp.uid().unwrap_or_default();
            live(&deps, store, &ctx.written, "Deployment", &ns, &name)
                .await?
                .filter(|d| !matches!(classify(d.meta(), &sp.name_any(), &uid), Owner::Foreign(_)))
        };
        match role {
            Role::Reducer => phase.report.reducer = current,
            Role::Publisher => phase.report.publisher = current,
        }
    }

    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    let store = stores.as_ref().map(|s| &s.services);
    let desired = builders::publisher_service(sp);
    phase.one(&svcs, store, "Service", "v1", desired).await?;

    let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    let store = stores.as_ref().map(|s| &s.network_policies);
    for role in [Role::Reducer, Role::Publisher] {
        let desired = builders::network_policy(sp, role);
        let (kind, version) = ("NetworkPolicy", "networking.k8s.io/v1");
        phase.one(&nps, store, kind, version, desired).await?;
    }

    if ctx.features.pdb {
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
        let store = stores.as_ref().and_then(|s| s.pdbs.as_ref());
        let desired = builders::publisher_pdb(sp);
        let kind = "PodDisruptionBudget";
        phase.one(&pdbs, store, kind, "policy/v1", desired).await?;
    }
    Ok(phase.report)
}
