//! The autoscaler's lag reading against the real broker: produce records
//! with the group behind, check per-partition lag and the recommendation,
//! then let a reducer consume and check both fall.

use std::sync::Arc;
use std::time::Duration;

use streampipe_contract::deploy::KafkaSecurity;
use streampipe_operator::autoscale::{recommend, Policy};
use streampipe_operator::lag::{read_lag, Uncommitted};
use streampipe_reducer::{spawn, Metrics};
use streampipe_tests::{wait_for, Broker, Pipeline};

fn policy() -> Policy {
    Policy {
        max_replicas: 100,
        lag_threshold: 50,
        ..Policy::default()
    }
}

#[test]
fn lag_is_read_from_kafka_and_falls_when_a_reducer_consumes() {
    let p = Pipeline::new(Broker::Dev, 4);
    let c = &p.config;
    for i in 0..300 {
        p.update(&format!("A{i}"), 1, "1");
    }
    p.flush();
    // Per partition, the lag is the number of records produced there.
    let mut produced = [0i64; 4];
    for d in p
        .deliveries
        .all()
        .iter()
        .filter(|d| d.topic == c.data_topic)
    {
        produced[d.partition as usize] += 1;
    }
    let report = read_lag(
        &c.brokers,
        &c.data_topic,
        &c.group,
        &KafkaSecurity::default(),
        Uncommitted::Earliest,
    )
    .expect("lag");
    assert_eq!(report.partitions, 4);
    for pl in &report.per_partition {
        assert_eq!(
            pl.lag, produced[pl.partition as usize],
            "partition {}",
            pl.partition
        );
        assert_eq!(pl.committed, None);
    }
    assert_eq!(report.total, 300);
    assert_eq!(report.max, *produced.iter().max().unwrap());
    // 300 / 50 = 6 wanted, capped at the 4 partitions.
    assert_eq!(recommend(&policy(), report.partitions, report.total).0, 4);
    let latest = read_lag(
        &c.brokers,
        &c.data_topic,
        &c.group,
        &KafkaSecurity::default(),
        Uncommitted::Latest,
    )
    .unwrap();
    assert_eq!(
        latest.total, 0,
        "`latest` counts uncommitted partitions as caught up"
    );

    // A reducer consumes and commits: lag and recommendation fall.
    let reducer = spawn(c.clone(), Arc::new(Metrics::new())).unwrap();
    let after = wait_for(Duration::from_secs(60), "lag drained", || {
        let r = read_lag(
            &c.brokers,
            &c.data_topic,
            &c.group,
            &KafkaSecurity::default(),
            Uncommitted::Earliest,
        )
        .ok()?;
        (r.total == 0).then_some(r)
    });
    assert!(after
        .per_partition
        .iter()
        .all(|pl| pl.committed == Some(pl.high)));
    assert_eq!(
        recommend(&policy(), after.partitions, after.total).0,
        1,
        "back to minReplicas"
    );
    reducer.shutdown().unwrap();

    // An unreachable broker or a missing topic is an error, not a panic.
    let err = read_lag(
        &c.brokers,
        "no-such-topic-xyz",
        &c.group,
        &KafkaSecurity::default(),
        Uncommitted::Earliest,
    )
    .unwrap_err();
    assert!(err.contains("no-such-topic-xyz"), "{err}");
}
