//! The operator end to end against a real Kubernetes API server and
//! controller-manager (v1.20.2 built from Debian's source package by
//! `scripts/kube.sh`). The operator runs out of cluster, *as its own
//! ServiceAccount* (impersonated), so the least-privilege RBAC in
//! `manifests/` is exercised too. Pods stay Pending: there is no node.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use streampipe_tests::{free_port, try_http_request, unique, wait_for, workspace_bin};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn admin_kubeconfig() -> PathBuf {
    std::env::var("STREAMPIPE_TEST_KUBECONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join(".kube-local/kubeconfig"))
}

fn kubectl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", admin_kubeconfig())
        .output()
        .expect("kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn kubectl_ok(args: &[&str]) -> String {
    let (ok, out, err) = kubectl(args);
    assert!(ok, "kubectl {args:?} failed: {err}");
    out
}

fn kubectl_json(args: &[&str]) -> Option<Value> {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let (ok, out, _) = kubectl(&a);
    ok.then(|| serde_json::from_str(&out).ok()).flatten()
}

/// A kubeconfig that impersonates the operator's ServiceAccount.
fn operator_kubeconfig() -> PathBuf {
    let raw = kubectl_ok(&["config", "view", "--raw", "-o", "json"]);
    let mut cfg: Value = serde_json::from_str(&raw).unwrap();
    for u in cfg["users"].as_array_mut().unwrap() {
        u["user"]["as"] = "system:serviceaccount:streampipe-system:streampipe-operator".into();
        u["user"]["as-groups"] = serde_json::json!([
            "system:serviceaccounts",
            "system:serviceaccounts:streampipe-system",
            "system:authenticated"
        ]);
    }
    let path = std::env::temp_dir().join(format!("streampipe-operator-{}.kubeconfig", unique("k")));
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    path
}

/// `kubectl` as the operator's ServiceAccount (`kubeconfig` from [`operator_kubeconfig`]).
fn kubectl_as(kubeconfig: &PathBuf, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Lets the operator watch `ns` (namespaced install): the documented
/// RoleBinding to the `streampipe-operator` ClusterRole (docs/security.md).
fn grant(ns: &str) {
    kubectl_ok(&[
        "create",
        "rolebinding",
        "streampipe-operator",
        "-n",
        ns,
        "--clusterrole=streampipe-operator",
        "--serviceaccount=streampipe-system:streampipe-operator",
    ]);
}

/// The operator's token is refused `args` (HTTP 403 Forbidden).
fn assert_forbidden(kubeconfig: &PathBuf, args: &[&str]) {
    let (ok, out, err) = kubectl_as(kubeconfig, args);
    assert!(
        !ok && err.to_lowercase().contains("forbidden"),
        "the operator may {args:?}: ok={ok} {out} {err}"
    );
}

struct Operator {
    child: Child,
    addr: String,
}

impl Operator {
    /// An operator replica watching only `namespace` (tests run side by side).
    fn start(kubeconfig: &PathBuf, identity: &str, namespace: &str) -> Self {
        Self::start_with(
            kubeconfig,
            &[
                "--lease-namespace",
                "streampipe-system",
                "--identity",
                identity,
                // The default duration: a graceful hand-over must not wait for it.
                "--lease-duration",
                "15",
                "--namespaces",
                namespace,
            ],
        )
    }

    fn start_with(kubeconfig: &PathBuf, extra: &[&str]) -> Self {
        Self::start_with_env(kubeconfig, extra, &[])
    }

    fn start_with_env(kubeconfig: &PathBuf, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let child = Command::new(workspace_bin("streampipe-operator"))
            .envs(env.iter().copied())
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--log-format",
                "text",
            ])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "warn,streampipe_operator=info")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn operator");
        Operator {
            child,
            addr: format!("127.0.0.1:{port}"),
        }
    }

    fn leading(&mut self) -> Option<bool> {
        assert!(self.child.try_wait().unwrap().is_none(), "operator exited");
        let m = try_http_request(&self.addr, "GET", "/metrics").ok()?;
        let line = m
            .lines()
            .find(|l| l.starts_with("streampipe_operator_leader "))?;
        Some(line.ends_with(" 1"))
    }

    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kubectl patch spl NAME --type merge -p PATCH`: (success, stdout, stderr).
fn patch_spl(ns: &str, name: &str, patch: &str) -> (bool, String, String) {
    kubectl(&[
        "patch", "spl", name, "-n", ns, "--type", "merge", "-p", patch,
    ])
}

/// [`patch_spl`] that must succeed.
fn patch_spl_ok(ns: &str, name: &str, patch: &str) {
    let (ok, _, err) = patch_spl(ns, name, patch);
    assert!(ok, "kubectl patch spl {name} {patch}: {err}");
}

/// `kubectl apply -k manifests/` (the whole install) and wait for the CRD,
/// once per test binary: concurrent first applies would race to create.
fn install() {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(install_now);
}

fn install_now() {
    kubectl_ok(&["apply", "-k", repo().join("manifests").to_str().unwrap()]);
    wait_for(Duration::from_secs(60), "CRD established", || {
        let crd = kubectl_json(&["get", "crd", "streampipelines.streampipe.dev"])?;
        crd["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Established" && c["status"] == "True")
            .then_some(())
    });
}

fn get(kind: &str, ns: &str, name: &str) -> Option<Value> {
    kubectl_json(&["get", kind, name, "-n", ns])
}

fn wait_get(what: &str, kind: &str, ns: &str, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(Duration::from_secs(60), what, || {
        get(kind, ns, name).filter(|v| pred(v))
    })
}

fn condition(sp: &Value, t: &str) -> Option<Value> {
    sp["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == t)
        .cloned()
}

#[test]
fn operator_end_to_end_on_a_real_api_server() {
    let t0 = Instant::now();
    // The whole install, as a user would do it (the operator Deployment stays Pending: no node).
    install();
    let ns = unique("e2e");
    kubectl_ok(&["create", "namespace", &ns]);
    grant(&ns);

    let kubeconfig = operator_kubeconfig();

    // Least privilege (namespaced install): the operator's own token reads
    // Secrets and creates Deployments in its watched namespace only.
    let unwatched = unique("e2e-unwatched");
    kubectl_ok(&["create", "namespace", &unwatched]);
    let probe = unique("probe");
    for n in ["kube-system", ns.as_str(), unwatched.as_str()] {
        kubectl_ok(&[
            "create",
            "secret",
            "generic",
            &probe,
            "-n",
            n,
            "--from-literal=k=v",
        ]);
    }
    assert_forbidden(&kubeconfig, &["get", "secret", &probe, "-n", "kube-system"]);
    assert_forbidden(&kubeconfig, &["get", "secrets", "-n", "kube-system"]);
    assert_forbidden(&kubeconfig, &["get", "secret", &probe, "-n", &unwatched]);
    assert_forbidden(&kubeconfig, &["get", "secrets", "--all-namespaces"]);
    for n in [unwatched.as_str(), "kube-system"] {
        assert_forbidden(
            &kubeconfig,
            &[
                "create",
                "deployment",
                "probe",
                "--image=example/probe:1",
                "-n",
                n,
            ],
        );
    }
    assert_forbidden(&kubeconfig, &["get", "deployments", "--all-namespaces"]);
    assert_forbidden(&kubeconfig, &["get", "streampipelines", "--all-namespaces"]);
    // What it needs in the watched namespace, it has (a by-name Secret read).
    let (ok, _, err) = kubectl_as(&kubeconfig, &["get", "secret", &probe, "-n", &ns]);
    assert!(
        ok,
        "the operator reads a Secret in its watched namespace: {err}"
    );
    assert_forbidden(&kubeconfig, &["get", "secrets", "-n", &ns]);
    let (_, can, _) = kubectl_as(
        &kubeconfig,
        &["auth", "can-i", "create", "deployments.apps", "-n", &ns],
    );
    assert_eq!(can.trim(), "yes");
    kubectl_ok(&["delete", "secret", &probe, "-n", "kube-system"]);
    // Both replicas also list a namespace they were given no RoleBinding in:
    // its watches are refused, and only that namespace is stalled.
    let watched = format!("{ns},{}", unique("e2e-unbound"));
    let mut first = Operator::start(&kubeconfig, "op-a", &watched);
    wait_for(Duration::from_secs(60), "first operator leads", || {
        first.leading().filter(|l| *l)
    });
    let mut second = Operator::start(&kubeconfig, "op-b", &watched);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        second.leading(),
        Some(false),
        "the second replica stays passive"
    );

    // The sample pipeline.
    let sample = std::fs::read_to_string(repo().join("manifests/sample.yaml"))
        .unwrap()
        .replace("namespace: streampipe-system", &format!("namespace: {ns}"));
    let path = std::env::temp_dir().join(format!("{ns}-sample.yaml"));
    std::fs::write(&path, sample).unwrap();
    kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);

    // Children exist with owner references.
    let sp = wait_get("pipeline status", "streampipeline", &ns, "odds", |v| {
        v["status"]["observedGeneration"] == 1
    });
    let uid = sp["metadata"]["uid"].as_str().unwrap().to_owned();
    for (kind, name) in [
        ("deployment", "odds-reducer"),
        ("deployment", "odds-publisher"),
        ("service", "odds-publisher"),
        ("configmap", "odds-config"),
    ] {
        let obj = wait_get(&format!("{kind} {name}"), kind, &ns, name, |_| true);
        assert_eq!(
            obj["metadata"]["ownerReferences"][0]["uid"],
            uid.as_str(),
            "{kind} {name} is owned"
        );
    }
    let dep = get("deployment", &ns, "odds-reducer").unwrap();
    assert_eq!(dep["spec"]["replicas"], 2);
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]
            ["readOnlyRootFilesystem"],
        true
    );
    // Status and printer columns.
    let ready = condition(&sp, "Ready").expect("Ready condition");
    assert_eq!(ready["status"], "False", "no node: pods never become ready");
    assert!(condition(&sp, "Progressing").is_some() && condition(&sp, "Degraded").is_some());
    assert_eq!(sp["status"]["selector"], "app.kubernetes.io/component=reducer,app.kubernetes.io/instance=odds,app.kubernetes.io/name=streampipe");
    let table = kubectl_ok(&["get", "spl", "odds", "-n", &ns]);
    for col in [
        "READY",
        "REDUCERS",
        "PUBLISHERS",
        "PARTITIONS",
        "LAG",
        "AGE",
    ] {
        assert!(table.contains(col), "printer column {col}:\n{table}");
    }
    assert!(
        table.contains("0/2"),
        "reducers ready/desired shown:\n{table}"
    );

    // kubectl scale goes through the scale subresource to the reducers.
    kubectl_ok(&["scale", "spl/odds", "-n", &ns, "--replicas=3"]);
    wait_get(
        "reducers scaled to 3",
        "deployment",
        &ns,
        "odds-reducer",
        |d| d["spec"]["replicas"] == 3,
    );
    let (_, raw, _) = kubectl(&[
        "get",
        "--raw",
        &format!("/apis/streampipe.dev/v1alpha1/namespaces/{ns}/streampipelines/odds/scale"),
    ]);
    let scale: Value = serde_json::from_str(&raw).expect("scale subresource JSON");
    assert_eq!(scale["spec"]["replicas"], 3);
    assert!(
        scale["status"]["selector"]
            .as_str()
            .unwrap_or_default()
            .contains("component=reducer"),
        "{scale}"
    );

    // A spec edit rolls the child.
    patch_spl_ok(
        &ns,
        "odds",
        r#"{"spec":{"reducer":{"image":"example/reducer:2"}}}"#,
    );
    wait_get(
        "new reducer image",
        "deployment",
        &ns,
        "odds-reducer",
        |d| d["spec"]["template"]["spec"]["containers"][0]["image"] == "example/reducer:2",
    );

    // A deleted child comes back.
    let old_uid = get("deployment", &ns, "odds-publisher").unwrap()["metadata"]["uid"].clone();
    kubectl_ok(&["delete", "deployment", "odds-publisher", "-n", &ns]);
    wait_get(
        "publisher recreated",
        "deployment",
        &ns,
        "odds-publisher",
        |d| d["metadata"]["uid"] != old_uid,
    );

    // Invalid resources: rejected by the schema, or reported Degraded with an Event.
    let (ok, _, err) = patch_spl(&ns, "odds", r#"{"spec":{"reducer":{"replicas":-1}}}"#);
    assert!(
        !ok && err.contains("replicas"),
        "schema rejects replicas < 0: {err}"
    );
    // The issue's inputs the schema's patterns refuse at apply time (the
    // operator checks the same patterns again at reconcile).
    for (patch, field) in [
        (
            r#"{"spec":{"kafka":{"bootstrapServers":"kafka:9092;kafka2:9092"}}}"#,
            "bootstrapServers",
        ),
        (
            r#"{"spec":{"kafka":{"bootstrapServers":"http://kafka:9092"}}}"#,
            "bootstrapServers",
        ),
        (r#"{"spec":{"kafka":{"dataTopic":".."}}}"#, "dataTopic"),
        (
            r#"{"spec":{"kafka":{"consumerGroup":"  "}}}"#,
            "consumerGroup",
        ),
        (r#"{"spec":{"reducer":{"image":"UPPER/Case:1"}}}"#, "image"),
    ] {
        let (ok, _, err) = patch_spl(&ns, "odds", patch);
        assert!(!ok && err.contains(field), "schema rejects {patch}: {err}");
    }
    patch_spl_ok(&ns, "odds", r#"{"spec":{"kafka":{"commandTopic":"odds"}}}"#);
    let bad = wait_get("Degraded InvalidSpec", "streampipeline", &ns, "odds", |v| {
        condition(v, "Degraded")
            .is_some_and(|c| c["status"] == "True" && c["reason"] == "InvalidSpec")
    });
    assert!(condition(&bad, "Degraded").unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("spec.kafka.commandTopic"));
    wait_for(Duration::from_secs(30), "InvalidSpec Warning event", || {
        let evs = kubectl_json(&["get", "events.events.k8s.io", "-n", &ns])?;
        evs["items"]
            .as_array()?
            .iter()
            .any(|e| e["reason"] == "InvalidSpec" && e["type"] == "Warning")
            .then_some(())
    });
    patch_spl_ok(
        &ns,
        "odds",
        r#"{"spec":{"kafka":{"commandTopic":"odds.commands"}}}"#,
    );
    wait_get("Degraded cleared", "streampipeline", &ns, "odds", |v| {
        condition(v, "Degraded").is_some_and(|c| c["status"] == "False")
    });

    // Leader hand-over: the first stops (releasing the Lease); the second
    // takes over at once (it watches the Lease; the 15 s lock is not waited
    // out) and reconciles.
    let term = Instant::now();
    first.terminate();
    let released = Instant::now();
    wait_for(Duration::from_secs(30), "second operator leads", || {
        second.leading().filter(|l| *l)
    });
    let takeover = released.elapsed();
    eprintln!(
        "standby took over {takeover:?} after the leader released the Lease and exited ({:?} after SIGTERM; lease duration 15 s)",
        term.elapsed()
    );
    assert!(
        takeover < Duration::from_secs(3),
        "standby took {takeover:?} after a graceful release"
    );
    kubectl_ok(&["scale", "spl/odds", "-n", &ns, "--replicas=1"]);
    wait_get(
        "the new leader reconciles",
        "deployment",
        &ns,
        "odds-reducer",
        |d| d["spec"]["replicas"] == 1,
    );

    // Deleting the pipeline garbage-collects its children (the controller-manager's GC).
    kubectl_ok(&["delete", "spl", "odds", "-n", &ns]);
    wait_for(
        Duration::from_secs(90),
        "children garbage-collected",
        || {
            let gone = ["odds-reducer", "odds-publisher"]
                .iter()
                .all(|n| get("deployment", &ns, n).is_none())
                && get("service", &ns, "odds-publisher").is_none()
                && get("configmap", &ns, "odds-config").is_none();
            gone.then_some(())
        },
    );
    // A pipeline in a namespace the operator does not watch is left alone
    // (it could not be reconciled there anyway).
    let sample = std::fs::read_to_string(repo().join("manifests/sample.yaml"))
        .unwrap()
        .replace(
            "namespace: streampipe-system",
            &format!("namespace: {unwatched}"),
        );
    let other = std::env::temp_dir().join(format!("{unwatched}-sample.yaml"));
    std::fs::write(&other, sample).unwrap();
    kubectl_ok(&["apply", "-f", other.to_str().unwrap()]);
    std::thread::sleep(Duration::from_secs(3));
    let sp = get("streampipeline", &unwatched, "odds").unwrap();
    assert!(sp["status"].is_null(), "not reconciled: {sp}");
    assert!(get("deployment", &unwatched, "odds-reducer").is_none());
    let _ = std::fs::remove_file(other);
    drop(second);
    let _ = kubectl(&["delete", "namespace", &unwatched, "--wait=false"]);
    let _ = kubectl(&["delete", "namespace", &ns, "--wait=false"]);
    let _ = std::fs::remove_file(kubeconfig);
    eprintln!("operator e2e took {:?}", t0.elapsed());
}

/// Autoscaling end to end: lag created in the real (dev) broker makes the
/// operator raise the reducer Deployment's replicas within one poll
/// interval, never above the partition count; status and Events say why.
#[test]
fn autoscaling_follows_kafka_lag_on_a_real_api_server() {
    use rdkafka::producer::Producer as _;
    use streampipe_tests::Broker;
    install();
    let ns = unique("e2e-scale");
    kubectl_ok(&["create", "namespace", &ns]);
    grant(&ns);
    let base = unique("lag");
    let (data, commands, group) = (
        format!("{base}.data"),
        format!("{base}.commands"),
        format!("{base}.reducers"),
    );
    let broker = Broker::Dev;
    broker.create_topics(&[(&data, 4), (&commands, 4)]);
    let poll = 2u64;
    let sp = format!(
        r#"{{"apiVersion":"streampipe.dev/v1alpha1","kind":"StreamPipeline","metadata":{{"name":"lag","namespace":"{ns}"}},
        "spec":{{"kafka":{{"bootstrapServers":"{}","dataTopic":"{data}","commandTopic":"{commands}","consumerGroup":"{group}"}},
        "redis":{{"urlSecret":{{"name":"redis","key":"url"}}}},
        "reducer":{{"replicas":1}},
        "autoscaling":{{"enabled":true,"minReplicas":1,"maxReplicas":10,"lagThreshold":100,"pollIntervalSeconds":{poll}}}}}}}"#,
        broker.bootstrap()
    );
    let path = std::env::temp_dir().join(format!("{ns}.json"));
    std::fs::write(&path, sp).unwrap();
    let kubeconfig = operator_kubeconfig();
    let _op = Operator::start_with(
        &kubeconfig,
        &["--leader-election=false", "--namespaces", &ns],
    );
    // The API server publishes an updated CRD schema a moment after the apply.
    wait_for(Duration::from_secs(30), "pipeline accepted", || {
        kubectl(&["apply", "-f", path.to_str().unwrap()])
            .0
            .then_some(())
    });
    let st = wait_get(
        "autoscaler active with no lag",
        "streampipeline",
        &ns,
        "lag",
        |v| {
            v["status"]["totalLag"] == 0
                && condition(v, "ScalingActive").is_some_and(|c| c["status"] == "True")
        },
    );
    assert_eq!(st["status"]["partitions"], 4);
    assert_eq!(st["status"]["desiredReplicas"], 1);
    wait_get("one reducer", "deployment", &ns, "lag-reducer", |d| {
        d["spec"]["replicas"] == 1
    });

    // 1000 records of lag: 10 reducers wanted, capped at the 4 partitions.
    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    for i in 0..1000 {
        let key = format!("m{i}");
        producer
            .send(
                rdkafka::producer::BaseRecord::to(&data)
                    .key(&key)
                    .payload(r#"{"payload":1}"#),
            )
            .unwrap();
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let lag_at = Instant::now();
    let mut max_seen = 0;
    let dep = wait_for(Duration::from_secs(30), "reducers scaled up", || {
        let d = get("deployment", &ns, "lag-reducer")?;
        let n = d["spec"]["replicas"].as_i64()?;
        max_seen = max_seen.max(n);
        (n == 4).then_some(d)
    });
    let reaction = lag_at.elapsed();
    eprintln!("autoscaling reaction (lag produced → Deployment patched): {reaction:?} with a {poll} s poll interval");
    assert!(
        reaction <= Duration::from_secs(poll) + Duration::from_secs(3),
        "reacted in {reaction:?}, poll interval {poll} s"
    );
    assert_eq!(dep["spec"]["replicas"], 4);
    std::thread::sleep(Duration::from_secs(poll + 1));
    let sp = get("streampipeline", &ns, "lag").unwrap();
    assert_eq!(
        sp["spec"]["reducer"]["replicas"], 4,
        "written through the scale path"
    );
    assert!(
        max_seen <= 4 && get("deployment", &ns, "lag-reducer").unwrap()["spec"]["replicas"] == 4,
        "never above the partition count"
    );
    assert_eq!(sp["status"]["totalLag"], 1000);
    let limited = condition(&sp, "ScalingLimited").unwrap();
    assert_eq!(
        (limited["status"].as_str(), limited["reason"].as_str()),
        (Some("True"), Some("CappedAtPartitions"))
    );
    assert!(limited["message"]
        .as_str()
        .unwrap()
        .contains("capped at 4 partitions"));
    wait_for(Duration::from_secs(20), "Autoscaled event", || {
        let evs = kubectl_json(&["get", "events.events.k8s.io", "-n", &ns])?;
        evs["items"]
            .as_array()?
            .iter()
            .any(|e| {
                e["reason"] == "Autoscaled" && e["note"].as_str().unwrap_or("").contains("1 → 4")
            })
            .then_some(())
    });
    let table = kubectl_ok(&["get", "spl", "lag", "-n", &ns]);
    assert!(table.contains("1000"), "lag column shows the lag:\n{table}");

    // With autoscaling on, a manual scale is overridden, and an Event says so.
    kubectl_ok(&["scale", "spl/lag", "-n", &ns, "--replicas=2"]);
    wait_for(Duration::from_secs(20), "manual scale overridden", || {
        let evs = kubectl_json(&["get", "events.events.k8s.io", "-n", &ns])?;
        let overridden = evs["items"]
            .as_array()?
            .iter()
            .any(|e| e["reason"] == "ManualScaleOverridden");
        let back = get("streampipeline", &ns, "lag")?["spec"]["reducer"]["replicas"] == 4;
        (overridden && back).then_some(())
    });
    wait_get(
        "deployment back at 4",
        "deployment",
        &ns,
        "lag-reducer",
        |d| d["spec"]["replicas"] == 4,
    );

    // Kafka unreachable: replicas held, the status says so.
    patch_spl_ok(
        &ns,
        "lag",
        r#"{"spec":{"kafka":{"bootstrapServers":"127.0.0.1:1"}}}"#,
    );
    let held = wait_get(
        "Kafka unreachable reported",
        "streampipeline",
        &ns,
        "lag",
        |v| {
            condition(v, "ScalingActive")
                .is_some_and(|c| c["status"] == "False" && c["reason"] == "KafkaUnavailable")
        },
    );
    assert!(condition(&held, "ScalingActive").unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("holding 4 replicas"));
    assert_eq!(
        get("deployment", &ns, "lag-reducer").unwrap()["spec"]["replicas"],
        4
    );
    let _ = kubectl(&["delete", "namespace", &ns, "--wait=false"]);
    let _ = std::fs::remove_file(kubeconfig);
}

/// `kubectl apply -f` of a pipeline given as JSON (retried while the API
/// server publishes a freshly applied CRD).
fn apply_json(ns: &str, what: &Value) {
    let path = std::env::temp_dir().join(format!("{ns}-{}.json", unique("sp")));
    std::fs::write(&path, serde_json::to_vec(what).unwrap()).unwrap();
    wait_for(Duration::from_secs(30), "pipeline accepted", || {
        kubectl(&["apply", "-f", path.to_str().unwrap()])
            .0
            .then_some(())
    });
    let _ = std::fs::remove_file(path);
}

fn pipeline_json(ns: &str, name: &str, reducer: Value) -> Value {
    serde_json::json!({
        "apiVersion": "streampipe.dev/v1alpha1", "kind": "StreamPipeline",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "kafka": {"bootstrapServers": "kafka:9092", "dataTopic": "odds", "commandTopic": "odds.commands"},
            "redis": {"urlSecret": {"name": "redis", "key": "url"}},
            "reducer": reducer,
        }
    })
}

/// Events about `name` with `reason`.
fn events_about(ns: &str, name: &str, reason: &str) -> Vec<Value> {
    kubectl_json(&["get", "events.events.k8s.io", "-n", ns])
        .and_then(|evs| evs["items"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["regarding"]["name"] == name && e["reason"] == reason)
        .collect()
}

fn rv(kind: &str, ns: &str, name: &str) -> Value {
    get(kind, ns, name).unwrap()["metadata"]["resourceVersion"].clone()
}

/// Ownership, honest status and drift on the real 1.20 API server: a
/// user's ConfigMap with a child's name is left alone (Conflict) and
/// survives the pipeline's deletion; failures and invalid specs show in
/// the status on the first pass with one short Event; quantities, a foreign
/// env var and an unchanged pipeline cause no write; an edited Service port
/// is replaced, an env var dropped from the spec removed, a removed owner
/// reference restored at once; a rollout past its deadline is Degraded.
#[test]
fn ownership_status_and_drift_on_a_real_api_server() {
    install();
    let ns = unique("e2e-own");
    kubectl_ok(&["create", "namespace", &ns]);
    grant(&ns);
    let kubeconfig = operator_kubeconfig();
    // The default scope: the operator's own namespace (as in a pod, from
    // the downward API's POD_NAMESPACE), with no --namespaces.
    let op = Operator::start_with_env(
        &kubeconfig,
        &["--leader-election=false"],
        &[("POD_NAMESPACE", ns.as_str())],
    );

    // A user's ConfigMap that happens to have the child's name.
    kubectl_ok(&[
        "create",
        "configmap",
        "odds-config",
        "-n",
        &ns,
        "--from-literal=mine=precious",
    ]);
    let reducer = serde_json::json!({
        "replicas": 1,
        "env": [{"name": "MINE", "value": "1"}],
        "resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"}, "limits": {"memory": "2048Mi"}},
    });
    apply_json(&ns, &pipeline_json(&ns, "odds", reducer.clone()));
    let sp = wait_get("Conflict reported", "streampipeline", &ns, "odds", |v| {
        condition(v, "Conflict").is_some_and(|c| c["status"] == "True")
    });
    let degraded = condition(&sp, "Degraded").unwrap();
    assert_eq!(
        (degraded["status"].as_str(), degraded["reason"].as_str()),
        (Some("True"), Some("Conflict"))
    );
    assert!(condition(&sp, "Conflict").unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("ConfigMap odds-config"));
    wait_for(Duration::from_secs(30), "Conflict Warning event", || {
        events_about(&ns, "odds", "Conflict")
            .iter()
            .any(|e| {
                e["type"] == "Warning"
                    && e["note"]
                        .as_str()
                        .unwrap_or("")
                        .contains("ConfigMap odds-config")
            })
            .then_some(())
    });
    let table = kubectl_ok(&["get", "spl", "odds", "-n", &ns]);
    assert!(
        table.lines().nth(1).unwrap().split_whitespace().nth(1) == Some("False"),
        "READY shown:\n{table}"
    );
    let cm = get("configmap", &ns, "odds-config").unwrap();
    assert_eq!(
        cm["data"],
        serde_json::json!({"mine": "precious"}),
        "untouched"
    );
    assert!(
        cm["metadata"]["ownerReferences"].is_null(),
        "not adopted: {cm}"
    );
    // The Service was free: it is the pipeline's.
    wait_get("Service applied", "service", &ns, "odds-publisher", |_| {
        true
    });
    assert!(
        get("deployment", &ns, "odds-reducer").is_none(),
        "no pods on someone else's config"
    );

    // Deleting the pipeline deletes only its own objects.
    kubectl_ok(&["delete", "spl", "odds", "-n", &ns]);
    wait_for(Duration::from_secs(90), "Service garbage-collected", || {
        get("service", &ns, "odds-publisher")
            .is_none()
            .then_some(())
    });
    assert_eq!(
        get("configmap", &ns, "odds-config").expect("the user's ConfigMap survives")["data"]
            ["mine"],
        "precious"
    );
    kubectl_ok(&["delete", "configmap", "odds-config", "-n", &ns]);

    // The pipeline again, with its names free: every child, in server form, written once.
    apply_json(&ns, &pipeline_json(&ns, "odds", reducer));
    wait_get("pipeline healthy", "streampipeline", &ns, "odds", |v| {
        condition(v, "Conflict").is_some_and(|c| c["status"] == "False")
            && condition(v, "Degraded").is_some_and(|c| c["status"] == "False")
    });
    let dep = wait_get("reducer", "deployment", &ns, "odds-reducer", |_| true);
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"],
        serde_json::json!({"cpu": "500m", "memory": "1Gi"})
    );
    let mut op = op;
    let writes = |op: &mut Operator| -> f64 {
        assert!(op.leading().is_some());
        let m = try_http_request(&op.addr, "GET", "/metrics").unwrap();
        m.lines()
            .filter(|l| l.starts_with("streampipe_operator_child_writes_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let poke = |n: &str| {
        kubectl_ok(&[
            "annotate",
            "spl",
            "odds",
            "-n",
            &ns,
            &format!("poke={n}"),
            "--overwrite",
        ]);
        std::thread::sleep(Duration::from_secs(2));
    };
    std::thread::sleep(Duration::from_secs(2));
    let (w0, rv0) = (writes(&mut op), rv("deployment", &ns, "odds-reducer"));
    poke("1");
    assert_eq!(
        writes(&mut op),
        w0,
        "an unchanged pipeline (quantities in user form) writes nothing"
    );
    assert_eq!(rv("deployment", &ns, "odds-reducer"), rv0);

    // A foreign env var is left alone, without a PATCH per pass.
    kubectl_ok(&[
        "set",
        "env",
        "deployment/odds-reducer",
        "-n",
        &ns,
        "FOREIGN=1",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let (w1, rv1) = (writes(&mut op), rv("deployment", &ns, "odds-reducer"));
    poke("2");
    assert_eq!(writes(&mut op), w1, "foreign env var: no write");
    assert_eq!(rv("deployment", &ns, "odds-reducer"), rv1);
    let env_names = |ns: &str| -> Vec<String> {
        get("deployment", ns, "odds-reducer").unwrap()["spec"]["template"]["spec"]["containers"][0]
            ["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(env_names(&ns).contains(&"FOREIGN".to_owned()));

    // An env var the operator set and the spec dropped is removed.
    patch_spl_ok(&ns, "odds", r#"{"spec":{"reducer":{"env":null}}}"#);
    wait_for(Duration::from_secs(30), "MINE removed", || {
        let names = env_names(&ns);
        (!names.contains(&"MINE".to_owned())).then_some(names)
    });
    assert!(
        env_names(&ns).contains(&"FOREIGN".to_owned()),
        "foreign one kept"
    );

    // An edited Service port is replaced, not duplicated.
    kubectl_ok(&[
        "patch",
        "service",
        "odds-publisher",
        "-n",
        &ns,
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/spec/ports/0/port","value":81}]"#,
    ]);
    wait_get(
        "Service port restored",
        "service",
        &ns,
        "odds-publisher",
        |s| {
            s["spec"]["ports"]
                .as_array()
                .is_some_and(|p| p.len() == 1 && p[0]["port"] == 80)
        },
    );

    // A removed owner reference is restored at once (not at the 300 s resync).
    let t = Instant::now();
    kubectl_ok(&[
        "patch",
        "configmap",
        "odds-config",
        "-n",
        &ns,
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/ownerReferences"}]"#,
    ]);
    wait_for(Duration::from_secs(20), "owner reference restored", || {
        let cm = get("configmap", &ns, "odds-config")?;
        cm["metadata"]["ownerReferences"][0]["kind"]
            .as_str()
            .map(|_| ())
    });
    eprintln!("owner reference restored in {:?}", t.elapsed());

    // A rollout past its deadline (no node: pods stay Pending) is Degraded,
    // not "RolledOut". The deadline is a field the operator does not set.
    kubectl_ok(&[
        "patch",
        "deployment",
        "odds-reducer",
        "-n",
        &ns,
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"progressDeadlineSeconds":1}}"#,
    ]);
    let sp = wait_get(
        "ProgressDeadlineExceeded",
        "streampipeline",
        &ns,
        "odds",
        |v| condition(v, "Degraded").is_some_and(|c| c["reason"] == "ProgressDeadlineExceeded"),
    );
    let progressing = condition(&sp, "Progressing").unwrap();
    assert_eq!(
        (
            progressing["status"].as_str(),
            progressing["reason"].as_str()
        ),
        (Some("False"), Some("ProgressDeadlineExceeded"))
    );
    assert!(condition(&sp, "Degraded").unwrap()["message"]
        .as_str()
        .unwrap()
        .contains("odds-reducer"));

    // A pipeline failing on its first pass: a status with the reason, one short Event.
    let bad = serde_json::json!({"replicas": 1, "resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}});
    apply_json(&ns, &pipeline_json(&ns, "broken", bad));
    let sp = wait_get("ApplyFailed status", "streampipeline", &ns, "broken", |v| {
        condition(v, "Degraded").is_some_and(|c| c["reason"] == "ApplyFailed")
    });
    assert_eq!(sp["status"]["ready"], "False");
    assert_eq!(sp["status"]["reducer"]["summary"], "0/1");
    let ev = wait_for(Duration::from_secs(30), "ReconcileFailed event", || {
        events_about(&ns, "broken", "ReconcileFailed")
            .into_iter()
            .next()
    });
    assert!(ev["note"].as_str().unwrap().len() <= 1024);
    std::thread::sleep(Duration::from_secs(5)); // retries at 1, 2, 4 s
    assert_eq!(
        events_about(&ns, "broken", "ReconcileFailed").len(),
        1,
        "one Event, not one per retry"
    );

    // Names the children cannot carry: reported at once.
    for name in ["odds.v2", &"a".repeat(54)] {
        apply_json(
            &ns,
            &pipeline_json(&ns, name, serde_json::json!({"replicas": 1})),
        );
        let sp = wait_get("InvalidSpec", "streampipeline", &ns, name, |v| {
            condition(v, "Degraded").is_some_and(|c| c["reason"] == "InvalidSpec")
        });
        assert_eq!(sp["status"]["ready"], "False");
        wait_for(Duration::from_secs(30), "InvalidSpec event", || {
            events_about(&ns, name, "InvalidSpec")
                .iter()
                .any(|e| {
                    e["note"]
                        .as_str()
                        .unwrap_or("")
                        .starts_with("metadata.name")
                })
                .then_some(())
        });
    }
    drop(op);
    let _ = kubectl(&["delete", "namespace", &ns, "--wait=false"]);
    let _ = std::fs::remove_file(kubeconfig);
}
