//! The checks every control request passes before it changes anything:
//! id syntax, ownership, the token's allowance, per-client and per-pod
//! limits, and shedding while the reducers lag on commands.

use std::collections::HashSet;

use streampipe_contract::{validate_channel_id, validate_market_id};
use warp::http::StatusCode;

use super::Caller;
use crate::channels::owns;
use crate::clients::Kind;
use crate::error::Error;
use crate::limits::MAX_MARKETS_PER_CHANNEL;
use crate::Context;

pub(crate) fn bad(code: &'static str, msg: impl Into<String>) -> Error {
    Error::invalid(StatusCode::BAD_REQUEST, code, msg)
}

/// Validates a list of market ids: syntax, duplicates folded, count bounded.
pub(super) fn validate_markets(markets: Vec<String>) -> Result<Vec<String>, Error> {
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

pub(super) fn unknown_channel() -> Error {
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

/// Admits `n` market changes (subscribes, unsubscribes, queries) of a
/// caller: refused while the reducers are behind on commands, then the
/// client's market-change bucket, then the pod's command budget. Checked
/// before anything is changed, so a refused request changes nothing.
pub(crate) fn admit_changes(ctx: &Context, client: &str, n: usize) -> Result<(), Error> {
    shed(ctx)?;
    limit(ctx, client, Kind::MarketChange, n)?;
    take_tokens(ctx, n)
}

pub(super) fn check_market(id: &str) -> Result<(), Error> {
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
}
