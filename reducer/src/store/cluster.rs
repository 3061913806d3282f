//! Redis Cluster helpers of the store: which master serves which slots
//! (for one `WAIT` per master a batch touched), and how a run of updates is
//! cut into single-slot script calls.

use std::collections::{BTreeMap, BTreeSet};

use redis::cluster::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::Value;
use streampipe_contract::{slot, Keys};

use super::UPDATE_SCRIPT_CHUNK;
use crate::core::Effect;

/// Reads `CLUSTER SLOTS`: `(first, last, master node id)` per slot range.
pub(super) fn master_ranges(
    conn: &mut ClusterConnection,
) -> redis::RedisResult<Vec<(u16, u16, String)>> {
    let value = conn.route_command(
        &redis::cmd("CLUSTER").arg("SLOTS").to_owned(),
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
    )?;
    // Each entry: [first, last, [host, port, id, ...], replicas...].
    let entries: Vec<Vec<Value>> = redis::from_redis_value(value)?;
    let mut ranges = Vec::with_capacity(entries.len());
    for e in entries {
        if e.len() < 3 {
            continue;
        }
        let first: u16 = redis::from_redis_value(e[0].clone())?;
        let last: u16 = redis::from_redis_value(e[1].clone())?;
        let master: Vec<Value> = redis::from_redis_value(e[2].clone())?;
        let id = match master.get(2) {
            Some(v) => redis::from_redis_value::<String>(v.clone())?,
            // Old servers without ids: the address names the master.
            None => format!("{:?}", master),
        };
        ranges.push((first, last, id));
    }
    Ok(ranges)
}

/// One slot per master among `slots`, so a batch sends one `WAIT` per master
/// it touched. Slots outside every known range (a topology change) each get
/// their own `WAIT`: slower, never wrong.
pub(super) fn one_slot_per_master(
    slots: &BTreeSet<u16>,
    ranges: &[(u16, u16, String)],
) -> Vec<u16> {
    let mut by_master: BTreeMap<&str, u16> = BTreeMap::new();
    let mut unknown = Vec::new();
    for &s in slots {
        match ranges.iter().find(|(a, b, _)| (*a..=*b).contains(&s)) {
            Some((_, _, id)) => {
                by_master.entry(id.as_str()).or_insert(s);
            }
            None => unknown.push(s),
        }
    }
    by_master.into_values().chain(unknown).collect()
}

/// Splits a run of consecutive updates into script calls of at most
/// [`UPDATE_SCRIPT_CHUNK`] updates.
///
/// On standalone Redis any updates may share a call, in order. On Redis
/// Cluster a call must stay within one hash slot, so the run is first
/// grouped by the slot of each market's state key (a stable partition: one
/// market's updates keep their order; different markets are independent),
/// then each group is chunked.
pub(super) fn update_calls<'e>(
    run: &[&'e Effect],
    keys: &Keys,
    cluster: bool,
) -> Vec<Vec<&'e Effect>> {
    if !cluster {
        return run
            .chunks(UPDATE_SCRIPT_CHUNK)
            .map(<[&Effect]>::to_vec)
            .collect();
    }
    let mut groups: BTreeMap<u16, Vec<&'e Effect>> = BTreeMap::new();
    for e in run {
        if let Effect::Update { market, .. } = e {
            groups
                .entry(slot(keys.market_state(market).as_bytes()))
                .or_default()
                .push(e);
        }
    }
    groups
        .into_values()
        .flat_map(|g| {
            g.chunks(UPDATE_SCRIPT_CHUNK)
                .map(<[&Effect]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}
