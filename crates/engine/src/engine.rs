//! The engine handle: starts the sets, routes each command to its set and awaits the reply.
//!
//! Routing: a wallet lives in set hash(user) mod S; a packet in the set its id names (its
//! sender's wallet set). The handle never blocks an async task: commands go in with
//! `try_send`, and a full queue is an immediate `Overloaded`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};
use hongbao_core::{set_of_user, Amount, Clock, Limits, Millis, PacketId, RequestId, UserId, ValidSend};
use hongbao_store::{Reader, Store};
use tokio::sync::oneshot;

use crate::closed::ClosedPackets;
use crate::reply::*;
use crate::set::{self, Command, SetContext};

/// What a set's thread is called, followed by the set's index.
pub const SET_THREAD: &str = "hongbao-set-";

/// The default [`EngineConfig::commit_spacing`]. In the HTTP festival (2 sets, 256
/// connections) the sets committed about 1,600 times a second each, 15 claims a commit, and
/// the `fdatasync`s were most of their CPU; 1 ms spacing adds at most a millisecond to a claim
/// that arrives just after a commit began (BENCHMARKS.md, 2026-12-03, third session).
pub const COMMIT_SPACING_DEFAULT: Duration = Duration::from_millis(1);

/// How the engine runs. Every bound has a reason in its doc.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sets on this node (≥ 1). Fixed for the life of a data dir: a user's wallet set is
    /// hash(user) mod sets.
    pub sets: u32,
    /// Where the SQLite files live, one per set (and where generated keys are kept).
    pub data_dir: PathBuf,
    /// `Some(postgres://…)` keeps every set in that PostgreSQL database (a schema per set)
    /// instead of SQLite files.
    pub store_url: Option<String>,
    /// `Some(postgres://…)`: queries (balances, history, packet details) read from this server,
    /// normally a streaming standby of `store_url`'s, instead of the primary. Needs a
    /// PostgreSQL `store_url`. Answers may trail acknowledged writes by the standby's replay
    /// lag: see `hongbao_store::open_postgres_reader`.
    pub replica_url: Option<String>,
    /// SQLite only: commit each batch to an append-only journal (one fsync of a few KB) and
    /// fold it into the SQLite file in the background (`hongbao_store::open_journaled_sqlite`),
    /// instead of one SQLite transaction per batch on the commit path.
    pub journal: bool,
    pub limits: Limits,
    /// Commands waiting per set. A full queue refuses new work at once (503) instead of
    /// letting latency grow without bound.
    pub queue_depth: usize,
    /// Most commands applied and committed in one batch: bounds commit latency and memory.
    pub batch_max: usize,
    /// Least time between the starts of a set's commits while it is busy: a set whose last
    /// commit began less than this ago sleeps out the rest of it and takes the commands that
    /// came (up to `batch_max`) before it commits again. Under load each commit (an
    /// `fdatasync`) then carries more commands, and the set spends less CPU per command; an
    /// idle set commits at once. Zero commits as soon as the queue is empty.
    pub commit_spacing: Duration,
    /// How long a request_id is remembered.
    pub idempotency_retention_s: i64,
    /// Seed for packet seeds; `None` draws one from the operating system.
    pub seed: Option<u64>,
}

impl EngineConfig {
    pub fn new(data_dir: PathBuf) -> EngineConfig {
        EngineConfig {
            sets: 1,
            data_dir,
            store_url: None,
            replica_url: None,
            journal: true,
            limits: Limits::default(),
            queue_depth: 16_384,
            batch_max: 2_048,
            commit_spacing: COMMIT_SPACING_DEFAULT,
            idempotency_retention_s: 24 * 3600,
            seed: None,
        }
    }
}

/// A set's write side and read side.
type SetStore = (Box<dyn Store>, Arc<dyn Reader>);

/// A cheap, cloneable handle to the running sets.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    config: EngineConfig,
    queues: Vec<Sender<Command>>,
    readers: Vec<Arc<dyn Reader>>,
    /// Whether any reader's reads may wait on I/O (`Reader::blocks`): then every query runs on
    /// the blocking pool.
    reads_block: bool,
    ready: Vec<Arc<AtomicBool>>,
    /// Set once shutdown begins: new commands are refused, and sets reloading give up.
    stopping: Arc<AtomicBool>,
    /// Per set, its closed packets: grabs, opens and claims of them by anyone but their
    /// claimers are answered here, without the set.
    closed: Vec<Arc<ClosedPackets>>,
    clock: Arc<dyn Clock>,
    /// Set threads, joined at shutdown. Guarded by a std mutex, never held across `.await`.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// One audit at a time: an audit pauses every set. Held across `.await` by design.
    audit_lock: tokio::sync::Mutex<()>,
    /// Bounds queries running at once, so a flood of history requests cannot take the CPU
    /// that grabs and opens need: past the bound, queries are refused (503).
    pub(crate) query_permits: Arc<tokio::sync::Semaphore>,
    /// Requests answered from `closed`, for the metrics. A plain counter, read when metrics
    /// are rendered: the recorder's own lookup by name cost each refusal more than the rest
    /// of its answer.
    closed_refusals: AtomicU64,
}

/// One set's part of a `claim_many` call: the positions of its claims in the call, and the
/// claims.
type Routed = (Vec<usize>, Vec<(PacketId, UserId)>);

/// A reply on its way from a set.
type Answer<T> = oneshot::Receiver<Result<T, EngineError>>;

/// Awaits a set's reply. A dropped reply sender means the set stopped before applying the
/// command.
async fn answer<T>(rx: Answer<T>) -> Result<T, EngineError> {
    rx.await.unwrap_or(Err(EngineError::Unavailable))
}

/// How long shutdown waits for room in a set's queue.
const SHUTDOWN_SEND_WAIT: Duration = Duration::from_secs(10);

/// Queries that may run at once (each holds a read connection and a blocking thread).
pub(crate) const QUERIES_RUNNING_MAX: usize = 16;
/// How long a query waits for a permit before it is refused as overloaded.
pub(crate) const QUERY_WAIT_MAX: Duration = Duration::from_millis(100);

impl Engine {
    /// Opens (or creates) one store per set — SQLite files under the data dir, or schemas in
    /// the PostgreSQL database of `store_url` — rebuilds each set's memory from it and starts
    /// the set threads. Blocks until every set has loaded.
    pub fn start(config: EngineConfig, clock: Arc<dyn Clock>) -> Result<Engine, String> {
        let mut stores: Vec<SetStore> = Vec::new();
        match &config.store_url {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                for set in 0..config.sets {
                    let (store, reader) = hongbao_store::open_postgres(url, set, config.sets)
                        .map_err(|e| format!("set {set}: {e}"))?;
                    // The primary's reader opens no connection until used: dropping it is free.
                    let reader = match &config.replica_url {
                        Some(replica) => hongbao_store::open_postgres_reader(replica, set, config.sets)
                            .map_err(|e| format!("set {set} on the replica: {e}"))?,
                        None => reader,
                    };
                    stores.push((Box::new(store), Arc::new(reader)));
                }
            }
            Some(url) if url != "sqlite" => {
                return Err("--store must be `sqlite` or a postgres:// URL".to_string());
            }
            _ if config.replica_url.is_some() => {
                return Err("a replica needs a postgres:// store".to_string());
            }
            _ => {
                std::fs::create_dir_all(&config.data_dir)
                    .map_err(|e| format!("cannot create data dir {}: {e}", config.data_dir.display()))?;
                check_no_extra_sets(&config)?;
                for set in 0..config.sets {
                    let opened: Result<SetStore, _> = if config.journal {
                        hongbao_store::open_journaled_sqlite(&config.data_dir, set, config.sets)
                            .map(|(s, r)| (Box::new(s) as Box<dyn Store>, Arc::new(r) as Arc<dyn Reader>))
                    } else {
                        hongbao_store::open_sqlite(&config.data_dir, set, config.sets)
                            .map(|(s, r)| (Box::new(s) as Box<dyn Store>, Arc::new(r) as Arc<dyn Reader>))
                    };
                    stores.push(opened.map_err(|e| format!("set {set}: {e}"))?);
                }
            }
        }
        Engine::start_with(config, stores, clock)
    }

    /// Starts the sets on stores opened by the caller (tests, other store kinds).
    pub fn start_with(
        config: EngineConfig,
        stores: Vec<SetStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Engine, String> {
        assert_eq!(stores.len(), config.sets as usize, "one store per set");
        if config.sets == 0 || config.sets > hongbao_core::ids::SETS_MAX {
            return Err(format!("sets must be between 1 and {}", hongbao_core::ids::SETS_MAX));
        }
        let seed = config.seed.unwrap_or_else(rand::random);
        let stopping = Arc::new(AtomicBool::new(false));
        let mut queues = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..config.sets {
            let (tx, rx) = crossbeam_channel::bounded(config.queue_depth);
            queues.push(tx);
            receivers.push(rx);
        }
        let mut readers = Vec::new();
        let mut ready = Vec::new();
        let mut closed = Vec::new();
        let mut threads = Vec::new();
        let mut started = Vec::new();
        for (set, ((store, reader), rx)) in stores.into_iter().zip(receivers).enumerate() {
            let flag = Arc::new(AtomicBool::new(false));
            let published = Arc::new(ClosedPackets::default());
            let ctx = SetContext {
                set: set as u32,
                sets: config.sets,
                limits: config.limits.clone(),
                batch_max: config.batch_max,
                commit_spacing: config.commit_spacing,
                idempotency_retention_ms: config.idempotency_retention_s * 1000,
                clock: clock.clone(),
                seed,
                peers: queues.clone(),
                ready: flag.clone(),
                stopping: stopping.clone(),
                closed: published.clone(),
            };
            let (tx, started_rx) = std::sync::mpsc::channel();
            let handle = std::thread::Builder::new()
                .name(format!("{SET_THREAD}{set}"))
                .spawn(move || {
                    // A panic in a set is a broken invariant: stop the whole process rather
                    // than keep serving with a set that no longer answers (fail-stop; the
                    // supervisor restarts it and the set reloads from its store).
                    let run = std::panic::AssertUnwindSafe(|| set::run(ctx, store, rx, tx));
                    if std::panic::catch_unwind(run).is_err() {
                        tracing::error!(set, "set thread panicked: stopping the process");
                        std::process::abort();
                    }
                })
                .map_err(|e| format!("cannot start set thread: {e}"))?;
            readers.push(reader);
            ready.push(flag);
            closed.push(published);
            threads.push(handle);
            started.push(started_rx);
        }
        for rx in started {
            rx.recv().map_err(|_| "a set thread died while loading".to_string())??;
        }
        Ok(Engine {
            inner: Arc::new(Inner {
                config,
                queues,
                reads_block: readers.iter().any(|r| r.blocks()),
                readers,
                ready,
                stopping,
                closed,
                clock,
                threads: Mutex::new(threads),
                audit_lock: tokio::sync::Mutex::new(()),
                query_permits: Arc::new(tokio::sync::Semaphore::new(QUERIES_RUNNING_MAX)),
                closed_refusals: AtomicU64::new(0),
            }),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.config.limits
    }

    pub fn sets(&self) -> u32 {
        self.inner.config.sets
    }

    pub fn status(&self) -> Vec<SetStatus> {
        (0..self.inner.config.sets)
            .map(|set| SetStatus {
                set,
                queue_depth: self.inner.queues[set as usize].len(),
                ready: self.inner.ready[set as usize].load(Ordering::SeqCst)
                    && !self.inner.stopping.load(Ordering::SeqCst),
                unapplied_commits: self.inner.readers[set as usize].unapplied_commits(),
                fold_giving_way: self.inner.readers[set as usize].fold_giving_way(),
            })
            .collect()
    }

    /// Grabs, opens and claims answered without their set since start, because their packet
    /// had closed (`hongbao_closed_refusals_total`).
    pub fn closed_refusals(&self) -> u64 {
        self.inner.closed_refusals.load(Ordering::Relaxed)
    }

    pub(crate) fn query_permits(&self) -> Arc<tokio::sync::Semaphore> {
        self.inner.query_permits.clone()
    }

    pub(crate) fn reader(&self, set: u32) -> Arc<dyn Reader> {
        self.inner.readers[set as usize].clone()
    }

    pub(crate) fn readers(&self) -> &[Arc<dyn Reader>] {
        &self.inner.readers
    }

    pub(crate) fn reads_block(&self) -> bool {
        self.inner.reads_block
    }

    pub(crate) fn user_set(&self, user: &UserId) -> u32 {
        set_of_user(user, self.inner.config.sets)
    }

    /// Sends a command to a set and awaits its reply.
    async fn call<T>(&self, set: u32, make: impl FnOnce(set::Reply<T>) -> Command) -> Result<T, EngineError> {
        answer(self.submit(set, make)?).await
    }

    /// Queues a command on a set without waiting for it: the receiver gets the reply.
    fn submit<T>(
        &self,
        set: u32,
        make: impl FnOnce(set::Reply<T>) -> Command,
    ) -> Result<Answer<T>, EngineError> {
        // A stopping engine, or a set reloading after a failed commit, takes no writes.
        if self.inner.stopping.load(Ordering::Relaxed)
            || !self.inner.ready[set as usize].load(Ordering::Relaxed)
        {
            return Err(EngineError::Unavailable);
        }
        let (tx, rx) = oneshot::channel();
        match self.inner.queues[set as usize].try_send(make(tx)) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => {
                metrics::counter!("hongbao_overloaded_total").increment(1);
                Err(EngineError::Overloaded)
            }
            Err(TrySendError::Disconnected(_)) => Err(EngineError::Unavailable),
        }
    }

    fn packet_set(&self, packet: PacketId) -> Result<u32, EngineError> {
        let set = packet.set();
        if set < self.inner.config.sets {
            Ok(set)
        } else {
            Err(EngineError::NotFound)
        }
    }

    pub async fn deposit(
        &self,
        user: UserId,
        amount: Amount,
        request_id: RequestId,
    ) -> Result<WalletReply, EngineError> {
        let set = self.user_set(&user);
        self.call(set, |reply| Command::Deposit { user, amount, request_id, reply }).await
    }

    pub async fn withdraw(
        &self,
        user: UserId,
        amount: Amount,
        request_id: RequestId,
    ) -> Result<WalletReply, EngineError> {
        let set = self.user_set(&user);
        self.call(set, |reply| Command::Withdraw { user, amount, request_id, reply }).await
    }

    pub async fn send(&self, send: ValidSend) -> Result<PacketSummary, EngineError> {
        let set = self.user_set(&send.sender);
        self.call(set, |reply| Command::Send { send: Box::new(send), reply }).await
    }

    pub async fn grab(&self, packet: PacketId, user: UserId) -> Result<GrabReply, EngineError> {
        let set = self.share_set(packet, &user).await?;
        self.call(set, |reply| Command::Grab { packet, user, reply }).await
    }

    pub async fn open(&self, packet: PacketId, user: UserId) -> Result<ClaimReply, EngineError> {
        let set = self.share_set(packet, &user).await?;
        self.call(set, |reply| Command::Open { packet, user, reply }).await
    }

    pub async fn claim(&self, packet: PacketId, user: UserId) -> Result<ClaimReply, EngineError> {
        let set = self.share_set(packet, &user).await?;
        self.call(set, |reply| Command::Claim { packet, user, reply }).await
    }

    /// The set to ask for `user`'s share of `packet`, or the answer it would give when the
    /// packet is closed and `user` holds no share of it (see `closed`): the crowd that keeps
    /// asking for a packet that is gone is turned away here, without a queue slot. `now_ms` is
    /// the caller's reading of the clock, read once for many claims: reading it per claim was
    /// a tenth of the caller's time in the batched in-process festival.
    fn route(&self, packet: PacketId, user: &UserId, now_ms: Millis) -> Result<u32, EngineError> {
        let set = self.packet_set(packet)?;
        match self.inner.closed[set as usize].refusal(packet, user, now_ms) {
            Some(refused) => {
                self.inner.closed_refusals.fetch_add(1, Ordering::Relaxed);
                Err(refused.into())
            }
            None => Ok(set),
        }
    }

    /// `route` for one call. An answer given here costs the caller's task a unit of tokio's
    /// cooperative budget, as awaiting the set's reply would: a caller looping on refused
    /// claims still yields to its other tasks.
    async fn share_set(&self, packet: PacketId, user: &UserId) -> Result<u32, EngineError> {
        let routed = self.route(packet, user, self.inner.clock.now_ms());
        if routed.is_err() {
            tokio::task::consume_budget().await;
        }
        routed
    }

    /// Claims many shares at once: each pair answered as `claim` would answer it, in the order
    /// given. The claims go to their sets as one message per set (split at `batch_max`), so a
    /// caller that gathers claims itself — a gateway, a game server, the bench — pays one
    /// queue slot, one wake and one reply per set and message instead of per claim. A full
    /// queue refuses that message's claims (`Overloaded`); the others still go.
    pub async fn claim_many(&self, claims: Vec<(PacketId, UserId)>) -> Vec<Result<ClaimReply, EngineError>> {
        let sets = self.inner.config.sets;
        let chunk = self.inner.config.batch_max.max(1);
        let mut results: Vec<Option<Result<ClaimReply, EngineError>>> = Vec::with_capacity(claims.len());
        let mut routed: Vec<Routed> = (0..sets).map(|_| (Vec::new(), Vec::new())).collect();
        let now_ms = self.inner.clock.now_ms();
        for (i, (packet, user)) in claims.into_iter().enumerate() {
            match self.route(packet, &user, now_ms) {
                Ok(set) => {
                    results.push(None);
                    let (at, mine) = &mut routed[set as usize];
                    at.push(i);
                    mine.push((packet, user));
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        if routed.iter().all(|(at, _)| at.is_empty()) {
            // Every claim was answered here: yield as a call to a set would.
            tokio::task::consume_budget().await;
        }
        // Queue every message first, then wait: the sets work on them at the same time.
        let mut waiting = Vec::new();
        for (set, (at, mine)) in routed.into_iter().enumerate() {
            let mut rest = at.into_iter().zip(mine);
            loop {
                let (here, claims): (Vec<usize>, Vec<(PacketId, UserId)>) = rest.by_ref().take(chunk).unzip();
                if claims.is_empty() {
                    break;
                }
                waiting.push((here, self.submit(set as u32, |reply| Command::Claims { claims, reply })));
            }
        }
        for (at, rx) in waiting {
            let answered = match rx {
                Ok(rx) => answer(rx).await,
                Err(e) => Err(e),
            };
            match answered {
                Ok(replies) => {
                    assert_eq!(replies.len(), at.len(), "a set answers every claim it was given");
                    for (i, r) in at.into_iter().zip(replies) {
                        results[i] = Some(r);
                    }
                }
                Err(e) => {
                    for i in at {
                        results[i] = Some(Err(e.clone()));
                    }
                }
            }
        }
        results.into_iter().map(|r| r.expect("every claim routed and answered")).collect()
    }

    /// Checks conservation across every set (DESIGN.md §2.1). Each set pauses at a batch
    /// boundary and stays paused until every set has given its snapshot, so money moving
    /// between sets is counted exactly once: a credit is in flight while its seq is above the
    /// target set's watermark for its source.
    pub async fn audit(&self) -> Result<AuditReport, EngineError> {
        let _one_at_a_time = self.inner.audit_lock.lock().await;
        let mut resumes = Vec::new();
        let mut snapshots = Vec::new();
        for set in 0..self.inner.config.sets {
            let (snap_tx, snap_rx) = oneshot::channel();
            let (resume_tx, resume_rx) = oneshot::channel();
            let mut cmd = Command::Audit { snapshot: snap_tx, resume: resume_rx };
            // Control commands wait for room rather than being refused.
            loop {
                if self.inner.stopping.load(Ordering::Relaxed) {
                    return Err(EngineError::Unavailable);
                }
                match self.inner.queues[set as usize].try_send(cmd) {
                    Ok(()) => break,
                    Err(TrySendError::Full(c)) => {
                        cmd = c;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err(TrySendError::Disconnected(_)) => return Err(EngineError::Unavailable),
                }
            }
            resumes.push(resume_tx);
            snapshots.push(snap_rx);
        }
        let mut snaps = Vec::new();
        for rx in snapshots {
            match rx.await {
                Ok(Ok(s)) => snaps.push(s),
                Ok(Err(e)) => return Err(EngineError::Store(e)),
                Err(_) => return Err(EngineError::Unavailable),
            }
        }
        drop(resumes);
        let mut r = AuditReport {
            ok: true,
            deposits_fen: 0,
            withdrawals_fen: 0,
            balances_fen: 0,
            escrow_fen: 0,
            in_flight_fen: 0,
            problems: Vec::new(),
        };
        for s in &snaps {
            r.deposits_fen += s.totals.deposits_fen;
            r.withdrawals_fen += s.totals.withdrawals_fen;
            r.balances_fen += s.balances_fen;
            r.escrow_fen += s.escrow_fen;
            r.problems.extend(s.problems.iter().cloned());
            for item in &s.outbox_pending {
                let applied = snaps
                    .iter()
                    .find(|t| t.set == item.target_set)
                    .and_then(|t| t.watermarks.get(&s.set))
                    .copied()
                    .unwrap_or(0);
                if item.seq > applied {
                    r.in_flight_fen += item.amount_fen;
                }
            }
        }
        let held = r.balances_fen + r.escrow_fen + r.in_flight_fen;
        if r.deposits_fen - r.withdrawals_fen != held {
            r.problems.push(format!(
                "conservation: deposits {} - withdrawals {} != balances {} + escrow {} + in flight {}",
                r.deposits_fen, r.withdrawals_fen, r.balances_fen, r.escrow_fen, r.in_flight_fen
            ));
        }
        r.ok = r.problems.is_empty();
        if !r.ok {
            tracing::error!(problems = ?r.problems, "audit failed");
        }
        Ok(r)
    }

    /// Stops taking commands, lets every set finish and commit what it has, joins the threads.
    pub async fn shutdown(&self) {
        if self.inner.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        for q in &self.inner.queues {
            let q = q.clone();
            // Shutdown waits for room: it must reach a live set. A set that gave up (its
            // store is gone) has dropped its queue, and the send returns at once.
            let _ =
                tokio::task::spawn_blocking(move || q.send_timeout(Command::Shutdown, SHUTDOWN_SEND_WAIT))
                    .await;
        }
        let threads: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.inner.threads.lock().expect("threads lock"));
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        tracing::info!("engine stopped");
    }
}

/// A data dir made with more sets than configured would strand the wallets of the extra sets.
fn check_no_extra_sets(config: &EngineConfig) -> Result<(), String> {
    let extra = config.data_dir.join(format!("set-{}.sqlite", config.sets));
    if extra.exists() {
        return Err(format!(
            "data dir {} holds more than {} sets: start with the set count it was made with",
            config.data_dir.display(),
            config.sets
        ));
    }
    Ok(())
}
