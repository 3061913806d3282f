//! The first step of the seed article's cascaded reducer, as a pure type:
//! which markets of one partition match which channels' queries.
//!
//! [`PartitionQueries`] holds the queries of one owned partition (every
//! partition holds every query: a market matching a prefix can live on any
//! partition) and which markets match them now. For each data record it
//! answers whether the market's match set changed and which channels
//! gained or lost the market by it; the core turns that into effects.
//! Queries are indexed by their market prefix, or (without one) by their
//! first field clause, so a record is compared only with the queries whose
//! prefix its id starts with (one hash lookup per distinct prefix length)
//! or whose first field equals the record's (one lookup per distinct field
//! name): a feed of football and tennis queries costs a tennis record
//! nothing per football query (see benchmarks.md, "Query matching"). A `(market, channel)` pair is *held* while at least one of
//! the channel's queries matches the market. Queries are deduplicated
//! across channels (one evaluation per distinct query per record).
//!
//! Matches are decided on a market's updates: a query added now matches an
//! existing market at its next update (the reducer keeps no payloads).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use streampipe_contract::{
    Fields, Query, MAX_QUERIES_PER_CHANNEL, MAX_QUERIES_PER_PIPELINE,
    MAX_QUERY_MATCHES_PER_PARTITION,
};

/// A field's values → the queries whose first field clause names them.
type ByValue = HashMap<Box<str>, HashSet<Arc<str>>>;

/// Why a query command was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The channel holds [`MAX_QUERIES_PER_CHANNEL`] queries already.
    ChannelFull,
    /// The partition holds [`MAX_QUERIES_PER_PIPELINE`] pairs already.
    PipelineFull,
}

#[derive(Debug)]
struct Entry {
    query: Query,
    channels: HashSet<Arc<str>>,
    /// Markets this query matches now.
    markets: HashSet<Arc<str>>,
}

/// A market's match set changed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MatchChange {
    /// The market.
    pub market: Arc<str>,
    /// Every query matching it now (sorted; empty: none).
    pub matched: Vec<Arc<str>>,
    /// Channels that hold the market now and did not before.
    pub joined: Vec<Arc<str>>,
    /// Channels that held the market and do not any more.
    pub left: Vec<Arc<str>>,
    /// Some query matched it before.
    pub was_matched: bool,
    /// Matches a query it could not join: that query is at
    /// [`MAX_QUERY_MATCHES_PER_PARTITION`].
    pub refused: usize,
}

impl MatchChange {
    /// Some query matches it now.
    pub fn now_matched(&self) -> bool {
        !self.matched.is_empty()
    }
}

/// The queries of one partition and what they match.
#[derive(Debug, Default)]
pub struct PartitionQueries {
    queries: HashMap<Arc<str>, Entry>,
    /// market → queries matching it (never empty).
    matched: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// channel → its queries.
    by_channel: HashMap<Arc<str>, HashSet<Arc<str>>>,
    pairs: usize,
    /// market prefix → the queries with that prefix.
    by_prefix: HashMap<Box<str>, HashSet<Arc<str>>>,
    /// prefix length → distinct prefixes of that length (the lengths a
    /// record's id is looked up at).
    prefix_lens: BTreeMap<usize, usize>,
    /// Queries without a market prefix: first field → its value → queries.
    by_field: HashMap<Box<str>, ByValue>,
}

impl PartitionQueries {
    /// `(channel, query)` pairs held.
    pub fn pair_count(&self) -> usize {
        self.pairs
    }

    /// Distinct queries held.
    pub fn query_count(&self) -> usize {
        self.queries.len()
    }

    /// Markets matched by at least one query.
    pub fn matched_count(&self) -> usize {
        self.matched.len()
    }

    /// Whether some query matches `market`.
    pub fn is_matched(&self, market: &str) -> bool {
        self.matched.contains_key(market)
    }

    /// The queries matching `market`, sorted.
    pub fn matched_of(&self, market: &str) -> Vec<Arc<str>> {
        self.matched.get(market).map(sorted).unwrap_or_default()
    }

    /// Channels holding `market` through a query, sorted.
    pub fn channels_of(&self, market: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .holders(self.matched.get(market).into_iter().flatten())
            .into_iter()
            .map(|c| c.to_string())
            .collect();
        v.sort();
        v
    }

    /// Every `(channel, query)` pair (for a write-back), unsorted.
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.queries
            .iter()
            .flat_map(|(q, e)| e.channels.iter().map(|c| (c.to_string(), q.to_string())))
            .collect()
    }

    /// Every matched market with its queries and the channels holding it
    /// through them (for a write-back), unsorted.
    pub fn matches(&self) -> Vec<(String, Vec<String>, Vec<String>)> {
        self.matched
            .iter()
            .map(|(m, qs)| {
                (
                    m.to_string(),
                    qs.iter().map(|q| q.to_string()).collect(),
                    self.channels_of(m),
                )
            })
            .collect()
    }

    /// Channels holding a market matched by `queries`.
    fn holders<'a>(&self, queries: impl Iterator<Item = &'a Arc<str>>) -> HashSet<Arc<str>> {
        queries
            .filter_map(|q| self.queries.get(q))
            .flat_map(|e| e.channels.iter().cloned())
            .collect()
    }

    /// Whether `channel` holds a market matched by `matched`.
    fn holds(&self, channel: &str, matched: &HashSet<Arc<str>>) -> bool {
        self.by_channel
            .get(channel)
            .is_some_and(|qs| qs.iter().any(|q| matched.contains(q)))
    }

    /// The channel holds `query` from now on. `Ok(false)`: it already did.
    pub fn add(&mut self, channel: &str, canonical: &str, query: Query) -> Result<bool, Refused> {
        let held = self.by_channel.get(channel);
        if held.is_some_and(|qs| qs.contains(canonical)) {
            return Ok(false);
        }
        if held.map_or(0, HashSet::len) >= MAX_QUERIES_PER_CHANNEL {
            return Err(Refused::ChannelFull);
        }
        if self.pairs >= MAX_QUERIES_PER_PIPELINE {
            return Err(Refused::PipelineFull);
        }
        let channel: Arc<str> = channel.into();
        let key: Arc<str> = match self.queries.get_key_value(canonical) {
            Some((k, _)) => k.clone(),
            None => {
                let k: Arc<str> = canonical.into();
                self.index(&k, &query);
                self.queries.insert(
                    k.clone(),
                    Entry {
                        query,
                        channels: HashSet::new(),
                        markets: HashSet::new(),
                    },
                );
                k
            }
        };
        self.queries
            .get_mut(&key)
            .expect("just found or inserted")
            .channels
            .insert(channel.clone());
        self.by_channel.entry(channel).or_default().insert(key);
        self.pairs += 1;
        // Markets the query already matches (another channel's) join this
        // channel too.
        Ok(true)
    }

    fn index(&mut self, key: &Arc<str>, query: &Query) {
        let Some(prefix) = query.market_prefix() else {
            let (field, value) = query.first_field().expect("a query has a clause");
            self.by_field
                .entry(field.into())
                .or_default()
                .entry(value.into())
                .or_default()
                .insert(key.clone());
            return;
        };
        let set = self.by_prefix.entry(prefix.into()).or_default();
        if set.is_empty() {
            *self.prefix_lens.entry(prefix.len()).or_insert(0) += 1;
        }
        set.insert(key.clone());
    }

    fn unindex(&mut self, key: &Arc<str>, query: &Query) {
        let Some(prefix) = query.market_prefix() else {
            let (field, value) = query.first_field().expect("a query has a clause");
            let values = self.by_field.get_mut(field).expect("indexed");
            let set = values.get_mut(value).expect("indexed");
            set.remove(key);
            if set.is_empty() {
                values.remove(value);
                if values.is_empty() {
                    self.by_field.remove(field);
                }
            }
            return;
        };
        let Some(set) = self.by_prefix.get_mut(prefix) else {
            return;
        };
        set.remove(key);
        if set.is_empty() {
            self.by_prefix.remove(prefix);
            let n = self.prefix_lens.get_mut(&prefix.len()).expect("counted");
            *n -= 1;
            if *n == 0 {
                self.prefix_lens.remove(&prefix.len());
            }
        }
    }

    /// Markets `query` matches now that `channel` does not hold otherwise
    /// (the markets a fresh `add` brings at once: the query was already
    /// held by another channel and has matches).
    pub fn joined_by_add(&self, channel: &str, canonical: &str) -> Vec<Arc<str>> {
        let Some(e) = self.queries.get(canonical) else {
            return Vec::new();
        };
        e.markets
            .iter()
            .filter(|m| {
                let matched = &self.matched[*m];
                // Held through another of the channel's queries already?
                !self
                    .by_channel
                    .get(channel)
                    .is_some_and(|qs| qs.iter().any(|q| &**q != canonical && matched.contains(q)))
            })
            .cloned()
            .collect()
    }

    /// The channel drops `query`; the changes to the markets it held
    /// through it (one per market). `None`: the channel did not hold it.
    pub fn remove(&mut self, channel: &str, canonical: &str) -> Option<Vec<MatchChange>> {
        let qs = self.by_channel.get_mut(channel)?;
        let key = qs.take(canonical)?;
        if qs.is_empty() {
            self.by_channel.remove(channel);
        }
        self.pairs -= 1;
        let entry = self.queries.get_mut(&key).expect("indexed query exists");
        entry.channels.remove(channel);
        let gone = entry.channels.is_empty();
        let markets: Vec<Arc<str>> = entry.markets.iter().cloned().collect();
        if gone {
            let e = self.queries.remove(&key).expect("present");
            self.unindex(&key, &e.query);
        }
        let mut changes = Vec::new();
        for market in markets {
            let set = self
                .matched
                .get_mut(&market)
                .expect("matched market indexed");
            if gone {
                set.remove(&key);
            }
            let held = self.holds(channel, &self.matched[&market]);
            let set = &self.matched[&market];
            let mut matched: Vec<Arc<str>> = set.iter().cloned().collect();
            matched.sort();
            if set.is_empty() {
                self.matched.remove(&market);
            }
            if held && !gone {
                continue;
            }
            changes.push(MatchChange {
                market,
                matched,
                joined: Vec::new(),
                left: if held {
                    Vec::new()
                } else {
                    vec![channel.into()]
                },
                was_matched: true,
                refused: 0,
            });
        }
        Some(changes)
    }

    /// Matches one applied record of `market`; `Some` when its match set changed.
    pub fn on_record(&mut self, market: &str, payload: &str) -> Option<MatchChange> {
        if self.queries.is_empty() {
            return None;
        }
        let empty = HashSet::new();
        let old = self.matched.get(market).unwrap_or(&empty);
        // The payload's fields are read once, and only when a candidate
        // query compares one.
        let mut fields: Option<Fields<'_>> = None;
        let no_fields = Fields::none();
        let mut new: HashSet<Arc<str>> = HashSet::new();
        let mut refused = 0;
        let prefixed = self
            .prefix_lens
            .keys()
            .map_while(|&len| market.get(..len))
            .filter_map(|p| self.by_prefix.get(p))
            .flatten();
        if !self.by_field.is_empty() {
            fields = Some(Fields::of(payload));
        }
        let by_field = fields.iter().flat_map(|f| {
            self.by_field.iter().filter_map(move |(name, values)| {
                f.scalar(name).and_then(|text| values.get(text.as_ref()))
            })
        });
        let candidates: Vec<&Arc<str>> = prefixed.chain(by_field.flatten()).collect();
        for k in candidates {
            let e = &self.queries[k];
            if fields.is_none() && e.query.needs_fields() {
                fields = Some(Fields::of(payload));
            }
            if e.query
                .matches(market, fields.as_ref().unwrap_or(&no_fields))
            {
                if old.contains(k) || e.markets.len() < MAX_QUERY_MATCHES_PER_PARTITION {
                    new.insert(k.clone());
                } else {
                    refused += 1;
                }
            }
        }
        if new == *old {
            return (refused > 0).then(|| MatchChange {
                market: market.into(),
                matched: sorted(&new),
                was_matched: !old.is_empty(),
                refused,
                ..MatchChange::default()
            });
        }
        let market: Arc<str> = match self.matched.get_key_value(market) {
            Some((m, _)) => m.clone(),
            None => market.into(),
        };
        let changed: HashSet<Arc<str>> = old.symmetric_difference(&new).cloned().collect();
        let mut joined = Vec::new();
        let mut left = Vec::new();
        for c in self.holders(changed.iter()) {
            match (self.holds(&c, old), self.holds(&c, &new)) {
                (false, true) => joined.push(c),
                (true, false) => left.push(c),
                _ => {}
            }
        }
        joined.sort();
        left.sort();
        for q in &changed {
            let e = self.queries.get_mut(q).expect("changed queries are held");
            if new.contains(q) {
                e.markets.insert(market.clone());
            } else {
                e.markets.remove(&market);
            }
        }
        let was_matched = !old.is_empty();
        let matched = sorted(&new);
        if new.is_empty() {
            self.matched.remove(&market);
        } else {
            self.matched.insert(market.clone(), new);
        }
        Some(MatchChange {
            market,
            matched,
            joined,
            left,
            was_matched,
            refused,
        })
    }

    /// Restores a partition from Redis: its `(channel, query)` pairs and
    /// `(market, queries)` matches. Pairs whose query no longer parses, or
    /// past the limits, and matches of queries not held are dropped.
    /// Returns the markets matched after loading.
    pub fn load(
        &mut self,
        pairs: Vec<(String, String)>,
        matches: Vec<(String, Vec<String>)>,
    ) -> Vec<Arc<str>> {
        *self = PartitionQueries::default();
        for (channel, text) in pairs {
            if let Ok(q) = Query::parse(&text) {
                let canonical = q.canonical();
                let _ = self.add(&channel, &canonical, q);
            }
        }
        let mut loaded = Vec::new();
        for (market, queries) in matches {
            let market: Arc<str> = market.into();
            let set: HashSet<Arc<str>> = queries
                .iter()
                .filter_map(|q| self.queries.get_key_value(q.as_str()))
                .map(|(k, _)| k.clone())
                .collect();
            if set.is_empty() {
                continue;
            }
            for q in &set {
                let e = self.queries.get_mut(q).expect("filtered to held");
                e.markets.insert(market.clone());
            }
            self.matched.insert(market.clone(), set);
            loaded.push(market);
        }
        loaded
    }
}

fn sorted(set: &HashSet<Arc<str>>) -> Vec<Arc<str>> {
    let mut v: Vec<Arc<str>> = set.iter().cloned().collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(pq: &mut PartitionQueries, c: &str, q: &str) -> Result<bool, Refused> {
        let q = Query::parse(q).unwrap();
        pq.add(c, &q.canonical(), q)
    }

    fn names(v: &[Arc<str>]) -> Vec<&str> {
        v.iter().map(|s| &**s).collect()
    }

    #[test]
    fn a_market_joins_when_it_matches_and_leaves_when_it_stops() {
        let mut pq = PartitionQueries::default();
        assert_eq!(add(&mut pq, "c1", "market^=FB.;status=open"), Ok(true));
        assert_eq!(add(&mut pq, "c1", "status=open;market^=FB."), Ok(false));
        assert_eq!(pq.on_record("TN.1", r#"{"status":"open"}"#), None);
        let ch = pq.on_record("FB.1", r#"{"status":"open"}"#).unwrap();
        assert_eq!(names(&ch.joined), ["c1"]);
        assert!(ch.left.is_empty() && !ch.was_matched && ch.now_matched());
        assert!(pq.is_matched("FB.1"));
        // Still matching: nothing to do.
        assert_eq!(pq.on_record("FB.1", r#"{"status":"open","x":1}"#), None);
        let ch = pq.on_record("FB.1", r#"{"status":"suspended"}"#).unwrap();
        assert_eq!(names(&ch.left), ["c1"]);
        assert!(ch.was_matched && !ch.now_matched());
        assert!(!pq.is_matched("FB.1"));
        assert_eq!(pq.matched_count(), 0);
    }

    #[test]
    fn channels_share_queries_and_a_market_stays_while_another_query_holds_it() {
        let mut pq = PartitionQueries::default();
        add(&mut pq, "c1", "market^=FB.").unwrap();
        add(&mut pq, "c1", "status=open").unwrap();
        add(&mut pq, "c2", "market^=FB.").unwrap();
        assert_eq!(pq.query_count(), 2);
        assert_eq!(pq.pair_count(), 3);
        let ch = pq.on_record("FB.1", r#"{"status":"open"}"#).unwrap();
        assert_eq!(names(&ch.joined), ["c1", "c2"]);
        // c1 still holds it by the prefix; nobody leaves.
        let ch = pq.on_record("FB.1", r#"{"status":"closed"}"#).unwrap();
        assert!(ch.joined.is_empty() && ch.left.is_empty());
        assert_eq!(names(&ch.matched), ["market^=FB."]);
        // A third channel adding a query with matches gets them at once.
        add(&mut pq, "c3", "market^=FB.").unwrap();
        assert_eq!(names(&pq.joined_by_add("c3", "market^=FB.")), ["FB.1"]);
        // c2 removes its query: the market leaves c2 only; the query stays.
        let changes = pq.remove("c2", "market^=FB.").unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(names(&changes[0].left), ["c2"]);
        assert_eq!(pq.channels_of("FB.1"), ["c1", "c3"]);
        assert!(pq.remove("c2", "market^=FB.").is_none());
        // c1 drops the prefix, c3 too: the query is gone, so is the match.
        pq.remove("c1", "market^=FB.").unwrap();
        let changes = pq.remove("c3", "market^=FB.").unwrap();
        assert_eq!(names(&changes[0].left), ["c3"]);
        assert!(!changes[0].now_matched());
        assert!(!pq.is_matched("FB.1"));
        assert_eq!(pq.pair_count(), 1);
    }

    #[test]
    fn removing_one_of_two_matching_queries_keeps_the_market() {
        let mut pq = PartitionQueries::default();
        add(&mut pq, "c1", "market^=FB.").unwrap();
        add(&mut pq, "c1", "status=open").unwrap();
        pq.on_record("FB.1", r#"{"status":"open"}"#).unwrap();
        // The prefix goes; status=open still holds it for c1.
        let changes = pq.remove("c1", "market^=FB.").unwrap();
        assert_eq!(changes.len(), 1);
        assert!(changes[0].left.is_empty());
        assert_eq!(names(&changes[0].matched), ["status=open"]);
        assert_eq!(pq.channels_of("FB.1"), ["c1"]);
    }

    #[test]
    fn limits_refuse_and_never_panic() {
        let mut pq = PartitionQueries::default();
        for i in 0..MAX_QUERIES_PER_CHANNEL {
            add(&mut pq, "c1", &format!("market^=P{i}")).unwrap();
        }
        assert_eq!(add(&mut pq, "c1", "market^=X"), Err(Refused::ChannelFull));
        let mut c = 0;
        while pq.pair_count() < MAX_QUERIES_PER_PIPELINE {
            c += 1;
            add(&mut pq, &format!("k{c}"), "market^=X").unwrap();
        }
        assert_eq!(add(&mut pq, "other", "a=1"), Err(Refused::PipelineFull));

        let mut pq = PartitionQueries::default();
        add(&mut pq, "c1", "market^=M").unwrap();
        for i in 0..MAX_QUERY_MATCHES_PER_PARTITION {
            assert!(pq.on_record(&format!("M{i}"), "{}").is_some());
        }
        let ch = pq.on_record("M-over", "{}").unwrap();
        assert_eq!(ch.refused, 1);
        assert!(ch.joined.is_empty() && !ch.now_matched());
        assert!(!pq.is_matched("M-over"));
        // One leaves, then there is room again.
        pq.remove("c1", "market^=M").unwrap();
        assert_eq!(pq.matched_count(), 0);
    }

    #[test]
    fn the_prefix_index_finds_every_matching_query_and_forgets_removed_ones() {
        let mut pq = PartitionQueries::default();
        add(&mut pq, "c1", "market^=F").unwrap();
        add(&mut pq, "c2", "market^=FB.").unwrap();
        add(&mut pq, "c3", "market^=FB.EPL.;status=open").unwrap();
        add(&mut pq, "c4", "status=open").unwrap();
        add(&mut pq, "c5", "market^=TN.").unwrap();
        let ch = pq.on_record("FB.EPL.1", r#"{"status":"open"}"#).unwrap();
        assert_eq!(names(&ch.joined), ["c1", "c2", "c3", "c4"]);
        assert_eq!(pq.on_record("F", "{}").unwrap().joined.len(), 1, "c1 only");
        assert_eq!(pq.on_record("", "{}"), None);
        // Prefixes of one length share a slot; removing one keeps the other.
        add(&mut pq, "c6", "market^=TX.").unwrap();
        pq.remove("c5", "market^=TN.").unwrap();
        assert_eq!(pq.on_record("TN.1", "{}"), None);
        assert_eq!(names(&pq.on_record("TX.1", "{}").unwrap().joined), ["c6"]);
        pq.remove("c6", "market^=TX.").unwrap();
        assert!(!pq.prefix_lens.contains_key(&3) || pq.by_prefix.contains_key("FB."));
        pq.remove("c2", "market^=FB.").unwrap();
        assert!(!pq.prefix_lens.contains_key(&3), "{:?}", pq.prefix_lens);
        assert_eq!(pq.by_prefix.len(), 2);
    }

    #[test]
    fn load_restores_what_was_held() {
        let mut pq = PartitionQueries::default();
        add(&mut pq, "c1", "market^=FB.").unwrap();
        add(&mut pq, "c2", "status=open").unwrap();
        pq.on_record("FB.1", r#"{"status":"open"}"#);
        pq.on_record("TN.1", r#"{"status":"open"}"#);
        let matches: Vec<(String, Vec<String>)> = ["FB.1", "TN.1", "gone"]
            .iter()
            .map(|m| {
                let qs = pq
                    .matched
                    .get(*m)
                    .map(|s| s.iter().map(|q| q.to_string()).collect())
                    .unwrap_or_else(|| vec!["unheld=1".to_string()]);
                (m.to_string(), qs)
            })
            .collect();
        let mut pairs = pq.pairs();
        pairs.push(("c3".into(), "not a query".into()));
        let mut other = PartitionQueries::default();
        let mut loaded = other.load(pairs, matches);
        loaded.sort();
        assert_eq!(names(&loaded), ["FB.1", "TN.1"]);
        assert_eq!(other.channels_of("FB.1"), ["c1", "c2"]);
        assert_eq!(other.channels_of("TN.1"), ["c2"]);
        assert_eq!(other.pair_count(), 2);
        // And it goes on from there.
        let ch = other.on_record("FB.1", r#"{"status":"closed"}"#).unwrap();
        assert_eq!(names(&ch.left), ["c2"]);
    }
}
