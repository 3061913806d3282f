//! The command consumer: an assign-mode consumer that reads exactly the
//! command partitions whose data partitions the group gave this reducer
//! (the decisions are [`crate::mirror::Mirror`]'s), and the committing of
//! its offsets through the group member. Runs on the consumer thread,
//! inside the data consumer's rebalance callback or between polls.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use super::{Inner, ReducerContext};
use crate::error::Result;
use crate::metrics::Metrics;

/// How often stored command offsets are committed when they changed: the
/// data consumer's `auto.commit.interval.ms`, so both topics' committed
/// offsets (and the lag the operator and publishers read) move alike.
pub(super) const COMMAND_COMMIT_INTERVAL: Duration = Duration::from_secs(1);

/// Longest the data consumer's poll blocks while command partitions are
/// assigned: the two consumers are polled in turn on one thread, so this
/// bounds how long an idle pipeline leaves a command waiting (a few idle
/// wake-ups per second cost nothing measurable).
pub(super) const COMMAND_POLL_SLICE: Duration = Duration::from_millis(5);

/// Most command records taken per turn of the poll loop: commands queued in
/// a burst are taken in one turn, yet data records keep their turn.
pub(super) const COMMAND_BURST: usize = 500;

/// Empty polls in a row that end the command consumer's turn: a poll that
/// served an event other than a record (statistics, a queued log line)
/// returns nothing too, so one empty poll does not mean an empty queue; a
/// few cost microseconds.
pub(super) const COMMAND_EMPTY_POLLS: usize = 4;

/// Longest a newly assigned data partition waits for its command partition
/// to reach its end: a command backlog that takes longer (or a command
/// fetch that fails) must not stall the data; its commands still apply,
/// only after the data that followed them (an announce on subscribe
/// publishes what was missed).
pub(super) const COMMAND_CATCH_UP_MAX: Duration = Duration::from_secs(10);

/// Command offsets the broker acknowledged (highest per partition), written
/// by the data consumer's commit callback and read by the poll loop. Its
/// own lock, never held across a Kafka call, so a commit callback served
/// inside a synchronous commit cannot deadlock with [`Inner`]'s lock.
pub(super) type Acks = Arc<Mutex<BTreeMap<i32, i64>>>;

/// The per-partition lag gauges one consumer reports, so that each
/// consumer's statistics replace only its own topic's gauges.
#[derive(Default)]
pub(super) struct LagGauges {
    reported: Mutex<BTreeSet<(String, i32)>>,
}

impl LagGauges {
    /// Sets the lag gauges of `topic` from `statistics` (the stored-offset
    /// lag with `stored`, else the committed one) and removes those of
    /// partitions no longer in it.
    pub(super) fn report(
        &self,
        metrics: &Metrics,
        statistics: &Statistics,
        topic: &str,
        stored: bool,
    ) {
        let mut now = BTreeSet::new();
        if let Some(t) = statistics.topics.get(topic) {
            for (p, part) in &t.partitions {
                let lag = if stored {
                    part.consumer_lag_stored
                } else {
                    part.consumer_lag
                };
                if *p >= 0 && lag >= 0 {
                    metrics
                        .partition_lag
                        .with_label_values(&[topic, &p.to_string()])
                        .set(lag);
                    now.insert((topic.to_owned(), *p));
                }
            }
        }
        let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        for (t, p) in reported.difference(&now) {
            let _ = metrics
                .partition_lag
                .remove_label_values(&[t.as_str(), &p.to_string()]);
        }
        *reported = now;
    }
}

/// The command consumer's context: errors and lag statistics.
pub(super) struct CommandContext {
    pub(super) metrics: Arc<Metrics>,
    pub(super) topic: String,
    pub(super) lag: LagGauges,
}

impl ClientContext for CommandContext {
    fn stats(&self, statistics: Statistics) {
        // Nothing is committed by this consumer, so its lag is the stored one.
        self.lag
            .report(&self.metrics, &statistics, &self.topic, true);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka also reports each end-of-partition event here (it is
        // what `enable.partition.eof` asks for, and `commands_turn` acts on
        // it): it happens after every command burst, so it is no error.
        if is_partition_eof(&error) {
            return;
        }
        self.metrics.kafka_errors.inc();
        warn!(error = %error, reason, "kafka client error (command consumer)");
    }
}

/// Whether `error` is an end-of-partition event rather than a failure.
fn is_partition_eof(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
    )
}

impl ConsumerContext for CommandContext {}

/// The assign-mode command consumer.
pub(super) type CommandConsumer = BaseConsumer<CommandContext>;

impl Inner {
    /// The command consumer's turn in the poll loop: takes what it has,
    /// without waiting, into the batch. A poll that served another event
    /// (statistics, a log line) also returns nothing, so only
    /// [`COMMAND_EMPTY_POLLS`] empty polls in a row end the turn.
    pub(super) fn commands_turn(
        &mut self,
        commands: &CommandConsumer,
        consumer: &BaseConsumer<ReducerContext>,
    ) -> Result<()> {
        let mut empty = 0;
        for _ in 0..COMMAND_BURST {
            match commands.poll(Duration::ZERO) {
                Some(Ok(msg)) => {
                    empty = 0;
                    self.ingest(&msg);
                    if self.batch_full() {
                        self.submit(consumer)?;
                    }
                }
                // The end of a command partition: its data may flow.
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    empty = 0;
                    self.commands_caught_up(consumer, p);
                }
                Some(Err(e)) => {
                    self.metrics.kafka_errors.inc();
                    warn!(error = %e, "consume error (commands)");
                    break;
                }
                None => {
                    empty += 1;
                    if empty >= COMMAND_EMPTY_POLLS {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Command partition `partition` reached its end: if its data
    /// partition was waiting for it, the data flows now.
    fn commands_caught_up(&mut self, consumer: &BaseConsumer<ReducerContext>, partition: i32) {
        if let Some(waited) = self.mirror.caught_up(partition, Instant::now()) {
            info!(partition, ?waited, "commands caught up: data resumed");
            self.resume_data(consumer, &[partition]);
        }
    }

    /// Data partitions that waited [`COMMAND_CATCH_UP_MAX`] for their
    /// commands flow anyway.
    pub(super) fn resume_overdue(&mut self, consumer: &BaseConsumer<ReducerContext>) {
        if self.mirror.catching_up_none() {
            return;
        }
        let late = self.mirror.overdue(Instant::now(), COMMAND_CATCH_UP_MAX);
        if !late.is_empty() {
            warn!(partitions = ?late, limit = ?COMMAND_CATCH_UP_MAX,
                "commands did not catch up in time: data resumed, those commands apply after it");
            self.resume_data(consumer, &late);
        }
    }

    /// Pauses the newly assigned data partitions (among `data_partitions`)
    /// until their commands caught up. After the assignment (librdkafka
    /// keeps an application's pause of a partition across its fetch start).
    pub(super) fn pause_catching_up(
        &mut self,
        consumer: &BaseConsumer<ReducerContext>,
        data_partitions: &[i32],
    ) {
        let mut tpl = TopicPartitionList::new();
        for &p in data_partitions {
            if self.mirror.is_catching_up(p) {
                let _ = tpl.add_partition(&self.config.data_topic, p);
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = consumer.pause(&tpl) {
            // Then the data does not wait: commands may apply after it.
            self.metrics.kafka_errors.inc();
            warn!(error = %e, "pausing new partitions until their commands caught up failed");
        }
    }

    /// Resumes data partitions paused by [`Inner::pause_catching_up`]; a
    /// revoked one is resumed too, so no pause of ours outlives its
    /// ownership.
    pub(super) fn resume_data(
        &mut self,
        consumer: &BaseConsumer<ReducerContext>,
        data_partitions: &[i32],
    ) {
        let mut tpl = TopicPartitionList::new();
        for &p in data_partitions {
            let _ = tpl.add_partition(&self.config.data_topic, p);
        }
        if let Err(e) = consumer.resume(&tpl) {
            self.metrics.kafka_errors.inc();
            warn!(partitions = ?data_partitions, error = %e, "resuming data partitions failed");
        }
    }

    /// Data partitions were assigned (their subscriptions are loaded):
    /// starts reading their command partitions from the group's committed
    /// offsets (their data waits for them, see [`crate::mirror`]).
    pub(super) fn mirror_assigned(&mut self, data_partitions: &[i32]) {
        let add = self.mirror.assigned(data_partitions, Instant::now());
        if add.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for &p in &add {
            // Stored: the group's committed offset, else auto.offset.reset.
            if let Err(e) = tpl.add_partition_offset(&self.config.command_topic, p, Offset::Stored)
            {
                warn!(partition = p, error = %e, "could not build the command assignment");
            }
        }
        match self.commands.incremental_assign(&tpl) {
            Ok(()) => info!(partitions = ?add, "command partitions assigned"),
            // Cannot happen short of a librdkafka bug: say so loudly, the
            // partitions' commands would wait for the next rebalance.
            Err(e) => {
                self.metrics.kafka_errors.inc();
                tracing::error!(partitions = ?add, error = %e, "assigning command partitions failed")
            }
        }
    }

    /// Data partitions were revoked, after the revoke drained the batches
    /// and committed: stops reading their command partitions.
    pub(super) fn mirror_revoked(&mut self, data_partitions: &[i32]) {
        let remove = self.mirror.revoked(data_partitions);
        if remove.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for &p in &remove {
            let _ = tpl.add_partition(&self.config.command_topic, p);
        }
        match self.commands.incremental_unassign(&tpl) {
            Ok(()) => info!(partitions = ?remove, "command partitions unassigned"),
            Err(e) => {
                self.metrics.kafka_errors.inc();
                tracing::error!(partitions = ?remove, error = %e, "unassigning command partitions failed")
            }
        }
    }

    /// Redis has every command before these offsets: the mirror remembers
    /// them for the next commit, and the command consumer stores them for
    /// its lag statistics.
    pub(super) fn store_command_offsets(&mut self, offsets: &[(i32, i64)]) {
        let mut tpl = TopicPartitionList::new();
        for &(p, next) in offsets {
            self.mirror.stored(p, next);
            let _ = tpl.add_partition_offset(&self.config.command_topic, p, Offset::Offset(next));
        }
        if tpl.count() > 0 {
            if let Err(e) = self.commands.store_offsets(&tpl) {
                debug!(error = %e, "some command offsets were not stored");
            }
        }
    }

    /// Takes the acknowledged command commits into the mirror.
    pub(super) fn take_acks(&mut self) {
        let acks = std::mem::take(&mut *self.acks.lock().unwrap_or_else(|p| p.into_inner()));
        for (p, next) in acks {
            self.mirror.committed(p, next);
        }
    }

    /// Every [`COMMAND_COMMIT_INTERVAL`], commits the command offsets that
    /// changed, asynchronously through the group member (its commit
    /// callback records what the broker acknowledged; a refused commit is
    /// simply due again next time).
    pub(super) fn commit_commands_due(&mut self, consumer: &BaseConsumer<ReducerContext>) {
        if self.last_command_commit.elapsed() < COMMAND_COMMIT_INTERVAL {
            return;
        }
        self.last_command_commit = Instant::now();
        self.take_acks();
        let due = self.mirror.due();
        if due.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (p, next) in due {
            let _ = tpl.add_partition_offset(&self.config.command_topic, p, Offset::Offset(next));
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            debug!(error = %e, "command offsets not committed; retried next interval");
        }
    }
}

/// Records the command offsets in a successful commit of the data
/// consumer (periodic, on revoke or on shutdown) as acknowledged.
pub(super) fn record_acks(
    acks: &Acks,
    command_topic: &str,
    result: &rdkafka::error::KafkaResult<()>,
    offsets: &TopicPartitionList,
) {
    if result.is_err() {
        return;
    }
    let mut acks = acks.lock().unwrap_or_else(|p| p.into_inner());
    for e in offsets.elements_for_topic(command_topic) {
        if let (Offset::Offset(o), Ok(())) = (e.offset(), e.error()) {
            let a = acks.entry(e.partition()).or_insert(o);
            *a = (*a).max(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end of a command partition (reported through the client's error
    /// callback too) is neither counted nor logged as a Kafka error; a real
    /// error still is.
    #[test]
    fn end_of_partition_is_not_a_kafka_error() {
        let ctx = CommandContext {
            metrics: Arc::new(Metrics::new()),
            topic: "p.commands".into(),
            lag: LagGauges::default(),
        };
        ctx.error(
            KafkaError::Global(RDKafkaErrorCode::PartitionEOF),
            "Fetch from broker 1 reached end of partition at offset 3",
        );
        ctx.error(KafkaError::PartitionEOF(2), "end");
        assert_eq!(ctx.metrics.kafka_errors.get(), 0);
        ctx.error(
            KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
            "disconnected",
        );
        assert_eq!(ctx.metrics.kafka_errors.get(), 1);
    }
}
