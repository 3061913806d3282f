//! The Redis writer thread: executes batches in order while the consumer
//! thread already polls and applies the next one.
//!
//! Without it the consumer would sit idle during every Redis round trip (a
//! 1000-record batch costs Redis a few milliseconds). Batches are queued on a
//! bounded channel, so at most [`MAX_BATCHES_IN_FLIGHT`] are outstanding and a
//! slow Redis pushes back on Kafka consumption instead of growing a queue.
//! Batches complete strictly in submission order; the consumer stores a
//! batch's offsets only when its completion arrives.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::core::Effect;
use crate::error::{Error, Result};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::store::{Outcome, RedisStore};

/// Batches submitted but not completed, at most: one executing in Redis and
/// one being prepared is enough to keep both sides busy; more would only add
/// memory and latency.
pub const MAX_BATCHES_IN_FLIGHT: usize = 2;

/// First and largest pause between Redis retries: retry fast after a blip,
/// but do not hammer a Redis that is down.
pub const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// See [`RETRY_BACKOFF_MIN`].
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Failed attempts a batch gets once shutdown was requested, before it is
/// given up (its records are then redelivered to the next owner).
pub const SHUTDOWN_RETRIES: u32 = 3;

/// Shortest time between two warnings about unreplicated batches: a dead
/// replica makes every batch on its master unreplicated, and one line a
/// minute (plus the metric) says so without flooding the log.
pub const UNREPLICATED_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// One batch for Redis.
pub struct Job {
    /// Submission sequence number.
    pub seq: u64,
    /// The effects, in order.
    pub effects: Vec<Effect>,
    /// Kafka timestamps (ms) of the batch's data records, for the latency histogram.
    pub data_timestamps: Vec<i64>,
}

/// How a batch ended.
pub enum Done {
    /// Redis has the whole batch.
    Written {
        /// The batch's sequence number.
        seq: u64,
        /// What it did.
        outcome: Outcome,
    },
    /// Given up (only during shutdown); nothing after it is written either.
    Failed {
        /// The batch's sequence number.
        seq: u64,
        /// The last error.
        error: Error,
    },
}

/// Handle to the writer thread.
pub struct Writer {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the writer thread on its own Redis connection.
    pub fn start(
        mut store: RedisStore,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        shutdown: Arc<AtomicBool>,
    ) -> Result<Self> {
        // One job may wait in the channel while another executes.
        let (jobs_tx, jobs_rx) = sync_channel::<Job>(MAX_BATCHES_IN_FLIGHT - 1);
        // Completions never exceed the jobs in flight, so this never blocks.
        let (done_tx, done_rx) = sync_channel::<Done>(MAX_BATCHES_IN_FLIGHT);
        let thread = std::thread::Builder::new()
            .name("reducer-redis".into())
            .spawn(move || {
                let mut poisoned = false;
                let mut last_unreplicated_log: Option<Instant> = None;
                for job in jobs_rx {
                    let done = if poisoned {
                        Done::Failed {
                            seq: job.seq,
                            error: Error::Thread("an earlier batch was given up".into()),
                        }
                    } else {
                        execute(&mut store, job, &metrics, &health, &shutdown)
                    };
                    if let Done::Written { outcome, .. } = &done {
                        if outcome.unreplicated > 0 {
                            metrics.redis_unreplicated.inc_by(outcome.unreplicated);
                            if last_unreplicated_log
                                .is_none_or(|t| t.elapsed() >= UNREPLICATED_LOG_INTERVAL)
                            {
                                last_unreplicated_log = Some(Instant::now());
                                warn!(
                                    masters = outcome.unreplicated,
                                    "a redis cluster master has no replica acknowledging writes; \
                                     accepting batches unreplicated (a failover now would lose them)"
                                );
                            }
                        }
                    }
                    poisoned |= matches!(done, Done::Failed { .. });
                    if done_tx.send(done).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| Error::Thread(e.to_string()))?;
        Ok(Writer {
            jobs: Some(jobs_tx),
            done: done_rx,
            thread: Some(thread),
        })
    }

    /// Queues a batch; blocks while [`MAX_BATCHES_IN_FLIGHT`] are outstanding.
    pub fn submit(&self, job: Job) -> Result<()> {
        self.jobs
            .as_ref()
            .expect("writer is running")
            .send(job)
            .map_err(|_| Error::Thread("redis writer stopped".into()))
    }

    /// The next completion, waiting at most `wait` (`None`: do not wait).
    pub fn completion(&self, wait: Option<Duration>) -> Result<Option<Done>> {
        let stopped = || Error::Thread("redis writer stopped".into());
        match wait {
            None => match self.done.try_recv() {
                Ok(d) => Ok(Some(d)),
                Err(TryRecvError::Empty) => Ok(None),
                Err(TryRecvError::Disconnected) => Err(stopped()),
            },
            Some(t) => match self.done.recv_timeout(t) {
                Ok(d) => Ok(Some(d)),
                Err(RecvTimeoutError::Timeout) => Ok(None),
                Err(RecvTimeoutError::Disconnected) => Err(stopped()),
            },
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the job channel ends the thread once it finished its work.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Executes one batch, retrying with backoff until Redis accepts it (or
/// shutdown cuts the retries short).
fn execute(
    store: &mut RedisStore,
    job: Job,
    metrics: &Metrics,
    health: &Health,
    shutdown: &AtomicBool,
) -> Done {
    let t = Instant::now();
    let mut backoff = RETRY_BACKOFF_MIN;
    let mut attempts = 0;
    loop {
        match store.execute(&job.effects) {
            Ok(outcome) => {
                health.set_redis(true, metrics);
                metrics.flush_seconds.observe(t.elapsed().as_secs_f64());
                let now = now_ms();
                for ts in &job.data_timestamps {
                    metrics
                        .record_to_publish_seconds
                        .observe((now - ts).max(0) as f64 / 1000.0);
                }
                return Done::Written {
                    seq: job.seq,
                    outcome,
                };
            }
            Err(error) => {
                attempts += 1;
                metrics.redis_errors.inc();
                health.set_redis(false, metrics);
                warn!(%error, attempts, effects = job.effects.len(), "redis write failed; retrying");
                if shutdown.load(Ordering::SeqCst) && attempts >= SHUTDOWN_RETRIES {
                    return Done::Failed {
                        seq: job.seq,
                        error,
                    };
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
            }
        }
    }
}
