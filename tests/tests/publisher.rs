//! Publisher end-to-end tests on the real stack: control API → Kafka →
//! reducer → Redis → publisher → WebSocket / SSE client.

use std::sync::Arc;
use std::time::{Duration, Instant};

use streampipe_tests::publisher::{
    assert_increasing, blocking, create_channel, has, http, read_updates, setup, ws_close_code,
    ws_connect, ws_next, ws_send, Frame, InProcess,
};
use streampipe_tests::{wait_for, Broker, Pipeline};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_end_to_end() {
    let (p, reducer, publ) = setup(4).await;
    for v in 1..=3 {
        p.update("E1", v, &format!(r#"{{"home":{v}}}"#));
    }
    p.update("E2", 1, "1");
    p.flush();
    let pc = p.clone();
    blocking(move || {
        wait_for(Duration::from_secs(30), "E1 state", || {
            (pc.state_version("E1") == 3).then_some(())
        })
    })
    .await;

    let ch = create_channel(publ.addr, &["E1", "E2", "E3"]).await;
    let mut ws = ws_connect(publ.addr, &ch, "").await;
    match ws_next(&mut ws, Duration::from_secs(10)).await {
        Some(Frame::Json(v)) => {
            assert_eq!(v["type"], "subscribed");
            assert_eq!(v["channel"], ch.as_str());
            assert_eq!(v["markets"], serde_json::json!(["E1", "E2", "E3"]));
        }
        other => panic!("expected subscribed, got {other:?}"),
    }
    ws_send(&mut ws, r#"{"type":"begin"}"#).await;
    let mut got = Vec::new();
    read_updates(&mut ws, &mut got, "current state", |g| {
        has(g, "E1", 3) && has(g, "E2", 1)
    })
    .await;
    assert_eq!(
        got.iter().find(|u| u["market"] == "E1").unwrap()["payload"],
        serde_json::json!({"home": 3})
    );

    p.update("E1", 4, "4");
    p.update("E1", 5, "5");
    p.update("E3", 1, "1");
    p.flush();
    read_updates(&mut ws, &mut got, "live updates", |g| {
        has(g, "E1", 5) && has(g, "E3", 1)
    })
    .await;
    assert_increasing(&got);

    // Removing a market stops its updates.
    let r = http(
        publ.addr,
        "DELETE",
        &format!("/v1/channels/{ch}/markets/E2"),
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    let (pc, chc) = (p.clone(), ch.clone());
    blocking(move || {
        wait_for(Duration::from_secs(30), "E2 unsubscribed", || {
            (!pc.smembers(&pc.keys().market_channels("E2")).contains(&chc)).then_some(())
        })
    })
    .await;
    p.update("E2", 2, "2");
    p.update("E1", 6, "6");
    p.flush();
    read_updates(&mut ws, &mut got, "E1 v6", |g| has(g, "E1", 6)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Some(Frame::Json(v)) = ws_next(&mut ws, Duration::from_millis(100)).await {
        got.push(v);
    }
    assert!(
        !has(&got, "E2", 2),
        "a removed market kept streaming: {got:?}"
    );

    // Closing the channel closes the stream with 4410 and leaves nothing in Redis.
    let r = http(publ.addr, "DELETE", &format!("/v1/channels/{ch}"), None).await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(ws_close_code(&mut ws, Duration::from_secs(10)).await, 4410);
    let (pc, chc) = (p.clone(), ch.clone());
    blocking(move || {
        wait_for(
            Duration::from_secs(30),
            "no key of the channel left",
            || {
                let tag = format!("{{c:{chc}}}");
                let left: Vec<String> = pc
                    .all_keys()
                    .into_iter()
                    .filter(|k| k.contains(&tag))
                    .collect();
                let in_m2c = ["E1", "E2", "E3"]
                    .iter()
                    .any(|m| pc.smembers(&pc.keys().market_channels(m)).contains(&chc));
                (left.is_empty() && !in_m2c).then_some(())
            },
        )
    })
    .await;
    let r = http(publ.addr, "POST", &format!("/v1/channels/{ch}/begin"), None).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (404, "unknown_channel")
    );
    drop(publ);
    blocking(move || reducer.shutdown().unwrap()).await;
}

/// Reads SSE events (`event`, parsed `data`) from a raw HTTP response.
async fn sse_events(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::TcpStream>>,
    got: &mut Vec<(String, serde_json::Value)>,
    pred: impl Fn(&[(String, serde_json::Value)]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut event = String::new();
    while !pred(got) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = tokio::time::timeout(left, lines.next_line())
            .await
            .expect("SSE event in time")
            .unwrap()
            .expect("SSE stream open");
        if let Some(e) = line.strip_prefix("event:") {
            event = e.trim().to_owned();
        } else if let Some(d) = line.strip_prefix("data:") {
            got.push((
                event.clone(),
                serde_json::from_str(d.trim()).expect("SSE data is JSON"),
            ));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_end_to_end() {
    let (p, reducer, publ) = setup(4).await;
    p.update("S1", 7, "7");
    p.flush();
    let pc = p.clone();
    blocking(move || {
        wait_for(Duration::from_secs(30), "S1 state", || {
            (pc.state_version("S1") == 7).then_some(())
        })
    })
    .await;
    let ch = create_channel(publ.addr, &["S1", "S2"]).await;

    let mut s = tokio::net::TcpStream::connect(publ.addr).await.unwrap();
    let path = streampipe_tests::publisher::sse_path(publ.addr, &ch).await;
    let req =
        format!("GET {path}&begin=1 HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(s).lines();
    let status = lines.next_line().await.unwrap().unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut got = Vec::new();
    sse_events(&mut lines, &mut got, |g| {
        g.iter().any(|(e, d)| e == "update" && d["version"] == 7)
    })
    .await;
    assert_eq!(got[0].0, "subscribed");
    p.update("S2", 1, "1");
    p.update("S1", 8, "8");
    p.flush();
    sse_events(&mut lines, &mut got, |g| {
        g.iter()
            .any(|(_, d)| d["market"] == "S2" && d["version"] == 1)
            && g.iter().any(|(_, d)| d["version"] == 8)
    })
    .await;
    let updates: Vec<serde_json::Value> = got
        .iter()
        .filter(|(e, _)| e == "update")
        .map(|(_, d)| d.clone())
        .collect();
    assert_increasing(&updates);

    let r = http(publ.addr, "DELETE", &format!("/v1/channels/{ch}"), None).await;
    assert_eq!(r.status, 204);
    sse_events(&mut lines, &mut got, |g| {
        g.iter().any(|(e, _)| e == "close")
    })
    .await;
    assert_eq!(got.last().unwrap().1["code"], 4410);
    drop(publ);
    blocking(move || reducer.shutdown().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_and_frames_get_documented_errors() {
    let (_p, reducer, publ) = setup(2).await;
    let a = publ.addr;
    let cases: Vec<(&str, &str, Option<String>, u16, &str)> = vec![
        ("POST", "/v1/channels", Some("{not json".into()), 400, "invalid_json"),
        ("POST", "/v1/channels", Some(r#"{"markets":["ok","bad id"]}"#.into()), 400, "invalid_market"),
        ("POST", "/v1/channels", Some(r#"{"markets":[]}"#.into()), 400, "invalid_market"),
        ("POST", "/v1/channels", Some(r#"{"markets":["a"],"extra":1}"#.into()), 400, "invalid_json"),
        ("POST", "/v1/channels", Some(serde_json::json!({"markets": (0..501).map(|i| format!("m{i}")).collect::<Vec<_>>()}).to_string()), 400, "too_many_markets"),
        ("POST", "/v1/channels", Some(format!(r#"{{"markets":["{}"]}}"#, "a".repeat(200_000))), 413, "payload_too_large"),
        ("POST", "/v1/channels/00000000-0000-4000-8000-000000000000/begin", None, 404, "unknown_channel"),
        ("POST", "/v1/channels/bad%20id/begin", None, 400, "invalid_channel"),
        ("DELETE", "/v1/channels/00000000-0000-4000-8000-000000000000", None, 404, "unknown_channel"),
        ("GET", "/v1/markets/nothing-here", None, 404, "unknown_market"),
        ("GET", "/v1/markets", None, 400, "invalid_market"),
        ("GET", "/v1/stream/abc", None, 400, "websocket_required"),
        ("POST", "/v1/channels/00000000-0000-4000-8000-000000000000/tickets", None, 404, "unknown_channel"),
        ("GET", "/v1/sse/00000000-0000-4000-8000-000000000000", None, 401, "unauthorized"),
        ("GET", "/v1/nope", None, 404, "not_found"),
    ];
    for (method, path, body, status, code) in cases {
        let r = http(a, method, path, body.as_deref()).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (status, code),
            "{method} {path}: {}",
            r.body
        );
    }
    // WebSocket: unknown channel, malformed frame, binary frame, oversized frame.
    let mut ws = ws_connect(a, "00000000-0000-4000-8000-000000000000", "").await;
    assert_eq!(ws_close_code(&mut ws, Duration::from_secs(10)).await, 4404);
    let ch = create_channel(a, &["X1"]).await;
    let mut ws = ws_connect(a, &ch, "").await;
    ws_send(&mut ws, "this is not json").await;
    assert_eq!(ws_close_code(&mut ws, Duration::from_secs(10)).await, 4400);
    let mut ws = ws_connect(a, &ch, "").await;
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::binary(vec![
        1u8, 2, 3,
    ]))
    .await
    .unwrap();
    assert_eq!(ws_close_code(&mut ws, Duration::from_secs(10)).await, 4400);
    let mut ws = ws_connect(a, &ch, "").await;
    ws_send(
        &mut ws,
        &format!(r#"{{"type":"begin","since":{{"{}":1}}}}"#, "m".repeat(5000)),
    )
    .await;
    assert_eq!(ws_close_code(&mut ws, Duration::from_secs(10)).await, 1009);
    let r = http(a, "GET", &format!("/v1/stream/{ch}?since=garbage"), None).await;
    assert_eq!(r.status, 400);

    // Still serving, and every rejection was counted.
    assert_eq!(http(a, "GET", "/healthz", None).await.status, 200);
    create_channel(a, &["X2"]).await;
    assert_eq!(
        http(a, "GET", "/metrics", None).await.status,
        404,
        "/metrics is not on the public port"
    );
    let metrics = http(publ.internal, "GET", "/metrics", None).await.body;
    for reason in [
        "invalid_json",
        "invalid_market",
        "too_many_markets",
        "payload_too_large",
        "unknown_channel",
        "bad_frame",
        "frame_too_large",
        "websocket_required",
    ] {
        assert!(
            metrics.contains(&format!(
                "streampipe_publisher_rejected_total{{reason=\"{reason}\"}}"
            )),
            "no metric for {reason}"
        );
    }
    drop(publ);
    blocking(move || reducer.shutdown().unwrap()).await;
}

/// The pod's Redis connection drops: the hub reconnects, resubscribes the
/// live channels' market topics and tells clients to `begin` again with a `reset`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_loss_resubscribes_and_sends_reset() {
    use streampipe_tests::{free_port, PrivateRedis};
    let p = tokio::task::spawn_blocking(|| Arc::new(Pipeline::new(Broker::Dev, 2)))
        .await
        .unwrap();
    let port = free_port();
    let redis = blocking(move || PrivateRedis::start(port)).await;
    let url = redis.url();
    // Anonymous mode (public odds): the channel is registered by hand,
    // bound to nobody, as anonymous channels are.
    let mut config = streampipe_publisher::Config::new(&p.broker.bootstrap(), &p.name, &url);
    config.command_topic = p.config.command_topic.clone();
    config.auth.mode = streampipe_publisher::auth::Mode::Anonymous;
    let publ = InProcess::start_with_config(config).await;
    let keys = p.keys();
    let ch = "reset-test-channel";
    let register = {
        let (url, key) = (url.clone(), keys.channel_registry(ch));
        move || {
            let mut c = redis::Client::open(url.as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            let _: () = redis::cmd("SADD")
                .arg(&key)
                .arg("R1")
                .query(&mut c)
                .unwrap();
        }
    };
    let publish = {
        let (url, name) = (url.clone(), keys.market_topic("R1"));
        move |v: u64| {
            let mut c = redis::Client::open(url.as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            let msg =
                format!(r#"{{"type":"update","market":"R1","version":{v},"ts":1,"payload":{v}}}"#);
            let n: i64 = redis::cmd("PUBLISH")
                .arg(&name)
                .arg(msg)
                .query(&mut c)
                .unwrap();
            n
        }
    };
    blocking(register.clone()).await;
    let mut ws = ws_connect(publ.addr, ch, "").await;
    assert!(
        matches!(ws_next(&mut ws, Duration::from_secs(10)).await, Some(Frame::Json(v)) if v["type"] == "subscribed")
    );
    let pb = publish.clone();
    assert_eq!(blocking(move || pb(1)).await, 1, "one subscriber: the pod");
    let mut got = Vec::new();
    read_updates(&mut ws, &mut got, "v1", |g| has(g, "R1", 1)).await;

    // Redis restarts (empty): the pod reconnects, resubscribes, resets the client.
    drop(redis);
    let redis = blocking(move || PrivateRedis::start(port)).await;
    let reset = loop {
        match ws_next(&mut ws, Duration::from_secs(30)).await {
            Some(Frame::Json(v)) if v["type"] == "reset" => break v,
            Some(Frame::Json(_)) => continue,
            other => panic!("expected reset, got {other:?}"),
        }
    };
    assert!(reset["reason"].as_str().unwrap().contains("redis"));
    blocking(register).await;
    let pb = publish.clone();
    blocking(move || {
        wait_for(Duration::from_secs(10), "pod resubscribed", || {
            (pb(2) == 1).then_some(())
        })
    })
    .await;
    read_updates(&mut ws, &mut got, "v2 after the reconnect", |g| {
        has(g, "R1", 2)
    })
    .await;
    assert!(publ.ctx.metrics.redis_reconnects.get() >= 1);
    drop(publ);
    drop(redis);
}

/// A channel nobody streams for longer than the channel TTL is closed by the
/// janitor: its markets are unsubscribed and nothing of it stays in Redis;
/// a channel with an open stream is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_channels_expire() {
    let (p, reducer) = streampipe_tests::publisher::with_reducer(2).await;
    // A short TTL from the start: a first publisher with the default config
    // would take the janitor lock for its 60 s period (the race that once
    // failed CI).
    let mut config = streampipe_tests::publisher::config_for(&p);
    config.channel_idle_ttl = Duration::from_secs(2);
    config.janitor_interval = Duration::from_millis(500);
    let publ = InProcess::start_with_config(config).await;

    let abandoned = create_channel(publ.addr, &["J1", "J2"]).await;
    let kept = create_channel(publ.addr, &["J1"]).await;
    let mut ws = ws_connect(publ.addr, &kept, "").await;
    assert!(
        matches!(ws_next(&mut ws, Duration::from_secs(10)).await, Some(Frame::Json(v)) if v["type"] == "subscribed")
    );
    let (pc, a) = (p.clone(), abandoned.clone());
    blocking(move || ["J1", "J2"].iter().for_each(|m| pc.wait_subscribed(&a, m))).await;

    let (pc, a, k) = (p.clone(), abandoned.clone(), kept.clone());
    blocking(move || {
        wait_for(Duration::from_secs(30), "abandoned channel expired", || {
            let tag = format!("{{c:{a}}}");
            let left = pc.all_keys().into_iter().any(|key| key.contains(&tag));
            let in_m2c = ["J1", "J2"]
                .iter()
                .any(|m| pc.smembers(&pc.keys().market_channels(m)).contains(&a));
            (!left && !in_m2c).then_some(())
        });
        // The channel with a live stream stays subscribed.
        assert!(
            pc.smembers(&pc.keys().market_channels("J1")).contains(&k),
            "a live channel must not expire"
        );
    })
    .await;
    assert!(publ.ctx.metrics.channels_expired.get() >= 1);
    let r = http(
        publ.addr,
        "POST",
        &format!("/v1/channels/{abandoned}/begin"),
        None,
    )
    .await;
    assert_eq!(r.status, 404, "an expired channel is unknown");
    drop(ws);
    drop(publ);
    blocking(move || reducer.shutdown().unwrap()).await;
}

/// A publisher that stops hands the janitor lock back: with the default
/// 60 s period, the pods left would otherwise not sweep for a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_publisher_releases_the_janitor_lock() {
    let p = Arc::new(blocking(|| Pipeline::new(Broker::Dev, 2)).await);
    let publ = InProcess::start(&p).await;
    let (pc, key) = (p.clone(), p.keys().janitor_lock());
    let held = blocking(move || {
        wait_for(Duration::from_secs(10), "janitor lock taken", || {
            redis::cmd("GET")
                .arg(&key)
                .query::<Option<String>>(&mut pc.redis())
                .ok()
                .flatten()
        })
    })
    .await;
    assert!(!held.is_empty());
    drop(publ);
    let (pc, key) = (p.clone(), p.keys().janitor_lock());
    blocking(move || {
        wait_for(Duration::from_secs(10), "janitor lock released", || {
            let v: Option<String> = redis::cmd("GET").arg(&key).query(&mut pc.redis()).ok()?;
            v.is_none().then_some(())
        })
    })
    .await;
}
