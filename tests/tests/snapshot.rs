//! Cacheable snapshots (`GET /v1/snapshot?markets=`, issue #13 item 2) on
//! the real stack: reducer on the dev broker, Redis, an in-process
//! publisher, and Debian's nginx as the caching proxy a CDN would be.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use streampipe_publisher::auth::Mode;
use streampipe_publisher::snapshot_core::CachePolicy;
use streampipe_publisher::Config;
use streampipe_reducer::ReducerHandle;
use streampipe_tests::nginx::Nginx;
use streampipe_tests::publisher::{
    blocking, config_for, http_as, http_with_headers, with_reducer, ws_connect_as, ws_next,
    ws_send, Frame, InProcess,
};
use streampipe_tests::{unique, wait_for, Pipeline};

async fn publisher(f: impl FnOnce(&mut Config)) -> (Arc<Pipeline>, ReducerHandle, InProcess) {
    let (p, r) = with_reducer(2).await;
    let mut c = config_for(&p);
    f(&mut c);
    let publ = InProcess::start_with_config(c).await;
    (p, r, publ)
}

fn anonymous(c: &mut Config) {
    c.auth.mode = Mode::Anonymous;
}

/// Produces `market@version` updates and waits until Redis stores the last
/// version of each market.
async fn seed(p: &Arc<Pipeline>, updates: &[(&str, u64)]) {
    let p = p.clone();
    let updates: Vec<(String, u64)> = updates.iter().map(|(m, v)| (m.to_string(), *v)).collect();
    blocking(move || {
        let mut last = HashMap::new();
        for (m, v) in &updates {
            p.update(m, *v, &format!(r#"{{"price":{v}}}"#));
            last.insert(m.clone(), *v);
        }
        p.flush();
        for (m, v) in last {
            wait_for(Duration::from_secs(30), "state stored", || {
                (p.state_version(&m) == v).then_some(())
            });
        }
    })
    .await
}

/// Sorted unique market ids.
fn markets(n: usize) -> Vec<String> {
    let base = unique("snap");
    let mut v: Vec<String> = (0..n).map(|i| format!("{base}.{i}")).collect();
    v.sort();
    v
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

fn path_of(ms: &[&str]) -> String {
    format!("/v1/snapshot?markets={}", ms.join(","))
}

async fn get(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, serde_json::Value) {
    let (s, head, body) = http_with_headers(addr, "GET", path, None, headers).await;
    let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    (s, head, json)
}

fn snapshots(publ: &InProcess, result: &str) -> u64 {
    publ.ctx
        .metrics
        .snapshots
        .with_label_values(&[result])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_has_versions_cache_headers_and_answers_304() {
    let (p, _r, publ) = publisher(anonymous).await;
    let ms = markets(3);
    let (a, b, missing) = (ms[0].as_str(), ms[1].as_str(), ms[2].as_str());
    seed(&p, &[(a, 3), (b, 1), (b, 2)]).await;
    let path = path_of(&[a, b, missing]);

    let (s, head, body) = get(publ.addr, &path, &[]).await;
    assert_eq!(s, 200, "{head} {body}");
    assert_eq!(
        header(&head, "cache-control").as_deref(),
        Some("public, max-age=2, stale-while-revalidate=10")
    );
    assert_eq!(header(&head, "vary").as_deref(), Some("origin"));
    assert_eq!(
        header(&head, "content-type").as_deref(),
        Some("application/json")
    );
    let etag = header(&head, "etag").expect("etag");
    assert!(
        etag.starts_with('"') && !etag.starts_with("W/"),
        "strong: {etag}"
    );
    let last_modified = header(&head, "last-modified").expect("last-modified");
    assert_eq!(body["markets"][a]["version"], 3);
    assert_eq!(body["markets"][b]["version"], 2);
    assert_eq!(body["markets"][b]["payload"]["price"], 2);
    assert_eq!(body["missing"], serde_json::json!([missing]));
    let at = body["at"].as_i64().expect("at");
    assert_eq!(
        at,
        body["markets"][b]["ts"]
            .as_i64()
            .unwrap()
            .max(body["markets"][a]["ts"].as_i64().unwrap())
    );

    // Same versions, same bytes, same validator.
    let (_, head2, body2) = get(publ.addr, &path, &[]).await;
    assert_eq!(header(&head2, "etag").as_deref(), Some(etag.as_str()));
    assert_eq!(body2, body);

    // Revalidation: 304 with the validators and the policy, no body.
    for inm in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"nope\", {etag}"),
    ] {
        let (s, head, raw) =
            http_with_headers(publ.addr, "GET", &path, None, &[("If-None-Match", &inm)]).await;
        assert_eq!(s, 304, "If-None-Match {inm}: {head}");
        assert!(raw.is_empty());
        assert_eq!(header(&head, "etag").as_deref(), Some(etag.as_str()));
        assert!(header(&head, "cache-control")
            .unwrap()
            .starts_with("public"));
    }
    let (s, ..) = get(publ.addr, &path, &[("If-None-Match", "\"nope\"")]).await;
    assert_eq!(s, 200);
    let (s, ..) = get(publ.addr, &path, &[("If-Modified-Since", &last_modified)]).await;
    assert_eq!(s, 304);
    assert!(snapshots(&publ, "not_modified") >= 4);

    // A new version: a new validator; the old one no longer matches.
    seed(&p, &[(a, 4)]).await;
    let (s, head3, body3) = get(publ.addr, &path, &[("If-None-Match", &etag)]).await;
    assert_eq!(s, 200);
    assert_ne!(header(&head3, "etag").as_deref(), Some(etag.as_str()));
    assert_eq!(body3["markets"][a]["version"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_canonical_queries_redirect_and_bad_ones_are_refused_uncached() {
    let (p, _r, publ) = publisher(|c| {
        anonymous(c);
        c.snapshot = CachePolicy::from_seconds(30, 60, false);
    })
    .await;
    let ms = markets(2);
    let (a, b) = (ms[0].as_str(), ms[1].as_str());
    seed(&p, &[(a, 1), (b, 1)]).await;
    let canonical = format!("markets={a},{b}");
    for other in [
        format!("/v1/snapshot?markets={b},{a}"),
        format!("/v1/snapshot?markets={a},{b},{a}"),
        format!("/v1/snapshot?markets={a}%2C{b}"),
        format!("/v1/snapshot?markets={a},,{b},"),
    ] {
        let (s, head, _) = get(publ.addr, &other, &[]).await;
        assert_eq!(s, 308, "{other}: {head}");
        assert_eq!(
            header(&head, "location"),
            Some(format!("snapshot?{canonical}")),
            "{other}"
        );
        assert_eq!(header(&head, "cache-control").as_deref(), Some("no-store"));
    }
    assert_eq!(snapshots(&publ, "redirect"), 4);
    let (s, head, _) = get(publ.addr, &format!("/v1/snapshot?{canonical}"), &[]).await;
    assert_eq!(s, 200);
    assert!(header(&head, "cache-control")
        .unwrap()
        .contains("max-age=30"));

    let too_many: Vec<String> = (0..=100).map(|i| format!("{a}.{i:03}")).collect();
    let long: Vec<String> = (0..40)
        .map(|i| format!("{i:03}{}", "x".repeat(120)))
        .collect();
    for (path, code) in [
        ("/v1/snapshot".to_owned(), "invalid_market"),
        (format!("/v1/snapshot?markets={a}&_=123"), "invalid_query"),
        (
            format!("/v1/snapshot?markets={a}&markets={b}"),
            "invalid_query",
        ),
        ("/v1/snapshot?markets=bad%20id".to_owned(), "invalid_market"),
        (
            path_of(&too_many.iter().map(String::as_str).collect::<Vec<_>>()),
            "too_many_markets",
        ),
        (
            path_of(&long.iter().map(String::as_str).collect::<Vec<_>>()),
            "too_many_markets",
        ),
    ] {
        let (s, head, body) = get(publ.addr, &path, &[]).await;
        assert_eq!(s, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], code, "{path}");
        assert_eq!(header(&head, "cache-control").as_deref(), Some("no-store"));
    }
    // The limits are published.
    let (_, _, limits) = get(publ.addr, "/v1/limits", &[]).await;
    assert_eq!(limits["max_snapshot_markets"], 100);
    assert_eq!(limits["max_snapshot_query_bytes"], 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mode_needs_a_bearer_allowing_every_market_and_is_private() {
    let (p, _r, publ) = publisher(|_| {}).await;
    let ms = markets(2);
    let (a, b) = (ms[0].as_str(), ms[1].as_str());
    seed(&p, &[(a, 1), (b, 5)]).await;
    let path = path_of(&[a, b]);

    let (s, head, body) = get(publ.addr, &path, &[]).await;
    assert_eq!(s, 401, "{body}");
    assert_eq!(header(&head, "cache-control").as_deref(), Some("no-store"));

    let only_a = streampipe_tests::auth::token_for("snap-user", &[a], 600);
    let bearer = format!("Bearer {only_a}");
    let (s, head, body) = get(publ.addr, &path, &[("Authorization", &bearer)]).await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["error"]["code"], "market_not_allowed");
    assert_eq!(header(&head, "cache-control").as_deref(), Some("no-store"));

    let (s, head, body) = get(publ.addr, &path_of(&[a]), &[("Authorization", &bearer)]).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["markets"][a]["version"], 1);
    assert_eq!(
        header(&head, "cache-control").as_deref(),
        Some("private, max-age=2, stale-while-revalidate=10")
    );
    assert_eq!(
        header(&head, "vary").as_deref(),
        Some("origin, authorization")
    );

    // Declared public: shared caches may store it; the token is still checked here.
    let (_p2, _r2, public) = publisher(|c| c.snapshot.public_in_token_mode = true).await;
    let (s, ..) = get(public.addr, &path, &[]).await;
    assert_eq!(s, 401);
    let all = format!("Bearer {}", streampipe_tests::auth::token());
    let (s, head, _) = get(public.addr, &path, &[("Authorization", &all)]).await;
    assert_eq!(s, 200);
    assert!(header(&head, "cache-control")
        .unwrap()
        .starts_with("public,"));
    assert_eq!(header(&head, "vary").as_deref(), Some("origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_serves_repeats_from_its_cache_and_the_origin_sees_one_request() {
    let (p, _r, publ) = publisher(|c| {
        anonymous(c);
        c.snapshot = CachePolicy::from_seconds(30, 60, false);
    })
    .await;
    let nginx = blocking({
        let addr = publ.addr;
        move || Nginx::start_cache(addr)
    })
    .await;
    let ms = markets(3);
    let names: Vec<&str> = ms.iter().map(String::as_str).collect();
    seed(&p, &[(names[0], 7), (names[1], 2), (names[2], 9)]).await;
    let path = path_of(&names);

    let before = snapshots(&publ, "ok");
    let (s, head, first) = get(nginx.addr, &path, &[]).await;
    assert_eq!(s, 200, "{head}\n{}", nginx.error_log());
    assert_eq!(header(&head, "x-cache-status").as_deref(), Some("MISS"));
    let (s, head, second) = get(nginx.addr, &path, &[]).await;
    assert_eq!(s, 200);
    assert_eq!(header(&head, "x-cache-status").as_deref(), Some("HIT"));
    assert_eq!(second, first);

    // N clients at once within max-age: all answered, by the cache.
    const CLIENTS: usize = 50;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let path = path.clone();
        let addr = nginx.addr;
        tasks.push(tokio::spawn(async move { get(addr, &path, &[]).await }));
    }
    for t in tasks {
        let (s, head, body) = t.await.unwrap();
        assert_eq!(s, 200);
        assert_eq!(header(&head, "x-cache-status").as_deref(), Some("HIT"));
        assert_eq!(body, first);
    }
    assert_eq!(
        snapshots(&publ, "ok") - before,
        1,
        "the origin built one snapshot for {} requests",
        CLIENTS + 2
    );

    // Errors are never cached: each one reaches the origin.
    for _ in 0..2 {
        let (s, head, _) = get(nginx.addr, "/v1/snapshot?markets=bad%20id", &[]).await;
        assert_eq!(s, 400);
        assert_ne!(header(&head, "x-cache-status").as_deref(), Some("HIT"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_does_not_share_a_private_token_mode_snapshot() {
    let (p, _r, publ) = publisher(|_| {}).await;
    let nginx = blocking({
        let addr = publ.addr;
        move || Nginx::start_cache(addr)
    })
    .await;
    let ms = markets(1);
    seed(&p, &[(ms[0].as_str(), 1)]).await;
    let path = path_of(&[ms[0].as_str()]);
    let bearer = format!("Bearer {}", streampipe_tests::auth::token());
    let before = snapshots(&publ, "ok");
    for _ in 0..3 {
        let (s, head, _) = get(nginx.addr, &path, &[("Authorization", &bearer)]).await;
        assert_eq!(s, 200);
        assert_ne!(header(&head, "x-cache-status").as_deref(), Some("HIT"));
    }
    // And without a token the cache has nothing to give: 401 from the origin.
    let (s, ..) = get(nginx.addr, &path, &[]).await;
    assert_eq!(s, 401);
    assert_eq!(snapshots(&publ, "ok") - before, 3);
}

/// The hand-off: a snapshot cached by nginx goes stale (updates are
/// written after it was cached), a client paints it, then opens its stream
/// with `since` = the snapshot's versions. It must get every market's
/// newer state (the begin replay of the current state: intermediate
/// versions written while no stream was open are conflated, as for any
/// resume), nothing at or below the snapshot's versions, no market that did
/// not change, and then every later version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cached_snapshot_then_the_stream_with_since_leaves_no_gap() {
    let (p, _r, publ) = publisher(|c| {
        anonymous(c);
        c.snapshot = CachePolicy::from_seconds(60, 60, false);
    })
    .await;
    let nginx = blocking({
        let addr = publ.addr;
        move || Nginx::start_cache(addr)
    })
    .await;
    let ms = markets(3);
    let (a, b, c) = (ms[0].as_str(), ms[1].as_str(), ms[2].as_str());
    seed(&p, &[(a, 1), (a, 2), (b, 10), (c, 5)]).await;
    let path = path_of(&[a, b, c]);
    let (s, head, _) = get(nginx.addr, &path, &[]).await;
    assert_eq!(s, 200, "{}", nginx.error_log());
    assert_eq!(header(&head, "x-cache-status").as_deref(), Some("MISS"));

    // Written after the snapshot was cached.
    seed(&p, &[(a, 3), (a, 4), (b, 11), (b, 12), (b, 13)]).await;
    let (s, head, snap) = get(nginx.addr, &path, &[]).await;
    assert_eq!(s, 200);
    assert_eq!(header(&head, "x-cache-status").as_deref(), Some("HIT"));
    let since: serde_json::Map<String, serde_json::Value> = snap["markets"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(m, u)| (m.clone(), u["version"].clone()))
        .collect();
    assert_eq!(
        serde_json::Value::Object(since.clone()),
        serde_json::json!({a: 2, b: 10, c: 5}),
        "the cached snapshot is stale"
    );

    // The client: channel, stream, begin with the snapshot's versions.
    let body = serde_json::json!({ "markets": [a, b, c] }).to_string();
    let r = http_as(publ.addr, "POST", "/v1/channels", Some(&body), None).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let channel = r.json()["channel"].as_str().unwrap().to_owned();
    let mut ws = ws_connect_as(publ.addr, &channel, "", None).await;
    match ws_next(&mut ws, Duration::from_secs(20)).await {
        Some(Frame::Json(v)) if v["type"] == "subscribed" => {}
        other => panic!("expected subscribed, got {other:?}"),
    }
    let begin = serde_json::json!({"type": "begin", "since": since}).to_string();
    ws_send(&mut ws, &begin).await;

    let mut got: Vec<(String, u64)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(got.contains(&(a.to_owned(), 4)) && got.contains(&(b.to_owned(), 13))) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws_next(&mut ws, left).await {
            Some(Frame::Json(v)) if v["type"] == "update" => got.push((
                v["market"].as_str().unwrap().to_owned(),
                v["version"].as_u64().unwrap(),
            )),
            Some(Frame::Json(_)) => {}
            other => panic!("waiting for the replay: {other:?} after {got:?}"),
        }
    }
    // Live from here: every version arrives, in order (one at a time, so
    // a busy machine's hub cannot conflate them).
    for u in [(a, 5), (a, 6), (a, 7), (c, 6)] {
        seed(&p, &[u]).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !(got.contains(&(a.to_owned(), 7)) && got.contains(&(c.to_owned(), 6))) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws_next(&mut ws, left).await {
            Some(Frame::Json(v)) if v["type"] == "update" => got.push((
                v["market"].as_str().unwrap().to_owned(),
                v["version"].as_u64().unwrap(),
            )),
            Some(Frame::Json(_)) => {}
            other => panic!("waiting for live updates: {other:?} after {got:?}"),
        }
    }
    // Anything still in flight (a repeat would show here).
    while let Some(Frame::Json(v)) = ws_next(&mut ws, Duration::from_millis(500)).await {
        if v["type"] == "update" {
            got.push((
                v["market"].as_str().unwrap().to_owned(),
                v["version"].as_u64().unwrap(),
            ));
        }
    }
    let of = |m: &str| -> Vec<u64> {
        got.iter()
            .filter(|(x, _)| x == m)
            .map(|(_, v)| *v)
            .collect()
    };
    assert_eq!(
        of(a),
        vec![4, 5, 6, 7],
        "a: newest state, then every version"
    );
    assert_eq!(of(b), vec![13], "b: its newest state once");
    assert_eq!(
        of(c),
        vec![6],
        "c: unchanged until 6, nothing older repeated"
    );
}
