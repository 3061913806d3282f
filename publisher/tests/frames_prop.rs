//! Property tests of the WebSocket client-frame parser (issue #9 item 7):
//! whatever a browser (or anyone holding a socket) sends, the parser never
//! panics, gives back exactly what a well-formed frame says, and refuses a
//! frame whose `since` names an invalid market, too many markets or an
//! out-of-range version.

use std::collections::HashMap;
use std::sync::Arc;

use proptest::prelude::*;
use serde_json::json;
use streampipe_contract::MAX_VERSION;
use streampipe_publisher::api::MAX_MARKETS_PER_CHANNEL;
use streampipe_publisher::frames::{parse, ClientFrame};

fn market() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[A-Za-z0-9._:-]{1,16}").unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// A begin frame with valid entries parses back to exactly its map.
    #[test]
    fn begin_frames_round_trip(since in proptest::collection::hash_map(market(), 0..=MAX_VERSION, 0..20)) {
        let text = json!({"type": "begin", "since": since}).to_string();
        let want: HashMap<Arc<str>, u64> = since.iter().map(|(k, v)| (Arc::from(k.as_str()), *v)).collect();
        prop_assert_eq!(parse(&text), Ok(ClientFrame::Begin { since: want, from_ms: None }));
    }

    /// One bad entry refuses the whole frame.
    #[test]
    fn one_bad_entry_refuses_the_frame(
        mut since in proptest::collection::hash_map(market(), 0..=MAX_VERSION, 0..5),
        bad in prop_oneof![
            Just(("has space".to_owned(), 1u64)),
            Just((String::new(), 1)),
            Just(("x".repeat(129), 1)),
            Just(("ok".to_owned(), MAX_VERSION + 1)),
            Just(("ok".to_owned(), u64::MAX)),
            Just(("m\u{e9}".to_owned(), 1)),
        ],
    ) {
        since.remove(&bad.0);
        since.insert(bad.0, bad.1);
        let text = json!({"type": "begin", "since": since}).to_string();
        prop_assert!(parse(&text).is_err(), "{text}");
    }

    /// Arbitrary text never panics the parser, and whatever it accepts is
    /// within the limits.
    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        if let Ok(ClientFrame::Begin { since, .. }) = parse(&text) {
            prop_assert!(since.len() <= MAX_MARKETS_PER_CHANNEL);
            prop_assert!(since.values().all(|v| *v <= MAX_VERSION));
        }
    }

    /// Damaged frames: errors or valid frames, never a panic.
    #[test]
    fn damaged_frames_are_errors_or_valid(
        since in proptest::collection::hash_map(market(), 0..=MAX_VERSION, 0..4),
        edits in proptest::collection::vec((any::<usize>(), any::<char>()), 1..4),
    ) {
        let mut chars: Vec<char> = json!({"type": "begin", "since": since}).to_string().chars().collect();
        for (at, c) in edits {
            let at = at % chars.len();
            chars[at] = c;
        }
        let text: String = chars.into_iter().collect();
        if let Ok(ClientFrame::Begin { since, .. }) = parse(&text) {
            for m in since.keys() {
                prop_assert!(streampipe_contract::validate_market_id(m).is_ok());
            }
        }
    }
}

#[test]
fn a_begin_for_more_markets_than_a_channel_holds_is_refused() {
    let since: HashMap<String, u64> = (0..=MAX_MARKETS_PER_CHANNEL)
        .map(|i| (format!("m{i}"), 1))
        .collect();
    let text = json!({"type": "begin", "since": since}).to_string();
    assert!(parse(&text).unwrap_err().contains("entries"));
    let fits: HashMap<String, u64> = (0..MAX_MARKETS_PER_CHANNEL)
        .map(|i| (format!("m{i}"), 1))
        .collect();
    assert!(parse(&json!({"type": "begin", "since": fits}).to_string()).is_ok());
}
