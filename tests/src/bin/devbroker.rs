//! `streampipe-devbroker`: a dev-only Kafka-protocol broker hosting
//! librdkafka's mock cluster (bundled in `rdkafka`) on fixed loopback ports.
//!
//! The mock cluster binds random ports, so this binary listens on the fixed
//! ports itself, forwards each connection to the mock broker behind it, and
//! advertises the fixed ports in metadata (`rd_kafka_mock_broker_set_host_port`),
//! so clients only ever see the fixed addresses. Topics cannot be created
//! through the Kafka admin API on the mock cluster; they are created from
//! `--topic NAME:PARTITIONS` flags and through a small HTTP admin endpoint:
//! `POST /topics/NAME?partitions=N`. Everything is in memory, and each
//! partition keeps at most ~5 MiB (librdkafka's mock segment limit).
//! Not for production: there is no persistence and no replication.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka_sys as rdsys;
use tokio::net::{TcpListener, TcpStream};
use warp::Filter;

/// librdkafka's mock Kafka cluster on fixed loopback ports (dev and tests only).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// First fixed Kafka port; broker i listens on PORT + i - 1.
    #[arg(long, default_value = "127.0.0.1:19092")]
    listen: SocketAddr,
    /// Number of mock brokers.
    #[arg(long, default_value_t = 1)]
    brokers: u16,
    /// HTTP admin address (`POST /topics/NAME?partitions=N`, `GET /healthz`).
    #[arg(long, default_value = "127.0.0.1:19093")]
    admin: SocketAddr,
    /// Topic to create at start, `NAME:PARTITIONS` (repeatable).
    #[arg(long = "topic")]
    topics: Vec<String>,
}

/// The mock cluster's raw handle. librdkafka's mock API is thread-safe: each
/// call is posted to the cluster's own thread.
struct Cluster {
    raw: *mut rdsys::rd_kafka_mock_cluster_t,
    // Keeps the client that owns the mock cluster alive.
    _owner: BaseProducer,
}

// SAFETY: see the struct comment; the pointer stays valid while `_owner` lives.
unsafe impl Send for Cluster {}
unsafe impl Sync for Cluster {}

impl Cluster {
    fn new(brokers: u16) -> anyhow::Result<Self> {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .create()
            .context("creating the mock cluster")?;
        // SAFETY: the client is valid; the handle lives as long as it does.
        let raw = unsafe { rdsys::rd_kafka_handle_mock_cluster(owner.client().native_ptr()) };
        if raw.is_null() {
            bail!("librdkafka did not create a mock cluster");
        }
        // Consumer groups start at once instead of after 3 s, as tests expect.
        unsafe { rdsys::rd_kafka_mock_group_initial_rebalance_delay_ms(raw, 0) };
        Ok(Cluster { raw, _owner: owner })
    }

    fn bootstraps(&self) -> String {
        // SAFETY: returns a string owned by the cluster.
        unsafe { CStr::from_ptr(rdsys::rd_kafka_mock_cluster_bootstraps(self.raw)) }
            .to_string_lossy()
            .into_owned()
    }

    fn advertise(&self, broker_id: i32, addr: SocketAddr) {
        let host = CString::new(addr.ip().to_string()).expect("no NUL in an IP");
        unsafe {
            rdsys::rd_kafka_mock_broker_set_host_port(
                self.raw,
                broker_id,
                host.as_ptr(),
                i32::from(addr.port()),
            )
        };
    }

    fn create_topic(&self, name: &str, partitions: i32) -> Result<(), String> {
        if name.is_empty()
            || name.len() > 249
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(format!("invalid topic name {name:?}"));
        }
        if !(1..=1024).contains(&partitions) {
            return Err(format!("partitions must be 1..=1024, got {partitions}"));
        }
        let c = CString::new(name).expect("validated");
        let err = unsafe { rdsys::rd_kafka_mock_topic_create(self.raw, c.as_ptr(), partitions, 1) };
        if err == rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            Ok(())
        } else {
            Err(format!("creating topic {name:?}: {err:?}"))
        }
    }
}

fn parse_topic(spec: &str) -> anyhow::Result<(String, i32)> {
    let (name, parts) = spec
        .rsplit_once(':')
        .with_context(|| format!("--topic wants NAME:PARTITIONS, got {spec:?}"))?;
    Ok((name.to_owned(), parts.parse().context("partitions")?))
}

async fn forward(listener: TcpListener, upstream: SocketAddr) {
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            match TcpStream::connect(upstream).await {
                Ok(mut server) => {
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
                Err(e) => eprintln!("devbroker: cannot reach mock broker {upstream}: {e}"),
            }
        });
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cluster = Arc::new(Cluster::new(args.brokers)?);

    // Broker ids are 1..=N and the bootstrap list is in id order.
    let upstreams: Vec<SocketAddr> = cluster
        .bootstraps()
        .split(',')
        .map(|s| s.trim().parse().context("mock bootstrap address"))
        .collect::<anyhow::Result<_>>()?;
    let mut fixed = Vec::new();
    for (i, upstream) in upstreams.iter().enumerate() {
        let addr = SocketAddr::new(args.listen.ip(), args.listen.port() + i as u16);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        cluster.advertise(i as i32 + 1, addr);
        tokio::spawn(forward(listener, *upstream));
        fixed.push(addr.to_string());
    }
    for spec in &args.topics {
        let (name, parts) = parse_topic(spec)?;
        cluster
            .create_topic(&name, parts)
            .map_err(anyhow::Error::msg)?;
    }

    let c = cluster.clone();
    let create = warp::path!("topics" / String)
        .and(warp::post())
        .and(warp::query::<HashMap<String, String>>())
        .map(move |name: String, q: HashMap<String, String>| {
            let parts = q
                .get("partitions")
                .and_then(|p| p.parse().ok())
                .unwrap_or(1);
            match c.create_topic(&name, parts) {
                Ok(()) => warp::reply::with_status(
                    format!("created {name} with {parts} partitions\n"),
                    warp::http::StatusCode::CREATED,
                ),
                Err(e) => {
                    warp::reply::with_status(format!("{e}\n"), warp::http::StatusCode::BAD_REQUEST)
                }
            }
        });
    let bootstrap = fixed.join(",");
    let b = bootstrap.clone();
    let health = warp::path!("healthz").map(move || format!("ok {b}\n"));
    let admin = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("binding admin {}", args.admin))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = warp::serve(create.or(health))
        .incoming(admin)
        .graceful(async {
            let _ = stop_rx.await;
        })
        .run();
    let server = tokio::spawn(server);
    println!(
        "devbroker ready: bootstrap={bootstrap} admin=http://{}",
        args.admin
    );

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    Ok(())
}
