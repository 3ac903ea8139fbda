//! Every way a request can fail, mapped in one place to a status and a stable `code`, and
//! rendered as `application/problem+json`. Internals never reach the client: they are logged.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hongbao_core::ClaimError;
use hongbao_engine::EngineError;
use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("a valid `Authorization: Bearer <key or user token>` header is required")]
    Unauthorized,
    #[error("this key or token may not do that")]
    Forbidden,
    #[error("not in this packet's audience")]
    NotEligible,
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("the wallet does not hold enough money")]
    InsufficientFunds,
    #[error("the balance would exceed its limit")]
    BalanceLimit,
    #[error("grab a share before opening it (or the hold lapsed)")]
    NotGrabbed,
    #[error("this request_id was already used with a different request")]
    IdempotencyConflict,
    #[error("every share of this packet is taken")]
    PacketExhausted,
    #[error("this packet has expired")]
    PacketExpired,
    #[error("too many requests from this user: slow down")]
    RateLimited,
    #[error("the service is saturated: retry shortly")]
    Overloaded,
    #[error("the request headers are too large")]
    HeadersTooLarge,
    /// The body was over the size bound; it was read to its end and thrown away, so the
    /// connection carries the next request.
    #[error("the body must be at most {0} bytes")]
    BodyTooLarge(usize),
    /// The body could not be read whole (far over the size bound, too slow, or cut off). It is
    /// left unread, so the connection cannot carry another request: the reply says
    /// `Connection: close`.
    #[error("the body must be at most {0} bytes")]
    BodyUnread(usize),
    #[error("internal error")]
    Internal(String),
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'a str,
    status: u16,
    code: &'static str,
    detail: String,
}

impl ApiError {
    /// The one mapping from error to HTTP status and `code` (DESIGN.md §4).
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidRequest(_) | ApiError::BodyTooLarge(_) | ApiError::BodyUnread(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotEligible => (StatusCode::FORBIDDEN, "not_eligible"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::InsufficientFunds => (StatusCode::CONFLICT, "insufficient_funds"),
            ApiError::BalanceLimit => (StatusCode::CONFLICT, "balance_limit"),
            ApiError::NotGrabbed => (StatusCode::CONFLICT, "not_grabbed"),
            ApiError::IdempotencyConflict => (StatusCode::CONFLICT, "idempotency_conflict"),
            ApiError::PacketExhausted => (StatusCode::GONE, "packet_exhausted"),
            ApiError::PacketExpired => (StatusCode::GONE, "packet_expired"),
            ApiError::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::HeadersTooLarge => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "headers_too_large"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        match e {
            EngineError::NotFound => ApiError::NotFound("packet"),
            EngineError::InsufficientFunds => ApiError::InsufficientFunds,
            EngineError::BalanceLimit => ApiError::BalanceLimit,
            EngineError::IdempotencyConflict => ApiError::IdempotencyConflict,
            EngineError::Claim(ClaimError::NotEligible) => ApiError::NotEligible,
            EngineError::Claim(ClaimError::Exhausted) => ApiError::PacketExhausted,
            EngineError::Claim(ClaimError::Expired) => ApiError::PacketExpired,
            EngineError::Claim(ClaimError::NotGrabbed) => ApiError::NotGrabbed,
            EngineError::Overloaded | EngineError::Unavailable => ApiError::Overloaded,
            EngineError::Store(msg) => ApiError::Internal(msg),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let detail = match &self {
            ApiError::Internal(msg) => {
                tracing::error!(error = %msg, "internal error");
                "the request could not be completed; it is logged".to_string()
            }
            e => e.to_string(),
        };
        let title = status.canonical_reason().unwrap_or("error");
        let body = Problem { kind: "about:blank", title, status: status.as_u16(), code, detail };
        let mut res = (status, serde_json::to_vec(&body).unwrap_or_default()).into_response();
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if matches!(self, ApiError::BodyUnread(_)) {
            // Without it a keep-alive client sends its next request on a connection the
            // server is about to close, and sees that request fail.
            res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res
    }
}
