//! A claim storm on 4 sets: 60 senders, 180 packets (lucky and equal, groups of up to 300
//! users and packets for anyone), 1,500 users claiming from 48 concurrent client tasks. Every
//! invariant of DESIGN.md §2 that shows from outside is checked afterwards, and the throughput
//! reached is printed (a figure, never asserted).

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;
use support::load::*;
use support::*;

const SETS: u32 = 4;
const SENDERS: usize = 60;
const PACKETS: usize = 180;
const USERS: usize = 1_500;
const GROUP_MAX: usize = 300;
/// Every sixth packet is for anyone.
const ANYONE_EVERY: usize = 6;
const CLIENTS: usize = 48;
/// Share of claimers who ask twice.
const DUP_PERCENT: u32 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_keeps_every_invariant() {
    // Arrange.
    let mut rng = StdRng::seed_from_u64(seed("storm"));
    let server = TestServer::start(Opts::sets(SETS)).await;
    let senders = names("s", SENDERS);
    let users = names("u", USERS);
    let plans = plan_packets(&mut rng, &senders, &users, PACKETS, GROUP_MAX, ANYONE_EVERY);
    let deposits = fund_senders(&server, &plans, &mut rng).await;
    let ids = Arc::new(send_all(&server, &plans, CLIENTS).await);
    let work = attempts(&mut rng, &plans, DUP_PERCENT);
    let requests = work.len();

    // Act.
    let started = Instant::now();
    let out = run_claims(&server.api(), ids.clone(), Work::new(work), CLIENTS).await;
    let elapsed = started.elapsed();
    println!(
        "storm: {requests} claim requests ({} paid, {} exhausted) from {CLIENTS} tasks in {:.2} s: {:.0} claims/s",
        out.paid.len(),
        out.exhausted.len(),
        elapsed.as_secs_f64(),
        out.requests_answered() as f64 / elapsed.as_secs_f64(),
    );

    // Assert: every request was answered, as a payment or as exhausted.
    assert!(
        out.unexpected.is_empty(),
        "unexpected answers: {:?}",
        &out.unexpected[..out.unexpected.len().min(20)]
    );
    assert!(
        out.unknown.is_empty(),
        "requests without an answer: {:?}",
        &out.unknown[..out.unknown.len().min(20)]
    );
    if out.shed > 0 {
        println!("storm: {} requests shed with 429/503 and retried", out.shed);
    }

    // A user asked twice got the same amount twice.
    let mut answered: HashMap<(usize, String), i64> = HashMap::new();
    for (p, user, amount) in &out.paid {
        if let Some(prev) = answered.insert((*p, user.clone()), *amount) {
            assert_eq!(prev, *amount, "packet {} paid {user} {prev} and then {amount}", ids[*p]);
        }
    }
    let mut turned_away: HashMap<usize, HashSet<String>> = HashMap::new();
    for (p, user) in &out.exhausted {
        turned_away.entry(*p).or_default().insert(user.clone());
    }

    // Per packet: §2 items 2–5, and the claims list is exactly what was answered 200.
    let mut views = Vec::new();
    let mut escrow = 0;
    let mut best_luck: HashMap<String, i64> = HashMap::new();
    for (i, plan) in plans.iter().enumerate() {
        let details = server.packet_full(&ids[i]).await;
        let view = check_packet(&details, plan.group_set().as_ref());
        let mut listed: Vec<(String, i64)> = view.claims.clone();
        listed.sort();
        let mut want: Vec<(String, i64)> =
            answered.iter().filter(|((p, _), _)| *p == i).map(|((_, u), a)| (u.clone(), *a)).collect();
        want.sort();
        assert_eq!(listed, want, "packet {}: claims listed differ from claims answered", ids[i]);
        let distinct_claimers = plan.claimers.len() as i64;
        assert_eq!(
            view.claims.len() as i64,
            plan.count.min(distinct_claimers),
            "packet {}: shares left while claimers were turned away",
            ids[i]
        );
        if let Some(away) = turned_away.get(&i) {
            for u in away {
                assert!(
                    !listed.iter().any(|(c, _)| c == u),
                    "packet {}: {u} was both paid and turned away",
                    ids[i]
                );
            }
        }
        if let Value::String(u) = &details["best_luck"]["user"] {
            *best_luck.entry(u.clone()).or_insert(0) += 1;
        }
        escrow += view.total - view.paid();
        views.push(view);
    }

    // Wallets, once every credit between sets has arrived.
    let audit = server.settle().await;
    let deposited: i64 = deposits.values().sum();
    assert_eq!(money(&audit), [deposited, 0, deposited - escrow, escrow, 0], "{audit}");
    let paid = paid_by_user(&views);
    let wallets = balances(&server, &users, CLIENTS).await;
    for u in &users {
        let want = paid.get(u).copied().unwrap_or(0);
        assert_eq!(wallets[u], want, "wallet of {u} differs from the sum of its claims");
    }
    let sender_wallets = balances(&server, &senders, CLIENTS).await;
    for s in &senders {
        let sent: i64 = plans.iter().filter(|p| &p.sender == s).map(|p| p.total).sum();
        assert_eq!(sender_wallets[s], deposits[s] - sent, "wallet of sender {s}");
    }

    // Histories agree with the claims, for a sample of users.
    for u in users.iter().step_by(97) {
        let (status, r) = server.received(u, "").await;
        assert_eq!(status, 200, "{r}");
        let n = views.iter().filter(|v| v.claims.iter().any(|(c, _)| c == u)).count() as i64;
        assert_eq!(r["count"].as_i64(), Some(n), "received count of {u}: {r}");
        assert_eq!(
            r["total_amount"].as_i64(),
            Some(paid.get(u).copied().unwrap_or(0)),
            "received total of {u}: {r}"
        );
        let best = best_luck.get(u).copied().unwrap_or(0);
        assert_eq!(r["best_luck_count"].as_i64(), Some(best), "best luck count of {u}: {r}");
    }
    for s in senders.iter().step_by(7) {
        let (status, r) = server.sent(s, "").await;
        assert_eq!(status, 200, "{r}");
        let mine: Vec<&Plan> = plans.iter().filter(|p| &p.sender == s).collect();
        assert_eq!(r["count"].as_i64(), Some(mine.len() as i64), "sent count of {s}: {r}");
        let total: i64 = mine.iter().map(|p| p.total).sum();
        assert_eq!(r["total_amount"].as_i64(), Some(total), "sent total of {s}: {r}");
    }
}
