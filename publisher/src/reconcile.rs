//! Registry ↔ reducer-map reconciliation (issue #9 item 3).
//!
//! A channel's markets live in two places: the registry (`…:reg`, written
//! by the control API before it produces the commands) and the reducers'
//! channel→markets map (`…:c2m`, written when the owning reducer applies
//! the command). They can disagree after a failed step: a subscribe never
//! produced (the API failed after its registry write) leaves the channel's
//! streams without that market for good; an unsubscribe that never arrived
//! leaves the reducers publishing a market nobody asked for. One pod at a
//! time (the janitor's lock holder) walks the channel leases a page per
//! round and repairs what disagreed **in two consecutive visits**: a
//! command in flight usually settles well within a janitor interval, so a
//! disagreement still there a visit later is taken as a lost step. A
//! repair sent is not sent again for [`REPAIR_HOLDOFF`]: behind a command
//! backlog it can take longer to apply, and repeating it would only add
//! to that backlog.
//!
//! The registry is the client's intent (it is written first and only by
//! the API), so a market only the registry has is subscribed again and a
//! market only the reducers have is unsubscribed. The pure part
//! ([`disagreements`], [`Reconciler::confirm`]) decides; [`round`] reads
//! Redis and produces the commands.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use streampipe_contract::message::CommandKind;
use tracing::info;

use crate::Context;

/// Channels compared per round: two SMEMBERS each (one slot, one round
/// trip), so a round's Redis work stays small whatever the channel count.
pub const RECONCILE_PAGE: usize = 1000;

/// Channels remembered with an unconfirmed disagreement, at most: bounds
/// the lock holder's memory if Redis churns; beyond it the memory starts
/// over (a real disagreement is confirmed a visit later).
pub const MAX_SUSPECTS: usize = 10 * RECONCILE_PAGE;

/// How long a repair is not sent again: its command may wait behind the
/// reducers' command backlog (a rebalance, a busy partition), and
/// re-sending it every two visits would pile duplicates onto that backlog.
/// Past this, a repair still not applied is taken as lost and sent again.
pub const REPAIR_HOLDOFF: Duration = Duration::from_secs(30);

/// What one side lacks.
pub type Repairs = HashMap<String, CommandKind>;

/// What the registry and the reducers' map disagree on: markets only the
/// registry has need a subscribe, markets only the reducers have an
/// unsubscribe.
pub fn disagreements(registry: &HashSet<String>, reducers: &HashSet<String>) -> Repairs {
    let subscribe = registry
        .difference(reducers)
        .map(|m| (m.clone(), CommandKind::Subscribe));
    let unsubscribe = reducers
        .difference(registry)
        .map(|m| (m.clone(), CommandKind::Unsubscribe));
    subscribe.chain(unsubscribe).collect()
}

/// The lock holder's walk over the channels: where it is and what it saw
/// last time.
#[derive(Debug, Default)]
pub struct Reconciler {
    /// The `ZSCAN` cursor over the channel leases (0: start over).
    cursor: u64,
    /// Disagreements seen on the previous visit, per channel.
    suspects: HashMap<String, Repairs>,
    /// Repairs sent, per (channel, market), and when: not sent again
    /// within [`REPAIR_HOLDOFF`]. Bounded like `suspects`.
    sent: HashMap<(String, String), (CommandKind, Instant)>,
}

impl Reconciler {
    /// Given this visit's disagreements of `channel` at `at`, returns the
    /// repairs seen on the previous visit too (same market, same direction)
    /// and not already sent within [`REPAIR_HOLDOFF`], and remembers the
    /// others for the next visit.
    pub fn confirm(
        &mut self,
        channel: &str,
        now: Repairs,
        at: Instant,
    ) -> Vec<(String, CommandKind)> {
        let before = self.suspects.remove(channel).unwrap_or_default();
        let sent = &self.sent;
        let (confirmed, pending): (Repairs, Repairs) = now.into_iter().partition(|(m, kind)| {
            let recently = sent
                .get(&(channel.to_owned(), m.clone()))
                .is_some_and(|(k, t)| {
                    k == kind && at.saturating_duration_since(*t) < REPAIR_HOLDOFF
                });
            before.get(m) == Some(kind) && !recently
        });
        if self.sent.len() >= MAX_SUSPECTS {
            self.sent
                .retain(|_, (_, t)| at.saturating_duration_since(*t) < REPAIR_HOLDOFF);
            if self.sent.len() >= MAX_SUSPECTS {
                self.sent.clear();
            }
        }
        for (m, kind) in &confirmed {
            self.sent
                .insert((channel.to_owned(), m.clone()), (*kind, at));
        }
        if !pending.is_empty() {
            if self.suspects.len() >= MAX_SUSPECTS {
                self.suspects.clear();
            }
            self.suspects.insert(channel.to_owned(), pending);
        }
        let mut out: Vec<(String, CommandKind)> = confirmed.into_iter().collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Channels with an unconfirmed disagreement.
    pub fn suspects(&self) -> usize {
        self.suspects.len()
    }
}

/// One page of the walk: compares each channel's two sides, repairs what
/// was confirmed, counts everything. Returns the repairs made.
pub async fn round(ctx: &Context, r: &mut Reconciler) -> crate::Result<usize> {
    let (next, channels) = ctx.registry.scan_leases(r.cursor, RECONCILE_PAGE).await?;
    r.cursor = next;
    let mut repaired = 0;
    for channel in channels {
        let (registry, reducers) = ctx.registry.both_sides(&channel).await?;
        ctx.metrics.reconcile_checked.inc();
        let confirmed = r.confirm(
            &channel,
            disagreements(&registry, &reducers),
            std::time::Instant::now(),
        );
        for kind in [CommandKind::Subscribe, CommandKind::Unsubscribe] {
            let markets: Vec<String> = confirmed
                .iter()
                .filter(|(_, k)| *k == kind)
                .map(|(m, _)| m.clone())
                .collect();
            if markets.is_empty() {
                continue;
            }
            ctx.commands
                .send(kind, &channel, &markets, &ctx.metrics)
                .await?;
            ctx.metrics
                .reconcile_repairs
                .with_label_values(&[kind.as_str()])
                .inc_by(markets.len() as u64);
            info!(%channel, ?markets, command = %kind, "registry and reducers disagreed: repaired");
            repaired += markets.len();
        }
    }
    Ok(repaired)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    fn set(v: &[&str]) -> HashSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn each_side_missing_a_market_gets_its_command() {
        let d = disagreements(&set(&["a", "b", "c"]), &set(&["b", "c", "x"]));
        assert_eq!(d.len(), 2);
        assert_eq!(d["a"], CommandKind::Subscribe);
        assert_eq!(d["x"], CommandKind::Unsubscribe);
        assert!(disagreements(&set(&["a"]), &set(&["a"])).is_empty());
        assert!(disagreements(&set(&[]), &set(&[])).is_empty());
    }

    #[test]
    fn only_a_disagreement_seen_twice_is_repaired() {
        let mut r = Reconciler::default();
        let d = || disagreements(&set(&["a", "b"]), &set(&["b", "x"]));
        assert!(
            r.confirm("c1", d(), t0()).is_empty(),
            "first sight: in flight?"
        );
        assert_eq!(r.suspects(), 1);
        assert_eq!(
            r.confirm("c1", d(), t0()),
            vec![
                ("a".to_owned(), CommandKind::Subscribe),
                ("x".to_owned(), CommandKind::Unsubscribe)
            ]
        );
        assert_eq!(r.suspects(), 0, "repaired ones are forgotten");
    }

    #[test]
    fn a_settled_or_changed_disagreement_is_not_repaired() {
        let mut r = Reconciler::default();
        r.confirm("c1", disagreements(&set(&["a"]), &set(&[])), t0());
        // The subscribe was applied meanwhile: nothing to do, nothing kept.
        assert!(r
            .confirm("c1", disagreements(&set(&["a"]), &set(&["a"])), t0())
            .is_empty());
        assert_eq!(r.suspects(), 0);
        // Direction flipped (removed, unsubscribe pending): start over.
        r.confirm("c1", disagreements(&set(&["a"]), &set(&[])), t0());
        assert!(r
            .confirm("c1", disagreements(&set(&[]), &set(&["a"])), t0())
            .is_empty());
        assert_eq!(r.suspects(), 1);
        // Other channels do not confirm each other.
        r.confirm("c2", disagreements(&set(&["m"]), &set(&[])), t0());
        assert!(r
            .confirm("c3", disagreements(&set(&["m"]), &set(&[])), t0())
            .is_empty());
    }

    #[test]
    fn suspects_are_bounded() {
        let mut r = Reconciler::default();
        for i in 0..MAX_SUSPECTS + 5 {
            r.confirm(
                &format!("c{i}"),
                disagreements(&set(&["a"]), &set(&[])),
                t0(),
            );
        }
        assert!(r.suspects() <= MAX_SUSPECTS);
    }

    #[test]
    fn a_repair_in_flight_is_not_sent_again_within_the_holdoff() {
        let mut r = Reconciler::default();
        let at = Instant::now();
        let d = || disagreements(&set(&["a"]), &set(&[]));
        assert!(r.confirm("c1", d(), at).is_empty());
        assert_eq!(r.confirm("c1", d(), at).len(), 1, "confirmed: repaired");
        // The reducers have not applied it yet: seen twice more, not resent.
        let soon = at + REPAIR_HOLDOFF / 2;
        assert!(r.confirm("c1", d(), soon).is_empty());
        assert!(r.confirm("c1", d(), soon).is_empty());
        // Still not applied after the holdoff: taken as lost, sent again.
        let later = at + REPAIR_HOLDOFF;
        assert_eq!(r.confirm("c1", d(), later).len(), 1);
        // The other direction is a new repair, not held back.
        let flipped = || disagreements(&set(&[]), &set(&["a"]));
        assert!(r.confirm("c1", flipped(), later).is_empty());
        assert_eq!(r.confirm("c1", flipped(), later).len(), 1);
    }
}
