//! Event history on the real stack (dev broker, Redis, in-process reducer
//! and publisher): history markets keep every applied update in a capped
//! Redis Stream; a client resuming with `since` gets every missed event in
//! order (`recovered: true`), or the latest state when the history no
//! longer covers the gap (`recovered: false`); redelivered records add no
//! entry; markets without history behave as before.

use std::sync::Arc;
use std::time::Duration;

use streampipe_contract::History;
use streampipe_tests::publisher::{
    blocking, config_for, create_channel, with_reducer_using, ws_connect, ws_next, ws_send, Frame,
    InProcess, Ws,
};
use streampipe_tests::{wait_for, Pipeline};

/// History markets of these tests: ids starting with `H.`.
const PREFIX: &str = "H.";
/// The tests' stream cap (small, to trim with a few hundred events).
const MAX_LEN: u64 = 20;

fn history() -> History {
    History::parse(PREFIX, MAX_LEN).unwrap()
}

async fn start() -> (Arc<Pipeline>, streampipe_reducer::ReducerHandle, InProcess) {
    let (p, reducer) = with_reducer_using(1, |c| c.history = history()).await;
    let mut config = config_for(&p);
    config.history = history();
    let publ = InProcess::start_with_config(config).await;
    (p, reducer, publ)
}

async fn wait_state(p: &Arc<Pipeline>, market: &'static str, version: u64) {
    let pc = p.clone();
    blocking(move || {
        wait_for(Duration::from_secs(30), "state stored", || {
            (pc.state_version(market) == version).then_some(())
        })
    })
    .await;
}

/// `(id, p)` of every entry of `market`'s stream.
async fn entries(p: &Arc<Pipeline>, market: &'static str) -> Vec<(String, u64)> {
    let pc = p.clone();
    blocking(move || {
        let mut c = pc.redis();
        let raw: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(pc.keys().market_history(market))
            .arg("-")
            .arg("+")
            .query(&mut c)
            .unwrap();
        raw.into_iter()
            .map(|(id, fields)| {
                let prev = fields
                    .iter()
                    .find(|(k, _)| k == "p")
                    .map(|(_, v)| v.parse().unwrap())
                    .unwrap();
                (id, prev)
            })
            .collect()
    })
    .await
}

/// Opens a stream, waits for `subscribed` and sends `begin` with `since`.
async fn resume(publ: &InProcess, ch: &str, since: &str) -> Ws {
    resume_after(publ, ch, since, Duration::ZERO).await
}

/// [`resume`], sending `begin` only `delay` after `subscribed`.
async fn resume_after(publ: &InProcess, ch: &str, since: &str, delay: Duration) -> Ws {
    let mut ws = ws_connect(publ.addr, ch, "").await;
    match ws_next(&mut ws, Duration::from_secs(10)).await {
        Some(Frame::Json(v)) if v["type"] == "subscribed" => {}
        other => panic!("expected subscribed, got {other:?}"),
    }
    tokio::time::sleep(delay).await;
    ws_send(&mut ws, &format!(r#"{{"type":"begin","since":{since}}}"#)).await;
    ws
}

/// Reads frames until `done` holds on them.
async fn read_until(
    ws: &mut Ws,
    got: &mut Vec<serde_json::Value>,
    what: &str,
    done: impl Fn(&[serde_json::Value]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done(got) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws_next(ws, left).await {
            Some(Frame::Json(v)) => got.push(v),
            other => panic!("waiting for {what}: got {other:?} after {got:?}"),
        }
    }
}

fn versions(got: &[serde_json::Value], market: &str) -> Vec<u64> {
    got.iter()
        .filter(|v| v["type"] == "update" && v["market"] == market)
        .map(|v| v["version"].as_u64().unwrap())
        .collect()
}

fn recovered(got: &[serde_json::Value], market: &str) -> Vec<serde_json::Value> {
    got.iter()
        .filter(|v| v["type"] == "recovered" && v["market"] == market)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_client_gets_every_missed_event_in_order_and_live_ones_without_a_gap() {
    let (p, reducer, publ) = start().await;
    let (hm, lm) = ("H.bets.1", "L.odds.1");
    let ch = create_channel(publ.addr, &[hm, lm]).await;
    let mut ws = resume(&publ, &ch, "{}").await;
    for v in 1..=3 {
        p.update(hm, v, &v.to_string());
        p.update(lm, v, &v.to_string());
    }
    p.flush();
    let mut got = Vec::new();
    read_until(&mut ws, &mut got, "first events", |g| {
        versions(g, hm).last() == Some(&3) && versions(g, lm).last() == Some(&3)
    })
    .await;
    drop(ws);

    // Away: K events of each market.
    const K: u64 = 10;
    for v in 4..4 + K {
        p.update(hm, v, &v.to_string());
        p.update(lm, v, &v.to_string());
    }
    p.flush();
    wait_state(&p, hm, 3 + K).await;
    wait_state(&p, lm, 3 + K).await;

    // Back with since, while the history market keeps changing — also
    // between the stream's join and its begin (300 ms here; a round trip
    // for a real client): the replay and the live events meet without a
    // gap or a repeat.
    let pc = p.clone();
    let live = std::thread::spawn(move || {
        for v in 4 + K..=60 {
            pc.update(hm, v, &v.to_string());
            pc.flush();
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let mut ws = resume_after(
        &publ,
        &ch,
        &format!(r#"{{"{hm}":3,"{lm}":3}}"#),
        Duration::from_millis(300),
    )
    .await;
    let mut got = Vec::new();
    read_until(&mut ws, &mut got, "every event up to 60", |g| {
        versions(g, hm).last() == Some(&60) && versions(g, lm).last() == Some(&(3 + K))
    })
    .await;
    live.join().unwrap();
    assert_eq!(
        versions(&got, hm),
        (4..=60).collect::<Vec<u64>>(),
        "{got:?}"
    );
    let r = recovered(&got, hm);
    assert_eq!(r.len(), 1, "{got:?}");
    assert_eq!(r[0]["recovered"], true);
    assert_eq!(r[0]["since"], 3);
    assert!(r[0]["replayed"].as_u64().unwrap() >= K, "{r:?}");
    // The replay comes after its `recovered` message.
    let at = |pred: &dyn Fn(&serde_json::Value) -> bool| got.iter().position(pred).unwrap();
    assert!(at(&|v| v["type"] == "recovered") < at(&|v| v["market"] == hm && v["version"] == 4));

    // A market without history: the latest state, as before; no message,
    // no stream.
    assert_eq!(versions(&got, lm), vec![3 + K]);
    assert!(recovered(&got, lm).is_empty());
    assert!(entries(&p, lm).await.is_empty());
    // The stream: one entry per applied version, ids from versions, each
    // naming its predecessor.
    let e = entries(&p, hm).await;
    assert!(e.len() as u64 <= MAX_LEN + 100, "capped: {}", e.len());
    assert!(e
        .windows(2)
        .all(|w| w[1].1 == w[0].0.trim_end_matches("-0").parse::<u64>().unwrap()));
    assert_eq!(e.last().unwrap().0, "60-0");
    drop(publ);
    blocking(move || reducer.shutdown().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_missed_events_than_the_history_keeps_give_recovered_false_and_the_latest_state() {
    let (p, reducer, publ) = start().await;
    let hm = "H.acct.7";
    let ch = create_channel(publ.addr, &[hm]).await;
    // 300 events: MAXLEN ~ 20 trims whole stream nodes (100 entries each).
    for v in 1..=300 {
        p.update(hm, v, &v.to_string());
    }
    p.flush();
    wait_state(&p, hm, 300).await;
    let e = entries(&p, hm).await;
    assert!(
        e.len() < 300 && e.len() as u64 <= MAX_LEN + 100,
        "trimmed: {}",
        e.len()
    );

    let mut ws = resume(&publ, &ch, &format!(r#"{{"{hm}":1}}"#)).await;
    let mut got = Vec::new();
    read_until(&mut ws, &mut got, "the latest state", |g| {
        versions(g, hm).last() == Some(&300)
    })
    .await;
    let r = recovered(&got, hm);
    assert_eq!(r.len(), 1, "{got:?}");
    assert_eq!(
        (r[0]["recovered"].clone(), r[0]["replayed"].clone()),
        (serde_json::json!(false), serde_json::json!(0))
    );
    assert_eq!(versions(&got, hm), vec![300], "only the latest state");

    // A client whose gap the history still covers is recovered.
    let since = 300 - (e.len() as u64 / 2);
    let mut ws = resume(&publ, &ch, &format!(r#"{{"{hm}":{since}}}"#)).await;
    let mut got = Vec::new();
    read_until(&mut ws, &mut got, "the tail", |g| {
        versions(g, hm).last() == Some(&300)
    })
    .await;
    assert_eq!(recovered(&got, hm)[0]["recovered"], true);
    assert_eq!(versions(&got, hm), (since + 1..=300).collect::<Vec<u64>>());
    drop(publ);
    blocking(move || reducer.shutdown().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_records_add_no_history_entry() {
    let (p, reducer, _publ) = start().await;
    let hm = "H.settle.1";
    for v in 1..=5 {
        p.update(hm, v, &v.to_string());
    }
    p.flush();
    wait_state(&p, hm, 5).await;
    let before = entries(&p, hm).await;
    assert_eq!(
        before,
        vec![
            ("1-0".to_string(), 0),
            ("2-0".into(), 1),
            ("3-0".into(), 2),
            ("4-0".into(), 3),
            ("5-0".into(), 4)
        ]
    );
    // At-least-once: a reducer re-reads every record from the start (a new
    // group, which starts at the earliest offset: a redelivery of all).
    blocking(move || reducer.shutdown().unwrap()).await;
    let mut config = p.config.clone();
    config.group = streampipe_tests::unique("redelivery");
    let metrics = Arc::new(streampipe_reducer::Metrics::new());
    let m = metrics.clone();
    let reducer = blocking(move || streampipe_reducer::spawn(config, m).unwrap()).await;
    p.update(hm, 6, "6");
    p.flush();
    wait_state(&p, hm, 6).await;
    let after = entries(&p, hm).await;
    assert_eq!(after.len(), 6, "{after:?}");
    assert_eq!(&after[..5], &before[..]);
    assert_eq!(after[5], ("6-0".to_string(), 5));
    assert_eq!(
        metrics.updates_stale.get(),
        5,
        "1..=5 redelivered, refused as stale"
    );
    let appended = metrics.history.with_label_values(&["appended"]).get();
    assert_eq!(appended, 1, "only version 6 appended");
    blocking(move || reducer.shutdown().unwrap()).await;
}

/// Resume by time (`from_ms`, the JustEat article's `fromMs`): a client with
/// no version of a history market gets exactly the events stamped at or
/// after the time, in order, after `recovered: true` echoing `from_ms`;
/// markets without history get their latest state as ever; once the
/// stream no longer reaches back to the time, `recovered: false` and the
/// latest state. The URL's `from_ms` works like the begin frame's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resuming_by_time_gets_the_events_since_then() {
    let (p, reducer, publ) = start().await;
    let (hm, lm) = ("H.settle.1", "L.odds.2");
    let ch = create_channel(publ.addr, &[hm, lm]).await;
    let produce = |range: std::ops::RangeInclusive<u64>| {
        for v in range {
            p.update(hm, v, &v.to_string());
            p.update(lm, v, &v.to_string());
        }
        p.flush();
    };
    produce(1..=3);
    wait_state(&p, hm, 3).await;
    // Kafka and the feed stamp in ms: keep the time clear of both batches.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = streampipe_tests::now_ms();
    tokio::time::sleep(Duration::from_millis(50)).await;
    produce(4..=6);
    wait_state(&p, hm, 6).await;
    wait_state(&p, lm, 6).await;

    let mut ws = ws_connect(publ.addr, &ch, "").await;
    match ws_next(&mut ws, Duration::from_secs(10)).await {
        Some(Frame::Json(v)) if v["type"] == "subscribed" => {}
        other => panic!("expected subscribed, got {other:?}"),
    }
    ws_send(&mut ws, &format!(r#"{{"type":"begin","from_ms":{t}}}"#)).await;
    let mut got = Vec::new();
    read_until(&mut ws, &mut got, "the events since t", |g| {
        versions(g, hm).last() == Some(&6) && versions(g, lm).last() == Some(&6)
    })
    .await;
    let r = recovered(&got, hm);
    assert_eq!(r.len(), 1, "{got:?}");
    assert_eq!(r[0]["recovered"], true, "{r:?}");
    assert_eq!(r[0]["from_ms"], t, "{r:?}");
    assert_eq!(r[0]["replayed"], 3, "{r:?}");
    assert_eq!(
        versions(&got, hm),
        vec![4, 5, 6],
        "exactly the events since t"
    );
    assert_eq!(versions(&got, lm), vec![6], "no history: the latest state");
    assert!(recovered(&got, lm).is_empty());
    drop(ws);

    // The stream is trimmed past t: not recovered, the latest state.
    for v in 7..=306 {
        p.update(hm, v, &v.to_string());
    }
    p.flush();
    wait_state(&p, hm, 306).await;
    let mut ws = ws_connect(publ.addr, &ch, &format!("?begin=1&from_ms={t}")).await;
    let mut got = Vec::new();
    read_until(&mut ws, &mut got, "the latest state", |g| {
        versions(g, hm).last() == Some(&306)
    })
    .await;
    let r = recovered(&got, hm);
    assert_eq!(r.len(), 1, "{got:?}");
    assert_eq!(r[0]["recovered"], false, "{r:?}");
    assert_eq!(versions(&got, hm), vec![306], "only the latest state");

    // A bad from_ms is refused before anything opens.
    let r = streampipe_tests::publisher::http(
        publ.addr,
        "GET",
        &format!("/v1/sse/{ch}?from_ms=9007199254740993"),
        None,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("invalid_from_ms"), "{}", r.body);
    drop(publ);
    blocking(move || reducer.shutdown().unwrap()).await;
}
