//! Handlers: parse, call the engine, shape the reply. No decisions about money are made here.
//!
//! Who may do what (DESIGN.md §2 item 8): the service and admin keys act for any user; a user
//! token acts only as its own user (`Caller::may_act_as`), and sees a packet's details only
//! as its sender or one of its audience. Deposits, withdrawals and the audit take a key.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use hongbao_core::{Amount, Audience, Kind, PacketId, RequestId, SendRequest, UserId};
use hongbao_engine::GrabReply;

use crate::auth::{AdminKey, Caller, ServiceKey};
use crate::dto::*;
use crate::error::ApiError;
use crate::json::StrictJson;
use crate::AppState;

/// Default and largest page of any list.
pub const PAGE_DEFAULT: u32 = 50;
pub const PAGE_MAX: u32 = 200;

type ApiResult<T> = Result<T, ApiError>;

fn user_id(s: &str) -> ApiResult<UserId> {
    UserId::parse(s).map_err(|e| ApiError::InvalidRequest(e.to_string()))
}

fn packet_id(s: &str) -> ApiResult<PacketId> {
    PacketId::parse(s).map_err(|e| ApiError::InvalidRequest(e.to_string()))
}

fn request_id(s: &str) -> ApiResult<RequestId> {
    RequestId::parse(s).map_err(|e| ApiError::InvalidRequest(e.to_string()))
}

fn amount(v: i64, max: i64) -> ApiResult<Amount> {
    if v > max {
        return Err(ApiError::InvalidRequest(format!("amount must be at most {max} fen")));
    }
    Amount::new(v).map_err(|e| ApiError::InvalidRequest(e.to_string()))
}

struct Page {
    limit: u32,
    cursor: Option<String>,
    year: Option<i32>,
}

fn page(q: Result<Query<PageQuery>, QueryRejection>) -> ApiResult<Page> {
    let Query(q) = q.map_err(|e| ApiError::InvalidRequest(format!("invalid query: {e}")))?;
    let limit = match q.limit.as_deref() {
        None => PAGE_DEFAULT,
        Some(s) => s
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=PAGE_MAX).contains(l))
            .ok_or_else(|| ApiError::InvalidRequest(format!("limit must be between 1 and {PAGE_MAX}")))?,
    };
    let year = match q.year.as_deref() {
        None => None,
        Some(s) => Some(
            s.parse::<i32>()
                .ok()
                .filter(|y| (1970..=9999).contains(y))
                .ok_or_else(|| ApiError::InvalidRequest("year must be between 1970 and 9999".into()))?,
        ),
    };
    Ok(Page { limit, cursor: q.cursor, year })
}

fn cursor<T: std::str::FromStr>(c: &Option<String>) -> ApiResult<Option<T>> {
    match c {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| ApiError::InvalidRequest("invalid cursor".into())),
    }
}

#[utoipa::path(post, path = "/v1/wallets/{user}/deposit", request_body = MoneyBody,
    params(("user" = String, Path, pattern = "^[A-Za-z0-9_.-]{1,64}$")), security(("bearer" = [])),
    responses((status = 200, body = Wallet), (status = 400, response = inline(Problem)),
        (status = 401, response = inline(Problem)), (status = 403, response = inline(Problem)),
        (status = 409, response = inline(Problem)), (status = 503, response = inline(Problem))))]
pub async fn deposit(
    State(s): State<AppState>,
    _key: AdminKey,
    Path(user): Path<String>,
    StrictJson(body): StrictJson<MoneyBody>,
) -> ApiResult<Json<Wallet>> {
    let user = user_id(&user)?;
    let amount = amount(body.amount, s.engine.limits().transfer_max_fen)?;
    let rid = request_id(&body.request_id)?;
    Ok(Json(s.engine.deposit(user, amount, rid).await?.into()))
}

#[utoipa::path(post, path = "/v1/wallets/{user}/withdraw", request_body = MoneyBody,
    params(("user" = String, Path, pattern = "^[A-Za-z0-9_.-]{1,64}$")), security(("bearer" = [])),
    responses((status = 200, body = Wallet), (status = 400, response = inline(Problem)),
        (status = 401, response = inline(Problem)), (status = 403, response = inline(Problem)),
        (status = 409, response = inline(Problem)), (status = 503, response = inline(Problem))))]
pub async fn withdraw(
    State(s): State<AppState>,
    _key: ServiceKey,
    Path(user): Path<String>,
    StrictJson(body): StrictJson<MoneyBody>,
) -> ApiResult<Json<Wallet>> {
    let user = user_id(&user)?;
    let amount = amount(body.amount, s.engine.limits().transfer_max_fen)?;
    let rid = request_id(&body.request_id)?;
    Ok(Json(s.engine.withdraw(user, amount, rid).await?.into()))
}

#[utoipa::path(get, path = "/v1/wallets/{user}",
    params(("user" = String, Path, pattern = "^[A-Za-z0-9_.-]{1,64}$")), security(("bearer" = [])),
    responses((status = 200, body = Wallet), (status = 400, response = inline(Problem)),
        (status = 401, response = inline(Problem)), (status = 403, response = inline(Problem)),
        (status = 503, response = inline(Problem))))]
pub async fn wallet(
    State(s): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
) -> ApiResult<Json<Wallet>> {
    let user = user_id(&user)?;
    caller.may_act_as(&user)?;
    Ok(Json(s.engine.wallet(user).await?.into()))
}

#[utoipa::path(get, path = "/v1/wallets/{user}/entries",
    params(("user" = String, Path, pattern = "^[A-Za-z0-9_.-]{1,64}$"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 200), ("cursor" = Option<String>, Query)),
    security(("bearer" = [])),
    responses((status = 200, body = EntriesOut), (status = 400, response = inline(Problem)),
        (status = 401, response = inline(Problem)), (status = 403, response = inline(Problem)),
        (status = 503, response = inline(Problem))))]
pub async fn entries(
    State(s): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<Json<EntriesOut>> {
    let user = user_id(&user)?;
    caller.may_act_as(&user)?;
    let p = page(q)?;
    Ok(Json(s.engine.entries(user, cursor(&p.cursor)?, p.limit).await?.into()))
}

#[utoipa::path(post, path = "/v1/packets", request_body = SendBody, security(("bearer" = [])),
    responses((status = 201, body = PacketOut), (status = 400, response = inline(Problem)),
        (status = 401, response = inline(Problem)), (status = 403, response = inline(Problem)),
        (status = 409, response = inline(Problem)), (status = 503, response = inline(Problem))))]
pub async fn send(
    State(s): State<AppState>,
    caller: Caller,
    StrictJson(body): StrictJson<SendBody>,
) -> ApiResult<(StatusCode, Json<PacketOut>)> {
    let sender = user_id(&body.sender)?;
    caller.may_act_as(&sender)?;
    let kind = Kind::parse(&body.kind)
        .ok_or_else(|| ApiError::InvalidRequest("kind must be `lucky` or `equal`".into()))?;
    let audience = match (body.audience.users, body.audience.anyone) {
        (Some(users), None) => {
            let users = users.iter().map(|u| user_id(u)).collect::<ApiResult<Vec<_>>>()?;
            Audience::users(users)
        }
        (None, Some(true)) => Audience::Anyone,
        _ => {
            return Err(ApiError::InvalidRequest(
                "audience must be {\"users\": [...]} or {\"anyone\": true}".into(),
            ))
        }
    };
    let req = SendRequest {
        sender,
        kind,
        total_fen: body.total_amount,
        count: body.count,
        audience,
        greeting: body.greeting,
        expires_in_s: body.expires_in_s,
        request_id: request_id(&body.request_id)?,
    };
    let valid = s.engine.limits().validate_send(req).map_err(|e| ApiError::InvalidRequest(e.to_string()))?;
    let remaining = valid.total.fen();
    let count = valid.count;
    let summary = s.engine.send(valid).await?;
    Ok((StatusCode::CREATED, Json(PacketOut::new(summary, "active", remaining, count))))
}

#[utoipa::path(get, path = "/v1/packets/{id}",
    params(("id" = String, Path, pattern = "^[0-9]{1,19}$"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 200), ("cursor" = Option<String>, Query)),
    security(("bearer" = [])),
    responses((status = 200, body = PacketDetailsOut), (status = 400, response = inline(Problem)),
        (status = 401, response = inline(Problem)), (status = 404, response = inline(Problem)),
        (status = 503, response = inline(Problem))))]
pub async fn packet(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<Json<PacketDetailsOut>> {
    let id = packet_id(&id)?;
    let p = page(q)?;
    let after = cursor(&p.cursor)?;
    // A user token sees a packet only as its sender or one of its audience; to anyone else it
    // is a 404 like a packet that does not exist, so ids cannot be used to probe.
    let details = match caller.user() {
        None => s.engine.packet(id, after, p.limit).await?,
        Some(me) => s.engine.packet_seen_by(id, me.clone(), after, p.limit).await?,
    };
    Ok(Json(details.into()))
}

#[utoipa::path(post, path = "/v1/packets/{id}/grab", request_body = UserBody,
    params(("id" = String, Path, pattern = "^[0-9]{1,19}$")),
    security(("bearer" = [])),
    responses((status = 200, body = GrabOut), (status = 400, response = inline(Problem)),
        (status = 401, response = inline(Problem)), (status = 403, response = inline(Problem)),
        (status = 404, response = inline(Problem)), (status = 410, response = inline(Problem)),
        (status = 429, response = inline(Problem)), (status = 503, response = inline(Problem))))]
pub async fn grab(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    StrictJson(body): StrictJson<UserBody>,
) -> ApiResult<Json<GrabOut>> {
    let (id, user) = (packet_id(&id)?, user_id(&body.user)?);
    caller.may_act_as(&user)?;
    s.rate_limit(&user)?;
    let out = match s.engine.grab(id, user.clone()).await? {
        GrabReply::Grabbed { hold_expires_at_ms } => GrabOut {
            status: "grabbed",
            packet_id: id.to_string(),
            user: user.to_string(),
            hold_expires_at: Some(time(hold_expires_at_ms)),
            amount: None,
            at: None,
        },
        GrabReply::AlreadyOpened(c) => GrabOut {
            status: "opened",
            packet_id: id.to_string(),
            user: user.to_string(),
            hold_expires_at: None,
            amount: Some(c.amount_fen),
            at: Some(time(c.at_ms)),
        },
    };
    Ok(Json(out))
}

#[utoipa::path(post, path = "/v1/packets/{id}/open", request_body = UserBody,
    params(("id" = String, Path, pattern = "^[0-9]{1,19}$")),
    security(("bearer" = [])),
    responses((status = 200, body = ClaimOut), (status = 400, response = inline(Problem)),
        (status = 401, response = inline(Problem)), (status = 403, response = inline(Problem)),
        (status = 404, response = inline(Problem)), (status = 409, response = inline(Problem)),
        (status = 410, response = inline(Problem)), (status = 429, response = inline(Problem)),
        (status = 503, response = inline(Problem))))]
pub async fn open(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    StrictJson(body): StrictJson<UserBody>,
) -> ApiResult<Json<ClaimOut>> {
    let (id, user) = (packet_id(&id)?, user_id(&body.user)?);
    caller.may_act_as(&user)?;
    s.rate_limit(&user)?;
    Ok(Json(s.engine.open(id, user).await?.into()))
}

#[utoipa::path(post, path = "/v1/packets/{id}/claim", request_body = UserBody,
    params(("id" = String, Path, pattern = "^[0-9]{1,19}$")),
    security(("bearer" = [])),
    responses((status = 200, body = ClaimOut), (status = 400, response = inline(Problem)),
        (status = 401, response = inline(Problem)), (status = 403, response = inline(Problem)),
        (status = 404, response = inline(Problem)), (status = 410, response = inline(Problem)),
        (status = 429, response = inline(Problem)), (status = 503, response = inline(Problem))))]
pub async fn claim(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    StrictJson(body): StrictJson<UserBody>,
) -> ApiResult<Json<ClaimOut>> {
    let (id, user) = (packet_id(&id)?, user_id(&body.user)?);
    caller.may_act_as(&user)?;
    s.rate_limit(&user)?;
    Ok(Json(s.engine.claim(id, user).await?.into()))
}

#[utoipa::path(get, path = "/v1/users/{user}/received",
    params(("user" = String, Path, pattern = "^[A-Za-z0-9_.-]{1,64}$"),
        ("year" = Option<i32>, Query, minimum = 1970, maximum = 9999),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 200), ("cursor" = Option<String>, Query)),
    security(("bearer" = [])),
    responses((status = 200, body = ReceivedOut), (status = 400, response = inline(Problem)),
        (status = 401, response = inline(Problem)), (status = 403, response = inline(Problem)),
        (status = 503, response = inline(Problem))))]
pub async fn received(
    State(s): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<Json<ReceivedOut>> {
    let user = user_id(&user)?;
    caller.may_act_as(&user)?;
    let p = page(q)?;
    Ok(Json(s.engine.received(user, p.year, cursor(&p.cursor)?, p.limit).await?.into()))
}

#[utoipa::path(get, path = "/v1/users/{user}/sent",
    params(("user" = String, Path, pattern = "^[A-Za-z0-9_.-]{1,64}$"),
        ("year" = Option<i32>, Query, minimum = 1970, maximum = 9999),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 200), ("cursor" = Option<String>, Query)),
    security(("bearer" = [])),
    responses((status = 200, body = SentOut), (status = 400, response = inline(Problem)),
        (status = 401, response = inline(Problem)), (status = 403, response = inline(Problem)),
        (status = 503, response = inline(Problem))))]
pub async fn sent(
    State(s): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> ApiResult<Json<SentOut>> {
    let user = user_id(&user)?;
    caller.may_act_as(&user)?;
    let p = page(q)?;
    let before = match &p.cursor {
        None => None,
        Some(c) => Some(packet_id(c).map_err(|_| ApiError::InvalidRequest("invalid cursor".into()))?),
    };
    Ok(Json(s.engine.sent(user, p.year, before, p.limit).await?.into()))
}

#[utoipa::path(get, path = "/v1/admin/audit", security(("bearer" = [])),
    responses((status = 200, body = AuditOut), (status = 401, response = inline(Problem)),
        (status = 403, response = inline(Problem)), (status = 503, response = inline(Problem))))]
pub async fn audit(State(s): State<AppState>, _key: AdminKey) -> ApiResult<Json<AuditOut>> {
    Ok(Json(s.engine.audit().await?.into()))
}

#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[utoipa::path(get, path = "/readyz",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
pub async fn readyz(State(s): State<AppState>) -> (StatusCode, Json<Health>) {
    if s.engine.status().iter().all(|set| set.ready) {
        (StatusCode::OK, Json(Health { status: "ready" }))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(Health { status: "not ready" }))
    }
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}
