//! Unit tests of the outbox (kept apart: the module is long enough).

use super::*;

fn upd(m: &str, v: u64) -> Update {
    Update {
        market: m.into(),
        version: v,
        bytes: Bytes::from(format!("{m}@{v}")),
        history: false,
    }
}

fn hist(m: &str, v: u64) -> Update {
    Update {
        history: true,
        ..upd(m, v)
    }
}

#[test]
fn history_markets_are_never_conflated_a_client_too_far_behind_gets_4412() {
    let o = Outbox::with_threshold(HashMap::new(), 100, Arc::default());
    let t0 = Instant::now();
    // The age rule does not apply: every event is queued.
    for v in 1..=5 {
        assert_eq!(
            o.push_update_at(&hist("h", v), t0 + CONFLATE_AFTER_AGE * v as u32),
            Pushed::Queued
        );
    }
    // Fill the byte bound with other markets (those conflate as before).
    for i in 0..40 {
        o.push_update_at(&upd(&format!("m{i}"), 1), t0);
    }
    assert!(o.queued_bytes() >= 100);
    // A sixth event would need a second entry past the bound: closed.
    assert_eq!(o.push_update_at(&hist("h", 6), t0), Pushed::Gap);
    assert_eq!(drain(&o), vec!["close 4412"]);
}

#[test]
fn a_hold_queues_the_replay_first_then_the_live_events_once_each() {
    let mut since = HashMap::new();
    since.insert(Arc::from("h"), 2u64);
    let o = Outbox::new(since, Arc::default());
    o.hold();
    assert_eq!(o.position("h"), Some(2));
    // Live events arrive while the history is read: held.
    assert_eq!(o.push_update(&hist("h", 5)), Pushed::Held);
    assert_eq!(o.push_update(&hist("h", 6)), Pushed::Held);
    // Other markets pass.
    assert_eq!(o.push_update(&upd("x", 1)), Pushed::Queued);
    // The replay read saw 3..=5.
    for v in 3..=5 {
        assert_eq!(o.push_replayed(&hist("h", v)), Pushed::Queued);
    }
    o.release();
    assert!(!o.is_held());
    assert_eq!(o.push_update(&hist("h", 7)), Pushed::Queued);
    assert_eq!(drain(&o), vec!["x@1", "h@3", "h@4", "h@5", "h@6", "h@7"]);
}

#[test]
fn an_overflowing_hold_closes_with_4412_on_release() {
    let o = Outbox::default();
    o.hold();
    let big = Update {
        bytes: Bytes::from(vec![b'x'; HOLD_STASH_BYTES / 2 + 1]),
        ..hist("h", 1)
    };
    assert_eq!(o.push_update(&big), Pushed::Held);
    let big2 = Update {
        version: 2,
        ..big.clone()
    };
    assert_eq!(o.push_update(&big2), Pushed::Held);
    o.release();
    assert_eq!(drain(&o), vec!["close 4412"]);
}

fn drain(o: &Outbox) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(item) = o.pop() {
        match item {
            Item::Message { bytes, .. } => out.push(String::from_utf8(bytes.to_vec()).unwrap()),
            Item::Close(code, _) => out.push(format!("close {code}")),
        }
    }
    out
}

#[test]
fn a_client_that_keeps_up_gets_every_version_in_order() {
    let o = Outbox::default();
    for v in 1..=1000 {
        assert_eq!(o.push_update(&upd("a", v)), Pushed::Queued);
    }
    let got = drain(&o);
    assert_eq!(
        got,
        (1..=1000).map(|v| format!("a@{v}")).collect::<Vec<_>>()
    );
}

#[test]
fn a_slow_client_gets_the_latest_version_of_every_market_in_bounded_memory() {
    let o = Outbox::with_threshold(HashMap::new(), 100, Arc::default());
    // 5 markets, 1000 updates each, nothing read.
    for v in 1..=1000 {
        for m in ["a", "b", "c", "d", "e"] {
            o.push_update(&upd(m, v));
        }
    }
    assert!(
        o.queued_bytes() <= 100 + 5 * 8,
        "queue bounded: {} bytes",
        o.queued_bytes()
    );
    assert!(o.len() <= 100 / 3 + 5, "queue bounded: {} entries", o.len());
    let got = drain(&o);
    for m in ["a", "b", "c", "d", "e"] {
        assert!(
            got.contains(&format!("{m}@1000")),
            "{m} latest missing: {got:?}"
        );
    }
    // Per market, versions are increasing.
    for m in ["a", "b", "c", "d", "e"] {
        let vs: Vec<u64> = got
            .iter()
            .filter_map(|s| s.strip_prefix(&format!("{m}@")).map(|v| v.parse().unwrap()))
            .collect();
        assert!(vs.windows(2).all(|w| w[0] < w[1]), "{m}: {vs:?}");
    }
}

#[test]
fn a_lagging_outbox_conflates_however_few_bytes_wait() {
    let o = Outbox::default();
    let t0 = Instant::now();
    assert_eq!(o.push_update_at(&upd("a", 1), t0), Pushed::Queued);
    let young = t0 + CONFLATE_AFTER_AGE - Duration::from_millis(1);
    assert_eq!(o.push_update_at(&upd("a", 2), young), Pushed::Queued);
    // The oldest entry has waited CONFLATE_AFTER_AGE: the newest entry
    // of the market takes the new version in place.
    let late = t0 + CONFLATE_AFTER_AGE;
    assert_eq!(o.push_update_at(&upd("a", 3), late), Pushed::Conflated);
    assert_eq!(o.push_update_at(&upd("a", 4), late), Pushed::Conflated);
    // A market not yet queued is still appended.
    assert_eq!(o.push_update_at(&upd("b", 1), late), Pushed::Queued);
    assert_eq!(drain(&o), vec!["a@1", "a@4", "b@1"]);
    // Drained: every version passes again.
    assert_eq!(o.push_update_at(&upd("a", 5), late), Pushed::Queued);
    assert_eq!(o.push_update_at(&upd("a", 6), late), Pushed::Queued);
}

#[test]
fn duplicates_and_resume_points_are_dropped() {
    let mut since = HashMap::new();
    since.insert(Arc::from("a"), 5u64);
    let o = Outbox::new(since, Arc::default());
    assert_eq!(o.push_update(&upd("a", 5)), Pushed::Duplicate);
    assert_eq!(o.push_update(&upd("a", 6)), Pushed::Queued);
    assert_eq!(o.push_update(&upd("a", 6)), Pushed::Duplicate);
    assert_eq!(drain(&o), vec!["a@6"]);
    assert_eq!(
        o.push_update(&upd("a", 6)),
        Pushed::Duplicate,
        "already sent"
    );
    assert_eq!(
        o.push_update(&upd("a", 4)),
        Pushed::Duplicate,
        "older than sent"
    );
    o.forget_sent();
    assert_eq!(o.push_update(&upd("a", 6)), Pushed::Queued, "after a reset");
}

#[test]
fn hopelessly_behind_client_is_closed_with_4408() {
    let o = Outbox::default();
    let t0 = Instant::now();
    assert_eq!(o.push_update_at(&upd("a", 1), t0), Pushed::Queued);
    let later = t0 + SLOW_CLIENT_TIMEOUT + Duration::from_secs(1);
    assert_eq!(o.push_update_at(&upd("a", 2), later), Pushed::TooSlow);
    assert_eq!(drain(&o), vec!["close 4408"]);
    assert_eq!(o.push_update(&upd("a", 3)), Pushed::Closed);
}

#[test]
fn control_messages_are_never_conflated() {
    let o = Outbox::with_threshold(HashMap::new(), 100, Arc::default());
    for v in 1..=100 {
        o.push_update(&upd("a", v));
    }
    o.push_message("reset", Bytes::from_static(b"reset"));
    let got = drain(&o);
    assert_eq!(
        got.last().unwrap(),
        "reset",
        "queued after the updates, kept"
    );
    assert!(got.contains(&"a@100".to_string()));
}

#[test]
fn a_pod_over_its_budget_conflates_every_outbox() {
    let budget = Arc::new(Budget::new(1000));
    let big = Outbox::new(HashMap::new(), budget.clone());
    let small = Outbox::new(HashMap::new(), budget.clone());
    // Each outbox far below its own threshold, together over the budget.
    // Distinct markets: nothing of `big` can conflate with itself.
    for i in 0..200 {
        assert_eq!(big.push_update(&upd(&format!("m{i}"), 1)), Pushed::Queued);
    }
    assert_eq!(budget.queued(), big.queued_bytes());
    assert!(budget.queued() >= 1000);
    assert_eq!(small.push_update(&upd("x", 1)), Pushed::Queued);
    assert_eq!(small.push_update(&upd("x", 2)), Pushed::Conflated);
    assert_eq!(big.push_update(&upd("m5", 2)), Pushed::Conflated);
    assert_eq!(drain(&small), vec!["x@2"]);
    // Memory goes back to the budget on pop, close and drop.
    drain(&big);
    assert_eq!(budget.queued(), 0);
    small.push_update(&upd("x", 3));
    small.close(1000, "bye");
    assert_eq!(budget.queued(), 0);
    let gone = Outbox::new(HashMap::new(), budget.clone());
    gone.push_update(&upd("y", 1));
    drop(gone);
    assert_eq!(budget.queued(), 0);
    assert_eq!(small.push_update(&upd("x", 4)), Pushed::Closed);
}
