//! `streampipe-feed`: a demo odds feed. Produces realistic match-odds updates
//! for K football markets at R updates/s to a pipeline's data topic, keyed by
//! market with the murmur2 partitioner, until SIGTERM/SIGINT.
//!
//! Each market holds decimal odds for home / draw / away that drift as a
//! random walk around a fair book with a ~5% overround, and now and then the
//! market is suspended for a few updates (as after a goal).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

/// Demo odds feed for streampipe.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "STREAMPIPE_KAFKA_BROKERS",
        default_value = "127.0.0.1:19092"
    )]
    brokers: String,
    /// Data topic.
    #[arg(long, env = "STREAMPIPE_DATA_TOPIC", default_value = "streampipe.data")]
    topic: String,
    /// Number of markets.
    #[arg(long, default_value_t = 200)]
    markets: usize,
    /// Updates per second, all markets together.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Stop after this many seconds (0: run until a signal).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// Command topic, for `--demo-channel`.
    #[arg(
        long,
        env = "STREAMPIPE_COMMAND_TOPIC",
        default_value = "streampipe.commands"
    )]
    command_topic: String,
    /// Before feeding, subscribe this channel to the first `--demo-markets`
    /// markets (so the pipeline has a subscriber without a publisher).
    #[arg(long)]
    demo_channel: Option<String>,
    /// How many markets `--demo-channel` watches.
    #[arg(long, default_value_t = 5)]
    demo_markets: usize,
    /// Print the ids of the first N markets (comma-separated) and exit.
    #[arg(long)]
    list_markets: Option<usize>,
}

/// xorshift64*: a tiny deterministic generator; a demo needs no crypto.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const TEAMS: &[&str] = &[
    "Arsenal",
    "Aston Villa",
    "Brentford",
    "Brighton",
    "Chelsea",
    "Everton",
    "Fulham",
    "Liverpool",
    "Man City",
    "Man Utd",
    "Newcastle",
    "Spurs",
    "West Ham",
    "Wolves",
    "Barcelona",
    "Real Madrid",
    "Atletico",
    "Sevilla",
    "Juventus",
    "Inter",
    "Milan",
    "Napoli",
    "Roma",
    "Bayern",
    "Dortmund",
    "Leipzig",
    "PSG",
    "Marseille",
    "Lyon",
    "Ajax",
    "PSV",
    "Benfica",
    "Porto",
    "Celtic",
];
const LEAGUES: &[&str] = &["epl", "laliga", "seriea", "bundesliga", "ligue1"];

struct Market {
    id: String,
    home: &'static str,
    away: &'static str,
    /// Implied probabilities of home, draw, away (sum 1).
    p: [f64; 3],
    version: u64,
    suspended_for: u32,
}

fn odds(p: f64) -> f64 {
    // 5% overround, rounded to two decimals like a bookmaker's display.
    ((1.0 / (p * 1.05)) * 100.0).round() / 100.0
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(
        a.markets > 0 && a.rate > 0,
        "--markets and --rate must be positive"
    );
    let stop = Arc::new(AtomicBool::new(false));
    {
        // Signals are awaited on a small runtime of their own; the feed loop
        // only reads the flag.
        let stop = stop.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::spawn(move || {
            rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            });
            stop.store(true, Ordering::Relaxed);
        });
    }
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &a.brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "2")
        .create()?;
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    let mut markets: Vec<Market> = (0..a.markets)
        .map(|i| {
            let home = TEAMS[i % TEAMS.len()];
            let away = TEAMS[(i * 7 + 3) % TEAMS.len()];
            let h = 0.25 + 0.35 * rng.unit();
            let d = 0.22 + 0.08 * rng.unit();
            Market {
                id: format!(
                    "football.{}.{}:match_odds",
                    LEAGUES[i % LEAGUES.len()],
                    1000 + i
                ),
                home,
                away: if away == home { "Celtic" } else { away },
                p: [h, d, 1.0 - h - d],
                version: 0,
                suspended_for: 0,
            }
        })
        .collect();
    if let Some(n) = a.list_markets {
        let ids: Vec<&str> = markets.iter().take(n).map(|m| m.id.as_str()).collect();
        println!("{}", ids.join(","));
        return Ok(());
    }
    if let Some(channel) = &a.demo_channel {
        streampipe_contract::validate_channel_id(channel)?;
        for m in markets.iter().take(a.demo_markets) {
            let cmd = streampipe_contract::encode_command(&streampipe_contract::Command {
                kind: streampipe_contract::CommandKind::Subscribe,
                channel: channel.clone(),
                market: m.id.clone(),
            });
            producer
                .send(
                    BaseRecord::<str, [u8]>::to(&a.command_topic)
                        .key(&m.id)
                        .payload(&cmd),
                )
                .map_err(|(e, _)| e)?;
        }
        producer.flush(Duration::from_secs(10))?;
        eprintln!(
            "feed: channel {channel:?} subscribed to {} markets",
            a.demo_markets.min(markets.len())
        );
    }
    let interval = Duration::from_secs_f64(1.0 / f64::from(a.rate));
    let started = Instant::now();
    let mut sent: u64 = 0;
    eprintln!(
        "feed: {} markets at {} updates/s to {} on {}",
        a.markets, a.rate, a.topic, a.brokers
    );
    while !stop.load(Ordering::Relaxed) {
        if a.seconds > 0 && started.elapsed() >= Duration::from_secs(a.seconds) {
            break;
        }
        let due = started + interval * sent as u32;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // A few markets are much busier than the rest, as in-play markets are.
        let i = if rng.unit() < 0.3 {
            (rng.next() % 10) as usize % a.markets
        } else {
            (rng.next() % a.markets as u64) as usize
        };
        let m = &mut markets[i];
        m.version += 1;
        let status = if m.suspended_for > 0 {
            m.suspended_for -= 1;
            "suspended"
        } else if rng.unit() < 0.002 {
            m.suspended_for = 5;
            "suspended"
        } else {
            // Random walk in probability space, renormalised.
            for p in &mut m.p {
                *p = (*p * (1.0 + 0.04 * (rng.unit() - 0.5))).clamp(0.03, 0.9);
            }
            let sum: f64 = m.p.iter().sum();
            for p in &mut m.p {
                *p /= sum;
            }
            "open"
        };
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis();
        let value = format!(
            r#"{{"v":1,"market":"{}","version":{},"ts":{},"payload":{{"event":"{} v {}","home":{:.2},"draw":{:.2},"away":{:.2},"status":"{}"}}}}"#,
            m.id,
            m.version,
            ts,
            m.home,
            m.away,
            odds(m.p[0]),
            odds(m.p[1]),
            odds(m.p[2]),
            status
        );
        let mut rec = BaseRecord::<str, str>::to(&a.topic)
            .key(&m.id)
            .payload(&value);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((e, r)) => {
                    eprintln!("feed: produce: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(50));
                    rec = r;
                }
            }
        }
        sent += 1;
    }
    producer.flush(Duration::from_secs(10))?;
    eprintln!("feed: sent {sent} updates");
    Ok(())
}
