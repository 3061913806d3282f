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
//! ([`SubConn`]) only as fast as the pod consumes; market updates wait in a
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

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use streampipe_contract::{decode_channel_message, peek_update, ChannelMessage, Keys, Topic};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};
use crate::ingest::{Ingest, Ingested};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Pushed, Update};
use crate::pubsub::{Flavour, SubConn, Target};
use crate::registry::Registry;
use crate::resp::Push;
use crate::table::{Table, TopicRef};

/// Pending subscription changes, at most: joins wait for room, so a burst of
/// connections cannot grow this queue.
pub const HUB_COMMAND_QUEUE: usize = 4096;

/// How long a join (or begin) waits for its Redis subscriptions before the
/// connection is refused: Redis answers in milliseconds when it is up.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Topics per (UN)SUBSCRIBE command: keeps each command's size and Redis'
/// time per command small after a reconnect.
const SUBSCRIBE_CHUNK: usize = 1000;

/// Queued subscription changes applied per round: one round's commands are
/// written in one go, then the socket is read again.
const COMMANDS_PER_ROUND: usize = 1024;

/// Markets fanned out per dispatch round before the task yields, so the
/// runtime's other tasks (the connections writing) keep running.
pub const DISPATCH_BATCH: usize = 64;

/// Reconnect backoff bounds: fast after a blip, gentle on a Redis that is down.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Sent to every client after the subscription was re-established.
const RESET: &[u8] =
    br#"{"type":"reset","reason":"redis subscription re-established; updates may have been missed"}"#;

struct Reconcile {
    topics: Vec<TopicRef>,
    /// Completed once Redis confirmed every subscription queued before it.
    barrier: Option<oneshot::Sender<()>>,
}

struct Inner {
    keys: Keys,
    metrics: Arc<Metrics>,
    registry: Registry,
    table: Mutex<Table>,
    ingest: Ingest,
    commands: mpsc::Sender<Reconcile>,
    next_id: AtomicU64,
    connected: watch::Sender<bool>,
    /// Channels with a refresh queued but not started: a burst of `markets`
    /// messages for one channel costs one refresh, not one task each.
    refreshing: Mutex<HashSet<Arc<str>>>,
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
    /// Starts the hub: its Redis task and its dispatcher.
    pub fn start(
        redis_url: &str,
        keys: Keys,
        registry: Registry,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let target = Target::from_url(redis_url)?;
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
                refreshing: Mutex::new(HashSet::new()),
            }),
        };
        let driver = Driver {
            hub: hub.clone(),
            target,
            commands: rx,
            token: 0,
            barriers: Vec::new(),
            epoch: 0,
        };
        tokio::spawn(driver.run());
        tokio::spawn(dispatch(hub.clone()));
        Ok(hub)
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
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
        match self.sync(channel).await? {
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
        let (mut topics, added) = {
            let mut t = self.table();
            let Some(diff) = t.apply_markets(channel, read.as_deref().unwrap_or(&[])) else {
                return Ok(None);
            };
            // Everything the channel needs, not only what changed: a topic
            // another sync asked for a moment ago may still be unconfirmed.
            let mut topics = t.topics_of(channel);
            topics.extend(diff.topics);
            (topics, diff.added)
        };
        topics.dedup();
        self.reconcile(topics, true).await?;
        Ok(Some(Synced {
            markets: read,
            added,
        }))
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
    pub async fn begin(&self, channel: &str, outbox: &Outbox) -> Result<usize> {
        let markets = match self.sync(channel).await? {
            Some(Synced {
                markets: Some(m), ..
            }) => m,
            _ => return Ok(0),
        };
        let states = self.inner.registry.states(&markets).await?;
        let mut queued = 0;
        for u in states.into_iter().flatten().filter_map(state_update) {
            queued += usize::from(self.count(outbox.push_update(&u)));
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
        let added = match self.sync(channel).await {
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
        for u in states.into_iter().flatten().filter_map(state_update) {
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

    fn topic_name(&self, t: &TopicRef) -> String {
        match t {
            TopicRef::Market(m) => self.inner.keys.market_topic(m),
            TopicRef::Channel(c) => self.inner.keys.channel_topic(c),
        }
    }

    fn set_gauges(&self) {
        let (_, channels, markets) = self.table().counts();
        let m = &self.inner.metrics;
        m.topics
            .with_label_values(&["channel"])
            .set(channels as i64);
        m.topics.with_label_values(&["market"]).set(markets as i64);
    }

    /// One message from Redis.
    fn on_message(&self, topic: &[u8], payload: &[u8]) {
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
                match self
                    .inner
                    .ingest
                    .push(market, head.version, bytes, Instant::now())
                {
                    Ingested::Queued => {}
                    Ingested::Conflated => m.hub_conflated.inc(),
                    Ingested::Stale => m.duplicates.inc(),
                }
            }
            Topic::Channel(channel) => match decode_channel_message(payload) {
                Ok(ChannelMessage::Closed) => {
                    self.table()
                        .for_each_member(channel, |o| o.close(4410, "channel closed"));
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

    /// After a reconnect: every client may have missed updates.
    fn reset_all(&self) {
        let reset = Bytes::from_static(RESET);
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
fn state_update(bytes: Bytes) -> Option<Update> {
    let head = peek_update(&bytes).ok()?;
    Some(Update {
        market: head.market.into(),
        version: head.version,
        bytes: bytes.clone(),
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
        let (mut conflated, mut duplicates, mut slow) = (0u64, 0u64, 0u64);
        {
            let t = hub.table();
            for item in &batch {
                m.hub_lag
                    .observe(now.duration_since(item.since).as_secs_f64());
                let n = t.for_each_watcher(&item.update.market, |o| {
                    match o.push_update(&item.update) {
                        Pushed::Queued | Pushed::Closed => {}
                        Pushed::Conflated => conflated += 1,
                        Pushed::Duplicate => duplicates += 1,
                        Pushed::TooSlow => slow += 1,
                    }
                });
                m.fanout.observe(n as f64);
            }
        }
        m.conflated.inc_by(conflated);
        m.duplicates.inc_by(duplicates);
        m.slow_closed.inc_by(slow);
        m.hub_pending.set(hub.inner.ingest.len() as i64);
        tokio::task::yield_now().await;
    }
}

/// The Redis task: (re)connects, reconciles subscriptions, reads messages.
struct Driver {
    hub: Hub,
    target: Target,
    commands: mpsc::Receiver<Reconcile>,
    /// Last `PING` token sent.
    token: u64,
    /// Barriers waiting for the pong of their token; kept across reconnects.
    barriers: Vec<(u64, oneshot::Sender<()>)>,
    /// Completed (re)subscriptions; above 0 a new one means a reconnect.
    epoch: u64,
}

impl Driver {
    async fn run(mut self) {
        let mut backoff = RECONNECT_MIN;
        loop {
            let before = self.epoch;
            match self.session().await {
                Ok(()) => return, // the hub is gone
                Err(e) => warn!(error = %e, "redis pub/sub connection lost; reconnecting"),
            }
            self.hub.inner.connected.send_replace(false);
            if self.epoch > before {
                backoff = RECONNECT_MIN;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RECONNECT_MAX);
        }
    }

    /// One connection's life; `Ok` only when the hub was dropped.
    async fn session(&mut self) -> Result<()> {
        let mut conn = SubConn::connect(&self.target, Flavour::Classic).await?;
        // Everything wanted now; barriers left from a lost connection are
        // confirmed by this resubscription's pong.
        let names: HashSet<String> = {
            let t = self.hub.table();
            t.all_topics()
                .iter()
                .map(|t| self.hub.topic_name(t))
                .collect()
        };
        let list: Vec<String> = names.iter().cloned().collect();
        for chunk in list.chunks(SUBSCRIBE_CHUNK) {
            conn.subscribe(chunk);
        }
        let mut subscribed = names;
        self.token += 1;
        let resync = self.token;
        for b in &mut self.barriers {
            b.0 = resync;
        }
        conn.ping(resync);
        conn.flush().await?;
        loop {
            while let Some(push) = conn.try_next()? {
                self.on_push(push, resync);
            }
            tokio::select! {
                r = conn.fill() => r?,
                cmd = self.commands.recv() => {
                    let Some(first) = cmd else { return Ok(()) };
                    let mut cmds = vec![first];
                    while cmds.len() < COMMANDS_PER_ROUND {
                        match self.commands.try_recv() {
                            Ok(c) => cmds.push(c),
                            Err(_) => break,
                        }
                    }
                    self.apply(&mut conn, &mut subscribed, cmds);
                    conn.flush().await?;
                }
            }
        }
    }

    fn on_push(&mut self, push: Push, resync: u64) {
        match push {
            Push::Message { topic, payload } => self.hub.on_message(&topic, &payload),
            Push::Pong(token) => {
                let Some(token) = std::str::from_utf8(&token)
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok())
                else {
                    return;
                };
                let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.barriers)
                    .into_iter()
                    .partition(|(t, _)| *t <= token);
                self.barriers = waiting;
                for (_, tx) in done {
                    let _ = tx.send(());
                }
                if token == resync {
                    self.hub.inner.connected.send_replace(true);
                    self.hub.set_gauges();
                    if self.epoch > 0 {
                        self.hub.inner.metrics.redis_reconnects.inc();
                        info!("redis pub/sub re-established; sending reset to clients");
                        self.hub.reset_all();
                    }
                    self.epoch += 1;
                }
            }
            Push::Error(e) => {
                warn!(error = %String::from_utf8_lossy(&e), "redis pub/sub error reply");
            }
            Push::Subscription { .. } | Push::Other(_) => {}
        }
    }

    fn apply(
        &mut self,
        conn: &mut SubConn,
        subscribed: &mut HashSet<String>,
        cmds: Vec<Reconcile>,
    ) {
        let (mut add, mut remove, mut barriers) = (Vec::new(), Vec::new(), Vec::new());
        {
            let t = self.hub.table();
            let mut seen = HashSet::new();
            for cmd in cmds {
                for topic in cmd.topics {
                    if !seen.insert(topic.clone()) {
                        continue;
                    }
                    let name = self.hub.topic_name(&topic);
                    match (t.wants(&topic), subscribed.contains(&name)) {
                        (true, false) => add.push(name),
                        (false, true) => remove.push(name),
                        _ => {}
                    }
                }
                barriers.extend(cmd.barrier);
            }
        }
        for chunk in add.chunks(SUBSCRIBE_CHUNK) {
            conn.subscribe(chunk);
        }
        for chunk in remove.chunks(SUBSCRIBE_CHUNK) {
            conn.unsubscribe(chunk);
        }
        for name in &remove {
            subscribed.remove(name);
        }
        subscribed.extend(add);
        if !barriers.is_empty() {
            self.token += 1;
            conn.ping(self.token);
            self.barriers
                .extend(barriers.into_iter().map(|b| (self.token, b)));
        }
        self.hub.set_gauges();
    }
}
