//! Whose object is it? Decided before any child is applied, because a
//! server-side apply with `force` would take over an object of the same
//! name that someone else made — and the owner reference it adds makes the
//! garbage collector delete that object with the pipeline.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::builders::FIELD_MANAGER;

/// The verdict on a live object with a child's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Controlled by this pipeline (owner reference with its UID).
    Ours,
    /// Made by this operator for this pipeline (our server-side apply entry,
    /// no instance label naming another pipeline), but
    /// its owner reference was removed: the next apply restores it.
    Orphaned,
    /// Someone else's: leave it alone. Says whose, for people.
    Foreign(String),
}

/// Classifies `meta` for the pipeline `name` with `uid`.
pub fn classify(meta: &ObjectMeta, name: &str, uid: &str) -> Owner {
    let refs = meta.owner_references.as_deref().unwrap_or_default();
    if let Some(c) = refs.iter().find(|r| r.controller == Some(true)) {
        return if c.uid == uid {
            Owner::Ours
        } else {
            Owner::Foreign(format!("it is controlled by {} {}", c.kind, c.name))
        };
    }
    let label = |k: &str| {
        meta.labels
            .as_ref()
            .and_then(|l| l.get(k))
            .map(String::as_str)
    };
    let applied_by_us = meta.managed_fields.iter().flatten().any(|m| {
        m.manager.as_deref() == Some(FIELD_MANAGER) && m.operation.as_deref() == Some("Apply")
    });
    // Labels can be edited away together with the reference (then the
    // apply entry alone tells), but one naming another pipeline is not ours.
    if applied_by_us && label("app.kubernetes.io/instance").is_none_or(|i| i == name) {
        Owner::Orphaned
    } else {
        Owner::Foreign("it was not created by this pipeline".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, OwnerReference};
    use std::collections::BTreeMap;

    fn owner(uid: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: "streampipe.dev/v1alpha1".into(),
            kind: "StreamPipeline".into(),
            name: "odds".into(),
            uid: uid.into(),
            controller: Some(controller),
            ..Default::default()
        }
    }

    fn ours_by_labels() -> ObjectMeta {
        ObjectMeta {
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into()),
                ("app.kubernetes.io/instance".into(), "odds".into()),
            ])),
            managed_fields: Some(vec![ManagedFieldsEntry {
                manager: Some(FIELD_MANAGER.into()),
                operation: Some("Apply".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn controller_reference_decides() {
        let m = ObjectMeta {
            owner_references: Some(vec![owner("u1", true)]),
            ..Default::default()
        };
        assert_eq!(classify(&m, "odds", "u1"), Owner::Ours);
        assert!(
            matches!(classify(&m, "odds", "u2"), Owner::Foreign(w) if w.contains("StreamPipeline odds"))
        );
    }

    #[test]
    fn a_users_object_is_foreign_even_with_a_non_controller_reference() {
        let mut m = ObjectMeta::default();
        assert!(matches!(classify(&m, "odds", "u1"), Owner::Foreign(_)));
        m.owner_references = Some(vec![owner("u1", false)]);
        assert!(matches!(classify(&m, "odds", "u1"), Owner::Foreign(_)));
        // Our labels alone (copied by hand) are not enough.
        let mut labelled = ours_by_labels();
        labelled.managed_fields = None;
        assert!(matches!(
            classify(&labelled, "odds", "u1"),
            Owner::Foreign(_)
        ));
    }

    #[test]
    fn our_child_without_its_owner_reference_is_taken_back() {
        assert_eq!(classify(&ours_by_labels(), "odds", "u1"), Owner::Orphaned);
        let mut stripped = ours_by_labels();
        stripped.labels = None;
        assert_eq!(classify(&stripped, "odds", "u1"), Owner::Orphaned);
        assert!(matches!(
            classify(&ours_by_labels(), "other", "u1"),
            Owner::Foreign(_)
        ));
    }
}
