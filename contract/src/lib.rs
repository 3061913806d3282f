//! The wire contract shared by every streampipe component.
//!
//! This crate is deliberately small and dependency-light: it defines the
//! messages that travel over Kafka and Redis ([`message`]), the Redis key
//! schema ([`keys`]) and the partitioner that decides which Kafka partition a
//! market lives on ([`partitioner`]), and the deployment contract
//! ([`deploy`]): env names, ports and defaults the operator and binaries share;
//! the delivery log's record ([`delivery`]), which markets keep an event
//! history and how ([`history`]) and the data epoch that reveals a
//! Redis that lost its data ([`epoch`]). Anything that two components must agree
//! on byte for byte lives here and nowhere else.

pub mod close;
pub mod delivery;
pub mod deploy;
pub mod epoch;
pub mod history;
pub mod keys;
pub mod message;
pub mod partitioner;
pub mod query;
pub mod slot;

pub use delivery::{decode_delivery, encode_delivery, DeliveryRecord};
pub use history::History;
pub use keys::{Keys, Topic};
pub use message::{
    decode_channel_message, decode_command, decode_published, decode_update, encode_command,
    peek_update, validate_channel_id, validate_market_id, ChannelMessage, Command, CommandKind,
    ContractError, DerivedVersion, MarketUpdate, PublishedUpdate, UpdateHead, CHANNEL_CLOSED,
    CHANNEL_MARKETS_CHANGED, MAX_ID_LEN, MAX_PAYLOAD_DEPTH, MAX_RECORD_BYTES,
    MAX_UPDATE_MESSAGE_BYTES, MAX_VERSION, PROTOCOL_VERSION,
};
pub use partitioner::{murmur2, partition_for};
pub use query::{
    decode_query_command, encode_query_command, is_query_command, Fields, Query, QueryCommand,
    QueryCommandKind, QueryError, MAX_QUERIES_PER_CHANNEL, MAX_QUERIES_PER_PIPELINE,
    MAX_QUERY_MATCHES_PER_PARTITION,
};
pub use slot::slot;
