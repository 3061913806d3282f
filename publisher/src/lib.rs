//! streampipe's publisher (skeleton).
//!
//! Holds browsers' WebSocket and SSE connections on one multiplexed Redis
//! subscription per pod and serves the REST control API that turns requests
//! into Kafka commands. Built in the publisher issue; this crate reserves its
//! place in the workspace layout.
