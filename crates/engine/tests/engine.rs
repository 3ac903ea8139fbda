//! Engine tests on real SQLite stores in a temp dir, with an injected clock: expiry and hold
//! timeouts without sleeping for real, credits across sets, idempotency and restarts.

use std::sync::Arc;
use std::time::Duration;

use hongbao_core::{
    Amount, Audience, ClaimError, Kind, Limits, ManualClock, PacketId, RequestId, SendRequest, UserId,
    ValidSend,
};
use hongbao_engine::{Engine, EngineConfig, EngineError, GrabReply};
use hongbao_store::{Batch, Loaded, NullReader, NullStore, Paging, Reader, Span, Store, StoreSums};

const T0_MS: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn rid(s: &str) -> RequestId {
    RequestId::parse(s).unwrap()
}

fn fen(v: i64) -> Amount {
    Amount::new(v).unwrap()
}

fn start(dir: &std::path::Path, sets: u32, clock: &ManualClock) -> Engine {
    let mut config = EngineConfig::new(dir.to_path_buf());
    config.sets = sets;
    config.seed = Some(7);
    Engine::start(config, Arc::new(clock.clone())).expect("engine starts")
}

#[allow(clippy::too_many_arguments)]
fn send(
    engine: &Engine,
    sender: &str,
    kind: Kind,
    total: i64,
    count: i64,
    audience: Audience,
    expires_in_s: Option<i64>,
    r: &str,
) -> ValidSend {
    engine
        .limits()
        .validate_send(SendRequest {
            sender: user(sender),
            kind,
            total_fen: total,
            count,
            audience,
            greeting: Some("恭喜发财".into()),
            expires_in_s,
            request_id: rid(r),
        })
        .expect("valid send")
}

/// Waits until the audit shows no credit in flight, and returns it.
async fn settled_audit(engine: &Engine) -> hongbao_engine::AuditReport {
    for _ in 0..200 {
        let a = engine.audit().await.expect("audit");
        assert!(a.ok, "audit failed: {:?}", a.problems);
        if a.in_flight_fen == 0 {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("credits did not settle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_across_sets_credit_each_receiver_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let engine = start(dir.path(), 4, &clock);
    engine.deposit(user("boss"), fen(100_000), rid("d1")).await.unwrap();
    let users: Vec<UserId> = (0..40).map(|i| user(&format!("u{i}"))).collect();
    let v = send(&engine, "boss", Kind::Lucky, 10_000, 30, Audience::users(users.clone()), None, "s1");
    let p = engine.send(v).await.unwrap();

    let mut paid = 0;
    let mut turned_away = 0;
    for u in &users {
        match engine.claim(p.id, u.clone()).await {
            Ok(c) => {
                assert!(c.amount_fen >= 1);
                paid += c.amount_fen;
                let again = engine.claim(p.id, u.clone()).await.unwrap();
                assert_eq!(again, c, "a repeated claim returns the same share");
            }
            Err(EngineError::Claim(ClaimError::Exhausted)) => turned_away += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(paid, 10_000);
    assert_eq!(turned_away, 10);
    let a = settled_audit(&engine).await;
    assert_eq!(a.deposits_fen, 100_000);
    assert_eq!(a.escrow_fen, 0);
    assert_eq!(a.balances_fen, 100_000);
    let mut sum = 0;
    for u in &users {
        sum += engine.wallet(u.clone()).await.unwrap().balance_fen;
    }
    assert_eq!(sum, 10_000, "every share reached its wallet exactly once");
    let details = engine.packet(p.id, None, 100).await.unwrap();
    assert_eq!(details.claims.len(), 30);
    let best = details.best_luck.expect("best luck once exhausted");
    assert_eq!(best.amount_fen, details.claims.iter().map(|c| c.amount_fen).max().unwrap());
    engine.shutdown().await;
}

/// A set does not hold a claimer's wallet until it first debits them: their credits are rows
/// the store adds up. Their balances read whole, their first withdrawal or send reads the
/// store (with what the fold has not applied yet), and a restart finds every balance where
/// it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimers_spend_what_their_sets_credited_without_holding_their_wallets() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let engine = start(dir.path(), 2, &clock);
    engine.deposit(user("boss"), fen(100_000), rid("d1")).await.unwrap();
    let claimers: Vec<UserId> = (0..30).map(|i| user(&format!("c{i}"))).collect();
    for k in 0..3 {
        let v = send(&engine, "boss", Kind::Equal, 3_000, 30, Audience::Anyone, None, &format!("s{k}"));
        let p = engine.send(v).await.unwrap();
        let answers = engine.claim_many(claimers.iter().map(|u| (p.id, u.clone())).collect()).await;
        assert!(answers.iter().all(|a| matches!(a, Ok(c) if c.amount_fen == 100)), "{answers:?}");
    }
    settled_audit(&engine).await;
    for u in &claimers {
        assert_eq!(engine.wallet(u.clone()).await.unwrap().balance_fen, 300, "{u}");
    }
    for (i, u) in claimers.iter().enumerate() {
        let w = engine.withdraw(u.clone(), fen(120), rid(&format!("w{i}"))).await.unwrap();
        assert_eq!(w.balance_fen, 180, "{u}: the 300 the store holds for them, less 120");
    }
    let more = engine.withdraw(claimers[0].clone(), fen(181), rid("w-more")).await;
    assert_eq!(more, Err(EngineError::InsufficientFunds));
    // A claimer sends what they received; c1 (held now) and two new claimers are credited.
    let v = send(&engine, "c0", Kind::Equal, 180, 3, Audience::Anyone, None, "c0-s");
    let p = engine.send(v).await.unwrap();
    for who in ["c1", "n1", "n2"] {
        assert_eq!(engine.claim(p.id, user(who)).await.unwrap().amount_fen, 60);
    }
    let a = settled_audit(&engine).await;
    assert_eq!((a.balances_fen, a.escrow_fen), (100_000 - 30 * 120, 0));
    engine.shutdown().await;

    let engine = start(dir.path(), 2, &clock);
    for (who, want) in [("boss", 91_000), ("c0", 0), ("c1", 240), ("c2", 180), ("n1", 60)] {
        assert_eq!(engine.wallet(user(who)).await.unwrap().balance_fen, want, "{who}");
    }
    engine.withdraw(user("n2"), fen(60), rid("n2-w")).await.unwrap();
    let a = settled_audit(&engine).await;
    assert_eq!(a.balances_fen, 100_000 - 30 * 120 - 60);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_refunds_the_remainder_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let engine = start(dir.path(), 2, &clock);
    engine.deposit(user("s"), fen(1_000), rid("d")).await.unwrap();
    let v = send(&engine, "s", Kind::Equal, 600, 3, Audience::Anyone, Some(60), "p");
    let p = engine.send(v).await.unwrap();
    let c = engine.claim(p.id, user("a")).await.unwrap();
    assert_eq!(c.amount_fen, 200);
    engine.shutdown().await;

    clock.advance_ms(61_000);
    let engine = start(dir.path(), 2, &clock);
    // The late claim closes the packet itself if the timer has not yet.
    let late = engine.claim(p.id, user("b")).await;
    assert_eq!(late, Err(EngineError::Claim(ClaimError::Expired)));
    let again = engine.claim(p.id, user("a")).await.unwrap();
    assert_eq!(again.amount_fen, 200, "a share opened before expiry is still answered");
    assert_eq!(engine.wallet(user("s")).await.unwrap().balance_fen, 400 + 400);
    engine.shutdown().await;

    clock.advance_ms(3_600_000);
    let engine = start(dir.path(), 2, &clock);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(engine.wallet(user("s")).await.unwrap().balance_fen, 800, "refunded once");
    let entries = engine.entries(user("s"), None, 50).await.unwrap();
    let refunds: Vec<_> = entries.entries.iter().filter(|e| e.kind.as_str() == "refund").collect();
    assert_eq!(refunds.len(), 1);
    assert_eq!(refunds[0].amount_fen, 400);
    let a = settled_audit(&engine).await;
    assert_eq!(a.deposits_fen, a.balances_fen + a.escrow_fen);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tick_expires_idle_packets() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let engine = start(dir.path(), 1, &clock);
    engine.deposit(user("s"), fen(500), rid("d")).await.unwrap();
    let p =
        engine.send(send(&engine, "s", Kind::Lucky, 500, 5, Audience::Anyone, Some(5), "p")).await.unwrap();
    assert_eq!(engine.wallet(user("s")).await.unwrap().balance_fen, 0);
    clock.advance_ms(5_000);
    let mut refunded = false;
    for _ in 0..100 {
        if engine.wallet(user("s")).await.unwrap().balance_fen == 500 {
            refunded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refunded, "the expiry timer refunds without any request for the packet");
    let d = engine.packet(p.id, None, 10).await.unwrap();
    assert_eq!(d.status.as_str(), "expired");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_reserve_a_share_until_they_lapse() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let engine = start(dir.path(), 1, &clock);
    engine.deposit(user("s"), fen(100), rid("d")).await.unwrap();
    let p = engine.send(send(&engine, "s", Kind::Equal, 100, 1, Audience::Anyone, None, "p")).await.unwrap();

    assert_eq!(engine.open(p.id, user("a")).await, Err(EngineError::Claim(ClaimError::NotGrabbed)));
    let g = engine.grab(p.id, user("a")).await.unwrap();
    let GrabReply::Grabbed { hold_expires_at_ms } = g else { panic!("{g:?}") };
    assert_eq!(hold_expires_at_ms, T0_MS + Limits::default().hold_s * 1000);
    assert_eq!(engine.grab(p.id, user("b")).await, Err(EngineError::Claim(ClaimError::Exhausted)));
    clock.advance_ms(Limits::default().hold_s * 1000 + 1);
    assert!(
        matches!(engine.grab(p.id, user("b")).await, Ok(GrabReply::Grabbed { .. })),
        "a lapsed hold frees the share"
    );
    assert_eq!(engine.open(p.id, user("a")).await, Err(EngineError::Claim(ClaimError::NotGrabbed)));
    let c = engine.open(p.id, user("b")).await.unwrap();
    assert_eq!(c.amount_fen, 100);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_make_money_moves_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let engine = start(dir.path(), 2, &clock);
    let a = engine.deposit(user("s"), fen(1_000), rid("d1")).await.unwrap();
    let b = engine.deposit(user("s"), fen(1_000), rid("d1")).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(engine.deposit(user("s"), fen(5), rid("d1")).await, Err(EngineError::IdempotencyConflict));
    let v = send(&engine, "s", Kind::Lucky, 300, 3, Audience::Anyone, None, "p1");
    let p1 = engine.send(v.clone()).await.unwrap();
    let p2 = engine.send(v).await.unwrap();
    assert_eq!(p1, p2);
    assert_eq!(engine.wallet(user("s")).await.unwrap().balance_fen, 700, "debited once");
    let other = send(&engine, "s", Kind::Lucky, 301, 3, Audience::Anyone, None, "p1");
    assert_eq!(engine.send(other).await, Err(EngineError::IdempotencyConflict));
    assert_eq!(engine.withdraw(user("s"), fen(701), rid("w1")).await, Err(EngineError::InsufficientFunds));
    assert_eq!(engine.withdraw(user("s"), fen(700), rid("w1")).await.unwrap().balance_fen, 0);
    engine.shutdown().await;
    // Still remembered after a restart.
    let engine = start(dir.path(), 2, &clock);
    assert_eq!(engine.withdraw(user("s"), fen(700), rid("w1")).await.unwrap().balance_fen, 0);
    assert_eq!(engine.deposit(user("s"), fen(1_000), rid("d1")).await.unwrap().balance_fen, 1_000);
    assert_eq!(engine.wallet(user("s")).await.unwrap().balance_fen, 0);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_foreign_packets_are_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let engine = start(dir.path(), 2, &clock);
    let bogus = PacketId::parse("123456789").unwrap();
    assert_eq!(engine.claim(bogus, user("a")).await, Err(EngineError::NotFound));
    assert_eq!(engine.packet(bogus, None, 10).await, Err(EngineError::NotFound));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_keeps_its_set_count() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    start(dir.path(), 4, &clock).shutdown().await;
    let mut config = EngineConfig::new(dir.path().to_path_buf());
    config.sets = 2;
    let err = Engine::start(config, Arc::new(clock.clone())).err().expect("refused");
    assert!(err.contains("sets"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_many_answers_every_claim_in_order_as_single_claims_would() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let mut config = EngineConfig::new(dir.path().to_path_buf());
    config.sets = 3;
    config.seed = Some(7);
    // Small, so one call's claims for a set go as several messages.
    config.batch_max = 4;
    let engine = Engine::start(config.clone(), Arc::new(clock.clone())).expect("engine starts");
    // Two senders in different sets, so the call is split between sets.
    let a_sender = "sa".to_string();
    let b_sender = (0..)
        .map(|i| format!("sb{i}"))
        .find(|s| hongbao_core::set_of_user(&user(s), 3) != hongbao_core::set_of_user(&user(&a_sender), 3))
        .unwrap();
    for (s, r) in [(&a_sender, "da"), (&b_sender, "db")] {
        engine.deposit(user(s), fen(10_000), rid(r)).await.unwrap();
    }
    let a = engine
        .send(send(&engine, &a_sender, Kind::Lucky, 500, 5, Audience::Anyone, None, "sa1"))
        .await
        .unwrap();
    let b = engine
        .send(send(&engine, &b_sender, Kind::Equal, 300, 3, Audience::Anyone, None, "sb1"))
        .await
        .unwrap();
    assert_ne!(a.id.set(), b.id.set());
    let bogus = PacketId::parse("123456789").unwrap();

    // Interleaved: 8 claimers of A, 5 of B, an unknown packet, and a0 asking A twice.
    let mut claims = Vec::new();
    for i in 0..8 {
        claims.push((a.id, user(&format!("a{i}"))));
        if i < 5 {
            claims.push((b.id, user(&format!("b{i}"))));
        }
    }
    claims.push((bogus, user("lost")));
    claims.push((a.id, user("a0")));
    let answers = engine.claim_many(claims.clone()).await;
    assert_eq!(answers.len(), claims.len());

    let mut paid = std::collections::BTreeMap::new();
    for ((packet, who), answer) in claims.iter().zip(&answers) {
        let name = who.as_str();
        match answer {
            Ok(c) => {
                assert_eq!((c.packet_id, &c.user), (*packet, who), "an answer for its own claim");
                let first = paid.insert((*packet, name.to_string()), c.amount_fen);
                if let Some(first) = first {
                    assert_eq!(first, c.amount_fen, "a repeated claim returns the same share");
                }
            }
            Err(EngineError::Claim(ClaimError::Exhausted)) => {
                // In order: only those after the packet's last share are turned away.
                let i: usize = name[1..].parse().unwrap();
                assert!(*packet == a.id && i >= 5 || *packet == b.id && i >= 3, "{name} turned away early");
            }
            Err(EngineError::NotFound) => assert_eq!(*packet, bogus),
            Err(e) => panic!("{name}: unexpected {e:?}"),
        }
    }
    let sum = |p: PacketId| paid.iter().filter(|((q, _), _)| *q == p).map(|(_, f)| f).sum::<i64>();
    assert_eq!((sum(a.id), sum(b.id)), (500, 300), "every share paid once");
    assert_eq!(paid.len(), 5 + 3);
    // A single claim agrees with what the batch paid.
    let again = engine.claim(a.id, user("a3")).await.unwrap();
    assert_eq!(again.amount_fen, paid[&(a.id, "a3".to_string())]);
    let audit = settled_audit(&engine).await;
    assert_eq!((audit.escrow_fen, audit.balances_fen), (0, 20_000), "both packets paid out, no fen lost");
    engine.shutdown().await;

    // Durable: after a restart the stored claims are the ones the batch acknowledged.
    let engine = Engine::start(config, Arc::new(clock.clone())).expect("engine restarts");
    for p in [a.id, b.id] {
        let details = engine.packet(p, None, 100).await.unwrap();
        for c in &details.claims {
            assert_eq!(Some(&c.amount_fen), paid.get(&(p, c.user.as_str().to_string())));
        }
        assert_eq!(details.claims.len(), if p == a.id { 5 } else { 3 });
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_of_many_claims_pays_each_share_once_and_credits_every_claimer() {
    // More claims in one call than a set asks memory for at a time, on two sets, so that both
    // the call's claims and the credits relayed to the other set run past several groups.
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let engine = start(dir.path(), 2, &clock);
    engine.deposit(user("boss"), fen(100_000), rid("d")).await.unwrap();
    let p = engine
        .send(send(&engine, "boss", Kind::Lucky, 60_000, 500, Audience::Anyone, None, "s"))
        .await
        .unwrap();
    let claims: Vec<_> = (0..700).map(|i| (p.id, user(&format!("crowd{i}")))).collect();
    let answers = engine.claim_many(claims.clone()).await;
    assert_eq!(answers.len(), 700);
    let mut paid = 0;
    for (i, answer) in answers.iter().enumerate() {
        match answer {
            Ok(c) => {
                assert!(i < 500, "claim {i} paid after the last share");
                assert_eq!(c.user, claims[i].1, "an answer for its own claim");
                paid += c.amount_fen;
            }
            Err(EngineError::Claim(ClaimError::Exhausted)) => {
                assert!(i >= 500, "claim {i} turned away early")
            }
            Err(e) => panic!("claim {i}: unexpected {e:?}"),
        }
    }
    assert_eq!(paid, 60_000, "every share paid once");
    let audit = settled_audit(&engine).await;
    assert_eq!((audit.escrow_fen, audit.balances_fen), (0, 100_000), "the packet paid out, no fen lost");
    for i in [0, 63, 64, 127, 128, 200, 499] {
        let who = user(&format!("crowd{i}"));
        let got = answers[i].as_ref().unwrap().amount_fen;
        assert_eq!(engine.wallet(who.clone()).await.unwrap().balance_fen, got, "{who:?} credited once");
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_packet_turns_away_everyone_but_its_claimers() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let engine = start(dir.path(), 2, &clock);
    engine.deposit(user("boss"), fen(1_000), rid("d")).await.unwrap();
    let group = Audience::users([user("a"), user("b"), user("c")]);
    let p = engine.send(send(&engine, "boss", Kind::Lucky, 300, 2, group, None, "s")).await.unwrap();
    let paid_a = engine.claim(p.id, user("a")).await.unwrap();
    let paid_b = engine.open(p.id, user("b")).await;
    assert_eq!(paid_b, Err(EngineError::Claim(ClaimError::NotGrabbed)));
    let paid_b = engine.claim(p.id, user("b")).await.unwrap();
    // Exhausted and committed: from here on the engine answers the crowd itself.
    for _ in 0..3 {
        assert_eq!(engine.claim(p.id, user("c")).await, Err(EngineError::Claim(ClaimError::Exhausted)));
        assert_eq!(engine.grab(p.id, user("c")).await.err(), Some(EngineError::Claim(ClaimError::Exhausted)));
        assert_eq!(engine.claim(p.id, user("z")).await, Err(EngineError::Claim(ClaimError::NotEligible)));
        // The claimers still get their own share, from the set.
        assert_eq!(engine.claim(p.id, user("a")).await.unwrap(), paid_a);
        assert_eq!(engine.open(p.id, user("b")).await.unwrap(), paid_b);
        assert_eq!(
            engine.claim_many(vec![(p.id, user("c")), (p.id, user("a"))]).await,
            [Err(EngineError::Claim(ClaimError::Exhausted)), Ok(paid_a.clone())]
        );
    }
    // Past its expiry an exhausted packet answers as expired, as the set would.
    clock.advance_ms(25 * 3600 * 1000);
    assert_eq!(engine.claim(p.id, user("c")).await, Err(EngineError::Claim(ClaimError::Expired)));
    assert_eq!(engine.claim(p.id, user("a")).await.unwrap(), paid_a);
    engine.shutdown().await;
}

/// Refusals answered without the set still yield: a task looping on claims of a packet that
/// is gone must not starve the other tasks of its runtime.
#[test]
fn a_caller_looping_on_refused_claims_still_yields() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0_MS);
    let engine = start(dir.path(), 1, &clock);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        engine.deposit(user("boss"), fen(100), rid("d")).await.unwrap();
        let p = engine
            .send(send(&engine, "boss", Kind::Equal, 100, 1, Audience::Anyone, None, "s"))
            .await
            .unwrap();
        engine.claim(p.id, user("first")).await.unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let looping = {
            let (engine, stop) = (engine.clone(), stop.clone());
            tokio::spawn(async move {
                let mut refused = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && refused < 1_000_000 {
                    let who = user(&format!("u{refused}"));
                    assert!(engine.claim(p.id, who).await.is_err());
                    refused += 1;
                }
                refused
            })
        };
        // On a one-thread runtime this runs only when the loop yields.
        tokio::spawn(async move { stop.store(true, std::sync::atomic::Ordering::Relaxed) }).await.unwrap();
        let refused = looping.await.unwrap();
        assert!(refused < 10_000, "the loop ran {refused} claims before the other task got a turn");
    });
    rt.block_on(engine.shutdown());
}

/// Keeps nothing, and counts the batches committed.
struct CountingStore(Arc<std::sync::atomic::AtomicUsize>);

impl Store for CountingStore {
    fn load(&mut self, since_ms: i64) -> hongbao_store::Result<Loaded> {
        NullStore.load(since_ms)
    }
    fn commit(&mut self, batch: &Batch) -> hongbao_store::Result<()> {
        if !batch.is_empty() {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }
    fn packet(&mut self, id: PacketId) -> hongbao_store::Result<Option<hongbao_core::Packet>> {
        NullStore.packet(id)
    }
    fn balance(&mut self, user: &UserId) -> hongbao_store::Result<Option<i64>> {
        NullStore.balance(user)
    }
    fn sums(&mut self) -> hongbao_store::Result<StoreSums> {
        NullStore.sums()
    }
}

/// Deposits into one set with `spacing` (and `batch_max`, else the default): one awaited, then
/// one more at once, then three 50 ms later. Returns the commits they took, how long the first
/// took, and how long the four later ones took.
async fn deposits_and_commits(spacing: Duration, batch_max: Option<usize>) -> (usize, Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let commits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut config = EngineConfig::new(dir.path().to_path_buf());
    config.seed = Some(7);
    config.commit_spacing = spacing;
    config.batch_max = batch_max.unwrap_or(config.batch_max);
    let stores: Vec<(Box<dyn Store>, Arc<dyn Reader>)> =
        vec![(Box::new(CountingStore(commits.clone())), Arc::new(NullReader))];
    let engine = Engine::start_with(config, stores, Arc::new(ManualClock::new(T0_MS))).unwrap();
    let deposit = |i: u32| {
        let engine = engine.clone();
        tokio::spawn(async move { engine.deposit(user("u"), fen(1), rid(&format!("d{i}"))).await })
    };
    let started = std::time::Instant::now();
    deposit(0).await.unwrap().unwrap();
    let first = started.elapsed();
    let started = std::time::Instant::now();
    let second = deposit(1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rest: Vec<_> = (2..5).map(deposit).collect();
    second.await.unwrap().unwrap();
    for r in rest {
        r.await.unwrap().unwrap();
    }
    let later = started.elapsed();
    let n = commits.load(std::sync::atomic::Ordering::SeqCst);
    engine.shutdown().await;
    (n, first, later)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_set_gathers_commands_for_its_commit_spacing_and_an_idle_set_commits_at_once() {
    // The first deposit finds the set idle and commits at once; the second arrives while that
    // commit is fresh, so the set waits out the spacing and takes the other three with it.
    let spacing = Duration::from_secs(2);
    let (commits, first, _) = deposits_and_commits(spacing, None).await;
    assert_eq!(commits, 2, "the four later deposits share one commit");
    assert!(first < spacing / 2, "an idle set waited {first:?} to commit");
    // Without spacing, the deposit sent 50 ms later is in a commit of its own.
    let (commits, _, _) = deposits_and_commits(Duration::ZERO, None).await;
    assert!(commits >= 3, "{commits} commits without spacing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_fills_commits_before_its_spacing_ends() {
    // A spacing of 10 s and batches of 4: the four later deposits fill a batch, which commits
    // when the last of them comes, not when the spacing ends.
    let (commits, _, later) = deposits_and_commits(Duration::from_secs(10), Some(4)).await;
    assert_eq!(commits, 2, "the four later deposits share one commit");
    assert!(later < Duration::from_secs(2), "a full batch waited {later:?} for the spacing");
}

/// Answers as `NullReader` does, says whether it blocks as told, and records the thread each
/// balance was read on.
struct WhereRead {
    blocks: bool,
    threads: std::sync::Mutex<Vec<std::thread::ThreadId>>,
}

impl Reader for WhereRead {
    fn blocks(&self) -> bool {
        self.blocks
    }
    fn balance(&self, user: &UserId) -> hongbao_store::Result<Option<i64>> {
        self.threads.lock().unwrap().push(std::thread::current().id());
        NullReader.balance(user)
    }
    fn entries(
        &self,
        u: &UserId,
        b: Option<i64>,
        l: u32,
    ) -> hongbao_store::Result<Vec<hongbao_store::EntryRow>> {
        NullReader.entries(u, b, l)
    }
    fn packet(&self, id: PacketId) -> hongbao_store::Result<Option<hongbao_store::PacketRow>> {
        NullReader.packet(id)
    }
    fn claims(
        &self,
        id: PacketId,
        a: Option<u32>,
        l: u32,
    ) -> hongbao_store::Result<Vec<hongbao_core::Claim>> {
        NullReader.claims(id, a, l)
    }
    fn sent(
        &self,
        u: &UserId,
        s: Span,
        p: Paging<PacketId>,
    ) -> hongbao_store::Result<hongbao_store::SentPage> {
        NullReader.sent(u, s, p)
    }
    fn received(
        &self,
        u: &UserId,
        s: Span,
        p: Paging<i64>,
    ) -> hongbao_store::Result<hongbao_store::ReceivedPage> {
        NullReader.received(u, s, p)
    }
    fn best_luck_count(&self, u: &UserId, s: Span) -> hongbao_store::Result<u64> {
        NullReader.best_luck_count(u, s)
    }
}

#[test]
fn a_reader_that_waits_on_nothing_is_read_on_the_callers_thread_and_one_that_may_on_a_query_thread() {
    for blocks in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = EngineConfig::new(dir.path().to_path_buf());
        config.seed = Some(7);
        let reader = Arc::new(WhereRead { blocks, threads: std::sync::Mutex::new(Vec::new()) });
        let stores: Vec<(Box<dyn Store>, Arc<dyn Reader>)> = vec![(Box::new(NullStore), reader.clone())];
        let engine = Engine::start_with(config, stores, Arc::new(ManualClock::new(T0_MS))).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let caller = std::thread::current().id();
        rt.block_on(async {
            assert_eq!(engine.wallet(user("u")).await.unwrap().balance_fen, 0);
        });
        rt.block_on(engine.shutdown());
        // The runtime runs on this thread: a read here is the caller's, one elsewhere the pool's.
        let threads = reader.threads.lock().unwrap().clone();
        assert_eq!(threads.len(), 1, "blocks: {blocks}");
        assert_eq!(threads[0] == caller, !blocks, "blocks: {blocks}");
    }
}
