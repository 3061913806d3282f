//! Liveness and readiness of the reducer, and the Redis pinger that keeps
//! readiness true when no data flows.
//!
//! The writer and the loader learn about Redis only when they have work: a
//! reducer whose partitions are quiet would stay ready through a whole Redis
//! outage. The pinger makes one cheap round trip every
//! [`REDIS_PING_INTERVAL`] on its own connection, so `/readyz` follows Redis
//! within about [`REDIS_PING_INTERVAL`] + [`REDIS_PING_TIMEOUT`] either way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::store::RedisStore;

/// Time between two readiness pings: one `PING` a second costs Redis
/// nothing and bounds how stale `/readyz` can be (a kubelet probes every 5 s).
pub const REDIS_PING_INTERVAL: Duration = Duration::from_secs(1);

/// Connect and reply timeout of a readiness ping: a Redis that takes longer
/// than this to answer `PING` cannot serve the pipeline either, and a short
/// bound keeps a black-holed Redis from holding readiness up for the
/// writer's longer batch timeout.
pub const REDIS_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the pinger looks at the shutdown flag while it waits: how long
/// it can delay the reducer's exit.
const PINGER_STOP_CHECK: Duration = Duration::from_millis(100);

/// Liveness and readiness, shared with the HTTP endpoints.
#[derive(Debug, Default)]
pub struct Health {
    /// The consumer thread is running.
    pub alive: AtomicBool,
    /// Redis answered once at start and the consumer is subscribed; false
    /// again once shutdown begins.
    pub ready: AtomicBool,
    /// The last Redis round trip (a ping, a batch or a load) succeeded.
    pub redis: AtomicBool,
}

impl Health {
    /// What `/readyz` answers: alive, started, and Redis answering.
    pub fn is_ready(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
            && self.ready.load(Ordering::SeqCst)
            && self.redis.load(Ordering::SeqCst)
    }

    /// Records the result of a Redis round trip, mirrored in the
    /// `redis_up` gauge.
    pub fn set_redis(&self, ok: bool, metrics: &Metrics) {
        metrics.redis_up.set(i64::from(ok));
        self.redis.store(ok, Ordering::SeqCst);
    }
}

/// The pinger thread; stops when the shutdown flag is set or it is dropped.
pub struct Pinger {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Pinger {
    /// Starts pinging Redis through `store` (its own connection, opened with
    /// [`REDIS_PING_TIMEOUT`]) every [`REDIS_PING_INTERVAL`].
    pub fn start(
        mut store: RedisStore,
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        shutdown: Arc<AtomicBool>,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = {
            let stop = stop.clone();
            move || stop.load(Ordering::SeqCst) || shutdown.load(Ordering::SeqCst)
        };
        let thread = std::thread::Builder::new()
            .name("reducer-redis-ping".into())
            .spawn(move || {
                let mut was_ok = true;
                while !stopping() {
                    let next = Instant::now() + REDIS_PING_INTERVAL;
                    let ok = match store.ping() {
                        Ok(()) => true,
                        Err(e) => {
                            metrics.redis_errors.inc();
                            if was_ok {
                                warn!(error = %e, "redis ping failed: not ready until it answers");
                            }
                            false
                        }
                    };
                    if ok && !was_ok {
                        info!("redis answers pings again");
                    }
                    was_ok = ok;
                    health.set_redis(ok, &metrics);
                    while !stopping() {
                        let left = next.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        std::thread::sleep(left.min(PINGER_STOP_CHECK));
                    }
                }
            })
            .map_err(|e| Error::Thread(e.to_string()))?;
        Ok(Pinger {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
