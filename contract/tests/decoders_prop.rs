//! Property tests of the contract's decoders (issue #9 item 7): every byte
//! string a producer, a reducer or a stranger can put on a topic or in Redis
//! goes through these functions, so they must never panic, must accept
//! exactly what the documented limits allow, and must give back what the
//! matching encoder wrote. Run briefly in CI with `cargo test` (proptest's
//! default 256 cases per property; `PROPTEST_CASES` raises it for a longer
//! local run).

use proptest::prelude::*;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use streampipe_contract::message::{
    decode_channel_message, decode_command, decode_published, decode_update, encode_command,
    peek_update, validate_market_id, ChannelMessage, Command, CommandKind, ContractError,
    DerivedVersion, MarketUpdate, MAX_ID_LEN, MAX_PAYLOAD_DEPTH, MAX_RECORD_BYTES, MAX_VERSION,
};
use streampipe_contract::{decode_delivery, encode_delivery, DeliveryRecord};

const POS: DerivedVersion = DerivedVersion {
    partition: 3,
    offset: 99,
};

/// Ids of the documented alphabet and length.
fn id() -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9._:-]{{1,{MAX_ID_LEN}}}")).unwrap()
}

/// Strings that try to confuse a depth scanner: brackets, quotes,
/// backslashes and non-ASCII inside JSON strings.
fn tricky_string() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("[".to_owned()),
            Just("{".to_owned()),
            Just("]".to_owned()),
            Just("}".to_owned()),
            Just("\"".to_owned()),
            Just("\\".to_owned()),
            Just("\\\"[".to_owned()),
            Just("é€😀".to_owned()),
            "[a-z ]{0,4}",
        ],
        0..6,
    )
    .prop_map(|parts| parts.concat())
}

/// Small JSON values, nested at most a few levels.
fn leaf() -> impl Strategy<Value = Value> {
    let scalar = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        // Quarters are exact in binary: serde_json's default float parser
        // (no `float_roundtrip`) may be off by one ulp, which the product
        // never sees (payloads stay raw text) but a Value comparison would.
        any::<i32>().prop_map(|n| Value::from(f64::from(n) / 4.0)),
        tricky_string().prop_map(Value::from),
    ];
    scalar.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec((tricky_string(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Object keys for the wrapping levels, picked from a fixed tricky set
/// (cheaper than [`tricky_string`] at forty levels a case).
fn tricky_key() -> impl Strategy<Value = String> {
    proptest::sample::select(vec!["", "a", "[", "{", "]}", "\\\"", "\"[{", "é€"])
        .prop_map(str::to_owned)
}

/// A flat neighbour for a wrapped value: cheap to generate, so deep
/// payloads stay fast to build.
fn sibling() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!([])),
        Just(json!({})),
        tricky_key().prop_map(Value::from),
    ]
}

/// How deep arrays and objects nest in `v` (a scalar is 0).
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A payload whose depth straddles [`MAX_PAYLOAD_DEPTH`]: a small value
/// wrapped in `wraps` arrays or objects (with tricky keys and siblings).
fn payload() -> impl Strategy<Value = Value> {
    (
        leaf(),
        proptest::collection::vec(
            (any::<bool>(), tricky_key(), sibling()),
            0..MAX_PAYLOAD_DEPTH + 4,
        ),
    )
        .prop_map(|(mut v, wraps)| {
            for (as_array, key, sibling) in wraps {
                v = if as_array {
                    json!([sibling, v])
                } else {
                    let mut o = serde_json::Map::new();
                    o.insert(format!("{key}·s"), sibling);
                    o.insert(key, v);
                    Value::Object(o)
                };
            }
            v
        })
}

fn update(market: String, version: u64, ts: i64, payload: &Value) -> MarketUpdate {
    MarketUpdate {
        market,
        version,
        ts,
        payload: RawValue::from_string(payload.to_string()).unwrap(),
    }
}

/// Byte-level damage to a valid encoding: flips, insertions, truncation.
fn damaged(bytes: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = bytes.len().max(1);
    proptest::collection::vec((0..len, any::<u8>(), 0u8..3), 1..6).prop_map(move |edits| {
        let mut b = bytes.clone();
        for (at, byte, op) in edits {
            let at = at.min(b.len());
            match op {
                0 if at < b.len() => b[at] = byte,
                1 => b.insert(at, byte),
                _ => b.truncate(at),
            }
        }
        b
    })
}

/// What any successful decode of a data record must satisfy, whatever the
/// input was.
fn check_update_invariants(u: &MarketUpdate) {
    assert!(
        validate_market_id(&u.market).is_ok(),
        "market {:?}",
        u.market
    );
    assert!(
        (1..=MAX_VERSION).contains(&u.version),
        "version {}",
        u.version
    );
    let reencoded = u.encode_record();
    let again = decode_update(Some(u.market.as_bytes()), &reencoded, None, POS)
        .expect("a decoded update re-encodes to a valid record");
    assert_eq!(
        (&again.market, again.version, again.ts),
        (&u.market, u.version, u.ts)
    );
    assert_eq!(again.payload.get(), u.payload.get());
}

proptest! {
    // Failures print their minimal input; nothing is written to the tree.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    /// A record is accepted exactly when its payload nests at most
    /// MAX_PAYLOAD_DEPTH levels (strings never count) and it fits
    /// MAX_RECORD_BYTES; what is accepted comes back unchanged.
    #[test]
    fn records_decode_exactly_within_the_limits(
        market in id(),
        version in 1..=MAX_VERSION,
        ts in any::<i64>(),
        payload in payload(),
    ) {
        let u = update(market.clone(), version, ts, &payload);
        let bytes = u.encode_record();
        let got = decode_update(Some(market.as_bytes()), &bytes, None, POS);
        let d = depth(&payload);
        match got {
            Ok(back) => {
                prop_assert!(d <= MAX_PAYLOAD_DEPTH, "depth {d} accepted");
                prop_assert!(bytes.len() <= MAX_RECORD_BYTES);
                prop_assert_eq!(&back.market, &market);
                prop_assert_eq!(back.version, version);
                prop_assert_eq!(back.ts, ts);
                // The payload is carried as the producer's text, never re-parsed.
                prop_assert_eq!(back.payload.get(), payload.to_string());
            }
            Err(ContractError::TooDeep) => prop_assert!(d > MAX_PAYLOAD_DEPTH, "depth {d} refused"),
            Err(ContractError::TooLarge(n)) => prop_assert!(n > MAX_RECORD_BYTES),
            Err(e) => prop_assert!(false, "unexpected refusal {e} at depth {d}"),
        }
    }

    /// The published form carries the same head and payload to every
    /// reader of it: the full decoder, the router's peek and the channel
    /// topic's decoder.
    #[test]
    fn published_updates_read_the_same_everywhere(
        market in id(),
        version in 1..=MAX_VERSION,
        ts in any::<i64>(),
        payload in leaf(),
    ) {
        let bytes = update(market.clone(), version, ts, &payload).encode();
        let head = peek_update(&bytes).unwrap();
        prop_assert_eq!((head.market, head.version, head.ts), (market.as_str(), version, Some(ts)));
        prop_assert_eq!(decode_channel_message(&bytes).unwrap(), ChannelMessage::Update(head));
        let full = decode_published(&bytes).unwrap();
        prop_assert_eq!(
            (full.kind.as_str(), full.market.as_str(), full.version, full.ts),
            ("update", market.as_str(), version, ts)
        );
        prop_assert_eq!(full.payload, payload);
    }

    /// Damaged records never panic a decoder, and whatever still decodes is
    /// a valid update.
    #[test]
    fn damaged_records_are_errors_or_valid_updates(
        bytes in (id(), 1..=MAX_VERSION, leaf())
            .prop_flat_map(|(m, v, p)| damaged(update(m, v, 7, &p).encode_record())),
        key in proptest::option::of(id()),
    ) {
        if let Ok(u) = decode_update(key.as_deref().map(str::as_bytes), &bytes, Some(5), POS) {
            check_update_invariants(&u);
        }
        let _ = peek_update(&bytes);
        let _ = decode_published(&bytes);
        let _ = decode_channel_message(&bytes);
        let _ = decode_command(key.as_deref().map(str::as_bytes), &bytes);
        let _ = decode_delivery(&bytes);
    }

    /// Arbitrary bytes: no decoder panics; a data record that decodes is valid.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(u) = decode_update(None, &bytes, None, POS) {
            check_update_invariants(&u);
        }
        if let Ok(h) = peek_update(&bytes) {
            prop_assert!(validate_market_id(h.market).is_ok());
            prop_assert!((1..=MAX_VERSION).contains(&h.version));
        }
        let _ = decode_published(&bytes);
        let _ = decode_channel_message(&bytes);
        let _ = decode_command(None, &bytes);
        let _ = decode_delivery(&bytes);
    }

    /// Commands round-trip; damaged ones are errors or valid commands.
    #[test]
    fn commands_round_trip_and_survive_damage(
        kind in prop_oneof![
            Just(CommandKind::Subscribe),
            Just(CommandKind::Unsubscribe),
            Just(CommandKind::ResetMarket),
        ],
        channel in id(),
        market in id(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
    ) {
        let channel = if kind == CommandKind::ResetMarket { String::new() } else { channel };
        let cmd = Command { kind, channel, market: market.clone() };
        let bytes = encode_command(&cmd);
        prop_assert_eq!(decode_command(Some(market.as_bytes()), &bytes).unwrap(), cmd);
        let mut bad = bytes.clone();
        for (at, byte) in edits {
            let at = at % bad.len();
            bad[at] = byte;
        }
        if let Ok(c) = decode_command(Some(market.as_bytes()), &bad) {
            prop_assert!(validate_market_id(&c.market).is_ok());
            prop_assert_eq!(c.market, market, "the record key decides the market");
            prop_assert_eq!(c.channel.is_empty(), c.kind == CommandKind::ResetMarket);
        }
    }

    /// Delivery-log records round-trip.
    #[test]
    fn delivery_records_round_trip(
        market in id(),
        version in 1..=MAX_VERSION,
        ts in proptest::option::of(any::<i64>()),
        connections in any::<u32>(),
        pod in tricky_string(),
        at in any::<i64>(),
    ) {
        let r = DeliveryRecord { market, version, ts, connections, pod, at };
        prop_assert_eq!(decode_delivery(&encode_delivery(&r)).unwrap(), r);
    }
}

/// Nesting far beyond the limit is refused by the scanner before serde
/// ever recurses (a stack overflow would abort the reducer).
#[test]
fn a_very_deep_record_is_refused_without_recursion() {
    let deep = format!(
        "{{\"payload\":{}{}}}",
        "[".repeat(200_000),
        "]".repeat(200_000)
    );
    let bytes = deep.as_bytes();
    assert!(matches!(
        decode_update(Some(b"m1"), bytes, None, POS),
        Err(ContractError::TooLarge(_)) | Err(ContractError::TooDeep)
    ));
    let small = format!(
        "{{\"payload\":{}1{}}}",
        "[".repeat(5_000),
        "]".repeat(5_000)
    );
    assert_eq!(
        decode_update(Some(b"m1"), small.as_bytes(), None, POS).unwrap_err(),
        ContractError::TooDeep
    );
    // The other decoders rely on serde_json's own recursion limit.
    assert!(decode_published(small.as_bytes()).is_err());
    assert!(peek_update(small.as_bytes()).is_err());
    assert!(decode_command(Some(b"m1"), small.as_bytes()).is_err());
}
