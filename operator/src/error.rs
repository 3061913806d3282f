//! The operator's error type.

/// Everything that can go wrong while reconciling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
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

impl Error {
    /// Stable label for `reconcile_failures_total{reason}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(e)) if e.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(e)) if e.code == 403 => "forbidden",
            Error::Kube(kube::Error::Api(_)) => "api_error",
            Error::Kube(_) => "client_error",
            Error::Serde(_) => "serialisation",
            Error::MissingField(_) => "missing_field",
            Error::Io(_) => "io",
            Error::Lease(_) => "lease",
        }
    }
}

/// Result alias for the operator.
pub type Result<T, E = Error> = std::result::Result<T, E>;
