//! What every reconcile shares: the client, the Event recorder, metrics,
//! what the API server offers, the autoscaler states, and the watch caches
//! of the children (read instead of GETs).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::reflector::Store;
use kube::{Client, Resource};
use serde_json::Value;

use crate::crd::StreamPipeline;
use crate::events::{Note, Recorder};
use crate::metrics::Metrics;
use crate::plan::Scalers;

/// What the API server offers (checked at start).
#[derive(Debug, Clone, Copy, Default)]
pub struct Features {
    /// `policy/v1` is served (Kubernetes ≥ 1.21): publishers get a PDB.
    pub pdb: bool,
}

/// The controller's caches of the children (labelled as ours).
#[derive(Clone)]
pub struct ChildStores {
    /// Deployments.
    pub deployments: Store<Deployment>,
    /// ConfigMaps.
    pub config_maps: Store<ConfigMap>,
    /// Services.
    pub services: Store<Service>,
    /// NetworkPolicies.
    pub network_policies: Store<NetworkPolicy>,
    /// PodDisruptionBudgets (when served).
    pub pdbs: Option<Store<PodDisruptionBudget>>,
}

/// The children the operator itself just wrote, until the caches show it.
///
/// A pass can start before the watch event of the previous pass's write
/// reached the cache (the pipeline's own status write triggers it); judged
/// on the stale copy, the child would look drifted and be applied again for
/// nothing. So the object an apply returned stands in for the cached one
/// while the cache still holds the version from before that apply.
#[derive(Default)]
pub struct Written {
    entries: Mutex<HashMap<String, WriteRecord>>,
}

/// resourceVersion before the write, the object after it, and when.
type WriteRecord = (Option<String>, Value, Instant);

/// How long a write stands in for a cache that has not caught up.
const WRITTEN_TTL: Duration = Duration::from_secs(60);

impl Written {
    /// Remembers that `key` went from `before_rv` to `after`.
    pub fn record(&self, key: String, before_rv: Option<String>, after: Value) {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.retain(|_, (_, _, at)| at.elapsed() < WRITTEN_TTL);
        e.insert(key, (before_rv, after, Instant::now()));
    }

    /// What we wrote to `key`, if the cache (at `cached_rv`) is older than that write.
    pub fn newer_than(&self, key: &str, cached_rv: Option<&str>) -> Option<Value> {
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match e.get(key) {
            Some((before, after, at))
                if at.elapsed() < WRITTEN_TTL && before.as_deref() == cached_rv =>
            {
                Some(after.clone())
            }
            Some(_) => {
                e.remove(key);
                None
            }
            None => None,
        }
    }
}

/// Shared state of the reconciler.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Event recorder (events.k8s.io/v1, truncated and de-duplicated).
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// API server capabilities.
    pub features: Features,
    /// Consecutive failures per object, for the error backoff.
    pub(crate) failures: Mutex<HashMap<String, u32>>,
    /// Autoscaler state per pipeline.
    pub(crate) scalers: Scalers,
    /// The running controllers' caches, per watched namespace (`None`:
    /// every namespace); without them (tests) children are read with GETs.
    pub(crate) stores: RwLock<HashMap<Option<String>, ChildStores>>,
    /// Our own latest writes, until the caches catch up.
    pub(crate) written: Written,
    /// The controllers' caches of the pipelines themselves, per watched
    /// namespace once listed (the consumer-group comparison); without
    /// one, a LIST.
    pub(crate) pipelines: RwLock<HashMap<Option<String>, Store<StreamPipeline>>>,
}

/// The pipeline as Events refer to it: without `resourceVersion`, which
/// changes with every status write and would make each Event a new one.
pub fn regarding(sp: &StreamPipeline) -> ObjectReference {
    let mut r = sp.object_ref(&());
    r.resource_version = None;
    r
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
            scalers: Scalers::default(),
            stores: RwLock::new(HashMap::new()),
            written: Written::default(),
            pipelines: RwLock::new(HashMap::new()),
        }
    }

    /// The children caches covering `namespace`, if its controller runs.
    pub fn stores(&self, namespace: &str) -> Option<ChildStores> {
        let s = self.stores.read().unwrap_or_else(|p| p.into_inner());
        s.get(&Some(namespace.to_owned()))
            .or_else(|| s.get(&None))
            .cloned()
    }

    /// Installs (or with `None` drops) the children caches of the
    /// controller watching `namespace` (`None`: every namespace); `None`
    /// drops its pipeline cache too (the controller that filled it stopped).
    pub fn set_stores(&self, namespace: Option<String>, stores: Option<ChildStores>) {
        if stores.is_none() {
            self.set_pipelines(namespace.clone(), None);
        }
        let mut s = self.stores.write().unwrap_or_else(|p| p.into_inner());
        match stores {
            Some(st) => {
                s.insert(namespace, st);
            }
            None => {
                s.remove(&namespace);
            }
        }
    }

    /// The pipeline cache covering `namespace`, once its controller listed.
    pub fn pipelines(&self, namespace: &str) -> Option<Store<StreamPipeline>> {
        let s = self.pipelines.read().unwrap_or_else(|p| p.into_inner());
        s.get(&Some(namespace.to_owned()))
            .or_else(|| s.get(&None))
            .cloned()
    }

    /// Installs (or with `None` drops) the pipeline cache of the controller
    /// watching `namespace` (`None`: every namespace).
    pub fn set_pipelines(&self, namespace: Option<String>, store: Option<Store<StreamPipeline>>) {
        let mut s = self.pipelines.write().unwrap_or_else(|p| p.into_inner());
        match store {
            Some(st) => {
                s.insert(namespace, st);
            }
            None => {
                s.remove(&namespace);
            }
        }
    }

    /// Records an Event about the pipeline.
    pub async fn event(
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

    /// Records an Event about the pipeline; `related` names the child it is about.
    pub async fn event_about(
        &self,
        sp: &StreamPipeline,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
        related: Option<ObjectReference>,
    ) {
        let note = Note {
            type_,
            reason: reason.into(),
            action: action.into(),
            note,
            related,
        };
        self.recorder.publish(&regarding(sp), note).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_stands_in_only_while_the_cache_is_older() {
        let w = Written::default();
        w.record("k".into(), Some("5".into()), serde_json::json!({"v": 6}));
        assert_eq!(
            w.newer_than("k", Some("5")),
            Some(serde_json::json!({"v": 6}))
        );
        assert_eq!(w.newer_than("k", Some("6")), None, "cache caught up");
        assert_eq!(w.newer_than("k", Some("5")), None, "and the entry is gone");
        assert_eq!(w.newer_than("other", Some("5")), None);
    }
}
