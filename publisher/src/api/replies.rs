//! Error replies: the JSON error body, `Retry-After`, what a client may read
//! of a backend failure, and warp's rejections turned into the same shape.

use std::convert::Infallible;
use std::sync::Arc;

use serde::Serialize;
use warp::http::StatusCode;
use warp::{Rejection, Reply};

use crate::error::Error;
use crate::limits::MAX_BODY_BYTES;
use crate::Context;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
