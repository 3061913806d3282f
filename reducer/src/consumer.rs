//! The Kafka adapter: one consumer-group member driving the [`Core`].
//!
//! It follows rdkafka's `at_least_once` example, made batch-wise and explicit:
//! records are applied to the core as they arrive, their effects are batched
//! (at most [`Config::batch_max_records`] records or [`Config::batch_max_delay`]),
//! the batch goes to the Redis writer thread ([`crate::writer`]) as one
//! pipeline while polling goes on, and only when Redis accepted it are the
//! batch's offsets stored (`enable.auto.offset.store=false`); the
//! auto-committer then commits only stored offsets. A Redis outage therefore
//! stalls the consumer instead of committing past data Redis does not have.
//! Which offsets a finished batch may store, and what a revoke commits, is
//! decided by the pure, unit-tested [`crate::offsets::Ledger`].
//!
//! The group consumes the data topic with the incremental cooperative
//! protocol, so a rebalance revokes and assigns only the partitions that
//! move; a second, assign-mode consumer reads the command partitions that
//! mirror the owned data partitions (see [`crate::mirror`] for the why and
//! the hand-over order). The two are polled in turn on this thread.
//!
//! Around it: [`crate::config`] (settings), [`crate::kafka`] (librdkafka
//! configuration, topic checks), [`crate::dead_letter`] (the dead-letter
//! producer), `assign` (loading and marking assigned partitions, and the
//! write-back after a Redis data loss, see [`crate::epoch`]), `commands`
//! (the command consumer and the committing of its offsets), `context`
//! (the rebalance hooks), `ingest` (records into the batch, dead letters)
//! and `runner` (construction and the poll loop). This file keeps the
//! at-least-once path: submit a batch, take its completion, store and
//! commit only what Redis accepted.
//!
//! The consumer runs on its own thread with librdkafka's blocking poll, so
//! the rebalance callback (which librdkafka runs inside `poll`) can flush and
//! commit synchronously before partitions are taken away, and load a new
//! partition's subscriptions from Redis, and announce its watched markets,
//! before its first record is handed out.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, warn};

mod assign;
mod commands;
mod context;
mod ingest;
mod runner;

pub use crate::config::{Config, DEFAULT_BATCH_MAX_DELAY, DEFAULT_BATCH_MAX_RECORDS};
pub use crate::kafka::{FETCH_QUEUE_BACKOFF_MS, FETCH_WAIT_MAX_MS};

use crate::core::{Core, Effect, TopicKind};
use crate::dead_letter::{DeadLetter, DeadLetters};
use crate::epoch::{EpochWatch, Verdict};
use crate::error::{Error, Result};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::offsets::{Ledger, TopicPartition};
use crate::store::RedisStore;
use crate::writer::{Done, Job, Writer, RETRY_BACKOFF_MAX, SHUTDOWN_RETRIES};
use commands::{Acks, CommandConsumer};
use context::ReducerContext;
use runner::Runner;

/// How long `poll` blocks when no batch is pending: how quickly an idle
/// reducer notices shutdown.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// How long `poll` blocks while batches are in Redis: how late a completion
/// (and so the storing of its offsets) may be noticed.
const IN_FLIGHT_POLL: Duration = Duration::from_millis(2);

/// Timeout of the synchronous commit on revoke and shutdown.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A running reducer: its consumer thread and how to stop it.
pub struct ReducerHandle {
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
    /// Readiness and liveness.
    pub health: Arc<Health>,
}

impl ReducerHandle {
    /// Asks the reducer to stop: finish the batch, commit, leave the group.
    pub fn request_shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }

    /// Whether the consumer thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits for the consumer thread and returns how it ended.
    pub fn join(mut self) -> Result<()> {
        self.join_inner()
    }

    /// Requests shutdown and waits for it.
    pub fn shutdown(self) -> Result<()> {
        self.request_shutdown();
        self.join()
    }

    fn join_inner(&mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| Error::Thread("consumer thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for ReducerHandle {
    fn drop(&mut self) {
        self.request_shutdown();
        let _ = self.join_inner();
    }
}

/// Starts a reducer on its own thread. Fails fast on configuration and topic
/// layout errors; everything after start-up is retried, not fatal.
pub fn spawn(config: Config, metrics: Arc<Metrics>) -> Result<ReducerHandle> {
    if config.batch_max_records == 0 {
        return Err(Error::Config("batch_max_records must be at least 1".into()));
    }
    let shutdown = Arc::new(AtomicBool::new(false));
    let health = Arc::new(Health::default());
    let runner = Runner::new(config, metrics, shutdown.clone(), health.clone())?;
    health.alive.store(true, Ordering::SeqCst);
    let thread = std::thread::Builder::new()
        .name("reducer-consumer".into())
        .spawn(move || {
            let h = runner.health.clone();
            let res = runner.run();
            h.alive.store(false, Ordering::SeqCst);
            h.ready.store(false, Ordering::SeqCst);
            if let Err(e) = &res {
                error!(error = %e, "reducer stopped with an error");
            }
            res
        })
        .map_err(|e| Error::Thread(e.to_string()))?;
    Ok(ReducerHandle {
        shutdown,
        thread: Some(thread),
        health,
    })
}

/// Effects of records consumed but not yet submitted to Redis (their
/// offsets are in the [`Ledger`]).
#[derive(Default)]
struct Batch {
    effects: Vec<Effect>,
    dead_letters: Vec<DeadLetter>,
    /// Kafka timestamps of the data records, for the latency histogram.
    data_timestamps: Vec<i64>,
    records: usize,
    started: Option<Instant>,
}

/// A batch handed to the writer, waiting for its completion.
struct InFlight {
    seq: u64,
    dead_letters: Vec<DeadLetter>,
    records: usize,
}

/// State shared between the poll loop and the rebalance callback (which
/// librdkafka runs on the same thread, inside `poll`).
struct Inner {
    config: Config,
    core: Core,
    /// Connection for loading subscriptions on assignment.
    loader: RedisStore,
    writer: Writer,
    batch: Batch,
    in_flight: VecDeque<InFlight>,
    /// Which offsets may be stored and what a commit carries.
    ledger: Ledger,
    scratch: Vec<Effect>,
    dead_letters: Option<DeadLetters>,
    logged_reasons: HashSet<(TopicKind, &'static str)>,
    /// The data epoch this reducer saw (see [`crate::epoch`]).
    epoch: EpochWatch,
    /// The assign-mode consumer of the mirrored command partitions.
    commands: Arc<CommandConsumer>,
    /// Which command partitions are mirrored and what to commit of them.
    mirror: Mirror,
    /// Command commits the broker acknowledged (from the commit callback).
    acks: Acks,
    last_command_commit: Instant,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: Arc<AtomicBool>,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panic while holding the lock is a bug; the state is still the best we have.
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    fn topic_name(&self, t: TopicKind) -> &str {
        match t {
            TopicKind::Data => &self.config.data_topic,
            TopicKind::Command => &self.config.command_topic,
        }
    }

    /// Sets the gauges that mirror the core. Every read is O(1) (the core
    /// keeps counters), so this runs after every batch, not only on rebalances.
    fn update_gauges(&self) {
        self.metrics
            .owned_partitions
            .set(self.core.owned_partitions().len() as i64);
        self.metrics
            .subscriptions
            .set(self.core.subscription_count() as i64);
        self.metrics
            .watched_markets
            .set(self.core.watched_market_count() as i64);
        self.metrics
            .max_market_channels
            .set(self.core.max_market_channels() as i64);
        self.metrics
            .queries
            .set(self.core.query_pair_count() as i64);
        self.metrics
            .query_matched_markets
            .set(self.core.query_matched_count() as i64);
    }

    /// Sleeps for `backoff` and doubles it; false when shutdown cut the retries short.
    fn backoff(&self, backoff: &mut Duration, attempts: u32) -> bool {
        if self.shutdown.load(Ordering::SeqCst) && attempts >= SHUTDOWN_RETRIES {
            return false;
        }
        std::thread::sleep(*backoff);
        *backoff = (*backoff * 2).min(RETRY_BACKOFF_MAX);
        true
    }

    fn batch_full(&self) -> bool {
        self.batch.records >= self.config.batch_max_records
    }

    /// Time left before the pending batch must be flushed, if any is pending.
    fn batch_deadline(&self) -> Option<Duration> {
        self.batch
            .started
            .map(|s| self.config.batch_max_delay.saturating_sub(s.elapsed()))
    }

    /// Hands the pending batch to the Redis writer (blocking while
    /// [`crate::writer::MAX_BATCHES_IN_FLIGHT`] batches are outstanding).
    fn submit(&mut self, consumer: &BaseConsumer<ReducerContext>) -> Result<()> {
        if self.batch.records == 0 {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.metrics.batch_records.observe(batch.records as f64);
        let seq = self.ledger.seal();
        let job = Job {
            seq,
            effects: batch.effects,
            data_timestamps: batch.data_timestamps,
        };
        // Make room first: completions must be consumed for the writer to
        // accept more work.
        while self.in_flight.len() >= crate::writer::MAX_BATCHES_IN_FLIGHT {
            self.complete(consumer, Some(Duration::from_millis(100)))?;
        }
        self.writer.submit(job)?;
        self.in_flight.push_back(InFlight {
            seq,
            dead_letters: batch.dead_letters,
            records: batch.records,
        });
        // The core already holds the batch's subscription changes.
        self.update_gauges();
        Ok(())
    }

    /// Takes the completions that arrived (waiting up to `wait` for the
    /// first one): for each written batch, dead-letters its malformed
    /// records and then stores its offsets. Offsets are never stored for a
    /// batch Redis did not accept, nor for anything after it.
    fn complete(
        &mut self,
        consumer: &BaseConsumer<ReducerContext>,
        mut wait: Option<Duration>,
    ) -> Result<()> {
        while !self.in_flight.is_empty() {
            let Some(done) = self.writer.completion(wait)? else {
                return Ok(());
            };
            wait = None;
            let batch = self.in_flight.pop_front().expect("checked non-empty");
            match done {
                Done::Written { seq, outcome } => {
                    debug_assert_eq!(seq, batch.seq, "batches complete in order");
                    self.metrics.updates_applied.inc_by(outcome.applied);
                    self.metrics.updates_stale.inc_by(outcome.stale);
                    self.metrics.publishes.inc_by(outcome.published);
                    if outcome.history_appended + outcome.history_refused > 0 {
                        let h = &self.metrics.history;
                        h.with_label_values(&["appended"])
                            .inc_by(outcome.history_appended);
                        h.with_label_values(&["refused"])
                            .inc_by(outcome.history_refused);
                    }
                    let mut letters = batch.dead_letters;
                    for j in outcome.jumped {
                        letters.push(self.version_jump_letter(j));
                    }
                    self.send_dead_letters(letters);
                    // A batch that found Redis without our epoch went to a
                    // Redis that lost its data: write everything back before
                    // its offsets (or any later ones) are stored.
                    if self.epoch.judge_batch(seq, &outcome.epoch) == Some(Verdict::Lost) {
                        self.write_back(&outcome.epoch);
                    }
                    let storable = self.ledger.written(seq);
                    self.store_offsets(consumer, &storable);
                }
                Done::Failed { seq, error } => {
                    self.ledger.given_up(seq);
                    let lost: usize = self.in_flight.iter().map(|b| b.records).sum();
                    warn!(seq, %error, records = batch.records + lost,
                        "batch given up during shutdown; its records will be redelivered");
                    self.in_flight.clear();
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// Submits the pending batch and waits until every batch is written.
    fn drain(&mut self, consumer: &BaseConsumer<ReducerContext>) -> Result<()> {
        self.submit(consumer)?;
        while !self.in_flight.is_empty() {
            self.complete(consumer, Some(Duration::from_millis(100)))?;
        }
        self.update_gauges();
        Ok(())
    }

    fn store_offsets(
        &mut self,
        consumer: &BaseConsumer<ReducerContext>,
        offsets: &[(TopicPartition, i64)],
    ) {
        if offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        let mut command_offsets = Vec::new();
        for &((topic, partition), next) in offsets {
            if topic == TopicKind::Command {
                // Not the group member's partitions: committed by hand.
                command_offsets.push((partition, next));
                continue;
            }
            if let Err(e) =
                tpl.add_partition_offset(&self.config.data_topic, partition, Offset::Offset(next))
            {
                warn!(error = %e, "could not build offset list");
            }
        }
        self.store_command_offsets(&command_offsets);
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = consumer.store_offsets(&tpl) {
            // A partition revoked meanwhile refuses its offset; the new owner
            // redoes those records, which the version guard makes harmless.
            debug!(error = %e, "some offsets were not stored");
        }
    }

    /// Synchronously commits the offsets stored so far, of both topics (the
    /// command ones through the group member too, see [`crate::mirror`]).
    fn commit_stored(&mut self, consumer: &BaseConsumer<ReducerContext>) {
        let offsets = self.ledger.to_commit();
        if offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in offsets {
            let name = self.topic_name(topic).to_owned();
            let _ = tpl.add_partition_offset(&name, partition, Offset::Offset(next));
        }
        let t = Instant::now();
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => debug!(elapsed = ?t.elapsed(), "offsets committed"),
            Err(e) => warn!(error = %e, "synchronous commit failed; auto-commit will retry"),
        }
        if t.elapsed() > COMMIT_TIMEOUT {
            warn!(elapsed = ?t.elapsed(), "slow commit");
        }
    }
}
