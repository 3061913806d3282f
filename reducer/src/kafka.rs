//! librdkafka configuration and metadata of the reducer's consumer: the
//! consumer-group settings the at-least-once promise rests on
//! (`enable.auto.offset.store=false`: only offsets the consumer stored after
//! Redis accepted their batch are committed), the incremental cooperative
//! rebalance protocol of the data topic's group and the assign-mode command
//! consumer that mirrors it (see [`crate::mirror`]), fetch tuning, and the
//! topic checks at start-up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;
use tracing::warn;

use crate::config::Config;
use crate::error::{Error, Result};

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

/// The data consumer's assignor. Cooperative: a rebalance revokes only
/// the partitions that move, so a scale step or a restart pauses only
/// those (the eager `range` it replaces revoked every partition of every
/// member). It cannot co-locate two topics, which is why commands are read
/// by a second, assign-mode consumer (see [`crate::mirror`]). Members with
/// an eager assignor cannot share the group (see docs/operations.md).
pub const ASSIGNMENT_STRATEGY: &str = "cooperative-sticky";

/// How long to wait for the topics to exist at start-up.
const METADATA_WAIT: Duration = Duration::from_secs(60);

/// The consumer's configuration: the base client settings (brokers,
/// security, user options) plus the group settings; user options win, also
/// over these.
pub fn consumer_config(config: &Config) -> Result<ClientConfig> {
    let session_ms = config.session_timeout.as_millis().max(1000) as u64;
    let mut cc = config.client_config()?;
    cc.set("group.id", &config.group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", ASSIGNMENT_STRATEGY)
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
    Ok(cc)
}

/// The command consumer's configuration: assign mode (it never joins the
/// group: the data consumer's assignment decides its partitions), the
/// pipeline's `group.id` only so that assigning from
/// [`rdkafka::Offset::Stored`] reads the group's committed offset, nothing
/// committed by itself (the group member commits its offsets, see
/// [`crate::mirror`]); offsets are stored by hand only for its lag
/// statistics. User options win, as for the data consumer.
pub fn command_consumer_config(config: &Config) -> Result<ClientConfig> {
    let mut cc = config.client_config()?;
    cc.set("group.id", &config.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS.to_string())
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS.to_string())
        .set(
            "statistics.interval.ms",
            config.statistics_interval.as_millis().to_string(),
        )
        .set("client.id", "streampipe-reducer-commands");
    for (k, v) in &config.kafka_options {
        cc.set(k, v);
    }
    // Whatever the user set: this consumer must never commit on its own
    // (outside the group's generation, a commit would be refused or, worse,
    // move the group's offsets behind the member's back); and its
    // end-of-partition events release a new partition's data.
    cc.set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true");
    Ok(cc)
}

/// The partitions of `topic` in `tpl`, sorted.
pub fn partitions_of(tpl: &TopicPartitionList, topic: &str) -> Vec<i32> {
    let mut v: Vec<i32> = tpl
        .elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect();
    v.sort_unstable();
    v
}

/// Waits until `topic` exists (at most [`METADATA_WAIT`], or until
/// `shutdown`) and returns its partition count.
pub fn wait_for_topic(probe: &BaseConsumer, topic: &str, shutdown: &AtomicBool) -> Result<u32> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings the at-least-once promise rests on are there, and a
    /// user's tuning option wins over a default.
    #[test]
    fn offsets_are_stored_by_hand_and_the_assignor_is_cooperative() {
        let mut c = Config::new("127.0.0.1:9092", "odds", "redis://127.0.0.1");
        c.kafka_options = vec![("fetch.wait.max.ms".into(), "50".into())];
        let cc = consumer_config(&c).unwrap();
        assert_eq!(cc.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(cc.get("enable.auto.commit"), Some("true"));
        assert_eq!(
            cc.get("partition.assignment.strategy"),
            Some("cooperative-sticky")
        );
        assert_eq!(cc.get("group.id"), Some(c.group.as_str()));
        assert_eq!(cc.get("fetch.wait.max.ms"), Some("50"), "user options win");
    }

    /// The command consumer never commits by itself, whatever the options.
    #[test]
    fn the_command_consumer_never_commits_by_itself() {
        let mut c = Config::new("127.0.0.1:9092", "odds", "redis://127.0.0.1");
        c.kafka_options = vec![
            ("enable.auto.commit".into(), "true".into()),
            ("enable.partition.eof".into(), "false".into()),
        ];
        let cc = command_consumer_config(&c).unwrap();
        assert_eq!(cc.get("enable.auto.commit"), Some("false"));
        assert_eq!(
            cc.get("enable.partition.eof"),
            Some("true"),
            "its end-of-partition events release new data partitions"
        );
        assert_eq!(cc.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(cc.get("group.id"), Some(c.group.as_str()));
    }
}
