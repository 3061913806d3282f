//! Tokens at the edge (issue 9, item 1), against a real publisher on real
//! Redis and the dev broker: refusals (401), ownership (404), allowances
//! (403), WebSocket subprotocol and first-frame auth, SSE tickets, expiry
//! mid-stream and refresh, RS256/ES256 keys and algorithm confusion.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey};
use streampipe_publisher::auth::{Mode, TokenKeys};
use streampipe_publisher::Config;
use streampipe_tests::auth::{now, sign, sign_alg, token_for, TEST_SECRET};
use streampipe_tests::publisher::{
    blocking, http_as, http_full, ws_connect_as, ws_next, ws_send, Frame, InProcess,
};
use streampipe_tests::{redis_url, Broker, Pipeline};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

async fn publisher(tune: impl FnOnce(&mut Config)) -> (Arc<Pipeline>, InProcess) {
    let p = Arc::new(blocking(|| Pipeline::new(Broker::Dev, 2)).await);
    let mut config = Config::new(&p.broker.bootstrap(), &p.name, &redis_url());
    config.command_topic = p.config.command_topic.clone();
    tune(&mut config);
    let publ = InProcess::start_with_config(config).await;
    (p, publ)
}

async fn create(publ: &InProcess, token: &str, markets: &[&str]) -> String {
    let body = serde_json::json!({ "markets": markets }).to_string();
    let r = http_as(publ.addr, "POST", "/v1/channels", Some(&body), Some(token)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["channel"].as_str().unwrap().to_owned()
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let ok = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl")
        .success();
    assert!(ok, "openssl {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_401_and_channels_belong_to_their_subject() {
    let (_p, publ) = publisher(|c| {
        c.auth.mode = Mode::Token(TokenKeys {
            hs256: Some(streampipe_contract::deploy::Secret::new(TEST_SECRET)),
            audience: Some("odds".into()),
            ..Default::default()
        })
    })
    .await;
    let a = publ.addr;
    let claims = |sub: &str, exp: i64, aud: &str| serde_json::json!({"sub": sub, "exp": exp, "aud": aud, "markets": ["football.*", "tennis.1"]});
    let alice = sign(TEST_SECRET, &claims("alice", now() + 600, "odds"));
    let bob = sign(TEST_SECRET, &claims("bob", now() + 600, "odds"));
    let body = r#"{"markets":["football.epl.1"]}"#;

    // Refusals: 401 unauthorized with the reason, and WWW-Authenticate.
    let none_alg = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        alice.split('.').nth(1).unwrap()
    );
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "token_missing"),
        (
            Some(sign("wrong-secret", &claims("alice", now() + 600, "odds"))),
            "token_signature",
        ),
        (
            Some(sign(TEST_SECRET, &claims("alice", now() - 3600, "odds"))),
            "token_expired",
        ),
        (
            Some(sign(TEST_SECRET, &claims("alice", now() + 600, "other"))),
            "token_audience",
        ),
        (Some(none_alg), "token_malformed"),
        (Some("not-a-jwt".into()), "token_malformed"),
    ];
    for (token, reason) in cases {
        let (status, head, b) =
            http_full(a, "POST", "/v1/channels", Some(body), token.as_deref()).await;
        assert_eq!(status, 401, "{reason}: {b}");
        assert!(b.contains(reason), "{reason}: {b}");
        assert!(head.contains("www-authenticate: bearer"), "{head}");
    }

    // A market outside the allowance: 403 with a clear body.
    let r = http_as(
        a,
        "POST",
        "/v1/channels",
        Some(r#"{"markets":["tennis.2"]}"#),
        Some(&alice),
    )
    .await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (403, "market_not_allowed"),
        "{}",
        r.body
    );
    assert!(r.body.contains("tennis.2"));

    let ch = create(&publ, &alice, &["football.epl.1"]).await;
    let r = http_as(
        a,
        "POST",
        &format!("/v1/channels/{ch}/markets"),
        Some(r#"{"markets":["basket.1"]}"#),
        Some(&alice),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = http_as(
        a,
        "POST",
        &format!("/v1/channels/{ch}/markets"),
        Some(r#"{"markets":["tennis.1"]}"#),
        Some(&alice),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Another subject: every call answers 404, exactly as for no channel.
    for (method, path, body) in [
        (
            "POST",
            format!("/v1/channels/{ch}/markets"),
            Some(r#"{"markets":["football.x"]}"#),
        ),
        (
            "DELETE",
            format!("/v1/channels/{ch}/markets/tennis.1"),
            None,
        ),
        ("POST", format!("/v1/channels/{ch}/begin"), None),
        ("POST", format!("/v1/channels/{ch}/tickets"), None),
        ("DELETE", format!("/v1/channels/{ch}"), None),
    ] {
        let r = http_as(a, method, &path, body, Some(&bob)).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (404, "unknown_channel"),
            "{method} {path}"
        );
    }
    let mut ws = ws_connect_as(a, &ch, "", Some(&bob)).await;
    assert!(matches!(
        ws_next(&mut ws, Duration::from_secs(10)).await,
        Some(Frame::Closed(4404))
    ));

    // Tokens never go in a URL.
    let (status, _, b) =
        http_full(a, "GET", &format!("/v1/sse/{ch}?token={alice}"), None, None).await;
    assert_eq!(status, 400, "{b}");
    assert!(b.contains("token_in_url"));

    // The owner still has it all.
    let r = http_as(
        a,
        "DELETE",
        &format!("/v1/channels/{ch}"),
        None,
        Some(&alice),
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_authenticate_by_subprotocol_or_first_frame_and_expire() {
    let (_p, publ) = publisher(|_| {}).await;
    let a = publ.addr;
    let t = token_for("carol", &["*"], 600);
    let ch = create(&publ, &t, &["w.1"]).await;

    // Subprotocol: the server echoes only streampipe.v2.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{a}/v1/stream/{ch}")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("streampipe.v2, bearer.{t}").parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "streampipe.v2"
    );
    assert!(
        matches!(ws_next(&mut ws, Duration::from_secs(10)).await, Some(Frame::Json(v)) if v["type"] == "subscribed")
    );

    // First frame.
    let mut ws = ws_connect_as(a, &ch, "", None).await;
    ws_send(
        &mut ws,
        &serde_json::json!({"type": "auth", "token": t}).to_string(),
    )
    .await;
    assert!(
        matches!(ws_next(&mut ws, Duration::from_secs(10)).await, Some(Frame::Json(v)) if v["type"] == "subscribed")
    );

    // A bad first frame, a bad token: 4407.
    let mut ws = ws_connect_as(a, &ch, "", None).await;
    ws_send(&mut ws, r#"{"type":"begin"}"#).await;
    assert!(matches!(
        ws_next(&mut ws, Duration::from_secs(10)).await,
        Some(Frame::Closed(4407))
    ));
    let bad = sign(
        "nope",
        &serde_json::json!({"sub": "carol", "exp": now() + 60}),
    );
    let mut ws = ws_connect_as(a, &ch, "", Some(&bad)).await;
    assert!(matches!(
        ws_next(&mut ws, Duration::from_secs(10)).await,
        Some(Frame::Closed(4407))
    ));

    // Expiry mid-stream: 4401 once exp + leeway passed. A token already
    // inside its leeway expires within seconds.
    let leeway = streampipe_publisher::auth::LEEWAY_SECS as i64;
    let short = token_for("carol", &["*"], 3 - leeway);
    let mut ws = ws_connect_as(a, &ch, "", Some(&short)).await;
    assert!(
        matches!(ws_next(&mut ws, Duration::from_secs(10)).await, Some(Frame::Json(v)) if v["type"] == "subscribed")
    );
    let started = std::time::Instant::now();
    let code = streampipe_tests::publisher::ws_close_code(&mut ws, Duration::from_secs(15)).await;
    assert_eq!(code, 4401);
    assert!(
        started.elapsed() <= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Refresh before expiry extends the stream; another subject's token is refused.
    let short = token_for("carol", &["*"], 3 - leeway);
    let mut ws = ws_connect_as(a, &ch, "", Some(&short)).await;
    assert!(
        matches!(ws_next(&mut ws, Duration::from_secs(10)).await, Some(Frame::Json(v)) if v["type"] == "subscribed")
    );
    ws_send(
        &mut ws,
        &serde_json::json!({"type": "refresh", "token": token_for("carol", &["*"], 600)})
            .to_string(),
    )
    .await;
    let got = ws_next(&mut ws, Duration::from_secs(5)).await;
    assert!(
        matches!(&got, Some(Frame::Json(v)) if v["type"] == "refreshed"),
        "{got:?}"
    );
    // Past the old expiry the stream is still open.
    assert!(ws_next(&mut ws, Duration::from_secs(6)).await.is_none());
    ws_send(
        &mut ws,
        &serde_json::json!({"type": "refresh", "token": token_for("mallory", &["*"], 600)})
            .to_string(),
    )
    .await;
    assert!(matches!(
        ws_next(&mut ws, Duration::from_secs(5)).await,
        Some(Frame::Closed(4407))
    ));
}

/// Reads SSE events until `stop` says so; returns (event, data) pairs.
async fn sse_events(
    a: std::net::SocketAddr,
    path: &str,
    stop: impl Fn(&[(String, serde_json::Value)]) -> bool,
) -> (String, Vec<(String, serde_json::Value)>) {
    let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut lines = BufReader::new(s).lines();
    let status = lines.next_line().await.unwrap().unwrap_or_default();
    let mut events = Vec::new();
    let mut event = String::new();
    if !status.contains(" 200") {
        return (status, events);
    }
    while !stop(&events) {
        let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_secs(15), lines.next_line()).await
        else {
            break;
        };
        if let Some(e) = line.strip_prefix("event:") {
            event = e.trim().to_owned();
        } else if let Some(d) = line.strip_prefix("data:") {
            events.push((event.clone(), serde_json::from_str(d.trim()).unwrap()));
        }
    }
    (status, events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_tickets_are_single_use_short_lived_and_expire_with_the_token() {
    let (p, publ) = publisher(|_| {}).await;
    let a = publ.addr;
    let leeway = streampipe_publisher::auth::LEEWAY_SECS as i64;
    let t = token_for("dave", &["*"], 3 - leeway);
    let ch = create(&publ, &token_for("dave", &["*"], 600), &["s.1"]).await;
    let r = http_as(
        a,
        "POST",
        &format!("/v1/channels/{ch}/tickets"),
        None,
        Some(&t),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let path = r.json()["sse"].as_str().unwrap().to_owned();
    assert!(!path.contains(&t), "the ticket is not the token");

    // The stream opens, then ends with `expired` (4401) with the token.
    let (status, events) = sse_events(a, &path, |e| e.iter().any(|(k, _)| k == "expired")).await;
    assert!(status.contains(" 200"), "{status}");
    assert_eq!(events[0].0, "subscribed");
    let (_, last) = events.last().unwrap();
    assert_eq!(last["code"], 4401, "{events:?}");

    // Used once: the second use is refused.
    let (status, _) = sse_events(a, &path, |_| true).await;
    assert!(status.contains(" 401"), "{status}");
    // No ticket at all, or another channel's ticket: refused.
    let (status, _) = sse_events(a, &format!("/v1/sse/{ch}"), |_| true).await;
    assert!(status.contains(" 401"), "{status}");
    // A ticket past its time: refused (its Redis key expired).
    let r = http_as(
        a,
        "POST",
        &format!("/v1/channels/{ch}/tickets"),
        None,
        Some(&token_for("dave", &["*"], 600)),
    )
    .await;
    let ticket = r.json()["ticket"].as_str().unwrap().to_owned();
    let key = p.keys().channel_ticket(&ch, &ticket);
    let ttl: i64 = blocking({
        let p = p.clone();
        move || redis::cmd("PTTL").arg(&key).query(&mut p.redis()).unwrap()
    })
    .await;
    assert!(ttl > 0 && ttl <= 30_000, "ticket TTL {ttl} ms");
    let other = create(&publ, &token_for("dave", &["*"], 600), &["s.2"]).await;
    let (status, _) = sse_events(a, &format!("/v1/sse/{other}?ticket={ticket}"), |_| true).await;
    assert!(status.contains(" 401"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_es256_keys_verify_and_algorithms_do_not_mix() {
    let dir = std::env::temp_dir().join(format!("sp-auth-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    openssl(&dir, &["genrsa", "-out", "rsa.pem", "2048"]);
    openssl(
        &dir,
        &["rsa", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub"],
    );
    openssl(
        &dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ec.key",
        ],
    );
    openssl(
        &dir,
        &[
            "pkcs8", "-topk8", "-nocrypt", "-in", "ec.key", "-out", "ec.pem",
        ],
    );
    openssl(&dir, &["ec", "-in", "ec.key", "-pubout", "-out", "ec.pub"]);
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let (rsa_pub, ec_pub) = (read("rsa.pub"), read("ec.pub"));
    let rsa_key = EncodingKey::from_rsa_pem(&read("rsa.pem")).unwrap();
    let ec_key = EncodingKey::from_ec_pem(&read("ec.pem")).unwrap();
    let keys = TokenKeys {
        rsa_public_pem: Some(rsa_pub.clone()),
        ec_public_pem: Some(ec_pub),
        ..Default::default()
    };
    let (_p, publ) = publisher(move |c| c.auth.mode = Mode::Token(keys)).await;
    let a = publ.addr;
    let claims = serde_json::json!({"sub": "erin", "exp": now() + 600, "markets": ["*"]});
    let body = Some(r#"{"markets":["k.1"]}"#);
    for (alg, key) in [(Algorithm::RS256, &rsa_key), (Algorithm::ES256, &ec_key)] {
        let t = sign_alg(alg, key, &claims);
        let r = http_as(a, "POST", "/v1/channels", body, Some(&t)).await;
        assert_eq!(r.status, 201, "{alg:?}: {}", r.body);
    }
    // HS/RS confusion: an HS256 token whose "secret" is the RSA public key.
    let forged = sign_alg(
        Algorithm::HS256,
        &EncodingKey::from_secret(&rsa_pub),
        &claims,
    );
    let r = http_as(a, "POST", "/v1/channels", body, Some(&forged)).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("token_algorithm"), "{}", r.body);
    // The shared test secret is not configured here either.
    let r = http_as(
        a,
        "POST",
        "/v1/channels",
        body,
        Some(&token_for("erin", &["*"], 600)),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_without_keys_in_token_mode_refuses_to_start() {
    let config = Config::new("127.0.0.1:1", "nokeys", &redis_url());
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let e = streampipe_publisher::context(config, Arc::default(), stopped)
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("needs a key"), "{e}");
    // The binary says the same and exits.
    let out = std::process::Command::new(streampipe_tests::workspace_bin("streampipe-publisher"))
        .env_remove(streampipe_contract::deploy::env::AUTH_HS256_SECRET)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_mode_needs_no_token_and_keeps_channels_apart_from_subjects() {
    let (_p, publ) = publisher(|c| c.auth.mode = Mode::Anonymous).await;
    let a = publ.addr;
    let r = http_as(
        a,
        "POST",
        "/v1/channels",
        Some(r#"{"markets":["p.1"]}"#),
        None,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let ch = r.json()["channel"].as_str().unwrap().to_owned();
    let mut ws = ws_connect_as(a, &ch, "", None).await;
    assert!(
        matches!(ws_next(&mut ws, Duration::from_secs(10)).await, Some(Frame::Json(v)) if v["type"] == "subscribed")
    );
    let r = http_as(a, "POST", &format!("/v1/channels/{ch}/begin"), None, None).await;
    assert_eq!(r.status, 202, "{}", r.body);
}
