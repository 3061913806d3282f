//! Query subscriptions on a channel: `GET`/`POST /v1/channels/<id>/queries`
//! and `DELETE /v1/channels/<id>/queries?query=`.
//!
//! A query (grammar in `streampipe_contract::query`) is validated here with
//! the contract's parser (400 `invalid_query` with the reason), checked
//! against the token's market patterns (403 `query_not_allowed`) and the
//! per-channel and per-pipeline caps (400 `too_many_queries`), written to
//! the channel's query set, and then sent as one command to **every**
//! partition of the command topic: markets matching a query live on any
//! partition, and each partition's owner holds the queries of its
//! partitions. Concrete market commands still go to the market's partition
//! only. Refusals are counted like every API error
//! (`streampipe_publisher_rejected_total{reason=<code>}`).

use std::sync::Arc;

use serde::Deserialize;
use streampipe_contract::{
    Query, QueryCommandKind, MAX_QUERIES_PER_CHANNEL, MAX_QUERIES_PER_PIPELINE,
};
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use crate::api::{
    admit_changes, bad, caller, channel_markets, check_channel, json_body, reply, with_ctx, Caller,
};
use crate::auth::Allowance;
use crate::error::Error;
use crate::Context;

/// `{"query": "..."}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryBody {
    /// The query text.
    pub query: String,
}

/// `?query=...`.
#[derive(Debug, Deserialize)]
pub struct QueryParam {
    /// The query text.
    pub query: String,
}

/// Parses a query text; 400 `invalid_query` with the parser's reason.
pub fn parse(text: &str) -> Result<Query, Error> {
    Query::parse(text).map_err(|e| bad("invalid_query", e.to_string()))
}

/// Whether a token's market patterns cover every market `query` can match:
/// only a query with a market prefix inside an allowed `prefix*` pattern
/// (or a token allowing everything) can be sure of that.
pub fn allows(allowance: &Allowance, query: &Query) -> bool {
    match allowance {
        Allowance::All => true,
        Allowance::Patterns(pats) if pats.iter().any(|p| p == "*") => true,
        Allowance::Patterns(pats) => query.market_prefix().is_some_and(|prefix| {
            pats.iter().any(|pat| {
                pat.strip_suffix('*')
                    .is_some_and(|allowed| prefix.starts_with(allowed))
            })
        }),
    }
}

fn check_allowed(caller: &Caller, query: &Query) -> Result<(), Error> {
    if allows(&caller.principal.allowance, query) {
        return Ok(());
    }
    Err(Error::invalid(
        StatusCode::FORBIDDEN,
        "query_not_allowed",
        "the token's market patterns do not cover every market this query can match \
         (a query needs a market^= prefix inside an allowed prefix* pattern)",
    ))
}

fn listing(id: &str, queries: Vec<String>) -> warp::reply::Response {
    warp::reply::json(&serde_json::json!({"channel": id, "queries": queries})).into_response()
}

async fn list(
    id: String,
    caller: Caller,
    ctx: Arc<Context>,
) -> Result<warp::reply::Response, Rejection> {
    reply(
        &ctx,
        async {
            check_channel(&id)?;
            channel_markets(&ctx, &caller, &id).await?;
            Ok(listing(&id, ctx.registry.queries(&id).await?))
        }
        .await,
    )
}

async fn add(
    id: String,
    caller: Caller,
    body: QueryBody,
    ctx: Arc<Context>,
) -> Result<warp::reply::Response, Rejection> {
    reply(
        &ctx,
        async {
            check_channel(&id)?;
            let query = parse(&body.query)?;
            channel_markets(&ctx, &caller, &id).await?;
            check_allowed(&caller, &query)?;
            let canonical = query.canonical();
            admit_changes(&ctx, &caller.client, 1)?;
            let caps = (MAX_QUERIES_PER_PIPELINE, MAX_QUERIES_PER_CHANNEL);
            match ctx.registry.add_query(&id, &canonical, caps).await? {
                Err("channel") => {
                    return Err(bad(
                        "too_many_queries",
                        format!("a channel holds at most {MAX_QUERIES_PER_CHANNEL} queries"),
                    ))
                }
                Err(_) => {
                    return Err(bad(
                        "too_many_queries",
                        format!("the pipeline holds {MAX_QUERIES_PER_PIPELINE} queries, its limit"),
                    ))
                }
                Ok(false) => {}
                Ok(true) => {
                    if let Err(e) = ctx
                        .commands
                        .send_query(QueryCommandKind::AddQuery, &id, &canonical, &ctx.metrics)
                        .await
                    {
                        // Not sent: take it back out, so the channel never
                        // lists a query the reducers never got.
                        let _ = ctx.registry.remove_query(&id, &canonical).await;
                        return Err(e);
                    }
                }
            }
            Ok(listing(&id, ctx.registry.queries(&id).await?))
        }
        .await,
    )
}

async fn remove(
    id: String,
    param: QueryParam,
    caller: Caller,
    ctx: Arc<Context>,
) -> Result<warp::reply::Response, Rejection> {
    reply(
        &ctx,
        async {
            check_channel(&id)?;
            let canonical = parse(&param.query)?.canonical();
            channel_markets(&ctx, &caller, &id).await?;
            if !ctx.registry.queries(&id).await?.contains(&canonical) {
                return Err(Error::invalid(
                    StatusCode::NOT_FOUND,
                    "unknown_query",
                    "the channel does not hold this query",
                ));
            }
            // As for a market: tokens, the command, and only then the
            // registry, so a failed step leaves the query listed for a retry.
            admit_changes(&ctx, &caller.client, 1)?;
            ctx.commands
                .send_query(QueryCommandKind::RemoveQuery, &id, &canonical, &ctx.metrics)
                .await?;
            ctx.registry.remove_query(&id, &canonical).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

/// The query routes (wired into [`crate::api::routes`]).
pub fn routes(ctx: Arc<Context>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let list = warp::path!("v1" / "channels" / String / "queries")
        .and(warp::get())
        .and(caller(ctx.clone()))
        .and(with_ctx(ctx.clone()))
        .and_then(list);
    let add = warp::path!("v1" / "channels" / String / "queries")
        .and(warp::post())
        .and(caller(ctx.clone()))
        .and(json_body())
        .and(with_ctx(ctx.clone()))
        .and_then(add);
    let remove = warp::path!("v1" / "channels" / String / "queries")
        .and(warp::delete())
        .and(warp::query::<QueryParam>())
        .and(caller(ctx.clone()))
        .and(with_ctx(ctx.clone()))
        .and_then(remove);
    list.or(add).unify().or(remove).unify().boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_must_cover_every_market_a_query_can_match() {
        let q = |t: &str| Query::parse(t).unwrap();
        assert!(allows(&Allowance::All, &q("status=open")));
        let pats = Allowance::Patterns(vec!["FB.*".to_string(), "TN.1".to_string()].into());
        assert!(allows(&pats, &q("market^=FB.")));
        assert!(allows(&pats, &q("market^=FB.EPL;status=open")));
        assert!(!allows(&pats, &q("market^=FB")), "wider than the pattern");
        assert!(!allows(&pats, &q("status=open")), "no prefix: any market");
        assert!(
            !allows(&pats, &q("market^=TN.1")),
            "an exact id is no prefix"
        );
        let star = Allowance::Patterns(vec!["*".to_string()].into());
        assert!(allows(&star, &q("market^=X")));
        assert!(allows(&star, &q("a=1")), "everything allowed");
    }
}
