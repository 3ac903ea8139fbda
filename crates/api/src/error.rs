//! Every way a request can fail, mapped in one place to a status and a stable `code`, and
//! rendered as `application/problem+json`. Internals never reach the client: they are logged.

use std::sync::OnceLock;

use axum::body::{Body, Bytes};
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

impl ApiError {
    /// Where the body of an error that always reads the same is kept, once rendered; `None`
    /// for one whose detail varies. A crowd turned away from an emptied packet is answered
    /// with a body rendered once, not once per request.
    fn fixed(&self) -> Option<usize> {
        Some(match self {
            ApiError::Unauthorized => 0,
            ApiError::Forbidden => 1,
            ApiError::NotEligible => 2,
            ApiError::InsufficientFunds => 3,
            ApiError::BalanceLimit => 4,
            ApiError::NotGrabbed => 5,
            ApiError::IdempotencyConflict => 6,
            ApiError::PacketExhausted => 7,
            ApiError::PacketExpired => 8,
            ApiError::RateLimited => 9,
            ApiError::Overloaded => 10,
            ApiError::HeadersTooLarge => 11,
            _ => return None,
        })
    }

    /// The `application/problem+json` body.
    fn render(&self, status: StatusCode, code: &'static str) -> Vec<u8> {
        let detail = match self {
            ApiError::Internal(_) => "the request could not be completed; it is logged".to_string(),
            e => e.to_string(),
        };
        let title = status.canonical_reason().unwrap_or("error");
        let body = Problem { kind: "about:blank", title, status: status.as_u16(), code, detail };
        serde_json::to_vec(&body).unwrap_or_default()
    }
}

/// How many errors `ApiError::fixed` places.
const FIXED_ERRORS: usize = 12;

/// The rendered bodies of the errors `ApiError::fixed` places.
static FIXED_BODIES: [OnceLock<Box<[u8]>>; FIXED_ERRORS] = [const { OnceLock::new() }; FIXED_ERRORS];

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::Internal(msg) = &self {
            tracing::error!(error = %msg, "internal error");
        }
        let body = match self.fixed() {
            Some(at) => Bytes::from_static(FIXED_BODIES[at].get_or_init(|| self.render(status, code).into())),
            None => Bytes::from(self.render(status, code)),
        };
        let mut res = Response::new(Body::from(body));
        *res.status_mut() = status;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fixed_errors() -> Vec<ApiError> {
        vec![
            ApiError::Unauthorized,
            ApiError::Forbidden,
            ApiError::NotEligible,
            ApiError::InsufficientFunds,
            ApiError::BalanceLimit,
            ApiError::NotGrabbed,
            ApiError::IdempotencyConflict,
            ApiError::PacketExhausted,
            ApiError::PacketExpired,
            ApiError::RateLimited,
            ApiError::Overloaded,
            ApiError::HeadersTooLarge,
        ]
    }

    /// Every error whose body is rendered once has a place of its own, and is served, every
    /// time, the body it would render afresh.
    #[tokio::test]
    async fn a_fixed_body_is_the_body_the_error_renders() {
        let mut places: Vec<usize> = fixed_errors().iter().map(|e| e.fixed().expect("fixed")).collect();
        places.sort_unstable();
        assert_eq!(places, (0..FIXED_BODIES.len()).collect::<Vec<_>>(), "one place each, all used");
        for _ in 0..2 {
            for e in fixed_errors() {
                let (status, code) = e.status_and_code();
                let fresh = e.render(status, code);
                let res = e.into_response();
                assert_eq!(res.status(), status, "{code}");
                let served = axum::body::to_bytes(res.into_body(), 4096).await.expect("body");
                assert_eq!(served.as_ref(), fresh.as_slice(), "{code}");
            }
        }
        assert_eq!(ApiError::InvalidRequest("x".into()).fixed(), None, "a detail that varies");
    }
}
