//! The live page in a real browser (Debian's headless Chromium): prices
//! change on screen, and the JS client survives a publisher crash.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use streampipe_reducer::{spawn, Metrics};
use streampipe_tests::browser::{artifacts_dir, Browser};
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

/// Produces odds for `markets` until stopped; returns the last version per market.
fn feed(
    p: Arc<Pipeline>,
    markets: Vec<&'static str>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut v = 0u64;
        while !stop.load(Ordering::SeqCst) {
            v += 1;
            for (i, m) in markets.iter().enumerate() {
                let home = 1.5 + ((v * 7 + i as u64) % 40) as f64 / 20.0;
                p.update(
                    m,
                    v,
                    &format!(r#"{{"event":"Team {i} v Team {}","home":{home:.2},"draw":3.40,"away":{:.2},"status":"open"}}"#, i + 10, 6.0 - home),
                );
            }
            p.flush();
            std::thread::sleep(Duration::from_millis(100));
        }
        v
    })
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
    let feeder = feed(p.clone(), MARKETS.to_vec(), stop.clone());

    let mut b = Browser::launch().await;
    // The page asks the publisher for its markets (GET /v1/demo/markets).
    b.navigate(&format!("http://{}/", publisher.addr)).await;
    b.wait_until(
        "document.getElementById('conn-state').textContent === 'live'",
        Duration::from_secs(30),
    )
    .await;
    let rows = b
        .eval("document.querySelectorAll('tr[data-market]').length")
        .await;
    assert_eq!(rows, MARKETS.len(), "one row per market");
    let prices = "JSON.stringify([...document.querySelectorAll('tr[data-market] td[data-field=home]')].map(td => td.textContent))";
    let count = "Number(document.getElementById('update-count').textContent)";
    let before = b.eval(prices).await;
    let n0 = b.eval(count).await.as_f64().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = b.eval(prices).await;
    let n1 = b.eval(count).await.as_f64().unwrap();
    assert_ne!(before, after, "prices on screen changed");
    assert!(n1 > n0, "update count rose: {n0} → {n1}");
    let shot = artifacts_dir().join("live-page.png");
    b.screenshot(&shot).await;
    let size = std::fs::metadata(&shot).unwrap().len();
    assert!(size > 10_000, "a real screenshot ({size} bytes)");
    eprintln!("screenshot kept at {}", shot.display());

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
    let feeder = feed(p.clone(), MARKETS[..3].to_vec(), stop.clone());

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
