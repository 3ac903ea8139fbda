//! Expiry: what is left of a packet goes back to its sender once, whether the server runs
//! through the expiry or is stopped (gracefully or by `kill -9`) across it.
//!
//! Packets here live 2 s, the shortest life worth testing against a real clock; waits poll
//! the packet's status instead of sleeping for a guessed time.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// How long a due packet may take to be closed: the engine checks every tick, and a restart
/// checks at load. Seconds mean it never will.
const EXPIRE_WAIT: Duration = Duration::from_secs(15);

const GROUP: [&str; 5] = ["ava", "ben", "cy", "dot", "eli"];

/// Sends a 2-second lucky packet of 1,000 fen in 5 shares from `sender` to `GROUP`.
async fn send_short_lived(api: &Api, sender: &str) -> String {
    let body = json!({
        "sender": sender, "kind": "lucky", "total_amount": 1_000, "count": 5,
        "audience": users(&GROUP), "expires_in_s": 2, "request_id": rid("short"),
    });
    let (status, reply) = api.send(&body).await;
    assert_eq!(status, 201, "send: {reply}");
    assert!(reply["expires_at"].is_string(), "{reply}");
    reply["id"].as_str().expect("id").to_string()
}

/// Polls the packet until it reports `expired`.
async fn wait_expired(api: &Api, id: &str) -> Value {
    let deadline = Instant::now() + EXPIRE_WAIT;
    loop {
        let details = api.packet_full(id).await;
        if details["status"] == "expired" {
            return details;
        }
        assert_ne!(details["status"], "exhausted", "packet {id} exhausted unexpectedly: {details}");
        assert!(Instant::now() < deadline, "packet {id} did not expire within {EXPIRE_WAIT:?}: {details}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The sender's refund entries for a packet, as amounts.
async fn refunds(api: &Api, user: &str, id: &str) -> Vec<i64> {
    api.entries_all(user)
        .await
        .iter()
        .filter(|e| e["kind"] == "refund")
        .map(|e| {
            assert_eq!(e["packet_id"].as_str(), Some(id), "a refund of another packet: {e}");
            e["amount"].as_i64().expect("refund amount")
        })
        .collect()
}

/// Everything that must hold once the packet closed with `claimed` paid out.
async fn assert_refunded_once(api: &Api, sender: &str, id: &str, claimed: &[(&str, i64)]) {
    let paid: i64 = claimed.iter().map(|(_, a)| a).sum();
    let rest = 1_000 - paid;
    assert!(rest > 0, "the test leaves shares unclaimed");
    assert_eq!(
        refunds(api, sender, id).await,
        vec![rest],
        "sender gets the unclaimed rest back exactly once"
    );
    assert_eq!(api.balance(sender).await, 10_000 - paid, "sender's balance after the refund");

    let details = api.packet_full(id).await;
    assert_eq!(details["status"], "expired", "{details}");
    assert!(
        details["best_luck"].is_null(),
        "no best luck for a packet that was never fully opened: {details}"
    );
    let mut listed: Vec<(String, i64)> = PacketView::from_details(&details).claims;
    listed.sort();
    let mut want: Vec<(String, i64)> = claimed.iter().map(|(u, a)| (u.to_string(), *a)).collect();
    want.sort();
    assert_eq!(listed, want, "expiry keeps the claims made before it");

    // Late claims, grabs and opens are turned away; the claims made stand.
    for user in GROUP.iter().filter(|u| !claimed.iter().any(|(c, _)| c == *u)) {
        let (status, reply) = api.claim(id, user).await;
        assert_problem(&format!("claim by {user} after expiry"), status, &reply, 410, "packet_expired");
        let (status, reply) = api.grab(id, user).await;
        assert_problem(&format!("grab by {user} after expiry"), status, &reply, 410, "packet_expired");
        let (status, reply) = api.open(id, user).await;
        assert_problem(&format!("open by {user} after expiry"), status, &reply, 410, "packet_expired");
    }
    for (user, amount) in claimed {
        assert_eq!(api.claim_ok(id, user).await, *amount, "a claim made before expiry, asked again");
    }

    let audit = api.settle().await;
    assert_eq!(money(&audit), [10_000, 0, 10_000, 0, 0], "{audit}");
    for (user, amount) in claimed {
        assert_eq!(api.balance(user).await, *amount, "wallet of {user}");
    }
    let (status, sent) = api.sent(sender, "").await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["items"][0]["status"], "expired", "{sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_packet_refunds_the_rest_once() {
    let server = TestServer::start(Opts::default()).await;
    server.deposit_ok("sal", 10_000).await;
    let id = send_short_lived(&server, "sal").await;
    let ava = server.claim_ok(&id, "ava").await;
    let ben = server.claim_ok(&id, "ben").await;
    assert_eq!(server.balance("sal").await, 9_000);

    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_expired(&server, &id).await;
    let claimed = [("ava", ava), ("ben", ben)];
    assert_refunded_once(&server, "sal", &id, &claimed).await;

    // Time passing changes nothing more.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_refunded_once(&server, "sal", &id, &claimed).await;
}

enum Stop {
    Term,
    Kill9,
}

/// The server stops before the packet expires and starts after: the refund happens once,
/// and a further restart does not repeat it.
async fn refund_once_across_restarts(stop: Stop) {
    let mut server = TestServer::start(Opts::default()).await;
    server.deposit_ok("sal", 10_000).await;
    let id = send_short_lived(&server, "sal").await;
    let ava = server.claim_ok(&id, "ava").await;
    let claimed = [("ava", ava)];

    match stop {
        Stop::Term => server.terminate().await,
        Stop::Kill9 => server.kill9(),
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.restart().await;
    wait_expired(&server, &id).await;
    assert_refunded_once(&server, "sal", &id, &claimed).await;

    // Again, with the refund already made: it must not be made twice.
    match stop {
        Stop::Term => server.terminate().await,
        Stop::Kill9 => server.kill9(),
    }
    server.restart().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_refunded_once(&server, "sal", &id, &claimed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_happens_once_across_a_graceful_restart() {
    refund_once_across_restarts(Stop::Term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_happens_once_across_kill_9() {
    refund_once_across_restarts(Stop::Kill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_right_after_expiry_keeps_the_refund_once() {
    let mut server = TestServer::start(Opts::sets(2)).await;
    server.deposit_ok("sal", 10_000).await;
    let id = send_short_lived(&server, "sal").await;
    let ava = server.claim_ok(&id, "ava").await;
    let cy = server.claim_ok(&id, "cy").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_expired(&server, &id).await;

    server.kill9();
    server.restart().await;
    assert_refunded_once(&server, "sal", &id, &[("ava", ava), ("cy", cy)]).await;
}
