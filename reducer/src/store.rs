//! The Redis adapter: carries out the core's effects and loads subscriptions.
//!
//! A whole batch of effects goes to Redis as one pipeline (one round trip).
//! Consecutive updates are grouped into calls of the update script, which
//! compares versions, writes state and (for a watched market) publishes the
//! update once to the market's topic — and, for a history market (see
//! [`streampipe_contract::history`]), appends it to the market's capped
//! stream — atomically inside Redis, so a
//! redelivered or late record can never move a market's state backwards and
//! never republishes an old version. Every script touches the keys of one
//! market only besides its topic, which carries the same hash tag, so each
//! call stays single-slot per market. Everything in a batch is idempotent
//! (set adds/removes, version-guarded writes, announces of the stored
//! state), so a failed pipeline is simply sent again.
//!
//! On Redis Cluster ([`RedisStore::new_cluster`]) the same commands go
//! through redis-rs' cluster connection, which routes each by its key: update
//! script calls are grouped by the hash slot of their markets (a call must
//! stay within one slot), topics are published with `SPUBLISH`, and after
//! every batch a `WAIT` on each master the batch touched makes sure a replica
//! has the writes before the batch counts as written (see
//! [`REPLICA_WAIT_TIMEOUT`] for what happens when none answers).
//!
//! Beside the batch path: `recovery` (the data epoch, loading a partition,
//! writing back after a Redis data loss) and `cluster` (slot ranges per
//! master, single-slot script calls).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use redis::cluster::{ClusterClient, ClusterConnection};
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Client, ClientTlsConfig, Cmd, Connection, Script, TlsCertificates, Value};
use streampipe_contract::deploy::{seed_rotations, RedisTlsPem};
use streampipe_contract::{slot, History, Keys, CHANNEL_MARKETS_CHANGED};

use crate::core::Effect;
use crate::error::Result;

mod cluster;
mod recovery;

use cluster::{master_ranges, one_slot_per_master, update_calls};

/// Most updates in one call of the update script: bounds how long one script
/// call holds Redis' single thread (~128 × a few µs).
pub const UPDATE_SCRIPT_CHUNK: usize = 128;

/// Retries redis-rs' cluster client makes inside one call (after a
/// `MOVED`, `TRYAGAIN` or a failed node): enough to follow a failover's
/// redirect. Its default (16, each refreshing the slot map and waiting up
/// to [`REDIS_TIMEOUT`] on a node that answers nothing) held the consumer
/// thread for two minutes behind a frozen master; the writer and the
/// epoch check retry on their own, reconnecting from the next seed.
pub const CLUSTER_RETRIES: u32 = 2;

/// Connect and I/O timeout for Redis: long enough for a busy Redis to answer
/// a full batch, short enough to notice a dead one and retry.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `WAIT 1` may block on a cluster master after a batch: a healthy
/// replica acknowledges within milliseconds; a master without a live replica
/// (its replica died, or it is a freshly promoted one) costs this much per
/// batch that touches it, and the batch is then accepted unreplicated
/// (availability over durability while a replica is missing).
pub const REPLICA_WAIT_TIMEOUT: Duration = Duration::from_millis(500);

/// KEYS[1..n]: state hash of update i; KEYS[n+1..]: the history streams
/// of the call's history markets. ARGV[1]: the publish command, ARGV[2]:
/// the largest version jump accepted over a stored version, ARGV[3]: the
/// history cap (`MAXLEN ~`); then per update: version, ts, message, topic
/// ('' when the market is unwatched), history (index of its stream in
/// KEYS, 0 for a market without history).
/// Writes (appends, publishes) only if newer than stored and at most the
/// jump ahead of it; the stream entry's id is `<version>-0` and it carries
/// the previous stored version (`p`), so the append is idempotent with the
/// state write and a reader can prove the entries it holds leave no gap.
/// Returns `{applied, published, appended, history_refused, i...}` with the
/// (1-based) positions of the updates refused as too far ahead.
const UPDATE_SCRIPT: &str = r#"
local pub, jump, maxlen = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local applied, published, appended, hrefused = 0, 0, 0, 0
local n = (#ARGV - 3) / 5
local refused = {}
for i = 1, n do
  local a = 5 * i - 1
  local cur = redis.call('HGET', KEYS[i], 'v')
  local v = tonumber(ARGV[a])
  if cur and v > tonumber(cur) + jump then
    refused[#refused + 1] = i
  elseif (not cur) or tonumber(cur) < v then
    redis.call('HSET', KEYS[i], 'v', ARGV[a], 'ts', ARGV[a + 1], 'msg', ARGV[a + 2])
    applied = applied + 1
    local h = tonumber(ARGV[a + 4])
    if h > 0 then
      local r = redis.pcall('XADD', KEYS[h], 'MAXLEN', '~', maxlen, ARGV[a] .. '-0',
        'p', cur or '0', 'ts', ARGV[a + 1], 'msg', ARGV[a + 2])
      if type(r) == 'table' and r.err then
        hrefused = hrefused + 1
      else
        appended = appended + 1
      end
    end
    if ARGV[a + 3] ~= '' then
      redis.call(pub, ARGV[a + 3], ARGV[a + 2])
      published = published + 1
    end
  end
end
local out = {applied, published, appended, hrefused}
for _, i in ipairs(refused) do out[#out + 1] = i end
return out
"#;

/// KEYS[1]: state hash, KEYS[2]: the market's topic; ARGV[1]: the publish
/// command. Publishes the stored state, if any (an announce).
const ANNOUNCE_SCRIPT: &str = r#"
local m = redis.call('HGET', KEYS[1], 'msg')
if m then
  redis.call(ARGV[1], KEYS[2], m)
  return 1
end
return 0
"#;

/// The Redis command that publishes to a market's topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PublishCommand {
    /// Classic pub/sub: every message reaches every node's subscribers
    /// (standalone Redis).
    #[default]
    Publish,
    /// Sharded pub/sub (Redis ≥ 7): the message stays in the topic's slot,
    /// for Redis Cluster, where classic `PUBLISH` is broadcast cluster-wide.
    SPublish,
}

impl PublishCommand {
    /// The command's name, as passed to the scripts.
    pub fn as_str(self) -> &'static str {
        match self {
            PublishCommand::Publish => "PUBLISH",
            PublishCommand::SPublish => "SPUBLISH",
        }
    }
}

/// Default largest version jump over a market's stored version (2^40 ≈
/// 1.1 × 10^12): far above any real gap (offset-derived versions advance
/// by the partition's record count, millisecond timestamps by 35 years'
/// worth), far below 2^53 − 1, so one bogus record cannot jump a market to
/// the largest version and freeze it. See docs/security.md.
pub const DEFAULT_MAX_VERSION_JUMP: u64 = 1 << 40;

/// An update Redis refused because its version jumps too far ahead of the
/// stored one: it is dead-lettered (`version_jump`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jumped {
    /// Market id (the record key).
    pub market: Arc<str>,
    /// The refused version.
    pub version: u64,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// The update as encoded (the dead letter's value).
    pub message: Vec<u8>,
}

/// What a batch did in Redis.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Updates newer than the stored state, written.
    pub applied: u64,
    /// Updates not newer than the stored state, dropped.
    pub stale: u64,
    /// Updates refused as jumping too far ahead (to be dead-lettered).
    pub jumped: Vec<Jumped>,
    /// Markets whose state an operator reset deleted.
    pub reset: u64,
    /// Messages published: applied updates of watched markets plus
    /// announces that found a stored state (one per market, never per channel).
    pub published: u64,
    /// Applied updates of history markets appended to their stream.
    pub history_appended: u64,
    /// Applied updates of history markets whose stream refused the entry
    /// (it held a newer id: its state was deleted by hand, not its history).
    pub history_refused: u64,
    /// Cluster masters whose `WAIT` saw no replica acknowledge the batch in
    /// [`REPLICA_WAIT_TIMEOUT`] (the batch was accepted anyway).
    pub unreplicated: u64,
    /// The pipeline's data epoch as the batch's pipeline read it, before its
    /// writes (see [`streampipe_contract::epoch`]).
    pub epoch: EpochRead,
}

/// What a read of the epoch key found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum EpochRead {
    /// The batch had no Redis command, so nothing was read.
    #[default]
    NotRead,
    /// The key is gone.
    Missing,
    /// The key holds this id.
    Is(String),
    /// The key holds this id, but a cluster marker of it is gone (see
    /// [`streampipe_contract::epoch::Found::Damaged`]).
    Damaged(String),
}

impl EpochRead {
    /// The id read, if the key was read and exists.
    pub fn id(&self) -> Option<&str> {
        match self {
            EpochRead::Is(id) | EpochRead::Damaged(id) => Some(id),
            _ => None,
        }
    }
}

/// Most commands per pipeline when a partition's subscriptions are written
/// back after a loss: bounds the reply buffers on both sides while a
/// partition of 100 000s of subscriptions still costs few round trips.
pub const WRITE_BACK_CHUNK: usize = 10_000;

/// Where the store talks to: one Redis, or a Redis Cluster.
enum Backend {
    /// Boxed: with TLS compiled in, a client carries its TLS parameters.
    Single(Box<Client>),
    /// A client per rotation of the seed list, and the one the next
    /// connection uses (see [`RedisStore::open`]).
    Cluster {
        clients: Vec<ClusterClient>,
        next: usize,
    },
}

/// An open connection of either kind.
enum Conn {
    Single(Connection),
    Cluster {
        /// Boxed: it is several times the size of a single connection.
        conn: Box<ClusterConnection>,
        /// Slot ranges `(first, last, master node id)`, to send one `WAIT`
        /// per master rather than per slot; read at connect time (a failover
        /// keeps the ranges, it only renames their master, and any error
        /// reconnects and rereads them).
        ranges: Vec<(u16, u16, String)>,
    },
}

impl Conn {
    fn as_like(&mut self) -> &mut dyn redis::ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster { conn, .. } => conn.as_mut(),
        }
    }
}

/// A Redis connection plus the pipeline's key schema and scripts.
pub struct RedisStore {
    backend: Backend,
    /// Connect and I/O timeout of a single Redis' connection (a cluster
    /// client carries its own, set when it is built).
    timeout: Duration,
    conn: Option<Conn>,
    keys: Keys,
    publish: PublishCommand,
    update: Script,
    announce: Script,
    max_version_jump: u64,
    history: History,
}

/// One queued command whose reply the outcome needs.
enum Reply<'e> {
    /// An update script call over these updates.
    Updates(Vec<&'e Effect>),
    /// A market reset (`DEL` of its state).
    Reset,
    /// An announce script call.
    Announce,
    /// The `GET` of the epoch key that opens every batch.
    Epoch,
}

impl RedisStore {
    /// Opens a store; the connection itself is made lazily and remade after errors.
    pub fn new(url: &str, keys: Keys) -> Result<Self> {
        Self::new_tls(url, keys, None)
    }

    /// Opens a store on a `rediss://` URL with these CAs and client
    /// certificate (`None`: a plain URL, or TLS with the system's CAs).
    pub fn new_tls(url: &str, keys: Keys, tls: Option<&RedisTlsPem>) -> Result<Self> {
        Self::open(url, false, keys, tls, REDIS_TIMEOUT)
    }

    /// Opens a store on one Redis or (`cluster`) a Redis Cluster seed list,
    /// whose connects and replies time out after `timeout`.
    pub fn open(
        url: &str,
        cluster: bool,
        keys: Keys,
        tls: Option<&RedisTlsPem>,
        timeout: Duration,
    ) -> Result<Self> {
        if cluster {
            return Self::cluster(url, keys, tls, timeout);
        }
        let client = match tls {
            Some(t) => Client::build_with_tls(url, certificates(t))?,
            None => Client::open(url)?,
        };
        Ok(Self::with_backend(
            Backend::Single(Box::new(client)),
            keys,
            timeout,
        ))
    }

    /// Opens a store on a Redis Cluster; `seeds` is a comma-separated list of
    /// node URLs (any reachable one is enough to discover the rest). Topics
    /// are published with `SPUBLISH`.
    pub fn new_cluster(seeds: &str, keys: Keys) -> Result<Self> {
        Self::new_cluster_tls(seeds, keys, None)
    }

    /// [`RedisStore::new_cluster`] over TLS (`rediss://` seeds).
    pub fn new_cluster_tls(seeds: &str, keys: Keys, tls: Option<&RedisTlsPem>) -> Result<Self> {
        Self::cluster(seeds, keys, tls, REDIS_TIMEOUT)
    }

    fn cluster(
        seeds: &str,
        keys: Keys,
        tls: Option<&RedisTlsPem>,
        timeout: Duration,
    ) -> Result<Self> {
        // A client per rotation of the seed list (see `seed_rotations`):
        // after an error the next connection starts from the next seed.
        let clients = seed_rotations(seeds)
            .into_iter()
            .map(|rotated| {
                let mut builder = ClusterClient::builder(rotated)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(CLUSTER_RETRIES);
                if let Some(t) = tls {
                    builder = builder.certs(certificates(t));
                }
                builder.build()
            })
            .collect::<redis::RedisResult<Vec<_>>>()?;
        Ok(
            Self::with_backend(Backend::Cluster { clients, next: 0 }, keys, timeout)
                .with_publish_command(PublishCommand::SPublish),
        )
    }

    fn with_backend(backend: Backend, keys: Keys, timeout: Duration) -> Self {
        RedisStore {
            backend,
            timeout,
            conn: None,
            keys,
            publish: PublishCommand::default(),
            update: Script::new(UPDATE_SCRIPT),
            announce: Script::new(ANNOUNCE_SCRIPT),
            max_version_jump: DEFAULT_MAX_VERSION_JUMP,
            history: History::off(),
        }
    }

    /// Chooses which markets keep an event history, and its cap.
    pub fn with_history(mut self, history: History) -> Self {
        self.history = history;
        self
    }

    /// Sets the largest version jump accepted over a stored version.
    pub fn with_max_version_jump(mut self, jump: u64) -> Self {
        self.max_version_jump = jump;
        self
    }

    /// Whether this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster { .. })
    }

    /// Chooses the publish command (`PUBLISH` unless told otherwise).
    pub fn with_publish_command(mut self, publish: PublishCommand) -> Self {
        self.publish = publish;
        self
    }

    fn conn(&mut self) -> Result<&mut Conn> {
        if self.conn.is_none() {
            let mut c = match &self.backend {
                Backend::Single(client) => {
                    let c = client.get_connection_with_timeout(self.timeout)?;
                    c.set_read_timeout(Some(self.timeout))?;
                    c.set_write_timeout(Some(self.timeout))?;
                    Conn::Single(c)
                }
                Backend::Cluster { clients, next } => {
                    let mut conn = Box::new(clients[*next].get_connection()?);
                    let ranges = master_ranges(&mut conn)?;
                    Conn::Cluster { conn, ranges }
                }
            };
            // Load scripts on every new connection: a restarted Redis forgot
            // them. On a cluster redis-rs sends SCRIPT LOAD to every master;
            // a replica promoted later does not have them, so its NOSCRIPT
            // fails the batch, which drops this connection, and the retry
            // reconnects and loads them again.
            self.update.prepare_invoke().load(c.as_like())?;
            self.announce.prepare_invoke().load(c.as_like())?;
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// After a failure, a cluster's next connection starts from the next seed.
    fn next_seed(&mut self) {
        if let Backend::Cluster { clients, next } = &mut self.backend {
            *next = (*next + 1) % clients.len();
        }
    }

    /// Runs `f` on the connection; on any error the connection is dropped so
    /// the next call reconnects (and reloads the scripts).
    fn with_conn<T>(&mut self, f: impl FnOnce(&mut Conn) -> redis::RedisResult<T>) -> Result<T> {
        let res = self.conn().and_then(|c| Ok(f(c)?));
        if res.is_err() {
            self.conn = None;
            self.next_seed();
        }
        res
    }

    /// Checks that Redis answers (for readiness).
    pub fn ping(&mut self) -> Result<()> {
        self.with_conn(|c| match c {
            Conn::Single(c) => redis::cmd("PING").query::<String>(c).map(|_| ()),
            Conn::Cluster { conn, .. } => conn
                .route_command(
                    &redis::cmd("PING"),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
                )
                .map(|_| ()),
        })
    }

    /// Queues one update script call over `updates` (all `Effect::Update`).
    fn queue_updates<'e>(&self, batch: &mut Batch<'e>, updates: Vec<&'e Effect>) {
        let mut cmd = redis::cmd("EVALSHA");
        let mut streams: Vec<String> = Vec::new();
        let mut stream_of: Vec<usize> = Vec::with_capacity(updates.len());
        for e in &updates {
            if let Effect::Update { market, .. } = e {
                if self.history.applies(market) {
                    streams.push(self.keys.market_history(market));
                    stream_of.push(updates.len() + streams.len());
                } else {
                    stream_of.push(0);
                }
            }
        }
        cmd.arg(self.update.get_hash())
            .arg(updates.len() + streams.len());
        for e in &updates {
            if let Effect::Update { market, .. } = e {
                let key = self.keys.market_state(market);
                batch.touch(&key);
                cmd.arg(key);
            }
        }
        cmd.arg(&streams);
        cmd.arg(self.publish.as_str())
            .arg(self.max_version_jump)
            .arg(self.history.max_len());
        for (e, h) in updates.iter().zip(&stream_of) {
            if let Effect::Update {
                market,
                version,
                ts,
                message,
                watched,
                ..
            } = e
            {
                cmd.arg(*version).arg(*ts).arg(message.as_slice());
                if *watched {
                    cmd.arg(self.keys.market_topic(market));
                } else {
                    cmd.arg("");
                }
                cmd.arg(*h);
            }
        }
        batch.push(cmd, Some(Reply::Updates(updates)));
    }

    /// Queues an announce of `market`'s stored state to its topic.
    fn queue_announce(&self, batch: &mut Batch<'_>, market: &str) {
        let key = self.keys.market_state(market);
        batch.touch(&key);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.announce.get_hash())
            .arg(2)
            .arg(key)
            .arg(self.keys.market_topic(market))
            .arg(self.publish.as_str());
        batch.push(cmd, Some(Reply::Announce));
    }

    /// Queues a single-key set command whose reply does not matter.
    fn queue_set(batch: &mut Batch<'_>, op: &str, key: String, member: &str) {
        batch.touch(&key);
        let mut cmd = redis::cmd(op);
        cmd.arg(key).arg(member);
        batch.push(cmd, None);
    }

    /// Queues a market's changed query matches: its match set, then the
    /// query markets of each channel that gained or lost it and a `markets`
    /// notice on that channel's topic (publishers re-read the channel and
    /// send the state of what it gained), then an announce when the match
    /// made the market watched. Idempotent, like every effect.
    fn queue_query_match(
        &self,
        batch: &mut Batch<'_>,
        partition: i32,
        market: &str,
        matched: &[Arc<str>],
        (joined, left): (&[Arc<str>], &[Arc<str>]),
        market_now_watched: bool,
    ) {
        let k = &self.keys;
        let index = k.partition_query_matches(partition);
        batch.touch(&index);
        let cmd = if matched.is_empty() {
            let mut c = redis::cmd("HDEL");
            c.arg(&index).arg(market);
            c
        } else {
            let set: Vec<&str> = matched.iter().map(|q| &**q).collect();
            let mut c = redis::cmd("HSET");
            c.arg(&index).arg(market).arg(set.join("\n"));
            c
        };
        batch.push(cmd, None);
        for (op, channels) in [("SADD", joined), ("SREM", left)] {
            for c in channels {
                Self::queue_set(batch, op, k.channel_query_markets(c), market);
                let topic = k.channel_topic(c);
                batch.touch(&topic);
                let mut publish = redis::cmd(self.publish.as_str());
                publish.arg(topic).arg(CHANNEL_MARKETS_CHANGED);
                batch.push(publish, None);
            }
        }
        if market_now_watched {
            self.queue_announce(batch, market);
        }
    }

    /// Carries out `effects` in order, in one pipeline. Dead-letter and
    /// skip effects are not Redis' business and are ignored here.
    pub fn execute(&mut self, effects: &[Effect]) -> Result<Outcome> {
        let cluster = self.is_cluster();
        let mut batch = Batch::default();
        let mut i = 0;
        while i < effects.len() {
            match &effects[i] {
                Effect::Update { .. } => {
                    let start = i;
                    while i < effects.len() && matches!(effects[i], Effect::Update { .. }) {
                        i += 1;
                    }
                    let run: Vec<&Effect> = effects[start..i].iter().collect();
                    for call in update_calls(&run, &self.keys, cluster) {
                        self.queue_updates(&mut batch, call);
                    }
                    continue;
                }
                Effect::Subscribe {
                    partition,
                    market,
                    channel,
                    market_now_watched,
                } => {
                    let k = &self.keys;
                    Self::queue_set(&mut batch, "SADD", k.market_channels(market), channel);
                    Self::queue_set(&mut batch, "SADD", k.channel_markets(channel), market);
                    Self::queue_set(&mut batch, "SADD", k.partition_markets(*partition), market);
                    // Updates stored while nobody watched were not published;
                    // a publisher that read the state before this point must
                    // still get the latest one, so publish it now.
                    if *market_now_watched {
                        self.queue_announce(&mut batch, market);
                    }
                }
                Effect::Unsubscribe {
                    partition,
                    market,
                    channel,
                    market_now_empty,
                } => {
                    // Redis deletes a set when its last member goes, so no
                    // empty key is ever left behind for the channel or market.
                    let k = &self.keys;
                    Self::queue_set(&mut batch, "SREM", k.market_channels(market), channel);
                    Self::queue_set(&mut batch, "SREM", k.channel_markets(channel), market);
                    if *market_now_empty {
                        Self::queue_set(
                            &mut batch,
                            "SREM",
                            k.partition_markets(*partition),
                            market,
                        );
                    }
                }
                Effect::Announce { market } => {
                    self.queue_announce(&mut batch, market);
                }
                Effect::ResetMarket { market } => {
                    let key = self.keys.market_state(market);
                    batch.touch(&key);
                    // The history goes with the state: the next version may
                    // be lower than its entries (one slot: same hash tag).
                    let mut cmd = redis::cmd("DEL");
                    cmd.arg(key).arg(self.keys.market_history(market));
                    batch.push(cmd, Some(Reply::Reset));
                }
                Effect::QueryHeld {
                    partition,
                    channel,
                    query,
                    held,
                } => {
                    let op = if *held { "SADD" } else { "SREM" };
                    let pair = format!("{channel} {query}");
                    Self::queue_set(
                        &mut batch,
                        op,
                        self.keys.partition_queries(*partition),
                        &pair,
                    );
                }
                Effect::QueryMatch {
                    partition,
                    market,
                    matched,
                    joined,
                    left,
                    market_now_watched,
                } => self.queue_query_match(
                    &mut batch,
                    *partition,
                    market,
                    matched,
                    (joined, left),
                    *market_now_watched,
                ),
                Effect::DeadLetter { .. } | Effect::Skipped(_) => {}
            }
            i += 1;
        }
        if batch.cmds.is_empty() {
            return Ok(Outcome::default());
        }
        // Read the epoch before the writes, in the same round trip: the
        // consumer stores no offset of a batch that went to a Redis which
        // lost its data until the reducer wrote its subscriptions back.
        let mut get = redis::cmd("GET");
        get.arg(self.keys.epoch());
        batch.cmds.insert(0, get);
        batch.wanted.insert(0, true);
        batch.replies.insert(0, Reply::Epoch);
        let (values, unreplicated) = self.with_conn(|c| batch.run(c))?;
        let mut out = Outcome {
            unreplicated,
            ..Outcome::default()
        };
        for (reply, value) in batch.replies.iter().zip(values) {
            match reply {
                Reply::Updates(updates) => {
                    let r: Vec<u64> =
                        redis::from_redis_value(value).map_err(redis::RedisError::from)?;
                    let (applied, published) = (r[0], r[1]);
                    out.history_appended += r[2];
                    out.history_refused += r[3];
                    let refused = &r[4..];
                    out.applied += applied;
                    out.stale += updates.len() as u64 - applied - refused.len() as u64;
                    out.published += published;
                    for &i in refused {
                        if let Some(Effect::Update {
                            market,
                            version,
                            message,
                            partition,
                            offset,
                            ..
                        }) = updates.get(i as usize - 1)
                        {
                            out.jumped.push(Jumped {
                                market: market.clone(),
                                version: *version,
                                partition: *partition,
                                offset: *offset,
                                message: message.clone(),
                            });
                        }
                    }
                }
                Reply::Reset => out.reset += 1,
                Reply::Epoch => {
                    let id: Option<String> =
                        redis::from_redis_value(value).map_err(redis::RedisError::from)?;
                    out.epoch = id.map_or(EpochRead::Missing, EpochRead::Is);
                }
                Reply::Announce => {
                    let n: u64 = redis::from_redis_value(value).map_err(redis::RedisError::from)?;
                    out.published += n;
                }
            }
        }
        Ok(out)
    }
}

/// The commands of one batch, the replies the outcome needs, and the hash
/// slots of every key written (for the cluster's `WAIT`s).
#[derive(Default)]
struct Batch<'e> {
    cmds: Vec<Cmd>,
    /// Per command: whether its reply is wanted (in order with `replies`).
    wanted: Vec<bool>,
    replies: Vec<Reply<'e>>,
    slots: BTreeSet<u16>,
}

impl<'e> Batch<'e> {
    fn push(&mut self, cmd: Cmd, reply: Option<Reply<'e>>) {
        self.wanted.push(reply.is_some());
        self.replies.extend(reply);
        self.cmds.push(cmd);
    }

    fn touch(&mut self, key: &str) {
        self.slots.insert(slot(key.as_bytes()));
    }

    /// Sends the batch as one pipeline; on a cluster then waits for a
    /// replica of each master written to. Returns the wanted replies and the
    /// number of masters no replica acknowledged in time.
    fn run(&self, conn: &mut Conn) -> redis::RedisResult<(Vec<Value>, u64)> {
        match conn {
            Conn::Single(c) => {
                let mut pipe = redis::pipe();
                for (cmd, wanted) in self.cmds.iter().zip(&self.wanted) {
                    pipe.add_command(cmd.clone());
                    if !wanted {
                        pipe.ignore();
                    }
                }
                Ok((pipe.query(c)?, 0))
            }
            Conn::Cluster { conn, ranges } => {
                let mut pipe = redis::cluster::cluster_pipe();
                for (cmd, wanted) in self.cmds.iter().zip(&self.wanted) {
                    pipe.add_command(cmd.clone());
                    if !wanted {
                        pipe.ignore();
                    }
                }
                let values: Vec<Value> = pipe.query(conn)?;
                // WAIT counts the writes of this client connection, which is
                // the one the pipeline used for that master. Routed by slot,
                // so after a failover it reaches the promoted replica.
                let mut unreplicated = 0;
                for s in one_slot_per_master(&self.slots, ranges) {
                    let replicas: i64 = redis::from_redis_value(
                        conn.route_command(
                            redis::cmd("WAIT")
                                .arg(1)
                                .arg(REPLICA_WAIT_TIMEOUT.as_millis() as u64),
                            RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                                Route::new(s, SlotAddr::Master),
                            )),
                        )?,
                    )?;
                    if replicas < 1 {
                        unreplicated += 1;
                    }
                }
                Ok((values, unreplicated))
            }
        }
    }
}

/// redis-rs' form of the TLS material (CA bundle, client certificate).
fn certificates(t: &RedisTlsPem) -> TlsCertificates {
    TlsCertificates {
        client_tls: t.client.as_ref().map(|(cert, key)| ClientTlsConfig {
            client_cert: cert.clone(),
            client_key: key.clone(),
        }),
        root_cert: t.ca.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn update(market: &str, version: u64) -> Effect {
        Effect::Update {
            market: market.into(),
            version,
            ts: 0,
            message: Vec::new(),
            watched: false,
            partition: 0,
            offset: 0,
        }
    }

    fn summary(calls: &[Vec<&Effect>]) -> Vec<Vec<(String, u64)>> {
        calls
            .iter()
            .map(|c| {
                c.iter()
                    .map(|e| match e {
                        Effect::Update {
                            market, version, ..
                        } => (market.to_string(), *version),
                        _ => unreachable!(),
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn standalone_calls_keep_the_run_in_order_and_chunk_it() {
        let keys = Keys::new("t");
        let effects: Vec<Effect> = (0..300).map(|i| update(&format!("m{i}"), 1)).collect();
        let run: Vec<&Effect> = effects.iter().collect();
        let calls = update_calls(&run, &keys, false);
        assert_eq!(
            calls.iter().map(Vec::len).collect::<Vec<_>>(),
            [
                UPDATE_SCRIPT_CHUNK,
                UPDATE_SCRIPT_CHUNK,
                300 - 2 * UPDATE_SCRIPT_CHUNK
            ]
        );
        let flat: Vec<_> = summary(&calls).concat();
        assert_eq!(flat[0].0, "m0");
        assert_eq!(flat[299].0, "m299");
    }

    #[test]
    fn cluster_calls_are_single_slot_chunked_and_keep_each_markets_order() {
        let keys = Keys::new("t");
        // 1000 updates over 50 markets, each market's versions rising.
        let effects: Vec<Effect> = (0..1000)
            .map(|i| update(&format!("m{}", i % 50), i as u64))
            .collect();
        let run: Vec<&Effect> = effects.iter().collect();
        let calls = update_calls(&run, &keys, true);
        let slot_of = |m: &str| slot(keys.market_state(m).as_bytes());
        let mut seen = 0;
        let mut last: BTreeMap<String, u64> = BTreeMap::new();
        for call in summary(&calls) {
            assert!(!call.is_empty() && call.len() <= UPDATE_SCRIPT_CHUNK);
            let s = slot_of(&call[0].0);
            assert!(
                call.iter().all(|(m, _)| slot_of(m) == s),
                "one slot per call"
            );
            for (m, v) in call {
                let prev = last.insert(m.clone(), v);
                assert!(prev.is_none_or(|p| p < v), "{m}: order kept");
                seen += 1;
            }
        }
        assert_eq!(seen, 1000);
        // A slot group bigger than a chunk is split: one market, 300 updates.
        let effects: Vec<Effect> = (0..300).map(|i| update("hot", i)).collect();
        let run: Vec<&Effect> = effects.iter().collect();
        assert_eq!(update_calls(&run, &keys, true).len(), 3);
    }

    #[test]
    fn one_wait_per_master() {
        let ranges = vec![
            (0, 5460, "a".to_string()),
            (5461, 10922, "b".to_string()),
            (10923, 16383, "c".to_string()),
        ];
        let slots: BTreeSet<u16> = [1, 2, 6000, 7000, 16000].into_iter().collect();
        assert_eq!(one_slot_per_master(&slots, &ranges), [1, 6000, 16000]);
        // Unknown topology: every slot waits on its own.
        assert_eq!(one_slot_per_master(&slots, &[]), [1, 2, 6000, 7000, 16000]);
    }
}
