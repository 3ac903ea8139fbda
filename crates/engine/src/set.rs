//! One set: a thread that owns its wallets and packets, applies commands in batches and
//! commits each batch in one store transaction before it replies.
//!
//! Nothing here is shared: the thread owns every field of [`SetState`]. Other threads talk to
//! it only through its bounded queue. It must never block on another set (credits and acks
//! between sets are sent with `try_send` and retried from the outbox), and it must never reply
//! before the batch that holds the reply's effects is committed.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use hongbao_core::{
    set_of_user, Amount, Claim, Clock, FastMap, FastSet, GrabOutcome, Limits, Millis, Packet, PacketId,
    PacketIdGen, PacketStatus, RequestId, UserId, ValidSend,
};
use hongbao_store::{
    Batch, ClaimRow, Entry, EntryKind, IdemRecord, IdemResult, Loaded, OutboxItem, PacketUpdate, Store,
    StoreError, Totals,
};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::oneshot;

use crate::closed::ClosedPackets;
use crate::reply::*;
use crate::wallets::{Changed, Wallets};

/// How many commands taken from the queue ahead a set asks for what a claim will touch in
/// memory (`look_ahead`): enough for the loads to arrive before that claim is settled, few
/// enough that they are still in cache when it is (4, 8 and 12 ahead measured alike, each about
/// a tenth faster than none: BENCHMARKS.md, 2026-12-06, twenty-seventh session).
const AHEAD: usize = 4;
/// The claims of a call, and the credits of a message, ask for their memory this many at a
/// time, a group ahead: `look_ahead` for each, one after the other, once every `BURST` claims.
/// One at a time, a prefetch into a table of a gigabyte or more waits for its page walk before
/// the claim's work can go on, however far ahead it is asked: at 2 GiB, 172–181 ns of a 337 ns
/// read stay exposed 4 to 64 items ahead, and 58 ns when 64 are asked for together, their walks
/// overlapping (`random-access`). Calls of 1,024 claims paid 0.4–5.9 % more in the memory-only
/// festival, ahead in six alternating pairs of six, and 2.5–7.9 % more durable in two
/// (BENCHMARKS.md, fortieth session). `look_ahead` reads each claimer's name to route the
/// wallet, so the names arrive with the group too and need no prefetch of their own.
const BURST: usize = 64;

/// The items of a call or message whose memory a set asks for before it applies item `i`: the
/// first two groups before the first item, then, as each group begins, the group after it.
fn burst_before(i: usize) -> Option<std::ops::Range<usize>> {
    match i {
        0 => Some(0..2 * BURST),
        i if i % BURST == 0 => Some(i + BURST..i + 2 * BURST),
        _ => None,
    }
}

/// Closed packets kept in memory (with their claims) so the crowd that arrives after a packet
/// is exhausted is turned away, and repeat claims answered, without a disk read. Bounded by
/// claims held: about 100 bytes each, so 1,000,000 claims is ~100 MB at most per set.
const CLOSED_CLAIMS_MAX: usize = 1_000_000;
/// And by closed packets, for the many-small-packets case.
const CLOSED_PACKETS_MAX: usize = 100_000;

/// How many differing wallets, packets, credits and watermarks a failed audit names, each.
const DIFFERENCES_SHOWN: usize = 5;
/// How often an idle set wakes to expire packets and retry undelivered credits.
const TICK: Duration = Duration::from_millis(50);
/// The longest a set sleeps at once while it waits out its commit spacing: under a spacing
/// longer than this, the set still takes the commands that came every so often, so a batch
/// that fills commits then and the queue does not fill behind a sleeping set. The default
/// spacing (1 ms) is one sleep.
const SPACING_SLEEP_MAX: Duration = Duration::from_millis(1);
/// How long a set's sent credits wait for their acknowledgements to move before they are all
/// sent again, from the oldest.
const RELAY_RETRY_MS: i64 = 500;
/// Most credits in one relay message: bounds the receiver's batch.
const RELAY_CHUNK_MAX: usize = 4_096;
/// How long a set waits before it reloads from a store that failed.
const RELOAD_BACKOFF: Duration = Duration::from_millis(200);

pub(crate) type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

pub(crate) enum Command {
    Deposit {
        user: UserId,
        amount: Amount,
        request_id: RequestId,
        reply: Reply<WalletReply>,
    },
    Withdraw {
        user: UserId,
        amount: Amount,
        request_id: RequestId,
        reply: Reply<WalletReply>,
    },
    /// Boxed: a send is rare, and the largest command would size every queue slot.
    Send {
        send: Box<ValidSend>,
        reply: Reply<PacketSummary>,
    },
    Grab {
        packet: PacketId,
        user: UserId,
        reply: Reply<GrabReply>,
    },
    Open {
        packet: PacketId,
        user: UserId,
        reply: Reply<ClaimReply>,
    },
    Claim {
        packet: PacketId,
        user: UserId,
        reply: Reply<ClaimReply>,
    },
    /// Many claims in one message, answered in their order with one reply: a queue slot, a
    /// wake and a reply per batch of claims instead of per claim. Each counts toward
    /// `batch_max` like a command of its own.
    Claims {
        claims: Vec<(PacketId, UserId)>,
        reply: Reply<Vec<Result<ClaimReply, EngineError>>>,
    },
    /// Credits from another set's outbox, in seq order.
    Credit {
        from_set: u32,
        items: Vec<OutboxItem>,
    },
    /// The target set applied every credit from us up to `upto`.
    Ack {
        from_set: u32,
        upto: u64,
    },
    /// Take an audit snapshot at a batch boundary, then pause until `resume` is dropped.
    Audit {
        snapshot: oneshot::Sender<Result<SetSnapshot, String>>,
        resume: oneshot::Receiver<()>,
    },
    /// Finish the current batch, commit it and stop.
    Shutdown,
}

impl Command {
    /// How much of a batch this command takes: its claims, or one.
    fn weight(&self) -> usize {
        match self {
            Command::Claims { claims, .. } => claims.len().max(1),
            _ => 1,
        }
    }
}

/// One set's figures at a moment when it is paused between batches.
#[derive(Debug, Clone)]
pub(crate) struct SetSnapshot {
    pub set: u32,
    pub totals: Totals,
    pub balances_fen: i64,
    pub escrow_fen: i64,
    pub outbox_pending: Vec<OutboxItem>,
    pub watermarks: HashMap<u32, u64>,
    pub problems: Vec<String>,
}

/// Everything a set thread needs from outside.
pub(crate) struct SetContext {
    pub set: u32,
    pub sets: u32,
    pub limits: Limits,
    pub batch_max: usize,
    /// See `EngineConfig::commit_spacing`.
    pub commit_spacing: Duration,
    pub idempotency_retention_ms: i64,
    pub clock: Arc<dyn Clock>,
    pub seed: u64,
    /// Queues of every set, this one included, for the credit relay.
    pub peers: Vec<Sender<Command>>,
    /// False while the set is loading or reloading after a store failure.
    pub ready: Arc<AtomicBool>,
    /// Set by the engine when it shuts down: a set stuck reloading from a dead store gives up.
    pub stopping: Arc<AtomicBool>,
    /// This set's closed packets, published for the request path once their closing is durable.
    pub closed: Arc<ClosedPackets>,
}

/// A reply to send once the batch is committed.
enum Pending {
    Wallet(Reply<WalletReply>, Result<WalletReply, EngineError>),
    Summary(Reply<PacketSummary>, Result<PacketSummary, EngineError>),
    Grab(Reply<GrabReply>, Result<GrabReply, EngineError>),
    Claim(Reply<ClaimReply>, Result<ClaimReply, EngineError>),
    Claims(Reply<Vec<Result<ClaimReply, EngineError>>>, Vec<Result<ClaimReply, EngineError>>),
}

impl Pending {
    fn send(self) {
        // A caller that went away (timeout, disconnect) is no longer waiting: nothing to do.
        match self {
            Pending::Wallet(tx, r) => drop(tx.send(r)),
            Pending::Summary(tx, r) => drop(tx.send(r)),
            Pending::Grab(tx, r) => drop(tx.send(r)),
            Pending::Claim(tx, r) => drop(tx.send(r)),
            Pending::Claims(tx, r) => drop(tx.send(Ok(r))),
        }
    }

    fn fail(self, e: EngineError) {
        match self {
            Pending::Wallet(tx, _) => drop(tx.send(Err(e))),
            Pending::Summary(tx, _) => drop(tx.send(Err(e))),
            Pending::Grab(tx, _) => drop(tx.send(Err(e))),
            Pending::Claim(tx, _) => drop(tx.send(Err(e))),
            Pending::Claims(tx, _) => drop(tx.send(Err(e))),
        }
    }
}

/// The set's memory. Owned by the set thread alone.
struct SetState {
    wallets: Wallets,
    /// Active packets, and closed ones still in the closed cache. Boxed: a bucket is 16 bytes
    /// instead of a packet's 216, so the half of a table that is empty after a doubling costs
    /// little, and a doubling moves pointers. Inline, 1,000,000 resident packets took two
    /// tables of 2^20 buckets, 434 MiB for 198 MiB of packets, and each doubling freed the
    /// old table beside the new: the process read 910–1,205 MiB after creating them, boxed
    /// 690–787 (BENCHMARKS.md, fifteenth session).
    packets: FastMap<PacketId, Box<Packet>>,
    expiries: BTreeSet<(Millis, PacketId)>,
    closed: VecDeque<PacketId>,
    closed_claims: usize,
    /// What each remembered request returned; the strings live once, in the key.
    idem: FastMap<(UserId, RequestId), Remembered>,
    idem_order: VecDeque<(Millis, UserId, RequestId)>,
    id_gen: PacketIdGen,
    rng: ChaCha8Rng,
    /// Credits not yet acknowledged, per target set, in seq order.
    outbox: HashMap<u32, VecDeque<OutboxItem>>,
    outbox_last_seq: HashMap<u32, u64>,
    /// Per target set: how far its outbox was sent, and since when it waits for an ack.
    relays: HashMap<u32, Relay>,
    /// Per source set: the last credit seq applied here.
    watermarks: HashMap<u32, u64>,
    totals: Totals,
    /// Every wallet's balance, held or not.
    balances_fen: i64,
    /// The balances of the wallets it does not hold: in the store (and this batch's credits),
    /// not in `wallets`.
    unheld_fen: i64,
    escrow_fen: i64,
}

/// Where a target set's credits stand. Each credit is sent once, in seq order, after the batch
/// that made it; the target applies each seq once and acknowledges the last it applied. Sent
/// credits are sent again, from the oldest, only when no ack has moved for [`RELAY_RETRY_MS`]
/// (a message the target lost in a crash, or one refused by its full queue), and when the set
/// starts. Acks come a batch or two after the credits: a relay that sent the whole outbox at
/// every commit sent each credit two or three times under a steady load.
#[derive(Debug, Clone, Copy)]
struct Relay {
    /// The last seq handed to the target's queue; those after it are yet to be sent.
    sent_upto: u64,
    /// When the oldest sent credit began its wait: the last ack that moved, or the send that
    /// followed a caught-up outbox.
    waiting_since_ms: Millis,
}

/// An idempotent request's fingerprint and first result, kept for the retention window.
#[derive(Debug, Clone, Copy)]
struct Remembered {
    fingerprint: u64,
    result: IdemResult,
}

/// What one batch changed, collected while commands are applied.
#[derive(Default)]
struct Work {
    batch: Batch,
    /// Wallets this batch changed, with their balances now: the commit writes them without
    /// looking them up again.
    dirty_wallets: Changed,
    dirty_packets: FastSet<PacketId>,
    replies: Vec<Pending>,
    /// Acks to send after commit: (source set, upto).
    acks: Vec<(u32, u64)>,
    totals_moved: bool,
    /// Money that came in from, and went out to, other sets in this batch.
    credits_in_fen: i64,
    credits_out_fen: i64,
    deposits_fen: i64,
    withdrawals_fen: i64,
    /// Balances plus escrow when the batch began.
    base_fen: i64,
    /// Packets this batch closed, to publish once it commits.
    closed: Vec<PacketId>,
}

impl Work {
    /// Empties every collection and keeps its allocation; zeroes the sums.
    fn recycle(&mut self) {
        let Work {
            batch,
            dirty_wallets,
            dirty_packets,
            replies,
            acks,
            totals_moved,
            credits_in_fen,
            credits_out_fen,
            deposits_fen,
            withdrawals_fen,
            base_fen,
            closed,
        } = self;
        batch.clear();
        dirty_wallets.clear();
        dirty_packets.clear();
        replies.clear();
        acks.clear();
        closed.clear();
        *totals_moved = false;
        (*credits_in_fen, *credits_out_fen, *deposits_fen, *withdrawals_fen, *base_fen) = (0, 0, 0, 0, 0);
    }
}

/// The body of a set thread: load, then step until told to stop.
pub(crate) fn run(
    ctx: SetContext,
    store: Box<dyn Store>,
    rx: Receiver<Command>,
    started: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let mut runner = match SetRunner::open(ctx, store, rx) {
        Ok(r) => {
            let _ = started.send(Ok(()));
            r
        }
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    while runner.step(Some(TICK)) {}
}

/// What stopped a batch early.
enum Control {
    Audit(oneshot::Sender<Result<SetSnapshot, String>>, oneshot::Receiver<()>),
    Shutdown,
}

/// One set's thread state: its context, memory, store and queue. The deterministic
/// simulation drives `step` directly, from one thread, instead of `run`.
pub(crate) struct SetRunner {
    pub(crate) ctx: SetContext,
    state: SetState,
    store: Box<dyn Store>,
    rx: Receiver<Command>,
    last_tick_ms: Millis,
    /// When the last batch stopped taking commands and went to commit; none yet.
    last_commit: Option<Instant>,
    /// Kept between batches for its allocations; empty outside `step`.
    work: Work,
    /// Commands taken from the queue ahead of the one being applied, in order: a claim's
    /// memory is asked for when it is taken, `AHEAD` commands before it is applied
    /// (`SetState::look_ahead`). What a batch did not reach begins the next.
    ahead: VecDeque<Command>,
}

impl SetRunner {
    /// Loads the set from its store and resends credits left undelivered by the last run.
    pub(crate) fn open(
        ctx: SetContext,
        mut store: Box<dyn Store>,
        rx: Receiver<Command>,
    ) -> Result<SetRunner, String> {
        let mut state = load(&ctx, store.as_mut()).map_err(|e| format!("set {}: {e}", ctx.set))?;
        ctx.ready.store(true, Ordering::SeqCst);
        tracing::info!(
            set = ctx.set,
            wallets = state.wallets.len(),
            packets = state.packets.len(),
            "set ready"
        );
        state.relay_all(&ctx, i64::MIN);
        let last_tick_ms = ctx.clock.now_ms();
        Ok(SetRunner {
            ctx,
            state,
            store,
            rx,
            last_tick_ms,
            last_commit: None,
            work: Work::default(),
            ahead: VecDeque::with_capacity(AHEAD + 1),
        })
    }

    /// Applies one batch: waits up to `wait` for a first command (`None`: do not wait), drains
    /// up to `batch_max`, runs timers when due, commits, replies. Returns false once stopped.
    /// While the last commit began less than `commit_spacing` ago, an empty queue does not end
    /// the batch: the thread sleeps out the rest of the spacing (in sleeps of at most
    /// `SPACING_SLEEP_MAX`, so a batch that fills meanwhile commits then) and takes what came.
    /// It sleeps rather than blocks on the queue, so the callers' sends wake nobody and the
    /// set does not spin and yield for each command (HTTP festival: 0.5–0.9 µs less CPU a
    /// request; BENCHMARKS.md, twenty-ninth session). A step that does not wait for its first
    /// command (the simulation's) does not wait for more either.
    pub(crate) fn step(&mut self, wait: Option<Duration>) -> bool {
        let first = match (self.ahead.pop_front(), wait) {
            (Some(c), _) => Some(c),
            (None, Some(d)) => match self.rx.recv_timeout(d) {
                Ok(c) => Some(c),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return false,
            },
            (None, None) => self.rx.try_recv().ok(),
        };
        let now_ms = self.ctx.clock.now_ms();
        // The last batch's collections, emptied: a batch of thousands of claims grows them
        // once, not every time.
        let mut work = std::mem::take(&mut self.work);
        self.state.begin(&mut work);
        let mut control = None;
        let mut applied = 0;
        let mut next = first;
        while let Some(cmd) = next {
            match cmd {
                Command::Audit { snapshot, resume } => {
                    control = Some(Control::Audit(snapshot, resume));
                    break;
                }
                Command::Shutdown => {
                    control = Some(Control::Shutdown);
                    break;
                }
                cmd => {
                    applied += cmd.weight();
                    self.state.apply(&self.ctx, self.store.as_mut(), cmd, now_ms, &mut work);
                }
            }
            next = if applied < self.ctx.batch_max { self.take() } else { None };
            while next.is_none() && applied < self.ctx.batch_max && wait.is_some() {
                let now = Instant::now();
                let Some(left) = self
                    .last_commit
                    .and_then(|at| (at + self.ctx.commit_spacing).checked_duration_since(now))
                else {
                    break;
                };
                std::thread::sleep(left.min(SPACING_SLEEP_MAX));
                next = self.take();
            }
        }
        self.last_commit = Some(Instant::now());
        let tick = now_ms - self.last_tick_ms >= TICK.as_millis() as i64;
        if tick {
            self.last_tick_ms = now_ms;
            self.state.expire_due(&self.ctx, now_ms, &mut work);
            self.state.prune_idempotency(now_ms - self.ctx.idempotency_retention_ms);
        }
        let committed = self.state.finish(&self.ctx, self.store.as_mut(), &mut work, now_ms);
        work.recycle();
        self.work = work;
        if !committed {
            if !self.reload() {
                return false;
            }
        } else if tick {
            self.state.relay_all(&self.ctx, now_ms);
        }
        match control {
            None => true,
            Some(Control::Audit(snapshot_tx, resume)) => {
                let snap = self.state.snapshot(&self.ctx, self.store.as_mut());
                if snapshot_tx.send(snap).is_ok() {
                    // Paused until the audit has every set's snapshot; a dropped sender
                    // resumes too.
                    let _ = resume.blocking_recv();
                }
                true
            }
            Some(Control::Shutdown) => {
                // The engine refuses new commands before it sends Shutdown; answer any that
                // slipped in so no caller waits forever.
                self.reject_queued();
                tracing::info!(set = self.ctx.set, "set stopped");
                false
            }
        }
    }

    /// Fail-stop after a failed commit: memory holds effects the store does not. Drop it
    /// and rebuild from the store, retrying until the store works again. Meanwhile the engine
    /// refuses new writes (503), and commands that were already queued are answered 503 at
    /// every retry instead of waiting for a store that may be gone for good (a dead primary):
    /// a caller never hangs on a set that cannot commit.
    /// Returns false when the engine began shutting down before the store came back.
    pub(crate) fn reload(&mut self) -> bool {
        self.ctx.ready.store(false, Ordering::SeqCst);
        // The closed cache starts empty again, and nothing in it would be forgotten.
        self.ctx.closed.clear();
        loop {
            self.reject_queued();
            if self.ctx.stopping.load(Ordering::SeqCst) {
                tracing::warn!(set = self.ctx.set, "shutting down while the store is failing");
                return false;
            }
            match load(&self.ctx, self.store.as_mut()) {
                Ok(s) => {
                    tracing::warn!(set = self.ctx.set, "set reloaded from its store");
                    self.state = s;
                    break;
                }
                Err(e) => {
                    tracing::error!(set = self.ctx.set, error = %e, "reload failed; retrying");
                    std::thread::sleep(RELOAD_BACKOFF);
                }
            }
        }
        self.ctx.ready.store(true, Ordering::SeqCst);
        self.state.relay_all(&self.ctx, i64::MIN);
        true
    }

    /// The next command taken from the queue, after those taken ahead; tops the look-ahead up
    /// first, asking for the memory of each claim it takes.
    fn take(&mut self) -> Option<Command> {
        while self.ahead.len() <= AHEAD {
            let Ok(cmd) = self.rx.try_recv() else { break };
            if let Command::Claim { packet, user, .. } | Command::Open { packet, user, .. } = &cmd {
                self.state.look_ahead(&self.ctx, *packet, user);
            }
            self.ahead.push_back(cmd);
        }
        self.ahead.pop_front()
    }

    /// Answers every command taken ahead or still queued as unavailable.
    fn reject_queued(&mut self) {
        for cmd in self.ahead.drain(..) {
            reject(cmd);
        }
        while let Ok(cmd) = self.rx.try_recv() {
            reject(cmd);
        }
    }

    /// This set's figures and its store's, for the simulation.
    #[cfg(test)]
    pub(crate) fn snapshot(&mut self) -> Result<SetSnapshot, String> {
        self.state.snapshot(&self.ctx, self.store.as_mut())
    }
}

/// Answers a command that will not be applied: the engine is stopping, or the set is
/// reloading from a failed store. Credits and acks are dropped: the outbox sends them again.
fn reject(cmd: Command) {
    let e = EngineError::Unavailable;
    match cmd {
        Command::Deposit { reply, .. } | Command::Withdraw { reply, .. } => drop(reply.send(Err(e))),
        Command::Send { reply, .. } => drop(reply.send(Err(e))),
        Command::Grab { reply, .. } => drop(reply.send(Err(e))),
        Command::Open { reply, .. } | Command::Claim { reply, .. } => drop(reply.send(Err(e))),
        Command::Claims { reply, .. } => drop(reply.send(Err(e))),
        Command::Audit { snapshot, .. } => {
            drop(snapshot.send(Err("the set is stopping or reloading".into())))
        }
        Command::Credit { .. } | Command::Ack { .. } | Command::Shutdown => {}
    }
}

fn load(ctx: &SetContext, store: &mut dyn Store) -> Result<SetState, StoreError> {
    let since = ctx.clock.now_ms() - ctx.idempotency_retention_ms;
    let loaded = store.load(since)?;
    Ok(SetState::from_loaded(ctx, loaded))
}

fn claim_reply(packet: PacketId, c: Claim) -> ClaimReply {
    ClaimReply { packet_id: packet, user: c.user, amount_fen: c.amount_fen, at_ms: c.at_ms }
}

/// A stable fingerprint of an idempotent request: xxh3 over a canonical text form.
fn fingerprint(parts: &[&str]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update(&[0x1f]);
    }
    h.digest()
}

fn send_fingerprint(s: &ValidSend) -> u64 {
    let audience = match &s.audience {
        hongbao_core::Audience::Anyone => "*".to_string(),
        hongbao_core::Audience::Users(u) => u.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(","),
    };
    fingerprint(&[
        "send",
        s.kind.as_str(),
        &s.total.fen().to_string(),
        &s.count.to_string(),
        &audience,
        &s.greeting,
        &s.expires_in_s.to_string(),
    ])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    Deposit,
    Withdraw,
}

enum IdemCheck<T> {
    New,
    Replay(T),
    Conflict,
}

impl SetState {
    fn from_loaded(ctx: &SetContext, l: Loaded) -> SetState {
        let mut s = SetState {
            wallets: Wallets::default(),
            packets: FastMap::with_capacity_and_hasher(l.active_packets.len(), Default::default()),
            expiries: BTreeSet::new(),
            closed: VecDeque::new(),
            closed_claims: 0,
            idem: FastMap::with_capacity_and_hasher(l.idempotency.len(), Default::default()),
            idem_order: VecDeque::new(),
            id_gen: PacketIdGen::new(ctx.set, l.max_packet_id),
            rng: ChaCha8Rng::seed_from_u64(
                ctx.seed ^ (u64::from(ctx.set) << 32) ^ l.max_packet_id.map_or(0, |p| p.raw()),
            ),
            outbox: HashMap::new(),
            outbox_last_seq: l.outbox_last_seq.into_iter().collect(),
            relays: HashMap::new(),
            watermarks: l.watermarks.into_iter().collect(),
            totals: l.totals,
            balances_fen: 0,
            unheld_fen: 0,
            escrow_fen: 0,
        };
        // None is held: a user's wallet is read from the store at their first debit (`hold`),
        // so a restart holds the wallets of the users who move money, not of every user.
        for (_, balance) in &l.wallets {
            s.balances_fen = s.balances_fen.checked_add(*balance).expect("balances overflow");
        }
        s.unheld_fen = s.balances_fen;
        for p in l.active_packets {
            assert_eq!(p.status(), PacketStatus::Active, "store loaded a closed packet as active");
            s.escrow_fen += p.escrow_fen();
            s.expiries.insert((p.header().expires_at_ms, p.id()));
            s.packets.insert(p.id(), p);
        }
        assert_eq!(s.escrow_fen, l.escrow_fen, "set {}: escrow in memory differs from the store", ctx.set);
        let mut idem: Vec<IdemRecord> = l.idempotency;
        idem.sort_by_key(|r| r.at_ms);
        for r in idem {
            let rid = RequestId::parse(&r.request_id).expect("stored request id is valid");
            s.idem_order.push_back((r.at_ms, r.user.clone(), rid.clone()));
            s.idem.insert((r.user, rid), Remembered { fingerprint: r.fingerprint, result: r.result });
        }
        for item in l.outbox_pending {
            let last = s.outbox_last_seq.entry(item.target_set).or_insert(0);
            *last = (*last).max(item.seq);
            s.outbox.entry(item.target_set).or_default().push_back(item);
        }
        s
    }

    /// Readies `w` (empty, with the last batch's allocations) for a new batch.
    fn begin(&self, w: &mut Work) {
        w.base_fen = self.balances_fen + self.escrow_fen;
    }

    fn apply(&mut self, ctx: &SetContext, store: &mut dyn Store, cmd: Command, now_ms: Millis, w: &mut Work) {
        match cmd {
            Command::Deposit { user, amount, request_id, reply } => {
                let r = self.transfer(ctx, store, Transfer::Deposit, user, amount, request_id, now_ms, w);
                w.replies.push(Pending::Wallet(reply, r));
            }
            Command::Withdraw { user, amount, request_id, reply } => {
                let r = self.transfer(ctx, store, Transfer::Withdraw, user, amount, request_id, now_ms, w);
                w.replies.push(Pending::Wallet(reply, r));
            }
            Command::Send { send, reply } => {
                let r = self.send(ctx, store, *send, now_ms, w);
                w.replies.push(Pending::Summary(reply, r));
            }
            Command::Grab { packet, user, reply } => {
                let r = self.grab(ctx, store, packet, &user, now_ms, w);
                w.replies.push(Pending::Grab(reply, r));
            }
            Command::Open { packet, user, reply } => {
                let r = self.settle(ctx, store, packet, user, now_ms, w, false);
                w.replies.push(Pending::Claim(reply, r));
            }
            Command::Claim { packet, user, reply } => {
                let r = self.settle(ctx, store, packet, user, now_ms, w, true);
                w.replies.push(Pending::Claim(reply, r));
            }
            Command::Claims { claims, reply } => {
                let mut claims = claims.into_iter();
                let mut r = Vec::with_capacity(claims.len());
                for i in 0..claims.len() {
                    if let Some(ahead) = burst_before(i) {
                        // What is left of the call starts at claim `i`.
                        for (packet, user) in claims.as_slice().iter().skip(ahead.start - i).take(ahead.len())
                        {
                            self.look_ahead(ctx, *packet, user);
                        }
                    }
                    let (packet, user) = claims.next().expect("a claim for each index");
                    r.push(self.settle(ctx, store, packet, user, now_ms, w, true));
                }
                w.replies.push(Pending::Claims(reply, r));
            }
            Command::Credit { from_set, items } => self.credit(from_set, items, w),
            Command::Ack { from_set, upto } => self.ack(from_set, upto, now_ms, w),
            Command::Audit { .. } | Command::Shutdown => unreachable!("handled by the loop"),
        }
    }

    fn check_idem<T>(
        &self,
        user: &UserId,
        request_id: &RequestId,
        fp: u64,
        map: impl FnOnce(IdemResult) -> Option<T>,
    ) -> IdemCheck<T> {
        match self.idem.get(&(user.clone(), request_id.clone())) {
            None => IdemCheck::New,
            Some(r) if r.fingerprint == fp => match map(r.result) {
                Some(t) => IdemCheck::Replay(t),
                None => IdemCheck::Conflict,
            },
            Some(_) => IdemCheck::Conflict,
        }
    }

    fn remember(
        &mut self,
        user: &UserId,
        request_id: &RequestId,
        fp: u64,
        result: IdemResult,
        now_ms: Millis,
        w: &mut Work,
    ) {
        let rec = IdemRecord {
            user: user.clone(),
            request_id: request_id.as_str().to_string(),
            fingerprint: fp,
            result,
            at_ms: now_ms,
        };
        w.batch.idempotency.push(rec);
        self.idem_order.push_back((now_ms, user.clone(), request_id.clone()));
        self.idem.insert((user.clone(), request_id.clone()), Remembered { fingerprint: fp, result });
    }

    fn prune_idempotency(&mut self, before_ms: Millis) {
        while let Some((at, _, _)) = self.idem_order.front() {
            if *at >= before_ms {
                break;
            }
            let (_, user, rid) = self.idem_order.pop_front().expect("front exists");
            self.idem.remove(&(user, rid));
        }
    }

    /// The balance of `user`, whose wallet the set holds from now on. One it does not hold
    /// yet (a user it has not debited since it loaded: a claimer) is read from the store, which
    /// has every credit committed, with this batch's credits to them added.
    fn hold(&mut self, store: &mut dyn Store, user: &UserId, w: &Work) -> Result<i64, EngineError> {
        if let Some(balance) = self.wallets.get(user) {
            return Ok(balance);
        }
        let stored = store.balance(user)?.unwrap_or(0);
        let balance = w
            .batch
            .credits
            .iter()
            .filter(|(u, _)| u == user)
            .try_fold(stored, |sum, (_, fen)| sum.checked_add(*fen))
            .expect("credits overflow a balance");
        self.wallets.set(user, balance);
        self.unheld_fen -= balance;
        Ok(balance)
    }

    fn set_balance(&mut self, user: &UserId, balance: i64, w: &mut Work) {
        assert!(balance >= 0, "negative balance for {user}");
        let old = self.wallets.set(user, balance).unwrap_or(0);
        self.balances_fen = self.balances_fen - old + balance;
        w.dirty_wallets.note(user, balance);
    }

    /// Asks for what a claim of `packet` by `user` will touch, a few claims before it is
    /// settled: the place of the user's claim in the packet's index, and the place where this
    /// set would hold their wallet (most claimers' wallets are not held, and the tables stay
    /// small). In the in-process festival, where every claimer is new, the packets' indexes
    /// are tens of megabytes, and each was a miss to memory that the set otherwise waited for.
    fn look_ahead(&self, ctx: &SetContext, packet: PacketId, user: &UserId) {
        if let Some(p) = self.packets.get(&packet) {
            p.prefetch_claim(user);
        }
        if set_of_user(user, ctx.sets) == ctx.set {
            self.wallets.prefetch(user);
        }
    }

    /// Adds `fen` to the wallet of `user`: in memory when the set holds it, else as a credit
    /// the store adds (`Batch::credits`). A claimer's wallet is not held until the set first
    /// debits them (`hold`): in the in-process festival, where every claimer is new, finding or
    /// making each one's wallet in tables of hundreds of megabytes was a quarter of a set's
    /// time, and the tables the most of its memory (BENCHMARKS.md, forty-second session).
    fn credit_wallet(&mut self, user: &UserId, fen: i64, w: &mut Work) {
        self.balances_fen = self.balances_fen.checked_add(fen).expect("balances overflow");
        match self.wallets.credit(user, fen) {
            Some(balance) => w.dirty_wallets.note(user, balance),
            None => {
                self.unheld_fen += fen;
                w.batch.credits.push((user.clone(), fen));
            }
        }
    }

    fn entry(
        &self,
        user: &UserId,
        kind: EntryKind,
        amount_fen: i64,
        packet_id: Option<PacketId>,
        at_ms: Millis,
        w: &mut Work,
    ) {
        w.batch.entries.push(Entry { user: user.clone(), kind, amount_fen, packet_id, at_ms });
    }

    /// A deposit or a withdrawal: idempotent per (user, request_id), bounded by the balance
    /// limit going in and by the balance going out.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &mut self,
        ctx: &SetContext,
        store: &mut dyn Store,
        dir: Transfer,
        user: UserId,
        amount: Amount,
        request_id: RequestId,
        now_ms: Millis,
        w: &mut Work,
    ) -> Result<WalletReply, EngineError> {
        let fen = amount.fen();
        let (op, kind) = match dir {
            Transfer::Deposit => ("deposit", EntryKind::Deposit),
            Transfer::Withdraw => ("withdraw", EntryKind::Withdraw),
        };
        let fp = fingerprint(&[op, &fen.to_string()]);
        match self.check_idem(&user, &request_id, fp, |r| match (dir, r) {
            (Transfer::Deposit, IdemResult::Deposit { balance_fen })
            | (Transfer::Withdraw, IdemResult::Withdraw { balance_fen }) => Some(balance_fen),
            _ => None,
        }) {
            IdemCheck::Replay(balance_fen) => return Ok(WalletReply { user, balance_fen }),
            IdemCheck::Conflict => return Err(EngineError::IdempotencyConflict),
            IdemCheck::New => {}
        }
        let balance = match dir {
            Transfer::Deposit => self
                .hold(store, &user, w)?
                .checked_add(fen)
                .filter(|b| *b <= ctx.limits.balance_max_fen)
                .ok_or(EngineError::BalanceLimit)?,
            Transfer::Withdraw => hongbao_core::money::sub_fen(self.hold(store, &user, w)?, fen)
                .ok_or(EngineError::InsufficientFunds)?,
        };
        self.set_balance(&user, balance, w);
        let (total, moved, result) = match dir {
            Transfer::Deposit => (
                &mut self.totals.deposits_fen,
                &mut w.deposits_fen,
                IdemResult::Deposit { balance_fen: balance },
            ),
            Transfer::Withdraw => (
                &mut self.totals.withdrawals_fen,
                &mut w.withdrawals_fen,
                IdemResult::Withdraw { balance_fen: balance },
            ),
        };
        *total = total.checked_add(fen).expect("transfer total overflows");
        *moved += fen;
        w.totals_moved = true;
        self.entry(&user, kind, fen, None, now_ms, w);
        self.remember(&user, &request_id, fp, result, now_ms, w);
        Ok(WalletReply { user, balance_fen: balance })
    }

    fn send(
        &mut self,
        ctx: &SetContext,
        store: &mut dyn Store,
        send: ValidSend,
        now_ms: Millis,
        w: &mut Work,
    ) -> Result<PacketSummary, EngineError> {
        let fp = send_fingerprint(&send);
        match self.check_idem(&send.sender, &send.request_id, fp, |r| match r {
            IdemResult::Send { packet_id } => Some(packet_id),
            _ => None,
        }) {
            IdemCheck::Replay(id) => {
                self.find_packet(ctx, store, id)?;
                return Ok(PacketSummary::of(self.packets[&id].header()));
            }
            IdemCheck::Conflict => return Err(EngineError::IdempotencyConflict),
            IdemCheck::New => {}
        }
        let total = send.total.fen();
        let balance = hongbao_core::money::sub_fen(self.hold(store, &send.sender, w)?, total)
            .ok_or(EngineError::InsufficientFunds)?;
        let id = self.id_gen.next(now_ms);
        let packet = Packet::new(id, &send, now_ms, self.rng.next_u64());
        self.set_balance(&send.sender, balance, w);
        self.entry(&send.sender, EntryKind::Send, total, Some(id), now_ms, w);
        self.escrow_fen += total;
        self.remember(&send.sender, &send.request_id, fp, IdemResult::Send { packet_id: id }, now_ms, w);
        w.batch.new_packets.push(packet.header().clone());
        self.expiries.insert((packet.header().expires_at_ms, id));
        let s = PacketSummary::of(packet.header());
        self.packets.insert(id, Box::new(packet));
        Ok(s)
    }

    /// Makes sure a packet of this set is in memory: active packets always are; one closed
    /// long ago is read from the store once and kept in the closed cache.
    fn find_packet(
        &mut self,
        ctx: &SetContext,
        store: &mut dyn Store,
        id: PacketId,
    ) -> Result<(), EngineError> {
        if self.packets.contains_key(&id) {
            return Ok(());
        }
        if id.set() != ctx.set || self.id_gen.last_issued().is_none_or(|last| id > last) {
            return Err(EngineError::NotFound);
        }
        let p = store.packet(id)?.ok_or(EngineError::NotFound)?;
        if p.status() == PacketStatus::Active {
            // Every active packet is resident; one found only in the store is a bug.
            panic!("set {}: active packet {id} was not in memory", ctx.set);
        }
        // Read back from the store, its closing is durable.
        ctx.closed.publish(&p);
        self.packets.insert(id, Box::new(p));
        self.note_closed(ctx, id);
        Ok(())
    }

    /// Closes a due packet: its remainder goes back to the sender's wallet, once.
    fn expire_packet(&mut self, ctx: &SetContext, id: PacketId, now_ms: Millis, w: &mut Work) {
        let Some(p) = self.packets.get_mut(&id) else { return };
        let Some(refund) = p.expire(now_ms) else { return };
        let sender = p.header().sender.clone();
        let expires_at = p.header().expires_at_ms;
        self.expiries.remove(&(expires_at, id));
        self.escrow_fen -= refund;
        self.credit_wallet(&sender, refund, w);
        self.entry(&sender, EntryKind::Refund, refund, Some(id), now_ms, w);
        w.dirty_packets.insert(id);
        w.closed.push(id);
        self.note_closed(ctx, id);
    }

    fn expire_due(&mut self, ctx: &SetContext, now_ms: Millis, w: &mut Work) {
        while let Some(&(at, id)) = self.expiries.first() {
            if at > now_ms {
                break;
            }
            self.expiries.pop_first();
            self.expire_packet(ctx, id, now_ms, w);
        }
    }

    fn note_closed(&mut self, ctx: &SetContext, id: PacketId) {
        let claims = self.packets.get(&id).map_or(0, |p| p.opened_count() as usize);
        self.closed.push_back(id);
        self.closed_claims += claims;
        while self.closed_claims > CLOSED_CLAIMS_MAX || self.closed.len() > CLOSED_PACKETS_MAX {
            let Some(old) = self.closed.pop_front() else { break };
            ctx.closed.forget(old);
            if let Some(p) = self.packets.remove(&old) {
                self.closed_claims -= p.opened_count() as usize;
            }
        }
    }

    /// Looks a packet up for a grab, open or claim, and closes it first if it is due.
    fn prepare_packet(
        &mut self,
        ctx: &SetContext,
        store: &mut dyn Store,
        id: PacketId,
        now_ms: Millis,
        w: &mut Work,
    ) -> Result<(), EngineError> {
        self.find_packet(ctx, store, id)?;
        if self.packets[&id].is_due(now_ms) {
            self.expire_packet(ctx, id, now_ms, w);
        }
        Ok(())
    }

    fn grab(
        &mut self,
        ctx: &SetContext,
        store: &mut dyn Store,
        id: PacketId,
        user: &UserId,
        now_ms: Millis,
        w: &mut Work,
    ) -> Result<GrabReply, EngineError> {
        self.prepare_packet(ctx, store, id, now_ms, w)?;
        let hold_ms = ctx.limits.hold_s * 1000;
        let p = self.packets.get_mut(&id).expect("prepared");
        match p.grab(user, now_ms, hold_ms)? {
            GrabOutcome::Grabbed { hold_expires_at_ms } => Ok(GrabReply::Grabbed { hold_expires_at_ms }),
            GrabOutcome::AlreadyOpened(c) => Ok(GrabReply::AlreadyOpened(claim_reply(id, c))),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn settle(
        &mut self,
        ctx: &SetContext,
        store: &mut dyn Store,
        id: PacketId,
        user: UserId,
        now_ms: Millis,
        w: &mut Work,
        claim: bool,
    ) -> Result<ClaimReply, EngineError> {
        self.prepare_packet(ctx, store, id, now_ms, w)?;
        let p = self.packets.get_mut(&id).expect("prepared");
        let outcome = if claim { p.claim(&user, now_ms) } else { p.open(&user, now_ms) }?;
        let c = outcome.claim;
        if !outcome.fresh {
            return Ok(claim_reply(id, c));
        }
        let exhausted = p.status() == PacketStatus::Exhausted;
        let expires_at = p.header().expires_at_ms;
        self.escrow_fen -= c.amount_fen;
        // The reply takes the caller's id, and the store's row the claim the packet handed
        // back: each reference-counted copy of the id is an atomic write to the line that
        // holds the name, and a claim made seven of them.
        let reply = ClaimReply { packet_id: id, user, amount_fen: c.amount_fen, at_ms: c.at_ms };
        let user = &reply.user;
        w.batch.claims.push(ClaimRow { packet_id: id, claim: c });
        w.dirty_packets.insert(id);
        let target = set_of_user(user, ctx.sets);
        if target == ctx.set {
            self.credit_wallet(user, reply.amount_fen, w);
            self.entry(user, EntryKind::Claim, reply.amount_fen, Some(id), reply.at_ms, w);
        } else {
            let seq = self.outbox_last_seq.entry(target).or_insert(0);
            *seq += 1;
            let item = OutboxItem {
                target_set: target,
                seq: *seq,
                user: user.clone(),
                amount_fen: reply.amount_fen,
                packet_id: id,
                at_ms: reply.at_ms,
            };
            self.outbox.entry(target).or_default().push_back(item.clone());
            w.batch.outbox_new.push(item);
            w.credits_out_fen += reply.amount_fen;
        }
        if exhausted {
            self.expiries.remove(&(expires_at, id));
            w.closed.push(id);
            self.note_closed(ctx, id);
        }
        Ok(reply)
    }

    /// Applies credits from another set, each seq once and in order. A gap (an earlier message
    /// was lost) stops the run: the source resends from its outbox.
    fn credit(&mut self, from_set: u32, items: Vec<OutboxItem>, w: &mut Work) {
        let mut mark = self.watermarks.get(&from_set).copied().unwrap_or(0);
        let before = mark;
        for (i, item) in items.iter().enumerate() {
            if let Some(ahead) = burst_before(i) {
                for ahead in items.iter().skip(ahead.start).take(ahead.len()) {
                    self.wallets.prefetch(&ahead.user);
                }
            }
            if item.seq <= mark {
                continue;
            }
            if item.seq != mark + 1 {
                break;
            }
            self.credit_wallet(&item.user, item.amount_fen, w);
            self.entry(&item.user, EntryKind::Claim, item.amount_fen, Some(item.packet_id), item.at_ms, w);
            w.credits_in_fen += item.amount_fen;
            mark = item.seq;
        }
        if mark != before {
            self.watermarks.insert(from_set, mark);
            w.batch.watermarks.retain(|(s, _)| *s != from_set);
            w.batch.watermarks.push((from_set, mark));
        }
        // Acknowledge even duplicates, so the source stops resending.
        if mark > 0 {
            w.acks.retain(|(s, _)| *s != from_set);
            w.acks.push((from_set, mark));
        }
    }

    fn ack(&mut self, from_set: u32, upto: u64, now_ms: Millis, w: &mut Work) {
        let Some(q) = self.outbox.get_mut(&from_set) else { return };
        let mut acked = false;
        while q.front().is_some_and(|i| i.seq <= upto) {
            q.pop_front();
            acked = true;
        }
        if acked {
            w.batch.outbox_acked.push((from_set, upto));
            // The target is taking them: what is still sent and unacknowledged waits anew.
            if let Some(r) = self.relays.get_mut(&from_set) {
                r.waiting_since_ms = now_ms;
            }
        }
    }

    /// Writes the batch, checks the books, and sends replies, credits and acks. Returns false
    /// when the commit failed: the caller must reload the set from its store.
    fn finish(&mut self, ctx: &SetContext, store: &mut dyn Store, w: &mut Work, now_ms: Millis) -> bool {
        w.batch.wallets.extend(w.dirty_wallets.drain());
        for id in w.dirty_packets.drain() {
            let p = &self.packets[&id];
            w.batch.packet_updates.push(PacketUpdate {
                id,
                status: p.status(),
                opened_count: p.opened_count(),
                opened_fen: p.opened_fen(),
                refunded_fen: p.refunded_fen(),
                best: p.best_luck().map(|c| (c.user.clone(), c.amount_fen)),
            });
        }
        if w.totals_moved {
            w.batch.totals = Some(self.totals);
        }
        self.check_books(ctx, w);
        if !w.batch.is_empty() {
            let started = Instant::now();
            let size = w.replies.len();
            if let Err(e) = store.commit(&w.batch) {
                tracing::error!(set = ctx.set, error = %e, "commit failed; the set reloads from its store");
                metrics::counter!("hongbao_commit_failures_total").increment(1);
                for r in w.replies.drain(..) {
                    r.fail(EngineError::Unavailable);
                }
                return false;
            }
            let set = ctx.set.to_string();
            metrics::histogram!("hongbao_commit_seconds", "set" => set.clone())
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!("hongbao_batch_commands", "set" => set).record(size as f64);
        }
        for id in w.closed.drain(..) {
            // Gone already when the closed cache let it go within this batch.
            if let Some(p) = self.packets.get(&id) {
                ctx.closed.publish(p);
            }
        }
        for r in w.replies.drain(..) {
            r.send();
        }
        let new_targets: std::collections::BTreeSet<u32> =
            w.batch.outbox_new.iter().map(|i| i.target_set).collect();
        for target in new_targets {
            self.relay(ctx, target, now_ms, false);
        }
        for &(source, upto) in &w.acks {
            // A lost ack is harmless: the source resends and we acknowledge again.
            let _ = ctx.peers[source as usize].try_send(Command::Ack { from_set: ctx.set, upto });
        }
        true
    }

    /// Sends `target` a bounded chunk of its credits: those not sent yet, or with
    /// `from_oldest` every unacknowledged one again.
    fn relay(&mut self, ctx: &SetContext, target: u32, now_ms: Millis, from_oldest: bool) {
        let Some(q) = self.outbox.get(&target) else { return };
        let r = self.relays.entry(target).or_insert(Relay { sent_upto: 0, waiting_since_ms: now_ms });
        let sent_before = r.sent_upto;
        if from_oldest {
            r.sent_upto = 0;
        }
        let start = q.partition_point(|i| i.seq <= r.sent_upto);
        if start == q.len() {
            return;
        }
        let items: Vec<OutboxItem> = q.range(start..).take(RELAY_CHUNK_MAX).cloned().collect();
        let last = items[items.len() - 1].seq;
        let again = items.iter().take_while(|i| i.seq <= sent_before).count();
        match ctx.peers[target as usize].try_send(Command::Credit { from_set: ctx.set, items }) {
            Ok(()) => {
                // Nothing was waiting (all acknowledged, or all sent again): the wait starts.
                if start == 0 {
                    r.waiting_since_ms = now_ms;
                }
                r.sent_upto = last;
                if again > 0 {
                    metrics::counter!("hongbao_credits_resent_total").increment(again as u64);
                }
            }
            // Full or stopping: left unsent, for the next commit or tick to send.
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Sends what is unsent, and again from the oldest what waited [`RELAY_RETRY_MS`] for an
    /// ack (`now_ms` = i64::MIN, when the set starts: everything unacknowledged).
    fn relay_all(&mut self, ctx: &SetContext, now_ms: Millis) {
        let targets: Vec<u32> = self.outbox.iter().filter(|(_, q)| !q.is_empty()).map(|(t, _)| *t).collect();
        for target in targets {
            let overdue = now_ms == i64::MIN
                || self.relays.get(&target).is_some_and(|r| {
                    r.sent_upto > 0 && now_ms.saturating_sub(r.waiting_since_ms) >= RELAY_RETRY_MS
                });
            let now_ms = if now_ms == i64::MIN { ctx.clock.now_ms() } else { now_ms };
            self.relay(ctx, target, now_ms, overdue);
        }
    }

    /// DESIGN.md §2.1 for this set's books: what came in and went out in this batch equals
    /// the change of balances plus escrow. A mismatch is a bug: stop before it is written.
    fn check_books(&self, ctx: &SetContext, w: &Work) {
        let moved = w.deposits_fen - w.withdrawals_fen + w.credits_in_fen - w.credits_out_fen;
        assert_eq!(
            self.balances_fen + self.escrow_fen - w.base_fen,
            moved,
            "set {}: conservation broken in a batch",
            ctx.set
        );
        if cfg!(debug_assertions) {
            let balances: i64 = self.wallets.balances().sum();
            let escrow: i64 = self.packets.values().map(|p| p.escrow_fen()).sum();
            assert_eq!(balances + self.unheld_fen, self.balances_fen, "set {}: balance sum drifted", ctx.set);
            // Closed packets hold no escrow, so evicting them never changes the sum.
            assert_eq!(escrow, self.escrow_fen, "set {}: escrow sum drifted", ctx.set);
        }
    }

    /// When the sums disagree: which wallets, active packets and credits differ between this
    /// set's memory and its store, the first [`DIFFERENCES_SHOWN`] of each, so an audit that
    /// fails says where to look (and, by the claims' times, when the two parted).
    fn differences(&self, ctx: &SetContext, store: &mut dyn Store) -> String {
        // From the beginning of time: nothing is pruned, and every row is read.
        let stored = match store.load(Millis::MIN) {
            Ok(l) => l,
            Err(e) => return format!("set {}: cannot read the store to compare: {e}", ctx.set),
        };
        let mut found: Vec<String> = Vec::new();
        let mut note = |kind: &str, line: String| {
            if found.iter().filter(|f| f.starts_with(kind)).count() < DIFFERENCES_SHOWN {
                found.push(format!("{kind} {line}"));
            }
        };
        let stored_wallets: HashMap<&str, i64> =
            stored.wallets.iter().map(|(u, f)| (u.as_str(), *f)).collect();
        for (user, fen) in self.wallets.iter() {
            match stored_wallets.get(user.as_str()) {
                Some(s) if *s == fen => {}
                s => note("wallet", format!("{user}: store {s:?}, memory {fen}")),
            }
        }
        // A stored wallet the set does not hold is one it has not debited since it loaded:
        // checked by the sum, not one by one.

        let show = |p: &Packet| {
            let last =
                p.claims().max_by_key(|c| c.at_ms).map(|c| (c.user.to_string(), c.amount_fen, c.at_ms));
            format!(
                "{:?} {}/{} shares {} fen opened, {} refunded, last claim {last:?}",
                p.status(),
                p.opened_count(),
                p.header().count,
                p.opened_fen(),
                p.refunded_fen()
            )
        };
        let stored_active: HashMap<PacketId, &Packet> =
            stored.active_packets.iter().map(|p| (p.id(), &**p)).collect();
        for (id, p) in &self.packets {
            let in_store = match stored_active.get(id) {
                Some(s) => show(s),
                None if p.status() != PacketStatus::Active => continue,
                None => match store.packet(*id) {
                    Ok(Some(s)) => show(&s),
                    Ok(None) => "none".to_string(),
                    Err(e) => format!("unreadable: {e}"),
                },
            };
            let in_memory = show(p);
            if in_store != in_memory {
                note("packet", format!("{id}: store {in_store}; memory {in_memory}"));
            }
        }
        for (id, s) in &stored_active {
            if !self.packets.contains_key(id) {
                note("packet", format!("{id}: store {}; not in memory", show(s)));
            }
        }
        let memory_outbox: Vec<&OutboxItem> = self.outbox.values().flatten().collect();
        for item in &stored.outbox_pending {
            if !memory_outbox.contains(&item) {
                note("credit", format!("{item:?} only in the store"));
            }
        }
        for item in &memory_outbox {
            if !stored.outbox_pending.contains(item) {
                note("credit", format!("{item:?} only in memory"));
            }
        }
        let watermarks: BTreeMap<u32, u64> = stored.watermarks.iter().copied().collect();
        for (source, seq) in &self.watermarks {
            if watermarks.get(source) != Some(seq) {
                note(
                    "watermark",
                    format!("from set {source}: store {:?}, memory {seq}", watermarks.get(source)),
                );
            }
        }
        if found.is_empty() {
            found.push("no wallet, active packet or credit differs".to_string());
        }
        format!("set {}: differs from its store: {}", ctx.set, found.join("; "))
    }

    fn snapshot(&mut self, ctx: &SetContext, store: &mut dyn Store) -> Result<SetSnapshot, String> {
        let sums = store.sums().map_err(|e| format!("set {}: {e}", ctx.set))?;
        let mut problems = Vec::new();
        let outbox_pending: Vec<OutboxItem> = self.outbox.values().flat_map(|q| q.iter().cloned()).collect();
        if sums.balances_fen != self.balances_fen {
            problems.push(format!(
                "set {}: balances in store {} != memory {}",
                ctx.set, sums.balances_fen, self.balances_fen
            ));
        }
        if sums.escrow_fen != self.escrow_fen {
            problems.push(format!(
                "set {}: escrow in store {} != memory {}",
                ctx.set, sums.escrow_fen, self.escrow_fen
            ));
        }
        if sums.totals != self.totals {
            problems.push(format!(
                "set {}: totals in store {:?} != memory {:?}",
                ctx.set, sums.totals, self.totals
            ));
        }
        let mem_pending: i64 = outbox_pending.iter().map(|i| i.amount_fen).sum();
        let store_pending: i64 = sums.outbox_pending.iter().map(|i| i.amount_fen).sum();
        if mem_pending != store_pending {
            problems.push(format!(
                "set {}: outbox in store {} != memory {}",
                ctx.set, store_pending, mem_pending
            ));
        }
        if !problems.is_empty() {
            problems.push(self.differences(ctx, store));
        }
        Ok(SetSnapshot {
            set: ctx.set,
            totals: sums.totals,
            balances_fen: sums.balances_fen,
            escrow_fen: sums.escrow_fen,
            outbox_pending: sums.outbox_pending,
            watermarks: sums.watermarks.into_iter().collect(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hongbao_core::{Audience, Kind, ManualClock};

    const T0_MS: Millis = 1_767_225_600_000;

    #[test]
    fn each_item_of_a_call_is_asked_for_once_within_two_groups_before_it_is_applied() {
        for n in [1, BURST - 1, BURST, BURST + 1, 2 * BURST, 2 * BURST + 1, 700] {
            let mut asked_at = vec![None; n];
            for i in 0..n {
                for j in burst_before(i).unwrap_or(0..0).filter(|&j| j < n) {
                    assert_eq!(asked_at[j], None, "item {j} of {n} asked for twice");
                    asked_at[j] = Some(i);
                }
            }
            for (j, at) in asked_at.iter().enumerate() {
                let at = at.unwrap_or_else(|| panic!("item {j} of {n} never asked for"));
                assert!(at <= j && j - at < 2 * BURST, "item {j} of {n} asked for at {at}");
            }
        }
    }

    /// Set 0 of two, on SQLite, with set 1's queue left to the test: what set 0 relays lands
    /// there, and the test acknowledges (or loses) it as set 1 would.
    struct TwoSets {
        runner: SetRunner,
        to_0: Sender<Command>,
        at_1: Receiver<Command>,
        clock: ManualClock,
        _dir: tempfile::TempDir,
    }

    impl TwoSets {
        fn new() -> TwoSets {
            TwoSets::with_batch_max(1_024)
        }

        fn with_batch_max(batch_max: usize) -> TwoSets {
            let dir = tempfile::tempdir().unwrap();
            let (store, _) = hongbao_store::open_sqlite(dir.path(), 0, 2).unwrap();
            let (to_0, rx_0) = crossbeam_channel::bounded(1_024);
            let (to_1, at_1) = crossbeam_channel::bounded(1_024);
            let clock = ManualClock::new(T0_MS);
            let ctx = SetContext {
                set: 0,
                sets: 2,
                limits: Limits::default(),
                batch_max,
                commit_spacing: Duration::ZERO,
                idempotency_retention_ms: 24 * 3600 * 1000,
                clock: Arc::new(clock.clone()),
                seed: 7,
                peers: vec![to_0.clone(), to_1],
                ready: Arc::new(AtomicBool::new(false)),
                stopping: Arc::new(AtomicBool::new(false)),
                closed: Arc::default(),
            };
            let runner = SetRunner::open(ctx, Box::new(store), rx_0).unwrap();
            TwoSets { runner, to_0, at_1, clock, _dir: dir }
        }

        /// Applies `cmd` in one batch of its own.
        fn step(&mut self, cmd: Command) {
            self.to_0.send(cmd).unwrap();
            assert!(self.runner.step(None));
        }

        /// The seqs of every credit set 0 has relayed since the last call, in order.
        fn relayed(&self) -> Vec<u64> {
            let mut seqs = Vec::new();
            while let Ok(cmd) = self.at_1.try_recv() {
                match cmd {
                    Command::Credit { from_set: 0, items } => seqs.extend(items.iter().map(|i| i.seq)),
                    _ => panic!("set 1 was sent something other than credits"),
                }
            }
            seqs
        }

        /// A sender of set 0 with 100,000 fen, who sends an equal packet of 10,000 fen in 100
        /// shares to anyone: the sender, with 90,000 fen left, and the packet.
        fn funded_packet(&mut self) -> (UserId, PacketId) {
            let sender = user_on(0, "s", &mut 0);
            let (reply, _rx) = oneshot::channel();
            let request_id = RequestId::parse("d1").unwrap();
            self.step(Command::Deposit {
                user: sender.clone(),
                amount: Amount::new(100_000).unwrap(),
                request_id,
                reply,
            });
            let send = ValidSend {
                sender: sender.clone(),
                kind: Kind::Equal,
                total: Amount::new(10_000).unwrap(),
                count: 100,
                audience: Audience::Anyone,
                greeting: String::new(),
                expires_in_s: 3_600,
                request_id: RequestId::parse("s1").unwrap(),
            };
            let (reply, mut rx) = oneshot::channel();
            self.step(Command::Send { send: Box::new(send), reply });
            (sender, rx.try_recv().unwrap().unwrap().id)
        }

        /// Claims by `n` users of set 1 on `packet`, in one batch: each share is credited there.
        fn claims(&mut self, packet: PacketId, k: &mut u32, n: usize) {
            let claims = (0..n).map(|_| (packet, user_on(1, "c", k))).collect();
            let (reply, _rx) = oneshot::channel();
            self.step(Command::Claims { claims, reply });
        }
    }

    /// The first user after `*k` (named `{prefix}{k}`) whose wallet is on `set` of two.
    fn user_on(set: u32, prefix: &str, k: &mut u32) -> UserId {
        loop {
            *k += 1;
            let user = UserId::parse(&format!("{prefix}{k}")).unwrap();
            if set_of_user(&user, 2) == set {
                return user;
            }
        }
    }

    /// Claims queued one by one are taken a few ahead of the one applied (for their memory to
    /// be asked for), yet applied in the order they were queued, and a batch that is full
    /// leaves those it took ahead to begin the next.
    #[test]
    fn claims_taken_ahead_are_applied_in_order_and_a_full_batch_leaves_them_to_the_next() {
        let mut t = TwoSets::with_batch_max(3);
        let (_, packet) = t.funded_packet();
        let mut k = 0;
        let users: Vec<UserId> = (0..10).map(|_| user_on(0, "c", &mut k)).collect();
        let mut replies: Vec<_> = users
            .iter()
            .map(|user| {
                let (reply, rx) = oneshot::channel();
                t.to_0.send(Command::Claim { packet, user: user.clone(), reply }).unwrap();
                rx
            })
            .collect();
        let mut answered = Vec::new();
        for want in [3, 6, 9, 10] {
            assert!(t.runner.step(None));
            for (i, rx) in replies.iter_mut().enumerate() {
                if let Ok(r) = rx.try_recv() {
                    assert_eq!(r.expect("paid").user, users[i]);
                    answered.push(i);
                }
            }
            assert_eq!(answered.len(), want, "a batch of at most 3");
            if want == 3 {
                assert!(!t.runner.ahead.is_empty(), "the first batch took claims ahead");
            }
        }
        assert_eq!(answered, (0..10).collect::<Vec<_>>(), "answered in the order queued");
        let p = &t.runner.state.packets[&packet];
        assert!(p.claims().map(|c| &c.user).eq(users.iter()), "settled in the order queued");
        assert!(t.runner.ahead.is_empty(), "nothing left taken ahead");
    }

    /// What `hongbao_credits_resent_total` counted on this thread so far.
    fn resent(snapshotter: &metrics_util::debugging::Snapshotter) -> u64 {
        use metrics_util::debugging::DebugValue;
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find(|(key, ..)| key.key().name() == "hongbao_credits_resent_total")
            .map_or(0, |(.., value)| match value {
                DebugValue::Counter(n) => n,
                other => panic!("a counter, not {other:?}"),
            })
    }

    #[test]
    fn each_credit_is_relayed_once_until_its_ack_is_overdue_then_again_from_the_oldest() {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || relayed_once_then_again(&snapshotter));
    }

    fn relayed_once_then_again(snapshotter: &metrics_util::debugging::Snapshotter) {
        let mut sets = TwoSets::new();
        let (_, packet) = sets.funded_packet();
        let mut k = 0;
        sets.claims(packet, &mut k, 3);
        assert_eq!(sets.relayed(), [1, 2, 3]);
        // Unacknowledged, the next batch's credits go alone: the first three are not sent again.
        sets.claims(packet, &mut k, 2);
        assert_eq!(sets.relayed(), [4, 5]);
        // Set 1 applied the first four. The fifth waits anew from this ack; a tick before
        // RELAY_RETRY_MS has passed sends nothing.
        let tick = TICK.as_millis() as i64;
        sets.step(Command::Ack { from_set: 1, upto: 4 });
        sets.clock.advance_ms(RELAY_RETRY_MS - tick);
        assert!(sets.runner.step(None));
        assert_eq!(sets.relayed(), Vec::<u64>::new());
        // Set 1 lost the fifth (a crash): at the first tick its ack is overdue, it goes again.
        assert_eq!(resent(snapshotter), 0, "nothing was sent twice yet");
        sets.clock.advance_ms(tick);
        assert!(sets.runner.step(None));
        assert_eq!(sets.relayed(), [5]);
        assert_eq!(resent(snapshotter), 1, "and it is counted as sent again");
        // Acknowledged, nothing is left to send at any tick.
        sets.step(Command::Ack { from_set: 1, upto: 5 });
        sets.clock.advance_ms(RELAY_RETRY_MS * 2);
        assert!(sets.runner.step(None));
        assert_eq!(sets.relayed(), Vec::<u64>::new());
        // A set that starts again sends everything unacknowledged from the oldest.
        sets.claims(packet, &mut k, 2);
        assert_eq!(sets.relayed(), [6, 7]);
        assert!(sets.runner.reload());
        assert_eq!(sets.relayed(), [6, 7]);
    }

    #[test]
    fn an_audit_that_finds_the_store_apart_names_the_wallets_and_credits_that_differ() {
        let mut sets = TwoSets::new();
        let (sender, packet) = sets.funded_packet();
        sets.claims(packet, &mut 0, 1);
        assert_eq!(sets.relayed(), [1]);
        assert!(sets.runner.snapshot().unwrap().problems.is_empty(), "memory and store agree");
        // Behind the set's back, another writer moves the sender's balance and acknowledges the
        // credit in the store only.
        let (mut other, _) = hongbao_store::open_sqlite(sets._dir.path(), 0, 2).unwrap();
        let batch =
            Batch { wallets: vec![(sender.clone(), 1)], outbox_acked: vec![(1, 1)], ..Batch::default() };
        other.commit(&batch).unwrap();
        let problems = sets.runner.snapshot().unwrap().problems;
        let named = problems.last().expect("problems");
        assert!(named.contains(&format!("wallet {sender}: store Some(1), memory 90000")), "{problems:?}");
        assert!(named.contains("seq: 1") && named.contains("only in memory"), "{problems:?}");
        assert!(!named.contains("packet "), "the packet agrees: {problems:?}");
    }
}
