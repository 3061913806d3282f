//! The lag reader's Kafka security, read through a mocked API server
//! (tower-test): SASL credentials and TLS material come from the pipeline's
//! Secrets and ConfigMaps by name, in its namespace, and errors name the
//! object and key but never a value.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use streampipe_contract::deploy::{Pem, SaslMechanism, SecurityProtocol};
use streampipe_operator::crd::KafkaSpec;
use streampipe_operator::lag::kafka_security;

fn b64(s: &str) -> String {
    // Secrets carry base64 data; a tiny encoder keeps the test dependency-free.
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Serves GETs of the given objects; records every path asked for.
fn client(objects: HashMap<String, Value>) -> (Client, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let path = req.uri().path().to_owned();
            log.lock().unwrap().push(format!("{} {path}", req.method()));
            let (code, body) = match objects.get(&path) {
                Some(o) => (StatusCode::OK, o.clone()),
                None => (
                    StatusCode::NOT_FOUND,
                    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "message": "not found", "reason": "NotFound", "code": 404}),
                ),
            };
            send.send_response(
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
    });
    (Client::new(svc, "prod"), seen)
}

fn kafka(extra: Value) -> KafkaSpec {
    let mut k = json!({"bootstrapServers": "kafka:9093", "dataTopic": "odds", "commandTopic": "odds.commands"});
    for (key, v) in extra.as_object().unwrap() {
        k[key] = v.clone();
    }
    serde_json::from_value(k).unwrap()
}

const PASSWORD: &str = "pa,ss=word";

fn objects() -> HashMap<String, Value> {
    HashMap::from([
        (
            "/api/v1/namespaces/prod/secrets/kafka-user".to_owned(),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kafka-user"},
                   "data": {"username": b64("alice"), "password": b64(PASSWORD)}}),
        ),
        (
            "/api/v1/namespaces/prod/configmaps/kafka-ca".to_owned(),
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kafka-ca"},
                   "data": {"ca.crt": "CA PEM"}}),
        ),
        (
            "/api/v1/namespaces/prod/secrets/kafka-client".to_owned(),
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kafka-client"},
                   "data": {"tls.crt": b64("CERT PEM"), "tls.key": b64("KEY PEM")}}),
        ),
    ])
}

#[tokio::test]
async fn sasl_ssl_with_client_certificate_is_read_from_the_namespace() {
    let (client, seen) = client(objects());
    let spec = kafka(json!({
        "sasl": {"secretName": "kafka-user", "mechanism": "SCRAM-SHA-256"},
        "tls": {"ca": {"configMap": {"name": "kafka-ca", "key": "ca.crt"}},
                "clientCert": {"secretName": "kafka-client"}},
    }));
    let s = kafka_security(&client, "prod", &spec).await.unwrap();
    assert_eq!(s.protocol, SecurityProtocol::SaslSsl);
    assert_eq!(s.mechanism, Some(SaslMechanism::ScramSha256));
    assert_eq!(s.username.as_deref(), Some("alice"));
    assert_eq!(s.password.as_ref().unwrap().expose(), PASSWORD);
    assert_eq!(s.ca, Some(Pem::Inline("CA PEM".into())));
    assert_eq!(s.key, Some(Pem::Inline("KEY PEM".into())));
    assert!(!format!("{s:?}").contains(PASSWORD), "Debug redacts");
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|p| p.starts_with("GET /api/v1/namespaces/prod/")),
        "{seen:?}"
    );
}

#[tokio::test]
async fn the_deprecated_credentials_mean_sasl_ssl() {
    let (client, _) = client(objects());
    let spec = kafka(json!({"credentials": {"secretName": "kafka-user"}}));
    let s = kafka_security(&client, "prod", &spec).await.unwrap();
    assert_eq!(s.protocol, SecurityProtocol::SaslSsl);
    assert_eq!(s.mechanism, Some(SaslMechanism::ScramSha512));
}

#[tokio::test]
async fn missing_objects_and_keys_are_named_without_values() {
    let (client, _) = client(objects());
    let spec = kafka(json!({"sasl": {"secretName": "kafka-user", "passwordKey": "nope"}}));
    let e = kafka_security(&client, "prod", &spec).await.unwrap_err();
    assert!(e.contains("kafka-user") && e.contains("nope"), "{e}");
    assert!(!e.contains(PASSWORD), "{e}");
    let spec = kafka(json!({"sasl": {"secretName": "absent"}}));
    let e = kafka_security(&client, "prod", &spec).await.unwrap_err();
    assert!(e.contains("absent"), "{e}");
}
