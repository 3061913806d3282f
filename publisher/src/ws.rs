//! WebSocket streams: `GET /v1/stream/<channel>`.
//!
//! The upgrade is done here rather than with `warp::ws()`, whose WebSocket
//! configuration cannot set tungstenite's read buffer: tungstenite allocates
//! it eagerly (128 KiB by default), which alone would cost 1.3 GB for 10 000
//! idle connections. We answer the handshake ourselves (101 +
//! `Sec-WebSocket-Accept`), take hyper's upgraded I/O from the request's
//! `OnUpgrade` extension and build the `WebSocketStream` with a small
//! [`ws_config`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use streampipe_contract::deploy::{WS_BEARER_PREFIX, WS_PROTOCOL};
use streampipe_contract::{close as code, MAX_UPDATE_MESSAGE_BYTES};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, warn};
use warp::http::{Response, StatusCode};
use warp::hyper::body::Bytes as HyperBytes;

use crate::auth::{self, Principal};
use crate::clients::Kind;
use crate::frames::{self, ClientFrame};
use crate::metrics::GaugeGuard;
use crate::opening::{self, FirstBegin, Opened, Request};
use crate::outbox::{Item, Outbox};
use crate::server::PeerAddr;
use crate::{api, Context, StreamParams};

/// Largest client frame: clients only send `begin` (with `since` for up to
/// `MAX_MARKETS_PER_CHANNEL` markets would need more, so `since` beyond this
/// belongs in the query string) and control frames.
pub const MAX_CLIENT_FRAME: usize = 4 * 1024;

/// tungstenite's eagerly allocated read buffer: client frames are tiny, so
/// 1 KiB instead of the 128 KiB default (the bulk of an idle socket's memory).
pub const READ_BUFFER: usize = 1024;

/// How often the server pings: below common proxy idle timeouts (60 s).
pub const PING_INTERVAL: Duration = Duration::from_secs(20);

/// Idle timeout: how long without any frame from the client (pongs
/// included) before the connection is closed with 4409. Three missed pings:
/// a live browser always answers pings, so this only reaps dead peers
/// (sleeping laptops, vanished mobiles) whose TCP would linger for minutes.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Minimum time between two `begin`s run for one connection (each reads
/// every market's state; a looping client must not flood Redis): a sooner
/// one is deferred to this interval, and several merge into one.
pub const BEGIN_MIN_INTERVAL: Duration = Duration::from_millis(500);

/// First wait before a failed `begin` (Redis unreachable, e.g. during a
/// cluster failover) is tried again for the client: it asked, and would
/// otherwise wait silently for updates that may not come. Doubled per
/// failure up to [`BEGIN_RETRY_MAX`], so a Redis outage is not met by every
/// connection retrying every second.
pub const BEGIN_RETRY_MIN: Duration = Duration::from_secs(1);

/// Longest wait between two retries of a failed `begin`.
pub const BEGIN_RETRY_MAX: Duration = Duration::from_secs(16);

/// How long a connection holds history markets' live updates aside while
/// waiting for its first `begin` (clients send it on `subscribed`, one
/// round trip later): that begin then resumes from the history in order. A
/// client that never begins gets the held updates after this, as live ones.
pub const HISTORY_HOLD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one write may take before the client counts as hopelessly behind.
pub const WRITE_TIMEOUT: Duration = crate::outbox::SLOW_CLIENT_TIMEOUT;

/// Frames gathered before tungstenite writes them to the socket: when a
/// connection has several updates waiting, they leave in one syscall
/// instead of one each (the bulk of the CPU per delivered message), while
/// the buffer a busy connection keeps stays small.
pub const WRITE_BATCH: usize = 8 * 1024;

/// Largest WebSocket frame header (opcode, 64-bit length; servers do not mask).
const MAX_FRAME_HEADER: usize = 10;

/// tungstenite refuses a frame that would take its write buffer past this
/// (`WriteBufferFull`, and the connection is lost). Derived from the
/// contract's largest update, above a full batch plus one such update, so
/// every update the reducers accept reaches every client.
pub const MAX_WRITE_BUFFER: usize = WRITE_BATCH + MAX_UPDATE_MESSAGE_BYTES + MAX_FRAME_HEADER;

/// The WebSocket configuration of every stream connection.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        // Frames are fed one by one and flushed once per outbox drain.
        .write_buffer_size(WRITE_BATCH)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(Some(MAX_CLIENT_FRAME))
        .max_frame_size(Some(MAX_CLIENT_FRAME))
}

/// Headers of an upgrade request.
#[derive(Debug, Default)]
pub struct Upgrade {
    /// `Connection`.
    pub connection: Option<String>,
    /// `Upgrade`.
    pub upgrade: Option<String>,
    /// `Sec-WebSocket-Version`.
    pub version: Option<String>,
    /// `Sec-WebSocket-Key`.
    pub key: Option<String>,
    /// `Origin`.
    pub origin: Option<String>,
    /// `Host` (an Origin naming it is the page's own origin).
    pub host: Option<String>,
    /// `Sec-WebSocket-Protocol`: `streampipe.v2`, optionally `bearer.<jwt>`.
    pub protocol: Option<String>,
}

/// What the client offered in `Sec-WebSocket-Protocol`: whether it speaks
/// [`WS_PROTOCOL`], and the token of a `bearer.<jwt>` entry.
pub fn offered_protocols(header: Option<&str>) -> (bool, bool, Option<String>) {
    let mut any = false;
    let mut v2 = false;
    let mut token = None;
    for p in header
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        any = true;
        if p == WS_PROTOCOL {
            v2 = true;
        } else if let Some(t) = p.strip_prefix(WS_BEARER_PREFIX) {
            token = Some(t.to_owned());
        }
    }
    (any, v2, token)
}

/// Whether `key` is what RFC 6455 §4.1 requires of `Sec-WebSocket-Key`:
/// the base64 encoding of 16 bytes, i.e. 22 base64 characters (the last
/// carrying two bits, so one of `A`, `Q`, `g`, `w`) and `==`.
pub fn valid_key(key: &str) -> bool {
    let b = key.trim().as_bytes();
    b.len() == 24
        && &b[22..] == b"=="
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        && matches!(b[21], b'A' | b'Q' | b'g' | b'w')
}

/// Handles `GET /v1/stream/<channel>`.
#[allow(clippy::too_many_arguments)]
pub async fn handle(
    channel: String,
    headers: Upgrade,
    all_headers: warp::http::HeaderMap,
    peer: Option<PeerAddr>,
    params: StreamParams,
    on_upgrade: Option<OnUpgrade>,
    ctx: Arc<Context>,
) -> Result<warp::reply::Response, warp::Rejection> {
    let is_ws = headers
        .connection
        .as_deref()
        .is_some_and(|c| c.to_ascii_lowercase().contains("upgrade"))
        && headers
            .upgrade
            .as_deref()
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let reject = |status, reason: &'static str, message: &str| -> Result<_, warp::Rejection> {
        ctx.metrics.rejected.with_label_values(&[reason]).inc();
        Ok(api::error_response(status, reason, message))
    };
    let (Some(on_upgrade), true) = (on_upgrade, is_ws) else {
        return reject(
            StatusCode::BAD_REQUEST,
            "websocket_required",
            "this endpoint needs a WebSocket upgrade (version 13)",
        );
    };
    if headers.version.as_deref().map(str::trim) != Some("13") {
        // RFC 6455 §4.4: answer with the versions we speak.
        let mut resp = reject(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported_websocket_version",
            "only WebSocket version 13 is spoken",
        )?;
        resp.headers_mut().insert(
            "sec-websocket-version",
            warp::http::HeaderValue::from_static("13"),
        );
        return Ok(resp);
    }
    let Some(key) = headers.key.filter(|k| valid_key(k)) else {
        return reject(
            StatusCode::BAD_REQUEST,
            "invalid_websocket_key",
            "Sec-WebSocket-Key must be the base64 encoding of 16 bytes",
        );
    };
    let req = match opening::check_request(
        &ctx,
        channel,
        &params,
        "use the Sec-WebSocket-Protocol entry bearer.<token> or an auth frame",
    ) {
        Ok(req) => req,
        Err(r) => return Ok(r.response(&ctx)),
    };
    let (offered, v2, bearer) = offered_protocols(headers.protocol.as_deref());
    if offered && !v2 {
        return reject(
            StatusCode::BAD_REQUEST,
            "unsupported_websocket_protocol",
            "offer the subprotocol streampipe.v2 (with bearer.<token>) or none",
        );
    }
    let ip = api::client_ip(&ctx, &all_headers, peer);
    let origin_ok = ctx.origin_allowed(headers.origin.as_deref(), headers.host.as_deref());
    let accept = derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                debug!(error = %e, "websocket upgrade failed");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            Some(ws_config()),
        )
        .await;
        let opening = Opening {
            req,
            origin_ok,
            bearer,
            ip,
        };
        run(ws, opening, ctx).await;
    });
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-accept", accept);
    if v2 {
        // Only the protocol name: the token is never echoed.
        resp = resp.header("sec-websocket-protocol", WS_PROTOCOL);
    }
    Ok(resp.body(HyperBytes::new().into()).expect("valid response"))
}

/// Runs a `begin`; when it fails (counted as `begin_failed`) on a stream
/// that is still open, returns when to try again (backing off), so the
/// client is not left waiting silently for a state that never comes.
async fn begin_or_retry(
    ctx: &Context,
    channel: &str,
    outbox: &Outbox,
    retry: &mut Duration,
) -> Option<tokio::time::Instant> {
    match ctx.hub.begin(channel, outbox).await {
        Ok(_) => {
            *retry = BEGIN_RETRY_MIN;
            None
        }
        Err(e) => {
            ctx.metrics
                .rejected
                .with_label_values(&["begin_failed"])
                .inc();
            if outbox.is_closed() {
                return None; // unknown channel (closed 4404), or shutting down
            }
            warn!(error = %e, channel, retry_in = ?*retry, "begin failed; retrying");
            let at = tokio::time::Instant::now() + *retry;
            *retry = (*retry * 2).min(BEGIN_RETRY_MAX);
            Some(at)
        }
    }
}

/// What a connection was opened with.
struct Opening {
    req: Request,
    origin_ok: bool,
    bearer: Option<String>,
    ip: String,
}

/// Far enough to mean "never" for a `sleep_until`.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

fn deadline_of(expires_at: Option<u64>) -> tokio::time::Instant {
    tokio::time::Instant::now() + expires_at.map_or(NEVER, auth::until_expiry)
}

/// The connection's principal: anonymous, the subprotocol's token, or the
/// token of an `auth` first frame within [`auth::AUTH_TIMEOUT`]; on failure
/// the connection is closed with 4407 and `None` returned.
async fn authenticate(ws: &mut Ws, ctx: &Context, bearer: Option<String>) -> Option<Principal> {
    if !ctx.auth.requires_token() {
        return Some(Principal::anonymous());
    }
    let token = match bearer {
        Some(t) => t,
        None => match tokio::time::timeout(auth::AUTH_TIMEOUT, ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => match frames::parse(text.as_str()) {
                Ok(ClientFrame::Auth { token }) => token,
                _ => String::new(),
            },
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) => return None,
            Ok(Some(Err(e))) => {
                if let Some((c, reason, label)) = read_error_close(&e) {
                    ctx.metrics.rejected.with_label_values(&[label]).inc();
                    close(ws, ctx, c, reason).await;
                }
                return None;
            }
            Ok(Some(Ok(_))) => String::new(),
            Err(_) => {
                ctx.metrics
                    .rejected
                    .with_label_values(&["auth_timeout"])
                    .inc();
                close(ws, ctx, code::UNAUTHORIZED, "no token in time").await;
                return None;
            }
        },
    };
    match ctx.auth.from_token(&token) {
        Ok(p) => Some(p),
        Err(r) => {
            ctx.metrics.rejected.with_label_values(&[r.label()]).inc();
            close(ws, ctx, code::UNAUTHORIZED, r.label()).await;
            None
        }
    }
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// How long a close waits for the client's half of the closing handshake.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Closes with a proper close frame and waits briefly for the client's close,
/// so the client reads our code instead of a TCP reset.
async fn close(ws: &mut Ws, ctx: &Context, code: u16, reason: &'static str) {
    ctx.metrics
        .closes
        .with_label_values(&[&code.to_string()])
        .inc();
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
    if tokio::time::timeout_at(deadline, ws.close(Some(frame)))
        .await
        .is_err()
    {
        return;
    }
    // Read until the client's close (or the stream gives up).
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, ws.next()).await {}
    // Then discard whatever is left unread (e.g. the rest of an oversized
    // frame) until the client closes: closing a socket with unread data makes
    // the kernel send a reset, and the client would never see our code.
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 4096];
    let io = ws.get_mut();
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, io.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
}

/// The close code, reason and metric label a read error deserves; `None`
/// when the connection is simply gone (reset, EOF, I/O error), which needs
/// no close frame and is no protocol error.
fn read_error_close(e: &WsError) -> Option<(u16, &'static str, &'static str)> {
    match e {
        WsError::Capacity(_) => Some((code::TOO_BIG, "frame too large", "frame_too_large")),
        WsError::Utf8(_) => Some((
            code::INVALID_PAYLOAD,
            "text frame is not UTF-8",
            "invalid_utf8",
        )),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => Some((code::PROTOCOL_ERROR, "protocol error", "protocol_error")),
        _ => None,
    }
}

/// One connection's life: check, join the channel, ack, stream.
async fn run(mut ws: Ws, opening: Opening, ctx: Arc<Context>) {
    let Opening {
        req,
        origin_ok,
        bearer,
        ip,
    } = opening;
    let m = &ctx.metrics;
    m.connections_total.with_label_values(&["ws"]).inc();
    let _gauge = GaugeGuard::inc(m.connections.with_label_values(&["ws"]));

    if !origin_ok {
        m.rejected.with_label_values(&["origin_not_allowed"]).inc();
        return close(
            &mut ws,
            &ctx,
            code::ORIGIN_NOT_ALLOWED,
            "origin not allowed",
        )
        .await;
    }
    let Some(mut principal) = authenticate(&mut ws, &ctx, bearer).await else {
        return;
    };
    let mut token_deadline = deadline_of(principal.expires_at);
    let channel = req.channel.clone();
    let begin_asked = req.begin;
    let opened = match opening::open(&ctx, &principal, &ip, req).await {
        Ok(o) => o,
        Err(r) => {
            let (c, reason) = r.close();
            return close(&mut ws, &ctx, c, reason).await;
        }
    };
    if ws.send(Message::text(opened.ack(&channel))).await.is_err() {
        return;
    }
    let Opened {
        outbox,
        membership: _membership,
        slot: _slot,
        client,
        begin,
        ..
    } = opened;
    let mut last_begin: Option<Instant> = begin_asked.then(Instant::now);
    // The opening held history markets' live updates for the first begin
    // (see `opening::open`); a client that sends none gets them after this.
    let mut hold_until = (ctx.hub.keeps_history() && !begin_asked)
        .then(|| tokio::time::Instant::now() + HISTORY_HOLD_TIMEOUT);
    // A failed begin is retried through the pending slot (see `BEGIN_RETRY_MIN`).
    let mut begin_retry = BEGIN_RETRY_MIN;
    // A begin the client's bucket could not pay for yet, one sent too soon
    // after the last, or one to retry: done when due (later begin frames
    // merge into it).
    let mut pending_begin: Option<tokio::time::Instant> = match begin {
        FirstBegin::Deferred(at) => Some(at),
        FirstBegin::Failed => Some(tokio::time::Instant::now() + begin_retry),
        _ => None,
    };
    // Looked up once: a labelled lookup per message would cost more than the count.
    let sent = m.sent.with_label_values(&["ws"]);
    let mut shutdown = ctx.shutdown.clone();
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            frame = ws.next() => {
                last_heard = Instant::now();
                match frame {
                    Some(Ok(Message::Text(text))) => {
                        match frames::parse(text.as_str()) {
                            Ok(ClientFrame::Begin { since, from_ms }) => {
                                hold_until = None; // this begin releases the hold
                                outbox.resume_from(&since);
                                if let Some(ms) = from_ms {
                                    outbox.resume_from_time(ms);
                                }
                                if let Some(t) = last_begin.filter(|t| t.elapsed() < BEGIN_MIN_INTERVAL) {
                                    // Too soon after the previous one: deferred
                                    // to when it is allowed, never dropped (a
                                    // client answering two quick `reset`s must
                                    // get the state read after the second).
                                    m.rejected.with_label_values(&["begin_rate"]).inc();
                                    let at = tokio::time::Instant::from_std(t + BEGIN_MIN_INTERVAL);
                                    pending_begin = Some(pending_begin.map_or(at, |p| p.max(at)));
                                    continue;
                                }
                                last_begin = Some(Instant::now());
                                if pending_begin.is_some() {
                                    // Merged into the begin already waiting.
                                    continue;
                                }
                                if let Err(wait) = ctx.clients.take(&client, Kind::Begin, 1) {
                                    m.rejected.with_label_values(&[Kind::Begin.label()]).inc();
                                    pending_begin = Some(tokio::time::Instant::now() + wait);
                                    continue;
                                }
                                // The hub re-reads the channel's markets first:
                                // some may have been added since it connected.
                                pending_begin = begin_or_retry(&ctx, &channel, &outbox, &mut begin_retry).await;
                            }
                            Ok(ClientFrame::Auth { token } | ClientFrame::Refresh { token }) => {
                                if !ctx.auth.requires_token() {
                                    continue; // anonymous: nothing to refresh
                                }
                                match ctx.auth.from_token(&token) {
                                    Ok(p) if p.subject == principal.subject => {
                                        token_deadline = deadline_of(p.expires_at);
                                        let ack = serde_json::json!({"type": "refreshed", "expires_at": p.expires_at});
                                        principal = p;
                                        if ws.send(Message::text(ack.to_string())).await.is_err() {
                                            return;
                                        }
                                    }
                                    Ok(_) => {
                                        m.rejected.with_label_values(&["refresh_other_subject"]).inc();
                                        return close(&mut ws, &ctx, code::UNAUTHORIZED, "token of another subject").await;
                                    }
                                    Err(r) => {
                                        m.rejected.with_label_values(&[r.label()]).inc();
                                        return close(&mut ws, &ctx, code::UNAUTHORIZED, r.label()).await;
                                    }
                                }
                            }
                            Err(_) => {
                                m.rejected.with_label_values(&["bad_frame"]).inc();
                                return close(&mut ws, &ctx, code::MALFORMED_FRAME, "malformed frame").await;
                            }
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        m.rejected.with_label_values(&["bad_frame"]).inc();
                        return close(&mut ws, &ctx, code::MALFORMED_FRAME, "binary frames are not accepted").await;
                    }
                    Some(Ok(Message::Close(_))) => {
                        // tungstenite queued the echo of the client's close
                        // frame: send it, so the client's close handshake
                        // completes instead of ending in a reset.
                        m.closes.with_label_values(&["client"]).inc();
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.flush()).await;
                        return;
                    }
                    None => {
                        debug!("websocket connection ended without a close frame");
                        m.closes.with_label_values(&["aborted"]).inc();
                        return;
                    }
                    Some(Ok(_)) => {} // ping (answered by tungstenite), pong
                    Some(Err(e)) => {
                        let Some((c, reason, label)) = read_error_close(&e) else {
                            // The client went away without a close frame.
                            debug!(error = %e, "websocket connection aborted");
                            m.closes.with_label_values(&["aborted"]).inc();
                            return;
                        };
                        debug!(error = %e, code = c, "websocket protocol error");
                        m.rejected.with_label_values(&[label]).inc();
                        return close(&mut ws, &ctx, c, reason).await;
                    }
                }
            }
            _ = outbox.notified() => {
                let mut written = 0u64;
                while let Some(item) = outbox.pop() {
                    match item {
                        Item::Message { bytes, .. } => {
                            // Shares the hub's bytes (no copy per connection);
                            // the check is cheap next to the write.
                            if bytes.len() > MAX_UPDATE_MESSAGE_BYTES {
                                // Written before the reducers bounded records
                                // (or by a foreign writer): skip it rather
                                // than lose the connection over it.
                                m.rejected.with_label_values(&["oversized_update"]).inc();
                                continue;
                            }
                            let Ok(text) = Utf8Bytes::try_from(bytes) else {
                                m.rejected.with_label_values(&["bad_pubsub_message"]).inc();
                                continue;
                            };
                            match tokio::time::timeout(WRITE_TIMEOUT, ws.feed(Message::Text(text))).await {
                                Ok(Ok(())) => written += 1,
                                Ok(Err(_)) => return,
                                Err(_) => {
                                    m.slow_closed.inc();
                                    return close(&mut ws, &ctx, code::TOO_SLOW, "client too slow").await;
                                }
                            }
                        }
                        Item::Close(code, reason) => {
                            sent.inc_by(written);
                            return close(&mut ws, &ctx, code, reason).await;
                        }
                    }
                }
                if written > 0 {
                    sent.inc_by(written);
                    match tokio::time::timeout(WRITE_TIMEOUT, ws.flush()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return,
                        Err(_) => {
                            m.slow_closed.inc();
                            return close(&mut ws, &ctx, code::TOO_SLOW, "client too slow").await;
                        }
                    }
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > IDLE_TIMEOUT {
                    return close(&mut ws, &ctx, code::HEARTBEAT_TIMEOUT, "heartbeat timeout").await;
                }
                if ws.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            _ = shutdown.changed() => {
                return close(&mut ws, &ctx, code::GOING_AWAY, "publisher shutting down").await;
            }
            _ = tokio::time::sleep_until(token_deadline) => {
                m.rejected.with_label_values(&["token_expired_mid_stream"]).inc();
                return close(&mut ws, &ctx, code::TOKEN_EXPIRED, "token expired").await;
            }
            _ = tokio::time::sleep_until(pending_begin.unwrap_or_else(|| tokio::time::Instant::now() + NEVER)), if pending_begin.is_some() => {
                match ctx.clients.take(&client, Kind::Begin, 1) {
                    Ok(()) => {
                        last_begin = Some(Instant::now());
                        pending_begin = begin_or_retry(&ctx, &channel, &outbox, &mut begin_retry).await;
                    }
                    Err(wait) => pending_begin = Some(tokio::time::Instant::now() + wait),
                }
            }
            _ = tokio::time::sleep_until(hold_until.unwrap_or_else(|| tokio::time::Instant::now() + NEVER)), if hold_until.is_some() => {
                hold_until = None;
                outbox.release();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_update_fits_the_write_buffer_after_a_full_batch() {
        let c = ws_config();
        assert!(c.max_write_buffer_size >= c.write_buffer_size + MAX_UPDATE_MESSAGE_BYTES + 10);
    }

    #[test]
    fn handshake_keys_must_be_base64_of_16_bytes() {
        // RFC 6455's example key.
        assert!(valid_key("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(valid_key("AAAAAAAAAAAAAAAAAAAAAA=="));
        for bad in [
            "",
            "x",
            "dGhlIHNhbXBsZSBub25jZQ",       // no padding
            "dGhlIHNhbXBsZSBub25jZR==",     // 17th byte bits set: not 16 bytes
            "dGhlIHNhbXBsZSBub25jZQ=",      // 23 characters
            "dGhlIHNhbXBsZSBub25jZQ===",    // 25 characters
            "dGhlIHNhbXBsZSBub25j*Q==",     // not base64
            "dGhlIHNhbXBsZSBub25jZQ==dGhl", // longer
        ] {
            assert!(!valid_key(bad), "{bad:?}");
        }
    }

    /// The JS client keeps its own copy of the close-code sets: they must be
    /// the contract's.
    #[test]
    fn the_js_client_agrees_on_close_codes() {
        let js = include_str!("../static/streampipe.js");
        let set = |name: &str| -> Vec<u16> {
            let start = js.find(&format!("const {name} = new Set([")).expect(name);
            let rest = &js[start..];
            let list = &rest[rest.find('[').unwrap() + 1..rest.find(']').unwrap()];
            let mut v: Vec<u16> = list.split(',').map(|s| s.trim().parse().unwrap()).collect();
            v.sort_unstable();
            v
        };
        let sorted = |a: &[u16]| {
            let mut v = a.to_vec();
            v.sort_unstable();
            v
        };
        assert_eq!(set("STOP_CODES"), sorted(&code::STOP));
        assert_eq!(set("FATAL_CODES"), sorted(&code::FATAL));
        assert!(js.contains(&format!(
            "const UNKNOWN_CHANNEL = {};",
            code::UNKNOWN_CHANNEL
        )));
        assert!(js.contains(&format!(
            "const LIFETIME_REACHED = {};",
            code::LIFETIME_REACHED
        )));
        assert!(js.contains(&format!("const HISTORY_GAP = {};", code::HISTORY_GAP)));
        assert!(js.contains(&format!("const TOKEN_EXPIRED = {};", code::TOKEN_EXPIRED)));
        assert!(js.contains(&format!("const UNAUTHORIZED = {};", code::UNAUTHORIZED)));
        assert!(js.contains(&format!("const WS_PROTOCOL = '{WS_PROTOCOL}';")));
    }
}
