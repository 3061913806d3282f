//! `GET /v1/snapshot?markets=a,b,c`: the state of a market set in one
//! response a CDN can cache, for a page's first paint (issue #13 item 2);
//! `GET /v1/snapshot?query=<canonical query>`: the same for the markets a
//! held query matches now (the reducers' per-partition match hashes say
//! which; a query no channel holds matches nothing yet).
//! The client then opens its stream with `since` = the snapshot's versions
//! and receives only what is newer (docs/protocol.md, "Snapshots").
//!
//! This is the thin HTTP adapter: canonical form, body, validators and the
//! cache policy are in [`crate::snapshot_core`]. Per auth mode:
//! - anonymous: `Cache-Control: public` (shared caches may store it);
//! - token mode: a bearer is required and must allow every market of the
//!   set (403 otherwise); `Cache-Control: private` and `Vary: Authorization`
//!   unless `--snapshot-public` declares the odds public.
//!
//! Every error and redirect carries `Cache-Control: no-store`.

use std::sync::Arc;

use warp::http::{HeaderValue, StatusCode};
use warp::{Filter, Rejection};

use crate::api::{caller, check_allowed, reply, Caller};
use crate::error::Error;
use crate::limits::{MAX_QUERY_SNAPSHOT_SCAN, MAX_SNAPSHOT_MARKETS};
use crate::snapshot_core::{build, build_query, http_date, not_modified, parse_query, Query};
use crate::Context;

/// The route.
pub fn route(ctx: Arc<Context>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    warp::path!("v1" / "snapshot")
        .and(warp::get())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::optional::<String>("if-none-match"))
        .and(warp::header::optional::<String>("if-modified-since"))
        .and(caller(ctx.clone()))
        .and(warp::any().map(move || ctx.clone()))
        .and_then(handle)
        .boxed()
}

async fn handle(
    raw: String,
    if_none_match: Option<String>,
    if_modified_since: Option<String>,
    caller: Caller,
    ctx: Arc<Context>,
) -> Result<warp::reply::Response, Rejection> {
    let r = snapshot(
        &ctx,
        &caller,
        &raw,
        if_none_match.as_deref(),
        if_modified_since.as_deref(),
    )
    .await;
    reply(&ctx, r)
}

async fn snapshot(
    ctx: &Context,
    caller: &Caller,
    raw: &str,
    if_none_match: Option<&str>,
    if_modified_since: Option<&str>,
) -> Result<warp::reply::Response, Error> {
    let (markets, query) = match parse_query(raw)
        .map_err(|r| Error::invalid(StatusCode::BAD_REQUEST, r.code, r.message))?
    {
        Query::Canonical(m) => (m, None),
        Query::Matching(q) => {
            let text = q.canonical();
            if !crate::queries::allows(&caller.principal.allowance, &q) {
                return Err(Error::invalid(
                    StatusCode::FORBIDDEN,
                    "query_not_allowed",
                    "the token's market patterns do not cover every market this query can match",
                ));
            }
            let partitions = ctx.commands.partition_count().await?;
            let Some(mut matched) = ctx
                .registry
                .query_matches(&text, partitions, MAX_QUERY_SNAPSHOT_SCAN)
                .await?
            else {
                ctx.metrics
                    .snapshots
                    .with_label_values(&["query_too_costly"])
                    .inc();
                return Err(Error::limited(
                    "query_snapshot_unavailable",
                    "the pipeline's queries match too many markets for a query snapshot; \
                     open the stream (its begin sends the state)",
                    std::time::Duration::from_secs(60),
                ));
            };
            let truncated = matched.len() > MAX_SNAPSHOT_MARKETS;
            matched.truncate(MAX_SNAPSHOT_MARKETS);
            (matched, Some((text, truncated)))
        }
        Query::Redirect(q) => {
            // Relative, so a path prefix in front of the publisher is kept.
            ctx.metrics.snapshots.with_label_values(&["redirect"]).inc();
            return Ok(warp::http::Response::builder()
                .status(StatusCode::PERMANENT_REDIRECT)
                .header("location", format!("snapshot?{q}"))
                .header("cache-control", "no-store")
                .body(warp::hyper::body::Bytes::new().into())
                .expect("valid response"));
        }
    };
    check_allowed(ctx, caller, &markets)?;
    let states = if markets.is_empty() {
        Vec::new()
    } else {
        ctx.registry.states(&markets).await?
    };
    let refs: Vec<Option<&[u8]>> = states.iter().map(|s| s.as_deref()).collect();
    let snap = match &query {
        None => build(&markets, &refs),
        Some((text, truncated)) => build_query(text, &markets, &refs, *truncated),
    };
    if snap.unreadable > 0 {
        // The reducer writes JSON updates only: another writer or damage.
        ctx.metrics
            .snapshots
            .with_label_values(&["unreadable_state"])
            .inc_by(snap.unreadable as u64);
    }
    let token_mode = ctx.auth.requires_token();
    let policy = &ctx.config.snapshot;
    let fresh = !not_modified(&snap, if_none_match, if_modified_since);
    let mut b = warp::http::Response::builder()
        .status(if fresh {
            StatusCode::OK
        } else {
            StatusCode::NOT_MODIFIED
        })
        .header("cache-control", policy.cache_control(token_mode))
        .header("etag", &snap.etag)
        .header("vary", policy.vary(token_mode));
    if let Some(lm) = snap.at_ms.and_then(http_date) {
        b = b.header("last-modified", lm);
    }
    ctx.metrics
        .snapshots
        .with_label_values(&[if fresh { "ok" } else { "not_modified" }])
        .inc();
    let resp: Result<warp::reply::Response, _> = if fresh {
        b.header("content-type", HeaderValue::from_static("application/json"))
            .body(warp::hyper::body::Bytes::from(snap.body).into())
    } else {
        b.body(warp::hyper::body::Bytes::new().into())
    };
    Ok(resp.expect("valid response"))
}

#[cfg(test)]
mod tests {
    use crate::limits::{MAX_SNAPSHOT_MARKETS, MAX_SNAPSHOT_QUERY_BYTES};

    /// The JS client splits snapshots itself: its copies of the limits
    /// must be the server's.
    #[test]
    fn the_js_client_agrees_on_snapshot_limits() {
        let js = include_str!("../static/streampipe.js");
        assert!(js.contains(&format!(
            "const MAX_SNAPSHOT_MARKETS = {MAX_SNAPSHOT_MARKETS};"
        )));
        assert!(js.contains(&format!(
            "const MAX_SNAPSHOT_QUERY = {MAX_SNAPSHOT_QUERY_BYTES};"
        )));
        assert!(js.contains(&format!(
            "'{}?markets='",
            crate::snapshot_core::SNAPSHOT_PATH
        )));
    }
}
