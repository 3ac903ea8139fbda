//! User tokens and access rules (DESIGN.md §2 item 8), against the real binary: a user token
//! acts only as its own user, sees a packet only as its sender or audience, never moves money
//! in or out; bad, expired or long-lived tokens are 401; keys work as before; secrets stay out
//! of the logs; oversized headers are refused without harm.
//!
//! Tokens are minted here with `jsonwebtoken`, the way an app's backend would, signed with the
//! secret the server is started with (`--token-secret`).

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, EncodingKey, Header};
use reqwest::Method;
use serde_json::{json, Value};
use support::*;

/// The secret every server here signs tokens with (at least 32 bytes).
const SECRET: &str = "test-token-secret-6d2f0b7c41a9e385d1c0";
const HOUR_S: i64 = 3600;

fn now_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs() as i64
}

/// A token signed with `secret` carrying `claims` as they are.
fn mint_claims(secret: &str, claims: &Value) -> String {
    hongbao_api::install_token_crypto();
    encode(&Header::default(), claims, &EncodingKey::from_secret(secret.as_bytes())).expect("mint a token")
}

/// A token for `sub` issued `iat_s` and expiring `exp_s` seconds from now.
fn mint(sub: &str, iat_s: i64, exp_s: i64) -> String {
    let now = now_s();
    mint_claims(SECRET, &json!({ "sub": sub, "iat": now + iat_s, "exp": now + exp_s }))
}

/// A valid one-hour token for `sub`.
fn token(sub: &str) -> String {
    mint(sub, 0, HOUR_S)
}

fn with_tokens() -> Opts {
    Opts { args: vec!["--token-secret".into(), SECRET.into()], ..Opts::default() }
}

async fn with_tokens_server() -> TestServer {
    TestServer::start(with_tokens()).await
}

async fn call(api: &Api, method: Method, path: &str, credential: &str, body: Option<&Value>) -> Reply {
    api.call(method, path, Some(credential), body).await
}

fn assert_ok(what: &str, r: &Reply, want: u16) {
    assert_eq!(r.status, want, "{what}: {}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_claims_reads_and_sends_as_its_own_user_only() {
    let server = with_tokens_server().await;
    server.deposit_ok("carol", 1_000).await;
    let id = server.send_ok("carol", "equal", 200, 2, users(&["alice", "bob"])).await;
    let alice = token("alice");

    // Claims: as itself, yes; as another member of the audience, no.
    let as_bob = json!({ "user": "bob" });
    for verb in ["grab", "open", "claim"] {
        let r = call(&server, Method::POST, &format!("/v1/packets/{id}/{verb}"), &alice, Some(&as_bob)).await;
        assert_problem_reply(&format!("alice's token {verb}s for bob"), &r, 403, "forbidden");
    }
    let r = call(
        &server,
        Method::POST,
        &format!("/v1/packets/{id}/claim"),
        &alice,
        Some(&json!({"user": "alice"})),
    )
    .await;
    assert_ok("alice's token claims for alice", &r, 200);
    assert_eq!(
        (r.body["user"].as_str(), r.body["amount"].as_i64()),
        (Some("alice"), Some(100)),
        "{}",
        r.body
    );
    assert_eq!(server.balance("bob").await, 0, "nothing was paid to bob");

    // Reads: its own wallet, entries and history, yes; anyone else's, no.
    let r = call(&server, Method::GET, "/v1/wallets/alice", &alice, None).await;
    assert_ok("alice's wallet with alice's token", &r, 200);
    assert_eq!(r.body["balance"].as_i64(), Some(100), "{}", r.body);
    let r = call(&server, Method::GET, "/v1/wallets/alice/entries", &alice, None).await;
    assert_ok("alice's entries", &r, 200);
    assert_eq!(r.body["entries"].as_array().map(Vec::len), Some(1), "{}", r.body);
    let r = call(&server, Method::GET, "/v1/users/alice/received", &alice, None).await;
    assert_ok("alice's received", &r, 200);
    assert_eq!(r.body["count"].as_i64(), Some(1), "{}", r.body);
    let r = call(&server, Method::GET, "/v1/users/alice/sent", &alice, None).await;
    assert_ok("alice's sent", &r, 200);
    for path in
        ["/v1/wallets/carol", "/v1/wallets/carol/entries", "/v1/users/carol/received", "/v1/users/carol/sent"]
    {
        let r = call(&server, Method::GET, path, &alice, None).await;
        assert_problem_reply(&format!("GET {path} with alice's token"), &r, 403, "forbidden");
    }

    // Sends: as itself, from its own wallet; as another user, no, and no money moves.
    let send = |sender: &str| {
        json!({
            "sender": sender, "kind": "lucky", "total_amount": 50, "count": 1,
            "audience": users(&["dave"]), "request_id": rid("tok-send"),
        })
    };
    let r = call(&server, Method::POST, "/v1/packets", &alice, Some(&send("carol"))).await;
    assert_problem_reply("alice's token sends as carol", &r, 403, "forbidden");
    assert_eq!(server.balance("carol").await, 800, "carol paid nothing for a refused send");
    let r = call(&server, Method::POST, "/v1/packets", &alice, Some(&send("alice"))).await;
    assert_ok("alice's token sends as alice", &r, 201);
    assert_eq!(r.body["sender"].as_str(), Some("alice"), "{}", r.body);
    assert_eq!(server.balance("alice").await, 50);
    assert_audit_ok(&server.settle().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_expired_foreign_and_long_lived_tokens_are_unauthorized() {
    let server = with_tokens_server().await;
    server.deposit_ok("carol", 1_000).await;
    let id = server.send_ok("carol", "lucky", 300, 3, anyone()).await;
    let now = now_s();
    let cases: Vec<(&str, String)> = vec![
        ("expired an hour ago", mint("alice", -2 * HOUR_S, -HOUR_S)),
        ("expired two minutes ago (beyond the leeway)", mint("alice", -HOUR_S, -120)),
        ("signed with another secret", {
            let claims = json!({ "sub": "alice", "iat": now, "exp": now + HOUR_S });
            mint_claims("another-secret-of-at-least-32-bytes!!", &claims)
        }),
        ("lives 25 hours", mint("alice", 0, 25 * HOUR_S)),
        ("lives a year, issued to look young", mint("alice", 364 * 24 * HOUR_S, 365 * 24 * HOUR_S)),
        ("no exp", mint_claims(SECRET, &json!({ "sub": "alice", "iat": now }))),
        ("no iat", mint_claims(SECRET, &json!({ "sub": "alice", "exp": now + HOUR_S }))),
        ("no sub", mint_claims(SECRET, &json!({ "iat": now, "exp": now + HOUR_S }))),
        ("exp a string", mint_claims(SECRET, &json!({ "sub": "alice", "iat": now, "exp": "never" }))),
        ("sub not a user id", mint("a b", 0, HOUR_S)),
        ("signature cut off", {
            let t = token("alice");
            t[..t.rfind('.').expect("a JWT") + 1].to_string()
        }),
        ("three dotted parts of nothing", "a.b.c".to_string()),
    ];
    let claim = json!({ "user": "alice" });
    for (what, bad) in &cases {
        let r = call(&server, Method::POST, &format!("/v1/packets/{id}/claim"), bad, Some(&claim)).await;
        assert_problem_reply(&format!("claim with a token that is {what}"), &r, 401, "unauthorized");
        let r = call(&server, Method::GET, "/v1/wallets/alice", bad, None).await;
        assert_problem_reply(&format!("wallet with a token that is {what}"), &r, 401, "unauthorized");
    }
    assert_eq!(server.balance("alice").await, 0, "no bad token was paid");

    // The same good token is refused by a server without a token secret: tokens are off.
    let plain = TestServer::start(Opts::default()).await;
    let r = call(&plain, Method::GET, "/v1/wallets/alice", &token("alice"), None).await;
    assert_problem_reply("a token on a server without a secret", &r, 401, "unauthorized");
    // And taken by the one with it, so the cases above failed for their fault alone.
    let r = call(&server, Method::GET, "/v1/wallets/alice", &token("alice"), None).await;
    assert_ok("a good token", &r, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_shows_to_its_sender_and_audience_only() {
    let server = with_tokens_server().await;
    server.deposit_ok("carol", 1_000).await;
    let group = server.send_ok("carol", "lucky", 300, 2, users(&["alice", "bob"])).await;
    let open = server.send_ok("carol", "lucky", 300, 2, anyone()).await;
    server.claim_ok(&group, "bob").await;
    let unknown = (group.parse::<u64>().expect("decimal id") + 100).to_string();

    for (who, id) in
        [("carol", &group), ("alice", &group), ("bob", &group), ("dave", &open), ("carol", &open)]
    {
        let r = call(&server, Method::GET, &format!("/v1/packets/{id}"), &token(who), None).await;
        assert_ok(&format!("{who} sees packet {id}"), &r, 200);
        assert_eq!(r.body["id"].as_str(), Some(id.as_str()), "{}", r.body);
    }

    // Dave is outside the group: to him the packet does not exist, word for word.
    let dave = token("dave");
    let hidden = call(&server, Method::GET, &format!("/v1/packets/{group}"), &dave, None).await;
    assert_problem_reply("dave asks for the group packet", &hidden, 404, "not_found");
    let missing = call(&server, Method::GET, &format!("/v1/packets/{unknown}"), &dave, None).await;
    assert_problem_reply("dave asks for a packet that does not exist", &missing, 404, "not_found");
    assert_eq!(hidden.body, missing.body, "a hidden packet answers like a missing one");
    // Pages of claims are hidden the same way.
    let r = call(&server, Method::GET, &format!("/v1/packets/{group}?limit=1&cursor=0"), &dave, None).await;
    assert_problem_reply("dave pages through the group packet", &r, 404, "not_found");

    // The service key still sees everything.
    let (status, details) = server.packet(&group).await;
    assert_eq!(status, 200, "{details}");
    assert_eq!(details["claims"][0]["user"].as_str(), Some("bob"), "{details}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_cannot_deposit_withdraw_or_audit() {
    let server = with_tokens_server().await;
    server.deposit_ok("alice", 1_000).await;
    let before = money(&server.audit().await);
    let alice = token("alice");
    let body = |amount: i64| json!({ "amount": amount, "request_id": rid("tok-money") });

    let r = call(&server, Method::POST, "/v1/wallets/alice/deposit", &alice, Some(&body(500))).await;
    assert_problem_reply("alice's token deposits to alice", &r, 403, "forbidden");
    let r = call(&server, Method::POST, "/v1/wallets/alice/withdraw", &alice, Some(&body(500))).await;
    assert_problem_reply("alice's token withdraws from alice", &r, 403, "forbidden");
    let r = call(&server, Method::POST, "/v1/wallets/bob/deposit", &alice, Some(&body(500))).await;
    assert_problem_reply("alice's token deposits to bob", &r, 403, "forbidden");
    let r = call(&server, Method::GET, "/v1/admin/audit", &alice, None).await;
    assert_problem_reply("alice's token reads the audit", &r, 403, "forbidden");

    assert_eq!(money(&server.audit().await), before, "no money moved");
    assert_eq!(server.balance("alice").await, 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_work_as_before_with_tokens_on() {
    let server = with_tokens_server().await;
    // The admin key deposits and audits; the service key does everything else, for anyone.
    assert_eq!(server.deposit_ok("carol", 1_000).await, 1_000);
    let id = server.send_ok("carol", "equal", 200, 2, users(&["alice", "bob"])).await;
    assert_eq!(server.claim_ok(&id, "alice").await, 100);
    let (status, grabbed) = server.grab(&id, "bob").await;
    assert_eq!((status, grabbed["status"].as_str()), (200, Some("grabbed")), "{grabbed}");
    let (status, opened) = server.open(&id, "bob").await;
    assert_eq!((status, opened["amount"].as_i64()), (200, Some(100)), "{opened}");
    let (status, w) = server.withdraw("alice", 40, &rid("wd")).await;
    assert_eq!((status, w["balance"].as_i64()), (200, Some(60)), "{w}");
    assert_eq!(server.packet_full(&id).await["status"], "exhausted");
    for user in ["alice", "carol"] {
        for path in [
            format!("/v1/wallets/{user}/entries"),
            format!("/v1/users/{user}/received"),
            format!("/v1/users/{user}/sent"),
        ] {
            let (status, body) = server.get(&path).await;
            assert_eq!(status, 200, "GET {path} with the service key: {body}");
        }
    }
    // The admin key does what the service key does.
    let r = server.raw(Method::GET, &format!("/v1/packets/{id}"), Some(ADMIN_KEY), None).await;
    assert_ok("details with the admin key", &r, 200);
    // Scopes as before: the service key cannot deposit or audit; no or a wrong key is a 401.
    let dep = json!({ "amount": 1, "request_id": rid("dep") });
    let r = server.call(Method::POST, "/v1/wallets/carol/deposit", Some(API_KEY), Some(&dep)).await;
    assert_problem_reply("deposit with the service key", &r, 403, "forbidden");
    let r = server.raw(Method::GET, "/v1/admin/audit", Some(API_KEY), None).await;
    assert_problem_reply("audit with the service key", &r, 403, "forbidden");
    for key in [None, Some("not-a-key"), Some("not.a.key")] {
        let r = server.raw(Method::GET, "/v1/wallets/carol", key, None).await;
        assert_problem_reply(&format!("wallet with key {key:?}"), &r, 401, "unauthorized");
    }
    assert_audit_ok(&server.settle().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_secret_comes_from_the_config_file_and_must_be_long() {
    // From the file.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("hongbao.toml");
    std::fs::write(&file, format!("token_secret = \"{SECRET}\"\n")).expect("write config");
    let opts = Opts { args: vec!["--config".into(), file.display().to_string()], ..Opts::default() };
    let server = TestServer::start(opts).await;
    let r = call(&server, Method::GET, "/v1/wallets/alice", &token("alice"), None).await;
    assert_ok("a token with the secret from the config file", &r, 200);
    drop(server);

    // Too short: the server refuses to start, and does not echo the secret.
    let short = "short-secret-31-bytes-long-abcd";
    assert_eq!(short.len(), 31);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hongbao"))
        .args(["serve", "--listen", "127.0.0.1:0", "--token-secret", short])
        .arg("--data")
        .arg(dir.path().join("data"))
        .env_remove("HONGBAO_TOKEN_SECRET")
        .env_remove("HONGBAO_CONFIG")
        .output()
        .expect("run hongbao");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a 31-byte secret was accepted; stderr:\n{stderr}");
    assert!(stderr.contains("at least 32 bytes"), "stderr:\n{stderr}");
    assert!(!stderr.contains(short), "the refused secret was printed:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_tokens_and_the_secret_never_reach_the_logs() {
    let mut opts = with_tokens();
    opts.args.extend(["--log".to_string(), "trace".to_string()]);
    let server = TestServer::start(opts).await;
    server.deposit_ok("carol", 1_000).await;
    let id = server.send_ok("carol", "lucky", 300, 3, anyone()).await;
    let good = token("alice");
    let expired = mint("alice", -2 * HOUR_S, -HOUR_S);
    let foreign = mint_claims(
        "another-secret-of-at-least-32-bytes!!",
        &json!({ "sub": "alice", "iat": now_s(), "exp": now_s() + HOUR_S }),
    );
    let r = call(
        &server,
        Method::POST,
        &format!("/v1/packets/{id}/claim"),
        &good,
        Some(&json!({"user": "alice"})),
    )
    .await;
    assert_ok("claim with a good token", &r, 200);
    let r = call(&server, Method::GET, "/v1/wallets/bob", &good, None).await;
    assert_eq!(r.status, 403, "{}", r.body);
    for bad in [&expired, &foreign] {
        let r = call(&server, Method::GET, "/v1/wallets/alice", bad, None).await;
        assert_eq!(r.status, 401, "{}", r.body);
    }
    let r = server.raw(Method::GET, "/v1/wallets/alice", Some("wrong-key-5e1d"), None).await;
    assert_eq!(r.status, 401, "{}", r.body);
    let r = server.raw(Method::GET, "/v1/admin/audit", Some(API_KEY), None).await;
    assert_eq!(r.status, 403, "{}", r.body);

    // The log is at trace level and saw the requests (so the check below is not vacuous).
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = server.stderr_tail();
        if log.contains("user token accepted") && log.contains("user token refused") {
            break log;
        }
        assert!(Instant::now() < deadline, "no token decisions logged at trace level; stderr:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let signature = |t: &str| t.rsplit('.').next().expect("a JWT").to_string();
    let secrets = [
        ("the service key", API_KEY.to_string()),
        ("the admin key", ADMIN_KEY.to_string()),
        ("the token secret", SECRET.to_string()),
        ("a wrong key", "wrong-key-5e1d".to_string()),
        ("a good token", good.clone()),
        ("a good token's signature", signature(&good)),
        ("an expired token", expired.clone()),
        ("a foreign token", foreign.clone()),
    ];
    for (what, secret) in secrets {
        assert!(!log.contains(&secret), "{what} is in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused_and_the_server_carries_on() {
    let server = with_tokens_server().await;
    let url = server.url("/v1/wallets/alice");
    let huge = "x".repeat(64 << 10);
    let send = |name: &'static str, value: String| {
        let req = server.client.get(&url).header(name, value);
        async move {
            let resp = req.send().await.expect("an answer, not a dropped connection");
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            (status, body)
        }
    };
    let (status, body) = send("authorization", format!("Bearer {huge}")).await;
    assert_problem("64 KiB Authorization header", status, &body, 431, "headers_too_large");
    let (status, body) = send("x-padding", huge.clone()).await;
    assert_problem("64 KiB header of another name", status, &body, 431, "headers_too_large");

    // A credential a little too long to be a token, in headers of a fine size: refused unread.
    let long = format!("{}.{}.{}", "a".repeat(1000), "b".repeat(1000), "c".repeat(1000));
    let r = call(&server, Method::GET, "/v1/wallets/alice", &long, None).await;
    assert_problem_reply("a 3 KB credential", &r, 401, "unauthorized");

    // Still serving, keys and tokens alike.
    let (status, _) = server.wallet("alice").await;
    assert_eq!(status, 200);
    let r = call(&server, Method::GET, "/v1/wallets/alice", &token("alice"), None).await;
    assert_ok("a token after the oversized requests", &r, 200);
}
