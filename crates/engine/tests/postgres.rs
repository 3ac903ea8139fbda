//! The engine unchanged on a real PostgreSQL: claims across sets, a restart that rebuilds
//! memory from the database, expiry refunds and the audit.

use std::sync::Arc;
use std::time::Duration;

use hongbao_core::{Amount, Audience, Kind, ManualClock, RequestId, SendRequest, UserId};
use hongbao_engine::{Engine, EngineConfig};
use hongbao_testkit::PgCluster;

const T0_MS: i64 = 1_767_225_600_000;

fn start(url: &str, clock: &ManualClock) -> Engine {
    let mut config = EngineConfig::new(std::env::temp_dir());
    config.sets = 4;
    config.store_url = Some(url.to_string());
    Engine::start(config, Arc::new(clock.clone())).expect("engine starts on PostgreSQL")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_restart_and_expiry_on_postgres() {
    let pg = PgCluster::start();
    let clock = ManualClock::new(T0_MS);
    let engine = start(&pg.url(), &clock);
    let user = |s: &str| UserId::parse(s).unwrap();
    engine.deposit(user("boss"), Amount::new(50_000).unwrap(), RequestId::parse("d").unwrap()).await.unwrap();
    let users: Vec<UserId> = (0..30).map(|i| user(&format!("u{i}"))).collect();
    let send = engine
        .limits()
        .validate_send(SendRequest {
            sender: user("boss"),
            kind: Kind::Lucky,
            total_fen: 10_000,
            count: 20,
            audience: Audience::users(users.clone()),
            greeting: None,
            expires_in_s: Some(60),
            request_id: RequestId::parse("p").unwrap(),
        })
        .unwrap();
    let p = engine.send(send).await.unwrap();
    let mut paid = std::collections::BTreeMap::new();
    for u in users.iter().take(12) {
        paid.insert(u.clone(), engine.claim(p.id, u.clone()).await.unwrap().amount_fen);
    }
    engine.shutdown().await;

    let engine = start(&pg.url(), &clock);
    for (u, amount) in &paid {
        assert_eq!(
            engine.claim(p.id, u.clone()).await.unwrap().amount_fen,
            *amount,
            "same share after restart"
        );
    }
    clock.advance_ms(61_000);
    let late = engine.claim(p.id, users[20].clone()).await;
    assert!(late.is_err(), "expired: {late:?}");
    let paid_total: i64 = paid.values().sum();
    let mut settled = false;
    for _ in 0..200 {
        let a = engine.audit().await.unwrap();
        assert!(a.ok, "{:?}", a.problems);
        if a.in_flight_fen == 0 {
            settled = true;
            assert_eq!(a.escrow_fen, 0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(settled);
    let boss = engine.wallet(user("boss")).await.unwrap().balance_fen;
    assert_eq!(boss, 50_000 - paid_total, "refund of exactly the unclaimed rest");
    let mut received = 0;
    for u in paid.keys() {
        received += engine.wallet(u.clone()).await.unwrap().balance_fen;
    }
    assert_eq!(received, paid_total);
    engine.shutdown().await;
}
