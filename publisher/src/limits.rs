//! The control API's limits and its token bucket: every bound a client's
//! requests meet before any work is done, in one place.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Largest request body: 500 market ids of 128 bytes in JSON fit with room.
pub const MAX_BODY_BYTES: u64 = 96 * 1024;

/// Most markets one channel may watch: bounds a connection's outbox
/// (conflation keeps one entry per market) and the commands of one `begin`.
pub const MAX_MARKETS_PER_CHANNEL: usize = 500;

/// Most ids in one `GET /v1/markets?ids=` request.
pub const MAX_SNAPSHOT_IDS: usize = 500;

/// Most markets in one cacheable snapshot (`GET /v1/snapshot?markets=`):
/// a snapshot is a page's first paint, and each distinct set is a CDN cache
/// entry; a page with more markets asks for several snapshots.
pub const MAX_SNAPSHOT_MARKETS: usize = 100;

/// Most (market → queries) entries a query snapshot reads over all
/// partitions (`HGETALL` of the reducers' per-partition match hashes, which
/// hold every held query's matches): bounds the Redis work one uncached
/// query snapshot costs; beyond it the endpoint answers 429 and the stream's
/// `begin` remains the way to the state.
pub const MAX_QUERY_SNAPSHOT_SCAN: usize = 20_000;

/// Longest canonical snapshot query string: URLs beyond about 8 KiB are
/// refused by common proxies and CDNs (nginx's default request line buffer
/// is 8 KiB), and the browser adds its own path and origin.
pub const MAX_SNAPSHOT_QUERY_BYTES: usize = 4096;

/// Commands per second this pod may produce (burst: one second's worth):
/// protects Kafka and the reducers from a client creating channels in a loop.
pub const MAX_COMMANDS_PER_SECOND: f64 = 50_000.0;

/// A token bucket over commands.
pub struct RateLimiter {
    state: Mutex<Bucket>,
    rate: Rate,
}

impl RateLimiter {
    /// A bucket refilling at `rate` tokens per second, holding at most `rate`.
    pub fn new(rate: f64) -> Self {
        let rate = Rate {
            per_second: rate,
            burst: rate,
        };
        RateLimiter {
            state: Mutex::new(Bucket::full(rate, Instant::now())),
            rate,
        }
    }

    /// Takes `n` tokens if available.
    pub fn try_take(&self, n: usize) -> bool {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.take(self.rate, n as f64, Instant::now()).is_ok()
    }
}

/// A refill rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Most tokens held.
    pub burst: f64,
}

/// One token bucket (its rate is kept by the owner: many buckets share one).
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(rate: Rate, now: Instant) -> Self {
        Bucket {
            tokens: rate.burst,
            last: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * rate.per_second).min(rate.burst);
        self.last = now;
    }

    /// Takes `n` tokens, or tells how long until they are there (a request
    /// larger than the burst waits for a full bucket).
    pub fn take(&mut self, rate: Rate, n: f64, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        let n = n.min(rate.burst);
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            let missing = n - self.tokens;
            Err(Duration::from_secs_f64(
                missing / rate.per_second.max(f64::MIN_POSITIVE),
            ))
        }
    }

    /// Whether the bucket is full again (its client can be forgotten).
    pub fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + dt * rate.per_second >= rate.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limiter_refuses_beyond_the_burst() {
        let r = RateLimiter::new(100.0);
        assert!(r.try_take(60));
        assert!(r.try_take(40));
        assert!(!r.try_take(10));
    }
}
