//! Test support for streampipe's integration tests and benchmarks.
//!
//! Everything here talks to real services started by `scripts/stack.sh`:
//! Redis, the dev broker (librdkafka's mock cluster) and tansu. Addresses
//! come from the environment the script exports, with the script's default
//! ports as fallback. Each test makes its own pipeline (unique topics, group
//! and Redis prefix), so tests run in parallel without seeing each other.

pub mod auth;
pub mod browser;
pub mod follower;
pub mod nginx;
pub mod publisher;
pub mod rebalance;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use streampipe_contract::{
    encode_command, Command as Cmd, CommandKind, Keys, PublishedUpdate, Topic,
};
use streampipe_reducer::Config;

/// Installs a log subscriber writing through the test harness, so a failing
/// test shows the in-process reducer's and publisher's logs (passing tests'
/// output is captured and dropped). `STREAMPIPE_TEST_LOG` is an `EnvFilter`
/// (e.g. `info`, `debug`); by default warnings plus the reducer's partition
/// life cycle (assign, revoke, pause, resume), which is what a stalled
/// stream needs explained. Idempotent: the first call of a process wins.
pub fn test_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STREAMPIPE_TEST_LOG").unwrap_or_else(
                |_| "warn,streampipe_reducer::consumer=info,librdkafka=off,rdkafka=off".into(),
            ),
        )
        .with_test_writer()
        .try_init();
}

/// Redis URL of the stack.
pub fn redis_url() -> String {
    std::env::var("STREAMPIPE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:16379".into())
}

/// A Kafka-protocol broker of the local stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// librdkafka's mock cluster hosted by `streampipe-devbroker`.
    Dev,
    /// The tansu broker (SQLite storage).
    Tansu,
}

impl Broker {
    /// Bootstrap servers.
    pub fn bootstrap(self) -> String {
        match self {
            Broker::Dev => std::env::var("STREAMPIPE_TEST_DEVBROKER")
                .unwrap_or_else(|_| "127.0.0.1:19092".into()),
            Broker::Tansu => {
                std::env::var("STREAMPIPE_TEST_TANSU").unwrap_or_else(|_| "127.0.0.1:19192".into())
            }
        }
    }

    /// Short name for ids.
    pub fn name(self) -> &'static str {
        match self {
            Broker::Dev => "dev",
            Broker::Tansu => "tansu",
        }
    }

    /// Session timeout for reducers in tests: short, so failover tests are quick.
    pub fn session_timeout(self) -> Duration {
        Duration::from_millis(3000)
    }

    /// Creates topics. The dev broker only creates topics through its admin
    /// endpoint; tansu through the Kafka admin API.
    pub fn create_topics(self, topics: &[(&str, i32)]) {
        match self {
            Broker::Dev => {
                let admin = std::env::var("STREAMPIPE_TEST_DEVBROKER_ADMIN")
                    .unwrap_or_else(|_| "127.0.0.1:19093".into());
                for (name, parts) in topics {
                    let resp = http_request(
                        &admin,
                        "POST",
                        &format!("/topics/{name}?partitions={parts}"),
                    );
                    assert!(resp.starts_with("HTTP/1.1 201"), "creating {name}: {resp}");
                }
            }
            Broker::Tansu => {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", self.bootstrap())
                    .create()
                    .expect("admin client");
                let new: Vec<NewTopic<'_>> = topics
                    .iter()
                    .map(|(n, p)| NewTopic::new(n, *p, TopicReplication::Fixed(1)))
                    .collect();
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let res = rt
                    .block_on(admin.create_topics(&new, &AdminOptions::new()))
                    .expect("create_topics");
                for r in res {
                    r.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
                }
                // Wait until the metadata shows every partition.
                for (name, parts) in topics {
                    wait_for(
                        Duration::from_secs(20),
                        &format!("topic {name} in metadata"),
                        || {
                            let c: BaseConsumer = ClientConfig::new()
                                .set("bootstrap.servers", self.bootstrap())
                                .create()
                                .ok()?;
                            let md = c.fetch_metadata(Some(name), Duration::from_secs(5)).ok()?;
                            let t = md.topics().first()?;
                            (t.partitions().len() as i32 == *parts).then_some(())
                        },
                    );
                }
            }
        }
    }
}

/// A minimal HTTP/1.1 request (the tests need no HTTP client dependency for
/// two admin calls); returns the whole response as text.
pub fn http_request(addr: &str, method: &str, path: &str) -> String {
    try_http_request(addr, method, path)
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// Like [`http_request`], but returns connection errors instead of panicking.
pub fn try_http_request(addr: &str, method: &str, path: &str) -> std::io::Result<String> {
    use std::io::BufRead;
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
    // Read the head, then exactly Content-Length bytes when given (some
    // servers, e.g. Chromium's DevTools endpoint, keep the connection open),
    // else until the server closes.
    let mut r = std::io::BufReader::new(s);
    let mut out = String::new();
    let mut len = None;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(out);
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse::<usize>().ok();
            }
        }
        out.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    match len {
        Some(n) => {
            let mut body = vec![0u8; n];
            r.read_exact(&mut body)?;
            out.push_str(&String::from_utf8_lossy(&body));
        }
        None => {
            r.read_to_string(&mut out)?;
        }
    }
    Ok(out)
}

/// Polls `f` until it returns `Some`, panicking with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A unique, valid id for topics, groups and channels.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Records delivery positions of produced records.
#[derive(Clone, Default)]
pub struct Deliveries(Arc<Mutex<Vec<Delivered>>>);

/// One acknowledged record.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// Topic.
    pub topic: String,
    /// Partition it landed on.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Vec<u8>,
    /// Its value.
    pub value: Vec<u8>,
}

impl Deliveries {
    /// Every acknowledged record so far.
    pub fn all(&self) -> Vec<Delivered> {
        self.0.lock().unwrap().clone()
    }
}

/// Producer context that records deliveries and fails loudly on errors.
pub struct TestProducerContext(Deliveries);

impl ClientContext for TestProducerContext {}

impl ProducerContext for TestProducerContext {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        match r {
            Ok(m) => self.0 .0.lock().unwrap().push(Delivered {
                topic: m.topic().to_owned(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().unwrap_or_default().to_vec(),
                value: m.payload().unwrap_or_default().to_vec(),
            }),
            Err((e, _)) => panic!("test record not delivered: {e}"),
        }
    }
}

/// One isolated pipeline on one broker: its own topics, group and Redis prefix.
pub struct Pipeline {
    /// Which broker.
    pub broker: Broker,
    /// Pipeline name (Redis prefix).
    pub name: String,
    /// Partitions of both topics.
    pub partitions: i32,
    /// Reducer configuration for this pipeline.
    pub config: Config,
    producer: ThreadedProducer<TestProducerContext>,
    /// Acknowledged records.
    pub deliveries: Deliveries,
}

impl Pipeline {
    /// Creates the topics (data, commands, dead-letter) of a fresh pipeline.
    pub fn new(broker: Broker, partitions: i32) -> Self {
        let name = unique(&format!("t{}", broker.name()));
        let mut config = Config::new(&broker.bootstrap(), &name, &redis_url());
        config.session_timeout = broker.session_timeout();
        config.statistics_interval = Duration::from_secs(1);
        let dlq = config.dead_letter_topic.clone().unwrap();
        broker.create_topics(&[
            (&config.data_topic, partitions),
            (&config.command_topic, partitions),
            (&dlq, 1),
        ]);
        let deliveries = Deliveries::default();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "1")
            .create_with_context(TestProducerContext(deliveries.clone()))
            .expect("producer");
        Pipeline {
            broker,
            name,
            partitions,
            config,
            producer,
            deliveries,
        }
    }

    /// The pipeline's Redis key schema (scoped by the Kubernetes namespace
    /// when `config.key_namespace` names one, as the operator's pods are).
    pub fn keys(&self) -> Keys {
        Keys::scoped(self.config.key_namespace.as_deref(), &self.name)
    }

    /// Produces a raw record.
    pub fn produce(&self, topic: &str, key: Option<&[u8]>, value: &[u8]) {
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).payload(value);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        let mut rec = rec;
        loop {
            match self.producer.send(rec) {
                Ok(()) => return,
                Err((e, r)) => {
                    assert!(
                        matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ),
                        "produce: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                    rec = r;
                }
            }
        }
    }

    /// Produces a market update with an explicit version.
    pub fn update(&self, market: &str, version: u64, payload: &str) {
        let value = format!(
            r#"{{"v":1,"market":"{market}","version":{version},"ts":{},"payload":{payload}}}"#,
            now_ms()
        );
        self.produce(
            &self.config.data_topic,
            Some(market.as_bytes()),
            value.as_bytes(),
        );
    }

    /// Produces a command.
    pub fn command(&self, kind: CommandKind, channel: &str, market: &str) {
        let value = encode_command(&Cmd {
            kind,
            channel: channel.into(),
            market: market.into(),
        });
        self.produce(&self.config.command_topic, Some(market.as_bytes()), &value);
    }

    /// Waits until every produced record is acknowledged.
    pub fn flush(&self) {
        self.producer
            .flush(Duration::from_secs(30))
            .expect("flush producer");
    }

    /// A new Redis connection.
    pub fn redis(&self) -> redis::Connection {
        redis::Client::open(redis_url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Members of a Redis set.
    pub fn smembers(&self, key: &str) -> Vec<String> {
        let mut v: Vec<String> = redis::cmd("SMEMBERS")
            .arg(key)
            .query(&mut self.redis())
            .unwrap();
        v.sort();
        v
    }

    /// Stored version of a market (0 when none).
    pub fn state_version(&self, market: &str) -> u64 {
        let v: Option<u64> = redis::cmd("HGET")
            .arg(self.keys().market_state(market))
            .arg("v")
            .query(&mut self.redis())
            .unwrap();
        v.unwrap_or(0)
    }

    /// All Redis keys of this pipeline.
    pub fn all_keys(&self) -> Vec<String> {
        let mut v: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.keys().prefix()))
            .query(&mut self.redis())
            .unwrap();
        v.sort();
        v
    }

    /// Waits until the reducer applied the subscription (both directions in Redis).
    pub fn wait_subscribed(&self, channel: &str, market: &str) {
        let keys = self.keys();
        wait_for(
            Duration::from_secs(30),
            &format!("{channel} subscribed to {market}"),
            || {
                (self
                    .smembers(&keys.market_channels(market))
                    .iter()
                    .any(|c| c == channel)
                    && self
                        .smembers(&keys.channel_markets(channel))
                        .iter()
                        .any(|m| m == market))
                .then_some(())
            },
        );
    }

    /// The group's committed offsets for the data topic, by partition.
    pub fn committed_data_offsets(&self) -> HashMap<i32, i64> {
        self.committed_offsets(&self.config.data_topic)
    }

    /// The group's committed offsets for `topic`, by partition.
    pub fn committed_offsets(&self, topic: &str) -> HashMap<i32, i64> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.broker.bootstrap())
            .set("group.id", &self.config.group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(topic, p);
        }
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("committed offsets");
        got.elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect()
    }

    /// Rewinds the group's committed offsets of both topics to the start, as
    /// an operator resetting a group would (no member may be running).
    pub fn rewind_group(&self) {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.broker.bootstrap())
            .set("group.id", &self.config.group)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for topic in [&self.config.data_topic, &self.config.command_topic] {
            for p in 0..self.partitions {
                tpl.add_partition_offset(topic, p, Offset::Offset(0))
                    .unwrap();
            }
        }
        // The broker refuses while the old generation is still winding down.
        let t = Instant::now();
        wait_for(Duration::from_secs(30), "group rewind accepted", || {
            c.commit(&tpl, rdkafka::consumer::CommitMode::Sync).ok()
        });
        eprintln!("rewind accepted after {:?}", t.elapsed());
    }

    /// A consumer of its own group assigned to `partition` of `topic` from
    /// the start.
    fn partition_reader(&self, topic: &str, partition: i32) -> BaseConsumer {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.broker.bootstrap())
            .set("group.id", unique("reader"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
        c.assign(&tpl).unwrap();
        c
    }

    /// Every record value of one partition of `topic` from the start, read
    /// until nothing new arrived for `quiet`.
    pub fn read_topic_partition(
        &self,
        topic: &str,
        partition: i32,
        quiet: Duration,
    ) -> Vec<Vec<u8>> {
        let c = self.partition_reader(topic, partition);
        let mut out = Vec::new();
        let mut last = Instant::now();
        while last.elapsed() < quiet {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                out.push(m.payload().unwrap_or_default().to_vec());
                last = Instant::now();
            }
        }
        out
    }

    /// Reads every record of a topic from the start (for dead-letter checks).
    pub fn read_topic(&self, topic: &str, expect: usize) -> Vec<rdkafka::message::OwnedMessage> {
        let c = self.partition_reader(topic, 0);
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.len() < expect && Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                out.push(m.detach());
            }
        }
        out
    }
}

/// CPU seconds (user + system) from a `/proc/<pid>/stat` or
/// `/proc/<pid>/task/<tid>/stat` file; 0 when unreadable.
pub fn stat_cpu_secs(path: &std::path::Path) -> f64 {
    const USER_HZ: f64 = 100.0;
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the ")" that closes the command name.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    if f.len() > 13 {
        (f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)) / USER_HZ
    } else {
        0.0
    }
}

/// CPU seconds a process has used.
pub fn proc_cpu_secs(pid: u32) -> f64 {
    stat_cpu_secs(std::path::Path::new(&format!("/proc/{pid}/stat")))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// One update a [`Listener`] received.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// When it arrived.
    pub at: Instant,
    /// Arrival (wall clock) minus the producer's timestamp, in ms.
    pub latency_ms: i64,
    /// The market.
    pub market: String,
    /// Its version.
    pub version: u64,
}

/// A Redis pub/sub listener on its own thread, collecting every update
/// published to the topics of the markets it was given (as a publisher pod
/// subscribes to the markets its connections watch).
pub struct Listener {
    messages: Arc<Mutex<Vec<(String, PublishedUpdate)>>>,
    /// When each of `messages` arrived (same index), monotonic and wall clock (ms).
    arrivals: Arc<Mutex<Vec<(Instant, i64)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    /// Subscribes to the topics of `markets` (`Keys::market_topic`) and
    /// returns once Redis confirmed the subscriptions.
    pub fn start(keys: &Keys, markets: &[&str]) -> Self {
        let names: Vec<String> = markets.iter().map(|m| keys.market_topic(m)).collect();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (m, s, k) = (messages.clone(), stop.clone(), keys.clone());
        let a = arrivals.clone();
        let thread = std::thread::spawn(move || {
            let mut conn = redis::Client::open(redis_url())
                .unwrap()
                .get_connection()
                .unwrap();
            let mut ps = conn.as_pubsub();
            for n in &names {
                ps.subscribe(n).unwrap();
            }
            ps.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            ready_tx.send(()).unwrap();
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                match ps.get_message() {
                    Ok(msg) => {
                        let topic = msg.get_channel_name().to_owned();
                        let market = match k.parse_topic(&topic) {
                            Some(Topic::Market(market)) => market.to_owned(),
                            other => panic!("message on {topic:?} ({other:?}), not a market topic"),
                        };
                        let payload: Vec<u8> = msg.get_payload().unwrap();
                        let u = streampipe_contract::decode_published(&payload)
                            .expect("published update decodes");
                        assert_eq!(
                            u.market, market,
                            "update published on another market's topic"
                        );
                        let mut m = m.lock().unwrap();
                        m.push((market, u));
                        a.lock().unwrap().push((Instant::now(), now_ms()));
                    }
                    Err(e) if e.is_timeout() => {}
                    Err(e) => panic!("pubsub: {e}"),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("listener subscribed");
        Listener {
            messages,
            arrivals,
            stop,
            thread: Some(thread),
        }
    }

    /// Every (market, update) received so far, in arrival order.
    pub fn messages(&self) -> Vec<(String, PublishedUpdate)> {
        self.messages.lock().unwrap().clone()
    }

    /// Every update received so far with its arrival time, in arrival order.
    pub fn arrivals(&self) -> Vec<Arrival> {
        let m = self.messages.lock().unwrap();
        let a = self.arrivals.lock().unwrap();
        m.iter()
            .zip(a.iter())
            .map(|((market, u), &(at, wall_ms))| Arrival {
                at,
                latency_ms: wall_ms - u.ts,
                market: market.clone(),
                version: u.version,
            })
            .collect()
    }

    /// The versions received for `market`, in arrival order.
    pub fn versions(&self, market: &str) -> Vec<u64> {
        self.messages()
            .into_iter()
            .filter(|(m, _)| m == market)
            .map(|(_, u)| u.version)
            .collect()
    }

    /// Waits until `pred` holds for the messages received.
    pub fn wait(&self, what: &str, pred: impl Fn(&[(String, PublishedUpdate)]) -> bool) {
        wait_for(Duration::from_secs(30), what, || {
            pred(&self.messages()).then_some(())
        });
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Path of a workspace binary next to the test executable's target directory.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(|p| p.parent()).unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A reducer running as a separate OS process (for crash tests).
pub struct ReducerProcess {
    /// The child process.
    pub child: Child,
    /// Its metrics/health address.
    pub addr: SocketAddr,
}

impl ReducerProcess {
    /// Starts `streampipe-reducer` for the pipeline.
    pub fn spawn(p: &Pipeline) -> Self {
        Self::spawn_with(p, &[])
    }

    /// Starts `streampipe-reducer` for the pipeline with extra flags.
    pub fn spawn_with(p: &Pipeline, extra: &[&str]) -> Self {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let c = &p.config;
        let child = Command::new(workspace_bin("streampipe-reducer"))
            .arg("--brokers")
            .arg(&c.brokers)
            .arg("--pipeline")
            .arg(&c.pipeline)
            .arg("--redis-url")
            .arg(&c.redis_url)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--session-timeout-ms")
            .arg(c.session_timeout.as_millis().to_string())
            .arg("--log-format")
            .arg("text")
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn reducer");
        ReducerProcess { child, addr }
    }

    /// The value of an unlabelled metric, if the endpoint answers.
    ///
    /// # Panics
    /// If the process has exited (so waits on it fail fast).
    pub fn metric(&mut self, name: &str) -> Option<f64> {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("reducer process exited early: {status}");
        }
        let resp = try_http_request(&self.addr.to_string(), "GET", "/metrics").ok()?;
        resp.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// SIGKILL: no flush, no commit, no leave-group.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for a graceful exit; returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .arg("-TERM")
            .arg(&pid)
            .status()
            .unwrap();
        self.child.wait().unwrap().success()
    }
}

impl Drop for ReducerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private Redis that the test can stop and restart on the same port.
pub struct PrivateRedis {
    /// Its port.
    pub port: u16,
    child: std::process::Child,
    /// Extra `redis-server` arguments (persistence), kept for restarts.
    extra: Vec<String>,
}

impl PrivateRedis {
    /// Starts `redis-server` on `port` (no persistence) and waits for it.
    pub fn start(port: u16) -> Self {
        Self::launch(port, vec!["--appendonly".into(), "no".into()])
    }

    /// Starts `redis-server` on `port` with an append-only file in `dir`
    /// (`appendfsync everysec`, as the stack and production run it), so a
    /// restart keeps the data.
    pub fn start_persistent(port: u16, dir: &std::path::Path) -> Self {
        std::fs::create_dir_all(dir).expect("redis data dir");
        Self::launch(
            port,
            vec![
                "--appendonly".into(),
                "yes".into(),
                "--appendfsync".into(),
                "everysec".into(),
                "--dir".into(),
                dir.display().to_string(),
            ],
        )
    }

    fn launch(port: u16, extra: Vec<String>) -> Self {
        let child = Self::spawn_server(port, &extra);
        PrivateRedis { port, child, extra }
    }

    fn spawn_server(port: u16, extra: &[String]) -> std::process::Child {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        let url = format!("redis://127.0.0.1:{port}");
        wait_for(Duration::from_secs(10), "private redis", || {
            let mut c = redis::Client::open(url.as_str())
                .ok()?
                .get_connection()
                .ok()?;
            // Answers only once a persistent one has loaded its data.
            redis::cmd("PING").query::<String>(&mut c).ok().map(|_| ())
        });
        child
    }

    /// Stops the server: `graceful` with SIGTERM (it writes its append-only
    /// file out), else SIGKILL (what it had only in memory is gone).
    pub fn stop(&mut self, graceful: bool) {
        if graceful {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port with the same settings.
    pub fn start_again(&mut self) {
        self.child = Self::spawn_server(self.port, &self.extra);
    }

    /// A connection to it.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stored version of a market there.
    pub fn version(&self, keys: &Keys, market: &str) -> Option<u64> {
        let mut c = redis::Client::open(self.url())
            .ok()?
            .get_connection()
            .ok()?;
        redis::cmd("HGET")
            .arg(keys.market_state(market))
            .arg("v")
            .query::<Option<u64>>(&mut c)
            .ok()?
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private Redis Cluster (3 masters + 3 replicas) run by
/// `scripts/redis-cluster.sh` on `base_port..base_port+5`; `Drop` stops it.
pub struct PrivateCluster {
    /// The first node's port.
    pub base_port: u16,
    dir: PathBuf,
}

/// Nodes of a [`PrivateCluster`]: three masters, one replica each.
pub const CLUSTER_NODES: u16 = 6;

/// How long a failover may take: the script sets cluster-node-timeout to
/// 2 s, the vote and promotion add about as much, and a loaded machine more.
const CLUSTER_FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);

impl PrivateCluster {
    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/redis-cluster.sh")
    }

    fn run_script(action: &str, dir: &std::path::Path, base_port: u16) -> bool {
        Command::new("bash")
            .arg(Self::script())
            .arg(action)
            .arg(dir)
            .arg(base_port.to_string())
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Starts the cluster and waits until every node says `cluster_state:ok`.
    pub fn start(base_port: u16) -> Self {
        let dir = std::env::temp_dir().join(unique("streampipe-cluster"));
        let cluster = PrivateCluster { base_port, dir };
        assert!(
            Self::run_script("up", &cluster.dir, base_port),
            "scripts/redis-cluster.sh up {} {base_port} failed",
            cluster.dir.display()
        );
        cluster
    }

    /// The seed list the script wrote (`redis://…,redis://…`).
    pub fn url(&self) -> String {
        std::fs::read_to_string(self.dir.join("url"))
            .expect("cluster url file")
            .trim()
            .to_owned()
    }

    /// A cluster-aware connection.
    pub fn connection(&self) -> redis::cluster::ClusterConnection {
        let url = self.url();
        let client = redis::cluster::ClusterClient::builder(url.split(','))
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        retry_interrupted(|| client.get_connection()).unwrap()
    }

    /// Ports of the nodes whose process is alive.
    pub fn live_ports(&self) -> Vec<u16> {
        (self.base_port..self.base_port + CLUSTER_NODES)
            .filter(|p| {
                self.pid(*p).is_some_and(|pid| {
                    Command::new("kill")
                        .args(["-0", &pid.to_string()])
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
                })
            })
            .collect()
    }

    fn pid(&self, port: u16) -> Option<u32> {
        std::fs::read_to_string(self.dir.join(format!("{port}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// A plain connection to one node.
    pub fn node(&self, port: u16) -> redis::RedisResult<redis::Connection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        let c = retry_interrupted(|| client.get_connection_with_timeout(Duration::from_secs(2)))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(c)
    }

    /// `(port, slot ranges)` of every master that is not failed, as a live
    /// node sees it in `CLUSTER NODES`.
    pub fn masters(&self) -> Vec<(u16, Vec<(u16, u16)>)> {
        self.masters_except(None)
    }

    /// [`PrivateCluster::masters`], not asking node `skip` (a frozen one
    /// would hold every read for its timeout).
    fn masters_except(&self, skip: Option<u16>) -> Vec<(u16, Vec<(u16, u16)>)> {
        for port in self.live_ports().into_iter().filter(|p| Some(*p) != skip) {
            let Ok(mut c) = self.node(port) else { continue };
            let Ok(nodes) = redis::cmd("CLUSTER").arg("NODES").query::<String>(&mut c) else {
                continue;
            };
            let mut out = Vec::new();
            for line in nodes.lines() {
                // <id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <link> <slot>...
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 8 || !f[2].contains("master") || f[2].contains("fail") {
                    continue;
                }
                let Some(p) = f[1]
                    .split('@')
                    .next()
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
                else {
                    continue;
                };
                let ranges = f[8..]
                    .iter()
                    .filter(|r| !r.starts_with('['))
                    .filter_map(|r| match r.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => r.parse().ok().map(|s| (s, s)),
                    })
                    .collect();
                out.push((p, ranges));
            }
            return out;
        }
        Vec::new()
    }

    /// The port of the master serving `key`'s slot (per a live node).
    pub fn master_of(&self, key: &str) -> Option<u16> {
        self.master_of_except(key, None)
    }

    /// [`PrivateCluster::master_of`], not asking node `skip`.
    fn master_of_except(&self, key: &str, skip: Option<u16>) -> Option<u16> {
        let s = streampipe_contract::slot(key.as_bytes());
        self.masters_except(skip)
            .into_iter()
            .find(|(_, ranges)| ranges.iter().any(|(a, b)| (*a..=*b).contains(&s)))
            .map(|(p, _)| p)
    }

    /// Whether every live node reports `cluster_state:ok`.
    pub fn is_ok(&self) -> bool {
        self.is_ok_without(None)
    }

    /// SIGKILLs the master of `key`'s slot, then waits until a replica took
    /// its slots over and the cluster is ok again. Returns the killed port
    /// and the new master's.
    pub fn kill_master_of(&self, key: &str) -> (u16, u16) {
        let old = self.master_of(key).expect("a master for the key");
        let pid = self.pid(old).expect("pid file of the master");
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        wait_for(CLUSTER_FAILOVER_TIMEOUT, "node process gone", || {
            (!self.live_ports().contains(&old)).then_some(())
        });
        let new = wait_for(
            CLUSTER_FAILOVER_TIMEOUT,
            "replica promoted and cluster ok",
            || {
                let new = self.master_of(key).filter(|p| *p != old)?;
                self.is_ok().then_some(new)
            },
        );
        (old, new)
    }

    /// SIGSTOPs the master of `key`'s slot (a stalled VM or a swapped-out
    /// process: its sockets stay open and answer nothing), then waits until
    /// a replica took its slots over. Returns the frozen node's port, the
    /// new master's, and the frozen node's pid (for [`PrivateCluster::thaw`]).
    pub fn freeze_master_of(&self, key: &str) -> (u16, u16, u32) {
        let old = self.master_of(key).expect("a master for the key");
        let pid = self.pid(old).expect("pid file of the master");
        Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap();
        let new = wait_for(
            CLUSTER_FAILOVER_TIMEOUT,
            "replica promoted and cluster ok",
            || {
                let new = self
                    .master_of_except(key, Some(old))
                    .filter(|p| *p != old)?;
                self.is_ok_without(Some(old)).then_some(new)
            },
        );
        (old, new, pid)
    }

    /// Lets a node frozen by [`PrivateCluster::freeze_master_of`] run again
    /// (it rejoins as a replica of the promoted one).
    pub fn thaw(&self, pid: u32) {
        let _ = Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .status();
    }

    /// Whether every live node but `skip` says `cluster_state:ok`.
    fn is_ok_without(&self, skip: Option<u16>) -> bool {
        self.live_ports()
            .into_iter()
            .filter(|p| Some(*p) != skip)
            .all(|p| {
                self.node(p)
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
                    .is_ok_and(|i| i.contains("cluster_state:ok"))
            })
    }

    /// Stored version of a market, read through a cluster-aware client.
    pub fn version(&self, keys: &Keys, market: &str) -> Option<u64> {
        redis::cmd("HGET")
            .arg(keys.market_state(market))
            .arg("v")
            .query::<Option<u64>>(&mut self.connection())
            .ok()?
    }

    /// Members of a set, read through a cluster-aware client.
    pub fn smembers(&self, key: &str) -> Vec<String> {
        let mut con = self.connection();
        let mut v: Vec<String> =
            retry_interrupted(|| redis::cmd("SMEMBERS").arg(key).query(&mut con)).unwrap();
        v.sort();
        v
    }

    /// `SPUBLISH` calls summed over the live masters (`INFO commandstats`).
    pub fn spublish_calls(&self) -> u64 {
        self.masters()
            .into_iter()
            .filter_map(|(p, _)| {
                let info: String = redis::cmd("INFO")
                    .arg("commandstats")
                    .query(&mut self.node(p).ok()?)
                    .ok()?;
                info.lines()
                    .find_map(|l| l.strip_prefix("cmdstat_spublish:calls="))
                    .and_then(|r| r.split(',').next()?.parse::<u64>().ok())
            })
            .sum()
    }
}

/// How often a Redis call interrupted by a signal is retried.
const EINTR_RETRIES: usize = 5;

/// Runs a blocking Redis call again when a signal interrupted it. The test
/// process reaps the Redis nodes it kills (SIGCHLD), and a socket with a
/// timeout is not restarted after a signal (signal(7)), so a cluster test
/// failed on `Interrupted system call` while its cluster was healthy.
pub fn retry_interrupted<T>(mut f: impl FnMut() -> redis::RedisResult<T>) -> redis::RedisResult<T> {
    for _ in 0..EINTR_RETRIES {
        match f() {
            Err(e) if e.to_string().contains("os error 4") => continue,
            r => return r,
        }
    }
    f()
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        Self::run_script("down", &self.dir, self.base_port);
    }
}
