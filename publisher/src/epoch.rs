//! Noticing a Redis that lost its data, and writing this pod's part back.
//!
//! The registry sets and janitor entries of channels live only in Redis. A
//! Redis restarted empty (or flushed, or failed over to a replica that had
//! not caught up) would make every channel "vanish": the next `begin` would
//! close its streams with 4404 although the pod still holds them. So every
//! pod remembers the pipeline's data epoch (see
//! [`streampipe_contract::epoch`]) and compares it with Redis every
//! [`EPOCH_CHECK_INTERVAL`], after every pub/sub reconnect, and whenever a
//! channel it streams seems to have vanished. When the key is gone or holds
//! another id, the pod, for every channel it has streams of:
//! 1. writes the registry set (the markets as the pod holds them), the
//!    janitor entry and the channel's owner (the token subject its streams
//!    were opened with) back, so every pod's control API and `begin` know
//!    the channel — and its owner — again;
//! 2. sends a `subscribe` command per market through Kafka, so a partition
//!    whose reducer died with the data learns its subscriptions again (the
//!    reducers that survived write theirs back themselves; a duplicate
//!    subscribe is a no-op);
//! 3. sends its clients `reset`: states stored before the loss are gone and
//!    updates may have been missed; the client begins again.
//!
//! Channels no pod streams are not repaired by publishers (only the
//! reducers' write-back keeps their subscriptions); see docs/operations.md.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use streampipe_contract::epoch::{Found, EPOCH_CHECK_INTERVAL};
use streampipe_contract::CommandKind;
use tracing::{error, info, warn};

use crate::commands::Commands;
use crate::error::Result;
use crate::hub::Hub;

/// Channels written back per Redis round trip: keeps each pipeline (and on
/// a cluster, each burst of concurrent commands) small.
pub const RESTORE_CHUNK: usize = 500;

/// Owners remembered beyond the channels streamed here before the memory
/// is pruned to those: bounds it under churn without pruning on every join.
pub const OWNER_SLACK: usize = 1024;

/// Longest wait for a read of the epoch and its markers: a Redis (or a
/// cluster master) that does not answer within it is left to the next check.
pub const EPOCH_READ_TIMEOUT: Duration = Duration::from_secs(3);

/// The epoch a pod remembers; checks are serialized (one repair at a time).
#[derive(Default)]
pub struct Watch {
    known: tokio::sync::Mutex<Option<String>>,
    /// Where re-subscribes go; `None` only in tests without Kafka.
    commands: Option<Commands>,
    /// The owner (token subject) of each channel streamed here, as checked
    /// when its streams opened: Redis' copy goes with a data loss, and a
    /// channel written back without it would answer its own owner 404.
    owners: Mutex<HashMap<String, String>>,
}

impl Watch {
    /// A watch that re-subscribes through `commands`.
    pub fn new(commands: Option<Commands>) -> Self {
        Watch {
            known: tokio::sync::Mutex::new(None),
            commands,
            owners: Mutex::new(HashMap::new()),
        }
    }

    /// Remembers that `channel`, streamed here, belongs to `subject`;
    /// `live` gives the channels streamed here when the memory needs pruning.
    pub fn remember_owner(&self, channel: &str, subject: &str, live: impl FnOnce() -> Vec<String>) {
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        if owners.len() >= OWNER_SLACK && !owners.contains_key(channel) {
            let live: std::collections::HashSet<String> = live().into_iter().collect();
            owners.retain(|c, _| live.contains(c));
        }
        owners.insert(channel.to_owned(), subject.to_owned());
    }

    /// The remembered owners of `channels` (anonymous ones have none).
    fn owners_of(&self, channels: &[(String, Vec<String>)]) -> Vec<(String, String)> {
        let owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        channels
            .iter()
            .filter_map(|(c, _)| owners.get(c).map(|s| (c.clone(), s.clone())))
            .collect()
    }
}

/// Compares the epoch key with the remembered one and repairs after a
/// loss; returns whether it found (and handled) one.
pub async fn check(hub: &Hub) -> Result<bool> {
    let watch = hub.epoch_watch();
    let mut known = watch.known.lock().await;
    let registry = hub.registry();
    // Bounded: during a cluster failover a read of a marker on the dead
    // master can hang, and a check holds the watch (after a reconnect the
    // clients' `reset` waits for it).
    let read = tokio::time::timeout(EPOCH_READ_TIMEOUT, registry.epoch())
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "reading the data epoch timed out",
            )
        })??;
    match (known.as_deref(), &read) {
        (Some(k), Found::Is(r)) if k == r => return Ok(false),
        (None, Found::Is(r)) => {
            *known = Some(r.to_owned());
            return Ok(false);
        }
        // Nothing here to write back; a damaged epoch is replaced so that
        // every peer that trusts it notices the loss.
        (None, Found::Missing) | (None, Found::Damaged(_)) => {
            *known = Some(registry.claim_epoch(read.id()).await?);
            return Ok(false);
        }
        _ => {}
    }
    let metrics = hub.metrics();
    metrics.redis_data_loss.inc();
    let channels = hub.channels_with_markets();
    error!(remembered = ?*known, found = ?read, channels = channels.len(),
        "redis lost its data (the pipeline's data epoch is gone or replaced): writing this pod's channels back");
    let replacing = match &read {
        Found::Damaged(id) => Some(id.as_str()),
        _ => known.as_deref(),
    };
    let epoch = registry.claim_epoch(replacing).await?;
    for chunk in channels.chunks(RESTORE_CHUNK) {
        registry.restore(chunk).await?;
        metrics.loss_channels_repaired.inc_by(chunk.len() as u64);
    }
    for chunk in watch.owners_of(&channels).chunks(RESTORE_CHUNK) {
        registry.restore_owners(chunk).await?;
    }
    if let Some(commands) = &watch.commands {
        for (channel, markets) in &channels {
            if markets.is_empty() {
                continue;
            }
            commands
                .send(CommandKind::Subscribe, channel, markets, metrics)
                .await?;
            metrics.loss_resubscribed.inc_by(markets.len() as u64);
        }
    }
    // Only now: a failure above leaves the old id, so the next check redoes
    // the whole repair (every step is idempotent).
    *known = Some(epoch);
    hub.reset_all(RESET_AFTER_LOSS);
    info!(
        channels = channels.len(),
        "channels written back after the redis data loss; clients were sent reset"
    );
    Ok(true)
}

/// The `reset` clients get after a loss.
pub const RESET_AFTER_LOSS: &[u8] =
    br#"{"type":"reset","reason":"redis lost its data; stored states are gone until the next update"}"#;

/// Checks every [`EPOCH_CHECK_INTERVAL`] until `shutdown`.
pub fn spawn(hub: Hub, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EPOCH_CHECK_INTERVAL.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = check(&hub).await {
                        warn!(error = %e, "checking the redis data epoch failed; retrying");
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    });
}
