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
use streampipe_tests::publisher::{
    blocking, create_channel, http, open_stream, ws_next, ws_send, Frame, InProcess, Ws,
};
use streampipe_tests::{Broker, Pipeline, PrivateCluster};

/// Markets: enough to land on every master.
const MARKETS: usize = 24;

/// Streams, each watching every market.
const CLIENTS: usize = 6;

/// First port of this file's clusters (the reducer's cluster tests use
/// 21100 and 21110; this file +0 and +10 from here): below Linux' ephemeral
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_a_master_failover_on_a_cluster() {
    let cluster = blocking(|| Arc::new(PrivateCluster::start(base_port()))).await;
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

    // kill -9 the master of the first market's slot.
    let key = p.keys().market_state(&markets[0]);
    let c = cluster.clone();
    let (old, new) = blocking(move || c.kill_master_of(&key)).await;
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
    eprintln!("failover {old} -> {new}: {resets} resets over {CLIENTS} clients");
    drop(streams);
    drop(publ);
    blocking(move || reducer.shutdown().unwrap()).await;
    drop(cluster);
}

/// Reads a stream in the background, recording the highest version per
/// market and the `reset`s (answered with `begin`, as the JS client does).
fn follow(mut ws: Ws) -> Arc<std::sync::Mutex<(HashMap<String, u64>, usize)>> {
    let seen = Arc::new(std::sync::Mutex::new((
        HashMap::<String, u64>::new(),
        0usize,
    )));
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            match ws_next(&mut ws, Duration::from_millis(500)).await {
                Some(Frame::Json(v)) if v["type"] == "update" => {
                    let m = v["market"].as_str().unwrap().to_owned();
                    let ver = v["version"].as_u64().unwrap();
                    let mut g = s.lock().unwrap();
                    let e = g.0.entry(m).or_default();
                    *e = (*e).max(ver);
                }
                Some(Frame::Json(v)) if v["type"] == "reset" => {
                    s.lock().unwrap().1 += 1;
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    ws_send(&mut ws, r#"{"type":"begin"}"#).await;
                }
                Some(Frame::Closed(_)) => return,
                _ => {}
            }
        }
    });
    seen
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
        clients.push((ch.clone(), follow(open_stream(publ.addr, &ch).await)));
    }
    let all: Vec<String> = sets.concat();
    let version = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (p, all, version, stop) = (p.clone(), all.clone(), version.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let v = version.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                for m in &all {
                    p.update(m, v, &v.to_string());
                }
                p.flush();
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }
    let every_client_above = |after: u64, when: &'static str| {
        let (clients, sets) = (&clients, &sets);
        async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let missing: Vec<String> = clients
                    .iter()
                    .zip(sets)
                    .flat_map(|((ch, seen), set)| {
                        let g = seen.lock().unwrap();
                        set.iter()
                            .filter(|m| g.0.get(*m).is_none_or(|v| *v <= after))
                            .map(|m| format!("{ch}/{m}"))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                if missing.is_empty() {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{when}: no version above {after} of {missing:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    every_client_above(0, "before the loss").await;

    // Flush a master other than the epoch key's.
    let keys = p.keys();
    let (c, epoch_key) = (cluster.clone(), keys.epoch());
    let (flushed, epoch_before) = blocking(move || {
        let keeper = c.master_of(&epoch_key).expect("the epoch key's master");
        let victim = c
            .masters()
            .into_iter()
            .map(|(port, _)| port)
            .find(|port| *port != keeper)
            .expect("another master");
        let before: String = redis::cmd("GET")
            .arg(&epoch_key)
            .query(&mut c.connection())
            .unwrap();
        let _: () = redis::cmd("FLUSHALL")
            .query(&mut c.node(victim).unwrap())
            .unwrap();
        (victim, before)
    })
    .await;
    assert!(
        epoch_before.ends_with(streampipe_contract::epoch::SPREAD_SUFFIX),
        "a cluster's epoch has markers: {epoch_before}"
    );
    let at_loss = version.load(std::sync::atomic::Ordering::SeqCst);
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
    every_client_above(at_loss, "after the loss").await;

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
    let after_rebalance = version.load(std::sync::atomic::Ordering::SeqCst);
    every_client_above(after_rebalance, "after the rebalance").await;
    for (ch, seen) in &clients {
        assert!(seen.lock().unwrap().1 >= 1, "{ch} was told reset");
    }

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(publ);
    blocking(move || {
        second.0.shutdown().unwrap();
        first.0.shutdown().unwrap();
    })
    .await;
    drop(cluster);
}
