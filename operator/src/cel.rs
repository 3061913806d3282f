//! CEL validation rules (`x-kubernetes-validations`) for API servers that
//! evaluate them (Kubernetes ≥ 1.25), so a bad spec is refused at `kubectl
//! apply` instead of reported afterwards as `Degraded`.
//!
//! They live in a second rendering of the CRD, `crds/cel/streampipeline.yaml`:
//! kubectl on the 1.20 the project supports refuses a CRD carrying the field
//! at all, so the default CRD stays without them. The rules are the
//! cross-field rules of [`crate::crd::validate`] and the name rule of
//! [`crate::validate`]; the operator checks the same rules at reconcile on
//! every server, so both renderings judge a pipeline alike. Per-key rules
//! (label keys, env names, quantities) stay in the operator only: a rule over
//! a map of unbounded keys exceeds the server's CEL cost budget.

use serde_json::{json, Value};

/// One `x-kubernetes-validations` entry and where it sits in the schema.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// Property names from the schema root to the object the rule is on.
    pub at: &'static [&'static str],
    /// The CEL expression (`self` is the object at `at`).
    pub rule: &'static str,
    /// What the server answers when it is false.
    pub message: &'static str,
    /// The field the operator's own check names for the same problem.
    pub field: &'static str,
}

/// Every rule of the CEL rendering.
pub const RULES: &[Rule] = &[
    Rule {
        at: &[],
        rule: "size(self.metadata.name) <= 53 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        message: "metadata.name must be at most 53 characters of [a-z0-9-], start with a letter and end alphanumeric (no dots): it names the Service <name>-publisher",
        field: "metadata.name",
    },
    Rule {
        at: &["spec"],
        rule: "self.kafka.dataTopic != self.kafka.commandTopic",
        message: "spec.kafka.commandTopic must differ from spec.kafka.dataTopic",
        field: "spec.kafka.commandTopic",
    },
    Rule {
        at: &["spec"],
        rule: "!has(self.kafka.deadLetterTopic) || self.kafka.deadLetterTopic != self.kafka.dataTopic",
        message: "spec.kafka.deadLetterTopic must differ from spec.kafka.dataTopic",
        field: "spec.kafka.deadLetterTopic",
    },
    Rule {
        at: &["spec"],
        rule: "!has(self.kafka.deliveryLogTopic) || (self.kafka.deliveryLogTopic != self.kafka.dataTopic && self.kafka.deliveryLogTopic != self.kafka.commandTopic)",
        message: "spec.kafka.deliveryLogTopic must differ from spec.kafka.dataTopic and commandTopic",
        field: "spec.kafka.deliveryLogTopic",
    },
    Rule {
        at: &["spec", "autoscaling"],
        rule: "self.minReplicas <= self.maxReplicas",
        message: "spec.autoscaling.minReplicas must not be above maxReplicas",
        field: "spec.autoscaling.minReplicas",
    },
    Rule {
        at: &["spec", "kafka"],
        rule: "!(has(self.sasl) && has(self.credentials))",
        message: "give either spec.kafka.sasl or the deprecated credentials, not both",
        field: "spec.kafka.credentials",
    },
    Rule {
        at: &["spec", "kafka"],
        rule: "!has(self.securityProtocol) || !(self.securityProtocol == 'SASL_SSL' || self.securityProtocol == 'SASL_PLAINTEXT') || has(self.sasl) || has(self.credentials)",
        message: "a SASL securityProtocol needs spec.kafka.sasl",
        field: "spec.kafka.sasl",
    },
    Rule {
        at: &["spec", "kafka"],
        rule: "!has(self.securityProtocol) || self.securityProtocol == 'SASL_SSL' || self.securityProtocol == 'SASL_PLAINTEXT' || !(has(self.sasl) || has(self.credentials))",
        message: "spec.kafka.securityProtocol does not use the sasl settings given",
        field: "spec.kafka.securityProtocol",
    },
    Rule {
        at: &["spec", "kafka"],
        rule: "!has(self.securityProtocol) || !has(self.tls) || self.securityProtocol == 'SSL' || self.securityProtocol == 'SASL_SSL'",
        message: "spec.kafka.securityProtocol does not use the tls settings given",
        field: "spec.kafka.securityProtocol",
    },
    Rule {
        at: &["spec", "kafka", "tls", "ca"],
        rule: "has(self.secret) != has(self.configMap)",
        message: "spec.kafka.tls.ca: give exactly one of secret and configMap",
        field: "spec.kafka.tls.ca",
    },
    Rule {
        at: &["spec", "redis", "tls", "ca"],
        rule: "has(self.secret) != has(self.configMap)",
        message: "spec.redis.tls.ca: give exactly one of secret and configMap",
        field: "spec.redis.tls.ca",
    },
    Rule {
        at: &["spec", "publisher", "auth"],
        rule: "self.mode != 'token' || has(self.hs256Secret) || has(self.rs256PublicKey) || has(self.es256PublicKey)",
        message: "spec.publisher.auth: mode token needs a key: hs256Secret, rs256PublicKey or es256PublicKey (or mode anonymous)",
        field: "spec.publisher.auth",
    },
    Rule {
        at: &["spec", "publisher", "auth"],
        rule: "self.mode != 'anonymous' || !(has(self.hs256Secret) || has(self.rs256PublicKey) || has(self.es256PublicKey) || has(self.audience) || has(self.issuer))",
        message: "spec.publisher.auth: mode anonymous takes no keys or claims",
        field: "spec.publisher.auth",
    },
];

/// The CRD (as JSON) with [`RULES`] added to its schema.
///
/// # Panics
/// If a rule's path is not in the schema (a renamed field): the unit tests
/// render it, so that fails there, not at a user's.
pub fn crd_with_rules() -> Value {
    use kube::CustomResourceExt;
    let mut crd = serde_json::to_value(crate::StreamPipeline::crd()).expect("the CRD serialises");
    for version in crd["spec"]["versions"]
        .as_array_mut()
        .expect("the CRD has versions")
    {
        let root = &mut version["schema"]["openAPIV3Schema"];
        for r in RULES {
            let mut at = &mut *root;
            for p in r.at {
                at = at
                    .get_mut("properties")
                    .and_then(|props| props.get_mut(*p))
                    .unwrap_or_else(|| panic!("no schema property {p} on the way to {:?}", r.at));
            }
            let list = at
                .as_object_mut()
                .expect("a schema object")
                .entry("x-kubernetes-validations")
                .or_insert_with(|| json!([]));
            list.as_array_mut()
                .expect("a list")
                .push(json!({"rule": r.rule, "message": r.message}));
        }
    }
    crd
}

/// The CEL rendering as YAML, exactly as committed in
/// `crds/cel/streampipeline.yaml`.
pub fn crd_yaml_with_rules() -> String {
    format!(
        "# Generated by `cargo run -p streampipe-operator --bin crdgen -- --cel`; do not edit.\n# For Kubernetes >= 1.25 (CEL validation rules); crds/streampipeline.yaml otherwise.\n{}",
        serde_yaml::to_string(&crd_with_rules()).expect("the CRD serialises")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StreamPipeline;
    use cel_interpreter::{Context, Program, Value as Cel};
    use std::collections::BTreeSet;

    /// The object as the API server's rules see it: defaults filled in (the
    /// serde round trip), absent optional fields absent (nulls pruned).
    fn as_served(sp: &StreamPipeline) -> Value {
        fn prune(v: &mut Value) {
            match v {
                Value::Object(m) => {
                    m.retain(|_, x| !x.is_null());
                    m.values_mut().for_each(prune);
                }
                Value::Array(a) => a.iter_mut().for_each(prune),
                _ => {}
            }
        }
        let mut v = serde_json::to_value(sp).unwrap();
        prune(&mut v);
        v
    }

    /// The fields whose CEL rules fail; a rule whose object is absent is not
    /// evaluated (as on the server).
    fn cel_fields(sp: &StreamPipeline) -> BTreeSet<&'static str> {
        let obj = as_served(sp);
        let mut out = BTreeSet::new();
        for r in RULES {
            let Some(at) = r.at.iter().try_fold(&obj, |o, p| o.get(*p)) else {
                continue;
            };
            let program = Program::compile(r.rule).unwrap_or_else(|e| panic!("{}: {e}", r.rule));
            let mut ctx = Context::default();
            ctx.add_variable("self", at.clone()).unwrap();
            match program.execute(&ctx) {
                Ok(Cel::Bool(true)) => {}
                Ok(Cel::Bool(false)) => {
                    out.insert(r.field);
                }
                other => panic!("{}: {other:?}", r.rule),
            }
        }
        out
    }

    /// The fields the operator's own checks flag, among those CEL covers.
    fn operator_fields(sp: &StreamPipeline) -> BTreeSet<&'static str> {
        let covered: BTreeSet<_> = RULES.iter().map(|r| r.field).collect();
        crate::validate::validate(sp)
            .into_iter()
            .map(|i| i.field)
            .filter(|f| covered.contains(f))
            .collect()
    }

    fn pipeline(name: &str, patch: impl FnOnce(&mut Value)) -> StreamPipeline {
        let mut v = json!({
            "apiVersion": "streampipe.dev/v1alpha1", "kind": "StreamPipeline",
            "metadata": {"name": name, "namespace": "prod"},
            "spec": {
                "kafka": {"bootstrapServers": "kafka:9092", "dataTopic": "odds", "commandTopic": "odds.commands"},
                "redis": {"urlSecret": {"name": "redis", "key": "url"}},
            }
        });
        patch(&mut v["spec"]);
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn cel_rules_judge_every_case_as_the_operator_does() {
        let sasl = json!({"secretName": "kafka-user"});
        let ca = |which: &[&str]| {
            let mut c = json!({});
            for w in which {
                c[*w] = json!({"name": "ca", "key": "ca.crt"});
            }
            c
        };
        type Patch = Box<dyn Fn(&mut Value)>;
        let (long, longest) = ("x".repeat(54), "x".repeat(53));
        let cases: Vec<(&str, &str, Patch, &[&str])> = vec![
            ("a good pipeline", "odds", Box::new(|_| {}), &[]),
            (
                "a name too long",
                &long,
                Box::new(|_| {}),
                &["metadata.name"],
            ),
            ("a name of 53", &longest, Box::new(|_| {}), &[]),
            (
                "a dotted name",
                "odds.prod",
                Box::new(|_| {}),
                &["metadata.name"],
            ),
            (
                "one topic for both",
                "odds",
                Box::new(|s| s["kafka"]["commandTopic"] = json!("odds")),
                &["spec.kafka.commandTopic"],
            ),
            (
                "dead letters into the data",
                "odds",
                Box::new(|s| s["kafka"]["deadLetterTopic"] = json!("odds")),
                &["spec.kafka.deadLetterTopic"],
            ),
            (
                "delivery log into the data",
                "odds",
                Box::new(|s| s["kafka"]["deliveryLogTopic"] = json!("odds")),
                &["spec.kafka.deliveryLogTopic"],
            ),
            (
                "delivery log into the commands",
                "odds",
                Box::new(|s| s["kafka"]["deliveryLogTopic"] = json!("odds.commands")),
                &["spec.kafka.deliveryLogTopic"],
            ),
            (
                "a delivery log of its own",
                "odds",
                Box::new(|s| s["kafka"]["deliveryLogTopic"] = json!("odds.delivered")),
                &[],
            ),
            (
                "a dead-letter topic of its own",
                "odds",
                Box::new(|s| s["kafka"]["deadLetterTopic"] = json!("odds.dl")),
                &[],
            ),
            (
                "min above max",
                "odds",
                Box::new(|s| {
                    s["autoscaling"] = json!({"enabled": true, "minReplicas": 5, "maxReplicas": 2})
                }),
                &["spec.autoscaling.minReplicas"],
            ),
            (
                "min above the default max",
                "odds",
                Box::new(|s| s["autoscaling"] = json!({"minReplicas": 11})),
                &["spec.autoscaling.minReplicas"],
            ),
            (
                "min equal to max",
                "odds",
                Box::new(|s| s["autoscaling"] = json!({"minReplicas": 3, "maxReplicas": 3})),
                &[],
            ),
            (
                "defaults",
                "odds",
                Box::new(|s| s["autoscaling"] = json!({})),
                &[],
            ),
            (
                "sasl and credentials",
                "odds",
                {
                    let a = sasl.clone();
                    Box::new(move |s| {
                        s["kafka"]["sasl"] = a.clone();
                        s["kafka"]["credentials"] = a.clone();
                    })
                },
                &["spec.kafka.credentials"],
            ),
            (
                "SASL_SSL without sasl",
                "odds",
                Box::new(|s| s["kafka"]["securityProtocol"] = json!("SASL_SSL")),
                &["spec.kafka.sasl"],
            ),
            (
                "SASL_PLAINTEXT with credentials",
                "odds",
                {
                    let a = sasl.clone();
                    Box::new(move |s| {
                        s["kafka"]["securityProtocol"] = json!("SASL_PLAINTEXT");
                        s["kafka"]["credentials"] = a.clone();
                    })
                },
                &[],
            ),
            (
                "SSL with sasl",
                "odds",
                {
                    let a = sasl.clone();
                    Box::new(move |s| {
                        s["kafka"]["securityProtocol"] = json!("SSL");
                        s["kafka"]["sasl"] = a.clone();
                    })
                },
                &["spec.kafka.securityProtocol"],
            ),
            (
                "sasl, protocol implied",
                "odds",
                {
                    let a = sasl.clone();
                    Box::new(move |s| s["kafka"]["sasl"] = a.clone())
                },
                &[],
            ),
            (
                "PLAINTEXT with tls",
                "odds",
                Box::new(|s| {
                    s["kafka"]["securityProtocol"] = json!("PLAINTEXT");
                    s["kafka"]["tls"] = json!({});
                }),
                &["spec.kafka.securityProtocol"],
            ),
            (
                "SASL_PLAINTEXT with tls",
                "odds",
                {
                    let a = sasl.clone();
                    Box::new(move |s| {
                        s["kafka"]["securityProtocol"] = json!("SASL_PLAINTEXT");
                        s["kafka"]["sasl"] = a.clone();
                        s["kafka"]["tls"] = json!({});
                    })
                },
                &["spec.kafka.securityProtocol"],
            ),
            (
                "SASL_SSL with sasl and a CA",
                "odds",
                {
                    let (a, c) = (sasl.clone(), ca(&["secret"]));
                    Box::new(move |s| {
                        s["kafka"]["securityProtocol"] = json!("SASL_SSL");
                        s["kafka"]["sasl"] = a.clone();
                        s["kafka"]["tls"] = json!({"ca": c.clone()});
                    })
                },
                &[],
            ),
            (
                "a Kafka CA from both",
                "odds",
                {
                    let c = ca(&["secret", "configMap"]);
                    Box::new(move |s| s["kafka"]["tls"] = json!({"ca": c.clone()}))
                },
                &["spec.kafka.tls.ca"],
            ),
            (
                "a Kafka CA from neither",
                "odds",
                {
                    let c = ca(&[]);
                    Box::new(move |s| s["kafka"]["tls"] = json!({"ca": c.clone()}))
                },
                &["spec.kafka.tls.ca"],
            ),
            (
                "a Redis CA from both",
                "odds",
                {
                    let c = ca(&["secret", "configMap"]);
                    Box::new(move |s| s["redis"]["tls"] = json!({"ca": c.clone()}))
                },
                &["spec.redis.tls.ca"],
            ),
            (
                "a Redis CA from a ConfigMap",
                "odds",
                {
                    let c = ca(&["configMap"]);
                    Box::new(move |s| s["redis"]["tls"] = json!({"ca": c.clone()}))
                },
                &[],
            ),
            (
                "tokens without a key",
                "odds",
                Box::new(|s| {
                    s["publisher"] = json!({"auth": {"mode": "token", "audience": "odds"}})
                }),
                &["spec.publisher.auth"],
            ),
            (
                "tokens with an RS256 key",
                "odds",
                Box::new(|s| {
                    s["publisher"] = json!({"auth": {"mode": "token",
                        "rs256PublicKey": {"name": "jwt", "key": "rsa.pem"}}})
                }),
                &[],
            ),
            (
                "anonymous with a key",
                "odds",
                Box::new(|s| {
                    s["publisher"] = json!({"auth": {"mode": "anonymous",
                        "hs256Secret": {"name": "jwt", "key": "hs"}}})
                }),
                &["spec.publisher.auth"],
            ),
            (
                "explicitly anonymous",
                "odds",
                Box::new(|s| s["publisher"] = json!({"auth": {"mode": "anonymous"}})),
                &[],
            ),
        ];
        for (what, name, patch, want) in cases {
            let sp = pipeline(name, |s| patch(s));
            let want: BTreeSet<&str> = want.iter().copied().collect();
            assert_eq!(operator_fields(&sp), want, "operator, {what}");
            assert_eq!(cel_fields(&sp), want, "CEL, {what}");
        }
    }

    #[test]
    fn every_rule_lands_in_the_schema_once() {
        let crd = crd_with_rules();
        let text = crd.to_string();
        for r in RULES {
            assert_eq!(
                text.matches(&serde_json::to_string(r.rule).unwrap()[1..])
                    .count(),
                RULES.iter().filter(|o| o.rule == r.rule).count(),
                "{}",
                r.rule
            );
        }
    }

    #[test]
    fn committed_cel_crd_matches_the_types() {
        let committed = include_str!("../../crds/cel/streampipeline.yaml");
        assert!(
            committed == crd_yaml_with_rules(),
            "crds/cel/streampipeline.yaml is stale: run `cargo run -p streampipe-operator --bin crdgen -- --cel > crds/cel/streampipeline.yaml`"
        );
    }
}
