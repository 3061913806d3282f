//! Fan-out that scales with pods, not watchers: real Kafka-protocol broker,
//! real Redis, reducer and publishers in process, WebSocket clients.
//!
//! - One market watched by hundreds of channels costs Redis one publish per
//!   update (counted in a private Redis' `INFO commandstats`), and every
//!   watcher receives every version the hub did not conflate.
//! - A market added to a live channel through *another* pod's API reaches
//!   the stream (state and live updates) without the client asking; a
//!   removed one stops.
//! - A flood on the market topics far above what the pod can fan out is
//!   conflated, never queued without bound: every client ends on every
//!   market's final version, versions never go backwards, and no outbox
//!   grows past its bound (the hub queue's bound is unit-tested in `ingest`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use streampipe_reducer::{spawn, Metrics};
use streampipe_tests::publisher::{
    blocking, create_channel, http, open_stream, ws_next, Frame, InProcess, Ws,
};
use streampipe_tests::{free_port, now_ms, wait_for, Broker, Pipeline, PrivateRedis};

/// Reads updates into `seen` (market → versions) until `done` holds.
async fn read_until(
    ws: &mut Ws,
    seen: &mut HashMap<String, Vec<u64>>,
    what: &str,
    done: impl Fn(&HashMap<String, Vec<u64>>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match ws_next(ws, left).await {
            Some(Frame::Json(v)) if v["type"] == "update" => {
                let m = v["market"].as_str().unwrap().to_owned();
                let ver = v["version"].as_u64().unwrap();
                let vs = seen.entry(m.clone()).or_default();
                if let Some(&last) = vs.last() {
                    assert!(ver > last, "{m}: version {ver} after {last}");
                }
                vs.push(ver);
            }
            Some(Frame::Json(v)) if v["type"] == "removed" => {
                // A market left the channel: recorded as `removed:<market>`.
                let m = v["market"].as_str().unwrap();
                seen.entry(format!("removed:{m}")).or_default();
            }
            Some(Frame::Json(v)) => panic!("waiting for {what}: unexpected {v}"),
            other => panic!("waiting for {what}: got {other:?}; seen {seen:?}"),
        }
    }
}

/// One command on a fresh connection to `url`; `None` on any error (for polling).
fn query<T: redis::FromRedisValue>(url: &str, cmd: &redis::Cmd) -> Option<T> {
    let mut c = redis::Client::open(url).ok()?.get_connection().ok()?;
    cmd.query(&mut c).ok()
}

fn commandstat(url: &str, cmd: &str) -> u64 {
    let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut c)
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// 300 channels on one market: Redis publishes each update once, and every
/// watcher gets every version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_market_costs_redis_one_publish_per_update() {
    const WATCHERS: usize = 300;
    const UPDATES: u64 = 20;
    let port = free_port();
    let redis = blocking(move || PrivateRedis::start(port)).await;
    let url = redis.url();
    let (p, reducer) = {
        let url = url.clone();
        blocking(move || {
            let mut p = Pipeline::new(Broker::Dev, 4);
            p.config.redis_url = url;
            let r = spawn(p.config.clone(), Arc::new(Metrics::new())).unwrap();
            (Arc::new(p), r)
        })
        .await
    };
    let publ = InProcess::start_with_redis(&p, &url).await;
    let keys = p.keys();
    p.update("HOT", 1, "1");
    p.flush();
    {
        let (u, k) = (url.clone(), keys.market_state("HOT"));
        blocking(move || {
            wait_for(Duration::from_secs(30), "HOT v1 stored", || {
                let v: Option<u64> = query(&u, redis::cmd("HGET").arg(&k).arg("v"))?;
                (v == Some(1)).then_some(())
            })
        })
        .await;
    }
    let channels = join_all((0..WATCHERS).map(|_| create_channel(publ.addr, &["HOT"]))).await;
    let mut streams = join_all(channels.iter().map(|c| open_stream(publ.addr, c))).await;
    // Everyone has the state (v1) before the live updates start.
    let mut seen: Vec<HashMap<String, Vec<u64>>> = vec![HashMap::new(); WATCHERS];
    for (ws, s) in streams.iter_mut().zip(seen.iter_mut()) {
        read_until(ws, s, "HOT v1", |s| s.contains_key("HOT")).await;
    }
    // Every subscribe is applied before counting.
    {
        let (u, k) = (url.clone(), keys.market_channels("HOT"));
        blocking(move || {
            wait_for(Duration::from_secs(60), "all subscriptions applied", || {
                let n: usize = query(&u, redis::cmd("SCARD").arg(&k))?;
                (n == WATCHERS).then_some(())
            })
        })
        .await;
    }
    let (u, topic) = (url.clone(), keys.market_topic("HOT"));
    let numsub: Vec<(String, u64)> = blocking(move || {
        let mut c = redis::Client::open(u.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&topic)
            .query(&mut c)
            .unwrap()
    })
    .await;
    assert_eq!(numsub[0].1, 1, "one subscription per pod, not per watcher");
    let publishes_before = commandstat(&url, "publish");
    for v in 2..=UPDATES + 1 {
        p.update("HOT", v, &v.to_string());
    }
    p.flush();
    let last = UPDATES + 1;
    for (ws, s) in streams.iter_mut().zip(seen.iter_mut()) {
        read_until(ws, s, "every live version", |s| {
            s.get("HOT").is_some_and(|v| v.last() == Some(&last))
        })
        .await;
    }
    let publishes = commandstat(&url, "publish") - publishes_before;
    assert_eq!(
        publishes, UPDATES,
        "Redis published {publishes} messages for {UPDATES} updates to {WATCHERS} watchers"
    );
    // Every watcher got every version, in order, except those conflated
    // (latest wins) at the hub or in its outbox if this box held the pod
    // back: nothing missing that was not counted.
    let hub = publ.ctx.metrics.hub_conflated.get();
    let outboxes = publ.ctx.metrics.conflated.get();
    for s in &seen {
        let got = &s["HOT"];
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
        assert_eq!(got.last(), Some(&last));
        let n = got.len() as u64;
        assert!(
            n + hub <= last && n + hub + outboxes >= last,
            "versions received {got:?} with {hub} conflated at the hub and {outboxes} in outboxes"
        );
    }
    let fanout = publ.ctx.metrics.fanout.get_sample_sum();
    assert!(
        fanout >= (WATCHERS as u64 * UPDATES) as f64,
        "fan-out histogram: {fanout}"
    );
    drop(streams);
    drop(publ);
    blocking(move || reducer.shutdown().unwrap()).await;
    drop(redis);
}

/// A market added (or removed) through another pod's API reaches the live
/// stream on this pod without the client asking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markets_changed_on_another_pod_reach_live_streams() {
    let (p, reducer) = blocking(|| {
        let p = Pipeline::new(Broker::Dev, 4);
        let r = spawn(p.config.clone(), Arc::new(Metrics::new())).unwrap();
        (Arc::new(p), r)
    })
    .await;
    let a = InProcess::start(&p).await;
    let b = InProcess::start(&p).await;
    // A pod with no stream yet is ready as soon as its pub/sub connection is.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(a.ctx.hub.is_connected() && b.ctx.hub.is_connected()) {
        assert!(Instant::now() < deadline, "an idle pod never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.update("X2", 7, r#"{"x":7}"#);
    p.flush();
    let pc = p.clone();
    blocking(move || {
        wait_for(Duration::from_secs(30), "X2 stored", || {
            (pc.state_version("X2") == 7).then_some(())
        })
    })
    .await;
    let ch = create_channel(a.addr, &["X1"]).await;
    let mut ws = open_stream(a.addr, &ch).await;
    p.update("X1", 1, "1");
    p.flush();
    let mut seen = HashMap::new();
    read_until(&mut ws, &mut seen, "X1 v1", |s| s.contains_key("X1")).await;

    let body = serde_json::json!({"markets": ["X2"]}).to_string();
    let r = http(
        b.addr,
        "POST",
        &format!("/v1/channels/{ch}/markets"),
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Its stored state arrives without a begin, then its live updates.
    read_until(&mut ws, &mut seen, "X2 state", |s| {
        s.get("X2").is_some_and(|v| v.contains(&7))
    })
    .await;
    let (pc, chc) = (p.clone(), ch.clone());
    blocking(move || pc.wait_subscribed(&chc, "X2")).await;
    p.update("X2", 8, "8");
    p.flush();
    read_until(&mut ws, &mut seen, "X2 v8", |s| {
        s.get("X2").is_some_and(|v| v.contains(&8))
    })
    .await;

    // A second channel keeps X1 watched; removing X1 from ours through pod B
    // must stop X1 on our stream although its topic still flows.
    let other = create_channel(a.addr, &["X1"]).await;
    let mut ws2 = open_stream(a.addr, &other).await;
    let mut seen2 = HashMap::new();
    read_until(&mut ws2, &mut seen2, "X1 on the other channel", |s| {
        s.contains_key("X1")
    })
    .await;
    let r = http(
        b.addr,
        "DELETE",
        &format!("/v1/channels/{ch}/markets/X1"),
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.ctx.hub.holds(&ch, "X1") {
        assert!(
            Instant::now() < deadline,
            "pod A never dropped X1 for the channel"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.update("X1", 2, "2");
    p.update("X2", 9, "9");
    p.flush();
    read_until(&mut ws2, &mut seen2, "X1 v2 on the other channel", |s| {
        s.get("X1").is_some_and(|v| v.contains(&2))
    })
    .await;
    read_until(&mut ws, &mut seen, "X2 v9", |s| {
        s.get("X2").is_some_and(|v| v.contains(&9))
    })
    .await;
    assert!(
        !seen["X1"].contains(&2),
        "a removed market kept streaming: {seen:?}"
    );
    assert!(
        seen.contains_key("removed:X1"),
        "the stream was told the market left: {seen:?}"
    );
    drop((ws, ws2, a, b));
    blocking(move || reducer.shutdown().unwrap()).await;
}

/// Updates offered far faster than the pod can fan them out are conflated
/// in the hub: bounded queue, latest version wins, nothing goes backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_conflated_in_the_hub_not_queued() {
    const MARKETS: usize = 20;
    const CLIENTS: usize = 100;
    const VERSIONS: u64 = 2_000;
    let port = free_port();
    let redis = blocking(move || PrivateRedis::start(port)).await;
    let url = redis.url();
    let p = blocking(|| Arc::new(Pipeline::new(Broker::Dev, 2))).await;
    // Anonymous: the channels below are registered by hand, bound to nobody.
    let mut config = streampipe_publisher::Config::new(&p.broker.bootstrap(), &p.name, &url);
    config.command_topic = p.config.command_topic.clone();
    config.auth.mode = streampipe_publisher::auth::Mode::Anonymous;
    let publ = InProcess::start_with_config(config).await;
    let keys = p.keys();
    let markets: Vec<String> = (0..MARKETS).map(|i| format!("F{i}")).collect();
    // Channels registered straight in the registry: no reducer is needed
    // to route what we publish on the market topics ourselves.
    let channels: Vec<String> = (0..CLIENTS).map(|i| format!("flood-{i}")).collect();
    {
        let (u, k, ms, chs) = (url.clone(), keys.clone(), markets.clone(), channels.clone());
        blocking(move || {
            let mut c = redis::Client::open(u.as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            for ch in &chs {
                let _: () = redis::cmd("SADD")
                    .arg(k.channel_registry(ch))
                    .arg(&ms)
                    .query(&mut c)
                    .unwrap();
            }
        })
        .await;
    }
    let mut streams = join_all(channels.iter().map(|c| open_stream(publ.addr, c))).await;
    let (u, k, ms) = (url.clone(), keys.clone(), markets.clone());
    let started = Instant::now();
    blocking(move || {
        let mut c = redis::Client::open(u.as_str()).unwrap().get_connection().unwrap();
        for v in 1..=VERSIONS {
            let mut pipe = redis::pipe();
            for m in &ms {
                let msg = format!(
                    r#"{{"type":"update","market":"{m}","version":{v},"ts":{},"payload":{{"p":{v}}}}}"#,
                    now_ms()
                );
                pipe.cmd("PUBLISH").arg(k.market_topic(m)).arg(msg).ignore();
            }
            let _: () = pipe.query(&mut c).unwrap();
        }
    })
    .await;
    let offered = MARKETS as u64 * VERSIONS;
    let secs = started.elapsed().as_secs_f64();
    let m = &publ.ctx.metrics;
    for ws in streams.iter_mut() {
        let mut seen = HashMap::new();
        read_until(ws, &mut seen, "every market's final version", |s| {
            markets
                .iter()
                .all(|mk| s.get(mk).is_some_and(|v| v.last() == Some(&VERSIONS)))
        })
        .await;
    }
    eprintln!(
        "flood: {offered} updates in {secs:.2}s to {CLIENTS} clients; hub conflated {}, outbox conflated {}, messages sent {}",
        m.hub_conflated.get(),
        m.conflated.get(),
        m.sent.with_label_values(&["ws"]).get()
    );
    assert!(publ.ctx.hub.max_outbox_bytes() < 512 * 1024);
    drop(streams);
    drop(publ);
    drop(redis);
}
