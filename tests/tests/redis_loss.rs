//! A Redis that loses its data is noticed and repaired, never silent
//! (issue #11 item 1): the real reducers and publisher against a private
//! `redis-server` that the test restarts empty (or flushes) mid-stream, then
//! a rebalance; and a Redis restarted with its append-only file, which must
//! not be mistaken for a loss.

use std::sync::Arc;
use std::time::{Duration, Instant};

use streampipe_reducer::{Metrics, ReducerHandle};
use streampipe_tests::follower::{every_client_above, follow, Client, Feed};
use streampipe_tests::publisher::{
    blocking, create_channel, http, open_stream, ws_next, ws_send, Frame, InProcess, Ws,
};
use streampipe_tests::{free_port, wait_for, Broker, Pipeline, PrivateRedis};

/// Channels of the test, each with its own markets (spread over partitions).
const CHANNELS: usize = 3;
/// Markets per channel.
const MARKETS: usize = 4;
/// Pause between two rounds of updates (one new version of every market).
const ROUND: Duration = Duration::from_millis(100);

/// A pipeline of 4 partitions on `broker` whose Redis is `redis`.
async fn pipeline_on(broker: Broker, redis: &PrivateRedis) -> Arc<Pipeline> {
    let url = redis.url();
    blocking(move || {
        let mut p = Pipeline::new(broker, 4);
        p.config.redis_url = url;
        Arc::new(p)
    })
    .await
}

/// Reads until an update of `market` arrives within `within`, skipping
/// other JSON frames (`reset`s are not answered); panics naming `what`.
async fn next_update_of(ws: &mut Ws, market: &str, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}");
        match ws_next(ws, left).await {
            Some(Frame::Json(v)) if v["type"] == "update" && v["market"] == market => return,
            Some(Frame::Json(_)) => {}
            other => panic!("waiting for {what}: got {other:?}"),
        }
    }
}

fn start_reducer(p: &Pipeline) -> (ReducerHandle, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let r = streampipe_reducer::spawn(p.config.clone(), metrics.clone()).unwrap();
    (r, metrics)
}

/// The world of one test: private Redis, pipeline, one reducer, publisher,
/// clients streaming, the feed running.
struct World {
    p: Arc<Pipeline>,
    redis: PrivateRedis,
    reducer: (ReducerHandle, Arc<Metrics>),
    publ: InProcess,
    channels: Vec<Client>,
    feed: Feed,
}

async fn world(broker: Broker, redis: PrivateRedis) -> World {
    let p = pipeline_on(broker, &redis).await;
    let pc = p.clone();
    let reducer = blocking(move || start_reducer(&pc)).await;
    let publ = InProcess::start_with_redis(&p, &redis.url()).await;
    let mut channels = Vec::new();
    let mut all = Vec::new();
    for c in 0..CHANNELS {
        let markets: Vec<String> = (0..MARKETS).map(|m| format!("L{c}M{m}")).collect();
        let refs: Vec<&str> = markets.iter().map(String::as_str).collect();
        let ch = create_channel(publ.addr, &refs).await;
        let seen = follow(open_stream(publ.addr, &ch).await);
        all.extend(markets.iter().cloned());
        channels.push((ch, markets, seen));
    }
    let feed = Feed::start(p.clone(), all, ROUND);
    every_client_above(&channels, 0, "before the loss").await;
    World {
        p,
        redis,
        reducer,
        publ,
        channels,
        feed,
    }
}

impl World {
    fn resets(&self) -> Vec<Vec<String>> {
        self.channels
            .iter()
            .map(|(_, _, s)| s.lock().unwrap().resets.clone())
            .collect()
    }
}

/// How the test makes Redis lose its data.
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// `redis-server` killed and started again without any data files.
    RestartEmpty,
    /// `FLUSHALL` (connections, and the publisher's subscription, survive).
    Flushall,
}

/// Redis loses everything mid-stream, then a second reducer joins (a
/// rebalance): every client keeps receiving every market of its channel,
/// it was told `reset`, the reducers wrote their partitions back (the new
/// reducer loaded subscriptions the first one wrote back), and the
/// channels still answer begin, add and close.
async fn loss_then_rebalance(broker: Broker, loss: Loss) {
    let mut w = world(broker, PrivateRedis::start(free_port())).await;
    let keys = w.p.keys();
    let epoch_before: String = redis::cmd("GET")
        .arg(keys.epoch())
        .query(&mut w.redis.connection())
        .expect("the reducer created the data epoch");

    let t = Instant::now();
    match loss {
        Loss::RestartEmpty => {
            w.redis.stop(false);
            w.redis.start_again();
        }
        Loss::Flushall => {
            let _: () = redis::cmd("FLUSHALL")
                .query(&mut w.redis.connection())
                .unwrap();
        }
    }
    let at_loss = w.feed.version();
    let rm = w.reducer.1.clone();
    let pm = w.publ.ctx.metrics.clone();
    blocking(move || {
        wait_for(
            Duration::from_secs(30),
            "reducer and publisher see the loss",
            || {
                (rm.redis_data_loss.get() >= 1
                    && rm.loss_partitions_repaired.get() >= 4
                    && pm.redis_data_loss.get() >= 1)
                    .then_some(())
            },
        )
    })
    .await;
    eprintln!(
        "{broker:?}/{loss:?}: loss repaired {:?} after it (reducer wrote back {} subscriptions, publisher {} channels, {} re-subscribes)",
        t.elapsed(),
        w.reducer.1.loss_subscriptions_repaired.get(),
        w.publ.ctx.metrics.loss_channels_repaired.get(),
        w.publ.ctx.metrics.loss_resubscribed.get(),
    );
    assert_eq!(
        w.reducer.1.loss_subscriptions_repaired.get(),
        (CHANNELS * MARKETS) as u64,
        "every subscription written back once"
    );
    let epoch_after: String = redis::cmd("GET")
        .arg(keys.epoch())
        .query(&mut w.redis.connection())
        .unwrap();
    assert_ne!(epoch_before, epoch_after, "a new epoch after the loss");
    every_client_above(&w.channels, at_loss, "after the loss").await;

    // The rebalance: a second reducer joins and takes half the partitions,
    // loading them from the Redis that lost its data.
    let pc = w.p.clone();
    let second = blocking(move || start_reducer(&pc)).await;
    let (m1, m2) = (w.reducer.1.clone(), second.1.clone());
    let t = Instant::now();
    blocking(move || {
        wait_for(
            Duration::from_secs(90),
            "both reducers own partitions",
            || {
                let (a, b) = (m1.owned_partitions.get(), m2.owned_partitions.get());
                (a > 0 && b > 0 && a + b == 4).then_some(())
            },
        )
    })
    .await;
    eprintln!("{broker:?}/{loss:?}: rebalance done in {:?}", t.elapsed());
    assert!(
        second.1.subscriptions.get() > 0,
        "the new owner loaded the subscriptions the old one wrote back"
    );
    assert_eq!(
        w.reducer.1.subscriptions.get() + second.1.subscriptions.get(),
        (CHANNELS * MARKETS) as i64,
        "together they hold every subscription"
    );
    assert_eq!(second.1.partitions_unrepaired.get(), 0);
    let after_rebalance = w.feed.version();
    every_client_above(&w.channels, after_rebalance, "after the rebalance").await;
    for (i, r) in w.resets().iter().enumerate() {
        assert!(
            r.iter().any(|r| r.contains("lost its data")),
            "client {i} was told about the loss: {r:?}"
        );
    }

    // The channels still answer: begin, add, close.
    let (ch, _, seen) = &w.channels[0];
    let r = http(
        w.publ.addr,
        "POST",
        &format!("/v1/channels/{ch}/begin"),
        None,
    )
    .await;
    assert_eq!(r.status, 202, "begin: {}", r.body);
    let r = http(
        w.publ.addr,
        "POST",
        &format!("/v1/channels/{ch}/markets"),
        Some(r#"{"markets":["ADDED"]}"#),
    )
    .await;
    assert_eq!(r.status, 200, "add: {}", r.body);
    let p = w.p.clone();
    let seen2 = seen.clone();
    blocking(move || {
        let mut v = 1_000_000;
        wait_for(Duration::from_secs(60), "the added market streams", || {
            v += 1;
            p.update("ADDED", v, "1");
            p.flush();
            std::thread::sleep(Duration::from_millis(200));
            seen2
                .lock()
                .unwrap()
                .max
                .contains_key("ADDED")
                .then_some(())
        })
    })
    .await;
    let r = http(w.publ.addr, "DELETE", &format!("/v1/channels/{ch}"), None).await;
    assert_eq!(r.status, 204, "close: {}", r.body);
    let seen2 = seen.clone();
    blocking(move || {
        wait_for(
            Duration::from_secs(10),
            "the stream closed with 4410",
            || seen2.lock().unwrap().closed,
        )
    })
    .await;
    assert_eq!(seen.lock().unwrap().closed, Some(4410));
    for (i, (_, _, s)) in w.channels.iter().enumerate().skip(1) {
        assert_eq!(s.lock().unwrap().closed, None, "client {i} still streams");
    }

    drop(w.feed);
    drop(w.publ);
    blocking(move || {
        second.0.shutdown().unwrap();
        w.reducer.0.shutdown().unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_then_rebalance_dev() {
    loss_then_rebalance(Broker::Dev, Loss::RestartEmpty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushed_then_rebalance_tansu() {
    loss_then_rebalance(Broker::Tansu, Loss::Flushall).await;
}

/// A Redis restarted *with* its data (append-only file, everysec) is no
/// loss: nobody writes back, clients get the one `reset` a pub/sub
/// reconnect always sends, and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_with_its_data_is_no_loss() {
    let dir = std::env::temp_dir().join(streampipe_tests::unique("redis-aof"));
    let mut w = world(
        Broker::Dev,
        PrivateRedis::start_persistent(free_port(), &dir),
    )
    .await;
    // everysec: give the last writes their fsync before stopping.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.redis.stop(true);
    w.redis.start_again();
    let at_restart = w.feed.version();
    every_client_above(&w.channels, at_restart, "after the restart").await;
    // Give the periodic checks time to run on the restarted Redis.
    tokio::time::sleep(streampipe_contract::epoch::EPOCH_CHECK_INTERVAL * 2).await;
    assert_eq!(w.reducer.1.redis_data_loss.get(), 0, "reducer saw no loss");
    assert_eq!(w.reducer.1.loss_partitions_repaired.get(), 0);
    assert_eq!(
        w.publ.ctx.metrics.redis_data_loss.get(),
        0,
        "publisher saw no loss"
    );
    assert!(w.publ.ctx.metrics.redis_reconnects.get() >= 1);
    for (i, r) in w.resets().iter().enumerate() {
        assert!(r.len() <= 1, "client {i}: no reset storm: {r:?}");
        assert!(
            r.iter().all(|r| !r.contains("lost its data")),
            "client {i}: {r:?}"
        );
    }
    drop(w.feed);
    drop(w.publ);
    blocking(move || w.reducer.0.shutdown().unwrap()).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// The worst case: the reducer dies, then Redis loses its data, and a new
/// reducer takes the partitions with nobody left to write them back. It
/// says so loudly (`partitions_unrepaired_total`), and the publisher, which
/// noticed the loss too, writes its channels back and sends their subscribes
/// through Kafka again, so every client still receives every market of its
/// channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_dead_with_the_data_is_loud_and_live_channels_resubscribe() {
    let redis = PrivateRedis::start(free_port());
    let p = pipeline_on(Broker::Dev, &redis).await;
    let pc = p.clone();
    let mut first = blocking(move || streampipe_tests::ReducerProcess::spawn(&pc)).await;
    let publ = InProcess::start_with_redis(&p, &redis.url()).await;
    let mut channels = Vec::new();
    let mut all = Vec::new();
    for c in 0..CHANNELS {
        let markets: Vec<String> = (0..MARKETS).map(|m| format!("D{c}M{m}")).collect();
        let refs: Vec<&str> = markets.iter().map(String::as_str).collect();
        let ch = create_channel(publ.addr, &refs).await;
        let seen = follow(open_stream(publ.addr, &ch).await);
        all.extend(markets.iter().cloned());
        channels.push((ch, markets, seen));
    }
    let feed = Feed::start(p.clone(), all, ROUND);
    every_client_above(&channels, 0, "before the loss").await;
    // Let the auto-committer commit the subscribes' offsets (every second).
    tokio::time::sleep(Duration::from_secs(3)).await;

    blocking(move || first.kill()).await;
    let _: () = redis::cmd("FLUSHALL")
        .query(&mut redis.connection())
        .unwrap();
    let at_loss = feed.version();
    let pc = p.clone();
    let second = blocking(move || start_reducer(&pc)).await;
    let (m, pm) = (second.1.clone(), publ.ctx.metrics.clone());
    let t = Instant::now();
    blocking(move || {
        wait_for(
            Duration::from_secs(90),
            "the new owner says what is lost",
            || (m.owned_partitions.get() == 4 && m.partitions_unrepaired.get() >= 1).then_some(()),
        );
        wait_for(
            Duration::from_secs(30),
            "the publisher re-subscribed",
            || (pm.loss_resubscribed.get() >= (CHANNELS * MARKETS) as u64).then_some(()),
        );
    })
    .await;
    eprintln!(
        "owner dead: {} partitions reported unrepaired, {} subscribes sent again, {:?}",
        second.1.partitions_unrepaired.get(),
        publ.ctx.metrics.loss_resubscribed.get(),
        t.elapsed()
    );
    every_client_above(&channels, at_loss.max(feed.version()), "after the loss").await;
    assert_eq!(
        second.1.subscriptions.get(),
        (CHANNELS * MARKETS) as i64,
        "the new owner holds every live channel's subscriptions again"
    );
    for (_, _, s) in &channels {
        let s = s.lock().unwrap();
        assert!(
            s.resets.iter().any(|r| r.contains("lost its data")),
            "{s:?}"
        );
    }
    drop(feed);
    drop(publ);
    blocking(move || second.0.shutdown().unwrap()).await;
}

/// Streams whose `begin`s race the repair after a loss (as they do after a
/// pub/sub reconnect whose own epoch check failed: every client answers the
/// `reset` at once): each begin finds its channel missing and checks the
/// epoch; the first check writes the channels back, the others wait for it
/// and then find no loss. None may answer from the read it made before the
/// repair: that closed live streams with 4404 (seen in
/// `redis_restarted_empty_then_rebalance_dev`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_begins_after_a_loss_keep_their_streams() {
    const STREAMS: usize = 8;
    let redis = PrivateRedis::start(free_port());
    let p = pipeline_on(Broker::Dev, &redis).await;
    let pc = p.clone();
    let reducer = blocking(move || start_reducer(&pc)).await;
    let publ = InProcess::start_with_redis(&p, &redis.url()).await;
    let mut streams = Vec::new();
    for c in 0..STREAMS {
        let market = format!("B{c}");
        let ch = create_channel(publ.addr, &[market.as_str()]).await;
        let ws = open_stream(publ.addr, &ch).await;
        streams.push((ch, ws));
    }
    // Past the begin rate limit of the streams' first begin.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _: () = redis::cmd("FLUSHALL")
        .query(&mut redis.connection())
        .unwrap();
    for (_, ws) in streams.iter_mut() {
        ws_send(ws, r#"{"type":"begin"}"#).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        publ.ctx.metrics.redis_data_loss.get() >= 1,
        "the publisher noticed the loss"
    );
    for (ch, ws) in streams.iter_mut() {
        while let Some(f) = ws_next(ws, Duration::from_millis(100)).await {
            if let Frame::Closed(code) = f {
                panic!("{ch}: closed with {code} although the repair wrote it back");
            }
        }
    }
    // And they still answer a begin.
    let r = http(
        publ.addr,
        "POST",
        &format!("/v1/channels/{}/begin", streams[0].0),
        None,
    )
    .await;
    assert_eq!(r.status, 202, "begin: {}", r.body);
    drop(publ);
    blocking(move || reducer.0.shutdown().unwrap()).await;
}

/// A `begin` that fails because Redis is unreachable (as during a cluster
/// failover) is retried by the publisher: the client, which asked once and
/// ignores the `reset`s, still gets the state when Redis is back, instead
/// of waiting silently for an update that may never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_begin_that_failed_is_retried_when_redis_is_back() {
    let dir = std::env::temp_dir().join(streampipe_tests::unique("redis-begin"));
    let mut redis = PrivateRedis::start_persistent(free_port(), &dir);
    let p = pipeline_on(Broker::Dev, &redis).await;
    let pc = p.clone();
    let reducer = blocking(move || start_reducer(&pc)).await;
    let publ = InProcess::start_with_redis(&p, &redis.url()).await;
    let ch = create_channel(publ.addr, &["RB1"]).await;
    let mut ws = open_stream(publ.addr, &ch).await;
    p.update("RB1", 7, "7");
    p.flush();
    // The live v7 arrives (stored first: the reducer publishes after the write).
    next_update_of(&mut ws, "RB1", Duration::from_secs(30), "RB1 v7").await;
    // everysec: let the state reach the append-only file.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.stop(true);
    let failed_before = publ
        .ctx
        .metrics
        .rejected
        .with_label_values(&["begin_failed"])
        .get();
    // A fresh resume point, so the state counts as new for this connection.
    ws_send(&mut ws, r#"{"type":"begin","since":{"RB1":0}}"#).await;
    let pm = publ.ctx.metrics.clone();
    blocking(move || {
        wait_for(Duration::from_secs(30), "the begin failed", || {
            (pm.rejected.with_label_values(&["begin_failed"]).get() > failed_before).then_some(())
        })
    })
    .await;
    redis.start_again();
    // Resets are not answered: the server retries the begin itself.
    next_update_of(
        &mut ws,
        "RB1",
        Duration::from_secs(40),
        "the retried begin's state",
    )
    .await;
    drop(publ);
    blocking(move || reducer.0.shutdown().unwrap()).await;
    let _ = std::fs::remove_dir_all(dir);
}
