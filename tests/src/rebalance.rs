//! A rebalance scenario for the reducer tests and benchmark: in-process
//! reducers of one pipeline, a steady stream of updates to markets on every
//! partition, a scale-up and a restart while commands arrive, and what each
//! partition saw meanwhile (its owners, the longest silence of its updates,
//! their latency).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use streampipe_contract::{partition_for, CommandKind};
use streampipe_reducer::{spawn, Metrics, ReducerHandle};

use crate::{wait_for, Arrival, Broker, Listener, Pipeline};

/// Partitions of the scenario's topics (the issue's measurement had 8).
pub const PARTITIONS: i32 = 8;

/// Markets per partition.
const MARKETS_PER_PARTITION: usize = 2;

/// Pause between two rounds of updates (one per market): 50 updates/s per
/// market, so a healthy partition is never silent for long.
const ROUND_EVERY: Duration = Duration::from_millis(20);

/// The same on tansu, whose SQLite storage takes a few hundred records a
/// second on this machine: 10 updates/s per market.
const ROUND_EVERY_TANSU: Duration = Duration::from_millis(100);

/// How often the owners of every partition are sampled during an event.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// How long the assignment must stay complete and unchanged for an event
/// to count as over.
const SETTLED_FOR: Duration = Duration::from_millis(1500);

/// Longest an event may take (the mock broker's coordinator waits
/// session timeout − 1 s per round, several rounds per event).
const EVENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The assignor under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The reducer's default: `cooperative-sticky` (incremental).
    Cooperative,
    /// The eager `range` assignor the reducer used before (set through a
    /// user option), as the baseline.
    Eager,
}

impl Strategy {
    /// Name for output.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Cooperative => "cooperative-sticky",
            Strategy::Eager => "range (eager)",
        }
    }
}

/// What one partition saw during an event.
#[derive(Debug, Clone)]
pub struct PartitionReport {
    /// The partition.
    pub partition: i32,
    /// Whether it had one owner, alive, in every sample of the event.
    pub kept: bool,
    /// Whether its owner after the event is its owner before it: the
    /// partitions a rebalance had no reason to move (with an eager assignor
    /// they were revoked and assigned back all the same).
    pub stayed: bool,
    /// The longest time without any of its updates arriving, in ms.
    pub max_gap_ms: u64,
    /// When that silence began, in ms after the event began.
    pub gap_at_ms: u64,
    /// p99 of its updates' latency (producer timestamp → pub/sub), in ms.
    pub p99_ms: i64,
}

/// What an event (scale-up or restart) did to every partition.
#[derive(Debug, Clone)]
pub struct EventReport {
    /// "scale-up" or "restart".
    pub event: &'static str,
    /// How long until the assignment was complete and settled, in ms.
    pub settled_ms: u64,
    /// Per partition.
    pub partitions: Vec<PartitionReport>,
    /// The same partitions' p99 latency in a calm window before the event.
    pub calm_p99_ms: i64,
}

impl EventReport {
    /// Partitions with one owner throughout.
    pub fn kept(&self) -> Vec<&PartitionReport> {
        self.partitions.iter().filter(|p| p.kept).collect()
    }

    /// Partitions with the same owner before and after.
    pub fn stayed(&self) -> Vec<&PartitionReport> {
        self.partitions.iter().filter(|p| p.stayed).collect()
    }

    /// Partitions whose owner changed.
    pub fn moved(&self) -> Vec<&PartitionReport> {
        self.partitions.iter().filter(|p| !p.stayed).collect()
    }

    /// The longest silence of any partition that stayed, in ms (0 when none).
    pub fn stayed_max_gap_ms(&self) -> u64 {
        self.stayed()
            .iter()
            .map(|p| p.max_gap_ms)
            .max()
            .unwrap_or(0)
    }

    /// The longest silence of any partition never unowned, in ms (0 when none).
    pub fn kept_max_gap_ms(&self) -> u64 {
        self.kept().iter().map(|p| p.max_gap_ms).max().unwrap_or(0)
    }

    /// The longest silence of any moved partition, in ms (0 when none).
    pub fn moved_max_gap_ms(&self) -> u64 {
        self.moved().iter().map(|p| p.max_gap_ms).max().unwrap_or(0)
    }

    /// The highest p99 latency of the partitions that stayed, during the event.
    pub fn stayed_p99_ms(&self) -> i64 {
        self.stayed().iter().map(|p| p.p99_ms).max().unwrap_or(0)
    }

    /// One line for output.
    pub fn summary(&self) -> String {
        format!(
            "{}: settled after {} ms; {} partitions stayed with their owner ({} never unowned), longest silence {} ms, p99 {} ms (calm p99 {} ms); {} moved, longest silence {} ms",
            self.event,
            self.settled_ms,
            self.stayed().len(),
            self.kept().len(),
            self.stayed_max_gap_ms(),
            self.stayed_p99_ms(),
            self.calm_p99_ms,
            self.moved().len(),
            self.moved_max_gap_ms(),
        )
    }
}

/// The whole scenario's outcome.
#[derive(Debug, Clone)]
pub struct ScenarioReport {
    /// The scale-up from two reducers to three.
    pub scale_up: EventReport,
    /// The restart of one of the three.
    pub restart: EventReport,
}

/// A reducer of the scenario.
struct Member {
    metrics: Arc<Metrics>,
    handle: Option<ReducerHandle>,
}

impl Member {
    fn start(p: &Pipeline) -> Self {
        let metrics = Arc::new(Metrics::new());
        let handle = spawn(p.config.clone(), metrics.clone()).expect("reducer starts");
        Member {
            metrics,
            handle: Some(handle),
        }
    }

    fn owns(&self, partition: i32) -> bool {
        self.handle.is_some()
            && self
                .metrics
                .partition_owned
                .get_metric_with_label_values(&[&partition.to_string()])
                .map(|g| g.get() == 1)
                .unwrap_or(false)
    }
}

/// Owner (member index) of every partition, `None` when unowned or owned twice.
fn owners(members: &[Member]) -> Vec<Option<usize>> {
    (0..PARTITIONS)
        .map(|p| {
            let o: Vec<usize> = members
                .iter()
                .enumerate()
                .filter(|(_, m)| m.owns(p))
                .map(|(i, _)| i)
                .collect();
            (o.len() == 1).then(|| o[0])
        })
        .collect()
}

/// Markets, `MARKETS_PER_PARTITION` on every partition.
fn markets() -> Vec<String> {
    let mut per: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        let m = format!("R{i}");
        let p = partition_for(m.as_bytes(), PARTITIONS as u32);
        let v = per.entry(p).or_default();
        if v.len() < MARKETS_PER_PARTITION {
            v.push(m);
        }
        if per.len() == PARTITIONS as usize
            && per.values().all(|v| v.len() == MARKETS_PER_PARTITION)
        {
            break;
        }
    }
    per.into_values().flatten().collect()
}

fn partition_of(market: &str) -> i32 {
    partition_for(market.as_bytes(), PARTITIONS as u32) as i32
}

fn p99(mut v: Vec<i64>) -> i64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) * 99) / 100]
}

/// Per partition: the longest silence within `[from, to]` and the p99
/// latency of the updates that arrived in it.
fn gaps(arrivals: &[Arrival], from: Instant, to: Instant) -> BTreeMap<i32, (u64, u64, i64)> {
    let mut times: BTreeMap<i32, Vec<(Instant, i64)>> = BTreeMap::new();
    for a in arrivals.iter().filter(|a| a.at >= from && a.at <= to) {
        times
            .entry(partition_of(&a.market))
            .or_default()
            .push((a.at, a.latency_ms));
    }
    (0..PARTITIONS)
        .map(|p| {
            let t = times.remove(&p).unwrap_or_default();
            let mut prev = from;
            let (mut gap, mut gap_at) = (Duration::ZERO, from);
            for at in t.iter().map(|&(at, _)| at).chain([to]) {
                if at.saturating_duration_since(prev) > gap {
                    gap = at.saturating_duration_since(prev);
                    gap_at = prev;
                }
                prev = at;
            }
            let lat = p99(t.iter().map(|&(_, l)| l).collect());
            let at = (gap_at - from).as_millis() as u64;
            (p, (gap.as_millis() as u64, at, lat))
        })
        .collect()
}

/// Runs `event`, sampling the owners until the assignment is complete and
/// unchanged for [`SETTLED_FOR`] and `done` holds; reports every partition.
fn observe(
    name: &'static str,
    members: &mut Vec<Member>,
    listener: &Listener,
    event: impl FnOnce(&mut Vec<Member>),
    done: impl Fn(&[Member]) -> bool,
) -> EventReport {
    // The event starts from a complete assignment. tansu sometimes takes
    // a partition back after the previous event looked settled and hands
    // it out a round later: wait for that round rather than start mid-way.
    let owned_by = Instant::now() + Duration::from_secs(30);
    while !owners(members).iter().all(Option::is_some) && Instant::now() < owned_by {
        std::thread::sleep(SAMPLE_EVERY);
    }
    let calm_from = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let start = Instant::now();
    let before = owners(members);
    assert!(
        before.iter().all(Option::is_some),
        "{name}: every partition owned before the event: {before:?}"
    );
    event(members);
    let mut kept: Vec<bool> = vec![true; PARTITIONS as usize];
    let mut last = owners(members);
    let mut stable_since = Instant::now();
    loop {
        std::thread::sleep(SAMPLE_EVERY);
        let now = owners(members);
        for (p, k) in kept.iter_mut().enumerate() {
            if now[p] != before[p] {
                *k = false;
            }
        }
        if now != last {
            last = now.clone();
            stable_since = Instant::now();
        }
        if now.iter().all(Option::is_some) && done(members) && stable_since.elapsed() >= SETTLED_FOR
        {
            break;
        }
        assert!(
            start.elapsed() < EVENT_TIMEOUT,
            "{name}: assignment not settled after {EVENT_TIMEOUT:?}: {now:?}"
        );
    }
    let end = Instant::now();
    let after = owners(members);
    let settled_ms = (stable_since - start).as_millis() as u64;
    let arrivals = listener.arrivals();
    let during = gaps(&arrivals, start, end);
    let calm = gaps(&arrivals, calm_from, start);
    let partitions: Vec<PartitionReport> = during
        .into_iter()
        .map(|(p, (gap, gap_at, lat))| PartitionReport {
            partition: p,
            kept: kept[p as usize],
            stayed: before[p as usize] == after[p as usize],
            max_gap_ms: gap,
            gap_at_ms: gap_at,
            p99_ms: lat,
        })
        .collect();
    let calm_p99_ms = (0..PARTITIONS)
        .filter(|p| before[*p as usize] == after[*p as usize])
        .map(|p| calm[&p].2)
        .max()
        .unwrap_or(0);
    EventReport {
        event: name,
        settled_ms,
        partitions,
        calm_p99_ms,
    }
}

/// The scenario on `broker` with `strategy`: two reducers, updates flowing
/// to every partition; a third reducer starts (scale-up) while channel `c2`
/// subscribes to every market; then one of the first two restarts while
/// `c3` unsubscribes from every market. Checks that no latest version is
/// lost, versions never go backwards, and the commands sent during the
/// rebalances are all applied (by whichever reducer owned the market then);
/// returns what every partition saw. `session_timeout` is the reducers'
/// (the dev broker waits session timeout − 1 s per rebalance round).
pub fn run(broker: Broker, strategy: Strategy, session_timeout: Duration) -> ScenarioReport {
    if let Ok(level) = std::env::var("STREAMPIPE_TEST_LOG") {
        let level = if level == "debug" {
            tracing::Level::DEBUG
        } else {
            tracing::Level::INFO
        };
        let _ = tracing_subscriber::fmt().with_max_level(level).try_init();
    }
    let mut p = Pipeline::new(broker, PARTITIONS);
    p.config.session_timeout = session_timeout;
    if strategy == Strategy::Eager {
        p.config
            .kafka_options
            .push(("partition.assignment.strategy".into(), "range".into()));
    }
    if let Ok(d) = std::env::var("STREAMPIPE_TEST_KAFKA_DEBUG") {
        p.config.kafka_options.push(("debug".into(), d));
    }
    let p = Arc::new(p);
    let keys = p.keys();
    let markets = markets();
    let names: Vec<&str> = markets.iter().map(String::as_str).collect();

    let mut members = vec![Member::start(&p), Member::start(&p)];
    wait_for(
        Duration::from_secs(90),
        "two reducers own every partition",
        || {
            let o = owners(&members);
            (o.iter().all(Option::is_some) && o.contains(&Some(0)) && o.contains(&Some(1)))
                .then_some(())
        },
    );
    for m in &markets {
        p.command(CommandKind::Subscribe, "c1", m);
        p.command(CommandKind::Subscribe, "c3", m);
    }
    p.flush();
    for m in &markets {
        p.wait_subscribed("c1", m);
        p.wait_subscribed("c3", m);
    }
    let listener = Listener::start(&keys, &names);

    let stop = Arc::new(AtomicBool::new(false));
    let last = Arc::new(AtomicU64::new(0));
    let round_every = match broker {
        Broker::Dev => ROUND_EVERY,
        Broker::Tansu => ROUND_EVERY_TANSU,
    };
    let producer = std::thread::spawn({
        let (p, stop, last, markets) = (p.clone(), stop.clone(), last.clone(), markets.clone());
        move || {
            let mut v = 0;
            while !stop.load(Ordering::SeqCst) {
                v += 1;
                for m in &markets {
                    p.update(m, v, &format!(r#"{{"v":{v}}}"#));
                }
                last.store(v, Ordering::SeqCst);
                std::thread::sleep(round_every);
            }
            p.flush();
        }
    });
    wait_for(Duration::from_secs(30), "updates flowing", || {
        (listener.messages().len() >= 10 * markets.len()).then_some(())
    });

    // Commands spread over the event, so some land while partitions move.
    let commands = |kind: CommandKind, channel: &'static str| {
        let (p, markets) = (p.clone(), markets.clone());
        std::thread::spawn(move || {
            for m in &markets {
                p.command(kind, channel, m);
                std::thread::sleep(Duration::from_millis(150));
            }
            p.flush();
        })
    };

    let mut sender = None;
    let scale_up = observe(
        "scale-up",
        &mut members,
        &listener,
        |members| {
            sender = Some(commands(CommandKind::Subscribe, "c2"));
            members.push(Member::start(&p));
        },
        |members| (0..PARTITIONS).any(|q| members[2].owns(q)),
    );
    sender.take().unwrap().join().unwrap();
    let restart = observe(
        "restart",
        &mut members,
        &listener,
        |members| {
            sender = Some(commands(CommandKind::Unsubscribe, "c3"));
            let gone = members[1].handle.take().unwrap();
            gone.shutdown().expect("graceful shutdown");
            members.push(Member::start(&p));
        },
        |members| (0..PARTITIONS).any(|q| members[3].owns(q)),
    );
    sender.take().unwrap().join().unwrap();

    stop.store(true, Ordering::SeqCst);
    producer.join().unwrap();
    let final_version = last.load(Ordering::SeqCst);
    wait_for(
        Duration::from_secs(60),
        "every market's last version stored and published",
        || {
            markets
                .iter()
                .all(|m| {
                    p.state_version(m) == final_version
                        && listener.versions(m).last() == Some(&final_version)
                })
                .then_some(())
        },
    );
    // Versions on the wire never go backwards (redelivered records are
    // stale and not republished). A new owner announces its watched
    // markets, which republishes the stored version once: a repeat, allowed.
    for m in &markets {
        let v = listener.versions(m);
        assert!(
            v.windows(2).all(|w| w[0] <= w[1]),
            "{m}: versions went backwards: {v:?}"
        );
    }
    // Every command sent during the rebalances was applied, once.
    let want: BTreeSet<String> = ["c1", "c2"].iter().map(|s| s.to_string()).collect();
    for m in &markets {
        let got: BTreeSet<String> = p.smembers(&keys.market_channels(m)).into_iter().collect();
        assert_eq!(got, want, "channels of {m}");
    }
    let all: BTreeSet<String> = markets.iter().cloned().collect();
    for c in ["c1", "c2"] {
        let got: BTreeSet<String> = p.smembers(&keys.channel_markets(c)).into_iter().collect();
        assert_eq!(got, all, "markets of {c}");
    }
    assert!(
        p.smembers(&keys.channel_markets("c3")).is_empty(),
        "c3 unsubscribed everywhere"
    );
    // Every reducer holds only what it owns: the subscriptions in memory
    // add up to exactly the stored ones.
    // The group holds the command topic's offsets too (committed through
    // the group member), up to the last command: the operator's and the
    // publisher's lag readers see no command lag.
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for r in p.deliveries.all() {
        if r.topic == p.config.command_topic {
            let e = ends.entry(r.partition).or_insert(0);
            *e = (*e).max(r.offset + 1);
        }
    }
    wait_for(
        Duration::from_secs(30),
        "command offsets committed in the group up to the last command",
        || {
            let got = p.committed_offsets(&p.config.command_topic);
            ends.iter()
                .all(|(part, end)| got.get(part) == Some(end))
                .then_some(())
        },
    );
    wait_for(
        Duration::from_secs(10),
        "subscriptions held in memory",
        || {
            let held: i64 = members
                .iter()
                .filter(|m| m.handle.is_some())
                .map(|m| m.metrics.subscriptions.get())
                .sum();
            (held == 2 * markets.len() as i64).then_some(())
        },
    );
    drop(members);
    ScenarioReport { scale_up, restart }
}
