//! TLS and SASL against servers that enforce them:
//! - Redis: Debian's redis-server with only a TLS port and client
//!   certificates required (`--tls-auth-clients yes`);
//! - Kafka SASL: tansu 0.6 started with `--authentication` (SCRAM users);
//! - Kafka TLS: Debian's stunnel4 terminating TLS in front of tansu, which
//!   advertises the stunnel port so every connection goes through TLS.
//!
//! Certificates are made per run with the `openssl` CLI. Ports are fixed in
//! 31400..31499: nothing else in the suite uses them, and they are below
//! Linux' ephemeral range (32768-60999), where another program's client
//! socket can hold a port in TIME-WAIT and tansu's bind then fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use streampipe_contract::deploy::{
    KafkaSecurity, Pem, RedisTls, SaslMechanism, Secret, SecurityProtocol,
};
use streampipe_contract::{CommandKind, Keys};
use streampipe_operator::lag::{read_lag, Uncommitted};
use streampipe_reducer::store::RedisStore;
use streampipe_reducer::{spawn, Config, Metrics};
use streampipe_tests::publisher::{
    blocking, create_channel, has, read_updates, ws_connect, ws_next, ws_send, Frame, InProcess,
};
use streampipe_tests::{now_ms, redis_url, unique, wait_for, Broker};

const REDIS_TLS_PORT: u16 = 31401;
const TANSU_SASL_PORT: u16 = 31411;
const TANSU_SASL_SSL_PORT: u16 = 31421;
const STUNNEL_SASL_SSL_PORT: u16 = 31422;
const TANSU_SSL_PORT: u16 = 31431;
const STUNNEL_SSL_PORT: u16 = 31432;

const USER: &str = "alice";
/// A SCRAM-SHA-512 user (the CRD's default mechanism).
const USER_512: &str = "bob";
/// A comma and `=` would have broken the old comma-split option list.
const PASSWORD: &str = "s3cr,et=pw;x";
const WRONG_PASSWORD: &str = "wr0ng-pa55word-XYZ";
/// Redis' password: URL-special characters, set through the password flag.
const REDIS_PASSWORD: &str = "r3d:is@p/w,d";

/// Test PKI: a CA, a server certificate for localhost/127.0.0.1, a client
/// certificate, and an unrelated CA.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(name));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl CLI");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for ca in ["ca", "other-ca"] {
            run(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=streampipe test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
            ]);
        }
        for (who, cn) in [("server", "localhost"), ("client", "streampipe")] {
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{who}.ext"),
                "-out",
                &format!("{who}.crt"),
            ]);
        }
        Pki { dir }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn wait_port(port: u16, what: &str) {
    wait_for(Duration::from_secs(20), what, || {
        port_open(port).then_some(())
    });
}

/// redis-server with only a TLS port, requiring client certificates.
fn tls_redis(pki: &Pki) -> Proc {
    assert!(!port_open(REDIS_TLS_PORT), "port {REDIS_TLS_PORT} is taken");
    let p = |f: &str| pki.path(f).to_string_lossy().into_owned();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &REDIS_TLS_PORT.to_string(),
            "--bind",
            "127.0.0.1",
            "--tls-cert-file",
            &p("server.crt"),
            "--tls-key-file",
            &p("server.key"),
            "--tls-ca-cert-file",
            &p("ca.crt"),
            "--tls-auth-clients",
            "yes",
            "--requirepass",
            REDIS_PASSWORD,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &pki.dir.to_string_lossy(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server");
    wait_port(REDIS_TLS_PORT, "TLS redis");
    Proc(child)
}

/// The URL as the binaries build it from `--redis-url` + `--redis-password`.
fn redis_tls_url() -> String {
    streampipe_contract::deploy::redis_url_with_password(
        &format!("rediss://localhost:{REDIS_TLS_PORT}"),
        &Secret::new(REDIS_PASSWORD),
    )
    .unwrap()
}

fn full_tls(pki: &Pki) -> RedisTls {
    RedisTls {
        ca_file: Some(pki.path("ca.crt")),
        cert_file: Some(pki.path("client.crt")),
        key_file: Some(pki.path("client.key")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_end_to_end_and_refusals() {
    let pki = Pki::new("redis-pki");
    let _redis = tls_redis(&pki);
    let url = redis_tls_url();
    let tls = full_tls(&pki);

    // Refusals first: they must be clear and quick.
    let keys = Keys::new("tls-probe");
    let ca_only = RedisTls {
        ca_file: Some(pki.path("ca.crt")),
        ..Default::default()
    };
    let pem = ca_only.load(&url).unwrap();
    let mut no_cert = RedisStore::new_tls(&url, keys.clone(), pem.as_ref()).unwrap();
    let e = no_cert
        .ping()
        .expect_err("a client without a certificate is refused");
    eprintln!("no client certificate: {e}");
    let wrong_ca = RedisTls {
        ca_file: Some(pki.path("other-ca.crt")),
        ..full_tls(&pki)
    };
    let pem = wrong_ca.load(&url).unwrap();
    let mut wrong = RedisStore::new_tls(&url, keys.clone(), pem.as_ref()).unwrap();
    let e = wrong
        .ping()
        .expect_err("a server signed by another CA is refused");
    eprintln!("wrong CA: {e}");
    assert!(
        e.to_string().to_lowercase().contains("certificate")
            || e.to_string().contains("UnknownIssuer"),
        "{e}"
    );
    // The publisher's own pub/sub socket refuses it too, naming the handshake.
    let target = streampipe_publisher::pubsub::Target::from_url(&url, false, pem.as_ref()).unwrap();
    let e = match streampipe_publisher::pubsub::SubConn::connect(&target, &target.seeds[0]).await {
        Ok(_) => panic!("pub/sub connected with the wrong CA"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("TLS handshake"), "{e}");
    // Plain redis:// with TLS files is a configuration error, not a silent downgrade.
    assert!(tls.load("redis://localhost:1").is_err());

    // The full path over TLS: Kafka (plain, the stack's dev broker) →
    // reducer → TLS Redis → publisher (registry and pub/sub) → WebSocket.
    let p = Arc::new(streampipe_tests::Pipeline::new(Broker::Dev, 2));
    let mut config = p.config.clone();
    config.redis_url = url.clone();
    config.redis_tls = tls.clone();
    // A reducer trusting the wrong CA stays unready and counts Redis errors.
    let mut bad = config.clone();
    bad.redis_tls = wrong_ca.clone();
    let bad_metrics = Arc::new(Metrics::new());
    let bad_reducer = spawn(bad, bad_metrics.clone()).expect("reducer starts, Redis retried");
    let m = bad_metrics.clone();
    blocking(move || {
        wait_for(Duration::from_secs(20), "redis errors counted", || {
            (m.redis_errors.get() >= 1).then_some(())
        })
    })
    .await;
    assert!(!bad_reducer
        .health
        .ready
        .load(std::sync::atomic::Ordering::SeqCst));
    blocking(move || {
        let _ = bad_reducer.shutdown();
    })
    .await;
    let reducer = spawn(config, Arc::new(Metrics::new())).expect("reducer over TLS");
    let mut pc = streampipe_publisher::Config::new(&p.broker.bootstrap(), &p.name, &url);
    pc.command_topic = p.config.command_topic.clone();
    pc.redis_tls = tls.clone();
    let publ = InProcess::start_with_config(pc).await;

    let pem = tls.load(&url).unwrap().unwrap();
    let client = redis::Client::build_with_tls(
        url.as_str(),
        redis::TlsCertificates {
            client_tls: pem.client.map(|(c, k)| redis::ClientTlsConfig {
                client_cert: c,
                client_key: k,
            }),
            root_cert: pem.ca,
        },
    )
    .unwrap();
    let keys = p.keys();
    let version = {
        let (client, keys) = (client.clone(), keys.clone());
        move |m: &str| -> u64 {
            let mut c = client.get_connection().unwrap();
            let v: Option<u64> = redis::cmd("HGET")
                .arg(keys.market_state(m))
                .arg("v")
                .query(&mut c)
                .unwrap();
            v.unwrap_or(0)
        }
    };
    p.update("T1", 1, r#"{"home":1}"#);
    p.flush();
    let v = version.clone();
    blocking(move || {
        wait_for(Duration::from_secs(30), "T1 stored over TLS", || {
            (v("T1") == 1).then_some(())
        })
    })
    .await;

    let ch = create_channel(publ.addr, &["T1"]).await;
    let mut ws = ws_connect(publ.addr, &ch, "").await;
    match ws_next(&mut ws, Duration::from_secs(10)).await {
        Some(Frame::Json(v)) => assert_eq!(v["type"], "subscribed"),
        other => panic!("expected subscribed, got {other:?}"),
    }
    ws_send(&mut ws, r#"{"type":"begin"}"#).await;
    let mut got = Vec::new();
    read_updates(&mut ws, &mut got, "state read over TLS", |g| {
        has(g, "T1", 1)
    })
    .await;

    // A live update reaches the client through the TLS pub/sub connection
    // once the reducer has the subscription.
    let (c2, k2, ch2) = (client.clone(), keys.clone(), ch.clone());
    blocking(move || {
        wait_for(Duration::from_secs(30), "subscription in TLS redis", || {
            let mut c = c2.get_connection().ok()?;
            let members: Vec<String> = redis::cmd("SMEMBERS")
                .arg(k2.market_channels("T1"))
                .query(&mut c)
                .ok()?;
            members.contains(&ch2).then_some(())
        })
    })
    .await;
    p.update("T1", 2, r#"{"home":2}"#);
    p.flush();
    read_updates(&mut ws, &mut got, "live update over TLS pub/sub", |g| {
        has(g, "T1", 2)
    })
    .await;
    drop(publ);
    blocking(move || reducer.shutdown().unwrap()).await;
}

/// tansu on `port` advertising `advertised`, with `topics` and (when
/// `auth`) SASL required and the SCRAM user created. Users and topics are
/// made before authentication is switched on (tansu's admin CLI cannot
/// authenticate), on the same SQLite file.
fn tansu(dir: &Path, port: u16, advertised: u16, auth: bool, topics: &[&str]) -> Proc {
    let bin = tansu_bin();
    std::fs::create_dir_all(dir).unwrap();
    let start = |auth: bool| {
        assert!(!port_open(port), "port {port} is taken");
        let mut cmd = Command::new(&bin);
        cmd.current_dir(dir)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{port}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{advertised}"),
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join(format!("tansu-auth-{auth}.log")))
                    .expect("tansu log file"),
            );
        if auth {
            cmd.arg("--authentication");
        }
        let p = Proc(cmd.spawn().expect("tansu"));
        wait_port(port, "tansu");
        p
    };
    let admin = |args: &[&str]| {
        let out = Command::new(&bin).args(args).output().expect("tansu admin");
        assert!(
            out.status.success(),
            "tansu {:?}: {}",
            args.first(),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let broker = format!("tcp://127.0.0.1:{port}");
    let setup = start(false);
    for t in topics {
        admin(&[
            "topic",
            "create",
            "--broker",
            &broker,
            "--partitions",
            "2",
            t,
        ]);
    }
    if !auth {
        return setup;
    }
    admin(&[
        "user",
        "create",
        "--broker",
        &broker,
        "--mechanism",
        "scram256",
        USER,
        PASSWORD,
    ]);
    admin(&[
        "user",
        "create",
        "--broker",
        &broker,
        "--mechanism",
        "scram512",
        USER_512,
        PASSWORD,
    ]);
    drop(setup);
    wait_for(Duration::from_secs(10), "tansu stopped", || {
        (!port_open(port)).then_some(())
    });
    start(true)
}

fn tansu_bin() -> PathBuf {
    if let Ok(b) = std::env::var("STREAMPIPE_TANSU_BIN") {
        return b.into();
    }
    let home = std::env::var("HOME").unwrap();
    let cache = std::env::var("STREAMPIPE_CACHE").unwrap_or(format!("{home}/.cache/streampipe"));
    Path::new(&cache).join("tansu-0.6.0/bin/tansu")
}

/// stunnel terminating TLS on `accept` for a plain broker on `connect`;
/// with `verify`, client certificates signed by the test CA are required.
fn stunnel(pki: &Pki, name: &str, accept: u16, connect: u16, verify: bool) -> Proc {
    assert!(!port_open(accept), "port {accept} is taken");
    let conf = pki.path(&format!("{name}.conf"));
    let p = |f: &str| pki.path(f).to_string_lossy().into_owned();
    let verify = if verify {
        format!("verifyChain = yes\nCAfile = {}\n", p("ca.crt"))
    } else {
        String::new()
    };
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\ndebug = 3\n[{name}]\naccept = 127.0.0.1:{accept}\nconnect = 127.0.0.1:{connect}\ncert = {}\nkey = {}\n{verify}",
            p("server.crt"),
            p("server.key")
        ),
    )
    .unwrap();
    let child = Command::new("stunnel4")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("stunnel4 (Debian package stunnel4)");
    wait_port(accept, "stunnel");
    Proc(child)
}

fn sasl(protocol: SecurityProtocol, password: &str, ca: Option<&Path>) -> KafkaSecurity {
    KafkaSecurity {
        protocol,
        mechanism: Some(SaslMechanism::ScramSha256),
        username: Some(USER.into()),
        password: Some(Secret::new(password)),
        ca: ca.map(|c| Pem::File(c.to_owned())),
        ..Default::default()
    }
}

/// Produces one update of `market` with the given security.
fn produce(brokers: &str, security: &KafkaSecurity, topic: &str, market: &str, version: u64) {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "20000");
    for (k, v) in security.properties().unwrap() {
        c.set(k, v);
    }
    let producer: ThreadedProducer<DefaultProducerContext> = c.create().unwrap();
    let value = format!(
        r#"{{"v":1,"market":"{market}","version":{version},"ts":{},"payload":{{}}}}"#,
        now_ms()
    );
    producer
        .send(BaseRecord::to(topic).key(market).payload(&value))
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(20)).expect("produce");
}

fn stored_version(keys: &Keys, market: &str) -> u64 {
    let mut c = redis::Client::open(redis_url())
        .unwrap()
        .get_connection()
        .unwrap();
    let v: Option<u64> = redis::cmd("HGET")
        .arg(keys.market_state(market))
        .arg("v")
        .query(&mut c)
        .unwrap();
    v.unwrap_or(0)
}

fn lag_error(brokers: &str, topic: &str, security: &KafkaSecurity) -> String {
    read_lag(brokers, topic, "g", security, Uncommitted::Earliest).expect_err("refused")
}

/// Topics are made before the broker requires authentication, so each
/// test names its pipeline up front.
fn pipeline_topics(name: &str) -> [String; 2] {
    [format!("{name}.data"), format!("{name}.commands")]
}

#[test]
fn kafka_sasl_scram_plaintext() {
    let dir = std::env::temp_dir().join(unique("tansu-sasl"));
    let name = unique("sasl");
    let topics = pipeline_topics(&name);
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    let _broker = tansu(&dir, TANSU_SASL_PORT, TANSU_SASL_PORT, true, &refs);
    let brokers = format!("127.0.0.1:{TANSU_SASL_PORT}");

    // Without SASL the broker refuses (it enforces authentication).
    let e = lag_error(&brokers, &topics[0], &KafkaSecurity::default());
    eprintln!("no SASL: {e}");
    // A wrong password fails without echoing it.
    let e = lag_error(
        &brokers,
        &topics[0],
        &sasl(SecurityProtocol::SaslPlaintext, WRONG_PASSWORD, None),
    );
    eprintln!("wrong password: {e}");
    assert!(e.contains("SASL authentication"), "{e}");
    assert!(!e.contains(WRONG_PASSWORD) && !e.contains("wr0ng"), "{e}");

    reducer_binary_hides_a_wrong_password(&brokers, &name);

    let security = sasl(SecurityProtocol::SaslPlaintext, PASSWORD, None);
    let ok = read_lag(&brokers, &topics[0], "g", &security, Uncommitted::Earliest)
        .expect("lag over SASL");
    assert_eq!(ok.partitions, 2);
    let scram512 = KafkaSecurity {
        mechanism: Some(SaslMechanism::ScramSha512),
        username: Some(USER_512.into()),
        ..security.clone()
    };
    read_lag(&brokers, &topics[0], "g", &scram512, Uncommitted::Earliest)
        .expect("lag over SCRAM-SHA-512");
    reducer_consumes_named(&brokers, &security, &name);
    let _ = std::fs::remove_dir_all(dir);
}

/// The reducer binary, configured the operator's way (each setting its own
/// variable), with a wrong password: its output names the SASL failure and
/// never contains the password.
fn reducer_binary_hides_a_wrong_password(brokers: &str, name: &str) {
    use std::io::Read;
    use streampipe_contract::deploy::env as names;
    let mut child = Command::new(streampipe_tests::workspace_bin("streampipe-reducer"))
        .env(names::KAFKA_BROKERS, brokers)
        .env(names::PIPELINE, name)
        .env(names::REDIS_URL, redis_url())
        .env(names::LISTEN, "127.0.0.1:0")
        .env(names::LOG_FORMAT, "text")
        .env(names::KAFKA_SECURITY_PROTOCOL, "SASL_PLAINTEXT")
        .env(names::KAFKA_SASL_MECHANISM, "SCRAM-SHA-256")
        .env(names::KAFKA_SASL_USERNAME, USER)
        .env(names::KAFKA_SASL_PASSWORD, WRONG_PASSWORD)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("reducer binary");
    // Long enough for several authentication attempts.
    std::thread::sleep(Duration::from_secs(4));
    let _ = child.kill();
    let _ = child.wait();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(out.contains("SASL authentication"), "{out}");
    assert!(
        !out.contains(WRONG_PASSWORD) && !out.contains("wr0ng"),
        "{out}"
    );
}

/// Starts a reducer for a pipeline whose topics exist already and waits
/// until it stored one update produced with the same security and applied
/// one command from the publisher's producer.
fn reducer_consumes_named(brokers: &str, security: &KafkaSecurity, name: &str) {
    let mut config = Config::new(brokers, name, &redis_url());
    config.dead_letter_topic = None;
    config.session_timeout = Duration::from_secs(3);
    config.kafka_security = security.clone();
    produce(brokers, security, &config.data_topic, "K1", 7);
    let keys = Keys::new(name);
    let reducer = spawn(config, Arc::new(Metrics::new())).expect("reducer");
    wait_for(Duration::from_secs(60), "update consumed", || {
        (stored_version(&keys, "K1") == 7).then_some(())
    });
    // The publisher's command producer, with the same security, reaches it too.
    let commands = streampipe_publisher::commands::Commands::new(
        brokers,
        &format!("{name}.commands"),
        security,
        &[],
    )
    .expect("command producer");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(commands.send(
        CommandKind::Subscribe,
        "ch1",
        &["K1".to_owned()],
        &streampipe_publisher::Metrics::new(),
    ))
    .expect("command sent");
    wait_for(Duration::from_secs(60), "command applied", || {
        let mut c = redis::Client::open(redis_url())
            .ok()?
            .get_connection()
            .ok()?;
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(keys.market_channels("K1"))
            .query(&mut c)
            .ok()?;
        members.iter().any(|m| m == "ch1").then_some(())
    });
    reducer.shutdown().unwrap();
}

#[test]
fn kafka_sasl_ssl_through_stunnel() {
    let pki = Pki::new("kafka-pki");
    let dir = pki.path("tansu");
    let name = unique("saslssl");
    let topics = pipeline_topics(&name);
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    let _broker = tansu(
        &dir,
        TANSU_SASL_SSL_PORT,
        STUNNEL_SASL_SSL_PORT,
        true,
        &refs,
    );
    let _tls = stunnel(
        &pki,
        "sasl-ssl",
        STUNNEL_SASL_SSL_PORT,
        TANSU_SASL_SSL_PORT,
        false,
    );
    let brokers = format!("127.0.0.1:{STUNNEL_SASL_SSL_PORT}");

    let security = sasl(
        SecurityProtocol::SaslSsl,
        PASSWORD,
        Some(&pki.path("ca.crt")),
    );
    // The wrong CA is refused.
    let wrong = sasl(
        SecurityProtocol::SaslSsl,
        PASSWORD,
        Some(&pki.path("other-ca.crt")),
    );
    let e = lag_error(&brokers, &topics[0], &wrong);
    eprintln!("SASL_SSL, wrong CA: {e}");
    assert!(e.contains("certificate verify failed"), "{e}");
    assert!(!e.contains(PASSWORD), "{e}");
    // A wrong password over TLS fails as clearly, without echoing it.
    let e = lag_error(
        &brokers,
        &topics[0],
        &sasl(
            SecurityProtocol::SaslSsl,
            WRONG_PASSWORD,
            Some(&pki.path("ca.crt")),
        ),
    );
    assert!(e.contains("SASL authentication"), "{e}");
    assert!(!e.contains(WRONG_PASSWORD), "{e}");
    reducer_consumes_named(&brokers, &security, &name);
}

#[test]
fn kafka_ssl_with_client_certificates_through_stunnel() {
    let pki = Pki::new("kafka-mtls");
    let dir = pki.path("tansu");
    let name = unique("ssl");
    let topics = pipeline_topics(&name);
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    let _broker = tansu(&dir, TANSU_SSL_PORT, STUNNEL_SSL_PORT, false, &refs);
    let _tls = stunnel(&pki, "ssl", STUNNEL_SSL_PORT, TANSU_SSL_PORT, true);
    let brokers = format!("127.0.0.1:{STUNNEL_SSL_PORT}");
    let security = KafkaSecurity {
        protocol: SecurityProtocol::Ssl,
        ca: Some(Pem::File(pki.path("ca.crt"))),
        cert: Some(Pem::File(pki.path("client.crt"))),
        key: Some(Pem::File(pki.path("client.key"))),
        ..Default::default()
    };
    // The operator's form: the same material inline (as read from Secrets).
    let read = |f: &str| std::fs::read_to_string(pki.path(f)).unwrap();
    let inline = KafkaSecurity {
        protocol: SecurityProtocol::Ssl,
        ca: Some(Pem::Inline(read("ca.crt"))),
        cert: Some(Pem::Inline(read("client.crt"))),
        key: Some(Pem::Inline(read("client.key"))),
        ..Default::default()
    };
    let ok = read_lag(&brokers, &topics[0], "g", &inline, Uncommitted::Earliest)
        .expect("lag over mutual TLS, PEM inline");
    assert_eq!(ok.partitions, 2);
    // Wrong CA, and no client certificate: both refused.
    let wrong_ca = KafkaSecurity {
        ca: Some(Pem::File(pki.path("other-ca.crt"))),
        ..security.clone()
    };
    eprintln!(
        "SSL, wrong CA: {}",
        lag_error(&brokers, &topics[0], &wrong_ca)
    );
    let no_cert = KafkaSecurity {
        protocol: SecurityProtocol::Ssl,
        ca: Some(Pem::File(pki.path("ca.crt"))),
        ..Default::default()
    };
    eprintln!(
        "SSL, no client cert: {}",
        lag_error(&brokers, &topics[0], &no_cert)
    );
    reducer_consumes_named(&brokers, &security, &name);
}

/// Ports of the TLS cluster's three masters, and their cluster bus ports
/// (set explicitly: the default port+10000 would leave this test's range).
const CLUSTER_TLS_PORTS: [u16; 3] = [31441, 31442, 31443];
const CLUSTER_BUS_PORTS: [u16; 3] = [31451, 31452, 31453];

/// Three TLS-only cluster masters (no replicas), the cluster bus over TLS
/// too (nodes present the client certificate to each other).
fn tls_cluster(pki: &Pki) -> Vec<Proc> {
    let p = |f: &str| pki.path(f).to_string_lossy().into_owned();
    let tls_cli = [
        "--tls".to_owned(),
        "--cacert".to_owned(),
        p("ca.crt"),
        "--cert".to_owned(),
        p("client.crt"),
        "--key".to_owned(),
        p("client.key"),
    ];
    let mut nodes = Vec::new();
    for (port, bus) in CLUSTER_TLS_PORTS.iter().zip(CLUSTER_BUS_PORTS) {
        assert!(!port_open(*port), "port {port} is taken");
        let dir = pki.path(&format!("node-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--cluster-port",
                &bus.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--tls-cluster",
                "yes",
                "--tls-cert-file",
                &p("server.crt"),
                "--tls-key-file",
                &p("server.key"),
                "--tls-client-cert-file",
                &p("client.crt"),
                "--tls-client-key-file",
                &p("client.key"),
                "--tls-ca-cert-file",
                &p("ca.crt"),
                "--tls-auth-clients",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &dir.to_string_lossy(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server");
        nodes.push(Proc(child));
        wait_port(*port, "TLS cluster node");
    }
    // `timeout`: a cluster that never joins must fail the test, not hang it.
    let mut create = Command::new("timeout");
    create
        .arg("60")
        .arg("redis-cli")
        .args(&tls_cli)
        .args(["--cluster", "create"]);
    for port in CLUSTER_TLS_PORTS {
        create.arg(format!("127.0.0.1:{port}"));
    }
    let out = create.arg("--cluster-yes").output().expect("redis-cli");
    assert!(
        out.status.success(),
        "cluster create: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for port in CLUSTER_TLS_PORTS {
        wait_for(Duration::from_secs(30), "TLS cluster ok", || {
            let out = Command::new("timeout")
                .arg("5")
                .arg("redis-cli")
                .args(&tls_cli)
                .args(["-p", &port.to_string(), "cluster", "info"])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .contains("cluster_state:ok")
                .then_some(())
        });
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_over_tls_end_to_end() {
    let pki = Pki::new("cluster-pki");
    let _nodes = tls_cluster(&pki);
    let tls = full_tls(&pki);
    let url = CLUSTER_TLS_PORTS
        .iter()
        .map(|p| format!("rediss://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");

    let p = Arc::new(streampipe_tests::Pipeline::new(Broker::Dev, 2));
    let mut config = p.config.clone();
    config.redis_url = url.clone();
    config.redis_cluster = true;
    config.redis_tls = tls.clone();
    let reducer = spawn(config, Arc::new(Metrics::new())).expect("reducer on a TLS cluster");
    let mut pc = streampipe_publisher::Config::new(&p.broker.bootstrap(), &p.name, &url);
    pc.command_topic = p.config.command_topic.clone();
    pc.redis_cluster = true;
    pc.redis_tls = tls.clone();
    let publ = tokio::time::timeout(Duration::from_secs(30), InProcess::start_with_config(pc))
        .await
        .expect("publisher connects to the TLS cluster");

    let ch = create_channel(publ.addr, &["C1"]).await;
    let mut ws = ws_connect(publ.addr, &ch, "").await;
    match ws_next(&mut ws, Duration::from_secs(10)).await {
        Some(Frame::Json(v)) => assert_eq!(v["type"], "subscribed"),
        other => panic!("expected subscribed, got {other:?}"),
    }
    // Updates until one arrives: the first may precede the subscription.
    let mut got = Vec::new();
    for v in 1..=30u64 {
        p.update("C1", v, &format!(r#"{{"n":{v}}}"#));
        p.flush();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while tokio::time::Instant::now() < deadline && got.is_empty() {
            if let Some(Frame::Json(f)) = ws_next(&mut ws, Duration::from_millis(200)).await {
                if f["type"] == "update" {
                    got.push(f);
                }
            }
        }
        if !got.is_empty() {
            break;
        }
    }
    assert!(
        !got.is_empty(),
        "no update over the TLS cluster's sharded pub/sub"
    );
    drop(publ);
    blocking(move || reducer.shutdown().unwrap()).await;
}
