//! Messages on the wire: data records, commands, and published updates.
//!
//! Encoding today is JSON (see `docs/protocol.md`). Components never look at
//! bytes themselves: they call [`decode_update`], [`decode_command`],
//! [`encode_command`] and [`MarketUpdate::encode`], which dispatch on the first
//! byte of a value. A JSON value starts with `{`; any other first byte is
//! reserved for a future binary encoding and is rejected today with
//! [`ContractError::UnsupportedEncoding`], so adding one later changes this
//! module only, not the reducer's logic.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::fmt;

/// Version of the message schema this crate speaks (`"v"` in every message).
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest market or channel id: ids are part of Redis keys and URLs, and a
/// bound keeps a hostile id from bloating every key and log line.
pub const MAX_ID_LEN: usize = 128;

/// Largest version a market may carry: 2^53 - 1, the largest integer a
/// browser's JavaScript number and Redis' Lua number hold exactly.
pub const MAX_VERSION: u64 = (1 << 53) - 1;

/// Largest data-topic record value the reducer accepts (bytes). The data
/// topic is input from outside the project: a bound keeps one record from
/// costing Redis, every publisher and every browser its size again and
/// again. Larger records are dead-lettered as `too_large`.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// Deepest nesting of arrays and objects inside a payload. Browsers and
/// consumers parse payloads recursively; odds payloads are a few levels
/// deep. Deeper records are dead-lettered as `too_deep`.
pub const MAX_PAYLOAD_DEPTH: usize = 32;

/// What [`MarketUpdate::encode`] adds to a record of at most
/// [`MAX_RECORD_BYTES`], at most: the `type` tag, a market id of
/// [`MAX_ID_LEN`] and two 20-digit numbers, when the record had none of them.
pub const MAX_ENCODING_OVERHEAD: usize = 512;

/// Largest published update (the stored and streamed message): publishers
/// size their WebSocket write buffers from it, so every accepted update can
/// reach every client.
pub const MAX_UPDATE_MESSAGE_BYTES: usize = MAX_RECORD_BYTES + MAX_ENCODING_OVERHEAD;

/// Why a message could not be decoded or was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContractError {
    /// The value's first byte selects no encoding this build understands.
    #[error("unsupported encoding (first byte 0x{0:02x}); expected a JSON object")]
    UnsupportedEncoding(u8),
    /// The value was empty.
    #[error("empty value")]
    Empty,
    /// The JSON did not match the schema.
    #[error("invalid JSON message: {0}")]
    Json(String),
    /// The message declares a schema version this build does not speak.
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u32),
    /// A market id is missing or malformed.
    #[error("invalid market id: {0}")]
    InvalidMarket(String),
    /// A channel id is malformed.
    #[error("invalid channel id: {0}")]
    InvalidChannel(String),
    /// The record key and the market named in the value disagree.
    #[error("record key {key:?} does not match market {market:?}")]
    KeyMismatch {
        /// The record key.
        key: String,
        /// The market named in the value.
        market: String,
    },
    /// A record value larger than [`MAX_RECORD_BYTES`].
    #[error("record of {0} bytes; at most {MAX_RECORD_BYTES}")]
    TooLarge(usize),
    /// A payload nested deeper than [`MAX_PAYLOAD_DEPTH`].
    #[error("payload nested deeper than {MAX_PAYLOAD_DEPTH} levels")]
    TooDeep,
    /// A version outside `1..=MAX_VERSION`.
    #[error("version {0} out of range 1..={MAX_VERSION}")]
    VersionOutOfRange(u64),
    /// A deployment setting is invalid ([`crate::deploy`]); never holds a secret.
    #[error("configuration: {0}")]
    Config(String),
}

impl ContractError {
    /// A short, stable label for metrics (`reason="..."`).
    pub fn kind(&self) -> &'static str {
        match self {
            ContractError::UnsupportedEncoding(_) => "unsupported_encoding",
            ContractError::Empty => "empty",
            ContractError::Json(_) => "invalid_json",
            ContractError::UnsupportedVersion(_) => "unsupported_version",
            ContractError::InvalidMarket(_) => "invalid_market",
            ContractError::InvalidChannel(_) => "invalid_channel",
            ContractError::KeyMismatch { .. } => "key_mismatch",
            ContractError::VersionOutOfRange(_) => "version_out_of_range",
            ContractError::TooLarge(_) => "too_large",
            ContractError::TooDeep => "too_deep",
            ContractError::Config(_) => "config",
        }
    }
}

fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("{} bytes, at most {MAX_ID_LEN}", id.len()));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
    {
        return Err(format!(
            "{id:?} contains {c:?}; allowed: A-Z a-z 0-9 . _ - :"
        ));
    }
    Ok(())
}

/// Checks a market id: 1 to [`MAX_ID_LEN`] bytes of `A-Z a-z 0-9 . _ - :`.
pub fn validate_market_id(id: &str) -> Result<(), ContractError> {
    validate_id(id).map_err(ContractError::InvalidMarket)
}

/// Checks a channel id: same alphabet and length as a market id.
pub fn validate_channel_id(id: &str) -> Result<(), ContractError> {
    validate_id(id).map_err(ContractError::InvalidChannel)
}

fn check_encoding(value: &[u8]) -> Result<(), ContractError> {
    match value.iter().find(|b| !b.is_ascii_whitespace()) {
        None => Err(ContractError::Empty),
        Some(b'{') => Ok(()),
        Some(&b) => Err(ContractError::UnsupportedEncoding(b)),
    }
}

/// Whether arrays and objects in `json` nest deeper than `max` (strings,
/// escapes included, are skipped). One pass, no allocation: it runs before
/// the record is parsed at all.
fn nests_deeper_than(json: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn check_version(v: Option<u32>) -> Result<(), ContractError> {
    match v {
        None | Some(PROTOCOL_VERSION) => Ok(()),
        Some(other) => Err(ContractError::UnsupportedVersion(other)),
    }
}

/// Resolves the market of a record from its key and the id in its value.
fn resolve_market(key: Option<&[u8]>, named: Option<&str>) -> Result<String, ContractError> {
    let key = match key {
        Some(k) => Some(
            std::str::from_utf8(k)
                .map_err(|_| ContractError::InvalidMarket("record key is not UTF-8".into()))?,
        ),
        None => None,
    };
    let market = match (key, named) {
        (Some(k), Some(m)) if k != m => {
            return Err(ContractError::KeyMismatch {
                key: k.to_owned(),
                market: m.to_owned(),
            })
        }
        (Some(k), _) => k,
        (None, Some(m)) => m,
        (None, None) => {
            return Err(ContractError::InvalidMarket(
                "no record key and no \"market\" field".into(),
            ))
        }
    };
    validate_market_id(market)?;
    Ok(market.to_owned())
}

/// Where a data record sits in its topic; used to derive a version when the
/// producer sent none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DerivedVersion {
    /// The record's partition.
    pub partition: i32,
    /// The record's offset in that partition.
    pub offset: i64,
}

impl DerivedVersion {
    /// The derived version: `offset + 1`. A market always lives on one
    /// partition (its key decides it), so the offset increases per market;
    /// the partition is implied by the market. `+ 1` keeps 0 free to mean
    /// "no state yet".
    pub fn version(self) -> u64 {
        (self.offset.max(0) as u64) + 1
    }
}

/// One state change of one market, as carried on the data topic and
/// published to subscribers.
#[derive(Debug, Clone)]
pub struct MarketUpdate {
    /// Market id (the record key).
    pub market: String,
    /// Increases with every update of this market; clients drop anything not newer.
    pub version: u64,
    /// Producer's timestamp, milliseconds since the Unix epoch.
    pub ts: i64,
    /// Opaque payload, kept as the producer's raw JSON text and never re-parsed.
    pub payload: Box<RawValue>,
}

#[derive(Deserialize)]
struct DataRecordJson<'a> {
    #[serde(default)]
    v: Option<u32>,
    #[serde(default, borrow)]
    market: Option<&'a str>,
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    ts: Option<i64>,
    payload: Box<RawValue>,
}

/// Decodes a data-topic record.
///
/// `key` is the record key (the market id), `record_ts` the Kafka timestamp
/// used when the value has no `ts`, and `position` derives a version when the
/// value has none.
pub fn decode_update(
    key: Option<&[u8]>,
    value: &[u8],
    record_ts: Option<i64>,
    position: DerivedVersion,
) -> Result<MarketUpdate, ContractError> {
    check_encoding(value)?;
    if value.len() > MAX_RECORD_BYTES {
        return Err(ContractError::TooLarge(value.len()));
    }
    // The record's own object is one level above its payload.
    if nests_deeper_than(value, MAX_PAYLOAD_DEPTH + 1) {
        return Err(ContractError::TooDeep);
    }
    let rec: DataRecordJson<'_> =
        serde_json::from_slice(value).map_err(|e| ContractError::Json(e.to_string()))?;
    check_version(rec.v)?;
    let market = resolve_market(key, rec.market)?;
    let version = rec.version.unwrap_or_else(|| position.version());
    if version == 0 || version > MAX_VERSION {
        return Err(ContractError::VersionOutOfRange(version));
    }
    Ok(MarketUpdate {
        market,
        version,
        ts: rec.ts.or(record_ts).unwrap_or(0),
        payload: rec.payload,
    })
}

impl MarketUpdate {
    /// Encodes the update as producers put it on the data topic (value only;
    /// the key is the market id).
    pub fn encode_record(&self) -> Vec<u8> {
        self.encode_with_type(false)
    }

    /// Encodes the update as published to subscribers and stored as market
    /// state: `{"type":"update","market":..,"version":..,"ts":..,"payload":..}`.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with_type(true)
    }

    fn encode_with_type(&self, typed: bool) -> Vec<u8> {
        let payload = self.payload.get();
        let mut out = Vec::with_capacity(80 + self.market.len() + payload.len());
        out.extend_from_slice(if typed {
            b"{\"type\":\"update\",\"market\":"
        } else {
            b"{\"v\":1,\"market\":"
        });
        // Market ids are validated to a JSON-safe alphabet, but encode through
        // serde anyway so an unvalidated caller cannot produce broken JSON.
        serde_json::to_writer(&mut out, &self.market).expect("writing to a Vec cannot fail");
        out.extend_from_slice(b",\"version\":");
        out.extend_from_slice(self.version.to_string().as_bytes());
        out.extend_from_slice(b",\"ts\":");
        out.extend_from_slice(self.ts.to_string().as_bytes());
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(payload.as_bytes());
        out.push(b'}');
        out
    }
}

/// An update as received by a subscriber (publisher side of the contract).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct PublishedUpdate {
    /// Always `"update"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Market id.
    pub market: String,
    /// The market's version.
    pub version: u64,
    /// Producer's timestamp in ms.
    pub ts: i64,
    /// Opaque payload.
    pub payload: serde_json::Value,
}

/// Decodes an update published by a reducer (or stored as market state).
pub fn decode_published(bytes: &[u8]) -> Result<PublishedUpdate, ContractError> {
    check_encoding(bytes)?;
    serde_json::from_slice(bytes).map_err(|e| ContractError::Json(e.to_string()))
}

/// The part of a published update a router needs: parsed once per message
/// (borrowing the market id), the payload left unread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct UpdateHead<'a> {
    /// Market id.
    #[serde(borrow)]
    pub market: &'a str,
    /// The market's version.
    pub version: u64,
    /// Producer's timestamp in ms, if present.
    #[serde(default)]
    pub ts: Option<i64>,
}

/// Reads the head of a published update (or stored state message) without
/// decoding its payload.
pub fn peek_update(bytes: &[u8]) -> Result<UpdateHead<'_>, ContractError> {
    check_encoding(bytes)?;
    let head: UpdateHead<'_> =
        serde_json::from_slice(bytes).map_err(|e| ContractError::Json(e.to_string()))?;
    validate_market_id(head.market)?;
    if head.version == 0 || head.version > MAX_VERSION {
        return Err(ContractError::VersionOutOfRange(head.version));
    }
    Ok(head)
}

/// A message on a channel's topic (see `Keys::channel_topic`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelMessage<'a> {
    /// The channel was closed through the API: close its streams (4410).
    Closed,
    /// The channel's market set changed: re-read it from the registry.
    MarketsChanged,
    /// A market's state replayed for this channel only (a REST `begin`).
    Update(UpdateHead<'a>),
}

/// Published on a channel's topic when the channel is closed.
pub const CHANNEL_CLOSED: &str = r#"{"type":"closed"}"#;

/// Published on a channel's topic when markets were added or removed.
pub const CHANNEL_MARKETS_CHANGED: &str = r#"{"type":"markets"}"#;

/// Decodes a message received on a channel's topic.
pub fn decode_channel_message(bytes: &[u8]) -> Result<ChannelMessage<'_>, ContractError> {
    if bytes == CHANNEL_CLOSED.as_bytes() {
        return Ok(ChannelMessage::Closed);
    }
    if bytes == CHANNEL_MARKETS_CHANGED.as_bytes() {
        return Ok(ChannelMessage::MarketsChanged);
    }
    peek_update(bytes).map(ChannelMessage::Update)
}

/// What a command asks the owning reducer to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// Start sending `market`'s updates to `channel`.
    Subscribe,
    /// Stop sending `market`'s updates to `channel`.
    Unsubscribe,
    /// Operator action: forget `market`'s stored state and version, so a
    /// market frozen by a bogus version accepts updates again (no channel).
    ResetMarket,
}

impl CommandKind {
    /// Stable lower-case name (also the JSON `type`).
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Subscribe => "subscribe",
            CommandKind::Unsubscribe => "unsubscribe",
            CommandKind::ResetMarket => "reset_market",
        }
    }
}

impl fmt::Display for CommandKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command on the command topic, keyed by market so it lands on the
/// partition of the market's data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// What to do.
    pub kind: CommandKind,
    /// The channel concerned (empty for [`CommandKind::ResetMarket`]).
    pub channel: String,
    /// The market concerned (also the record key).
    pub market: String,
}

#[derive(Deserialize, Serialize)]
struct CommandJson<'a> {
    v: Option<u32>,
    #[serde(rename = "type")]
    kind: CommandKind,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(borrow)]
    market: &'a str,
}

/// Decodes a command-topic record (`key` is the market id).
pub fn decode_command(key: Option<&[u8]>, value: &[u8]) -> Result<Command, ContractError> {
    check_encoding(value)?;
    let c: CommandJson<'_> =
        serde_json::from_slice(value).map_err(|e| ContractError::Json(e.to_string()))?;
    check_version(c.v)?;
    let market = resolve_market(key, Some(c.market))?;
    let channel = match c.kind {
        CommandKind::Subscribe | CommandKind::Unsubscribe => {
            let ch = c
                .channel
                .ok_or_else(|| ContractError::InvalidChannel("missing".into()))?;
            validate_channel_id(ch)?;
            ch.to_owned()
        }
        CommandKind::ResetMarket => String::new(),
    };
    Ok(Command {
        kind: c.kind,
        channel,
        market,
    })
}

/// Encodes a command's value (produce it with the market id as key).
pub fn encode_command(cmd: &Command) -> Vec<u8> {
    serde_json::to_vec(&CommandJson {
        v: Some(PROTOCOL_VERSION),
        kind: cmd.kind,
        channel: Some(cmd.channel.as_str()).filter(|_| cmd.kind != CommandKind::ResetMarket),
        market: &cmd.market,
    })
    .expect("a command always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    const POS: DerivedVersion = DerivedVersion {
        partition: 2,
        offset: 41,
    };

    #[test]
    fn decodes_a_full_update_and_keeps_payload_raw() {
        let v = br#"{"v":1,"market":"M1","version":7,"ts":1000,"payload":{"odds": [1.5, 2.25]}}"#;
        let u = decode_update(Some(b"M1"), v, Some(5), POS).unwrap();
        assert_eq!(u.market, "M1");
        assert_eq!(u.version, 7);
        assert_eq!(u.ts, 1000);
        assert_eq!(u.payload.get(), r#"{"odds": [1.5, 2.25]}"#);
    }

    #[test]
    fn derives_version_and_ts_when_missing() {
        let u = decode_update(Some(b"M1"), br#"{"payload":1}"#, Some(5), POS).unwrap();
        assert_eq!(u.version, 42);
        assert_eq!(u.ts, 5);
    }

    #[test]
    fn market_comes_from_key_or_value_and_must_agree() {
        let u = decode_update(None, br#"{"market":"X","payload":1}"#, None, POS).unwrap();
        assert_eq!(u.market, "X");
        let e = decode_update(Some(b"Y"), br#"{"market":"X","payload":1}"#, None, POS);
        assert_eq!(e.unwrap_err().kind(), "key_mismatch");
        let e = decode_update(None, br#"{"payload":1}"#, None, POS);
        assert_eq!(e.unwrap_err().kind(), "invalid_market");
    }

    #[test]
    fn reset_market_needs_no_channel_and_round_trips() {
        let c = decode_command(
            Some(b"M1"),
            br#"{"v":1,"type":"reset_market","market":"M1"}"#,
        )
        .unwrap();
        assert_eq!(c.kind, CommandKind::ResetMarket);
        assert_eq!(decode_command(Some(b"M1"), &encode_command(&c)).unwrap(), c);
        assert_eq!(
            encode_command(&c),
            br#"{"v":1,"type":"reset_market","market":"M1"}"#.to_vec()
        );
        // Subscriptions still need their channel.
        let e = decode_command(Some(b"M1"), br#"{"type":"subscribe","market":"M1"}"#);
        assert_eq!(e.unwrap_err().kind(), "invalid_channel");
    }

    #[test]
    fn size_and_depth_are_bounded() {
        let pad = "x".repeat(MAX_RECORD_BYTES - 40);
        let ok = format!(r#"{{"payload":{{"p":"{pad}"}}}}"#);
        assert!(ok.len() <= MAX_RECORD_BYTES);
        let u = decode_update(Some(b"M1"), ok.as_bytes(), None, POS).unwrap();
        let message = u.encode();
        assert!(message.len() <= MAX_UPDATE_MESSAGE_BYTES);
        let big = format!(r#"{{"payload":{{"p":"{pad}{}"}}}}"#, "y".repeat(100));
        let e = decode_update(Some(b"M1"), big.as_bytes(), None, POS).unwrap_err();
        assert_eq!(e.kind(), "too_large");

        let nest = |n: usize| format!(r#"{{"payload":{}1{}}}"#, "[".repeat(n), "]".repeat(n));
        assert!(decode_update(Some(b"M1"), nest(MAX_PAYLOAD_DEPTH).as_bytes(), None, POS).is_ok());
        let e = decode_update(
            Some(b"M1"),
            nest(MAX_PAYLOAD_DEPTH + 1).as_bytes(),
            None,
            POS,
        )
        .unwrap_err();
        assert_eq!(e.kind(), "too_deep");
        // Brackets inside strings (escaped quotes included) are not nesting.
        let s = format!(r#"{{"payload":"\"{}"}}"#, "[".repeat(100));
        assert!(decode_update(Some(b"M1"), s.as_bytes(), None, POS).is_ok());
        // 100 000 levels: refused without parsing (serde would recurse).
        let e = decode_update(Some(b"M1"), nest(100_000).as_bytes(), None, POS).unwrap_err();
        assert!(matches!(e.kind(), "too_deep" | "too_large"));
    }

    #[test]
    fn encoding_overhead_is_bounded() {
        // The longest market id, the largest numbers, a record without them.
        let market = "m".repeat(MAX_ID_LEN);
        let record = br#"{"payload":0}"#;
        let u = decode_update(
            Some(market.as_bytes()),
            record,
            Some(i64::MIN),
            DerivedVersion {
                partition: 0,
                offset: MAX_VERSION as i64 - 1,
            },
        )
        .unwrap();
        assert!(u.encode().len() <= record.len() + MAX_ENCODING_OVERHEAD);
    }

    #[test]
    fn rejects_bad_updates_with_reasons() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"\x00\x01binary", "unsupported_encoding"),
            (b"{not json", "invalid_json"),
            (br#"{"market":"M1"}"#, "invalid_json"),
            (br#"{"v":2,"payload":1}"#, "unsupported_version"),
            (br#"{"version":0,"payload":1}"#, "version_out_of_range"),
            (
                br#"{"version":9007199254740992,"payload":1}"#,
                "version_out_of_range",
            ),
        ];
        for (value, kind) in cases {
            let err = decode_update(Some(b"M1"), value, None, POS).unwrap_err();
            assert_eq!(err.kind(), *kind, "{:?}", String::from_utf8_lossy(value));
        }
        let err = decode_update(Some(b"bad key{}"), br#"{"payload":1}"#, None, POS).unwrap_err();
        assert_eq!(err.kind(), "invalid_market");
    }

    /// M1 at version 3, ts 9, payload `{"a":1}`.
    fn sample_update() -> MarketUpdate {
        decode_update(
            Some(b"M1"),
            br#"{"version":3,"ts":9,"payload":{"a":1}}"#,
            None,
            POS,
        )
        .unwrap()
    }

    #[test]
    fn published_encoding_round_trips() {
        let u = sample_update();
        let p = decode_published(&u.encode()).unwrap();
        assert_eq!(p.kind, "update");
        assert_eq!(p.market, "M1");
        assert_eq!(p.version, 3);
        assert_eq!(p.ts, 9);
        assert_eq!(p.payload, serde_json::json!({"a": 1}));
        let again = decode_update(Some(b"M1"), &u.encode_record(), None, POS).unwrap();
        assert_eq!(again.version, 3);
        assert_eq!(again.payload.get(), u.payload.get());
    }

    #[test]
    fn commands_round_trip_and_validate() {
        let cmd = Command {
            kind: CommandKind::Subscribe,
            channel: "c-1".into(),
            market: "M1".into(),
        };
        let bytes = encode_command(&cmd);
        assert_eq!(decode_command(Some(b"M1"), &bytes).unwrap(), cmd);
        assert_eq!(
            decode_command(Some(b"M2"), &bytes).unwrap_err().kind(),
            "key_mismatch"
        );
        let bad = br#"{"type":"subscribe","channel":"a b","market":"M1"}"#;
        assert_eq!(
            decode_command(None, bad).unwrap_err().kind(),
            "invalid_channel"
        );
        let bad = br#"{"type":"explode","channel":"c","market":"M1"}"#;
        assert_eq!(
            decode_command(None, bad).unwrap_err().kind(),
            "invalid_json"
        );
    }

    #[test]
    fn update_heads_and_channel_messages() {
        let u = sample_update();
        let bytes = u.encode();
        let head = peek_update(&bytes).unwrap();
        assert_eq!((head.market, head.version, head.ts), ("M1", 3, Some(9)));
        assert_eq!(
            decode_channel_message(&bytes).unwrap(),
            ChannelMessage::Update(head)
        );
        assert_eq!(
            decode_channel_message(CHANNEL_CLOSED.as_bytes()).unwrap(),
            ChannelMessage::Closed
        );
        assert_eq!(
            decode_channel_message(CHANNEL_MARKETS_CHANGED.as_bytes()).unwrap(),
            ChannelMessage::MarketsChanged
        );
        for (bad, kind) in [
            (&b"nope"[..], "unsupported_encoding"),
            (br#"{"market":"M1"}"#, "invalid_json"),
            (br#"{"market":"a b","version":1}"#, "invalid_market"),
            (br#"{"market":"M1","version":0}"#, "version_out_of_range"),
        ] {
            assert_eq!(peek_update(bad).unwrap_err().kind(), kind);
        }
    }

    #[test]
    fn begin_is_no_longer_a_command() {
        let old = br#"{"v":1,"type":"begin","channel":"c","market":"M1"}"#;
        assert_eq!(
            decode_command(None, old).unwrap_err().kind(),
            "invalid_json"
        );
    }

    #[test]
    fn id_validation() {
        assert!(validate_market_id("football.epl:123-home_win").is_ok());
        assert!(validate_market_id("").is_err());
        assert!(validate_market_id(&"x".repeat(MAX_ID_LEN + 1)).is_err());
        assert!(validate_market_id("a{b}").is_err());
        assert!(validate_channel_id("a/b").is_err());
    }
}
