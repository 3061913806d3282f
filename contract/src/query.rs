//! Query subscriptions: the grammar, its one parser, the matcher, and the
//! query commands.
//!
//! A channel can hold *queries* besides concrete markets: a market whose
//! updates match one of them is subscribed on the channel's behalf (the
//! seed article's "virtual subscriber"), also a market that did not exist
//! when the query was made, and leaves again when it stops matching. The
//! publisher validates queries with [`Query::parse`] at the API; reducers
//! parse the same text from the command topic and match each data record of
//! their partitions with [`Query::matches`].
//!
//! Grammar (small on purpose: equality and a prefix only, no regexes, no
//! nesting, so matching is linear in the query's length and cannot be made
//! expensive by a client):
//! ```text
//! query  = clause *( ";" clause )                 ; a conjunction
//! clause = "market^=" prefix                     ; the market id starts with prefix
//!        / field "=" value                       ; a top-level payload field equals value
//! prefix = 1*128 ( ALPHA / DIGIT / "." / "_" / "-" / ":" )   ; the market id alphabet
//! field  = 1*64  ( ALPHA / DIGIT / "_" )
//! value  = 1*128 ( ALPHA / DIGIT / "." / "_" / "-" / ":" )
//! ```
//! A field clause compares the payload's top-level field: a JSON string by
//! its (unescaped) text, a number or `true`/`false` by its JSON text (so
//! `home=1.50` matches `1.50`, not `1.5`). `null`, objects, arrays and a
//! missing field never match; a payload that is not an object matches no
//! field clause. At most one `market^=` clause and one clause per field.
//! [`Query::canonical`] orders the clauses (market prefix first, then the
//! fields by name), so one query written two ways is one query.

use std::borrow::Cow;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::message::{validate_channel_id, ContractError, MAX_ID_LEN, PROTOCOL_VERSION};

/// Longest query text: a query is a key in Redis and part of every query
/// command; four clauses of realistic names fit with room to spare.
pub const MAX_QUERY_BYTES: usize = 256;

/// Most clauses in one query: matching costs one comparison per clause per
/// record, and a conjunction of more equalities is not a realistic view.
pub const MAX_QUERY_CLAUSES: usize = 4;

/// Longest payload field name in a clause: field names are identifiers.
pub const MAX_QUERY_FIELD_LEN: usize = 64;

/// Longest value (and market prefix) in a clause: the market id bound.
pub const MAX_QUERY_VALUE_LEN: usize = MAX_ID_LEN;

/// Most queries one channel holds: the API refuses more (400), and
/// reducers refuse a command past it (a producer other than the API).
pub const MAX_QUERIES_PER_CHANNEL: usize = 8;

/// Most `(channel, query)` pairs in a pipeline. Every partition's owner
/// holds every query and matches each record against each distinct one, so
/// this bounds the reducer's memory and its matching work per record.
pub const MAX_QUERIES_PER_PIPELINE: usize = 1024;

/// Most markets one query matches per partition: a query as wide as
/// `market^=` would otherwise subscribe its channels to the whole feed.
/// Past it, further markets are not added (counted, logged).
pub const MAX_QUERY_MATCHES_PER_PARTITION: usize = 1000;

/// The clause operator of the market id prefix.
const MARKET_PREFIX: &str = "market^=";

/// Why a query text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid query: {0}")]
pub struct QueryError(pub String);

impl From<QueryError> for ContractError {
    fn from(e: QueryError) -> Self {
        ContractError::Json(e.to_string())
    }
}

/// One field clause: `field=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FieldClause {
    field: String,
    value: String,
}

/// A parsed, validated query (see the module docs for the grammar).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    prefix: Option<String>,
    /// Sorted by field name, no duplicates.
    fields: Vec<FieldClause>,
}

fn id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')
}

fn check_token(what: &str, s: &str, max: usize, ok: fn(char) -> bool) -> Result<(), QueryError> {
    if s.is_empty() {
        return Err(QueryError(format!("empty {what}")));
    }
    if s.len() > max {
        return Err(QueryError(format!(
            "{what} of {} bytes, at most {max}",
            s.len()
        )));
    }
    if let Some(c) = s.chars().find(|&c| !ok(c)) {
        return Err(QueryError(format!("{what} {s:?} contains {c:?}")));
    }
    Ok(())
}

impl Query {
    /// Parses and validates a query text.
    pub fn parse(text: &str) -> Result<Query, QueryError> {
        if text.is_empty() {
            return Err(QueryError("empty query".into()));
        }
        if text.len() > MAX_QUERY_BYTES {
            return Err(QueryError(format!(
                "{} bytes, at most {MAX_QUERY_BYTES}",
                text.len()
            )));
        }
        let clauses: Vec<&str> = text.split(';').collect();
        if clauses.len() > MAX_QUERY_CLAUSES {
            return Err(QueryError(format!(
                "{} clauses, at most {MAX_QUERY_CLAUSES}",
                clauses.len()
            )));
        }
        let mut q = Query {
            prefix: None,
            fields: Vec::new(),
        };
        for clause in clauses {
            if let Some(prefix) = clause.strip_prefix(MARKET_PREFIX) {
                check_token("market prefix", prefix, MAX_ID_LEN, id_char)?;
                if q.prefix.replace(prefix.to_owned()).is_some() {
                    return Err(QueryError("more than one market^= clause".into()));
                }
                continue;
            }
            let Some((field, value)) = clause.split_once('=') else {
                return Err(QueryError(format!(
                    "clause {clause:?} is neither market^=<prefix> nor <field>=<value>"
                )));
            };
            check_token("field", field, MAX_QUERY_FIELD_LEN, |c| {
                c.is_ascii_alphanumeric() || c == '_'
            })?;
            check_token("value", value, MAX_QUERY_VALUE_LEN, id_char)?;
            if q.fields.iter().any(|f| f.field == field) {
                return Err(QueryError(format!("field {field:?} named twice")));
            }
            q.fields.push(FieldClause {
                field: field.to_owned(),
                value: value.to_owned(),
            });
        }
        q.fields.sort_by(|a, b| a.field.cmp(&b.field));
        Ok(q)
    }

    /// The canonical text: market prefix first, then fields by name. Two
    /// texts of one query have one canonical text (the query's identity).
    pub fn canonical(&self) -> String {
        let mut parts: Vec<String> = Vec::with_capacity(1 + self.fields.len());
        if let Some(p) = &self.prefix {
            parts.push(format!("{MARKET_PREFIX}{p}"));
        }
        parts.extend(
            self.fields
                .iter()
                .map(|f| format!("{}={}", f.field, f.value)),
        );
        parts.join(";")
    }

    /// The market id prefix, if the query has one.
    pub fn market_prefix(&self) -> Option<&str> {
        self.prefix.as_deref()
    }

    /// The first field clause (by field name) as `(field, value)`: what a
    /// matcher can index the query by.
    pub fn first_field(&self) -> Option<(&str, &str)> {
        self.fields
            .first()
            .map(|f| (f.field.as_str(), f.value.as_str()))
    }

    /// Whether matching needs the payload's fields (else the market id is enough).
    pub fn needs_fields(&self) -> bool {
        !self.fields.is_empty()
    }

    /// Whether a market with this id and these payload fields matches.
    pub fn matches(&self, market: &str, fields: &Fields<'_>) -> bool {
        if let Some(p) = &self.prefix {
            if !market.starts_with(p.as_str()) {
                return false;
            }
        }
        self.fields
            .iter()
            .all(|c| fields.equals(&c.field, &c.value))
    }
}

/// The top-level fields of a payload, parsed once per record and shared by
/// every query matched against it (values stay raw until compared).
#[derive(Debug, Default)]
pub struct Fields<'a> {
    map: HashMap<Cow<'a, str>, &'a RawValue>,
}

impl<'a> Fields<'a> {
    /// Reads the top-level fields of `payload` (raw JSON). A payload that is
    /// not an object (or is malformed) has no fields.
    pub fn of(payload: &'a str) -> Fields<'a> {
        if !payload.trim_start().starts_with('{') {
            return Fields::default();
        }
        Fields {
            map: serde_json::from_str(payload).unwrap_or_default(),
        }
    }

    /// No fields at all (for queries on the market id only).
    pub fn none() -> Fields<'a> {
        Fields::default()
    }

    /// The text a clause compares a top-level field by: a string's
    /// unescaped text, a number's or boolean's JSON text; `None` for a
    /// missing field, `null`, an object or an array.
    pub fn scalar(&self, field: &str) -> Option<Cow<'a, str>> {
        let text = self.map.get(field)?.get().trim();
        match text.as_bytes().first() {
            Some(b'"') => serde_json::from_str::<Cow<'a, str>>(text).ok(),
            Some(b'{' | b'[' | b'n') | None => None,
            Some(_) => Some(Cow::Borrowed(text)),
        }
    }

    fn equals(&self, field: &str, value: &str) -> bool {
        self.scalar(field).is_some_and(|s| s == value)
    }
}

/// What a query command asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueryCommandKind {
    /// The channel holds the query from now on.
    AddQuery,
    /// The channel drops the query and the markets only it brought.
    RemoveQuery,
}

impl QueryCommandKind {
    /// Metric label and wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            QueryCommandKind::AddQuery => "add_query",
            QueryCommandKind::RemoveQuery => "remove_query",
        }
    }
}

/// A query command: produced once to **every** partition of the command
/// topic (markets matching a query live on any partition), keyed by the
/// channel. `query` is canonical.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryCommand {
    /// Add or remove.
    pub kind: QueryCommandKind,
    /// Channel id.
    pub channel: String,
    /// The query's canonical text.
    pub query: String,
}

#[derive(Deserialize, Serialize)]
struct QueryCommandJson<'a> {
    v: Option<u32>,
    #[serde(rename = "type")]
    kind: QueryCommandKind,
    #[serde(borrow)]
    channel: &'a str,
    #[serde(borrow)]
    query: &'a str,
}

#[derive(Deserialize)]
struct TypeOnly<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a str>,
}

/// Whether a command-topic value is a query command (cheap: reads the
/// `type` only). Anything else goes to [`crate::decode_command`].
pub fn is_query_command(value: &[u8]) -> bool {
    serde_json::from_slice::<TypeOnly<'_>>(value)
        .ok()
        .and_then(|t| t.kind)
        .is_some_and(|k| k == "add_query" || k == "remove_query")
}

/// Decodes a query command; the query is parsed and returned canonical.
pub fn decode_query_command(value: &[u8]) -> Result<(QueryCommand, Query), ContractError> {
    let c: QueryCommandJson<'_> =
        serde_json::from_slice(value).map_err(|e| ContractError::Json(e.to_string()))?;
    if let Some(v) = c.v.filter(|&v| v != PROTOCOL_VERSION) {
        return Err(ContractError::UnsupportedVersion(v));
    }
    validate_channel_id(c.channel)?;
    let query = Query::parse(c.query)?;
    Ok((
        QueryCommand {
            kind: c.kind,
            channel: c.channel.to_owned(),
            query: query.canonical(),
        },
        query,
    ))
}

/// Encodes a query command (value; the key is the channel id).
pub fn encode_query_command(cmd: &QueryCommand) -> Vec<u8> {
    serde_json::to_vec(&QueryCommandJson {
        v: Some(PROTOCOL_VERSION),
        kind: cmd.kind,
        channel: &cmd.channel,
        query: &cmd.query,
    })
    .expect("a query command always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(q: &str, market: &str, payload: &str) -> bool {
        Query::parse(q)
            .unwrap()
            .matches(market, &Fields::of(payload))
    }

    #[test]
    fn parses_canonically() {
        let a = Query::parse("status=open;market^=FB.;sport=football").unwrap();
        let b = Query::parse("sport=football;market^=FB.;status=open").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.canonical(), "market^=FB.;sport=football;status=open");
        assert_eq!(Query::parse(&a.canonical()).unwrap(), a);
        assert_eq!(a.market_prefix(), Some("FB."));
        assert!(a.needs_fields());
        assert!(!Query::parse("market^=X").unwrap().needs_fields());
    }

    #[test]
    fn refuses_bad_queries_with_a_reason() {
        let long = format!("a={}", "x".repeat(MAX_QUERY_BYTES));
        let cases: &[(&str, &str)] = &[
            ("", "empty query"),
            ("market^=", "empty market prefix"),
            ("a=1;a=2", "named twice"),
            ("market^=A;market^=B", "more than one"),
            ("a=1;b=2;c=3;d=4;e=5", "clauses"),
            ("status", "neither"),
            ("st atus=open", "contains ' '"),
            ("status=o pen", "contains ' '"),
            ("a.b=1", "contains '.'"),
            ("a==1", "contains '='"),
            ("market^=A{b}", "contains '{'"),
            (";", "neither"),
            (&long, "at most"),
        ];
        for (q, why) in cases {
            let e = Query::parse(q).unwrap_err().to_string();
            assert!(e.contains(why), "{q:?}: {e}");
        }
    }

    #[test]
    fn matches_prefix_and_top_level_scalars() {
        let p = r#"{"status":"open","sport":"football","home":1.50,"live":true,"n":null,"o":{"status":"open"}}"#;
        assert!(m("market^=FB.", "FB.1", p));
        assert!(!m("market^=FB.", "TN.1", p));
        assert!(m("status=open", "X", p));
        assert!(!m("status=closed", "X", p));
        assert!(m("market^=FB.;status=open;sport=football", "FB.9", p));
        assert!(!m("market^=FB.;status=open;sport=tennis", "FB.9", p));
        assert!(m("home=1.50", "X", p));
        assert!(!m("home=1.5", "X", p), "numbers compare by their JSON text");
        assert!(m("live=true", "X", p));
        assert!(!m("n=null", "X", p), "null never matches");
        assert!(!m("o=open", "X", p), "objects never match");
        assert!(!m("missing=1", "X", p));
        // Escapes are compared unescaped; non-object payloads have no fields.
        assert!(m("s=a-b", "X", r#"{"s":"a\u002db"}"#));
        assert!(!m("s=1", "X", "1"));
        assert!(!m("s=1", "X", "[1]"));
        assert!(m("market^=X", "X1", "[1]"));
        assert!(!m("s=1", "X", "{broken"));
    }

    #[test]
    fn query_commands_round_trip_and_are_told_apart() {
        let cmd = QueryCommand {
            kind: QueryCommandKind::AddQuery,
            channel: "c1".into(),
            query: "market^=FB.;status=open".into(),
        };
        let v = encode_query_command(&cmd);
        assert!(is_query_command(&v));
        assert!(!is_query_command(
            br#"{"v":1,"type":"subscribe","channel":"c","market":"M"}"#
        ));
        assert!(!is_query_command(b"garbage"));
        let (back, q) = decode_query_command(&v).unwrap();
        assert_eq!(back, cmd);
        assert_eq!(q.canonical(), cmd.query);
        // Canonicalised on the way in.
        let v = br#"{"type":"remove_query","channel":"c1","query":"status=open;market^=FB."}"#;
        assert_eq!(decode_query_command(v).unwrap().0.query, cmd.query);
        let bad = br#"{"type":"add_query","channel":"c1","query":"x"}"#;
        assert_eq!(
            decode_query_command(bad).unwrap_err().kind(),
            "invalid_json"
        );
        let bad = br#"{"type":"add_query","channel":"c 1","query":"a=1"}"#;
        assert_eq!(
            decode_query_command(bad).unwrap_err().kind(),
            "invalid_channel"
        );
    }
}
