//! The data epoch: how reducers and publishers notice a Redis that lost its
//! data (restarted empty, flushed, failed over to a replica that had not
//! caught up) instead of carrying on silently against it.
//!
//! Each pipeline keeps one key, [`crate::Keys::epoch`], holding a random id
//! created with `SET NX` by whichever component finds it missing. Every
//! reducer and publisher remembers the id it saw; when the key is gone or
//! holds another id, Redis lost data since, and each of them writes back
//! what it holds in memory (see docs/operations.md, "Redis data loss"). A
//! reducer also marks each partition it owns with the epoch its
//! subscriptions were last written in ([`crate::Keys::partition_epoch`]), so
//! a new owner can tell a repaired partition from one nobody repaired.

use std::time::Duration;

/// How often every reducer and publisher compares the epoch key with the one
/// it remembers: one `GET` per component per interval costs Redis nothing,
/// and it bounds how long a loss can go unnoticed on a quiet pipeline (a
/// reducer with data flowing checks it with every batch, a publisher after
/// every reconnect and whenever a channel it streams seems to have vanished).
pub const EPOCH_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// A fresh epoch id: unique per process and moment (time in nanoseconds,
/// process id and a per-process counter), which is all a comparison needs.
pub fn new_epoch_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{nanos:x}-{:x}-{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differ() {
        let a = new_epoch_id();
        let b = new_epoch_id();
        assert_ne!(a, b);
        assert!(a.len() < 64, "{a}");
    }
}
