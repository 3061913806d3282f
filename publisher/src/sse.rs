//! Server-Sent Events streams: `GET /v1/sse/<channel>`.
//!
//! The same flow as the WebSocket endpoint over plain HTTP: join the channel
//! (subscribed), then the outbox's items as events. SSE is one-way, so
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
use streampipe_contract::{close as code, validate_channel_id};
use warp::http::StatusCode;
use warp::sse::Event;
use warp::Reply;

use crate::auth::{Allowance, Principal};
use crate::clients::{Kind, StreamSlot};
use crate::hub::Membership;
use crate::metrics::GaugeGuard;
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
    if let Err(e) = validate_channel_id(&channel) {
        m.rejected.with_label_values(&["invalid_channel"]).inc();
        return Ok(api::error_response(
            StatusCode::BAD_REQUEST,
            "invalid_channel",
            &e.to_string(),
        ));
    }
    if params.token_in_url() {
        m.rejected.with_label_values(&["token_in_url"]).inc();
        return Ok(api::error_response(
            StatusCode::BAD_REQUEST,
            "token_in_url",
            "tokens never go in a URL: get a ticket with POST /v1/channels/<id>/tickets",
        ));
    }
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
        let value = match ctx.registry.take_ticket(&channel, ticket).await {
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
    match crate::channels::owns(&ctx, &principal, &channel).await {
        Ok(true) => {
            // Kept for a write-back after a Redis data loss.
            if let Some(s) = &principal.subject {
                ctx.hub.remember_owner(&channel, s);
            }
        }
        Ok(false) => {
            return Ok(api::error_response(
                StatusCode::NOT_FOUND,
                "unknown_channel",
                "unknown channel",
            ))
        }
        Err(e) => return Ok(api::error_from(&e)),
    }
    let client = crate::channels::client_key(&principal, &api::client_ip(&ctx, &headers, peer));
    let Some(slot) = ctx.clients.open_stream(&client) else {
        m.rejected.with_label_values(&["limit_streams"]).inc();
        return Ok(api::error_from(&crate::Error::limited(
            "too_many_streams",
            format!(
                "a client holds at most {} open streams here",
                ctx.clients.limits().max_streams
            ),
            Duration::from_secs(5),
        )));
    };
    let since = match params.since() {
        Ok(s) => s,
        Err(msg) => {
            m.rejected.with_label_values(&["invalid_since"]).inc();
            return Ok(api::error_response(
                StatusCode::BAD_REQUEST,
                "invalid_since",
                &msg,
            ));
        }
    };
    let outbox = Arc::new(Outbox::new(since, ctx.outbox_budget.clone()));
    if params.begin && ctx.hub.keeps_history() {
        // History markets' live updates wait for the begin below, which
        // replays what the client missed since `since` before them.
        outbox.hold();
    }
    let (membership, markets) = match ctx.hub.join(&channel, outbox.clone()).await {
        Ok(joined) => joined,
        Err(e) => {
            if matches!(e, crate::Error::Invalid { .. }) {
                m.rejected.with_label_values(&["unknown_channel"]).inc();
            }
            return Ok(api::error_from(&e));
        }
    };
    m.connections_total.with_label_values(&["sse"]).inc();
    let gauge = GaugeGuard::inc(m.connections.with_label_values(&["sse"]));
    if params.begin {
        match ctx.clients.take(&client, Kind::Begin, 1) {
            Ok(()) => {
                if let Err(e) = ctx.hub.begin(&channel, &outbox).await {
                    return Ok(api::error_from(&e));
                }
            }
            Err(wait) => {
                // Deferred rather than refused: the stream is open and
                // waits for its state as long as the bucket says.
                m.rejected.with_label_values(&[Kind::Begin.label()]).inc();
                let (ctx, outbox, channel) = (ctx.clone(), outbox.clone(), channel.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = ctx.hub.begin(&channel, &outbox).await;
                });
            }
        }
    }
    let ack = serde_json::json!({"type": "subscribed", "channel": channel, "markets": markets});
    let state = State {
        outbox,
        _membership: membership,
        _gauge: gauge,
        _slot: slot,
        first: Some(Event::default().event("subscribed").data(ack.to_string())),
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
