//! Channel operations shared by the HTTP API, both stream transports, the
//! janitor and the reconciler — no HTTP here: who owns a channel, closing
//! it, and which client a principal counts as.

use streampipe_contract::{CommandKind, QueryCommandKind};

use crate::auth::Principal;
use crate::error::Error;
use crate::Context;

/// The limiter key of a principal coming from `ip`.
pub fn client_key(principal: &Principal, ip: &str) -> String {
    match &principal.subject {
        Some(s) => format!("sub:{s}"),
        None => format!("ip:{ip}"),
    }
}

/// Whether `principal` may use `channel`: its owner is the token's subject
/// (anonymous channels have none, and only anonymous callers see them).
/// Another subject's channel is "unknown": no existence oracle.
pub async fn owns(ctx: &Context, principal: &Principal, channel: &str) -> Result<bool, Error> {
    let owner = ctx.registry.owner(channel).await?;
    let ok = owner == principal.subject;
    if !ok {
        ctx.metrics
            .rejected
            .with_label_values(&["channel_not_owned"])
            .inc();
    }
    Ok(ok)
}

/// Closes a channel: unsubscribes `markets` first (if that fails the channel
/// still exists and the close can be retried), then deletes the registry and
/// tells every pod's streams. Shared by `DELETE /v1/channels/<id>` and the janitor.
pub async fn close(ctx: &Context, id: &str, markets: &[String]) -> Result<(), Error> {
    // Queries first, like markets: every partition's owner drops them and
    // the markets they brought (the query markets set goes with the registry).
    for q in ctx.registry.queries(id).await? {
        ctx.commands
            .send_query(QueryCommandKind::RemoveQuery, id, &q, &ctx.metrics)
            .await?;
        ctx.registry.remove_query(id, &q).await?;
    }
    if !markets.is_empty() {
        ctx.commands
            .send(CommandKind::Unsubscribe, id, markets, &ctx.metrics)
            .await?;
    }
    ctx.registry.delete(id).await
}
