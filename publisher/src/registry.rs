//! Channel registry and market state in Redis, for the control API.
//!
//! The registry set (`sp:<p>:{c:<id>}:reg`) holds the markets a channel
//! asked for. The control API writes it *before* producing the commands, so
//! any publisher pod can answer `begin`, add, remove and close for the
//! channel at once, while the reducers apply the commands asynchronously.
//! Reducers own the `m2c`/`c2m` maps; this module never writes them.

use bytes::Bytes;
use futures_util::future::join_all;
use prometheus::IntCounter;
use redis::aio::ConnectionManager;
use redis::{Cmd, Value};
use streampipe_contract::deploy::RedisTlsPem;
use streampipe_contract::epoch::{mint, Found, EPOCH_CLAIM_SCRIPT, SPREAD_SUFFIX};
use streampipe_contract::slot::SPREAD_TAGS;
use streampipe_contract::{Keys, CHANNEL_CLOSED, CHANNEL_MARKETS_CHANGED};

use crate::error::Result;
use crate::redis_conn::{certificates, Conn, Healing};

/// KEYS[1]: the janitor lock; ARGV[1]: our token. Deletes the lock only if
/// we hold it (another pod may have taken it after ours expired).
const UNLOCK_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// KEYS[1]: a channel's registry set; ARGV[1]: the cap; ARGV[2..]: markets.
/// Adds the markets the set lacks unless that would take it past the cap,
/// in one step, so concurrent adds cannot overshoot it together. Returns
/// the markets it added, or -1 (nothing added) past the cap. One key: valid
/// on Redis Cluster.
const ADD_CAPPED_SCRIPT: &str = r#"
local new = {}
for i = 2, #ARGV do
  if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 0 then
    new[#new + 1] = ARGV[i]
  end
end
if redis.call('SCARD', KEYS[1]) + #new > tonumber(ARGV[1]) then
  return -1
end
if #new > 0 then
  redis.call('SADD', KEYS[1], unpack(new))
end
return new
"#;

/// KEYS[1]: a client's channel set; ARGV[1]: cap; ARGV[2]: now (Unix s);
/// ARGV[3]: prune entries older than this; ARGV[4]: the channel. Adds the
/// channel unless the client already holds `cap`; 1 added, 0 refused. One
/// key: atomic, Cluster-safe.
const CLAIM_SCRIPT: &str = r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
return 1
"#;

/// What [`Registry::add_capped`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Added {
    /// These markets were new to the channel and are now in its registry.
    Added(Vec<String>),
    /// Adding them would pass the cap; nothing was added.
    OverCap,
}

/// Redis access of the control API. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    conn: Conn,
    keys: Keys,
    /// `PUBLISH`, or `SPUBLISH` on a cluster (channel topics are sharded there).
    publish: &'static str,
}

impl Registry {
    /// Connects (the connection reconnects by itself after errors). With
    /// `cluster`, `url` is a comma-separated list of seed node URLs, and
    /// `rebuilds` counts the times the cluster connection was replaced
    /// (see [`crate::redis_conn`]); `tls` is the CA bundle and client
    /// certificate of `rediss://` URLs.
    pub async fn connect(
        url: &str,
        keys: Keys,
        cluster: bool,
        tls: Option<&RedisTlsPem>,
        rebuilds: IntCounter,
    ) -> Result<Self> {
        let (conn, publish) = if cluster {
            (
                Conn::Cluster(Healing::connect(url, tls, rebuilds).await?),
                "SPUBLISH",
            )
        } else {
            let client = match tls {
                Some(t) => redis::Client::build_with_tls(url, certificates(t))?,
                None => redis::Client::open(url)?,
            };
            (
                Conn::Single(ConnectionManager::new(client).await?),
                "PUBLISH",
            )
        };
        Ok(Registry {
            conn,
            keys,
            publish,
        })
    }

    /// Checks Redis answers.
    pub async fn ping(&self) -> Result<()> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    /// Adds markets to a channel's registry; returns how many it now has.
    pub async fn add(&self, channel: &str, markets: &[String]) -> Result<usize> {
        let mut c = self.conn.clone();
        let key = self.keys.channel_registry(channel);
        let (n,): (usize,) = redis::pipe()
            .cmd("SADD")
            .arg(&key)
            .arg(markets)
            .ignore()
            .cmd("SCARD")
            .arg(&key)
            .query_async(&mut c)
            .await?;
        Ok(n)
    }

    /// Adds those of `markets` the channel lacks, unless it would then have
    /// more than `cap` — checked and added in one step.
    pub async fn add_capped(&self, channel: &str, markets: &[String], cap: usize) -> Result<Added> {
        let mut c = self.conn.clone();
        let script = redis::Script::new(ADD_CAPPED_SCRIPT);
        let mut call = script.prepare_invoke();
        call.key(self.keys.channel_registry(channel)).arg(cap);
        for m in markets {
            call.arg(m);
        }
        let v: redis::Value = call.invoke_async(&mut c).await?;
        Ok(match v {
            redis::Value::Int(-1) => Added::OverCap,
            redis::Value::Array(items) => Added::Added(
                items
                    .into_iter()
                    .filter_map(|i| match i {
                        redis::Value::BulkString(b) => String::from_utf8(b).ok(),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => Added::Added(Vec::new()),
        })
    }

    /// Whether the channel's registry holds `market`.
    pub async fn has(&self, channel: &str, market: &str) -> Result<bool> {
        let mut c = self.conn.clone();
        let n: bool = redis::cmd("SISMEMBER")
            .arg(self.keys.channel_registry(channel))
            .arg(market)
            .query_async(&mut c)
            .await?;
        Ok(n)
    }

    /// The markets of a channel; `None` when the channel is unknown.
    ///
    /// A channel exists from its creation until it is closed (`DELETE` or the
    /// janitor), markets or not: Redis deletes an emptied set, so a channel
    /// whose last market was removed is recognised by its entry in the
    /// janitor's set, which only a close removes. It answers `Some([])` and
    /// can still be closed, streamed, begun and given markets again.
    pub async fn markets(&self, channel: &str) -> Result<Option<Vec<String>>> {
        let mut c = self.conn.clone();
        let mut v: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.channel_registry(channel))
            .query_async(&mut c)
            .await?;
        if v.is_empty() {
            let lease: Option<f64> = redis::cmd("ZSCORE")
                .arg(self.keys.channel_leases())
                .arg(channel)
                .query_async(&mut c)
                .await?;
            return Ok(lease.map(|_| Vec::new()));
        }
        v.sort();
        Ok(Some(v))
    }

    /// What the channel receives: the markets it asked for by name and
    /// those its queries brought (one slot: `SUNION` of the registry and
    /// the query markets); `None` when the channel is unknown, as
    /// [`Registry::markets`].
    pub async fn received(&self, channel: &str) -> Result<Option<Vec<String>>> {
        let mut c = self.conn.clone();
        let mut v: Vec<String> = redis::cmd("SUNION")
            .arg(self.keys.channel_registry(channel))
            .arg(self.keys.channel_query_markets(channel))
            .query_async(&mut c)
            .await?;
        if v.is_empty() {
            return self.markets(channel).await;
        }
        v.sort();
        Ok(Some(v))
    }

    /// The channel's queries (canonical), sorted.
    pub async fn queries(&self, channel: &str) -> Result<Vec<String>> {
        let mut c = self.conn.clone();
        let mut v: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.channel_queries(channel))
            .query_async(&mut c)
            .await?;
        v.sort();
        Ok(v)
    }

    /// Adds `query` to the channel unless the pipeline would then hold more
    /// than `pipeline_cap` queries or the channel more than `channel_cap`
    /// (each checked and added in one step; the pipeline's entry is taken
    /// back when the channel's cap refuses). `Ok(Err(which))`: a cap refused
    /// it (`"pipeline"` or `"channel"`); `Ok(Ok(new))`: added (`new` false
    /// when it was held).
    pub async fn add_query(
        &self,
        channel: &str,
        query: &str,
        (pipeline_cap, channel_cap): (usize, usize),
    ) -> Result<Result<bool, &'static str>> {
        let mut c = self.conn.clone();
        let script = redis::Script::new(ADD_CAPPED_SCRIPT);
        let pair = format!("{channel} {query}");
        let v: redis::Value = script
            .key(self.keys.pipeline_queries())
            .arg(pipeline_cap)
            .arg(&pair)
            .invoke_async(&mut c)
            .await?;
        if v == redis::Value::Int(-1) {
            return Ok(Err("pipeline"));
        }
        let v: redis::Value = script
            .key(self.keys.channel_queries(channel))
            .arg(channel_cap)
            .arg(query)
            .invoke_async(&mut c)
            .await?;
        match v {
            redis::Value::Int(-1) => {
                let _: () = redis::cmd("SREM")
                    .arg(self.keys.pipeline_queries())
                    .arg(&pair)
                    .query_async(&mut c)
                    .await?;
                Ok(Err("channel"))
            }
            redis::Value::Array(a) => Ok(Ok(!a.is_empty())),
            _ => Ok(Ok(false)),
        }
    }

    /// Removes `query` from the channel (and the pipeline's count); false
    /// when the channel did not hold it.
    pub async fn remove_query(&self, channel: &str, query: &str) -> Result<bool> {
        let mut c = self.conn.clone();
        let n: usize = redis::cmd("SREM")
            .arg(self.keys.channel_queries(channel))
            .arg(query)
            .query_async(&mut c)
            .await?;
        let _: () = redis::cmd("SREM")
            .arg(self.keys.pipeline_queries())
            .arg(format!("{channel} {query}"))
            .query_async(&mut c)
            .await?;
        Ok(n == 1)
    }

    /// Removes one market; false when the channel did not have it.
    pub async fn remove(&self, channel: &str, market: &str) -> Result<bool> {
        let mut c = self.conn.clone();
        let n: usize = redis::cmd("SREM")
            .arg(self.keys.channel_registry(channel))
            .arg(market)
            .query_async(&mut c)
            .await?;
        Ok(n == 1)
    }

    /// Counts a new channel against `client`'s cap (entries older than
    /// `forget_after` are dropped first, in case their close was lost);
    /// false when the client already holds `cap` channels.
    pub async fn claim_channel(
        &self,
        client: &str,
        channel: &str,
        cap: usize,
        forget_after: std::time::Duration,
    ) -> Result<bool> {
        let now = unix_now();
        let mut c = self.conn.clone();
        let added: i64 = redis::Script::new(CLAIM_SCRIPT)
            .key(self.keys.client_channels(client))
            .arg(cap)
            .arg(now)
            .arg(now.saturating_sub(forget_after.as_secs()))
            .arg(channel)
            .invoke_async(&mut c)
            .await?;
        if added == 1 {
            let _: () = redis::cmd("SET")
                .arg(self.keys.channel_client(channel))
                .arg(client)
                .query_async(&mut c)
                .await?;
        }
        Ok(added == 1)
    }

    /// Binds a new channel to its owner's subject.
    pub async fn set_owner(&self, channel: &str, subject: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = redis::cmd("SET")
            .arg(self.keys.channel_owner(channel))
            .arg(subject)
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Writes channel owners back after a data loss (`SET NX`: an owner
    /// another pod already wrote back is never replaced).
    pub async fn restore_owners(&self, owners: &[(String, String)]) -> Result<()> {
        let cmds = owners
            .iter()
            .map(|(channel, subject)| {
                let mut c = redis::cmd("SET");
                c.arg(self.keys.channel_owner(channel))
                    .arg(subject)
                    .arg("NX");
                c
            })
            .collect();
        let _: Vec<redis::Value> = self.run_all(cmds).await?;
        Ok(())
    }

    /// The subject owning a channel (`None`: nobody, an anonymous channel).
    pub async fn owner(&self, channel: &str) -> Result<Option<String>> {
        let mut c = self.conn.clone();
        Ok(redis::cmd("GET")
            .arg(self.keys.channel_owner(channel))
            .query_async(&mut c)
            .await?)
    }

    /// Stores a one-time SSE ticket for `ttl`; `value` is what
    /// [`Registry::take_ticket`] gives back.
    pub async fn put_ticket(
        &self,
        channel: &str,
        ticket: &str,
        value: &str,
        ttl: std::time::Duration,
    ) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = redis::cmd("SET")
            .arg(self.keys.channel_ticket(channel, ticket))
            .arg(value)
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Takes a ticket (it works once: `GETDEL`); `None` when unknown,
    /// expired or already used.
    pub async fn take_ticket(&self, channel: &str, ticket: &str) -> Result<Option<String>> {
        let mut c = self.conn.clone();
        Ok(redis::cmd("GETDEL")
            .arg(self.keys.channel_ticket(channel, ticket))
            .query_async(&mut c)
            .await?)
    }

    /// Deletes the registry and tells every pod's connections of the channel
    /// that it is closed (a control message on the channel's pub/sub).
    pub async fn delete(&self, channel: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let client: Option<String> = redis::cmd("GET")
            .arg(self.keys.channel_client(channel))
            .query_async(&mut c)
            .await?;
        if let Some(client) = client {
            let _: () = redis::cmd("ZREM")
                .arg(self.keys.client_channels(&client))
                .arg(channel)
                .query_async(&mut c)
                .await?;
        }
        let mut del = redis::cmd("DEL");
        del.arg(self.keys.channel_registry(channel))
            .arg(self.keys.channel_queries(channel))
            .arg(self.keys.channel_query_markets(channel))
            .arg(self.keys.channel_owner(channel))
            .arg(self.keys.channel_client(channel));
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(self.keys.channel_leases()).arg(channel);
        let mut closed = redis::cmd(self.publish);
        closed
            .arg(self.keys.channel_topic(channel))
            .arg(CHANNEL_CLOSED);
        let _: Vec<redis::Value> = self.run_all(vec![del, zrem, closed]).await?;
        Ok(())
    }

    /// Reads the history of each `(market, after, count)`: at most `count`
    /// entries with versions above `after`, oldest first (raw `XRANGE`
    /// replies; see [`crate::history::parse_entries`]).
    pub async fn history_after(&self, reads: &[(String, u64, usize)]) -> Result<Vec<Value>> {
        let cmds = reads
            .iter()
            .map(|(m, after, count)| {
                let mut c = redis::cmd("XRANGE");
                c.arg(self.keys.market_history(m))
                    .arg(format!(
                        "({}",
                        streampipe_contract::history::entry_id(*after)
                    ))
                    .arg("+")
                    .arg("COUNT")
                    .arg(*count);
                c
            })
            .collect();
        self.run_all(cmds).await
    }

    /// The newest `count` history entries of each market, newest first
    /// (`XREVRANGE key + - COUNT count`: a resume by time).
    pub async fn history_latest(&self, reads: &[(String, usize)]) -> Result<Vec<Value>> {
        let cmds = reads
            .iter()
            .map(|(m, count)| {
                let mut c = redis::cmd("XREVRANGE");
                c.arg(self.keys.market_history(m))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(*count);
                c
            })
            .collect();
        self.run_all(cmds).await
    }

    /// The markets matching the held query `canonical` now, sorted: read
    /// from the reducers' per-partition match hashes (market → the
    /// canonical queries matching it, newline-separated) of `partitions`
    /// partitions. `None` when those hashes hold more than `max_scan`
    /// entries together (the read would cost too much).
    pub async fn query_matches(
        &self,
        canonical: &str,
        partitions: u32,
        max_scan: usize,
    ) -> Result<Option<Vec<String>>> {
        let keys: Vec<String> = (0..partitions as i32)
            .map(|p| self.keys.partition_query_matches(p))
            .collect();
        let lens: Vec<usize> = self
            .run_all(
                keys.iter()
                    .map(|k| {
                        let mut c = redis::cmd("HLEN");
                        c.arg(k);
                        c
                    })
                    .collect(),
            )
            .await?;
        if lens.iter().sum::<usize>() > max_scan {
            return Ok(None);
        }
        let hashes: Vec<Vec<(String, String)>> = self
            .run_all(
                keys.iter()
                    .map(|k| {
                        let mut c = redis::cmd("HGETALL");
                        c.arg(k);
                        c
                    })
                    .collect(),
            )
            .await?;
        let mut out: Vec<String> = hashes
            .into_iter()
            .flatten()
            .filter(|(_, queries)| queries.lines().any(|q| q == canonical))
            .map(|(market, _)| market)
            .collect();
        out.sort_unstable();
        out.dedup();
        Ok(Some(out))
    }

    /// Runs `cmds` and returns their replies in order: one pipeline on a
    /// single Redis; on a cluster, which refuses a pipeline across slots,
    /// each command on its own, concurrently.
    async fn run_all<T: redis::FromRedisValue>(&self, cmds: Vec<Cmd>) -> Result<Vec<T>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match &self.conn {
            Conn::Single(c) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                Ok(pipe.query_async(&mut c.clone()).await?)
            }
            Conn::Cluster(_) => {
                let replies = join_all(cmds.iter().map(|cmd| {
                    let mut c = self.conn.clone();
                    async move { cmd.query_async::<T>(&mut c).await }
                }))
                .await;
                Ok(replies
                    .into_iter()
                    .collect::<redis::RedisResult<Vec<T>>>()?)
            }
        }
    }

    /// Tells every pod holding streams of `channel` that its markets changed
    /// (they re-read the registry and subscribe to what it gained).
    pub async fn notify_markets_changed(&self, channel: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = redis::cmd(self.publish)
            .arg(self.keys.channel_topic(channel))
            .arg(CHANNEL_MARKETS_CHANGED)
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Publishes stored state messages on `channel`'s topic only (a REST
    /// `begin`): every pod delivers them to that channel's streams.
    pub async fn replay(&self, channel: &str, states: &[Bytes]) -> Result<()> {
        if states.is_empty() {
            return Ok(());
        }
        let topic = self.keys.channel_topic(channel);
        let mut pipe = redis::pipe();
        for s in states {
            pipe.cmd(self.publish).arg(&topic).arg(&s[..]).ignore();
        }
        let mut c = self.conn.clone();
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// Marks channels as in use now (their idle clock restarts).
    pub async fn touch(&self, channels: &[String]) -> Result<()> {
        if channels.is_empty() {
            return Ok(());
        }
        let now = unix_now();
        let mut c = self.conn.clone();
        let mut cmd = redis::cmd("ZADD");
        cmd.arg(self.keys.channel_leases());
        for ch in channels {
            cmd.arg(now).arg(ch);
        }
        let _: () = cmd.query_async(&mut c).await?;
        Ok(())
    }

    /// Up to `limit` channels not in use since `before` (Unix seconds).
    pub async fn idle_since(&self, before: u64, limit: usize) -> Result<Vec<String>> {
        let mut c = self.conn.clone();
        let v: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.channel_leases())
            .arg("-inf")
            .arg(before)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut c)
            .await?;
        Ok(v)
    }

    /// One step of a `ZSCAN` over the channel leases from `cursor` (0 to
    /// start): the next cursor (0 when the walk is complete) and the
    /// channels of this step. Every channel leased for the whole walk is
    /// returned at least once, whatever the lease scores do meanwhile.
    pub async fn scan_leases(&self, cursor: u64, count: usize) -> Result<(u64, Vec<String>)> {
        let mut c = self.conn.clone();
        let (next, flat): (u64, Vec<String>) = redis::cmd("ZSCAN")
            .arg(self.keys.channel_leases())
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut c)
            .await?;
        // Members and scores alternate.
        Ok((next, flat.into_iter().step_by(2).collect()))
    }

    /// A channel's markets in the registry and in the reducers' map (one
    /// slot, one round trip).
    pub async fn both_sides(
        &self,
        channel: &str,
    ) -> Result<(
        std::collections::HashSet<String>,
        std::collections::HashSet<String>,
    )> {
        let mut c = self.conn.clone();
        let sides = redis::pipe()
            .cmd("SMEMBERS")
            .arg(self.keys.channel_registry(channel))
            .cmd("SMEMBERS")
            .arg(self.keys.channel_markets(channel))
            .query_async(&mut c)
            .await?;
        Ok(sides)
    }

    /// Markets a channel is subscribed to, from the registry and from the
    /// reducers' channel→markets map (an expired channel may have lost either).
    pub async fn all_markets(&self, channel: &str) -> Result<Vec<String>> {
        let mut c = self.conn.clone();
        let (mut a, b): (Vec<String>, Vec<String>) = redis::pipe()
            .cmd("SMEMBERS")
            .arg(self.keys.channel_registry(channel))
            .cmd("SMEMBERS")
            .arg(self.keys.channel_markets(channel))
            .query_async(&mut c)
            .await?;
        a.extend(b);
        a.sort();
        a.dedup();
        Ok(a)
    }

    /// Takes the janitor lock for `ttl` if nobody holds it.
    pub async fn try_lock(&self, token: &str, ttl: std::time::Duration) -> Result<bool> {
        let mut c = self.conn.clone();
        let r: Option<String> = redis::cmd("SET")
            .arg(self.keys.janitor_lock())
            .arg(token)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut c)
            .await?;
        Ok(r.is_some())
    }

    /// Releases the janitor lock if `token` still holds it, so a pod that
    /// stops does not keep the others from sweeping for a whole period.
    pub async fn unlock(&self, token: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: i64 = redis::Script::new(UNLOCK_SCRIPT)
            .key(self.keys.janitor_lock())
            .arg(token)
            .invoke_async(&mut c)
            .await?;
        Ok(())
    }

    /// Whether this registry talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// The markers of an epoch minted here ([`SPREAD_TAGS`] on a cluster).
    fn epoch_markers(&self) -> Vec<String> {
        let n = if self.is_cluster() {
            SPREAD_TAGS.len()
        } else {
            0
        };
        (0..n).map(|i| self.keys.epoch_marker(i)).collect()
    }

    /// The pipeline's data epoch and, on a cluster, whether its markers
    /// agree (see [`streampipe_contract::epoch`]).
    pub async fn epoch(&self) -> Result<Found> {
        let mut c = self.conn.clone();
        let main: Option<String> = redis::cmd("GET")
            .arg(self.keys.epoch())
            .query_async(&mut c)
            .await?;
        let markers = self.epoch_markers();
        let found: Vec<Option<String>> = if main.is_none() {
            Vec::new()
        } else {
            // run_all: the markers are on every node of a cluster.
            let reads = markers.iter().map(|m| redis::cmd("GET").arg(m).clone());
            self.run_all(reads.collect()).await?
        };
        Ok(Found::from_reads(main, &found))
    }

    /// Mints a new epoch and makes it the pipeline's if the key is missing
    /// or still holds `replacing` (the id found missing or damaged); returns
    /// what it holds afterwards (another component may have replaced it
    /// first). Markers go first, and again with the winner's id.
    pub async fn claim_epoch(&self, replacing: Option<&str>) -> Result<String> {
        let markers = self.epoch_markers();
        let candidate = mint(!markers.is_empty());
        let mut c = self.conn.clone();
        let set_markers = |id: String| {
            let writes = markers
                .iter()
                .map(|m| redis::cmd("SET").arg(m).arg(&id).clone());
            self.run_all::<()>(writes.collect())
        };
        set_markers(candidate.clone()).await?;
        let id: String = redis::Script::new(EPOCH_CLAIM_SCRIPT)
            .key(self.keys.epoch())
            .arg(&candidate)
            .arg(replacing.unwrap_or(""))
            .invoke_async(&mut c)
            .await?;
        if id != candidate && id.ends_with(SPREAD_SUFFIX) {
            set_markers(id.clone()).await?;
        }
        Ok(id)
    }

    /// Writes channels back after Redis lost its data: each one's registry
    /// set (its markets, as this pod holds them) and its janitor entry,
    /// stamped now, so the channel exists again for every pod.
    pub async fn restore(&self, channels: &[(String, Vec<String>)]) -> Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut cmds = Vec::with_capacity(channels.len() * 2);
        for (channel, markets) in channels {
            if !markets.is_empty() {
                let mut sadd = redis::cmd("SADD");
                sadd.arg(self.keys.channel_registry(channel)).arg(markets);
                cmds.push(sadd);
            }
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(self.keys.channel_leases()).arg(now).arg(channel);
            cmds.push(zadd);
        }
        let _: Vec<redis::Value> = self.run_all(cmds).await?;
        Ok(())
    }

    /// The stored state message of each market (`None` where there is none).
    pub async fn states(&self, markets: &[String]) -> Result<Vec<Option<Bytes>>> {
        let cmds = markets
            .iter()
            .map(|m| {
                let mut c = redis::cmd("HGET");
                c.arg(self.keys.market_state(m)).arg("msg");
                c
            })
            .collect();
        let v: Vec<Option<Vec<u8>>> = self.run_all(cmds).await?;
        Ok(v.into_iter().map(|o| o.map(Bytes::from)).collect())
    }
}

/// Now, Unix seconds.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
