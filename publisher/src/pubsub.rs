//! One subscribed-mode Redis connection over a plain or TLS socket
//! (`rediss://`: tokio-rustls, the same rustls redis-rs uses here).
//!
//! The hub drives it: it queues (un)subscriptions and `PING <token>`
//! barriers, flushes them, and pulls pushes out one at a time. The socket is
//! read only when the hub asks for more, into a buffer that holds at most one
//! partial frame plus one read, so a pod that falls behind leaves the backlog
//! in Redis, whose pub/sub output-buffer limit then cuts the connection (the
//! hub reconnects and tells its clients `reset`) — memory here never grows
//! with the offered load.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use streampipe_contract::deploy::RedisTlsPem;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

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
#[derive(Clone)]
pub struct Target {
    /// The Redis (standalone) or the cluster's seed nodes.
    pub seeds: Vec<Endpoint>,
    /// Redis Cluster: topics are sharded and live on their slot's master.
    pub cluster: bool,
    username: Option<String>,
    password: Option<String>,
    /// TLS settings of `rediss://` URLs.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("seeds", &self.seeds)
            .field("cluster", &self.cluster)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Target {
    /// From a `redis[s]://[user:password@]host:port[/db]` URL; with
    /// `cluster`, a comma-separated list of such URLs (any reachable one is
    /// enough). `tls` holds the CA bundle and client certificate for
    /// `rediss://` (the system's CAs when it has none).
    pub fn from_url(url: &str, cluster: bool, tls: Option<&RedisTlsPem>) -> Result<Self> {
        let mut seeds = Vec::new();
        let (mut username, mut password) = (None, None);
        let mut secure = None;
        for u in streampipe_contract::deploy::redis_urls(url) {
            let info: ConnectionInfo = u.into_connection_info()?;
            let (host, port, is_tls) = match info.addr() {
                ConnectionAddr::Tcp(h, p) => (h.clone(), *p, false),
                ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure,
                    ..
                } => {
                    if *insecure {
                        return Err(Error::Config(
                            "rediss:// with #insecure is not supported: give the CA instead".into(),
                        ));
                    }
                    (host.clone(), *port, true)
                }
                other => {
                    return Err(Error::Config(format!(
                        "pub/sub needs a TCP Redis address, got {other}"
                    )))
                }
            };
            if secure.is_some_and(|s| s != is_tls) {
                return Err(Error::Config(
                    "Redis URLs mix redis:// and rediss://".into(),
                ));
            }
            secure = Some(is_tls);
            seeds.push(Endpoint { host, port });
            let settings = info.redis_settings();
            username = username.or(settings.username().map(str::to_owned));
            password = password.or(settings.password().map(str::to_owned));
        }
        if seeds.is_empty() || (!cluster && seeds.len() > 1) {
            return Err(Error::Config(format!(
                "expected {} Redis URL, got {} URLs",
                if cluster { "at least one" } else { "one" },
                seeds.len()
            )));
        }
        let tls = match secure {
            Some(true) => Some(Arc::new(tls_config(tls)?)),
            _ => None,
        };
        Ok(Target {
            seeds,
            cluster,
            username,
            password,
            tls,
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

/// The rustls client settings for `rediss://`: the given CA bundle (else
/// the system's) and the client certificate, if any. Errors name what is
/// wrong, never the key.
fn tls_config(pem: Option<&RedisTlsPem>) -> Result<rustls::ClientConfig> {
    let bad = |what: &str, e: &dyn fmt::Display| Error::Config(format!("Redis TLS {what}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    match pem.and_then(|p| p.ca.as_deref()) {
        Some(ca) => {
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert.map_err(|e| bad("CA bundle", &e))?;
                roots.add(cert).map_err(|e| bad("CA bundle", &e))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // A system store with a certificate rustls cannot use keeps the others.
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(Error::Config(
            "Redis TLS: no CA certificate to trust".into(),
        ));
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match pem.and_then(|p| p.client.as_ref()) {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| bad("client certificate", &e))?;
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|_| Error::Config("Redis TLS client key: not a PEM private key".into()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad("client certificate", &e))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The socket under a subscribed connection: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

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
    stream: Box<dyn Io>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    flavour: Flavour,
}

impl SubConn {
    /// Connects to `node` and authenticates with `target`'s credentials.
    pub async fn connect(target: &Target, node: &Endpoint) -> Result<Self> {
        let flavour = target.flavour();
        let fut = async {
            let tcp = TcpStream::connect((node.host.as_str(), node.port)).await?;
            tcp.set_nodelay(true)?;
            let stream: Box<dyn Io> = match &target.tls {
                None => Box::new(tcp),
                Some(cfg) => {
                    let name = ServerName::try_from(node.host.clone()).map_err(|e| {
                        Error::Config(format!("Redis TLS server name {:?}: {e}", node.host))
                    })?;
                    let tls = TlsConnector::from(cfg.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| {
                            Error::Config(format!(
                                "Redis TLS handshake with {}:{}: {e}",
                                node.host, node.port
                            ))
                        })?;
                    Box::new(tls)
                }
            };
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

    /// Asks for the cluster's slot map (before any subscription), within
    /// [`CONNECT_TIMEOUT`]: a frozen seed accepts the connection (the
    /// kernel does) and then answers nothing.
    pub async fn cluster_slots(&mut self) -> Result<Vec<SlotRange>> {
        resp::encode_command(&mut self.wbuf, &["CLUSTER", "SLOTS"]);
        let reply = tokio::time::timeout(CONNECT_TIMEOUT, async {
            self.flush().await?;
            self.next_frame().await
        })
        .await
        .map_err(|_| Error::Io(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
        match reply {
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
        let t = Target::from_url("redis://:pw@127.0.0.1:7000", false, None).unwrap();
        assert_eq!(t.seeds.len(), 1);
        assert_eq!(t.password.as_deref(), Some("pw"));
        assert!(
            !format!("{t:?}").contains("pw"),
            "Debug redacts the password"
        );
        let t = Target::from_url("redis://a:1, redis://b:2", true, None).unwrap();
        assert_eq!(t.seeds.len(), 2);
        assert_eq!(t.flavour(), Flavour::Sharded);
        assert!(Target::from_url("redis://a:1,redis://b:2", false, None).is_err());
        assert!(Target::from_url("", true, None).is_err());
        assert!(Target::from_url("rediss://a:1,redis://b:2", true, None).is_err());
    }
}
