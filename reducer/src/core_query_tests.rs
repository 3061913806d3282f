//! The core's query subscriptions: commands on every partition, matches
//! turned into effects, and how they meet concrete subscriptions.

use super::*;
use streampipe_contract::{encode_command, encode_query_command, Command, QueryCommand};

const N: u32 = 4;

fn core_owning_all() -> Core {
    let mut c = Core::new(N);
    for p in 0..N as i32 {
        c.apply(
            Event::Assigned {
                partition: p,
                subscriptions: vec![],
            },
            &mut Vec::new(),
        );
    }
    c
}

fn p(market: &str) -> i32 {
    partition_for(market.as_bytes(), N) as i32
}

fn record(
    core: &mut Core,
    topic: TopicKind,
    partition: i32,
    key: &str,
    value: &[u8],
) -> Vec<Effect> {
    let mut out = Vec::new();
    core.apply(
        Event::Record(Record {
            topic,
            partition,
            offset: 0,
            key: Some(key.as_bytes()),
            value: Some(value),
            timestamp: Some(1),
        }),
        &mut out,
    );
    out
}

/// A query command as the API sends it: once to every partition.
fn query(core: &mut Core, kind: QueryCommandKind, channel: &str, q: &str) -> Vec<Effect> {
    let v = encode_query_command(&QueryCommand {
        kind,
        channel: channel.into(),
        query: q.into(),
    });
    (0..N as i32)
        .flat_map(|part| record(core, TopicKind::Command, part, channel, &v))
        .collect()
}

fn data(core: &mut Core, market: &str, payload: &str) -> Vec<Effect> {
    let v = format!(r#"{{"payload":{payload}}}"#);
    record(core, TopicKind::Data, p(market), market, v.as_bytes())
}

fn subscribe(core: &mut Core, kind: CommandKind, channel: &str, market: &str) -> Vec<Effect> {
    let v = encode_command(&Command {
        kind,
        channel: channel.into(),
        market: market.into(),
    });
    record(core, TopicKind::Command, p(market), market, &v)
}

fn watched(fx: &[Effect]) -> bool {
    match fx.last() {
        Some(Effect::Update { watched, .. }) => *watched,
        other => panic!("expected an update last, got {other:?}"),
    }
}

fn matches(fx: &[Effect]) -> Vec<(String, Vec<String>, Vec<String>, bool)> {
    fx.iter()
        .filter_map(|e| match e {
            Effect::QueryMatch {
                market,
                joined,
                left,
                market_now_watched,
                ..
            } => Some((
                market.to_string(),
                joined.iter().map(|c| c.to_string()).collect(),
                left.iter().map(|c| c.to_string()).collect(),
                *market_now_watched,
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn a_market_created_after_the_query_joins_and_leaves_when_it_stops_matching() {
    let mut core = core_owning_all();
    let fx = query(
        &mut core,
        QueryCommandKind::AddQuery,
        "c1",
        "market^=FB.;status=open",
    );
    assert_eq!(fx.len(), N as usize, "held once per partition: {fx:?}");
    assert!(fx
        .iter()
        .all(|e| matches!(e, Effect::QueryHeld { held: true, .. })));
    assert_eq!(core.query_pair_count(), N as usize);

    // Markets on several partitions, none known when the query came.
    let markets: Vec<String> = (0..40).map(|i| format!("FB.{i}")).collect();
    let parts: HashSet<i32> = markets.iter().map(|m| p(m)).collect();
    assert_eq!(parts.len(), N as usize, "the markets cover every partition");
    for m in &markets {
        let fx = data(&mut core, m, r#"{"status":"open"}"#);
        assert_eq!(
            matches(&fx),
            vec![(m.clone(), vec!["c1".into()], vec![], true)]
        );
        assert!(watched(&fx), "published at once");
        assert!(core.is_watched(m));
        assert_eq!(core.query_channels_of(m), vec!["c1"]);
    }
    // Not matching: stored only.
    let fx = data(&mut core, "TN.1", r#"{"status":"open"}"#);
    assert!(matches(&fx).is_empty() && !watched(&fx));
    // Still matching: nothing but the update.
    let fx = data(&mut core, "FB.0", r#"{"status":"open","home":2}"#);
    assert_eq!(fx.len(), 1);
    assert!(watched(&fx));
    // Suspended: it leaves, and is no longer published.
    let fx = data(&mut core, "FB.0", r#"{"status":"suspended"}"#);
    assert_eq!(
        matches(&fx),
        vec![("FB.0".into(), vec![], vec!["c1".into()], false)]
    );
    assert!(!watched(&fx));
    assert!(!core.is_watched("FB.0"));
    assert_eq!(core.query_matched_count(), 39);
}

#[test]
fn concrete_and_query_subscriptions_are_kept_apart() {
    let mut core = core_owning_all();
    subscribe(&mut core, CommandKind::Subscribe, "c1", "FB.1");
    query(&mut core, QueryCommandKind::AddQuery, "c1", "market^=FB.");
    // Already watched concretely: joining does not make it "now watched".
    let fx = data(&mut core, "FB.1", "{}");
    assert_eq!(
        matches(&fx),
        vec![("FB.1".into(), vec!["c1".into()], vec![], false)]
    );
    // The concrete subscription goes; the query still holds it.
    let fx = subscribe(&mut core, CommandKind::Unsubscribe, "c1", "FB.1");
    assert!(matches!(&fx[..], [Effect::Unsubscribe { .. }]));
    assert!(core.is_watched("FB.1"));
    assert!(watched(&data(&mut core, "FB.1", "{}")));
    // Subscribe concretely again, then drop the query: still watched.
    subscribe(&mut core, CommandKind::Subscribe, "c1", "FB.1");
    let fx = query(
        &mut core,
        QueryCommandKind::RemoveQuery,
        "c1",
        "market^=FB.",
    );
    assert_eq!(
        matches(&fx),
        vec![("FB.1".into(), vec![], vec!["c1".into()], false)]
    );
    assert!(core.is_watched("FB.1"));
    assert_eq!(core.channels_of("FB.1"), vec!["c1"]);
    assert_eq!(core.query_pair_count(), 0);
    // The concrete one goes too: unwatched.
    subscribe(&mut core, CommandKind::Unsubscribe, "c1", "FB.1");
    assert!(!watched(&data(&mut core, "FB.1", "{}")));
}

#[test]
fn bad_and_refused_query_commands_never_stop_the_partition() {
    let mut core = core_owning_all();
    let fx = record(
        &mut core,
        TopicKind::Command,
        0,
        "c1",
        br#"{"type":"add_query","channel":"c1","query":"status"}"#,
    );
    assert!(matches!(
        &fx[..],
        [Effect::DeadLetter {
            kind: "invalid_json",
            ..
        }]
    ));
    assert_eq!(
        query(&mut core, QueryCommandKind::RemoveQuery, "c1", "a=1")[0],
        Effect::Skipped(Skip::UnknownQuery)
    );
    query(&mut core, QueryCommandKind::AddQuery, "c1", "a=1");
    assert_eq!(
        query(&mut core, QueryCommandKind::AddQuery, "c1", "a=1")[0],
        Effect::Skipped(Skip::DuplicateQuery)
    );
    for i in 1..streampipe_contract::MAX_QUERIES_PER_CHANNEL {
        query(
            &mut core,
            QueryCommandKind::AddQuery,
            "c1",
            &format!("a={i}x"),
        );
    }
    assert_eq!(
        query(&mut core, QueryCommandKind::AddQuery, "c1", "b=1")[0],
        Effect::Skipped(Skip::QueryChannelFull)
    );
    // The partition goes on.
    assert!(matches!(
        &data(&mut core, "M", "{}")[..],
        [Effect::Update { .. }]
    ));
}

#[test]
fn a_second_channel_gets_the_markets_a_shared_query_already_matches() {
    let mut core = core_owning_all();
    query(&mut core, QueryCommandKind::AddQuery, "c1", "market^=FB.");
    data(&mut core, "FB.1", "{}");
    let fx = query(&mut core, QueryCommandKind::AddQuery, "c2", "market^=FB.");
    assert_eq!(
        matches(&fx),
        vec![("FB.1".into(), vec!["c2".into()], vec![], false)]
    );
    assert_eq!(core.query_channels_of("FB.1"), vec!["c1", "c2"]);
}

#[test]
fn queries_survive_a_reassignment_and_revoke_forgets_them() {
    let mut core = core_owning_all();
    query(&mut core, QueryCommandKind::AddQuery, "c1", "market^=FB.");
    data(&mut core, "FB.1", "{}");
    let part = p("FB.1");
    let pairs = core.queries_of(part);
    assert_eq!(pairs, vec![("c1".to_string(), "market^=FB.".to_string())]);
    core.apply(Event::Revoked { partition: part }, &mut Vec::new());
    assert_eq!(core.query_pair_count(), N as usize - 1);
    let mut fx = Vec::new();
    core.apply(
        Event::Assigned {
            partition: part,
            subscriptions: vec![],
        },
        &mut fx,
    );
    core.apply(
        Event::QueriesLoaded {
            partition: part,
            pairs,
            matches: vec![("FB.1".into(), vec!["market^=FB.".into()])],
        },
        &mut fx,
    );
    assert_eq!(
        fx,
        vec![Effect::Announce {
            market: "FB.1".into()
        }]
    );
    assert!(core.is_watched("FB.1"));
    let fx = data(&mut core, "FB.1", r#"{"x":1}"#);
    assert_eq!(fx.len(), 1, "still matching, nothing new: {fx:?}");
}
