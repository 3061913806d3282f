//! The pod's bounded, conflating queue between Redis and the fan-out.
//!
//! The Redis reader parses each market update once and queues it here; the
//! dispatcher takes updates in arrival order and fans them out to the local
//! connections. While less than [`CONFLATE_AFTER_BYTES`] wait and the oldest
//! has waited less than [`CONFLATE_AFTER_LAG`], every version passes through,
//! so bursts reach clients intact. Past either the dispatcher is behind (a
//! hot market watched by many connections at a high rate): a
//! newer version of a market that is already queued replaces the queued one
//! in place (latest version wins, counted), and only markets not yet queued
//! are appended. So the queue never holds more than the threshold plus one
//! entry per subscribed market, whatever the offered load, and nothing
//! waits longer than one pass over the queue. Pure bookkeeping plus a
//! wake-up; no I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::outbox::Update;

/// Queued bytes from which updates of an already-queued market conflate:
/// several thousand updates, far more than a healthy pod ever has waiting,
/// so conflation means the pod is behind, not that a burst arrived.
pub const CONFLATE_AFTER_BYTES: usize = 1024 * 1024;

/// Wait of the oldest queued update from which updates of an already-queued
/// market conflate too. One hot market fanned out to 10 000 connections
/// queues only ~300 KB while the pod falls seconds behind (measured: 11 s
/// mean lag at 100 updates/s, never reaching the byte threshold); half a
/// second behind, the latest version is worth more than the ones between.
pub const CONFLATE_AFTER_LAG: Duration = Duration::from_millis(500);

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// Queued behind the others.
    Queued,
    /// Replaced a queued older version of the same market.
    Conflated,
    /// Not newer than the version already queued; dropped.
    Stale,
}

/// An update taken for dispatch.
#[derive(Debug, Clone)]
pub struct Taken {
    /// The update.
    pub update: Update,
    /// When its entry was queued (for a conflated entry: the first version's time).
    pub since: Instant,
    /// A history market's entry that replaced a queued version: its
    /// watchers here missed an event and must resume from the history.
    pub gap: bool,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Taken>,
    /// Sequence number of `queue[0]`.
    front_seq: u64,
    /// market → sequence number of its newest queued entry.
    newest: HashMap<Arc<str>, u64>,
    bytes: usize,
}

/// The queue; share it between the reader (producer) and the dispatcher.
#[derive(Debug)]
pub struct Ingest {
    state: Mutex<State>,
    notify: Notify,
    conflate_after: usize,
    conflate_after_lag: Duration,
}

impl Default for Ingest {
    fn default() -> Self {
        Self::with_threshold(CONFLATE_AFTER_BYTES)
    }
}

impl Ingest {
    /// A queue conflating past `conflate_after` bytes or [`CONFLATE_AFTER_LAG`].
    pub fn with_threshold(conflate_after: usize) -> Self {
        Self::with_thresholds(conflate_after, CONFLATE_AFTER_LAG)
    }

    /// A queue conflating past `conflate_after` bytes or once its oldest
    /// entry has waited `conflate_after_lag`.
    pub fn with_thresholds(conflate_after: usize, conflate_after_lag: Duration) -> Self {
        Ingest {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            conflate_after,
            conflate_after_lag,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an update of `market` (`history`: a history market, whose
    /// versions conflate only past the byte bound, and then mark a gap).
    pub fn push(
        &self,
        market: &str,
        version: u64,
        bytes: Bytes,
        history: bool,
        now: Instant,
    ) -> Ingested {
        let mut g = self.lock();
        let st = &mut *g;
        // Behind: too many bytes wait, or the oldest has waited too long
        // (lateness alone never drops a history market's event).
        let full = st.bytes >= self.conflate_after;
        let behind = full
            || (!history
                && st.queue.front().is_some_and(|f| {
                    now.saturating_duration_since(f.since) >= self.conflate_after_lag
                }));
        if let Some(&seq) = st.newest.get(market) {
            let idx = (seq - st.front_seq) as usize;
            let queued = &mut st.queue[idx];
            if queued.update.version >= version {
                return Ingested::Stale;
            }
            if behind {
                st.bytes = st.bytes - queued.update.bytes.len() + bytes.len();
                queued.update.version = version;
                queued.update.bytes = bytes;
                queued.gap |= history;
                return Ingested::Conflated;
            }
        }
        let key: Arc<str> = match st.newest.get_key_value(market) {
            Some((k, _)) => k.clone(),
            None => market.into(),
        };
        let seq = st.front_seq + st.queue.len() as u64;
        st.bytes += bytes.len();
        st.newest.insert(key.clone(), seq);
        st.queue.push_back(Taken {
            update: Update {
                market: key,
                version,
                bytes,
                history,
            },
            since: now,
            gap: false,
        });
        let was_empty = st.queue.len() == 1;
        drop(g);
        if was_empty {
            self.notify.notify_one();
        }
        Ingested::Queued
    }

    /// Takes up to `max` updates, oldest first.
    pub fn take(&self, max: usize) -> Vec<Taken> {
        let mut g = self.lock();
        let st = &mut *g;
        let n = max.min(st.queue.len());
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = st.queue.pop_front().expect("n <= len");
            let seq = st.front_seq;
            st.front_seq += 1;
            st.bytes -= t.update.bytes.len();
            if st.newest.get(&t.update.market) == Some(&seq) {
                st.newest.remove(&t.update.market);
            }
            out.push(t);
        }
        out
    }

    /// Waits until something may be waiting.
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// Updates waiting.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes waiting.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_owned())
    }

    #[test]
    fn a_burst_below_the_threshold_passes_every_version() {
        let q = Ingest::default();
        let now = Instant::now();
        for v in 1..=1000 {
            assert_eq!(q.push("a", v, b("x"), false, now), Ingested::Queued);
        }
        assert_eq!(q.push("a", 1000, b("x"), false, now), Ingested::Stale);
        let t = q.take(2000);
        assert_eq!(
            t.iter().map(|t| t.update.version).collect::<Vec<_>>(),
            (1..=1000).collect::<Vec<_>>()
        );
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn a_flood_is_bounded_by_the_threshold_plus_one_entry_per_market() {
        let q = Ingest::with_threshold(100);
        let now = Instant::now();
        let mut conflated = 0;
        for v in 1..=10_000u64 {
            for m in ["a", "b", "c"] {
                match q.push(m, v, b(&format!("{m}{v:05}")), false, now) {
                    Ingested::Conflated => conflated += 1,
                    Ingested::Queued => {}
                    Ingested::Stale => panic!("nothing stale was offered"),
                }
            }
        }
        assert!(conflated > 29_000, "{conflated}");
        assert!(q.bytes() <= 100 + 3 * 6, "{} bytes", q.bytes());
        assert!(q.len() <= 100 / 6 + 1 + 3, "{} entries", q.len());
        let t = q.take(usize::MAX);
        for m in ["a", "b", "c"] {
            let vs: Vec<u64> = t
                .iter()
                .filter(|t| &*t.update.market == m)
                .map(|t| t.update.version)
                .collect();
            assert!(vs.windows(2).all(|w| w[0] < w[1]), "{m}: {vs:?}");
            assert_eq!(vs.last(), Some(&10_000), "{m}: latest kept");
        }
        let last_a = t.iter().rev().find(|t| &*t.update.market == "a").unwrap();
        assert_eq!(&last_a.update.bytes[..], b"a10000");
    }

    #[test]
    fn a_history_market_conflates_only_past_the_bytes_and_then_marks_a_gap() {
        let q = Ingest::with_threshold(4);
        let t0 = Instant::now();
        let late = t0 + CONFLATE_AFTER_LAG * 2;
        assert_eq!(q.push("h", 1, b("1"), true, t0), Ingested::Queued);
        // Late, but few bytes: every event still queued.
        assert_eq!(q.push("h", 2, b("2"), true, late), Ingested::Queued);
        assert_eq!(q.push("h", 3, b("33"), true, late), Ingested::Queued);
        // Past the byte bound: conflated, and the entry carries the gap.
        assert_eq!(q.push("h", 4, b("4"), true, late), Ingested::Conflated);
        let taken = q.take(10);
        assert_eq!(
            taken
                .iter()
                .map(|t| (t.update.version, t.gap))
                .collect::<Vec<_>>(),
            [(1, false), (2, false), (4, true)]
        );
    }

    #[test]
    fn a_lagging_queue_conflates_however_few_bytes_wait() {
        let q = Ingest::with_thresholds(usize::MAX, Duration::from_millis(500));
        let t0 = Instant::now();
        // Young queue: every version passes.
        assert_eq!(q.push("hot", 1, b("1"), false, t0), Ingested::Queued);
        assert_eq!(
            q.push("hot", 2, b("2"), false, t0 + Duration::from_millis(499)),
            Ingested::Queued
        );
        // The oldest entry has waited 500 ms: the newest entry of the
        // market takes the new version in place.
        let late = t0 + Duration::from_millis(500);
        assert_eq!(q.push("hot", 3, b("3"), false, late), Ingested::Conflated);
        assert_eq!(q.push("hot", 4, b("4"), false, late), Ingested::Conflated);
        // A market not yet queued is still appended.
        assert_eq!(q.push("cold", 1, b("1"), false, late), Ingested::Queued);
        let t = q.take(10);
        assert_eq!(
            t.iter()
                .map(|t| (t.update.market.to_string(), t.update.version))
                .collect::<Vec<_>>(),
            vec![
                ("hot".to_string(), 1),
                ("hot".to_string(), 4),
                ("cold".to_string(), 1)
            ]
        );
        // Drained: a fresh queue passes every version again.
        assert_eq!(q.push("hot", 5, b("5"), false, late), Ingested::Queued);
        assert_eq!(q.push("hot", 6, b("6"), false, late), Ingested::Queued);
    }

    #[test]
    fn taking_part_of_the_queue_keeps_conflation_consistent() {
        let q = Ingest::with_threshold(0);
        let now = Instant::now();
        q.push("a", 1, b("1"), false, now);
        q.push("b", 1, b("1"), false, now);
        assert_eq!(q.take(1)[0].update.market.as_ref(), "a");
        // "a" is no longer queued: a new version is appended, "b" conflates.
        assert_eq!(q.push("a", 2, b("2"), false, now), Ingested::Queued);
        assert_eq!(q.push("b", 2, b("2"), false, now), Ingested::Conflated);
        let t = q.take(10);
        assert_eq!(
            t.iter()
                .map(|t| (t.update.market.to_string(), t.update.version))
                .collect::<Vec<_>>(),
            vec![("b".to_string(), 2), ("a".to_string(), 2)]
        );
    }
}
