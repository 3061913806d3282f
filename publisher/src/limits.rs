//! The control API's limits and its token bucket: every bound a client's
//! requests meet before any work is done, in one place.

use std::sync::Mutex;
use std::time::Instant;

/// Largest request body: 500 market ids of 128 bytes in JSON fit with room.
pub const MAX_BODY_BYTES: u64 = 96 * 1024;

/// Most markets one channel may watch: bounds a connection's outbox
/// (conflation keeps one entry per market) and the commands of one `begin`.
pub const MAX_MARKETS_PER_CHANNEL: usize = 500;

/// Most ids in one `GET /v1/markets?ids=` request.
pub const MAX_SNAPSHOT_IDS: usize = 500;

/// Commands per second this pod may produce (burst: one second's worth):
/// protects Kafka and the reducers from a client creating channels in a loop.
pub const MAX_COMMANDS_PER_SECOND: f64 = 50_000.0;

/// A token bucket over commands.
pub struct RateLimiter {
    state: Mutex<(f64, Instant)>,
    rate: f64,
}

impl RateLimiter {
    /// A bucket refilling at `rate` tokens per second, holding at most `rate`.
    pub fn new(rate: f64) -> Self {
        RateLimiter {
            state: Mutex::new((rate, Instant::now())),
            rate,
        }
    }

    /// Takes `n` tokens if available.
    pub fn try_take(&self, n: usize) -> bool {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, last) = *g;
        let tokens = (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.rate);
        if tokens >= n as f64 {
            *g = (tokens - n as f64, now);
            true
        } else {
            *g = (tokens, now);
            false
        }
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
