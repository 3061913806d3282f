//! Prometheus metrics of the operator.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, IntCounterVec, Opts, Registry,
    TextEncoder,
};

/// Reconcile metrics.
pub struct Metrics {
    registry: Registry,
    /// Reconciles, by result (`ok`, `invalid`, `error`).
    pub reconciles: IntCounterVec,
    /// Failed reconciles, by reason.
    pub failures: IntCounterVec,
    /// Reconcile duration.
    pub duration: Histogram,
    /// Child objects written, by kind and action (`created`, `updated`).
    pub writes: IntCounterVec,
    /// Total consumer lag of a pipeline's reducers (autoscaler).
    pub lag: prometheus::IntGaugeVec,
    /// Reducers the autoscaler wants.
    pub desired_replicas: prometheus::IntGaugeVec,
    /// Lag of a stuck partition (committed offset not moving), by partition.
    pub stuck_partition_lag: prometheus::IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Self {
        let r = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "streampipe_operator_reconciles_total",
                "Reconciles by result",
            ),
            &["result"],
        )
        .expect("valid");
        let failures = IntCounterVec::new(
            Opts::new(
                "streampipe_operator_reconcile_failures_total",
                "Failed reconciles by reason",
            ),
            &["reason"],
        )
        .expect("valid");
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "streampipe_operator_reconcile_duration_seconds",
                "Reconcile duration",
            )
            .buckets(exponential_buckets(0.001, 2.0, 14).expect("valid")),
        )
        .expect("valid");
        let writes = IntCounterVec::new(
            Opts::new(
                "streampipe_operator_child_writes_total",
                "Child objects written",
            ),
            &["kind", "action"],
        )
        .expect("valid");
        r.register(Box::new(reconciles.clone())).expect("unique");
        r.register(Box::new(failures.clone())).expect("unique");
        r.register(Box::new(duration.clone())).expect("unique");
        r.register(Box::new(writes.clone())).expect("unique");
        let lag = prometheus::IntGaugeVec::new(
            Opts::new(
                "streampipe_operator_consumer_lag",
                "Total consumer lag of the reducers",
            ),
            &["namespace", "name"],
        )
        .expect("valid");
        let desired_replicas = prometheus::IntGaugeVec::new(
            Opts::new(
                "streampipe_operator_desired_reducers",
                "Reducers the autoscaler wants",
            ),
            &["namespace", "name"],
        )
        .expect("valid");
        let stuck_partition_lag = prometheus::IntGaugeVec::new(
            Opts::new(
                "streampipe_operator_stuck_partition_lag",
                "Lag of a partition whose committed offset does not move",
            ),
            &["namespace", "name", "partition"],
        )
        .expect("valid");
        r.register(Box::new(stuck_partition_lag.clone()))
            .expect("unique");
        r.register(Box::new(lag.clone())).expect("unique");
        r.register(Box::new(desired_replicas.clone()))
            .expect("unique");
        Metrics {
            registry: r,
            reconciles,
            failures,
            duration,
            writes,
            lag,
            desired_replicas,
            stuck_partition_lag,
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf-8")
    }
}
