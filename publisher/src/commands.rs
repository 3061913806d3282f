//! Produces control commands to the command topic.
//!
//! One command per market, keyed by the market id with Kafka's murmur2
//! partitioner (`murmur2_random`, the Java client's default), so each lands on
//! the partition of its market's data and reaches the reducer that owns it.
//! Requests wait for the broker's acknowledgement: a `201` means the
//! commands are durable in Kafka.

use std::time::Duration;

use futures_util::future::join_all;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use streampipe_contract::deploy::{self, KafkaSecurity};
use streampipe_contract::{
    encode_command, encode_query_command, Command, CommandKind, QueryCommand, QueryCommandKind,
};

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// How long a command may wait for the broker before the request fails with
/// 503: well above a healthy broker's milliseconds, below browser timeouts.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A Kafka client configuration for `brokers` with `security` and the
/// tuning `options` (security keys among them are refused): what every
/// producer of the publisher starts from.
pub fn producer_config(
    brokers: &str,
    security: &KafkaSecurity,
    options: &[(String, String)],
) -> Result<ClientConfig> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    let config_err = |e: streampipe_contract::ContractError| Error::Config(e.to_string());
    for (k, v) in security.properties().map_err(config_err)? {
        c.set(k, v);
    }
    for (k, v) in options {
        deploy::check_kafka_option(k).map_err(config_err)?;
        c.set(k, v);
    }
    Ok(c)
}

/// The command producer. Cheap to clone.
#[derive(Clone)]
pub struct Commands {
    producer: FutureProducer,
    topic: String,
    /// The command topic's partition count, read from the broker once (0:
    /// not yet): query commands go to every partition.
    partitions: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl Commands {
    /// Creates the producer with `security`; `options` are extra librdkafka
    /// properties for tuning (security keys are refused).
    pub fn new(
        brokers: &str,
        topic: &str,
        security: &KafkaSecurity,
        options: &[(String, String)],
    ) -> Result<Self> {
        let mut c = producer_config(brokers, security, options)?;
        c.set("partitioner", "murmur2_random")
            .set("enable.idempotence", "true")
            .set("linger.ms", "1")
            .set(
                "message.timeout.ms",
                COMMAND_TIMEOUT.as_millis().to_string(),
            )
            .set("client.id", "streampipe-publisher");
        Ok(Commands {
            producer: c.create()?,
            topic: topic.to_owned(),
            partitions: Default::default(),
        })
    }

    /// The command topic's partition count (asked of the broker the first
    /// time; the topics' partition counts are fixed, co-partitioning needs it).
    pub(crate) async fn partition_count(&self) -> Result<u32> {
        use std::sync::atomic::Ordering;
        let known = self.partitions.load(Ordering::Relaxed);
        if known > 0 {
            return Ok(known);
        }
        let (producer, topic) = (self.producer.clone(), self.topic.clone());
        let n = tokio::task::spawn_blocking(move || -> Result<u32> {
            use rdkafka::producer::Producer;
            let md = producer
                .client()
                .fetch_metadata(Some(&topic), COMMAND_TIMEOUT)?;
            Ok(md
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map_or(0, |t| t.partitions().len() as u32))
        })
        .await
        .map_err(|e| Error::Config(format!("metadata task: {e}")))??;
        if n == 0 {
            return Err(Error::Config(format!(
                "command topic {:?} has no partitions (missing?)",
                self.topic
            )));
        }
        self.partitions.store(n, Ordering::Relaxed);
        Ok(n)
    }

    /// Sends a query command to **every** partition of the command topic
    /// (markets matching a query live on any partition, and each partition's
    /// owner holds the queries of its partitions), keyed by the channel, and
    /// waits until the broker acknowledged all of them.
    pub async fn send_query(
        &self,
        kind: QueryCommandKind,
        channel: &str,
        query: &str,
        metrics: &Metrics,
    ) -> Result<()> {
        let n = self.partition_count().await?;
        let value = encode_query_command(&QueryCommand {
            kind,
            channel: channel.to_owned(),
            query: query.to_owned(),
        });
        let records = (0..n as i32)
            .map(|p| {
                FutureRecord::to(&self.topic)
                    .key(channel)
                    .payload(value.as_slice())
                    .partition(p)
            })
            .collect();
        self.send_all(records, kind.as_str(), metrics).await
    }

    /// Sends one `kind` command per market for `channel` and waits until the
    /// broker acknowledged all of them.
    pub async fn send(
        &self,
        kind: CommandKind,
        channel: &str,
        markets: &[String],
        metrics: &Metrics,
    ) -> Result<()> {
        let payloads: Vec<(String, Vec<u8>)> = markets
            .iter()
            .map(|m| {
                let cmd = Command {
                    kind,
                    channel: channel.to_owned(),
                    market: m.clone(),
                };
                (m.clone(), encode_command(&cmd))
            })
            .collect();
        let records = payloads
            .iter()
            .map(|(key, value)| {
                FutureRecord::to(&self.topic)
                    .key(key.as_str())
                    .payload(value.as_slice())
            })
            .collect();
        self.send_all(records, kind.as_str(), metrics).await
    }

    /// Sends `records`, waits until the broker acknowledged all of them, and
    /// counts them in `streampipe_publisher_commands_total{type=label}`.
    async fn send_all(
        &self,
        records: Vec<FutureRecord<'_, str, [u8]>>,
        label: &str,
        metrics: &Metrics,
    ) -> Result<()> {
        let n = records.len() as u64;
        let sends = records
            .into_iter()
            .map(|r| self.producer.send(r, COMMAND_TIMEOUT));
        for r in join_all(sends).await {
            r.map_err(|(e, _)| e)?;
        }
        metrics.commands.with_label_values(&[label]).inc_by(n);
        Ok(())
    }
}
