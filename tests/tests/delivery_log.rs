//! The delivery log (opt-in): every update a publisher hands to browser
//! connections is recorded on the log topic (market, version, ts,
//! connections, pod), read back here from a real Kafka-protocol broker; a
//! publisher without a log topic records nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use streampipe_contract::decode_delivery;
use streampipe_tests::publisher::{
    blocking, config_for, create_channel, has, open_stream, read_updates, with_reducer, InProcess,
};
use streampipe_tests::unique;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_delivered_update_is_logged_with_its_fan_out() {
    let (p, _reducer) = with_reducer(4).await;
    let log_topic = unique("delivery-log");
    p.broker.create_topics(&[(&log_topic, 2)]);
    let mut config = config_for(&p);
    config.delivery_log_topic = Some(log_topic.clone());
    let publ = InProcess::start_with_config(config).await;
    // A second publisher without a log: it must record nothing.
    let quiet = InProcess::start(&p).await;

    // Two streams on A for m1 (fan-out 2), one on the quiet pod.
    let a1 = create_channel(publ.addr, &["m1", "m2"]).await;
    let a2 = create_channel(publ.addr, &["m1"]).await;
    let b = create_channel(quiet.addr, &["m1"]).await;
    let mut s1 = open_stream(publ.addr, &a1).await;
    let mut s2 = open_stream(publ.addr, &a2).await;
    let mut s3 = open_stream(quiet.addr, &b).await;
    for v in 1..=5u64 {
        p.update("m1", v, &format!(r#"{{"p":{v}}}"#));
        p.update("m2", v, &format!(r#"{{"p":{v}}}"#));
    }
    p.flush();
    for ws in [&mut s1, &mut s2, &mut s3] {
        let mut got = Vec::new();
        read_updates(ws, &mut got, "m1 v5", |g| has(g, "m1", 5)).await;
    }

    // A's log: m1 v1..5 each to 2 connections, m2 v1..5 to 1 (the
    // dispatcher may conflate none here: 10 updates, an idle pod).
    let records = {
        let p = p.clone();
        let t = log_topic.clone();
        blocking(move || {
            let mut out = Vec::new();
            for part in 0..2 {
                out.extend(p.read_topic_partition(&t, part, Duration::from_secs(5)));
            }
            out
        })
        .await
    };
    let mut seen: BTreeMap<(String, u64), u32> = BTreeMap::new();
    for bytes in &records {
        let r = decode_delivery(bytes).expect("a delivery record");
        assert!(!r.pod.is_empty());
        assert!(r.at > 0);
        // The feed's updates carry the producer's timestamp.
        assert!(r.ts.is_some(), "{r:?}");
        assert!(seen
            .insert((r.market.clone(), r.version), r.connections)
            .is_none());
    }
    let want: BTreeMap<(String, u64), u32> = (1..=5u64)
        .flat_map(|v| [(("m1".to_string(), v), 2), (("m2".to_string(), v), 1)])
        .collect();
    // Versions a pod got before its streams joined (state, not a live
    // update) are not in the log; every live one is, once.
    for (k, n) in &seen {
        assert_eq!(want.get(k), Some(n), "{k:?}: {seen:?}");
    }
    assert!(
        seen.contains_key(&("m1".to_string(), 5)) && seen.contains_key(&("m2".to_string(), 5)),
        "{seen:?}"
    );
    let sent = publ
        .ctx
        .metrics
        .delivery_log
        .with_label_values(&["sent"])
        .get();
    assert_eq!(sent as usize, records.len());
    assert_eq!(
        quiet
            .ctx
            .metrics
            .delivery_log
            .with_label_values(&["sent"])
            .get(),
        0
    );
}
