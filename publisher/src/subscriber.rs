//! The hub's Redis task: owns the pod's subscribed-mode connection.
//!
//! It (re)connects with backoff, resubscribes every topic the routing table
//! wants, reconciles Redis with the table on request (so a leave racing a
//! join never drops a topic that is still wanted), confirms subscriptions
//! with `PING <token>` barriers (Redis answers in order), and hands every
//! message it reads to the hub. After a reconnect it tells the hub to send
//! every client `reset`.

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::error::Result;
use crate::hub::Hub;
use crate::pubsub::{Flavour, SubConn, Target};
use crate::resp::Push;
use crate::table::TopicRef;

/// Topics per (UN)SUBSCRIBE command: keeps each command's size and Redis'
/// time per command small after a reconnect.
const SUBSCRIBE_CHUNK: usize = 1000;

/// Queued subscription changes applied per round: one round's commands are
/// written in one go, then the socket is read again.
const COMMANDS_PER_ROUND: usize = 1024;

/// Reconnect backoff bounds: fast after a blip, gentle on a Redis that is down.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// A request to bring Redis in line with the table for some topics.
pub(crate) struct Reconcile {
    pub(crate) topics: Vec<TopicRef>,
    /// Completed once Redis confirmed every subscription queued before it.
    pub(crate) barrier: Option<oneshot::Sender<()>>,
}

/// The Redis task: (re)connects, reconciles subscriptions, reads messages.
pub(crate) struct Driver {
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
                    self.hub.set_connected(true);
                    self.hub.set_gauges();
                    if self.epoch > 0 {
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
