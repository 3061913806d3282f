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

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    host: String,
    port: u16,
    username: Option<String>,
    password: Option<String>,
}

impl Target {
    /// From a `redis://[user:password@]host:port[/db]` URL.
    pub fn from_url(url: &str) -> Result<Self> {
        let info: ConnectionInfo = url.into_connection_info()?;
        let (host, port) = match info.addr() {
            ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
            other => {
                return Err(Error::Config(format!(
                    "pub/sub needs a plain TCP Redis address, got {other}"
                )))
            }
        };
        let settings = info.redis_settings();
        Ok(Target {
            host,
            port,
            username: settings.username().map(str::to_owned),
            password: settings.password().map(str::to_owned),
        })
    }
}

/// A subscribed-mode connection.
pub struct SubConn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    flavour: Flavour,
}

impl SubConn {
    /// Connects and authenticates.
    pub async fn connect(target: &Target, flavour: Flavour) -> Result<Self> {
        let fut = async {
            let stream = TcpStream::connect((target.host.as_str(), target.port)).await?;
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
