//! Channel registry and market state in Redis, for the control API.
//!
//! The registry set (`sp:<p>:{c:<id>}:reg`) holds the markets a channel
//! asked for. The control API writes it *before* producing the commands, so
//! any publisher pod can answer `begin`, add, remove and close for the
//! channel at once, while the reducers apply the commands asynchronously.
//! Reducers own the `m2c`/`c2m` maps; this module never writes them.

use bytes::Bytes;
use redis::aio::ConnectionManager;
use streampipe_contract::{Keys, CHANNEL_CLOSED, CHANNEL_MARKETS_CHANGED};

use crate::error::Result;

/// Redis access of the control API. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    conn: ConnectionManager,
    keys: Keys,
}

impl Registry {
    /// Connects (the manager reconnects by itself after errors).
    pub async fn connect(url: &str, keys: Keys) -> Result<Self> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Registry { conn, keys })
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

    /// The markets of a channel; `None` when the channel is unknown.
    pub async fn markets(&self, channel: &str) -> Result<Option<Vec<String>>> {
        let mut c = self.conn.clone();
        let mut v: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.channel_registry(channel))
            .query_async(&mut c)
            .await?;
        if v.is_empty() {
            return Ok(None);
        }
        v.sort();
        Ok(Some(v))
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

    /// Deletes the registry and tells every pod's connections of the channel
    /// that it is closed (a control message on the channel's pub/sub).
    pub async fn delete(&self, channel: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = redis::pipe()
            .cmd("DEL")
            .arg(self.keys.channel_registry(channel))
            .ignore()
            .cmd("ZREM")
            .arg(self.keys.channel_leases())
            .arg(channel)
            .ignore()
            .cmd("PUBLISH")
            .arg(self.keys.channel_topic(channel))
            .arg(CHANNEL_CLOSED)
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Tells every pod holding streams of `channel` that its markets changed
    /// (they re-read the registry and subscribe to what it gained).
    pub async fn notify_markets_changed(&self, channel: &str) -> Result<()> {
        let mut c = self.conn.clone();
        let _: () = redis::cmd("PUBLISH")
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
            pipe.cmd("PUBLISH").arg(&topic).arg(&s[..]).ignore();
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
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
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

    /// The stored state message of each market (`None` where there is none).
    pub async fn states(&self, markets: &[String]) -> Result<Vec<Option<Bytes>>> {
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        for m in markets {
            pipe.cmd("HGET").arg(self.keys.market_state(m)).arg("msg");
        }
        let v: Vec<Option<Vec<u8>>> = pipe.query_async(&mut c).await?;
        Ok(v.into_iter().map(|o| o.map(Bytes::from)).collect())
    }
}
