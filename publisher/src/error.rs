//! The publisher's error type, and its mapping to HTTP API errors.

use warp::http::StatusCode;

/// Everything that can go wrong in the publisher.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kafka operation failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A Redis operation failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The request is invalid; `code` is a stable machine-readable label.
    #[error("{message}")]
    Invalid {
        /// Stable error code (see docs/protocol.md).
        code: &'static str,
        /// HTTP status.
        status: StatusCode,
        /// For people.
        message: String,
    },
    /// A limit was hit: 429 with `Retry-After`.
    #[error("{message}")]
    Limited {
        /// Stable error code.
        code: &'static str,
        /// For people.
        message: String,
        /// When a retry can succeed.
        retry_after: std::time::Duration,
    },
    /// An I/O error (sockets).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A setting cannot work (an unsupported Redis address, refused credentials).
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    /// A 4xx error with a stable code.
    pub fn invalid(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid {
            code,
            status,
            message: message.into(),
        }
    }

    /// A 429 that says when to retry.
    pub fn limited(
        code: &'static str,
        message: impl Into<String>,
        retry_after: std::time::Duration,
    ) -> Self {
        Error::Limited {
            code,
            message: message.into(),
            retry_after,
        }
    }

    /// The HTTP status and stable code of the error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Error::Invalid { status, code, .. } => (*status, code),
            Error::Limited { code, .. } => (StatusCode::TOO_MANY_REQUESTS, code),
            Error::Kafka(_) | Error::Redis(_) | Error::Io(_) | Error::Config(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
        }
    }
}

impl warp::reject::Reject for Error {}

/// Result alias for the publisher.
pub type Result<T, E = Error> = std::result::Result<T, E>;
