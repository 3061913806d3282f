//! The control API's Redis connection: one Redis, or a Redis Cluster
//! connection that is replaced when it stops answering.
//!
//! redis-rs' async cluster client repairs itself after a node dies, and
//! a bug in that repair (fixed in redis-rs 1.8.2: queued requests were not
//! woken) once left every request of a pod unanswered for 90 s after a
//! master's `kill -9`. Every read of the pod (epoch checks, `begin`s, the
//! REST API) goes through this one connection, so it must not depend on a
//! library's recovery being right: requests are bounded
//! ([`CLUSTER_RESPONSE_TIMEOUT`]), and after [`REBUILD_AFTER_FAILURES`]
//! failures in a row with no success between them the connection is
//! rebuilt from the seed nodes, at most once per [`REBUILD_MIN_INTERVAL`].
//! The decision is the pure [`Streak`]; [`Healing`] is its adapter.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use redis::aio::ConnectionManager;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use streampipe_contract::deploy::{seed_rotations, RedisTlsPem};

use crate::error::Result;

/// How long one request on the cluster connection may take, retries and
/// redirects included: redis-rs' async cluster client waits forever by
/// default; bounded, the caller gets an error it already handles (a 503, a
/// retried begin). The control API's reads take milliseconds; the epoch
/// check bounds its own at 3 s too.
pub const CLUSTER_RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// How long connecting to one cluster node may take: a dead node's address
/// must not hold a slot refresh for the OS's TCP timeout.
pub const CLUSTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Failed requests in a row (no success between them) after which the
/// cluster connection is rebuilt: two connection-level failures with no
/// answer between them; a rebuild is cheap and rate-limited (below).
pub const REBUILD_AFTER_FAILURES: u32 = 2;

/// Least time between two rebuilds: a cluster that is down as a whole
/// must not be answered with a reconnect storm.
pub const REBUILD_MIN_INTERVAL: Duration = Duration::from_secs(10);

/// How long one rebuild may take: connecting and reading the slot map
/// from the seeds in turn (a frozen seed costs its timeouts).
pub const REBUILD_TIMEOUT: Duration = Duration::from_secs(10);

/// A request abandoned by its caller after this long counts as a failure
/// (callers bound their own reads, e.g. the epoch check's 3 s).
pub const ABANDONED_AFTER: Duration = Duration::from_secs(2);

/// redis-rs' form of the TLS material (CA bundle, client certificate).
pub fn certificates(t: &RedisTlsPem) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: t.client.as_ref().map(|(cert, key)| redis::ClientTlsConfig {
            client_cert: cert.clone(),
            client_key: key.clone(),
        }),
        root_cert: t.ca.clone(),
    }
}

/// Failures in a row and when the connection was last rebuilt: whether
/// to rebuild now. Pure; time is passed in.
#[derive(Debug, Default)]
pub struct Streak {
    failures: u32,
    last_rebuild: Option<Instant>,
}

impl Streak {
    /// A request succeeded: the connection works.
    pub fn success(&mut self) {
        self.failures = 0;
    }

    /// A request failed at `now`; true when the connection should be
    /// rebuilt (the caller then starts exactly one rebuild).
    pub fn failure(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        let due = self
            .last_rebuild
            .is_none_or(|t| now.saturating_duration_since(t) >= REBUILD_MIN_INTERVAL);
        if self.failures >= REBUILD_AFTER_FAILURES && due {
            self.failures = 0;
            self.last_rebuild = Some(now);
            return true;
        }
        false
    }
}

/// Whether an error says the connection (not the command) failed: an
/// error reply from Redis means it answered, unless it says the client's
/// view of the cluster is wrong or the cluster is changing (`MOVED`,
/// `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`): seen in a row, those
/// call for a fresh slot map too (in CI, after a frozen master's failover,
/// a rebuilt connection failed every read fast for 60 s).
fn connection_failed(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::MasterDown) => true,
        ErrorKind::Server(_) => e.is_cluster_error(),
        _ => true,
    }
}

/// A cluster connection that replaces itself when it stops answering.
pub struct Healing {
    /// One client per rotation of the seed list: redis-rs asks the seeds
    /// in order, and a frozen first seed (it accepts connections and
    /// answers nothing) must not fail every rebuild; each rebuild starts
    /// from the next seed.
    clients: Vec<ClusterClient>,
    next: std::sync::atomic::AtomicUsize,
    current: Mutex<ClusterConnection>,
    streak: Mutex<Streak>,
    rebuilding: AtomicBool,
    rebuilds: IntCounter,
}

impl Healing {
    /// Connects to the cluster at `seeds` (comma-separated node URLs).
    pub async fn connect(
        seeds: &str,
        tls: Option<&RedisTlsPem>,
        rebuilds: IntCounter,
    ) -> Result<Arc<Self>> {
        let clients = seed_rotations(seeds)
            .into_iter()
            .map(|rotated| {
                let mut builder = ClusterClient::builder(rotated)
                    .connection_timeout(CLUSTER_CONNECT_TIMEOUT)
                    .response_timeout(CLUSTER_RESPONSE_TIMEOUT);
                if let Some(t) = tls {
                    builder = builder.certs(certificates(t));
                }
                builder.build()
            })
            .collect::<RedisResult<Vec<_>>>()?;
        let conn = clients[0].get_async_connection().await?;
        Ok(Arc::new(Healing {
            clients,
            next: std::sync::atomic::AtomicUsize::new(1),
            current: Mutex::new(conn),
            streak: Mutex::new(Streak::default()),
            rebuilding: AtomicBool::new(false),
            rebuilds,
        }))
    }

    fn connection(&self) -> ClusterConnection {
        self.current.lock().expect("not poisoned").clone()
    }

    /// Records how a request ended, and starts a rebuild when it is due.
    fn record(self: &Arc<Self>, ok: bool) {
        if ok {
            self.streak.lock().expect("not poisoned").success();
            return;
        }
        let due = self
            .streak
            .lock()
            .expect("not poisoned")
            .failure(Instant::now());
        if due && !self.rebuilding.swap(true, Ordering::AcqRel) {
            let me = self.clone();
            tokio::spawn(async move {
                me.rebuild().await;
                me.rebuilding.store(false, Ordering::Release);
            });
        }
    }

    async fn rebuild(&self) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        let fresh =
            tokio::time::timeout(REBUILD_TIMEOUT, self.clients[i].get_async_connection()).await;
        match fresh {
            Ok(Ok(conn)) => {
                *self.current.lock().expect("not poisoned") = conn;
                self.rebuilds.inc();
                tracing::warn!("Redis Cluster connection stopped answering; replaced it");
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not rebuild the Redis Cluster connection")
            }
            Err(_) => tracing::warn!("rebuilding the Redis Cluster connection timed out"),
        }
    }

    /// Runs one request on the current connection and records its end,
    /// including a caller that gives up on it (see [`ABANDONED_AFTER`]).
    async fn run<T, F, Fut>(self: Arc<Self>, request: F) -> RedisResult<T>
    where
        F: FnOnce(ClusterConnection) -> Fut,
        Fut: std::future::Future<Output = RedisResult<T>>,
    {
        let mut watch = Outstanding {
            healing: self.clone(),
            started: Instant::now(),
            done: false,
        };
        let result = request(self.connection()).await;
        watch.done = true;
        self.record(match &result {
            Ok(_) => true,
            Err(e) => !connection_failed(e),
        });
        result
    }
}

/// Counts a request dropped unfinished after [`ABANDONED_AFTER`] as failed.
struct Outstanding {
    healing: Arc<Healing>,
    started: Instant,
    done: bool,
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        if !self.done && self.started.elapsed() >= ABANDONED_AFTER {
            self.healing.record(false);
        }
    }
}

/// A connection to one Redis (which reconnects by itself) or to a Redis
/// Cluster (which routes every command by its key and follows failovers).
#[derive(Clone)]
pub enum Conn {
    /// One Redis.
    Single(ConnectionManager),
    /// A Redis Cluster.
    Cluster(Arc<Healing>),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(h) => Box::pin(
                h.clone()
                    .run(move |mut c| async move { c.req_packed_command(cmd).await }),
            ),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(h) => Box::pin(h.clone().run(move |mut c| async move {
                c.req_packed_commands(pipeline, offset, count).await
            })),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(h) => h.connection().get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuilds_after_failures_in_a_row_only() {
        let t0 = Instant::now();
        let mut s = Streak::default();
        for _ in 0..REBUILD_AFTER_FAILURES - 1 {
            assert!(!s.failure(t0));
        }
        s.success();
        for _ in 0..REBUILD_AFTER_FAILURES - 1 {
            assert!(!s.failure(t0), "a success between them resets the count");
        }
        assert!(s.failure(t0), "the last failure in a row rebuilds");
        let later = t0 + REBUILD_MIN_INTERVAL;
        for _ in 0..REBUILD_AFTER_FAILURES - 1 {
            assert!(!s.failure(later), "and the count starts over");
        }
        assert!(s.failure(later));
    }

    #[test]
    fn rebuilds_at_most_once_per_interval() {
        let t0 = Instant::now();
        let mut s = Streak::default();
        for _ in 0..REBUILD_AFTER_FAILURES - 1 {
            assert!(!s.failure(t0));
        }
        assert!(s.failure(t0));
        let soon = t0 + REBUILD_MIN_INTERVAL / 2;
        for _ in 0..10 {
            assert!(!s.failure(soon), "a down cluster gets no reconnect storm");
        }
        assert!(s.failure(t0 + REBUILD_MIN_INTERVAL));
    }

    #[test]
    fn an_error_reply_is_not_a_connection_failure() {
        let reply = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "WRONGTYPE",
        ));
        assert!(!connection_failed(&reply));
        let io = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "timed out",
        ));
        assert!(connection_failed(&io));
        let down = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
            "CLUSTERDOWN",
        ));
        assert!(
            connection_failed(&down),
            "a cluster in change calls for a fresh view"
        );
    }
}
