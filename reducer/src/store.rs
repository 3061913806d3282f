//! The Redis adapter: carries out the core's effects and loads subscriptions.
//!
//! A whole batch of effects goes to Redis as one pipeline (one round trip).
//! Consecutive updates are grouped into one call of the update script, which
//! compares versions and writes state and publishes atomically inside Redis,
//! so a redelivered or late record can never move a market's state backwards
//! and never republishes an old version. Everything in a batch is idempotent
//! (set adds/removes, version-guarded writes, begin replays), so a failed
//! pipeline is simply sent again.

use std::time::Duration;

use redis::{Client, Connection, Script, Value};
use streampipe_contract::Keys;

use crate::core::Effect;
use crate::error::Result;

/// Most updates in one call of the update script: bounds how long one script
/// call holds Redis' single thread (~128 × a few µs).
pub const UPDATE_SCRIPT_CHUNK: usize = 128;

/// Connect and I/O timeout for Redis: long enough for a busy Redis to answer
/// a full batch, short enough to notice a dead one and retry.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

/// KEYS[i]: state hash of update i. ARGV per update: version, ts, message,
/// target count, targets... Writes and publishes only if newer than stored.
const UPDATE_SCRIPT: &str = r#"
local applied, published, a = 0, 0, 1
for i = 1, #KEYS do
  local v = tonumber(ARGV[a])
  local n = tonumber(ARGV[a + 3])
  local cur = redis.call('HGET', KEYS[i], 'v')
  if (not cur) or tonumber(cur) < v then
    redis.call('HSET', KEYS[i], 'v', ARGV[a], 'ts', ARGV[a + 1], 'msg', ARGV[a + 2])
    for j = 1, n do
      redis.call('PUBLISH', ARGV[a + 3 + j], ARGV[a + 2])
    end
    applied = applied + 1
    published = published + n
  end
  a = a + 4 + n
end
return {applied, published}
"#;

/// KEYS[1]: state hash; ARGV[1]: pub/sub channel. Replays the current state.
const BEGIN_SCRIPT: &str = r#"
local m = redis.call('HGET', KEYS[1], 'msg')
if m then
  redis.call('PUBLISH', ARGV[1], m)
  return 1
end
return 0
"#;

/// What a batch did in Redis.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Updates newer than the stored state, written.
    pub applied: u64,
    /// Updates not newer than the stored state, dropped.
    pub stale: u64,
    /// Messages published (updates × subscribers, plus begin replays).
    pub published: u64,
}

/// A Redis connection plus the pipeline's key schema and scripts.
pub struct RedisStore {
    client: Client,
    conn: Option<Connection>,
    keys: Keys,
    update: Script,
    begin: Script,
}

impl RedisStore {
    /// Opens a store; the connection itself is made lazily and remade after errors.
    pub fn new(url: &str, keys: Keys) -> Result<Self> {
        Ok(RedisStore {
            client: Client::open(url)?,
            conn: None,
            keys,
            update: Script::new(UPDATE_SCRIPT),
            begin: Script::new(BEGIN_SCRIPT),
        })
    }

    fn conn(&mut self) -> Result<&mut Connection> {
        if self.conn.is_none() {
            let mut c = self.client.get_connection_with_timeout(REDIS_TIMEOUT)?;
            c.set_read_timeout(Some(REDIS_TIMEOUT))?;
            c.set_write_timeout(Some(REDIS_TIMEOUT))?;
            // Load scripts on every new connection: a restarted Redis forgot them.
            self.update.prepare_invoke().load(&mut c)?;
            self.begin.prepare_invoke().load(&mut c)?;
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

    /// Carries out `effects` in order, in one pipeline. Dead-letter and
    /// skip effects are not Redis' business and are ignored here.
    pub fn execute(&mut self, effects: &[Effect]) -> Result<Outcome> {
        let mut pipe = redis::pipe();
        // (kind, count) per queued command, to read the replies back.
        let mut replies: Vec<Reply> = Vec::new();
        let mut i = 0;
        while i < effects.len() {
            match &effects[i] {
                Effect::Update { .. } => {
                    let mut cmd = redis::cmd("EVALSHA");
                    let start = i;
                    while i < effects.len()
                        && i - start < UPDATE_SCRIPT_CHUNK
                        && matches!(effects[i], Effect::Update { .. })
                    {
                        i += 1;
                    }
                    let chunk = &effects[start..i];
                    cmd.arg(self.update.get_hash()).arg(chunk.len());
                    for e in chunk {
                        if let Effect::Update { market, .. } = e {
                            cmd.arg(self.keys.market_state(market));
                        }
                    }
                    for e in chunk {
                        if let Effect::Update {
                            version,
                            ts,
                            message,
                            targets,
                            ..
                        } = e
                        {
                            cmd.arg(*version)
                                .arg(*ts)
                                .arg(message.as_slice())
                                .arg(targets.len());
                            for t in targets.iter() {
                                cmd.arg(&**t);
                            }
                        }
                    }
                    pipe.add_command(cmd);
                    replies.push(Reply::Updates(chunk.len() as u64));
                    continue;
                }
                Effect::Subscribe {
                    partition,
                    market,
                    channel,
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
                Effect::Begin { market, target } => {
                    pipe.cmd("EVALSHA")
                        .arg(self.begin.get_hash())
                        .arg(1)
                        .arg(self.keys.market_state(market))
                        .arg(&**target);
                    replies.push(Reply::Begin);
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
                Reply::Begin => {
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

enum Reply {
    Updates(u64),
    Begin,
}
