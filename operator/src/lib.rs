//! streampipe's Kubernetes operator.
//!
//! - [`crd`]: the `StreamPipeline` custom resource and its validation.
//! - [`builders`]: pure functions building the desired children.
//! - [`controller`]: `reconcile`, the error policy and the controller loop.
//! - [`metrics`], [`error`].

pub mod autoscale;
pub mod builders;
pub mod controller;
pub mod crd;
pub mod error;
pub mod lag;
pub mod metrics;

pub use controller::{reconcile, Context, Features};
pub use crd::StreamPipeline;
pub use error::{Error, Result};
pub use metrics::Metrics;
