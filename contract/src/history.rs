//! Event history: markets whose every applied update matters, not only the
//! latest (bet settlements, account messages — the JustEat article's
//! per-customer Redis Streams, resumed from a point in time).
//!
//! Opt-in per pipeline: a list of market-id prefixes names the *history
//! markets*; for each, the reducer appends every applied update to a capped
//! Redis Stream ([`crate::Keys::market_history`]) in the same script as the
//! state write, and publishers replay the entries a resuming client missed.
//! Everything both sides must agree on is here: which markets, the cap, the
//! entry id scheme and field names.

use crate::message::{validate_market_id, ContractError};

/// Default cap of a market's stream (entries; `XADD MAXLEN ~`): a client
/// that was away for this many events of one market still resumes in order.
pub const DEFAULT_MAX_LEN: u64 = 1000;

/// Largest cap accepted: bounds Redis memory per history market (see
/// docs/operations.md, "Event history") against a typo of a few zeros.
pub const MAX_MAX_LEN: u64 = 1_000_000;

/// Most prefixes in the list: each update checks them all (a linear scan
/// of a few short strings costs nanoseconds).
pub const MAX_PREFIXES: usize = 64;

/// The prefix that makes every market of the pipeline a history market.
pub const ALL_MARKETS: &str = "*";

/// Entry field: the market's version before this update (0: none), so a
/// reader can tell whether the entries it holds continue a given version
/// without gaps (trimming, a reset or history switched on later break it).
pub const FIELD_PREV: &str = "p";
/// Entry field: the update's `ts` (ms since the epoch), for resume by time.
pub const FIELD_TS: &str = "ts";
/// Entry field: the published update message, byte for byte.
pub const FIELD_MSG: &str = "msg";

/// Which markets keep a history, and how long it is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct History {
    prefixes: Vec<String>,
    max_len: u64,
}

impl History {
    /// No history (the default): latest state only.
    pub fn off() -> Self {
        History::default()
    }

    /// Parses a comma-separated prefix list (`""`: off; `"*"`: every
    /// market) and the cap (0: [`DEFAULT_MAX_LEN`]).
    pub fn parse(prefixes: &str, max_len: u64) -> Result<Self, ContractError> {
        let list: Vec<String> = prefixes
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        if list.len() > MAX_PREFIXES {
            return Err(ContractError::Config(format!(
                "history: {} market prefixes, at most {MAX_PREFIXES}",
                list.len()
            )));
        }
        for p in &list {
            if p != ALL_MARKETS {
                validate_market_id(p).map_err(|e| {
                    ContractError::Config(format!("history market prefix {p:?}: {e}"))
                })?;
            }
        }
        if max_len > MAX_MAX_LEN {
            return Err(ContractError::Config(format!(
                "history max length {max_len}, at most {MAX_MAX_LEN}"
            )));
        }
        let max_len = if max_len == 0 {
            DEFAULT_MAX_LEN
        } else {
            max_len
        };
        Ok(History {
            prefixes: list,
            max_len,
        })
    }

    /// Whether any market keeps a history.
    pub fn is_on(&self) -> bool {
        !self.prefixes.is_empty()
    }

    /// Whether `market` keeps a history.
    pub fn applies(&self, market: &str) -> bool {
        self.prefixes
            .iter()
            .any(|p| p == ALL_MARKETS || market.starts_with(p.as_str()))
    }

    /// The stream cap (entries, approximate: `MAXLEN ~`).
    pub fn max_len(&self) -> u64 {
        self.max_len
    }

    /// The prefixes, as configured.
    pub fn prefixes(&self) -> &[String] {
        &self.prefixes
    }
}

/// The stream entry id of `version`: `<version>-0`, so Redis itself refuses
/// a version that is not newer than the last appended, and resuming after a
/// version is `XRANGE key (<version> +`.
pub fn entry_id(version: u64) -> String {
    format!("{version}-0")
}

/// The version of a stream entry id written by [`entry_id`].
pub fn entry_version(id: &str) -> Option<u64> {
    id.strip_suffix("-0")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_select_markets() {
        let h = History::parse("bets., acct:", 0).unwrap();
        assert!(h.is_on());
        assert_eq!(h.max_len(), DEFAULT_MAX_LEN);
        assert!(h.applies("bets.settled.42"));
        assert!(h.applies("acct:7"));
        assert!(!h.applies("football.epl.1"));
        assert!(!History::off().applies("bets.1"));
        assert!(!History::parse("", 5).unwrap().is_on());
        assert!(History::parse("*", 5).unwrap().applies("anything"));
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(History::parse("a{b", 0).is_err());
        assert!(History::parse("a", MAX_MAX_LEN + 1).is_err());
        let many = (0..=MAX_PREFIXES)
            .map(|i| format!("p{i}"))
            .collect::<Vec<_>>();
        assert!(History::parse(&many.join(","), 0).is_err());
    }

    #[test]
    fn entry_ids_round_trip() {
        assert_eq!(entry_id(42), "42-0");
        assert_eq!(entry_version("42-0"), Some(42));
        assert_eq!(entry_version("42-1"), None);
    }
}
