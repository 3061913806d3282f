//! Expires abandoned channels.
//!
//! A browser that goes away without closing its channel would leave its
//! subscriptions in the reducers forever. Every pod periodically marks the
//! channels it has streams for as in use (a sorted set scored by time);
//! one pod at a time (a Redis lock) closes channels idle for longer than
//! the channel TTL exactly as `DELETE /v1/channels/<id>` does: unsubscribe
//! every market, delete the registry, close any stream. A client coming back
//! later gets 4404 and creates a new channel (the JS client does so).
//!
//! The lock holder also walks a page of channels per round comparing the
//! registry with the reducers' map and repairs lasting disagreements
//! ([`reconcile`]).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::{reconcile, Context};

/// Channels closed per sweep at most: bounds one sweep's Kafka burst.
pub const SWEEP_LIMIT: usize = 500;

/// Channels marked per `ZADD`: calls of 1000 members held Redis for 7-15 ms
/// each on the shared benchmark machine; a hundred keeps each call around a
/// millisecond, so updates are not stuck behind the marks.
pub const TOUCH_CHUNK: usize = 100;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One round: mark this pod's live channels, then, if we get the lock,
/// sweep idle channels and reconcile a page of channels ([`reconcile`]).
/// Returns how many channels were expired.
pub async fn round(
    ctx: &Context,
    token: &str,
    reconciler: &mut reconcile::Reconciler,
) -> crate::Result<usize> {
    let live = ctx.hub.live_channels();
    for chunk in live.chunks(TOUCH_CHUNK) {
        ctx.registry.touch(chunk).await?;
    }
    if !ctx
        .registry
        .try_lock(token, ctx.config.janitor_interval)
        .await?
    {
        return Ok(0);
    }
    let ttl = ctx.config.channel_idle_ttl.as_secs();
    let idle = ctx
        .registry
        .idle_since(now_secs().saturating_sub(ttl), SWEEP_LIMIT)
        .await?;
    // Streams opened on this pod since the marks above keep their channel.
    let live: HashSet<String> = ctx.hub.live_channels().into_iter().collect();
    let mut expired = 0;
    for channel in idle.into_iter().filter(|c| !live.contains(c)) {
        let markets = ctx.registry.all_markets(&channel).await?;
        crate::channels::close(ctx, &channel, &markets).await?;
        ctx.metrics.channels_expired.inc();
        expired += 1;
    }
    if expired > 0 {
        info!(expired, "expired idle channels");
    }
    reconcile::round(ctx, reconciler).await?;
    Ok(expired)
}

/// Runs rounds every `janitor_interval` until shutdown.
pub fn spawn(ctx: Arc<Context>) {
    let token = uuid::Uuid::new_v4().to_string();
    tokio::spawn(async move {
        let mut reconciler = reconcile::Reconciler::default();
        let mut shutdown = ctx.shutdown.clone();
        let mut tick =
            tokio::time::interval(ctx.config.janitor_interval.max(Duration::from_millis(100)));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = round(&ctx, &token, &mut reconciler).await {
                        warn!(error = %e, "channel janitor round failed");
                    }
                }
                _ = shutdown.changed() => {
                    if let Err(e) = ctx.registry.unlock(&token).await {
                        warn!(error = %e, "releasing the janitor lock failed; it expires by itself");
                    }
                    return;
                }
            }
        }
    });
}
