//! `streampipe-operator`: parse configuration, start telemetry and the
//! metrics endpoint, take the leader Lease, and run the controller while
//! leader. Runs in cluster or out of cluster with `KUBECONFIG`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use kube::runtime::events::Reporter;
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use streampipe_operator::controller::{detect_features, run};
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
    /// Only watch this namespace [default: all namespaces].
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
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
        run(
            ctx,
            args.namespace.clone(),
            async move { s.notified().await },
        )
        .await;
        return Ok(());
    }

    let lease_ns = match args.lease_namespace.clone() {
        Some(ns) => ns,
        None => client.default_namespace().to_owned(),
    };
    let manager = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&lease_ns)
        .with_identity(&identity)
        .with_duration(args.lease_duration)
        .with_grace(args.lease_duration / 3)
        .with_field_manager("streampipe-operator")
        .build()
        .await
        .context("creating the lease manager")?;
    let (mut leader, lease_task) = manager.watch().await;
    tracing::info!(lease = %args.lease_name, namespace = %lease_ns, %identity, "waiting for leadership");
    loop {
        // Standby until we hold the Lease (or are told to stop).
        tokio::select! {
            r = leader.wait_for(|l| *l) => { r.context("lease manager stopped")?; }
            _ = stop.notified() => break,
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
        run(ctx.clone(), args.namespace.clone(), async move {
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
