//! Server-Sent Events streams: `GET /v1/sse/<channel>`.
//!
//! The same flow as the WebSocket endpoint over plain HTTP (the opening is
//! [`crate::opening`]'s, shared with it): join the channel (subscribed),
//! then the outbox's items as events. SSE is one-way, so
//! `begin` is `?begin=1` (or `POST /v1/channels/<id>/begin`). A slow reader
//! simply stops polling the body; its outbox conflates meanwhile.
//!
//! A stream lives at most its maximum lifetime (`--sse-max-lifetime-seconds`,
//! less a random tenth so streams opened together do not all reconnect
//! together), then ends with a `close` event carrying
//! [`code::LIFETIME_REACHED`]; the client reconnects at once with its
//! `since`. It bounds how long one connection pins a pod (load spreads again
//! after a scale-out) and how long a forgotten stream holds a connection
//! slot. Origins are checked before routing (see [`crate::origin`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream;
use streampipe_contract::close as code;
use warp::http::StatusCode;
use warp::sse::Event;
use warp::Reply;

use crate::auth::{Allowance, Principal};
use crate::clients::StreamSlot;
use crate::hub::Membership;
use crate::metrics::GaugeGuard;
use crate::opening::{self, FirstBegin};
use crate::outbox::{Item, Outbox};
use crate::server::PeerAddr;
use crate::{api, Context, StreamParams};

/// Keep-alive comment interval: below common proxy idle timeouts.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Default maximum lifetime of an SSE stream: long enough that reconnects
/// cost nothing noticeable (one `begin` with `since` an hour), short enough
/// that a scale-out rebalances within the hour.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(3600);

/// The lifetime of one stream: `max` less up to a tenth, at random.
fn lifetime(max: Duration) -> Duration {
    let spread = max / 10;
    let r = (uuid::Uuid::new_v4().as_u128() % 1024) as u32;
    max - spread * r / 1024
}

struct State {
    outbox: Arc<Outbox>,
    _membership: Membership,
    _gauge: GaugeGuard,
    _slot: StreamSlot,
    first: Option<Event>,
    /// When the token the ticket was issued for expires (+ leeway).
    token_deadline: Option<tokio::time::Instant>,
    done: bool,
    deadline: tokio::time::Instant,
    ctx: Arc<Context>,
}

/// Handles `GET /v1/sse/<channel>`.
pub async fn handle(
    channel: String,
    params: StreamParams,
    headers: warp::http::HeaderMap,
    peer: Option<PeerAddr>,
    ctx: Arc<Context>,
) -> Result<warp::reply::Response, warp::Rejection> {
    let m = &ctx.metrics;
    let req = match opening::check_request(
        &ctx,
        channel,
        &params,
        "get a ticket with POST /v1/channels/<id>/tickets",
    ) {
        Ok(req) => req,
        Err(r) => return Ok(r.response(&ctx)),
    };
    let principal = if ctx.auth.requires_token() {
        let unauthorized = |label: &str, msg: &str| {
            m.rejected.with_label_values(&[label]).inc();
            api::error_response(StatusCode::UNAUTHORIZED, "unauthorized", msg)
        };
        let Some(ticket) = params
            .ticket
            .as_deref()
            .filter(|t| !t.is_empty() && t.len() <= 64)
        else {
            return Ok(unauthorized(
                "ticket_missing",
                "an SSE stream needs ?ticket= from POST /v1/channels/<id>/tickets",
            ));
        };
        let value = match ctx.registry.take_ticket(&req.channel, ticket).await {
            Ok(Some(v)) => v,
            Ok(None) => {
                return Ok(unauthorized(
                    "ticket_invalid",
                    "the ticket is unknown, expired or already used",
                ))
            }
            Err(e) => return Ok(api::error_from(&e)),
        };
        let (exp, sub) = value.split_once(':').unwrap_or(("0", ""));
        Principal {
            subject: Some(sub.to_owned()),
            allowance: Allowance::Patterns(Vec::new().into()),
            expires_at: exp.parse().ok(),
        }
    } else {
        Principal::anonymous()
    };
    let channel = req.channel.clone();
    let ip = api::client_ip(&ctx, &headers, peer);
    let opened = match opening::open(&ctx, &principal, &ip, req).await {
        Ok(o) => o,
        Err(r) => return Ok(r.response(&ctx)),
    };
    match opened.begin {
        // No begin will come on this stream (`?begin=1` absent): the
        // history markets' live updates the opening held go out now.
        FirstBegin::None => opened.outbox.release(),
        FirstBegin::Done => {}
        // An SSE client cannot send begin again on this stream: fail the
        // request, and the EventSource retries it.
        FirstBegin::Failed => {
            return Ok(api::error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "unavailable",
            ))
        }
        FirstBegin::Deferred(at) => {
            let (ctx, outbox, channel) = (ctx.clone(), opened.outbox.clone(), channel.clone());
            tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                let _ = ctx.hub.begin(&channel, &outbox).await;
            });
        }
    }
    m.connections_total.with_label_values(&["sse"]).inc();
    let gauge = GaugeGuard::inc(m.connections.with_label_values(&["sse"]));
    let ack = opened.ack(&channel);
    let state = State {
        outbox: opened.outbox,
        _membership: opened.membership,
        _gauge: gauge,
        _slot: opened.slot,
        first: Some(Event::default().event("subscribed").data(ack)),
        token_deadline: principal
            .expires_at
            .filter(|_| ctx.auth.requires_token())
            .map(|e| tokio::time::Instant::now() + crate::auth::until_expiry(e)),
        done: false,
        deadline: tokio::time::Instant::now() + lifetime(ctx.config.sse_max_lifetime),
        ctx: ctx.clone(),
    };
    let events = stream::unfold(state, |mut st| async move {
        if let Some(e) = st.first.take() {
            return Some((Ok::<_, Infallible>(e), st));
        }
        if st.done {
            return None;
        }
        let mut shutdown = st.ctx.shutdown.clone();
        loop {
            if let Some(item) = st.outbox.pop() {
                return match item {
                    Item::Message { kind, bytes } => {
                        st.ctx.metrics.sent.with_label_values(&["sse"]).inc();
                        let data = String::from_utf8_lossy(&bytes).into_owned();
                        Some((Ok(Event::default().event(kind).data(data)), st))
                    }
                    Item::Close(code, reason) => {
                        st.ctx
                            .metrics
                            .closes
                            .with_label_values(&[&code.to_string()])
                            .inc();
                        st.done = true;
                        let data =
                            serde_json::json!({"type": "close", "code": code, "reason": reason});
                        Some((
                            Ok(Event::default().event("close").data(data.to_string())),
                            st,
                        ))
                    }
                };
            }
            tokio::select! {
                _ = st.outbox.notified() => {}
                _ = shutdown.changed() => {
                    st.done = true;
                    let data = serde_json::json!({"type": "close", "code": code::GOING_AWAY, "reason": "publisher shutting down"});
                    return Some((Ok(Event::default().event("close").data(data.to_string())), st));
                }
                _ = tokio::time::sleep_until(st.token_deadline.unwrap_or(st.deadline)), if st.token_deadline.is_some_and(|t| t < st.deadline) => {
                    st.done = true;
                    st.ctx.metrics.closes.with_label_values(&[&code::TOKEN_EXPIRED.to_string()]).inc();
                    let data = serde_json::json!({"type": "expired", "code": code::TOKEN_EXPIRED, "reason": "token expired; get a new ticket"});
                    return Some((Ok(Event::default().event("expired").data(data.to_string())), st));
                }
                _ = tokio::time::sleep_until(st.deadline) => {
                    st.done = true;
                    st.ctx.metrics.closes.with_label_values(&[&code::LIFETIME_REACHED.to_string()]).inc();
                    let data = serde_json::json!({"type": "close", "code": code::LIFETIME_REACHED, "reason": "stream lifetime reached; reconnect with since"});
                    return Some((Ok(Event::default().event("close").data(data.to_string())), st));
                }
            }
        }
    });
    let reply = warp::sse::reply(warp::sse::keep_alive().interval(KEEP_ALIVE).stream(events));
    Ok(reply.into_response())
}
