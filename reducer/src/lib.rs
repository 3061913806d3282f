//! streampipe's reducer: a Kafka consumer-group member that keeps the
//! market↔channel maps of the partitions it owns, stores each market's
//! latest state in Redis and publishes every update of a watched market
//! (one with at least one subscribed channel) once to the market's Redis
//! pub/sub topic, committing offsets only after Redis has the data.
//!
//! - [`core`]: the pure state machine (`apply(state, event) -> effects`).
//! - [`queries`]: pure: which markets of a partition match which channels'
//!   queries (the first step of the cascade; see docs/architecture.md).
//! - [`store`]: the Redis adapter that carries out effects.
//! - [`consumer`]: the Kafka adapter (poll loop, batching, rebalances).
//! - [`offsets`]: the at-least-once bookkeeping (which offsets may be stored).
//! - [`mirror`]: which command partitions mirror the owned data partitions
//!   (cooperative rebalancing with co-partitioned commands).
//! - [`config`], [`kafka`], [`dead_letter`]: settings, librdkafka
//!   configuration and topic checks, the dead-letter producer.
//! - [`writer`]: the thread that executes batches in Redis, in order.
//! - [`epoch`]: noticing a Redis that lost its data and writing our part back.
//! - [`health`]: liveness, readiness and the Redis pinger behind it.
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`cli`]: flags and environment (names from the deployment contract).

pub mod cli;
pub mod config;
pub mod consumer;
pub mod core;
pub mod dead_letter;
pub mod epoch;
pub mod error;
pub mod health;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod mirror;
pub mod offsets;
pub mod queries;
pub mod store;
pub mod writer;

pub use consumer::{spawn, Config, ReducerHandle};
pub use error::{Error, Result};
pub use health::Health;
pub use metrics::Metrics;
