//! Replays the lag-threshold and drain-time autoscaling policies over the
//! same synthetic traces (burst, steady ramp, restart spike, saturated
//! downstream, stuck partition) against the simulated consumer group of
//! `streampipe_operator::replay`, and prints per policy: scale steps
//! (= rebalances), peak lag, seconds over the drain target.
//!
//! `cargo run -p streampipe-operator --example autoscale_replay [-- --show TRACE]`
//! (`--show` also prints every replica change of that trace, per policy).

use std::time::Duration;

use streampipe_operator::autoscale::Policy;
use streampipe_operator::replay::{replay, traces, REBALANCE};

/// The drain target both policies are judged against (the CRD default).
const TARGET: Duration = Duration::from_secs(60);
/// The operator's poll interval (the CRD default).
const POLL: Duration = Duration::from_secs(10);

fn main() {
    // The CRD defaults, with a partition-count cap of 8 from the traces.
    let lag = Policy::default();
    // The lag rule tuned for this workload: a threshold above what one
    // rebalance pause leaves behind at the base rate (so a step does not
    // trigger the next one).
    let lag_tuned = Policy {
        lag_threshold: 5000,
        ..lag
    };
    let drain = Policy {
        drain_target: Some(TARGET),
        ..lag
    };
    println!(
        "8 partitions, 500 records/s per reducer, 20 min per trace, poll {} s, rebalance pause {REBALANCE} s, drain target {} s",
        POLL.as_secs(),
        TARGET.as_secs()
    );
    println!("| trace | policy | scale steps | max reducers | peak lag | s over target |");
    println!("|---|---|---:|---:|---:|---:|");
    let args: Vec<String> = std::env::args().collect();
    let show = args
        .iter()
        .position(|a| a == "--show")
        .and_then(|i| args.get(i + 1));
    let mut changes = Vec::new();
    for t in traces() {
        for (name, p) in [
            ("lag", &lag),
            ("lag 5000", &lag_tuned),
            ("drainTime", &drain),
        ] {
            let o = replay(&t, p, POLL, TARGET);
            println!(
                "| {} | {name} | {} | {} | {} | {} |",
                t.name, o.steps, o.max_replicas, o.peak_lag, o.seconds_over
            );
            if show.is_some_and(|s| s == t.name) {
                let mut last = t.start_replicas;
                for (at, d) in &o.decisions {
                    if d.replicas != last {
                        changes.push(format!(
                            "{name} t={at}s {last} → {}: {}",
                            d.replicas, d.reason
                        ));
                        last = d.replicas;
                    }
                }
            }
        }
    }
    for c in changes {
        println!("{c}");
    }
}
