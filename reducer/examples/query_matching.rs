//! Query matching cost per data record in the reducer's core, next to a
//! same-run baseline of 0 queries (the machine is shared and noisy: rounds
//! alternate baseline and measured runs and the medians are compared).
//!
//! `cargo run --release -p streampipe-reducer --example query_matching`
//!
//! Each record is decoded, matched and turned into effects exactly as the
//! consumer does (`Core::apply`); Redis and Kafka are not involved. Records
//! do not match (the common case: a query watches a small part of the feed)
//! except in the `matching` rows, where every record's market matches one
//! query and the effect list carries no join (it already matched).

use std::time::Instant;

use streampipe_contract::{encode_query_command, partition_for, QueryCommand, QueryCommandKind};
use streampipe_reducer::core::{Core, Event, Record, TopicKind};

const PARTITIONS: u32 = 8;
const RECORDS: usize = 200_000;
const ROUNDS: usize = 5;

/// Which queries: `market^=Q<i>.`, plus `;status=open`, or no prefix at
/// all (`sport=s<i>`: compared with every record, the worst case).
#[derive(Clone, Copy)]
enum Shape {
    Prefix,
    PrefixAndField,
    FieldOnly,
}

fn core_with(queries: usize, shape: Shape) -> Core {
    let mut core = Core::new(PARTITIONS);
    for p in 0..PARTITIONS as i32 {
        core.apply(
            Event::Assigned {
                partition: p,
                subscriptions: vec![],
            },
            &mut Vec::new(),
        );
    }
    for i in 0..queries {
        let query = match shape {
            Shape::Prefix => format!("market^=Q{i}."),
            Shape::PrefixAndField => format!("market^=Q{i}.;status=open"),
            Shape::FieldOnly => format!("sport=s{i}"),
        };
        let v = encode_query_command(&QueryCommand {
            kind: QueryCommandKind::AddQuery,
            channel: format!("ch{i}"),
            query,
        });
        for p in 0..PARTITIONS as i32 {
            let mut out = Vec::new();
            core.apply(
                Event::Record(Record {
                    topic: TopicKind::Command,
                    partition: p,
                    offset: 0,
                    key: Some(b"k"),
                    value: Some(&v),
                    timestamp: None,
                }),
                &mut out,
            );
        }
    }
    core
}

/// ns per record over `records` (market id, value, partition).
fn run(core: &mut Core, records: &[(String, Vec<u8>, i32)]) -> f64 {
    let mut out = Vec::with_capacity(4);
    let t = Instant::now();
    for (i, (m, v, p)) in records.iter().enumerate() {
        out.clear();
        core.apply(
            Event::Record(Record {
                topic: TopicKind::Data,
                partition: *p,
                offset: i as i64,
                key: Some(m.as_bytes()),
                value: Some(v),
                timestamp: Some(1),
            }),
            &mut out,
        );
        std::hint::black_box(&out);
    }
    t.elapsed().as_nanos() as f64 / records.len() as f64
}

fn records(prefix: &str) -> Vec<(String, Vec<u8>, i32)> {
    (0..RECORDS)
        .map(|i| {
            let m = format!("{prefix}{}", i % 5000);
            let v = format!(
                r#"{{"v":1,"market":"{m}","version":{},"payload":{{"event":"Home v Away","home":1.50,"draw":3.20,"away":4.10,"status":"open"}}}}"#,
                i + 1
            );
            let p = partition_for(m.as_bytes(), PARTITIONS) as i32;
            (m, v.into_bytes(), p)
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let plain = records("M");
    let matching = records("Q0.");
    println!("| queries | clauses | records | baseline ns/record (0 queries) | ns/record | matching cost ns/record |");
    println!("|---|---|---|---|---|---|");
    use Shape::*;
    for (n, shape, recs, label) in [
        (10, Prefix, &plain, "non-matching"),
        (100, Prefix, &plain, "non-matching"),
        (1000, Prefix, &plain, "non-matching"),
        (1000, PrefixAndField, &plain, "non-matching"),
        (1000, PrefixAndField, &matching, "matching"),
        (10, FieldOnly, &plain, "non-matching"),
        (100, FieldOnly, &plain, "non-matching"),
        (1000, FieldOnly, &plain, "non-matching"),
    ] {
        let (mut base, mut with) = (Vec::new(), Vec::new());
        let mut b = core_with(0, Prefix);
        let mut w = core_with(n, shape);
        for _ in 0..ROUNDS {
            base.push(run(&mut b, recs));
            with.push(run(&mut w, recs));
        }
        let (b, w) = (median(base), median(with));
        let clauses = match shape {
            Prefix => "market^=",
            PrefixAndField => "market^= + status=",
            FieldOnly => "field only",
        };
        println!(
            "| {n} | {clauses} | {label} | {b:.0} | {w:.0} | {:.0} |",
            w - b
        );
    }
}
