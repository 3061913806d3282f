//! Operational behaviour of the reducer against the real stack: graceful
//! leave, health and metrics endpoints, Redis outages, start-up checks.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use streampipe_contract::{partition_for, CommandKind};
use streampipe_reducer::{spawn, Error, Metrics};
use streampipe_tests::{
    free_port, http_request, try_http_request, unique, wait_for, workspace_bin, Broker, Pipeline,
    PrivateRedis, ReducerProcess,
};

/// SIGTERM makes a reducer finish, commit and leave the group, and the
/// survivor takes every partition with its subscriptions. On tansu the
/// hand-over comes long before the (30 s) session timeout would expire,
/// which proves the explicit leave. librdkafka's mock cluster always waits
/// `session.timeout − 1 s` after a leave before it rebalances (its
/// `rd_kafka_mock_cgrp_classic_rebalance`), so there only the hand-over itself
/// is checked, with a short session timeout.
fn graceful_leave_hands_over_at_once(broker: Broker) {
    let mut p = Pipeline::new(broker, 4);
    let explicit_leave_observable = broker == Broker::Tansu;
    if explicit_leave_observable {
        p.config.session_timeout = Duration::from_secs(30);
    }
    let mut a = ReducerProcess::spawn(&p);
    let mut b = ReducerProcess::spawn(&p);
    wait_for(
        Duration::from_secs(90),
        "both reducers own partitions",
        || {
            let (x, y) = (
                a.metric("streampipe_reducer_owned_partitions")?,
                b.metric("streampipe_reducer_owned_partitions")?,
            );
            (x > 0.0 && y > 0.0 && x + y == 4.0).then_some(())
        },
    );
    p.command(CommandKind::Subscribe, "g1", "G1");
    p.flush();
    p.wait_subscribed("g1", "G1");

    let t = Instant::now();
    assert!(b.terminate(), "SIGTERM exits 0");
    wait_for(
        Duration::from_secs(60),
        "survivor owns all partitions",
        || (a.metric("streampipe_reducer_owned_partitions")? == 4.0).then_some(()),
    );
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "hand-over took {took:?}: the leaving member did not leave the group"
    );
    assert!(
        a.metric("streampipe_reducer_subscriptions").unwrap() >= 1.0,
        "survivor loaded the subscription"
    );
}

#[test]
fn graceful_leave_dev() {
    graceful_leave_hands_over_at_once(Broker::Dev)
}

#[test]
fn graceful_leave_tansu() {
    graceful_leave_hands_over_at_once(Broker::Tansu)
}

#[test]
fn health_and_metrics_endpoints() {
    let p = Pipeline::new(Broker::Dev, 2);
    let r = ReducerProcess::spawn(&p);
    let addr = r.addr.to_string();
    wait_for(Duration::from_secs(30), "/readyz 200", || {
        try_http_request(&addr, "GET", "/readyz")
            .ok()?
            .starts_with("HTTP/1.1 200")
            .then_some(())
    });
    assert!(http_request(&addr, "GET", "/healthz").starts_with("HTTP/1.1 200"));
    p.update("H1", 1, "1");
    p.flush();
    // Per-partition lag comes from librdkafka statistics (every 5 s).
    let metrics = wait_for(
        Duration::from_secs(30),
        "lag gauge and a processed record",
        || {
            let m = http_request(&addr, "GET", "/metrics");
            (m.contains("streampipe_reducer_partition_lag{")
                && m.contains("streampipe_reducer_updates_applied_total 1"))
            .then_some(m)
        },
    );
    for name in [
        "streampipe_reducer_records_total{topic=\"data\"} 1",
        "streampipe_reducer_record_to_publish_seconds_bucket",
        "streampipe_reducer_batch_records_count",
        "streampipe_reducer_rebalances_total{kind=\"assign\"}",
        "streampipe_reducer_subscriptions 0",
        "streampipe_reducer_watched_markets 0",
        "streampipe_reducer_max_market_channels 0",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    assert!(http_request(&addr, "GET", "/nope").starts_with("HTTP/1.1 404"));
}

/// The subscription gauges follow commands as they are applied, not only
/// rebalances (they once read 0 while 77k subscriptions were held).
#[test]
fn subscription_gauges_follow_commands() {
    let p = Pipeline::new(Broker::Dev, 2);
    let metrics = Arc::new(Metrics::new());
    let reducer = spawn(p.config.clone(), metrics.clone()).unwrap();
    let gauges = || {
        (
            metrics.subscriptions.get(),
            metrics.watched_markets.get(),
            metrics.max_market_channels.get(),
        )
    };
    for c in ["a", "b", "c"] {
        p.command(CommandKind::Subscribe, c, "W1");
    }
    p.command(CommandKind::Subscribe, "a", "W2");
    p.flush();
    wait_for(Duration::from_secs(30), "gauges after subscribes", || {
        (gauges() == (4, 2, 3)).then_some(())
    });
    for c in ["a", "b"] {
        p.command(CommandKind::Unsubscribe, c, "W1");
    }
    p.flush();
    wait_for(Duration::from_secs(30), "gauges after unsubscribes", || {
        (gauges() == (2, 2, 1)).then_some(())
    });
    p.command(CommandKind::Unsubscribe, "a", "W2");
    p.flush();
    wait_for(
        Duration::from_secs(30),
        "gauges after the last one of W2",
        || (gauges() == (1, 1, 1)).then_some(()),
    );
    reducer.shutdown().unwrap();
}

#[test]
fn help_lists_flags_and_environment() {
    let out = Command::new(workspace_bin("streampipe-reducer"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--brokers",
        "STREAMPIPE_KAFKA_BROKERS",
        "--redis-url",
        "--kafka-option",
        "--batch-max-delay-ms",
    ] {
        assert!(text.contains(needle), "--help lacks {needle}:\n{text}");
    }
}

#[test]
fn unequal_partition_counts_are_refused_at_start() {
    let broker = Broker::Dev;
    let name = unique("tmis");
    let mut config =
        streampipe_reducer::Config::new(&broker.bootstrap(), &name, &streampipe_tests::redis_url());
    broker.create_topics(&[(&config.data_topic, 4), (&config.command_topic, 2)]);
    config.dead_letter_topic = None;
    match spawn(config, Arc::new(Metrics::new())) {
        Err(Error::Topics(msg)) => {
            assert!(msg.contains("4 partitions") && msg.contains("2"), "{msg}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a reducer started on topics that are not co-partitioned"),
    }
}

/// Redis goes away: the reducer stops being ready, commits nothing past what
/// Redis has, retries, and writes everything once Redis is back.
#[test]
fn redis_outage_stalls_without_losing_updates() {
    let mut p = Pipeline::new(Broker::Dev, 2);
    let redis = PrivateRedis::start(free_port());
    p.config.redis_url = redis.url();
    let keys = p.keys();
    let metrics = Arc::new(Metrics::new());
    let reducer = spawn(p.config.clone(), metrics.clone()).unwrap();
    p.update("O1", 1, "1");
    p.flush();
    wait_for(Duration::from_secs(30), "v1 stored", || {
        (redis.version(&keys, "O1") == Some(1)).then_some(())
    });
    assert!(reducer.health.is_ready());

    let port = redis.port;
    drop(redis);
    for v in 2..=5 {
        p.update("O1", v, &v.to_string());
    }
    p.flush();
    wait_for(
        Duration::from_secs(30),
        "not ready during the outage",
        || (!reducer.health.is_ready()).then_some(()),
    );
    std::thread::sleep(Duration::from_secs(2)); // several auto-commit intervals
    let part = partition_for(b"O1", 2) as i32;
    let v2_offset = p
        .deliveries
        .all()
        .into_iter()
        .find(|d| {
            d.topic == p.config.data_topic && d.value.windows(11).any(|w| w == b"\"version\":2")
        })
        .expect("v2 delivered")
        .offset;
    let committed = p.committed_data_offsets().get(&part).copied().unwrap_or(0);
    assert!(
        committed <= v2_offset,
        "committed {committed} past v2 at offset {v2_offset} while Redis was down"
    );
    assert!(metrics.redis_errors.get() > 0);

    // Redis comes back empty (no persistence): the retried batch lands.
    let redis = PrivateRedis::start(port);
    wait_for(
        Duration::from_secs(30),
        "v5 stored after the outage",
        || (redis.version(&keys, "O1") == Some(5)).then_some(()),
    );
    wait_for(Duration::from_secs(10), "ready again", || {
        reducer.health.is_ready().then_some(())
    });
    reducer.shutdown().unwrap();
    assert!(
        p.committed_data_offsets()[&part] > v2_offset,
        "offsets committed after recovery"
    );
}

/// `/readyz` of a reducer whose partitions are quiet still follows Redis: 503
/// within a few seconds of Redis going away (no batch ever fails, only the
/// pinger notices), 200 again soon after it is back.
#[test]
fn readiness_follows_redis_without_traffic() {
    let mut p = Pipeline::new(Broker::Dev, 2);
    let redis = PrivateRedis::start(free_port());
    p.config.redis_url = redis.url();
    let mut r = ReducerProcess::spawn(&p);
    let addr = r.addr.to_string();
    let readyz = |want: &str| {
        try_http_request(&addr, "GET", "/readyz")
            .ok()
            .is_some_and(|resp| resp.starts_with(want))
    };
    wait_for(Duration::from_secs(60), "/readyz 200", || {
        readyz("HTTP/1.1 200").then_some(())
    });
    // Quiet for longer than any batch: nothing but the pinger talks to Redis.
    std::thread::sleep(Duration::from_secs(2));

    let port = redis.port;
    let t = Instant::now();
    drop(redis);
    wait_for(Duration::from_secs(30), "/readyz 503 without Redis", || {
        readyz("HTTP/1.1 503").then_some(())
    });
    let down = t.elapsed();
    assert!(
        down < Duration::from_secs(5),
        "readiness took {down:?} to notice Redis was gone"
    );
    assert_eq!(r.metric("streampipe_reducer_redis_up"), Some(0.0));
    assert!(
        http_request(&addr, "GET", "/healthz").starts_with("HTTP/1.1 200"),
        "a Redis outage is not a reason to restart the reducer"
    );

    let t = Instant::now();
    let _redis = PrivateRedis::start(port);
    wait_for(
        Duration::from_secs(30),
        "/readyz 200 with Redis back",
        || readyz("HTTP/1.1 200").then_some(()),
    );
    let up = t.elapsed();
    assert!(
        up < Duration::from_secs(5),
        "readiness took {up:?} to notice Redis was back"
    );
    assert_eq!(r.metric("streampipe_reducer_redis_up"), Some(1.0));
    eprintln!("readiness: 503 after {down:?}, 200 after {up:?}");
    assert!(r.terminate(), "SIGTERM exits 0");
}

/// A dev broker of the test's own (the stack's is shared by every test), so
/// the test can `kill -9` it.
struct PrivateDevBroker {
    child: std::process::Child,
    bootstrap: String,
}

impl PrivateDevBroker {
    fn start(topics: &[(&str, i32)]) -> Self {
        let bootstrap = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(workspace_bin("streampipe-devbroker"));
        cmd.arg("--listen")
            .arg(&bootstrap)
            .arg("--admin")
            .arg(&admin);
        for (name, parts) in topics {
            cmd.arg("--topic").arg(format!("{name}:{parts}"));
        }
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn devbroker");
        wait_for(Duration::from_secs(20), "private dev broker", || {
            try_http_request(&admin, "GET", "/healthz")
                .ok()?
                .starts_with("HTTP/1.1 200")
                .then_some(())
        });
        PrivateDevBroker { child, bootstrap }
    }
}

impl Drop for PrivateDevBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGTERM ends a reducer within its grace period even when its broker died
/// (`kill -9`) under it: the clean leave cannot reach the broker, and the
/// reducer gives up on it before the grace period ends (a kubelet would
/// SIGKILL it then). Without the deadline this run took 12.9 s (the
/// issue's, with more in flight, more than 50 s).
#[test]
fn sigterm_with_the_broker_dead_exits_within_the_grace_period() {
    const GRACE_SECONDS: u64 = 6;
    let name = unique("tdead");
    let (data, commands) = (format!("{name}.data"), format!("{name}.commands"));
    let mut broker = PrivateDevBroker::start(&[(&data, 2), (&commands, 2)]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(workspace_bin("streampipe-reducer"))
        .args(["--brokers", &broker.bootstrap, "--pipeline", &name])
        .args(["--redis-url", &streampipe_tests::redis_url()])
        .args(["--listen", &addr, "--session-timeout-ms", "6000"])
        .args(["--dead-letter-topic", ""])
        .args(["--shutdown-grace-seconds", &GRACE_SECONDS.to_string()])
        .args(["--log-format", "text"])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("spawn reducer");
    let mut r = ReducerProcess {
        child,
        addr: addr.parse().unwrap(),
    };
    wait_for(
        Duration::from_secs(60),
        "the reducer owns both partitions",
        || (r.metric("streampipe_reducer_owned_partitions")? == 2.0).then_some(()),
    );
    // Records processed, so there are stored offsets to commit on the way out.
    let producer: rdkafka::producer::BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .create()
        .unwrap();
    for i in 0..20u64 {
        let value = format!(
            r#"{{"v":1,"market":"D{i}","version":1,"ts":{},"payload":1}}"#,
            streampipe_tests::now_ms()
        );
        let key = format!("D{i}");
        producer
            .send(
                rdkafka::producer::BaseRecord::to(&data)
                    .key(&key)
                    .payload(&value),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(10)).unwrap();
    wait_for(Duration::from_secs(30), "the records are in Redis", || {
        (r.metric("streampipe_reducer_updates_applied_total")? == 20.0).then_some(())
    });

    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
    std::thread::sleep(Duration::from_secs(1)); // the client notices the dead broker
    let t = Instant::now();
    Command::new("kill")
        .args(["-TERM", &r.child.id().to_string()])
        .status()
        .unwrap();
    let status = wait_for(
        Duration::from_secs(60),
        "the reducer exits after SIGTERM",
        || r.child.try_wait().unwrap(),
    );
    let took = t.elapsed();
    eprintln!("SIGTERM with the broker dead: exited {status} after {took:?}");
    assert!(
        took < Duration::from_secs(GRACE_SECONDS),
        "exited after {took:?}, beyond the {GRACE_SECONDS} s grace period"
    );
    assert!(
        status.code().is_some(),
        "the reducer exited by itself, not by a signal: {status}"
    );
}
