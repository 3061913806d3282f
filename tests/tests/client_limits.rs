//! Per-client limits on every command path (issue 9, item 2), against a
//! real publisher, Redis and the dev broker: token buckets for channel
//! creation, market changes and begins (REST begins coalesced per channel,
//! WebSocket begins deferred, not dropped), caps on channels and open
//! streams, 429 + Retry-After, and shedding on the reducers' command lag.

use std::sync::Arc;
use std::time::Duration;

use streampipe_publisher::limits::Rate;
use streampipe_publisher::Config;
use streampipe_tests::auth::{relaxed_limits, token_for};
use streampipe_tests::publisher::{
    blocking, http_as, http_full, ws_connect_as, ws_next, Frame, InProcess,
};
use streampipe_tests::{redis_url, Broker, Pipeline};

async fn publisher(tune: impl FnOnce(&mut Config)) -> (Arc<Pipeline>, InProcess) {
    let p = Arc::new(blocking(|| Pipeline::new(Broker::Dev, 2)).await);
    let mut config = Config::new(&p.broker.bootstrap(), &p.name, &redis_url());
    config.command_topic = p.config.command_topic.clone();
    config.client_limits = relaxed_limits();
    tune(&mut config);
    let publ = InProcess::start_with_config(config).await;
    (p, publ)
}

fn slow(burst: f64) -> Rate {
    Rate {
        per_second: 0.2,
        burst,
    }
}

fn rejected(publ: &InProcess, label: &str) -> u64 {
    publ.ctx.metrics.rejected.with_label_values(&[label]).get()
}

const BODY: &str = r#"{"markets":["l.1"]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_creation_is_limited_per_subject_with_retry_after() {
    let (_p, publ) = publisher(|c| c.client_limits.channel_creates = slow(3.0)).await;
    let a = publ.addr;
    let (t1, t2) = (token_for("u1", &["*"], 600), token_for("u2", &["*"], 600));
    for _ in 0..3 {
        let r = http_as(a, "POST", "/v1/channels", Some(BODY), Some(&t1)).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let (status, head, body) = http_full(a, "POST", "/v1/channels", Some(BODY), Some(&t1)).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("limit_channel_creates"), "{body}");
    let retry: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .expect("Retry-After")
        .trim()
        .parse()
        .unwrap();
    assert!((1..=6).contains(&retry), "retry-after {retry}");
    assert_eq!(rejected(&publ, "limit_channel_creates"), 1);
    // Another subject has its own bucket.
    let r = http_as(a, "POST", "/v1/channels", Some(BODY), Some(&t2)).await;
    assert_eq!(r.status, 201, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_are_limited_per_ip() {
    let (_p, publ) = publisher(|c| {
        c.auth.mode = streampipe_publisher::auth::Mode::Anonymous;
        c.client_limits.channel_creates = slow(2.0);
    })
    .await;
    for expect in [201, 201, 429] {
        let r = http_as(publ.addr, "POST", "/v1/channels", Some(BODY), None).await;
        assert_eq!(r.status, expect, "{}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn market_changes_and_begins_are_limited_and_rest_begins_coalesce() {
    let (_p, publ) = publisher(|c| {
        c.client_limits.market_changes = slow(3.0);
        c.client_limits.begins = slow(1.0);
    })
    .await;
    let a = publ.addr;
    let t = token_for("m", &["*"], 600);
    // Creation pays for its markets too.
    let r = http_as(
        a,
        "POST",
        "/v1/channels",
        Some(r#"{"markets":["a","b"]}"#),
        Some(&t),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let ch = r.json()["channel"].as_str().unwrap().to_owned();
    let add = |m: &str| format!(r#"{{"markets":["{m}"]}}"#);
    let path = format!("/v1/channels/{ch}/markets");
    let r = http_as(a, "POST", &path, Some(&add("c")), Some(&t)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http_as(a, "POST", &path, Some(&add("d")), Some(&t)).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (429, "limit_market_changes")
    );
    let r = http_as(a, "DELETE", &format!("{path}/a"), None, Some(&t)).await;
    assert_eq!(r.status, 429, "removes count too: {}", r.body);

    // Begins: the first replays, the next within the coalescing window is
    // answered without work, then the bucket (burst 1) refuses.
    let begin = format!("/v1/channels/{ch}/begin");
    assert_eq!(http_as(a, "POST", &begin, None, Some(&t)).await.status, 202);
    assert_eq!(http_as(a, "POST", &begin, None, Some(&t)).await.status, 202);
    assert_eq!(rejected(&publ, "begin_coalesced"), 1);
    tokio::time::sleep(streampipe_publisher::clients::BEGIN_COALESCE).await;
    let r = http_as(a, "POST", &begin, None, Some(&t)).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (429, "limit_begins"),
        "{}",
        r.body
    );

    // A WebSocket begin=1 beyond the bucket is deferred, not dropped: the
    // stream is open and the begin is counted as limited.
    let before = rejected(&publ, "limit_begins");
    let mut ws = ws_connect_as(a, &ch, "?begin=1", Some(&t)).await;
    assert!(
        matches!(ws_next(&mut ws, Duration::from_secs(10)).await, Some(Frame::Json(v)) if v["type"] == "subscribed")
    );
    assert_eq!(rejected(&publ, "limit_begins"), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_and_open_streams_per_client_are_capped() {
    let (_p, publ) = publisher(|c| {
        c.client_limits.max_channels = 2;
        c.client_limits.max_streams = 2;
    })
    .await;
    let a = publ.addr;
    let t = token_for("capped", &["*"], 600);
    let mut chs = Vec::new();
    for _ in 0..2 {
        let r = http_as(a, "POST", "/v1/channels", Some(BODY), Some(&t)).await;
        assert_eq!(r.status, 201, "{}", r.body);
        chs.push(r.json()["channel"].as_str().unwrap().to_owned());
    }
    let r = http_as(a, "POST", "/v1/channels", Some(BODY), Some(&t)).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (429, "too_many_channels"),
        "{}",
        r.body
    );
    // Closing one frees its place.
    let r = http_as(
        a,
        "DELETE",
        &format!("/v1/channels/{}", chs[1]),
        None,
        Some(&t),
    )
    .await;
    assert_eq!(r.status, 204);
    let r = http_as(a, "POST", "/v1/channels", Some(BODY), Some(&t)).await;
    assert_eq!(r.status, 201, "{}", r.body);

    let mut open = Vec::new();
    for _ in 0..2 {
        let mut ws = ws_connect_as(a, &chs[0], "", Some(&t)).await;
        assert!(
            matches!(ws_next(&mut ws, Duration::from_secs(10)).await, Some(Frame::Json(v)) if v["type"] == "subscribed")
        );
        open.push(ws);
    }
    let mut ws = ws_connect_as(a, &chs[0], "", Some(&t)).await;
    assert!(matches!(
        ws_next(&mut ws, Duration::from_secs(10)).await,
        Some(Frame::Closed(4429))
    ));
    assert_eq!(rejected(&publ, "limit_streams"), 1);
    drop(open.pop());
    // The slot comes back once the server notices the close.
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if publ.ctx.clients.streams("sub:capped") < 2 {
            ok = true;
            break;
        }
    }
    assert!(ok, "stream slot released");
    let mut ws = ws_connect_as(a, &chs[0], "", Some(&t)).await;
    assert!(
        matches!(ws_next(&mut ws, Duration::from_secs(10)).await, Some(Frame::Json(v)) if v["type"] == "subscribed")
    );
}

/// No reducer consumes the command topic here, so every command produced
/// is lag: past the bound, command paths answer 429 until it drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_paths_are_shed_when_the_reducers_lag() {
    let (_p, publ) = publisher(|c| c.max_command_lag = 5).await;
    let a = publ.addr;
    let t = token_for("lag", &["*"], 600);
    let r = http_as(
        a,
        "POST",
        "/v1/channels",
        Some(r#"{"markets":["a","b","c","d","e","f","g","h"]}"#),
        Some(&t),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let ch = r.json()["channel"].as_str().unwrap().to_owned();
    // The poller sees the 8 unconsumed commands within its interval.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while publ.ctx.command_lag.get() <= 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "lag never observed: {}",
            publ.ctx.command_lag.get()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, head, body) = http_full(a, "POST", "/v1/channels", Some(BODY), Some(&t)).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("overloaded"), "{body}");
    assert!(head.contains("retry-after:"), "{head}");
    let r = http_as(
        a,
        "POST",
        &format!("/v1/channels/{ch}/markets"),
        Some(r#"{"markets":["z"]}"#),
        Some(&t),
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(rejected(&publ, "shed_command_lag") >= 2);
    // Reads and begins are not commands: still served.
    let r = http_as(
        a,
        "POST",
        &format!("/v1/channels/{ch}/begin"),
        None,
        Some(&t),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
}

#[test]
fn default_limits_are_the_named_constants() {
    use streampipe_publisher::clients::*;
    let d = ClientLimits::default();
    assert_eq!(d.channel_creates, CHANNEL_CREATES);
    assert_eq!(d.max_streams, MAX_STREAMS_PER_CLIENT);
    assert_eq!(d.max_channels, MAX_CHANNELS_PER_CLIENT);
    assert_ne!(relaxed_limits(), d);
}
