//! What `spec.publisher.auth` puts into the publisher pods (pure, like
//! [`crate::builders`], which calls it): the mode and claims in the
//! ConfigMap, the HS256 secret as a `secretKeyRef` variable, public keys as
//! read-only files from their Secrets. Nothing here reads a Secret; the
//! kubelet does, so the operator never holds a key.

use serde_json::{json, Value};
use streampipe_contract::deploy::{auth_mode, env as names};

use crate::crd::{PublisherAuthSpec, StreamPipeline};

/// Where an RS256 public key is mounted in a publisher pod.
pub const RSA_KEY_DIR: &str = "/etc/streampipe/auth-rsa";
/// Where an ES256 public key is mounted in a publisher pod.
pub const EC_KEY_DIR: &str = "/etc/streampipe/auth-ec";
/// The file name a public key is mapped to inside its directory.
pub const PUBLIC_KEY_FILE: &str = "public.pem";

fn auth(sp: &StreamPipeline) -> Option<&PublisherAuthSpec> {
    sp.spec.publisher.auth.as_ref()
}

/// ConfigMap entries: the mode (anonymous when the spec says nothing), the
/// claims to require and the key files' paths.
pub fn config_entries(sp: &StreamPipeline) -> Vec<(&'static str, String)> {
    let Some(a) = auth(sp) else {
        return vec![(names::AUTH_MODE, auth_mode::ANONYMOUS.into())];
    };
    let mut out = vec![(names::AUTH_MODE, a.mode.clone())];
    if a.mode != auth_mode::TOKEN {
        return out;
    }
    if let Some(aud) = &a.audience {
        out.push((names::AUTH_AUDIENCE, aud.clone()));
    }
    if let Some(iss) = &a.issuer {
        out.push((names::AUTH_ISSUER, iss.clone()));
    }
    if a.rs256_public_key.is_some() {
        out.push((
            names::AUTH_RSA_PUBLIC_KEY_FILE,
            format!("{RSA_KEY_DIR}/{PUBLIC_KEY_FILE}"),
        ));
    }
    if a.es256_public_key.is_some() {
        out.push((
            names::AUTH_EC_PUBLIC_KEY_FILE,
            format!("{EC_KEY_DIR}/{PUBLIC_KEY_FILE}"),
        ));
    }
    out
}

/// Container variables: the HS256 secret straight from its Secret.
pub fn env(sp: &StreamPipeline) -> Vec<Value> {
    auth(sp)
        .filter(|a| a.mode == auth_mode::TOKEN)
        .and_then(|a| a.hs256_secret.as_ref())
        .map(|s| {
            json!({"name": names::AUTH_HS256_SECRET,
                   "valueFrom": {"secretKeyRef": {"name": s.name, "key": s.key}}})
        })
        .into_iter()
        .collect()
}

/// Read-only volumes and mounts of the public keys.
pub fn volumes(sp: &StreamPipeline) -> (Vec<Value>, Vec<Value>) {
    let (mut volumes, mut mounts) = (Vec::new(), Vec::new());
    let Some(a) = auth(sp).filter(|a| a.mode == auth_mode::TOKEN) else {
        return (volumes, mounts);
    };
    for (name, dir, key) in [
        ("auth-rsa", RSA_KEY_DIR, &a.rs256_public_key),
        ("auth-ec", EC_KEY_DIR, &a.es256_public_key),
    ] {
        let Some(k) = key else { continue };
        volumes.push(json!({"name": name, "secret": {
            "secretName": k.name, "items": [{"key": k.key, "path": PUBLIC_KEY_FILE}]}}));
        mounts.push(json!({"name": name, "mountPath": dir, "readOnly": true}));
    }
    (volumes, mounts)
}

/// Why `spec.publisher.auth` cannot work, if it cannot.
pub fn problem(sp: &StreamPipeline) -> Option<String> {
    let a = auth(sp)?;
    if a.mode == auth_mode::TOKEN && !a.has_key() {
        return Some(
            "mode token needs a key: hs256Secret, rs256PublicKey or es256PublicKey (or mode anonymous)"
                .into(),
        );
    }
    if a.mode == auth_mode::ANONYMOUS && (a.has_key() || a.audience.is_some() || a.issuer.is_some())
    {
        return Some("mode anonymous takes no keys or claims".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::SecretKeyRef;

    fn with(auth: Option<PublisherAuthSpec>) -> StreamPipeline {
        let mut sp = crate::builders::tests::sample();
        sp.spec.publisher.auth = auth;
        sp
    }

    fn key(name: &str) -> Option<SecretKeyRef> {
        Some(SecretKeyRef {
            name: name.into(),
            key: "k".into(),
        })
    }

    #[test]
    fn absent_means_anonymous_and_nothing_mounted() {
        let sp = with(None);
        assert_eq!(
            config_entries(&sp),
            vec![(names::AUTH_MODE, "anonymous".to_owned())]
        );
        assert!(env(&sp).is_empty());
        assert!(volumes(&sp).0.is_empty());
        assert_eq!(problem(&sp), None);
    }

    #[test]
    fn token_mode_wires_every_key_from_its_secret() {
        let sp = with(Some(PublisherAuthSpec {
            mode: "token".into(),
            hs256_secret: key("hs"),
            rs256_public_key: key("rsa"),
            es256_public_key: key("ec"),
            audience: Some("odds".into()),
            issuer: Some("https://bookie".into()),
        }));
        let c = config_entries(&sp);
        assert!(c.contains(&(names::AUTH_MODE, "token".into())));
        assert!(c.contains(&(names::AUTH_AUDIENCE, "odds".into())));
        assert!(c.contains(&(names::AUTH_ISSUER, "https://bookie".into())));
        assert!(c.contains(&(
            names::AUTH_RSA_PUBLIC_KEY_FILE,
            "/etc/streampipe/auth-rsa/public.pem".into()
        )));
        // The HS256 secret never enters the ConfigMap, only a secretKeyRef.
        assert!(!c.iter().any(|(k, _)| *k == names::AUTH_HS256_SECRET));
        let e = env(&sp);
        assert_eq!(e[0]["valueFrom"]["secretKeyRef"]["name"], "hs");
        let (v, m) = volumes(&sp);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0]["secret"]["secretName"], "rsa");
        assert_eq!(v[1]["secret"]["items"][0]["path"], PUBLIC_KEY_FILE);
        assert!(m.iter().all(|m| m["readOnly"] == true));
        assert_eq!(problem(&sp), None);
    }

    #[test]
    fn impossible_settings_are_named() {
        let keyless = with(Some(PublisherAuthSpec {
            mode: "token".into(),
            ..Default::default()
        }));
        assert!(problem(&keyless).unwrap().contains("needs a key"));
        let confused = with(Some(PublisherAuthSpec {
            mode: "anonymous".into(),
            hs256_secret: key("hs"),
            ..Default::default()
        }));
        assert!(problem(&confused).unwrap().contains("anonymous"));
        assert!(env(&confused).is_empty(), "no key reaches an anonymous pod");
    }
}
