//! Router tests through `tower::ServiceExt::oneshot`: the HTTP contract of DESIGN.md §4 where a
//! socket adds nothing — credentials, strict bodies and paths, problem documents, the open
//! endpoints — and one flow through a real engine on a temporary data dir. The black-box
//! suite in `crates/hongbao/tests` runs the same contract against the real binary.

use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use hongbao_api::{router, AppState, Keys, BODY_BYTES_MAX};
use hongbao_core::SystemClock;
use hongbao_engine::{Engine, EngineConfig};
use serde_json::{json, Value};
use tower::ServiceExt;

const SERVICE: &str = "hb_svc_test_service_key";
const ADMIN: &str = "hb_adm_test_admin_key";

/// A well-formed packet id (set 0) that no test creates.
const NO_SUCH_PACKET: &str = "4294967296";

/// Largest reply body read back; every reply here is far smaller.
const REPLY_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A router over a fresh engine. The temporary dir lives as long as the harness.
struct Harness {
    app: Router,
    engine: Engine,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn start() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::start(EngineConfig::new(dir.path().to_path_buf()), Arc::new(SystemClock))
            .expect("engine");
        let keys = Keys { service: SERVICE.as_bytes().to_vec(), admin: ADMIN.as_bytes().to_vec() };
        let app = router(AppState::new(engine.clone(), keys));
        Harness { app, engine, _dir: dir }
    }

    async fn stop(self) {
        self.engine.shutdown().await;
    }

    /// Sends one request; `body` is sent as `application/json` when given.
    async fn call(&self, method: Method, path: &str, key: Option<&str>, body: Option<Value>) -> Reply {
        let bytes = body.map(|b| serde_json::to_vec(&b).expect("json"));
        self.raw(method, path, key, Some("application/json"), bytes).await
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(key) = key {
            req = req.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        if let (Some(ct), true) = (content_type, body.is_some()) {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let req = req.body(body.map(Body::from).unwrap_or_else(Body::empty)).expect("request");
        let res = self.app.clone().oneshot(req).await.expect("infallible");
        let status = res.status();
        let content_type =
            res.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let retry_after =
            res.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap_or("").to_string());
        let server_timing = res.headers().get("server-timing").map(|v| v.to_str().unwrap_or("").to_string());
        let bytes = to_bytes(res.into_body(), REPLY_BYTES_MAX).await.expect("reply body");
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply { status, content_type, retry_after, server_timing, text, json }
    }
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    content_type: String,
    retry_after: Option<String>,
    server_timing: Option<String>,
    text: String,
    json: Value,
}

impl Reply {
    /// Asserts a problem document with this status and code, and returns it.
    #[track_caller]
    fn problem(&self, what: &str, status: u16, code: &str) -> &Value {
        assert_eq!(self.status.as_u16(), status, "{what}: {}", self.text);
        assert_eq!(self.content_type, "application/problem+json", "{what}");
        let p = &self.json;
        assert_eq!(p["code"], code, "{what}: {p}");
        assert_eq!(p["status"], status, "{what}: {p}");
        assert!(p["type"].is_string() && p["title"].is_string(), "{what}: {p}");
        assert!(p["detail"].as_str().is_some_and(|d| !d.is_empty()), "{what}: {p}");
        p
    }

    #[track_caller]
    fn ok(&self, what: &str, status: u16) -> &Value {
        assert_eq!(self.status.as_u16(), status, "{what}: {}", self.text);
        assert!(self.content_type.starts_with("application/json"), "{what}: {}", self.content_type);
        &self.json
    }
}

/// An RFC 3339 UTC time with milliseconds: `2026-01-01T00:00:00.000Z`.
#[track_caller]
fn assert_time(v: &Value) {
    let s = v.as_str().unwrap_or_else(|| panic!("not a time string: {v}"));
    assert!(s.len() == 24 && s.ends_with('Z') && s.as_bytes()[19] == b'.', "not RFC 3339 UTC with ms: {s}");
    assert!(chrono::DateTime::parse_from_rfc3339(s).is_ok(), "not RFC 3339: {s}");
}

/// `Server-Timing: app;dur=MS.UUU`: the server's own time for the request, in milliseconds to
/// the microsecond, under a minute.
#[track_caller]
fn assert_server_timing(r: &Reply) {
    let v = r.server_timing.as_deref().unwrap_or_else(|| panic!("no Server-Timing: {r:?}"));
    let ms = v.strip_prefix("app;dur=").unwrap_or_else(|| panic!("Server-Timing {v}"));
    let (whole, frac) = ms.split_once('.').unwrap_or_else(|| panic!("Server-Timing {v}"));
    assert!(frac.len() == 3 && frac.bytes().all(|b| b.is_ascii_digit()), "Server-Timing {v}");
    let ms: f64 = ms.parse().unwrap_or_else(|_| panic!("Server-Timing {v}"));
    assert!(whole.parse::<u64>().is_ok() && ms < 60_000.0, "Server-Timing {v}");
}

#[tokio::test]
async fn open_endpoints_need_no_key() {
    let h = Harness::start();

    let r = h.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.ok("healthz", 200)["status"], "ok");
    assert_server_timing(&r);
    h.call(Method::GET, "/readyz", None, None).await.ok("readyz", 200);

    let r = h.call(Method::GET, "/docs", None, None).await;
    assert_eq!(r.status, StatusCode::OK, "docs");
    assert!(r.text.contains("<html") || r.text.contains("<!doctype"), "docs is a page: {}", r.text);

    let r = h.call(Method::GET, "/metrics", None, None).await;
    assert_eq!(r.status, StatusCode::OK, "metrics");
    assert!(r.content_type.starts_with("text/plain"), "metrics: {}", r.content_type);
    // The scrape before this one was counted, and the queue depth is reported per set.
    assert!(r.text.contains("http_requests_total"), "metrics: {}", r.text);
    assert!(r.text.contains("http_request_duration_seconds"), "metrics: {}", r.text);
    assert!(r.text.contains("hongbao_set_queue_depth{set=\"0\"}"), "metrics: {}", r.text);
    // On the default store (SQLite behind its journal), how far the fold trails, per set.
    assert!(r.text.contains("hongbao_store_unapplied_commits{set=\"0\"}"), "metrics: {}", r.text);
    // A quiet server's fold does not give way to anything.
    assert!(r.text.contains("hongbao_store_fold_giving_way{set=\"0\"} 0"), "metrics: {}", r.text);
    // The CPU the threads used, by what they do: the set and its fold run here as in a server.
    for kind in ["tokio", "query", "set", "fold", "checkpoint", "other"] {
        let line = format!("hongbao_cpu_seconds_total{{threads=\"{kind}\"}} ");
        assert!(r.text.lines().any(|l| l.starts_with(&line)), "metrics: {}", r.text);
    }

    h.stop().await;
}

/// Regression: the `method` label took any method a client made up, one metric series each.
#[tokio::test]
async fn metrics_label_a_made_up_method_as_other() {
    let h = Harness::start();
    let brew = Method::from_bytes(b"BREWCOFFEE").expect("a valid extension method");
    let r = h.call(brew, "/healthz", None, None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    let m = h.call(Method::GET, "/metrics", None, None).await;
    assert!(m.text.contains("method=\"OTHER\""), "metrics: {}", m.text);
    assert!(!m.text.contains("BREWCOFFEE"), "metrics: {}", m.text);
    h.stop().await;
}

#[tokio::test]
async fn openapi_lists_every_path_of_the_contract() {
    let h = Harness::start();
    let r = h.call(Method::GET, "/openapi.json", None, None).await;
    let doc = r.ok("openapi.json", 200);
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with('3')), "{doc}");
    let paths = doc["paths"].as_object().expect("paths");
    let want: [(&str, &str); 14] = [
        ("/v1/wallets/{user}/deposit", "post"),
        ("/v1/wallets/{user}/withdraw", "post"),
        ("/v1/wallets/{user}", "get"),
        ("/v1/wallets/{user}/entries", "get"),
        ("/v1/packets", "post"),
        ("/v1/packets/{id}", "get"),
        ("/v1/packets/{id}/grab", "post"),
        ("/v1/packets/{id}/open", "post"),
        ("/v1/packets/{id}/claim", "post"),
        ("/v1/users/{user}/received", "get"),
        ("/v1/users/{user}/sent", "get"),
        ("/v1/admin/audit", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    ];
    for (path, method) in want {
        assert!(paths.get(path).and_then(|p| p.get(method)).is_some(), "openapi.json lacks {method} {path}");
    }
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!((scheme["type"].as_str(), scheme["scheme"].as_str()), (Some("http"), Some("bearer")), "{doc}");
    h.stop().await;
}

#[tokio::test]
async fn credentials_are_checked_before_anything_else() {
    let h = Harness::start();
    let deposit = Some(json!({"amount": 100, "request_id": "r1"}));
    let user = Some(json!({"user": "bob"}));
    // Every protected route, with and without a body: no key, a wrong key and a key in the
    // wrong scheme are all 401, whatever the body.
    let routes: [(Method, String, Option<Value>); 12] = [
        (Method::POST, "/v1/wallets/alice/deposit".into(), deposit.clone()),
        (Method::POST, "/v1/wallets/alice/withdraw".into(), deposit.clone()),
        (Method::GET, "/v1/wallets/alice".into(), None),
        (Method::GET, "/v1/wallets/alice/entries".into(), None),
        (Method::POST, "/v1/packets".into(), Some(json!({}))),
        (Method::GET, format!("/v1/packets/{NO_SUCH_PACKET}"), None),
        (Method::POST, format!("/v1/packets/{NO_SUCH_PACKET}/grab"), user.clone()),
        (Method::POST, format!("/v1/packets/{NO_SUCH_PACKET}/open"), user.clone()),
        (Method::POST, format!("/v1/packets/{NO_SUCH_PACKET}/claim"), user.clone()),
        (Method::GET, "/v1/users/alice/received".into(), None),
        (Method::GET, "/v1/users/alice/sent".into(), None),
        (Method::GET, "/v1/admin/audit".into(), None),
    ];
    for (method, path, body) in routes {
        for (what, key) in [("no key", None), ("wrong key", Some("hb_svc_wrong")), ("empty key", Some(""))] {
            let r = h.call(method.clone(), &path, key, body.clone()).await;
            r.problem(&format!("{method} {path} with {what}"), 401, "unauthorized");
            // Refusals are timed too: the header comes from the layer around every route.
            assert_server_timing(&r);
        }
        let req = Request::builder()
            .method(method.clone())
            .uri(&path)
            .header(header::AUTHORIZATION, format!("Basic {SERVICE}"))
            .body(Body::empty())
            .expect("request");
        let res = h.app.clone().oneshot(req).await.expect("infallible");
        assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{method} {path} with a Basic credential");
    }

    // The service key lacks the admin scope: deposits and the audit are 403 `forbidden`.
    let r = h.call(Method::POST, "/v1/wallets/alice/deposit", Some(SERVICE), deposit).await;
    r.problem("deposit with the service key", 403, "forbidden");
    let r = h.call(Method::GET, "/v1/admin/audit", Some(SERVICE), None).await;
    r.problem("audit with the service key", 403, "forbidden");

    h.stop().await;
}

#[tokio::test]
async fn every_bad_body_is_a_400_invalid_request() {
    let h = Harness::start();
    let send = |patch: Value| {
        let mut body = json!({
            "sender": "alice", "kind": "lucky", "total_amount": 1000, "count": 3,
            "audience": {"users": ["bob", "carol", "dave"]}, "request_id": "s1",
        });
        for (k, v) in patch.as_object().expect("object") {
            if v.is_null() {
                body.as_object_mut().expect("object").remove(k);
            } else {
                body[k] = v.clone();
            }
        }
        serde_json::to_vec(&body).expect("json")
    };
    let deposit = "/v1/wallets/alice/deposit";
    let grab = format!("/v1/packets/{NO_SUCH_PACKET}/grab");
    let json = Some("application/json");
    let cases: Vec<(&str, &str, Option<&str>, Vec<u8>)> = vec![
        ("not JSON", deposit, json, b"{amount: 1".to_vec()),
        ("empty body", deposit, json, Vec::new()),
        ("trailing garbage", deposit, json, br#"{"amount": 1, "request_id": "r"} x"#.to_vec()),
        ("a JSON array", deposit, json, b"[1, 2]".to_vec()),
        ("float amount", deposit, json, br#"{"amount": 1.5, "request_id": "r"}"#.to_vec()),
        ("float that is whole", deposit, json, br#"{"amount": 100.0, "request_id": "r"}"#.to_vec()),
        ("amount in exponent form", deposit, json, br#"{"amount": 1e2, "request_id": "r"}"#.to_vec()),
        (
            "amount above i64",
            deposit,
            json,
            br#"{"amount": 99999999999999999999, "request_id": "r"}"#.to_vec(),
        ),
        ("amount as a string", deposit, json, br#"{"amount": "100", "request_id": "r"}"#.to_vec()),
        ("amount zero", deposit, json, br#"{"amount": 0, "request_id": "r"}"#.to_vec()),
        ("amount negative", deposit, json, br#"{"amount": -5, "request_id": "r"}"#.to_vec()),
        (
            "amount above the transfer limit",
            deposit,
            json,
            br#"{"amount": 9223372036854775807, "request_id": "r"}"#.to_vec(),
        ),
        ("missing request_id", deposit, json, br#"{"amount": 100}"#.to_vec()),
        ("empty request_id", deposit, json, br#"{"amount": 100, "request_id": ""}"#.to_vec()),
        ("unknown field", deposit, json, br#"{"amount": 100, "request_id": "r", "memo": "x"}"#.to_vec()),
        ("null amount", deposit, json, br#"{"amount": null, "request_id": "r"}"#.to_vec()),
        ("no content type", deposit, None, br#"{"amount": 100, "request_id": "r"}"#.to_vec()),
        ("text/plain", deposit, Some("text/plain"), br#"{"amount": 100, "request_id": "r"}"#.to_vec()),
        ("form", deposit, Some("application/x-www-form-urlencoded"), b"amount=100&request_id=r".to_vec()),
        (
            "bad user id in the path",
            "/v1/wallets/al%20ice/deposit",
            json,
            br#"{"amount": 100, "request_id": "r"}"#.to_vec(),
        ),
        ("grab without user", &grab, json, b"{}".to_vec()),
        ("grab with a bad user id", &grab, json, br#"{"user": "b b"}"#.to_vec()),
        ("grab with user a number", &grab, json, br#"{"user": 7}"#.to_vec()),
        ("grab on a bad packet id", "/v1/packets/abc/grab", json, br#"{"user": "bob"}"#.to_vec()),
        ("grab on packet id 0", "/v1/packets/0/grab", json, br#"{"user": "bob"}"#.to_vec()),
        ("claim on a negative packet id", "/v1/packets/-1/claim", json, br#"{"user": "bob"}"#.to_vec()),
        (
            "open on a huge packet id",
            "/v1/packets/99999999999999999999/open",
            json,
            br#"{"user": "bob"}"#.to_vec(),
        ),
        ("send: kind unknown", "/v1/packets", json, send(json!({"kind": "big"}))),
        ("send: float total", "/v1/packets", json, send(json!({"total_amount": 10.5}))),
        ("send: count zero", "/v1/packets", json, send(json!({"count": 0}))),
        ("send: count float", "/v1/packets", json, send(json!({"count": 2.0}))),
        ("send: count above audience", "/v1/packets", json, send(json!({"count": 4}))),
        ("send: total below count", "/v1/packets", json, send(json!({"total_amount": 2}))),
        (
            "send: equal not divisible",
            "/v1/packets",
            json,
            send(json!({"kind": "equal", "total_amount": 1000})),
        ),
        ("send: no audience", "/v1/packets", json, send(json!({"audience": null}))),
        ("send: empty audience object", "/v1/packets", json, send(json!({"audience": {}}))),
        ("send: anyone false", "/v1/packets", json, send(json!({"audience": {"anyone": false}}))),
        (
            "send: both audiences",
            "/v1/packets",
            json,
            send(json!({"audience": {"users": ["bob"], "anyone": true}})),
        ),
        ("send: empty user list", "/v1/packets", json, send(json!({"audience": {"users": []}}))),
        (
            "send: bad user in audience",
            "/v1/packets",
            json,
            send(json!({"audience": {"users": ["bob", "x y"]}})),
        ),
        ("send: audience unknown key", "/v1/packets", json, send(json!({"audience": {"group": "g1"}}))),
        ("send: bad sender", "/v1/packets", json, send(json!({"sender": ""}))),
        ("send: expiry negative", "/v1/packets", json, send(json!({"expires_in_s": -1}))),
        ("send: expiry a year", "/v1/packets", json, send(json!({"expires_in_s": 31_536_000}))),
        ("send: missing request_id", "/v1/packets", json, send(json!({"request_id": null}))),
        ("send: unknown field", "/v1/packets", json, send(json!({"currency": "CNY"}))),
    ];
    for (what, path, content_type, body) in cases {
        let r = h.raw(Method::POST, path, Some(ADMIN), content_type, Some(body)).await;
        r.problem(what, 400, "invalid_request");
    }
    h.stop().await;
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_400_not_a_413() {
    let h = Harness::start();
    let pad = "x".repeat(4 * 1024 * 1024);
    let body = format!(r#"{{"amount": 100, "request_id": "r", "pad": "{pad}"}}"#).into_bytes();
    assert!(body.len() > BODY_BYTES_MAX);
    let r = h
        .raw(Method::POST, "/v1/wallets/alice/deposit", Some(ADMIN), Some("application/json"), Some(body))
        .await;
    r.problem("4 MiB body", 400, "invalid_request");

    // A deposit of `body_bytes` spaces, announced up front by Content-Length.
    let deposit = |body_bytes: usize| {
        Request::builder()
            .method(Method::POST)
            .uri("/v1/wallets/alice/deposit")
            .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, body_bytes)
            .body(Body::from(vec![b' '; body_bytes]))
            .expect("request")
    };
    // Announced up front by Content-Length, it is refused the same way.
    let res = h.app.clone().oneshot(deposit(4 * 1024 * 1024)).await.expect("infallible");
    assert_eq!(res.status(), StatusCode::BAD_REQUEST, "4 MiB body with Content-Length");
    // Regression: the body was left unread and the connection closed under a client still
    // writing it, which saw a reset instead of the 400. It is read to its end now, so the
    // connection carries the next request.
    assert_eq!(res.headers().get(header::CONNECTION), None, "a body read to its end keeps the connection");

    // Far over the limit, the rest is left unread: the reply says the connection closes, and
    // a keep-alive client does not send its next request into a closing connection.
    let res = h.app.clone().oneshot(deposit(24 * 1024 * 1024)).await.expect("infallible");
    assert_eq!(res.status(), StatusCode::BAD_REQUEST, "24 MiB body");
    assert_eq!(
        res.headers().get(header::CONNECTION).and_then(|v| v.to_str().ok()),
        Some("close"),
        "a 400 for an unread body closes the connection"
    );
    h.stop().await;
}

#[tokio::test]
async fn bad_queries_are_400_and_unknown_routes_404() {
    let h = Harness::start();
    let packet = format!("/v1/packets/{NO_SUCH_PACKET}");
    let cases = [
        ("limit zero", "/v1/wallets/alice/entries?limit=0".to_string()),
        ("limit above the page maximum", "/v1/wallets/alice/entries?limit=201".to_string()),
        ("limit not a number", "/v1/wallets/alice/entries?limit=ten".to_string()),
        ("cursor not a number", "/v1/wallets/alice/entries?cursor=abc".to_string()),
        ("packet cursor not a number", format!("{packet}?cursor=x")),
        ("year not a number", "/v1/users/alice/received?year=last".to_string()),
        ("year out of range", "/v1/users/alice/sent?year=12".to_string()),
        ("sent cursor not a packet id", "/v1/users/alice/sent?cursor=-3".to_string()),
        ("bad user in a wallet path", "/v1/wallets/a%2Fb".to_string()),
        ("bad user in a history path", "/v1/users/%C3%A9/received".to_string()),
        ("bad packet id", "/v1/packets/12ab".to_string()),
    ];
    for (what, path) in cases {
        h.call(Method::GET, &path, Some(SERVICE), None).await.problem(what, 400, "invalid_request");
    }

    for (method, path) in
        [(Method::GET, "/v2/wallets/alice"), (Method::GET, "/"), (Method::DELETE, "/v1/packets")]
    {
        let r = h.call(method.clone(), path, Some(SERVICE), None).await;
        r.problem(&format!("{method} {path}"), 404, "not_found");
    }
    let r = h.call(Method::GET, &packet, Some(SERVICE), None).await;
    r.problem("a packet that does not exist", 404, "not_found");
    h.stop().await;
}

#[tokio::test]
async fn deposit_send_grab_open_claim_and_read_back() {
    let h = Harness::start();
    let (svc, adm) = (Some(SERVICE), Some(ADMIN));

    let r = h
        .call(
            Method::POST,
            "/v1/wallets/alice/deposit",
            adm,
            Some(json!({"amount": 10_000, "request_id": "d1"})),
        )
        .await;
    assert_eq!(r.ok("deposit", 200), &json!({"user": "alice", "balance": 10_000}));
    // The same request again moves nothing; another body under the same id is a conflict.
    let r = h
        .call(
            Method::POST,
            "/v1/wallets/alice/deposit",
            adm,
            Some(json!({"amount": 10_000, "request_id": "d1"})),
        )
        .await;
    assert_eq!(r.ok("repeated deposit", 200)["balance"], 10_000);
    let r = h
        .call(Method::POST, "/v1/wallets/alice/deposit", adm, Some(json!({"amount": 5, "request_id": "d1"})))
        .await;
    r.problem("deposit reusing a request_id", 409, "idempotency_conflict");
    let r = h
        .call(Method::POST, "/v1/wallets/bob/withdraw", svc, Some(json!({"amount": 1, "request_id": "w1"})))
        .await;
    r.problem("withdraw from an empty wallet", 409, "insufficient_funds");

    let send = json!({
        "sender": "alice", "kind": "lucky", "total_amount": 1_000, "count": 2,
        "audience": {"users": ["bob", "carol", "dave"]}, "greeting": "恭喜发财", "request_id": "s1",
    });
    let r = h.call(Method::POST, "/v1/packets", svc, Some(send)).await;
    let p = r.ok("send", 201).clone();
    let id = p["id"].as_str().expect("id is a string").to_string();
    assert!(id.bytes().all(|b| b.is_ascii_digit()), "{p}");
    assert_eq!(
        (p["sender"].as_str(), p["kind"].as_str(), p["status"].as_str()),
        (Some("alice"), Some("lucky"), Some("active"))
    );
    assert_eq!((p["total_amount"].as_i64(), p["count"].as_i64()), (Some(1_000), Some(2)));
    assert_eq!((p["remaining_amount"].as_i64(), p["remaining_count"].as_i64()), (Some(1_000), Some(2)));
    assert_eq!(p["greeting"], "恭喜发财");
    assert_time(&p["created_at"]);
    assert_time(&p["expires_at"]);

    let body = |user: &str| Some(json!({ "user": user }));
    let r = h.call(Method::POST, &format!("/v1/packets/{id}/claim"), svc, body("eve")).await;
    r.problem("claim outside the audience", 403, "not_eligible");
    let r = h.call(Method::POST, &format!("/v1/packets/{id}/open"), svc, body("carol")).await;
    r.problem("open before grab", 409, "not_grabbed");

    let r = h.call(Method::POST, &format!("/v1/packets/{id}/grab"), svc, body("bob")).await;
    let g = r.ok("grab", 200);
    assert_eq!(
        (g["status"].as_str(), g["packet_id"].as_str(), g["user"].as_str()),
        (Some("grabbed"), Some(id.as_str()), Some("bob"))
    );
    assert_time(&g["hold_expires_at"]);
    let r = h.call(Method::POST, &format!("/v1/packets/{id}/open"), svc, body("bob")).await;
    let bob = r.ok("open", 200).clone();
    assert_eq!((bob["packet_id"].as_str(), bob["user"].as_str()), (Some(id.as_str()), Some("bob")));
    let bob_fen = bob["amount"].as_i64().expect("amount");
    assert!((1..1_000).contains(&bob_fen), "{bob}");
    assert_time(&bob["at"]);
    // A grab after the open says so, with the amount.
    let r = h.call(Method::POST, &format!("/v1/packets/{id}/grab"), svc, body("bob")).await;
    let g = r.ok("grab after open", 200);
    assert_eq!((g["status"].as_str(), g["amount"].as_i64()), (Some("opened"), Some(bob_fen)));

    let r = h.call(Method::POST, &format!("/v1/packets/{id}/claim"), svc, body("carol")).await;
    let carol = r.ok("claim", 200).clone();
    assert_eq!(carol["amount"].as_i64(), Some(1_000 - bob_fen), "the last share takes the rest");
    let r = h.call(Method::POST, &format!("/v1/packets/{id}/claim"), svc, body("carol")).await;
    assert_eq!(r.ok("claim again", 200), &carol, "asked again, the same claim again");
    let r = h.call(Method::POST, &format!("/v1/packets/{id}/claim"), svc, body("dave")).await;
    r.problem("claim on a spent packet", 410, "packet_exhausted");
    // The closing was published before carol's reply: dave was turned away without the set,
    // and the metrics count it.
    assert!(h.engine.closed_refusals() >= 1, "dave answered from the closed packets");
    let m = h.call(Method::GET, "/metrics", None, None).await;
    assert!(m.text.lines().any(|l| l.starts_with("hongbao_closed_refusals_total ")), "metrics: {}", m.text);

    let r = h.call(Method::GET, &format!("/v1/packets/{id}?limit=1"), svc, None).await;
    let d = r.ok("packet details", 200).clone();
    assert_eq!((d["remaining_amount"].as_i64(), d["remaining_count"].as_i64()), (Some(0), Some(0)), "{d}");
    assert_eq!(d["claims"].as_array().map(Vec::len), Some(1), "{d}");
    assert!(d["next_cursor"].is_string(), "a string cursor while more remain: {d}");
    assert!(d["best_luck"]["amount"].as_i64() == Some(bob_fen.max(1_000 - bob_fen)), "{d}");
    let r = h
        .call(
            Method::GET,
            &format!("/v1/packets/{id}?limit=1&cursor={}", d["next_cursor"].as_str().unwrap()),
            svc,
            None,
        )
        .await;
    let d2 = r.ok("packet details, page 2", 200);
    assert_eq!(d2["claims"].as_array().map(Vec::len), Some(1), "{d2}");
    assert_ne!(d2["claims"][0]["user"], d["claims"][0]["user"], "pages do not repeat");

    for (user, balance) in [("alice", 9_000), ("bob", bob_fen), ("carol", 1_000 - bob_fen), ("dave", 0)] {
        let r = h.call(Method::GET, &format!("/v1/wallets/{user}"), svc, None).await;
        assert_eq!(r.ok("wallet", 200), &json!({"user": user, "balance": balance}));
    }
    let r = h.call(Method::GET, "/v1/wallets/alice/entries", svc, None).await;
    let e = r.ok("entries", 200);
    let kinds: Vec<&str> =
        e["entries"].as_array().expect("entries").iter().filter_map(|x| x["kind"].as_str()).collect();
    assert_eq!(kinds.len(), 2, "a deposit and a send: {e}");
    assert!(
        e["entries"].as_array().unwrap().iter().all(|x| x["amount"].as_i64().is_some_and(|a| a > 0)),
        "{e}"
    );

    let r = h.call(Method::GET, "/v1/users/bob/received", svc, None).await;
    let rec = r.ok("received", 200);
    assert_eq!((rec["count"].as_i64(), rec["total_amount"].as_i64()), (Some(1), Some(bob_fen)), "{rec}");
    assert_eq!(rec["items"][0]["packet_id"].as_str(), Some(id.as_str()), "{rec}");
    let r = h.call(Method::GET, "/v1/users/alice/sent", svc, None).await;
    let sent = r.ok("sent", 200);
    assert_eq!((sent["count"].as_i64(), sent["total_amount"].as_i64()), (Some(1), Some(1_000)), "{sent}");
    assert_eq!(sent["items"][0]["remaining_count"].as_i64(), Some(0), "{sent}");

    let r = h.call(Method::GET, "/v1/admin/audit", adm, None).await;
    let a = r.ok("audit", 200);
    assert_eq!(a["ok"], true, "{a}");
    assert_eq!((a["deposits"].as_i64(), a["withdrawals"].as_i64()), (Some(10_000), Some(0)), "{a}");
    assert_eq!(
        (a["balances"].as_i64(), a["escrow"].as_i64(), a["in_flight"].as_i64()),
        (Some(10_000), Some(0), Some(0)),
        "{a}"
    );

    h.stop().await;
}

#[tokio::test]
async fn a_stopping_engine_is_503_with_retry_after_and_not_ready() {
    let h = Harness::start();
    h.engine.shutdown().await;

    let r = h
        .call(
            Method::POST,
            "/v1/wallets/alice/deposit",
            Some(ADMIN),
            Some(json!({"amount": 1, "request_id": "d"})),
        )
        .await;
    r.problem("deposit while stopping", 503, "overloaded");
    assert_eq!(r.retry_after.as_deref(), Some("1"), "503 carries Retry-After");
    let r = h.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "readyz while stopping: {}", r.text);
    // Liveness is not readiness: the process still answers.
    h.call(Method::GET, "/healthz", None, None).await.ok("healthz while stopping", 200);
}
