//! The pod's multiplexed Redis subscription and its fan-out.
//!
//! Reducers publish each update of a watched market **once**, to the
//! market's topic. The hub subscribes a market's topic while a local channel
//! holds the market (see [`Table`]) and routes each update to the local
//! connections watching it, so Redis does one delivery per pod, not one per
//! watcher. A channel's own topic carries what concerns that channel alone
//! (`closed`, `markets` changed, REST `begin` replays).
//!
//! Every hop is bounded: the socket is read by our own RESP reader
//! ([`crate::pubsub::SubConn`]) only as fast as the pod consumes; market updates wait in a
//! conflating [`Ingest`] queue (one entry per market, latest version wins,
//! counted); each connection has its conflating [`Outbox`]. If the pod cannot
//! even read fast enough, Redis' pub/sub output-buffer limit closes the
//! connection, and the hub reconnects, resubscribes and sends every client a
//! `reset` — staleness is never silent.
//!
//! Gap-free joins: a stream is acknowledged, and a `begin` reads market
//! state, only after Redis confirmed the subscriptions it needs (a `PING`
//! barrier after the `SUBSCRIBE`s). An update stored after that read is
//! published to a topic we already receive; one stored while the market was
//! still unwatched is republished by the reducer when the market becomes
//! watched (its "announce"). Subscription changes go through one task that
//! reconciles Redis with the table, so a leave racing a join never drops a
//! topic that is still wanted.
//!
//! History markets (see [`crate::history`]): a `begin` holds their live
//! updates aside on the connection ([`Outbox::hold`]), reads the history
//! after the connection's position, queues the missed events (or, when the
//! history does not cover the gap, the latest state) after a `recovered`
//! message, then releases the held live updates — subscribe first, read,
//! then dedupe by version. Their versions are never conflated: where the
//! ingest queue would, every watcher here is closed with 4412 and resumes.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use streampipe_contract::{
    decode_channel_message, peek_update, ChannelMessage, History, Keys, Topic,
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use crate::commands::Commands;
use crate::delivery_log::{Delivery, DeliveryLog};
use crate::epoch;
use crate::error::{Error, Result};
use crate::history::{self as hist, Verdict};
use crate::ingest::{Ingest, Ingested};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Pushed, Update};
use crate::pubsub::Target;
use crate::registry::Registry;
use crate::subscriber::{Driver, Reconcile};
use crate::table::{Table, TopicRef};

/// Pending subscription changes, at most: joins wait for room, so a burst of
/// connections cannot grow this queue.
pub const HUB_COMMAND_QUEUE: usize = 4096;

/// How long a join (or begin) waits for its Redis subscriptions before the
/// connection is refused: Redis answers in milliseconds when it is up.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Markets fanned out per dispatch round before the task yields, so the
/// runtime's other tasks (the connections writing) keep running.
pub const DISPATCH_BATCH: usize = 64;

/// Sent to every client after the subscription was re-established.
const RESET: &[u8] =
    br#"{"type":"reset","reason":"redis subscription re-established; updates may have been missed"}"#;

struct Inner {
    keys: Keys,
    metrics: Arc<Metrics>,
    registry: Registry,
    table: Mutex<Table>,
    ingest: Ingest,
    commands: mpsc::Sender<Reconcile>,
    next_id: AtomicU64,
    connected: watch::Sender<bool>,
    /// The delivery log, when the pipeline keeps one.
    delivery_log: Option<DeliveryLog>,
    /// Channels with a refresh queued but not started: a burst of `markets`
    /// messages for one channel costs one refresh, not one task each.
    refreshing: Mutex<HashSet<Arc<str>>>,
    /// The data epoch this pod saw (see [`crate::epoch`]).
    epoch: epoch::Watch,
    /// Which markets keep an event history.
    history: History,
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

/// What a sync of a channel with the registry found.
struct Synced {
    /// The channel's markets; `None` when the registry does not know it.
    markets: Option<Vec<String>>,
    /// Markets this pod did not hold for the channel before.
    added: Vec<Arc<str>>,
}

impl Hub {
    /// Starts the hub: its Redis task and its dispatcher (which records into
    /// `delivery_log`, if given). After a Redis data loss it re-subscribes its
    /// channels through `commands` (see [`crate::epoch`]).
    pub fn start(
        target: Target,
        keys: Keys,
        registry: Registry,
        metrics: Arc<Metrics>,
        delivery_log: Option<DeliveryLog>,
        commands: Option<Commands>,
        history: History,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel(HUB_COMMAND_QUEUE);
        let (connected, _) = watch::channel(false);
        let hub = Hub {
            inner: Arc::new(Inner {
                keys,
                metrics,
                registry,
                table: Mutex::new(Table::default()),
                ingest: Ingest::default(),
                commands: tx,
                next_id: AtomicU64::new(1),
                connected,
                delivery_log,
                refreshing: Mutex::new(HashSet::new()),
                epoch: epoch::Watch::new(commands),
                history,
            }),
        };
        tokio::spawn(Driver::new(hub.clone(), target, rx).run());
        tokio::spawn(dispatch(hub.clone()));
        Ok(hub)
    }

    pub(crate) fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.inner.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the Redis pub/sub connection is up.
    pub fn is_connected(&self) -> bool {
        *self.inner.connected.borrow()
    }

    /// Joins `channel`: returns once this pod receives the channel's topic and
    /// every one of its markets' topics, with the channel's markets; an
    /// unknown channel is a 404 `unknown_channel`.
    pub async fn join(
        &self,
        channel: &str,
        outbox: Arc<Outbox>,
    ) -> Result<(Membership, Vec<String>)> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.table().join(channel, id, outbox);
        let membership = Membership {
            hub: self.clone(),
            channel: channel.into(),
            id,
        };
        match self.sync_or_recover(channel).await? {
            Some(Synced {
                markets: Some(markets),
                ..
            }) => Ok((membership, markets)),
            _ => Err(unknown_channel()),
        }
    }

    /// Brings this pod's view of `channel`'s markets in line with the
    /// registry and waits until Redis delivers every topic the channel needs.
    /// `None` when the channel has no connection here.
    async fn sync(&self, channel: &str) -> Result<Option<Synced>> {
        let Some(lock) = self.table().sync_lock(channel) else {
            return Ok(None);
        };
        let _serialized = lock.lock().await;
        let read = self.inner.registry.markets(channel).await?;
        let (topics, added) = {
            let mut t = self.table();
            let Some(markets) = read.as_deref() else {
                // Unknown to the registry (closed, or lost with Redis): keep
                // what this pod holds, so a repair after a loss writes the
                // channel back whole (see `crate::epoch`); the caller closes
                // the streams if it stays unknown.
                return Ok(Some(Synced {
                    markets: None,
                    added: Vec::new(),
                }));
            };
            let Some(diff) = t.apply_markets(channel, markets) else {
                return Ok(None);
            };
            // Everything the channel needs, not only what changed: a topic
            // another sync asked for a moment ago may still be unconfirmed.
            let mut topics = t.topics_of(channel);
            topics.extend(diff.topics);
            (topics, diff.added)
        };
        self.reconcile(topics, true).await?;
        Ok(Some(Synced {
            markets: read,
            added,
        }))
    }

    /// [`Hub::sync`], and when the registry does not know the channel,
    /// checks whether Redis lost its data (and repairs it, see
    /// [`crate::epoch`]) before syncing once more: a channel this pod streams
    /// must not be declared gone just because Redis forgot it.
    async fn sync_or_recover(&self, channel: &str) -> Result<Option<Synced>> {
        let synced = self.sync(channel).await?;
        if !matches!(synced, Some(Synced { markets: None, .. })) {
            return Ok(synced);
        }
        match epoch::check(self).await {
            // Read again after any check: `false` may mean that a concurrent
            // check (which this one waited for) has just written the channel
            // back; the answer read before it would close a live stream.
            Ok(_) => self.sync(channel).await,
            Err(e) => {
                warn!(error = %e, channel, "checking the redis data epoch failed");
                Ok(synced)
            }
        }
    }

    /// Sends the change to the Redis task; with `wait`, returns once Redis
    /// confirmed it.
    async fn reconcile(&self, topics: Vec<TopicRef>, wait: bool) -> Result<()> {
        let (barrier, confirmed) = match wait {
            true => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let sent = tokio::time::timeout(
            JOIN_TIMEOUT,
            self.inner.commands.send(Reconcile { topics, barrier }),
        )
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            return Err(not_confirmed());
        }
        if let Some(rx) = confirmed {
            match tokio::time::timeout(JOIN_TIMEOUT, rx).await {
                Ok(Ok(())) => {}
                _ => return Err(not_confirmed()),
            }
        }
        Ok(())
    }

    fn leave(&self, channel: &str, id: u64) {
        let topics = self.table().leave(channel, id);
        if topics.is_empty() {
            return;
        }
        // The task reconciles against the table, so order does not matter;
        // when the queue is full, hand the send to a task.
        let cmd = Reconcile {
            topics,
            barrier: None,
        };
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.inner.commands.try_send(cmd) {
            let tx = self.inner.commands.clone();
            tokio::spawn(async move {
                let _ = tx.send(cmd).await;
            });
        }
    }

    /// A `begin` for one connection: its channel's markets are synced with
    /// the registry (markets added since it connected are picked up), then
    /// their current state is read and queued for the connection. The read
    /// happens after Redis confirmed the market topics, so nothing newer can
    /// fall between the state and the live updates. Returns the states queued.
    ///
    /// A channel that no longer exists (closed meanwhile, or its registry
    /// lost) closes the connection with 4404 and is a 404 `unknown_channel`:
    /// a stream must never stay open silently receiving nothing.
    pub async fn begin(&self, channel: &str, outbox: &Outbox) -> Result<usize> {
        if !self.inner.history.is_on() {
            return self.begin_held(channel, outbox).await;
        }
        // Held from before the history read until its events are queued
        // (a connection may be held since it joined; see `ws`).
        outbox.hold();
        let res = self.begin_held(channel, outbox).await;
        outbox.release();
        res
    }

    /// Whether this pipeline keeps any history (connections then hold
    /// history markets' live updates from their join to their first begin).
    pub fn keeps_history(&self) -> bool {
        self.inner.history.is_on()
    }

    async fn begin_held(&self, channel: &str, outbox: &Outbox) -> Result<usize> {
        let markets = match self.sync_or_recover(channel).await? {
            Some(Synced {
                markets: Some(m), ..
            }) => m,
            Some(Synced { markets: None, .. }) => {
                outbox.close(4404, "unknown channel");
                return Err(unknown_channel());
            }
            None => return Ok(0),
        };
        // History markets the connection has a position on are resumed
        // from their history; the others get their state.
        let h = &self.inner.history;
        let resumed: Vec<(String, u64)> = markets
            .iter()
            .filter(|m| h.applies(m))
            .filter_map(|m| outbox.position(m).map(|p| (m.clone(), p)))
            .collect();
        let count = hist::read_count(resumed.len());
        let reads: Vec<(String, u64, usize)> = resumed
            .iter()
            .map(|(m, p)| (m.clone(), *p, count))
            .collect();
        let (states, histories) = tokio::try_join!(
            self.inner.registry.states(&markets),
            self.inner.registry.history_after(&reads),
        )?;
        let mut state_of: std::collections::HashMap<Arc<str>, Update> = states
            .into_iter()
            .flatten()
            .filter_map(|b| state_update(b, h))
            .map(|u| (u.market.clone(), u))
            .collect();
        let mut queued = 0;
        let mut bytes_left = hist::REPLAY_MAX_BYTES;
        let m = &self.inner.metrics;
        for ((market, since), reply) in resumed.iter().zip(histories) {
            let state = state_of.remove(market.as_str());
            let verdict = hist::decide(
                *since,
                hist::parse_entries(reply),
                count,
                state.as_ref().map(|u| u.version),
                bytes_left,
            );
            let recovered = matches!(verdict, Verdict::Recovered(_));
            m.history_replays
                .with_label_values(&[if recovered {
                    "recovered"
                } else {
                    "not_recovered"
                }])
                .inc();
            let updates: Vec<Update> = match verdict {
                Verdict::Recovered(entries) => entries
                    .into_iter()
                    .map(|e| Update {
                        market: market.as_str().into(),
                        version: e.version,
                        bytes: e.msg,
                        history: true,
                    })
                    .collect(),
                Verdict::NotRecovered => state.into_iter().collect(),
            };
            let replayed = if recovered { updates.len() } else { 0 };
            bytes_left -= if recovered {
                updates.iter().map(|u| u.bytes.len()).sum()
            } else {
                0
            };
            m.history_replayed.inc_by(replayed as u64);
            outbox.push_message(
                "recovered",
                hist::recovered_message(market, *since, recovered, replayed),
            );
            for u in &updates {
                queued += usize::from(self.count(outbox.push_replayed(u)));
            }
        }
        for u in state_of.into_values() {
            queued += usize::from(self.count(outbox.push_replayed(&u)));
        }
        Ok(queued)
    }

    /// Another pod changed `channel`'s markets: sync, then send the
    /// channel's connections here the state of the markets they gained.
    async fn refresh(&self, channel: &str) {
        self.inner
            .refreshing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(channel);
        let added = match self.sync_or_recover(channel).await {
            Ok(Some(Synced { markets: None, .. })) => {
                // The channel is gone (its registry lost, not closed: a
                // close says `closed`): its streams here would wait forever.
                self.table()
                    .for_each_member(channel, |o| o.close(4404, "unknown channel"));
                return;
            }
            Ok(Some(s)) => s.added,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, channel, "refreshing a channel's markets failed");
                return;
            }
        };
        if added.is_empty() {
            return;
        }
        let names: Vec<String> = added.iter().map(|m| m.to_string()).collect();
        let states = match self.inner.registry.states(&names).await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, channel, "reading added markets' state failed");
                return;
            }
        };
        let t = self.table();
        let h = &self.inner.history;
        for u in states
            .into_iter()
            .flatten()
            .filter_map(|b| state_update(b, h))
        {
            t.for_each_member(channel, |o| {
                self.count(o.push_update(&u));
            });
        }
    }

    /// Counts a push in the metrics; true when it was queued.
    fn count(&self, p: Pushed) -> bool {
        let m = &self.inner.metrics;
        match p {
            Pushed::Queued => return true,
            Pushed::Closed => {}
            Pushed::Conflated => m.conflated.inc(),
            Pushed::Duplicate => m.duplicates.inc(),
            Pushed::TooSlow => m.slow_closed.inc(),
            Pushed::Gap => m.history_gaps.inc(),
            Pushed::Held => {}
        }
        false
    }

    /// Closes every connection of every channel (shutdown), with `code`.
    pub fn close_all(&self, code: u16, reason: &'static str) {
        self.table().for_each_connection(|o| o.close(code, reason));
    }

    /// The most bytes queued in any connection's outbox (diagnostics and tests).
    pub fn max_outbox_bytes(&self) -> usize {
        let mut max = 0;
        self.table()
            .for_each_connection(|o| max = max.max(o.queued_bytes()));
        max
    }

    /// Channel ids with at least one stream on this pod.
    pub fn live_channels(&self) -> Vec<String> {
        self.table().channel_ids()
    }

    /// Whether `channel`'s streams here receive `market` (diagnostics and tests).
    pub fn holds(&self, channel: &str, market: &str) -> bool {
        self.table().holds(channel, market)
    }

    /// Connections known to the hub.
    pub fn member_count(&self) -> usize {
        self.table().counts().0
    }

    pub(crate) fn topic_name(&self, t: &TopicRef) -> String {
        match t {
            TopicRef::Market(m) => self.inner.keys.market_topic(m),
            TopicRef::Channel(c) => self.inner.keys.channel_topic(c),
        }
    }

    pub(crate) fn set_connected(&self, up: bool) {
        self.inner.connected.send_replace(up);
    }

    pub(crate) fn set_gauges(&self) {
        let (_, channels, markets) = self.table().counts();
        let m = &self.inner.metrics;
        m.topics
            .with_label_values(&["channel"])
            .set(channels as i64);
        m.topics.with_label_values(&["market"]).set(markets as i64);
    }

    /// One message from Redis.
    pub(crate) fn on_message(&self, topic: &[u8], payload: &[u8]) {
        let m = &self.inner.metrics;
        m.redis_messages.inc();
        let bad = |why: &str| {
            m.rejected.with_label_values(&["bad_pubsub_message"]).inc();
            debug!(why, "unreadable pub/sub message dropped");
        };
        let Some(topic) = std::str::from_utf8(topic)
            .ok()
            .and_then(|t| self.inner.keys.parse_topic(t))
        else {
            return bad("unknown topic");
        };
        match topic {
            Topic::Market(market) => {
                let head = match peek_update(payload) {
                    Ok(h) if h.market == market => h,
                    Ok(_) => return bad("market does not match its topic"),
                    Err(_) => return bad("not an update"),
                };
                observe_latency(m, head.ts);
                // A copy of its own: a slice of the read buffer would pin the
                // whole buffer for as long as any outbox holds the update.
                let bytes = Bytes::copy_from_slice(payload);
                let history = self.inner.history.applies(market);
                match self
                    .inner
                    .ingest
                    .push(market, head.version, bytes, history, Instant::now())
                {
                    Ingested::Queued => {}
                    Ingested::Conflated => m.hub_conflated.inc(),
                    Ingested::Stale => m.duplicates.inc(),
                }
            }
            Topic::Channel(channel) => match decode_channel_message(payload) {
                Ok(ChannelMessage::Closed) => {
                    self.table().for_each_member(channel, |o| {
                        o.close(streampipe_contract::close::CHANNEL_CLOSED, "channel closed")
                    });
                }
                Ok(ChannelMessage::MarketsChanged) => {
                    let queued = self
                        .inner
                        .refreshing
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(channel.into());
                    if queued {
                        let (hub, channel) = (self.clone(), channel.to_owned());
                        tokio::spawn(async move { hub.refresh(&channel).await });
                    }
                }
                Ok(ChannelMessage::Update(head)) => {
                    let u = Update {
                        market: head.market.into(),
                        version: head.version,
                        bytes: Bytes::copy_from_slice(payload),
                        history: self.inner.history.applies(head.market),
                    };
                    let t = self.table();
                    if t.holds(channel, head.market) {
                        t.for_each_member(channel, |o| {
                            self.count(o.push_update(&u));
                        });
                    }
                }
                Err(_) => bad("not a channel message"),
            },
        }
    }

    /// After a pub/sub reconnect: every client may have missed updates, and
    /// Redis may have restarted without its data. The epoch check runs first
    /// (so a client's `begin` finds its channel written back); it sends the
    /// `reset` itself when it found a loss.
    pub(crate) fn after_reconnect(&self) {
        self.inner.metrics.redis_reconnects.inc();
        let hub = self.clone();
        tokio::spawn(async move {
            match epoch::check(&hub).await {
                Ok(true) => {}
                Ok(false) => hub.reset_all(RESET),
                Err(e) => {
                    warn!(error = %e, "checking the redis data epoch after a reconnect failed");
                    hub.reset_all(RESET);
                }
            }
        });
    }

    /// Remembers the owner of a channel streamed here, for a write-back
    /// after a Redis data loss ([`epoch`]).
    pub fn remember_owner(&self, channel: &str, subject: &str) {
        self.inner
            .epoch
            .remember_owner(channel, subject, || self.live_channels());
    }

    pub(crate) fn epoch_watch(&self) -> &epoch::Watch {
        &self.inner.epoch
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Every channel with streams here and its markets as this pod holds them.
    pub(crate) fn channels_with_markets(&self) -> Vec<(String, Vec<String>)> {
        let t = self.table();
        t.channel_ids()
            .into_iter()
            .map(|c| {
                let m = t.markets_of(&c);
                (c, m)
            })
            .collect()
    }

    /// Sends every client `message` (a `reset`) and forgets what each was
    /// sent, so the versions of its `begin` are not dropped as duplicates.
    pub(crate) fn reset_all(&self, message: &'static [u8]) {
        let reset = Bytes::from_static(message);
        self.table().for_each_connection(|o| {
            o.forget_sent();
            o.push_message("reset", reset.clone());
        });
    }
}

fn unknown_channel() -> Error {
    Error::invalid(
        warp::http::StatusCode::NOT_FOUND,
        "unknown_channel",
        "unknown channel",
    )
}

fn not_confirmed() -> Error {
    Error::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "redis subscription not confirmed in time",
    ))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn observe_latency(m: &Metrics, ts: Option<i64>) {
    if let Some(ts) = ts {
        m.update_latency
            .observe((now_ms() - ts).max(0) as f64 / 1000.0);
    }
}

/// A stored state message as an update for an outbox.
fn state_update(bytes: Bytes, history: &History) -> Option<Update> {
    let (market, version) = {
        let head = peek_update(&bytes).ok()?;
        (Arc::<str>::from(head.market), head.version)
    };
    Some(Update {
        history: history.applies(&market),
        market,
        version,
        bytes,
    })
}

/// Fans market updates out from the ingest queue to the connections.
async fn dispatch(hub: Hub) {
    let m = hub.inner.metrics.clone();
    loop {
        let batch = hub.inner.ingest.take(DISPATCH_BATCH);
        if batch.is_empty() {
            m.hub_pending.set(0);
            hub.inner.ingest.notified().await;
            continue;
        }
        let now = Instant::now();
        let at = now_ms();
        let (mut conflated, mut duplicates, mut slow, mut gaps) = (0u64, 0u64, 0u64, 0u64);
        {
            let t = hub.table();
            for item in &batch {
                m.hub_lag
                    .observe(now.duration_since(item.since).as_secs_f64());
                // Connections that took this version (queued, or in place
                // of an older one still waiting): what the log records.
                let mut handed = 0u32;
                let n = t.for_each_watcher(&item.update.market, |o| {
                    if item.gap {
                        // A history market's event was conflated away here:
                        // every watcher resumes from the history instead.
                        o.close(
                            streampipe_contract::close::HISTORY_GAP,
                            "the pod fell behind on a history market; resume with since",
                        );
                        gaps += 1;
                        return;
                    }
                    match o.push_update(&item.update) {
                        Pushed::Queued => handed += 1,
                        Pushed::Closed => {}
                        Pushed::Conflated => {
                            handed += 1;
                            conflated += 1
                        }
                        Pushed::Duplicate => duplicates += 1,
                        Pushed::TooSlow => slow += 1,
                        Pushed::Gap => gaps += 1,
                        Pushed::Held => handed += 1,
                    }
                });
                m.fanout.observe(n as f64);
                if let (Some(log), true) = (&hub.inner.delivery_log, handed > 0) {
                    log.record(Delivery {
                        market: item.update.market.clone(),
                        version: item.update.version,
                        bytes: item.update.bytes.clone(),
                        connections: handed,
                        at,
                    });
                }
            }
        }
        m.conflated.inc_by(conflated);
        m.duplicates.inc_by(duplicates);
        m.slow_closed.inc_by(slow);
        m.history_gaps.inc_by(gaps);
        m.hub_pending.set(hub.inner.ingest.len() as i64);
        tokio::task::yield_now().await;
    }
}
