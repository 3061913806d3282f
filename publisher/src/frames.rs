//! The frames a browser sends on a WebSocket stream, parsed and checked in
//! one place (pure; `ws.rs` only acts on the result). A frame is at most
//! [`crate::ws::MAX_CLIENT_FRAME`] bytes before it gets here. A `since`, from
//! a begin frame or the stream URL, is checked by one function
//! ([`checked_since`]): valid market ids, at most one entry per market a
//! channel may hold, versions in range; a `from_ms` (resume history markets
//! by time) by [`checked_from_ms`].

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use streampipe_contract::{validate_market_id, MAX_VERSION};

use crate::api::MAX_MARKETS_PER_CHANNEL;
use crate::auth::MAX_TOKEN_BYTES;

/// A checked client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    /// Replay the channel's state, skipping what `since` says the client has.
    Begin {
        /// Market → the version the client already has.
        since: HashMap<Arc<str>, u64>,
        /// History markets the client has no version of: resume from this
        /// time (ms since the epoch; see `crate::history`).
        from_ms: Option<u64>,
    },
    /// The token, as the first frame (when not in the subprotocol).
    Auth {
        /// The JWT.
        token: String,
    },
    /// A newer token of the same subject, before the current one expires.
    Refresh {
        /// The JWT.
        token: String,
    },
}

#[derive(Deserialize)]
// Unknown fields are ignored: a newer client may add some.
#[serde(tag = "type", rename_all = "snake_case")]
enum Raw {
    Begin {
        #[serde(default)]
        since: HashMap<String, u64>,
        #[serde(default)]
        from_ms: Option<u64>,
    },
    Auth {
        token: String,
    },
    Refresh {
        token: String,
    },
}

/// Parses and checks one text frame; the error says why (for the log and
/// the close reason's metric, never echoed with the client's bytes).
pub fn parse(text: &str) -> Result<ClientFrame, String> {
    let raw: Raw = serde_json::from_str(text).map_err(|e| format!("not a client frame: {e}"))?;
    match raw {
        Raw::Begin { since, from_ms } => Ok(ClientFrame::Begin {
            since: checked_since(since)?,
            from_ms: from_ms.map(checked_from_ms).transpose()?,
        }),
        Raw::Auth { token } => checked_token(token).map(|token| ClientFrame::Auth { token }),
        Raw::Refresh { token } => checked_token(token).map(|token| ClientFrame::Refresh { token }),
    }
}

/// Checks a client's `since` (market → the version it has), from a begin
/// frame or the stream URL: valid market ids, at most one entry per market a
/// channel may hold, versions in range. Any bad entry refuses the whole.
pub fn checked_since<M: AsRef<str>>(
    entries: impl IntoIterator<Item = (M, u64)>,
) -> Result<HashMap<Arc<str>, u64>, String> {
    let mut out = HashMap::new();
    for (market, version) in entries {
        let market = market.as_ref();
        validate_market_id(market).map_err(|e| format!("since: {e}"))?;
        if version > MAX_VERSION {
            return Err(format!("since: version {version} above {MAX_VERSION}"));
        }
        out.insert(Arc::from(market), version);
        if out.len() > MAX_MARKETS_PER_CHANNEL {
            return Err(format!(
                "since has more than {MAX_MARKETS_PER_CHANNEL} entries"
            ));
        }
    }
    Ok(out)
}

/// Checks a `from_ms` (a begin frame's or the stream URL's): at most
/// 2^53 − 1, the largest integer a browser's number holds exactly.
pub fn checked_from_ms(ms: u64) -> Result<u64, String> {
    if ms > MAX_VERSION {
        return Err(format!("from_ms {ms} above {MAX_VERSION}"));
    }
    Ok(ms)
}

fn checked_token(token: String) -> Result<String, String> {
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err(format!(
            "token of {} bytes; 1 to {MAX_TOKEN_BYTES}",
            token.len()
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse(r#"{"type":"begin"}"#),
            Ok(ClientFrame::Begin {
                since: HashMap::new(),
                from_ms: None,
            })
        );
        let b = parse(r#"{"type":"begin","since":{"m1":7},"from_ms":1700000000000}"#).unwrap();
        assert_eq!(
            b,
            ClientFrame::Begin {
                since: [(Arc::from("m1"), 7)].into_iter().collect(),
                from_ms: Some(1_700_000_000_000),
            }
        );
        assert!(parse(r#"{"type":"begin","from_ms":9007199254740992}"#)
            .unwrap_err()
            .contains("from_ms"));
        assert!(parse(r#"{"type":"begin","from_ms":-1}"#).is_err());
        assert!(parse(r#"{"type":"begin","since":{"bad id":7}}"#)
            .unwrap_err()
            .contains("since"));
        assert!(parse(r#"{"type":"begin","since":{"m1":9007199254740992}}"#).is_err());
        assert!(parse(r#"{"type":"auth","token":""}"#).is_err());
        assert!(parse(r#"{"type":"unknown"}"#).is_err());
        assert!(parse(r#"{"type":"begin","extra":1}"#).is_ok());
        assert_eq!(
            parse(r#"{"type":"refresh","token":"a.b.c"}"#),
            Ok(ClientFrame::Refresh {
                token: "a.b.c".into()
            })
        );
    }
}
