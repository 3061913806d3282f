//! Reducer integration tests against the real stack: Redis and both
//! Kafka-protocol brokers (librdkafka's mock cluster via the dev broker, and
//! tansu). Start it with `scripts/stack.sh up`; `scripts/test.sh` does.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use streampipe_contract::{partition_for, CommandKind};
use streampipe_reducer::{spawn, Metrics};
use streampipe_tests::{wait_for, Broker, Listener, Pipeline, ReducerProcess};

/// Runs a test body once per broker, as `<name>::dev` and `<name>::tansu`.
macro_rules! on_both_brokers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn dev() {
                super::$name(streampipe_tests::Broker::Dev)
            }
            #[test]
            fn tansu() {
                super::$name(streampipe_tests::Broker::Tansu)
            }
        }
    )*};
}

on_both_brokers!(
    subscribe_and_update_reach_the_market_topic,
    unsubscribe_leaves_nothing_behind,
    subscribe_announces_current_state,
    malformed_records_are_dead_lettered_and_skipped,
    redelivery_never_moves_versions_backwards,
);

fn subscribe_and_update_reach_the_market_topic(broker: Broker) {
    let p = Pipeline::new(broker, 4);
    let keys = p.keys();
    let reducer = spawn(p.config.clone(), Arc::new(Metrics::new())).unwrap();
    let listener = Listener::start(&keys, &["M1", "M2"]);

    p.command(CommandKind::Subscribe, "c1", "M1");
    p.flush();
    p.wait_subscribed("c1", "M1");
    let part = partition_for(b"M1", 4) as i32;
    assert_eq!(p.smembers(&keys.partition_markets(part)), vec!["M1"]);

    p.update("M1", 1, r#"{"home":1.5}"#);
    p.update("M1", 2, r#"{"home":1.6}"#);
    p.update("M2", 1, r#"{"home":3.0}"#); // nobody subscribed: stored, not published
    p.flush();
    listener.wait("two updates of M1 on its topic", |m| m.len() >= 2);
    wait_for(Duration::from_secs(10), "M2 state stored", || {
        (p.state_version("M2") == 1).then_some(())
    });
    // The update script publishes in the same call that stores, so an M2
    // publish would have reached the listener by now; allow for transit.
    std::thread::sleep(Duration::from_millis(300));
    let got = listener.messages();
    assert_eq!(got.len(), 2, "only the watched M1 is published: {got:?}");
    assert!(got.iter().all(|(m, u)| m == "M1" && u.market == "M1"));
    assert_eq!(listener.versions("M1"), vec![1, 2]);
    assert_eq!(got[1].1.payload, serde_json::json!({"home": 1.6}));
    assert_eq!(p.state_version("M1"), 2);
    reducer.shutdown().unwrap();
}

fn unsubscribe_leaves_nothing_behind(broker: Broker) {
    let p = Pipeline::new(broker, 4);
    let keys = p.keys();
    let reducer = spawn(p.config.clone(), Arc::new(Metrics::new())).unwrap();
    for m in ["M1", "M2", "M3"] {
        p.command(CommandKind::Subscribe, "c1", m);
    }
    p.command(CommandKind::Subscribe, "c2", "M1");
    p.flush();
    for m in ["M1", "M2", "M3"] {
        p.wait_subscribed("c1", m);
    }
    p.wait_subscribed("c2", "M1");

    let listener = Listener::start(&keys, &["M1", "M2", "M3"]);
    for m in ["M1", "M2", "M3"] {
        p.command(CommandKind::Unsubscribe, "c1", m);
    }
    p.flush();
    wait_for(Duration::from_secs(30), "c1's keys removed", || {
        p.smembers(&keys.channel_markets("c1"))
            .is_empty()
            .then_some(())
    });
    // c1 had no other market: no key of c1 is left, and M2/M3 left the index.
    let leftover: Vec<String> = p
        .all_keys()
        .into_iter()
        .filter(|k| k.contains("{c:c1}"))
        .collect();
    assert!(leftover.is_empty(), "keys left for c1: {leftover:?}");
    wait_for(Duration::from_secs(10), "M2, M3 gone", || {
        (p.smembers(&keys.market_channels("M2")).is_empty()
            && p.smembers(&keys.market_channels("M3")).is_empty())
        .then_some(())
    });
    for part in 0..4 {
        let idx = p.smembers(&keys.partition_markets(part));
        assert!(
            !idx.contains(&"M2".to_string()) && !idx.contains(&"M3".to_string()),
            "index {part}: {idx:?}"
        );
    }
    // M1 keeps c2 only, so it is still watched and its updates are
    // published; M2 and M3 lost their last channel: stored, not published.
    assert_eq!(p.smembers(&keys.market_channels("M1")), vec!["c2"]);
    for m in ["M2", "M3", "M1"] {
        p.update(m, 10, "1");
    }
    p.flush();
    listener.wait("update of M1", |m| m.iter().any(|(m, _)| m == "M1"));
    wait_for(Duration::from_secs(10), "M2, M3 stored", || {
        (p.state_version("M2") == 10 && p.state_version("M3") == 10).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        listener.messages().iter().all(|(m, _)| m == "M1"),
        "{:?}",
        listener.messages()
    );
    assert_eq!(listener.versions("M1"), vec![10]);
    reducer.shutdown().unwrap();
}

/// The publisher reads a market's state straight from Redis once its topic
/// subscription is active; updates stored while nobody watched the market
/// were not published, so the first subscribe publishes the stored state.
fn subscribe_announces_current_state(broker: Broker) {
    let p = Pipeline::new(broker, 4);
    let keys = p.keys();
    let metrics = Arc::new(Metrics::new());
    let reducer = spawn(p.config.clone(), metrics.clone()).unwrap();
    let listener = Listener::start(&keys, &["M7", "M8"]);
    p.update("M7", 41, r#"{"draw":3.25}"#);
    p.update("M7", 42, r#"{"draw":3.3}"#);
    p.flush();
    wait_for(Duration::from_secs(30), "state of M7", || {
        (p.state_version("M7") == 42).then_some(())
    });

    p.command(CommandKind::Subscribe, "cb", "M7");
    p.flush();
    listener.wait("announce of M7", |m| !m.is_empty());
    // Messages arrive in publish order, so had v41 or v42 been published
    // while M7 was unwatched they would come first: the announce is the only one.
    let got = listener.messages();
    assert_eq!(got.len(), 1, "{got:?}");
    let (m, u) = &got[0];
    assert_eq!(m, "M7");
    assert_eq!((u.market.as_str(), u.version), ("M7", 42));
    assert_eq!(u.payload, serde_json::json!({"draw": 3.3}));

    // A second channel does not make M7 any more watched: no announce.
    p.command(CommandKind::Subscribe, "cb2", "M7");
    p.flush();
    p.wait_subscribed("cb2", "M7");
    // The old `begin` command is no command any more: dead-lettered, no publish.
    p.produce(
        &p.config.command_topic,
        Some(b"M7"),
        br#"{"v":1,"type":"begin","channel":"cb","market":"M7"}"#,
    );
    p.update("M7", 43, "1");
    p.update("M8", 1, "1"); // unwatched: stored, never published
    p.flush();
    listener.wait("next live update", |m| {
        m.iter().any(|(_, u)| u.version == 43)
    });
    wait_for(
        Duration::from_secs(10),
        "M8 stored and begin rejected",
        || {
            (p.state_version("M8") == 1
                && metrics
                    .malformed
                    .with_label_values(&["command", "invalid_json"])
                    .get()
                    == 1)
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        listener.versions("M7"),
        vec![42, 43],
        "one announce, then live"
    );
    assert!(
        listener.versions("M8").is_empty(),
        "unwatched M8 was published"
    );
    reducer.shutdown().unwrap();
}

fn malformed_records_are_dead_lettered_and_skipped(broker: Broker) {
    let p = Pipeline::new(broker, 2);
    let keys = p.keys();
    let metrics = Arc::new(Metrics::new());
    let reducer = spawn(p.config.clone(), metrics.clone()).unwrap();
    let listener = Listener::start(&keys, &["M1"]);

    // Bad command, then a good one for the same market (same partition).
    p.produce(
        &p.config.command_topic,
        Some(b"M1"),
        b"{\"type\":\"subscribe\",\"channel\":\"c1\"",
    );
    p.produce(&p.config.command_topic, Some(b"M1"), b"\x00binary?");
    p.command(CommandKind::Subscribe, "c1", "M1");
    // Bad data records, then a good one on the same partition.
    p.produce(&p.config.data_topic, Some(b"M1"), b"not json");
    p.produce(&p.config.data_topic, Some(b"M1"), br#"{"version":5}"#);
    p.produce(&p.config.data_topic, Some(b"bad key!"), br#"{"payload":1}"#);
    p.flush();
    p.wait_subscribed("c1", "M1");
    p.update("M1", 6, r#"{"ok":true}"#);
    p.flush();
    listener.wait("the valid update after the bad ones", |m| {
        m.iter().any(|(_, u)| u.version == 6)
    });

    let malformed =
        |topic: &str, reason: &str| metrics.malformed.with_label_values(&[topic, reason]).get();
    assert_eq!(malformed("command", "invalid_json"), 1);
    assert_eq!(malformed("command", "unsupported_encoding"), 1);
    assert_eq!(malformed("data", "unsupported_encoding"), 1);
    assert_eq!(malformed("data", "invalid_json"), 1);
    assert_eq!(malformed("data", "invalid_market"), 1);

    let dlq = p.read_topic(p.config.dead_letter_topic.as_deref().unwrap(), 5);
    assert_eq!(dlq.len(), 5, "five dead letters");
    wait_for(Duration::from_secs(10), "dead-letter metric", || {
        (metrics.dead_lettered.get() == 5).then_some(())
    });
    use rdkafka::message::{Headers, Message};
    let first = &dlq[0];
    let headers = first.headers().expect("dead letters carry headers");
    let error = headers
        .iter()
        .find(|h| h.key == "streampipe.error")
        .and_then(|h| h.value)
        .unwrap();
    assert!(!error.is_empty());
    assert!(
        dlq.iter().any(|m| m.payload() == Some(&b"not json"[..])),
        "original bytes kept"
    );
    assert_eq!(p.state_version("M1"), 6);
    reducer.shutdown().unwrap();
}

fn redelivery_never_moves_versions_backwards(broker: Broker) {
    let p = Pipeline::new(broker, 4);
    let keys = p.keys();
    let markets: Vec<String> = (0..8).map(|i| format!("R{i}")).collect();
    for m in &markets {
        p.command(CommandKind::Subscribe, "cr", m);
    }
    for v in 1..=20u64 {
        for m in &markets {
            p.update(m, v, &v.to_string());
        }
    }
    p.flush();
    match broker {
        // A crash before the offsets are committed: auto-commit is pushed far
        // out, so the SIGKILLed reducer leaves every offset uncommitted.
        Broker::Dev => {
            let mut first = ReducerProcess::spawn_with(
                &p,
                &["--kafka-option", "auto.commit.interval.ms=3600000"],
            );
            wait_for(Duration::from_secs(30), "all applied", || {
                markets
                    .iter()
                    .all(|m| p.state_version(m) == 20)
                    .then_some(())
            });
            first.kill();
            assert!(
                p.committed_data_offsets().is_empty(),
                "nothing was committed before the crash"
            );
        }
        // tansu never reassigns a SIGKILLed member's partitions, so there the
        // redelivery comes from an operator rewinding the stopped group.
        Broker::Tansu => {
            let reducer = spawn(p.config.clone(), Arc::new(Metrics::new())).unwrap();
            wait_for(Duration::from_secs(30), "all applied", || {
                markets
                    .iter()
                    .all(|m| p.state_version(m) == 20)
                    .then_some(())
            });
            reducer.shutdown().unwrap();
            p.rewind_group();
        }
    }
    let names: Vec<&str> = markets.iter().map(String::as_str).collect();
    let listener = Listener::start(&keys, &names);
    let metrics = Arc::new(Metrics::new());
    let reducer = spawn(p.config.clone(), metrics.clone()).unwrap();
    wait_for(Duration::from_secs(30), "everything reprocessed", || {
        (metrics.updates_stale.get() == 160).then_some(())
    });
    assert_eq!(
        metrics.updates_applied.get(),
        0,
        "no redelivered update was applied"
    );
    assert!(markets.iter().all(|m| p.state_version(m) == 20));
    // An older version produced now is dropped too; a newer one goes through.
    p.update("R0", 3, "3");
    p.update("R0", 21, "21");
    p.flush();
    listener.wait("v21", |m| m.iter().any(|(_, u)| u.version == 21));
    // The assignment announced every watched market's stored state (v20);
    // besides those, only the newer update was published: no redelivered
    // version and not the stale v3.
    for m in &markets {
        let mut v = listener.versions(m);
        if m == "R0" {
            assert_eq!(v.pop(), Some(21), "R0: {:?}", listener.versions(m));
        }
        assert!(
            !v.is_empty() && v.iter().all(|&x| x == 20),
            "{m}: the assignment's announce of v20 and nothing else: {v:?}"
        );
    }
    assert_eq!(p.state_version("R0"), 21);
    reducer.shutdown().unwrap();
}

/// The project's producers and librdkafka's `murmur2_random` agree with the
/// contract's partitioner, so commands land on their market's data partition.
#[test]
fn producer_partitioner_matches_contract() {
    let p = Pipeline::new(Broker::Dev, 8);
    for i in 0..200 {
        p.produce(
            &p.config.data_topic,
            Some(format!("market-{i}").as_bytes()),
            br#"{"payload":1}"#,
        );
    }
    p.flush();
    let d = p.deliveries.all();
    assert_eq!(d.len(), 200);
    for r in d {
        assert_eq!(
            r.partition as u32,
            partition_for(&r.key, 8),
            "key {:?}",
            String::from_utf8_lossy(&r.key)
        );
    }
}

/// Two reducer processes split the partitions; SIGKILL one and the survivor
/// takes every partition, restores the dead one's subscriptions from Redis
/// and delivers later updates. Runs on the dev broker only: tansu never
/// reassigns a SIGKILLed member's partitions (see docs/operations.md).
#[test]
fn failover_after_sigkill_restores_subscriptions() {
    let p = Pipeline::new(Broker::Dev, 8);
    let keys = p.keys();
    let mut a = ReducerProcess::spawn(&p);
    let mut b = ReducerProcess::spawn(&p);
    wait_for(
        Duration::from_secs(60),
        "both reducers own partitions",
        || {
            let (x, y) = (
                a.metric("streampipe_reducer_owned_partitions")?,
                b.metric("streampipe_reducer_owned_partitions")?,
            );
            (x > 0.0 && y > 0.0 && x + y == 8.0).then_some(())
        },
    );
    // Subscribe one channel to markets on every partition.
    let markets: Vec<String> = (0..32).map(|i| format!("F{i}")).collect();
    let parts: std::collections::HashSet<u32> = markets
        .iter()
        .map(|m| partition_for(m.as_bytes(), 8))
        .collect();
    assert_eq!(parts.len(), 8, "markets cover all partitions");
    for m in &markets {
        p.command(CommandKind::Subscribe, "cf", m);
    }
    p.flush();
    for m in &markets {
        p.wait_subscribed("cf", m);
    }
    for m in &markets {
        p.update(m, 1, "1");
    }
    p.flush();
    wait_for(Duration::from_secs(30), "first updates stored", || {
        markets
            .iter()
            .all(|m| p.state_version(m) == 1)
            .then_some(())
    });

    b.kill();
    let names: Vec<&str> = markets.iter().map(String::as_str).collect();
    let listener = Listener::start(&keys, &names);
    wait_for(
        Duration::from_secs(60),
        "survivor owns all partitions",
        || (a.metric("streampipe_reducer_owned_partitions")? == 8.0).then_some(()),
    );
    for m in &markets {
        p.update(m, 2, "2");
    }
    p.flush();
    listener.wait("updates of every market after failover", |msgs| {
        markets
            .iter()
            .all(|m| msgs.iter().any(|(_, u)| &u.market == m && u.version == 2))
    });
    assert!(a.metric("streampipe_reducer_subscriptions").unwrap() >= 32.0);

    // Every update whose offset was committed is in Redis state.
    assert!(a.terminate(), "graceful shutdown exits 0");
    let committed = p.committed_data_offsets();
    assert!(!committed.is_empty(), "offsets were committed");
    let mut latest: HashMap<String, u64> = HashMap::new();
    for m in &markets {
        latest.insert(m.clone(), p.state_version(m));
    }
    let mut checked = 0;
    for r in p
        .deliveries
        .all()
        .into_iter()
        .filter(|r| r.topic == p.config.data_topic)
    {
        let market = String::from_utf8(r.key).unwrap();
        let version = serde_json::from_slice::<serde_json::Value>(&r.value).unwrap()["version"]
            .as_u64()
            .unwrap();
        if r.offset < committed[&r.partition] {
            assert!(
                latest[&market] >= version,
                "committed record {market} v{version} is not in Redis state"
            );
            checked += 1;
        }
    }
    assert!(checked >= 64, "checked {checked} committed records");
    assert!(
        markets.iter().all(|m| latest[m] == 2),
        "final state holds version 2: {latest:?}"
    );
}

/// The Redis adapter on its own (no broker): an applied update of a watched
/// market is published once, whatever its channel count; unwatched and stale
/// updates are not; a 0 → 1 subscribe and an `Announce` publish the stored
/// state; calls are chunked without losing any update.
#[test]
fn store_publishes_once_per_update_and_announces() {
    use streampipe_reducer::core::Effect;
    use streampipe_reducer::store::{Outcome, PublishCommand, RedisStore, UPDATE_SCRIPT_CHUNK};

    let name = streampipe_tests::unique("tstore");
    let keys = streampipe_contract::Keys::new(&name);
    let mut store = RedisStore::new(&streampipe_tests::redis_url(), keys.clone()).unwrap();
    let listener = Listener::start(&keys, &["S1", "S2"]);
    let update = |market: &str, version: u64, watched: bool| {
        Effect::Update {
        market: market.into(),
        version,
        ts: 7,
        message: format!(
            r#"{{"type":"update","market":"{market}","version":{version},"ts":7,"payload":{version}}}"#
        )
        .into_bytes(),
        watched,
        partition: 0,
        offset: 0,
    }
    };
    let subscribe = |channel: &str, market_now_watched: bool| Effect::Subscribe {
        partition: 0,
        market: "S1".into(),
        channel: channel.into(),
        market_now_watched,
    };
    // Every batch also reads the pipeline's data epoch (none here).
    let outcome = |applied, stale, published| Outcome {
        applied,
        stale,
        published,
        epoch: streampipe_reducer::store::EpochRead::Missing,
        ..Outcome::default()
    };

    // Stored while unwatched: not published.
    assert_eq!(
        store.execute(&[update("S1", 1, false)]).unwrap(),
        outcome(1, 0, 0)
    );
    // The first subscriber announces the stored state; the second does not.
    assert_eq!(
        store
            .execute(&[subscribe("c1", true), subscribe("c2", false)])
            .unwrap(),
        outcome(0, 0, 1)
    );
    // Once per applied update, none for the duplicate and the stale one.
    assert_eq!(
        store
            .execute(&[
                update("S1", 2, true),
                update("S1", 2, true),
                update("S1", 1, true)
            ])
            .unwrap(),
        outcome(1, 2, 1)
    );
    // Announces publish the stored state, and nothing for a market without state.
    assert_eq!(
        store
            .execute(&[
                Effect::Announce {
                    market: "S1".into()
                },
                Effect::Announce {
                    market: "S2".into()
                }
            ])
            .unwrap(),
        outcome(0, 0, 1)
    );
    // A run longer than one script call: every update lands, in order.
    let run: Vec<Effect> = (1..=3 * UPDATE_SCRIPT_CHUNK as u64 + 5)
        .map(|v| update("S2", v, v % 2 == 0))
        .collect();
    let n = run.len() as u64;
    assert_eq!(store.execute(&run).unwrap(), outcome(n, 0, n / 2));

    listener.wait("every publish", |m| m.len() as u64 == 3 + n / 2);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(listener.versions("S1"), vec![1, 2, 2]);
    let s2 = listener.versions("S2");
    assert_eq!(s2.len() as u64, n / 2);
    assert!(s2.windows(2).all(|w| w[0] < w[1]) && s2.iter().all(|v| v % 2 == 0));
    assert_eq!(stored_version(&keys, "S2"), Some(n));
    let m2c: Vec<String> = {
        let mut c = redis::Client::open(streampipe_tests::redis_url())
            .unwrap()
            .get_connection()
            .unwrap();
        let mut v: Vec<String> = redis::cmd("SMEMBERS")
            .arg(keys.market_channels("S1"))
            .query(&mut c)
            .unwrap();
        v.sort();
        v
    };
    assert_eq!(m2c, vec!["c1", "c2"]);

    // Sharded pub/sub (for Redis Cluster later) runs the same scripts.
    let mut sharded = RedisStore::new(&streampipe_tests::redis_url(), keys.clone())
        .unwrap()
        .with_publish_command(PublishCommand::SPublish);
    assert_eq!(
        sharded
            .execute(&[
                update("S1", 3, true),
                Effect::Announce {
                    market: "S1".into()
                }
            ])
            .unwrap(),
        outcome(1, 0, 2)
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        listener.versions("S1"),
        vec![1, 2, 2],
        "SPUBLISH does not reach classic subscribers"
    );
}

fn stored_version(keys: &streampipe_contract::Keys, market: &str) -> Option<u64> {
    let mut c = redis::Client::open(streampipe_tests::redis_url())
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("HGET")
        .arg(keys.market_state(market))
        .arg("v")
        .query(&mut c)
        .unwrap()
}
