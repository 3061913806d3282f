//! Building the reducer (Redis connections, the writer and pinger, both
//! consumers, the topic layout check) and its poll loop: poll a record,
//! give the command consumer its turn, submit due batches, store what
//! Redis took, and on shutdown flush, commit and leave the group.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use streampipe_contract::Keys;
use tracing::{info, warn};

use super::commands::{Acks, CommandConsumer, CommandContext, LagGauges, COMMAND_POLL_SLICE};
use super::context::ReducerContext;
use super::{lock, Batch, Config, Inner, IDLE_POLL, IN_FLIGHT_POLL};
use crate::core::Core;
use crate::dead_letter::DeadLetters;
use crate::epoch::EpochWatch;
use crate::error::{Error, Result};
use crate::health::{Health, Pinger, REDIS_PING_TIMEOUT};
use crate::kafka;
use crate::metrics::Metrics;
use crate::mirror::Mirror;
use crate::offsets::Ledger;
use crate::store::{RedisStore, REDIS_TIMEOUT};
use crate::writer::{Writer, RETRY_BACKOFF_MIN};

/// Owns the consumer and runs the poll loop.
pub(super) struct Runner {
    consumer: BaseConsumer<ReducerContext>,
    /// The command consumer (also in [`Inner`], for the rebalance callback).
    commands: Arc<CommandConsumer>,
    /// Keeps readiness true to Redis while no data flows; stops with the runner.
    _pinger: Pinger,
    inner: Arc<Mutex<Inner>>,
    pub(super) health: Arc<Health>,
    shutdown: Arc<AtomicBool>,
}

impl Runner {
    pub(super) fn new(
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

    pub(super) fn run(self) -> Result<()> {
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
