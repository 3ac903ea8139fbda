//! Store faults: when commits fail (disk full, I/O error) the set takes no writes (503),
//! loses nothing acknowledged, and recovers by itself once the store works again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hongbao_core::{Amount, ManualClock, Millis, Packet, PacketId, RequestId, UserId};
use hongbao_engine::{Engine, EngineConfig, EngineError};
use hongbao_store::{open_sqlite, Batch, Loaded, Reader, Store, StoreError, StoreSums};

/// A SQLite store whose commits fail while `broken` is set, like a full disk.
struct BreakableStore {
    inner: hongbao_store::SqliteStore,
    broken: Arc<AtomicBool>,
}

impl Store for BreakableStore {
    fn load(&mut self, since: Millis) -> Result<Loaded, StoreError> {
        self.inner.load(since)
    }
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(StoreError::Io("database or disk is full".into()));
        }
        self.inner.commit(batch)
    }
    fn packet(&mut self, id: PacketId) -> Result<Option<Packet>, StoreError> {
        self.inner.packet(id)
    }
    fn balance(&mut self, user: &UserId) -> Result<Option<i64>, StoreError> {
        self.inner.balance(user)
    }
    fn sums(&mut self) -> Result<StoreSums, StoreError> {
        self.inner.sums()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commits_refuse_writes_then_recover() {
    let dir = tempfile::tempdir().unwrap();
    let broken = Arc::new(AtomicBool::new(false));
    let (store, reader) = open_sqlite(dir.path(), 0, 1).unwrap();
    let store = BreakableStore { inner: store, broken: broken.clone() };
    let stores: Vec<(Box<dyn Store>, Arc<dyn Reader>)> = vec![(Box::new(store), Arc::new(reader))];
    let config = EngineConfig::new(dir.path().to_path_buf());
    let engine = Engine::start_with(config, stores, Arc::new(ManualClock::new(1_767_225_600_000))).unwrap();
    let alice = UserId::parse("alice").unwrap();
    let fen = |v| Amount::new(v).unwrap();
    let rid = |s: &str| RequestId::parse(s).unwrap();

    engine.deposit(alice.clone(), fen(100), rid("ok-1")).await.unwrap();
    broken.store(true, Ordering::SeqCst);
    let mut refused = 0;
    for i in 0..20 {
        match engine.deposit(alice.clone(), fen(1), rid(&format!("bad-{i}"))).await {
            Err(EngineError::Unavailable) => refused += 1,
            other => panic!("a deposit was acknowledged while the disk was full: {other:?}"),
        }
    }
    assert_eq!(refused, 20);
    assert_eq!(engine.wallet(alice.clone()).await.unwrap().balance_fen, 100, "nothing unacknowledged stored");

    broken.store(false, Ordering::SeqCst);
    let mut recovered = false;
    for _ in 0..100 {
        match engine.deposit(alice.clone(), fen(5), rid("ok-2")).await {
            Ok(w) => {
                assert_eq!(w.balance_fen, 105);
                recovered = true;
                break;
            }
            Err(EngineError::Unavailable) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(recovered, "the set takes writes again once the store works");
    let audit = engine.audit().await.unwrap();
    assert!(audit.ok, "{:?}", audit.problems);
    assert_eq!(audit.deposits_fen, 105);
    engine.shutdown().await;
}
