//! The channel handlers: create, add and remove markets, `begin`, close,
//! and the one-time SSE ticket. Each checks (see [`super::guards`]) before
//! it changes anything, and orders its Redis and Kafka steps so a refused
//! or failed step leaves nothing a retry cannot finish.

use std::sync::Arc;

use serde::Serialize;
use streampipe_contract::CommandKind;
use warp::http::StatusCode;
use warp::{Rejection, Reply};

use super::guards::{
    admit_changes, bad, channel_markets, check_allowed, check_channel, check_market, limit, shed,
    take_tokens, unknown_channel, validate_markets,
};
use super::{reply, Caller, MarketsBody};
use crate::channels::{close, owns};
use crate::clients::Kind;
use crate::error::Error;
use crate::limits::MAX_MARKETS_PER_CHANNEL;
use crate::registry::Added;
use crate::Context;

/// The reply to a created channel: its id, markets and stream URLs.
#[derive(Serialize)]
struct ChannelCreated<'a> {
    channel: &'a str,
    markets: &'a [String],
    stream: String,
    sse: String,
}

/// How long a client's channel counts against its cap at most, should its
/// close have been lost (the janitor closes idle channels well before).
fn claim_memory(ctx: &Context) -> std::time::Duration {
    ctx.config.channel_idle_ttl + ctx.config.janitor_interval * 2
}

pub(super) async fn create_channel(
    caller: Caller,
    body: MarketsBody,
    ctx: Arc<Context>,
) -> Result<warp::reply::Response, Rejection> {
    reply(
        &ctx,
        async {
            let markets = validate_markets(body.markets)?;
            check_allowed(&ctx, &caller, &markets)?;
            shed(&ctx)?;
            limit(&ctx, &caller.client, Kind::ChannelCreate, 1)?;
            limit(&ctx, &caller.client, Kind::MarketChange, markets.len())?;
            take_tokens(&ctx, markets.len())?;
            let id = uuid::Uuid::new_v4().to_string();
            let cap = ctx.clients.limits().max_channels;
            if !ctx
                .registry
                .claim_channel(&caller.client, &id, cap, claim_memory(&ctx))
                .await?
            {
                ctx.metrics
                    .rejected
                    .with_label_values(&["limit_channels"])
                    .inc();
                return Err(Error::invalid(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_channels",
                    format!("a client holds at most {cap} channels; close one first"),
                ));
            }
            if let Some(sub) = &caller.principal.subject {
                if let Err(e) = ctx.registry.set_owner(&id, sub).await {
                    let _ = ctx.registry.delete(&id).await;
                    return Err(e);
                }
            }
            if let Err(e) = ctx.registry.add(&id, &markets).await {
                let _ = ctx.registry.delete(&id).await;
                return Err(e);
            }
            // The channel's idle clock starts now (see `janitor`).
            ctx.registry.touch(std::slice::from_ref(&id)).await?;
            if let Err(e) = ctx
                .commands
                .send(CommandKind::Subscribe, &id, &markets, &ctx.metrics)
                .await
            {
                let _ = ctx.registry.delete(&id).await;
                return Err(e);
            }
            let body = ChannelCreated {
                channel: &id,
                markets: &markets,
                stream: format!("/v1/stream/{id}"),
                sse: format!("/v1/sse/{id}"),
            };
            Ok(
                warp::reply::with_status(warp::reply::json(&body), StatusCode::CREATED)
                    .into_response(),
            )
        }
        .await,
    )
}

pub(super) async fn add_markets(
    id: String,
    caller: Caller,
    body: MarketsBody,
    ctx: Arc<Context>,
) -> Result<warp::reply::Response, Rejection> {
    reply(
        &ctx,
        async {
            check_channel(&id)?;
            let markets = validate_markets(body.markets)?;
            let existing = channel_markets(&ctx, &caller, &id).await?;
            check_allowed(&ctx, &caller, &markets)?;
            let candidates: Vec<String> = markets
                .into_iter()
                .filter(|m| !existing.contains(m))
                .collect();
            let over_cap = || {
                bad(
                    "too_many_markets",
                    format!("a channel watches at most {MAX_MARKETS_PER_CHANNEL} markets"),
                )
            };
            if existing.len() + candidates.len() > MAX_MARKETS_PER_CHANNEL {
                return Err(over_cap());
            }
            if !candidates.is_empty() {
                admit_changes(&ctx, &caller.client, candidates.len())?;
                // The cap is checked again where the markets are added, in
                // one Redis step: concurrent adds cannot overshoot it.
                let new = match ctx
                    .registry
                    .add_capped(&id, &candidates, MAX_MARKETS_PER_CHANNEL)
                    .await?
                {
                    Added::Added(new) => new,
                    Added::OverCap => return Err(over_cap()),
                };
                if !new.is_empty() {
                    if let Err(e) = ctx
                        .commands
                        .send(CommandKind::Subscribe, &id, &new, &ctx.metrics)
                        .await
                    {
                        // Not subscribed: take them back out, so the
                        // registry never lists what the reducers never got
                        // (a retry adds them again).
                        for m in &new {
                            let _ = ctx.registry.remove(&id, m).await;
                        }
                        return Err(e);
                    }
                    // Pods holding the channel's streams subscribe to the
                    // new markets' topics and send their state.
                    ctx.registry.notify_markets_changed(&id).await?;
                }
            }
            let all = ctx.registry.markets(&id).await?.unwrap_or_default();
            Ok(
                warp::reply::json(&serde_json::json!({"channel": id, "markets": all}))
                    .into_response(),
            )
        }
        .await,
    )
}

pub(super) async fn remove_market(
    id: String,
    market: String,
    caller: Caller,
    ctx: Arc<Context>,
) -> Result<warp::reply::Response, Rejection> {
    reply(
        &ctx,
        async {
            check_channel(&id)?;
            check_market(&market)?;
            channel_markets(&ctx, &caller, &id).await?;
            if !ctx.registry.has(&id, &market).await? {
                return Err(Error::invalid(
                    StatusCode::NOT_FOUND,
                    "unknown_market",
                    "the channel does not watch this market",
                ));
            }
            // Tokens, then the unsubscribe, and only then the registry: a
            // step refused or failed leaves the market listed, so the retry
            // finds it and finishes (the unsubscribe is idempotent) instead
            // of answering 404 over a reducer subscription nobody can close.
            admit_changes(&ctx, &caller.client, 1)?;
            ctx.commands
                .send(
                    CommandKind::Unsubscribe,
                    &id,
                    std::slice::from_ref(&market),
                    &ctx.metrics,
                )
                .await?;
            ctx.registry.remove(&id, &market).await?;
            ctx.registry.notify_markets_changed(&id).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

pub(super) async fn begin(
    id: String,
    caller: Caller,
    ctx: Arc<Context>,
) -> Result<warp::reply::Response, Rejection> {
    reply(
        &ctx,
        async {
            check_channel(&id)?;
            if !owns(&ctx, &caller.principal, &id).await? {
                return Err(unknown_channel());
            }
            let Some(markets) = ctx.registry.received(&id).await? else {
                // Streams of a vanished channel may still be open on some
                // pod: they re-read the registry and close with 4404.
                ctx.registry.notify_markets_changed(&id).await?;
                return Err(unknown_channel());
            };
            // One replay reaches every stream of the channel: begins of one
            // channel close together make one.
            if !ctx.clients.begin_due(&id) {
                ctx.metrics
                    .rejected
                    .with_label_values(&["begin_coalesced"])
                    .inc();
                return Ok(StatusCode::ACCEPTED.into_response());
            }
            limit(&ctx, &caller.client, Kind::Begin, 1)?;
            take_tokens(&ctx, markets.len())?;
            // The streams of the channel already receive its markets' topics
            // (they joined before this call), so replaying the stored state
            // on the channel's own topic leaves no gap.
            let states: Vec<_> = ctx
                .registry
                .states(&markets)
                .await?
                .into_iter()
                .flatten()
                .collect();
            ctx.registry.replay(&id, &states).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        .await,
    )
}

pub(super) async fn close_channel(
    id: String,
    caller: Caller,
    ctx: Arc<Context>,
) -> Result<warp::reply::Response, Rejection> {
    reply(
        &ctx,
        async {
            check_channel(&id)?;
            channel_markets(&ctx, &caller, &id).await?;
            // Everything the channel has on either side: the registry and
            // the reducers' map can disagree after a failed step, and a
            // market only one side knows must not outlive the channel.
            let markets = ctx.registry.all_markets(&id).await?;
            close(&ctx, &id, &markets).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

/// `POST /v1/channels/<id>/tickets`: a one-time ticket for `GET
/// /v1/sse/<id>?ticket=` (EventSource cannot send a header), valid
/// [`crate::auth::TICKET_TTL`], bound to the channel and the subject.
pub(super) async fn ticket(
    id: String,
    caller: Caller,
    ctx: Arc<Context>,
) -> Result<warp::reply::Response, Rejection> {
    reply(
        &ctx,
        async {
            check_channel(&id)?;
            channel_markets(&ctx, &caller, &id).await?;
            let t = uuid::Uuid::new_v4().simple().to_string();
            let value = format!(
                "{}:{}",
                caller.principal.expires_at.unwrap_or(0),
                caller.principal.subject.as_deref().unwrap_or("")
            );
            let ttl = crate::auth::TICKET_TTL;
            ctx.registry.put_ticket(&id, &t, &value, ttl).await?;
            Ok(warp::reply::with_status(
                warp::reply::json(&serde_json::json!({
                    "ticket": t,
                    "expires_in": ttl.as_secs(),
                    "sse": format!("/v1/sse/{id}?ticket={t}"),
                })),
                StatusCode::CREATED,
            )
            .into_response())
        }
        .await,
    )
}
