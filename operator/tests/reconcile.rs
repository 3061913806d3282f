//! Reconcile tests against a mocked API server (tower-test), after kube-rs'
//! controller-rs: a small in-memory API server answers the reconciler's
//! requests and records them, so the tests assert on what was written.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::events::Reporter;
use kube::Client;
use serde_json::{json, Value};
use streampipe_operator::{reconcile, Context, Features, Metrics, StreamPipeline};

const SP: &str = "/apis/streampipe.dev/v1alpha1/namespaces/prod/streampipelines/odds";
const CM: &str = "/api/v1/namespaces/prod/configmaps/odds-config";
const REDUCER: &str = "/apis/apps/v1/namespaces/prod/deployments/odds-reducer";
const PUBLISHER: &str = "/apis/apps/v1/namespaces/prod/deployments/odds-publisher";
const SVC: &str = "/api/v1/namespaces/prod/services/odds-publisher";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/prod/events";

/// An in-memory API server: objects by path, and a log of requests.
#[derive(Clone, Default)]
struct Fake {
    objects: Arc<Mutex<HashMap<String, Value>>>,
    log: Arc<Mutex<Vec<(Method, String, Value)>>>,
    rv: Arc<Mutex<u64>>,
}

fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

fn status_404() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "not found", "reason": "NotFound", "code": 404})
}

impl Fake {
    fn respond(&self, method: Method, path: String, body: Value) -> (StatusCode, Value) {
        self.log
            .lock()
            .unwrap()
            .push((method.clone(), path.clone(), body.clone()));
        let mut objects = self.objects.lock().unwrap();
        match method {
            Method::GET => match objects.get(&path) {
                Some(o) => (StatusCode::OK, o.clone()),
                None => (StatusCode::NOT_FOUND, status_404()),
            },
            Method::PATCH if path.starts_with(EVENTS) => (StatusCode::OK, body),
            Method::POST if path.starts_with(EVENTS) => (StatusCode::CREATED, body),
            Method::PATCH => {
                let (target, status) = match path.strip_suffix("/status") {
                    Some(p) => (p.to_owned(), true),
                    None => (path.clone(), false),
                };
                let mut rv = self.rv.lock().unwrap();
                *rv += 1;
                let mut obj = objects.get(&target).cloned().unwrap_or_else(
                    || json!({"metadata": {"uid": format!("uid-{rv}"), "generation": 1}}),
                );
                if status {
                    obj["status"] = body["status"].clone();
                } else {
                    let spec_changed =
                        obj.get("spec") != body.get("spec") && obj.get("spec").is_some();
                    merge(&mut obj, &body);
                    if let Some(spec) = body.get("spec") {
                        obj["spec"] = spec.clone();
                    }
                    if spec_changed {
                        let g = obj["metadata"]["generation"].as_i64().unwrap_or(1);
                        obj["metadata"]["generation"] = json!(g + 1);
                    }
                }
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                objects.insert(target, obj.clone());
                (StatusCode::OK, obj)
            }
            _ => (StatusCode::NOT_FOUND, status_404()),
        }
    }

    fn client(&self) -> Client {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let fake = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let (code, out) = fake.respond(parts.method, parts.uri.path().to_owned(), body);
                let resp = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&out).unwrap()))
                    .unwrap();
                send.send_response(resp);
            }
        });
        Client::new(svc, "prod")
    }

    fn writes(&self) -> Vec<(Method, String, Value)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _, _)| *m != Method::GET)
            .cloned()
            .collect()
    }

    fn clear_log(&self) {
        self.log.lock().unwrap().clear();
    }

    fn get(&self, path: &str) -> Option<Value> {
        self.objects.lock().unwrap().get(path).cloned()
    }
}

fn pipeline(spec: Value) -> StreamPipeline {
    let mut v = json!({
        "apiVersion": "streampipe.dev/v1alpha1",
        "kind": "StreamPipeline",
        "metadata": {"name": "odds", "namespace": "prod", "uid": "sp-uid", "generation": 1},
        "spec": spec,
    });
    v["spec"]["kafka"]["commandTopic"] = v["spec"]["kafka"]["commandTopic"].clone();
    serde_json::from_value(v).unwrap()
}

fn spec(replicas: i32) -> Value {
    json!({
        "kafka": {"bootstrapServers": "kafka:9092", "dataTopic": "odds", "commandTopic": "odds.commands"},
        "redis": {"urlSecret": {"name": "redis", "key": "url"}},
        "reducer": {"replicas": replicas},
    })
}

async fn setup(sp: &StreamPipeline) -> (Fake, Arc<Context>) {
    let fake = Fake::default();
    fake.objects
        .lock()
        .unwrap()
        .insert(SP.into(), serde_json::to_value(sp).unwrap());
    let client = fake.client();
    let reporter = Reporter {
        controller: "streampipe-operator".into(),
        instance: Some("test".into()),
    };
    let ctx = Arc::new(Context::new(
        client,
        reporter,
        Arc::new(Metrics::new()),
        Features::default(),
    ));
    (fake, ctx)
}

/// The pipeline as the controller would see it now (with its status).
fn current(fake: &Fake) -> Arc<StreamPipeline> {
    Arc::new(serde_json::from_value(fake.get(SP).unwrap()).unwrap())
}

fn patched(writes: &[(Method, String, Value)], path: &str) -> bool {
    writes
        .iter()
        .any(|(m, p, _)| *m == Method::PATCH && p == path)
}

fn events(writes: &[(Method, String, Value)]) -> Vec<Value> {
    writes
        .iter()
        .filter(|(m, p, _)| *m == Method::POST && p.starts_with(EVENTS))
        .map(|(_, _, b)| b.clone())
        .collect()
}

#[tokio::test]
async fn first_reconcile_applies_children_and_status() {
    let sp = pipeline(spec(2));
    let (fake, ctx) = setup(&sp).await;
    reconcile(Arc::new(sp), ctx.clone())
        .await
        .expect("reconcile");
    let w = fake.writes();
    for path in [CM, REDUCER, PUBLISHER, SVC] {
        assert!(patched(&w, path), "{path} applied");
        let obj = fake.get(path).unwrap();
        assert_eq!(
            obj["metadata"]["ownerReferences"][0]["uid"], "sp-uid",
            "{path} owned"
        );
    }
    assert_eq!(fake.get(REDUCER).unwrap()["spec"]["replicas"], 2);
    // Server-side apply with our field manager.
    let status = fake.get(SP).unwrap()["status"].clone();
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["reducer"]["summary"], "0/2");
    assert_eq!(status["selector"], "app.kubernetes.io/component=reducer,app.kubernetes.io/instance=odds,app.kubernetes.io/name=streampipe");
    let cond = |t: &str| {
        status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .cloned()
            .unwrap()
    };
    assert_eq!(cond("Ready")["status"], "False");
    assert_eq!(cond("Degraded")["status"], "False");
    assert_eq!(cond("Ready")["observedGeneration"], 1);
    let evs = events(&w);
    assert_eq!(
        evs.iter().filter(|e| e["reason"] == "Created").count(),
        4,
        "an Event per created child: {evs:?}"
    );
}

#[tokio::test]
async fn unchanged_pipeline_makes_no_writes() {
    let sp = pipeline(spec(1));
    let (fake, ctx) = setup(&sp).await;
    reconcile(Arc::new(sp), ctx.clone()).await.unwrap();
    fake.clear_log();
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    let w = fake.writes();
    assert!(
        w.is_empty(),
        "no API write when nothing changed: {:?}",
        w.iter()
            .map(|(m, p, _)| format!("{m} {p}"))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn spec_change_patches_only_the_child_and_records_the_scale() {
    let sp = pipeline(spec(1));
    let (fake, ctx) = setup(&sp).await;
    reconcile(Arc::new(sp), ctx.clone()).await.unwrap();
    fake.clear_log();
    let mut changed = (*current(&fake)).clone();
    changed.spec.reducer.replicas = 3;
    changed.metadata.generation = Some(2);
    reconcile(Arc::new(changed), ctx.clone()).await.unwrap();
    let w = fake.writes();
    assert!(patched(&w, REDUCER));
    assert!(
        !patched(&w, PUBLISHER) && !patched(&w, CM) && !patched(&w, SVC),
        "only the reducer changed"
    );
    assert_eq!(fake.get(REDUCER).unwrap()["spec"]["replicas"], 3);
    let evs = events(&w);
    assert!(
        evs.iter()
            .any(|e| e["reason"] == "Scaled" && e["note"].as_str().unwrap().contains("1 → 3")),
        "{evs:?}"
    );
    assert_eq!(fake.get(SP).unwrap()["status"]["observedGeneration"], 2);
}

#[tokio::test]
async fn deleted_child_is_recreated() {
    let sp = pipeline(spec(1));
    let (fake, ctx) = setup(&sp).await;
    reconcile(Arc::new(sp), ctx.clone()).await.unwrap();
    fake.objects.lock().unwrap().remove(SVC);
    fake.clear_log();
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    let w = fake.writes();
    assert!(patched(&w, SVC), "service recreated");
    assert!(fake.get(SVC).is_some());
    // The recorder folds a repeated Event (same reason, same child) into a
    // series: a new Event, or a PATCH of the series count.
    assert!(
        w.iter().any(|(_, p, _)| p.starts_with(EVENTS)),
        "the recreation was recorded as an Event"
    );
}

#[tokio::test]
async fn invalid_spec_is_degraded_with_a_warning_event_and_touches_no_child() {
    let mut s = spec(1);
    s["kafka"]["commandTopic"] = json!("odds");
    let sp = pipeline(s);
    let (fake, ctx) = setup(&sp).await;
    reconcile(Arc::new(sp), ctx.clone()).await.unwrap();
    let w = fake.writes();
    for path in [CM, REDUCER, PUBLISHER, SVC] {
        assert!(
            !patched(&w, path),
            "{path} must not be written for an invalid spec"
        );
    }
    let status = fake.get(SP).unwrap()["status"].clone();
    let degraded = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .cloned()
        .unwrap();
    assert_eq!(
        (degraded["status"].as_str(), degraded["reason"].as_str()),
        (Some("True"), Some("InvalidSpec"))
    );
    assert!(degraded["message"]
        .as_str()
        .unwrap()
        .contains("spec.kafka.commandTopic"));
    let evs = events(&w);
    assert!(
        evs.iter().any(|e| e["type"] == "Warning"
            && e["reason"] == "InvalidSpec"
            && e["note"]
                .as_str()
                .unwrap()
                .contains("spec.kafka.commandTopic")),
        "{evs:?}"
    );
    // Reconciling the same invalid generation again neither re-warns nor rewrites.
    fake.clear_log();
    reconcile(current(&fake), ctx.clone()).await.unwrap();
    assert!(fake.writes().is_empty());
}
