//! Turning consumed records into the pending batch: each record goes
//! through the pure [`Core`], its effects join the batch, and malformed or
//! refused records become dead letters (counted, and logged once per kind).

use rdkafka::message::{BorrowedMessage, Message};
use std::time::Instant;
use tracing::{debug, warn};

use super::Inner;
use crate::core::{Effect, Event, Record, TopicKind};
use crate::dead_letter::DeadLetter;

impl Inner {
    /// Applies one consumed record to the core and adds its effects to the batch.
    pub(super) fn ingest(&mut self, msg: &BorrowedMessage<'_>) {
        let topic = if msg.topic() == self.config.data_topic {
            TopicKind::Data
        } else if msg.topic() == self.config.command_topic {
            TopicKind::Command
        } else {
            warn!(
                topic = msg.topic(),
                "record from an unexpected topic ignored"
            );
            return;
        };
        self.metrics
            .records
            .with_label_values(&[topic.as_str()])
            .inc();
        let timestamp = msg.timestamp().to_millis();
        let mut fx = std::mem::take(&mut self.scratch);
        self.core.apply(
            Event::Record(Record {
                topic,
                partition: msg.partition(),
                offset: msg.offset(),
                key: msg.key(),
                value: msg.payload(),
                timestamp,
            }),
            &mut fx,
        );
        for effect in fx.drain(..) {
            match effect {
                Effect::DeadLetter {
                    topic: t,
                    partition,
                    offset,
                    kind,
                    reason,
                } => {
                    self.metrics
                        .malformed
                        .with_label_values(&[t.as_str(), kind])
                        .inc();
                    // Log each kind of bad record once at warn level; a flood of
                    // the same mistake must not flood the logs.
                    if self.logged_reasons.insert((t, kind)) {
                        warn!(topic = t.as_str(), partition, offset, kind, %reason,
                            "malformed record skipped (further ones of this kind are logged at debug)");
                    } else {
                        debug!(topic = t.as_str(), partition, offset, kind, %reason, "malformed record skipped");
                    }
                    self.batch.dead_letters.push(DeadLetter {
                        topic: self.topic_name(t).to_owned(),
                        partition,
                        offset,
                        key: msg.key().map(<[u8]>::to_vec),
                        value: msg.payload().map(<[u8]>::to_vec),
                        reason,
                    });
                }
                Effect::Skipped(s) => {
                    self.metrics.skipped.with_label_values(&[s.as_str()]).inc();
                }
                e => {
                    match &e {
                        Effect::Subscribe { .. } => self
                            .metrics
                            .commands
                            .with_label_values(&["subscribe"])
                            .inc(),
                        Effect::Unsubscribe { .. } => self
                            .metrics
                            .commands
                            .with_label_values(&["unsubscribe"])
                            .inc(),
                        Effect::ResetMarket { market } => {
                            self.metrics
                                .commands
                                .with_label_values(&["reset_market"])
                                .inc();
                            warn!(%market, "operator reset: the market's stored state and version are deleted");
                        }
                        Effect::QueryHeld { held, .. } => self
                            .metrics
                            .commands
                            .with_label_values(&[if *held { "add_query" } else { "remove_query" }])
                            .inc(),
                        Effect::QueryMatch { joined, left, .. } => {
                            let c = &self.metrics.query_changes;
                            c.with_label_values(&["joined"]).inc_by(joined.len() as u64);
                            c.with_label_values(&["left"]).inc_by(left.len() as u64);
                        }
                        _ => {}
                    }
                    self.batch.effects.push(e);
                }
            }
        }
        self.scratch = fx;
        if topic == TopicKind::Data {
            if let Some(ts) = timestamp {
                self.batch.data_timestamps.push(ts);
            }
        }
        self.ledger.record((topic, msg.partition()), msg.offset());
        self.batch.records += 1;
        self.batch.started.get_or_insert_with(Instant::now);
    }

    /// The dead letter of an update Redis refused as jumping too far ahead.
    /// Its value is the update as the reducer encoded it (the decision is
    /// made in Redis, after the record's bytes were released).
    pub(super) fn version_jump_letter(&mut self, j: crate::store::Jumped) -> DeadLetter {
        let kind = "version_jump";
        self.metrics
            .malformed
            .with_label_values(&[TopicKind::Data.as_str(), kind])
            .inc();
        let reason = format!(
            "version {} is more than {} ahead of the stored version",
            j.version, self.config.max_version_jump
        );
        if self.logged_reasons.insert((TopicKind::Data, kind)) {
            warn!(market = %j.market, partition = j.partition, offset = j.offset, %reason,
                "record refused (further ones of this kind are logged at debug)");
        } else {
            debug!(market = %j.market, partition = j.partition, offset = j.offset, %reason, "record refused");
        }
        DeadLetter {
            topic: self.config.data_topic.clone(),
            partition: j.partition,
            offset: j.offset,
            key: Some(j.market.as_bytes().to_vec()),
            value: Some(j.message),
            reason,
        }
    }

    pub(super) fn send_dead_letters(&mut self, letters: Vec<DeadLetter>) {
        if let Some(d) = &self.dead_letters {
            d.send(&letters);
        }
    }
}
