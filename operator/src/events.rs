//! Events (`events.k8s.io/v1`) that the API server accepts and that do not
//! storm.
//!
//! Two problems with recording every decision naively: the API server
//! rejects a note over 1024 bytes (a whole API error with the object in it
//! easily is), and a reconcile retried with backoff would create a new Event
//! per retry. So notes are cut at a character boundary below the limit, and
//! an Event identical to one already recorded (same object, type, reason,
//! related object and note) is not created again: its `series` count grows
//! in memory and is written back at most once per [`SERIES_PATCH_EVERY`]
//! for a Warning (a retried failure), or at once for a Normal Event (each
//! is an action that really happened again, such as a child recreated).
//! A different note is a different Event, so alternating problems stay
//! visible. The memory is per operator process (a new leader re-records a
//! standing problem once) and forgets entries after [`MEMORY`], the API
//! server's default Event TTL.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{EventType, Reporter};
use kube::Client;
use serde_json::json;
use tracing::warn;

/// Longest note the API server accepts (bytes).
pub const NOTE_MAX: usize = 1024;
/// How often a repeating Event's series count is written back, at most.
pub const SERIES_PATCH_EVERY: Duration = Duration::from_secs(60);
/// How long an Event is remembered (the API server's default Event TTL).
pub const MEMORY: Duration = Duration::from_secs(3600);

/// Cuts `s` to at most `max` bytes at a character boundary, marking the cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    const MARK: &str = " …";
    let mut end = max.saturating_sub(MARK.len());
    while end > 0 && !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &s[..end])
}

/// One Event to record.
#[derive(Debug, Clone)]
pub struct Note {
    /// Normal or Warning.
    pub type_: EventType,
    /// CamelCase reason.
    pub reason: String,
    /// What the operator did (`Apply`, `Validate`, ...).
    pub action: String,
    /// For people; truncated to [`NOTE_MAX`].
    pub note: String,
    /// The child the Event is about, if any.
    pub related: Option<ObjectReference>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    regarding: (Option<String>, Option<String>, Option<String>),
    type_: &'static str,
    reason: String,
    related: Option<(Option<String>, Option<String>)>,
    note: String,
}

struct Sent {
    name: String,
    count: i32,
    last_seen: Instant,
    last_written: Instant,
}

/// Records Events, de-duplicated.
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    sent: Mutex<HashMap<Key, Sent>>,
}

fn type_str(t: EventType) -> &'static str {
    match t {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    }
}

/// What to do with an Event, given the memory.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Create,
    Patch { name: String, count: i32 },
    Skip,
}

/// Decides about `key` at `now` and updates the memory (a new Event is
/// remembered only once created). `every`: write each repeat.
fn step(sent: &mut HashMap<Key, Sent>, key: &Key, every: bool, now: Instant) -> Step {
    sent.retain(|_, s| now.saturating_duration_since(s.last_seen) < MEMORY);
    match sent.get_mut(key) {
        None => Step::Create,
        Some(s) => {
            s.count += 1;
            s.last_seen = now;
            if every || now.saturating_duration_since(s.last_written) >= SERIES_PATCH_EVERY {
                s.last_written = now;
                Step::Patch {
                    name: s.name.clone(),
                    count: s.count,
                }
            } else {
                Step::Skip
            }
        }
    }
}

impl Recorder {
    /// A recorder writing as `reporter`.
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Recorder {
            client,
            reporter,
            sent: Mutex::new(HashMap::new()),
        }
    }

    /// Records `ev` about `regarding` (best effort: a failure is logged).
    pub async fn publish(&self, regarding: &ObjectReference, ev: Note) {
        let note = truncate(&ev.note, NOTE_MAX);
        let key = Key {
            regarding: (
                regarding.namespace.clone(),
                regarding.name.clone(),
                regarding.uid.clone(),
            ),
            type_: type_str(ev.type_),
            reason: ev.reason.clone(),
            related: ev
                .related
                .as_ref()
                .map(|r| (r.kind.clone(), r.name.clone())),
            note: note.clone(),
        };
        let now = Instant::now();
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        let every = matches!(ev.type_, EventType::Normal);
        let step = step(
            &mut self.sent.lock().unwrap_or_else(|p| p.into_inner()),
            &key,
            every,
            now,
        );
        match step {
            Step::Skip => {}
            Step::Patch { name, count } => {
                let series = json!({"series": EventSeries {
                    count,
                    last_observed_time: MicroTime(jiff::Timestamp::now()),
                }});
                let res = api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&series))
                    .await;
                if let Err(e) = res {
                    // Expired (TTL) or deleted: record it afresh next time.
                    self.forget(&key);
                    warn!(error = %e, reason = %ev.reason, "could not update event series");
                }
            }
            Step::Create => {
                let stamp = jiff::Timestamp::now();
                let name = format!(
                    "{}.{:x}",
                    regarding
                        .name
                        .as_deref()
                        .unwrap_or(&self.reporter.controller),
                    stamp.as_nanosecond()
                );
                let event = K8sEvent {
                    action: Some(truncate(&ev.action, 128)),
                    reason: Some(truncate(&ev.reason, 128)),
                    event_time: Some(MicroTime(stamp)),
                    regarding: Some(regarding.clone()),
                    related: ev.related.clone(),
                    note: Some(note),
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(namespace.clone()),
                        ..Default::default()
                    },
                    reporting_controller: Some(self.reporter.controller.clone()),
                    reporting_instance: Some(truncate(
                        self.reporter
                            .instance
                            .as_deref()
                            .unwrap_or(&self.reporter.controller),
                        128,
                    )),
                    type_: Some(type_str(ev.type_).into()),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &event).await {
                    Ok(_) => {
                        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
                        sent.insert(
                            key,
                            Sent {
                                name,
                                count: 1,
                                last_seen: now,
                                last_written: now,
                            },
                        );
                    }
                    Err(e) => warn!(error = %e, reason = %ev.reason, "could not record event"),
                }
            }
        }
    }

    fn forget(&self, key: &Key) {
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(note: &str) -> Key {
        Key {
            regarding: (Some("prod".into()), Some("odds".into()), Some("uid".into())),
            type_: "Warning",
            reason: "ReconcileFailed".into(),
            related: None,
            note: note.into(),
        }
    }

    #[test]
    fn repeats_fold_into_a_series_and_different_notes_do_not() {
        let mut sent = HashMap::new();
        let t0 = Instant::now();
        let k = key("boom");
        assert_eq!(step(&mut sent, &k, false, t0), Step::Create);
        sent.insert(
            k.clone(),
            Sent {
                name: "odds.1".into(),
                count: 1,
                last_seen: t0,
                last_written: t0,
            },
        );
        // A retried failure within the minute: nothing written.
        assert_eq!(
            step(&mut sent, &k, false, t0 + Duration::from_secs(2)),
            Step::Skip
        );
        assert_eq!(
            step(&mut sent, &k, false, t0 + Duration::from_secs(4)),
            Step::Skip
        );
        // After a minute: the series count, all repeats counted.
        assert_eq!(
            step(&mut sent, &k, false, t0 + Duration::from_secs(61)),
            Step::Patch {
                name: "odds.1".into(),
                count: 4
            }
        );
        // A repeated action (Normal) is written each time.
        assert!(matches!(
            step(&mut sent, &k, true, t0 + Duration::from_secs(62)),
            Step::Patch { count: 5, .. }
        ));
        // Another note is another Event; an old one is forgotten after the TTL.
        assert_eq!(step(&mut sent, &key("other"), false, t0), Step::Create);
        assert_eq!(
            step(&mut sent, &k, false, t0 + Duration::from_secs(62) + MEMORY),
            Step::Create
        );
    }

    #[test]
    fn truncates_at_a_char_boundary_within_the_limit() {
        assert_eq!(truncate("short", NOTE_MAX), "short");
        let long = "é".repeat(1000); // 2000 bytes
        let t = truncate(&long, NOTE_MAX);
        assert!(t.len() <= NOTE_MAX, "{}", t.len());
        assert!(t.ends_with(" …"));
        assert!(t.starts_with("éé"));
        let exact = "a".repeat(NOTE_MAX);
        assert_eq!(truncate(&exact, NOTE_MAX), exact);
    }
}
