//! The reducer's logic as a pure state machine: `apply(state, event) -> effects`.
//!
//! [`Core`] holds, for the partitions this reducer owns, the market→channels
//! and channel→markets maps. It never talks to Kafka or Redis: the Kafka
//! adapter turns records and rebalances into [`Event`]s, and the Redis adapter
//! carries out the [`Effect`]s `apply` emits, in order. That keeps every rule
//! of the product (who is subscribed, what is malformed, what is misrouted)
//! testable with plain unit tests.
//!
//! Version ordering is deliberately *not* decided here: the Redis adapter's
//! update script compares versions atomically in Redis, which stays correct
//! even when two reducers briefly both believe they own a partition.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use streampipe_contract::{
    decode_command, decode_update, partition_for, CommandKind, ContractError, DerivedVersion, Keys,
    MarketUpdate,
};

/// Which of the two co-partitioned input topics a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// The data topic (market updates).
    Data,
    /// The command topic (subscribe / unsubscribe / begin).
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
    /// `unsubscribe` or `begin` for a channel that is not subscribed to the market.
    UnknownSubscription,
    /// A record for a partition this reducer does not own (late delivery after a revoke).
    UnownedPartition,
    /// A data record whose key does not hash to its partition: it is stored,
    /// but its subscribers (whose commands follow the partitioner) never see it.
    MisroutedData,
}

impl Skip {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::DuplicateSubscribe => "duplicate_subscribe",
            Skip::UnknownSubscription => "unknown_subscription",
            Skip::UnownedPartition => "unowned_partition",
            Skip::MisroutedData => "misrouted_data",
        }
    }
}

/// What the adapters must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Store the market's state if `version` is newer than what Redis has,
    /// and if so publish `message` to every pub/sub channel in `targets`.
    Update {
        /// Market id.
        market: Arc<str>,
        /// The update's version.
        version: u64,
        /// The update's timestamp (ms).
        ts: i64,
        /// The encoded update, as stored and published.
        message: Vec<u8>,
        /// Pub/sub channel names of the subscribed channels (shared snapshot).
        targets: Arc<[Arc<str>]>,
    },
    /// Persist a new subscription in both map directions and the partition index.
    Subscribe {
        /// Partition of the market.
        partition: i32,
        /// Market id.
        market: Arc<str>,
        /// Channel id.
        channel: Arc<str>,
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
        /// The market has no subscriber left.
        market_now_empty: bool,
    },
    /// Publish the market's current state (if any) to the channel.
    Begin {
        /// Market id.
        market: Arc<str>,
        /// Pub/sub channel name of the channel.
        target: Arc<str>,
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
    /// Counted, nothing else to do.
    Skipped(Skip),
}

/// The subscribers of one market.
#[derive(Debug, Default)]
struct MarketSubs {
    channels: HashSet<Arc<str>>,
    /// Pub/sub names of `channels`, rebuilt only when the set changes so an
    /// update costs one reference-count increment, not a copy per channel.
    targets: Arc<[Arc<str>]>,
}

/// The reducer's in-memory state for the partitions it owns.
#[derive(Debug)]
pub struct Core {
    keys: Keys,
    partition_count: u32,
    /// partition → market → subscribers.
    owned: HashMap<i32, HashMap<Arc<str>, MarketSubs>>,
    /// channel → markets, restricted to owned markets.
    channel_markets: HashMap<Arc<str>, HashSet<Arc<str>>>,
}

impl Core {
    /// A core for a pipeline whose topics have `partition_count` partitions.
    pub fn new(keys: Keys, partition_count: u32) -> Self {
        Core {
            keys,
            partition_count,
            owned: HashMap::new(),
            channel_markets: HashMap::new(),
        }
    }

    /// Partitions currently owned, sorted.
    pub fn owned_partitions(&self) -> Vec<i32> {
        let mut p: Vec<i32> = self.owned.keys().copied().collect();
        p.sort_unstable();
        p
    }

    /// Number of (market, channel) pairs held in memory.
    pub fn subscription_count(&self) -> usize {
        self.owned
            .values()
            .flat_map(|m| m.values())
            .map(|s| s.channels.len())
            .sum()
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
            } => self.on_assigned(partition, subscriptions),
            Event::Revoked { partition } => self.on_revoked(partition),
        }
    }

    fn on_assigned(&mut self, partition: i32, subscriptions: Vec<(String, Vec<String>)>) {
        // A re-assignment replaces whatever we had: Redis is the source of truth.
        self.on_revoked(partition);
        let mut markets: HashMap<Arc<str>, MarketSubs> = HashMap::new();
        for (market, channels) in subscriptions {
            if channels.is_empty() {
                continue;
            }
            let market: Arc<str> = market.into();
            let mut subs = MarketSubs::default();
            for c in channels {
                let c: Arc<str> = c.into();
                self.channel_markets
                    .entry(c.clone())
                    .or_default()
                    .insert(market.clone());
                subs.channels.insert(c);
            }
            subs.targets = rebuild_targets(&self.keys, &subs.channels);
            markets.insert(market, subs);
        }
        self.owned.insert(partition, markets);
    }

    fn on_revoked(&mut self, partition: i32) {
        if let Some(markets) = self.owned.remove(&partition) {
            for (market, subs) in markets {
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
                    Ok(update) => self.on_update(r.partition, update, out),
                    Err(e) => Self::dead_letter(&r, &e, out),
                }
            }
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
                    self.on_command(r.partition, cmd.kind, &cmd.market, &cmd.channel, out);
                }
                Err(e) => Self::dead_letter(&r, &e, out),
            },
        }
    }

    fn on_update(&mut self, partition: i32, update: MarketUpdate, out: &mut Vec<Effect>) {
        let message = update.encode();
        let markets = self.owned.get(&partition).expect("checked by on_record");
        let (market, targets) = match markets.get_key_value(update.market.as_str()) {
            Some((m, subs)) => (m.clone(), subs.targets.clone()),
            None => (Arc::from(update.market.as_str()), Arc::from(Vec::new())),
        };
        if self.partition_of(&market) != partition {
            out.push(Effect::Skipped(Skip::MisroutedData));
        }
        out.push(Effect::Update {
            market,
            version: update.version,
            ts: update.ts,
            message,
            targets,
        });
    }

    fn on_command(
        &mut self,
        partition: i32,
        kind: CommandKind,
        market: &str,
        channel: &str,
        out: &mut Vec<Effect>,
    ) {
        let keys = self.keys.clone();
        let markets = self
            .owned
            .get_mut(&partition)
            .expect("checked by on_record");
        match kind {
            CommandKind::Subscribe => {
                let (market, subs) = match markets.get_key_value(market) {
                    Some((m, _)) => {
                        let m = m.clone();
                        let subs = markets.get_mut(&m).expect("just found");
                        (m, subs)
                    }
                    None => {
                        let m: Arc<str> = market.into();
                        (m.clone(), markets.entry(m).or_default())
                    }
                };
                if subs.channels.contains(channel) {
                    out.push(Effect::Skipped(Skip::DuplicateSubscribe));
                    return;
                }
                let channel: Arc<str> = channel.into();
                subs.channels.insert(channel.clone());
                subs.targets = rebuild_targets(&keys, &subs.channels);
                self.channel_markets
                    .entry(channel.clone())
                    .or_default()
                    .insert(market.clone());
                out.push(Effect::Subscribe {
                    partition,
                    market,
                    channel,
                });
            }
            CommandKind::Unsubscribe => {
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
                subs.channels.remove(&channel);
                let market_now_empty = subs.channels.is_empty();
                if market_now_empty {
                    markets.remove(&market);
                } else {
                    subs.targets = rebuild_targets(&keys, &subs.channels);
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
            CommandKind::Begin => {
                let known = markets
                    .get_key_value(market)
                    .filter(|(_, s)| s.channels.contains(channel));
                match known {
                    Some((m, _)) => out.push(Effect::Begin {
                        market: m.clone(),
                        target: keys.pubsub_channel(channel).into(),
                    }),
                    None => out.push(Effect::Skipped(Skip::UnknownSubscription)),
                }
            }
        }
    }
}

fn rebuild_targets(keys: &Keys, channels: &HashSet<Arc<str>>) -> Arc<[Arc<str>]> {
    let mut v: Vec<Arc<str>> = channels
        .iter()
        .map(|c| Arc::from(keys.pubsub_channel(c)))
        .collect();
    v.sort_unstable();
    v.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use streampipe_contract::{encode_command, Command};

    const N: u32 = 8;

    fn core_owning_all() -> Core {
        let mut c = Core::new(Keys::new("t"), N);
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

    fn command(core: &mut Core, kind: CommandKind, channel: &str, market: &str) -> Vec<Effect> {
        let value = encode_command(&Command {
            kind,
            channel: channel.into(),
            market: market.into(),
        });
        let mut out = Vec::new();
        core.apply(
            Event::Record(Record {
                topic: TopicKind::Command,
                partition: p(market),
                offset: 0,
                key: Some(market.as_bytes()),
                value: Some(&value),
                timestamp: None,
            }),
            &mut out,
        );
        out
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

    #[test]
    fn subscribe_then_update_publishes_to_channel() {
        let mut core = core_owning_all();
        let fx = command(&mut core, CommandKind::Subscribe, "c1", "M1");
        assert_eq!(
            fx,
            vec![Effect::Subscribe {
                partition: p("M1"),
                market: "M1".into(),
                channel: "c1".into()
            }]
        );
        assert_eq!(core.channels_of("M1"), vec!["c1"]);
        assert_eq!(core.markets_of("c1"), vec!["M1"]);

        let fx = data(&mut core, "M1", r#"{"version":5,"payload":{"p":1.5}}"#, 10);
        match &fx[..] {
            [Effect::Update {
                market,
                version,
                targets,
                message,
                ..
            }] => {
                assert_eq!(&**market, "M1");
                assert_eq!(*version, 5);
                assert_eq!(targets.len(), 1);
                assert_eq!(&*targets[0], "sp:t:ch:c1");
                let m = streampipe_contract::decode_published(message).unwrap();
                assert_eq!(m.version, 5);
                assert_eq!(m.ts, 123);
            }
            other => panic!("unexpected effects {other:?}"),
        }
    }

    #[test]
    fn update_without_subscribers_is_still_stored() {
        let mut core = core_owning_all();
        let fx = data(&mut core, "M9", r#"{"payload":1}"#, 41);
        assert!(
            matches!(&fx[..], [Effect::Update { version: 42, targets, .. }] if targets.is_empty())
        );
    }

    #[test]
    fn duplicate_subscribe_is_skipped() {
        let mut core = core_owning_all();
        command(&mut core, CommandKind::Subscribe, "c1", "M1");
        let fx = command(&mut core, CommandKind::Subscribe, "c1", "M1");
        assert_eq!(fx, vec![Effect::Skipped(Skip::DuplicateSubscribe)]);
        assert_eq!(core.subscription_count(), 1);
    }

    #[test]
    fn unsubscribe_removes_both_directions() {
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
        let fx = command(&mut core, CommandKind::Unsubscribe, "c2", "M1");
        assert!(matches!(
            &fx[..],
            [Effect::Unsubscribe {
                market_now_empty: true,
                ..
            }]
        ));
        assert_eq!(core.subscription_count(), 0);
        // Updates now go nowhere.
        let fx = data(&mut core, "M1", r#"{"payload":1}"#, 1);
        assert!(matches!(&fx[..], [Effect::Update { targets, .. }] if targets.is_empty()));
    }

    #[test]
    fn unknown_unsubscribe_and_begin_are_skipped() {
        let mut core = core_owning_all();
        assert_eq!(
            command(&mut core, CommandKind::Unsubscribe, "c1", "M1"),
            vec![Effect::Skipped(Skip::UnknownSubscription)]
        );
        assert_eq!(
            command(&mut core, CommandKind::Begin, "c1", "M1"),
            vec![Effect::Skipped(Skip::UnknownSubscription)]
        );
        command(&mut core, CommandKind::Subscribe, "c1", "M1");
        assert_eq!(
            command(&mut core, CommandKind::Begin, "c1", "M1"),
            vec![Effect::Begin {
                market: "M1".into(),
                target: "sp:t:ch:c1".into()
            }]
        );
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
    fn revoke_drops_partition_and_assign_restores_from_snapshot() {
        let mut core = core_owning_all();
        command(&mut core, CommandKind::Subscribe, "c1", "M1");
        let part = p("M1");
        core.apply(Event::Revoked { partition: part }, &mut Vec::new());
        assert!(core.channels_of("M1").is_empty());
        assert!(core.markets_of("c1").is_empty());
        let fx = data(&mut core, "M1", r#"{"payload":1}"#, 0);
        assert_eq!(fx, vec![Effect::Skipped(Skip::UnownedPartition)]);

        core.apply(
            Event::Assigned {
                partition: part,
                subscriptions: vec![("M1".into(), vec!["c1".into(), "c2".into()])],
            },
            &mut Vec::new(),
        );
        assert_eq!(core.channels_of("M1"), vec!["c1", "c2"]);
        assert_eq!(core.markets_of("c2"), vec!["M1"]);
        let fx = data(&mut core, "M1", r#"{"payload":1}"#, 0);
        assert!(matches!(&fx[..], [Effect::Update { targets, .. }] if targets.len() == 2));
    }
}
