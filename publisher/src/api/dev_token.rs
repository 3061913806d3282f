//! `POST /v1/dev/token`: development tokens for the live page and the demo.

use std::sync::Arc;

use serde::Deserialize;
use warp::{Rejection, Reply};

use crate::Context;

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
pub(super) async fn dev_token(
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
