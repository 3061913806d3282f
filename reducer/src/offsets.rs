//! The at-least-once bookkeeping: which Kafka offsets may be stored, and
//! what a revoke or shutdown must commit. Pure: no Kafka, no Redis.
//!
//! The reducer's promise is that an offset is stored (and so, by the
//! auto-committer, committed) only once Redis holds everything its records
//! did, and every record before it. Records are applied as they arrive and
//! gathered into batches; a sealed batch goes to Redis while the next one
//! fills. So:
//! - a batch's offsets become storable when Redis accepted it **and** every
//!   batch sealed before it (a later batch written first waits: storing its
//!   offsets would commit past records Redis may not have);
//! - a batch given up (Redis refused it until shutdown) poisons itself and
//!   every later batch: none of their offsets is ever stored, so their
//!   records are redelivered to the next owner;
//! - a revoke commits exactly what was stored (the caller first drains the
//!   writer, so that is everything written) and forgets it.

use std::collections::{HashMap, VecDeque};

use crate::core::TopicKind;

/// A topic partition: which of the two topics, and the partition number.
pub type TopicPartition = (TopicKind, i32);

/// A batch sealed and handed to Redis, not yet storable.
#[derive(Debug)]
struct Sealed {
    seq: u64,
    /// Next offset to store per partition once the batch counts as written.
    next: HashMap<TopicPartition, i64>,
    /// Redis accepted it (it may still wait for an earlier batch).
    written: bool,
}

/// Offsets of records consumed, in flight and stored.
#[derive(Debug, Default)]
pub struct Ledger {
    /// The batch being filled: next offset per partition.
    pending: HashMap<TopicPartition, i64>,
    /// Sealed batches, oldest first.
    sealed: VecDeque<Sealed>,
    next_seq: u64,
    /// Offsets stored since the last commit of them (what a revoke commits).
    stored: HashMap<TopicPartition, i64>,
}

impl Ledger {
    /// A record at `offset` of `tp` joined the pending batch.
    pub fn record(&mut self, tp: TopicPartition, offset: i64) {
        let next = self.pending.entry(tp).or_insert(offset + 1);
        *next = (*next).max(offset + 1);
    }

    /// Seals the pending batch; returns its sequence number.
    pub fn seal(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.sealed.push_back(Sealed {
            seq,
            next: std::mem::take(&mut self.pending),
            written: false,
        });
        seq
    }

    /// The sequence number the next sealed batch will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Sealed batches not yet storable.
    pub fn in_flight(&self) -> usize {
        self.sealed.len()
    }

    /// Redis accepted batch `seq`. Returns the offsets that became storable
    /// (those of every batch written without an unwritten one before it), to
    /// be stored now; they are also remembered for the next commit. An
    /// unknown `seq` (given up, or already done) changes nothing.
    pub fn written(&mut self, seq: u64) -> Vec<(TopicPartition, i64)> {
        if let Some(b) = self.sealed.iter_mut().find(|b| b.seq == seq) {
            b.written = true;
        }
        let mut out: HashMap<TopicPartition, i64> = HashMap::new();
        while self.sealed.front().is_some_and(|b| b.written) {
            let b = self.sealed.pop_front().expect("checked");
            for (tp, next) in b.next {
                let o = out.entry(tp).or_insert(next);
                *o = (*o).max(next);
            }
        }
        for (&tp, &next) in &out {
            let s = self.stored.entry(tp).or_insert(next);
            *s = (*s).max(next);
        }
        let mut out: Vec<_> = out.into_iter().collect();
        out.sort_unstable_by_key(|&((t, p), _)| (t == TopicKind::Command, p));
        out
    }

    /// Batch `seq` was given up: it and every batch sealed after it are
    /// dropped, so none of their offsets is ever stored. Returns how many
    /// batches were dropped.
    pub fn given_up(&mut self, seq: u64) -> usize {
        let before = self.sealed.len();
        self.sealed.retain(|b| b.seq < seq);
        before - self.sealed.len()
    }

    /// What a commit must carry: every offset stored since the last
    /// [`Ledger::committed`].
    pub fn to_commit(&self) -> Vec<(TopicPartition, i64)> {
        let mut v: Vec<_> = self.stored.iter().map(|(&tp, &o)| (tp, o)).collect();
        v.sort_unstable_by_key(|&((t, p), _)| (t == TopicKind::Command, p));
        v
    }

    /// The partitions were revoked (after their commit): forget their stored
    /// offsets, and the pending and sealed batches' offsets of them (those
    /// records are redelivered to the next owner, whose version guard makes
    /// the repeat harmless).
    pub fn revoked(&mut self, partitions: &[i32]) {
        let gone = |tp: &TopicPartition| partitions.contains(&tp.1);
        self.stored.retain(|tp, _| !gone(tp));
        self.pending.retain(|tp, _| !gone(tp));
        for b in &mut self.sealed {
            b.next.retain(|tp, _| !gone(tp));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: TopicKind = TopicKind::Data;
    const C: TopicKind = TopicKind::Command;

    /// Batch 1 written before batch 0: nothing is storable until batch 0 is,
    /// then both at once (storing batch 1's offsets first would commit past
    /// batch 0's records, which Redis may never get).
    #[test]
    fn a_batch_written_out_of_order_waits_for_the_earlier_one() {
        let mut l = Ledger::default();
        l.record((D, 0), 10);
        l.record((D, 0), 11);
        let b0 = l.seal();
        l.record((D, 0), 12);
        l.record((C, 0), 3);
        let b1 = l.seal();
        assert_eq!(l.written(b1), vec![], "batch 0 is not written yet");
        assert!(l.to_commit().is_empty());
        assert_eq!(l.written(b0), vec![((D, 0), 13), ((C, 0), 4)]);
        assert_eq!(l.in_flight(), 0);
        assert_eq!(l.to_commit(), vec![((D, 0), 13), ((C, 0), 4)]);
    }

    /// Offsets are storable only after Redis accepted the batch: a sealed,
    /// unwritten batch contributes nothing; one given up never does, nor
    /// does any batch after it, even when Redis accepted that one.
    #[test]
    fn offsets_only_after_redis_accepted_and_never_past_a_batch_given_up() {
        let mut l = Ledger::default();
        l.record((D, 1), 5);
        let b0 = l.seal();
        assert!(l.to_commit().is_empty(), "sealed is not written");
        assert_eq!(l.written(b0), vec![((D, 1), 6)]);
        l.record((D, 1), 6);
        let b1 = l.seal();
        l.record((D, 1), 7);
        let b2 = l.seal();
        assert_eq!(l.given_up(b1), 2, "batch 1 and the later batch 2");
        assert_eq!(l.written(b2), vec![], "batch 2 came after one given up");
        assert_eq!(l.to_commit(), vec![((D, 1), 6)], "still batch 0's offset");
    }

    /// A revoke mid-batch: what was stored is committed (the caller commits
    /// `to_commit` first), then the revoked partitions' offsets are forgotten
    /// everywhere: a later completion of a batch holding their records must
    /// not store offsets for partitions this reducer no longer owns.
    #[test]
    fn a_revoke_mid_batch_commits_what_was_stored_and_forgets_the_rest() {
        let mut l = Ledger::default();
        l.record((D, 0), 1);
        l.record((D, 1), 1);
        let b0 = l.seal();
        l.written(b0);
        l.record((D, 0), 2);
        l.record((D, 1), 2);
        let b1 = l.seal(); // in flight during the revoke
        l.record((D, 1), 3); // pending during the revoke
        assert_eq!(l.to_commit(), vec![((D, 0), 2), ((D, 1), 2)]);
        l.revoked(&[1]);
        assert_eq!(l.to_commit(), vec![((D, 0), 2)]);
        assert_eq!(l.written(b1), vec![((D, 0), 3)], "nothing of partition 1");
        let b2 = l.seal();
        assert_eq!(
            l.written(b2),
            vec![],
            "the pending record of 1 is forgotten"
        );
    }

    #[test]
    fn the_highest_offset_wins_and_sequence_numbers_rise() {
        let mut l = Ledger::default();
        l.record((D, 0), 9);
        l.record((D, 0), 4); // a redelivery of an earlier record
        assert_eq!(l.next_seq(), 0);
        let b = l.seal();
        assert_eq!(l.next_seq(), 1);
        assert_eq!(l.written(b), vec![((D, 0), 10)]);
        assert_eq!(l.written(b), vec![], "a second completion changes nothing");
    }
}
