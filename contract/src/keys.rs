//! The Redis key schema.
//!
//! Every key of a pipeline starts with `sp:<pipeline>:` — or, for a pipeline
//! the operator runs, `sp:<namespace>/<pipeline>:` — so several pipelines
//! (also same-named ones of two Kubernetes namespaces) can share one Redis. Keys about one market carry the hash tag `{m:<id>}`
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
        Self::scoped(None, pipeline)
    }

    /// Keys for `pipeline` of the Kubernetes `namespace`, if it has one.
    pub fn scoped(namespace: Option<&str>, pipeline: &str) -> Self {
        let prefix = match namespace {
            Some(ns) if !ns.is_empty() => format!("sp:{ns}/{pipeline}:"),
            _ => format!("sp:{pipeline}:"),
        };
        Keys { prefix }
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

    /// The subject owning a channel (token mode): only requests with a
    /// token of that subject see it. Absent in anonymous mode.
    pub fn channel_owner(&self, channel: &str) -> String {
        format!("{}{{c:{channel}}}:owner", self.prefix)
    }

    /// A one-time SSE ticket of `channel` (its value names the subject and
    /// the token's expiry; taken with `GETDEL`, so it works once).
    pub fn channel_ticket(&self, channel: &str, ticket: &str) -> String {
        format!("{}{{c:{channel}}}:ticket:{ticket}", self.prefix)
    }

    /// Sorted set of the channels a client (`sub:<subject>` or `ip:<addr>`)
    /// holds, scored by creation time (Unix seconds): the per-client cap.
    pub fn client_channels(&self, client: &str) -> String {
        format!("{}client:{{{client}}}:channels", self.prefix)
    }

    /// The client a channel counts against (see [`Keys::client_channels`]).
    pub fn channel_client(&self, channel: &str) -> String {
        format!("{}{{c:{channel}}}:client", self.prefix)
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

    /// String holding this Redis' data epoch for the pipeline (see
    /// [`crate::epoch`]): a random id, gone or different after Redis lost data.
    pub fn epoch(&self) -> String {
        format!("{}epoch", self.prefix)
    }

    /// Copy `i` of a marked epoch on a Redis Cluster (see [`crate::epoch`]):
    /// its hash tag puts it in slot
    /// `i × 256`, so every master holds some and a shard that lost its data
    /// while the epoch key's shard did not is noticed.
    pub fn epoch_marker(&self, i: usize) -> String {
        format!("{}epoch:{{{}}}", self.prefix, crate::slot::SPREAD_TAGS[i])
    }

    /// String holding the epoch in which data partition `partition`'s
    /// subscriptions were last written by its owner (on assignment, or when
    /// it wrote them back after a loss).
    pub fn partition_epoch(&self, partition: i32) -> String {
        format!("{}p2e:{partition}", self.prefix)
    }

    /// Set of the canonical queries a channel holds (written by the
    /// publisher's API, like the registry; read by close and listing).
    pub fn channel_queries(&self, channel: &str) -> String {
        format!("{}{{c:{channel}}}:q", self.prefix)
    }

    /// Set of markets a channel receives because one of its queries matches
    /// them (written by the reducers that own the markets). Kept apart from
    /// the registry, which holds what the channel asked for by name, so a
    /// market the channel holds both ways stays when either reason ends.
    pub fn channel_query_markets(&self, channel: &str) -> String {
        format!("{}{{c:{channel}}}:qm", self.prefix)
    }

    /// Set of `<channel> <query>` pairs held for command partition
    /// `partition` (every partition holds every query); a new owner loads it.
    pub fn partition_queries(&self, partition: i32) -> String {
        format!("{}pq:{partition}", self.prefix)
    }

    /// Hash of data partition `partition`: market → the canonical queries
    /// matching it now, newline-separated; a new owner loads it.
    pub fn partition_query_matches(&self, partition: i32) -> String {
        format!("{}pqm:{partition}", self.prefix)
    }

    /// Set of every `<channel> <query>` pair of the pipeline: the API's
    /// per-pipeline query cap.
    pub fn pipeline_queries(&self) -> String {
        format!("{}queries", self.prefix)
    }

    /// Capped stream of every applied update of a history market (see
    /// [`crate::history`]): entry id `<version>-0`, fields `p`, `ts`, `msg`.
    /// Same hash tag as the market's state, so the reducer's script appends
    /// it in the state write's slot (atomic, Redis Cluster-valid).
    pub fn market_history(&self, market: &str) -> String {
        format!("{}{{m:{market}}}:hist", self.prefix)
    }

    /// The pub/sub topic of `market`: every update of a watched market is
    /// published here **once**, whatever the number of watchers. It carries
    /// the market's hash tag, so on Redis Cluster the state write and the
    /// (sharded) publish stay in one slot and one script.
    pub fn market_topic(&self, market: &str) -> String {
        format!("{}{{m:{market}}}:up", self.prefix)
    }

    /// The pub/sub topic of `channel`, for what concerns that channel alone:
    /// `closed`, `markets` (its market set changed) and state replays asked
    /// for through `POST /v1/channels/<id>/begin`.
    pub fn channel_topic(&self, channel: &str) -> String {
        format!("{}{{c:{channel}}}:ch", self.prefix)
    }

    /// Which topic of this pipeline `name` is, if any.
    pub fn parse_topic<'a>(&self, name: &'a str) -> Option<Topic<'a>> {
        let rest = name.strip_prefix(self.prefix.as_str())?;
        if let Some(m) = rest
            .strip_prefix("{m:")
            .and_then(|r| r.strip_suffix("}:up"))
        {
            return Some(Topic::Market(m));
        }
        rest.strip_prefix("{c:")
            .and_then(|r| r.strip_suffix("}:ch"))
            .map(Topic::Channel)
    }
}

/// A pub/sub topic of a pipeline, as named by [`Keys::market_topic`] or
/// [`Keys::channel_topic`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic<'a> {
    /// Updates of one market.
    Market(&'a str),
    /// Messages for one channel.
    Channel(&'a str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn market_keys_share_a_hash_tag() {
        assert_eq!(Keys::scoped(Some("prod"), "odds").prefix(), "sp:prod/odds:");
        assert_eq!(Keys::scoped(Some(""), "odds"), Keys::new("odds"));
        let k = Keys::new("odds");
        assert_eq!(k.market_channels("M1"), "sp:odds:{m:M1}:m2c");
        assert_eq!(k.market_state("M1"), "sp:odds:{m:M1}:state");
        assert_eq!(k.channel_markets("c9"), "sp:odds:{c:c9}:c2m");
        assert_eq!(k.partition_markets(3), "sp:odds:p2m:3");
        assert_eq!(k.epoch(), "sp:odds:epoch");
        assert_eq!(k.partition_epoch(3), "sp:odds:p2e:3");
    }

    #[test]
    fn topics_round_trip_and_share_their_hash_tag() {
        let k = Keys::new("odds");
        let m = k.market_topic("M1");
        assert_eq!(m, "sp:odds:{m:M1}:up");
        assert_eq!(k.parse_topic(&m), Some(Topic::Market("M1")));
        let c = k.channel_topic("abc-123");
        assert_eq!(c, "sp:odds:{c:abc-123}:ch");
        assert_eq!(k.parse_topic(&c), Some(Topic::Channel("abc-123")));
        assert_eq!(k.parse_topic("sp:other:{m:M1}:up"), None);
        assert_eq!(k.parse_topic("sp:odds:{m:M1}:state"), None);
        // The topic and the state hash of a market hash to one slot.
        let tag = |s: &str| s[s.find('{').unwrap()..=s.find('}').unwrap()].to_owned();
        assert_eq!(tag(&m), tag(&k.market_state("M1")));
        assert_eq!(tag(&m), tag(&k.market_history("M1")));
    }
}
