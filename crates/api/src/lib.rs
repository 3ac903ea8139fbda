//! hongbao-api: the HTTP/JSON face of the engine, and the only crate that knows HTTP or JSON.
//!
//! Handlers parse and validate, call the engine, and shape the reply; errors map to one status
//! and `code` in `error.rs`. Nothing here decides anything about money, and nothing here
//! blocks: the engine is awaited, queries run on the blocking pool inside the engine.

mod auth;
mod dto;
mod error;
mod handlers;
mod json;
mod metrics_layer;

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hongbao_core::UserId;
use hongbao_engine::Engine;
use utoipa::OpenApi;
use utoipa_scalar::{Scalar, Servable};

pub use auth::{
    install_token_crypto, Keys, Tokens, CREDENTIAL_BYTES_MAX, TOKEN_LEEWAY_S, TOKEN_LIFETIME_S_MAX,
    TOKEN_SECRET_BYTES_MIN,
};
pub use error::ApiError;
#[doc(hidden)]
pub use json::fuzz_parse_body;
pub use json::BODY_BYTES_MAX;

/// Grabs, opens and claims one user may make per second, and the burst allowed above it.
/// A person taps a few times; a script hammering one packet is turned away with 429.
pub const USER_REQUESTS_PER_S: u32 = 20;
pub const USER_BURST: u32 = 40;

/// The most bytes of request headers (names and values) a request may carry; more is refused
/// with 431 before any handler runs. Real clients send well under 2 KiB, a user token a few
/// hundred bytes; hyper's own bound (about 400 KiB) is far above what any caller needs.
pub const HEADER_BYTES_MAX: usize = 16 * 1024;

/// What every handler shares: one `Arc`, so the clone axum makes for each request (and the
/// one each `State` extractor makes) is one reference count, not one per part.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The parts of [`AppState`]. Reached through it (`state.engine`).
#[derive(Clone)]
pub struct Shared {
    pub engine: Engine,
    pub keys: Arc<Keys>,
    /// User-token verification; `None` when no token secret is configured (tokens refused).
    pub tokens: Option<Arc<Tokens>>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Per-user token buckets (sharded map inside governor; no lock held across `.await`).
    /// `None` when the limit is off (`--user-rate 0`): no bucket is kept for anyone.
    limiter: Option<Arc<DefaultKeyedRateLimiter<UserId>>>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub fn new(engine: Engine, keys: Keys) -> AppState {
        AppState::with_user_rate(engine, keys, USER_REQUESTS_PER_S, USER_BURST)
    }

    /// As `new`, with another per-user rate (requests per second and burst; 0 turns it off).
    pub fn with_user_rate(engine: Engine, keys: Keys, per_s: u32, burst: u32) -> AppState {
        // 0 turns the limit off; a burst of 0 with a rate is taken as a burst of the rate.
        let limiter = NonZeroU32::new(per_s).map(|per_s| {
            let burst = NonZeroU32::new(burst).unwrap_or(per_s);
            Arc::new(RateLimiter::keyed(Quota::per_second(per_s).allow_burst(burst)))
        });
        AppState(Arc::new(Shared {
            engine,
            keys: Arc::new(keys),
            tokens: None,
            metrics: metrics_layer::recorder(),
            limiter,
        }))
    }

    /// Accepts user tokens verified by `tokens` besides the keys.
    pub fn with_tokens(mut self, tokens: Tokens) -> AppState {
        Arc::make_mut(&mut self.0).tokens = Some(Arc::new(tokens));
        self
    }

    pub(crate) fn rate_limit(&self, user: &UserId) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        if limiter.check_key(user).is_err() {
            metrics::counter!("hongbao_rate_limited_total").increment(1);
            return Err(ApiError::RateLimited);
        }
        Ok(())
    }

    /// Forgets buckets that are full again, so the map stays as small as the active crowd.
    pub fn prune_rate_limits(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "hongbao", description = "Red packets (红包): wallets, lucky and equal packets, grab, open, claim."),
    paths(
        handlers::deposit, handlers::withdraw, handlers::wallet, handlers::entries, handlers::send,
        handlers::packet, handlers::grab, handlers::open, handlers::claim, handlers::received,
        handlers::sent, handlers::audit, handlers::healthz, handlers::readyz
    ),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Runs around every request: refuses one whose headers exceed `HEADER_BYTES_MAX`, records
/// each in the metrics, and tells the client how long the server took (`Server-Timing: app;dur=`
/// in milliseconds, the time `http_request_duration_seconds` records), so a client can tell
/// its own wait from the server's. One layer, not two: every layer costs every request a boxed
/// clone of the service under it.
async fn front(req: Request, next: Next) -> Response {
    let timer = metrics_layer::RequestTimer::start(&req);
    let bytes: usize = req.headers().iter().map(|(name, value)| name.as_str().len() + value.len()).sum();
    let mut res = if bytes > HEADER_BYTES_MAX {
        ApiError::HeadersTooLarge.into_response()
    } else {
        next.run(req).await
    };
    let took = timer.finish(&res);
    res.headers_mut().insert(SERVER_TIMING, server_timing(took));
    res
}

/// `Server-Timing` (W3C Server Timing): not among the `http` crate's named headers.
const SERVER_TIMING: axum::http::HeaderName = axum::http::HeaderName::from_static("server-timing");

/// `app;dur=` the time in milliseconds, to the microsecond.
fn server_timing(took: std::time::Duration) -> axum::http::HeaderValue {
    let us = took.as_micros();
    let value = format!("app;dur={}.{:03}", us / 1000, us % 1000);
    axum::http::HeaderValue::try_from(value).expect("digits and ASCII are a valid header value")
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/wallets/{user}/deposit", post(handlers::deposit))
        .route("/v1/wallets/{user}/withdraw", post(handlers::withdraw))
        .route("/v1/wallets/{user}", get(handlers::wallet))
        .route("/v1/wallets/{user}/entries", get(handlers::entries))
        .route("/v1/packets", post(handlers::send))
        .route("/v1/packets/{id}", get(handlers::packet))
        .route("/v1/packets/{id}/grab", post(handlers::grab))
        .route("/v1/packets/{id}/open", post(handlers::open))
        .route("/v1/packets/{id}/claim", post(handlers::claim))
        .route("/v1/users/{user}/received", get(handlers::received))
        .route("/v1/users/{user}/sent", get(handlers::sent))
        .route("/v1/admin/audit", get(handlers::audit))
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(metrics_layer::render))
        .route("/openapi.json", get(|| async { axum::Json(ApiDoc::openapi()) }))
        .merge(Scalar::with_url("/docs", ApiDoc::openapi()))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::not_found);
    // Bodies are bounded where they are read, by `StrictJson` (BODY_BYTES_MAX, and the drain
    // of a larger one): it reads the raw body, which axum's DefaultBodyLimit does not bound.
    api.layer(axum::middleware::from_fn(front)).with_state(state)
}
