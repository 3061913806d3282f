//! The dead-letter topic: malformed records, and updates Redis refused as
//! jumping too far ahead, go there with their source and reason in headers.
//!
//! A dead letter must be in Kafka before the offset past its record is
//! stored, or a crash would lose it: [`DeadLetters::send`] waits for the
//! broker's acknowledgement (at most [`DEAD_LETTER_FLUSH_TIMEOUT`]).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tracing::warn;

use crate::error::Result;
use crate::metrics::Metrics;

/// How long to wait for dead-letter records to be acknowledged by Kafka.
pub const DEAD_LETTER_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

/// A record on its way to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// The record's key, as consumed.
    pub key: Option<Vec<u8>>,
    /// The record's value, as consumed (or as encoded, for a version jump).
    pub value: Option<Vec<u8>>,
    /// Why it was refused.
    pub reason: String,
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

/// The dead-letter producer of one topic.
pub struct DeadLetters {
    producer: ThreadedProducer<DeadLetterContext>,
    topic: String,
    metrics: Arc<Metrics>,
}

impl DeadLetters {
    /// A producer to `topic` from the base client configuration `base`
    /// (brokers, security, user options): idempotent, murmur2 partitioning.
    pub fn new(mut base: ClientConfig, topic: &str, metrics: Arc<Metrics>) -> Result<Self> {
        base.set("enable.idempotence", "true")
            .set("partitioner", "murmur2_random")
            .set("client.id", "streampipe-reducer-dlq");
        Ok(DeadLetters {
            producer: base.create_with_context(DeadLetterContext {
                metrics: metrics.clone(),
            })?,
            topic: topic.to_owned(),
            metrics,
        })
    }

    /// Produces `letters` and waits for the broker's acknowledgement, so a
    /// dead letter is not lost when the offset past its record is stored
    /// next. Failures are counted and logged; the records stay skipped.
    pub fn send(&self, letters: &[DeadLetter]) {
        if letters.is_empty() {
            return;
        }
        for l in letters {
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
            let mut record: BaseRecord<'_, [u8], [u8]> =
                BaseRecord::to(&self.topic).headers(headers);
            if let Some(k) = &l.key {
                record = record.key(k.as_slice());
            }
            if let Some(v) = &l.value {
                record = record.payload(v.as_slice());
            }
            match self.producer.send(record) {
                Ok(()) => self.metrics.dead_lettered.inc(),
                Err((e, _)) => {
                    self.metrics.dead_letter_failures.inc();
                    warn!(error = %e, "could not queue dead-letter record");
                }
            }
        }
        if let Err(e) = self.producer.flush(DEAD_LETTER_FLUSH_TIMEOUT) {
            self.metrics.dead_letter_failures.inc();
            warn!(error = %e, "dead-letter flush timed out");
        }
    }
}
