//! Which namespaces the operator watches, and so which rights it needs.
//!
//! The default is its own namespace: a namespace-scoped install, where
//! every right (Deployments, Services, ConfigMaps, PDBs, `get secrets`,
//! Events, pipelines) comes from a RoleBinding in a watched namespace and
//! none is cluster-wide. `--namespaces a,b` widens it to a list (each one
//! needs its RoleBinding); `--namespaces '*'` is the explicit cluster-wide
//! mode, which needs a ClusterRoleBinding (see `docs/security.md`).

use std::fmt;

/// The namespaces the controller watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchScope {
    /// Every namespace (`--namespaces '*'`): needs cluster-wide rights.
    All,
    /// These namespaces only (sorted, without duplicates, never empty).
    Namespaces(Vec<String>),
}

/// The value of `--namespaces` that means every namespace.
pub const ALL_NAMESPACES: &str = "*";

/// A `--namespaces` value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--namespaces: {0}")]
pub struct ScopeError(String);

/// Whether `s` is a namespace name (an RFC 1123 label).
fn is_namespace_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl WatchScope {
    /// The scope from `--namespaces` (comma-separated; `*` alone means all);
    /// without it (or blank), the operator's own namespace `own`.
    pub fn parse(flag: Option<&str>, own: &str) -> Result<Self, ScopeError> {
        let items: Vec<&str> = flag
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if items.is_empty() {
            if !is_namespace_name(own) {
                return Err(ScopeError(format!(
                    "no namespace given and the operator's own namespace {own:?} is not a namespace name"
                )));
            }
            return Ok(WatchScope::Namespaces(vec![own.to_owned()]));
        }
        if items.contains(&ALL_NAMESPACES) {
            if items.len() > 1 {
                return Err(ScopeError(format!(
                    "{ALL_NAMESPACES:?} (every namespace) cannot be combined with names"
                )));
            }
            return Ok(WatchScope::All);
        }
        let mut names = Vec::with_capacity(items.len());
        for i in items {
            if !is_namespace_name(i) {
                return Err(ScopeError(format!("{i:?} is not a namespace name")));
            }
            names.push(i.to_owned());
        }
        names.sort();
        names.dedup();
        Ok(WatchScope::Namespaces(names))
    }

    /// One entry per controller to run: `None` is every namespace.
    pub fn watches(&self) -> Vec<Option<String>> {
        match self {
            WatchScope::All => vec![None],
            WatchScope::Namespaces(ns) => ns.iter().cloned().map(Some).collect(),
        }
    }

    /// Whether pipelines in `namespace` are watched.
    pub fn covers(&self, namespace: &str) -> bool {
        match self {
            WatchScope::All => true,
            WatchScope::Namespaces(ns) => ns.iter().any(|n| n == namespace),
        }
    }
}

impl fmt::Display for WatchScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WatchScope::All => f.write_str("all namespaces"),
            WatchScope::Namespaces(ns) => f.write_str(&ns.join(",")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(v: &[&str]) -> WatchScope {
        WatchScope::Namespaces(v.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn the_default_is_the_operators_own_namespace() {
        assert_eq!(
            WatchScope::parse(None, "streampipe-system"),
            Ok(ns(&["streampipe-system"]))
        );
        assert_eq!(WatchScope::parse(Some(" , "), "own"), Ok(ns(&["own"])));
        assert!(WatchScope::parse(None, "").is_err());
    }

    #[test]
    fn a_list_is_trimmed_sorted_and_deduplicated() {
        assert_eq!(
            WatchScope::parse(Some("team-b, team-a,team-b,"), "own"),
            Ok(ns(&["team-a", "team-b"]))
        );
        let s = WatchScope::parse(Some("a,b"), "own").unwrap();
        assert_eq!(s.watches(), vec![Some("a".into()), Some("b".into())]);
        assert!(s.covers("a") && !s.covers("own") && !s.covers("kube-system"));
        assert_eq!(s.to_string(), "a,b");
    }

    #[test]
    fn cluster_wide_is_explicit_and_alone() {
        let all = WatchScope::parse(Some("*"), "own").unwrap();
        assert_eq!(all, WatchScope::All);
        assert_eq!(all.watches(), vec![None]);
        assert!(all.covers("kube-system"));
        assert!(WatchScope::parse(Some("*,a"), "own").is_err());
    }

    #[test]
    fn names_must_be_namespace_names() {
        for bad in ["Team", "a_b", "-a", "a-", "a.b", &"x".repeat(64)] {
            assert!(WatchScope::parse(Some(bad), "own").is_err(), "{bad}");
        }
    }
}
