//! The pure part of cacheable snapshots (`GET /v1/snapshot?markets=` and
//! `?query=`): the canonical form of a market set or a query, the body,
//! its validators (`ETag`,
//! `Last-Modified`), conditional requests and the `Cache-Control` policy.
//! No I/O here; [`crate::snapshot`] is the HTTP adapter.
//!
//! Why canonical URLs: a CDN keys its cache on the URL. If `a,b` and `b,a`
//! (or `a,a,b`, or `a%2Cb`) were all answered, every permutation of a set
//! would be a separate cache entry and a separate origin request, and a
//! client could fill a CDN's cache with permutations. So only one spelling
//! of a set is answered with a body: ids sorted (byte order), duplicates
//! removed, comma-separated, no other parameter. Another spelling of a
//! valid set gets a `308` to the canonical one, itself never cached
//! (`no-store`), so caches only ever hold canonical entries.
//!
//! Why the body is a pure function of the stored states: the stored update
//! of a (market, version) does not change, and the snapshot's timestamp is
//! the newest `ts` among its updates (not the time of the request). So two
//! pods asked for the same set at the same versions produce the same bytes,
//! and a strong `ETag` (a hash of those bytes, hence of the (market,
//! version) list and the updates) is truthful across pods. Hashing the bytes
//! rather than the versions alone also stays correct after an operator's
//! `reset_market`, which lets a version number repeat with another payload.

use std::time::{Duration, UNIX_EPOCH};

use serde::Deserialize;
use streampipe_contract::query::Query as MarketQuery;
use streampipe_contract::validate_market_id;

use crate::limits::{MAX_SNAPSHOT_MARKETS, MAX_SNAPSHOT_QUERY_BYTES};

/// The path of the snapshot endpoint.
pub const SNAPSHOT_PATH: &str = "/v1/snapshot";

/// Default `max-age` of a snapshot: short, because a cached snapshot is
/// only the first paint; the stream (opened with `since` from it) brings
/// everything newer, so staleness costs replay volume, never correctness.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(2);

/// Default `stale-while-revalidate`: a CDN may answer from a stale entry
/// while it fetches a fresh one, so the origin sees one request per market
/// set and period however many clients arrive, and no client waits for it.
pub const DEFAULT_STALE_WHILE_REVALIDATE: Duration = Duration::from_secs(10);

/// Largest configurable `max-age` / `stale-while-revalidate`: beyond an
/// hour a "first paint" is a different page, and the stream's replay of
/// everything newer would be most of the channel anyway.
pub const MAX_CACHE_SECONDS: u64 = 3600;

/// How snapshots may be cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// `max-age`.
    pub max_age: Duration,
    /// `stale-while-revalidate`.
    pub stale_while_revalidate: Duration,
    /// Token mode only: the operator declares the odds public, so shared
    /// caches (CDNs) may store snapshots and serve them without a token.
    pub public_in_token_mode: bool,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            max_age: DEFAULT_MAX_AGE,
            stale_while_revalidate: DEFAULT_STALE_WHILE_REVALIDATE,
            public_in_token_mode: false,
        }
    }
}

impl CachePolicy {
    /// A policy from configured seconds, each bounded by [`MAX_CACHE_SECONDS`].
    pub fn from_seconds(max_age: u64, swr: u64, public_in_token_mode: bool) -> Self {
        CachePolicy {
            max_age: Duration::from_secs(max_age.min(MAX_CACHE_SECONDS)),
            stale_while_revalidate: Duration::from_secs(swr.min(MAX_CACHE_SECONDS)),
            public_in_token_mode,
        }
    }

    /// Whether shared caches may store snapshots under this auth mode.
    pub fn shared(&self, token_mode: bool) -> bool {
        !token_mode || self.public_in_token_mode
    }

    /// The `Cache-Control` value of a snapshot (200 and 304).
    pub fn cache_control(&self, token_mode: bool) -> String {
        format!(
            "{}, max-age={}, stale-while-revalidate={}",
            if self.shared(token_mode) {
                "public"
            } else {
                "private"
            },
            self.max_age.as_secs(),
            self.stale_while_revalidate.as_secs()
        )
    }

    /// The `Vary` value: the CORS answer depends on `Origin`; a private
    /// snapshot also on the token (a shared browser must not hand one
    /// user's allowance to another). A public one must not vary on the
    /// token, or a CDN would keep one copy per user.
    pub fn vary(&self, token_mode: bool) -> &'static str {
        if self.shared(token_mode) {
            "origin"
        } else {
            "origin, authorization"
        }
    }
}

/// What a snapshot query asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// The canonical spelling of a valid set: answer it.
    Canonical(Vec<String>),
    /// The canonical spelling of a valid query (parsed, so the caller
    /// need not parse it again): answer it with the markets matching it now.
    Matching(MarketQuery),
    /// A valid set spelled otherwise: redirect to this query string.
    Redirect(String),
}

/// Why a snapshot query is refused (`code`, message): a 400, never cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Stable error code.
    pub code: &'static str,
    /// For people.
    pub message: String,
}

fn refused(code: &'static str, message: impl Into<String>) -> Refused {
    Refused {
        code,
        message: message.into(),
    }
}

/// The canonical query string of a sorted, deduplicated set.
pub fn canonical_query(markets: &[String]) -> String {
    format!("markets={}", markets.join(","))
}

/// Parses a raw query string (without `?`).
pub fn parse_query(raw: &str) -> Result<Query, Refused> {
    // The server bounds the request head (16 KiB); this bounds the work
    // and names the limit a CDN's URL length imposes anyway.
    if raw.len() > 3 * MAX_SNAPSHOT_QUERY_BYTES {
        return Err(refused(
            "too_many_markets",
            format!("the query is limited to {MAX_SNAPSHOT_QUERY_BYTES} bytes"),
        ));
    }
    let mut list: Option<String> = None;
    let mut query: Option<String> = None;
    for part in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let slot = match k {
            "markets" => &mut list,
            "query" => &mut query,
            _ => {
                return Err(refused(
                    "invalid_query",
                    format!(
                        "unknown parameter {:?}; only markets=a,b,... or query=... is accepted",
                        k.chars().take(32).collect::<String>()
                    ),
                ))
            }
        };
        if slot.is_some() {
            return Err(refused("invalid_query", format!("{k}= is given twice")));
        }
        *slot = Some(percent_decode(v).ok_or_else(|| {
            refused(
                "invalid_query",
                format!("{k}= is not valid percent-encoded UTF-8"),
            )
        })?);
    }
    if let Some(text) = query {
        if list.is_some() {
            return Err(refused(
                "invalid_query",
                "markets= and query= are exclusive",
            ));
        }
        let q = MarketQuery::parse(&text).map_err(|e| refused("invalid_query", e.to_string()))?;
        let canonical = canonical_query_of(&q.canonical());
        return Ok(if canonical == raw {
            Query::Matching(q)
        } else {
            Query::Redirect(canonical)
        });
    }
    let list = list.unwrap_or_default();
    let mut ids: Vec<String> = list
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if ids.is_empty() {
        return Err(refused(
            "invalid_market",
            "markets=a,b,... is required (at least one market)",
        ));
    }
    for id in &ids {
        validate_market_id(id).map_err(|e| refused("invalid_market", e.to_string()))?;
    }
    ids.sort_unstable();
    ids.dedup();
    if ids.len() > MAX_SNAPSHOT_MARKETS {
        return Err(refused(
            "too_many_markets",
            format!(
                "{} markets; a snapshot holds at most {MAX_SNAPSHOT_MARKETS} (ask for several)",
                ids.len()
            ),
        ));
    }
    let canonical = canonical_query(&ids);
    if canonical.len() > MAX_SNAPSHOT_QUERY_BYTES {
        return Err(refused(
            "too_many_markets",
            format!(
                "the canonical query has {} bytes; at most {MAX_SNAPSHOT_QUERY_BYTES} (ask for several)",
                canonical.len()
            ),
        ));
    }
    if canonical == raw {
        Ok(Query::Canonical(ids))
    } else {
        Ok(Query::Redirect(canonical))
    }
}

/// The canonical query string of a query's canonical text: `query=` and
/// the text with every byte outside `[A-Za-z0-9._:-]` as `%XX` (upper
/// case), so `^`, `=` and `;` have one spelling a cache can key on.
pub fn canonical_query_of(text: &str) -> String {
    let mut out = String::from("query=");
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%XX` and `+` decoding of a query value; `None` when malformed.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The fields of a stored update a snapshot needs.
#[derive(Deserialize)]
struct Head {
    version: u64,
    #[serde(default)]
    ts: Option<i64>,
}

/// A built snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The JSON body.
    pub body: String,
    /// The strong validator, quoted.
    pub etag: String,
    /// The newest `ts` among the markets (ms since the epoch), if any.
    pub at_ms: Option<i64>,
    /// Markets without a usable stored state.
    pub missing: usize,
    /// Stored states that were not a JSON update (skipped as missing).
    pub unreadable: usize,
}

/// Builds the snapshot of `markets` (canonical order) from their stored
/// states (the reducer's update messages, `None` when none is stored).
///
/// Body: `{"at":<ms>|null,"markets":{"<id>":<update>,...},"missing":[...]}`;
/// each update is the stored message byte for byte (it carries `version`).
pub fn build(markets: &[String], states: &[Option<&[u8]>]) -> Snapshot {
    build_with(markets, states, "")
}

/// Builds the snapshot of a query's matching `markets` (canonical order):
/// the body of [`build`] with `"query"` (the canonical text) and
/// `"truncated"` (true when more markets matched than one snapshot holds;
/// the stream's `begin` sends the others) first.
pub fn build_query(
    query: &str,
    markets: &[String],
    states: &[Option<&[u8]>],
    truncated: bool,
) -> Snapshot {
    let head = format!(
        "\"query\":{},\"truncated\":{truncated},",
        json_string(query)
    );
    build_with(markets, states, &head)
}

fn build_with(markets: &[String], states: &[Option<&[u8]>], head: &str) -> Snapshot {
    let mut found = String::new();
    let mut missing = Vec::new();
    let mut at: Option<i64> = None;
    let mut unreadable = 0;
    for (m, s) in markets.iter().zip(states.iter().copied()) {
        let usable = s.and_then(|b| {
            let text = std::str::from_utf8(b).ok()?;
            // Valid JSON with a version, else skipped (and counted).
            let head: Head = serde_json::from_str(text).ok()?;
            (head.version >= 1).then_some((text.trim(), head))
        });
        match usable {
            Some((text, head)) => {
                if !found.is_empty() {
                    found.push(',');
                }
                found.push_str(&json_string(m));
                found.push(':');
                found.push_str(text);
                if let Some(ts) = head.ts {
                    at = Some(at.map_or(ts, |a| a.max(ts)));
                }
            }
            None => {
                if s.is_some() {
                    unreadable += 1;
                }
                missing.push(json_string(m));
            }
        }
    }
    let at_text = at.map_or_else(|| "null".to_owned(), |a| a.to_string());
    let body = format!(
        "{{{head}\"at\":{at_text},\"markets\":{{{found}}},\"missing\":[{}]}}",
        missing.join(",")
    );
    let etag = format!("\"{:016x}\"", fnv1a64(body.as_bytes()));
    Snapshot {
        body,
        etag,
        at_ms: at,
        missing: missing.len(),
        unreadable,
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// FNV-1a, 64 bits: stable across processes and versions (std's hasher is
/// not), so every pod gives one set of bytes the same `ETag`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The `Last-Modified` value for a snapshot's timestamp (ms since the
/// epoch); `None` before the epoch.
pub fn http_date(at_ms: i64) -> Option<String> {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(at_ms).ok()?);
    Some(httpdate::fmt_http_date(t))
}

/// Whether a request with these validators may get `304 Not Modified`:
/// `If-None-Match` (weak comparison, `*`, lists) decides when present, else
/// `If-Modified-Since` against the snapshot's timestamp (second precision).
pub fn not_modified(
    snapshot: &Snapshot,
    if_none_match: Option<&str>,
    if_modified_since: Option<&str>,
) -> bool {
    if let Some(inm) = if_none_match {
        let ours = snapshot.etag.as_str();
        return inm
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == ours);
    }
    match (if_modified_since, snapshot.at_ms) {
        (Some(ims), Some(at)) => match httpdate::parse_http_date(ims.trim()) {
            Ok(since) => {
                let since_s = since
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                u64::try_from(at).is_ok_and(|a| a / 1000 <= since_s)
            }
            Err(_) => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_the_canonical_spelling_is_answered() {
        assert_eq!(
            parse_query("markets=a,b,c").unwrap(),
            Query::Canonical(ids(&["a", "b", "c"]))
        );
        for other in [
            "markets=b,a,c",
            "markets=a,a,b,c",
            "markets=a%2Cb%2Cc",
            "markets=a,b,c,",
            "&markets=a,b,c",
        ] {
            assert_eq!(
                parse_query(other).unwrap(),
                Query::Redirect("markets=a,b,c".into()),
                "{other}"
            );
        }
    }

    #[test]
    fn a_query_has_one_spelling_and_its_body_says_so() {
        let canon = "query=market%5E%3DFB.%3Bstatus%3Dopen";
        assert_eq!(
            parse_query(canon).unwrap(),
            Query::Matching(MarketQuery::parse("market^=FB.;status=open").unwrap())
        );
        for other in [
            "query=status%3Dopen%3Bmarket%5E%3DFB.",
            "query=market^=FB.;status=open",
            "query=market%5e%3dFB.%3bstatus%3dopen",
        ] {
            assert_eq!(
                parse_query(other).unwrap(),
                Query::Redirect(canon.into()),
                "{other}"
            );
        }
        let code = |q: &str| parse_query(q).unwrap_err().code;
        assert_eq!(code("query="), "invalid_query");
        assert_eq!(code("query=nonsense"), "invalid_query");
        assert_eq!(code("query=a%3Db&markets=x"), "invalid_query");
        assert_eq!(code("query=a%3Db&query=a%3Dc"), "invalid_query");
        let s = build_query("market^=FB.", &ids(&["FB.1"]), &[None], true);
        let v: serde_json::Value = serde_json::from_str(&s.body).unwrap();
        assert_eq!(v["query"], "market^=FB.");
        assert_eq!(v["truncated"], true);
        assert_eq!(v["missing"][0], "FB.1");
    }

    #[test]
    fn bad_queries_are_refused_with_a_code() {
        let code = |q: &str| parse_query(q).unwrap_err().code;
        assert_eq!(code(""), "invalid_market");
        assert_eq!(code("markets="), "invalid_market");
        assert_eq!(code("markets=a&x=1"), "invalid_query");
        assert_eq!(code("markets=a&markets=b"), "invalid_query");
        assert_eq!(code("markets=bad%20id"), "invalid_market");
        assert_eq!(code("markets=%zz"), "invalid_query");
        let many: Vec<String> = (0..=MAX_SNAPSHOT_MARKETS)
            .map(|i| format!("m{i:03}"))
            .collect();
        assert_eq!(code(&canonical_query(&many)), "too_many_markets");
        // Few markets, long ids: the byte bound.
        let long: Vec<String> = (0..40)
            .map(|i| format!("{i:03}{}", "x".repeat(120)))
            .collect();
        assert_eq!(code(&canonical_query(&long)), "too_many_markets");
        // Exactly at the count limit is fine.
        let mut max: Vec<String> = (0..MAX_SNAPSHOT_MARKETS)
            .map(|i| format!("m{i:03}"))
            .collect();
        max.sort();
        assert!(matches!(
            parse_query(&canonical_query(&max)),
            Ok(Query::Canonical(_))
        ));
    }

    #[test]
    fn body_holds_states_versions_and_missing_markets() {
        let a = br#"{"type":"update","market":"a","version":7,"ts":1000,"payload":1}"#;
        let c = br#"{"type":"update","market":"c","version":2,"ts":3000,"payload":{}}"#;
        let s = build(
            &ids(&["a", "b", "c", "d"]),
            &[Some(&a[..]), None, Some(&c[..]), Some(&b"garbage"[..])],
        );
        let v: serde_json::Value = serde_json::from_str(&s.body).unwrap();
        assert_eq!(v["at"], 3000);
        assert_eq!(v["markets"]["a"]["version"], 7);
        assert_eq!(v["markets"]["c"]["payload"], serde_json::json!({}));
        assert_eq!(v["missing"], serde_json::json!(["b", "d"]));
        assert_eq!((s.missing, s.unreadable), (2, 1));
        let none = build(&ids(&["x"]), &[None]);
        assert_eq!(none.body, r#"{"at":null,"markets":{},"missing":["x"]}"#);
    }

    #[test]
    fn etag_is_stable_and_changes_with_any_version() {
        let v7 = br#"{"type":"update","market":"a","version":7,"ts":1000,"payload":1}"#;
        let v8 = br#"{"type":"update","market":"a","version":8,"ts":1000,"payload":1}"#;
        let one = build(&ids(&["a"]), &[Some(&v7[..])]);
        assert_eq!(one, build(&ids(&["a"]), &[Some(&v7[..])]));
        assert_ne!(one.etag, build(&ids(&["a"]), &[Some(&v8[..])]).etag);
        assert_ne!(
            one.etag,
            build(&ids(&["a", "b"]), &[Some(&v7[..]), None]).etag
        );
        assert!(one.etag.starts_with('"') && one.etag.ends_with('"') && one.etag.len() == 18);
        // FNV-1a's published test vector: the hash is the same everywhere.
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn conditional_requests() {
        let v = br#"{"type":"update","market":"a","version":7,"ts":1700000000500,"payload":1}"#;
        let s = build(&ids(&["a"]), &[Some(&v[..])]);
        let tag = s.etag.clone();
        assert!(not_modified(&s, Some(&tag), None));
        assert!(not_modified(&s, Some(&format!("W/{tag}")), None));
        assert!(not_modified(&s, Some(&format!("\"x\", {tag}")), None));
        assert!(not_modified(&s, Some("*"), None));
        assert!(!not_modified(&s, Some("\"other\""), None));
        // If-None-Match wins over If-Modified-Since.
        let later = http_date(1_700_000_100_000).unwrap();
        assert!(!not_modified(&s, Some("\"other\""), Some(&later)));
        assert!(not_modified(&s, None, Some(&later)));
        let same_second = http_date(1_700_000_000_000).unwrap();
        assert!(not_modified(&s, None, Some(&same_second)));
        let earlier = http_date(1_699_999_999_000).unwrap();
        assert!(!not_modified(&s, None, Some(&earlier)));
        assert!(!not_modified(&s, None, Some("not a date")));
        assert_eq!(
            http_date(0).as_deref(),
            Some("Thu, 01 Jan 1970 00:00:00 GMT")
        );
    }

    #[test]
    fn cache_policy_by_auth_mode() {
        let p = CachePolicy::default();
        assert_eq!(
            p.cache_control(false),
            "public, max-age=2, stale-while-revalidate=10"
        );
        assert_eq!(
            p.cache_control(true),
            "private, max-age=2, stale-while-revalidate=10"
        );
        assert_eq!(p.vary(true), "origin, authorization");
        let public = CachePolicy {
            public_in_token_mode: true,
            ..p
        };
        assert!(public.cache_control(true).starts_with("public,"));
        assert_eq!(public.vary(true), "origin");
        let bounded = CachePolicy::from_seconds(10 * MAX_CACHE_SECONDS, 5, false);
        assert_eq!(bounded.max_age.as_secs(), MAX_CACHE_SECONDS);
    }
}
