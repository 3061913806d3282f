//! The live page in a real browser (Debian's headless Chromium): prices
//! change on screen, and the JS client survives a publisher crash.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use streampipe_reducer::{spawn, Metrics};
use streampipe_tests::browser::{artifacts_dir, assert_live_page_moves, feed_odds, Browser};
use streampipe_tests::publisher::PublisherProcess;
use streampipe_tests::{free_port, Broker, Pipeline};

const MARKETS: [&str; 6] = [
    "football.epl.1:match_odds",
    "football.epl.2:match_odds",
    "football.epl.3:match_odds",
    "football.laliga.4:match_odds",
    "football.seriea.5:match_odds",
    "football.ligue1.6:match_odds",
];

fn owned(markets: &[&str]) -> Vec<String> {
    markets.iter().map(|m| m.to_string()).collect()
}

async fn pipeline() -> (Arc<Pipeline>, streampipe_reducer::ReducerHandle) {
    tokio::task::spawn_blocking(|| {
        let p = Pipeline::new(Broker::Dev, 4);
        let r = spawn(p.config.clone(), Arc::new(Metrics::new())).unwrap();
        (Arc::new(p), r)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_page_shows_changing_prices() {
    let (p, reducer) = pipeline().await;
    let markets: Vec<String> = MARKETS.iter().map(|s| s.to_string()).collect();
    let publisher = tokio::task::spawn_blocking({
        let p = p.clone();
        move || PublisherProcess::spawn_with(&p, 0, &markets, &["--dev-tokens"])
    })
    .await
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed_odds(p.clone(), owned(&MARKETS), stop.clone());

    let mut b = Browser::launch().await;
    // The page asks the publisher for its markets (GET /v1/demo/markets).
    let shot = assert_live_page_moves(
        &mut b,
        &format!("http://{}/", publisher.addr),
        MARKETS.len(),
        "live-page.png",
    )
    .await;
    eprintln!("screenshot kept at {}", shot.display());
    // It painted from the snapshot first (docs/protocol.md, "Snapshots").
    let snapshot = b
        .eval(
            "JSON.stringify(performance.getEntriesByType('resource')\
             .filter(e => e.name.includes('/v1/snapshot?markets='))\
             .map(e => e.responseStatus))",
        )
        .await;
    assert_eq!(snapshot, "[200]", "one snapshot request, answered 200");

    stop.store(true, Ordering::SeqCst);
    feeder.join().unwrap();
    drop(b);
    drop(publisher);
    tokio::task::spawn_blocking(move || reducer.shutdown().unwrap())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_client_resumes_after_publisher_restart() {
    let (p, reducer) = pipeline().await;
    let port = free_port();
    let spawn_publisher = |p: Arc<Pipeline>| {
        tokio::task::spawn_blocking(move || {
            PublisherProcess::spawn_with(&p, port, &[], &["--dev-tokens"])
        })
    };
    let mut publisher = spawn_publisher(p.clone()).await.unwrap();

    // One market stays still after its first update: a reconnect without
    // `since` would replay it and the client would count a duplicate.
    let still = "football.still.9:match_odds";
    p.update(
        still,
        1,
        r#"{"event":"Still v Life","home":2.0,"draw":3.0,"away":4.0,"status":"open"}"#,
    );
    p.flush();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed_odds(p.clone(), owned(&MARKETS[..3]), stop.clone());

    let mut b = Browser::launch().await;
    let list = format!("{},{still}", MARKETS[..3].join(","));
    b.navigate(&format!("http://127.0.0.1:{port}/?markets={list}"))
        .await;
    b.wait_until(
        &format!("window.streampipe && window.streampipe.versions['{still}'] === 1"),
        Duration::from_secs(30),
    )
    .await;
    b.wait_until(
        "document.getElementById('conn-state').textContent === 'live'",
        Duration::from_secs(30),
    )
    .await;

    // Crash the publisher mid-stream; updates go on meanwhile.
    publisher.kill();
    b.wait_until(
        "window.streampipe.connectionState === 'reconnecting'",
        Duration::from_secs(10),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    publisher = spawn_publisher(p.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    let last = tokio::task::spawn_blocking(move || feeder.join().unwrap())
        .await
        .unwrap();

    // The client reconnected, resumed, and ends with the latest version of every market.
    let cond = format!(
        "[{}].every(m => window.streampipe.versions[m] === {last}) && window.streampipe.versions['{still}'] === 1",
        MARKETS[..3].iter().map(|m| format!("'{m}'")).collect::<Vec<_>>().join(",")
    );
    b.wait_until(&cond, Duration::from_secs(30)).await;
    let stats = b.eval("JSON.stringify(window.streampipe.stats)").await;
    let stats: serde_json::Value = serde_json::from_str(stats.as_str().unwrap()).unwrap();
    assert!(stats["reconnects"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(
        stats["duplicates"], 0,
        "resumed with since: nothing was sent twice ({stats})"
    );
    b.screenshot(&artifacts_dir().join("resumed-page.png"))
        .await;
    drop(b);
    drop(publisher);
    tokio::task::spawn_blocking(move || reducer.shutdown().unwrap())
        .await
        .unwrap();
}
