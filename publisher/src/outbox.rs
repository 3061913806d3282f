//! A connection's bounded outbound queue, with per-market conflation.
//!
//! The hub pushes every update for a channel into the outbox of each
//! connection watching it, without ever waiting for a slow peer. While a
//! client keeps up, every version is queued and sent in order. Once
//! [`CONFLATE_AFTER_BYTES`] wait, or the oldest entry has waited
//! [`CONFLATE_AFTER_AGE`], a new update of a market that is already queued
//! replaces the queued one (the client gets the newest version, skipping
//! intermediate ones); an update of a market not yet queued is appended. So
//! the queue never holds more than `CONFLATE_AFTER_BYTES` + one entry per
//! market, and a channel watches at most `MAX_MARKETS_PER_CHANNEL`
//! markets: memory per slow client is bounded, and other clients are never
//! slowed. A client that accepts nothing for [`SLOW_CLIENT_TIMEOUT`] while
//! messages wait is hopelessly behind and is closed with 4408.
//!
//! A per-connection bound alone still lets thousands of connections that
//! fall behind together (one hot market, a pod short of CPU) hold gigabytes
//! between them. So every outbox of a pod also shares a [`Budget`]: once all
//! of them together hold more than [`POD_OUTBOX_BUDGET`], every outbox
//! conflates at once, whatever its own size — then each connection holds at
//! most one entry per market, and the pod's memory and its clients'
//! staleness stay bounded under any offered load.
//!
//! The outbox also drops versions that are not newer than what the
//! connection already sent (or than its `since` resume point), so a `begin`
//! replay or a reconnect never sends a client something it has.
//!
//! **History markets** (see `streampipe_contract::history`) are never
//! conflated: every event matters. Their updates skip the age rule; when
//! the byte bound or the pod's budget is reached and one of the market's
//! events already waits, the connection is closed with
//! [`HISTORY_GAP`](streampipe_contract::close::HISTORY_GAP) instead, and the
//! client reconnects with `since` and gets the missed events replayed from
//! the history. While a `begin` replays a history (see [`Outbox::hold`]),
//! live updates of history markets wait in a bounded stash and are queued
//! after the replayed ones, so the replay and the live stream leave no gap
//! and repeat nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

/// Queued bytes from which updates of an already-queued market are
/// conflated: about what a socket's kernel buffer holds, so a client that
/// keeps up rides out bursts and scheduling hiccups without skipping
/// versions, while a stalled one costs at most this plus one update per market.
pub const CONFLATE_AFTER_BYTES: usize = 256 * 1024;

/// Age of the oldest queued entry from which updates of an already-queued
/// market conflate too, however few bytes wait: one hot market fanned out
/// to 10 000 connections never fills 256 KiB per outbox, yet left every
/// client seconds behind version by version (p50 2.7 s measured); half a
/// second behind, the latest version is worth more than the ones between.
pub const CONFLATE_AFTER_AGE: Duration = Duration::from_millis(500);

/// How long a client may accept nothing while messages wait before it is
/// closed as hopelessly behind (4408): long enough for a phone switching
/// networks, short enough not to hold memory for dead peers.
pub const SLOW_CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes all outboxes of a pod may hold together before every one of them
/// conflates: absorbs a burst for thousands of clients while keeping the pod
/// far below a typical memory limit.
pub const POD_OUTBOX_BUDGET: usize = 64 * 1024 * 1024;

/// Bytes of live history-market updates a connection holds aside while a
/// `begin` replays history (a Redis read, milliseconds): far more than
/// arrives meanwhile; past it the stash is dropped and the connection
/// closes with 4412 when the replay ends (it resumes from the history).
pub const HOLD_STASH_BYTES: usize = 256 * 1024;

/// The bytes queued in all outboxes of a pod.
#[derive(Debug)]
pub struct Budget {
    queued: AtomicUsize,
    limit: usize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Budget {
            queued: AtomicUsize::new(0),
            limit,
        }
    }

    /// Bytes queued in all outboxes now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    fn over(&self) -> bool {
        self.queued() >= self.limit
    }

    fn add(&self, n: usize) {
        self.queued.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new(POD_OUTBOX_BUDGET)
    }
}

/// One update as the hub dispatches it: parsed once, shared by every
/// connection of the channel.
#[derive(Debug, Clone)]
pub struct Update {
    /// Market id.
    pub market: Arc<str>,
    /// The market's version.
    pub version: u64,
    /// The update's JSON, as sent to clients.
    pub bytes: Bytes,
    /// The market keeps an event history: never conflated.
    pub history: bool,
}

/// Something for the connection to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// Send this JSON text frame / SSE event.
    Message {
        /// Event type (`update`, `reset`, `subscribed`).
        kind: &'static str,
        /// The JSON.
        bytes: Bytes,
    },
    /// Close the connection with this code and reason.
    Close(u16, &'static str),
}

/// What a push did, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Replaced a queued older version of the same market.
    Conflated,
    /// Not newer than what the client has; dropped.
    Duplicate,
    /// The client is hopelessly behind; the outbox is now closing.
    TooSlow,
    /// The outbox is closed already.
    Closed,
    /// A history market's event could not be queued without dropping
    /// another: the outbox is now closing with 4412.
    Gap,
    /// A history market's event held aside while a replay runs.
    Held,
}

#[derive(Debug)]
struct Entry {
    item: Item,
    /// When it was queued.
    at: Instant,
    /// Market and version of an update entry.
    update: Option<(Arc<str>, u64)>,
}

#[derive(Debug)]
struct Inner {
    queue: VecDeque<Entry>,
    /// Bytes of the queued messages.
    bytes: usize,
    /// Conflation threshold in bytes.
    conflate_after: usize,
    /// Sequence number of `queue[0]`.
    front_seq: u64,
    /// market → sequence number of its newest queued update.
    queued: HashMap<Arc<str>, u64>,
    /// market → newest version handed to the client (or its resume point).
    sent: HashMap<Arc<str>, u64>,
    /// When the client last took something while messages waited.
    last_progress: Instant,
    closed: bool,
    /// Live history-market updates held aside during a replay.
    hold: Option<Hold>,
    /// Resume history markets the connection has no position on from this
    /// time (ms since the epoch; `from_ms`), see [`crate::history`].
    from_ms: Option<u64>,
}

/// Live updates of history markets held during a replay (see [`Outbox::hold`]).
#[derive(Debug, Default)]
struct Hold {
    stash: VecDeque<Update>,
    bytes: usize,
    /// More than [`HOLD_STASH_BYTES`] arrived: the stash was dropped.
    overflowed: bool,
}

/// A connection's outbound queue. Share it in an `Arc` between the hub
/// (producer) and the connection task (consumer).
#[derive(Debug)]
pub struct Outbox {
    inner: Mutex<Inner>,
    notify: Notify,
    budget: Arc<Budget>,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new(HashMap::new(), Arc::default())
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.budget.sub(self.lock().bytes);
    }
}

impl Outbox {
    /// An outbox resuming after `since` (market → last version the client
    /// has), sharing the pod's `budget`.
    pub fn new(since: HashMap<Arc<str>, u64>, budget: Arc<Budget>) -> Self {
        Self::with_threshold(since, CONFLATE_AFTER_BYTES, budget)
    }

    /// Like [`Outbox::new`] with another conflation threshold (in bytes).
    pub fn with_threshold(
        since: HashMap<Arc<str>, u64>,
        conflate_after: usize,
        budget: Arc<Budget>,
    ) -> Self {
        Outbox {
            budget,
            inner: Mutex::new(Inner {
                queue: VecDeque::new(),
                bytes: 0,
                conflate_after,
                front_seq: 0,
                queued: HashMap::new(),
                sent: since,
                last_progress: Instant::now(),
                closed: false,
                hold: None,
                from_ms: None,
            }),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Raises the resume point of markets (from a `begin` with `since`).
    pub fn resume_from(&self, since: &HashMap<Arc<str>, u64>) {
        let mut g = self.lock();
        for (m, v) in since {
            let e = g.sent.entry(m.clone()).or_insert(0);
            *e = (*e).max(*v);
        }
    }

    /// Queues an update, conflating when the client is behind (never a
    /// history market's: see the module header).
    pub fn push_update(&self, u: &Update) -> Pushed {
        self.push_update_at(u, Instant::now())
    }

    fn push_update_at(&self, u: &Update, now: Instant) -> Pushed {
        self.push(u, now, false)
    }

    /// Starts holding live updates of history markets aside, before a
    /// `begin` reads the history (idempotent). [`Outbox::release`] ends it.
    pub fn hold(&self) {
        let mut g = self.lock();
        if g.hold.is_none() && !g.closed {
            g.hold = Some(Hold::default());
        }
    }

    /// Whether history-market updates are held (a replay is pending).
    pub fn is_held(&self) -> bool {
        self.lock().hold.is_some()
    }

    /// Resume history markets without a position from `ms` (a `begin`'s
    /// or the stream URL's `from_ms`; the latest one counts).
    pub fn resume_from_time(&self, ms: u64) {
        self.lock().from_ms = Some(ms);
    }

    /// The time history markets without a position resume from, if any.
    pub fn from_time(&self) -> Option<u64> {
        self.lock().from_ms
    }

    /// Where the connection stands on `market`: the newest version sent,
    /// queued or resumed from (`since`); `None` when it has none.
    pub fn position(&self, market: &str) -> Option<u64> {
        let g = self.lock();
        let queued = g.queued.get(market).and_then(|&seq| {
            g.queue
                .get((seq - g.front_seq) as usize)
                .and_then(|e| e.update.as_ref().map(|(_, v)| *v))
        });
        g.sent.get(market).copied().max(queued)
    }

    /// Queues a replayed update (history or a state read by `begin`) while
    /// the hold is on: appended in order, never conflated or held (bounded
    /// by the caller's replay limits).
    pub fn push_replayed(&self, u: &Update) -> Pushed {
        self.push(u, Instant::now(), true)
    }

    /// Ends a hold: queues the held live updates after what the replay
    /// queued (dropping versions it already has), then lets live updates
    /// through again. Closes with 4412 when the stash had overflowed.
    pub fn release(&self) {
        loop {
            let stash = {
                let mut g = self.lock();
                let Some(h) = g.hold.as_mut() else { return };
                if h.overflowed {
                    g.hold = None;
                    drop(g);
                    self.close(
                        streampipe_contract::close::HISTORY_GAP,
                        "history events missed during a replay; resume with since",
                    );
                    return;
                }
                if h.stash.is_empty() {
                    g.hold = None;
                    return;
                }
                h.bytes = 0;
                std::mem::take(&mut h.stash)
            };
            // Outside the lock, so more may arrive meanwhile: they go to
            // the stash (newer), and the next round queues them.
            for u in &stash {
                self.push(u, Instant::now(), true);
            }
        }
    }

    fn push(&self, u: &Update, now: Instant, replayed: bool) -> Pushed {
        let mut g = self.lock();
        if g.closed {
            return Pushed::Closed;
        }
        if g.sent.get(&u.market).is_some_and(|&v| v >= u.version) {
            return Pushed::Duplicate;
        }
        if u.history && !replayed {
            if let Some(h) = g.hold.as_mut() {
                if !h.overflowed {
                    if h.bytes + u.bytes.len() > HOLD_STASH_BYTES {
                        h.overflowed = true;
                        h.stash.clear();
                        h.bytes = 0;
                    } else {
                        h.bytes += u.bytes.len();
                        h.stash.push_back(u.clone());
                    }
                }
                return Pushed::Held;
            }
        }
        if g.queue.is_empty() {
            g.last_progress = now;
        } else if now.duration_since(g.last_progress) > SLOW_CLIENT_TIMEOUT {
            drop(g);
            self.close(streampipe_contract::close::TOO_SLOW, "client too slow");
            return Pushed::TooSlow;
        }
        let item = Item::Message {
            kind: "update",
            bytes: u.bytes.clone(),
        };
        // Behind: too many bytes wait, the pod's budget is spent, or the
        // oldest entry has waited too long.
        let lagging = g
            .queue
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.at) >= CONFLATE_AFTER_AGE);
        let full = g.bytes >= g.conflate_after || self.budget.over();
        if u.history {
            // Never conflated: late beats lost. Only when the bounds are
            // reached and an event of the market already waits would a
            // second one exceed "one entry per market": then the client
            // resumes from the history instead.
            if let Some(&seq) = g.queued.get(&u.market) {
                let idx = (seq - g.front_seq) as usize;
                if matches!(&g.queue[idx].update, Some((_, v)) if *v >= u.version) {
                    return Pushed::Duplicate;
                }
                if full && !replayed {
                    drop(g);
                    self.close(
                        streampipe_contract::close::HISTORY_GAP,
                        "too far behind on a history market; resume with since",
                    );
                    return Pushed::Gap;
                }
            }
        } else if full || lagging {
            if let Some(&seq) = g.queued.get(&u.market) {
                let idx = (seq - g.front_seq) as usize;
                let old_len = match &g.queue[idx] {
                    Entry {
                        update: Some((_, v)),
                        ..
                    } if *v >= u.version => return Pushed::Duplicate,
                    e => item_len(&e.item),
                };
                g.bytes = g.bytes - old_len + u.bytes.len();
                self.budget.add(u.bytes.len());
                self.budget.sub(old_len);
                let entry = &mut g.queue[idx];
                entry.item = item;
                entry.update = Some((u.market.clone(), u.version));
                return Pushed::Conflated;
            }
        } else if let Some(&seq) = g.queued.get(&u.market) {
            // Not conflating, but never queue an older version behind a newer one.
            let idx = (seq - g.front_seq) as usize;
            if matches!(&g.queue[idx].update, Some((_, v)) if *v >= u.version) {
                return Pushed::Duplicate;
            }
        }
        let seq = g.front_seq + g.queue.len() as u64;
        g.bytes += u.bytes.len();
        self.budget.add(u.bytes.len());
        g.queue.push_back(Entry {
            item,
            at: now,
            update: Some((u.market.clone(), u.version)),
        });
        g.queued.insert(u.market.clone(), seq);
        drop(g);
        self.notify.notify_one();
        Pushed::Queued
    }

    /// Queues a control message (never conflated or dropped).
    pub fn push_message(&self, kind: &'static str, bytes: Bytes) {
        let mut g = self.lock();
        if g.closed {
            return;
        }
        if g.queue.is_empty() {
            g.last_progress = Instant::now();
        }
        g.bytes += bytes.len();
        self.budget.add(bytes.len());
        g.queue.push_back(Entry {
            item: Item::Message { kind, bytes },
            at: Instant::now(),
            update: None,
        });
        drop(g);
        self.notify.notify_one();
    }

    /// Forgets what was sent (after a `reset`, the client re-begins and may
    /// legitimately receive versions again).
    pub fn forget_sent(&self) {
        self.lock().sent.clear();
    }

    /// Whether the connection was told to close (nothing more is queued).
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Asks the connection to close; pending messages are discarded.
    pub fn close(&self, code: u16, reason: &'static str) {
        let mut g = self.lock();
        if g.closed {
            return;
        }
        g.closed = true;
        g.hold = None;
        g.queue.clear();
        self.budget.sub(g.bytes);
        g.bytes = 0;
        g.queued.clear();
        g.queue.push_back(Entry {
            item: Item::Close(code, reason),
            at: Instant::now(),
            update: None,
        });
        drop(g);
        self.notify.notify_one();
    }

    /// Takes the next item, if any.
    pub fn pop(&self) -> Option<Item> {
        let mut g = self.lock();
        let entry = g.queue.pop_front()?;
        g.bytes -= item_len(&entry.item);
        self.budget.sub(item_len(&entry.item));
        let seq = g.front_seq;
        g.front_seq += 1;
        g.last_progress = Instant::now();
        if let Some((m, v)) = &entry.update {
            if g.queued.get(m) == Some(&seq) {
                g.queued.remove(m);
            }
            let e = g.sent.entry(m.clone()).or_insert(0);
            *e = (*e).max(*v);
        }
        Some(entry.item)
    }

    /// Waits until something may be available.
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// Bytes waiting.
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn item_len(item: &Item) -> usize {
    match item {
        Item::Message { bytes, .. } => bytes.len(),
        Item::Close(..) => 0,
    }
}

#[cfg(test)]
#[path = "outbox_tests.rs"]
mod tests;
