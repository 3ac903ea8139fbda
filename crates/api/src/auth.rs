//! Keys and scopes. The service key acts for the app; the admin key can also move money in
//! (deposits) and read the books (audit). Keys are compared in constant time and never logged.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Service,
    Admin,
}

/// The two keys, held as bytes. Never printed: `Debug` is not derived on purpose.
#[derive(Clone)]
pub struct Keys {
    pub service: Vec<u8>,
    pub admin: Vec<u8>,
}

fn authorize(state: &AppState, headers: &HeaderMap, need: Scope) -> Result<(), ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or(ApiError::Unauthorized)?
        .as_bytes();
    let is_admin = bool::from(presented.ct_eq(&state.keys.admin));
    let is_service = bool::from(presented.ct_eq(&state.keys.service));
    match (need, is_admin, is_service) {
        (_, true, _) => Ok(()),
        (Scope::Service, false, true) => Ok(()),
        (Scope::Admin, false, true) => Err(ApiError::Forbidden),
        _ => Err(ApiError::Unauthorized),
    }
}

/// Extractor: the request carries the service key (or the admin key). It runs before the body
/// is read, so a request without a key is a 401 whatever its body.
pub struct ServiceKey;

/// Extractor: the request carries the admin key.
pub struct AdminKey;

impl FromRequestParts<AppState> for ServiceKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        authorize(state, &parts.headers, Scope::Service).map(|()| ServiceKey)
    }
}

impl FromRequestParts<AppState> for AdminKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        authorize(state, &parts.headers, Scope::Admin).map(|()| AdminKey)
    }
}
