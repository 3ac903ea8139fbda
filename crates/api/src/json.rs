//! Strict request bodies: every rejection — malformed JSON, a wrong type, a float or an
//! out-of-range number where an integer is due, an unknown or missing field, a body over the
//! size limit, a wrong content type — is a 400 `invalid_request` with a detail that says why.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::header;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::error::ApiError;

/// The largest request body, in bytes: a group packet of 10,000 users fits with room to spare.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;

/// How much more of a body over [`BODY_BYTES_MAX`] is read and thrown away before the 400. A
/// client that writes its whole body before it reads the reply (most do) would otherwise see
/// its connection reset under its writes instead of the 400; read to its end, the connection
/// even stays open. Past this (or [`DRAIN_TIME_MAX`]) the reply closes the connection.
const DRAIN_BYTES_MAX: usize = 16 * 1024 * 1024;

/// How long a body over the limit may take to be read to its end.
const DRAIN_TIME_MAX: Duration = Duration::from_secs(2);

pub struct StrictJson<T>(pub T);

impl<S, T> FromRequest<S> for StrictJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let json = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
            v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
        if !json {
            return Err(ApiError::InvalidRequest("Content-Type must be application/json".into()));
        }
        let bytes = read_body(req.into_body()).await?;
        parse(&bytes).map(StrictJson)
    }
}

/// Reads a whole body of at most [`BODY_BYTES_MAX`] bytes. A larger one is read on to its end
/// and thrown away, within [`DRAIN_BYTES_MAX`] and [`DRAIN_TIME_MAX`], then refused.
async fn read_body(mut body: Body) -> Result<Bytes, ApiError> {
    // One frame, the usual case, is kept as it came; more are joined.
    let mut first = Bytes::new();
    let mut joined: Option<Vec<u8>> = None;
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| ApiError::BodyUnread(BODY_BYTES_MAX))?.into_data() else {
            continue; // trailers
        };
        len += data.len();
        if len > BODY_BYTES_MAX {
            return Err(drain(body, len).await);
        }
        match &mut joined {
            Some(all) => all.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut all = Vec::with_capacity(len);
                all.extend_from_slice(&first);
                all.extend_from_slice(&data);
                joined = Some(all);
            }
        }
    }
    Ok(joined.map_or(first, Bytes::from))
}

/// Reads the rest of a body over the limit and throws it away. The refusal keeps the
/// connection if the body ended within the drain bounds, and closes it otherwise.
async fn drain(mut body: Body, mut len: usize) -> ApiError {
    let deadline = Instant::now() + DRAIN_TIME_MAX;
    while len <= BODY_BYTES_MAX + DRAIN_BYTES_MAX {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(None) => return ApiError::BodyTooLarge(BODY_BYTES_MAX),
            Ok(Some(Ok(frame))) => len += frame.data_ref().map_or(0, |d| d.len()),
            Ok(Some(Err(_))) | Err(_) => break,
        }
    }
    ApiError::BodyUnread(BODY_BYTES_MAX)
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
