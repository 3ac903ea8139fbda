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
        let bytes =
            Bytes::from_request(req, state).await.map_err(|_| ApiError::BodyUnread(BODY_BYTES_MAX))?;
        parse(&bytes).map(StrictJson)
    }
}

/// For the fuzz targets (`fuzz/`), not part of the API: parses `bytes` as the request body
/// `kind` names (`money`, `send` or `user`) exactly as `StrictJson` does. `Err` is the detail
/// of the 400 the server would send.
#[doc(hidden)]
pub fn fuzz_parse_body(kind: &str, bytes: &[u8]) -> Result<(), String> {
    use crate::dto::{MoneyBody, SendBody, UserBody};
    let parsed = match kind {
        "money" => parse::<MoneyBody>(bytes).map(drop),
        "send" => parse::<SendBody>(bytes).map(drop),
        "user" => parse::<UserBody>(bytes).map(drop),
        other => panic!("no request body kind {other:?}"),
    };
    // `parse` fails only with `InvalidRequest`, whose text is the detail.
    parsed.map_err(|e| e.to_string())
}

/// Parses `bytes` as a JSON body of type `T`: exactly one JSON object, nothing after it.
fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // serde's derive also takes a JSON array of the fields in order (`[100, "r1"]` as a
    // deposit), which is not the contract: every body is an object.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::InvalidRequest("invalid body: the body must be a JSON object".into()));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value =
        T::deserialize(&mut de).map_err(|e| ApiError::InvalidRequest(format!("invalid body: {e}")))?;
    de.end().map_err(|e| ApiError::InvalidRequest(format!("invalid JSON: {e}")))?;
    Ok(value)
}
