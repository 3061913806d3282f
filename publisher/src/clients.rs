//! Per-client limits on every command path: a client is its token's
//! subject, or its IP address in anonymous mode (see [`crate::api::Caller`]).
//!
//! Token buckets for channel creation, market changes and begins (REST
//! `begin`, `?begin=1`, begin frames), and a cap on open streams, are kept
//! per pod: a client's requests spread over pods by the load balancer, so a
//! client gets at most pods × the rate, which bounds a flood without a
//! Redis round trip per command. The cap on channels per client is global
//! (a Redis set per client, checked and added in one script; see
//! [`crate::registry::Registry::claim_channel`]).
//!
//! Memory is bounded: at most [`MAX_TRACKED_CLIENTS`] clients are tracked;
//! clients whose buckets are full again and who hold no stream are
//! forgotten first, and when none can be, new clients share one overflow
//! entry (they are limited together rather than not at all).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::limits::{Bucket, Rate};

/// Channel creations per client: a page creates one per load (and one after
/// a 4404); 30 a minute is generous for people and useless for a script.
pub const CHANNEL_CREATES: Rate = Rate {
    per_second: 0.5,
    burst: 30.0,
};

/// Market changes per client, counted per market added or removed: a full
/// channel (500 markets) at once, then 50 a second.
pub const MARKET_CHANGES: Rate = Rate {
    per_second: 50.0,
    burst: 500.0,
};

/// Begins per client (each replays up to a channel's markets): one per
/// connection open and reset, a burst for a page with a few tabs.
pub const BEGINS: Rate = Rate {
    per_second: 5.0,
    burst: 20.0,
};

/// Streams one client may hold open on one pod: a few tabs per person.
pub const MAX_STREAMS_PER_CLIENT: usize = 20;

/// Channels one client may hold at once (all pods): one per open tab, with
/// room for tabs whose channels still wait for the idle TTL.
pub const MAX_CHANNELS_PER_CLIENT: usize = 50;

/// REST begins of one channel this close together make one replay (the
/// replay reaches every stream of the channel, so the second one is moot).
pub const BEGIN_COALESCE: Duration = Duration::from_millis(500);

/// Most clients tracked per pod (a few hundred bytes each).
pub const MAX_TRACKED_CLIENTS: usize = 100_000;

/// Most channels whose last REST begin is remembered per pod.
pub const MAX_COALESCED_CHANNELS: usize = 100_000;

/// The limits of one publisher (constants by default; tests lower or raise them).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientLimits {
    /// See [`CHANNEL_CREATES`].
    pub channel_creates: Rate,
    /// See [`MARKET_CHANGES`].
    pub market_changes: Rate,
    /// See [`BEGINS`].
    pub begins: Rate,
    /// See [`MAX_STREAMS_PER_CLIENT`].
    pub max_streams: usize,
    /// See [`MAX_CHANNELS_PER_CLIENT`].
    pub max_channels: usize,
}

impl ClientLimits {
    /// No effective limit (benchmarks: one load generator is one client).
    pub fn unlimited() -> Self {
        let lots = Rate {
            per_second: 1e9,
            burst: 1e9,
        };
        ClientLimits {
            channel_creates: lots,
            market_changes: lots,
            begins: lots,
            max_streams: usize::MAX,
            max_channels: 1 << 30,
        }
    }
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            channel_creates: CHANNEL_CREATES,
            market_changes: MARKET_CHANGES,
            begins: BEGINS,
            max_streams: MAX_STREAMS_PER_CLIENT,
            max_channels: MAX_CHANNELS_PER_CLIENT,
        }
    }
}

/// What a limited action is (the metric label is `limit_<kind>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `POST /v1/channels`.
    ChannelCreate,
    /// Markets added or removed.
    MarketChange,
    /// A begin of any form.
    Begin,
}

impl Kind {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::ChannelCreate => "limit_channel_creates",
            Kind::MarketChange => "limit_market_changes",
            Kind::Begin => "limit_begins",
        }
    }
}

struct State {
    creates: Bucket,
    markets: Bucket,
    begins: Bucket,
    streams: usize,
}

/// Key of the shared entry of clients beyond [`MAX_TRACKED_CLIENTS`].
const OVERFLOW: &str = "\u{0}overflow";

/// Per-client buckets and stream counts of one pod.
pub struct Clients {
    limits: ClientLimits,
    map: Mutex<HashMap<String, State>>,
    begun: Mutex<HashMap<String, Instant>>,
}

impl Clients {
    /// Empty, with these limits.
    pub fn new(limits: ClientLimits) -> Self {
        Clients {
            limits,
            map: Mutex::default(),
            begun: Mutex::default(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &ClientLimits {
        &self.limits
    }

    fn with<T>(&self, client: &str, f: impl FnOnce(&mut State, &ClientLimits, Instant) -> T) -> T {
        let now = Instant::now();
        let l = &self.limits;
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(client) && map.len() >= MAX_TRACKED_CLIENTS {
            map.retain(|_, s| {
                s.streams > 0
                    || !s.creates.is_full(l.channel_creates, now)
                    || !s.markets.is_full(l.market_changes, now)
                    || !s.begins.is_full(l.begins, now)
            });
        }
        let key = if map.contains_key(client) || map.len() < MAX_TRACKED_CLIENTS {
            client
        } else {
            OVERFLOW
        };
        let st = map.entry(key.to_owned()).or_insert_with(|| State {
            creates: Bucket::full(l.channel_creates, now),
            markets: Bucket::full(l.market_changes, now),
            begins: Bucket::full(l.begins, now),
            streams: 0,
        });
        f(st, l, now)
    }

    /// Takes `n` tokens of `kind` for `client`, or how long to wait.
    pub fn take(&self, client: &str, kind: Kind, n: usize) -> Result<(), Duration> {
        self.with(client, |s, l, now| match kind {
            Kind::ChannelCreate => s.creates.take(l.channel_creates, n as f64, now),
            Kind::MarketChange => s.markets.take(l.market_changes, n as f64, now),
            Kind::Begin => s.begins.take(l.begins, n as f64, now),
        })
    }

    /// Counts a stream of `client` if it is below its cap; the guard
    /// uncounts it.
    pub fn open_stream(self: &Arc<Self>, client: &str) -> Option<StreamSlot> {
        let ok = self.with(client, |s, l, _| {
            if s.streams >= l.max_streams {
                false
            } else {
                s.streams += 1;
                true
            }
        });
        ok.then(|| StreamSlot {
            clients: self.clone(),
            client: client.to_owned(),
        })
    }

    /// Whether a REST begin of `channel` should replay (false: one did
    /// within [`BEGIN_COALESCE`], which already reached every stream).
    pub fn begin_due(&self, channel: &str) -> bool {
        let now = Instant::now();
        let mut b = self.begun.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = b.get(channel) {
            if now.saturating_duration_since(*t) < BEGIN_COALESCE {
                return false;
            }
        }
        if b.len() >= MAX_COALESCED_CHANNELS {
            b.retain(|_, t| now.saturating_duration_since(*t) < BEGIN_COALESCE);
        }
        if b.len() < MAX_COALESCED_CHANNELS {
            b.insert(channel.to_owned(), now);
        }
        true
    }

    /// Open streams of `client` on this pod.
    pub fn streams(&self, client: &str) -> usize {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(client).map_or(0, |s| s.streams)
    }
}

/// A counted stream; dropping it uncounts it.
pub struct StreamSlot {
    clients: Arc<Clients>,
    client: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut map = self.clients.map.lock().unwrap_or_else(|p| p.into_inner());
        let key = if map.contains_key(&self.client) {
            self.client.as_str()
        } else {
            OVERFLOW
        };
        if let Some(s) = map.get_mut(key) {
            s.streams = s.streams.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_per_client_and_refill() {
        let c = Clients::new(ClientLimits {
            begins: Rate {
                per_second: 10.0,
                burst: 2.0,
            },
            ..Default::default()
        });
        assert!(c.take("a", Kind::Begin, 1).is_ok());
        assert!(c.take("a", Kind::Begin, 1).is_ok());
        let wait = c.take("a", Kind::Begin, 1).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert!(c.take("b", Kind::Begin, 1).is_ok());
        std::thread::sleep(Duration::from_millis(120));
        assert!(c.take("a", Kind::Begin, 1).is_ok());
    }

    #[test]
    fn streams_are_capped_and_released() {
        let c = Arc::new(Clients::new(ClientLimits {
            max_streams: 2,
            ..Default::default()
        }));
        let a = c.open_stream("x").unwrap();
        let _b = c.open_stream("x").unwrap();
        assert!(c.open_stream("x").is_none());
        assert!(c.open_stream("y").is_some());
        drop(a);
        assert_eq!(c.streams("x"), 1);
        assert!(c.open_stream("x").is_some());
    }

    #[test]
    fn rest_begins_of_a_channel_coalesce() {
        let c = Clients::new(ClientLimits::default());
        assert!(c.begin_due("ch"));
        assert!(!c.begin_due("ch"));
        assert!(c.begin_due("other"));
    }
}
