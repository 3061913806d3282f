//! The reducer's logic as a pure state machine: `apply(state, event) -> effects`.
//!
//! [`Core`] holds, for the partitions this reducer owns, the market→channels
//! and channel→markets maps. It never talks to Kafka or Redis: the Kafka
//! adapter turns records and rebalances into [`Event`]s, and the Redis adapter
//! carries out the [`Effect`]s `apply` emits, in order. That keeps every rule
//! of the product (who is subscribed, what is malformed, what is misrouted,
//! which markets are watched and when to announce them) testable with plain
//! unit tests.
//!
//! Fan-out is not the reducer's business any more: an update of a *watched*
//! market (one with at least one subscribed channel) is published once to the
//! market's topic and the publishers fan it out to their connections. So the
//! core only needs to know *whether* a market is watched, and a subscribe or
//! unsubscribe is O(1) whatever the number of channels on the market.
//!
//! Version ordering is deliberately *not* decided here: the Redis adapter's
//! update script compares versions atomically in Redis, which stays correct
//! even when two reducers briefly both believe they own a partition.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use streampipe_contract::{
    decode_command, decode_query_command, decode_update, is_query_command, partition_for,
    CommandKind, ContractError, DerivedVersion, MarketUpdate, QueryCommandKind,
};

use crate::queries::{MatchChange, PartitionQueries, Refused};

/// Which of the two co-partitioned input topics a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// The data topic (market updates).
    Data,
    /// The command topic (subscribe / unsubscribe).
    Command,
}

impl TopicKind {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            TopicKind::Data => "data",
            TopicKind::Command => "command",
        }
    }
}

/// One Kafka record, borrowed from the consumer.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Source topic.
    pub topic: TopicKind,
    /// Partition number (equal on both topics for one market).
    pub partition: i32,
    /// Offset in that partition.
    pub offset: i64,
    /// Record key (the market id).
    pub key: Option<&'a [u8]>,
    /// Record value; `None` for a tombstone.
    pub value: Option<&'a [u8]>,
    /// Kafka timestamp in ms, if any.
    pub timestamp: Option<i64>,
}

/// Something that happened to the reducer.
#[derive(Debug)]
pub enum Event<'a> {
    /// A record was consumed.
    Record(Record<'a>),
    /// A partition was assigned; its subscriptions were loaded from Redis
    /// as `(market, channels)` pairs.
    Assigned {
        /// The partition number.
        partition: i32,
        /// Subscriptions persisted for the partition's markets.
        subscriptions: Vec<(String, Vec<String>)>,
    },
    /// The queries of a just assigned partition were loaded from Redis
    /// (applied right after its [`Event::Assigned`]).
    QueriesLoaded {
        /// The partition number.
        partition: i32,
        /// `(channel, query)` pairs held for the partition.
        pairs: Vec<(String, String)>,
        /// `(market, queries matching it)` of the partition.
        matches: Vec<(String, Vec<String>)>,
    },
    /// A partition was revoked; forget everything about it.
    Revoked {
        /// The partition number.
        partition: i32,
    },
}

/// Why a record was counted but changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// `subscribe` for a pair that already exists.
    DuplicateSubscribe,
    /// `unsubscribe` for a channel that is not subscribed to the market.
    UnknownSubscription,
    /// A record for a partition this reducer does not own (late delivery after a revoke).
    UnownedPartition,
    /// A data record whose key does not hash to its partition: it is stored,
    /// but its subscribers (whose commands follow the partitioner) never see it.
    MisroutedData,
    /// `add_query` for a query the channel holds already.
    DuplicateQuery,
    /// `remove_query` for a query the channel does not hold.
    UnknownQuery,
    /// `add_query` past the channel's query limit.
    QueryChannelFull,
    /// `add_query` past the pipeline's query limit.
    QueryPipelineFull,
    /// A market matched a query that is at its match limit: not added.
    QueryMatchesFull,
}

impl Skip {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::DuplicateSubscribe => "duplicate_subscribe",
            Skip::UnknownSubscription => "unknown_subscription",
            Skip::UnownedPartition => "unowned_partition",
            Skip::MisroutedData => "misrouted_data",
            Skip::DuplicateQuery => "duplicate_query",
            Skip::UnknownQuery => "unknown_query",
            Skip::QueryChannelFull => "query_limit_channel",
            Skip::QueryPipelineFull => "query_limit_pipeline",
            Skip::QueryMatchesFull => "query_limit_matches",
        }
    }
}

/// What the adapters must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Store the market's state if `version` is newer than what Redis has,
    /// and if so, when the market is watched, publish `message` once to the
    /// market's topic.
    Update {
        /// Market id.
        market: Arc<str>,
        /// The update's version.
        version: u64,
        /// The update's timestamp (ms).
        ts: i64,
        /// The encoded update, as stored and published.
        message: Vec<u8>,
        /// At least one channel is subscribed to the market: publish it.
        /// Unwatched markets are only stored (nobody could receive them).
        watched: bool,
        /// Source partition of the record (for a dead letter when Redis
        /// refuses the version as too far ahead of the stored one).
        partition: i32,
        /// Source offset of the record.
        offset: i64,
    },
    /// Operator reset: delete the market's stored state (its version with
    /// it), so the next update is accepted whatever its version.
    ResetMarket {
        /// Market id.
        market: Arc<str>,
    },
    /// Persist a new subscription in both map directions and the partition
    /// index; when it made the market watched, then announce the market.
    Subscribe {
        /// Partition of the market.
        partition: i32,
        /// Market id.
        market: Arc<str>,
        /// Channel id.
        channel: Arc<str>,
        /// The market had no channel before (0 → 1): its updates were stored
        /// but not published, so its current state must be published now
        /// (after the subscription is persisted) for a publisher that read the
        /// state before the market was watched to miss nothing.
        market_now_watched: bool,
    },
    /// Remove a subscription from both map directions; when it was the
    /// market's last channel, remove the market from the partition index.
    Unsubscribe {
        /// Partition of the market.
        partition: i32,
        /// Market id.
        market: Arc<str>,
        /// Channel id.
        channel: Arc<str>,
        /// The market has no subscriber left: its updates are no longer published.
        market_now_empty: bool,
    },
    /// Publish the market's current stored state (if any) to its topic.
    /// Emitted for every watched market of a newly assigned partition: a
    /// previous owner may have stored an update without publishing it (it
    /// crashed between its pipeline's state write and its announce), and a
    /// publisher must not wait for the market's next update to see it.
    Announce {
        /// Market id.
        market: Arc<str>,
    },
    /// The record is malformed or misrouted: send it to the dead-letter topic and skip it.
    DeadLetter {
        /// Source topic.
        topic: TopicKind,
        /// Source partition.
        partition: i32,
        /// Source offset.
        offset: i64,
        /// Stable reason label for metrics.
        kind: &'static str,
        /// Human-readable reason, carried in a header.
        reason: String,
    },
    /// Persist (or forget) that `channel` holds `query` on `partition`.
    QueryHeld {
        /// The command partition.
        partition: i32,
        /// Channel id.
        channel: Arc<str>,
        /// Canonical query.
        query: Arc<str>,
        /// Added (true) or removed.
        held: bool,
    },
    /// A market's query matches changed: persist its match set, add it to
    /// the query markets of the channels that `joined` and remove it from
    /// those that `left`, tell each of them (`markets` on the channel's
    /// topic, so publishers re-read and send the state of what joined),
    /// and announce the market when that made it watched.
    QueryMatch {
        /// Partition of the market.
        partition: i32,
        /// Market id.
        market: Arc<str>,
        /// Queries matching it now (empty: none; the entry is deleted).
        matched: Vec<Arc<str>>,
        /// Channels that gained the market.
        joined: Vec<Arc<str>>,
        /// Channels that lost it.
        left: Vec<Arc<str>>,
        /// Nobody watched it before (no channel, no query).
        market_now_watched: bool,
    },
    /// Counted, nothing else to do.
    Skipped(Skip),
}

/// The subscribers of one market. A market is in the map only while it has
/// at least one channel, so presence means "watched".
#[derive(Debug, Default)]
struct MarketSubs {
    channels: HashSet<Arc<str>>,
}

/// Counts kept up to date on every change, so the gauges cost O(1) to read
/// and every subscribe/unsubscribe O(1) to account.
#[derive(Debug, Default)]
struct Tally {
    /// (market, channel) pairs.
    pairs: usize,
    /// Markets with at least one channel.
    watched: usize,
    /// Number of watched markets per channel count (only counts > 0 present).
    by_size: HashMap<usize, usize>,
    /// The largest channel count of any watched market (0 when none).
    max: usize,
}

impl Tally {
    /// One market's channel count changed from `from` to `to` (0 = not watched).
    fn moved(&mut self, from: usize, to: usize) {
        self.pairs = self.pairs + to - from;
        if from > 0 {
            let n = self.by_size.get_mut(&from).expect("size was tallied");
            *n -= 1;
            if *n == 0 {
                self.by_size.remove(&from);
            }
        } else {
            self.watched += 1;
        }
        if to > 0 {
            *self.by_size.entry(to).or_insert(0) += 1;
            self.max = self.max.max(to);
        } else {
            self.watched -= 1;
        }
        // The max only drops when its last market shrank or left. After an
        // unsubscribe that market now has max − 1 channels, so this stops at
        // once; a revoke lowers it by at most its old value in total.
        while self.max > 0 && !self.by_size.contains_key(&self.max) {
            self.max -= 1;
        }
    }
}

/// The reducer's in-memory state for the partitions it owns.
#[derive(Debug)]
pub struct Core {
    partition_count: u32,
    /// partition → watched market → subscribers.
    owned: HashMap<i32, HashMap<Arc<str>, MarketSubs>>,
    /// channel → markets, restricted to owned markets.
    channel_markets: HashMap<Arc<str>, HashSet<Arc<str>>>,
    tally: Tally,
    /// partition → its queries and what they match (see [`crate::queries`]).
    queries: HashMap<i32, PartitionQueries>,
}

impl Core {
    /// A core for a pipeline whose topics have `partition_count` partitions.
    pub fn new(partition_count: u32) -> Self {
        Core {
            partition_count,
            owned: HashMap::new(),
            channel_markets: HashMap::new(),
            tally: Tally::default(),
            queries: HashMap::new(),
        }
    }

    /// Partitions currently owned, sorted.
    pub fn owned_partitions(&self) -> Vec<i32> {
        let mut p: Vec<i32> = self.owned.keys().copied().collect();
        p.sort_unstable();
        p
    }

    /// Number of (market, channel) pairs held in memory. O(1).
    pub fn subscription_count(&self) -> usize {
        self.tally.pairs
    }

    /// Number of watched markets (at least one channel) held in memory. O(1).
    pub fn watched_market_count(&self) -> usize {
        self.tally.watched
    }

    /// The largest number of channels subscribed to one market. O(1).
    pub fn max_market_channels(&self) -> usize {
        self.tally.max
    }

    /// Whether `market` has at least one subscribed channel here, or a
    /// query matching it.
    pub fn is_watched(&self, market: &str) -> bool {
        let p = self.partition_of(market);
        self.owned.get(&p).is_some_and(|m| m.contains_key(market))
            || self.queries.get(&p).is_some_and(|q| q.is_matched(market))
    }

    /// `(channel, query)` pairs held over all owned partitions (each
    /// partition holds every query, so this is a multiple of the pipeline's). O(partitions).
    pub fn query_pair_count(&self) -> usize {
        self.queries
            .values()
            .map(PartitionQueries::pair_count)
            .sum()
    }

    /// Markets matched by at least one query. O(partitions).
    pub fn query_matched_count(&self) -> usize {
        self.queries
            .values()
            .map(PartitionQueries::matched_count)
            .sum()
    }

    /// Channels holding `market` through a query, sorted.
    pub fn query_channels_of(&self, market: &str) -> Vec<String> {
        self.queries
            .get(&self.partition_of(market))
            .map(|q| q.channels_of(market))
            .unwrap_or_default()
    }

    /// The query matches of an owned partition: `(market, queries,
    /// channels holding it)` (for a write-back).
    pub fn query_matches_of(&self, partition: i32) -> Vec<(String, Vec<String>, Vec<String>)> {
        self.queries
            .get(&partition)
            .map(PartitionQueries::matches)
            .unwrap_or_default()
    }

    /// The `(channel, query)` pairs of an owned partition (for a write-back).
    pub fn queries_of(&self, partition: i32) -> Vec<(String, String)> {
        self.queries
            .get(&partition)
            .map(PartitionQueries::pairs)
            .unwrap_or_default()
    }

    /// Channel ids subscribed to `market`, sorted (for tests and diagnostics).
    pub fn channels_of(&self, market: &str) -> Vec<String> {
        let p = self.partition_of(market);
        let mut v: Vec<String> = self
            .owned
            .get(&p)
            .and_then(|m| m.get(market))
            .map(|s| s.channels.iter().map(|c| c.to_string()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Market ids `channel` is subscribed to among owned markets, sorted.
    pub fn markets_of(&self, channel: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .channel_markets
            .get(channel)
            .map(|s| s.iter().map(|m| m.to_string()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The subscriptions of an owned partition, `(market, channels)` per
    /// watched market (the shape [`Event::Assigned`] takes): what the
    /// reducer writes back when Redis lost its data. Empty for a partition
    /// not owned.
    pub fn subscriptions_of(&self, partition: i32) -> Vec<(String, Vec<String>)> {
        self.owned
            .get(&partition)
            .map(|markets| {
                markets
                    .iter()
                    .map(|(m, s)| {
                        (
                            m.to_string(),
                            s.channels.iter().map(|c| c.to_string()).collect(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn partition_of(&self, market: &str) -> i32 {
        partition_for(market.as_bytes(), self.partition_count) as i32
    }

    /// Applies one event, appending the resulting effects to `out`.
    pub fn apply(&mut self, event: Event<'_>, out: &mut Vec<Effect>) {
        match event {
            Event::Record(r) => self.on_record(r, out),
            Event::Assigned {
                partition,
                subscriptions,
            } => self.on_assigned(partition, subscriptions, out),
            Event::QueriesLoaded {
                partition,
                pairs,
                matches,
            } => self.on_queries_loaded(partition, pairs, matches, out),
            Event::Revoked { partition } => self.on_revoked(partition),
        }
    }

    fn on_assigned(
        &mut self,
        partition: i32,
        subscriptions: Vec<(String, Vec<String>)>,
        out: &mut Vec<Effect>,
    ) {
        // A re-assignment replaces whatever we had: Redis is the source of truth.
        self.on_revoked(partition);
        let mut markets: HashMap<Arc<str>, MarketSubs> = HashMap::new();
        for (market, channels) in subscriptions {
            if channels.is_empty() {
                continue;
            }
            let market: Arc<str> = market.into();
            let subs = markets.entry(market.clone()).or_default();
            let before = subs.channels.len();
            for c in channels {
                let c: Arc<str> = c.into();
                self.channel_markets
                    .entry(c.clone())
                    .or_default()
                    .insert(market.clone());
                subs.channels.insert(c);
            }
            self.tally.moved(before, subs.channels.len());
            if before == 0 {
                out.push(Effect::Announce { market });
            }
        }
        self.owned.insert(partition, markets);
        self.queries.insert(partition, PartitionQueries::default());
    }

    fn on_queries_loaded(
        &mut self,
        partition: i32,
        pairs: Vec<(String, String)>,
        matches: Vec<(String, Vec<String>)>,
        out: &mut Vec<Effect>,
    ) {
        let Some(concrete) = self.owned.get(&partition) else {
            return;
        };
        let mut pq = PartitionQueries::default();
        for market in pq.load(pairs, matches) {
            // Watched through a query only: a previous owner may have stored
            // an update it did not publish (as for concrete markets).
            if !concrete.contains_key(&market) {
                out.push(Effect::Announce { market });
            }
        }
        self.queries.insert(partition, pq);
    }

    fn on_revoked(&mut self, partition: i32) {
        self.queries.remove(&partition);
        if let Some(markets) = self.owned.remove(&partition) {
            for (market, subs) in markets {
                self.tally.moved(subs.channels.len(), 0);
                for c in subs.channels {
                    if let Some(set) = self.channel_markets.get_mut(&c) {
                        set.remove(&market);
                        if set.is_empty() {
                            self.channel_markets.remove(&c);
                        }
                    }
                }
            }
        }
    }

    fn dead_letter(r: &Record<'_>, err: &ContractError, out: &mut Vec<Effect>) {
        out.push(Effect::DeadLetter {
            topic: r.topic,
            partition: r.partition,
            offset: r.offset,
            kind: err.kind(),
            reason: err.to_string(),
        });
    }

    fn on_record(&mut self, r: Record<'_>, out: &mut Vec<Effect>) {
        if !self.owned.contains_key(&r.partition) {
            out.push(Effect::Skipped(Skip::UnownedPartition));
            return;
        }
        let value = r.value.unwrap_or_default();
        match r.topic {
            TopicKind::Data => {
                let pos = DerivedVersion {
                    partition: r.partition,
                    offset: r.offset,
                };
                match decode_update(r.key, value, r.timestamp, pos) {
                    Ok(update) => self.on_update(r.partition, r.offset, update, out),
                    Err(e) => Self::dead_letter(&r, &e, out),
                }
            }
            TopicKind::Command if is_query_command(value) => self.on_query_command(&r, value, out),
            TopicKind::Command => match decode_command(r.key, value) {
                Ok(cmd) => {
                    let home = self.partition_of(&cmd.market);
                    if home != r.partition {
                        // The command's producer used another partitioner: the
                        // market's data lives elsewhere, so acting here would
                        // write subscriptions nobody reads.
                        out.push(Effect::DeadLetter {
                            topic: r.topic,
                            partition: r.partition,
                            offset: r.offset,
                            kind: "misrouted",
                            reason: format!(
                                "market {:?} belongs to partition {home} (murmur2), command arrived on {}",
                                cmd.market, r.partition
                            ),
                        });
                        return;
                    }
                    match cmd.kind {
                        CommandKind::Subscribe => {
                            self.on_subscribe(r.partition, &cmd.market, &cmd.channel, out)
                        }
                        CommandKind::Unsubscribe => {
                            self.on_unsubscribe(r.partition, &cmd.market, &cmd.channel, out)
                        }
                        CommandKind::ResetMarket => out.push(Effect::ResetMarket {
                            market: cmd.market.into(),
                        }),
                    }
                }
                Err(e) => Self::dead_letter(&r, &e, out),
            },
        }
    }

    fn on_update(
        &mut self,
        partition: i32,
        offset: i64,
        update: MarketUpdate,
        out: &mut Vec<Effect>,
    ) {
        let message = update.encode();
        let misrouted = self.partition_of(&update.market) != partition;
        let markets = self.owned.get(&partition).expect("checked by on_record");
        let (market, concrete) = match markets.get_key_value(update.market.as_str()) {
            Some((m, _)) => (m.clone(), true),
            None => (Arc::from(update.market.as_str()), false),
        };
        if misrouted {
            out.push(Effect::Skipped(Skip::MisroutedData));
        }
        // The cascade's first step: does the market (still) match a query?
        // Misrouted records are stored but never matched: their market's
        // queries' owners are elsewhere.
        let pq = self
            .queries
            .get_mut(&partition)
            .expect("owned with the partition");
        if !misrouted {
            if let Some(change) = pq.on_record(&market, update.payload.get()) {
                Self::query_effects(partition, concrete, change, out);
            }
        }
        let watched = concrete || pq.is_matched(&market);
        out.push(Effect::Update {
            market,
            version: update.version,
            ts: update.ts,
            message,
            watched,
            partition,
            offset,
        });
    }

    /// Effects of one market's changed query matches.
    fn query_effects(partition: i32, concrete: bool, change: MatchChange, out: &mut Vec<Effect>) {
        for _ in 0..change.refused {
            out.push(Effect::Skipped(Skip::QueryMatchesFull));
        }
        let market_now_watched = !concrete && !change.was_matched && change.now_matched();
        if change.was_matched == change.now_matched()
            && change.joined.is_empty()
            && change.left.is_empty()
            && change.refused > 0
        {
            // Only refusals: the match set did not change.
            return;
        }
        out.push(Effect::QueryMatch {
            partition,
            market: change.market,
            matched: change.matched,
            joined: change.joined,
            left: change.left,
            market_now_watched,
        });
    }

    fn on_query_command(&mut self, r: &Record<'_>, value: &[u8], out: &mut Vec<Effect>) {
        let (cmd, query) = match decode_query_command(value) {
            Ok(c) => c,
            Err(e) => return Self::dead_letter(r, &e, out),
        };
        let partition = r.partition;
        let pq = self
            .queries
            .get_mut(&partition)
            .expect("checked by on_record");
        let concrete = self.owned.get(&partition).expect("checked by on_record");
        let channel: Arc<str> = cmd.channel.as_str().into();
        let canonical: Arc<str> = cmd.query.as_str().into();
        match cmd.kind {
            QueryCommandKind::AddQuery => match pq.add(&channel, &canonical, query) {
                Ok(true) => {
                    out.push(Effect::QueryHeld {
                        partition,
                        channel: channel.clone(),
                        query: canonical.clone(),
                        held: true,
                    });
                    // The query may already match markets (another channel's).
                    for market in pq.joined_by_add(&channel, &canonical) {
                        let matched = pq.matched_of(&market);
                        out.push(Effect::QueryMatch {
                            partition,
                            market,
                            matched,
                            joined: vec![channel.clone()],
                            left: Vec::new(),
                            market_now_watched: false,
                        });
                    }
                }
                Ok(false) => out.push(Effect::Skipped(Skip::DuplicateQuery)),
                Err(Refused::ChannelFull) => out.push(Effect::Skipped(Skip::QueryChannelFull)),
                Err(Refused::PipelineFull) => out.push(Effect::Skipped(Skip::QueryPipelineFull)),
            },
            QueryCommandKind::RemoveQuery => match pq.remove(&channel, &canonical) {
                Some(changes) => {
                    out.push(Effect::QueryHeld {
                        partition,
                        channel,
                        query: canonical,
                        held: false,
                    });
                    for change in changes {
                        let concrete = concrete.contains_key(&change.market);
                        Self::query_effects(partition, concrete, change, out);
                    }
                }
                None => out.push(Effect::Skipped(Skip::UnknownQuery)),
            },
        }
    }

    fn on_subscribe(&mut self, partition: i32, market: &str, channel: &str, out: &mut Vec<Effect>) {
        let markets = self
            .owned
            .get_mut(&partition)
            .expect("checked by on_record");
        // Reuse the map's `Arc` for a known market so the effect and the
        // channel index share one allocation.
        let market: Arc<str> = match markets.get_key_value(market) {
            Some((m, _)) => m.clone(),
            None => market.into(),
        };
        let subs = markets.entry(market.clone()).or_default();
        if subs.channels.contains(channel) {
            out.push(Effect::Skipped(Skip::DuplicateSubscribe));
            return;
        }
        let channel: Arc<str> = channel.into();
        let before = subs.channels.len();
        subs.channels.insert(channel.clone());
        self.tally.moved(before, before + 1);
        self.channel_markets
            .entry(channel.clone())
            .or_default()
            .insert(market.clone());
        out.push(Effect::Subscribe {
            partition,
            market,
            channel,
            market_now_watched: before == 0,
        });
    }

    fn on_unsubscribe(
        &mut self,
        partition: i32,
        market: &str,
        channel: &str,
        out: &mut Vec<Effect>,
    ) {
        let markets = self
            .owned
            .get_mut(&partition)
            .expect("checked by on_record");
        let Some((market, subs)) = markets.get_key_value(market) else {
            out.push(Effect::Skipped(Skip::UnknownSubscription));
            return;
        };
        let Some(channel) = subs.channels.get(channel).cloned() else {
            out.push(Effect::Skipped(Skip::UnknownSubscription));
            return;
        };
        let market = market.clone();
        let subs = markets.get_mut(&market).expect("just found");
        let before = subs.channels.len();
        subs.channels.remove(&channel);
        self.tally.moved(before, before - 1);
        let market_now_empty = before == 1;
        if market_now_empty {
            markets.remove(&market);
        }
        if let Some(set) = self.channel_markets.get_mut(&channel) {
            set.remove(&market);
            if set.is_empty() {
                self.channel_markets.remove(&channel);
            }
        }
        out.push(Effect::Unsubscribe {
            partition,
            market,
            channel,
            market_now_empty,
        });
    }
}

#[cfg(test)]
#[path = "core_query_tests.rs"]
mod query_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};
    use streampipe_contract::{encode_command, Command};

    const N: u32 = 8;

    fn core_owning_all() -> Core {
        let mut c = Core::new(N);
        for p in 0..N as i32 {
            c.apply(
                Event::Assigned {
                    partition: p,
                    subscriptions: vec![],
                },
                &mut Vec::new(),
            );
        }
        c
    }

    fn p(market: &str) -> i32 {
        partition_for(market.as_bytes(), N) as i32
    }

    fn raw_command(core: &mut Core, market: &str, value: &[u8]) -> Vec<Effect> {
        let mut out = Vec::new();
        core.apply(
            Event::Record(Record {
                topic: TopicKind::Command,
                partition: p(market),
                offset: 0,
                key: Some(market.as_bytes()),
                value: Some(value),
                timestamp: None,
            }),
            &mut out,
        );
        out
    }

    fn command(core: &mut Core, kind: CommandKind, channel: &str, market: &str) -> Vec<Effect> {
        let value = encode_command(&Command {
            kind,
            channel: channel.into(),
            market: market.into(),
        });
        raw_command(core, market, &value)
    }

    fn data(core: &mut Core, market: &str, value: &str, offset: i64) -> Vec<Effect> {
        let mut out = Vec::new();
        core.apply(
            Event::Record(Record {
                topic: TopicKind::Data,
                partition: p(market),
                offset,
                key: Some(market.as_bytes()),
                value: Some(value.as_bytes()),
                timestamp: Some(123),
            }),
            &mut out,
        );
        out
    }

    fn subscribe(market: &str, channel: &str, market_now_watched: bool) -> Effect {
        Effect::Subscribe {
            partition: p(market),
            market: market.into(),
            channel: channel.into(),
            market_now_watched,
        }
    }

    /// What a reducer writes back after Redis lost its data is exactly what
    /// the partition holds: every channel of every watched market, nothing of
    /// other partitions, nothing unsubscribed.
    #[test]
    fn subscriptions_of_a_partition_round_trip_through_assign() {
        let mut core = core_owning_all();
        for (m, c) in [("A", "c1"), ("A", "c2"), ("B", "c1"), ("C", "c3")] {
            command(&mut core, CommandKind::Subscribe, c, m);
        }
        command(&mut core, CommandKind::Unsubscribe, "c3", "C");
        let sorted = |mut v: Vec<(String, Vec<String>)>| {
            v.iter_mut().for_each(|(_, c)| c.sort());
            v.sort();
            v
        };
        let mut all = Vec::new();
        for part in 0..N as i32 {
            let subs = core.subscriptions_of(part);
            for (m, _) in &subs {
                assert_eq!(p(m), part, "{m} listed under its own partition only");
            }
            // A fresh core assigned these subscriptions holds the same state.
            let mut other = Core::new(N);
            other.apply(
                Event::Assigned {
                    partition: part,
                    subscriptions: subs.clone(),
                },
                &mut Vec::new(),
            );
            assert_eq!(sorted(other.subscriptions_of(part)), sorted(subs.clone()));
            all.extend(subs);
        }
        assert_eq!(
            sorted(all),
            vec![
                ("A".to_string(), vec!["c1".to_string(), "c2".to_string()]),
                ("B".to_string(), vec!["c1".to_string()]),
            ]
        );
        assert!(
            Core::new(N).subscriptions_of(0).is_empty(),
            "not owned: nothing"
        );
    }

    /// Whether the single effect is an update, and if so whether it is watched.
    fn update_watched(fx: &[Effect]) -> bool {
        match fx {
            [Effect::Update { watched, .. }] => *watched,
            other => panic!("expected one update, got {other:?}"),
        }
    }

    /// The tally recomputed from the maps the slow way.
    fn brute_tally(core: &Core) -> (usize, usize, usize) {
        let sizes: Vec<usize> = core
            .owned
            .values()
            .flat_map(|m| m.values())
            .map(|s| s.channels.len())
            .collect();
        assert!(sizes.iter().all(|&n| n > 0), "no empty market is kept");
        (
            sizes.iter().sum(),
            sizes.len(),
            sizes.iter().copied().max().unwrap_or(0),
        )
    }

    fn tally(core: &Core) -> (usize, usize, usize) {
        (
            core.subscription_count(),
            core.watched_market_count(),
            core.max_market_channels(),
        )
    }

    #[test]
    fn subscribe_watches_the_market_and_updates_are_published() {
        let mut core = core_owning_all();
        let fx = command(&mut core, CommandKind::Subscribe, "c1", "M1");
        assert_eq!(fx, vec![subscribe("M1", "c1", true)]);
        assert_eq!(core.channels_of("M1"), vec!["c1"]);
        assert_eq!(core.markets_of("c1"), vec!["M1"]);
        assert!(core.is_watched("M1"));

        let fx = data(&mut core, "M1", r#"{"version":5,"payload":{"p":1.5}}"#, 10);
        match &fx[..] {
            [Effect::Update {
                market,
                version,
                watched,
                message,
                ..
            }] => {
                assert_eq!(&**market, "M1");
                assert_eq!(*version, 5);
                assert!(*watched);
                let m = streampipe_contract::decode_published(message).unwrap();
                assert_eq!(m.version, 5);
                assert_eq!(m.ts, 123);
            }
            other => panic!("unexpected effects {other:?}"),
        }
    }

    #[test]
    fn only_the_first_channel_makes_a_market_watched() {
        let mut core = core_owning_all();
        assert_eq!(
            command(&mut core, CommandKind::Subscribe, "c1", "M1"),
            vec![subscribe("M1", "c1", true)]
        );
        assert_eq!(
            command(&mut core, CommandKind::Subscribe, "c2", "M1"),
            vec![subscribe("M1", "c2", false)]
        );
        // Another market is watched on its own.
        assert_eq!(
            command(&mut core, CommandKind::Subscribe, "c1", "M2"),
            vec![subscribe("M2", "c1", true)]
        );
        // Back to zero and up again: watched again, so announced again.
        command(&mut core, CommandKind::Unsubscribe, "c1", "M1");
        command(&mut core, CommandKind::Unsubscribe, "c2", "M1");
        assert_eq!(
            command(&mut core, CommandKind::Subscribe, "c3", "M1"),
            vec![subscribe("M1", "c3", true)]
        );
    }

    #[test]
    fn update_without_subscribers_is_stored_not_published() {
        let mut core = core_owning_all();
        let fx = data(&mut core, "M9", r#"{"payload":1}"#, 41);
        assert!(matches!(
            &fx[..],
            [Effect::Update {
                version: 42,
                watched: false,
                ..
            }]
        ));
    }

    #[test]
    fn duplicate_subscribe_is_skipped() {
        let mut core = core_owning_all();
        command(&mut core, CommandKind::Subscribe, "c1", "M1");
        let fx = command(&mut core, CommandKind::Subscribe, "c1", "M1");
        assert_eq!(fx, vec![Effect::Skipped(Skip::DuplicateSubscribe)]);
        assert_eq!(tally(&core), (1, 1, 1));
    }

    #[test]
    fn unsubscribe_removes_both_directions_and_the_last_one_unwatches() {
        let mut core = core_owning_all();
        command(&mut core, CommandKind::Subscribe, "c1", "M1");
        command(&mut core, CommandKind::Subscribe, "c2", "M1");
        let fx = command(&mut core, CommandKind::Unsubscribe, "c1", "M1");
        assert!(matches!(
            &fx[..],
            [Effect::Unsubscribe {
                market_now_empty: false,
                ..
            }]
        ));
        assert_eq!(core.channels_of("M1"), vec!["c2"]);
        assert!(core.markets_of("c1").is_empty());
        assert!(update_watched(&data(
            &mut core,
            "M1",
            r#"{"payload":1}"#,
            1
        )));
        let fx = command(&mut core, CommandKind::Unsubscribe, "c2", "M1");
        assert!(matches!(
            &fx[..],
            [Effect::Unsubscribe {
                market_now_empty: true,
                ..
            }]
        ));
        assert_eq!(tally(&core), (0, 0, 0));
        assert!(!core.is_watched("M1"));
        // Updates are now stored only.
        assert!(!update_watched(&data(
            &mut core,
            "M1",
            r#"{"payload":1}"#,
            2
        )));
    }

    #[test]
    fn unknown_unsubscribe_is_skipped_and_begin_is_no_command() {
        let mut core = core_owning_all();
        assert_eq!(
            command(&mut core, CommandKind::Unsubscribe, "c1", "M1"),
            vec![Effect::Skipped(Skip::UnknownSubscription)]
        );
        command(&mut core, CommandKind::Subscribe, "c1", "M1");
        assert_eq!(
            command(&mut core, CommandKind::Unsubscribe, "c2", "M1"),
            vec![Effect::Skipped(Skip::UnknownSubscription)]
        );
        // The publisher serves `begin` itself now; an old producer's begin is
        // dead-lettered, not applied.
        let fx = raw_command(
            &mut core,
            "M1",
            br#"{"v":1,"type":"begin","channel":"c1","market":"M1"}"#,
        );
        assert!(matches!(
            &fx[..],
            [Effect::DeadLetter {
                kind: "invalid_json",
                ..
            }]
        ));
        assert_eq!(core.channels_of("M1"), vec!["c1"]);
    }

    #[test]
    fn oversized_and_deep_records_are_dead_lettered_and_the_partition_flows() {
        let mut core = core_owning_all();
        let big = format!(
            r#"{{"payload":"{}"}}"#,
            "x".repeat(streampipe_contract::MAX_RECORD_BYTES)
        );
        let deep = format!(r#"{{"payload":{}1{}}}"#, "[".repeat(5000), "]".repeat(5000));
        for (value, kind) in [(big.as_str(), "too_large"), (deep.as_str(), "too_deep")] {
            let fx = data(&mut core, "M1", value, 7);
            assert!(
                matches!(&fx[..], [Effect::DeadLetter { kind: k, offset: 7, .. }] if *k == kind),
                "{kind}: {fx:?}"
            );
        }
        // The next record of the partition is applied as usual.
        let fx = data(&mut core, "M1", r#"{"version":3,"payload":1}"#, 8);
        assert!(matches!(
            &fx[..],
            [Effect::Update {
                version: 3,
                offset: 8,
                ..
            }]
        ));
    }

    #[test]
    fn reset_market_command_resets_without_touching_subscriptions() {
        let mut core = core_owning_all();
        command(&mut core, CommandKind::Subscribe, "c1", "M1");
        let fx = raw_command(
            &mut core,
            "M1",
            br#"{"v":1,"type":"reset_market","market":"M1"}"#,
        );
        assert_eq!(
            fx,
            vec![Effect::ResetMarket {
                market: "M1".into()
            }]
        );
        assert_eq!(core.channels_of("M1"), vec!["c1"]);
    }

    #[test]
    fn malformed_records_are_dead_lettered() {
        let mut core = core_owning_all();
        let fx = data(&mut core, "M1", "garbage", 7);
        assert!(matches!(
            &fx[..],
            [Effect::DeadLetter {
                topic: TopicKind::Data,
                offset: 7,
                kind: "unsupported_encoding",
                ..
            }]
        ));
        let mut out = Vec::new();
        core.apply(
            Event::Record(Record {
                topic: TopicKind::Command,
                partition: 0,
                offset: 3,
                key: None,
                value: Some(b"{\"type\":\"subscribe\"}"),
                timestamp: None,
            }),
            &mut out,
        );
        assert!(matches!(
            &out[..],
            [Effect::DeadLetter {
                kind: "invalid_json",
                ..
            }]
        ));
    }

    #[test]
    fn misrouted_command_is_dead_lettered_not_applied() {
        let mut core = core_owning_all();
        let value = encode_command(&Command {
            kind: CommandKind::Subscribe,
            channel: "c1".into(),
            market: "M1".into(),
        });
        let wrong = (p("M1") + 1) % N as i32;
        let mut out = Vec::new();
        core.apply(
            Event::Record(Record {
                topic: TopicKind::Command,
                partition: wrong,
                offset: 0,
                key: Some(b"M1"),
                value: Some(&value),
                timestamp: None,
            }),
            &mut out,
        );
        assert!(matches!(
            &out[..],
            [Effect::DeadLetter {
                kind: "misrouted",
                ..
            }]
        ));
        assert_eq!(core.subscription_count(), 0);
    }

    #[test]
    fn revoke_drops_partition_and_assign_restores_and_announces() {
        let mut core = core_owning_all();
        command(&mut core, CommandKind::Subscribe, "c1", "M1");
        let part = p("M1");
        core.apply(Event::Revoked { partition: part }, &mut Vec::new());
        assert!(core.channels_of("M1").is_empty());
        assert!(core.markets_of("c1").is_empty());
        assert_eq!(tally(&core), (0, 0, 0));
        let fx = data(&mut core, "M1", r#"{"payload":1}"#, 0);
        assert_eq!(fx, vec![Effect::Skipped(Skip::UnownedPartition)]);

        // A market of the same partition that nobody watches any more.
        let idle = (0..)
            .map(|i| format!("idle{i}"))
            .find(|m| p(m) == part)
            .unwrap();
        let mut fx = Vec::new();
        core.apply(
            Event::Assigned {
                partition: part,
                subscriptions: vec![
                    ("M1".into(), vec!["c1".into(), "c2".into()]),
                    (idle.clone(), vec![]),
                ],
            },
            &mut fx,
        );
        assert_eq!(
            fx,
            vec![Effect::Announce {
                market: "M1".into()
            }],
            "every watched market loaded is announced, and only those"
        );
        assert_eq!(core.channels_of("M1"), vec!["c1", "c2"]);
        assert_eq!(core.markets_of("c2"), vec!["M1"]);
        assert_eq!(tally(&core), (2, 1, 2));
        assert!(update_watched(&data(
            &mut core,
            "M1",
            r#"{"payload":1}"#,
            0
        )));
        assert!(!update_watched(&data(
            &mut core,
            &idle,
            r#"{"payload":1}"#,
            1
        )));
        // A re-assignment replaces the partition's state, counts included.
        core.apply(
            Event::Assigned {
                partition: part,
                subscriptions: vec![("M1".into(), vec!["c3".into()])],
            },
            &mut Vec::new(),
        );
        assert_eq!(core.channels_of("M1"), vec!["c3"]);
        assert_eq!(tally(&core), (1, 1, 1));
    }

    /// Subscribing is O(1) whatever the market's channel count: 10 000
    /// channels on one market (and off again) stay far below a second even in
    /// a debug build. Rebuilding a per-market list per command, as the
    /// reducer once did, took ~50 million copies for this.
    #[test]
    fn ten_thousand_subscribes_to_one_market_are_fast() {
        const CHANNELS: usize = 10_000;
        const BUDGET: Duration = Duration::from_secs(1);
        let mut core = core_owning_all();
        let commands: Vec<(Vec<u8>, Vec<u8>)> = (0..CHANNELS)
            .map(|i| {
                let c = format!("ch{i}");
                let sub = |kind| {
                    encode_command(&Command {
                        kind,
                        channel: c.clone(),
                        market: "HOT".into(),
                    })
                };
                (sub(CommandKind::Subscribe), sub(CommandKind::Unsubscribe))
            })
            .collect();
        let t = Instant::now();
        let mut watched = 0;
        for (sub, _) in &commands {
            for e in raw_command(&mut core, "HOT", sub) {
                match e {
                    Effect::Subscribe {
                        market_now_watched, ..
                    } => watched += usize::from(market_now_watched),
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        let took = t.elapsed();
        assert!(took < BUDGET, "{CHANNELS} subscribes took {took:?}");
        assert_eq!(watched, 1, "watched once, on the first subscribe");
        assert_eq!(tally(&core), (CHANNELS, 1, CHANNELS));
        assert!(update_watched(&data(
            &mut core,
            "HOT",
            r#"{"payload":1}"#,
            0
        )));

        let t = Instant::now();
        for (_, unsub) in &commands {
            raw_command(&mut core, "HOT", unsub);
        }
        let took = t.elapsed();
        assert!(took < BUDGET, "{CHANNELS} unsubscribes took {took:?}");
        assert_eq!(tally(&core), (0, 0, 0));
        assert!(!update_watched(&data(
            &mut core,
            "HOT",
            r#"{"payload":1}"#,
            1
        )));
    }

    /// The O(1) counters agree with the maps after any mix of commands,
    /// revokes and assignments.
    #[test]
    fn counters_match_the_maps() {
        let mut core = core_owning_all();
        // A small deterministic generator (no dependency needed for a test).
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for step in 0..5_000 {
            let market = format!("M{}", next(12));
            let channel = format!("c{}", next(30));
            match next(20) {
                0 => {
                    let part = next(N as u64) as i32;
                    core.apply(Event::Revoked { partition: part }, &mut Vec::new());
                }
                1 => {
                    // Reassign a partition with a snapshot of random pairs.
                    let part = next(N as u64) as i32;
                    let subs: Vec<(String, Vec<String>)> = (0..12)
                        .map(|i| format!("M{i}"))
                        .filter(|m| p(m) == part)
                        .map(|m| {
                            let chans = (0..next(5)).map(|_| format!("c{}", next(30))).collect();
                            (m, chans)
                        })
                        .collect();
                    core.apply(
                        Event::Assigned {
                            partition: part,
                            subscriptions: subs,
                        },
                        &mut Vec::new(),
                    );
                }
                2..=11 => {
                    command(&mut core, CommandKind::Subscribe, &channel, &market);
                }
                _ => {
                    command(&mut core, CommandKind::Unsubscribe, &channel, &market);
                }
            }
            assert_eq!(tally(&core), brute_tally(&core), "after step {step}");
        }
    }
}
