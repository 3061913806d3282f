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
//!
//! A client with no position on a market may resume by time instead
//! (`from_ms`, the JustEat article's `fromMs`): the newest entries are read
//! backwards (`XREVRANGE key + - COUNT n`) and those stamped at or after
//! the time are replayed when the read reached an older entry (or the
//! market's very first one): the history then holds everything since.

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
    /// The update's time (ms since the epoch; 0 when the entry has none).
    pub ts: u64,
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
        let (mut prev, mut msg, mut ts) = (None, None, 0);
        let mut fields = fields.into_iter();
        while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
            match text(&k).as_deref() {
                Some(FIELD_PREV) => prev = text(&v).and_then(|p| p.parse().ok()),
                Some(FIELD_MSG) => msg = bytes(v),
                Some(FIELD_TS) => ts = text(&v).and_then(|t| t.parse().ok()).unwrap_or(0),
                Some(_) | None => {}
            }
        }
        if let (Some(prev), Some(msg)) = (prev, msg) {
            out.push(Entry {
                version,
                prev,
                ts,
                msg,
            });
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

/// Decides for a client resuming by time (`from_ms`) without a position on
/// the market, given the newest entries (newest first, `count` asked for),
/// the market's stored state version, and how many bytes the begin may
/// still queue. The history covers the time when the read reached an entry
/// older than it (everything after that one is here, as a stream is only
/// trimmed at its old end), or the market's first version (`prev` 0) with
/// room to spare in the read.
pub fn decide_from_time(
    from_ms: u64,
    newest_first: Vec<Entry>,
    count: usize,
    state_version: Option<u64>,
    bytes_left: usize,
) -> Verdict {
    let read = newest_first.len();
    let Some(newest) = newest_first.first() else {
        return Verdict::NotRecovered; // no history (yet, or lost with Redis)
    };
    if state_version.is_some_and(|v| v > newest.version) {
        return Verdict::NotRecovered; // the history lags the state: not all here
    }
    let mut wanted: Vec<Entry> = newest_first
        .into_iter()
        .take_while(|e| e.ts >= from_ms)
        .collect();
    let boundary_seen = wanted.len() < read;
    let whole_history = read < count && wanted.last().is_some_and(|e| e.prev == 0);
    if !(boundary_seen || whole_history) {
        return Verdict::NotRecovered;
    }
    if wanted.iter().map(|e| e.msg.len()).sum::<usize>() > bytes_left {
        return Verdict::NotRecovered;
    }
    wanted.reverse();
    Verdict::Recovered(wanted)
}

/// Where a resuming client said it was on a market.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// After this version (`since`, or what the connection already got).
    Version(u64),
    /// Events at or after this time (`from_ms`).
    Time(u64),
}

/// The `recovered` message sent before a history market's replay (or its
/// latest state, when not recovered); it echoes `since` or `from_ms`.
pub fn recovered_message(market: &str, from: Resume, recovered: bool, replayed: usize) -> Bytes {
    let mut v = serde_json::json!({
        "type": "recovered",
        "market": market,
        "recovered": recovered,
        "replayed": replayed,
    });
    match from {
        Resume::Version(since) => v["since"] = since.into(),
        Resume::Time(ms) => v["from_ms"] = ms.into(),
    }
    Bytes::from(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(version: u64, prev: u64) -> Entry {
        t(version, prev, 1)
    }

    fn t(version: u64, prev: u64, ts: u64) -> Entry {
        Entry {
            version,
            prev,
            ts,
            msg: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn resuming_by_time_needs_an_older_entry_or_the_first_one() {
        // Newest first: versions 9 (t=300), 6 (t=200), 5 (t=100, prev 4).
        let newest = || vec![t(9, 6, 300), t(6, 5, 200), t(5, 4, 100)];
        assert_eq!(
            decide_from_time(150, newest(), 10, Some(9), 1000),
            Verdict::Recovered(vec![t(6, 5, 200), t(9, 6, 300)])
        );
        // Nothing since the time, and an older entry read: up to date.
        assert_eq!(
            decide_from_time(400, newest(), 10, Some(9), 1000),
            Verdict::Recovered(vec![])
        );
        // Every entry read is after the time and the oldest continues an
        // earlier version: trimmed (or beyond the read), not covered.
        assert_eq!(
            decide_from_time(50, newest(), 10, Some(9), 1000),
            Verdict::NotRecovered
        );
        // ... unless it is the market's first version and the read was whole.
        let from_first = vec![t(6, 5, 200), t(5, 0, 100)];
        assert_eq!(
            decide_from_time(50, from_first.clone(), 10, Some(6), 1000),
            Verdict::Recovered(vec![t(5, 0, 100), t(6, 5, 200)])
        );
        assert_eq!(
            decide_from_time(50, from_first, 2, Some(6), 1000),
            Verdict::NotRecovered,
            "a full read may have stopped short of older entries"
        );
        // The state is newer than the history; no history; too many bytes.
        assert_eq!(
            decide_from_time(150, newest(), 10, Some(12), 1000),
            Verdict::NotRecovered
        );
        assert_eq!(
            decide_from_time(150, vec![], 10, Some(9), 1000),
            Verdict::NotRecovered
        );
        assert_eq!(
            decide_from_time(150, newest(), 10, Some(9), 3),
            Verdict::NotRecovered
        );
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
        assert_eq!(got, vec![e(6, 5), e(9, 8)], "ts parsed from the entry");
        assert_eq!(read_count(1), REPLAY_MAX_EVENTS + 1);
        assert_eq!(read_count(10_000), 2);
    }
}
