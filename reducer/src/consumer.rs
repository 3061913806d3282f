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
//! (the command consumer and the committing of its offsets).
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

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use streampipe_contract::Keys;
use tracing::{debug, error, info, warn};

mod assign;
mod commands;

pub use crate::config::{Config, DEFAULT_BATCH_MAX_DELAY, DEFAULT_BATCH_MAX_RECORDS};
pub use crate::kafka::{FETCH_QUEUE_BACKOFF_MS, FETCH_WAIT_MAX_MS};

use crate::core::{Core, Effect, Event, Record, TopicKind};
use crate::dead_letter::{DeadLetter, DeadLetters};
use crate::epoch::{EpochWatch, Verdict};
use crate::error::{Error, Result};
use crate::health::{Health, Pinger, REDIS_PING_TIMEOUT};
use crate::kafka::{self, partitions_of};
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::offsets::{Ledger, TopicPartition};
use crate::store::{RedisStore, REDIS_TIMEOUT};
use crate::writer::{Done, Job, Writer, RETRY_BACKOFF_MAX, RETRY_BACKOFF_MIN, SHUTDOWN_RETRIES};
use commands::{Acks, CommandConsumer, CommandContext, LagGauges, COMMAND_POLL_SLICE};

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

/// The consumer's context: rebalance hooks, commit results and statistics.
struct ReducerContext {
    inner: Arc<Mutex<Inner>>,
    metrics: Arc<Metrics>,
    data_topic: String,
    command_topic: String,
    acks: Acks,
    lag: LagGauges,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panic while holding the lock is a bug; the state is still the best we have.
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl ClientContext for ReducerContext {
    fn stats(&self, statistics: Statistics) {
        self.lag
            .report(&self.metrics, &statistics, &self.data_topic, false);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.metrics.kafka_errors.inc();
        warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for ReducerContext {
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        commands::record_acks(&self.acks, &self.command_topic, &result, offsets);
    }

    /// With the cooperative protocol `Revoke` and `Assign` carry only the
    /// partitions that move (with an eager assignor, all of them): the rest
    /// keep flowing through the rebalance.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut inner = lock(&self.inner);
        // librdkafka pauses every assigned partition until this callback
        // returns: keep it short, and say how long it took.
        let started = Instant::now();
        match rebalance {
            Rebalance::Revoke(tpl) => {
                self.metrics.rebalances.with_label_values(&["revoke"]).inc();
                let parts = partitions_of(tpl, &self.data_topic);
                info!(partitions = ?parts, "partitions revoked: flushing and committing");
                let revoked = parts.clone();
                if let Err(e) = inner.drain(consumer) {
                    warn!(error = %e, "flush before revoke failed; the batch will be redelivered to the next owner");
                }
                // The next owner loads these partitions from Redis: if it lost
                // its data, write them back before letting go.
                inner.check_epoch(true);
                inner.commit_stored(consumer);
                for p in parts {
                    inner
                        .core
                        .apply(Event::Revoked { partition: p }, &mut Vec::new());
                    let _ = self
                        .metrics
                        .partition_owned
                        .remove_label_values(&[&p.to_string()]);
                }
                inner.ledger.revoked(&revoked);
                // Committed, so the next owner (which gets them only in the
                // next rebalance round) reads on from here.
                inner.mirror_revoked(&revoked);
                inner.update_gauges();
                info!(partitions = ?revoked, elapsed = ?started.elapsed(), "revoke handled");
            }
            Rebalance::Assign(tpl) => {
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                let parts = partitions_of(tpl, &self.data_topic);
                info!(partitions = ?parts, "partitions assigned: loading subscriptions");
                // Partitions kept across the rebalance (all but the moved
                // ones with the cooperative protocol) are written back first
                // if Redis lost its data.
                inner.check_epoch(true);
                let loaded: Vec<(i32, usize)> = parts
                    .iter()
                    .map(|&p| (p, inner.load_partition(p)))
                    .collect();
                inner.mark_assigned(consumer, &loaded);
                for p in &parts {
                    self.metrics
                        .partition_owned
                        .with_label_values(&[&p.to_string()])
                        .set(1);
                }
                // Their commands only now: a subscribe applied before the
                // partition's subscriptions were loaded would be overwritten.
                inner.mirror_assigned(&parts);
                inner.update_gauges();
                info!(partitions = ?parts, elapsed = ?started.elapsed(), "assign handled");
            }
            Rebalance::Error(e) => {
                self.metrics.kafka_errors.inc();
                warn!(error = %e, "rebalance error");
            }
        }
    }

    /// After librdkafka applied the change: newly assigned data partitions
    /// wait (paused) until their command partitions reached their end, so
    /// commands already there apply before the data that follows them (see
    /// [`crate::mirror`]); revoked ones keep no pause of ours.
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut inner = lock(&self.inner);
        match rebalance {
            Rebalance::Assign(tpl) => {
                inner.pause_catching_up(consumer, &partitions_of(tpl, &self.data_topic))
            }
            Rebalance::Revoke(tpl) => {
                let parts = partitions_of(tpl, &self.data_topic);
                if !parts.is_empty() {
                    inner.resume_data(consumer, &parts);
                }
            }
            Rebalance::Error(_) => {}
        }
    }
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

    /// Applies one consumed record to the core and adds its effects to the batch.
    fn ingest(&mut self, msg: &BorrowedMessage<'_>) {
        let topic = if msg.topic() == self.config.data_topic {
            TopicKind::Data
        } else if msg.topic() == self.config.command_topic {
            TopicKind::Command
        } else {
            warn!(
                topic = msg.topic(),
                "record from an unexpected topic ignored"
            );
            return;
        };
        self.metrics
            .records
            .with_label_values(&[topic.as_str()])
            .inc();
        let timestamp = msg.timestamp().to_millis();
        let mut fx = std::mem::take(&mut self.scratch);
        self.core.apply(
            Event::Record(Record {
                topic,
                partition: msg.partition(),
                offset: msg.offset(),
                key: msg.key(),
                value: msg.payload(),
                timestamp,
            }),
            &mut fx,
        );
        for effect in fx.drain(..) {
            match effect {
                Effect::DeadLetter {
                    topic: t,
                    partition,
                    offset,
                    kind,
                    reason,
                } => {
                    self.metrics
                        .malformed
                        .with_label_values(&[t.as_str(), kind])
                        .inc();
                    // Log each kind of bad record once at warn level; a flood of
                    // the same mistake must not flood the logs.
                    if self.logged_reasons.insert((t, kind)) {
                        warn!(topic = t.as_str(), partition, offset, kind, %reason,
                            "malformed record skipped (further ones of this kind are logged at debug)");
                    } else {
                        debug!(topic = t.as_str(), partition, offset, kind, %reason, "malformed record skipped");
                    }
                    self.batch.dead_letters.push(DeadLetter {
                        topic: self.topic_name(t).to_owned(),
                        partition,
                        offset,
                        key: msg.key().map(<[u8]>::to_vec),
                        value: msg.payload().map(<[u8]>::to_vec),
                        reason,
                    });
                }
                Effect::Skipped(s) => {
                    self.metrics.skipped.with_label_values(&[s.as_str()]).inc();
                }
                e => {
                    match &e {
                        Effect::Subscribe { .. } => self
                            .metrics
                            .commands
                            .with_label_values(&["subscribe"])
                            .inc(),
                        Effect::Unsubscribe { .. } => self
                            .metrics
                            .commands
                            .with_label_values(&["unsubscribe"])
                            .inc(),
                        Effect::ResetMarket { market } => {
                            self.metrics
                                .commands
                                .with_label_values(&["reset_market"])
                                .inc();
                            warn!(%market, "operator reset: the market's stored state and version are deleted");
                        }
                        Effect::QueryHeld { held, .. } => self
                            .metrics
                            .commands
                            .with_label_values(&[if *held { "add_query" } else { "remove_query" }])
                            .inc(),
                        Effect::QueryMatch { joined, left, .. } => {
                            let c = &self.metrics.query_changes;
                            c.with_label_values(&["joined"]).inc_by(joined.len() as u64);
                            c.with_label_values(&["left"]).inc_by(left.len() as u64);
                        }
                        _ => {}
                    }
                    self.batch.effects.push(e);
                }
            }
        }
        self.scratch = fx;
        if topic == TopicKind::Data {
            if let Some(ts) = timestamp {
                self.batch.data_timestamps.push(ts);
            }
        }
        self.ledger.record((topic, msg.partition()), msg.offset());
        self.batch.records += 1;
        self.batch.started.get_or_insert_with(Instant::now);
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

    /// The dead letter of an update Redis refused as jumping too far ahead.
    /// Its value is the update as the reducer encoded it (the decision is
    /// made in Redis, after the record's bytes were released).
    fn version_jump_letter(&mut self, j: crate::store::Jumped) -> DeadLetter {
        let kind = "version_jump";
        self.metrics
            .malformed
            .with_label_values(&[TopicKind::Data.as_str(), kind])
            .inc();
        let reason = format!(
            "version {} is more than {} ahead of the stored version",
            j.version, self.config.max_version_jump
        );
        if self.logged_reasons.insert((TopicKind::Data, kind)) {
            warn!(market = %j.market, partition = j.partition, offset = j.offset, %reason,
                "record refused (further ones of this kind are logged at debug)");
        } else {
            debug!(market = %j.market, partition = j.partition, offset = j.offset, %reason, "record refused");
        }
        DeadLetter {
            topic: self.config.data_topic.clone(),
            partition: j.partition,
            offset: j.offset,
            key: Some(j.market.as_bytes().to_vec()),
            value: Some(j.message),
            reason,
        }
    }

    fn send_dead_letters(&mut self, letters: Vec<DeadLetter>) {
        if let Some(d) = &self.dead_letters {
            d.send(&letters);
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

/// Owns the consumer and runs the poll loop.
struct Runner {
    consumer: BaseConsumer<ReducerContext>,
    /// The command consumer (also in [`Inner`], for the rebalance callback).
    commands: Arc<CommandConsumer>,
    /// Keeps readiness true to Redis while no data flows; stops with the runner.
    _pinger: Pinger,
    inner: Arc<Mutex<Inner>>,
    health: Arc<Health>,
    shutdown: Arc<AtomicBool>,
}

impl Runner {
    fn new(
        config: Config,
        metrics: Arc<Metrics>,
        shutdown: Arc<AtomicBool>,
        health: Arc<Health>,
    ) -> Result<Self> {
        let keys = Keys::scoped(config.key_namespace.as_deref(), &config.pipeline);
        let tls = config
            .redis_tls
            .load(&config.redis_url)
            .map_err(|e| Error::Config(e.to_string()))?;
        let open = |keys: Keys, timeout| {
            RedisStore::open(
                &config.redis_url,
                config.redis_cluster,
                keys,
                tls.as_ref(),
                timeout,
            )
            .map(|s| {
                s.with_max_version_jump(config.max_version_jump)
                    .with_history(config.history.clone())
            })
        };
        let loader = open(keys.clone(), REDIS_TIMEOUT)?;
        let pinger = Pinger::start(
            open(keys.clone(), REDIS_PING_TIMEOUT)?,
            health.clone(),
            metrics.clone(),
            shutdown.clone(),
        )?;
        let writer = Writer::start(
            open(keys, REDIS_TIMEOUT)?,
            metrics.clone(),
            health.clone(),
            shutdown.clone(),
        )?;
        let cc = kafka::consumer_config(&config)?;
        let commands: Arc<CommandConsumer> = Arc::new(
            kafka::command_consumer_config(&config)?.create_with_context(CommandContext {
                metrics: metrics.clone(),
                topic: config.command_topic.clone(),
                lag: LagGauges::default(),
            })?,
        );
        let acks = Acks::default();
        let dead_letters = match &config.dead_letter_topic {
            Some(topic) => Some(DeadLetters::new(
                config.client_config()?,
                topic,
                metrics.clone(),
            )?),
            None => None,
        };

        // Partition counts decide market ownership, so check them before
        // joining the group. Wait a while: topics may be created just after us.
        let probe: BaseConsumer = config.client_config()?.create()?;
        let data_parts = kafka::wait_for_topic(&probe, &config.data_topic, &shutdown)?;
        let cmd_parts = kafka::wait_for_topic(&probe, &config.command_topic, &shutdown)?;
        if data_parts != cmd_parts {
            return Err(Error::Topics(format!(
                "data topic {:?} has {data_parts} partitions but command topic {:?} has {cmd_parts}; they must be equal so a market's commands reach the owner of its data",
                config.data_topic, config.command_topic
            )));
        }
        drop(probe);

        let core = Core::new(data_parts);
        let data_topic = config.data_topic.clone();
        let command_topic = config.command_topic.clone();
        let inner = Arc::new(Mutex::new(Inner {
            config,
            core,
            loader,
            writer,
            batch: Batch::default(),
            in_flight: VecDeque::new(),
            ledger: Ledger::default(),
            scratch: Vec::new(),
            dead_letters,
            logged_reasons: HashSet::new(),
            epoch: EpochWatch::default(),
            commands: commands.clone(),
            mirror: Mirror::default(),
            acks: acks.clone(),
            last_command_commit: Instant::now(),
            metrics: metrics.clone(),
            health: health.clone(),
            shutdown: shutdown.clone(),
        }));
        let consumer: BaseConsumer<ReducerContext> = cc.create_with_context(ReducerContext {
            inner: inner.clone(),
            metrics,
            data_topic: data_topic.clone(),
            command_topic: command_topic.clone(),
            acks,
            lag: LagGauges::default(),
        })?;
        // The data topic only: its partitions' commands are assigned to the
        // command consumer as the group assigns the data partitions.
        consumer.subscribe(&[&data_topic])?;
        info!(
            data_topic,
            command_topic,
            partitions = data_parts,
            "reducer subscribed"
        );
        Ok(Runner {
            consumer,
            commands,
            _pinger: pinger,
            inner,
            health,
            shutdown,
        })
    }

    fn run(self) -> Result<()> {
        // Readiness starts with a Redis round trip.
        {
            let mut inner = lock(&self.inner);
            let mut backoff = RETRY_BACKOFF_MIN;
            let mut attempts = 0;
            while let Err(e) = inner.loader.ping() {
                attempts += 1;
                inner.metrics.redis_errors.inc();
                warn!(error = %e, "redis not reachable yet");
                if !inner.backoff(&mut backoff, attempts) {
                    return Err(e);
                }
            }
            inner.health.set_redis(true, &inner.metrics);
            // Learn (or create) the data epoch before the first assignment.
            inner.check_epoch(true);
            inner.health.ready.store(true, Ordering::SeqCst);
        }
        while !self.shutdown.load(Ordering::SeqCst) {
            let timeout = {
                let inner = lock(&self.inner);
                let mut t = inner.batch_deadline().unwrap_or(IDLE_POLL);
                if !inner.in_flight.is_empty() {
                    t = t.min(IN_FLIGHT_POLL);
                }
                if !inner.mirror.is_empty() {
                    t = t.min(COMMAND_POLL_SLICE);
                }
                t
            };
            let polled = self.consumer.poll(timeout);
            let mut inner = lock(&self.inner);
            match polled {
                Some(Ok(msg)) => {
                    inner.ingest(&msg);
                    if inner.batch_full() {
                        inner.submit(&self.consumer)?;
                    }
                }
                Some(Err(e)) => {
                    inner.metrics.kafka_errors.inc();
                    warn!(error = %e, "consume error");
                }
                None => {}
            }
            inner.commands_turn(&self.commands, &self.consumer)?;
            inner.resume_overdue(&self.consumer);
            if inner.batch_deadline() == Some(Duration::ZERO) {
                inner.submit(&self.consumer)?;
            }
            inner.complete(&self.consumer, None)?;
            inner.commit_commands_due(&self.consumer);
            inner.check_epoch(false);
        }
        info!("shutting down: flushing the last batch and committing");
        {
            let mut inner = lock(&self.inner);
            let res = inner.drain(&self.consumer);
            inner.commit_stored(&self.consumer);
            if let Err(e) = res {
                warn!(error = %e, "last batch not written; it will be redelivered");
            }
        }
        self.health.ready.store(false, Ordering::SeqCst);
        self.consumer.unsubscribe();
        // Dropping the consumer closes it: it leaves the group at once, so the
        // survivors rebalance without waiting for the session timeout. The
        // command consumer goes after it (its revoke unassigns commands).
        drop(self.consumer);
        drop(self.commands);
        info!("reducer stopped");
        Ok(())
    }
}
