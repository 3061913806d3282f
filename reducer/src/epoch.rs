//! Noticing a Redis that lost its data, and writing the reducer's part back.
//!
//! Redis holds the subscriptions (`m2c`, `c2m`, `p2m`) a new owner loads a
//! partition from. A Redis restarted empty (or flushed, or failed over to a
//! replica that had not caught up) would silently lose them: the current
//! owner still publishes from memory, but the next rebalance hands the
//! partition to a reducer that loads nothing, and every client of it stops
//! receiving updates. So every reducer remembers the pipeline's data epoch
//! (see [`streampipe_contract::epoch`]) and compares it with Redis: with
//! every batch (the batch's pipeline reads it before writing), every
//! [`EPOCH_CHECK_INTERVAL`] on a quiet reducer, and before it gives
//! partitions up or loads new ones. When the key is gone or holds another
//! id, the reducer writes back from memory every subscription of every
//! partition it owns and marks each partition with the new epoch *before*
//! it stores another offset or releases a partition; a new owner that finds
//! a partition without the current mark and with nothing to load, although
//! the group had consumed commands of it, says so loudly (its owner died
//! with the data: see docs/operations.md).
//!
//! This module holds the decision ([`judge`], [`EpochWatch`]) and the
//! write-back; the consumer calls them at the points above.

use std::time::{Duration, Instant};

use streampipe_contract::epoch::EPOCH_CHECK_INTERVAL;

use crate::core::Core;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::store::{EpochRead, RedisStore};

/// What a read of the epoch key means to a reducer that remembers `known`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing remembered and nothing in Redis: create it (a new pipeline,
    /// or a Redis emptied before we held anything, so nothing to write back).
    Claim,
    /// Nothing remembered yet: take this one.
    Adopt(String),
    /// As remembered: Redis has our data.
    Same,
    /// Gone or replaced since we saw it: Redis lost data.
    Lost,
}

/// Judges a read of the epoch key against the remembered id; `None` when
/// nothing was read.
pub fn judge(known: Option<&str>, read: &EpochRead) -> Option<Verdict> {
    Some(match (known, read) {
        (_, EpochRead::NotRead) => return None,
        (None, EpochRead::Missing | EpochRead::Damaged(_)) => Verdict::Claim,
        (None, EpochRead::Is(id)) => Verdict::Adopt(id.clone()),
        (Some(k), EpochRead::Is(id)) if k == id => Verdict::Same,
        (Some(_), _) => Verdict::Lost,
    })
}

/// The epoch a reducer remembers, and when it last looked.
#[derive(Debug)]
pub struct EpochWatch {
    known: Option<String>,
    last_check: Option<Instant>,
    /// Batches numbered below this were submitted before the last write-back:
    /// their reads of the epoch may predate it and are not judged.
    fresh_from_seq: u64,
    interval: Duration,
}

impl Default for EpochWatch {
    fn default() -> Self {
        EpochWatch {
            known: None,
            last_check: None,
            fresh_from_seq: 0,
            interval: EPOCH_CHECK_INTERVAL,
        }
    }
}

impl EpochWatch {
    /// The remembered epoch.
    pub fn known(&self) -> Option<&str> {
        self.known.as_deref()
    }

    /// Remembers `id` (adopted, claimed, or written back under).
    pub fn set(&mut self, id: String) {
        self.known = Some(id);
    }

    /// Whether a periodic check is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        self.last_check
            .is_none_or(|t| now.saturating_duration_since(t) >= self.interval)
    }

    /// Records that the key was just read.
    pub fn checked(&mut self, now: Instant) {
        self.last_check = Some(now);
    }

    /// Judges the epoch read by batch `seq`: `None` for batches submitted
    /// before the last write-back (their read may be older than it).
    pub fn judge_batch(&self, seq: u64, read: &EpochRead) -> Option<Verdict> {
        if seq < self.fresh_from_seq {
            return None;
        }
        judge(self.known(), read)
    }

    /// Records a write-back under `id`, done when batch `next_seq` was the
    /// next to be submitted.
    pub fn written_back(&mut self, id: String, next_seq: u64) {
        self.known = Some(id);
        self.fresh_from_seq = next_seq;
    }
}

/// What a write-back did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WrittenBack {
    /// The epoch now in Redis (ours, or the one another component created).
    pub epoch: String,
    /// Partitions written back and marked.
    pub partitions: u64,
    /// (market, channel) pairs written.
    pub subscriptions: u64,
}

/// The id a new epoch must replace after `read`: the damaged one (its key
/// still holds it, every peer still trusts it), else the one remembered
/// (gone, or already replaced by a peer, whose id then wins).
pub fn replacing<'a>(known: Option<&'a str>, read: &'a EpochRead) -> Option<&'a str> {
    match read {
        EpochRead::Damaged(id) => Some(id),
        _ => known,
    }
}

/// Re-creates the epoch key, replacing `replacing` (or adopts the one a
/// peer created first) and writes back every owned partition's
/// subscriptions and queries from `core`, marking each with the epoch. Idempotent: a
/// failure is retried whole.
pub fn write_back_all(
    store: &mut RedisStore,
    core: &Core,
    metrics: &Metrics,
    replacing: Option<&str>,
) -> Result<WrittenBack> {
    let epoch = store.claim_epoch(replacing)?;
    let mut done = WrittenBack {
        epoch,
        ..WrittenBack::default()
    };
    for p in core.owned_partitions() {
        // Queries first: the partition's mark (written last by
        // `write_back`) says the partition is complete.
        store.write_back_queries(p, &core.queries_of(p), &core.query_matches_of(p))?;
        let pairs = store.write_back(p, &core.subscriptions_of(p), &done.epoch)?;
        metrics.loss_partitions_repaired.inc();
        metrics.loss_subscriptions_repaired.inc_by(pairs);
        done.partitions += 1;
        done.subscriptions += pairs;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is(id: &str) -> EpochRead {
        EpochRead::Is(id.into())
    }

    #[test]
    fn verdicts() {
        assert_eq!(judge(None, &EpochRead::Missing), Some(Verdict::Claim));
        assert_eq!(judge(None, &is("a")), Some(Verdict::Adopt("a".into())));
        assert_eq!(judge(Some("a"), &is("a")), Some(Verdict::Same));
        assert_eq!(judge(Some("a"), &EpochRead::Missing), Some(Verdict::Lost));
        // A peer noticed first and created a new one: still our loss.
        assert_eq!(judge(Some("a"), &is("b")), Some(Verdict::Lost));
        assert_eq!(judge(Some("a"), &EpochRead::NotRead), None);
        // A cluster shard lost the markers: a loss even though the key
        // still holds our id; a newcomer claims a new one over it.
        let damaged = EpochRead::Damaged("a".into());
        assert_eq!(judge(Some("a"), &damaged), Some(Verdict::Lost));
        assert_eq!(judge(None, &damaged), Some(Verdict::Claim));
        assert_eq!(replacing(Some("a"), &damaged), Some("a"));
        assert_eq!(replacing(None, &damaged), Some("a"));
        assert_eq!(replacing(Some("a"), &EpochRead::Missing), Some("a"));
        assert_eq!(replacing(Some("a"), &is("b")), Some("a"));
    }

    /// A batch whose read predates our write-back saw the key missing; it
    /// must not start a second write-back (which would create yet another
    /// epoch and make every peer write back again).
    #[test]
    fn reads_older_than_a_write_back_are_not_judged() {
        let mut w = EpochWatch::default();
        w.set("a".into());
        assert_eq!(w.judge_batch(3, &EpochRead::Missing), Some(Verdict::Lost));
        w.written_back("b".into(), 5);
        assert_eq!(w.judge_batch(3, &EpochRead::Missing), None);
        assert_eq!(w.judge_batch(4, &is("a")), None);
        assert_eq!(w.judge_batch(5, &is("b")), Some(Verdict::Same));
        assert_eq!(w.judge_batch(6, &EpochRead::Missing), Some(Verdict::Lost));
    }

    #[test]
    fn periodic_checks_are_spaced() {
        let mut w = EpochWatch::default();
        let t = Instant::now();
        assert!(w.due(t), "the first check is due at once");
        w.checked(t);
        assert!(!w.due(t + EPOCH_CHECK_INTERVAL / 2));
        assert!(w.due(t + EPOCH_CHECK_INTERVAL));
    }
}
