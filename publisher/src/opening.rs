//! Opening a stream, written once for both transports: the request's checks
//! (channel id, no token in the URL, `since`), then — once the transport
//! has authenticated the caller — the channel's ownership, the per-client
//! stream cap, joining the channel and the first `begin`. WebSocket
//! (`ws.rs`) and SSE (`sse.rs`) differ only in how they learn the principal
//! (subprotocol or auth frame; one-time ticket) and in how they say no: a
//! [`Refused`] becomes an HTTP error before an SSE stream or before a
//! WebSocket upgrade, and a close frame after the upgrade.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use streampipe_contract::{close as code, validate_channel_id};
use tracing::warn;
use warp::http::StatusCode;

use crate::auth::Principal;
use crate::clients::{Kind, StreamSlot};
use crate::error::Error;
use crate::hub::Membership;
use crate::outbox::Outbox;
use crate::{api, Context, StreamParams};

/// How long a client over its stream cap is told to wait before retrying.
pub const STREAM_CAP_RETRY_AFTER: Duration = Duration::from_secs(5);

/// What a stream request asks for, checked.
#[derive(Debug)]
pub struct Request {
    /// The channel to stream.
    pub channel: String,
    /// Market → the version the client already has.
    pub since: HashMap<Arc<str>, u64>,
    /// `from_ms`: history markets without a `since` entry resume from it.
    pub from_ms: Option<u64>,
    /// `begin=1`: replay the channel's state at once.
    pub begin: bool,
}

/// Why a stream was not opened.
#[derive(Debug)]
pub enum Refused {
    /// The request itself is bad (400): the metric label / error code, and
    /// the message.
    Bad(&'static str, String),
    /// No such channel, or another subject's (the same answer: no
    /// existence oracle).
    UnknownChannel,
    /// The client holds its maximum of open streams on this pod.
    TooManyStreams,
    /// Redis could not be asked; the detail is logged, not sent.
    Unavailable(Error),
}

impl Refused {
    /// The WebSocket close code and reason.
    pub fn close(&self) -> (u16, &'static str) {
        match self {
            Refused::Bad(..) => (code::MALFORMED_FRAME, "bad request"),
            Refused::UnknownChannel => (code::UNKNOWN_CHANNEL, "unknown channel"),
            Refused::TooManyStreams => (code::TOO_MANY_STREAMS, "too many streams"),
            Refused::Unavailable(_) => (code::UNAVAILABLE, "unavailable"),
        }
    }

    /// The HTTP answer.
    pub fn response(&self, ctx: &Context) -> warp::reply::Response {
        match self {
            Refused::Bad(label, message) => {
                api::error_response(StatusCode::BAD_REQUEST, label, message)
            }
            Refused::UnknownChannel => {
                api::error_response(StatusCode::NOT_FOUND, "unknown_channel", "unknown channel")
            }
            Refused::TooManyStreams => api::error_from(&Error::limited(
                "too_many_streams",
                format!(
                    "a client holds at most {} open streams here",
                    ctx.clients.limits().max_streams
                ),
                STREAM_CAP_RETRY_AFTER,
            )),
            Refused::Unavailable(e) => api::error_from(e),
        }
    }
}

/// Checks what the URL says; `token_hint` tells a client that put its token
/// in the URL where this transport takes it. Every refusal is counted.
pub fn check_request(
    ctx: &Context,
    channel: String,
    params: &StreamParams,
    token_hint: &str,
) -> Result<Request, Refused> {
    let refuse = |label: &'static str, message: String| {
        ctx.metrics.rejected.with_label_values(&[label]).inc();
        Refused::Bad(label, message)
    };
    if let Err(e) = validate_channel_id(&channel) {
        return Err(refuse("invalid_channel", e.to_string()));
    }
    if params.token_in_url() {
        return Err(refuse(
            "token_in_url",
            format!("tokens never go in a URL: {token_hint}"),
        ));
    }
    let since = params.since().map_err(|m| refuse("invalid_since", m))?;
    let from_ms = params
        .from_ms
        .map(crate::frames::checked_from_ms)
        .transpose()
        .map_err(|m| refuse("invalid_from_ms", m))?;
    Ok(Request {
        channel,
        since,
        from_ms,
        begin: params.begin,
    })
}

/// The first `begin` of a stream opened with `begin=1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBegin {
    /// Not asked for.
    None,
    /// Done: the state is in the outbox.
    Done,
    /// Asked for, but it failed (counted as `begin_failed`).
    Failed,
    /// The client's begin bucket could not pay yet: due then.
    Deferred(tokio::time::Instant),
}

/// An open stream: what the transport streams from and must keep alive.
pub struct Opened {
    /// Where the hub delivers this stream's messages.
    pub outbox: Arc<Outbox>,
    /// The stream's place in the channel (leaves it on drop).
    pub membership: Membership,
    /// The channel's markets when it joined (the `subscribed` ack).
    pub markets: Vec<String>,
    /// The stream's share of the client's cap (freed on drop).
    pub slot: StreamSlot,
    /// The client's key for its rate buckets (subject, else IP).
    pub client: String,
    /// What became of `begin=1`.
    pub begin: FirstBegin,
}

impl Opened {
    /// The `subscribed` acknowledgement, the first message of every stream.
    pub fn ack(&self, channel: &str) -> String {
        serde_json::json!({"type": "subscribed", "channel": channel, "markets": self.markets})
            .to_string()
    }
}

/// Opens the stream `req` for `principal` (connecting from `ip`): the
/// channel must be the principal's, the client under its stream cap; then
/// the stream joins the channel and, with `begin=1`, gets its state (or a
/// deferred begin when the client's bucket is empty).
pub async fn open(
    ctx: &Arc<Context>,
    principal: &Principal,
    ip: &str,
    req: Request,
) -> Result<Opened, Refused> {
    let m = &ctx.metrics;
    match crate::channels::owns(ctx, principal, &req.channel).await {
        Ok(true) => {
            // Kept for a write-back after a Redis data loss.
            if let Some(s) = &principal.subject {
                ctx.hub.remember_owner(&req.channel, s);
            }
        }
        Ok(false) => return Err(Refused::UnknownChannel),
        Err(e) => {
            warn!(error = %e, "stream could not check its channel's owner");
            return Err(Refused::Unavailable(e));
        }
    }
    let client = crate::channels::client_key(principal, ip);
    let Some(slot) = ctx.clients.open_stream(&client) else {
        m.rejected.with_label_values(&["limit_streams"]).inc();
        return Err(Refused::TooManyStreams);
    };
    let outbox = Arc::new(Outbox::new(req.since, ctx.outbox_budget.clone()));
    if let Some(ms) = req.from_ms {
        outbox.resume_from_time(ms);
    }
    if ctx.hub.keeps_history() {
        // History markets' live updates wait for the first begin, which
        // replays what the client missed before them (see `hub::begin`);
        // a transport whose client will not begin releases the hold.
        outbox.hold();
    }
    let (membership, markets) = match ctx.hub.join(&req.channel, outbox.clone()).await {
        Ok(joined) => joined,
        Err(Error::Invalid { .. }) => {
            m.rejected.with_label_values(&["unknown_channel"]).inc();
            return Err(Refused::UnknownChannel);
        }
        Err(e) => {
            warn!(error = %e, "stream could not join its channel");
            return Err(Refused::Unavailable(e));
        }
    };
    let begin = if !req.begin {
        FirstBegin::None
    } else {
        match ctx.clients.take(&client, Kind::Begin, 1) {
            Ok(()) => match ctx.hub.begin(&req.channel, &outbox).await {
                Ok(_) => FirstBegin::Done,
                Err(_) => {
                    m.rejected.with_label_values(&["begin_failed"]).inc();
                    FirstBegin::Failed
                }
            },
            Err(wait) => {
                // Deferred rather than refused: the stream is open and
                // waits for its state as long as the bucket says.
                m.rejected.with_label_values(&[Kind::Begin.label()]).inc();
                FirstBegin::Deferred(tokio::time::Instant::now() + wait)
            }
        }
    };
    Ok(Opened {
        outbox,
        membership,
        markets,
        slot,
        client,
        begin,
    })
}
