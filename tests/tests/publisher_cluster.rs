//! Reducer and publisher on a real Redis Cluster (3 masters + 3 replicas
//! from `scripts/redis-cluster.sh`), dev broker from the stack, WebSocket
//! clients: sharded market topics reach every client, markets added through
//! the API on a cluster reach the stream, and a master killed with `kill -9`
//! costs the clients a `reset`, after which every market flows again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use streampipe_reducer::{spawn, Metrics};
use streampipe_tests::follower::{every_client_above, follow, Feed};
use streampipe_tests::publisher::{
    blocking, create_channel, http, open_stream, ws_next, ws_send, Frame, InProcess, Ws,
};
use streampipe_tests::{Broker, Pipeline, PrivateCluster};

/// Markets: enough to land on every master.
const MARKETS: usize = 24;

/// Streams, each watching every market.
const CLIENTS: usize = 6;

/// First port of this file's clusters (the reducer's cluster tests use
/// 21100 and 21110; this file +0, +10, +20 and +30 from here): below Linux' ephemeral
/// range, bus ports +10000.
fn base_port() -> u16 {
    std::env::var("STREAMPIPE_TEST_CLUSTER_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(21100)
        + 20
}

/// Reads until every market in `want` reached its version; a `reset`
/// makes the client send `begin` again (as the JS client does).
async fn read_until(ws: &mut Ws, want: &HashMap<String, u64>, resets: &mut usize) {
    let mut have: HashMap<String, u64> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while want
        .iter()
        .any(|(m, v)| have.get(m).copied().unwrap_or(0) < *v)
    {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out: have {have:?}, want {want:?}");
        match ws_next(ws, left).await {
            Some(Frame::Json(v)) if v["type"] == "update" => {
                let m = v["market"].as_str().unwrap().to_owned();
                let ver = v["version"].as_u64().unwrap();
                let e = have.entry(m.clone()).or_default();
                assert!(ver > *e, "{m}: version {ver} after {e}");
                *e = ver;
            }
            Some(Frame::Json(v)) if v["type"] == "reset" => {
                *resets += 1;
                ws_send(ws, r#"{"type":"begin"}"#).await;
            }
            other => panic!("got {other:?}; have {have:?}, want {want:?}"),
        }
    }
}

/// How the master goes away.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// `kill -9`: its sockets close.
    Killed,
    /// `SIGSTOP`: its sockets stay open and answer nothing.
    Frozen,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_a_master_failover_on_a_cluster() {
    survive_failover(Loss::Killed, base_port()).await;
}

/// As above, with the master frozen instead of killed: nothing tells the
/// pod's subscriptions or its control connection that the node is gone.
/// Not in CI yet: it passed 9 of 10 runs here after the three stalls it
/// found were fixed; the tenth failed the strict "each version newer than
/// the last" check (a client saw a version again after its resets), which
/// is not understood yet. Run with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "passes 9 of 10: a repeated version after a frozen master's resets is not understood yet"]
async fn streams_survive_a_frozen_master_on_a_cluster() {
    survive_failover(Loss::Frozen, base_port() + 30).await;
}

async fn survive_failover(loss: Loss, port: u16) {
    // Warnings of the reducer and publisher (reconnects, retries) are shown
    // when this test fails: it has failed in CI only, never locally.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STREAMPIPE_TEST_LOG")
                .unwrap_or_else(|_| "warn,librdkafka=off,rdkafka=off".into()),
        )
        .with_test_writer()
        .try_init();
    let cluster = blocking(move || Arc::new(PrivateCluster::start(port))).await;
    let url = cluster.url();
    let (p, reducer) = {
        let url = url.clone();
        blocking(move || {
            let mut p = Pipeline::new(Broker::Dev, 4);
            p.config.redis_url = url;
            p.config.redis_cluster = true;
            let r = spawn(p.config.clone(), Arc::new(Metrics::new())).unwrap();
            (Arc::new(p), r)
        })
        .await
    };
    let mut config = streampipe_publisher::Config::new(&p.broker.bootstrap(), &p.name, &url);
    config.command_topic = p.config.command_topic.clone();
    config.redis_cluster = true;
    let publ = InProcess::start_with_config(config).await;

    let markets: Vec<String> = (0..MARKETS).map(|i| format!("c{i}")).collect();
    let refs: Vec<&str> = markets.iter().map(String::as_str).collect();
    for m in &markets {
        p.update(m, 1, "1");
    }
    p.flush();
    let channels = join_all((0..CLIENTS).map(|_| create_channel(publ.addr, &refs))).await;
    let mut streams = join_all(channels.iter().map(|c| open_stream(publ.addr, c))).await;
    let mut resets = 0;
    let want =
        |v: u64| -> HashMap<String, u64> { markets.iter().map(|m| (m.clone(), v)).collect() };
    for ws in streams.iter_mut() {
        read_until(ws, &want(1), &mut resets).await;
    }
    for m in &markets {
        p.update(m, 2, "2");
    }
    p.flush();
    for ws in streams.iter_mut() {
        read_until(ws, &want(2), &mut resets).await;
    }
    assert_eq!(resets, 0, "no reset while the cluster is healthy");

    // A market added through the API reaches the stream (sharded channel topic).
    let body = serde_json::json!({"markets": ["extra"]}).to_string();
    let r = http(
        publ.addr,
        "POST",
        &format!("/v1/channels/{}/markets", channels[0]),
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (c, ch0, key) = (
        cluster.clone(),
        channels[0].clone(),
        p.keys().market_channels("extra"),
    );
    blocking(move || {
        streampipe_tests::wait_for(Duration::from_secs(30), "extra subscribed", || {
            c.smembers(&key).contains(&ch0).then_some(())
        })
    })
    .await;
    p.update("extra", 5, "5");
    p.flush();
    read_until(
        &mut streams[0],
        &HashMap::from([("extra".to_string(), 5)]),
        &mut resets,
    )
    .await;

    // The master of the first market's slot goes away.
    let key = p.keys().market_state(&markets[0]);
    let c = cluster.clone();
    let (old, new, frozen) = blocking(move || match loss {
        Loss::Killed => {
            let (old, new) = c.kill_master_of(&key);
            (old, new, None)
        }
        Loss::Frozen => {
            let (old, new, pid) = c.freeze_master_of(&key);
            (old, new, Some(pid))
        }
    })
    .await;
    assert_ne!(old, new);
    for m in &markets {
        p.update(m, 3, "3");
    }
    p.flush();
    for ws in streams.iter_mut() {
        read_until(ws, &want(3), &mut resets).await;
    }
    assert!(
        publ.ctx.metrics.redis_reconnects.get() >= 1,
        "the pod rebuilt its subscriptions after the failover"
    );
    eprintln!("{loss:?} master, failover {old} -> {new}: {resets} resets over {CLIENTS} clients");
    if let Some(pid) = frozen {
        let c = cluster.clone();
        blocking(move || c.thaw(pid)).await;
    }
    drop(streams);
    drop(publ);
    blocking(move || reducer.shutdown().unwrap()).await;
    drop(cluster);
}

/// One shard of the cluster loses its data (`FLUSHALL` on a master that
/// does not hold the epoch key; its replica follows) while the epoch key's
/// shard keeps it: the epoch's markers on the flushed shard are gone, so
/// the reducer and the publisher notice, write their part back under a new
/// epoch, and after a rebalance (a second reducer loads half the partitions
/// from the repaired cluster) every client still receives every market.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_lost_its_data_is_noticed_and_repaired() {
    let cluster = blocking(|| Arc::new(PrivateCluster::start(base_port() + 10))).await;
    let url = cluster.url();
    let start_reducer = |config: streampipe_reducer::Config| {
        let m = Arc::new(Metrics::new());
        (spawn(config, m.clone()).unwrap(), m)
    };
    let (p, first) = {
        let url = url.clone();
        blocking(move || {
            let mut p = Pipeline::new(Broker::Dev, 4);
            p.config.redis_url = url;
            p.config.redis_cluster = true;
            let r = start_reducer(p.config.clone());
            (Arc::new(p), r)
        })
        .await
    };
    let mut config = streampipe_publisher::Config::new(&p.broker.bootstrap(), &p.name, &url);
    config.command_topic = p.config.command_topic.clone();
    config.redis_cluster = true;
    let publ = InProcess::start_with_config(config).await;

    // Three channels of eight markets each: every master holds some.
    let sets: Vec<Vec<String>> = (0..3)
        .map(|c| (0..8).map(|m| format!("s{c}m{m}")).collect())
        .collect();
    let mut clients = Vec::new();
    for set in &sets {
        let refs: Vec<&str> = set.iter().map(String::as_str).collect();
        let ch = create_channel(publ.addr, &refs).await;
        let seen = follow(open_stream(publ.addr, &ch).await);
        clients.push((ch, set.clone(), seen));
    }
    let all: Vec<String> = sets.concat();
    let feed = Feed::start(p.clone(), all.clone(), Duration::from_millis(100));
    every_client_above(&clients, 0, "before the loss").await;

    // Flush a master other than the epoch key's.
    let keys = p.keys();
    let (c, epoch_key) = (cluster.clone(), keys.epoch());
    let (flushed, epoch_before) = blocking(move || {
        let before: String = redis::cmd("GET")
            .arg(&epoch_key)
            .query(&mut c.connection())
            .unwrap();
        // A node's view of the roles can be stale, and a loaded machine
        // can fail a master over on its own (2 s node timeout): ask the
        // victim itself, and pick again when it has just become a replica.
        for _ in 0..20 {
            let keeper = c.master_of(&epoch_key).expect("the epoch key's master");
            let victim = c
                .masters()
                .into_iter()
                .map(|(port, _)| port)
                .find(|port| *port != keeper)
                .expect("another master");
            let mut node = c.node(victim).unwrap();
            let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut node).unwrap();
            let is_master =
                matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master");
            if is_master && redis::cmd("FLUSHALL").query::<()>(&mut node).is_ok() {
                return (victim, before);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("no master other than the epoch key's could be flushed in 10 s")
    })
    .await;
    assert!(
        epoch_before.ends_with(streampipe_contract::epoch::SPREAD_SUFFIX),
        "a cluster's epoch has markers: {epoch_before}"
    );
    let at_loss = feed.version();
    let t = Instant::now();
    let (rm, pm) = (first.1.clone(), publ.ctx.metrics.clone());
    let subscriptions = all.len() as u64;
    blocking(move || {
        streampipe_tests::wait_for(
            Duration::from_secs(30),
            "reducer and publisher see the shard's loss, the reducer wrote back",
            // The loss is counted when the write-back starts: under load
            // the count below was read before it finished (0 of 24).
            || {
                (rm.redis_data_loss.get() >= 1
                    && pm.redis_data_loss.get() >= 1
                    && rm.loss_subscriptions_repaired.get() >= subscriptions)
                    .then_some(())
            },
        )
    })
    .await;
    eprintln!(
        "master {flushed} flushed: noticed and repaired after {:?} ({} subscriptions written back)",
        t.elapsed(),
        first.1.loss_subscriptions_repaired.get()
    );
    assert_eq!(
        first.1.loss_subscriptions_repaired.get(),
        all.len() as u64,
        "every subscription written back"
    );
    let (c, k) = (cluster.clone(), keys.clone());
    blocking(move || {
        let mut conn = c.connection();
        let after: String = redis::cmd("GET").arg(k.epoch()).query(&mut conn).unwrap();
        assert_ne!(after, epoch_before, "a new epoch after the loss");
        for i in 0..streampipe_contract::slot::SPREAD_TAGS.len() {
            let m: Option<String> = redis::cmd("GET")
                .arg(k.epoch_marker(i))
                .query(&mut conn)
                .unwrap();
            assert_eq!(m.as_deref(), Some(after.as_str()), "marker {i}");
        }
    })
    .await;
    every_client_above(&clients, at_loss, "after the loss").await;

    // The rebalance: the second reducer loads its partitions from the
    // repaired cluster.
    let config = p.config.clone();
    let second = blocking(move || start_reducer(config)).await;
    let (m1, m2) = (first.1.clone(), second.1.clone());
    blocking(move || {
        streampipe_tests::wait_for(
            Duration::from_secs(90),
            "both reducers own partitions",
            || {
                let (a, b) = (m1.owned_partitions.get(), m2.owned_partitions.get());
                (a > 0 && b > 0 && a + b == 4).then_some(())
            },
        )
    })
    .await;
    assert_eq!(
        first.1.subscriptions.get() + second.1.subscriptions.get(),
        all.len() as i64,
        "together they hold every subscription"
    );
    let after_rebalance = feed.version();
    every_client_above(&clients, after_rebalance, "after the rebalance").await;
    for (ch, _, seen) in &clients {
        assert!(
            !seen.lock().unwrap().resets.is_empty(),
            "{ch} was told reset"
        );
    }

    drop(feed);
    drop(publ);
    blocking(move || {
        second.0.shutdown().unwrap();
        first.0.shutdown().unwrap();
    })
    .await;
    drop(cluster);
}

/// A master that freezes (SIGSTOP: a stalled VM, a swapped-out process) is
/// worse than one that dies: its sockets stay open and answer nothing, so
/// no error tells a client to look elsewhere. Every read of a publisher pod
/// (epoch checks, `begin`s, the REST API) goes through its registry's one
/// cluster connection: once the cluster has failed the frozen master over,
/// that connection must answer again, and each request meanwhile must end
/// (bounded) instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_answers_again_after_a_master_froze() {
    use streampipe_publisher::registry::Registry;
    let cluster = Arc::new(blocking(|| PrivateCluster::start(base_port() + 20)).await);
    let keys = streampipe_contract::Keys::scoped(None, "freeze");
    let metrics = streampipe_publisher::metrics::Metrics::new();
    let registry = Registry::connect(
        &cluster.url(),
        keys.clone(),
        true,
        None,
        metrics.redis_cluster_rebuilds.clone(),
    )
    .await
    .unwrap();
    let ch = "frozen-channel";
    registry.add(ch, &["m1".to_owned()]).await.unwrap();
    // Replication is asynchronous (and right after the cluster's start a
    // replica may still be in its first sync: in CI the set was lost in the
    // failover). Write the same member on the master's own connection and
    // `WAIT` for a replica: replication is one stream, so the registry's
    // earlier write is on the replica too.
    let (c, key) = (cluster.clone(), keys.channel_registry(ch));
    blocking(move || {
        let port = c.master_of(&key).expect("a master");
        let mut node = c.node(port).unwrap();
        let _: i64 = redis::cmd("SADD")
            .arg(&key)
            .arg("m1")
            .query(&mut node)
            .unwrap();
        // Under the node connection's 5 s read timeout, up to 40 s in all.
        let acked = (0..10).any(|_| {
            redis::cmd("WAIT")
                .arg(1)
                .arg(4_000)
                .query::<i64>(&mut node)
                .is_ok_and(|n| n >= 1)
        });
        assert!(acked, "a replica has the registry set");
    })
    .await;
    assert_eq!(registry.markets(ch).await.unwrap(), Some(vec!["m1".into()]));

    let (c, key) = (cluster.clone(), keys.channel_registry(ch));
    let (_, promoted, pid) = blocking(move || c.freeze_master_of(&key)).await;
    let t = Instant::now();
    let mut attempts = 0;
    let answered = loop {
        attempts += 1;
        let started = Instant::now();
        // Longer than the connection's own bound (3 s): a request that
        // hangs past it is the failure this test is about.
        let read = tokio::time::timeout(Duration::from_secs(15), registry.markets(ch)).await;
        assert!(
            read.is_ok(),
            "a registry read hung for 15 s (attempt {attempts}, {:?} after the failover)",
            t.elapsed()
        );
        let read = match read {
            Ok(Ok(Some(m))) => break m,
            other => format!("{other:?}"),
        };
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "a failed read took {:?}",
            started.elapsed()
        );
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the registry did not answer within 60 s of the failover ({attempts} attempts; last: {read})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "answered {:?} after the failover to {promoted} ({attempts} attempts, {} rebuilds)",
        t.elapsed(),
        metrics.redis_cluster_rebuilds.get()
    );
    assert_eq!(answered, vec!["m1".to_owned()]);
    // Writes too, on the promoted master.
    registry.add(ch, &["m2".to_owned()]).await.unwrap();
    blocking(move || cluster.thaw(pid)).await;
}
