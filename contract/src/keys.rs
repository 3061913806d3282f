//! The Redis key schema.
//!
//! Every key of a pipeline starts with `sp:<pipeline>:` so several pipelines
//! can share one Redis. Keys about one market carry the hash tag `{m:<id>}`
//! and keys about one channel carry `{c:<id>}`, so a Redis Cluster keeps a
//! market's state and subscriber set in one slot (the reducer's update script
//! touches both). Ids are validated by [`crate::message`] and cannot contain
//! braces, so a tag can never be broken by an id.

/// Builds the Redis key and pub/sub channel names of one pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys for the pipeline called `pipeline`.
    pub fn new(pipeline: &str) -> Self {
        Keys {
            prefix: format!("sp:{pipeline}:"),
        }
    }

    /// The common prefix of all keys of this pipeline (for scans in tests and tools).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Set of channel ids subscribed to `market`.
    pub fn market_channels(&self, market: &str) -> String {
        format!("{}{{m:{market}}}:m2c", self.prefix)
    }

    /// Hash holding the latest state of `market`: `v` (version), `ts`, `msg` (the encoded update).
    pub fn market_state(&self, market: &str) -> String {
        format!("{}{{m:{market}}}:state", self.prefix)
    }

    /// Set of market ids the channel `channel` is subscribed to.
    pub fn channel_markets(&self, channel: &str) -> String {
        format!("{}{{c:{channel}}}:c2m", self.prefix)
    }

    /// Set of markets a channel asked for, written by the publisher's control
    /// API before it produces the commands (so `begin` and `close` know the
    /// channel's markets even before the reducers applied them).
    pub fn channel_registry(&self, channel: &str) -> String {
        format!("{}{{c:{channel}}}:reg", self.prefix)
    }

    /// Sorted set of channel ids scored by when a stream was last open on
    /// them (Unix seconds); publishers expire channels idle for too long.
    pub fn channel_leases(&self) -> String {
        format!("{}channels", self.prefix)
    }

    /// Lock taken by the one publisher that sweeps expired channels.
    pub fn janitor_lock(&self) -> String {
        format!("{}janitor", self.prefix)
    }

    /// Set of markets of data partition `partition` that have at least one
    /// subscriber; a new owner loads a partition's subscriptions from it.
    pub fn partition_markets(&self, partition: i32) -> String {
        format!("{}p2m:{partition}", self.prefix)
    }

    /// The Redis pub/sub channel on which updates for `channel` are published.
    pub fn pubsub_channel(&self, channel: &str) -> String {
        format!("{}ch:{channel}", self.prefix)
    }

    /// Recovers the channel id from a pub/sub channel name of this pipeline.
    pub fn channel_from_pubsub<'a>(&self, name: &'a str) -> Option<&'a str> {
        name.strip_prefix(self.prefix.as_str())?.strip_prefix("ch:")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn market_keys_share_a_hash_tag() {
        let k = Keys::new("odds");
        assert_eq!(k.market_channels("M1"), "sp:odds:{m:M1}:m2c");
        assert_eq!(k.market_state("M1"), "sp:odds:{m:M1}:state");
        assert_eq!(k.channel_markets("c9"), "sp:odds:{c:c9}:c2m");
        assert_eq!(k.partition_markets(3), "sp:odds:p2m:3");
    }

    #[test]
    fn pubsub_names_round_trip() {
        let k = Keys::new("odds");
        let name = k.pubsub_channel("abc-123");
        assert_eq!(k.channel_from_pubsub(&name), Some("abc-123"));
        assert_eq!(k.channel_from_pubsub("sp:other:ch:abc"), None);
    }
}
