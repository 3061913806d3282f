//! The command-partition mirror: which command partitions this reducer
//! reads, and which of their offsets still need committing. Pure: no Kafka.
//!
//! Co-partitioning says a market's commands are applied by the reducer that
//! owns its data. The data topic is consumed by the consumer group with the
//! incremental cooperative protocol (`cooperative-sticky`): a rebalance
//! revokes and assigns only the partitions that move, so the others keep
//! flowing. The command topic is **not** subscribed: a second consumer
//! reads exactly the command partitions whose data partitions the group gave
//! us, in assign mode. So for each data partition `p`:
//! - on assign (after `p`'s subscriptions are loaded from Redis), command
//!   partition `p` is assigned from the group's committed offset, and data
//!   partition `p` is paused until the command consumer reached the end of
//!   command partition `p` (its end-of-partition event), so the commands
//!   that were already there apply before the data that follows them. The
//!   two consumers fetch independently, and the command consumer starts
//!   later (it looks its committed offset up only when assigned): without
//!   the pause a new owner applied a backlog of updates, published none of
//!   a market whose subscribe it had not read yet, and a stopped owner
//!   could leave having applied the data but not the commands before it;
//! - on revoke, the batches are drained into Redis, the stored offsets of
//!   both topics are committed, and only then is command partition `p`
//!   unassigned, all inside the revoke callback. The cooperative protocol
//!   hands `p` to its new owner only in the next rebalance round, which
//!   starts after that callback returned, so the new owner resumes exactly
//!   where the old one stopped.
//!
//! The command consumer belongs to no group, so its offsets are committed
//! through the group member (a member with a valid generation may commit
//! any partition's offset): the group keeps one committed offset per
//! partition of both topics, and the lag readers (operator autoscaling, the
//! publisher's command shedding) see the same group as before. The data
//! consumer's auto-committer commits only its own (data) partitions, so the
//! command offsets are committed here: periodically (see [`Mirror::due`])
//! and synchronously on revoke and shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// Command partitions owned and their offsets: stored (Redis has every
/// record before them) and committed (the broker acknowledged them); and
/// the data partitions waiting for their commands to catch up.
#[derive(Debug, Default)]
pub struct Mirror {
    owned: BTreeSet<i32>,
    stored: BTreeMap<i32, i64>,
    committed: BTreeMap<i32, i64>,
    /// Data partitions paused until their command partition reached its
    /// end, and since when.
    catching_up: BTreeMap<i32, Instant>,
}

impl Mirror {
    /// Data partitions were assigned at `now`: returns the command
    /// partitions to add (those not already mirrored), sorted; their data
    /// partitions wait for them ([`Mirror::is_catching_up`]) until
    /// [`Mirror::caught_up`]. A repeated assign (the eager protocol
    /// re-assigns everything) adds nothing twice.
    pub fn assigned(&mut self, data_partitions: &[i32], now: Instant) -> Vec<i32> {
        let mut add: Vec<i32> = data_partitions
            .iter()
            .copied()
            .filter(|p| self.owned.insert(*p))
            .collect();
        add.sort_unstable();
        add.dedup();
        for &p in &add {
            self.catching_up.insert(p, now);
        }
        add
    }

    /// Whether no data partition waits for its commands.
    pub fn catching_up_none(&self) -> bool {
        self.catching_up.is_empty()
    }

    /// Whether data partition `partition` waits for its commands.
    pub fn is_catching_up(&self, partition: i32) -> bool {
        self.catching_up.contains_key(&partition)
    }

    /// Command partition `partition` reached its end: returns how long its
    /// data partition waited, if it was waiting (then it may flow now).
    pub fn caught_up(&mut self, partition: i32, now: Instant) -> Option<Duration> {
        self.catching_up
            .remove(&partition)
            .map(|since| now.saturating_duration_since(since))
    }

    /// The data partitions that have waited `limit` or longer, sorted: they
    /// stop waiting (their commands still apply, only later than the data).
    pub fn overdue(&mut self, now: Instant, limit: Duration) -> Vec<i32> {
        let late: Vec<i32> = self
            .catching_up
            .iter()
            .filter(|(_, since)| now.saturating_duration_since(**since) >= limit)
            .map(|(&p, _)| p)
            .collect();
        for p in &late {
            self.catching_up.remove(p);
        }
        late
    }

    /// Data partitions were revoked (after the revoke's commit): returns the
    /// command partitions to remove, sorted, and forgets their offsets.
    pub fn revoked(&mut self, data_partitions: &[i32]) -> Vec<i32> {
        let mut remove: Vec<i32> = data_partitions
            .iter()
            .copied()
            .filter(|p| self.owned.remove(p))
            .collect();
        remove.sort_unstable();
        remove.dedup();
        for p in &remove {
            self.stored.remove(p);
            self.committed.remove(p);
            self.catching_up.remove(p);
        }
        remove
    }

    /// Whether no command partition is mirrored.
    pub fn is_empty(&self) -> bool {
        self.owned.is_empty()
    }

    /// The command partitions mirrored now, sorted.
    pub fn owned(&self) -> Vec<i32> {
        self.owned.iter().copied().collect()
    }

    /// Redis has every command of `partition` before `next`. Offsets of a
    /// partition no longer owned (a batch completing after its revoke) are
    /// ignored: committing them is the new owner's business.
    pub fn stored(&mut self, partition: i32, next: i64) {
        if self.owned.contains(&partition) {
            let s = self.stored.entry(partition).or_insert(next);
            *s = (*s).max(next);
        }
    }

    /// Offsets stored beyond what the broker acknowledged: what the next
    /// periodic commit carries (empty when nothing changed).
    pub fn due(&self) -> Vec<(i32, i64)> {
        self.stored
            .iter()
            .filter(|(p, s)| self.committed.get(p).is_none_or(|c| c < s))
            .map(|(&p, &s)| (p, s))
            .collect()
    }

    /// The broker acknowledged committing `next` for `partition`.
    pub fn committed(&mut self, partition: i32, next: i64) {
        if self.owned.contains(&partition) {
            let c = self.committed.entry(partition).or_insert(next);
            *c = (*c).max(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cooperative rebalances carry only the moved partitions; the mirror
    /// adds and removes exactly those, and an eager re-assignment of
    /// everything adds nothing already there.
    #[test]
    fn assign_and_revoke_mirror_only_the_moved_partitions() {
        let mut m = Mirror::default();
        let now = Instant::now();
        assert_eq!(m.assigned(&[3, 0, 1], now), vec![0, 1, 3]);
        assert_eq!(m.assigned(&[1, 2], now), vec![2], "1 is already mirrored");
        assert_eq!(m.revoked(&[1, 5]), vec![1], "5 was never ours");
        assert_eq!(m.owned(), vec![0, 2, 3]);
        // Eager: revoke all, assign all.
        assert_eq!(m.revoked(&[0, 2, 3]), vec![0, 2, 3]);
        assert_eq!(m.assigned(&[0, 1, 2, 3], now), vec![0, 1, 2, 3]);
    }

    /// A newly mirrored partition's data waits until its commands reached
    /// their end (or for the limit at most); a partition already mirrored
    /// does not wait again, and a revoked one stops waiting.
    #[test]
    fn new_partitions_wait_for_their_commands_to_catch_up() {
        let mut m = Mirror::default();
        let t0 = Instant::now();
        m.assigned(&[0, 1, 2], t0);
        assert!(m.is_catching_up(0) && m.is_catching_up(1) && m.is_catching_up(2));
        let t1 = t0 + Duration::from_millis(40);
        assert_eq!(m.caught_up(1, t1), Some(Duration::from_millis(40)));
        assert!(!m.is_catching_up(1));
        assert_eq!(
            m.caught_up(1, t1),
            None,
            "an end reached again changes nothing"
        );
        m.assigned(&[0, 1], t1);
        assert!(!m.is_catching_up(1), "still mirrored: no second wait");
        m.revoked(&[2]);
        assert!(!m.is_catching_up(2));
        let limit = Duration::from_secs(10);
        assert!(m.overdue(t0 + Duration::from_secs(9), limit).is_empty());
        assert_eq!(m.overdue(t0 + limit, limit), vec![0]);
        assert!(!m.is_catching_up(0));
        // Assigned again after a revoke: it waits again.
        m.revoked(&[1]);
        m.assigned(&[1], t1);
        assert!(m.is_catching_up(1));
    }

    /// Only offsets Redis has are stored; the periodic commit carries those
    /// not yet acknowledged, and nothing once they are.
    #[test]
    fn due_is_what_was_stored_and_not_yet_acknowledged() {
        let mut m = Mirror::default();
        m.assigned(&[0, 1], Instant::now());
        assert!(m.due().is_empty());
        m.stored(0, 10);
        m.stored(1, 4);
        m.stored(0, 8); // an older completion never moves it back
        assert_eq!(m.due(), vec![(0, 10), (1, 4)]);
        m.committed(0, 10);
        assert_eq!(m.due(), vec![(1, 4)]);
        m.committed(1, 3); // an older commit's acknowledgement
        assert_eq!(m.due(), vec![(1, 4)]);
        m.committed(1, 4);
        assert!(m.due().is_empty());
        m.stored(1, 6);
        assert_eq!(m.due(), vec![(1, 6)]);
    }

    /// A revoked partition's offsets are forgotten, and a batch of it that
    /// completes after the revoke stores nothing: its commands are the new
    /// owner's, from the offset the revoke committed.
    #[test]
    fn a_revoked_partition_stores_and_commits_nothing_more() {
        let mut m = Mirror::default();
        m.assigned(&[2], Instant::now());
        m.stored(2, 7);
        assert_eq!(m.revoked(&[2]), vec![2]);
        m.stored(2, 9);
        m.committed(2, 9);
        assert!(m.due().is_empty());
        assert!(m.owned().is_empty());
        // Assigned again later: it starts clean.
        m.assigned(&[2], Instant::now());
        assert!(m.due().is_empty());
    }
}
