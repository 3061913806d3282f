//! The consumer's partition life cycle besides batching: loading a newly
//! assigned partition's subscriptions (and announcing its watched markets),
//! marking it with the data epoch, and noticing and repairing a Redis that
//! lost its data (see [`crate::epoch`]). Runs on the consumer thread, inside
//! the rebalance callback or between polls.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use super::{Inner, ReducerContext};
use crate::core::{Effect, Event};
use crate::epoch::{self as epoch, Verdict};
use crate::store::EpochRead;
use crate::writer::RETRY_BACKOFF_MIN;

/// How long a new owner asks the group coordinator for a partition's
/// committed command offset when it finds the partition unmarked and empty
/// (to tell a new pipeline from a lost one); only on that rare path.
pub(super) const COMMITTED_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Most announces per pipeline when a partition is assigned: a partition may
/// hold 100 000s of watched markets, and one pipeline per chunk bounds the
/// reply buffers on both sides while still costing few round trips.
pub(super) const ASSIGN_ANNOUNCE_CHUNK: usize = 10_000;

impl Inner {
    /// Loads a newly assigned partition's subscriptions into the core and
    /// announces its watched markets; returns the markets loaded.
    pub(super) fn load_partition(&mut self, partition: i32) -> usize {
        let mut backoff = RETRY_BACKOFF_MIN;
        let mut attempts = 0;
        loop {
            let t = Instant::now();
            let loaded = self
                .loader
                .load_partition(partition)
                .and_then(|subscriptions| {
                    Ok((subscriptions, self.loader.load_queries(partition)?))
                });
            match loaded {
                Ok((subscriptions, (pairs, matches))) => {
                    self.metrics
                        .load_seconds
                        .with_label_values(&["ok"])
                        .observe(t.elapsed().as_secs_f64());
                    debug!(
                        partition,
                        markets = subscriptions.len(),
                        "subscriptions loaded"
                    );
                    self.health.set_redis(true, &self.metrics);
                    let loaded = subscriptions.len();
                    let mut announces = Vec::new();
                    self.core.apply(
                        Event::Assigned {
                            partition,
                            subscriptions,
                        },
                        &mut announces,
                    );
                    self.core.apply(
                        Event::QueriesLoaded {
                            partition,
                            pairs,
                            matches,
                        },
                        &mut announces,
                    );
                    self.announce(partition, &announces);
                    return loaded;
                }
                Err(e) => {
                    attempts += 1;
                    self.metrics.redis_errors.inc();
                    self.metrics
                        .load_seconds
                        .with_label_values(&["error"])
                        .observe(t.elapsed().as_secs_f64());
                    self.health.set_redis(false, &self.metrics);
                    warn!(partition, error = %e, attempts, "loading subscriptions failed; retrying");
                    if !self.backoff(&mut backoff, attempts) {
                        // Shutting down: own the partition with what we have
                        // (nothing), it is about to be revoked anyway.
                        self.core.apply(
                            Event::Assigned {
                                partition,
                                subscriptions: Vec::new(),
                            },
                            &mut Vec::new(),
                        );
                        return 0;
                    }
                }
            }
        }
    }

    /// Reads the epoch key (at once with `force`, else when the periodic
    /// check is due) and writes everything back if Redis lost its data. A
    /// Redis that does not answer is left to the next check.
    pub(super) fn check_epoch(&mut self, force: bool) {
        let now = Instant::now();
        if !force && !self.epoch.due(now) {
            return;
        }
        self.epoch.checked(now);
        match self.loader.read_epoch() {
            Ok(read) => self.on_epoch_read(&read),
            Err(e) => debug!(error = %e, "reading the data epoch failed; the next check retries"),
        }
    }

    /// Acts on a fresh read of the epoch key.
    pub(super) fn on_epoch_read(&mut self, read: &EpochRead) {
        match epoch::judge(self.epoch.known(), read) {
            Some(Verdict::Lost) => self.write_back(read),
            Some(Verdict::Adopt(id)) => self.epoch.set(id),
            Some(Verdict::Claim) => match self.loader.claim_epoch(epoch::replacing(None, read)) {
                Ok(id) => self.epoch.set(id),
                Err(e) => {
                    debug!(error = %e, "creating the data epoch failed; the next check retries")
                }
            },
            Some(Verdict::Same) | None => {}
        }
    }

    /// Redis lost its data: write back every owned partition's
    /// subscriptions from memory under a new epoch, retrying until Redis
    /// takes them (or shutdown cuts the retries short). Runs on the consumer
    /// thread, so no offset is stored and no partition released meanwhile.
    pub(super) fn write_back(&mut self, read: &EpochRead) {
        self.metrics.redis_data_loss.inc();
        error!(remembered = ?self.epoch.known(), found = ?read.id(),
            partitions = ?self.core.owned_partitions(),
            "redis lost its data (the pipeline's data epoch is gone or replaced): writing back the subscriptions of every owned partition");
        let t = Instant::now();
        let mut backoff = RETRY_BACKOFF_MIN;
        let mut attempts = 0;
        loop {
            let replacing = epoch::replacing(self.epoch.known(), read).map(str::to_owned);
            match epoch::write_back_all(
                &mut self.loader,
                &self.core,
                &self.metrics,
                replacing.as_deref(),
            ) {
                Ok(done) => {
                    info!(epoch = %done.epoch, partitions = done.partitions,
                        subscriptions = done.subscriptions, elapsed = ?t.elapsed(),
                        "subscriptions written back after the redis data loss");
                    self.epoch.written_back(done.epoch, self.ledger.next_seq());
                    return;
                }
                Err(e) => {
                    attempts += 1;
                    self.metrics.redis_errors.inc();
                    warn!(error = %e, attempts, "writing subscriptions back failed; retrying");
                    if !self.backoff(&mut backoff, attempts) {
                        return;
                    }
                }
            }
        }
    }

    /// Marks newly assigned partitions (`(partition, markets loaded)`) with
    /// the current epoch, and says so loudly for each that had no mark of
    /// this epoch, nothing to load, and whose commands the group had consumed
    /// before: Redis lost its subscriptions and its previous owner did not
    /// write them back (it died too). Channels streaming through a publisher
    /// re-subscribe when the publisher notices the loss; the others stay
    /// lost. One committed-offset lookup for all such partitions, only when
    /// there is one (a new pipeline's first assignment, or a loss).
    pub(super) fn mark_assigned(
        &mut self,
        consumer: &BaseConsumer<ReducerContext>,
        assigned: &[(i32, usize)],
    ) {
        let Some(epoch) = self.epoch.known().map(str::to_owned) else {
            return;
        };
        let mut suspect = Vec::new();
        for &(partition, loaded) in assigned {
            match self.loader.mark_partition(partition, &epoch) {
                Ok(prev) if prev.as_deref() != Some(epoch.as_str()) && loaded == 0 => {
                    suspect.push(partition)
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(partition, error = %e, "marking the partition with the data epoch failed")
                }
            }
        }
        if suspect.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for &p in &suspect {
            let _ = tpl.add_partition(&self.config.command_topic, p);
        }
        match consumer.committed_offsets(tpl, COMMITTED_LOOKUP_TIMEOUT) {
            Ok(c) => {
                for e in c.elements() {
                    if matches!(e.offset(), Offset::Offset(o) if o > 0) {
                        self.metrics.partitions_unrepaired.inc();
                        error!(partition = e.partition(), %epoch,
                            "partition assigned without its subscriptions: redis lost them and the previous owner did not write them back; channels with live streams re-subscribe through their publishers, the others are lost");
                    }
                }
            }
            Err(e) => {
                warn!(partitions = ?suspect, error = %e,
                    "partitions have no subscriptions and no mark of this epoch, and their committed offsets could not be read: new, or lost with redis");
            }
        }
    }

    /// Carries out the announces of a newly assigned partition, on the
    /// loader's connection and retrying like the load, so they are in Redis
    /// before the partition's first record is handed out (and so before any
    /// of its updates). They are not tied to any offset: an announce only
    /// republishes stored state, which is always safe to repeat.
    pub(super) fn announce(&mut self, partition: i32, effects: &[Effect]) {
        for chunk in effects.chunks(ASSIGN_ANNOUNCE_CHUNK) {
            let mut backoff = RETRY_BACKOFF_MIN;
            let mut attempts = 0;
            loop {
                match self.loader.execute(chunk) {
                    Ok(outcome) => {
                        self.metrics.publishes.inc_by(outcome.published);
                        break;
                    }
                    Err(e) => {
                        attempts += 1;
                        self.metrics.redis_errors.inc();
                        self.health.set_redis(false, &self.metrics);
                        warn!(partition, error = %e, attempts, "announcing watched markets failed; retrying");
                        if !self.backoff(&mut backoff, attempts) {
                            // Shutting down: the partition is about to go, and
                            // its next owner announces again.
                            return;
                        }
                    }
                }
            }
        }
        if !effects.is_empty() {
            debug!(
                partition,
                markets = effects.len(),
                "watched markets announced"
            );
        }
    }
}
