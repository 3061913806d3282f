//! The REST control API, organised like warp's `todos` example: this file
//! builds the routes (filters); the handlers do the work in
//! [`channel_routes`], [`market_routes`] and [`dev_token`], after the checks
//! in [`guards`]; [`request`] reads who calls and what they send, and
//! [`replies`] shapes every error the same way.

use std::sync::Arc;

use warp::{Filter, Reply};

use crate::Context;

mod channel_routes;
mod dev_token;
mod guards;
mod market_routes;
mod replies;
mod request;

pub use crate::limits::{
    RateLimiter, MAX_BODY_BYTES, MAX_COMMANDS_PER_SECOND, MAX_MARKETS_PER_CHANNEL, MAX_SNAPSHOT_IDS,
};
pub use dev_token::DevTokenBody;
pub use guards::limit;
pub(crate) use guards::{admit_changes, bad, channel_markets, check_allowed, check_channel};
pub(crate) use replies::reply;
pub use replies::{error_from, error_response, recover};
pub(crate) use request::caller;
pub use request::{client_ip, Caller, MarketsBody};
pub(crate) use request::{json_body, with_ctx};

/// All control API routes under `/v1`.
pub fn routes(ctx: Arc<Context>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let create = warp::path!("v1" / "channels")
        .and(warp::post())
        .and(caller(ctx.clone()))
        .and(json_body())
        .and(with_ctx(ctx.clone()))
        .and_then(channel_routes::create_channel);
    let add = warp::path!("v1" / "channels" / String / "markets")
        .and(warp::post())
        .and(caller(ctx.clone()))
        .and(json_body())
        .and(with_ctx(ctx.clone()))
        .and_then(channel_routes::add_markets);
    let remove = warp::path!("v1" / "channels" / String / "markets" / String)
        .and(warp::delete())
        .and(caller(ctx.clone()))
        .and(with_ctx(ctx.clone()))
        .and_then(channel_routes::remove_market);
    let begin = warp::path!("v1" / "channels" / String / "begin")
        .and(warp::post())
        .and(caller(ctx.clone()))
        .and(with_ctx(ctx.clone()))
        .and_then(channel_routes::begin);
    let tickets = warp::path!("v1" / "channels" / String / "tickets")
        .and(warp::post())
        .and(caller(ctx.clone()))
        .and(with_ctx(ctx.clone()))
        .and_then(channel_routes::ticket);
    let close = warp::path!("v1" / "channels" / String)
        .and(warp::delete())
        .and(caller(ctx.clone()))
        .and(with_ctx(ctx.clone()))
        .and_then(channel_routes::close_channel);
    let dev_token = warp::path!("v1" / "dev" / "token")
        .and(warp::post())
        .and(json_body())
        .and(with_ctx(ctx.clone()))
        .and_then(dev_token::dev_token);
    let market = warp::path!("v1" / "markets" / String)
        .and(warp::get())
        .and(caller(ctx.clone()))
        .and(with_ctx(ctx.clone()))
        .and_then(market_routes::market);
    let markets = warp::path!("v1" / "markets")
        .and(warp::get())
        .and(warp::query::<market_routes::IdsQuery>())
        .and(caller(ctx.clone()))
        .and(with_ctx(ctx.clone()))
        .and_then(market_routes::markets);
    let limits = warp::path!("v1" / "limits").and(warp::get()).map(|| {
        warp::reply::json(&serde_json::json!({
            "max_markets_per_channel": MAX_MARKETS_PER_CHANNEL,
            "max_body_bytes": MAX_BODY_BYTES,
            "max_snapshot_ids": MAX_SNAPSHOT_IDS,
            "max_snapshot_markets": crate::limits::MAX_SNAPSHOT_MARKETS,
            "max_snapshot_query_bytes": crate::limits::MAX_SNAPSHOT_QUERY_BYTES,
            "max_client_frame_bytes": crate::ws::MAX_CLIENT_FRAME,
            "max_token_bytes": crate::auth::MAX_TOKEN_BYTES,
            "ticket_ttl_seconds": crate::auth::TICKET_TTL.as_secs(),
        }))
        .into_response()
    });
    let demo = warp::path!("v1" / "demo" / "markets")
        .and(warp::get())
        .and(with_ctx(ctx.clone()))
        .map(|ctx: Arc<Context>| {
            warp::reply::json(&serde_json::json!({"markets": ctx.config.demo_markets}))
                .into_response()
        });
    create
        .or(add)
        .unify()
        .or(tickets)
        .unify()
        .or(dev_token)
        .unify()
        .or(remove)
        .unify()
        .or(begin)
        .unify()
        .or(close)
        .unify()
        .or(market)
        .unify()
        .or(markets)
        .unify()
        .or(crate::snapshot::route(ctx.clone()))
        .unify()
        .or(crate::queries::routes(ctx.clone()))
        .unify()
        .or(limits)
        .unify()
        .or(demo)
        .unify()
        .boxed()
}

/// A stable, low-cardinality label for a request path (for metrics).
pub fn route_label(method: &str, path: &str) -> &'static str {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        ("POST", ["v1", "channels"]) => "create_channel",
        ("POST", ["v1", "channels", _, "markets"]) => "add_markets",
        ("DELETE", ["v1", "channels", _, "markets", _]) => "remove_market",
        ("POST", ["v1", "channels", _, "begin"]) => "begin",
        ("POST", ["v1", "channels", _, "tickets"]) => "ticket",
        ("GET", ["v1", "channels", _, "queries"]) => "list_queries",
        ("POST", ["v1", "channels", _, "queries"]) => "add_query",
        ("DELETE", ["v1", "channels", _, "queries"]) => "remove_query",
        ("POST", ["v1", "dev", "token"]) => "dev_token",
        ("DELETE", ["v1", "channels", _]) => "close_channel",
        ("GET", ["v1", "markets", _]) => "market",
        ("GET", ["v1", "markets"]) => "markets",
        ("GET", ["v1", "snapshot"]) => "snapshot",
        ("GET", ["v1", "stream", _]) => "stream",
        ("GET", ["v1", "sse", _]) => "sse",
        ("GET", ["metrics"]) | ("GET", ["healthz"]) | ("GET", ["readyz"]) => "ops",
        ("GET", _) => "static",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_labels_have_low_cardinality() {
        assert_eq!(route_label("POST", "/v1/channels"), "create_channel");
        assert_eq!(
            route_label("DELETE", "/v1/channels/abc/markets/m1"),
            "remove_market"
        );
        assert_eq!(route_label("GET", "/v1/markets/x"), "market");
        assert_eq!(route_label("PUT", "/v1/anything"), "other");
    }
}
