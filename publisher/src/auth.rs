//! Who is asking: signed tokens (JWT, Centrifugo-style) or an explicit
//! anonymous mode.
//!
//! The bookmaker's backend mints short-lived tokens; the publisher only
//! verifies them. Accepted algorithms follow the configured keys: HS256
//! with a shared secret, RS256 with an RSA public key, ES256 with a P-256
//! public key. A token's header names its algorithm, and only a key
//! configured *for that algorithm* verifies it, so `alg: none` (not even
//! parsed) and HS/RS confusion (an RS public key used as an HMAC secret)
//! are refused.
//!
//! Claims: `sub` (required; channels are bound to it), `exp` (required),
//! `nbf` and `iat` (optional; `nbf` is checked), `aud`/`iss` (checked when
//! configured), and `markets`: the market ids the bearer may watch, each an
//! exact id or a prefix pattern ending in `*` (`football.*` matches every id
//! starting with `football.`, `*` every id). No `markets` claim: no market.
//!
//! Anonymous mode (`--auth-mode anonymous`) takes no token at all: channels
//! belong to nobody (their unguessable ids are the only key, as before
//! tokens), and limits are per client IP.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{
    decode, decode_header, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};
use serde::{Deserialize, Serialize};
use streampipe_contract::deploy::Secret;

use crate::error::{Error, Result};

/// Clock skew tolerated on `exp` and `nbf`: the bookmaker's backend and the
/// pods keep their own clocks; seconds of drift must not flap sessions.
pub const LEEWAY_SECS: u64 = 30;

/// Largest token accepted: fits a 4 KiB WebSocket frame with its JSON
/// wrapper, and a `markets` claim of a few hundred patterns.
pub const MAX_TOKEN_BYTES: usize = 3 * 1024;

/// Longest `sub`: it is part of Redis values and limiter keys.
pub const MAX_SUBJECT_BYTES: usize = 128;

/// Most entries of a `markets` claim: matching is linear in them.
pub const MAX_MARKET_PATTERNS: usize = 500;

/// How long an SSE ticket is valid: long enough for `new EventSource()` to
/// connect after the REST call, short enough that a leaked URL is useless.
pub const TICKET_TTL: Duration = Duration::from_secs(30);

/// How long a WebSocket without a token in its subprotocol may take to send
/// its `auth` frame before it is closed with 4407.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Lifetime of tokens from the development endpoint (`--dev-tokens`).
pub const DEV_TOKEN_TTL: Duration = Duration::from_secs(600);

/// Key material for token mode. `Debug` never shows the secret (it is a
/// [`Secret`]) nor the PEM text.
#[derive(Clone, Default)]
pub struct TokenKeys {
    /// HS256 shared secret.
    pub hs256: Option<Secret>,
    /// PEM of the RSA public key (RS256).
    pub rsa_public_pem: Option<Vec<u8>>,
    /// PEM of the EC P-256 public key (ES256).
    pub ec_public_pem: Option<Vec<u8>>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("hs256", &self.hs256.as_ref().map(|_| "<redacted>"))
            .field("rsa_public_pem", &self.rsa_public_pem.is_some())
            .field("ec_public_pem", &self.ec_public_pem.is_some())
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish()
    }
}

/// How clients identify themselves.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Signed tokens (the default).
    Token(TokenKeys),
    /// No tokens: public odds, per-IP limits.
    Anonymous,
}

impl Default for Mode {
    fn default() -> Self {
        Mode::Token(TokenKeys::default())
    }
}

/// Authentication settings of a publisher.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Token or anonymous.
    pub mode: Mode,
    /// Development only: `POST /v1/dev/token` mints HS256 tokens.
    pub dev_tokens: bool,
    /// Header naming the client's address, set by a trusted proxy.
    pub client_ip_header: Option<String>,
}

/// The claims the publisher reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: the bookmaker's user (or session) id.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Not before, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, Unix seconds (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Markets (ids or `prefix*` patterns) the bearer may watch.
    #[serde(default)]
    pub markets: Vec<String>,
}

/// The markets a client may watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowance {
    /// Anything (anonymous mode).
    All,
    /// Exact ids and `prefix*` patterns.
    Patterns(Arc<[String]>),
}

impl Allowance {
    /// Whether `market` is allowed.
    pub fn allows(&self, market: &str) -> bool {
        match self {
            Allowance::All => true,
            Allowance::Patterns(p) => p.iter().any(|pat| matches(pat, market)),
        }
    }

    /// The first of `markets` that is not allowed.
    pub fn first_refused<'a>(&self, markets: &'a [String]) -> Option<&'a str> {
        markets.iter().find(|m| !self.allows(m)).map(String::as_str)
    }
}

/// The tiny pattern grammar: `*` alone matches everything, `prefix*`
/// matches ids starting with `prefix`, anything else matches itself.
pub fn matches(pattern: &str, market: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => market.starts_with(prefix),
        None => pattern == market,
    }
}

/// Who a request comes from.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The token's subject; `None` in anonymous mode.
    pub subject: Option<String>,
    /// What it may watch.
    pub allowance: Allowance,
    /// When its token expires (Unix seconds); `None` in anonymous mode.
    pub expires_at: Option<u64>,
}

impl Principal {
    /// An anonymous client.
    pub fn anonymous() -> Self {
        Principal {
            subject: None,
            allowance: Allowance::All,
            expires_at: None,
        }
    }
}

/// Why a token was refused; the label is the metric's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token where one is required.
    Missing,
    /// Larger than [`MAX_TOKEN_BYTES`].
    TooLarge,
    /// Not a JWT, or claims of the wrong shape.
    Malformed,
    /// An algorithm no configured key verifies (`none`, or HS256 with only
    /// an RSA key, ...).
    Algorithm,
    /// The signature does not verify.
    Signature,
    /// Past `exp` (+ leeway).
    Expired,
    /// Before `nbf` (- leeway).
    NotYetValid,
    /// `aud` is not the configured audience.
    Audience,
    /// `iss` is not the configured issuer.
    Issuer,
    /// `sub` empty, too long or with control characters.
    Subject,
}

impl Refusal {
    /// Metric label and API error detail.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Missing => "token_missing",
            Refusal::TooLarge => "token_too_large",
            Refusal::Malformed => "token_malformed",
            Refusal::Algorithm => "token_algorithm",
            Refusal::Signature => "token_signature",
            Refusal::Expired => "token_expired",
            Refusal::NotYetValid => "token_not_yet_valid",
            Refusal::Audience => "token_audience",
            Refusal::Issuer => "token_issuer",
            Refusal::Subject => "token_subject",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refusal::Missing => "a token is required (Authorization: Bearer <token>)",
            Refusal::TooLarge => "the token is too large",
            Refusal::Malformed => "the token is not a valid JWT with sub and exp",
            Refusal::Algorithm => "the token's algorithm is not accepted",
            Refusal::Signature => "the token's signature does not verify",
            Refusal::Expired => "the token has expired",
            Refusal::NotYetValid => "the token is not valid yet",
            Refusal::Audience => "the token is for another audience",
            Refusal::Issuer => "the token is from another issuer",
            Refusal::Subject => "the token's subject is empty or invalid",
        }
    }

    /// The API error: 401 with a stable code.
    pub fn into_error(self) -> Error {
        Error::invalid(
            warp::http::StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("{} ({})", self.message(), self.label()),
        )
    }
}

/// Verifies tokens with the configured keys; cheap to share.
pub struct Verifier {
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    es256: Option<DecodingKey>,
    audience: Option<String>,
    issuer: Option<String>,
    /// The HS256 secret again, for the development token endpoint only.
    dev_signer: Option<EncodingKey>,
}

impl Verifier {
    /// Builds the verifier; refuses token mode without any key, and keys
    /// that do not parse (the error names the setting, never the key).
    pub fn new(keys: &TokenKeys, dev_tokens: bool) -> Result<Self> {
        let hs256 = keys
            .hs256
            .as_ref()
            .filter(|s| !s.expose().is_empty())
            .map(|s| DecodingKey::from_secret(s.expose().as_bytes()));
        let rs256 = keys
            .rsa_public_pem
            .as_ref()
            .map(|p| {
                DecodingKey::from_rsa_pem(p).map_err(|_| {
                    Error::Config(format!(
                        "{}: not an RSA public key in PEM",
                        streampipe_contract::deploy::env::AUTH_RSA_PUBLIC_KEY_FILE
                    ))
                })
            })
            .transpose()?;
        let es256 = keys
            .ec_public_pem
            .as_ref()
            .map(|p| {
                DecodingKey::from_ec_pem(p).map_err(|_| {
                    Error::Config(format!(
                        "{}: not an EC public key in PEM",
                        streampipe_contract::deploy::env::AUTH_EC_PUBLIC_KEY_FILE
                    ))
                })
            })
            .transpose()?;
        if hs256.is_none() && rs256.is_none() && es256.is_none() {
            use streampipe_contract::deploy::env;
            return Err(Error::Config(format!(
                "auth mode 'token' needs a key: set {} (or {}), {} or {}; \
                 or serve public odds with {}=anonymous",
                env::AUTH_HS256_SECRET,
                env::AUTH_HS256_SECRET_FILE,
                env::AUTH_RSA_PUBLIC_KEY_FILE,
                env::AUTH_EC_PUBLIC_KEY_FILE,
                env::AUTH_MODE,
            )));
        }
        let dev_signer = match (dev_tokens, &keys.hs256) {
            (false, _) => None,
            (true, Some(s)) if !s.expose().is_empty() => {
                Some(EncodingKey::from_secret(s.expose().as_bytes()))
            }
            (true, _) => {
                return Err(Error::Config(format!(
                    "{} needs an HS256 secret ({})",
                    streampipe_contract::deploy::env::DEV_TOKENS,
                    streampipe_contract::deploy::env::AUTH_HS256_SECRET
                )))
            }
        };
        Ok(Verifier {
            hs256,
            rs256,
            es256,
            audience: keys.audience.clone().filter(|a| !a.is_empty()),
            issuer: keys.issuer.clone().filter(|i| !i.is_empty()),
            dev_signer,
        })
    }

    /// Verifies `token`; the principal it names, or why not.
    pub fn verify(&self, token: &str) -> std::result::Result<Principal, Refusal> {
        let token = token.trim();
        if token.is_empty() {
            return Err(Refusal::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::TooLarge);
        }
        // `alg: none` and unknown algorithms fail here already.
        let header = decode_header(token).map_err(|_| Refusal::Malformed)?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 => self.rs256.as_ref(),
            Algorithm::ES256 => self.es256.as_ref(),
            _ => None,
        }
        .ok_or(Refusal::Algorithm)?;
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        // A configured audience or issuer must be present, not merely
        // right when present (jsonwebtoken skips absent ones otherwise).
        let mut required = vec!["exp", "sub"];
        if self.audience.is_some() {
            required.push("aud");
        }
        if self.issuer.is_some() {
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        match &self.audience {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        if let Some(i) = &self.issuer {
            v.set_issuer(&[i]);
        }
        let data = decode::<Claims>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => Refusal::Signature,
                K::ExpiredSignature => Refusal::Expired,
                K::ImmatureSignature => Refusal::NotYetValid,
                K::InvalidAudience => Refusal::Audience,
                K::InvalidIssuer => Refusal::Issuer,
                K::MissingRequiredClaim(c) if c == "aud" => Refusal::Audience,
                K::MissingRequiredClaim(c) if c == "iss" => Refusal::Issuer,
                K::InvalidAlgorithm | K::InvalidAlgorithmName => Refusal::Algorithm,
                _ => Refusal::Malformed,
            }
        })?;
        let c = data.claims;
        if c.sub.is_empty()
            || c.sub.len() > MAX_SUBJECT_BYTES
            || c.sub.chars().any(char::is_control)
        {
            return Err(Refusal::Subject);
        }
        if c.markets.len() > MAX_MARKET_PATTERNS {
            return Err(Refusal::Malformed);
        }
        Ok(Principal {
            subject: Some(c.sub),
            allowance: Allowance::Patterns(c.markets.into()),
            expires_at: Some(c.exp),
        })
    }

    /// Development only: an HS256 token for `sub` allowing `markets`,
    /// valid [`DEV_TOKEN_TTL`]; `None` unless `--dev-tokens` is on.
    pub fn mint_dev(&self, sub: &str, markets: &[String]) -> Option<(String, u64)> {
        let key = self.dev_signer.as_ref()?;
        let now = now_secs();
        let exp = now + DEV_TOKEN_TTL.as_secs();
        let claims = Claims {
            sub: sub.to_owned(),
            exp,
            nbf: None,
            iat: Some(now),
            markets: markets.to_vec(),
        };
        #[derive(Serialize)]
        struct WithAud<'a> {
            #[serde(flatten)]
            claims: &'a Claims,
            #[serde(skip_serializing_if = "Option::is_none")]
            aud: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            iss: Option<&'a str>,
        }
        let body = WithAud {
            claims: &claims,
            aud: self.audience.as_deref(),
            iss: self.issuer.as_deref(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &body, key)
            .ok()
            .map(|t| (t, exp))
    }
}

/// The credentials check of one publisher: token mode with its verifier,
/// or anonymous.
pub enum Auth {
    /// Tokens required.
    Token(Box<Verifier>),
    /// Everyone is anonymous.
    Anonymous,
}

impl Auth {
    /// From the configuration (fails in token mode without keys).
    pub fn new(config: &AuthConfig) -> Result<Self> {
        match &config.mode {
            Mode::Token(keys) => Ok(Auth::Token(Box::new(Verifier::new(
                keys,
                config.dev_tokens,
            )?))),
            Mode::Anonymous => {
                if config.dev_tokens {
                    return Err(Error::Config(format!(
                        "{} needs {}=token",
                        streampipe_contract::deploy::env::DEV_TOKENS,
                        streampipe_contract::deploy::env::AUTH_MODE
                    )));
                }
                Ok(Auth::Anonymous)
            }
        }
    }

    /// Whether tokens are required.
    pub fn requires_token(&self) -> bool {
        matches!(self, Auth::Token(_))
    }

    /// The principal of a request with this `Authorization` header value.
    pub fn from_header(
        &self,
        authorization: Option<&str>,
    ) -> std::result::Result<Principal, Refusal> {
        match self {
            Auth::Anonymous => Ok(Principal::anonymous()),
            Auth::Token(v) => {
                let h = authorization.ok_or(Refusal::Missing)?.trim();
                let token = h
                    .split_once(' ')
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                    .map(|(_, t)| t)
                    .ok_or(Refusal::Missing)?;
                v.verify(token)
            }
        }
    }

    /// The principal of a bare token (WebSocket subprotocol or frame).
    pub fn from_token(&self, token: &str) -> std::result::Result<Principal, Refusal> {
        match self {
            Auth::Anonymous => Ok(Principal::anonymous()),
            Auth::Token(v) => v.verify(token),
        }
    }
}

/// Now, Unix seconds.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How long until a token expiring at `exp` (Unix seconds) is past its
/// leeway; zero if it already is.
pub fn until_expiry(exp: u64) -> Duration {
    Duration::from_secs((exp + LEEWAY_SECS).saturating_sub(now_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> TokenKeys {
        TokenKeys {
            hs256: Some(Secret::new("test-secret-that-is-long-enough-0123456789")),
            ..Default::default()
        }
    }

    fn mint(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn patterns_are_exact_or_prefix() {
        assert!(matches("*", "anything"));
        assert!(matches("football.*", "football.epl.1"));
        assert!(!matches("football.*", "tennis.1"));
        assert!(!matches("football.*", "football"));
        assert!(matches("a:b", "a:b"));
        assert!(!matches("a:b", "a:bc"));
        let a = Allowance::Patterns(vec!["football.*".to_owned(), "x".to_owned()].into());
        assert_eq!(
            a.first_refused(&["football.1".into(), "y".into()]),
            Some("y")
        );
        assert!(Allowance::Patterns(Vec::new().into())
            .first_refused(&["a".into()])
            .is_some());
    }

    #[test]
    fn token_mode_without_keys_refuses_to_start() {
        let e = Verifier::new(&TokenKeys::default(), false).err().unwrap();
        assert!(e.to_string().contains("STREAMPIPE_AUTH_MODE"), "{e}");
    }

    #[test]
    fn secrets_are_not_in_debug() {
        let k = keys();
        assert!(!format!("{k:?}").contains("test-secret"));
    }

    #[test]
    fn tokens_are_verified() {
        let v = Verifier::new(&keys(), false).unwrap();
        let secret = "test-secret-that-is-long-enough-0123456789";
        let exp = now_secs() + 60;
        let ok = mint(
            secret,
            serde_json::json!({"sub": "u1", "exp": exp, "markets": ["f.*"]}),
        );
        let p = v.verify(&ok).unwrap();
        assert_eq!(p.subject.as_deref(), Some("u1"));
        assert!(p.allowance.allows("f.1"));
        let bad = mint("other", serde_json::json!({"sub": "u1", "exp": exp}));
        assert_eq!(v.verify(&bad).unwrap_err(), Refusal::Signature);
        let old = mint(
            secret,
            serde_json::json!({"sub": "u1", "exp": now_secs() - LEEWAY_SECS - 5}),
        );
        assert_eq!(v.verify(&old).unwrap_err(), Refusal::Expired);
        let no_exp = mint(secret, serde_json::json!({"sub": "u1"}));
        assert_eq!(v.verify(&no_exp).unwrap_err(), Refusal::Malformed);
        let no_sub = mint(secret, serde_json::json!({"exp": exp}));
        assert_eq!(v.verify(&no_sub).unwrap_err(), Refusal::Malformed);
        let future = mint(
            secret,
            serde_json::json!({"sub": "u", "exp": exp + 999, "nbf": now_secs() + 600}),
        );
        assert_eq!(v.verify(&future).unwrap_err(), Refusal::NotYetValid);
        // alg none: header {"alg":"none"}.
        let none = format!(
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
            ok.split('.').nth(1).unwrap()
        );
        assert!(v.verify(&none).is_err());
        assert_eq!(v.verify("").unwrap_err(), Refusal::Missing);
        assert_eq!(
            v.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)).unwrap_err(),
            Refusal::TooLarge
        );
    }

    #[test]
    fn audience_and_issuer_are_checked_when_configured() {
        let mut k = keys();
        k.audience = Some("odds".into());
        k.issuer = Some("bookie".into());
        let v = Verifier::new(&k, false).unwrap();
        let secret = "test-secret-that-is-long-enough-0123456789";
        let exp = now_secs() + 60;
        let t = |c| mint(secret, c);
        assert!(v
            .verify(&t(
                serde_json::json!({"sub":"u","exp":exp,"aud":"odds","iss":"bookie"})
            ))
            .is_ok());
        assert_eq!(
            v.verify(&t(
                serde_json::json!({"sub":"u","exp":exp,"aud":"x","iss":"bookie"})
            ))
            .unwrap_err(),
            Refusal::Audience
        );
        assert_eq!(
            v.verify(&t(serde_json::json!({"sub":"u","exp":exp,"iss":"bookie"})))
                .unwrap_err(),
            Refusal::Audience
        );
        assert_eq!(
            v.verify(&t(
                serde_json::json!({"sub":"u","exp":exp,"aud":"odds","iss":"y"})
            ))
            .unwrap_err(),
            Refusal::Issuer
        );
    }

    #[test]
    fn dev_tokens_verify_and_need_the_flag() {
        let v = Verifier::new(&keys(), false).unwrap();
        assert!(v.mint_dev("u", &[]).is_none());
        let v = Verifier::new(&keys(), true).unwrap();
        let (t, _) = v.mint_dev("u", &["*".into()]).unwrap();
        assert_eq!(v.verify(&t).unwrap().subject.as_deref(), Some("u"));
    }
}
