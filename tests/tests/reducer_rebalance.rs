//! Rebalancing without stopping the world: with the cooperative protocol a
//! scale step or a restart pauses only the partitions that move, on both
//! brokers, and loses no update or command (see `streampipe_tests::rebalance`
//! for the scenario). Run against the stack (`scripts/stack.sh up`).
//!
//! The benchmark (`--ignored`) runs the scenario with the eager `range`
//! assignor the reducer used before and with the cooperative one, on both
//! brokers, and prints the figures of docs/benchmarks.md.

use streampipe_tests::rebalance::{run, ScenarioReport, Strategy};
use streampipe_tests::Broker;

/// Longest silence a partition that kept its owner may see during a
/// rebalance: a few hundred ms of the owner's own rebalance callback (drain,
/// commit, load of the moved partitions). The eager protocol silences every
/// partition for the whole rebalance: at least the mock broker's
/// session timeout − 1 s (2 s here) per round there, and on tansu
/// the join and sync of every member.
const KEPT_MAX_GAP_MS: u64 = 1000;

fn check(broker: Broker, r: &ScenarioReport) {
    for e in [&r.scale_up, &r.restart] {
        eprintln!("{} {}", broker.name(), e.summary());
        for p in &e.partitions {
            eprintln!("  {:?}", p);
        }
    }
    for e in [&r.scale_up, &r.restart] {
        assert!(
            e.kept().len() >= 3,
            "{}: most partitions keep their owner ({} of 8 did)",
            e.event,
            e.kept().len()
        );
        assert!(
            e.kept_max_gap_ms() < KEPT_MAX_GAP_MS,
            "{}: a partition that kept its owner was silent for {} ms",
            e.event,
            e.kept_max_gap_ms()
        );
    }
}

#[test]
fn only_moved_partitions_pause_dev() {
    let r = run(Broker::Dev, Strategy::Cooperative);
    check(Broker::Dev, &r);
}

#[test]
fn only_moved_partitions_pause_tansu() {
    let r = run(Broker::Tansu, Strategy::Cooperative);
    check(Broker::Tansu, &r);
}

/// Prints eager vs cooperative, per broker, in one run (a shared, noisy
/// machine: only same-run figures compare).
#[test]
#[ignore = "benchmark: cargo test -p streampipe-tests --test reducer_rebalance -- --ignored --nocapture"]
fn bench_rebalance_pause() {
    let mut lines = Vec::new();
    for broker in [Broker::Dev, Broker::Tansu] {
        for strategy in [Strategy::Eager, Strategy::Cooperative] {
            let r = run(broker, strategy);
            for e in [&r.scale_up, &r.restart] {
                let line = format!(
                    "| {} | {} | {} | {} | {} | {} / {} | {} | {} |",
                    broker.name(),
                    strategy.name(),
                    e.event,
                    e.settled_ms,
                    e.kept().len(),
                    e.kept_max_gap_ms(),
                    e.kept_p99_ms(),
                    e.calm_p99_ms,
                    e.moved_max_gap_ms(),
                );
                eprintln!("{line}");
                lines.push(line);
            }
        }
    }
    eprintln!("| broker | assignor | event | settled ms | partitions kept | kept: longest silence ms / p99 ms | calm p99 ms | moved: longest silence ms |");
    eprintln!("|---|---|---|---|---|---|---|---|");
    for l in lines {
        eprintln!("{l}");
    }
}
