//! The data epoch and a partition's subscriptions and queries in Redis:
//! reading and claiming the epoch, marking a partition with it, loading a
//! newly assigned partition, and writing everything back after Redis lost
//! its data (see [`crate::epoch`]).

use redis::Cmd;
use streampipe_contract::epoch::{mint, Found, EPOCH_CLAIM_SCRIPT, SPREAD_SUFFIX};
use streampipe_contract::slot::SPREAD_TAGS;

use super::{Conn, EpochRead, RedisStore, WRITE_BACK_CHUNK};
use crate::error::Result;

impl RedisStore {
    /// Reads the pipeline's data epoch and, on a cluster, its markers.
    ///
    /// On a cluster one read at a time, stopping at the first error: this
    /// runs on the consumer thread, and redis-rs' cluster pipeline waits
    /// for every command sent to a node in turn, so a frozen master held
    /// the thread for its timeout once per marker it serves (21 × 5 s,
    /// measured). A periodic read of 65 small keys can afford the round
    /// trips.
    pub fn read_epoch(&mut self) -> Result<EpochRead> {
        let key = self.keys.epoch();
        let markers = self.epoch_markers();
        let (main, found): (Option<String>, Vec<Option<String>>) = self.with_conn(|c| match c {
            Conn::Single(c) => Ok((redis::cmd("GET").arg(&key).query(c)?, Vec::new())),
            Conn::Cluster { conn, .. } => {
                let main: Option<String> = redis::cmd("GET").arg(&key).query(conn.as_mut())?;
                let found = markers
                    .iter()
                    .map(|m| redis::cmd("GET").arg(m).query(conn.as_mut()))
                    .collect::<redis::RedisResult<Vec<Option<String>>>>()?;
                Ok((main, found))
            }
        })?;
        Ok(match Found::from_reads(main, &found) {
            Found::Missing => EpochRead::Missing,
            Found::Is(id) => EpochRead::Is(id),
            Found::Damaged(id) => EpochRead::Damaged(id),
        })
    }

    /// The markers of an epoch minted here: [`SPREAD_TAGS`] on a cluster.
    fn epoch_markers(&self) -> Vec<String> {
        let n = if self.is_cluster() {
            SPREAD_TAGS.len()
        } else {
            0
        };
        (0..n).map(|i| self.keys.epoch_marker(i)).collect()
    }

    /// Mints a new epoch and makes it the pipeline's if the key is missing
    /// or still holds `replacing` (the id found missing or damaged); returns
    /// what the key holds afterwards (another component may have replaced
    /// it first). On a cluster the markers are written before the key (a
    /// reader never sees a new key with old markers) and again with the
    /// winner's id when another component won.
    pub fn claim_epoch(&mut self, replacing: Option<&str>) -> Result<String> {
        let candidate = mint(self.is_cluster());
        let key = self.keys.epoch();
        let markers = self.epoch_markers();
        let replacing = replacing.unwrap_or("").to_owned();
        self.with_conn(|c| {
            let set_markers = |c: &mut Conn, id: &str| -> redis::RedisResult<()> {
                if let Conn::Cluster { conn, .. } = c {
                    let mut pipe = redis::cluster::cluster_pipe();
                    for m in &markers {
                        pipe.set(m, id).ignore();
                    }
                    pipe.query::<()>(conn.as_mut())?;
                }
                Ok(())
            };
            set_markers(c, &candidate)?;
            let id: String = redis::Script::new(EPOCH_CLAIM_SCRIPT)
                .key(&key)
                .arg(&candidate)
                .arg(&replacing)
                .invoke(c.as_like())?;
            if id != candidate && id.ends_with(SPREAD_SUFFIX) {
                set_markers(c, &id)?;
            }
            Ok(id)
        })
    }

    /// Marks `partition` as written by its owner in `epoch`; returns the
    /// mark it had before (`None`: none).
    pub fn mark_partition(&mut self, partition: i32, epoch: &str) -> Result<Option<String>> {
        let key = self.keys.partition_epoch(partition);
        self.with_conn(|c| redis::cmd("GETSET").arg(&key).arg(epoch).query(c.as_like()))
    }

    /// Writes a partition's subscriptions back (`m2c`, `c2m` and `p2m` sets,
    /// as the subscribe effects write them) and then marks the partition
    /// with `epoch`. Idempotent: set adds only. Returns the (market, channel)
    /// pairs written.
    pub fn write_back(
        &mut self,
        partition: i32,
        subscriptions: &[(String, Vec<String>)],
        epoch: &str,
    ) -> Result<u64> {
        let k = self.keys.clone();
        let mut cmds: Vec<Cmd> = Vec::new();
        let mut pairs = 0u64;
        for (market, channels) in subscriptions {
            if channels.is_empty() {
                continue;
            }
            let mut sadd = redis::cmd("SADD");
            sadd.arg(k.market_channels(market)).arg(channels);
            cmds.push(sadd);
            for ch in channels {
                let mut sadd = redis::cmd("SADD");
                sadd.arg(k.channel_markets(ch)).arg(market);
                cmds.push(sadd);
                pairs += 1;
            }
            let mut sadd = redis::cmd("SADD");
            sadd.arg(k.partition_markets(partition)).arg(market);
            cmds.push(sadd);
        }
        self.run_chunked(&cmds)?;
        // The mark last: a partition marked with the new epoch is complete.
        self.mark_partition(partition, epoch)?;
        Ok(pairs)
    }

    /// Writes a partition's queries back after a data loss: the pairs
    /// (`pq:<partition>`), each channel's query set and the pipeline's
    /// (the API's view, which the loss took too), the match index and each
    /// holding channel's query markets. Idempotent: adds only.
    pub fn write_back_queries(
        &mut self,
        partition: i32,
        pairs: &[(String, String)],
        matches: &[(String, Vec<String>, Vec<String>)],
    ) -> Result<()> {
        let k = self.keys.clone();
        let mut cmds: Vec<Cmd> = Vec::new();
        for (channel, query) in pairs {
            let pair = format!("{channel} {query}");
            let mut c = redis::cmd("SADD");
            c.arg(k.partition_queries(partition)).arg(&pair);
            cmds.push(c);
            let mut c = redis::cmd("SADD");
            c.arg(k.pipeline_queries()).arg(&pair);
            cmds.push(c);
            let mut c = redis::cmd("SADD");
            c.arg(k.channel_queries(channel)).arg(query);
            cmds.push(c);
        }
        for (market, queries, channels) in matches {
            let mut c = redis::cmd("HSET");
            c.arg(k.partition_query_matches(partition))
                .arg(market)
                .arg(queries.join("\n"));
            cmds.push(c);
            for ch in channels {
                let mut c = redis::cmd("SADD");
                c.arg(k.channel_query_markets(ch)).arg(market);
                cmds.push(c);
            }
        }
        self.run_chunked(&cmds)?;
        Ok(())
    }

    /// Runs `cmds` (replies ignored) as pipelines of at most
    /// [`WRITE_BACK_CHUNK`] commands.
    fn run_chunked(&mut self, cmds: &[Cmd]) -> Result<()> {
        for chunk in cmds.chunks(WRITE_BACK_CHUNK) {
            self.with_conn(|c| match c {
                Conn::Single(c) => {
                    let mut pipe = redis::pipe();
                    chunk.iter().for_each(|cmd| {
                        pipe.add_command(cmd.clone()).ignore();
                    });
                    pipe.query::<()>(c)
                }
                Conn::Cluster { conn, .. } => {
                    let mut pipe = redis::cluster::cluster_pipe();
                    chunk.iter().for_each(|cmd| {
                        pipe.add_command(cmd.clone()).ignore();
                    });
                    pipe.query::<()>(conn.as_mut())
                }
            })?;
        }
        Ok(())
    }

    /// Loads the persisted queries of a partition: its `(channel, query)`
    /// pairs and `(market, matching queries)`.
    #[allow(clippy::type_complexity)]
    pub fn load_queries(
        &mut self,
        partition: i32,
    ) -> Result<(Vec<(String, String)>, Vec<(String, Vec<String>)>)> {
        let (qk, mk) = (
            self.keys.partition_queries(partition),
            self.keys.partition_query_matches(partition),
        );
        let pairs: Vec<String> =
            self.with_conn(|c| redis::cmd("SMEMBERS").arg(&qk).query(c.as_like()))?;
        let matches: Vec<(String, String)> =
            self.with_conn(|c| redis::cmd("HGETALL").arg(&mk).query(c.as_like()))?;
        Ok((
            pairs
                .into_iter()
                .filter_map(|p| p.split_once(' ').map(|(c, q)| (c.to_owned(), q.to_owned())))
                .collect(),
            matches
                .into_iter()
                .map(|(m, qs)| (m, qs.split('\n').map(str::to_owned).collect()))
                .collect(),
        ))
    }

    /// Loads the persisted subscriptions of a data partition:
    /// `(market, channels)` for every market in the partition index.
    pub fn load_partition(&mut self, partition: i32) -> Result<Vec<(String, Vec<String>)>> {
        let index = self.keys.partition_markets(partition);
        let markets: Vec<String> =
            self.with_conn(|c| redis::cmd("SMEMBERS").arg(&index).query(c.as_like()))?;
        if markets.is_empty() {
            return Ok(Vec::new());
        }
        let cmds: Vec<Cmd> = markets
            .iter()
            .map(|m| {
                let mut cmd = redis::cmd("SMEMBERS");
                cmd.arg(self.keys.market_channels(m));
                cmd
            })
            .collect();
        // On a cluster each SMEMBERS goes to its market's master; the
        // pipeline sends one sub-pipeline per node.
        let channels: Vec<Vec<String>> = self.with_conn(|c| match c {
            Conn::Single(c) => {
                let mut pipe = redis::pipe();
                cmds.into_iter().for_each(|cmd| {
                    pipe.add_command(cmd);
                });
                pipe.query(c)
            }
            Conn::Cluster { conn, .. } => {
                let mut pipe = redis::cluster::cluster_pipe();
                cmds.into_iter().for_each(|cmd| {
                    pipe.add_command(cmd);
                });
                pipe.query(conn)
            }
        })?;
        Ok(markets.into_iter().zip(channels).collect())
    }
}
