//! The control API's steps are atomic where they race (#9 item 3), against
//! a real publisher, reducer, Redis and broker:
//! - concurrent add-markets cannot take a channel past its cap together (the
//!   cap check and the add are one Redis step; 999 markets on a 500 cap
//!   before);
//! - removing a market unsubscribes before it leaves the registry, so the
//!   reducers' map and the registry agree when it returns;
//! - closing a channel unsubscribes what either side has, also a market the
//!   registry lost.

use futures_util::future::join_all;
use streampipe_tests::publisher::{create_channel, http, setup};

/// The publisher's per-channel cap (publisher/src/api.rs).
const CAP: usize = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_never_pass_the_cap() {
    let (p, _reducer, publ) = setup(4).await;
    let id = create_channel(publ.addr, &["m-0"]).await;
    // 20 requests of 30 new markets each: 601 wanted, room for 499 more.
    let adds = (0..20).map(|r| {
        let markets: Vec<String> = (0..30).map(|i| format!("\"r{r}-{i}\"")).collect();
        let body = format!("{{\"markets\":[{}]}}", markets.join(","));
        let path = format!("/v1/channels/{id}/markets");
        async move { http(publ.addr, "POST", &path, Some(&body)).await }
    });
    let replies = join_all(adds).await;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let refused = replies
        .iter()
        .filter(|r| r.status == 400 && r.error_code() == "too_many_markets")
        .count();
    assert_eq!(
        ok + refused,
        20,
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let registry = p.smembers(&p.keys().channel_registry(&id));
    assert!(
        registry.len() <= CAP,
        "{} markets on a {CAP} cap",
        registry.len()
    );
    // Exactly the accepted requests' markets are there (16 fit: 1 + 16 × 30).
    assert_eq!(registry.len(), 1 + ok * 30);
    assert_eq!(ok, 16);
    // And every listed market reaches the reducers' map.
    for m in &registry {
        p.wait_subscribed(&id, m);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_market_is_unsubscribed_when_the_call_returns() {
    let (p, _reducer, publ) = setup(4).await;
    let id = create_channel(publ.addr, &["a", "b"]).await;
    p.wait_subscribed(&id, "a");
    p.wait_subscribed(&id, "b");
    let r = http(
        publ.addr,
        "DELETE",
        &format!("/v1/channels/{id}/markets/a"),
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    assert_eq!(
        p.smembers(&p.keys().channel_registry(&id)),
        vec!["b".to_string()]
    );
    // A second remove of the same market is a clean 404, not a retry loop.
    let again = http(
        publ.addr,
        "DELETE",
        &format!("/v1/channels/{id}/markets/a"),
        None,
    )
    .await;
    assert_eq!(again.status, 404);
    assert_eq!(again.error_code(), "unknown_market");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_channel_clears_what_only_the_reducers_still_have() {
    let (p, _reducer, publ) = setup(4).await;
    let id = create_channel(publ.addr, &["a", "b"]).await;
    p.wait_subscribed(&id, "a");
    p.wait_subscribed(&id, "b");
    // The registry loses "b" (a step that failed half-way before this fix,
    // or a hand edit): only the reducers' map still has it.
    let _: i64 = redis::cmd("SREM")
        .arg(p.keys().channel_registry(&id))
        .arg("b")
        .query(&mut p.redis())
        .unwrap();
    let r = http(publ.addr, "DELETE", &format!("/v1/channels/{id}"), None).await;
    assert_eq!(r.status, 204);
    streampipe_tests::wait_for(
        std::time::Duration::from_secs(30),
        "both unsubscribed",
        || {
            p.smembers(&p.keys().channel_markets(&id))
                .is_empty()
                .then_some(())
        },
    );
    assert!(p.smembers(&p.keys().market_channels("b")).is_empty());
}

/// The periodic reconciler repairs what a failed step left behind, after
/// seeing it twice (a command in flight is not a disagreement): a market
/// the registry has but whose subscribe never reached the reducers is
/// subscribed, a market only the reducers have is unsubscribed, a channel
/// whose sides agree is left alone; each repair is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_repairs_what_registry_and_reducers_disagree_on() {
    use std::time::Duration;
    use streampipe_contract::message::CommandKind;
    use streampipe_tests::publisher::{blocking, config_for, with_reducer, InProcess};
    use streampipe_tests::wait_for;

    streampipe_tests::test_log();
    let (p, _reducer) = with_reducer(2).await;
    let mut config = config_for(&p);
    // Two visits must be further apart than a command takes to apply, or
    // a slow subscribe looks lost: on a fresh pipeline the reducer applies
    // its first commands ~1.1 s after start (it catches up on the command
    // partitions first); 300 ms here repaired the setup's own subscribes.
    config.janitor_interval = Duration::from_millis(1500);
    let publ = InProcess::start_with_config(config).await;
    let m = publ.ctx.metrics.clone();

    let id = create_channel(publ.addr, &["R1"]).await;
    let fine = create_channel(publ.addr, &["R1", "R4"]).await;
    let (pc, i, f) = (p.clone(), id.clone(), fine.clone());
    blocking(move || {
        pc.wait_subscribed(&i, "R1");
        // Both sides of both channels agree before anything is broken: a
        // subscribe still in flight when the reconciler looks twice would
        // be repaired too (it cannot tell slow from lost).
        pc.wait_subscribed(&f, "R1");
        pc.wait_subscribed(&f, "R4");
        // A lost subscribe: the registry has R2, the reducers never heard.
        let _: i64 = redis::cmd("SADD")
            .arg(pc.keys().channel_registry(&i))
            .arg("R2")
            .query(&mut pc.redis())
            .unwrap();
        // A lost unsubscribe: the reducers serve R3, the registry lacks it.
        pc.command(CommandKind::Subscribe, &i, "R3");
        pc.flush();
        pc.wait_subscribed(&i, "R3");
    })
    .await;
    let (pc, i) = (p.clone(), id.clone());
    blocking(move || {
        wait_for(
            Duration::from_secs(30),
            "the reconciler repaired both",
            || {
                let reducers = pc.smembers(&pc.keys().channel_markets(&i));
                (reducers == ["R1", "R2"]).then_some(())
            },
        );
        assert!(pc.smembers(&pc.keys().market_channels("R2")).contains(&i));
        assert!(!pc.smembers(&pc.keys().market_channels("R3")).contains(&i));
        assert_eq!(
            pc.smembers(&pc.keys().channel_registry(&i)),
            ["R1", "R2"],
            "the registry is the intent; it is not edited"
        );
    })
    .await;
    let repairs = |kind: &str| m.reconcile_repairs.with_label_values(&[kind]).get();
    assert_eq!(repairs("subscribe"), 1);
    assert_eq!(repairs("unsubscribe"), 1);
    assert!(m.reconcile_checked.get() >= 4, "both channels walked twice");
    // The channel whose sides agreed was not touched.
    let (pc, f) = (p.clone(), fine.clone());
    blocking(move || {
        assert_eq!(pc.smembers(&pc.keys().channel_markets(&f)), ["R1", "R4"]);
    })
    .await;
    // Settled: later rounds repair nothing more.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(repairs("subscribe") + repairs("unsubscribe"), 2);
}
