//! The Redis adapter: carries out the core's effects and loads subscriptions.
//!
//! A whole batch of effects goes to Redis as one pipeline (one round trip).
//! Consecutive updates are grouped into calls of the update script, which
//! compares versions, writes state and (for a watched market) publishes the
//! update once to the market's topic, atomically inside Redis, so a
//! redelivered or late record can never move a market's state backwards and
//! never republishes an old version. Every script touches the keys of one
//! market only besides its topic, which carries the same hash tag, so each
//! call stays single-slot per market (Redis Cluster, later, with
//! `SPUBLISH`). Everything in a batch is idempotent (set adds/removes,
//! version-guarded writes, announces of the stored state), so a failed
//! pipeline is simply sent again.

use std::time::Duration;

use redis::{Client, Connection, Pipeline, Script, Value};
use streampipe_contract::Keys;

use crate::core::Effect;
use crate::error::Result;

/// Most updates in one call of the update script: bounds how long one script
/// call holds Redis' single thread (~128 × a few µs).
pub const UPDATE_SCRIPT_CHUNK: usize = 128;

/// Connect and I/O timeout for Redis: long enough for a busy Redis to answer
/// a full batch, short enough to notice a dead one and retry.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// KEYS[i]: state hash of update i. ARGV[1]: the publish command; then per
/// update: version, ts, message, topic ('' when the market is unwatched).
/// Writes (and publishes, if a topic is given) only if newer than stored.
const UPDATE_SCRIPT: &str = r#"
local pub, applied, published = ARGV[1], 0, 0
for i = 1, #KEYS do
  local a = 4 * i - 2
  local cur = redis.call('HGET', KEYS[i], 'v')
  if (not cur) or tonumber(cur) < tonumber(ARGV[a]) then
    redis.call('HSET', KEYS[i], 'v', ARGV[a], 'ts', ARGV[a + 1], 'msg', ARGV[a + 2])
    applied = applied + 1
    if ARGV[a + 3] ~= '' then
      redis.call(pub, ARGV[a + 3], ARGV[a + 2])
      published = published + 1
    end
  end
end
return {applied, published}
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

/// What a batch did in Redis.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Updates newer than the stored state, written.
    pub applied: u64,
    /// Updates not newer than the stored state, dropped.
    pub stale: u64,
    /// Messages published: applied updates of watched markets plus
    /// announces that found a stored state (one per market, never per channel).
    pub published: u64,
}

/// A Redis connection plus the pipeline's key schema and scripts.
pub struct RedisStore {
    client: Client,
    conn: Option<Connection>,
    keys: Keys,
    publish: PublishCommand,
    update: Script,
    announce: Script,
}

/// One queued command whose reply the outcome needs.
enum Reply {
    /// An update script call over this many updates.
    Updates(u64),
    /// An announce script call.
    Announce,
}

impl RedisStore {
    /// Opens a store; the connection itself is made lazily and remade after errors.
    pub fn new(url: &str, keys: Keys) -> Result<Self> {
        Ok(RedisStore {
            client: Client::open(url)?,
            conn: None,
            keys,
            publish: PublishCommand::default(),
            update: Script::new(UPDATE_SCRIPT),
            announce: Script::new(ANNOUNCE_SCRIPT),
        })
    }

    /// Chooses the publish command (`PUBLISH` unless told otherwise).
    pub fn with_publish_command(mut self, publish: PublishCommand) -> Self {
        self.publish = publish;
        self
    }

    fn conn(&mut self) -> Result<&mut Connection> {
        if self.conn.is_none() {
            let mut c = self.client.get_connection_with_timeout(REDIS_TIMEOUT)?;
            c.set_read_timeout(Some(REDIS_TIMEOUT))?;
            c.set_write_timeout(Some(REDIS_TIMEOUT))?;
            // Load scripts on every new connection: a restarted Redis forgot them.
            self.update.prepare_invoke().load(&mut c)?;
            self.announce.prepare_invoke().load(&mut c)?;
            self.conn = Some(c);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    /// Runs `f` on the connection; on any error the connection is dropped so
    /// the next call reconnects (and reloads the scripts).
    fn with_conn<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        let res = f(self.conn()?);
        if res.is_err() {
            self.conn = None;
        }
        Ok(res?)
    }

    /// Checks that Redis answers (for readiness).
    pub fn ping(&mut self) -> Result<()> {
        self.with_conn(|c| redis::cmd("PING").query::<String>(c).map(|_| ()))
    }

    /// Queues one update script call over `updates` (all `Effect::Update`).
    fn queue_updates(&self, pipe: &mut Pipeline, updates: &[&Effect], replies: &mut Vec<Reply>) {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.update.get_hash()).arg(updates.len());
        for e in updates {
            if let Effect::Update { market, .. } = e {
                cmd.arg(self.keys.market_state(market));
            }
        }
        cmd.arg(self.publish.as_str());
        for e in updates {
            if let Effect::Update {
                market,
                version,
                ts,
                message,
                watched,
            } = e
            {
                cmd.arg(*version).arg(*ts).arg(message.as_slice());
                if *watched {
                    cmd.arg(self.keys.market_topic(market));
                } else {
                    cmd.arg("");
                }
            }
        }
        pipe.add_command(cmd);
        replies.push(Reply::Updates(updates.len() as u64));
    }

    /// Queues an announce of `market`'s stored state to its topic.
    fn queue_announce(&self, pipe: &mut Pipeline, market: &str, replies: &mut Vec<Reply>) {
        pipe.cmd("EVALSHA")
            .arg(self.announce.get_hash())
            .arg(2)
            .arg(self.keys.market_state(market))
            .arg(self.keys.market_topic(market))
            .arg(self.publish.as_str());
        replies.push(Reply::Announce);
    }

    /// Carries out `effects` in order, in one pipeline. Dead-letter and
    /// skip effects are not Redis' business and are ignored here.
    pub fn execute(&mut self, effects: &[Effect]) -> Result<Outcome> {
        let mut pipe = redis::pipe();
        let mut replies: Vec<Reply> = Vec::new();
        let mut i = 0;
        while i < effects.len() {
            match &effects[i] {
                Effect::Update { .. } => {
                    let start = i;
                    while i < effects.len() && matches!(effects[i], Effect::Update { .. }) {
                        i += 1;
                    }
                    let run: Vec<&Effect> = effects[start..i].iter().collect();
                    for chunk in update_calls(&run) {
                        self.queue_updates(&mut pipe, chunk, &mut replies);
                    }
                    continue;
                }
                Effect::Subscribe {
                    partition,
                    market,
                    channel,
                    market_now_watched,
                } => {
                    pipe.cmd("SADD")
                        .arg(self.keys.market_channels(market))
                        .arg(&**channel)
                        .ignore();
                    pipe.cmd("SADD")
                        .arg(self.keys.channel_markets(channel))
                        .arg(&**market)
                        .ignore();
                    pipe.cmd("SADD")
                        .arg(self.keys.partition_markets(*partition))
                        .arg(&**market)
                        .ignore();
                    // Updates stored while nobody watched were not published;
                    // a publisher that read the state before this point must
                    // still get the latest one, so publish it now.
                    if *market_now_watched {
                        self.queue_announce(&mut pipe, market, &mut replies);
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
                    pipe.cmd("SREM")
                        .arg(self.keys.market_channels(market))
                        .arg(&**channel)
                        .ignore();
                    pipe.cmd("SREM")
                        .arg(self.keys.channel_markets(channel))
                        .arg(&**market)
                        .ignore();
                    if *market_now_empty {
                        pipe.cmd("SREM")
                            .arg(self.keys.partition_markets(*partition))
                            .arg(&**market)
                            .ignore();
                    }
                }
                Effect::Announce { market } => {
                    self.queue_announce(&mut pipe, market, &mut replies);
                }
                Effect::DeadLetter { .. } | Effect::Skipped(_) => {}
            }
            i += 1;
        }
        if replies.is_empty() && pipe.is_empty() {
            return Ok(Outcome::default());
        }
        let values: Vec<Value> = self.with_conn(|c| pipe.query(c))?;
        let mut out = Outcome::default();
        for (reply, value) in replies.iter().zip(values) {
            match reply {
                Reply::Updates(n) => {
                    let (applied, published): (u64, u64) =
                        redis::from_redis_value(value).map_err(redis::RedisError::from)?;
                    out.applied += applied;
                    out.stale += n - applied;
                    out.published += published;
                }
                Reply::Announce => {
                    let n: u64 = redis::from_redis_value(value).map_err(redis::RedisError::from)?;
                    out.published += n;
                }
            }
        }
        Ok(out)
    }

    /// Loads the persisted subscriptions of a data partition:
    /// `(market, channels)` for every market in the partition index.
    pub fn load_partition(&mut self, partition: i32) -> Result<Vec<(String, Vec<String>)>> {
        let index = self.keys.partition_markets(partition);
        let markets: Vec<String> =
            self.with_conn(|c| redis::cmd("SMEMBERS").arg(&index).query(c))?;
        if markets.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for m in &markets {
            pipe.cmd("SMEMBERS").arg(self.keys.market_channels(m));
        }
        let channels: Vec<Vec<String>> = self.with_conn(|c| pipe.query(c))?;
        Ok(markets.into_iter().zip(channels).collect())
    }
}

/// Splits a run of consecutive updates into script calls of at most
/// [`UPDATE_SCRIPT_CHUNK`] updates, keeping their order.
///
/// On standalone Redis any updates may share a call. On Redis Cluster a call
/// must stay within one hash slot; that mode would first group the run by
/// the slot of each market's tag (a stable partition, so one market's
/// updates keep their order; different markets are independent) and chunk
/// each group here.
fn update_calls<'a, 'e>(run: &'a [&'e Effect]) -> impl Iterator<Item = &'a [&'e Effect]> {
    run.chunks(UPDATE_SCRIPT_CHUNK)
}
