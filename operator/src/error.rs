//! The operator's error type.

/// Everything that can go wrong while reconciling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {}", brief(.0))]
    Kube(#[from] kube::Error),
    /// Applying a child failed (the API server refused it).
    #[error("applying {kind} {name}: {}", brief(source))]
    Apply {
        /// Kind of the child.
        kind: &'static str,
        /// Name of the child.
        name: String,
        /// What the API server said.
        #[source]
        source: kube::Error,
    },
    /// A desired object did not serialise or a live one did not parse.
    #[error("serialisation: {0}")]
    Serde(#[from] serde_json::Error),
    /// The resource lacks something every stored object has.
    #[error("resource has no {0}")]
    MissingField(&'static str),
    /// Binding the metrics endpoint failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Leader election failed.
    #[error("leader election: {0}")]
    Lease(String),
}

/// A one-line description of a client error: for an API error its message
/// and code, not the whole response (which can quote the object and runs
/// past the 1024 bytes an Event note may have).
pub fn brief(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        other => other.to_string(),
    }
}

impl Error {
    /// Stable label for `reconcile_failures_total{reason}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(e))
            | Error::Apply {
                source: kube::Error::Api(e),
                ..
            } if e.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(e))
            | Error::Apply {
                source: kube::Error::Api(e),
                ..
            } if e.code == 403 => "forbidden",
            Error::Apply { .. } => "apply_failed",
            Error::Kube(kube::Error::Api(_)) => "api_error",
            Error::Kube(_) => "client_error",
            Error::Serde(_) => "serialisation",
            Error::MissingField(_) => "missing_field",
            Error::Io(_) => "io",
            Error::Lease(_) => "lease",
        }
    }

    /// The `Degraded` condition's reason for this failure.
    pub fn condition_reason(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "ApplyFailed",
            _ => "ReconcileFailed",
        }
    }
}

/// Result alias for the operator.
pub type Result<T, E = Error> = std::result::Result<T, E>;
