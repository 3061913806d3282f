//! Reads the reducers' consumer lag straight from Kafka (not from the
//! reducers' metrics, so it works with zero reducers): the data topic's
//! partitions, each partition's high watermark and the group's committed
//! offset. Blocking librdkafka calls; run it on a blocking thread.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

/// How long one Kafka request of the lag reader may take.
pub const KAFKA_TIMEOUT: Duration = Duration::from_secs(5);

/// How a partition without a committed offset counts (like KEDA's
/// `offsetResetPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uncommitted {
    /// The group will start at the earliest offset (the reducers'
    /// `auto.offset.reset`): everything retained is lag.
    Earliest,
    /// The group will start at the end: no lag.
    Latest,
}

/// Lag of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// Partition number.
    pub partition: i32,
    /// High watermark.
    pub high: i64,
    /// The group's committed offset, if any.
    pub committed: Option<i64>,
    /// `high - committed` (or by the [`Uncommitted`] policy), never negative.
    pub lag: i64,
}

/// The lag of a group on a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LagReport {
    /// Partitions of the topic.
    pub partitions: i32,
    /// Per-partition lag.
    pub per_partition: Vec<PartitionLag>,
    /// Sum of lags.
    pub total: i64,
    /// Largest partition lag.
    pub max: i64,
}

/// Reads the lag of `group` on `topic`. `options` are extra librdkafka
/// properties (credentials). Errors are messages for status and Events.
pub fn read_lag(
    brokers: &str,
    topic: &str,
    group: &str,
    options: &[(String, String)],
    policy: Uncommitted,
) -> Result<LagReport, String> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("client.id", "streampipe-operator-lag");
    for (k, v) in options {
        cfg.set(k, v);
    }
    // Not subscribed: this client never joins the group, it only reads offsets.
    let c: BaseConsumer = cfg.create().map_err(|e| format!("kafka client: {e}"))?;
    let md = c
        .fetch_metadata(Some(topic), KAFKA_TIMEOUT)
        .map_err(|e| format!("metadata: {e}"))?;
    let t = md
        .topics()
        .first()
        .ok_or_else(|| format!("topic {topic:?} not in metadata"))?;
    if let Some(err) = t.error() {
        return Err(format!("topic {topic:?}: {err:?}"));
    }
    if t.partitions().is_empty() {
        return Err(format!("topic {topic:?} has no partitions (missing?)"));
    }
    let mut tpl = TopicPartitionList::new();
    for p in t.partitions() {
        tpl.add_partition(topic, p.id());
    }
    let committed = c
        .committed_offsets(tpl, KAFKA_TIMEOUT)
        .map_err(|e| format!("committed offsets of group {group:?}: {e}"))?;
    let mut per_partition = Vec::new();
    for p in t.partitions() {
        let (low, high) = c
            .fetch_watermarks(topic, p.id(), KAFKA_TIMEOUT)
            .map_err(|e| format!("watermarks of {topic}/{}: {e}", p.id()))?;
        let committed = committed
            .find_partition(topic, p.id())
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let lag = match (committed, policy) {
            (Some(o), _) => high - o,
            (None, Uncommitted::Earliest) => high - low,
            (None, Uncommitted::Latest) => 0,
        }
        .max(0);
        per_partition.push(PartitionLag {
            partition: p.id(),
            high,
            committed,
            lag,
        });
    }
    per_partition.sort_by_key(|p| p.partition);
    let total = per_partition.iter().map(|p| p.lag).sum();
    let max = per_partition.iter().map(|p| p.lag).max().unwrap_or(0);
    Ok(LagReport {
        partitions: per_partition.len() as i32,
        per_partition,
        total,
        max,
    })
}
