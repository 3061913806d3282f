//! Query subscriptions on the real stack: control API → query commands on
//! every partition → reducers match data records → Redis → publisher →
//! WebSocket client.

use std::sync::Arc;
use std::time::Duration;

use streampipe_contract::{partition_for, MAX_QUERIES_PER_CHANNEL};
use streampipe_tests::publisher::{
    blocking, create_channel, http, open_stream, setup, with_reducer, ws_next, Frame, InProcess, Ws,
};
use streampipe_tests::{test_log, wait_for, Broker, Pipeline};

const PARTITIONS: i32 = 4;

fn enc(q: &str) -> String {
    q.replace('^', "%5E")
        .replace('=', "%3D")
        .replace(';', "%3B")
}

async fn add_query(publ: &InProcess, ch: &str, q: &str) -> streampipe_tests::publisher::Resp {
    let body = serde_json::json!({ "query": q }).to_string();
    http(
        publ.addr,
        "POST",
        &format!("/v1/channels/{ch}/queries"),
        Some(&body),
    )
    .await
}

/// Waits until every partition's owner holds `channel`'s `query` (the
/// reducers persist a query per partition when they apply its command).
async fn wait_query_held(p: &Arc<Pipeline>, channel: &str, query: &str) {
    let (p, pair) = (p.clone(), format!("{channel} {query}"));
    blocking(move || {
        wait_for(
            Duration::from_secs(30),
            "query held on every partition",
            || {
                (0..PARTITIONS)
                    .all(|part| {
                        p.smembers(&p.keys().partition_queries(part))
                            .contains(&pair)
                    })
                    .then_some(())
            },
        )
    })
    .await;
}

/// Reads frames until `pred` holds on everything read so far (updates and
/// `removed` messages); returns them.
async fn read_until(
    ws: &mut Ws,
    got: &mut Vec<serde_json::Value>,
    what: &str,
    pred: impl Fn(&[serde_json::Value]) -> bool,
) {
    let start = std::time::Instant::now();
    let deadline = start + Duration::from_secs(30);
    while !pred(got) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match ws_next(ws, left).await {
            Some(Frame::Json(v)) if v["type"] == "update" || v["type"] == "removed" => got.push(v),
            Some(Frame::Json(_)) => {}
            // `None` is a timeout or a stream that ended: the elapsed time
            // tells which.
            other => panic!(
                "waiting for {what}: got {other:?} after {:?}, having read {got:?}",
                start.elapsed()
            ),
        }
    }
}

fn has(got: &[serde_json::Value], market: &str, version: u64) -> bool {
    got.iter()
        .any(|u| u["type"] == "update" && u["market"] == market && u["version"] == version)
}

fn removed(got: &[serde_json::Value], market: &str) -> bool {
    got.iter()
        .any(|u| u["type"] == "removed" && u["market"] == market)
}

/// Market ids under `prefix` covering every partition, two each.
fn markets_on_every_partition(prefix: &str) -> Vec<String> {
    let mut per = vec![0; PARTITIONS as usize];
    let mut out = Vec::new();
    for i in 0.. {
        let m = format!("{prefix}{i}");
        let part = partition_for(m.as_bytes(), PARTITIONS as u32) as usize;
        if per[part] < 2 {
            per[part] += 1;
            out.push(m);
        }
        if per.iter().all(|&n| n == 2) {
            break;
        }
    }
    out
}

/// A pipeline on `broker` with an in-process reducer and publisher.
async fn setup_on(broker: Broker) -> (Arc<Pipeline>, streampipe_reducer::ReducerHandle, InProcess) {
    if let Broker::Dev = broker {
        return setup(PARTITIONS).await;
    }
    let (p, r) = blocking(move || {
        let p = Pipeline::new(broker, PARTITIONS);
        let r = streampipe_reducer::spawn(
            p.config.clone(),
            Arc::new(streampipe_reducer::Metrics::new()),
        )
        .unwrap();
        (Arc::new(p), r)
    })
    .await;
    let publ = InProcess::start(&p).await;
    (p, r, publ)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markets_created_after_the_query_reach_the_client_and_leave_when_they_stop_matching() {
    created_after_the_query(Broker::Dev).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markets_created_after_the_query_reach_the_client_on_tansu() {
    created_after_the_query(Broker::Tansu).await;
}

async fn created_after_the_query(broker: Broker) {
    let (p, _reducer, publ) = setup_on(broker).await;
    let ch = create_channel(publ.addr, &["OTHER.1"]).await;
    let r = add_query(&publ, &ch, "status=open;market^=FB.").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let q = "market^=FB.;status=open";
    assert_eq!(r.json()["queries"], serde_json::json!([q]), "canonical");
    wait_query_held(&p, &ch, q).await;
    let mut ws = open_stream(publ.addr, &ch).await;

    // Markets that did not exist when the query was made, on every partition.
    let markets = markets_on_every_partition("FB.new.");
    for m in &markets {
        p.update(m, 1, r#"{"status":"open","home":1.5}"#);
    }
    p.update("TN.1", 1, r#"{"status":"open"}"#);
    p.update("FB.closed", 1, r#"{"status":"closed"}"#);
    p.flush();
    let mut got = Vec::new();
    read_until(&mut ws, &mut got, "every new matching market", |g| {
        markets.iter().all(|m| has(g, m, 1))
    })
    .await;
    // Live updates follow without the client asking.
    p.update(&markets[0], 2, r#"{"status":"open","home":1.6}"#);
    p.flush();
    read_until(&mut ws, &mut got, "a live update", |g| {
        has(g, &markets[0], 2)
    })
    .await;

    // markets[1] is suspended: it stops matching and leaves.
    p.update(&markets[1], 2, r#"{"status":"suspended"}"#);
    p.flush();
    read_until(&mut ws, &mut got, "removed", |g| removed(g, &markets[1])).await;
    let (pc, chc, left) = (p.clone(), ch.clone(), markets[1].clone());
    blocking(move || {
        let qm = pc.smembers(&pc.keys().channel_query_markets(&chc));
        assert!(!qm.contains(&left), "{qm:?}");
        assert_eq!(qm.len(), 7, "{qm:?}");
    })
    .await;
    // After it left, its updates stop; a barrier update of a market still
    // matching shows they would have arrived.
    p.update(&markets[1], 3, r#"{"status":"suspended"}"#);
    p.update(&markets[0], 3, r#"{"status":"open"}"#);
    p.flush();
    read_until(&mut ws, &mut got, "barrier", |g| has(g, &markets[0], 3)).await;
    assert!(!has(&got, &markets[1], 3), "{got:?}");
    assert!(!got
        .iter()
        .any(|u| u["market"] == "TN.1" || u["market"] == "FB.closed"));

    // Removing the query removes every market it brought.
    let r = http(
        publ.addr,
        "DELETE",
        &format!("/v1/channels/{ch}/queries?query={}", enc(q)),
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    read_until(&mut ws, &mut got, "all removed", |g| {
        markets
            .iter()
            .filter(|m| *m != &markets[1])
            .all(|m| removed(g, m))
    })
    .await;
    let r = http(
        publ.addr,
        "GET",
        &format!("/v1/channels/{ch}/queries"),
        None,
    )
    .await;
    assert_eq!(r.json()["queries"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_market_held_concretely_and_by_a_query_stays_when_either_ends() {
    let (p, _reducer, publ) = setup(PARTITIONS).await;
    let ch = create_channel(publ.addr, &["FB.both"]).await;
    let q = "market^=FB.;status=open";
    assert_eq!(add_query(&publ, &ch, q).await.status, 200);
    wait_query_held(&p, &ch, q).await;
    let mut ws = open_stream(publ.addr, &ch).await;
    p.update("FB.both", 1, r#"{"status":"open"}"#);
    p.flush();
    let mut got = Vec::new();
    read_until(&mut ws, &mut got, "v1", |g| has(g, "FB.both", 1)).await;
    let (pc, chc) = (p.clone(), ch.clone());
    blocking(move || {
        wait_for(Duration::from_secs(30), "query match", || {
            pc.smembers(&pc.keys().channel_query_markets(&chc))
                .contains(&"FB.both".to_string())
                .then_some(())
        })
    })
    .await;
    // It stops matching: still held by name, so it stays.
    p.update("FB.both", 2, r#"{"status":"closed"}"#);
    p.update("FB.both", 3, r#"{"status":"closed","x":1}"#);
    p.flush();
    read_until(&mut ws, &mut got, "v3", |g| has(g, "FB.both", 3)).await;
    assert!(!removed(&got, "FB.both"), "{got:?}");
    // Matching again, then removed by name: the query still holds it.
    p.update("FB.both", 4, r#"{"status":"open"}"#);
    p.flush();
    read_until(&mut ws, &mut got, "v4", |g| has(g, "FB.both", 4)).await;
    let (pc, chc) = (p.clone(), ch.clone());
    blocking(move || {
        wait_for(Duration::from_secs(30), "query match again", || {
            pc.smembers(&pc.keys().channel_query_markets(&chc))
                .contains(&"FB.both".to_string())
                .then_some(())
        })
    })
    .await;
    let r = http(
        publ.addr,
        "DELETE",
        &format!("/v1/channels/{ch}/markets/FB.both"),
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    p.update("FB.both", 5, r#"{"status":"open"}"#);
    p.flush();
    read_until(&mut ws, &mut got, "v5", |g| has(g, "FB.both", 5)).await;
    assert!(!removed(&got, "FB.both"), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_and_limits_are_refused_with_4xx_and_counted() {
    let (_p, _reducer, publ) = setup(PARTITIONS).await;
    let ch = create_channel(publ.addr, &["M1"]).await;
    for (q, why) in [
        ("status", "neither"),
        ("a=1;a=2", "named twice"),
        ("a=b c", "contains"),
        ("", "empty"),
    ] {
        let r = add_query(&publ, &ch, q).await;
        assert_eq!(r.status, 400, "{q:?}: {}", r.body);
        assert_eq!(r.error_code(), "invalid_query");
        assert!(r.body.contains(why), "{q:?}: {}", r.body);
    }
    let rejected = |code: &str| publ.ctx.metrics.rejected.with_label_values(&[code]).get();
    assert_eq!(rejected("invalid_query"), 4);
    for i in 0..MAX_QUERIES_PER_CHANNEL {
        let r = add_query(&publ, &ch, &format!("market^=P{i}.")).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // The same query again is no new query.
    assert_eq!(add_query(&publ, &ch, "market^=P0.").await.status, 200);
    let r = add_query(&publ, &ch, "market^=X.").await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.error_code(), "too_many_queries");
    assert_eq!(rejected("too_many_queries"), 1);
    let r = http(
        publ.addr,
        "DELETE",
        &format!("/v1/channels/{ch}/queries?query={}", enc("market^=X.")),
        None,
    )
    .await;
    assert_eq!((r.status, r.error_code().as_str()), (404, "unknown_query"));
    let r = add_query(&publ, "no-such-channel", "market^=X.").await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (404, "unknown_channel")
    );
    // Closing the channel drops its queries everywhere.
    let r = http(publ.addr, "DELETE", &format!("/v1/channels/{ch}"), None).await;
    assert_eq!(r.status, 204, "{}", r.body);
    let k = publ.ctx.registry.queries(&ch).await.unwrap();
    assert!(k.is_empty(), "{k:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_survive_a_reducer_restart() {
    test_log();
    let (p, reducer) = with_reducer(PARTITIONS).await;
    let publ = InProcess::start(&p).await;
    let ch = create_channel(publ.addr, &["OTHER.1"]).await;
    let q = "market^=RS.";
    assert_eq!(add_query(&publ, &ch, q).await.status, 200);
    wait_query_held(&p, &ch, q).await;
    p.update("RS.before", 1, "{}");
    p.flush();
    let mut ws = open_stream(publ.addr, &ch).await;
    let mut got = Vec::new();
    read_until(&mut ws, &mut got, "before", |g| has(g, "RS.before", 1)).await;
    // A new reducer owns every partition; it must know the query.
    blocking(move || reducer.shutdown().unwrap()).await;
    let pc = p.clone();
    let _reducer = blocking(move || {
        streampipe_reducer::spawn(
            pc.config.clone(),
            Arc::new(streampipe_reducer::Metrics::new()),
        )
        .unwrap()
    })
    .await;
    let markets = markets_on_every_partition("RS.after.");
    for m in &markets {
        p.update(m, 1, "{}");
    }
    p.update("RS.before", 2, "{}");
    p.flush();
    read_until(&mut ws, &mut got, "after the restart", |g| {
        has(g, "RS.before", 2) && markets.iter().all(|m| has(g, m, 1))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_are_written_back_after_redis_lost_the_pipeline() {
    let (p, _reducer, publ) = setup(PARTITIONS).await;
    let ch = create_channel(publ.addr, &["OTHER.1"]).await;
    let q = "market^=WB.";
    assert_eq!(add_query(&publ, &ch, q).await.status, 200);
    wait_query_held(&p, &ch, q).await;
    p.update("WB.before", 1, "{}");
    p.flush();
    let mut ws = open_stream(publ.addr, &ch).await;
    let mut got = Vec::new();
    read_until(&mut ws, &mut got, "before", |g| has(g, "WB.before", 1)).await;
    // Redis loses everything of the pipeline (as a restart without
    // persistence would): the reducers notice the epoch is gone and write
    // back what they hold, queries included.
    let pc = p.clone();
    blocking(move || {
        let keys = pc.all_keys();
        assert!(!keys.is_empty());
        let mut c = pc.redis();
        let _: () = redis::cmd("DEL").arg(&keys).query(&mut c).unwrap();
    })
    .await;
    wait_query_held(&p, &ch, q).await;
    let (pc, chc) = (p.clone(), ch.clone());
    blocking(move || {
        wait_for(
            Duration::from_secs(30),
            "the API's view written back",
            || {
                let k = pc.keys();
                (pc.smembers(&k.channel_queries(&chc)) == vec![q.to_string()]
                    && pc.smembers(&k.channel_query_markets(&chc)) == vec!["WB.before".to_string()])
                .then_some(())
            },
        )
    })
    .await;
    let markets = markets_on_every_partition("WB.after.");
    for m in &markets {
        p.update(m, 1, "{}");
    }
    p.flush();
    read_until(&mut ws, &mut got, "new markets after the loss", |g| {
        markets.iter().all(|m| has(g, m, 1))
    })
    .await;
}

/// `GET /v1/snapshot?query=`: the markets a held query matches now, with
/// their versions, under one canonical URL (other spellings redirect); a
/// query nobody holds matches nothing yet; a market that stopped matching
/// is not in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_snapshot_holds_the_markets_matching_now() {
    let (p, _reducer, publ) = setup(PARTITIONS).await;
    let ch = create_channel(publ.addr, &["OTHER.2"]).await;
    let q = "market^=QS.;status=open";
    let r = add_query(&publ, &ch, q).await;
    assert_eq!(r.status, 200, "{}", r.body);
    wait_query_held(&p, &ch, q).await;
    let mut ws = open_stream(publ.addr, &ch).await;
    let markets = markets_on_every_partition("QS.");
    for (i, m) in markets.iter().enumerate() {
        p.update(m, 10 + i as u64, r#"{"status":"open"}"#);
    }
    p.update("QS.shut", 1, r#"{"status":"closed"}"#);
    p.flush();
    let mut got = Vec::new();
    read_until(&mut ws, &mut got, "every matching market", |g| {
        markets
            .iter()
            .enumerate()
            .all(|(i, m)| has(g, m, 10 + i as u64))
    })
    .await;
    // One market stops matching: it leaves the snapshot too.
    p.update(&markets[0], 99, r#"{"status":"suspended"}"#);
    p.flush();
    read_until(&mut ws, &mut got, "removed", |g| removed(g, &markets[0])).await;

    let path = format!("/v1/snapshot?query={}", enc(q));
    let r = http(publ.addr, "GET", &path, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["query"], q);
    assert_eq!(v["truncated"], false);
    let got_markets = v["markets"].as_object().unwrap();
    assert_eq!(got_markets.len(), markets.len() - 1, "{v}");
    for (i, m) in markets.iter().enumerate().skip(1) {
        assert_eq!(got_markets[m]["version"], 10 + i as u64, "{m}: {v}");
    }
    assert!(!got_markets.contains_key(&markets[0]), "{v}");
    assert!(!got_markets.contains_key("QS.shut"), "{v}");

    // Another spelling of the same query redirects to the canonical URL.
    let other = format!("/v1/snapshot?query={}", enc("status=open;market^=QS."));
    let r = http(publ.addr, "GET", &other, None).await;
    assert_eq!(r.status, 308, "{}", r.body);
    // A query nobody holds matches nothing yet; a bad one is a 400.
    let r = http(
        publ.addr,
        "GET",
        &format!("/v1/snapshot?query={}", enc("market^=NOBODY.")),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["markets"], serde_json::json!({}));
    let r = http(publ.addr, "GET", "/v1/snapshot?query=nonsense", None).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("invalid_query"), "{}", r.body);
}
