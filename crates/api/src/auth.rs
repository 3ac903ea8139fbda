//! Who is asking, and what they may do. A request is made with one of three credentials:
//! the service key acts for the app, as any user; the admin key can also move money in
//! (deposits) and read the books (audit); a user token, a short-lived JWT (HS256, signed with
//! the configured secret) naming a user in `sub`, acts only as that user, so apps can call
//! hongbao straight from their clients.
//!
//! Keys are compared in constant time. Keys, tokens and the token secret are never logged,
//! printed or put in an error: `Debug` is not derived on the types that hold them, and a
//! refused token is logged by the kind of its fault only.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use hongbao_core::UserId;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::AppState;

/// The shortest token secret accepted: HS256 is only as strong as its key, and 32 bytes is
/// the hash's own size (RFC 7518 §3.2).
pub const TOKEN_SECRET_BYTES_MIN: usize = 32;

/// The longest a token may live from issue (`iat`) to expiry (`exp`). A token sits in a
/// client that anyone may have taken apart; a stolen one must stop working soon, so apps mint
/// them for a session and renew them.
pub const TOKEN_LIFETIME_S_MAX: u64 = 24 * 3600;

/// Clock skew allowed between the app that mints tokens and hongbao, on `exp`, `nbf` and
/// `iat`. Servers keep time by NTP; half a minute covers a slow one.
pub const TOKEN_LEEWAY_S: u64 = 30;

/// The longest credential looked at. A token of a user id and three times is a few hundred
/// bytes; anything much longer is not one of ours, and is refused before any decoding.
pub const CREDENTIAL_BYTES_MAX: usize = 2048;

/// The two keys, held as bytes. Never printed: `Debug` is not derived on purpose.
#[derive(Clone)]
pub struct Keys {
    pub service: Vec<u8>,
    pub admin: Vec<u8>,
}

/// Verifies user tokens: HS256 with one shared secret. Never printed: it holds the secret,
/// so `Debug` is not derived on purpose.
pub struct Tokens {
    key: DecodingKey,
    validation: Validation,
}

impl Tokens {
    /// A verifier for tokens signed with `secret`, which must be at least
    /// `TOKEN_SECRET_BYTES_MIN` bytes. The error never contains the secret.
    pub fn hs256(secret: &[u8]) -> Result<Tokens, String> {
        if secret.len() < TOKEN_SECRET_BYTES_MIN {
            return Err(format!("the token secret must be at least {TOKEN_SECRET_BYTES_MIN} bytes"));
        }
        install_token_crypto();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = TOKEN_LEEWAY_S;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // The secret is hongbao's alone, so an audience claim adds nothing; tokens may carry
        // one for the app's own use.
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Tokens { key: DecodingKey::from_secret(secret), validation })
    }

    /// The user a token acts for, or why it is refused (a fixed phrase, safe to log).
    fn verify(&self, token: &str, now_s: u64) -> Result<UserId, &'static str> {
        let data = jsonwebtoken::decode::<TokenClaims>(token, &self.key, &self.validation)
            .map_err(|e| refusal(e.kind()))?;
        let claims = data.claims;
        if claims.iat > now_s + TOKEN_LEEWAY_S {
            return Err("issued in the future");
        }
        if claims.exp.saturating_sub(claims.iat) > TOKEN_LIFETIME_S_MAX {
            return Err("lifetime above the limit");
        }
        UserId::parse(&claims.sub).map_err(|_| "sub is not a user id")
    }
}

/// The claims hongbao reads; others are allowed and ignored. `iat` is required so the
/// lifetime can be bounded; wrong types fail to parse and the token is refused.
#[derive(Deserialize)]
struct TokenClaims {
    sub: String,
    exp: u64,
    iat: u64,
}

fn refusal(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::ImmatureSignature => "not yet valid",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAlgorithm => "algorithm not HS256",
        // Claims are read into `TokenClaims` before they are validated, so a missing or
        // mistyped `sub`, `exp` or `iat` is a JSON error.
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) | ErrorKind::Json(_) => {
            "malformed header or claims"
        }
        _ => "malformed token",
    }
}

/// Who made a request, once its credential is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The service key: the app, acting for any user.
    Service,
    /// The admin key: everything the service key may do, and deposits and the audit.
    Admin,
    /// A user token: this user only.
    User(UserId),
}

impl Caller {
    /// Whether this caller may act as `user` or read what is theirs: keys act for anyone, a
    /// token only for its own user (else `Forbidden`).
    pub fn may_act_as(&self, user: &UserId) -> Result<(), ApiError> {
        match self {
            Caller::Service | Caller::Admin => Ok(()),
            Caller::User(me) if me == user => Ok(()),
            Caller::User(_) => Err(ApiError::Forbidden),
        }
    }

    /// The user a token acts for; `None` for the keys.
    pub fn user(&self) -> Option<&UserId> {
        match self {
            Caller::User(me) => Some(me),
            Caller::Service | Caller::Admin => None,
        }
    }
}

/// Checks the `Authorization: Bearer …` credential: a key, else a user token when tokens
/// are on. Missing, unknown, bad or expired: `Unauthorized`.
fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= CREDENTIAL_BYTES_MAX)
        .ok_or(ApiError::Unauthorized)?;
    // Both keys are compared, every time, so the time taken tells nothing about either.
    let is_admin = bool::from(presented.as_bytes().ct_eq(&state.keys.admin));
    let is_service = bool::from(presented.as_bytes().ct_eq(&state.keys.service));
    if is_admin {
        return Ok(Caller::Admin);
    }
    if is_service {
        return Ok(Caller::Service);
    }
    let Some(tokens) = state.tokens.as_deref() else {
        tracing::debug!("credential refused: not a key, and user tokens are off");
        return Err(ApiError::Unauthorized);
    };
    if presented.split('.').count() != 3 {
        tracing::debug!("credential refused: neither a key nor a token");
        return Err(ApiError::Unauthorized);
    }
    match tokens.verify(presented, now_s()) {
        Ok(user) => {
            tracing::debug!(user = %user, "user token accepted");
            Ok(Caller::User(user))
        }
        Err(reason) => {
            tracing::debug!(reason, "user token refused");
            Err(ApiError::Unauthorized)
        }
    }
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Extractor: any valid credential (a key or a user token). Handlers then check what the
/// caller may do with `Caller::may_act_as`. It runs before the body is read, so a request
/// without a credential is a 401 whatever its body.
impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        authenticate(state, &parts.headers)
    }
}

/// Extractor: the request carries the service key (or the admin key). A user token is a
/// 403: it is a valid credential without this scope.
pub struct ServiceKey;

/// Extractor: the request carries the admin key.
pub struct AdminKey;

impl FromRequestParts<AppState> for ServiceKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        match authenticate(state, &parts.headers)? {
            Caller::Service | Caller::Admin => Ok(ServiceKey),
            Caller::User(_) => Err(ApiError::Forbidden),
        }
    }
}

impl FromRequestParts<AppState> for AdminKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        match authenticate(state, &parts.headers)? {
            Caller::Admin => Ok(AdminKey),
            Caller::Service | Caller::User(_) => Err(ApiError::Forbidden),
        }
    }
}

/// Makes HS256 available to `jsonwebtoken` in this process (it has no crypto of its own as
/// built here). Idempotent; `Tokens::hs256` calls it, and so must a process that mints tokens
/// with `jsonwebtoken::encode` (tests, tools) before its first token.
pub fn install_token_crypto() {
    // Err means a provider is already installed: ours from an earlier call, or another that
    // also does HS256.
    let _ = hs256::PROVIDER.install_default();
}

/// HS256 for `jsonwebtoken`, over RustCrypto's `hmac` and `sha2`. Every other algorithm is
/// refused, so a token cannot choose its own (`alg: none`, RS256 with the secret as a key).
mod hs256 {
    use hmac::{Hmac, KeyInit, Mac};
    use jsonwebtoken::crypto::{CryptoProvider, JwkUtils, JwtSigner, JwtVerifier};
    use jsonwebtoken::errors::{ErrorKind, Result};
    use jsonwebtoken::signature::{Error as SignatureError, Signer, Verifier};
    use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
    use sha2::Sha256;

    pub static PROVIDER: CryptoProvider = CryptoProvider {
        signer_factory: signer,
        verifier_factory: verifier,
        jwk_utils: JwkUtils::new_unimplemented(),
    };

    struct Hs256(Hmac<Sha256>);

    impl Hs256 {
        fn new(alg: &Algorithm, secret: &[u8]) -> Result<Hs256> {
            if *alg != Algorithm::HS256 {
                return Err(ErrorKind::InvalidAlgorithm.into());
            }
            let mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| ErrorKind::InvalidKeyFormat)?;
            Ok(Hs256(mac))
        }
    }

    fn signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
        Ok(Box::new(Hs256::new(alg, key.try_get_hmac_secret()?)?))
    }

    fn verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
        Ok(Box::new(Hs256::new(alg, key.try_get_hmac_secret()?)?))
    }

    impl Signer<Vec<u8>> for Hs256 {
        fn try_sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, SignatureError> {
            let mut mac = self.0.clone();
            mac.update(msg);
            Ok(mac.finalize().into_bytes().to_vec())
        }
    }

    impl Verifier<Vec<u8>> for Hs256 {
        fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> std::result::Result<(), SignatureError> {
            let mut mac = self.0.clone();
            mac.update(msg);
            // Constant time, so a forger learns nothing from how long a refusal takes.
            mac.verify_slice(signature).map_err(|_| SignatureError::new())
        }
    }

    impl JwtSigner for Hs256 {
        fn algorithm(&self) -> Algorithm {
            Algorithm::HS256
        }
    }

    impl JwtVerifier for Hs256 {
        fn algorithm(&self) -> Algorithm {
            Algorithm::HS256
        }
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const HOUR_S: u64 = 3600;

    fn mint(secret: &[u8], claims: serde_json::Value) -> String {
        install_token_crypto();
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).expect("mint")
    }

    fn good(claims: serde_json::Value) -> String {
        mint(SECRET, claims)
    }

    /// `token` with its header replaced by `header_b64` (base64url JSON): a forgery.
    fn with_header(token: &str, header_b64: &str) -> String {
        let (_, rest) = token.split_once('.').expect("a JWT");
        format!("{header_b64}.{rest}")
    }

    #[test]
    fn short_secret_is_refused() {
        assert!(Tokens::hs256(&SECRET[..TOKEN_SECRET_BYTES_MIN - 1]).is_err());
        assert!(Tokens::hs256(SECRET).is_ok());
    }

    #[test]
    fn tokens_table() {
        // Real time: jsonwebtoken checks `exp` and `nbf` against the system clock.
        let now = now_s();
        let t = Tokens::hs256(SECRET).expect("tokens");
        let valid = good(json!({"sub": "alice", "iat": now, "exp": now + HOUR_S}));
        let other_secret = b"another secret, also 32 bytes or more";
        let cases: Vec<(&str, String, Result<&str, &str>)> = vec![
            ("valid", valid.clone(), Ok("alice")),
            ("extra claims", good(json!({"sub": "bo", "iat": now, "exp": now + 60, "aud": "app"})), Ok("bo")),
            (
                "expired",
                good(json!({"sub": "a", "iat": now - 2 * HOUR_S, "exp": now - HOUR_S})),
                Err("expired"),
            ),
            ("within leeway", good(json!({"sub": "a", "iat": now - 60, "exp": now - 5})), Ok("a")),
            ("no exp", good(json!({"sub": "a", "iat": now})), Err("malformed header or claims")),
            ("no sub", good(json!({"iat": now, "exp": now + 60})), Err("malformed header or claims")),
            ("no iat", good(json!({"sub": "a", "exp": now + 60})), Err("malformed header or claims")),
            (
                "exp a string",
                good(json!({"sub": "a", "iat": now, "exp": "never"})),
                Err("malformed header or claims"),
            ),
            (
                "iat a string",
                good(json!({"sub": "a", "iat": "x", "exp": now + 60})),
                Err("malformed header or claims"),
            ),
            (
                "nbf ahead",
                good(json!({"sub": "a", "iat": now, "exp": now + 60, "nbf": now + HOUR_S})),
                Err("not yet valid"),
            ),
            (
                "lifetime just at the limit",
                good(json!({"sub": "a", "iat": now, "exp": now + TOKEN_LIFETIME_S_MAX})),
                Ok("a"),
            ),
            (
                "lifetime above the limit",
                good(json!({"sub": "a", "iat": now, "exp": now + TOKEN_LIFETIME_S_MAX + 1})),
                Err("lifetime above the limit"),
            ),
            (
                "issued in the future",
                good(json!({"sub": "a", "iat": now + HOUR_S, "exp": now + 2 * HOUR_S})),
                Err("issued in the future"),
            ),
            (
                "sub not a user id",
                good(json!({"sub": "a b", "iat": now, "exp": now + 60})),
                Err("sub is not a user id"),
            ),
            (
                "other secret",
                mint(other_secret, json!({"sub": "a", "iat": now, "exp": now + 60})),
                Err("bad signature"),
            ),
            // {"alg":"HS512","typ":"JWT"}: another algorithm than the one configured.
            (
                "HS512",
                with_header(&valid, "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9"),
                Err("algorithm not HS256"),
            ),
            // {"alg":"RS256","typ":"JWT"}: the key-confusion forgery.
            (
                "RS256",
                with_header(&valid, "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9"),
                Err("algorithm not HS256"),
            ),
            // {"alg":"none","typ":"JWT"}: the unsigned forgery.
            (
                "alg none",
                with_header(&valid, "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"),
                Err("malformed header or claims"),
            ),
            ("garbage", "a.b.c".to_string(), Err("malformed token")),
        ];
        for (what, token, want) in cases {
            let got = t.verify(&token, now);
            let got = got.as_ref().map(UserId::as_str).map_err(|e| *e);
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn callers_act_only_as_themselves() {
        let alice = UserId::parse("alice").unwrap();
        let bob = UserId::parse("bob").unwrap();
        assert!(Caller::Service.may_act_as(&bob).is_ok());
        assert!(Caller::Admin.may_act_as(&bob).is_ok());
        assert!(Caller::User(alice.clone()).may_act_as(&alice).is_ok());
        assert!(matches!(Caller::User(alice).may_act_as(&bob), Err(ApiError::Forbidden)));
    }
}
