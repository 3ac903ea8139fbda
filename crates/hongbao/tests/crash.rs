//! `kill -9` in the middle of a mixed storm, 20 times, restarting on the same data dir each
//! time (DESIGN.md §2 items 6 and 7): every claim answered 200 is still there with the same
//! amount, no share is paid twice, credits between sets arrive exactly once, and the books
//! balance after every restart. Sends and withdrawals acknowledged before a crash survive it,
//! and one whose answer was lost, retried with its request_id, happens once.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{json, Value};
use support::load::*;
use support::*;

const SETS: u32 = 4;
/// Crash cycles; `HONGBAO_CRASH_CYCLES` runs more.
fn kills() -> usize {
    std::env::var("HONGBAO_CRASH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(20)
}
const SENDERS: usize = 20;
/// Packets per crash cycle, so every cycle has a storm under way when the kill lands.
const PACKETS_PER_KILL: usize = 16;
const USERS: usize = 800;
const GROUP_MAX: usize = 200;
const ANYONE_EVERY: usize = 5;
const CLIENTS: usize = 32;
const DUP_PERCENT: u32 = 5;
/// The side sender, whose packets are sent while the server is killed.
const SIDE_SENDER: &str = "side-sender";
const SIDE_DEPOSIT: i64 = 1_000_000;
/// Users who withdraw small amounts beside the storm, in every set.
const WITHDRAWERS: usize = 8;
const WITHDRAWER_DEPOSIT: i64 = 100_000;
/// How long a round waits for its share of answers before killing anyway.
const ROUND_WAIT: Duration = Duration::from_secs(60);

/// What the test knows for certain: claims answered 200, and its own acknowledged sends.
#[derive(Default)]
struct Known {
    /// (packet index, user) → amount.
    paid: HashMap<(usize, String), i64>,
    /// request_id → (packet id, total) of side sends answered 201.
    sends: HashMap<String, (String, i64)>,
    /// request_id → (user, amount) of withdrawals answered 200.
    withdrawals: HashMap<String, (String, i64)>,
    unexpected: Vec<String>,
}

impl Known {
    fn add(&mut self, out: Outcome, ids: &[String]) {
        for (p, user, amount) in out.paid {
            if let Some(prev) = self.paid.insert((p, user.clone()), amount) {
                assert_eq!(prev, amount, "packet {} paid {user} {prev} and later {amount}", ids[p]);
            }
        }
        self.unexpected.extend(out.unexpected);
    }
}

/// Sends small packets from the side sender until told to stop or the server dies; returns
/// the sends answered and the request ids whose answer was lost.
async fn side_sends(
    api: Api,
    stop: Arc<std::sync::atomic::AtomicBool>,
    pending: Vec<(String, i64)>,
) -> (Vec<(String, String, i64)>, Vec<(String, i64)>, Vec<String>) {
    let mut done = Vec::new();
    let mut unexpected = Vec::new();
    let mut todo: Vec<(String, i64)> = pending;
    let mut n = 0;
    loop {
        let (request_id, total) = match todo.pop() {
            Some(t) => t,
            None => {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return (done, Vec::new(), unexpected);
                }
                n += 1;
                (rid("side"), 10 + n % 7)
            }
        };
        let body = json!({
            "sender": SIDE_SENDER, "kind": "lucky", "total_amount": total, "count": 1,
            "audience": {"anyone": true}, "request_id": request_id,
        });
        match api.try_call(Method::POST, "/v1/packets", Some(API_KEY), Some(&body)).await {
            Err(_) => {
                todo.push((request_id, total));
                return (done, todo, unexpected);
            }
            Ok(r) if r.status == 201 => match r.body["id"].as_str() {
                Some(id) => done.push((request_id, id.to_string(), total)),
                None => unexpected.push(format!("send {body}: 201 {}", r.body)),
            },
            Ok(r) if r.status == 429 || r.status == 503 => {
                todo.push((request_id, total));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(r) => unexpected.push(format!("send {body}: {} {}", r.status, r.body)),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A withdrawal whose answer was lost: asked again with the same request id after the restart.
type Withdrawal = (String, String, i64);

/// Withdraws a few fen at a time from the withdrawers until told to stop or the server dies;
/// returns the withdrawals answered 200 and those whose answer was lost.
async fn side_withdrawals(
    api: Api,
    stop: Arc<std::sync::atomic::AtomicBool>,
    pending: Vec<Withdrawal>,
) -> (Vec<Withdrawal>, Vec<Withdrawal>, Vec<String>) {
    let mut done = Vec::new();
    let mut unexpected = Vec::new();
    let mut todo = pending;
    let mut n = 0;
    loop {
        let (request_id, user, amount) = match todo.pop() {
            Some(t) => t,
            None => {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return (done, Vec::new(), unexpected);
                }
                n += 1;
                (rid("wd"), format!("wd{}", n % WITHDRAWERS), 1 + (n % 9) as i64)
            }
        };
        let body = json!({"amount": amount, "request_id": request_id});
        let path = format!("/v1/wallets/{user}/withdraw");
        match api.try_call(Method::POST, &path, Some(API_KEY), Some(&body)).await {
            Err(_) => {
                todo.push((request_id, user, amount));
                return (done, todo, unexpected);
            }
            Ok(r) if r.status == 200 => done.push((request_id, user, amount)),
            Ok(r) if r.status == 429 || r.status == 503 => {
                todo.push((request_id, user, amount));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(r) => unexpected.push(format!("withdraw {body} from {user}: {} {}", r.status, r.body)),
        }
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

/// Every acknowledged claim is listed with its amount; every packet keeps §2 items 2–5.
async fn check_acknowledged(api: &Api, plans: &[Plan], ids: &[String], known: &Known) -> Vec<PacketView> {
    let mut views = Vec::new();
    for (i, plan) in plans.iter().enumerate() {
        let details = api.packet_full(&ids[i]).await;
        let view = check_packet(&details, plan.group_set().as_ref());
        let listed: HashMap<&str, i64> = view.claims.iter().map(|(u, a)| (u.as_str(), *a)).collect();
        for ((p, user), amount) in known.paid.iter().filter(|((p, _), _)| *p == i) {
            assert_eq!(
                listed.get(user.as_str()),
                Some(amount),
                "packet {}: claim by {user} answered 200 with {amount} is missing or changed after kill -9",
                ids[*p]
            );
        }
        for (user, _) in &view.claims {
            assert!(plan.claimers.contains(user), "packet {} paid {user}, who never asked", ids[i]);
        }
        views.push(view);
    }
    views
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_storm_loses_nothing_acknowledged() {
    // Arrange: packets sent and acknowledged before any crash.
    let mut rng = StdRng::seed_from_u64(seed("crash"));
    // At info, the server says what each start recovered: a failed check prints it.
    let mut server = TestServer::start(Opts { log: Some("info"), ..Opts::sets(SETS) }).await;
    let senders = names("s", SENDERS);
    let users = names("u", USERS);
    let plans = plan_packets(
        &mut rng,
        &senders,
        &users,
        (PACKETS_PER_KILL * kills()).max(48),
        GROUP_MAX,
        ANYONE_EVERY,
    );
    let deposits = fund_senders(&server, &plans, &mut rng).await;
    server.deposit_ok(SIDE_SENDER, SIDE_DEPOSIT).await;
    for w in 0..WITHDRAWERS {
        server.deposit_ok(&format!("wd{w}"), WITHDRAWER_DEPOSIT).await;
    }
    let ids = Arc::new(send_all(&server, &plans, CLIENTS).await);
    let attempts = attempts(&mut rng, &plans, DUP_PERCENT);
    let per_round = attempts.len() / (kills() + 2);
    let work = Work::new(attempts);
    let mut known = Known::default();
    let mut side_pending: Vec<(String, i64)> = Vec::new();
    let mut withdrawals_pending: Vec<Withdrawal> = Vec::new();
    let deposited: i64 =
        deposits.values().sum::<i64>() + SIDE_DEPOSIT + WITHDRAWER_DEPOSIT * WITHDRAWERS as i64;

    for round in 0..=kills() {
        // Act: a storm, and a kill -9 once it is well under way (except in the last round).
        work.reset_answered();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let side = tokio::spawn(side_sends(server.api(), stop.clone(), std::mem::take(&mut side_pending)));
        let withdrawer = tokio::spawn(side_withdrawals(
            server.api(),
            stop.clone(),
            std::mem::take(&mut withdrawals_pending),
        ));
        let storm = {
            let (api, ids, work) = (server.api(), ids.clone(), work.clone());
            tokio::spawn(async move { run_claims(&api, ids, work, CLIENTS).await })
        };
        let started = Instant::now();
        if round < kills() {
            // Half a round's share answered is "well under way"; the other half is the margin
            // that keeps work queued when the kill lands, however fast the machine is.
            while work.answered() < per_round / 2 && work.len() > 0 {
                assert!(started.elapsed() < ROUND_WAIT, "round {round}: storm made no progress");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..5))).await;
            assert!(work.len() > 0, "round {round}: the storm ended before the kill");
            server.kill9();
        }
        let out = storm.await.expect("storm task");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (sent, lost, unexpected) = side.await.expect("side task");
        let (withdrawn, withdrawals_lost, withdrawals_unexpected) =
            withdrawer.await.expect("withdrawal task");
        println!(
            "crash round {round}: {} paid, {} exhausted, {} without answer, {} side sends, {} withdrawals \
             ({} to retry)",
            out.paid.len(),
            out.exhausted.len(),
            out.unknown.len(),
            sent.len(),
            withdrawn.len(),
            withdrawals_lost.len()
        );
        for (request_id, user, amount) in withdrawn {
            known.withdrawals.insert(request_id, (user, amount));
        }
        withdrawals_pending = withdrawals_lost;
        known.unexpected.extend(withdrawals_unexpected);
        for (request_id, id, total) in sent {
            if let Some((prev, _)) = known.sends.insert(request_id.clone(), (id.clone(), total)) {
                assert_eq!(prev, id, "send {request_id} retried after a crash made another packet");
            }
        }
        side_pending = lost;
        known.unexpected.extend(unexpected);
        // Claims without an answer are asked again after the restart.
        work.push_front(out.unknown.iter().cloned());
        known.add(out, &ids);
        assert!(
            known.unexpected.is_empty(),
            "unexpected answers: {:?}",
            &known.unexpected[..known.unexpected.len().min(20)]
        );

        if round < kills() {
            server.restart().await;
            // Assert, after each restart: nothing acknowledged was lost, and the books balance.
            check_acknowledged(&server, &plans, &ids, &known).await;
            server.settle().await;
        }
    }
    assert!(side_pending.is_empty(), "side sends still without an answer after the last round");
    assert!(withdrawals_pending.is_empty(), "withdrawals still without an answer after the last round");
    assert!(!known.withdrawals.is_empty(), "no withdrawal was acknowledged");
    assert_eq!(work.len(), 0);

    // Assert: the final state. The last round ends on a live server, not a restart (which
    // folds the whole journal before it serves): queries wait at most 500 ms for the fold and
    // then answer from what is folded (ARCHITECTURE.md), and on a machine busy with other work
    // the fold can trail the last storm by more. The audit waits for all of it.
    server.settle().await;
    let views = check_acknowledged(&server, &plans, &ids, &known).await;
    for (i, (plan, view)) in plans.iter().zip(&views).enumerate() {
        assert_eq!(
            view.claims.len() as i64,
            plan.count.min(plan.claimers.len() as i64),
            "packet {}: every claimer asked until answered, yet shares are left",
            ids[i]
        );
    }
    // Asked again, an acknowledged claim answers the same amount.
    for ((p, user), amount) in known.paid.iter().step_by(7) {
        assert_eq!(
            server.claim_ok(&ids[*p], user).await,
            *amount,
            "claim by {user} asked again after the crashes"
        );
    }

    let audit = server.settle().await;
    let escrow_storm: i64 = views.iter().map(|v| v.total - v.paid()).sum();
    let side_total: i64 = known.sends.values().map(|(_, t)| t).sum();
    let escrow = escrow_storm + side_total;
    let withdrawn: i64 = known.withdrawals.values().map(|(_, a)| a).sum();
    assert_eq!(money(&audit), [deposited, withdrawn, deposited - withdrawn - escrow, escrow, 0], "{audit}");

    // Each withdrawal happened once: a wallet is its deposit less what it was acknowledged.
    for w in 0..WITHDRAWERS {
        let user = format!("wd{w}");
        let out: i64 = known.withdrawals.values().filter(|(u, _)| *u == user).map(|(_, a)| a).sum();
        assert_eq!(
            server.balance(&user).await,
            WITHDRAWER_DEPOSIT - out,
            "wallet of {user} after the crashes"
        );
    }

    // No share paid twice: each wallet is exactly the sum of its listed claims.
    let paid = paid_by_user(&views);
    let wallets = balances(&server, &users, CLIENTS).await;
    for u in &users {
        assert_eq!(wallets[u], paid.get(u).copied().unwrap_or(0), "wallet of {u} after three kill -9");
    }
    for s in &senders {
        let sent: i64 = plans.iter().filter(|p| &p.sender == s).map(|p| p.total).sum();
        assert_eq!(server.balance(s).await, deposits[s] - sent, "wallet of sender {s}");
    }

    // The side sender: one packet per request_id, acknowledged or retried.
    let (status, sent) = server.sent(SIDE_SENDER, "").await;
    assert_eq!(status, 200, "{sent}");
    assert_eq!(sent["count"].as_i64(), Some(known.sends.len() as i64), "side sends made: {sent}");
    assert_eq!(sent["total_amount"].as_i64(), Some(side_total), "{sent}");
    assert_eq!(server.balance(SIDE_SENDER).await, SIDE_DEPOSIT - side_total);
    let listed: Vec<Value> = {
        let mut all = Vec::new();
        let mut query = "?limit=100".to_string();
        loop {
            let (status, page) = server.sent(SIDE_SENDER, &query).await;
            assert_eq!(status, 200, "{page}");
            all.extend(page["items"].as_array().expect("items").iter().cloned());
            match &page["next_cursor"] {
                Value::Null => break all,
                c => query = format!("?limit=100&cursor={}", cursor_param(c)),
            }
        }
    };
    let mut listed_ids: Vec<String> = listed
        .iter()
        .map(|i| {
            i["id"]
                .as_str()
                .or(i["packet_id"].as_str())
                .unwrap_or_else(|| panic!("sent item without an id: {i}"))
                .to_string()
        })
        .collect();
    listed_ids.sort();
    let mut known_ids: Vec<String> = known.sends.values().map(|(id, _)| id.clone()).collect();
    known_ids.sort();
    assert_eq!(listed_ids, known_ids, "side sender's packets");
}
