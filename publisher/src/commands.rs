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
use streampipe_contract::{encode_command, Command, CommandKind};

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
        })
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
        let sends = payloads.iter().map(|(key, value)| {
            self.producer.send(
                FutureRecord::to(&self.topic).key(key).payload(value),
                COMMAND_TIMEOUT,
            )
        });
        for r in join_all(sends).await {
            r.map_err(|(e, _)| e)?;
        }
        metrics
            .commands
            .with_label_values(&[kind.as_str()])
            .inc_by(markets.len() as u64);
        Ok(())
    }
}
