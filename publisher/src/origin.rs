//! Which web pages may use this publisher: the Origin policy behind CORS on
//! the API and SSE and the WebSocket Origin check (close 4403).
//!
//! Closed by default: a request without `Origin` (not a cross-origin browser
//! request: curl, a backend, a same-origin GET) and a page served by this
//! publisher itself (its Origin names the request's `Host`) are allowed;
//! any other page only when listed in `--allowed-origins`, or with the
//! explicit development switch `--dev-any-origin`. Browsers always send
//! `Origin` on cross-origin requests and WebSocket handshakes, and a page
//! cannot forge it or the `Host` its request goes to.

use warp::http::{HeaderValue, StatusCode};
use warp::{Filter, Rejection, Reply};

use crate::error::Error;

/// How long a browser may cache a preflight answer.
pub const PREFLIGHT_MAX_AGE_SECONDS: u32 = 600;

/// Methods and request headers a cross-origin page may use.
const ALLOW_METHODS: &str = "GET, POST, DELETE";
const ALLOW_HEADERS: &str = "content-type";

/// The configured policy.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// Exact origins (`https://odds.example`) allowed besides our own.
    pub allowed: Vec<String>,
    /// Development only: every origin is allowed.
    pub any: bool,
}

/// What the policy says about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No Origin, or the publisher's own origin: nothing to add.
    Same,
    /// A cross-origin page that may: answer with CORS headers naming it.
    Cross(String),
    /// A cross-origin page that may not.
    Forbidden,
}

impl OriginPolicy {
    /// Decides for a request with these `Origin` and `Host` headers.
    pub fn decide(&self, origin: Option<&str>, host: Option<&str>) -> Decision {
        let Some(origin) = origin else {
            return Decision::Same;
        };
        let authority = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        if authority.is_some() && authority == host {
            return Decision::Same;
        }
        if self.any || self.allowed.iter().any(|a| a == origin) {
            Decision::Cross(origin.to_owned())
        } else {
            Decision::Forbidden
        }
    }

    /// Whether a request with these headers may proceed at all.
    pub fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        self.decide(origin, host) != Decision::Forbidden
    }
}

fn decision(policy: OriginPolicy) -> impl Filter<Extract = (Decision,), Error = Rejection> + Clone {
    warp::header::optional::<String>("origin")
        .and(warp::header::optional::<String>("host"))
        .map(move |o: Option<String>, h: Option<String>| policy.decide(o.as_deref(), h.as_deref()))
}

fn forbidden() -> Rejection {
    warp::reject::custom(Error::invalid(
        StatusCode::FORBIDDEN,
        "origin_not_allowed",
        "origin not allowed",
    ))
}

/// Answers CORS preflights (`OPTIONS` with `Access-Control-Request-Method`).
pub fn preflight(
    policy: OriginPolicy,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Rejection> + Clone {
    // Not `warp::options()`: its 405 for every other method would outrank
    // the real routes' rejections (404s).
    warp::method()
        .and_then(|m: warp::http::Method| async move {
            if m == warp::http::Method::OPTIONS {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one()
        .and(warp::header::<String>("access-control-request-method"))
        .and(decision(policy))
        .and_then(|_method: String, d: Decision| async move {
            match d {
                Decision::Cross(origin) => {
                    let mut r = StatusCode::NO_CONTENT.into_response();
                    let h = r.headers_mut();
                    if let Ok(v) = HeaderValue::from_str(&origin) {
                        h.insert("access-control-allow-origin", v);
                    }
                    h.insert(
                        "access-control-allow-methods",
                        HeaderValue::from_static(ALLOW_METHODS),
                    );
                    h.insert(
                        "access-control-allow-headers",
                        HeaderValue::from_static(ALLOW_HEADERS),
                    );
                    h.insert(
                        "access-control-max-age",
                        HeaderValue::from(PREFLIGHT_MAX_AGE_SECONDS),
                    );
                    h.insert("vary", HeaderValue::from_static("origin"));
                    Ok(r)
                }
                // Same origin needs no preflight; anything else is refused.
                Decision::Same | Decision::Forbidden => Err(forbidden()),
            }
        })
}

/// Refuses a forbidden Origin before routing; otherwise extracts the
/// `Access-Control-Allow-Origin` value to add to the reply (see [`with_cors`]).
pub fn guard(
    policy: OriginPolicy,
) -> impl Filter<Extract = (Option<String>,), Error = Rejection> + Clone {
    decision(policy).and_then(|d: Decision| async move {
        match d {
            Decision::Same => Ok(None),
            Decision::Cross(o) => Ok(Some(o)),
            Decision::Forbidden => Err(forbidden()),
        }
    })
}

/// Adds the CORS headers for an allowed cross-origin request.
pub fn with_cors(allow: Option<String>, reply: warp::reply::Response) -> warp::reply::Response {
    let mut reply = reply;
    if let Some(v) = allow.and_then(|o| HeaderValue::from_str(&o).ok()) {
        let h = reply.headers_mut();
        h.insert("access-control-allow-origin", v);
        // A reply that already varies on Origin (cacheable snapshots) keeps
        // its own list, which may name more headers.
        let varies = h
            .get("vary")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("origin"));
        if !varies {
            h.insert("vary", HeaderValue::from_static("origin"));
        }
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_by_default_except_our_own_origin_and_non_browsers() {
        let p = OriginPolicy::default();
        assert_eq!(p.decide(None, Some("odds:8080")), Decision::Same);
        assert_eq!(
            p.decide(Some("http://odds:8080"), Some("odds:8080")),
            Decision::Same
        );
        assert_eq!(
            p.decide(Some("https://odds.example"), Some("odds.example")),
            Decision::Same
        );
        assert_eq!(
            p.decide(Some("http://evil.example"), Some("odds:8080")),
            Decision::Forbidden
        );
        // A port is part of the origin.
        assert_eq!(
            p.decide(Some("http://odds:9999"), Some("odds:8080")),
            Decision::Forbidden
        );
        assert_eq!(p.decide(Some("null"), Some("odds")), Decision::Forbidden);
        assert_eq!(p.decide(Some("odds"), Some("odds")), Decision::Forbidden);
    }

    #[test]
    fn allow_list_and_dev_mode() {
        let p = OriginPolicy {
            allowed: vec!["https://book.example".into()],
            any: false,
        };
        assert_eq!(
            p.decide(Some("https://book.example"), Some("edge")),
            Decision::Cross("https://book.example".into())
        );
        assert_eq!(
            p.decide(Some("https://book.example.evil"), Some("edge")),
            Decision::Forbidden
        );
        let dev = OriginPolicy {
            allowed: vec![],
            any: true,
        };
        assert_eq!(
            dev.decide(Some("http://localhost:3000"), Some("edge")),
            Decision::Cross("http://localhost:3000".into())
        );
    }

    #[test]
    fn cors_keeps_a_reply_s_own_vary_list() {
        let plain = with_cors(
            Some("https://a.example".into()),
            StatusCode::OK.into_response(),
        );
        assert_eq!(plain.headers()["vary"], "origin");
        let mut r = StatusCode::OK.into_response();
        r.headers_mut()
            .insert("vary", HeaderValue::from_static("origin, authorization"));
        let r = with_cors(Some("https://a.example".into()), r);
        assert_eq!(r.headers()["vary"], "origin, authorization");
        assert_eq!(
            r.headers()["access-control-allow-origin"],
            "https://a.example"
        );
    }
}
