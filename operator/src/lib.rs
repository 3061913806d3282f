//! streampipe's Kubernetes operator (skeleton).
//!
//! Reconciles `StreamPipeline` custom resources into reducer and publisher
//! Deployments and autoscales reducers from Kafka consumer lag. Built in the
//! operator and autoscaling issues; this crate reserves its place in the
//! workspace layout.
