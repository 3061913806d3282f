//! Who a request comes from and what it sends: the [`Caller`] (principal
//! and limiter key) and the bounded, timed JSON body reader.

use std::convert::Infallible;
use std::sync::Arc;

use serde::Deserialize;
use warp::http::StatusCode;
use warp::{Filter, Rejection};

use crate::auth::Principal;
use crate::channels::client_key;
use crate::error::Error;
use crate::limits::MAX_BODY_BYTES;
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
