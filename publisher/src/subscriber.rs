//! The hub's Redis task: owns the pod's subscribed-mode connections.
//!
//! One connection to a standalone Redis, or one per master of a Redis
//! Cluster (topics are sharded: each lives on its hash slot's master, and
//! `SSUBSCRIBE` takes the topics of one slot at a time). The task
//! (re)connects with backoff (re-reading the cluster's slot map), resubscribes
//! every topic the routing table wants, reconciles Redis with the table on
//! request (so a leave racing a join never drops a topic that is still
//! wanted), confirms subscriptions with `PING <token>` barriers (each
//! connection answers in order; a barrier holds once every connection
//! answered its token), and hands every message it reads to the hub. A lost
//! connection, a connection silent for [`HEARTBEAT_TIMEOUT`] (every
//! connection answers a `PING` each [`HEARTBEAT_EVERY`]: a frozen node or a
//! half-open socket closes nothing), a `MOVED` or a slot moved away ends the
//! whole session: every
//! connection is rebuilt from a fresh slot map, and the hub checks whether
//! Redis lost its data (see [`crate::epoch`]) and sends every client `reset`.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use futures_util::future::select_all;
use streampipe_contract::slot;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::pubsub::{SubConn, Target};
use crate::resp::Push;
use crate::table::TopicRef;

/// Topics per (UN)SUBSCRIBE command: keeps each command's size and Redis'
/// time per command small after a reconnect.
const SUBSCRIBE_CHUNK: usize = 1000;

/// Queued subscription changes applied per round: one round's commands are
/// written in one go, then the socket is read again.
const COMMANDS_PER_ROUND: usize = 1024;

/// How often every subscribed connection is asked a `PING`: a node that
/// stops answering (frozen, or a half-open TCP connection after a network
/// partition) sends no error and closes nothing, so silence is the only sign.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// A `PING` unanswered this long ends the session (every connection is
/// rebuilt from a fresh slot map). Longer than a healthy Redis takes under
/// load: a pong waits behind the messages queued before it.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Reconnect backoff bounds: fast after a blip, gentle on a Redis that is down.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// A request to bring Redis in line with the table for some topics.
pub(crate) struct Reconcile {
    pub(crate) topics: Vec<TopicRef>,
    /// Completed once Redis confirmed every subscription queued before it.
    pub(crate) barrier: Option<oneshot::Sender<()>>,
}

/// The session's connections and which slots each serves.
struct Links {
    conns: Vec<SubConn>,
    /// `(first slot, last slot, connection index)`.
    ranges: Vec<(u16, u16, usize)>,
    /// Highest `PING` token each connection answered.
    acked: Vec<u64>,
    cluster: bool,
}

impl Links {
    /// Connects to the Redis, or to every master of the cluster (slot map
    /// from the first seed that answers).
    async fn connect(target: &Target) -> Result<Links> {
        if !target.cluster {
            let conn = SubConn::connect(target, &target.seeds[0]).await?;
            return Ok(Links {
                conns: vec![conn],
                ranges: vec![(0, streampipe_contract::slot::SLOTS - 1, 0)],
                acked: vec![0],
                cluster: false,
            });
        }
        let mut last_error = None;
        let mut map = None;
        for seed in &target.seeds {
            match SubConn::connect(target, seed).await {
                Ok(mut c) => match c.cluster_slots().await {
                    Ok(m) => {
                        map = Some(m);
                        break;
                    }
                    Err(e) => last_error = Some(e),
                },
                Err(e) => last_error = Some(e),
            }
        }
        let Some(map) = map else {
            return Err(last_error.unwrap_or_else(|| Error::Config("no cluster seed".into())));
        };
        let mut nodes = Vec::new();
        let mut ranges = Vec::new();
        for r in map {
            let i = match nodes.iter().position(|n| *n == r.node) {
                Some(i) => i,
                None => {
                    nodes.push(r.node.clone());
                    nodes.len() - 1
                }
            };
            ranges.push((r.first, r.last, i));
        }
        let mut conns = Vec::with_capacity(nodes.len());
        for n in &nodes {
            conns.push(SubConn::connect(target, n).await?);
        }
        Ok(Links {
            acked: vec![0; conns.len()],
            conns,
            ranges,
            cluster: true,
        })
    }

    /// The connection serving topic `name`, and its slot (0 outside a cluster,
    /// where one command may take topics of any slot).
    fn route(&self, name: &str) -> Result<(usize, u16)> {
        if !self.cluster {
            return Ok((0, 0));
        }
        let s = slot(name.as_bytes());
        self.ranges
            .iter()
            .find(|r| r.0 <= s && s <= r.1)
            .map(|r| (r.2, s))
            .ok_or_else(|| Error::Config(format!("slot {s} is served by no master")))
    }

    /// Queues (un)subscriptions, one command per connection and slot.
    fn queue(&mut self, names: Vec<String>, subscribe: bool) -> Result<()> {
        let mut groups: BTreeMap<(usize, u16), Vec<String>> = BTreeMap::new();
        for n in names {
            let key = self.route(&n)?;
            groups.entry(key).or_default().push(n);
        }
        for ((i, _), names) in groups {
            for chunk in names.chunks(SUBSCRIBE_CHUNK) {
                match subscribe {
                    true => self.conns[i].subscribe(chunk),
                    false => self.conns[i].unsubscribe(chunk),
                }
            }
        }
        Ok(())
    }

    fn ping_all(&mut self, token: u64) {
        self.conns.iter_mut().for_each(|c| c.ping(token));
    }

    /// The token every connection has answered.
    fn confirmed(&self) -> u64 {
        self.acked.iter().copied().min().unwrap_or(0)
    }

    async fn flush_all(&mut self) -> Result<()> {
        for c in &mut self.conns {
            c.flush().await?;
        }
        Ok(())
    }

    /// Reads more from whichever connection has data. Cancel-safe.
    async fn fill_any(&mut self) -> Result<()> {
        let reads = self.conns.iter_mut().map(|c| Box::pin(c.fill()));
        select_all(reads).await.0
    }
}

/// The Redis task: (re)connects, reconciles subscriptions, reads messages.
pub(crate) struct Driver {
    hub: Hub,
    target: Target,
    commands: mpsc::Receiver<Reconcile>,
    /// Last `PING` token sent.
    token: u64,
    /// Barriers waiting for their token; kept across reconnects.
    barriers: Vec<(u64, oneshot::Sender<()>)>,
    /// Completed (re)subscriptions; above 0 a new one means a reconnect.
    epoch: u64,
}

impl Driver {
    /// A driver for `hub`, fed by `commands`.
    pub(crate) fn new(hub: Hub, target: Target, commands: mpsc::Receiver<Reconcile>) -> Self {
        Driver {
            hub,
            target,
            commands,
            token: 0,
            barriers: Vec::new(),
            epoch: 0,
        }
    }

    /// Runs until the hub is dropped.
    pub(crate) async fn run(mut self) {
        let mut backoff = RECONNECT_MIN;
        loop {
            let before = self.epoch;
            match self.session().await {
                Ok(()) => return, // the hub is gone
                Err(e) => warn!(error = %e, "redis pub/sub connection lost; reconnecting"),
            }
            self.hub.set_connected(false);
            if self.epoch > before {
                backoff = RECONNECT_MIN;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RECONNECT_MAX);
        }
    }

    /// One session's life; `Ok` only when the hub was dropped.
    async fn session(&mut self) -> Result<()> {
        let mut links = Links::connect(&self.target).await?;
        // Everything wanted now; barriers left from a lost session are
        // confirmed by this resubscription's pongs.
        let mut subscribed: HashSet<String> = {
            let t = self.hub.table();
            t.all_topics()
                .iter()
                .map(|t| self.hub.topic_name(t))
                .collect()
        };
        links.queue(subscribed.iter().cloned().collect(), true)?;
        self.token += 1;
        let resync = self.token;
        for b in &mut self.barriers {
            b.0 = resync;
        }
        links.ping_all(resync);
        links.flush_all().await?;
        let mut synced = false;
        // The oldest `PING` not yet answered by every connection, and when
        // it was sent (the resync's counts: a node that never answers it is
        // as silent as one that stopped).
        let mut unanswered = (resync, Instant::now());
        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            for i in 0..links.conns.len() {
                while let Some(push) = links.conns[i].try_next()? {
                    self.on_push(&mut links, i, push, &subscribed)?;
                }
            }
            if !synced && links.confirmed() >= resync {
                synced = true;
                self.hub.set_connected(true);
                self.hub.set_gauges();
                if self.epoch > 0 {
                    info!("redis pub/sub re-established; checking the data epoch, then sending reset to clients");
                    self.hub.after_reconnect();
                }
                self.epoch += 1;
            }
            tokio::select! {
                r = links.fill_any() => r?,
                _ = heartbeat.tick() => {
                    let (token, sent) = unanswered;
                    if links.confirmed() >= token {
                        self.token += 1;
                        links.ping_all(self.token);
                        unanswered = (self.token, Instant::now());
                        links.flush_all().await?;
                    } else if sent.elapsed() >= HEARTBEAT_TIMEOUT {
                        return Err(Error::Io(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!(
                                "a redis pub/sub connection answered no PING for {:?}",
                                sent.elapsed()
                            ),
                        )));
                    }
                }
                cmd = self.commands.recv() => {
                    let Some(first) = cmd else { return Ok(()) };
                    let mut cmds = vec![first];
                    while cmds.len() < COMMANDS_PER_ROUND {
                        match self.commands.try_recv() {
                            Ok(c) => cmds.push(c),
                            Err(_) => break,
                        }
                    }
                    self.apply(&mut links, &mut subscribed, cmds)?;
                    links.flush_all().await?;
                }
            }
        }
    }

    fn on_push(
        &mut self,
        links: &mut Links,
        conn: usize,
        push: Push,
        subscribed: &HashSet<String>,
    ) -> Result<()> {
        match push {
            Push::Message { topic, payload } => self.hub.on_message(&topic, &payload),
            Push::Pong(token) => {
                let Some(token) = std::str::from_utf8(&token)
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok())
                else {
                    return Ok(());
                };
                links.acked[conn] = links.acked[conn].max(token);
                let confirmed = links.confirmed();
                let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.barriers)
                    .into_iter()
                    .partition(|(t, _)| *t <= confirmed);
                self.barriers = waiting;
                for (_, tx) in done {
                    let _ = tx.send(());
                }
            }
            Push::Error(e) => {
                let text = String::from_utf8_lossy(&e).into_owned();
                // The slot map changed under us: rebuild every connection.
                if ["MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN"]
                    .iter()
                    .any(|p| text.starts_with(p))
                {
                    return Err(Error::Config(format!("redis cluster changed: {text}")));
                }
                warn!(error = %text, "redis pub/sub error reply");
            }
            Push::Subscription { kind, topic } => {
                // Redis drops a sharded subscription whose slot moved away; a
                // topic we still hold that Redis unsubscribed is such a case.
                if &kind[..] == b"sunsubscribe"
                    && subscribed.contains(String::from_utf8_lossy(&topic).as_ref())
                {
                    return Err(Error::Config(
                        "redis cluster moved a subscribed slot".into(),
                    ));
                }
            }
            Push::Other(_) => {}
        }
        Ok(())
    }

    fn apply(
        &mut self,
        links: &mut Links,
        subscribed: &mut HashSet<String>,
        cmds: Vec<Reconcile>,
    ) -> Result<()> {
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
        for name in &remove {
            subscribed.remove(name);
        }
        subscribed.extend(add.iter().cloned());
        links.queue(add, true)?;
        links.queue(remove, false)?;
        if !barriers.is_empty() {
            self.token += 1;
            links.ping_all(self.token);
            self.barriers
                .extend(barriers.into_iter().map(|b| (self.token, b)));
        }
        self.hub.set_gauges();
        Ok(())
    }
}
