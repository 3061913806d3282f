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

use crate::hub::Membership;
use crate::metrics::GaugeGuard;
use crate::outbox::{Item, Outbox};
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
    first: Option<Event>,
    done: bool,
    deadline: tokio::time::Instant,
    ctx: Arc<Context>,
}

/// Handles `GET /v1/sse/<channel>`.
pub async fn handle(
    channel: String,
    params: StreamParams,
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
        if let Err(e) = ctx.hub.begin(&channel, &outbox).await {
            return Ok(api::error_from(&e));
        }
    }
    let ack = serde_json::json!({"type": "subscribed", "channel": channel, "markets": markets});
    let state = State {
        outbox,
        _membership: membership,
        _gauge: gauge,
        first: Some(Event::default().event("subscribed").data(ack.to_string())),
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
