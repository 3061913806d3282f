//! The reducer on a real Redis Cluster (3 masters + 3 replicas started by
//! `scripts/redis-cluster.sh`) with the dev broker of the stack
//! (`scripts/stack.sh up`). Each test starts its own cluster on
//! `STREAMPIPE_TEST_CLUSTER_PORT` (default [`DEFAULT_BASE_PORT`]) plus an offset.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use streampipe_contract::CommandKind;
use streampipe_reducer::{spawn, Metrics};
use streampipe_tests::{wait_for, Broker, Pipeline, PrivateCluster};

/// Markets per test: enough to land on every master many times over.
const MARKETS: usize = 200;

/// Partitions of the test topics.
const PARTITIONS: i32 = 4;

/// Default first port: nodes on 21100..21115 and their bus ports
/// (+10000) on 31100..31115 are all below Linux' ephemeral range
/// (32768-60999), where a busy machine's client sockets (and their 60 s
/// TIME-WAIT) can make a node's bind fail.
const DEFAULT_BASE_PORT: u16 = 21100;

/// First port of the test clusters; each test adds its own offset so tests
/// of this file run in parallel.
fn base_port(offset: u16) -> u16 {
    std::env::var("STREAMPIPE_TEST_CLUSTER_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(DEFAULT_BASE_PORT)
        + offset
}

fn markets() -> Vec<String> {
    (0..MARKETS).map(|i| format!("m{i}")).collect()
}

/// A pipeline whose reducer config points at the cluster in cluster mode.
fn pipeline_on(cluster: &PrivateCluster) -> Pipeline {
    let mut p = Pipeline::new(Broker::Dev, PARTITIONS);
    p.config.redis_url = cluster.url();
    p.config.redis_cluster = true;
    p
}

fn subscribe_all(p: &Pipeline, cluster: &PrivateCluster, channel: &str) {
    for m in markets() {
        p.command(CommandKind::Subscribe, channel, &m);
    }
    p.flush();
    let key = p.keys().channel_markets(channel);
    wait_for(Duration::from_secs(60), "all subscriptions stored", || {
        (cluster.smembers(&key).len() == MARKETS).then_some(())
    });
}

/// Every market has exactly `channel` in its m2c set, and the partition
/// indexes together hold every market.
fn assert_subscriptions(p: &Pipeline, cluster: &PrivateCluster, channel: &str) {
    let keys = p.keys();
    for m in markets() {
        assert_eq!(
            cluster.smembers(&keys.market_channels(&m)),
            vec![channel.to_string()],
            "m2c of {m}"
        );
    }
    let indexed: BTreeSet<String> = (0..PARTITIONS)
        .flat_map(|part| cluster.smembers(&keys.partition_markets(part)))
        .collect();
    assert_eq!(indexed.len(), MARKETS, "p2m indexes");
    assert_eq!(
        cluster.smembers(&keys.channel_markets(channel)).len(),
        MARKETS
    );
}

#[test]
fn updates_and_subscriptions_on_a_cluster() {
    let cluster = PrivateCluster::start(base_port(0));
    let p = pipeline_on(&cluster);
    let keys = p.keys();
    let masters: BTreeSet<u16> = markets()
        .iter()
        .map(|m| cluster.master_of(&keys.market_state(m)).unwrap())
        .collect();
    assert_eq!(masters.len(), 3, "markets spread over every master");

    let metrics = Arc::new(Metrics::new());
    let reducer = spawn(p.config.clone(), metrics.clone()).unwrap();
    subscribe_all(&p, &cluster, "c1");
    // Nothing was stored yet, so the announces of the subscriptions found
    // nothing to publish.
    let before = cluster.spublish_calls();

    const VERSIONS: u64 = 3;
    for v in 1..=VERSIONS {
        for m in markets() {
            p.update(&m, v, &format!(r#"{{"v":{v}}}"#));
        }
    }
    p.flush();
    wait_for(
        Duration::from_secs(60),
        "every market at the last version",
        || {
            markets()
                .iter()
                .all(|m| cluster.version(&keys, m) == Some(VERSIONS))
                .then_some(())
        },
    );
    assert_subscriptions(&p, &cluster, "c1");
    // Each update is published in the script call that stores it; allow a
    // moment for stats, then it must be exactly one SPUBLISH per update.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        cluster.spublish_calls() - before,
        MARKETS as u64 * VERSIONS,
        "one SPUBLISH per update"
    );
    assert_eq!(metrics.updates_applied.get(), MARKETS as u64 * VERSIONS);
    eprintln!(
        "unreplicated batches: {}, redis errors: {}",
        metrics.redis_unreplicated.get(),
        metrics.redis_errors.get()
    );
    reducer.shutdown().unwrap();

    // A new reducer loads the subscriptions from the cluster (p2m, then m2c
    // per market through the cluster pipeline), announces every watched
    // market once and publishes its next update.
    let before = cluster.spublish_calls();
    let metrics = Arc::new(Metrics::new());
    let reducer = spawn(p.config.clone(), metrics.clone()).unwrap();
    wait_for(Duration::from_secs(60), "subscriptions loaded", || {
        (metrics.subscriptions.get() == MARKETS as i64).then_some(())
    });
    for m in markets() {
        p.update(&m, VERSIONS + 1, r#"{"v":"next"}"#);
    }
    p.flush();
    wait_for(
        Duration::from_secs(60),
        "every market at the next version",
        || {
            markets()
                .iter()
                .all(|m| cluster.version(&keys, m) == Some(VERSIONS + 1))
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        cluster.spublish_calls() - before,
        2 * MARKETS as u64,
        "one announce and one update per market"
    );
    reducer.shutdown().unwrap();
}

#[test]
fn master_failover_loses_nothing() {
    let cluster = PrivateCluster::start(base_port(10));
    let p = Arc::new(pipeline_on(&cluster));
    let keys = p.keys();
    let metrics = Arc::new(Metrics::new());
    let reducer = spawn(p.config.clone(), metrics.clone()).unwrap();
    subscribe_all(&p, &cluster, "c1");

    // Rounds of one update per market, ~1000 updates/s: modest, so the
    // reducer keeps up even while a master has no replica and every batch
    // on it waits out the WAIT timeout.
    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    let producer = std::thread::spawn({
        let (p, stop, last) = (p.clone(), stop.clone(), last.clone());
        move || {
            let mut v = 0;
            while !stop.load(Ordering::SeqCst) {
                v += 1;
                for m in markets() {
                    p.update(&m, v, &format!(r#"{{"v":{v}}}"#));
                }
                last.store(v, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(200));
            }
            p.flush();
        }
    });
    wait_for(Duration::from_secs(60), "updates flowing", || {
        (cluster.version(&keys, "m0").unwrap_or(0) >= 3).then_some(())
    });
    let (old, new) = cluster.kill_master_of(&keys.market_state("m0"));
    eprintln!("killed master {old}; {new} promoted");
    // Keep producing on the promoted master for a while.
    let resumed = last.load(Ordering::SeqCst);
    wait_for(Duration::from_secs(60), "production after failover", || {
        (last.load(Ordering::SeqCst) >= resumed + 15).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    producer.join().unwrap();
    let final_version = last.load(Ordering::SeqCst);

    wait_for(
        Duration::from_secs(120),
        "every market at the last produced version",
        || {
            markets()
                .iter()
                .all(|m| cluster.version(&keys, m) == Some(final_version))
                .then_some(())
        },
    );
    assert_subscriptions(&p, &cluster, "c1");
    eprintln!(
        "final version {final_version}; unreplicated batches: {}, redis errors: {}",
        metrics.redis_unreplicated.get(),
        metrics.redis_errors.get()
    );
    reducer.shutdown().unwrap();
}
