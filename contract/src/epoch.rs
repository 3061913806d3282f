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
//!
//! On a Redis Cluster the epoch key lives on one shard, which may keep its
//! data while another loses it (both its master and replica restarted
//! empty, or a flush on one node). So an epoch minted in cluster mode
//! (marked by [`SPREAD_SUFFIX`]) also has [`crate::slot::SPREAD_TAGS`]
//! copies, [`crate::Keys::epoch_marker`], one every 256 slots: a shard that
//! lost them is [`Found::Damaged`], a loss like any other. A new epoch
//! always replaces the one it was found missing or damaged under
//! ([`EPOCH_CLAIM_SCRIPT`] compares and sets), so every component that remembers
//! the old id notices, even after the first one repaired the markers.

use std::time::Duration;

/// How often every reducer and publisher compares the epoch key with the one
/// it remembers: one `GET` per component per interval costs Redis nothing,
/// and it bounds how long a loss can go unnoticed on a quiet pipeline (a
/// reducer with data flowing checks it with every batch, a publisher after
/// every reconnect and whenever a channel it streams seems to have vanished).
pub const EPOCH_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Ends an epoch id that has cluster markers ([`crate::Keys::epoch_marker`]).
/// Ids without it (standalone Redis, or minted before markers existed) are
/// judged by the epoch key alone.
pub const SPREAD_SUFFIX: &str = "+spread";

/// Sets the epoch key to ARGV[1] if it is missing or still holds ARGV[2]
/// (the id the caller found missing or damaged; '' for none) and returns
/// what it holds afterwards: of two components repairing one loss, the
/// second adopts the first one's id instead of minting a third.
pub const EPOCH_CLAIM_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1])
  return ARGV[1]
end
return cur
"#;

/// What the epoch key and its markers held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The key is gone.
    Missing,
    /// The key holds this id (and, for a marked id, every marker agrees).
    Is(String),
    /// The key holds this marked id, but a marker is gone or differs: a
    /// cluster shard lost its data.
    Damaged(String),
}

impl Found {
    /// Judges a read of the epoch key and (cluster) its markers.
    pub fn from_reads(main: Option<String>, markers: &[Option<String>]) -> Found {
        match main {
            None => Found::Missing,
            Some(id)
                if id.ends_with(SPREAD_SUFFIX)
                    && markers.len() != crate::slot::SPREAD_TAGS.len() =>
            {
                // Markers expected but not read (a standalone reader of a
                // cluster's id cannot happen): judge by the key alone.
                Found::Is(id)
            }
            Some(id)
                if id.ends_with(SPREAD_SUFFIX)
                    && markers.iter().any(|m| m.as_deref() != Some(id.as_str())) =>
            {
                Found::Damaged(id)
            }
            Some(id) => Found::Is(id),
        }
    }

    /// The id the key holds, if any.
    pub fn id(&self) -> Option<&str> {
        match self {
            Found::Missing => None,
            Found::Is(id) | Found::Damaged(id) => Some(id),
        }
    }
}

/// A fresh epoch id for a cluster (`spread`: with markers) or a standalone Redis.
pub fn mint(spread: bool) -> String {
    let id = new_epoch_id();
    if spread {
        id + SPREAD_SUFFIX
    } else {
        id
    }
}

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
    fn markers_judge_only_marked_ids() {
        let n = crate::slot::SPREAD_TAGS.len();
        let id = mint(true);
        let all = vec![Some(id.clone()); n];
        assert_eq!(Found::from_reads(None, &all), Found::Missing);
        assert_eq!(
            Found::from_reads(Some(id.clone()), &all),
            Found::Is(id.clone())
        );
        let mut one_gone = all.clone();
        one_gone[17] = None;
        assert_eq!(
            Found::from_reads(Some(id.clone()), &one_gone),
            Found::Damaged(id.clone())
        );
        let mut one_other = all.clone();
        one_other[63] = Some("older".into());
        assert_eq!(
            Found::from_reads(Some(id.clone()), &one_other),
            Found::Damaged(id.clone())
        );
        // An unmarked id (standalone, or from before markers) ignores them.
        let plain = mint(false);
        assert_eq!(
            Found::from_reads(Some(plain.clone()), &vec![None; n]),
            Found::Is(plain)
        );
    }

    #[test]
    fn ids_differ() {
        let a = new_epoch_id();
        let b = new_epoch_id();
        assert_ne!(a, b);
        assert!(a.len() < 64, "{a}");
    }
}
