//! The REST control API, market snapshots, static pages and error replies,
//! organised like warp's `todos` example: filters build routes, handlers do
//! the work, models are the request bodies.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use streampipe_contract::{validate_channel_id, validate_market_id, CommandKind};
use warp::http::StatusCode;
use warp::{Filter, Rejection, Reply};

use crate::auth::Principal;
use crate::channels::{client_key, close, owns};
use crate::clients::Kind;
use crate::error::Error;
pub use crate::limits::{
    RateLimiter, MAX_BODY_BYTES, MAX_COMMANDS_PER_SECOND, MAX_MARKETS_PER_CHANNEL, MAX_SNAPSHOT_IDS,
};
use crate::registry::Added;
use crate::server::PeerAddr;
use crate::Context;

/// Who a request comes from: its principal (token or anonymous) and the
/// key its per-client limits are kept under (`sub:<subject>`, or
/// `ip:<address>` in anonymous mode).
#[derive(Debug, Clone)]
pub struct Caller {
    /// What the token allows (or anonymous).
    pub principal: Principal,
    /// Limiter key.
    pub client: String,
}

/// The client's address: the trusted proxy's header when one is
/// configured (and present), else the connection's peer.
pub fn client_ip(ctx: &Context, headers: &warp::http::HeaderMap, peer: Option<PeerAddr>) -> String {
    if let Some(h) = ctx.config.auth.client_ip_header.as_deref() {
        if let Some(v) = headers.get(h).and_then(|v| v.to_str().ok()) {
            // X-Forwarded-For style lists: the proxy appends, the last hop is its own view.
            if let Some(last) = v.rsplit(',').map(str::trim).find(|s| !s.is_empty()) {
                return last.chars().take(64).collect();
            }
        }
    }
    peer.map(|p| p.0.ip().to_string())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Extracts the [`Caller`] of a REST request (`Authorization: Bearer` in
/// token mode); 401 `unauthorized` otherwise, counted by reason.
pub(crate) fn caller(
    ctx: Arc<Context>,
) -> impl Filter<Extract = (Caller,), Error = Rejection> + Clone {
    warp::header::headers_cloned()
        .and(warp::ext::optional::<PeerAddr>())
        .and(with_ctx(ctx))
        .and_then(
            |headers: warp::http::HeaderMap, peer: Option<PeerAddr>, ctx: Arc<Context>| async move {
                let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
                match ctx.auth.from_header(auth) {
                    Ok(principal) => {
                        let ip = client_ip(&ctx, &headers, peer);
                        let client = client_key(&principal, &ip);
                        Ok(Caller { principal, client })
                    }
                    Err(r) => {
                        ctx.metrics.rejected.with_label_values(&[r.label()]).inc();
                        Err(warp::reject::custom(r.into_error()))
                    }
                }
            },
        )
}

/// `{"markets": [...]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarketsBody {
    /// Market ids.
    pub markets: Vec<String>,
}

#[derive(Serialize)]
struct ChannelCreated<'a> {
    channel: &'a str,
    markets: &'a [String],
    stream: String,
    sse: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

/// A JSON error reply, never stored by any cache (a CDN in front of the
/// snapshots must not serve one client's 401/403/429 to others).
pub fn error_response(status: StatusCode, code: &str, message: &str) -> warp::reply::Response {
    let body = ErrorBody {
        error: ErrorDetail { code, message },
    };
    let mut resp = warp::reply::with_status(warp::reply::json(&body), status).into_response();
    resp.headers_mut().insert(
        "cache-control",
        warp::http::HeaderValue::from_static("no-store"),
    );
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            "www-authenticate",
            warp::http::HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

/// The reply for an [`Error`] (with `Retry-After` when it says when).
pub fn error_from(e: &Error) -> warp::reply::Response {
    let (status, code) = e.status_and_code();
    let mut resp = error_response(status, code, &public_message(e));
    if let Error::Limited { retry_after, .. } = e {
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        if let Ok(v) = warp::http::HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert("retry-after", v);
        }
    }
    resp
}

/// What a client may read about an error: a 4xx's own message; for a
/// backend failure only "unavailable" (the cause, which names hosts and
/// backend state, goes to the log).
fn public_message(e: &Error) -> String {
    match e {
        Error::Invalid { message, .. } | Error::Limited { message, .. } => message.clone(),
        other => {
            tracing::warn!(error = %other, "request failed: backend unavailable");
            "unavailable".to_owned()
        }
    }
}

pub(crate) fn bad(code: &'static str, msg: impl Into<String>) -> Error {
    Error::invalid(StatusCode::BAD_REQUEST, code, msg)
}

/// Validates a list of market ids: syntax, duplicates folded, count bounded.
fn validate_markets(markets: Vec<String>) -> Result<Vec<String>, Error> {
    if markets.is_empty() {
        return Err(bad("invalid_market", "at least one market is required"));
    }
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(markets.len());
    for m in markets {
        check_market(&m)?;
        if seen.insert(m.clone()) {
            out.push(m);
        }
    }
    if out.len() > MAX_MARKETS_PER_CHANNEL {
        return Err(bad(
            "too_many_markets",
            format!(
                "{} markets; a channel watches at most {MAX_MARKETS_PER_CHANNEL}",
                out.len()
            ),
        ));
    }
    Ok(out)
}

pub(crate) fn check_channel(id: &str) -> Result<(), Error> {
    validate_channel_id(id).map_err(|e| bad("invalid_channel", e.to_string()))
}

fn unknown_channel() -> Error {
    Error::invalid(StatusCode::NOT_FOUND, "unknown_channel", "unknown channel")
}

/// The markets of a known channel the caller owns; 404 `unknown_channel` otherwise.
pub(crate) async fn channel_markets(
    ctx: &Context,
    caller: &Caller,
    id: &str,
) -> Result<Vec<String>, Error> {
    if !owns(ctx, &caller.principal, id).await? {
        return Err(unknown_channel());
    }
    ctx.registry.markets(id).await?.ok_or_else(unknown_channel)
}

/// 403 when the token does not allow one of `markets`.
pub(crate) fn check_allowed(
    ctx: &Context,
    caller: &Caller,
    markets: &[String],
) -> Result<(), Error> {
    match caller.principal.allowance.first_refused(markets) {
        None => Ok(()),
        Some(m) => {
            ctx.metrics
                .rejected
                .with_label_values(&["market_not_allowed"])
                .inc();
            Err(Error::invalid(
                StatusCode::FORBIDDEN,
                "market_not_allowed",
                format!("the token does not allow market {m:?}"),
            ))
        }
    }
}

/// Takes `n` of the caller's `kind` tokens; 429 with `Retry-After` otherwise.
pub fn limit(ctx: &Context, client: &str, kind: Kind, n: usize) -> Result<(), Error> {
    // Counted by `reply` under the error code, which is the kind's label.
    ctx.clients.take(client, kind, n).map_err(|wait| {
        Error::limited(
            kind.label(),
            format!(
                "too many requests of this kind from this client; retry in {:.1} s",
                wait.as_secs_f64()
            ),
            wait,
        )
    })
}

/// 429 while the reducers' command lag is past its bound: new commands
/// would only queue behind minutes of others.
pub(crate) fn shed(ctx: &Context) -> Result<(), Error> {
    let lag = ctx.command_lag.get();
    if lag > ctx.config.max_command_lag {
        ctx.metrics
            .rejected
            .with_label_values(&["shed_command_lag"])
            .inc();
        return Err(Error::limited(
            "overloaded",
            "the pipeline is catching up on commands; retry shortly",
            crate::lag::LAG_POLL_INTERVAL * 2,
        ));
    }
    Ok(())
}

fn check_market(id: &str) -> Result<(), Error> {
    validate_market_id(id).map_err(|e| bad("invalid_market", e.to_string()))
}

pub(crate) fn take_tokens(ctx: &Context, n: usize) -> Result<(), Error> {
    if ctx.limiter.try_take(n) {
        Ok(())
    } else {
        ctx.metrics
            .rejected
            .with_label_values(&["limit_pod_commands"])
            .inc();
        Err(Error::limited(
            "rate_limited",
            "too many commands right now; retry in a second",
            std::time::Duration::from_secs(1),
        ))
    }
}

/// The handler's reply, or its error as JSON (counted by code).
pub(crate) fn reply(
    ctx: &Context,
    r: Result<warp::reply::Response, Error>,
) -> Result<warp::reply::Response, Rejection> {
    Ok(r.unwrap_or_else(|e| {
        let (_, code) = e.status_and_code();
        ctx.metrics.rejected.with_label_values(&[code]).inc();
        error_from(&e)
    }))
}

// ---- handlers ----

/// How long a client's channel counts against its cap at most, should its
/// close have been lost (the janitor closes idle channels well before).
fn claim_memory(ctx: &Context) -> std::time::Duration {
    ctx.config.channel_idle_ttl + ctx.config.janitor_interval * 2
}

async fn create_channel(
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

async fn add_markets(
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
                shed(&ctx)?;
                // Tokens first: a refused request changes nothing.
                limit(&ctx, &caller.client, Kind::MarketChange, candidates.len())?;
                take_tokens(&ctx, candidates.len())?;
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

async fn remove_market(
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
            shed(&ctx)?;
            limit(&ctx, &caller.client, Kind::MarketChange, 1)?;
            take_tokens(&ctx, 1)?;
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

async fn begin(
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

async fn close_channel(
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
async fn ticket(
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

/// `{"sub": "...", "markets": [...]}` of the development token endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevTokenBody {
    /// Subject (default: a random one).
    #[serde(default)]
    pub sub: Option<String>,
    /// Allowed markets/patterns (default `["*"]`).
    #[serde(default)]
    pub markets: Option<Vec<String>>,
}

/// `POST /v1/dev/token` (only with `--dev-tokens`): mints a token, so the
/// live page and the demo work without a bookmaker backend. Never on by
/// default: anyone reaching it gets a token.
async fn dev_token(
    body: DevTokenBody,
    ctx: Arc<Context>,
) -> Result<warp::reply::Response, Rejection> {
    let crate::auth::Auth::Token(v) = &ctx.auth else {
        return Err(warp::reject::not_found());
    };
    let sub = body
        .sub
        .filter(|s| !s.is_empty() && s.len() <= crate::auth::MAX_SUBJECT_BYTES)
        .unwrap_or_else(|| format!("dev-{}", uuid::Uuid::new_v4().simple()));
    let markets = body.markets.unwrap_or_else(|| vec!["*".to_owned()]);
    match v.mint_dev(&sub, &markets) {
        Some((token, exp)) => Ok(warp::reply::json(
            &serde_json::json!({"token": token, "sub": sub, "expires_at": exp}),
        )
        .into_response()),
        None => Err(warp::reject::not_found()),
    }
}

async fn market(
    id: String,
    caller: Caller,
    ctx: Arc<Context>,
) -> Result<warp::reply::Response, Rejection> {
    reply(
        &ctx,
        async {
            check_market(&id)?;
            check_allowed(&ctx, &caller, std::slice::from_ref(&id))?;
            match ctx
                .registry
                .states(std::slice::from_ref(&id))
                .await?
                .pop()
                .flatten()
            {
                Some(bytes) => Ok(warp::http::Response::builder()
                    .header("content-type", "application/json")
                    .body(warp::hyper::body::Bytes::from(bytes.to_vec()).into())
                    .expect("valid response")),
                None => Err(Error::invalid(
                    StatusCode::NOT_FOUND,
                    "unknown_market",
                    "no state for this market",
                )),
            }
        }
        .await,
    )
}

#[derive(Deserialize)]
struct IdsQuery {
    ids: Option<String>,
}

async fn markets(
    q: IdsQuery,
    caller: Caller,
    ctx: Arc<Context>,
) -> Result<warp::reply::Response, Rejection> {
    reply(
        &ctx,
        async {
            let ids: Vec<String> = q
                .ids
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            if ids.is_empty() {
                return Err(bad("invalid_market", "ids=a,b,... is required"));
            }
            if ids.len() > MAX_SNAPSHOT_IDS {
                return Err(bad(
                    "too_many_markets",
                    format!("at most {MAX_SNAPSHOT_IDS} ids"),
                ));
            }
            for id in &ids {
                check_market(id)?;
            }
            check_allowed(&ctx, &caller, &ids)?;
            let states = ctx.registry.states(&ids).await?;
            let mut map = serde_json::Map::new();
            for (id, s) in ids.into_iter().zip(states) {
                let v = match s.and_then(|b| {
                    RawValue::from_string(String::from_utf8_lossy(&b).into_owned()).ok()
                }) {
                    Some(raw) => serde_json::to_value(&raw).unwrap_or(serde_json::Value::Null),
                    None => serde_json::Value::Null,
                };
                map.insert(id, v);
            }
            Ok(warp::reply::json(&serde_json::json!({ "markets": map })).into_response())
        }
        .await,
    )
}

// ---- filters ----

pub(crate) fn with_ctx(
    ctx: Arc<Context>,
) -> impl Filter<Extract = (Arc<Context>,), Error = Infallible> + Clone {
    warp::any().map(move || ctx.clone())
}

/// A JSON request body, read within [`crate::server::BODY_READ_TIMEOUT`]
/// (hyper bounds only the head: a client trickling a body byte by byte
/// would otherwise hold its connection and this task for as long as it likes).
pub(crate) fn json_body<T: serde::de::DeserializeOwned + Send>(
) -> impl Filter<Extract = (T,), Error = Rejection> + Clone {
    warp::body::content_length_limit(MAX_BODY_BYTES)
        .and(warp::header::optional::<String>("content-type"))
        .and(warp::body::stream())
        .and_then(read_json)
}

async fn read_json<T, S, B>(content_type: Option<String>, body: S) -> Result<T, Rejection>
where
    T: serde::de::DeserializeOwned,
    S: futures_util::Stream<Item = Result<B, warp::Error>> + Send,
    B: bytes::Buf,
{
    use futures_util::TryStreamExt;
    if content_type.is_some_and(|ct| {
        let ct = ct.to_ascii_lowercase();
        !(ct.starts_with("application/json") || ct.contains("+json"))
    }) {
        return Err(warp::reject::custom(Error::invalid(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send application/json",
        )));
    }
    let read = body.try_fold(Vec::new(), |mut acc, mut chunk| async move {
        while chunk.has_remaining() {
            let c = chunk.chunk();
            acc.extend_from_slice(c);
            let n = c.len();
            chunk.advance(n);
        }
        Ok(acc)
    });
    let bytes = match tokio::time::timeout(crate::server::BODY_READ_TIMEOUT, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            return Err(warp::reject::custom(Error::invalid(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("the body could not be read: {e}"),
            )))
        }
        Err(_) => {
            return Err(warp::reject::custom(Error::invalid(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the request body did not arrive in time",
            )))
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        warp::reject::custom(Error::invalid(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            e.to_string(),
        ))
    })
}

/// All control API routes under `/v1`.
pub fn routes(ctx: Arc<Context>) -> warp::filters::BoxedFilter<(warp::reply::Response,)> {
    let create = warp::path!("v1" / "channels")
        .and(warp::post())
        .and(caller(ctx.clone()))
        .and(json_body())
        .and(with_ctx(ctx.clone()))
        .and_then(create_channel);
    let add = warp::path!("v1" / "channels" / String / "markets")
        .and(warp::post())
        .and(caller(ctx.clone()))
        .and(json_body())
        .and(with_ctx(ctx.clone()))
        .and_then(add_markets);
    let remove = warp::path!("v1" / "channels" / String / "markets" / String)
        .and(warp::delete())
        .and(caller(ctx.clone()))
        .and(with_ctx(ctx.clone()))
        .and_then(remove_market);
    let begin = warp::path!("v1" / "channels" / String / "begin")
        .and(warp::post())
        .and(caller(ctx.clone()))
        .and(with_ctx(ctx.clone()))
        .and_then(begin);
    let tickets = warp::path!("v1" / "channels" / String / "tickets")
        .and(warp::post())
        .and(caller(ctx.clone()))
        .and(with_ctx(ctx.clone()))
        .and_then(ticket);
    let close = warp::path!("v1" / "channels" / String)
        .and(warp::delete())
        .and(caller(ctx.clone()))
        .and(with_ctx(ctx.clone()))
        .and_then(close_channel);
    let dev_token = warp::path!("v1" / "dev" / "token")
        .and(warp::post())
        .and(json_body())
        .and(with_ctx(ctx.clone()))
        .and_then(dev_token);
    let market = warp::path!("v1" / "markets" / String)
        .and(warp::get())
        .and(caller(ctx.clone()))
        .and(with_ctx(ctx.clone()))
        .and_then(market);
    let markets = warp::path!("v1" / "markets")
        .and(warp::get())
        .and(warp::query::<IdsQuery>())
        .and(caller(ctx.clone()))
        .and(with_ctx(ctx.clone()))
        .and_then(markets);
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

/// Turns warp's rejections into the API's JSON errors (and counts them).
pub async fn recover(
    ctx: Arc<Context>,
    err: Rejection,
) -> Result<warp::reply::Response, Infallible> {
    let (status, code, message) = if err.is_not_found() {
        (
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route".to_string(),
        )
    } else if err.find::<warp::reject::PayloadTooLarge>().is_some() {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("bodies are limited to {MAX_BODY_BYTES} bytes"),
        )
    } else if let Some(e) = err.find::<warp::filters::body::BodyDeserializeError>() {
        (StatusCode::BAD_REQUEST, "invalid_json", e.to_string())
    } else if err.find::<warp::reject::InvalidQuery>().is_some() {
        (
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "invalid query string".to_string(),
        )
    } else if err.find::<warp::reject::LengthRequired>().is_some() {
        (
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "a Content-Length header is required".to_string(),
        )
    } else if err.find::<warp::reject::UnsupportedMediaType>().is_some() {
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send application/json".to_string(),
        )
    } else if let Some(e) = err.find::<Error>() {
        // Before 405: another route's method mismatch must not hide ours
        // (a refused origin, a body timeout).
        let (s, c) = e.status_and_code();
        (s, c, public_message(e))
    } else if err.find::<warp::reject::MethodNotAllowed>().is_some() {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed".to_string(),
        )
    } else {
        tracing::warn!(rejection = ?err, "request failed: unhandled rejection");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error".to_string(),
        )
    };
    ctx.metrics.rejected.with_label_values(&[code]).inc();
    Ok(error_response(status, code, &message))
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
    fn markets_are_validated_and_deduplicated() {
        let ok = validate_markets(vec!["a".into(), "b".into(), "a".into()]).unwrap();
        assert_eq!(ok, vec!["a", "b"]);
        assert!(matches!(
            validate_markets(vec![]),
            Err(Error::Invalid {
                code: "invalid_market",
                ..
            })
        ));
        assert!(matches!(
            validate_markets(vec!["bad id".into()]),
            Err(Error::Invalid {
                code: "invalid_market",
                ..
            })
        ));
        let many: Vec<String> = (0..=MAX_MARKETS_PER_CHANNEL)
            .map(|i| format!("m{i}"))
            .collect();
        assert!(matches!(
            validate_markets(many),
            Err(Error::Invalid {
                code: "too_many_markets",
                ..
            })
        ));
    }

    #[test]
    fn public_messages_hide_backend_details() {
        let e = Error::Redis(redis::RedisError::from((
            redis::ErrorKind::Io,
            "timed out",
            "redis-0.internal:6379".to_owned(),
        )));
        assert_eq!(public_message(&e), "unavailable");
        let e = Error::Config("rediss://user:secret@host".into());
        assert_eq!(public_message(&e), "unavailable");
        let e = Error::invalid(StatusCode::BAD_REQUEST, "invalid_market", "bad id");
        assert_eq!(public_message(&e), "bad id");
    }

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
