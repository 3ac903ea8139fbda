//! Strict request bodies: every rejection — malformed JSON, a wrong type, a float or an
//! out-of-range number where an integer is due, an unknown or missing field, a body over the
//! size limit, a wrong content type — is a 400 `invalid_request` with a detail that says why.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The largest request body, in bytes: a group packet of 10,000 users fits with room to spare.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;

pub struct StrictJson<T>(pub T);

impl<S, T> FromRequest<S> for StrictJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
            v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
        if !json {
            return Err(ApiError::InvalidRequest("Content-Type must be application/json".into()));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|_| ApiError::InvalidRequest(format!("body must be at most {BODY_BYTES_MAX} bytes")))?;
        // serde's derive also reads a struct from an array of its fields in order
        // (`[100, "r1"]` would be a deposit): a body must be one JSON object.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::InvalidRequest("body must be a JSON object".into()));
        }
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value =
            T::deserialize(&mut de).map_err(|e| ApiError::InvalidRequest(format!("invalid body: {e}")))?;
        de.end().map_err(|e| ApiError::InvalidRequest(format!("invalid JSON: {e}")))?;
        Ok(StrictJson(value))
    }
}
