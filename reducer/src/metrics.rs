//! Prometheus metrics of the reducer, registered in one [`Registry`].

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// All reducer metrics. Cheap to clone handles live inside; share it in an `Arc`.
pub struct Metrics {
    registry: Registry,
    /// Records consumed, by topic (`data` / `command`).
    pub records: IntCounterVec,
    /// Commands applied, by type.
    pub commands: IntCounterVec,
    /// Updates written to Redis state (newer than what was stored).
    pub updates_applied: IntCounter,
    /// Updates dropped because Redis already had that or a newer version.
    pub updates_stale: IntCounter,
    /// Messages published to market topics (updates of watched markets and announces).
    pub publishes: IntCounter,
    /// Applied updates of history markets, by result: `appended` to the
    /// market's stream, or `refused` (the stream already holds a newer id,
    /// e.g. its state hash was deleted by hand but not its history).
    pub history: IntCounterVec,
    /// Malformed or misrouted records, by topic and reason.
    pub malformed: IntCounterVec,
    /// Records counted without effect, by reason.
    pub skipped: IntCounterVec,
    /// Records sent to the dead-letter topic.
    pub dead_lettered: IntCounter,
    /// Dead-letter produce failures (the record is still skipped).
    pub dead_letter_failures: IntCounter,
    /// Records per flushed batch.
    pub batch_records: Histogram,
    /// Time to carry out one batch in Redis.
    pub flush_seconds: Histogram,
    /// From the record's timestamp to the moment its publish returned.
    pub record_to_publish_seconds: Histogram,
    /// Failed Redis round trips (each is retried).
    pub redis_errors: IntCounter,
    /// Batches a Redis Cluster master accepted without a replica
    /// acknowledging them in time (counted per master).
    pub redis_unreplicated: IntCounter,
    /// 1 while the last Redis round trip (readiness ping, batch or load)
    /// succeeded, else 0.
    pub redis_up: IntGauge,
    /// Rebalance events, by kind (`assign` / `revoke`).
    pub rebalances: IntCounterVec,
    /// Consumer lag per topic partition, from librdkafka statistics.
    pub partition_lag: IntGaugeVec,
    /// Data partitions owned now.
    pub owned_partitions: IntGauge,
    /// 1 per data partition owned (label `partition`): which reducer owns
    /// what, and which partitions a rebalance moved.
    pub partition_owned: IntGaugeVec,
    /// (market, channel) pairs held in memory.
    pub subscriptions: IntGauge,
    /// Markets with at least one subscribed channel (their updates are published).
    pub watched_markets: IntGauge,
    /// The largest number of channels subscribed to one market.
    pub max_market_channels: IntGauge,
    /// (channel, query) pairs held, summed over owned partitions.
    pub queries: IntGauge,
    /// Markets matched by at least one query.
    pub query_matched_markets: IntGauge,
    /// Channels that gained (`joined`) or lost (`left`) a market through a query.
    pub query_changes: IntCounterVec,
    /// Kafka client errors reported by librdkafka.
    pub kafka_errors: IntCounter,
    /// Time to load a newly assigned partition's subscriptions from Redis.
    pub load_seconds: HistogramVec,
    /// Times this reducer found the pipeline's data epoch gone or replaced:
    /// Redis lost data (see docs/operations.md).
    pub redis_data_loss: IntCounter,
    /// Partitions whose subscriptions were written back after a loss.
    pub loss_partitions_repaired: IntCounter,
    /// (market, channel) pairs written back after a loss.
    pub loss_subscriptions_repaired: IntCounter,
    /// Partitions assigned without the current epoch's mark and with nothing
    /// to load although the group had consumed their commands: their
    /// subscriptions were lost with Redis and their owner did not write them back.
    pub partitions_unrepaired: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let r = Registry::new();
        let latency = exponential_buckets(0.0005, 2.0, 16).expect("valid buckets");
        Metrics {
            records: counter_vec(
                &r,
                "streampipe_reducer_records_total",
                "Records consumed",
                &["topic"],
            ),
            commands: counter_vec(
                &r,
                "streampipe_reducer_commands_total",
                "Commands applied",
                &["type"],
            ),
            updates_applied: counter(
                &r,
                "streampipe_reducer_updates_applied_total",
                "Updates written to market state",
            ),
            updates_stale: counter(
                &r,
                "streampipe_reducer_updates_stale_total",
                "Updates not newer than the stored state, dropped",
            ),
            publishes: counter(
                &r,
                "streampipe_reducer_publishes_total",
                "Messages published to market topics (updates of watched markets, announces)",
            ),
            history: counter_vec(
                &r,
                "streampipe_reducer_history_entries_total",
                "Applied updates of history markets, by result (appended, refused)",
                &["result"],
            ),
            malformed: counter_vec(
                &r,
                "streampipe_reducer_malformed_total",
                "Malformed or misrouted records",
                &["topic", "reason"],
            ),
            skipped: counter_vec(
                &r,
                "streampipe_reducer_skipped_total",
                "Records counted without effect",
                &["reason"],
            ),
            dead_lettered: counter(
                &r,
                "streampipe_reducer_dead_lettered_total",
                "Records sent to the dead-letter topic",
            ),
            dead_letter_failures: counter(
                &r,
                "streampipe_reducer_dead_letter_failures_total",
                "Dead-letter produce failures",
            ),
            batch_records: histogram(
                &r,
                "streampipe_reducer_batch_records",
                "Records per flushed batch",
                exponential_buckets(1.0, 2.0, 14).expect("valid"),
            ),
            flush_seconds: histogram(
                &r,
                "streampipe_reducer_flush_seconds",
                "Redis time per batch",
                latency.clone(),
            ),
            record_to_publish_seconds: histogram(
                &r,
                "streampipe_reducer_record_to_publish_seconds",
                "Record timestamp to publish",
                latency.clone(),
            ),
            redis_errors: counter(
                &r,
                "streampipe_reducer_redis_errors_total",
                "Failed Redis round trips (retried)",
            ),
            redis_unreplicated: counter(
                &r,
                "streampipe_reducer_redis_unreplicated_total",
                "Batches a cluster master accepted without a replica acknowledging (per master)",
            ),
            redis_up: gauge(
                &r,
                "streampipe_reducer_redis_up",
                "1 while the last Redis round trip succeeded",
            ),
            rebalances: counter_vec(
                &r,
                "streampipe_reducer_rebalances_total",
                "Rebalance events",
                &["kind"],
            ),
            partition_lag: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "streampipe_reducer_partition_lag",
                        "Consumer lag per partition (librdkafka statistics)",
                    ),
                    &["topic", "partition"],
                )
                .expect("valid");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            owned_partitions: gauge(
                &r,
                "streampipe_reducer_owned_partitions",
                "Data partitions owned",
            ),
            partition_owned: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "streampipe_reducer_partition_owned",
                        "1 for each data partition owned",
                    ),
                    &["partition"],
                )
                .expect("valid");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            subscriptions: gauge(
                &r,
                "streampipe_reducer_subscriptions",
                "Subscriptions (market, channel) held in memory",
            ),
            watched_markets: gauge(
                &r,
                "streampipe_reducer_watched_markets",
                "Markets with at least one subscribed channel",
            ),
            max_market_channels: gauge(
                &r,
                "streampipe_reducer_max_market_channels",
                "Largest number of channels subscribed to one market",
            ),
            queries: gauge(
                &r,
                "streampipe_reducer_queries",
                "Query subscriptions (channel, query) held, summed over owned partitions",
            ),
            query_matched_markets: gauge(
                &r,
                "streampipe_reducer_query_matched_markets",
                "Markets matched by at least one query",
            ),
            query_changes: counter_vec(
                &r,
                "streampipe_reducer_query_changes_total",
                "Channels that gained (joined) or lost (left) a market through a query",
                &["kind"],
            ),
            kafka_errors: counter(
                &r,
                "streampipe_reducer_kafka_errors_total",
                "Kafka client errors",
            ),
            redis_data_loss: counter(
                &r,
                "streampipe_reducer_redis_data_loss_detected_total",
                "Times the pipeline's data epoch in Redis was found gone or replaced (Redis lost data)",
            ),
            loss_partitions_repaired: counter(
                &r,
                "streampipe_reducer_redis_loss_partitions_repaired_total",
                "Partitions whose subscriptions were written back to Redis after a loss",
            ),
            loss_subscriptions_repaired: counter(
                &r,
                "streampipe_reducer_redis_loss_subscriptions_repaired_total",
                "Market-channel subscriptions written back to Redis after a loss",
            ),
            partitions_unrepaired: counter(
                &r,
                "streampipe_reducer_partitions_unrepaired_total",
                "Partitions assigned whose subscriptions were lost with Redis and not written back by their previous owner",
            ),
            load_seconds: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "streampipe_reducer_partition_load_seconds",
                        "Loading a partition's subscriptions from Redis",
                    )
                    .buckets(latency),
                    &["result"],
                )
                .expect("valid");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}
