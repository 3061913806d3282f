//! streampipe's Kubernetes operator.
//!
//! - [`crd`]: the `StreamPipeline` custom resource and its spec rules;
//!   [`cel`]: the same rules as CEL for servers ≥ 1.25.
//! - [`builders`]: pure functions building the desired children.
//! - [`controller`]: `reconcile` (validate → apply children → observe
//!   status), the error policy and the controller loop; [`context`] is what
//!   passes share.
//! - Phases: [`validate`], [`apply`] (with [`ownership`], [`drift`],
//!   [`quantity`]), [`status`]; the autoscaler: [`autoscale`] (decision),
//!   [`drain`] (the drain-time policy over a sample history), [`plan`]
//!   (state and steps), [`scaling`] (its I/O), [`lag`]; [`replay`] runs a
//!   policy against a simulated consumer group (tests, benchmark).
//! - [`sharing`]: pipelines sharing a consumer group (a warning).
//! - [`scope`]: which namespaces are watched (namespaced by default).
//! - [`events`], [`metrics`], [`error`].

pub mod apply;
pub mod autoscale;
pub mod builders;
pub mod cel;
pub mod context;
pub mod controller;
pub mod crd;
pub mod drain;
pub mod drift;
pub mod error;
pub mod events;
pub mod lag;
pub mod metrics;
pub mod ownership;
pub mod plan;
pub mod publisher_auth;
pub mod quantity;
pub mod replay;
pub mod scaling;
pub mod scope;
pub mod sharing;
pub mod status;
pub mod validate;

pub use context::{Context, Features};
pub use controller::reconcile;
pub use crd::StreamPipeline;
pub use error::{Error, Result};
pub use metrics::Metrics;
