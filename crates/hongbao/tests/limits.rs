//! The two refusals a healthy server gives under pressure (DESIGN.md §4): 429 `rate_limited`
//! when one user asks too fast, and 503 `overloaded` with `Retry-After` when a set's queue is
//! full. Neither moves money, and the books balance afterwards. And the bounds on the
//! tunables behind them: a value past its bound stops the server with a clear error.

mod support;

use reqwest::Method;
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_user_asking_too_fast_is_429_and_others_still_claim() {
    // Arrange: a server that allows each user 2 grabs/opens/claims a second (burst 4).
    let opts = Opts { args: vec!["--user-rate".into(), "2".into()], ..Opts::default() };
    let server = TestServer::start(opts).await;
    server.deposit_ok("boss", 10_000).await;
    let id = server.send_ok("boss", "equal", 1_000, 10, json!({"anyone": true})).await;
    let before = server.settle().await;

    // Act: one user hammers the packet.
    let mut limited = 0;
    let mut paid = 0;
    for _ in 0..30 {
        let (status, body) = server.claim(&id, "greedy").await;
        match status {
            200 => paid += 1,
            429 => {
                assert_problem("hammering claim", status, &body, 429, "rate_limited");
                limited += 1;
            }
            other => panic!("unexpected {other} {body}"),
        }
    }

    // Assert: most were refused, the first ones answered (the same share), others unaffected.
    assert!(limited >= 20, "only {limited} of 30 rapid claims were rate limited");
    assert!(paid >= 1, "the first claims are served");
    assert_eq!(server.claim_ok(&id, "patient").await, 100);
    let after = server.settle().await;
    assert_eq!(money(&after)[0], money(&before)[0], "a refusal moves no money");
}

/// `--user-rate 0` turns the limit off: one user may ask as fast as they like. (It used to keep
/// a bucket with an enormous quota for every user who ever claimed; now it keeps none.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_rate_0_turns_the_limit_off() {
    let opts = Opts { args: vec!["--user-rate".into(), "0".into()], ..Opts::default() };
    let server = TestServer::start(opts).await;
    server.deposit_ok("boss", 10_000).await;
    let id = server.send_ok("boss", "equal", 1_000, 10, json!({"anyone": true})).await;
    for i in 0..200 {
        let (status, body) = server.claim(&id, "eager").await;
        assert_eq!(status, 200, "claim {i} of one user with the limit off: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_503_with_retry_after_and_loses_nothing() {
    // Arrange: one set with a queue of 1 and batches of 1, so concurrent work overflows it.
    let opts = Opts {
        args: vec![
            "--queue-depth".into(),
            "1".into(),
            "--batch-max".into(),
            "1".into(),
            "--user-rate".into(),
            "0".into(),
        ],
        ..Opts::default()
    };
    let server = TestServer::start(opts).await;
    server.deposit_ok("boss", 1_000_000).await;
    let id = server.send_ok("boss", "lucky", 100_000, 1_000, json!({"anyone": true})).await;

    // Act: 400 claims at once from 64 tasks.
    let mut tasks = Vec::new();
    for t in 0..64 {
        let api = server.api();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..7 {
                let body = json!({"user": format!("u{t}-{i}")});
                let r = api
                    .call(Method::POST, &format!("/v1/packets/{id}/claim"), Some(API_KEY), Some(&body))
                    .await;
                out.push((format!("u{t}-{i}"), r));
            }
            out
        }));
    }
    let mut paid = Vec::new();
    let mut overloaded = 0;
    for t in tasks {
        for (user, r) in t.await.unwrap() {
            match r.status {
                200 => paid.push((user, r.body["amount"].as_i64().unwrap())),
                503 => {
                    assert_problem_reply("claim into a full queue", &r, 503, "overloaded");
                    assert_eq!(r.retry_after.as_deref(), Some("1"), "503 carries Retry-After");
                    overloaded += 1;
                }
                other => panic!("unexpected {other} {}", r.body),
            }
        }
    }

    // Assert: some were refused at once, every answered claim is in the packet, books balance.
    assert!(overloaded > 0, "a queue of 1 under 64 concurrent clients refused nothing");
    assert!(!paid.is_empty(), "the server kept serving while refusing the excess");
    let (status, details) = server.api().get(&format!("/v1/packets/{id}?limit=200")).await;
    assert_eq!(status, 200);
    let claims = details["claims"].as_array().unwrap();
    for (user, amount) in &paid {
        assert!(
            claims.iter().any(|c| c["user"] == user.as_str() && c["amount"] == *amount),
            "claim by {user} answered 200 is missing"
        );
    }
    assert_eq!(claims.len(), paid.len(), "a refused claim took no share");
    println!("overload: {} paid, {overloaded} refused with 503", paid.len());
    server.settle().await;
}

#[test]
fn a_commit_spacing_past_100_ms_is_refused_with_a_clear_error() {
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hongbao"))
        .args(["serve", "--listen", "127.0.0.1:0", "--commit-spacing-us", "100001", "--data"])
        .arg(data.path())
        .env_remove("HONGBAO_COMMIT_SPACING_US")
        .env_remove("HONGBAO_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(stderr.contains("commit_spacing_us must be between 0 and 100000"), "stderr:\n{stderr}");
}
