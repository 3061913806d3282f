//! One subscribed-mode Redis connection over a plain socket.
//!
//! The hub drives it: it queues (un)subscriptions and `PING <token>`
//! barriers, flushes them, and pulls pushes out one at a time. The socket is
//! read only when the hub asks for more, into a buffer that holds at most one
//! partial frame plus one read, so a pod that falls behind leaves the backlog
//! in Redis, whose pub/sub output-buffer limit then cuts the connection (the
//! hub reconnects and tells its clients `reset`) — memory here never grows
//! with the offered load.

use std::time::Duration;

use bytes::BytesMut;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::{Error, Result};
use crate::resp::{self, Frame, Push};

/// Bytes asked of the socket per read: many small messages per syscall.
pub const READ_CHUNK: usize = 64 * 1024;

/// How long connecting (TCP + AUTH) may take before it is retried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether topics are classic pub/sub or sharded (Redis Cluster).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// `SUBSCRIBE` / `PUBLISH`.
    Classic,
    /// `SSUBSCRIBE` / `SPUBLISH`.
    Sharded,
}

/// One Redis node's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// Where and how to connect: one Redis, or the seed nodes of a Redis Cluster.
#[derive(Debug, Clone)]
pub struct Target {
    /// The Redis (standalone) or the cluster's seed nodes.
    pub seeds: Vec<Endpoint>,
    /// Redis Cluster: topics are sharded and live on their slot's master.
    pub cluster: bool,
    username: Option<String>,
    password: Option<String>,
}

impl Target {
    /// From a `redis://[user:password@]host:port[/db]` URL; with `cluster`,
    /// a comma-separated list of such URLs (any reachable one is enough).
    pub fn from_url(url: &str, cluster: bool) -> Result<Self> {
        let mut seeds = Vec::new();
        let (mut username, mut password) = (None, None);
        for u in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let info: ConnectionInfo = u.into_connection_info()?;
            match info.addr() {
                ConnectionAddr::Tcp(h, p) => seeds.push(Endpoint {
                    host: h.clone(),
                    port: *p,
                }),
                other => {
                    return Err(Error::Config(format!(
                        "pub/sub needs a plain TCP Redis address, got {other}"
                    )))
                }
            }
            let settings = info.redis_settings();
            username = username.or(settings.username().map(str::to_owned));
            password = password.or(settings.password().map(str::to_owned));
        }
        if seeds.is_empty() || (!cluster && seeds.len() > 1) {
            return Err(Error::Config(format!(
                "expected {} Redis URL, got {url:?}",
                if cluster { "at least one" } else { "one" }
            )));
        }
        Ok(Target {
            seeds,
            cluster,
            username,
            password,
        })
    }

    fn flavour(&self) -> Flavour {
        if self.cluster {
            Flavour::Sharded
        } else {
            Flavour::Classic
        }
    }
}

/// A master's share of a cluster's slots: `first..=last` are served by `node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    /// First slot.
    pub first: u16,
    /// Last slot (inclusive).
    pub last: u16,
    /// The master serving them.
    pub node: Endpoint,
}

/// Parses a `CLUSTER SLOTS` reply: `[[first, last, [host, port, id, ..], replicas..], ..]`.
pub fn parse_cluster_slots(reply: &Frame) -> Result<Vec<SlotRange>> {
    let bad = || protocol("unexpected CLUSTER SLOTS reply".into());
    let Frame::Array(Some(ranges)) = reply else {
        return Err(bad());
    };
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let Frame::Array(Some(items)) = r else {
            return Err(bad());
        };
        let (
            Some(Frame::Integer(first)),
            Some(Frame::Integer(last)),
            Some(Frame::Array(Some(master))),
        ) = (items.first(), items.get(1), items.get(2))
        else {
            return Err(bad());
        };
        let (Some(Frame::Bulk(Some(host))), Some(Frame::Integer(port))) =
            (master.first(), master.get(1))
        else {
            return Err(bad());
        };
        let in_range = |v: i64| {
            u16::try_from(v)
                .ok()
                .filter(|s| *s < streampipe_contract::slot::SLOTS)
        };
        let (Some(first), Some(last), Ok(port)) =
            (in_range(*first), in_range(*last), u16::try_from(*port))
        else {
            return Err(bad());
        };
        out.push(SlotRange {
            first,
            last,
            node: Endpoint {
                host: String::from_utf8_lossy(host).into_owned(),
                port,
            },
        });
    }
    Ok(out)
}

/// A subscribed-mode connection.
pub struct SubConn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    flavour: Flavour,
}

impl SubConn {
    /// Connects to `node` and authenticates with `target`'s credentials.
    pub async fn connect(target: &Target, node: &Endpoint) -> Result<Self> {
        let flavour = target.flavour();
        let fut = async {
            let stream = TcpStream::connect((node.host.as_str(), node.port)).await?;
            stream.set_nodelay(true)?;
            let mut c = SubConn {
                stream,
                rbuf: BytesMut::with_capacity(READ_CHUNK),
                wbuf: BytesMut::new(),
                flavour,
            };
            if let Some(pw) = &target.password {
                match &target.username {
                    Some(u) => resp::encode_command(&mut c.wbuf, &["AUTH", u, pw]),
                    None => resp::encode_command(&mut c.wbuf, &["AUTH", pw]),
                }
                c.flush().await?;
                match c.next_frame().await? {
                    Frame::Simple(_) => {}
                    Frame::Error(e) => {
                        return Err(Error::Config(format!(
                            "redis refused AUTH: {}",
                            String::from_utf8_lossy(&e)
                        )))
                    }
                    other => return Err(protocol(format!("unexpected AUTH reply {other:?}"))),
                }
            }
            Ok(c)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .map_err(|_| Error::Io(std::io::Error::from(std::io::ErrorKind::TimedOut)))?
    }

    /// Queues a subscription to `topics`.
    pub fn subscribe(&mut self, topics: &[String]) {
        let cmd = match self.flavour {
            Flavour::Classic => "SUBSCRIBE",
            Flavour::Sharded => "SSUBSCRIBE",
        };
        self.queue(cmd, topics);
    }

    /// Queues an unsubscription from `topics`.
    pub fn unsubscribe(&mut self, topics: &[String]) {
        let cmd = match self.flavour {
            Flavour::Classic => "UNSUBSCRIBE",
            Flavour::Sharded => "SUNSUBSCRIBE",
        };
        self.queue(cmd, topics);
    }

    fn queue(&mut self, cmd: &str, topics: &[String]) {
        if topics.is_empty() {
            return;
        }
        let mut args: Vec<&[u8]> = Vec::with_capacity(topics.len() + 1);
        args.push(cmd.as_bytes());
        args.extend(topics.iter().map(|t| t.as_bytes()));
        resp::encode_command(&mut self.wbuf, &args);
    }

    /// Queues `PING <token>`: Redis answers in order, so its `pong` confirms
    /// every subscription queued before it.
    pub fn ping(&mut self, token: u64) {
        resp::encode_command(&mut self.wbuf, &["PING", &token.to_string()]);
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// The next push already buffered, if a whole one is.
    pub fn try_next(&mut self) -> Result<Option<Push>> {
        Ok(resp::parse(&mut self.rbuf)
            .map_err(|e| protocol(e.to_string()))?
            .map(Push::from_frame))
    }

    /// Reads more from the socket. Cancel-safe: dropping the future before it
    /// completes reads nothing.
    pub async fn fill(&mut self) -> Result<()> {
        self.rbuf.reserve(READ_CHUNK);
        let n = self.stream.read_buf(&mut self.rbuf).await?;
        if n == 0 {
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "redis closed the pub/sub connection",
            )));
        }
        Ok(())
    }

    /// Asks for the cluster's slot map (before any subscription).
    pub async fn cluster_slots(&mut self) -> Result<Vec<SlotRange>> {
        resp::encode_command(&mut self.wbuf, &["CLUSTER", "SLOTS"]);
        self.flush().await?;
        match self.next_frame().await? {
            Frame::Error(e) => Err(Error::Config(format!(
                "CLUSTER SLOTS refused: {}",
                String::from_utf8_lossy(&e)
            ))),
            reply => parse_cluster_slots(&reply),
        }
    }

    async fn next_frame(&mut self) -> Result<Frame> {
        loop {
            if let Some(f) = resp::parse(&mut self.rbuf).map_err(|e| protocol(e.to_string()))? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }
}

fn protocol(msg: String) -> Error {
    Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn bulk(s: &str) -> Frame {
        Frame::Bulk(Some(Bytes::from(s.to_owned())))
    }

    #[test]
    fn parses_a_cluster_slot_map() {
        let node = |host: &str, port: i64| {
            Frame::Array(Some(vec![bulk(host), Frame::Integer(port), bulk("id")]))
        };
        let reply = Frame::Array(Some(vec![
            Frame::Array(Some(vec![
                Frame::Integer(0),
                Frame::Integer(5460),
                node("127.0.0.1", 7000),
                node("127.0.0.1", 7003),
            ])),
            Frame::Array(Some(vec![
                Frame::Integer(5461),
                Frame::Integer(16383),
                node("127.0.0.1", 7001),
            ])),
        ]));
        let r = parse_cluster_slots(&reply).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].first, r[0].last, r[0].node.port), (0, 5460, 7000));
        assert_eq!((r[1].first, r[1].last, r[1].node.port), (5461, 16383, 7001));
        let bad = Frame::Array(Some(vec![Frame::Array(Some(vec![
            Frame::Integer(0),
            Frame::Integer(99999),
            node("h", 1),
        ]))]));
        assert!(parse_cluster_slots(&bad).is_err());
        assert!(parse_cluster_slots(&Frame::Integer(1)).is_err());
    }

    #[test]
    fn urls_name_one_redis_or_cluster_seeds() {
        let t = Target::from_url("redis://:pw@127.0.0.1:7000", false).unwrap();
        assert_eq!(t.seeds.len(), 1);
        assert_eq!(t.password.as_deref(), Some("pw"));
        let t = Target::from_url("redis://a:1, redis://b:2", true).unwrap();
        assert_eq!(t.seeds.len(), 2);
        assert_eq!(t.flavour(), Flavour::Sharded);
        assert!(Target::from_url("redis://a:1,redis://b:2", false).is_err());
        assert!(Target::from_url("", true).is_err());
    }
}
