//! The reducers' command lag, as the publisher sees it: the command topic's
//! end offsets minus the reducers' committed offsets, summed over its
//! partitions, read every [`LAG_POLL_INTERVAL`] by one background thread.
//!
//! Command paths (create, add and remove markets) are shed with 429 and
//! `Retry-After` while it is above the bound: a command accepted then
//! would wait behind minutes of others, and the client's retry later costs
//! less than the queue. A lag that cannot be read (broker down, no group
//! yet) counts as none: the producer's own timeout answers for a dead broker.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::debug;

use crate::error::Result;

/// Command lag (messages) beyond which command paths are shed: at the
/// reducers' measured thousands of commands a second, some seconds of work.
pub const MAX_COMMAND_LAG: i64 = 20_000;

/// How often the lag is read: two small broker requests per pod.
pub const LAG_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// How long one read may take before it is given up (and counts as none).
pub const LAG_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The latest lag reading, shared with the handlers.
#[derive(Debug, Default)]
pub struct CommandLag {
    value: AtomicI64,
}

impl CommandLag {
    /// The last reading (0 until one succeeded).
    pub fn get(&self) -> i64 {
        self.value.load(Ordering::Relaxed)
    }

    /// Sets the reading (tests and the poller).
    pub fn set(&self, lag: i64) {
        self.value.store(lag, Ordering::Relaxed);
    }
}

/// Reads the lag of `group` on `topic` once.
pub fn read(consumer: &BaseConsumer, topic: &str) -> Result<i64> {
    let md = consumer.fetch_metadata(Some(topic), LAG_READ_TIMEOUT)?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(0);
    };
    let mut tpl = TopicPartitionList::new();
    for p in t.partitions() {
        tpl.add_partition(topic, p.id());
    }
    let committed = consumer.committed_offsets(tpl, LAG_READ_TIMEOUT)?;
    let mut total = 0i64;
    for e in committed.elements() {
        let (_, high) = consumer.fetch_watermarks(topic, e.partition(), LAG_READ_TIMEOUT)?;
        let done = match e.offset() {
            Offset::Offset(o) => o,
            // Nothing committed yet: the group reads from the start.
            _ => 0,
        };
        total += (high - done).max(0);
    }
    Ok(total)
}

/// Starts the poller thread; it stops when `shutdown` turns true.
pub fn spawn(
    config: rdkafka::ClientConfig,
    group: &str,
    topic: String,
    lag: Arc<CommandLag>,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let mut config = config;
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false");
    let consumer: BaseConsumer = config.create()?;
    std::thread::Builder::new()
        .name("command-lag".into())
        .spawn(move || {
            while !*shutdown.borrow() {
                match read(&consumer, &topic) {
                    Ok(v) => lag.set(v),
                    Err(e) => {
                        debug!(error = %e, "command lag not read");
                        lag.set(0);
                    }
                }
                std::thread::sleep(LAG_POLL_INTERVAL);
            }
        })?;
    Ok(())
}
