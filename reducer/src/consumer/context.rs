//! The data consumer's context: librdkafka's rebalance hooks (flush and
//! commit before a revoke; load, mark and mirror on an assign; hold new
//! partitions until their commands caught up), commit results and
//! statistics. librdkafka runs these inside `poll`, on the consumer thread.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, TopicPartitionList};
use tracing::{info, warn};

use super::commands::{self, Acks, LagGauges};
use super::{lock, Inner};
use crate::core::Event;
use crate::kafka::partitions_of;
use crate::metrics::Metrics;

/// The consumer's context: rebalance hooks, commit results and statistics.
pub(super) struct ReducerContext {
    pub(super) inner: Arc<Mutex<Inner>>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) data_topic: String,
    pub(super) command_topic: String,
    pub(super) acks: Acks,
    pub(super) lag: LagGauges,
}

impl ClientContext for ReducerContext {
    fn stats(&self, statistics: Statistics) {
        self.lag
            .report(&self.metrics, &statistics, &self.data_topic, false);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.metrics.kafka_errors.inc();
        warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for ReducerContext {
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        commands::record_acks(&self.acks, &self.command_topic, &result, offsets);
    }

    /// With the cooperative protocol `Revoke` and `Assign` carry only the
    /// partitions that move (with an eager assignor, all of them): the rest
    /// keep flowing through the rebalance.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut inner = lock(&self.inner);
        // librdkafka pauses every assigned partition until this callback
        // returns: keep it short, and say how long it took.
        let started = Instant::now();
        match rebalance {
            Rebalance::Revoke(tpl) => {
                self.metrics.rebalances.with_label_values(&["revoke"]).inc();
                let parts = partitions_of(tpl, &self.data_topic);
                info!(partitions = ?parts, "partitions revoked: flushing and committing");
                let revoked = parts.clone();
                if let Err(e) = inner.drain(consumer) {
                    warn!(error = %e, "flush before revoke failed; the batch will be redelivered to the next owner");
                }
                // The next owner loads these partitions from Redis: if it lost
                // its data, write them back before letting go.
                inner.check_epoch(true);
                inner.commit_stored(consumer);
                for p in parts {
                    inner
                        .core
                        .apply(Event::Revoked { partition: p }, &mut Vec::new());
                    let _ = self
                        .metrics
                        .partition_owned
                        .remove_label_values(&[&p.to_string()]);
                }
                inner.ledger.revoked(&revoked);
                // Committed, so the next owner (which gets them only in the
                // next rebalance round) reads on from here.
                inner.mirror_revoked(&revoked);
                inner.update_gauges();
                info!(partitions = ?revoked, elapsed = ?started.elapsed(), "revoke handled");
            }
            Rebalance::Assign(tpl) => {
                self.metrics.rebalances.with_label_values(&["assign"]).inc();
                let parts = partitions_of(tpl, &self.data_topic);
                info!(partitions = ?parts, "partitions assigned: loading subscriptions");
                // Partitions kept across the rebalance (all but the moved
                // ones with the cooperative protocol) are written back first
                // if Redis lost its data.
                inner.check_epoch(true);
                let loaded: Vec<(i32, usize)> = parts
                    .iter()
                    .map(|&p| (p, inner.load_partition(p)))
                    .collect();
                inner.mark_assigned(consumer, &loaded);
                for p in &parts {
                    self.metrics
                        .partition_owned
                        .with_label_values(&[&p.to_string()])
                        .set(1);
                }
                // Their commands only now: a subscribe applied before the
                // partition's subscriptions were loaded would be overwritten.
                inner.mirror_assigned(&parts);
                inner.update_gauges();
                info!(partitions = ?parts, elapsed = ?started.elapsed(), "assign handled");
            }
            Rebalance::Error(e) => {
                self.metrics.kafka_errors.inc();
                warn!(error = %e, "rebalance error");
            }
        }
    }

    /// After librdkafka applied the change: newly assigned data partitions
    /// wait (paused) until their command partitions reached their end, so
    /// commands already there apply before the data that follows them (see
    /// [`crate::mirror`]); revoked ones keep no pause of ours.
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut inner = lock(&self.inner);
        match rebalance {
            Rebalance::Assign(tpl) => {
                inner.pause_catching_up(consumer, &partitions_of(tpl, &self.data_topic))
            }
            Rebalance::Revoke(tpl) => {
                let parts = partitions_of(tpl, &self.data_topic);
                if !parts.is_empty() {
                    inner.resume_data(consumer, &parts);
                }
            }
            Rebalance::Error(_) => {}
        }
    }
}
