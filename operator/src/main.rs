//! `streampipe-operator`: parse configuration, start telemetry and the
//! metrics endpoint, take the leader Lease, and run the controller while
//! leader. Runs in cluster or out of cluster with `KUBECONFIG`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::Reporter;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use streampipe_operator::controller::{detect_features, run};
use streampipe_operator::scope::WatchScope;
use streampipe_operator::{Context, Metrics};
use warp::Filter;

/// Reconciles StreamPipeline resources into reducer and publisher Deployments.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "STREAMPIPE_OPERATOR_LISTEN",
        default_value = "0.0.0.0:8081"
    )]
    listen: SocketAddr,
    /// Namespaces to watch, comma-separated; `*` watches every namespace
    /// (cluster-wide mode: needs the ClusterRoleBinding of
    /// `manifests/cluster-wide/`) [default: the operator's own namespace].
    /// Each namespace needs a RoleBinding to the `streampipe-operator`
    /// ClusterRole. `WATCH_NAMESPACE` (one name) is still read when unset.
    #[arg(long, alias = "namespace", env = "STREAMPIPE_WATCH_NAMESPACES")]
    namespaces: Option<String>,
    /// Take a coordination.k8s.io Lease before reconciling, so several
    /// replicas can run safely.
    #[arg(long, env = "STREAMPIPE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the Lease.
    #[arg(
        long,
        env = "STREAMPIPE_LEASE_NAME",
        default_value = "streampipe-operator"
    )]
    lease_name: String,
    /// Namespace of the Lease [default: the pod's namespace, else the kubeconfig's].
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease [default: pod name, else host name + pid].
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a Lease is valid without renewal (a standby takes over after that).
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Log format.
    #[arg(long, env = "STREAMPIPE_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// What ended a standby wait.
enum Standby {
    Leading,
    Released,
    Stop,
}

/// Leader election on one Lease with `kube-lease-manager`.
struct Election {
    client: Client,
    name: String,
    namespace: String,
    identity: String,
    duration: u64,
}

impl Election {
    /// A lease manager in watch mode: its state channel and task.
    async fn start(
        &self,
    ) -> anyhow::Result<(
        tokio::sync::watch::Receiver<bool>,
        tokio::task::JoinHandle<kube_lease_manager::Result<LeaseManager>>,
    )> {
        let manager = LeaseManagerBuilder::new(self.client.clone(), &self.name)
            .with_namespace(&self.namespace)
            .with_identity(&self.identity)
            .with_duration(self.duration)
            .with_grace((self.duration / 3).max(1))
            // One field manager per replica: the manager takes a free Lease
            // with a server-side apply of `holderIdentity`, which only
            // conflicts (and so only excludes a second taker) between
            // different field managers.
            .with_field_manager(lease_field_manager(&self.identity))
            .build()
            .await
            .context("creating the lease manager")?;
        Ok(manager.watch().await)
    }

    /// Resolves once the Lease, seen held by another replica, shows no
    /// holder: that replica released it (a graceful stop). Watches only this
    /// one Lease (a field selector on its name, which RBAC `resourceNames`
    /// authorizes).
    async fn released_by_other(&self) {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.namespace);
        let cfg = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut leases = std::pin::pin!(watcher(api, cfg).default_backoff().applied_objects());
        let mut held_by_other = false;
        while let Some(lease) = leases.next().await {
            let lease = match lease {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "watching the Lease");
                    continue;
                }
            };
            match lease.spec.and_then(|s| s.holder_identity) {
                Some(h) => held_by_other = h != self.identity,
                None if held_by_other => return,
                None => {}
            }
        }
        std::future::pending::<()>().await
    }
}

/// The server-side apply field manager of this replica's Lease writes.
fn lease_field_manager(identity: &str) -> String {
    let mut m = format!("streampipe-operator-{identity}");
    // The API server accepts at most 128 characters.
    while m.len() > 128 {
        m.pop();
    }
    m
}

async fn signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args.log_format);
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let own_namespace = std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let flag = args
        .namespaces
        .clone()
        .or_else(|| std::env::var("WATCH_NAMESPACE").ok());
    let scope = WatchScope::parse(flag.as_deref(), &own_namespace)?;
    tracing::info!(%scope, "watched namespaces");
    let features = detect_features(&client).await;
    tracing::info!(?features, "API server capabilities");
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let metrics = Arc::new(Metrics::new());
    let reporter = Reporter {
        controller: "streampipe-operator".into(),
        instance: Some(identity.clone()),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        reporter,
        metrics.clone(),
        features,
    ));

    let leading = Arc::new(AtomicBool::new(!args.leader_election));
    let (m, l) = (metrics.clone(), leading.clone());
    let routes = warp::path!("metrics")
        .map(move || {
            let mut text = m.render();
            text.push_str(&format!(
                "# HELP streampipe_operator_leader 1 while this replica holds the Lease\n# TYPE streampipe_operator_leader gauge\nstreampipe_operator_leader {}\n",
                u8::from(l.load(Ordering::SeqCst))
            ));
            warp::reply::with_header(text, "content-type", "text/plain; version=0.0.4")
        })
        .or(warp::path!("healthz").map(|| "ok\n"))
        .or(warp::path!("readyz").map(|| "ok\n"));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .context("binding the metrics endpoint")?;
    tokio::spawn(warp::serve(routes).incoming(listener).run());

    let stop = Arc::new(tokio::sync::Notify::new());
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            signal().await;
            stop.notify_waiters();
            stop.notify_one();
        });
    }

    if !args.leader_election {
        let s = stop.clone();
        run(ctx, scope, async move { s.notified().await }).await;
        return Ok(());
    }

    let lease_ns = args.lease_namespace.clone().unwrap_or(own_namespace);
    let election = Election {
        client: client.clone(),
        name: args.lease_name.clone(),
        namespace: lease_ns.clone(),
        identity: identity.clone(),
        duration: args.lease_duration,
    };
    let (mut leader, mut lease_task) = election.start().await?;
    tracing::info!(lease = %args.lease_name, namespace = %lease_ns, %identity, "waiting for leadership");
    loop {
        // Standby until we hold the Lease (or are told to stop). The lease
        // manager alone would sleep until the holder's lock expires even
        // when the holder released it; so the Lease is watched too, and a
        // release starts a new manager, which reads the Lease at once and
        // takes it (`released_by_other`).
        let woke = tokio::select! {
            r = leader.wait_for(|l| *l) => { r.context("lease manager stopped")?; Standby::Leading }
            _ = election.released_by_other() => Standby::Released,
            _ = stop.notified() => Standby::Stop,
        };
        match woke {
            Standby::Leading => {}
            Standby::Stop => break,
            Standby::Released => {
                tracing::info!("the Lease was released: trying to take it now");
                drop(leader);
                let _ = lease_task.await;
                (leader, lease_task) = election.start().await?;
                continue;
            }
        }
        leading.store(true, Ordering::SeqCst);
        tracing::info!("leading: reconciling");
        let lost = Arc::new(tokio::sync::Notify::new());
        let (mut l2, lost2) = (leader.clone(), lost.clone());
        let watcher = tokio::spawn(async move {
            let _ = l2.wait_for(|l| !*l).await;
            lost2.notify_one();
        });
        let (s, lo) = (stop.clone(), lost.clone());
        let stopping = Arc::new(AtomicBool::new(false));
        let st = stopping.clone();
        run(ctx.clone(), scope.clone(), async move {
            tokio::select! {
                _ = s.notified() => st.store(true, Ordering::SeqCst),
                _ = lo.notified() => {}
            }
        })
        .await;
        watcher.abort();
        leading.store(false, Ordering::SeqCst);
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        tracing::warn!("lost the Lease: standing by");
    }
    // Dropping the receiver makes the manager release the Lease at once, so
    // a standby replica takes over without waiting for it to expire.
    drop(leader);
    let _ = lease_task.await;
    tracing::info!("stopped");
    Ok(())
}
