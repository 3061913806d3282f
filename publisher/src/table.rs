//! Who on this pod watches what: channels → connections and markets,
//! markets → channels.
//!
//! The hub subscribes a market's topic while at least one local channel
//! holds the market (reference-counted by channels), and a channel's topic
//! while the channel has a connection here. Routing an update costs one
//! lookup plus one push per local connection watching; joining, leaving and
//! changing a channel's markets cost O(markets changed), never O(watchers).
//! Pure bookkeeping: the hub turns the returned topic changes into Redis
//! (un)subscriptions.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::outbox::Outbox;

/// A pub/sub topic whose wanted-ness may have changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TopicRef {
    /// A market's update topic.
    Market(Arc<str>),
    /// A channel's own topic.
    Channel(Arc<str>),
}

#[derive(Debug, Default)]
struct Chan {
    members: HashMap<u64, Arc<Outbox>>,
    markets: HashSet<Arc<str>>,
    /// Held across "read the registry, apply it" so two syncs of one
    /// channel cannot apply their reads out of order.
    sync: Arc<tokio::sync::Mutex<()>>,
}

/// A channel's market set change.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Markets the channel holds now and did not before.
    pub added: Vec<Arc<str>>,
    /// Markets it no longer holds.
    pub removed: Vec<Arc<str>>,
    /// Topics to reconcile with Redis.
    pub topics: Vec<TopicRef>,
}

/// The routing table.
#[derive(Debug, Default)]
pub struct Table {
    channels: HashMap<Arc<str>, Chan>,
    markets: HashMap<Arc<str>, HashSet<Arc<str>>>,
    members: usize,
}

impl Table {
    /// Adds connection `id` to `channel`; returns the channel topic when the
    /// channel is new on this pod.
    pub fn join(&mut self, channel: &str, id: u64, outbox: Arc<Outbox>) -> Option<TopicRef> {
        let (key, new) = match self.channels.get_key_value(channel) {
            Some((k, _)) => (k.clone(), false),
            None => {
                let k: Arc<str> = channel.into();
                self.channels.insert(k.clone(), Chan::default());
                (k, true)
            }
        };
        let chan = self.channels.get_mut(&key).expect("present");
        if chan.members.insert(id, outbox).is_none() {
            self.members += 1;
        }
        new.then_some(TopicRef::Channel(key))
    }

    /// Removes connection `id`; when it was the channel's last, the channel
    /// and its market references go, and the returned topics are no longer wanted.
    pub fn leave(&mut self, channel: &str, id: u64) -> Vec<TopicRef> {
        let Some(chan) = self.channels.get_mut(channel) else {
            return Vec::new();
        };
        if chan.members.remove(&id).is_some() {
            self.members -= 1;
        }
        if !chan.members.is_empty() {
            return Vec::new();
        }
        let (key, chan) = self.channels.remove_entry(channel).expect("present");
        let mut topics = vec![TopicRef::Channel(key.clone())];
        for m in chan.markets {
            if self.unref(&m, &key) {
                topics.push(TopicRef::Market(m));
            }
        }
        topics
    }

    /// The lock a sync of `channel` holds from its registry read until it
    /// applied the result; `None` when the channel has no connection here.
    pub fn sync_lock(&self, channel: &str) -> Option<Arc<tokio::sync::Mutex<()>>> {
        self.channels.get(channel).map(|c| c.sync.clone())
    }

    /// Sets `channel`'s markets to `markets` (a registry read made under the
    /// channel's [`Table::sync_lock`]); `None` when the channel has no
    /// connection here any more.
    pub fn apply_markets(&mut self, channel: &str, markets: &[String]) -> Option<Diff> {
        let (key, chan) = self.channels.get_key_value(channel)?;
        let key = key.clone();
        let wanted: HashSet<&str> = markets.iter().map(String::as_str).collect();
        let removed: Vec<Arc<str>> = chan
            .markets
            .iter()
            .filter(|m| !wanted.contains(&***m))
            .cloned()
            .collect();
        let added: Vec<String> = wanted
            .iter()
            .filter(|m| !chan.markets.contains(**m))
            .map(|m| (*m).to_owned())
            .collect();
        let mut diff = Diff::default();
        for m in removed {
            if self.unref(&m, &key) {
                diff.topics.push(TopicRef::Market(m.clone()));
            }
            diff.removed.push(m);
        }
        for m in added {
            let (mkey, watchers) = match self.markets.get_key_value(m.as_str()) {
                Some((k, _)) => (k.clone(), None),
                None => (Arc::<str>::from(m.as_str()), Some(())),
            };
            let set = self.markets.entry(mkey.clone()).or_default();
            set.insert(key.clone());
            if watchers.is_some() {
                diff.topics.push(TopicRef::Market(mkey.clone()));
            }
            diff.added.push(mkey);
        }
        let chan = self.channels.get_mut(&key).expect("present");
        for m in &diff.removed {
            chan.markets.remove(m);
        }
        for m in &diff.added {
            chan.markets.insert(m.clone());
        }
        Some(diff)
    }

    /// Drops `channel` from `market`'s watchers; true when none is left.
    fn unref(&mut self, market: &Arc<str>, channel: &Arc<str>) -> bool {
        let Some(set) = self.markets.get_mut(market) else {
            return false;
        };
        set.remove(channel);
        if set.is_empty() {
            self.markets.remove(market);
            true
        } else {
            false
        }
    }

    /// Whether Redis should deliver `topic` to this pod.
    pub fn wants(&self, topic: &TopicRef) -> bool {
        match topic {
            TopicRef::Market(m) => self.markets.contains_key(m),
            TopicRef::Channel(c) => self.channels.contains_key(c),
        }
    }

    /// Every topic this pod wants (after a reconnect).
    pub fn all_topics(&self) -> Vec<TopicRef> {
        self.channels
            .keys()
            .map(|c| TopicRef::Channel(c.clone()))
            .chain(self.markets.keys().map(|m| TopicRef::Market(m.clone())))
            .collect()
    }

    /// The topics `channel` needs: its own and its markets'.
    pub fn topics_of(&self, channel: &str) -> Vec<TopicRef> {
        match self.channels.get_key_value(channel) {
            Some((k, c)) => std::iter::once(TopicRef::Channel(k.clone()))
                .chain(c.markets.iter().map(|m| TopicRef::Market(m.clone())))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Calls `f` with every connection watching `market`; returns how many.
    pub fn for_each_watcher(&self, market: &str, mut f: impl FnMut(&Arc<Outbox>)) -> usize {
        let Some(chans) = self.markets.get(market) else {
            return 0;
        };
        let mut n = 0;
        for c in chans {
            if let Some(chan) = self.channels.get(c) {
                for o in chan.members.values() {
                    f(o);
                    n += 1;
                }
            }
        }
        n
    }

    /// Calls `f` with every connection of `channel`.
    pub fn for_each_member(&self, channel: &str, mut f: impl FnMut(&Arc<Outbox>)) {
        if let Some(chan) = self.channels.get(channel) {
            chan.members.values().for_each(&mut f);
        }
    }

    /// Calls `f` with every connection.
    pub fn for_each_connection(&self, mut f: impl FnMut(&Arc<Outbox>)) {
        for chan in self.channels.values() {
            chan.members.values().for_each(&mut f);
        }
    }

    /// Whether `channel` holds `market` here.
    pub fn holds(&self, channel: &str, market: &str) -> bool {
        self.channels
            .get(channel)
            .is_some_and(|c| c.markets.contains(market))
    }

    /// The markets `channel` holds here, sorted.
    pub fn markets_of(&self, channel: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .channels
            .get(channel)
            .map(|c| c.markets.iter().map(|m| m.to_string()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Channel ids with at least one connection here.
    pub fn channel_ids(&self) -> Vec<String> {
        self.channels.keys().map(|c| c.to_string()).collect()
    }

    /// Connections, channels and markets held.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.members, self.channels.len(), self.markets.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn ob() -> Arc<Outbox> {
        Arc::new(Outbox::default())
    }

    fn set(t: &mut Table, ch: &str, markets: &[&str]) -> Diff {
        t.apply_markets(ch, &ms(markets)).unwrap()
    }

    #[test]
    fn market_topics_are_reference_counted_by_channels() {
        let mut t = Table::default();
        assert_eq!(t.join("c1", 1, ob()), Some(TopicRef::Channel("c1".into())));
        let d = set(&mut t, "c1", &["a", "b"]);
        assert_eq!(d.added.len(), 2);
        assert_eq!(d.topics.len(), 2, "both market topics are new");
        assert_eq!(t.join("c2", 2, ob()), Some(TopicRef::Channel("c2".into())));
        let d = set(&mut t, "c2", &["b", "c"]);
        assert_eq!(
            d.topics,
            vec![TopicRef::Market("c".into())],
            "b is held already"
        );
        assert_eq!(t.join("c2", 3, ob()), None, "second connection of c2");
        let mut n = 0;
        assert_eq!(t.for_each_watcher("b", |_| n += 1), 3);
        assert_eq!(n, 3);
        assert_eq!(t.counts(), (3, 2, 3));

        assert!(t.leave("c2", 2).is_empty(), "c2 still has a connection");
        let mut gone = t.leave("c2", 3);
        gone.sort_by_key(|t| format!("{t:?}"));
        assert_eq!(
            gone,
            vec![TopicRef::Channel("c2".into()), TopicRef::Market("c".into())]
        );
        assert!(t.wants(&TopicRef::Market("b".into())), "c1 still holds b");
        let d = set(&mut t, "c1", &["a"]);
        assert_eq!(d.removed, vec![Arc::<str>::from("b")]);
        assert_eq!(d.topics, vec![TopicRef::Market("b".into())]);
        assert!(!t.wants(&TopicRef::Market("b".into())));
        assert_eq!(t.markets_of("c1"), vec!["a"]);
    }

    #[test]
    fn a_channel_without_connections_takes_no_markets() {
        let mut t = Table::default();
        assert!(t.apply_markets("nobody", &ms(&["a"])).is_none());
        assert!(t.sync_lock("nobody").is_none());
        t.join("c1", 1, ob());
        assert!(t.sync_lock("c1").is_some());
        t.leave("c1", 1);
        assert!(t.apply_markets("c1", &ms(&["a"])).is_none());
        assert_eq!(t.counts(), (0, 0, 0));
    }

    #[test]
    fn joining_many_channels_to_one_market_is_linear() {
        let mut t = Table::default();
        let start = std::time::Instant::now();
        for i in 0..20_000u64 {
            let c = format!("c{i}");
            t.join(&c, i, ob());
            set(&mut t, &c, &["hot"]);
        }
        assert_eq!(t.for_each_watcher("hot", |_| {}), 20_000);
        for i in 0..20_000u64 {
            t.leave(&format!("c{i}"), i);
        }
        assert_eq!(t.counts(), (0, 0, 0));
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
    }
}
