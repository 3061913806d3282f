//! The delivery log (opt-in): a record per market update this pod handed to
//! its browser connections, produced to a Kafka topic for audit ("what were
//! customers shown, when") — the trivago article's business log.
//!
//! The fan-out must never wait for it: the dispatcher only `try_send`s into
//! a bounded queue ([`DELIVERY_LOG_QUEUE`]); a task drains the queue in
//! batches into an rdkafka producer whose own queue is bounded too
//! ([`PRODUCER_QUEUE`]). Whatever does not fit either queue, or fails to
//! reach the broker, is counted (`streampipe_publisher_delivery_log_total`
//! by result) and dropped: the log is for audit, the odds are the product.

use std::sync::Arc;
use std::time::Duration;

use crate::commands::producer_config;
use bytes::Bytes;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use streampipe_contract::deploy::KafkaSecurity;
use streampipe_contract::{encode_delivery, peek_update, DeliveryRecord};
use tokio::sync::mpsc;

use crate::error::Result;
use crate::metrics::Metrics;

/// Records waiting for the producer task: ~1 s of a busy pod's distinct
/// market updates; beyond it records are dropped (counted), never queued.
pub const DELIVERY_LOG_QUEUE: usize = 65_536;

/// Most records the task moves to the producer per wake-up, so one burst
/// does not hold the runtime thread.
pub const DELIVERY_LOG_BATCH: usize = 1_024;

/// librdkafka's own queue bound (messages) for the log producer: a broker
/// outage fills it in seconds and then records are dropped (counted)
/// instead of growing the pod's memory.
pub const PRODUCER_QUEUE: usize = 100_000;

/// How long librdkafka batches log records (ms): the log is not latency
/// sensitive, bigger batches are cheaper.
pub const LINGER_MS: u32 = 50;

/// How long a record may wait for the broker before it counts as failed.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// One delivery, as the dispatcher records it: reference-counted handles
/// only (no allocation, no parse on the fan-out path; the drain task reads
/// the timestamp from the update's bytes).
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Market id.
    pub market: Arc<str>,
    /// Version.
    pub version: u64,
    /// The update as sent (its `ts` goes into the record).
    pub bytes: Bytes,
    /// Connections that took it (not those that already had this version).
    pub connections: u32,
    /// When (ms since the epoch).
    pub at: i64,
}

/// The dispatcher's end of the log. Cheap to clone.
#[derive(Clone)]
pub struct DeliveryLog {
    tx: mpsc::Sender<Delivery>,
    metrics: Arc<Metrics>,
}

impl DeliveryLog {
    /// Queues a record; drops (and counts) it when the queue is full.
    pub fn record(&self, d: Delivery) {
        if self.tx.try_send(d).is_err() {
            self.metrics
                .delivery_log
                .with_label_values(&["dropped"])
                .inc();
        }
    }

    /// A log whose records go to `tx` (tests, and [`start`]).
    pub fn with_queue(tx: mpsc::Sender<Delivery>, metrics: Arc<Metrics>) -> Self {
        DeliveryLog { tx, metrics }
    }
}

/// Counts what the broker acknowledged or refused.
struct Counting(Arc<Metrics>);

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let outcome = if result.is_ok() { "sent" } else { "failed" };
        self.0.delivery_log.with_label_values(&[outcome]).inc();
    }
}

/// Starts the log producing to `topic`; the returned handle is what the
/// dispatcher records into.
pub fn start(
    brokers: &str,
    topic: &str,
    security: &KafkaSecurity,
    options: &[(String, String)],
    metrics: Arc<Metrics>,
) -> Result<DeliveryLog> {
    let mut c = producer_config(brokers, security, options)?;
    c.set("linger.ms", LINGER_MS.to_string())
        .set("queue.buffering.max.messages", PRODUCER_QUEUE.to_string())
        .set(
            "message.timeout.ms",
            MESSAGE_TIMEOUT.as_millis().to_string(),
        )
        .set("compression.type", "lz4")
        .set("client.id", "streampipe-publisher-delivery-log");
    let producer: ThreadedProducer<Counting> = c.create_with_context(Counting(metrics.clone()))?;
    let (tx, rx) = mpsc::channel(DELIVERY_LOG_QUEUE);
    tokio::spawn(drain(
        rx,
        producer,
        topic.to_owned(),
        pod_name(),
        metrics.clone(),
    ));
    Ok(DeliveryLog::with_queue(tx, metrics))
}

/// The pod's name: Kubernetes sets the host name to it.
fn pod_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// Moves queued records into the producer until every handle is gone.
async fn drain(
    mut rx: mpsc::Receiver<Delivery>,
    producer: ThreadedProducer<Counting>,
    topic: String,
    pod: String,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::with_capacity(DELIVERY_LOG_BATCH);
    while rx.recv_many(&mut batch, DELIVERY_LOG_BATCH).await > 0 {
        for d in batch.drain(..) {
            let record = DeliveryRecord {
                market: d.market.to_string(),
                version: d.version,
                ts: peek_update(&d.bytes).ok().and_then(|h| h.ts),
                connections: d.connections,
                pod: pod.clone(),
                at: d.at,
            };
            let payload = encode_delivery(&record);
            let sent = producer.send(
                BaseRecord::<str, [u8]>::to(&topic)
                    .key(&record.market)
                    .payload(&payload),
            );
            if sent.is_err() {
                // librdkafka's queue is full (broker down or slow).
                metrics.delivery_log.with_label_values(&["dropped"]).inc();
            }
        }
        tokio::task::yield_now().await;
    }
    let _ = producer.flush(Duration::from_secs(5));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let metrics = Arc::new(Metrics::new());
        let (tx, mut rx) = mpsc::channel(2);
        let log = DeliveryLog::with_queue(tx, metrics.clone());
        let d = |v| Delivery {
            market: Arc::from("m1"),
            version: v,
            bytes: Bytes::new(),
            connections: 1,
            at: 0,
        };
        for v in 1..=5 {
            log.record(d(v));
        }
        let dropped = metrics.delivery_log.with_label_values(&["dropped"]).get();
        assert_eq!(dropped, 3);
        assert_eq!(rx.try_recv().unwrap().version, 1);
        assert_eq!(rx.try_recv().unwrap().version, 2);
        assert!(rx.try_recv().is_err());
    }
}
