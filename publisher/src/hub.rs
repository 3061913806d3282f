//! The pod's one multiplexed Redis pub/sub connection.
//!
//! Every stream connection of the pod *joins* its channel here; the hub keeps
//! one Redis subscription per channel with at least one member and fans each
//! message out to the members' [`Outbox`]es (parsed once, shared by all).
//! Pushing into an outbox never waits, so one slow browser cannot delay any
//! other, nor the Redis connection.
//!
//! Subscription changes go through one task in order, which reconciles Redis
//! with the membership map (a channel is subscribed exactly while it has
//! members), so a leave racing a join can never unsubscribe a live channel.
//! When the Redis connection is lost, the task reconnects with backoff,
//! resubscribes every live channel and sends each member a `reset`, telling
//! the client to `begin` again: updates published meanwhile were missed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::PubSubSink;
use serde::Deserialize;
use streampipe_contract::Keys;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Pushed, Update};
use crate::registry::CLOSED_MESSAGE;

/// Pending subscription changes, at most: joins wait for room, so a burst of
/// connections cannot grow this queue.
pub const HUB_COMMAND_QUEUE: usize = 4096;

/// How long a join waits for its Redis subscription before the connection
/// is refused with 1011: Redis answers in milliseconds when it is up.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Channels per SUBSCRIBE command when resubscribing after a reconnect:
/// keeps each command's size and Redis' time per command small.
const SUBSCRIBE_CHUNK: usize = 1000;

/// Reconnect backoff bounds.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Chan {
    members: HashMap<u64, Arc<Outbox>>,
    /// Becomes true once Redis confirmed the subscription.
    ready: watch::Sender<bool>,
}

struct Inner {
    keys: Keys,
    metrics: Arc<Metrics>,
    channels: Mutex<HashMap<Arc<str>, Chan>>,
    commands: mpsc::Sender<Arc<str>>,
    next_id: AtomicU64,
    connected: watch::Sender<bool>,
}

/// Handle to the hub; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// A connection's membership of a channel; leaving happens on drop.
pub struct Membership {
    hub: Hub,
    channel: Arc<str>,
    id: u64,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub.leave(&self.channel, self.id);
    }
}

#[derive(Deserialize)]
struct UpdateHead<'a> {
    #[serde(borrow)]
    market: &'a str,
    version: u64,
    #[serde(default)]
    ts: Option<i64>,
}

impl Hub {
    /// Starts the hub and its Redis task.
    pub fn start(redis_url: &str, keys: Keys, metrics: Arc<Metrics>) -> Result<Self> {
        let client = redis::Client::open(redis_url)?;
        let (tx, rx) = mpsc::channel(HUB_COMMAND_QUEUE);
        let (connected, _) = watch::channel(false);
        let hub = Hub {
            inner: Arc::new(Inner {
                keys,
                metrics,
                channels: Mutex::new(HashMap::new()),
                commands: tx,
                next_id: AtomicU64::new(1),
                connected,
            }),
        };
        tokio::spawn(run(hub.clone(), client, rx));
        Ok(hub)
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Chan>> {
        self.inner
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the Redis pub/sub connection is up.
    pub fn is_connected(&self) -> bool {
        *self.inner.connected.borrow()
    }

    /// Joins `channel`: returns once the pod's Redis subscription for it is
    /// active, so nothing published afterwards is missed.
    pub async fn join(&self, channel: &str, outbox: Arc<Outbox>) -> Result<Membership> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (name, mut ready, new) = {
            let mut chans = self.channels();
            let new = !chans.contains_key(channel);
            let (name, chan) = match chans.get_key_value(channel) {
                Some((k, _)) => {
                    let k = k.clone();
                    let c = chans.get_mut(&k).expect("just found");
                    (k, c)
                }
                None => {
                    let k: Arc<str> = channel.into();
                    let (ready, _) = watch::channel(false);
                    chans.insert(
                        k.clone(),
                        Chan {
                            members: HashMap::new(),
                            ready,
                        },
                    );
                    let c = chans.get_mut(&k).expect("just inserted");
                    (k, c)
                }
            };
            chan.members.insert(id, outbox);
            (name, chan.ready.subscribe(), new)
        };
        let membership = Membership {
            hub: self.clone(),
            channel: name.clone(),
            id,
        };
        if new {
            self.inner
                .commands
                .send(name)
                .await
                .map_err(|_| redis::RedisError::from(std::io::Error::other("hub stopped")))?;
        }
        let confirmed = matches!(
            tokio::time::timeout(JOIN_TIMEOUT, ready.wait_for(|r| *r))
                .await
                .map(|r| r.is_ok()),
            Ok(true)
        );
        match confirmed {
            true => Ok(membership),
            false => Err(Error::Redis(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "redis subscription not confirmed in time",
            )))),
        }
    }

    fn leave(&self, channel: &Arc<str>, id: u64) {
        let emptied = {
            let mut chans = self.channels();
            match chans.get_mut(channel) {
                Some(c) => {
                    c.members.remove(&id);
                    if c.members.is_empty() {
                        chans.remove(channel);
                        true
                    } else {
                        false
                    }
                }
                None => false,
            }
        };
        if emptied {
            // The task reconciles against the map, so order does not matter;
            // when the queue is full, hand the send to a task.
            if let Err(mpsc::error::TrySendError::Full(name)) =
                self.inner.commands.try_send(channel.clone())
            {
                let tx = self.inner.commands.clone();
                tokio::spawn(async move {
                    let _ = tx.send(name).await;
                });
            }
        }
    }

    /// Closes every connection of every channel (shutdown), with `code`.
    pub fn close_all(&self, code: u16, reason: &'static str) {
        for chan in self.channels().values() {
            for o in chan.members.values() {
                o.close(code, reason);
            }
        }
    }

    /// The most bytes queued in any member's outbox (diagnostics and tests).
    pub fn max_outbox_bytes(&self) -> usize {
        self.channels()
            .values()
            .flat_map(|c| c.members.values())
            .map(|o| o.queued_bytes())
            .max()
            .unwrap_or(0)
    }

    /// Channel ids with at least one stream on this pod.
    pub fn live_channels(&self) -> Vec<String> {
        self.channels().keys().map(|c| c.to_string()).collect()
    }

    /// Number of members of all channels (connections) known to the hub.
    pub fn member_count(&self) -> usize {
        self.channels().values().map(|c| c.members.len()).sum()
    }

    fn dispatch(&self, channel_name: &str, payload: &[u8]) {
        let m = &self.inner.metrics;
        m.redis_messages.inc();
        let Some(channel) = self.inner.keys.channel_from_pubsub(channel_name) else {
            return;
        };
        if payload == CLOSED_MESSAGE.as_bytes() {
            if let Some(c) = self.channels().get(channel) {
                for o in c.members.values() {
                    o.close(4410, "channel closed");
                }
            }
            return;
        }
        let head: UpdateHead<'_> = match serde_json::from_slice(payload) {
            Ok(h) => h,
            Err(e) => {
                m.rejected.with_label_values(&["bad_pubsub_message"]).inc();
                debug!(error = %e, "unreadable pub/sub message dropped");
                return;
            }
        };
        if let Some(ts) = head.ts {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            m.update_latency.observe((now - ts).max(0) as f64 / 1000.0);
        }
        let update = Update {
            market: head.market.into(),
            version: head.version,
            bytes: Bytes::copy_from_slice(payload),
        };
        let chans = self.channels();
        if let Some(c) = chans.get(channel) {
            for o in c.members.values() {
                match o.push_update(&update) {
                    Pushed::Queued | Pushed::Closed => {}
                    Pushed::Conflated => m.conflated.inc(),
                    Pushed::Duplicate => m.duplicates.inc(),
                    Pushed::TooSlow => m.slow_closed.inc(),
                }
            }
        }
    }
}

/// The Redis task: (re)connects, reconciles subscriptions, dispatches.
async fn run(hub: Hub, client: redis::Client, mut commands: mpsc::Receiver<Arc<str>>) {
    let mut backoff = RECONNECT_MIN;
    let mut epoch = 0u64;
    loop {
        let pubsub = match client.get_async_pubsub().await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "redis pub/sub connect failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        let mut subscribed: HashSet<Arc<str>> = HashSet::new();
        // Resubscribe every live channel.
        let live: Vec<Arc<str>> = hub.channels().keys().cloned().collect();
        if let Err(e) = subscribe_all(&hub, &mut sink, &live, &mut subscribed).await {
            warn!(error = %e, "resubscribing failed; reconnecting");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RECONNECT_MAX);
            continue;
        }
        backoff = RECONNECT_MIN;
        hub.inner.connected.send_replace(true);
        if epoch > 0 {
            hub.inner.metrics.redis_reconnects.inc();
            info!(
                channels = live.len(),
                "redis pub/sub reconnected; sending reset to clients"
            );
            let reset = Bytes::from_static(br#"{"type":"reset","reason":"redis subscription re-established; updates may have been missed"}"#);
            for chan in hub.channels().values() {
                for o in chan.members.values() {
                    o.forget_sent();
                    o.push_message("reset", reset.clone());
                }
            }
        }
        for chan in hub.channels().values() {
            chan.ready.send_replace(true);
        }
        epoch += 1;

        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => hub.dispatch(msg.get_channel_name(), msg.get_payload_bytes()),
                    None => {
                        warn!("redis pub/sub connection lost; reconnecting");
                        break;
                    }
                },
                cmd = commands.recv() => {
                    let Some(first) = cmd else { return };
                    let mut names = vec![first];
                    while let Ok(n) = commands.try_recv() {
                        names.push(n);
                    }
                    if let Err(e) = reconcile(&hub, &mut sink, names, &mut subscribed).await {
                        warn!(error = %e, "redis subscribe failed; reconnecting");
                        break;
                    }
                }
            }
        }
        hub.inner.connected.send_replace(false);
        for chan in hub.channels().values() {
            chan.ready.send_replace(false);
        }
        hub.inner.metrics.redis_channels.set(0);
    }
}

async fn subscribe_all(
    hub: &Hub,
    sink: &mut PubSubSink,
    channels: &[Arc<str>],
    subscribed: &mut HashSet<Arc<str>>,
) -> redis::RedisResult<()> {
    for chunk in channels.chunks(SUBSCRIBE_CHUNK) {
        let names: Vec<String> = chunk
            .iter()
            .map(|c| hub.inner.keys.pubsub_channel(c))
            .collect();
        sink.subscribe(&names).await?;
        subscribed.extend(chunk.iter().cloned());
    }
    hub.inner
        .metrics
        .redis_channels
        .set(subscribed.len() as i64);
    Ok(())
}

/// Brings Redis in line with the membership map for `names`.
async fn reconcile(
    hub: &Hub,
    sink: &mut PubSubSink,
    names: Vec<Arc<str>>,
    subscribed: &mut HashSet<Arc<str>>,
) -> redis::RedisResult<()> {
    let (mut add, mut remove) = (Vec::new(), Vec::new());
    {
        let chans = hub.channels();
        let mut seen = HashSet::new();
        for n in names {
            if !seen.insert(n.clone()) {
                continue;
            }
            let wanted = chans.contains_key(&n);
            let have = subscribed.contains(&n);
            if wanted && !have {
                add.push(n);
            } else if !wanted && have {
                remove.push(n);
            } else if wanted {
                // Already subscribed (a rejoin): just confirm.
                if let Some(c) = chans.get(&n) {
                    c.ready.send_replace(true);
                }
            }
        }
    }
    if !add.is_empty() {
        subscribe_all(hub, sink, &add, subscribed).await?;
        let chans = hub.channels();
        for n in &add {
            if let Some(c) = chans.get(n) {
                c.ready.send_replace(true);
            }
        }
    }
    if !remove.is_empty() {
        let names: Vec<String> = remove
            .iter()
            .map(|c| hub.inner.keys.pubsub_channel(c))
            .collect();
        sink.unsubscribe(&names).await?;
        for n in &remove {
            subscribed.remove(n);
        }
        hub.inner
            .metrics
            .redis_channels
            .set(subscribed.len() as i64);
    }
    Ok(())
}
