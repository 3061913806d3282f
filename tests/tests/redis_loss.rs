//! A Redis that loses its data is noticed and repaired, never silent
//! (issue #11 item 1): the real reducers and publisher against a private
//! `redis-server` that the test restarts empty (or flushes) mid-stream, then
//! a rebalance; and a Redis restarted with its append-only file, which must
//! not be mistaken for a loss.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use streampipe_reducer::{Metrics, ReducerHandle};
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

/// What one WebSocket client saw.
#[derive(Default, Debug)]
struct Seen {
    /// Highest version received per market.
    max: HashMap<String, u64>,
    /// Reasons of the `reset` frames received.
    resets: Vec<String>,
    /// The close code, once closed.
    closed: Option<u16>,
}

/// Reads a stream in the background like the JS client: records updates,
/// answers `reset` with `begin` (no sooner than the publisher's begin rate
/// allows), records the close.
fn run_client(mut ws: Ws, seen: Arc<Mutex<Seen>>) {
    tokio::spawn(async move {
        let mut last_begin = Instant::now();
        loop {
            match ws_next(&mut ws, Duration::from_millis(500)).await {
                Some(Frame::Json(v)) if v["type"] == "update" => {
                    let m = v["market"].as_str().unwrap().to_owned();
                    let ver = v["version"].as_u64().unwrap();
                    let mut s = seen.lock().unwrap();
                    let e = s.max.entry(m).or_insert(0);
                    *e = (*e).max(ver);
                }
                Some(Frame::Json(v)) if v["type"] == "reset" => {
                    seen.lock()
                        .unwrap()
                        .resets
                        .push(v["reason"].as_str().unwrap_or("").to_owned());
                    let wait = Duration::from_millis(600).saturating_sub(last_begin.elapsed());
                    tokio::time::sleep(wait).await;
                    ws_send(&mut ws, r#"{"type":"begin"}"#).await;
                    last_begin = Instant::now();
                }
                Some(Frame::Json(_)) => {}
                Some(Frame::Closed(c)) => {
                    seen.lock().unwrap().closed = Some(c);
                    return;
                }
                None => {}
            }
        }
    });
}

/// Produces one new version of every market per [`ROUND`] until stopped;
/// the version counter is shared so the test knows what was produced when.
fn run_feed(
    p: Arc<Pipeline>,
    markets: Vec<String>,
    version: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let v = version.fetch_add(1, Ordering::SeqCst) + 1;
            for m in &markets {
                p.update(m, v, &v.to_string());
            }
            p.flush();
            std::thread::sleep(ROUND);
        }
    });
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
    channels: Vec<(String, Vec<String>, Arc<Mutex<Seen>>)>,
    version: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

async fn world(broker: Broker, redis: PrivateRedis) -> World {
    let url = redis.url();
    let p = blocking(move || {
        let mut p = Pipeline::new(broker, 4);
        p.config.redis_url = url;
        Arc::new(p)
    })
    .await;
    let pc = p.clone();
    let reducer = blocking(move || start_reducer(&pc)).await;
    let publ = InProcess::start_with_redis(&p, &redis.url()).await;
    let mut channels = Vec::new();
    let mut all = Vec::new();
    for c in 0..CHANNELS {
        let markets: Vec<String> = (0..MARKETS).map(|m| format!("L{c}M{m}")).collect();
        let refs: Vec<&str> = markets.iter().map(String::as_str).collect();
        let ch = create_channel(publ.addr, &refs).await;
        let ws = open_stream(publ.addr, &ch).await;
        let seen = Arc::new(Mutex::new(Seen::default()));
        run_client(ws, seen.clone());
        all.extend(markets.iter().cloned());
        channels.push((ch, markets, seen));
    }
    let version = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    run_feed(p.clone(), all, version.clone(), stop.clone());
    let w = World {
        p,
        redis,
        reducer,
        publ,
        channels,
        version,
        stop,
    };
    w.every_client_gets_versions_after(0, "before the loss")
        .await;
    w
}

impl World {
    /// Waits until every client holds a version above `after` of every
    /// market of its channel.
    async fn every_client_gets_versions_after(&self, after: u64, when: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let missing: Vec<String> = self
                .channels
                .iter()
                .flat_map(|(ch, markets, seen)| {
                    let s = seen.lock().unwrap();
                    markets
                        .iter()
                        .filter(|m| s.max.get(*m).is_none_or(|v| *v <= after))
                        .map(|m| format!("{ch}/{m}@{:?}", s.max.get(m)))
                        .collect::<Vec<_>>()
                })
                .collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{when}: clients lack versions above {after} of {missing:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

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
    let at_loss = w.version.load(Ordering::SeqCst);
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
    w.every_client_gets_versions_after(at_loss, "after the loss")
        .await;

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
    let after_rebalance = w.version.load(Ordering::SeqCst);
    w.every_client_gets_versions_after(after_rebalance, "after the rebalance")
        .await;
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

    w.stop.store(true, Ordering::SeqCst);
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
    let at_restart = w.version.load(Ordering::SeqCst);
    w.every_client_gets_versions_after(at_restart, "after the restart")
        .await;
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
    w.stop.store(true, Ordering::SeqCst);
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
    let url = redis.url();
    let p = blocking(move || {
        let mut p = Pipeline::new(Broker::Dev, 4);
        p.config.redis_url = url;
        Arc::new(p)
    })
    .await;
    let pc = p.clone();
    let mut first = blocking(move || streampipe_tests::ReducerProcess::spawn(&pc)).await;
    let publ = InProcess::start_with_redis(&p, &redis.url()).await;
    let mut channels = Vec::new();
    let mut all = Vec::new();
    for c in 0..CHANNELS {
        let markets: Vec<String> = (0..MARKETS).map(|m| format!("D{c}M{m}")).collect();
        let refs: Vec<&str> = markets.iter().map(String::as_str).collect();
        let ch = create_channel(publ.addr, &refs).await;
        let ws = open_stream(publ.addr, &ch).await;
        let seen = Arc::new(Mutex::new(Seen::default()));
        run_client(ws, seen.clone());
        all.extend(markets.iter().cloned());
        channels.push((ch, markets, seen));
    }
    let version = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    run_feed(p.clone(), all, version.clone(), stop.clone());
    let reached = |after: u64, when: &'static str| {
        let channels: Vec<_> = channels
            .iter()
            .map(|(_, m, s)| (m.clone(), s.clone()))
            .collect();
        async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let missing: Vec<String> = channels
                    .iter()
                    .flat_map(|(markets, seen)| {
                        let s = seen.lock().unwrap();
                        markets
                            .iter()
                            .filter(|m| s.max.get(*m).is_none_or(|v| *v <= after))
                            .cloned()
                            .collect::<Vec<_>>()
                    })
                    .collect();
                if missing.is_empty() {
                    return;
                }
                assert!(Instant::now() < deadline, "{when}: missing {missing:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    reached(0, "before the loss").await;
    // Let the auto-committer commit the subscribes' offsets (every second).
    tokio::time::sleep(Duration::from_secs(3)).await;

    blocking(move || first.kill()).await;
    let _: () = redis::cmd("FLUSHALL")
        .query(&mut redis.connection())
        .unwrap();
    let at_loss = version.load(Ordering::SeqCst);
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
    reached(
        at_loss.max(version.load(Ordering::SeqCst)),
        "after the loss",
    )
    .await;
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
    stop.store(true, Ordering::SeqCst);
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
    let url = redis.url();
    let p = blocking(move || {
        let mut p = Pipeline::new(Broker::Dev, 4);
        p.config.redis_url = url;
        Arc::new(p)
    })
    .await;
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
