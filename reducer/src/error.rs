//! The reducer's error type.

/// Everything that can go wrong in the reducer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kafka client operation failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A Redis operation failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The topics do not fit the co-partitioning the reducer relies on.
    #[error("topic layout: {0}")]
    Topics(String),
    /// Invalid configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// The consumer thread panicked or was stopped abnormally.
    #[error("consumer thread: {0}")]
    Thread(String),
}

/// Result alias for the reducer.
pub type Result<T, E = Error> = std::result::Result<T, E>;
