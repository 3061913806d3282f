//! Background stream clients and a feed for tests that break something
//! mid-stream (Redis loss, a shard flushed, a failover, a rebalance): each
//! client records what it saw the way the JS client would act on it, and
//! [`every_client_above`] waits until every client holds a version newer
//! than a point in the feed of every market of its channel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::publisher::{ws_next, ws_send, Frame, Ws};
use crate::Pipeline;

/// The publisher's per-client `begin` rate allows one about every 500 ms: a
/// client answering a `reset` sooner would be refused.
const BEGIN_SPACING: Duration = Duration::from_millis(600);

/// How long [`every_client_above`] waits: a rebalance on tansu plus a
/// repair can take tens of seconds on a loaded 2-core CI machine.
pub const CATCH_UP: Duration = Duration::from_secs(90);

/// What one stream client saw.
#[derive(Default, Debug)]
pub struct Seen {
    /// Highest version received per market.
    pub max: HashMap<String, u64>,
    /// Reasons of the `reset` frames received.
    pub resets: Vec<String>,
    /// The close code, once closed.
    pub closed: Option<u16>,
}

/// Reads a stream in the background like the JS client: records updates,
/// answers `reset` with `begin` (no sooner than the publisher's begin rate
/// allows), records the close.
pub fn follow(mut ws: Ws) -> Arc<Mutex<Seen>> {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    tokio::spawn(async move {
        let mut last_begin = Instant::now();
        loop {
            match ws_next(&mut ws, Duration::from_millis(500)).await {
                Some(Frame::Json(v)) if v["type"] == "update" => {
                    let m = v["market"].as_str().unwrap().to_owned();
                    let ver = v["version"].as_u64().unwrap();
                    let mut g = s.lock().unwrap();
                    let e = g.max.entry(m).or_insert(0);
                    *e = (*e).max(ver);
                }
                Some(Frame::Json(v)) if v["type"] == "reset" => {
                    s.lock()
                        .unwrap()
                        .resets
                        .push(v["reason"].as_str().unwrap_or("").to_owned());
                    tokio::time::sleep(BEGIN_SPACING.saturating_sub(last_begin.elapsed())).await;
                    ws_send(&mut ws, r#"{"type":"begin"}"#).await;
                    last_begin = Instant::now();
                }
                Some(Frame::Json(_)) => {}
                Some(Frame::Closed(c)) => {
                    s.lock().unwrap().closed = Some(c);
                    return;
                }
                None => {}
            }
        }
    });
    seen
}

/// One client of a test: its channel, the channel's markets, what it saw.
pub type Client = (String, Vec<String>, Arc<Mutex<Seen>>);

/// Waits (up to [`CATCH_UP`]) until every client holds a version above
/// `after` of every market of its channel; panics naming what is missing.
pub async fn every_client_above(clients: &[Client], after: u64, when: &str) {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let missing: Vec<String> = clients
            .iter()
            .flat_map(|(ch, markets, seen)| {
                let s = seen.lock().unwrap();
                markets
                    .iter()
                    .filter(|m| s.max.get(*m).is_none_or(|v| *v <= after))
                    .map(|m| format!("{ch}/{m}@{:?}", s.max.get(m)))
                    .collect::<Vec<_>>()
            })
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{when}: clients lack versions above {after} of {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A feed producing one new version of every market per round on its own
/// thread until dropped; the version counter is shared so a test knows
/// what was produced when.
pub struct Feed {
    version: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Feed {
    /// Starts producing `markets` every `round`.
    pub fn start(p: Arc<Pipeline>, markets: Vec<String>, round: Duration) -> Feed {
        let version = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (v, s) = (version.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let n = v.fetch_add(1, Ordering::SeqCst) + 1;
                for m in &markets {
                    p.update(m, n, &n.to_string());
                }
                p.flush();
                std::thread::sleep(round);
            }
        });
        Feed { version, stop }
    }

    /// The last version started.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
