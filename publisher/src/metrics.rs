//! Prometheus metrics of the publisher.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// All publisher metrics; share in an `Arc`.
pub struct Metrics {
    registry: Registry,
    /// Open stream connections, by transport.
    pub connections: prometheus::IntGaugeVec,
    /// Stream connections accepted, by transport.
    pub connections_total: IntCounterVec,
    /// Stream connections closed, by close code.
    pub closes: IntCounterVec,
    /// Topics this pod receives from Redis, by kind (`market`, `channel`).
    pub topics: prometheus::IntGaugeVec,
    /// Market updates replaced in the hub's queue by a newer version
    /// before they were fanned out (the pod was behind).
    pub hub_conflated: IntCounter,
    /// Markets waiting in the hub's queue after a dispatch round.
    pub hub_pending: IntGauge,
    /// Time an update waited in the hub's queue: the pod's lag behind Redis.
    pub hub_lag: Histogram,
    /// Local connections an update was fanned out to.
    pub fanout: Histogram,
    /// Messages received from Redis pub/sub.
    pub redis_messages: IntCounter,
    /// Messages written to clients, by transport.
    pub sent: IntCounterVec,
    /// Updates replaced by a newer version for a slow client.
    pub conflated: IntCounter,
    /// Updates dropped as not newer than what the client has.
    pub duplicates: IntCounter,
    /// Clients closed as hopelessly behind.
    pub slow_closed: IntCounter,
    /// History markets resumed by a `begin`, by result (`recovered`: the
    /// missed events were replayed; `not_recovered`: the latest state).
    pub history_replays: IntCounterVec,
    /// History events replayed to resuming clients.
    pub history_replayed: IntCounter,
    /// Connections closed with 4412: a history market's events could not
    /// be queued without dropping one (the client resumes from the history).
    pub history_gaps: IntCounter,
    /// Redis pub/sub reconnects.
    pub redis_reconnects: IntCounter,
    /// Times the Redis Cluster connection of the control API stopped
    /// answering and was rebuilt from the seed nodes.
    pub redis_cluster_rebuilds: IntCounter,
    /// Times this pod found the pipeline's data epoch gone or replaced:
    /// Redis lost data (see docs/operations.md).
    pub redis_data_loss: IntCounter,
    /// Channels this pod wrote back (registry and janitor entry) after a loss.
    pub loss_channels_repaired: IntCounter,
    /// Subscribe commands this pod sent again after a loss.
    pub loss_resubscribed: IntCounter,
    /// Control API requests, by route and status.
    pub requests: IntCounterVec,
    /// Rejected requests and frames, by reason.
    pub rejected: IntCounterVec,
    /// Delivery log records, by result (`sent`, `failed`, `dropped`).
    pub delivery_log: IntCounterVec,
    /// Snapshot answers, by result (`ok`, `not_modified`, `redirect`,
    /// `unreadable_state` per stored state that was not an update).
    pub snapshots: IntCounterVec,
    /// Commands produced to Kafka, by type.
    pub commands: IntCounterVec,
    /// Channels closed because no stream used them for the channel TTL.
    pub channels_expired: IntCounter,
    /// Channels whose registry and reducer map were compared.
    pub reconcile_checked: IntCounter,
    /// Markets repaired where registry and reducers disagreed, by command.
    pub reconcile_repairs: IntCounterVec,
    /// Producer timestamp → the update reached this pod from Redis.
    pub update_latency: Histogram,
    /// Open TCP connections on the public port (any kind: API, streams, idle keep-alive).
    pub http_connections: IntGauge,
    /// Connections refused with 503 because the pod was at its connection cap.
    pub connections_refused: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

macro_rules! reg {
    ($r:expr, $m:expr) => {{
        let m = $m;
        $r.register(Box::new(m.clone())).expect("unique metric");
        m
    }};
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let r = Registry::new();
        let cv =
            |n: &str, h: &str, l: &[&str]| IntCounterVec::new(Opts::new(n, h), l).expect("valid");
        Metrics {
            connections: reg!(
                r,
                prometheus::IntGaugeVec::new(
                    Opts::new(
                        "streampipe_publisher_connections",
                        "Open stream connections"
                    ),
                    &["transport"]
                )
                .expect("valid")
            ),
            connections_total: reg!(
                r,
                cv(
                    "streampipe_publisher_connections_total",
                    "Stream connections accepted",
                    &["transport"]
                )
            ),
            closes: reg!(
                r,
                cv(
                    "streampipe_publisher_closes_total",
                    "Stream connections closed, by close code",
                    &["code"]
                )
            ),
            topics: reg!(
                r,
                prometheus::IntGaugeVec::new(
                    Opts::new(
                        "streampipe_publisher_topics",
                        "Redis pub/sub topics this pod receives, by kind"
                    ),
                    &["kind"]
                )
                .expect("valid")
            ),
            hub_conflated: reg!(
                r,
                IntCounter::new(
                    "streampipe_publisher_hub_conflated_total",
                    "Market updates replaced by a newer version while waiting for fan-out"
                )
                .expect("valid")
            ),
            hub_pending: reg!(
                r,
                IntGauge::new(
                    "streampipe_publisher_hub_pending",
                    "Markets waiting in the hub queue for fan-out"
                )
                .expect("valid")
            ),
            hub_lag: reg!(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "streampipe_publisher_hub_lag_seconds",
                        "Time a market update waited in the hub queue before fan-out"
                    )
                    .buckets(exponential_buckets(0.0001, 2.0, 16).expect("valid"))
                )
                .expect("valid")
            ),
            fanout: reg!(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "streampipe_publisher_fanout",
                        "Local connections one market update was fanned out to"
                    )
                    .buckets(exponential_buckets(1.0, 4.0, 10).expect("valid"))
                )
                .expect("valid")
            ),
            redis_messages: reg!(
                r,
                IntCounter::new(
                    "streampipe_publisher_redis_messages_total",
                    "Messages received from Redis pub/sub"
                )
                .expect("valid")
            ),
            sent: reg!(
                r,
                cv(
                    "streampipe_publisher_sent_total",
                    "Messages written to clients",
                    &["transport"]
                )
            ),
            conflated: reg!(
                r,
                IntCounter::new(
                    "streampipe_publisher_conflated_total",
                    "Updates replaced by a newer version for a slow client"
                )
                .expect("valid")
            ),
            duplicates: reg!(
                r,
                IntCounter::new(
                    "streampipe_publisher_duplicates_total",
                    "Updates not newer than what the client has, dropped"
                )
                .expect("valid")
            ),
            history_replays: reg!(
                r,
                cv(
                    "streampipe_publisher_history_replays_total",
                    "History markets resumed by a begin, by result",
                    &["result"]
                )
            ),
            history_replayed: reg!(
                r,
                IntCounter::new(
                    "streampipe_publisher_history_replayed_total",
                    "History events replayed to resuming clients"
                )
                .expect("valid")
            ),
            history_gaps: reg!(
                r,
                IntCounter::new(
                    "streampipe_publisher_history_gap_closes_total",
                    "Connections closed with 4412 rather than drop a history market's event"
                )
                .expect("valid")
            ),
            slow_closed: reg!(
                r,
                IntCounter::new(
                    "streampipe_publisher_slow_clients_closed_total",
                    "Clients closed as hopelessly behind"
                )
                .expect("valid")
            ),
            redis_reconnects: reg!(
                r,
                IntCounter::new(
                    "streampipe_publisher_redis_reconnects_total",
                    "Redis pub/sub reconnects"
                )
                .expect("valid")
            ),
            redis_cluster_rebuilds: reg!(
                r,
                IntCounter::new(
                    "streampipe_publisher_redis_cluster_rebuilds_total",
                    "Redis Cluster connections rebuilt after they stopped answering"
                )
                .expect("valid")
            ),
            redis_data_loss: reg!(
                r,
                IntCounter::new(
                    "streampipe_publisher_redis_data_loss_detected_total",
                    "Times the pipeline's data epoch in Redis was found gone or replaced (Redis lost data)"
                )
                .expect("valid")
            ),
            loss_channels_repaired: reg!(
                r,
                IntCounter::new(
                    "streampipe_publisher_redis_loss_channels_repaired_total",
                    "Channels written back to Redis (registry, janitor entry) after a loss"
                )
                .expect("valid")
            ),
            loss_resubscribed: reg!(
                r,
                IntCounter::new(
                    "streampipe_publisher_redis_loss_resubscribed_total",
                    "Subscribe commands sent again after a Redis data loss"
                )
                .expect("valid")
            ),
            requests: reg!(
                r,
                cv(
                    "streampipe_publisher_requests_total",
                    "Control API requests",
                    &["route", "status"]
                )
            ),
            rejected: reg!(
                r,
                cv(
                    "streampipe_publisher_rejected_total",
                    "Rejected requests and frames",
                    &["reason"]
                )
            ),
            snapshots: reg!(
                r,
                cv(
                    "streampipe_publisher_snapshots_total",
                    "Snapshot answers: ok (200), not_modified (304), redirect (non-canonical query), unreadable_state (a stored state skipped)",
                    &["result"]
                )
            ),
            delivery_log: reg!(
                r,
                cv(
                    "streampipe_publisher_delivery_log_total",
                    "Delivery log records: sent (acknowledged by the broker), failed, dropped (a full queue)",
                    &["result"]
                )
            ),
            channels_expired: reg!(
                r,
                IntCounter::new(
                    "streampipe_publisher_channels_expired_total",
                    "Channels expired after the idle TTL"
                )
                .expect("valid")
            ),
            reconcile_checked: reg!(
                r,
                IntCounter::new(
                    "streampipe_publisher_reconcile_checked_total",
                    "Channels whose registry and reducer map were compared"
                )
                .expect("valid")
            ),
            reconcile_repairs: reg!(
                r,
                cv(
                    "streampipe_publisher_reconcile_repairs_total",
                    "Markets re-subscribed or unsubscribed where the registry and the reducers disagreed twice in a row",
                    &["command"]
                )
            ),
            commands: reg!(
                r,
                cv(
                    "streampipe_publisher_commands_total",
                    "Commands produced to Kafka",
                    &["type"]
                )
            ),
            update_latency: reg!(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "streampipe_publisher_update_latency_seconds",
                        "Producer timestamp to the update reaching this pod from Redis"
                    )
                    .buckets(exponential_buckets(0.001, 2.0, 14).expect("valid"))
                )
                .expect("valid")
            ),
            http_connections: reg!(
                r,
                IntGauge::new(
                    "streampipe_publisher_http_connections",
                    "Open TCP connections on the public port"
                )
                .expect("valid")
            ),
            connections_refused: reg!(
                r,
                IntCounter::new(
                    "streampipe_publisher_connections_refused_total",
                    "Connections answered 503 because the pod was at its connection cap"
                )
                .expect("valid")
            ),
            registry: r,
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

/// Increments a gauge now and decrements it when dropped (open connections).
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    /// Increments `gauge` and returns the guard.
    pub fn inc(gauge: IntGauge) -> Self {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
