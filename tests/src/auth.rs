//! Tokens for the tests: every publisher the harness starts in token mode
//! verifies HS256 tokens with [`TEST_SECRET`], and the harness's HTTP,
//! WebSocket and SSE helpers carry a token of [`TEST_SUBJECT`] allowing
//! every market, so tests written before tokens run unchanged in token mode.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use streampipe_contract::deploy::Secret;
use streampipe_publisher::auth::{Mode, TokenKeys};
use streampipe_publisher::Config;

/// The shared HS256 secret of test publishers.
pub const TEST_SECRET: &str = "streampipe-test-hs256-secret-0123456789abcdef";

/// The subject of the harness's default token.
pub const TEST_SUBJECT: &str = "test-user";

/// Now, Unix seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An HS256 token with these claims, signed with `secret`.
pub fn sign(secret: &str, claims: &serde_json::Value) -> String {
    sign_alg(
        Algorithm::HS256,
        &EncodingKey::from_secret(secret.as_bytes()),
        claims,
    )
}

/// A token signed with `key` for `alg`.
pub fn sign_alg(alg: Algorithm, key: &EncodingKey, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("sign")
}

/// A test token for `sub` allowing `markets`, expiring in `ttl_secs`.
pub fn token_for(sub: &str, markets: &[&str], ttl_secs: i64) -> String {
    sign(
        TEST_SECRET,
        &serde_json::json!({"sub": sub, "exp": now() + ttl_secs, "iat": now(), "markets": markets}),
    )
}

/// The harness's default token: [`TEST_SUBJECT`], every market, an hour.
pub fn token() -> String {
    token_for(TEST_SUBJECT, &["*"], 3600)
}

/// The keys of a test publisher in token mode.
pub fn test_keys() -> TokenKeys {
    TokenKeys {
        hs256: Some(Secret::new(TEST_SECRET)),
        ..Default::default()
    }
}

/// Gives a token-mode configuration without keys the test key (the
/// default configuration is token mode, which refuses to start keyless).
pub fn with_test_keys(config: &mut Config) {
    if let Mode::Token(k) = &config.auth.mode {
        if k.hs256.is_none() && k.rsa_public_pem.is_none() && k.ec_public_pem.is_none() {
            config.auth.mode = Mode::Token(test_keys());
        }
    }
}

/// Limits for functional tests: creating a hundred channels from one test
/// subject is their business; the limit tests set their own.
pub fn relaxed_limits() -> streampipe_publisher::clients::ClientLimits {
    use streampipe_publisher::limits::Rate;
    let lots = Rate {
        per_second: 1e6,
        burst: 1e6,
    };
    streampipe_publisher::clients::ClientLimits {
        channel_creates: lots,
        market_changes: lots,
        begins: lots,
        max_streams: 100_000,
        max_channels: 100_000,
    }
}

/// What the harness does to every in-process publisher's configuration:
/// the test key in keyless token mode, relaxed limits unless a test set its own.
pub fn prepare(config: &mut Config) {
    with_test_keys(config);
    if config.client_limits == streampipe_publisher::clients::ClientLimits::default() {
        config.client_limits = relaxed_limits();
    }
}
