//! The HTTP contract of DESIGN.md §4, endpoint by endpoint and error code by error code,
//! against the real binary. Every test starts its own server on a fresh data dir.
//!
//! 429 and 503 are another suite's subject; here every reply is checked not to be one of them,
//! because nothing in these tests comes near a limit.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use support::*;

/// Asserts that normal use is never turned away for load.
fn not_shed(what: &str, status: u16) {
    assert!(status != 429 && status != 503, "{what}: got {status} in normal use");
}

/// A `{user, balance}` reply.
fn assert_wallet(reply: &Value, user: &str, balance: i64) {
    assert_eq!((reply["user"].as_str(), reply["balance"].as_i64()), (Some(user), Some(balance)), "{reply}");
}

/// One request the server must refuse.
struct Case {
    what: String,
    method: Method,
    path: String,
    key: Option<&'static str>,
    body: Option<Vec<u8>>,
}

impl Case {
    fn new(what: &str, method: Method, path: &str, key: Option<&'static str>, body: Option<Vec<u8>>) -> Case {
        Case { what: what.to_string(), method, path: path.to_string(), key, body }
    }
}

async fn problem(api: &Api, method: Method, path: &str, key: Option<&str>, body: Option<Vec<u8>>) -> Reply {
    let r = api.raw(method, path, key, body).await;
    not_shed(path, r.status);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_endpoints_need_no_key_and_openapi_lists_the_contract() {
    let server = TestServer::start(Opts::default()).await;

    for path in ["/healthz", "/readyz", "/metrics", "/docs"] {
        let r = server.raw(Method::GET, path, None, None).await;
        assert_eq!(r.status, 200, "GET {path} without a key: {}", r.body);
    }

    let r = server.raw(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(r.status, 200, "GET /openapi.json: {}", r.body);
    let paths =
        r.body["paths"].as_object().unwrap_or_else(|| panic!("openapi.json has no paths object: {}", r.body));
    // Parameter names are the spec's business: compare with every `{name}` made `{}`.
    let normalise = |p: &str| {
        let mut out = String::new();
        let mut in_param = false;
        for c in p.chars() {
            match c {
                '{' => {
                    in_param = true;
                    out.push('{');
                }
                '}' => {
                    in_param = false;
                    out.push('}');
                }
                _ if in_param => {}
                _ => out.push(c),
            }
        }
        out
    };
    let listed: HashSet<String> = paths.keys().map(|p| normalise(p)).collect();
    for want in [
        "/v1/wallets/{}/deposit",
        "/v1/wallets/{}/withdraw",
        "/v1/wallets/{}",
        "/v1/wallets/{}/entries",
        "/v1/packets",
        "/v1/packets/{}",
        "/v1/packets/{}/grab",
        "/v1/packets/{}/open",
        "/v1/packets/{}/claim",
        "/v1/users/{}/received",
        "/v1/users/{}/sent",
        "/v1/admin/audit",
    ] {
        assert!(listed.contains(want), "openapi.json lacks {want}; it lists {listed:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_key_is_401_and_moves_nothing() {
    let server = TestServer::start(Opts::default()).await;
    server.deposit_ok("alice", 1_000).await;
    let before = money(&server.audit().await);

    let wallet = "/v1/wallets/alice";
    let deposit = "/v1/wallets/alice/deposit";
    let withdraw = "/v1/wallets/alice/withdraw";
    let body = || Some(serde_json::to_vec(&json!({"amount": 10, "request_id": rid("k")})).unwrap());
    let cases = [
        Case::new("no key", Method::GET, wallet, None, None),
        Case::new("wrong key", Method::GET, wallet, Some("not-the-key"), None),
        Case::new("empty key", Method::GET, wallet, Some(""), None),
        Case::new("no key, deposit", Method::POST, deposit, None, body()),
        Case::new("wrong key, deposit", Method::POST, deposit, Some("nope"), body()),
        Case::new("no key, withdraw", Method::POST, withdraw, None, body()),
        Case::new("wrong key, withdraw", Method::POST, withdraw, Some("nope"), body()),
        Case::new("no key, audit", Method::GET, "/v1/admin/audit", None, None),
        Case::new("no key, packets", Method::POST, "/v1/packets", None, Some(b"{}".to_vec())),
    ];
    for c in cases {
        let r = problem(&server, c.method, &c.path, c.key, c.body).await;
        assert_problem_reply(&c.what, &r, 401, "unauthorized");
    }
    // A key in another scheme is no key.
    let r = server
        .client
        .get(server.url(wallet))
        .header("authorization", format!("Basic {API_KEY}"))
        .send()
        .await
        .expect("GET with a Basic header");
    assert_eq!(r.status().as_u16(), 401, "Basic scheme must not authenticate");

    assert_eq!(server.balance("alice").await, 1_000);
    assert_eq!(money(&server.audit().await), before, "a refused request moved money");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposit_and_audit_need_the_admin_key() {
    let server = TestServer::start(Opts::default()).await;

    let body = serde_json::to_vec(&json!({"amount": 500, "request_id": rid("d")})).unwrap();
    let r = problem(&server, Method::POST, "/v1/wallets/bob/deposit", Some(API_KEY), Some(body)).await;
    assert_problem_reply("deposit with the service key", &r, 403, "forbidden");
    let r = problem(&server, Method::GET, "/v1/admin/audit", Some(API_KEY), None).await;
    assert_problem_reply("audit with the service key", &r, 403, "forbidden");

    assert_eq!(server.balance("bob").await, 0, "a forbidden deposit moved money");
    let audit = server.audit().await;
    assert_audit_ok(&audit);
    assert_eq!(audit["deposits"], 0);

    let (status, reply) = server.deposit("bob", 500, &rid("d")).await;
    assert_eq!(status, 200, "admin deposit: {reply}");
    assert_wallet(&reply, "bob", 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposit_withdraw_and_balance() {
    let server = TestServer::start(Opts::default()).await;
    assert_eq!(server.balance("carol").await, 0, "an unknown wallet is empty");

    assert_eq!(server.deposit_ok("carol", 1_000).await, 1_000);
    let (status, reply) = server.withdraw("carol", 300, &rid("w")).await;
    assert_eq!(status, 200, "{reply}");
    assert_wallet(&reply, "carol", 700);
    let (status, reply) = server.wallet("carol").await;
    assert_eq!(status, 200, "{reply}");
    assert_wallet(&reply, "carol", 700);

    let (status, reply) = server.withdraw("carol", 701, &rid("w")).await;
    not_shed("withdraw", status);
    assert_problem("withdraw above the balance", status, &reply, 409, "insufficient_funds");
    let (status, reply) = server.withdraw("nobody", 1, &rid("w")).await;
    assert_problem("withdraw from an empty wallet", status, &reply, 409, "insufficient_funds");
    assert_eq!(server.balance("carol").await, 700);
    assert_eq!(server.balance("nobody").await, 0);

    // The whole balance may go.
    let (status, reply) = server.withdraw("carol", 700, &rid("w")).await;
    assert_eq!((status, reply["balance"].as_i64()), (200, Some(0)), "{reply}");

    let audit = server.settle().await;
    assert_eq!(money(&audit), [1_000, 1_000, 0, 0, 0], "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_deposit_and_withdraw_move_money_once() {
    let server = TestServer::start(Opts::default()).await;

    let (s1, r1) = server.deposit("dave", 1_000, "dep-1").await;
    let (s2, r2) = server.deposit("dave", 1_000, "dep-1").await;
    assert_eq!((s1, s2), (200, 200), "{r1} {r2}");
    assert_eq!(r1, r2, "a repeated deposit returns the first result");
    assert_eq!(server.balance("dave").await, 1_000, "a repeated deposit credited twice");

    let (status, reply) = server.deposit("dave", 2_000, "dep-1").await;
    not_shed("deposit", status);
    assert_problem("same request_id, other amount", status, &reply, 409, "idempotency_conflict");
    assert_eq!(server.balance("dave").await, 1_000);

    let (s1, r1) = server.withdraw("dave", 100, "wd-1").await;
    let (s2, r2) = server.withdraw("dave", 100, "wd-1").await;
    assert_eq!((s1, s2), (200, 200), "{r1} {r2}");
    assert_eq!(r1, r2, "a repeated withdrawal returns the first result");
    assert_eq!(server.balance("dave").await, 900, "a repeated withdrawal debited twice");
    let (status, reply) = server.withdraw("dave", 200, "wd-1").await;
    assert_problem("same request_id, other withdrawal", status, &reply, 409, "idempotency_conflict");
    assert_eq!(server.balance("dave").await, 900);

    let audit = server.settle().await;
    assert_eq!(money(&audit), [1_000, 100, 900, 0, 0], "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_send_debits_once_and_conflicts_on_another_body() {
    let server = TestServer::start(Opts::default()).await;
    server.deposit_ok("erin", 10_000).await;
    let send = json!({
        "sender": "erin", "kind": "lucky", "total_amount": 1_000, "count": 2,
        "audience": users(&["f1", "f2"]), "greeting": "恭喜发财", "request_id": "send-1",
    });

    let (s1, r1) = server.send(&send).await;
    assert_eq!(s1, 201, "send: {r1}");
    let id = r1["id"].as_str().unwrap_or_else(|| panic!("packet id is not a string: {r1}"));
    assert_eq!(r1["sender"], "erin");
    assert_eq!(r1["kind"], "lucky");
    assert_eq!(r1["total_amount"], 1_000);
    assert_eq!(r1["count"], 2);
    assert!(r1["expires_at"].is_string(), "send reply has expires_at: {r1}");

    let (s2, r2) = server.send(&send).await;
    assert_eq!(s2, 201, "a repeated send returns the first result: {r2}");
    assert_eq!(r2["id"].as_str(), Some(id), "a repeated send made another packet: {r2}");
    assert_eq!(server.balance("erin").await, 9_000, "a repeated send debited twice");

    let mut other = send.clone();
    other["total_amount"] = json!(2_000);
    let (status, reply) = server.send(&other).await;
    not_shed("send", status);
    assert_problem("same request_id, other send", status, &reply, 409, "idempotency_conflict");
    assert_eq!(server.balance("erin").await, 9_000);

    let (status, sent) = server.sent("erin", "").await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!((sent["count"].as_i64(), sent["total_amount"].as_i64()), (Some(1), Some(1_000)), "{sent}");
    let audit = server.settle().await;
    assert_eq!(money(&audit), [10_000, 0, 9_000, 1_000, 0], "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_above_the_balance_is_409_and_moves_nothing() {
    let server = TestServer::start(Opts::default()).await;
    server.deposit_ok("fay", 100).await;

    let send = json!({
        "sender": "fay", "kind": "equal", "total_amount": 200, "count": 2,
        "audience": anyone(), "request_id": rid("s"),
    });
    let (status, reply) = server.send(&send).await;
    not_shed("send", status);
    assert_problem("send above the balance", status, &reply, 409, "insufficient_funds");
    let (status, reply) = server
        .send(&json!({
            "sender": "ghost", "kind": "lucky", "total_amount": 1, "count": 1,
            "audience": anyone(), "request_id": rid("s"),
        }))
        .await;
    assert_problem("send from an empty wallet", status, &reply, 409, "insufficient_funds");

    assert_eq!(server.balance("fay").await, 100);
    let audit = server.settle().await;
    assert_eq!(money(&audit), [100, 0, 100, 0, 0], "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_400_invalid_request_and_moves_nothing() {
    let server = TestServer::start(Opts::default()).await;
    server.deposit_ok("hank", 1_000_000).await;
    let id = server.send_ok("hank", "lucky", 1_000, 2, users(&["ivy", "jon"])).await;
    let before_audit = money(&server.audit().await);

    let long_user = "u".repeat(65);
    let send = |patch: Value| {
        let mut body = json!({
            "sender": "hank", "kind": "lucky", "total_amount": 1_000, "count": 2,
            "audience": users(&["ivy", "jon"]), "request_id": rid("bad"),
        });
        for (k, v) in patch.as_object().expect("patch is an object") {
            if v.is_null() {
                body.as_object_mut().unwrap().remove(k);
            } else {
                body[k] = v.clone();
            }
        }
        serde_json::to_vec(&body).unwrap()
    };
    let money_body =
        |amount: &str| format!(r#"{{"amount": {amount}, "request_id": "{}"}}"#, rid("bad")).into_bytes();

    let mut cases: Vec<Case> = Vec::new();
    let mut case = |what: &str, method: Method, path: &str, key: &'static str, body: Option<Vec<u8>>| {
        cases.push(Case::new(what, method, path, Some(key), body));
    };

    // Wallets.
    for (path, key) in [("/v1/wallets/hank/deposit", ADMIN_KEY), ("/v1/wallets/hank/withdraw", API_KEY)] {
        case("malformed JSON", Method::POST, path, key, Some(br#"{"amount": 5,"#.to_vec()));
        case("not an object", Method::POST, path, key, Some(b"[1, 2]".to_vec()));
        case("empty body", Method::POST, path, key, Some(Vec::new()));
        for amount in
            ["-5", "0", "1.5", "1e30", "9223372036854775807", "9223372036854775808", "\"100\"", "null"]
        {
            case(&format!("amount {amount}"), Method::POST, path, key, Some(money_body(amount)));
        }
        case("no request_id", Method::POST, path, key, Some(br#"{"amount": 5}"#.to_vec()));
        case(
            "empty request_id",
            Method::POST,
            path,
            key,
            Some(br#"{"amount": 5, "request_id": ""}"#.to_vec()),
        );
        case("no amount", Method::POST, path, key, Some(br#"{"request_id": "x-1"}"#.to_vec()));
    }
    for user in ["a%20b", long_user.as_str(), "%C3%A4", "a%2Fb"] {
        let dep = format!("/v1/wallets/{user}/deposit");
        case(&format!("deposit to user {user}"), Method::POST, &dep, ADMIN_KEY, Some(money_body("5")));
        let wd = format!("/v1/wallets/{user}/withdraw");
        case(&format!("withdraw from user {user}"), Method::POST, &wd, API_KEY, Some(money_body("5")));
        case(&format!("wallet of user {user}"), Method::GET, &format!("/v1/wallets/{user}"), API_KEY, None);
        let entries = format!("/v1/wallets/{user}/entries");
        case(&format!("entries of user {user}"), Method::GET, &entries, API_KEY, None);
        let received = format!("/v1/users/{user}/received");
        case(&format!("received of user {user}"), Method::GET, &received, API_KEY, None);
        case(&format!("sent of user {user}"), Method::GET, &format!("/v1/users/{user}/sent"), API_KEY, None);
    }

    // Sends.
    let p = "/v1/packets";
    case("send: malformed JSON", Method::POST, p, API_KEY, Some(br#"{"sender": "hank""#.to_vec()));
    let bad_sends = [
        ("count 0", json!({"count": 0})),
        ("count -1", json!({"count": -1})),
        ("count 1.5", json!({"count": 1.5})),
        (
            "total below count",
            json!({"total_amount": 3, "count": 5, "audience": users(&["a", "b", "c", "d", "e"])}),
        ),
        ("total 1 for 2", json!({"total_amount": 1})),
        ("total 0", json!({"total_amount": 0})),
        ("total -100", json!({"total_amount": -100})),
        ("total 10.5", json!({"total_amount": 10.5})),
        ("total 1e30", json!({"total_amount": 1e30})),
        ("total i64::MAX", json!({"total_amount": i64::MAX})),
        ("total as string", json!({"total_amount": "1000"})),
        ("equal that does not divide", json!({"kind": "equal", "total_amount": 1_001})),
        ("unknown kind", json!({"kind": "greedy"})),
        ("empty audience", json!({"audience": {"users": []}})),
        ("audience smaller than count", json!({"audience": users(&["ivy"])})),
        ("audience neither users nor anyone", json!({"audience": {}})),
        ("audience anyone false", json!({"audience": {"anyone": false}})),
        ("bad user in audience", json!({"audience": users(&["ivy", "a b"])})),
        ("long user in audience", json!({"audience": users(&["ivy", &long_user])})),
        ("non-ASCII user in audience", json!({"audience": users(&["ivy", "ä"])})),
        ("bad sender", json!({"sender": "a b"})),
        ("long sender", json!({"sender": long_user})),
        ("non-ASCII sender", json!({"sender": "ä"})),
        ("no sender", json!({"sender": null})),
        ("no request_id", json!({"request_id": null})),
        ("expires_in_s 0", json!({"expires_in_s": 0})),
        ("expires_in_s -5", json!({"expires_in_s": -5})),
        ("greeting too long", json!({"greeting": "福".repeat(10_000)})),
    ];
    for (what, patch) in bad_sends {
        case(&format!("send: {what}"), Method::POST, p, API_KEY, Some(send(patch)));
    }
    // A 4 MiB body.
    let huge = send(json!({"greeting": "x".repeat(4 << 20)}));
    case("send: 4 MiB body", Method::POST, p, API_KEY, Some(huge));

    // Packet ids and claim bodies.
    for verb in ["grab", "open", "claim"] {
        let good = format!("/v1/packets/{id}/{verb}");
        case(
            &format!("{verb}: packet id abc"),
            Method::POST,
            &format!("/v1/packets/abc/{verb}"),
            API_KEY,
            Some(br#"{"user": "ivy"}"#.to_vec()),
        );
        case(
            &format!("{verb}: packet id -1"),
            Method::POST,
            &format!("/v1/packets/-1/{verb}"),
            API_KEY,
            Some(br#"{"user": "ivy"}"#.to_vec()),
        );
        case(
            &format!("{verb}: bad user"),
            Method::POST,
            &good,
            API_KEY,
            Some(br#"{"user": "a b"}"#.to_vec()),
        );
        case(
            &format!("{verb}: long user"),
            Method::POST,
            &good,
            API_KEY,
            Some(format!(r#"{{"user": "{long_user}"}}"#).into_bytes()),
        );
        case(&format!("{verb}: no user"), Method::POST, &good, API_KEY, Some(b"{}".to_vec()));
        case(&format!("{verb}: malformed JSON"), Method::POST, &good, API_KEY, Some(b"{user".to_vec()));
    }
    case("details: packet id abc", Method::GET, "/v1/packets/abc", API_KEY, None);
    case("details: packet id 1.5", Method::GET, "/v1/packets/1.5", API_KEY, None);

    for Case { what, method, path, key, body } in cases {
        let r = problem(&server, method.clone(), &path, key, body).await;
        assert_problem_reply(&format!("{what} ({method} {path})"), &r, 400, "invalid_request");
        // Nothing moved: not the sender's wallet, not the packet, not the books.
        assert_eq!(money(&server.audit().await), before_audit, "{what}: bad input moved money");
    }
    assert_eq!(server.balance("hank").await, 1_000_000 - 1_000);
    assert_eq!(server.balance("ivy").await, 0);
    let details = server.packet_full(&id).await;
    assert_eq!(details["remaining_count"], 2, "bad claims took a share: {details}");
    assert_eq!(details["claims"], json!([]));
    let (status, sent) = server.sent("hank", "").await;
    assert_eq!((status, sent["count"].as_i64()), (200, Some(1)), "bad sends made packets: {sent}");
    assert_audit_ok(&server.settle().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_packet_is_404() {
    let server = TestServer::start(Opts::default()).await;
    server.deposit_ok("kim", 1_000).await;
    let id = server.send_ok("kim", "lucky", 100, 1, users(&["lee"])).await;
    let next: u64 = id.parse::<u64>().expect("packet ids are decimal") + 1;

    for unknown in ["1".to_string(), next.to_string(), "4611686018427387903".to_string()] {
        let r = problem(&server, Method::GET, &format!("/v1/packets/{unknown}"), Some(API_KEY), None).await;
        assert_problem_reply(&format!("details of {unknown}"), &r, 404, "not_found");
        for verb in ["grab", "open", "claim"] {
            let path = format!("/v1/packets/{unknown}/{verb}");
            let r =
                problem(&server, Method::POST, &path, Some(API_KEY), Some(br#"{"user": "lee"}"#.to_vec()))
                    .await;
            assert_problem_reply(&format!("{verb} of {unknown}"), &r, 404, "not_found");
        }
    }
    assert_eq!(server.balance("lee").await, 0);
    assert_audit_ok(&server.settle().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_packet_pays_its_audience_once_each_and_turns_others_away() {
    let server = TestServer::start(Opts::sets(2)).await;
    server.deposit_ok("mia", 10_000).await;
    let group = ["ned", "oli", "pam", "quin"];
    let id = server.send_ok("mia", "lucky", 1_000, 3, users(&group)).await;
    assert_eq!(server.balance("mia").await, 9_000, "send debits the sender");

    // Outsiders: not eligible, for grab and claim alike, before and after exhaustion.
    let (status, reply) = server.claim(&id, "zed").await;
    not_shed("claim", status);
    assert_problem("outsider claims", status, &reply, 403, "not_eligible");
    let (status, reply) = server.grab(&id, "zed").await;
    assert_problem("outsider grabs", status, &reply, 403, "not_eligible");

    let mut paid = Vec::new();
    for user in &group[..3] {
        let amount = server.claim_ok(&id, user).await;
        assert!((1..=998).contains(&amount), "share {amount} of 1000 for 3");
        // Asked again: the same claim, no more money.
        assert_eq!(server.claim_ok(&id, user).await, amount, "a repeated claim paid another amount");
        paid.push((user.to_string(), amount));
    }
    let sum: i64 = paid.iter().map(|(_, a)| a).sum();
    assert_eq!(sum, 1_000, "a fully claimed packet pays exactly its total: {paid:?}");

    let (status, reply) = server.claim(&id, "quin").await;
    assert_problem("late claim", status, &reply, 410, "packet_exhausted");
    let (status, reply) = server.grab(&id, "quin").await;
    assert_problem("late grab", status, &reply, 410, "packet_exhausted");
    let (status, reply) = server.claim(&id, "zed").await;
    assert_problem("outsider after exhaustion", status, &reply, 403, "not_eligible");

    // Details: claims, status and best luck.
    let details = server.packet_full(&id).await;
    let group_set: HashSet<String> = group.iter().map(|u| u.to_string()).collect();
    let view = check_packet(&details, Some(&group_set));
    assert_eq!(details["id"].as_str(), Some(id.as_str()));
    assert_eq!(details["sender"], "mia");
    assert_eq!(details["status"], "exhausted");
    assert!(details["created_at"].is_string() && details["expires_at"].is_string(), "{details}");
    let mut got = view.claims.clone();
    got.sort();
    paid.sort();
    assert_eq!(got, paid, "details list exactly the paid claims");
    let best = &details["best_luck"];
    let max = paid.iter().map(|(_, a)| *a).max().unwrap();
    assert_eq!(best["amount"].as_i64(), Some(max), "best luck is the largest share: {details}");
    assert!(best["at"].is_string(), "{best}");

    // Wallets, once credits between the two sets have arrived.
    let audit = server.settle().await;
    assert_eq!(money(&audit), [10_000, 0, 10_000, 0, 0], "{audit}");
    for (user, amount) in &paid {
        assert_eq!(server.balance(user).await, *amount, "wallet of {user}");
    }
    assert_eq!(server.balance("quin").await, 0);
    assert_eq!(server.balance("zed").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_packet_to_anyone_pays_equal_shares() {
    let server = TestServer::start(Opts::default()).await;
    server.deposit_ok("ray", 5_000).await;
    let id = server.send_ok("ray", "equal", 900, 3, anyone()).await;

    for user in ["s1", "s2", "s3"] {
        assert_eq!(server.claim_ok(&id, user).await, 300);
    }
    let (status, reply) = server.claim(&id, "s4").await;
    assert_problem("fourth claim of three", status, &reply, 410, "packet_exhausted");
    let details = server.packet_full(&id).await;
    check_packet(&details, None);
    assert_eq!(details["best_luck"]["amount"], 300);
    assert_eq!(details["best_luck"]["user"], "s1", "ties go to the earliest share: {details}");
    server.settle().await;
    assert_eq!(server.balance("s3").await, 300);
    assert_eq!(server.balance("ray").await, 4_100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grab_then_open_pays_a_share_and_open_without_grab_is_409() {
    let server = TestServer::start(Opts::sets(2)).await;
    server.deposit_ok("tom", 1_000).await;
    let id = server.send_ok("tom", "lucky", 500, 2, users(&["uma", "vic"])).await;

    let (status, reply) = server.open(&id, "vic").await;
    not_shed("open", status);
    assert_problem("open without grab", status, &reply, 409, "not_grabbed");
    let (status, reply) = server.open(&id, "zed").await;
    assert_problem("outsider opens", status, &reply, 403, "not_eligible");

    let (status, g1) = server.grab(&id, "uma").await;
    assert_eq!(status, 200, "grab: {g1}");
    assert_eq!(g1["status"], "grabbed");
    assert!(g1["hold_expires_at"].is_string(), "{g1}");
    let (status, g2) = server.grab(&id, "uma").await;
    assert_eq!(
        (status, &g2["hold_expires_at"]),
        (200, &g1["hold_expires_at"]),
        "a repeated grab keeps its hold: {g2}"
    );

    let (status, opened) = server.open(&id, "uma").await;
    assert_eq!(status, 200, "open: {opened}");
    assert_eq!(opened["packet_id"].as_str(), Some(id.as_str()));
    assert_eq!(opened["user"], "uma");
    assert!(opened["at"].is_string(), "{opened}");
    let amount = opened["amount"].as_i64().expect("amount");
    assert!((1..=499).contains(&amount), "share {amount} of 500 for 2");
    let (status, again) = server.open(&id, "uma").await;
    assert_eq!(
        (status, again["amount"].as_i64()),
        (200, Some(amount)),
        "a repeated open pays again: {again}"
    );
    assert_eq!(server.claim_ok(&id, "uma").await, amount, "claim after open returns the same share");

    // vic still has to grab first; a claim takes the last share.
    let (status, reply) = server.open(&id, "vic").await;
    assert_problem("open without grab, second user", status, &reply, 409, "not_grabbed");
    assert_eq!(server.claim_ok(&id, "vic").await, 500 - amount, "the last share takes the rest");

    server.settle().await;
    assert_eq!(server.balance("uma").await, amount);
    assert_eq!(server.balance("vic").await, 500 - amount);
    check_packet(&server.packet_full(&id).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_that_times_out_puts_the_share_back() {
    let server = TestServer::start(Opts::hold_s(1)).await;
    server.deposit_ok("wes", 1_000).await;
    let id = server.send_ok("wes", "lucky", 100, 2, users(&["xia", "yan", "zoe"])).await;

    for user in ["xia", "yan"] {
        let (status, reply) = server.grab(&id, user).await;
        assert_eq!(status, 200, "grab by {user}: {reply}");
    }
    // Every share is held: the third user is turned away for now.
    let (status, reply) = server.claim(&id, "zoe").await;
    not_shed("claim", status);
    assert_problem("claim while every share is held", status, &reply, 410, "packet_exhausted");
    let (status, reply) = server.grab(&id, "zoe").await;
    assert_problem("grab while every share is held", status, &reply, 410, "packet_exhausted");

    tokio::time::sleep(Duration::from_millis(1_500)).await;

    // The holds lapsed: the shares are back in the pool.
    let zoe = server.claim_ok(&id, "zoe").await;
    let (status, reply) = server.open(&id, "xia").await;
    assert_problem("open after the hold lapsed", status, &reply, 409, "not_grabbed");
    let xia = server.claim_ok(&id, "xia").await;
    assert_eq!(zoe + xia, 100);
    let (status, reply) = server.claim(&id, "yan").await;
    assert_problem("claim after the last share went", status, &reply, 410, "packet_exhausted");

    let details = server.packet_full(&id).await;
    check_packet(&details, None);
    assert_eq!(details["status"], "exhausted");
    server.settle().await;
    assert_eq!(server.balance("zoe").await, zoe);
    assert_eq!(server.balance("xia").await, xia);
    assert_eq!(server.balance("yan").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_by_one_user_pay_once() {
    let server = TestServer::start(Opts::sets(2)).await;
    server.deposit_ok("abe", 10_000).await;
    let id = server.send_ok("abe", "lucky", 5_000, 10, anyone()).await;

    let mut tasks = Vec::new();
    for _ in 0..32 {
        let api = server.api();
        let id = id.clone();
        tasks.push(tokio::spawn(async move { api.claim_ok(&id, "bea").await }));
    }
    let mut amounts = HashSet::new();
    for t in tasks {
        amounts.insert(t.await.expect("claim task"));
    }
    assert_eq!(amounts.len(), 1, "concurrent claims by one user got different amounts: {amounts:?}");
    let amount = *amounts.iter().next().unwrap();

    let details = server.packet_full(&id).await;
    let view = check_packet(&details, None);
    assert_eq!(view.claims, vec![("bea".to_string(), amount)]);
    server.settle().await;
    assert_eq!(server.balance("bea").await, amount, "one user paid more than one share");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_list_every_kind_and_page_without_gaps() {
    let server = TestServer::start(Opts::sets(2)).await;
    server.deposit_ok("cal", 10_000).await;
    let (status, _) = server.withdraw("cal", 1_000, &rid("w")).await;
    assert_eq!(status, 200);
    // A packet that expires with shares left: deposit, withdraw, send, refund for cal.
    let expiring = server
        .send(&json!({
            "sender": "cal", "kind": "equal", "total_amount": 300, "count": 3,
            "audience": users(&["dee", "eve", "fox"]), "expires_in_s": 1, "request_id": rid("s"),
        }))
        .await;
    assert_eq!(expiring.0, 201, "{}", expiring.1);
    let expiring = expiring.1["id"].as_str().expect("id").to_string();
    assert_eq!(server.claim_ok(&expiring, "dee").await, 100);
    // cal also receives: a claim entry.
    server.deposit_ok("gus", 1_000).await;
    let to_cal = server.send_ok("gus", "lucky", 50, 1, users(&["cal"])).await;
    assert_eq!(server.claim_ok(&to_cal, "cal").await, 50);

    let mut details = server.packet_full(&expiring).await;
    for _ in 0..100 {
        if details["status"] == "expired" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        details = server.packet_full(&expiring).await;
    }
    assert_eq!(details["status"], "expired", "packet never expired: {details}");
    server.settle().await;

    let all = server.entries_all("cal").await;
    let summary: Vec<(String, i64, Option<String>)> = all
        .iter()
        .map(|e| {
            assert!(e["at"].is_string(), "entry has an `at` time: {e}");
            let amount = e["amount"].as_i64().unwrap_or_else(|| panic!("entry amount: {e}"));
            let packet = e["packet_id"].as_str().map(str::to_string);
            (e["kind"].as_str().expect("entry kind").to_string(), amount, packet)
        })
        .collect();
    let mut sorted = summary.clone();
    sorted.sort();
    let mut want = vec![
        ("claim".to_string(), 50, Some(to_cal.clone())),
        ("deposit".to_string(), 10_000, None),
        ("refund".to_string(), 200, Some(expiring.clone())),
        ("send".to_string(), 300, Some(expiring.clone())),
        ("withdraw".to_string(), 1_000, None),
    ];
    want.sort();
    assert_eq!(sorted, want, "entries of cal: {all:?}");
    assert_eq!(server.balance("cal").await, 10_000 - 1_000 - 300 + 200 + 50);

    // Pages of 2 walk the same entries, each once.
    let mut paged = Vec::new();
    let mut query = "?limit=2".to_string();
    for _ in 0..10 {
        let (status, page) = server.entries("cal", &query).await;
        assert_eq!(status, 200, "{page}");
        let entries = page["entries"].as_array().expect("entries");
        assert!(entries.len() <= 2, "page larger than its limit: {page}");
        paged.extend(entries.iter().cloned());
        match &page["next_cursor"] {
            Value::Null => break,
            c => query = format!("?limit=2&cursor={}", cursor_param(c)),
        }
    }
    assert_eq!(paged, all, "paging lost or repeated entries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_and_sent_histories_count_and_total() {
    let server = TestServer::start(Opts::sets(4)).await;
    server.deposit_ok("han", 10_000).await;
    server.deposit_ok("ida", 10_000).await;

    // Three 1:1 packets to jay (jay is best luck of each) and one group packet left open.
    let mut received = Vec::new();
    for (sender, total) in [("han", 120), ("ida", 340), ("han", 560)] {
        let id = server.send_ok(sender, "lucky", total, 1, users(&["jay"])).await;
        assert_eq!(server.claim_ok(&id, "jay").await, total, "a one-share packet pays its total");
        received.push((id, total));
    }
    let open = server.send_ok("ida", "equal", 1_000, 4, users(&["jay", "kat", "leo", "max"])).await;
    let (status, reply) = server.claim(&open, "jay").await;
    assert_eq!(status, 200, "{reply}");
    let year = &reply["at"].as_str().expect("at is a time")[..4];
    received.push((open.clone(), 250));
    server.settle().await;

    let (status, r) = server.received("jay", "").await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["count"], 4, "{r}");
    assert_eq!(r["total_amount"], 120 + 340 + 560 + 250, "{r}");
    assert_eq!(r["best_luck_count"], 3, "best luck of the three exhausted packets only: {r}");
    let items = r["items"].as_array().expect("items");
    assert_eq!(items.len(), 4, "{r}");
    let mut got: Vec<(String, i64)> = items
        .iter()
        .map(|i| {
            (i["packet_id"].as_str().expect("packet_id").to_string(), i["amount"].as_i64().expect("amount"))
        })
        .collect();
    got.sort();
    received.sort();
    assert_eq!(got, received);

    // This year counts the same; a year long gone counts nothing.
    let (_, this_year) = server.received("jay", &format!("?year={year}")).await;
    assert_eq!(
        (this_year["count"].as_i64(), this_year["total_amount"].as_i64()),
        (Some(4), Some(1_270)),
        "{this_year}"
    );
    let (status, old) = server.received("jay", "?year=2001").await;
    assert_eq!(status, 200, "{old}");
    assert_eq!((old["count"].as_i64(), old["total_amount"].as_i64()), (Some(0), Some(0)), "{old}");
    assert_eq!(old["items"], json!([]));

    // Pages of 3 then the rest.
    let (_, page1) = server.received("jay", "?limit=3").await;
    assert_eq!(page1["items"].as_array().map(Vec::len), Some(3), "{page1}");
    assert!(!page1["next_cursor"].is_null(), "a first page of 3 of 4 has a next cursor: {page1}");
    let cursor = cursor_param(&page1["next_cursor"]);
    let (_, page2) = server.received("jay", &format!("?limit=3&cursor={cursor}")).await;
    assert_eq!(page2["items"].as_array().map(Vec::len), Some(1), "{page2}");
    assert!(page2["next_cursor"].is_null(), "{page2}");
    let mut ids: Vec<&str> = page1["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["items"].as_array().unwrap())
        .map(|i| i["packet_id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "paging repeated an item");

    let (status, s) = server.sent("han", "").await;
    assert_eq!(status, 200, "{s}");
    assert_eq!((s["count"].as_i64(), s["total_amount"].as_i64()), (Some(2), Some(680)), "{s}");
    assert_eq!(s["items"].as_array().map(Vec::len), Some(2), "{s}");
    let (_, s) = server.sent("ida", &format!("?year={year}")).await;
    assert_eq!((s["count"].as_i64(), s["total_amount"].as_i64()), (Some(2), Some(1_340)), "{s}");
    let (_, s) = server.sent("ida", "?year=2001").await;
    assert_eq!((s["count"].as_i64(), s["total_amount"].as_i64()), (Some(0), Some(0)), "{s}");
    let (_, s) = server.sent("jay", "").await;
    assert_eq!((s["count"].as_i64(), s["total_amount"].as_i64()), (Some(0), Some(0)), "{s}");

    assert_eq!(server.balance("jay").await, 1_270);
    let audit = server.settle().await;
    assert_eq!(money(&audit), [20_000, 0, 20_000 - 750, 750, 0], "{audit}");
}

/// A received page counts the best lucks of the packets in its user's own set (read with the
/// page) and in every other set, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_received_page_counts_best_lucks_in_its_own_set_and_the_others_once() {
    const SETS: u32 = 4;
    let server = TestServer::start(Opts::sets(SETS)).await;
    let set_of =
        |name: &str| hongbao_core::ids::set_of_user(&hongbao_core::UserId::parse(name).unwrap(), SETS);
    let home = set_of("jay");
    let names = (0..).map(|i| format!("s{i}"));
    let near = names.clone().find(|s| set_of(s) == home).expect("a name in jay's set");
    let far = names.clone().find(|s| set_of(s) != home).expect("a name in another set");
    for sender in [&near, &far] {
        server.deposit_ok(sender, 1_000).await;
        let id = server.send_ok(sender, "lucky", 100, 1, users(&["jay"])).await;
        assert_eq!(server.claim_ok(&id, "jay").await, 100);
    }
    server.settle().await;
    let (status, r) = server.received("jay", "").await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["count"], 2, "{r}");
    assert_eq!(r["best_luck_count"], 2, "one packet in jay's set ({near}) and one in another ({far}): {r}");
}
