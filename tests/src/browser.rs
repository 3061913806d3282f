//! A headless Chromium (Debian's `chromium`) driven over the DevTools
//! protocol, for end-to-end tests of the live page. No driver binary and no
//! npm package: the DevTools protocol is JSON over a WebSocket.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::publisher::Ws;
use crate::Pipeline;

/// How often [`feed_odds`] moves every market's prices: visibly often for a
/// person watching, and a few rounds within any test's 2 s look.
pub const FEED_INTERVAL: Duration = Duration::from_millis(100);

/// Produces odds (the live page's fields) for `markets` every
/// [`FEED_INTERVAL`] until `stop`; returns the last version of each market.
pub fn feed_odds(
    p: Arc<Pipeline>,
    markets: Vec<String>,
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
            std::thread::sleep(FEED_INTERVAL);
        }
        v
    })
}

/// The live page's checks, wherever it is served from: the page at `url`
/// goes live with one row per market, and within 2 s the prices on screen
/// and the update counter change. Saves a screenshot as `shot` (under
/// [`artifacts_dir`]) and returns its path.
pub async fn assert_live_page_moves(
    b: &mut Browser,
    url: &str,
    markets: usize,
    shot: &str,
) -> PathBuf {
    b.navigate(url).await;
    b.wait_until(
        "document.getElementById('conn-state').textContent === 'live'",
        Duration::from_secs(30),
    )
    .await;
    let rows = b
        .eval("document.querySelectorAll('tr[data-market]').length")
        .await;
    assert_eq!(rows, markets, "one row per market");
    let prices = "JSON.stringify([...document.querySelectorAll('tr[data-market] td[data-field=home]')].map(td => td.textContent))";
    let count = "Number(document.getElementById('update-count').textContent)";
    let before = b.eval(prices).await;
    let n0 = b.eval(count).await.as_f64().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = b.eval(prices).await;
    let n1 = b.eval(count).await.as_f64().unwrap();
    assert_ne!(before, after, "prices on screen changed");
    assert!(n1 > n0, "update count rose: {n0} → {n1}");
    let path = artifacts_dir().join(shot);
    b.screenshot(&path).await;
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size > 10_000, "a real screenshot ({size} bytes)");
    path
}

/// A running headless Chromium with one page attached.
pub struct Browser {
    child: Child,
    page: Ws,
    next_id: u64,
    _profile: PathBuf,
}

/// Where end-to-end artifacts (screenshots) are kept.
pub fn artifacts_dir() -> PathBuf {
    let base = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let exe = std::env::current_exe().unwrap();
            exe.parent()
                .and_then(|p| p.parent())
                .and_then(|p| p.parent())
                .unwrap()
                .to_path_buf()
        });
    let dir = base.join("e2e-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Browser {
    /// Starts Chromium with the flags this machine needs (no sandbox as
    /// root, no background networking on a closed network).
    pub async fn launch() -> Self {
        let profile = std::env::temp_dir().join(format!(
            "streampipe-chromium-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium (Debian package `chromium`) must be installed; scripts/test.sh installs it");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let browser_url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium DevTools endpoint");
        let host = browser_url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        // The page target opened with about:blank.
        let list = crate::wait_for(Duration::from_secs(10), "a page target", || {
            let resp = crate::try_http_request(&host, "GET", "/json/list").ok()?;
            let body = resp.split_once("\r\n\r\n")?.1.to_owned();
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            v.as_array()?
                .iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
        });
        let (page, _) = tokio_tungstenite::connect_async(list)
            .await
            .expect("DevTools page socket");
        let mut b = Browser {
            child,
            page,
            next_id: 1,
            _profile: profile,
        };
        b.call("Page.enable", serde_json::json!({})).await;
        b.call("Runtime.enable", serde_json::json!({})).await;
        b
    }

    /// Sends a DevTools command and returns its result.
    pub async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = serde_json::json!({"id": id, "method": method, "params": params});
        self.page
            .send(Message::text(msg.to_string()))
            .await
            .expect("devtools send");
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.page.next())
                .await
                .expect("devtools answer in time")
                .expect("devtools socket open")
                .expect("devtools frame");
            if let Message::Text(t) = frame {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                if v["id"] == id {
                    assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                    return v["result"].clone();
                }
            }
        }
    }

    /// Opens `url` in the page.
    pub async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", serde_json::json!({ "url": url }))
            .await;
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    pub async fn eval(&mut self, expr: &str) -> serde_json::Value {
        let r = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({"expression": expr, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is truthy.
    pub async fn wait_until(&mut self, expr: &str, timeout: Duration) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.eval(expr).await;
            if !(v.is_null() || v == false || v == 0 || v == "") {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for `{expr}`"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG screenshot of the page.
    pub async fn screenshot(&mut self, path: &Path) {
        let r = self
            .call(
                "Page.captureScreenshot",
                serde_json::json!({"format": "png"}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG");
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._profile);
    }
}
