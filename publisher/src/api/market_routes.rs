//! Market reads: one market's stored state, and several by id (the
//! uncached form; `/v1/snapshot` is the cacheable one).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;
use warp::http::StatusCode;
use warp::{Rejection, Reply};

use super::guards::{bad, check_allowed, check_market};
use super::{reply, Caller};
use crate::error::Error;
use crate::limits::MAX_SNAPSHOT_IDS;
use crate::Context;

pub(super) async fn market(
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
pub(super) struct IdsQuery {
    pub(super) ids: Option<String>,
}

pub(super) async fn markets(
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
