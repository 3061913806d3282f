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
    subscribe_and_update_reach_the_channel,
    unsubscribe_leaves_nothing_behind,
    begin_publishes_current_state,
    malformed_records_are_dead_lettered_and_skipped,
    redelivery_never_moves_versions_backwards,
);

fn subscribe_and_update_reach_the_channel(broker: Broker) {
    let p = Pipeline::new(broker, 4);
    let keys = p.keys();
    let reducer = spawn(p.config.clone(), Arc::new(Metrics::new())).unwrap();
    let listener = Listener::start(&keys, &["c1"]);

    p.command(CommandKind::Subscribe, "c1", "M1");
    p.flush();
    p.wait_subscribed("c1", "M1");
    let part = partition_for(b"M1", 4) as i32;
    assert_eq!(p.smembers(&keys.partition_markets(part)), vec!["M1"]);

    p.update("M1", 1, r#"{"home":1.5}"#);
    p.update("M1", 2, r#"{"home":1.6}"#);
    p.update("M2", 1, r#"{"home":3.0}"#); // nobody subscribed: stored, not published
    p.flush();
    listener.wait("two updates of M1 on c1", |m| m.len() >= 2);
    wait_for(Duration::from_secs(10), "M2 state stored", || {
        (p.state_version("M2") == 1).then_some(())
    });
    let got = listener.messages();
    assert_eq!(got.len(), 2, "only M1's updates reach c1: {got:?}");
    assert!(got.iter().all(|(c, u)| c == "c1" && u.market == "M1"));
    assert_eq!(
        got.iter().map(|(_, u)| u.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
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

    let listener = Listener::start(&keys, &["c1", "c2"]);
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
    // M1 keeps c2 only, and updates still reach c2 but not c1.
    assert_eq!(p.smembers(&keys.market_channels("M1")), vec!["c2"]);
    p.update("M1", 10, "1");
    p.flush();
    listener.wait("update on c2", |m| m.iter().any(|(c, _)| c == "c2"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        listener.messages().iter().all(|(c, _)| c == "c2"),
        "{:?}",
        listener.messages()
    );
    reducer.shutdown().unwrap();
}

fn begin_publishes_current_state(broker: Broker) {
    let p = Pipeline::new(broker, 4);
    let keys = p.keys();
    let reducer = spawn(p.config.clone(), Arc::new(Metrics::new())).unwrap();
    p.update("M7", 41, r#"{"draw":3.25}"#);
    p.update("M7", 42, r#"{"draw":3.3}"#);
    p.flush();
    wait_for(Duration::from_secs(30), "state of M7", || {
        (p.state_version("M7") == 42).then_some(())
    });

    let listener = Listener::start(&keys, &["cb"]);
    p.command(CommandKind::Subscribe, "cb", "M7");
    p.command(CommandKind::Begin, "cb", "M7");
    p.flush();
    listener.wait("begin replay", |m| !m.is_empty());
    let (ch, u) = &listener.messages()[0];
    assert_eq!(ch, "cb");
    assert_eq!((u.market.as_str(), u.version), ("M7", 42));
    assert_eq!(u.payload, serde_json::json!({"draw": 3.3}));
    // A begin for a channel that is not subscribed publishes nothing.
    let other = Listener::start(&keys, &["stranger"]);
    p.command(CommandKind::Begin, "stranger", "M7");
    p.update("M7", 43, "1");
    p.flush();
    listener.wait("next live update", |m| {
        m.iter().any(|(_, u)| u.version == 43)
    });
    assert!(
        other.messages().is_empty(),
        "begin leaked to an unsubscribed channel"
    );
    reducer.shutdown().unwrap();
}

fn malformed_records_are_dead_lettered_and_skipped(broker: Broker) {
    let p = Pipeline::new(broker, 2);
    let keys = p.keys();
    let metrics = Arc::new(Metrics::new());
    let reducer = spawn(p.config.clone(), metrics.clone()).unwrap();
    let listener = Listener::start(&keys, &["c1"]);

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
    let listener = Listener::start(&keys, &["cr"]);
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
    let versions: Vec<u64> = listener.messages().iter().map(|(_, u)| u.version).collect();
    assert_eq!(versions, vec![21], "only the newer update was published");
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
    let listener = Listener::start(&keys, &["cf"]);
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
