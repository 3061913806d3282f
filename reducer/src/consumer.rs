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
//!
//! The consumer runs on its own thread with librdkafka's blocking poll, so
//! the rebalance callback (which librdkafka runs inside `poll`) can flush and
//! commit synchronously before partitions are taken away, and load a new
//! partition's subscriptions from Redis, and announce its watched markets,
//! before its first record is handed out.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use streampipe_contract::deploy::{self, KafkaSecurity, RedisTls};
use streampipe_contract::Keys;
use tracing::{debug, error, info, warn};

use crate::core::{Core, Effect, Event, Record, TopicKind};
use crate::epoch::{self as epoch, EpochWatch, Verdict};
use crate::error::{Error, Result};
use crate::health::{Health, Pinger, REDIS_PING_TIMEOUT};
use crate::metrics::Metrics;
use crate::store::{EpochRead, RedisStore, REDIS_TIMEOUT};
use crate::writer::{Done, Job, Writer, RETRY_BACKOFF_MAX, RETRY_BACKOFF_MIN, SHUTDOWN_RETRIES};

/// Default most records per batch: large enough to amortise a Redis round
/// trip, small enough that one batch is a few milliseconds of work.
pub const DEFAULT_BATCH_MAX_RECORDS: usize = 1000;

/// Default longest time a record waits in a batch: bounds the latency the
/// batching adds when traffic is light.
pub const DEFAULT_BATCH_MAX_DELAY: Duration = Duration::from_millis(5);

/// How long `poll` blocks when no batch is pending: how quickly an idle
/// reducer notices shutdown.
const IDLE_POLL: Duration = Duration::from_millis(100);

/// How long `poll` blocks while batches are in Redis: how late a completion
/// (and so the storing of its offsets) may be noticed.
const IN_FLIGHT_POLL: Duration = Duration::from_millis(2);

/// librdkafka's `fetch.wait.max.ms` default for the reducer: how long a
/// broker may hold a fetch when no data is there. Real Kafka answers as soon
/// as data arrives, but some Kafka-protocol brokers (librdkafka's mock
/// cluster, tansu) wait the full time, which would add up to 500 ms (the
/// librdkafka default) of latency; 10 ms costs ~100 idle fetches/s per broker.
pub const FETCH_WAIT_MAX_MS: u32 = 10;

/// librdkafka's `fetch.queue.backoff.ms` for the reducer. When the local
/// queue (all partitions together) holds more than `queued.min.messages`,
/// librdkafka pauses fetching for this long; its 1000 ms default starves a
/// consumer that drains the queue in less time than that, which capped the
/// reducer at ~115k records/s on a backlog (see docs/benchmarks.md).
pub const FETCH_QUEUE_BACKOFF_MS: u32 = 10;

/// How long to wait for dead-letter records to be acknowledged by Kafka.
const DEAD_LETTER_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait for the topics to exist at start-up.
const METADATA_WAIT: Duration = Duration::from_secs(60);

/// Timeout of the synchronous commit on revoke and shutdown.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a new owner asks the group coordinator for a partition's
/// committed command offset when it finds the partition unmarked and empty
/// (to tell a new pipeline from a lost one); only on that rare path.
const COMMITTED_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Most announces per pipeline when a partition is assigned: a partition may
/// hold 100 000s of watched markets, and one pipeline per chunk bounds the
/// reply buffers on both sides while still costing few round trips.
const ASSIGN_ANNOUNCE_CHUNK: usize = 10_000;

/// Reducer settings (the binary fills them from flags and environment).
#[derive(Debug, Clone)]
pub struct Config {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// The partitioned data topic.
    pub data_topic: String,
    /// The co-partitioned command topic.
    pub command_topic: String,
    /// Where malformed records go; `None` only counts and skips them.
    pub dead_letter_topic: Option<String>,
    /// The consumer group all reducers of the pipeline share.
    pub group: String,
    /// Redis URL; with `redis_cluster`, a comma-separated seed list.
    pub redis_url: String,
    /// Whether `redis_url` names a Redis Cluster (keys routed by slot,
    /// `SPUBLISH`, `WAIT` for a replica after each batch).
    pub redis_cluster: bool,
    /// Pipeline name, the Redis key prefix.
    pub pipeline: String,
    /// Kubernetes namespace of the pipeline, part of the Redis key prefix.
    pub key_namespace: Option<String>,
    /// Most records per batch.
    pub batch_max_records: usize,
    /// Longest time a record waits in a batch.
    pub batch_max_delay: Duration,
    /// Consumer group session timeout.
    pub session_timeout: Duration,
    /// librdkafka statistics interval (per-partition lag metrics).
    pub statistics_interval: Duration,
    /// Extra librdkafka properties (tuning; the binary refuses security keys here).
    pub kafka_options: Vec<(String, String)>,
    /// Kafka TLS and SASL, each its own setting.
    pub kafka_security: KafkaSecurity,
    /// TLS files for a `rediss://` URL.
    pub redis_tls: RedisTls,
    /// Largest version jump over a market's stored version; a record
    /// further ahead is dead-lettered (`version_jump`).
    pub max_version_jump: u64,
}

impl Config {
    /// A configuration with the documented defaults.
    pub fn new(brokers: &str, pipeline: &str, redis_url: &str) -> Self {
        Config {
            brokers: brokers.into(),
            data_topic: deploy::default_data_topic(pipeline),
            command_topic: deploy::default_command_topic(pipeline),
            dead_letter_topic: Some(deploy::default_dead_letter_topic(pipeline)),
            group: deploy::default_group(pipeline),
            redis_url: redis_url.into(),
            redis_cluster: false,
            pipeline: pipeline.into(),
            key_namespace: None,
            batch_max_records: DEFAULT_BATCH_MAX_RECORDS,
            batch_max_delay: DEFAULT_BATCH_MAX_DELAY,
            session_timeout: Duration::from_secs(10),
            statistics_interval: Duration::from_secs(5),
            kafka_options: Vec::new(),
            kafka_security: KafkaSecurity::default(),
            redis_tls: RedisTls::default(),
            max_version_jump: crate::store::DEFAULT_MAX_VERSION_JUMP,
        }
    }

    /// The base client configuration: brokers, security, user options.
    fn client_config(&self) -> Result<ClientConfig> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        let security = self
            .kafka_security
            .properties()
            .map_err(|e| Error::Config(e.to_string()))?;
        for (k, v) in security {
            c.set(k, v);
        }
        for (k, v) in &self.kafka_options {
            deploy::check_kafka_option(k).map_err(|e| Error::Config(e.to_string()))?;
            c.set(k, v);
        }
        Ok(c)
    }
}

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

/// Counts dead-letter delivery failures.
struct DeadLetterContext {
    metrics: Arc<Metrics>,
}

impl ClientContext for DeadLetterContext {}

impl ProducerContext for DeadLetterContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.metrics.dead_letter_failures.inc();
            warn!(error = %e, "dead-letter record was not delivered");
        }
    }
}

/// A malformed record on its way to the dead-letter topic.
struct DeadLetter {
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    reason: String,
}

/// Effects and offsets of records consumed but not yet submitted to Redis.
#[derive(Default)]
struct Batch {
    effects: Vec<Effect>,
    /// Next offset to store per (topic, partition) once the batch is in Redis.
    next_offsets: HashMap<(TopicKind, i32), i64>,
    dead_letters: Vec<DeadLetter>,
    /// Kafka timestamps of the data records, for the latency histogram.
    data_timestamps: Vec<i64>,
    records: usize,
    started: Option<Instant>,
}

/// A batch handed to the writer, waiting for its completion.
struct InFlight {
    seq: u64,
    next_offsets: HashMap<(TopicKind, i32), i64>,
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
    next_seq: u64,
    scratch: Vec<Effect>,
    dead_letters: Option<ThreadedProducer<DeadLetterContext>>,
    /// Offsets stored after the last successful flush, to commit on revoke.
    stored: HashMap<(TopicKind, i32), i64>,
    logged_reasons: HashSet<(TopicKind, &'static str)>,
    /// The data epoch this reducer saw (see [`crate::epoch`]).
    epoch: EpochWatch,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: Arc<AtomicBool>,
}

/// The consumer's context: rebalance hooks and statistics.
struct ReducerContext {
    inner: Arc<Mutex<Inner>>,
    metrics: Arc<Metrics>,
    data_topic: String,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panic while holding the lock is a bug; the state is still the best we have.
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl ClientContext for ReducerContext {
    fn stats(&self, statistics: Statistics) {
        self.metrics.partition_lag.reset();
        for (topic, t) in &statistics.topics {
            for (p, part) in &t.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    self.metrics
                        .partition_lag
                        .with_label_values(&[topic.as_str(), &p.to_string()])
                        .set(part.consumer_lag);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.metrics.kafka_errors.inc();
        warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for ReducerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut inner = lock(&self.inner);
        match rebalance {
            Rebalance::Revoke(tpl) => {
                self.metrics.rebalances.with_label_values(&["revoke"]).inc();
                let parts = partitions_of(tpl, &self.data_topic);
                info!(partitions = ?parts, "partitions revoked: flushing and committing");
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
                }
                inner.stored.clear();
                inner.update_gauges();
            }
            Rebalance::Assign(tpl) => {
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                let parts = partitions_of(tpl, &self.data_topic);
                let cmd_parts = partitions_of(tpl, &inner.config.command_topic);
                if parts != cmd_parts {
                    error!(data = ?parts, commands = ?cmd_parts,
                        "data and command partitions are not co-located; is partition.assignment.strategy=range and are partition counts equal?");
                }
                info!(partitions = ?parts, "partitions assigned: loading subscriptions");
                // Partitions kept across the rebalance (none with the eager
                // protocol) are written back first if Redis lost its data.
                inner.check_epoch(true);
                for p in parts {
                    let loaded = inner.load_partition(p);
                    inner.mark_assigned(consumer, p, loaded);
                }
                inner.update_gauges();
            }
            Rebalance::Error(e) => {
                self.metrics.kafka_errors.inc();
                warn!(error = %e, "rebalance error");
            }
        }
    }
}

fn partitions_of(tpl: &TopicPartitionList, topic: &str) -> Vec<i32> {
    let mut v: Vec<i32> = tpl
        .elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect();
    v.sort_unstable();
    v
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

    /// Loads a newly assigned partition's subscriptions into the core and
    /// announces its watched markets; returns the markets loaded.
    fn load_partition(&mut self, partition: i32) -> usize {
        let mut backoff = RETRY_BACKOFF_MIN;
        let mut attempts = 0;
        loop {
            let t = Instant::now();
            match self.loader.load_partition(partition) {
                Ok(subscriptions) => {
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
    fn check_epoch(&mut self, force: bool) {
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
    fn on_epoch_read(&mut self, read: &EpochRead) {
        match epoch::judge(self.epoch.known(), read) {
            Some(Verdict::Lost) => self.write_back(read),
            Some(Verdict::Adopt(id)) => self.epoch.set(id),
            Some(Verdict::Claim) => match self
                .loader
                .claim_epoch(&streampipe_contract::epoch::new_epoch_id())
            {
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
    fn write_back(&mut self, read: &EpochRead) {
        self.metrics.redis_data_loss.inc();
        error!(remembered = ?self.epoch.known(), found = ?read.id(),
            partitions = ?self.core.owned_partitions(),
            "redis lost its data (the pipeline's data epoch is gone or replaced): writing back the subscriptions of every owned partition");
        let t = Instant::now();
        let mut backoff = RETRY_BACKOFF_MIN;
        let mut attempts = 0;
        loop {
            match epoch::write_back_all(&mut self.loader, &self.core, &self.metrics) {
                Ok(done) => {
                    info!(epoch = %done.epoch, partitions = done.partitions,
                        subscriptions = done.subscriptions, elapsed = ?t.elapsed(),
                        "subscriptions written back after the redis data loss");
                    self.epoch.written_back(done.epoch, self.next_seq);
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

    /// Marks a newly assigned partition with the current epoch, and says so
    /// loudly when it had no mark of this epoch, nothing to load, and the
    /// group had consumed its commands before: Redis lost the partition's
    /// subscriptions and its previous owner did not write them back (it died
    /// too). Channels streaming through a publisher re-subscribe when the
    /// publisher notices the loss; the others stay lost.
    fn mark_assigned(
        &mut self,
        consumer: &BaseConsumer<ReducerContext>,
        partition: i32,
        loaded: usize,
    ) {
        let Some(epoch) = self.epoch.known().map(str::to_owned) else {
            return;
        };
        let prev = match self.loader.mark_partition(partition, &epoch) {
            Ok(prev) => prev,
            Err(e) => {
                warn!(partition, error = %e, "marking the partition with the data epoch failed");
                return;
            }
        };
        if prev.as_deref() == Some(epoch.as_str()) || loaded > 0 {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        let _ = tpl.add_partition(&self.config.command_topic, partition);
        match consumer.committed_offsets(tpl, COMMITTED_LOOKUP_TIMEOUT) {
            Ok(c) => {
                let consumed = c
                    .elements()
                    .iter()
                    .any(|e| matches!(e.offset(), Offset::Offset(o) if o > 0));
                if consumed {
                    self.metrics.partitions_unrepaired.inc();
                    error!(partition, previous_mark = ?prev, %epoch,
                        "partition assigned without its subscriptions: redis lost them and the previous owner did not write them back; channels with live streams re-subscribe through their publishers, the others are lost");
                }
            }
            Err(e) => {
                warn!(partition, error = %e,
                    "partition has no subscriptions and no mark of this epoch, and its committed offset could not be read: new, or lost with redis");
            }
        }
    }

    /// Carries out the announces of a newly assigned partition, on the
    /// loader's connection and retrying like the load, so they are in Redis
    /// before the partition's first record is handed out (and so before any
    /// of its updates). They are not tied to any offset: an announce only
    /// republishes stored state, which is always safe to repeat.
    fn announce(&mut self, partition: i32, effects: &[Effect]) {
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
        self.batch
            .next_offsets
            .insert((topic, msg.partition()), msg.offset() + 1);
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
        let seq = self.next_seq;
        self.next_seq += 1;
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
            next_offsets: batch.next_offsets,
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
                    self.store_offsets(consumer, &batch.next_offsets);
                }
                Done::Failed { seq, error } => {
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
        offsets: &HashMap<(TopicKind, i32), i64>,
    ) {
        let mut tpl = TopicPartitionList::new();
        for (&(topic, partition), &next) in offsets {
            let name = self.topic_name(topic).to_owned();
            if let Err(e) = tpl.add_partition_offset(&name, partition, Offset::Offset(next)) {
                warn!(error = %e, "could not build offset list");
            }
            self.stored.insert((topic, partition), next);
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
        if letters.is_empty() {
            return;
        }
        let Some(producer) = &self.dead_letters else {
            return;
        };
        let dlq = self
            .config
            .dead_letter_topic
            .clone()
            .expect("producer exists only with a topic");
        for l in &letters {
            let partition = l.partition.to_string();
            let offset = l.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "streampipe.source.topic",
                    value: Some(l.topic.as_str()),
                })
                .insert(Header {
                    key: "streampipe.source.partition",
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: "streampipe.source.offset",
                    value: Some(offset.as_str()),
                })
                .insert(Header {
                    key: "streampipe.error",
                    value: Some(l.reason.as_str()),
                });
            let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&dlq).headers(headers);
            if let Some(k) = &l.key {
                record = record.key(k.as_slice());
            }
            if let Some(v) = &l.value {
                record = record.payload(v.as_slice());
            }
            match producer.send(record) {
                Ok(()) => self.metrics.dead_lettered.inc(),
                Err((e, _)) => {
                    self.metrics.dead_letter_failures.inc();
                    warn!(error = %e, "could not queue dead-letter record");
                }
            }
        }
        // Wait for the broker's acknowledgement so a dead letter is not lost
        // when we then store the offset past its record.
        if let Err(e) = producer.flush(DEAD_LETTER_FLUSH_TIMEOUT) {
            self.metrics.dead_letter_failures.inc();
            warn!(error = %e, "dead-letter flush timed out");
        }
    }

    /// Synchronously commits the offsets stored so far.
    fn commit_stored(&mut self, consumer: &BaseConsumer<ReducerContext>) {
        if self.stored.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (&(topic, partition), &next) in &self.stored {
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
            .map(|s| s.with_max_version_jump(config.max_version_jump))
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
        let session_ms = config.session_timeout.as_millis().max(1000) as u64;
        let mut cc = config.client_config()?;
        cc.set("group.id", &config.group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Range co-locates equal partition numbers of the two topics.
            .set("partition.assignment.strategy", "range")
            .set("session.timeout.ms", session_ms.to_string())
            .set("heartbeat.interval.ms", (session_ms / 3).to_string())
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS.to_string())
            .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS.to_string())
            .set(
                "statistics.interval.ms",
                config.statistics_interval.as_millis().to_string(),
            )
            .set("client.id", "streampipe-reducer");
        // User options win, including over the settings above.
        for (k, v) in &config.kafka_options {
            cc.set(k, v);
        }

        let dead_letters = match &config.dead_letter_topic {
            Some(_) => {
                let mut pc = config.client_config()?;
                pc.set("enable.idempotence", "true")
                    .set("partitioner", "murmur2_random")
                    .set("client.id", "streampipe-reducer-dlq");
                Some(pc.create_with_context(DeadLetterContext {
                    metrics: metrics.clone(),
                })?)
            }
            None => None,
        };

        // Partition counts decide market ownership, so check them before
        // joining the group. Wait a while: topics may be created just after us.
        let probe: BaseConsumer = config.client_config()?.create()?;
        let data_parts = wait_for_topic(&probe, &config.data_topic, &shutdown)?;
        let cmd_parts = wait_for_topic(&probe, &config.command_topic, &shutdown)?;
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
            next_seq: 0,
            scratch: Vec::new(),
            dead_letters,
            stored: HashMap::new(),
            logged_reasons: HashSet::new(),
            epoch: EpochWatch::default(),
            metrics: metrics.clone(),
            health: health.clone(),
            shutdown: shutdown.clone(),
        }));
        let consumer: BaseConsumer<ReducerContext> = cc.create_with_context(ReducerContext {
            inner: inner.clone(),
            metrics,
            data_topic: data_topic.clone(),
        })?;
        consumer.subscribe(&[&data_topic, &command_topic])?;
        info!(
            data_topic,
            command_topic,
            partitions = data_parts,
            "reducer subscribed"
        );
        Ok(Runner {
            consumer,
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
                let t = inner.batch_deadline().unwrap_or(IDLE_POLL);
                if inner.in_flight.is_empty() {
                    t
                } else {
                    t.min(IN_FLIGHT_POLL)
                }
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
            if inner.batch_deadline() == Some(Duration::ZERO) {
                inner.submit(&self.consumer)?;
            }
            inner.complete(&self.consumer, None)?;
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
        // survivors rebalance without waiting for the session timeout.
        drop(self.consumer);
        info!("reducer stopped");
        Ok(())
    }
}

fn wait_for_topic(probe: &BaseConsumer, topic: &str, shutdown: &AtomicBool) -> Result<u32> {
    let deadline = Instant::now() + METADATA_WAIT;
    loop {
        let res = probe.fetch_metadata(Some(topic), Duration::from_secs(5));
        let err = match res {
            Ok(md) => match md.topics().first() {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                    return Ok(t.partitions().len() as u32)
                }
                Some(t) => format!("topic {topic:?} not available: {:?}", t.error()),
                None => format!("topic {topic:?} not in metadata"),
            },
            Err(e) => format!("metadata for {topic:?}: {e}"),
        };
        if Instant::now() > deadline || shutdown.load(Ordering::SeqCst) {
            return Err(Error::Topics(err));
        }
        warn!(%err, "waiting for topic");
        std::thread::sleep(Duration::from_secs(1));
    }
}
