//! The whole pipeline on a real Kubernetes node (`scripts/node.sh`: kubelet
//! and containerd next to `scripts/kube.sh`'s control plane). Everything runs
//! as pods from images of the workspace's binaries (the suite's debug build): the operator
//! in-cluster (2 replicas, leader election, its own ServiceAccount), the
//! reducers and publishers it deploys; Redis and the dev broker run on the
//! node's gateway address (`scripts/stack.sh` with `STREAMPIPE_STACK_ADDRESS`).
//!
//! Runs only when `STREAMPIPE_TEST_NODE_KUBECONFIG` is set (what
//! `scripts/node.sh env` prints); otherwise each test prints why it skipped.
//! How to run: docs/node.md.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use streampipe_tests::browser::{assert_live_page_moves, feed_odds, Browser};
use streampipe_tests::publisher::{create_channel, has, http_as, open_stream, read_updates};
use streampipe_tests::{wait_for, Broker, Pipeline};

/// The install's namespace: the default (namespaced) install watches it.
const NS: &str = "streampipe-system";
/// The Lease the operator replicas elect a leader on (operator's default).
const LEASE: &str = "streampipe-operator";
/// Starting pods (image already on the node) and a first rebalance on the
/// dev broker (~9 s per rebalance) fit well inside this.
const POD_TIMEOUT: Duration = Duration::from_secs(120);

/// One test at a time: they share the node (2 cores) and the operator, and
/// one of them kills the operator's leader.
static SERIAL: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The node's kubeconfig, or `None` (and a note on stderr) without a node.
fn node_kubeconfig(test: &str) -> Option<PathBuf> {
    match std::env::var("STREAMPIPE_TEST_NODE_KUBECONFIG") {
        Ok(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            eprintln!(
                "SKIPPED {test}: no node (STREAMPIPE_TEST_NODE_KUBECONFIG unset; \
                 bring one up with scripts/node.sh up, see docs/node.md)"
            );
            None
        }
    }
}

/// kubectl 1.20 (built with the cluster), else the one on PATH.
fn kubectl_bin() -> String {
    std::env::var("STREAMPIPE_TEST_NODE_KUBECTL").unwrap_or_else(|_| "kubectl".into())
}

fn kubectl_with(bin: &str, args: &[&str]) -> (bool, String, String) {
    let cfg = std::env::var("STREAMPIPE_TEST_NODE_KUBECONFIG").expect("node kubeconfig");
    let out = Command::new(bin)
        .args(args)
        .env("KUBECONFIG", cfg)
        .output()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn kubectl(args: &[&str]) -> (bool, String, String) {
    kubectl_with(&kubectl_bin(), args)
}

/// The kubectl on PATH, if there is one besides the cluster's: its version.
fn current_kubectl() -> Option<String> {
    if kubectl_bin() == "kubectl" {
        return None;
    }
    let out = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    })
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

fn get(kind: &str, name: &str) -> Option<Value> {
    kubectl_json(&["get", kind, name, "-n", NS])
}

/// Pods of a pipeline's role (`reducer` / `publisher`).
fn pods(pipeline: &str, component: &str) -> Vec<Value> {
    let sel =
        format!("app.kubernetes.io/instance={pipeline},app.kubernetes.io/component={component}");
    kubectl_json(&["get", "pods", "-n", NS, "-l", &sel])
        .and_then(|v| v["items"].as_array().cloned())
        .unwrap_or_default()
}

/// Running, every container ready, not being deleted.
fn pod_ready(p: &Value) -> bool {
    p["status"]["phase"] == "Running"
        && p["metadata"]["deletionTimestamp"].is_null()
        && p["status"]["containerStatuses"]
            .as_array()
            .is_some_and(|cs| !cs.is_empty() && cs.iter().all(|c| c["ready"] == true))
}

fn condition(sp: &Value, t: &str) -> Option<Value> {
    sp["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == t)
        .cloned()
}

/// The install, `kubectl apply -k manifests/`, for real with both
/// kubectls: the one built with the cluster (1.20, its kustomize v2.0.3),
/// then the current one on PATH (if it is another one) on top, which must
/// leave nothing to change (`kubectl diff -k` exits 0). Then waits for both
/// operator replicas to be ready. Once per test binary.
fn install() {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        let manifests = repo().join("manifests");
        let dir = manifests.to_str().unwrap();
        kubectl_ok(&["apply", "-k", dir]);
        if let Some(version) = current_kubectl() {
            let (ok, out, err) = kubectl_with("kubectl", &["apply", "-k", dir]);
            assert!(
                ok,
                "kubectl apply -k with the current kubectl ({version}): {err}"
            );
            eprintln!("the current kubectl ({version}) applied the install:\n{out}");
            let (ok, out, err) = kubectl_with("kubectl", &["diff", "-k", dir]);
            assert!(
                ok,
                "the current kubectl ({version}) still sees differences: {out}{err}"
            );
        }
        wait_for(Duration::from_secs(60), "CRD established", || {
            let crd = kubectl_json(&["get", "crd", "streampipelines.streampipe.dev"])?;
            crd["status"]["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
                .then_some(())
        });
        let started = Instant::now();
        wait_for(POD_TIMEOUT, "2 operator replicas ready", || {
            let d = get("deployment", "streampipe-operator")?;
            (d["status"]["readyReplicas"] == 2 && d["status"]["updatedReplicas"] == 2).then_some(())
        });
        eprintln!(
            "operator: 2 replicas ready {:?} after the apply",
            started.elapsed()
        );
    });
}

/// The operator's pods (ready, not terminating), by name.
fn operator_pods() -> Vec<Value> {
    kubectl_json(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/name=streampipe-operator",
    ])
    .and_then(|v| v["items"].as_array().cloned())
    .unwrap_or_default()
}

fn lease_holder() -> Option<String> {
    get("lease", LEASE)?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_owned)
}

/// A test pipeline on the dev broker (topics created there) whose Redis keys
/// are scoped by the install's namespace, as the operator's pods write them
/// (`STREAMPIPE_KEY_NAMESPACE`).
fn node_pipeline(partitions: i32) -> Pipeline {
    let mut p = Pipeline::new(Broker::Dev, partitions);
    p.config.key_namespace = Some(NS.to_owned());
    p
}

/// A pipeline's StreamPipeline in the install's namespace, named like the
/// test pipeline so the reducers write under the test pipeline's Redis
/// prefix.
fn apply_pipeline(p: &Pipeline, partitions_note: &str, extra: Value) {
    let secret = format!("{}-redis", p.name);
    let (ok, _, err) = kubectl(&[
        "create",
        "secret",
        "generic",
        &secret,
        "-n",
        NS,
        &format!("--from-literal=url={}", streampipe_tests::redis_url()),
    ]);
    assert!(ok, "redis secret: {err}");
    let mut spec = json!({
        "kafka": {
            "bootstrapServers": p.broker.bootstrap(),
            "dataTopic": p.config.data_topic,
            "commandTopic": p.config.command_topic,
            "deadLetterTopic": p.config.dead_letter_topic,
            "consumerGroup": p.config.group,
        },
        "redis": {"urlSecret": {"name": secret, "key": "url"}},
        "reducer": {"replicas": 1},
        // No allowedOrigins: the test client sends no Origin.
        "publisher": {"replicas": 1},
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    let sp = json!({
        "apiVersion": "streampipe.dev/v1alpha1", "kind": "StreamPipeline",
        "metadata": {"name": p.name, "namespace": NS},
        "spec": spec,
    });
    let path = std::env::temp_dir().join(format!("{}.json", p.name));
    std::fs::write(&path, serde_json::to_vec(&sp).unwrap()).unwrap();
    wait_for(Duration::from_secs(30), "pipeline accepted", || {
        kubectl(&["apply", "-f", path.to_str().unwrap()])
            .0
            .then_some(())
    });
    let _ = std::fs::remove_file(path);
    eprintln!("pipeline {} applied ({partitions_note})", p.name);
}

/// Deletes the pipeline and waits until none of its pods is left.
fn delete_pipeline(name: &str) {
    kubectl_ok(&["delete", "streampipeline", name, "-n", NS, "--wait=false"]);
    let started = Instant::now();
    wait_for(POD_TIMEOUT, "the deleted pipeline's pods gone", || {
        (pods(name, "reducer").is_empty() && pods(name, "publisher").is_empty()).then_some(())
    });
    eprintln!(
        "pipeline {name} deleted: pods gone after {:?}",
        started.elapsed()
    );
    for kind in ["deployment", "service", "configmap"] {
        let (ok, out, _) = kubectl(&[
            "get",
            kind,
            "-n",
            NS,
            "-l",
            &format!("app.kubernetes.io/instance={name}"),
            "-o",
            "name",
        ]);
        assert!(ok && out.trim().is_empty(), "{kind} of {name} left: {out}");
    }
    let _ = kubectl(&["delete", "secret", &format!("{name}-redis"), "-n", NS]);
}

/// `kubectl port-forward svc/NAME :80` on loopback; the local address.
struct PortForward {
    child: Child,
    addr: SocketAddr,
}

impl PortForward {
    fn service(name: &str, port: u16) -> Self {
        let cfg = std::env::var("STREAMPIPE_TEST_NODE_KUBECONFIG").unwrap();
        let mut child = Command::new(kubectl_bin())
            .args([
                "port-forward",
                "-n",
                NS,
                &format!("svc/{name}"),
                &format!(":{port}"),
                "--address",
                "127.0.0.1",
            ])
            .env("KUBECONFIG", cfg)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("kubectl port-forward");
        // "Forwarding from 127.0.0.1:PORT -> 8080"; later lines ("Handling
        // connection for PORT") are drained: a closed pipe would kill it.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        let addr = line
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("port-forward said {line:?}"));
        PortForward { child, addr }
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Install, a token-mode pipeline that becomes Ready with running pods, a
/// feed streamed through to a WebSocket client over `kubectl port-forward`
/// to the publisher Service (calls without a token, or with another
/// subject's, refused), and a deleted pipeline's pods gone.
#[test]
fn a_pipeline_runs_and_streams_on_a_real_node() {
    let Some(_cfg) = node_kubeconfig("a_pipeline_runs_and_streams_on_a_real_node") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    install();

    // The operator runs in-cluster as its ServiceAccount, locked down.
    let ops = operator_pods();
    assert_eq!(ops.len(), 2, "two operator pods");
    for p in &ops {
        assert_eq!(p["spec"]["serviceAccountName"], "streampipe-operator");
        assert_eq!(p["spec"]["securityContext"]["runAsUser"], 65532);
        assert!(
            pod_ready(p),
            "operator pod ready: {}",
            p["metadata"]["name"]
        );
    }
    let names: Vec<&str> = ops
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    let holder = wait_for(Duration::from_secs(30), "a leader", lease_holder);
    assert!(
        names.contains(&holder.as_str()),
        "leader {holder} is one of {names:?}"
    );

    // Token mode (#9): the HS256 secret reaches the publisher pod only
    // through a secretKeyRef the operator wires from spec.publisher.auth.
    let p = node_pipeline(2);
    let key_secret = format!("{}-auth", p.name);
    let (ok, _, err) = kubectl(&[
        "create",
        "secret",
        "generic",
        &key_secret,
        "-n",
        NS,
        &format!(
            "--from-literal=hs256={}",
            streampipe_tests::auth::TEST_SECRET
        ),
    ]);
    assert!(ok, "auth secret: {err}");
    let t0 = Instant::now();
    apply_pipeline(
        &p,
        "2 partitions, token mode",
        json!({"publisher": {"replicas": 1, "auth": {
            "mode": "token", "hs256Secret": {"name": key_secret, "key": "hs256"}}}}),
    );
    let sp = wait_for(POD_TIMEOUT, "pipeline Ready", || {
        let sp = get("streampipeline", &p.name)?;
        (condition(&sp, "Ready")?["status"] == "True").then_some(sp)
    });
    eprintln!("pipeline Ready {:?} after the apply", t0.elapsed());
    assert_eq!(sp["status"]["ready"], "True");
    assert_eq!(sp["status"]["reducer"]["readyReplicas"], 1);
    assert_eq!(sp["status"]["publisher"]["readyReplicas"], 1);
    // Partitions and lag are the autoscaler's readings: none without it.
    assert!(sp["status"]["partitions"].is_null(), "{sp}");
    for role in ["reducer", "publisher"] {
        let ps = pods(&p.name, role);
        assert_eq!(ps.len(), 1, "{role} pods");
        assert!(pod_ready(&ps[0]), "{role} pod running and ready");
        let c = &ps[0]["spec"]["containers"][0];
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    }
    // Printer columns: Ready, Reducers, Publishers (Partitions, Lag empty).
    let table = kubectl_ok(&["get", "spl", &p.name, "-n", NS]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        &row[1..4],
        &["True", "1/1", "1/1"],
        "printer columns:\n{table}"
    );
    eprintln!("{table}");

    // A feed through broker → reducer pod → Redis → publisher pod → client.
    let pf = PortForward::service(&format!("{}-publisher", p.name), 80);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // No token, or another subject's: refused (401 / the channel is not
        // theirs, 404). The harness's own token streams.
        let body = r#"{"markets":["m1"]}"#;
        let r = http_as(pf.addr, "POST", "/v1/channels", Some(body), None).await;
        assert_eq!(r.status, 401, "no token: {}", r.body);
        let channel = create_channel(pf.addr, &["m1", "m2"]).await;
        let other = streampipe_tests::auth::token_for("someone-else", &["*"], 600);
        let path = format!("/v1/channels/{channel}/begin");
        let r = http_as(pf.addr, "POST", &path, None, Some(&other)).await;
        assert_eq!(r.status, 404, "another subject's channel: {}", r.body);
        let mut ws = open_stream(pf.addr, &channel).await;
        p.wait_subscribed(&channel, "m1");
        for v in 1..=5 {
            p.update("m1", v, &format!("{{\"price\":{v}}}"));
            p.update("m2", v, &format!("{{\"price\":{}}}", 10 * v));
            p.flush();
        }
        let mut got = Vec::new();
        read_updates(&mut ws, &mut got, "m1@5 and m2@5 through the node", |g| {
            has(g, "m1", 5) && has(g, "m2", 5)
        })
        .await;
        eprintln!("{} updates streamed through port-forward", got.len());
    });
    assert_eq!(p.state_version("m1"), 5);
    drop(pf);

    delete_pipeline(&p.name);
    let _ = kubectl(&["delete", "secret", &key_secret, "-n", NS]);
}

/// Autoscaling with the loop closed: a backlog raises the reducers to the
/// partition count (not beyond), the new pods join the group and drain the
/// lag, a deleted reducer pod loses nothing, and after the stabilization
/// window the reducers scale back down; every market's final version in
/// Redis equals the last one produced.
#[test]
fn autoscaling_closes_the_loop_on_a_real_node() {
    let Some(_cfg) = node_kubeconfig("autoscaling_closes_the_loop_on_a_real_node") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    install();
    const PARTITIONS: i32 = 4;
    // A backlog the first lag reading sees: produced before the pipeline
    // exists (one reducer drains 20 000 records between two
    // 2 s polls, so a backlog produced later may never be seen).
    const MARKETS: u64 = 2000;
    const VERSIONS: u64 = 100;
    let p = node_pipeline(PARTITIONS);
    let t0 = Instant::now();
    for v in 1..=VERSIONS {
        for m in 0..MARKETS {
            p.update(&format!("m{m}"), v, &format!("{{\"p\":{v}}}"));
        }
    }
    p.flush();
    eprintln!(
        "backlog of {} records produced in {:?}",
        MARKETS * VERSIONS,
        t0.elapsed()
    );
    let t0 = Instant::now();
    apply_pipeline(
        &p,
        "4 partitions, autoscaling 1..10",
        json!({"autoscaling": {
            "enabled": true, "minReplicas": 1, "maxReplicas": 10, "lagThreshold": 500,
            "pollIntervalSeconds": 2, "scaleDownStabilizationSeconds": 20,
        }}),
    );

    let mut max_replicas = 0;
    wait_for(
        POD_TIMEOUT,
        "reducers scaled to the partition count",
        || {
            let d = get("deployment", &format!("{}-reducer", p.name))?;
            let n = d["spec"]["replicas"].as_i64()?;
            max_replicas = max_replicas.max(n);
            (n == PARTITIONS as i64).then_some(())
        },
    );
    eprintln!(
        "scaled to {PARTITIONS} reducers {:?} after the apply",
        t0.elapsed()
    );
    // One of the new reducers is deleted while they drain: its partitions
    // move on, nothing is lost.
    let victim = wait_for(POD_TIMEOUT, "a running reducer to delete", || {
        pods(&p.name, "reducer")
            .into_iter()
            .find(pod_ready)
            .and_then(|p| p["metadata"]["name"].as_str().map(str::to_owned))
    });
    kubectl_ok(&["delete", "pod", &victim, "-n", NS, "--wait=false"]);
    eprintln!("deleted reducer pod {victim}");

    let mut max_ready = 0;
    let drained = wait_for(Duration::from_secs(240), "lag drained", || {
        let d = get("deployment", &format!("{}-reducer", p.name))?;
        max_replicas = max_replicas.max(d["spec"]["replicas"].as_i64()?);
        max_ready = max_ready.max(d["status"]["readyReplicas"].as_i64().unwrap_or(0));
        let sp = get("streampipeline", &p.name)?;
        (sp["status"]["totalLag"] == 0).then_some(sp)
    });
    eprintln!(
        "lag drained {:?} after the apply (most reducers ready at once: {max_ready})",
        t0.elapsed()
    );
    assert!(
        max_replicas <= PARTITIONS as i64,
        "never above the partition count: saw {max_replicas}"
    );
    assert_eq!(drained["status"]["partitions"], PARTITIONS);
    for m in 0..MARKETS {
        assert_eq!(
            p.state_version(&format!("m{m}")),
            VERSIONS,
            "market m{m}'s final version"
        );
    }
    // The scale-up's pods really ran while there was lag to drain.
    assert!(
        max_ready >= 2,
        "at most {max_ready} reducer ready while draining"
    );

    wait_for(
        Duration::from_secs(120),
        "reducers scaled back down",
        || {
            let d = get("deployment", &format!("{}-reducer", p.name))?;
            (d["spec"]["replicas"] == 1).then_some(())
        },
    );
    eprintln!(
        "scaled back to 1 reducer {:?} after the apply",
        t0.elapsed()
    );
    delete_pipeline(&p.name);
}

/// Killing the operator's leader pod hands the Lease over to the standby,
/// which then reconciles.
#[test]
fn killing_the_leader_pod_hands_over() {
    let Some(_cfg) = node_kubeconfig("killing_the_leader_pod_hands_over") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    install();
    wait_for(POD_TIMEOUT, "2 operator replicas ready", || {
        let d = get("deployment", "streampipe-operator")?;
        (d["status"]["readyReplicas"] == 2).then_some(())
    });
    let leader = wait_for(Duration::from_secs(30), "a leader", lease_holder);
    let t0 = Instant::now();
    kubectl_ok(&[
        "delete",
        "pod",
        &leader,
        "-n",
        NS,
        "--grace-period=0",
        "--force",
    ]);
    let next = wait_for(Duration::from_secs(60), "another leader", || {
        lease_holder().filter(|h| *h != leader)
    });
    eprintln!(
        "leader {leader} killed: {next} leads after {:?}",
        t0.elapsed()
    );

    // The new leader reconciles: a pipeline comes up.
    let p = node_pipeline(1);
    apply_pipeline(&p, "1 partition", json!({}));
    wait_for(POD_TIMEOUT, "pipeline Ready under the new leader", || {
        let sp = get("streampipeline", &p.name)?;
        (condition(&sp, "Ready")?["status"] == "True").then_some(())
    });
    delete_pipeline(&p.name);
}

/// The live page, served by a publisher pod, in headless Chromium through
/// `kubectl port-forward` to the publisher Service: it goes live with the
/// demo markets the pipeline's spec names and its prices move while a feed
/// runs (the same checks as tests/tests/browser.rs against a local
/// publisher). The page is same-origin with the forwarded address, so no
/// `allowedOrigins` is needed.
#[test]
fn the_live_page_moves_in_chromium_through_port_forward() {
    let Some(_cfg) = node_kubeconfig("the_live_page_moves_in_chromium_through_port_forward") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    install();
    const MARKETS: [&str; 4] = [
        "football.epl.1:match_odds",
        "football.laliga.2:match_odds",
        "football.seriea.3:match_odds",
        "football.ligue1.4:match_odds",
    ];
    let p = Arc::new(node_pipeline(2));
    apply_pipeline(
        &p,
        "2 partitions, demo markets",
        json!({"publisher": {"replicas": 1, "env": [
            {"name": "STREAMPIPE_DEMO_MARKETS", "value": MARKETS.join(",")},
        ]}}),
    );
    wait_for(POD_TIMEOUT, "pipeline Ready", || {
        let sp = get("streampipeline", &p.name)?;
        (condition(&sp, "Ready")?["status"] == "True").then_some(())
    });
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed_odds(
        p.clone(),
        MARKETS.iter().map(|m| m.to_string()).collect(),
        stop.clone(),
    );
    let pf = PortForward::service(&format!("{}-publisher", p.name), 80);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let shot = rt.block_on(async {
        let mut b = Browser::launch().await;
        let url = format!("http://{}/", pf.addr);
        let shot = assert_live_page_moves(&mut b, &url, MARKETS.len(), "node-live-page.png").await;
        let state = b
            .eval("JSON.stringify(window.streampipe && window.streampipe.stats)")
            .await;
        eprintln!("the page at {url} (publisher pod via port-forward) moves: stats {state}");
        shot
    });
    eprintln!("screenshot kept at {}", shot.display());
    stop.store(true, Ordering::SeqCst);
    let last = feeder.join().unwrap();
    assert_eq!(p.state_version(MARKETS[0]), last, "the reducer pod kept up");
    drop(pf);
    delete_pipeline(&p.name);
}

/// The reducer setting whose change the rolling test makes (a real one:
/// records per Redis batch).
const ROLLED_SETTING: &str = "STREAMPIPE_BATCH_MAX_RECORDS";

/// Whether a pod's container carries `name=value` in its env.
fn pod_env_is(pod: &Value, name: &str, value: &str) -> bool {
    pod["spec"]["containers"][0]["env"]
        .as_array()
        .is_some_and(|env| env.iter().any(|e| e["name"] == name && e["value"] == value))
}

/// A rolling change of the reducer configuration (a setting changed in the
/// StreamPipeline spec: the operator changes the reducer Deployment's pod
/// template and Kubernetes replaces the pods one by one) while a feed runs,
/// then a deleted reducer pod while the last versions are produced: every
/// market's final version in Redis equals the last one produced.
#[test]
fn a_rolling_reducer_change_and_a_deleted_pod_lose_no_latest_version() {
    let Some(_cfg) =
        node_kubeconfig("a_rolling_reducer_change_and_a_deleted_pod_lose_no_latest_version")
    else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    install();
    const REDUCERS: i64 = 2;
    // 50 markets every 100 ms: 500 records/s, which a debug-built reducer
    // keeps up with, spread over all 4 partitions.
    const MARKETS: usize = 50;
    let markets: Vec<String> = (0..MARKETS)
        .map(|m| format!("roll.{m}:match_odds"))
        .collect();
    let p = Arc::new(node_pipeline(4));
    apply_pipeline(
        &p,
        "4 partitions, 2 reducers",
        json!({"reducer": {"replicas": REDUCERS}}),
    );
    let reducer = format!("{}-reducer", p.name);
    wait_for(POD_TIMEOUT, "2 reducers ready", || {
        let d = get("deployment", &reducer)?;
        (d["status"]["readyReplicas"] == REDUCERS).then_some(())
    });
    let before: Vec<String> = pods(&p.name, "reducer")
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed_odds(p.clone(), markets.clone(), stop.clone());
    std::thread::sleep(Duration::from_secs(3));

    // The change: one reducer setting in the spec.
    let t0 = Instant::now();
    let patch = json!({"spec": {"reducer": {"replicas": REDUCERS, "env": [
        {"name": ROLLED_SETTING, "value": "100"},
    ]}}});
    kubectl_ok(&[
        "patch",
        "streampipeline",
        &p.name,
        "-n",
        NS,
        "--type",
        "merge",
        "-p",
        &patch.to_string(),
    ]);
    let rolled = wait_for(Duration::from_secs(240), "the reducers rolled", || {
        let ps = pods(&p.name, "reducer");
        let done = ps.len() == REDUCERS as usize
            && ps
                .iter()
                .all(|p| pod_ready(p) && pod_env_is(p, ROLLED_SETTING, "100"));
        done.then_some(ps)
    });
    eprintln!(
        "reducers rolled to {ROLLED_SETTING}=100 in {:?} while the feed ran",
        t0.elapsed()
    );
    for pod in &rolled {
        let name = pod["metadata"]["name"].as_str().unwrap();
        assert!(!before.iter().any(|b| b == name), "{name} was replaced");
    }
    let d = get("deployment", &reducer).unwrap();
    assert_eq!(d["status"]["updatedReplicas"], REDUCERS, "{d}");

    // A reducer pod deleted while the last versions are produced: its
    // partitions move to the other one (and back once it is replaced).
    let victim = rolled[0]["metadata"]["name"].as_str().unwrap().to_owned();
    kubectl_ok(&["delete", "pod", &victim, "-n", NS, "--wait=false"]);
    eprintln!("deleted reducer pod {victim}");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    let last = feeder.join().unwrap();
    eprintln!("feed stopped at version {last} of {MARKETS} markets");

    let t1 = Instant::now();
    wait_for(
        Duration::from_secs(180),
        "every market's final version in Redis",
        || {
            markets
                .iter()
                .all(|m| p.state_version(m) == last)
                .then_some(())
        },
    );
    eprintln!(
        "every market at version {last} {:?} after the feed stopped",
        t1.elapsed()
    );
    for m in &markets {
        assert_eq!(p.state_version(m), last, "market {m}'s final version");
    }
    delete_pipeline(&p.name);
}

/// One policy's run in [`autoscaling_policies_compared_on_a_real_node`].
struct PolicyRun {
    policy: &'static str,
    steps: usize,
    max_replicas: i64,
    peak_lag: i64,
    drained_after: Option<Duration>,
    over_target: Duration,
}

/// Steady arrivals of the comparison: 20 markets every [`FEED_INTERVAL`]
/// (at most 200 records/s; ~100/s measured, the flush waits for the
/// broker's acknowledgements), like the replay's burst trace.
const COMPARE_MARKETS: usize = 20;
/// The burst on top, produced before the pipeline exists: more than one
/// debug-built reducer (~12 000 records/s here) drains within the target,
/// and below the dev broker's ~5 MiB per partition.
const COMPARE_BACKLOG: u64 = 300_000;
/// drainTime's target (`targetDrainSeconds`); the lag rule is judged by it too.
const COMPARE_TARGET: Duration = Duration::from_secs(15);
/// How long each policy runs after its apply: the drain, then two
/// scale-down windows of steady arrivals (where the lag rule's self-inflicted
/// lag shows).
const COMPARE_RUN: Duration = Duration::from_secs(150);
/// The backlog counts as drained once the lag is below this many seconds of
/// arrivals (a consumer that keeps up still trails by its 5 s commit
/// interval).
const COMPARE_DRAINED_SECONDS: i64 = 10;

/// Runs the burst-on-steady-arrivals load against one policy and measures it.
fn run_policy(policy: &'static str) -> PolicyRun {
    let p = Arc::new(node_pipeline(8));
    let markets: Vec<String> = (0..COMPARE_MARKETS)
        .map(|m| format!("steady.{m}:match_odds"))
        .collect();
    let per_market = COMPARE_BACKLOG / 1000;
    for v in 1..=per_market {
        for m in 0..1000 {
            p.update(
                &format!("burst.{m}:match_odds"),
                v,
                &format!("{{\"p\":{v}}}"),
            );
        }
    }
    p.flush();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = streampipe_tests::browser::feed_odds(p.clone(), markets, stop.clone());
    let t0 = Instant::now();
    apply_pipeline(
        &p,
        &format!("8 partitions, policy {policy}"),
        json!({"autoscaling": {
            "enabled": true, "minReplicas": 1, "maxReplicas": 8, "lagThreshold": 500,
            "pollIntervalSeconds": 2, "scaleDownStabilizationSeconds": 30,
            "policy": policy, "targetDrainSeconds": COMPARE_TARGET.as_secs(),
        }}),
    );
    let arrivals =
        (COMPARE_MARKETS as f64 / streampipe_tests::browser::FEED_INTERVAL.as_secs_f64()) as i64;
    let mut run = PolicyRun {
        policy,
        steps: 0,
        max_replicas: 0,
        peak_lag: 0,
        drained_after: None,
        over_target: Duration::ZERO,
    };
    // Both start from one reducer (`minReplicas`): the first scale-up is
    // a step even when the Deployment is created at its size.
    let mut replicas: Option<i64> = Some(1);
    let deployment = format!("{}-reducer", p.name);
    while t0.elapsed() < COMPARE_RUN {
        let (Some(d), Some(sp)) = (
            get("deployment", &deployment),
            get("streampipeline", &p.name),
        ) else {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        };
        let now = t0.elapsed();
        if let Some(n) = d["spec"]["replicas"].as_i64() {
            if replicas.is_some_and(|r| r != n) {
                run.steps += 1;
                eprintln!(
                    "[{policy}] {:>5.1}s step {} → {n}: {}",
                    now.as_secs_f64(),
                    replicas.unwrap(),
                    sp["status"]["autoscalingDecision"]
                );
            }
            replicas = Some(n);
            run.max_replicas = run.max_replicas.max(n);
        }
        if let Some(lag) = sp["status"]["totalLag"].as_i64() {
            run.peak_lag = run.peak_lag.max(lag);
            if run.drained_after.is_none() && lag <= arrivals * COMPARE_DRAINED_SECONDS {
                run.drained_after = Some(now);
                eprintln!(
                    "[{policy}] {:>5.1}s backlog drained (lag {lag})",
                    now.as_secs_f64()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    run.over_target = run
        .drained_after
        .unwrap_or(COMPARE_RUN)
        .saturating_sub(COMPARE_TARGET);
    stop.store(true, Ordering::SeqCst);
    feeder.join().unwrap();
    delete_pipeline(&p.name);
    run
}

/// Issue #14: the drain-time policy against the lag rule on the real node,
/// on the same load (a 300 000-record burst on ~100 records/s of steady
/// arrivals, 8 partitions, 1 reducer at the start, the same limits and
/// windows): scale steps, most reducers, peak lag, when the burst was
/// drained and the seconds past the 15 s target. A measurement (minutes),
/// run by hand; its figures are in docs/benchmarks.md:
/// `cargo test --workspace --test node_e2e -- --ignored --nocapture autoscaling_policies`
#[test]
#[ignore = "a 6-minute measurement; figures in docs/benchmarks.md"]
fn autoscaling_policies_compared_on_a_real_node() {
    let Some(_cfg) = node_kubeconfig("autoscaling_policies_compared_on_a_real_node") else {
        return;
    };
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    install();
    let runs: Vec<PolicyRun> = ["lag", "drainTime"].into_iter().map(run_policy).collect();
    eprintln!(
        "| policy | scale steps | max reducers | peak lag | burst drained after | s over target |"
    );
    eprintln!("|---|---:|---:|---:|---:|---:|");
    for r in &runs {
        eprintln!(
            "| {} | {} | {} | {} | {} | {} |",
            r.policy,
            r.steps,
            r.max_replicas,
            r.peak_lag,
            r.drained_after
                .map(|d| format!("{:.0} s", d.as_secs_f64()))
                .unwrap_or_else(|| "not".into()),
            r.over_target.as_secs()
        );
    }
    let (lag, drain) = (&runs[0], &runs[1]);
    assert!(drain.drained_after.is_some(), "drainTime drained the burst");
    assert!(
        drain.steps <= lag.steps,
        "drainTime took {} steps, the lag rule {}",
        drain.steps,
        lag.steps
    );
}
