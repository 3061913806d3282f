//! The pod's bounded, conflating queue between Redis and the fan-out.
//!
//! The Redis reader parses each market update once and parks it here; the
//! dispatcher takes markets in arrival order and fans them out to the local
//! connections. While the dispatcher keeps up, every version passes through.
//! When it does not (a hot market watched by many connections at a high
//! rate), a newer version of a market that is still waiting replaces the
//! waiting one: latest version wins, the replacement is counted, and the
//! queue never holds more than one entry per subscribed market. So no offered
//! load can grow it, and a waiting entry is never older than one dispatch
//! round. Pure bookkeeping plus a wake-up; no I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::outbox::Update;

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingested {
    /// Queued behind the others.
    Queued,
    /// Replaced a waiting older version of the same market.
    Conflated,
    /// Not newer than the version already waiting; dropped.
    Stale,
}

/// An update taken for dispatch.
#[derive(Debug, Clone)]
pub struct Taken {
    /// The update.
    pub update: Update,
    /// When its market entered the queue (the first, not the conflated, version).
    pub since: Instant,
}

#[derive(Debug)]
struct Slot {
    version: u64,
    bytes: Bytes,
    since: Instant,
}

#[derive(Debug, Default)]
struct State {
    pending: HashMap<Arc<str>, Slot>,
    order: VecDeque<Arc<str>>,
    bytes: usize,
}

/// The queue; share it between the reader (producer) and the dispatcher.
#[derive(Debug, Default)]
pub struct Ingest {
    state: Mutex<State>,
    notify: Notify,
}

impl Ingest {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parks an update of `market`.
    pub fn push(&self, market: &str, version: u64, bytes: Bytes, now: Instant) -> Ingested {
        let mut g = self.lock();
        let st = &mut *g;
        if let Some(slot) = st.pending.get_mut(market) {
            if slot.version >= version {
                return Ingested::Stale;
            }
            st.bytes = st.bytes - slot.bytes.len() + bytes.len();
            slot.version = version;
            slot.bytes = bytes;
            return Ingested::Conflated;
        }
        let key: Arc<str> = market.into();
        st.bytes += bytes.len();
        st.pending.insert(
            key.clone(),
            Slot {
                version,
                bytes,
                since: now,
            },
        );
        st.order.push_back(key);
        let was_empty = st.order.len() == 1;
        drop(g);
        if was_empty {
            self.notify.notify_one();
        }
        Ingested::Queued
    }

    /// Takes up to `max` markets' updates, oldest first.
    pub fn take(&self, max: usize) -> Vec<Taken> {
        let mut g = self.lock();
        let st = &mut *g;
        let n = max.min(st.order.len());
        let mut out = Vec::with_capacity(n);
        for market in st.order.drain(..n) {
            if let Some(slot) = st.pending.remove(&market) {
                st.bytes -= slot.bytes.len();
                out.push(Taken {
                    update: Update {
                        market,
                        version: slot.version,
                        bytes: slot.bytes,
                    },
                    since: slot.since,
                });
            }
        }
        out
    }

    /// Waits until something may be waiting.
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// Markets waiting.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes waiting.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Drops everything waiting (the connection that fed it was lost; the
    /// clients get a `reset` instead).
    pub fn clear(&self) {
        let mut g = self.lock();
        g.pending.clear();
        g.order.clear();
        g.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_owned())
    }

    #[test]
    fn every_version_passes_while_the_dispatcher_keeps_up() {
        let q = Ingest::default();
        let now = Instant::now();
        for v in 1..=100 {
            assert_eq!(q.push("a", v, b("x"), now), Ingested::Queued);
            let t = q.take(10);
            assert_eq!(t.len(), 1);
            assert_eq!(t[0].update.version, v);
        }
        assert!(q.is_empty());
    }

    #[test]
    fn a_flood_keeps_one_entry_per_market_latest_version_in_arrival_order() {
        let q = Ingest::default();
        let now = Instant::now();
        for v in 1..=10_000u64 {
            for m in ["a", "b", "c"] {
                let r = q.push(m, v, b(&format!("{m}{v}")), now);
                assert_eq!(
                    r,
                    if v == 1 {
                        Ingested::Queued
                    } else {
                        Ingested::Conflated
                    }
                );
            }
        }
        assert_eq!(q.len(), 3);
        assert_eq!(q.bytes(), 3 * "a10000".len());
        assert_eq!(q.push("b", 5, b("old"), now), Ingested::Stale);
        let t = q.take(2);
        assert_eq!(
            t.iter()
                .map(|t| (&*t.update.market, t.update.version))
                .collect::<Vec<_>>(),
            vec![("a", 10_000), ("b", 10_000)]
        );
        assert_eq!(&t[0].update.bytes[..], b"a10000");
        assert_eq!(q.take(10).len(), 1);
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn clear_forgets_everything() {
        let q = Ingest::default();
        q.push("a", 1, b("x"), Instant::now());
        q.clear();
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
        assert_eq!(q.push("a", 1, b("x"), Instant::now()), Ingested::Queued);
    }
}
