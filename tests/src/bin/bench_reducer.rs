//! `streampipe-bench-reducer`: drives records through a real Kafka-protocol
//! broker into one reducer. Not a timed test: `scripts/bench-reducer.sh` runs
//! it next to a `redis-benchmark` PUBLISH ceiling on the same machine.
//!
//! `--mode updates` (default): K markets with M subscribed channels each.
//! Phase 1 (throughput): N records are produced while no reducer runs, then
//! one reducer drains them; the figure is records / drain time, and records
//! per CPU-second of the reducer's threads (consumer + librdkafka). Every
//! update of a watched market is published once to its market topic,
//! whatever M is. Phase 2 (latency): records are produced at a fixed rate
//! while the reducer runs; a Redis subscriber on every market topic (as a
//! publisher pod would be) measures producer-send → pub/sub-receive.
//!
//! `--mode subscribe`: S subscribe commands applied by one reducer, twice:
//! S channels on ONE market, then S channels on S markets (one each). The
//! commands are produced before the reducer starts; the figures are
//! commands/s from the first command applied until the core holds all of
//! them, and until Redis has all of them (its sets are polled).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use streampipe_contract::{encode_command, Command, CommandKind, Keys};
use streampipe_reducer::{spawn, Config, Metrics};
use streampipe_tests::{http_request, unique, wait_for};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// Update throughput (backlog drain) and latency (steady rate).
    Updates,
    /// Subscribe-command throughput: one hot market vs. spread markets.
    Subscribe,
}

/// Reducer throughput and latency benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Updates)]
    mode: Mode,
    /// Subscribe commands per scenario (`--mode subscribe`).
    #[arg(long, default_value_t = 100_000)]
    subscribes: usize,
    /// Kafka bootstrap (the dev broker).
    #[arg(long, default_value = "127.0.0.1:39092")]
    brokers: String,
    /// Dev broker admin address (topic creation).
    #[arg(long, default_value = "127.0.0.1:39093")]
    admin: String,
    /// Redis URL.
    #[arg(long, default_value = "redis://127.0.0.1:36379")]
    redis_url: String,
    /// Markets.
    #[arg(long, default_value_t = 10_000)]
    markets: usize,
    /// Subscribed channels per market.
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// Records for the throughput phase (the dev broker keeps ~5 MiB per
    /// partition, so keep records × ~150 B / partitions below that).
    #[arg(long, default_value_t = 400_000)]
    records: usize,
    /// Partitions of both topics.
    #[arg(long, default_value_t = 16)]
    partitions: i32,
    /// Updates per second in the latency phase.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Most records per reducer batch.
    #[arg(long, default_value_t = streampipe_reducer::consumer::DEFAULT_BATCH_MAX_RECORDS)]
    batch_max_records: usize,
    /// Extra librdkafka property for the reducer, `key=value` (repeatable).
    #[arg(long = "kafka-option")]
    kafka_options: Vec<String>,
    /// Market-id prefixes whose markets keep an event history (`*`: all;
    /// empty: none), to measure what the append costs per update.
    #[arg(long, default_value = "")]
    history_prefixes: String,
    /// Entries kept per history market.
    #[arg(long, default_value_t = streampipe_contract::history::DEFAULT_MAX_LEN)]
    history_max_len: u64,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// CPU seconds of this process's threads, by thread name (numbers folded).
fn threads_cpu() -> HashMap<String, f64> {
    let mut out = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for t in dir.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let name: String = comm
                .trim()
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .collect();
            *out.entry(name).or_insert(0.0) +=
                streampipe_tests::stat_cpu_secs(&t.path().join("stat"));
        }
    }
    out
}

/// CPU seconds of other processes on the machine whose name starts with `prefix`.
fn process_cpu(prefix: &str) -> f64 {
    let mut total = 0.0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for p in dir.flatten() {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            if comm.trim().starts_with(prefix) {
                total += streampipe_tests::stat_cpu_secs(&p.path().join("stat"));
            }
        }
    }
    total
}

fn thread_cpu(prefixes: &[&str]) -> f64 {
    threads_cpu()
        .into_iter()
        .filter(|(n, _)| prefixes.iter().any(|p| n.starts_with(p)))
        .map(|(_, c)| c)
        .sum()
}

fn wait_for_opt(timeout: Duration, f: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Subscribes to every market topic on one connection (as a publisher pod
/// would), counts messages and records latencies of payloads carrying `sent_us`.
fn subscriber(
    redis_url: String,
    names: Vec<String>,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    record_latency: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<Vec<u64>> {
    std::thread::Builder::new()
        .name("bench-subscriber".into())
        .spawn(move || {
            let mut conn = redis::Client::open(redis_url)
                .unwrap()
                .get_connection()
                .unwrap();
            let mut ps = conn.as_pubsub();
            for chunk in names.chunks(1000) {
                ps.subscribe(chunk).unwrap();
            }
            ps.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            ready.send(()).unwrap();
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match ps.get_message() {
                    Ok(msg) => {
                        received.fetch_add(1, Ordering::Relaxed);
                        if record_latency.load(Ordering::Relaxed) {
                            let payload: Vec<u8> = msg.get_payload().unwrap();
                            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                            if let Some(sent) = v["payload"]["sent_us"].as_u64() {
                                lat.push(now_us().saturating_sub(sent));
                            }
                        }
                    }
                    Err(e) if e.is_timeout() => {}
                    Err(e) => panic!("pubsub: {e}"),
                }
            }
            lat
        })
        .unwrap()
}

/// A fresh pipeline on the dev broker: reducer configuration with the
/// bench's settings, topics created.
fn new_pipeline(a: &Args) -> anyhow::Result<Config> {
    let pipeline = unique("bench");
    let mut config = Config::new(&a.brokers, &pipeline, &a.redis_url);
    config.dead_letter_topic = None;
    config.batch_max_records = a.batch_max_records;
    config.history = streampipe_contract::History::parse(&a.history_prefixes, a.history_max_len)?;
    for kv in &a.kafka_options {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--kafka-option wants key=value"))?;
        config.kafka_options.push((k.into(), v.into()));
    }
    for (t, n) in [
        (&config.data_topic, a.partitions),
        (&config.command_topic, a.partitions),
    ] {
        let r = http_request(&a.admin, "POST", &format!("/topics/{t}?partitions={n}"));
        anyhow::ensure!(r.starts_with("HTTP/1.1 201"), "creating {t}: {r}");
    }
    Ok(config)
}

/// The bench's producer. `compression` matters for commands to one market:
/// they all land on one partition, and the dev broker keeps ~5 MiB per
/// partition (lz4 shrinks 100 000 near-identical commands well below that).
fn producer(
    a: &Args,
    compression: &str,
) -> anyhow::Result<ThreadedProducer<DefaultProducerContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &a.brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.codec", compression)
        .create()?)
}

/// Sends a record, waiting while the producer's queue is full.
fn send(producer: &ThreadedProducer<DefaultProducerContext>, topic: &str, key: &str, value: &[u8]) {
    let mut rec = BaseRecord::<str, [u8]>::to(topic).key(key).payload(value);
    loop {
        match producer.send(rec) {
            Ok(()) => return,
            Err((_, r)) => {
                rec = r;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

fn subscribe_command(channel: String, market: String) -> Vec<u8> {
    encode_command(&Command {
        kind: CommandKind::Subscribe,
        channel,
        market,
    })
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    match a.mode {
        Mode::Updates => updates(&a),
        Mode::Subscribe => {
            let n = a.subscribes;
            println!(
                "== subscribe: {n} subscribe commands applied by one reducer, {} partitions",
                a.partitions
            );
            println!("scenario                         applied in core          in Redis");
            subscribes(&a, "one market", |i| {
                (format!("ch{i}"), "hot.market".into())
            })?;
            subscribes(&a, "spread over as many markets", |i| {
                (format!("ch{i}"), format!("mkt.{i}"))
            })?;
            Ok(())
        }
    }
}

/// Produces `a.subscribes` subscribe commands (`pair(i)` = channel, market),
/// lets a fresh reducer apply them, and prints commands/s until the core
/// held them and until Redis had them.
fn subscribes(
    a: &Args,
    scenario: &str,
    pair: impl Fn(usize) -> (String, String),
) -> anyhow::Result<()> {
    let config = new_pipeline(a)?;
    let keys = Keys::new(&config.pipeline);
    let producer = producer(a, "lz4")?;
    let mut markets = std::collections::HashSet::new();
    for i in 0..a.subscribes {
        let (channel, market) = pair(i);
        send(
            &producer,
            &config.command_topic,
            &market,
            &subscribe_command(channel, market.clone()),
        );
        markets.insert(market);
    }
    producer.flush(Duration::from_secs(120))?;
    let one_market = (markets.len() == 1).then(|| markets.into_iter().next().expect("one"));

    // Redis has them all when the market set holds every channel (one
    // market) or the partition index holds every market (spread).
    let mut redis = redis::Client::open(a.redis_url.as_str())?.get_connection()?;
    let mut in_redis = || -> u64 {
        let mut pipe = redis::pipe();
        match &one_market {
            Some(m) => {
                pipe.cmd("SCARD").arg(keys.market_channels(m));
            }
            None => {
                for p in 0..a.partitions {
                    pipe.cmd("SCARD").arg(keys.partition_markets(p));
                }
            }
        }
        pipe.query::<Vec<u64>>(&mut redis)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    };

    let metrics = Arc::new(Metrics::new());
    let applied = || metrics.commands.with_label_values(&["subscribe"]).get();
    let cpu_before = thread_cpu(&["reducer-", "rdk:"]);
    let redis_before = process_cpu("redis-server");
    let reducer = spawn(config.clone(), metrics.clone())?;
    let start = wait_for(Duration::from_secs(60), "first command applied", || {
        (applied() > 0).then(Instant::now)
    });
    let want = a.subscribes as u64;
    let mut core_done = None;
    wait_for(Duration::from_secs(600), "subscriptions in Redis", || {
        if core_done.is_none() && applied() >= want {
            core_done = Some(start.elapsed());
        }
        (in_redis() >= want).then_some(())
    });
    let redis_done = start.elapsed();
    let core_done = core_done.unwrap_or(redis_done);
    let cpu = thread_cpu(&["reducer-", "rdk:"]) - cpu_before;
    let redis_cpu = process_cpu("redis-server") - redis_before;
    let rate = |d: Duration| want as f64 / d.as_secs_f64();
    println!(
        "{scenario:<32} {:>8.0} /s ({:>6.2} s)  {:>8.0} /s ({:>6.2} s)",
        rate(core_done),
        core_done.as_secs_f64(),
        rate(redis_done),
        redis_done.as_secs_f64()
    );
    println!(
        "    CPU: reducer threads {cpu:.2} s ({:.0} commands per CPU-second), redis-server {redis_cpu:.2} s; gauges: subscriptions {}, watched markets {}, largest market {}",
        want as f64 / cpu,
        metrics.subscriptions.get(),
        metrics.watched_markets.get(),
        metrics.max_market_channels.get()
    );
    reducer.shutdown()?;
    Ok(())
}

/// `--mode updates`: backlog drain throughput, then steady-rate latency.
fn updates(a: &Args) -> anyhow::Result<()> {
    let config = new_pipeline(a)?;
    let producer = producer(a, "none")?;
    let send = |topic: &str, key: &str, value: &[u8]| send(&producer, topic, key, value);

    let markets: Vec<String> = (0..a.markets).map(|i| format!("mkt.{i}")).collect();
    let channels = a.markets.max(1);
    let keys = Keys::new(&config.pipeline);
    for (i, m) in markets.iter().enumerate() {
        for j in 0..a.subscribers {
            let ch = format!("ch{}", (i + j * 7919) % channels);
            send(&config.command_topic, m, &subscribe_command(ch, m.clone()));
        }
    }
    // A publisher pod subscribes to the topics of the markets it serves.
    let topic_names: Vec<String> = markets.iter().map(|m| keys.market_topic(m)).collect();
    producer.flush(Duration::from_secs(60))?;

    // Subscriptions go through the real command path.
    let metrics = Arc::new(Metrics::new());
    let reducer = spawn(config.clone(), metrics.clone())?;
    let want = (a.markets * a.subscribers) as u64;
    wait_for(Duration::from_secs(120), "subscriptions applied", || {
        let c = metrics.commands.with_label_values(&["subscribe"]).get()
            + metrics
                .skipped
                .with_label_values(&["duplicate_subscribe"])
                .get();
        (c >= want).then_some(())
    });
    reducer.shutdown()?;

    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let record_latency = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let sub = subscriber(
        a.redis_url.clone(),
        topic_names,
        stop.clone(),
        received.clone(),
        record_latency.clone(),
        ready_tx,
    );
    ready_rx.recv()?;

    // Phase 1: drain a backlog.
    let payload_pad = r#""home":1.95,"draw":3.40,"away":4.20,"status":"open""#;
    let t = Instant::now();
    let mut versions: HashMap<usize, u64> = HashMap::new();
    for n in 0..a.records {
        let i = n % a.markets;
        let v = versions.entry(i).or_insert(0);
        *v += 1;
        let value = format!(
            r#"{{"v":1,"market":"{}","version":{},"ts":{},"payload":{{{payload_pad}}}}}"#,
            markets[i],
            v,
            now_us() / 1000
        );
        send(&config.data_topic, &markets[i], value.as_bytes());
    }
    producer.flush(Duration::from_secs(120))?;
    eprintln!("produced {} records in {:.1?}", a.records, t.elapsed());

    // Kafka-side ceiling: a bare consumer draining the same backlog.
    {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &a.brokers)
            .set("group.id", unique("raw"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set(
                "fetch.wait.max.ms",
                streampipe_reducer::consumer::FETCH_WAIT_MAX_MS.to_string(),
            )
            .set(
                "fetch.queue.backoff.ms",
                streampipe_reducer::consumer::FETCH_QUEUE_BACKOFF_MS.to_string(),
            );
        for (k, v) in &config.kafka_options {
            cc.set(k, v);
        }
        let c: BaseConsumer = cc.create()?;
        c.subscribe(&[&config.data_topic, &config.command_topic])?;
        let mut n = 0usize;
        let mut t = None;
        while n < a.records {
            if let Some(Ok(_)) = c.poll(Duration::from_millis(100)) {
                t.get_or_insert_with(Instant::now);
                n += 1;
            }
        }
        let secs = t.map(|t| t.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
        println!(
            "== ceiling: bare rdkafka consumer drains the backlog at {:.0} records/s",
            n as f64 / secs
        );
    }

    let metrics = Arc::new(Metrics::new());
    let cpu_before = thread_cpu(&["reducer-", "rdk:"]);
    let threads_before = threads_cpu();
    let (redis_before, broker_before) =
        (process_cpu("redis-server"), process_cpu("streampipe-devb"));
    let pub_before = received.load(Ordering::Relaxed);
    let reducer = spawn(config.clone(), metrics.clone())?;
    let processed = || metrics.updates_applied.get() + metrics.updates_stale.get();
    let start = wait_for(Duration::from_secs(60), "first record", || {
        (processed() > 0).then(Instant::now)
    });
    let start_count = processed();
    wait_for(Duration::from_secs(600), "backlog drained", || {
        (processed() >= a.records as u64).then_some(())
    });
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = thread_cpu(&["reducer-", "rdk:"]) - cpu_before;
    let (redis_cpu, broker_cpu) = (
        process_cpu("redis-server") - redis_before,
        process_cpu("streampipe-devb") - broker_before,
    );
    let mut breakdown: Vec<(String, f64)> = threads_cpu()
        .into_iter()
        .map(|(n, c)| {
            let b = threads_before.get(&n).copied().unwrap_or(0.0);
            (n, c - b)
        })
        .filter(|(_, c)| *c > 0.005)
        .collect();
    breakdown.sort_by(|a, b| b.1.total_cmp(&a.1));
    let drained = (processed() - start_count) as f64;
    let published = metrics.publishes.get();
    let _ = wait_for_opt(Duration::from_secs(10), || {
        received.load(Ordering::Relaxed) - pub_before >= published
    });
    let delivered = received.load(Ordering::Relaxed) - pub_before;
    let batches = metrics.batch_records.get_sample_count();
    println!(
        "== phase 1: drain {} records, {} markets, {} subscriber(s) per market, {} partitions, history {}",
        a.records,
        a.markets,
        a.subscribers,
        a.partitions,
        if config.history.is_on() {
            format!("on ({:?}, max len {})", a.history_prefixes, a.history_max_len)
        } else {
            "off".into()
        }
    );
    println!("updates/s:             {:>10.0}", drained / elapsed);
    println!(
        "publishes/s:           {:>10.0}",
        metrics.publishes.get() as f64 / elapsed
    );
    println!(
        "updates per CPU-second:{:>10.0}   (reducer threads + librdkafka threads: {:.2} s CPU)",
        a.records as f64 / cpu,
        cpu
    );
    println!("CPU during the drain ({elapsed:.2} s wall): redis-server {redis_cpu:.2} s, dev broker {broker_cpu:.2} s, bench threads: {}",
        breakdown.iter().map(|(n, c)| format!("{n} {c:.2}")).collect::<Vec<_>>().join(", "));
    println!("published {published}, delivered to the subscriber {delivered}");
    if config.history.is_on() {
        // Redis memory of the streams: a sample of markets, per stream and
        // per entry (MEMORY USAGE with all samples: exact for listpacks).
        let mut redis = redis::Client::open(a.redis_url.as_str())?.get_connection()?;
        let sample: Vec<&String> = markets.iter().take(100).collect();
        let (mut bytes, mut entries, mut n) = (0u64, 0u64, 0u64);
        for m in &sample {
            let key = keys.market_history(m);
            let len: u64 = redis::cmd("XLEN").arg(&key).query(&mut redis)?;
            let mem: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(&key)
                .arg("SAMPLES")
                .arg(0)
                .query(&mut redis)?;
            if let Some(mem) = mem {
                bytes += mem;
                entries += len;
                n += 1;
            }
        }
        println!(
            "history streams: {} entries appended; a stream of {:.0} entries holds {:.0} bytes ({:.0} bytes per entry, {} streams sampled)",
            metrics.history.with_label_values(&["appended"]).get(),
            entries as f64 / n.max(1) as f64,
            bytes as f64 / n.max(1) as f64,
            bytes as f64 / entries.max(1) as f64,
            n
        );
    }
    println!(
        "batches: {} (mean {:.0} records), mean Redis flush {:.2} ms",
        batches,
        metrics.batch_records.get_sample_sum() / batches as f64,
        1000.0 * metrics.flush_seconds.get_sample_sum() / batches as f64
    );

    // Phase 2: steady rate, end-to-end latency.
    record_latency.store(true, Ordering::Relaxed);
    let hist_before = (
        metrics.record_to_publish_seconds.get_sample_sum(),
        metrics.record_to_publish_seconds.get_sample_count(),
    );
    let interval = Duration::from_secs_f64(1.0 / a.rate as f64);
    let total = a.rate * a.seconds;
    let t0 = Instant::now();
    for n in 0..total {
        let due = t0 + interval * n as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let i = (n as usize * 7) % a.markets;
        let v = versions.entry(i).or_insert(0);
        *v += 1;
        let value = format!(
            r#"{{"v":1,"market":"{}","version":{},"ts":{},"payload":{{"sent_us":{},{payload_pad}}}}}"#,
            markets[i],
            v,
            now_us() / 1000,
            now_us()
        );
        send(&config.data_topic, &markets[i], value.as_bytes());
    }
    producer.flush(Duration::from_secs(60))?;
    let want = (a.records as u64) + total;
    wait_for(Duration::from_secs(60), "latency phase processed", || {
        (processed() >= want).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let mut lat = sub.join().unwrap();
    lat.sort_unstable();
    let h = &metrics.record_to_publish_seconds;
    println!(
        "== phase 2: {} updates/s for {} s, measured producer send → subscriber receive",
        a.rate, a.seconds
    );
    println!(
        "samples: {}  p50: {:.2} ms  p99: {:.2} ms  max: {:.2} ms",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0)
    );
    println!(
        "reducer record→publish histogram mean: {:.2} ms (ms-resolution Kafka timestamps)",
        1000.0 * (h.get_sample_sum() - hist_before.0)
            / (h.get_sample_count() - hist_before.1).max(1) as f64
    );
    reducer.shutdown()?;
    Ok(())
}
