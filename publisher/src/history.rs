//! Replaying a history market's missed events on `begin` (pure: parsing
//! the stream read and deciding what the client gets; the hub does the I/O).
//!
//! A history market's updates are appended by the reducer to a capped Redis
//! Stream, entry id `<version>-0`, each entry carrying the previous version
//! (`p`; see `streampipe_contract::history`). A client resuming after
//! version `S` gets the entries after `S` — `XRANGE key (S-0 + COUNT n` —
//! when they provably continue `S`: the first one's `p` is at most `S` (no
//! entry between was trimmed, and the history did not start after `S`).
//! Then the begin answers `recovered: true` and queues them in order;
//! otherwise `recovered: false` and the market's latest state, as for a
//! market without history.

use bytes::Bytes;
use redis::Value;
use streampipe_contract::history::{entry_version, FIELD_MSG, FIELD_PREV, FIELD_TS};

/// Most history events one `begin` replays over all its markets: a
/// reconnect after a long absence must not turn into an unbounded read; a
/// client further behind gets `recovered: false` and the latest state.
pub const REPLAY_MAX_EVENTS: usize = 1000;

/// Most bytes of history events one `begin` queues: half the outbox's
/// conflation threshold, so live events still fit behind a full replay
/// (a history market's events are never conflated; see `outbox`).
pub const REPLAY_MAX_BYTES: usize = crate::outbox::CONFLATE_AFTER_BYTES / 2;

/// One stream entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The update's version (from the entry id).
    pub version: u64,
    /// The market's version before it (0: none).
    pub prev: u64,
    /// The update as published.
    pub msg: Bytes,
}

/// Entries read per market when `markets` history markets are replayed by
/// one begin: the begin's budget shared evenly, plus one to tell "more".
pub fn read_count(markets: usize) -> usize {
    (REPLAY_MAX_EVENTS / markets.max(1)).max(1) + 1
}

/// Parses an `XRANGE` reply; malformed entries are skipped (and make the
/// continuity check fail, as their versions are missing).
pub fn parse_entries(v: Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(pair) = item else { continue };
        let mut pair = pair.into_iter();
        let (Some(id), Some(Value::Array(fields))) = (pair.next(), pair.next()) else {
            continue;
        };
        let Some(version) = text(&id).as_deref().and_then(entry_version) else {
            continue;
        };
        let (mut prev, mut msg) = (None, None);
        let mut fields = fields.into_iter();
        while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
            match text(&k).as_deref() {
                Some(FIELD_PREV) => prev = text(&v).and_then(|p| p.parse().ok()),
                Some(FIELD_MSG) => msg = bytes(v),
                Some(FIELD_TS) | Some(_) | None => {}
            }
        }
        if let (Some(prev), Some(msg)) = (prev, msg) {
            out.push(Entry { version, prev, msg });
        }
    }
    out
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn bytes(v: Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::from(b)),
        _ => None,
    }
}

/// What a resuming client gets for one history market.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The history covers the whole gap: replay these (maybe none).
    Recovered(Vec<Entry>),
    /// It does not (trimmed, too long, or the history began after the
    /// client's version): the latest state instead.
    NotRecovered,
}

/// Decides for a client at version `since`, given the entries read after
/// it (`count` asked for), the market's stored state version, and how many
/// bytes the begin may still queue.
pub fn decide(
    since: u64,
    entries: Vec<Entry>,
    count: usize,
    state_version: Option<u64>,
    bytes_left: usize,
) -> Verdict {
    if entries.len() >= count {
        return Verdict::NotRecovered; // more than this begin may replay
    }
    let Some(first) = entries.first() else {
        // Nothing after `since` in the history: recovered only if the
        // stored state is not newer either (a history switched on later has
        // no entries for it). No state at all (lost with Redis, or reset):
        // nobody can tell what was missed.
        return match state_version {
            Some(v) if v <= since => Verdict::Recovered(entries),
            _ => Verdict::NotRecovered,
        };
    };
    let size: usize = entries.iter().map(|e| e.msg.len()).sum();
    if first.prev > since || size > bytes_left {
        return Verdict::NotRecovered;
    }
    Verdict::Recovered(entries)
}

/// The `recovered` message sent before a history market's replay (or its
/// latest state, when not recovered).
pub fn recovered_message(market: &str, since: u64, recovered: bool, replayed: usize) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "type": "recovered",
            "market": market,
            "since": since,
            "recovered": recovered,
            "replayed": replayed,
        })
        .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(version: u64, prev: u64) -> Entry {
        Entry {
            version,
            prev,
            msg: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn a_continuous_history_recovers_a_trimmed_or_late_one_does_not() {
        let got = decide(5, vec![e(6, 5), e(9, 6)], 10, Some(9), 1000);
        assert_eq!(got, Verdict::Recovered(vec![e(6, 5), e(9, 6)]));
        // Version 6 was trimmed: the first entry left continues 6, not 5.
        assert_eq!(
            decide(5, vec![e(9, 6)], 10, Some(9), 1000),
            Verdict::NotRecovered
        );
        // Too many for the begin's budget.
        assert_eq!(
            decide(5, vec![e(6, 5), e(7, 6)], 2, Some(7), 1000),
            Verdict::NotRecovered
        );
        // Too many bytes.
        assert_eq!(
            decide(5, vec![e(6, 5)], 10, Some(6), 1),
            Verdict::NotRecovered
        );
        // Up to date; or a history that began after the client's version.
        assert_eq!(
            decide(9, vec![], 10, Some(9), 1000),
            Verdict::Recovered(vec![])
        );
        assert_eq!(decide(5, vec![], 10, Some(9), 1000), Verdict::NotRecovered);
        // Redis lost the market (or it was reset): unknown, so not recovered.
        assert_eq!(decide(5, vec![], 10, None, 1000), Verdict::NotRecovered);
    }

    #[test]
    fn xrange_replies_parse_and_bad_entries_are_skipped() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let entry = |id: &str, p: &str| {
            Value::Array(vec![
                bulk(id),
                Value::Array(vec![
                    bulk("p"),
                    bulk(p),
                    bulk("ts"),
                    bulk("1"),
                    bulk("msg"),
                    bulk("{}"),
                ]),
            ])
        };
        let v = Value::Array(vec![
            entry("6-0", "5"),
            entry("7-1", "6"),
            entry("8-0", "x"),
            entry("9-0", "8"),
        ]);
        let got = parse_entries(v);
        assert_eq!(got, vec![e(6, 5), e(9, 8)]);
        assert_eq!(read_count(1), REPLAY_MAX_EVENTS + 1);
        assert_eq!(read_count(10_000), 2);
    }
}
