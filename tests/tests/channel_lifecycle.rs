//! A channel's life through the real publisher (control API → Kafka →
//! reducer → Redis → publisher → WebSocket / SSE): it exists from creation
//! until it is closed, markets or not, and a stream whose channel vanished
//! is told so (4404) instead of staying open receiving nothing.

use std::time::{Duration, Instant};

use streampipe_tests::publisher::{
    blocking, create_channel, has, http, open_stream, read_updates, setup, ws_close_code,
    ws_connect, ws_next, ws_send, Frame,
};
use streampipe_tests::{wait_for, Pipeline};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Whether the janitor's set still holds `channel`.
fn leased(p: &Pipeline, channel: &str) -> bool {
    let score: Option<f64> = redis::cmd("ZSCORE")
        .arg(p.keys().channel_leases())
        .arg(channel)
        .query(&mut p.redis())
        .unwrap();
    score.is_some()
}

/// What a Redis that lost the channel looks like: no registry, no lease.
fn forget_channel(p: &Pipeline, channel: &str) {
    let mut c = p.redis();
    let _: () = redis::cmd("DEL")
        .arg(p.keys().channel_registry(channel))
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("ZREM")
        .arg(p.keys().channel_leases())
        .arg(channel)
        .query(&mut c)
        .unwrap();
}

/// A channel emptied market by market is still a channel: it takes markets
/// again, and `DELETE` closes it (204, its stream gets 4410) and takes its
/// janitor entry with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_channel_is_still_closable() {
    let (p, reducer, publ) = setup(2).await;
    let ch = create_channel(publ.addr, &["L1", "L2"]).await;
    let mut ws = open_stream(publ.addr, &ch).await;
    for m in ["L1", "L2"] {
        let r = http(
            publ.addr,
            "DELETE",
            &format!("/v1/channels/{ch}/markets/{m}"),
            None,
        )
        .await;
        assert_eq!(r.status, 204, "{}", r.body);
    }
    let (pc, chc) = (p.clone(), ch.clone());
    blocking(move || {
        wait_for(Duration::from_secs(30), "both markets unsubscribed", || {
            let any = ["L1", "L2"]
                .iter()
                .any(|m| pc.smembers(&pc.keys().market_channels(m)).contains(&chc));
            (!any).then_some(())
        })
    })
    .await;
    assert!(
        p.smembers(&p.keys().channel_registry(&ch)).is_empty(),
        "the registry set is gone (Redis deletes empty sets)"
    );
    assert!(leased(&p, &ch), "the janitor still knows the channel");

    // Still a channel: it takes a market again and streams it.
    let r = http(
        publ.addr,
        "POST",
        &format!("/v1/channels/{ch}/markets"),
        Some(r#"{"markets":["L3"]}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let pc = p.clone();
    let chc = ch.clone();
    blocking(move || pc.wait_subscribed(&chc, "L3")).await;
    p.update("L3", 1, "1");
    p.flush();
    let mut got = Vec::new();
    read_updates(&mut ws, &mut got, "L3 after re-adding", |g| has(g, "L3", 1)).await;
    let r = http(
        publ.addr,
        "DELETE",
        &format!("/v1/channels/{ch}/markets/L3"),
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);

    // Empty again, and closable.
    let r = http(publ.addr, "DELETE", &format!("/v1/channels/{ch}"), None).await;
    assert_eq!(r.status, 204, "closing an emptied channel: {}", r.body);
    assert_eq!(ws_close_code(&mut ws, Duration::from_secs(10)).await, 4410);
    assert!(!leased(&p, &ch), "the janitor entry went with the channel");
    let r = http(publ.addr, "DELETE", &format!("/v1/channels/{ch}"), None).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (404, "unknown_channel"),
        "a closed channel is gone"
    );
    let (pc, chc) = (p.clone(), ch.clone());
    blocking(move || {
        wait_for(
            Duration::from_secs(30),
            "no key of the channel left",
            || {
                let tag = format!("{{c:{chc}}}");
                let in_m2c = ["L1", "L2", "L3"]
                    .iter()
                    .any(|m| pc.smembers(&pc.keys().market_channels(m)).contains(&chc));
                (!in_m2c && !pc.all_keys().iter().any(|k| k.contains(&tag))).then_some(())
            },
        )
    })
    .await;
    drop(publ);
    blocking(move || reducer.shutdown().unwrap()).await;
}

/// A stream whose channel vanished from Redis (registry and janitor entry
/// gone, as after a Redis that lost its data) does not stay open silently:
/// a WebSocket `begin` closes it with 4404; an SSE stream gets its `close`
/// event with 4404 when a REST `begin` finds the channel gone (which answers
/// 404 itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_on_a_vanished_channel_closes_with_4404() {
    let (p, reducer, publ) = setup(2).await;

    // WebSocket: the begin frame.
    let ch = create_channel(publ.addr, &["V1"]).await;
    let mut ws = ws_connect(publ.addr, &ch, "").await;
    match ws_next(&mut ws, Duration::from_secs(20)).await {
        Some(Frame::Json(v)) if v["type"] == "subscribed" => {}
        other => panic!("expected subscribed, got {other:?}"),
    }
    forget_channel(&p, &ch);
    // Nothing tells the stream until it asks.
    let quiet = ws_next(&mut ws, Duration::from_millis(300)).await;
    assert!(
        !matches!(quiet, Some(Frame::Closed(_))),
        "closed before begin: {quiet:?}"
    );
    ws_send(&mut ws, r#"{"type":"begin"}"#).await;
    let t = Instant::now();
    assert_eq!(ws_close_code(&mut ws, Duration::from_secs(10)).await, 4404);
    eprintln!("ws: 4404 {:?} after begin", t.elapsed());

    // SSE: a REST begin on the vanished channel.
    let ch = create_channel(publ.addr, &["V2"]).await;
    let mut s = tokio::net::TcpStream::connect(publ.addr).await.unwrap();
    let path = streampipe_tests::publisher::sse_path(publ.addr, &ch).await;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(s).lines();
    let status = lines.next_line().await.unwrap().unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut events: Vec<(String, serde_json::Value)> = Vec::new();
    let mut event = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut begun = false;
    while !events.iter().any(|(e, _)| e == "close") {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = tokio::time::timeout(left, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no close event; got {events:?}"))
            .unwrap()
            .expect("SSE stream open");
        if let Some(e) = line.strip_prefix("event:") {
            event = e.trim().to_owned();
        } else if let Some(d) = line.strip_prefix("data:") {
            events.push((event.clone(), serde_json::from_str(d.trim()).unwrap()));
        }
        if !begun && events.iter().any(|(e, _)| e == "subscribed") {
            begun = true;
            forget_channel(&p, &ch);
            let r = http(publ.addr, "POST", &format!("/v1/channels/{ch}/begin"), None).await;
            assert_eq!(
                (r.status, r.error_code().as_str()),
                (404, "unknown_channel")
            );
        }
    }
    assert_eq!(events.last().unwrap().1["code"], 4404, "{events:?}");

    // A stream opened afterwards is refused at once, as documented.
    let mut ws = ws_connect(publ.addr, &ch, "").await;
    assert!(matches!(
        ws_next(&mut ws, Duration::from_secs(10)).await,
        Some(Frame::Closed(4404))
    ));
    drop(publ);
    blocking(move || reducer.shutdown().unwrap()).await;
}
