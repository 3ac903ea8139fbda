//! The journal: SQLite made fast for the hot path by taking it off it. A set's commit appends
//! one compact record per batch (the batch's effects, encoded) to an append-only segment and
//! `fdatasync`s it: that is the durable commit, a few KB written sequentially instead of the
//! few MB of random B-tree pages a SQLite transaction of the same batch writes. A fold thread
//! per set then applies the records to the SQLite file in large transactions, in order, and
//! records in the same transaction how far it got (`meta.journal_seq`); a segment wholly
//! folded is kept to be a next segment ([`POOL_MAX`] of them), becomes the spare, or is
//! deleted.
//!
//! - **Crash.** On open, whatever the journal holds past `journal_seq` is folded before the
//!   set loads, so a restart sees every acknowledged batch. A record torn by the crash (short,
//!   or failing its CRC) at the end of the last segment was never acknowledged (its fsync did
//!   not return) and ends the log. A gap between segments refuses to open, unless every
//!   record missing from it is folded already (a folded segment left behind by a failed
//!   recycle): that one is logged and skipped.
//!   Damage inside the last segment cannot be told from a torn record.
//! - **History.** A wallet's balance and history and a user's sent and received pages read the
//!   SQLite file in one transaction and add what the records after it hold for that user
//!   (`crate::overlay`): they see every batch committed before them (read-your-writes) without
//!   waiting for the fold, and do not trail the claims while it gives way to a peak. Past
//!   [`overlay_bytes_max`] of records not folded they wait as the reads below do.
//! - **Reads.** A packet's details first await their [`CatchUp`]: until the fold has applied every
//!   batch committed when the query arrived, so a reply that said money moved is visible to the
//!   next query (read-your-writes). The wait is async, before the query takes a thread or a query slot, so
//!   queries behind the fold queue no one else. A waiting query starts the fold at once after
//!   a quiet spell, but no sooner than [`QUERY_FOLD_PACE`] times the last fold's length after
//!   it under load, so a stream of queries cannot chop the fold into small transactions (with
//!   nobody waiting the fold gathers for [`FOLD_DELAY`]). The wait is bounded by
//!   [`READ_WAIT_MAX`]; past it the query answers from what is folded, and so do the queries
//!   of the next `READ_WAIT_MAX`, without waiting. The reads themselves never wait.
//! - **Load.** While the claims want the CPU (the set journals fast and the process takes a
//!   large share of the machine: [`Yield`]), the fold gives way: it folds neither after its
//!   gathering nor for waiting queries, which answer from what is folded once their wait runs
//!   out. It folds again when the load ebbs, when the set's share of [`YIELD_LAG_BUDGET`] is
//!   queued or the oldest record is [`YIELD_LAG_MAX`] old, and at once for the set's own waits
//!   (a load, a packet read back, the audit's sums). A peak is absorbed at the journal's speed;
//!   under a load that never ebbs the fold keeps pace at the lag bound, at the cost it always
//!   had.
//! - **Backlog.** The fold applies everything queued in one SQLite transaction (up to
//!   [`FOLD_BYTES_MAX`]), so it goes faster the further it falls behind. It reads the records
//!   back from the segment files (the page cache, normally), so a backlog costs disk, not
//!   memory. When the backlog still grows past [`BACKLOG_BYTES_MAX`], commits wait for the
//!   fold: the set's queue fills and new work is refused with 503, as under any other
//!   overload.
//! - **Faults.** A failed append is zeroed back off the file before the commit fails, so a batch
//!   the engine was told failed can never reappear at the next start; if even that fails, the
//!   journal refuses every later commit and load until the process restarts. A failed fold is
//!   retried; meanwhile commits are refused and the set reloads once the fold catches up.
//!
//! This module must never acknowledge a batch before its record is on disk, never fold a
//! record twice or out of order, and never delete a segment that holds an unfolded record.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hashbrown::HashTable;
use hongbao_core::{Claim, Millis, Packet, PacketId, PacketStatus, UserId};

use crate::overlay::{add_totals, history_view, newer_first, Overlay};
use crate::sqlite::{self, open_sqlite_with, Folded, Leftovers, SqliteReader, SqliteStore};
use crate::{
    Batch, EntryRow, Loaded, PacketRow, Paging, Reader, ReceivedPage, Result, SentPage, Span, Store,
    StoreError, StoreSums,
};

/// What a set's fold thread is called, followed by the set's index.
pub const FOLD_THREAD: &str = "hongbao-fold-";

/// Marks the start of every record: a torn or foreign file shows at once. It names the
/// record's format: "HBJ2" since batches carry credits ([`Batch::credits`]).
const MAGIC: u32 = 0x4842_4a32; // "HBJ2"
/// The format before credits. A start still reads such records (a journal left by the version
/// before), as the same batches with no credits ([`upgrade_v1`]); none is written.
const MAGIC_V1: u32 = 0x4842_4a31; // "HBJ1"

/// magic, payload length, seq, CRC-32 of seq and payload.
const HEADER_BYTES: usize = 4 + 4 + 8 + 4;

/// Where a record's header holds its CRC.
const CRC_AT: usize = 16;

/// The CRC in the header at the start of `record` (which holds a whole header).
fn header_crc(record: &[u8]) -> u32 {
    u32::from_le_bytes(record[CRC_AT..CRC_AT + 4].try_into().expect("4 bytes"))
}

/// The largest record: a batch of `batch_max` commands encodes to a few hundred KB; anything
/// claiming more is damage, not a batch.
const RECORD_BYTES_MAX: usize = 64 * 1024 * 1024;

/// The size a segment is made at. Its blocks are written (with zeros) before any record goes
/// in, so an append overwrites the inside of the file and `fdatasync` has no size or extent to
/// commit: on ext4 a commit that grows a file waits for the filesystem journal, which first
/// flushes every other file's dirty data (the fold's SQLite pages), and that took an append's
/// sync from about 1 ms to 15 ms under load. A record that does not fit starts the next
/// segment; one larger than a whole segment grows it.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// A made (zero-filled, or folded and recycled) segment file waiting to be the next segment
/// when no folded one is kept, so a rotation is a rename, not 16 MiB of writes on the commit
/// path: made there, a segment held every claim of the set for about 50 ms (BENCHMARKS.md,
/// fourteenth session). The fold thread makes one when the journal opens and whenever a
/// rotation leaves neither a folded segment nor the spare, even while it gives way to the
/// claims, a MiB at a time ([`Pace::Gentle`]).
const SPARE: &str = "spare";

/// Folded segments a set keeps, under their own names, to be the next segments before the
/// spare is taken: the fold gives way for up to its lag bound ([`yield_lag_bytes`]: two
/// segments for each of two sets, four for a set alone), so with one spare alone a sustained
/// load took it at one rotation and found none at the next. The newest are kept and the
/// oldest taken, so with the segments after them they stay one run of seqs; a restart folds
/// nothing from them and recycles them like any folded segment.
const POOL_MAX: usize = 4;

/// Journal bytes waiting for the fold, per set, before commits wait for it: tens of millions
/// of claims, a burst of minutes at full speed, and a bound on the disk the journal takes and
/// on how far queries can trail claims.
pub const BACKLOG_BYTES_MAX: usize = 1024 * 1024 * 1024;

/// Most encoded bytes the fold applies in one SQLite transaction: large enough that a lagging
/// fold writes each B-tree page once for many batches, small enough that a query waiting for
/// it is not held for long.
pub const FOLD_BYTES_MAX: usize = 8 * 1024 * 1024;

/// How long a query waits for the fold to apply what was committed before it began. Idle, the
/// fold is milliseconds behind; in a burst it falls behind on purpose, and history answers
/// from what is folded rather than hold a query slot for long.
pub const READ_WAIT_MAX: Duration = Duration::from_millis(500);

/// Most record bytes not folded that history queries index beside SQLite (`crate::overlay`)
/// for one set of `sets`: twice the lag its fold allows itself while it gives way
/// ([`yield_lag_bytes`]). Past it the fold is behind for another reason (failing, or a backlog
/// it cannot keep up with), the index would grow with the backlog, and the queries wait for
/// the fold, as packet details do.
fn overlay_bytes_max(sets: u32) -> usize {
    2 * yield_lag_bytes(sets)
}

/// How long the set waits for the fold before it reads a packet that is not in its memory (a
/// closed packet it let go of, or an id it never issued) from SQLite, which must first hold
/// everything committed. The fold runs on the CPU the others leave: under a load that takes
/// every core it can trail for a long time, and a set that waited for it would stop serving
/// all its packets for one old one. Past this wait the read is refused as busy (503).
const PACKET_WAIT_MAX: Duration = Duration::from_millis(50);

/// After a packet read was refused as busy, how long further ones are refused at once unless
/// the fold has caught up meanwhile: a stream of such requests must not cost the set
/// [`PACKET_WAIT_MAX`] each.
const PACKET_BUSY_SPELL: Duration = Duration::from_millis(500);

/// How long the fold lets records gather before it folds them, unless something waits for
/// them or [`FOLD_EAGER_BYTES`] are queued. Under load a fold's cost is mostly per transaction
/// and per B-tree page it dirties (a random wallet or history page, written whole to the WAL
/// and again at the checkpoint), not per row: the longer the gathering, the more rows share a
/// page and the fewer transactions there are. With this and [`QUERY_FOLD_PACE`] the server's
/// CPU per claim over HTTP fell from 43–49 µs to 39–43 µs (BENCHMARKS.md, 2026-12-02).
/// Nothing waits on it: the journal is the durable commit.
const FOLD_DELAY: Duration = Duration::from_millis(500);

/// How soon after the last fold a waiting query starts the next: this many times as long as
/// the last fold took. A fold of a few quiet batches takes a millisecond, so a query waits a
/// few more at most (read-your-writes stays quick for a client that writes, then reads); a
/// fold under load takes tens, so a stream of queries cannot split the fold into the small
/// transactions that cost the most per claim: queries keep the fold below a fifth of the time.
const QUERY_FOLD_PACE: u32 = 4;

/// The longest a query waits for the pace: well inside [`READ_WAIT_MAX`].
const QUERY_FOLD_SPACING_MAX: Duration = Duration::from_millis(100);

/// Queued bytes that start a fold at once.
const FOLD_EAGER_BYTES: usize = 1024 * 1024;

/// How long the fold waits before it tries a failed transaction again.
const FOLD_RETRY: Duration = Duration::from_millis(200);

/// While the claims want the CPU (see [`Yield`]), the fold gives way until the process's sets
/// have this many encoded bytes queued between them; each set's bound is its share
/// ([`yield_lag_bytes`]). Past it, a set's fold folds again, so under a load that never ebbs
/// it keeps pace at this distance: 6–8 s of the HTTP festival at about 80,000 claims a second
/// on two sets on the 2-core machine of BENCHMARKS.md (thirtieth session). It bounds what a
/// start after `kill -9` folds before it serves: killed 28 s into the festival, a start took
/// 4.8 s there, against 0.5 s with a fold that never gave way. The budget is the process's,
/// not a set's, because what it spends is: the disk and page cache the records take, the
/// history index ([`overlay_bytes_max`]) and the start's fold. With 32 MiB a set, a set alone
/// (a claim journaled once, not in two sets) reached its bound within a 10 s festival and
/// folded 1.6 µs a request there, against 0.7 for two sets (BENCHMARKS.md, thirty-eighth
/// session).
const YIELD_LAG_BUDGET: usize = 64 * 1024 * 1024;

/// The smallest lag bound a set gets, however many sets share [`YIELD_LAG_BUDGET`]: half of
/// what one fold applies ([`FOLD_BYTES_MAX`]), so a set among many still gives way for a
/// while and folds its backlog in transactions of MiBs, not of a few batches.
const YIELD_LAG_BYTES_MIN: usize = 4 * 1024 * 1024;

/// A set's share of [`YIELD_LAG_BUDGET`] when the process runs `sets` of them.
fn yield_lag_bytes(sets: u32) -> usize {
    (YIELD_LAG_BUDGET / sets.max(1) as usize).max(YIELD_LAG_BYTES_MIN)
}

/// While the claims want the CPU, the fold gives way until its oldest unfolded record is this
/// old: how stale history can get under a load that leaves no CPU for it.
const YIELD_LAG_MAX: Duration = Duration::from_secs(30);

/// The set's journal rate (encoded bytes a second; a claim is about 100 bytes in each of the
/// two sets it touches) at or above which its fold may give way: a few thousand claims a
/// second, a peak, not a busy day.
const YIELD_RATE: f64 = 512.0 * 1024.0;

/// The share of the machine's CPU this process takes at or above which the fold may give way.
const YIELD_CPU_SHARE: f64 = 0.4;

/// Once it gives way, the fold goes on giving way until the rate or the share falls below
/// this part of its threshold: a peak has dips (a tick of 100 ms with a slow commit or a busy
/// client), and each one would otherwise fold the whole backlog in the middle of the peak.
/// A load that stops falls below it at the next tick.
const YIELD_KEEP: f64 = 0.5;

/// How often the fold measures the load while it gathers.
const LOAD_TICK: Duration = Duration::from_millis(100);

/// Opens set `set` of `sets` under `dir` with a journal in front of its SQLite file: folds
/// what the journal holds from the last run, then returns the write side and the read side.
pub fn open_journaled_sqlite(dir: &Path, set: u32, sets: u32) -> Result<(JournalStore, JournalReader)> {
    // Opening the SQLite file folds what a journal left there, and keeps one of its segment
    // files as the spare.
    let (mut sqlite, reader) = open_sqlite_with(dir, set, sets, Leftovers::FoldKeepingSpare)?;
    let last_seq = sqlite.journal_seq()?;
    let journal_dir = journal_dir(dir, set);
    std::fs::create_dir_all(&journal_dir)
        .map_err(|e| io(format!("cannot create {}", journal_dir.display()), e))?;
    let shared = Arc::new(Shared {
        dir: journal_dir.clone(),
        state: Mutex::new(FoldState {
            queue: VecDeque::new(),
            queued_bytes: 0,
            queued_seq: last_seq,
            folded_seq: last_seq,
            error: None,
            waiters: 0,
            query_waiters: 0,
            query_wait_ran_out: None,
            appended_bytes: 0,
            fold_idle: false,
            lag_bytes_max: yield_lag_bytes(sets),
            lag_max: YIELD_LAG_MAX,
            overlay_bytes_max: overlay_bytes_max(sets),
            giving_way: false,
            #[cfg(test)]
            busy_override: None,
            stop: false,
            halt: false,
            spare_wanted: true,
        }),
        changed: Condvar::new(),
        progress: tokio::sync::watch::Sender::new(Progress { folded_seq: last_seq, failing: false }),
        store: Mutex::new(sqlite),
        overlay: Mutex::new(Overlay::new(last_seq)),
    });
    let segment = Segment::create(&journal_dir, last_seq + 1, &journal_dir.join(SPARE))?;
    let fold = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("{FOLD_THREAD}{set}"))
            .spawn(move || {
                // The set threads (and the HTTP workers) win the CPU whenever they want it,
                // so a burst of claims is absorbed at the journal's speed and the fold catches
                // up when the burst is over.
                crate::background::lower_priority("fold");
                fold_loop(set, &shared)
            })
            .map_err(|e| io("cannot start the fold thread".into(), e))?
    };
    let store = JournalStore {
        set,
        dir: journal_dir,
        segment,
        closed: VecDeque::new(),
        pool: VecDeque::new(),
        segments_made: 0,
        last_seq,
        buf: Vec::new(),
        poisoned: None,
        packet_busy_until: None,
        reader: JournalReader { inner: sqlite::own_reader(dir, set)?, shared: shared.clone() },
        shared: shared.clone(),
        fold: Some(fold),
    };
    Ok((store, JournalReader { inner: reader, shared }))
}

/// State shared by the set thread, the fold thread and the readers.
struct Shared {
    /// The journal directory, where the fold makes the spare segment.
    dir: PathBuf,
    /// Guarded by its mutex, held only to move items in or out and to read the positions,
    /// never across I/O.
    state: Mutex<FoldState>,
    /// Signalled when work is queued, when the fold advances, and at stop.
    changed: Condvar,
    /// How far the fold got, for queries that wait for it without holding a thread.
    progress: tokio::sync::watch::Sender<Progress>,
    /// The SQLite write side. The fold holds it while it applies a transaction; the set thread
    /// takes it for `load`, `packet` and `sums`, after waiting for the fold to drain.
    store: Mutex<SqliteStore>,
    /// The records not folded, indexed for history queries. Taken after `state`'s lock is
    /// released, never while holding it; the fold only tries it.
    overlay: Mutex<Overlay>,
}

struct FoldState {
    /// Durable records not yet folded, oldest first: where each one's payload is on disk.
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    /// The last seq made durable (queued for the fold, or already folded).
    queued_seq: u64,
    /// The last seq the SQLite file holds.
    folded_seq: u64,
    /// Why the last fold failed, until one succeeds.
    error: Option<String>,
    /// Threads waiting for the fold to catch up on the set's own path (a load, a packet read
    /// back, the audit's sums): the fold starts at once.
    waiters: usize,
    /// Queries waiting for the fold (their `CatchUp`): the fold starts once the pace since the
    /// last fold allows ([`QUERY_FOLD_PACE`]).
    query_waiters: usize,
    /// When a query last waited the whole `READ_WAIT_MAX` in vain: see `CatchUp::wait`.
    query_wait_ran_out: Option<Instant>,
    /// Encoded bytes ever queued: the set's journal rate, for [`Yield`].
    appended_bytes: u64,
    /// The fold sleeps until something is queued: a commit must wake it. Otherwise a commit
    /// wakes it only when the queue crosses a bound it acts on, not once per batch.
    fold_idle: bool,
    /// How far the fold may fall behind while it gives way: [`yield_lag_bytes`] and
    /// [`YIELD_LAG_MAX`], smaller in tests.
    lag_bytes_max: usize,
    lag_max: Duration,
    /// [`overlay_bytes_max`], smaller in tests.
    overlay_bytes_max: usize,
    /// The fold's last verdict while it gathered: it gives way to the claims.
    giving_way: bool,
    /// Tests decide whether the claims want the CPU instead of measuring it.
    #[cfg(test)]
    busy_override: Option<bool>,
    /// Stop once the queue is folded (a clean shutdown), or at once if the fold is failing.
    stop: bool,
    /// Stop at once, folding nothing more: what `kill -9` would do, for tests.
    halt: bool,
    /// A rotation took the spare segment (or the journal just opened): the fold thread makes
    /// the next one before anything else it waits for.
    spare_wanted: bool,
}

impl FoldState {
    /// Whether a query's whole wait for the fold ran out less than [`READ_WAIT_MAX`] ago: the
    /// fold is then further behind than it folds in that time.
    fn recently_behind(&self) -> bool {
        self.query_wait_ran_out.is_some_and(|t| t.elapsed() < READ_WAIT_MAX)
    }

    /// Notes how a query's wait for the fold ended.
    fn query_waited(&mut self, caught_up: bool) {
        self.query_wait_ran_out = (!caught_up).then(Instant::now);
    }
}

/// What the fold last reported, as queries see it.
#[derive(Debug, Clone, Copy)]
struct Progress {
    folded_seq: u64,
    /// The last fold failed (it is retried).
    failing: bool,
}

/// A record waiting for the fold: its payload's place in its segment file.
#[derive(Clone)]
struct Queued {
    seq: u64,
    /// The segment, open for reading: it stays readable after a rotation, and after its
    /// removal (the last handle keeps the file alive).
    file: Arc<File>,
    offset: u64,
    len: usize,
    /// The CRC the set wrote in its header: read back, the record must be that one, not an
    /// older record of the same seq and length that the file once held.
    crc: u32,
    /// When it was queued: the fold's lag in time.
    at: Instant,
}

impl Queued {
    /// The record's payload, read into `record` and checked against its header and CRC: `None`
    /// when the file no longer holds it. A query may read a record folded meanwhile, its
    /// segment recycled and written over; the fold reads only records it has not folded, and
    /// checks them all the same.
    fn read_checked<'a>(&self, record: &'a mut Vec<u8>) -> Result<Option<&'a [u8]>> {
        use std::os::unix::fs::FileExt;
        record.resize(HEADER_BYTES + self.len, 0);
        self.file
            .read_exact_at(record, self.offset - HEADER_BYTES as u64)
            .map_err(|e| io(format!("cannot read journal record {} back", self.seq), e))?;
        let written = header_crc(record) == self.crc;
        Ok(whole_record(record, self.seq, MAGIC).filter(|payload| written && payload.len() == self.len))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these is a bug that aborts the process (the engine is
    // fail-stop), so a poisoned lock is never seen in practice; taking the data is harmless.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Waits until every record made durable before now is folded, up to `wait`, for the set
    /// (the fold starts at once). Returns whether it was; `Err` when the fold is failing.
    fn wait_folded(&self, wait: Duration) -> Result<bool> {
        self.wait_folded_as(wait, Waiter::Set)
    }

    fn wait_folded_as(&self, wait: Duration, who: Waiter) -> Result<bool> {
        let deadline = Instant::now() + wait;
        let mut s = lock(&self.state);
        let target = s.queued_seq;
        if s.folded_seq >= target {
            return Ok(true);
        }
        *who.count(&mut s) += 1;
        self.changed.notify_all();
        let caught_up = loop {
            if s.folded_seq >= target {
                break Ok(true);
            }
            if let Some(e) = &s.error {
                break Err(StoreError::Io(format!("the journal fold is failing: {e}")));
            }
            let now = Instant::now();
            if now >= deadline {
                break Ok(false);
            }
            s = self.changed.wait_timeout(s, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        };
        *who.count(&mut s) -= 1;
        caught_up
    }
}

/// Who waits for the fold: the set (a load, a packet read back, the audit's sums) has it fold
/// at once; a query, as the pace allows and not while it gives way to the claims.
#[derive(Clone, Copy)]
enum Waiter {
    Set,
    Query,
}

impl Waiter {
    fn count(self, s: &mut FoldState) -> &mut usize {
        match self {
            Waiter::Set => &mut s.waiters,
            Waiter::Query => &mut s.query_waiters,
        }
    }
}

/// Makes the spare segment when a rotation asked for one, without the lock (16 MiB written
/// and synced), and returns the lock taken again; the caller checks its conditions afresh.
fn spare_if_wanted<'a>(
    set: u32,
    shared: &'a Shared,
    mut s: MutexGuard<'a, FoldState>,
) -> MutexGuard<'a, FoldState> {
    while s.spare_wanted && !s.halt {
        s.spare_wanted = false;
        drop(s);
        if let Err(e) = make_spare(&shared.dir) {
            tracing::warn!(set, error = %e, "cannot make a spare journal segment");
        }
        s = lock(&shared.state);
    }
    s
}

/// The fold thread: applies queued records to SQLite in order, many per transaction.
fn fold_loop(set: u32, shared: &Shared) {
    // When a query may start the next fold: QUERY_FOLD_PACE times as long after the last
    // fold ended as it took. None before the first.
    let mut query_fold_from: Option<Instant> = None;
    let mut merger = Merger::default();
    let mut load = Yield::new(Instant::now(), lock(&shared.state).appended_bytes);
    loop {
        // Take what is queued, up to a transaction's worth; the items stay queued until they
        // are folded, so a failed transaction is simply tried again.
        let (first_seq, records, bytes) = {
            let mut s = spare_if_wanted(set, shared, lock(&shared.state));
            while s.queue.is_empty() && !s.stop && !s.halt {
                s.fold_idle = true;
                // Nothing is held back.
                s.giving_way = false;
                s = shared.changed.wait(s).unwrap_or_else(|p| p.into_inner());
                s = spare_if_wanted(set, shared, s);
            }
            s.fold_idle = false;
            // Let batches gather: not at all for the set itself; while the claims want the CPU,
            // up to the lag bound; otherwise for FOLD_DELAY if nobody waits for them, and as the
            // pace allows if a query does.
            let gathering = Instant::now();
            let gather_until = gathering + FOLD_DELAY;
            let query_until = query_fold_from.unwrap_or(gathering);
            while !s.stop && !s.halt && s.waiters == 0 {
                let Some(oldest) = s.queue.front().map(|q| q.at) else { break };
                let now = Instant::now();
                let lag_until = oldest + s.lag_max;
                if s.queued_bytes >= s.lag_bytes_max || now >= lag_until {
                    break;
                }
                let busy = load.busy(set, now, s.appended_bytes);
                #[cfg(test)]
                let busy = s.busy_override.unwrap_or(busy);
                s.giving_way = busy;
                let until = if busy {
                    lag_until
                } else {
                    let until =
                        if s.query_waiters > 0 { query_until.min(gather_until) } else { gather_until };
                    if s.queued_bytes >= FOLD_EAGER_BYTES || now >= until {
                        break;
                    }
                    until
                };
                let until = until.min(load.next_tick());
                s = shared.changed.wait_timeout(s, until - now).unwrap_or_else(|p| p.into_inner()).0;
                s = spare_if_wanted(set, shared, s);
            }
            if s.halt || s.queue.is_empty() {
                return;
            }
            let mut bytes = 0;
            let mut records: Vec<Queued> = Vec::new();
            for q in &s.queue {
                if !records.is_empty() && bytes + q.len > FOLD_BYTES_MAX {
                    break;
                }
                bytes += q.len;
                records.push(q.clone());
            }
            (s.queue[0].seq, records, bytes)
        };
        // Reading, decoding and writing happen without the lock: the set goes on appending.
        let started = Instant::now();
        let take = records.len();
        let mut buf = Vec::new();
        let decoded = records
            .iter()
            .map(|q| match q.read_checked(&mut buf)? {
                Some(payload) => decode(payload),
                // Never folded, so never recycled: a record not whole here was written over by
                // something else. Folding whatever the bytes decode to would put money in the
                // file that the set never moved; the fold stops and says so.
                None => Err(StoreError::Corrupt(format!(
                    "journal record {} is not whole in its segment before it was folded",
                    q.seq
                ))),
            })
            .collect::<Result<Vec<Batch>>>();
        let last_seq = first_seq + take as u64 - 1;
        let done = decoded.and_then(|batches| {
            let merged = merger.merge(batches);
            lock(&shared.store).commit_folded(std::slice::from_ref(merged), last_seq)
        });
        let ended = Instant::now();
        let took = ended.saturating_duration_since(started);
        tracing::debug!(
            set,
            records = take,
            bytes,
            took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            "folded"
        );
        query_fold_from = Some(ended + (took * QUERY_FOLD_PACE).min(QUERY_FOLD_SPACING_MAX));
        let mut s = lock(&shared.state);
        match done {
            Ok(()) => {
                for _ in 0..take {
                    let q = s.queue.pop_front().expect("folded items are queued");
                    s.queued_bytes -= q.len;
                }
                s.folded_seq = last_seq;
                s.error = None;
                shared.changed.notify_all();
                let caught_up = s.queue.is_empty();
                drop(s);
                if caught_up {
                    // Nothing is left for the queries' index to add: let its memory go. Not
                    // waited for; a query that holds it prunes it itself.
                    if let Ok(mut overlay) = shared.overlay.try_lock() {
                        overlay.prune(last_seq);
                    }
                }
                shared.progress.send_replace(Progress { folded_seq: last_seq, failing: false });
                // Off the commit path, at this thread's low priority: the next rotation is a
                // rename.
                if let Err(e) = make_spare(&shared.dir) {
                    tracing::warn!(set, error = %e, "cannot make a spare journal segment");
                }
            }
            Err(e) => {
                s.error = Some(e.to_string());
                shared.changed.notify_all();
                let folded_seq = s.folded_seq;
                shared.progress.send_replace(Progress { folded_seq, failing: true });
                if s.stop {
                    // Shutting down with a failing fold: what is left stays in the journal,
                    // and the next start folds it.
                    tracing::error!(set, error = %e, "journal fold failed at shutdown; the next start folds the rest");
                    return;
                }
                tracing::error!(set, error = %e, "journal fold failed; retrying");
                drop(s);
                std::thread::sleep(FOLD_RETRY);
            }
        }
    }
}

/// Whether the claims want the CPU the fold would take: the set journals at least
/// [`YIELD_RATE`] and this process takes at least [`YIELD_CPU_SHARE`] of the machine's CPU,
/// both over the last [`LOAD_TICK`]. The fold then gives way (up to its lag bound) instead of
/// folding every [`FOLD_DELAY`] or for each waiting query.
///
/// Why, when the fold already runs at nice 19: under a load that keeps both cores of the
/// bench machine busy it still found gaps, and took a quarter of the CPU the claims used.
/// Giving way, the HTTP festival paid 26–49 % more in alternating runs (BENCHMARKS.md,
/// 2026-12-03, eighth session). Measured on the process, not the machine, so other programs
/// (or tests) keeping the cores busy do not make history stale; and on the set's own rate, so
/// one set's peak does not hold back a quiet set's fold.
struct Yield {
    since: Instant,
    /// The process's CPU time at `since`, and the calling thread's (the fold's own: not the
    /// claims').
    cpu_us: Option<(u64, u64)>,
    appended_bytes: u64,
    cores: f64,
    busy: bool,
}

impl Yield {
    fn new(now: Instant, appended_bytes: u64) -> Yield {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let mut load = Yield { since: now, cpu_us: None, appended_bytes, cores, busy: false };
        load.restart(now, appended_bytes);
        load
    }

    /// Starts the next measurement at `now`, keeping the last verdict until it ends. A fold in
    /// between does not start one: its own CPU is left out of the share instead. (Restarted
    /// after each fold, a fold that found the claims quiet as a peak began never measured
    /// again while the backlog stayed over [`FOLD_EAGER_BYTES`]: it folded from one
    /// transaction to the next through the whole peak, taking a third of a core from the
    /// claims in process (BENCHMARKS.md, twenty-first session).)
    fn restart(&mut self, now: Instant, appended_bytes: u64) {
        self.since = now;
        self.cpu_us = Yield::cpu_now();
        self.appended_bytes = appended_bytes;
    }

    /// The process's CPU time and the calling thread's, now.
    fn cpu_now() -> Option<(u64, u64)> {
        crate::background::process_cpu_us().zip(crate::background::thread_cpu_us())
    }

    /// The share of the machine's `cores` that the rest of the process (the claims) used over
    /// `secs`: its CPU time less the fold's own.
    fn claims_share(process_us: u64, own_us: u64, secs: f64, cores: f64) -> f64 {
        process_us.saturating_sub(own_us) as f64 / 1e6 / secs / cores
    }

    /// When the measurement under way ends.
    fn next_tick(&self) -> Instant {
        self.since + LOAD_TICK
    }

    /// Whether the claims want the CPU, given the set's journal rate (bytes a second) and the
    /// process's share of the machine's CPU over the last tick, and the verdict before.
    fn verdict(was_busy: bool, rate: f64, share: f64) -> bool {
        let keep = if was_busy { YIELD_KEEP } else { 1.0 };
        rate >= YIELD_RATE * keep && share >= YIELD_CPU_SHARE * keep
    }

    /// The verdict: measured again once a tick has passed, else the last one.
    fn busy(&mut self, set: u32, now: Instant, appended_bytes: u64) -> bool {
        let secs = now.saturating_duration_since(self.since).as_secs_f64();
        if secs < LOAD_TICK.as_secs_f64() {
            return self.busy;
        }
        let rate = appended_bytes.saturating_sub(self.appended_bytes) as f64 / secs;
        let before = self.cpu_us;
        self.restart(now, appended_bytes);
        let share = match (before, self.cpu_us) {
            (Some((a, own_a)), Some((b, own_b))) => {
                Yield::claims_share(b.saturating_sub(a), own_b.saturating_sub(own_a), secs, self.cores)
            }
            _ => 0.0,
        };
        let busy = Yield::verdict(self.busy, rate, share);
        if busy != self.busy {
            tracing::debug!(
                set,
                busy,
                journal_bytes_per_s = rate as u64,
                cpu_share = share,
                "the fold {}",
                if busy { "gives way to the claims" } else { "runs again" }
            );
        }
        self.busy = busy;
        busy
    }
}

/// Merges consecutive batches into one with the same effect: rows that are inserted (entries,
/// claims, new packets, audience) keep every row in order; state that is overwritten
/// (balances, packet counters, watermarks, totals, idempotency records) keeps the last value
/// only, so a wallet touched by a thousand batches is written once per fold. A user's credits
/// ([`Batch::credits`]) add up to one, and once a batch writes their balance, which counts the
/// credits before it, those are spent and any later ones are added to that balance. Outbox rows that
/// an acknowledgement in the same run covers are not written at all (they would be inserted
/// and deleted in one transaction), but for the last row issued to each target, which moves
/// `outbox_seq` on and is then deleted with the rest; the acknowledgements become one range
/// delete per target.
///
/// Its collections are kept from one fold to the next (each merge empties them first): the
/// fold merges about as much every time, and memory handed back and faulted in again cost it
/// 7 % of its time in a profile of the HTTP festival (BENCHMARKS.md, 2026-12-02, fourth
/// session). What they keep is bounded by one fold's worth, [`FOLD_BYTES_MAX`] encoded.
#[derive(Default)]
struct Merger {
    out: Batch,
    /// Where each wallet is in `out.wallets`, found by the hash its id carries: neither its
    /// name hashed again nor the id cloned for a key, once per wallet per batch.
    wallets: HashTable<usize>,
    /// Where each user's credits are in `out.credits`, the same way.
    credits: HashTable<usize>,
    packets: HashMap<PacketId, usize>,
    idem: HashMap<(UserId, String), usize>,
    watermarks: HashMap<u32, usize>,
    /// Per target set: the highest acknowledged seq, and the highest seq issued, in the run.
    acked: HashMap<u32, u64>,
    issued: HashMap<u32, u64>,
}

impl Merger {
    fn merge(&mut self, batches: Vec<Batch>) -> &Batch {
        let Merger { out, wallets, credits, packets, idem, watermarks, acked, issued } = self;
        // Empty, with the allocations of the merges before.
        out.clear();
        wallets.clear();
        credits.clear();
        packets.clear();
        idem.clear();
        watermarks.clear();
        acked.clear();
        issued.clear();
        for b in &batches {
            for &(target, upto) in &b.outbox_acked {
                let a = acked.entry(target).or_insert(0);
                *a = (*a).max(upto);
            }
            for o in &b.outbox_new {
                let i = issued.entry(o.target_set).or_insert(0);
                *i = (*i).max(o.seq);
            }
        }
        for b in batches {
            // A batch's credits before its balances, as the store writes them.
            for (user, fen) in b.credits {
                add_credit(wallets, credits, out, user, fen);
            }
            for (user, fen) in b.wallets {
                if let Some(&i) = credits.find(user.fast_hash(), |&i| out.credits[i].0 == user) {
                    out.credits[i].1 = 0;
                }
                keep_last_wallet(wallets, &mut out.wallets, user, fen);
            }
            for u in b.packet_updates {
                keep_last(packets, &mut out.packet_updates, u.id, u);
            }
            for r in b.idempotency {
                keep_last(idem, &mut out.idempotency, (r.user.clone(), r.request_id.clone()), r);
            }
            for (source, seq) in b.watermarks {
                keep_last(watermarks, &mut out.watermarks, source, (source, seq));
            }
            out.entries.extend(b.entries);
            out.new_packets.extend(b.new_packets);
            out.claims.extend(b.claims);
            // New outbox rows are written before acknowledged ones are deleted, and the
            // delete takes every seq up to the run's highest acknowledgement: a row at or
            // below it would be gone by the end of the transaction.
            out.outbox_new.extend(b.outbox_new.into_iter().filter(|o| {
                o.seq > acked.get(&o.target_set).copied().unwrap_or(0)
                    || issued.get(&o.target_set) == Some(&o.seq)
            }));
            if b.totals.is_some() {
                out.totals = b.totals;
            }
        }
        out.outbox_acked.extend(acked.iter().map(|(&target, &upto)| (target, upto)));
        out.outbox_acked.sort_unstable();
        out
    }
}

/// Puts `item` in `out` under `key`: in place of the item that key put there before, else at
/// the end, so the first write of a key fixes its place and the last fixes its value.
fn keep_last<K: std::hash::Hash + Eq, T>(index: &mut HashMap<K, usize>, out: &mut Vec<T>, key: K, item: T) {
    match index.entry(key) {
        std::collections::hash_map::Entry::Occupied(e) => out[*e.get()] = item,
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(out.len());
            out.push(item);
        }
    }
}

/// [`keep_last`] for wallets, indexed by their ids' hashes.
fn keep_last_wallet(index: &mut HashTable<usize>, out: &mut Vec<(UserId, i64)>, user: UserId, fen: i64) {
    let entry = index.entry(user.fast_hash(), |&i| out[i].0 == user, |&i| out[i].0.fast_hash());
    match entry {
        hashbrown::hash_table::Entry::Occupied(e) => out[*e.get()].1 = fen,
        hashbrown::hash_table::Entry::Vacant(e) => {
            e.insert(out.len());
            out.push((user, fen));
        }
    }
}

/// Adds a credit of `fen` to `user`: to the balance a batch before wrote for them, else to
/// their credits so far.
fn add_credit(
    wallets: &HashTable<usize>,
    credits: &mut HashTable<usize>,
    out: &mut Batch,
    user: UserId,
    fen: i64,
) {
    let add = |to: &mut i64| *to = to.checked_add(fen).expect("merged credits overflow a balance");
    if let Some(&i) = wallets.find(user.fast_hash(), |&i| out.wallets[i].0 == user) {
        return add(&mut out.wallets[i].1);
    }
    let entry =
        credits.entry(user.fast_hash(), |&i| out.credits[i].0 == user, |&i| out.credits[i].0.fast_hash());
    match entry {
        hashbrown::hash_table::Entry::Occupied(e) => add(&mut out.credits[*e.get()].1),
        hashbrown::hash_table::Entry::Vacant(e) => {
            e.insert(out.credits.len());
            out.credits.push((user, fen));
        }
    }
}

/// [`Merger::merge`] for a one-off fold (a start folding what the journal holds).
fn merge(batches: Vec<Batch>) -> Vec<Batch> {
    if batches.len() < 2 {
        return batches;
    }
    let mut merger = Merger::default();
    merger.merge(batches);
    vec![std::mem::take(&mut merger.out)]
}

/// The write side of a journaled set. Owned by the set's engine thread.
pub struct JournalStore {
    set: u32,
    dir: PathBuf,
    segment: Segment,
    /// Closed segments, oldest first: (path, last seq in it).
    closed: VecDeque<(PathBuf, u64)>,
    /// Folded segments kept for the next rotations, oldest first (at most [`POOL_MAX`]).
    pool: VecDeque<PathBuf>,
    /// Rotations that made their segment on the commit path.
    segments_made: u64,
    /// The last seq written and synced.
    last_seq: u64,
    /// Reused encoding buffer for records.
    buf: Vec<u8>,
    /// Set when a failed append could not be wiped back off the file: the file may hold a batch
    /// the engine was told failed, so nothing more may be written or loaded until a restart.
    poisoned: Option<String>,
    /// Until when packet and balance reads that must wait for the fold are refused without
    /// waiting (see [`PACKET_BUSY_SPELL`]).
    packet_busy_until: Option<Instant>,
    /// The read side, on a connection of its own, for a balance the set does not hold
    /// ([`Store::balance`]).
    reader: JournalReader,
    shared: Arc<Shared>,
    fold: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for JournalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalStore").field("set", &self.set).field("last_seq", &self.last_seq).finish()
    }
}

impl JournalStore {
    fn check_poisoned(&self) -> Result<()> {
        match &self.poisoned {
            Some(e) => Err(StoreError::Io(format!("the journal is unusable until restart: {e}"))),
            None => Ok(()),
        }
    }

    /// Waits until the fold has applied everything, then runs `f` on the SQLite store.
    fn drained<T>(&mut self, f: impl FnOnce(&mut SqliteStore) -> Result<T>) -> Result<T> {
        self.check_poisoned()?;
        // No deadline: the caller needs the whole state, and the fold only ever moves forward
        // (or reports why it cannot).
        while !self.shared.wait_folded(Duration::from_secs(1))? {}
        f(&mut lock(&self.shared.store))
    }

    /// Keeps closed segments whose every record is folded for reuse, the newest
    /// [`POOL_MAX`], and recycles the older ones: the segments left on disk stay one unbroken
    /// run of seqs, so a start has no gap to check (it skips one only when every record in it
    /// is folded, and refuses any other).
    fn drop_folded_segments(&mut self) {
        let folded = lock(&self.shared.state).folded_seq;
        while let Some((path, last)) = self.closed.front() {
            if *last > folded {
                break;
            }
            self.pool.push_back(path.clone());
            self.closed.pop_front();
            if self.pool.len() > POOL_MAX {
                let oldest = self.pool.pop_front().expect("the pool is over its bound");
                if let Err(e) = recycle(&self.dir, &oldest) {
                    // Harmless: a later start folds nothing from it (its records are folded)
                    // and removes it then.
                    tracing::warn!(set = self.set, path = %oldest.display(), error = %e, "cannot remove a folded segment");
                }
            }
        }
    }

    /// The segment whose first record will be `first_seq`: the oldest folded segment kept,
    /// else the spare, renamed; 16 MiB written and synced here only when there is neither.
    /// When this leaves neither for the next rotation, the fold thread makes a spare.
    fn next_segment(&mut self, first_seq: u64) -> Result<Segment> {
        let spare = self.dir.join(SPARE);
        let from = self.pool.pop_front().unwrap_or_else(|| spare.clone());
        let next = Segment::create(&self.dir, first_seq, &from)?;
        if next.made {
            self.segments_made += 1;
            tracing::info!(
                set = self.set,
                "a journal segment was made on the commit path: no folded segment or spare was ready"
            );
        }
        if self.pool.is_empty() && !spare.exists() {
            lock(&self.shared.state).spare_wanted = true;
            self.shared.changed.notify_all();
        }
        Ok(next)
    }
}

impl Store for JournalStore {
    fn load(&mut self, idempotency_since_ms: Millis) -> Result<Loaded> {
        self.drained(|s| s.load(idempotency_since_ms))
    }

    fn commit(&mut self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.check_poisoned()?;
        // A fold that is failing, or too far behind: refuse or wait before anything is written.
        {
            let mut s = lock(&self.shared.state);
            if let Some(e) = &s.error {
                return Err(StoreError::Io(format!("the journal fold is failing: {e}")));
            }
            while s.queued_bytes > BACKLOG_BYTES_MAX && s.error.is_none() {
                s = self.shared.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            if let Some(e) = &s.error {
                return Err(StoreError::Io(format!("the journal fold is failing: {e}")));
            }
        }
        let seq = self.last_seq + 1;
        self.buf.clear();
        encode_record(&mut self.buf, seq, batch)?;
        if !self.segment.fits(self.buf.len()) {
            let next = self.next_segment(seq)?;
            let old = std::mem::replace(&mut self.segment, next);
            self.closed.push_back((old.path, self.last_seq));
        }
        let offset = self.segment.bytes + HEADER_BYTES as u64;
        if let Err(e) = self.segment.append(&self.buf) {
            // Wipe the record back off, so it cannot reappear at the next start.
            if let Err(undo) = self.segment.wipe(self.buf.len()) {
                self.poisoned = Some(format!("{e}; and wiping it back off failed: {undo}"));
            }
            return Err(e);
        }
        self.last_seq = seq;
        {
            let mut s = lock(&self.shared.state);
            let len = self.buf.len() - HEADER_BYTES;
            let before = s.queued_bytes;
            s.queued_bytes += len;
            s.appended_bytes += len as u64;
            s.queue.push_back(Queued {
                seq,
                file: self.segment.reader.clone(),
                offset,
                len,
                crc: header_crc(&self.buf),
                at: Instant::now(),
            });
            s.queued_seq = seq;
            let crossed = |bound: usize| before < bound && bound <= s.queued_bytes;
            if s.fold_idle || crossed(FOLD_EAGER_BYTES) || crossed(s.lag_bytes_max) {
                self.shared.changed.notify_all();
            }
        }
        if !self.closed.is_empty() {
            self.drop_folded_segments();
        }
        Ok(())
    }

    fn packet(&mut self, id: PacketId) -> Result<Option<Packet>> {
        self.check_poisoned()?;
        self.wait_for_the_fold(|| format!("packet {id} is not in memory"))?;
        // Caught up, with this thread the only writer: `drained` finds nothing to wait for.
        self.drained(|s| s.packet(id))
    }

    /// The SQLite file and the records it does not hold yet, as queries read them, but never
    /// the file alone: a balance read short would be written back short. When more is not
    /// folded than the index takes, it waits for the fold as a packet read does.
    fn balance(&mut self, user: &UserId) -> Result<Option<i64>> {
        self.check_poisoned()?;
        loop {
            let read = self.reader.inner.in_snapshot(|conn, at| {
                let stored = sqlite::balance_in(conn, user)?;
                Ok(match self.reader.overlay_for(at)? {
                    OverlayFor::Ready(overlay) => Some(Ok(overlay.balance(user, stored))),
                    OverlayFor::Stale => None,
                    OverlayFor::TooFar => Some(Err(())),
                })
            })?;
            match read {
                Some(Ok(balance)) => return balance,
                Some(Err(())) => {
                    self.wait_for_the_fold(|| format!("the wallet of {user} is not in memory"))?
                }
                None => {}
            }
        }
    }

    fn sums(&mut self) -> Result<StoreSums> {
        self.drained(|s| s.sums())
    }
}

impl JournalStore {
    /// Waits up to [`PACKET_WAIT_MAX`] for the fold to catch up (not at all within a
    /// [`PACKET_BUSY_SPELL`] after a wait ran out), else refuses as busy what `what` names.
    fn wait_for_the_fold(&mut self, what: impl FnOnce() -> String) -> Result<()> {
        let now = Instant::now();
        let wait = match self.packet_busy_until {
            Some(until) if now < until => Duration::ZERO,
            _ => PACKET_WAIT_MAX,
        };
        if !self.shared.wait_folded(wait)? {
            self.packet_busy_until = Some(Instant::now() + PACKET_BUSY_SPELL);
            return Err(StoreError::Busy(format!(
                "{} and the journal's fold is behind; try again shortly",
                what()
            )));
        }
        self.packet_busy_until = None;
        Ok(())
    }

    /// Stops the fold where it is and forgets the store without its clean shutdown: the
    /// journal is left as `kill -9` would leave it. For tests.
    #[cfg(test)]
    fn kill(mut self) {
        lock(&self.shared.state).halt = true;
        self.shared.changed.notify_all();
        if let Some(fold) = self.fold.take() {
            let _ = fold.join();
        }
        std::mem::forget(self);
    }
}

impl Drop for JournalStore {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.changed.notify_all();
        // The fold finishes what is queued, then stops: a clean shutdown leaves nothing to
        // fold at the next start.
        if let Some(fold) = self.fold.take() {
            let _ = fold.join();
        }
    }
}

/// The read side of a journaled set: the SQLite reader, behind a wait for the fold.
#[derive(Clone)]
pub struct JournalReader {
    inner: SqliteReader,
    shared: Arc<Shared>,
}

/// A query's place behind the fold: the last seq made durable when the query arrived. Awaiting
/// it before reading gives read-your-writes without holding a thread (or a query slot) while
/// the fold catches up.
pub struct CatchUp {
    target: u64,
    /// A query's whole wait ran out less than `READ_WAIT_MAX` before this one arrived.
    recently_behind: bool,
    shared: Arc<Shared>,
}

impl CatchUp {
    /// Waits until the SQLite file holds every record made durable before this query arrived:
    /// up to `READ_WAIT_MAX`, except in the `READ_WAIT_MAX` after a query's whole wait ran out.
    /// The fold is then further behind than it folds in that time, so waiting again would only
    /// cost the query (and hold the caller's request); those queries answer at once from what
    /// is folded, and one full wait at most every `READ_WAIT_MAX` finds out when the fold has
    /// caught up. Returns whether it caught up; `Err` while the fold is failing.
    pub async fn wait(self) -> Result<bool> {
        let mut progress = self.shared.progress.subscribe();
        let now = *progress.borrow_and_update();
        if now.folded_seq >= self.target {
            return Ok(true);
        }
        if now.failing {
            return Err(fold_failing(&self.shared));
        }
        if self.recently_behind {
            return Ok(false);
        }
        let waited = {
            let _hurry = Hurry::new(&self.shared);
            let target = self.target;
            tokio::time::timeout(READ_WAIT_MAX, progress.wait_for(|p| p.folded_seq >= target || p.failing))
                .await
        };
        let caught_up = match waited {
            Ok(Ok(p)) if p.folded_seq >= self.target => true,
            Ok(Ok(_)) => return Err(fold_failing(&self.shared)),
            // The sender lives in `Shared`, which this holds: it cannot close.
            Ok(Err(_)) | Err(_) => false,
        };
        lock(&self.shared.state).query_waited(caught_up);
        if !caught_up {
            tracing::debug!("a query answers from the store while the journal fold is behind");
        }
        Ok(caught_up)
    }
}

fn fold_failing(shared: &Shared) -> StoreError {
    let why = lock(&shared.state).error.clone().unwrap_or_else(|| "unknown".to_string());
    StoreError::Io(format!("the journal fold is failing: {why}"))
}

/// Counts a waiting query for as long as it waits, so the fold gathers no longer than the
/// pace allows ([`QUERY_FOLD_PACE`]).
struct Hurry<'a> {
    shared: &'a Shared,
}

impl<'a> Hurry<'a> {
    fn new(shared: &'a Shared) -> Hurry<'a> {
        lock(&shared.state).query_waiters += 1;
        shared.changed.notify_all();
        Hurry { shared }
    }
}

impl Drop for Hurry<'_> {
    fn drop(&mut self) {
        lock(&self.shared.state).query_waiters -= 1;
    }
}

/// Where the queries' index of the records not folded stands for a query's snapshot.
enum OverlayFor<'a> {
    /// Holds every record after the snapshot that was made durable before now.
    Ready(MutexGuard<'a, Overlay>),
    /// Another query dropped records this snapshot lacks: read a newer one.
    Stale,
    /// More is not folded than the index takes ([`overlay_bytes_max`]).
    TooFar,
}

impl JournalReader {
    /// The index brought up to every record made durable and pruned to snapshot `at`.
    fn overlay_for(&self, at: Folded) -> Result<OverlayFor<'_>> {
        let mut overlay = lock(&self.shared.overlay);
        let mut buf = Vec::new();
        'index: loop {
            let todo: Vec<Queued> = {
                let s = lock(&self.shared.state);
                // Once past the bound, the index waits for the backlog to halve before it reads
                // it all again: a backlog that hovers at the bound would otherwise have one
                // query read tens of MiB back at every dip, and lose it at the next rise.
                let bound = if overlay.suspended() { s.overlay_bytes_max / 2 } else { s.overlay_bytes_max };
                if s.queued_bytes > bound {
                    // Let the index go, to start again from the first record not folded. Not
                    // from a later one: a snapshot holds only what is folded, and one older
                    // than the index is read again until the file has caught up with it.
                    overlay.suspend(s.folded_seq);
                    return Ok(OverlayFor::TooFar);
                }
                let next = overlay.indexed_seq() + 1;
                match s.queue.front() {
                    // Records after the index were folded (and left the queue) before anything
                    // indexed them.
                    Some(q) if q.seq > next => {
                        overlay.reset(q.seq - 1);
                        s.queue.iter().cloned().collect()
                    }
                    Some(q) => s.queue.iter().skip((next - q.seq) as usize).cloned().collect(),
                    None => {
                        if s.queued_seq >= next {
                            overlay.reset(s.queued_seq);
                        }
                        Vec::new()
                    }
                }
            };
            for q in todo {
                let Some(payload) = q.read_checked(&mut buf)? else {
                    // Its segment was folded, recycled and written over since the queue was
                    // read: start again from the queue as it is now.
                    if lock(&self.shared.state).folded_seq < q.seq {
                        return Err(StoreError::Corrupt(format!(
                            "journal record {} is not folded and no longer in its segment",
                            q.seq
                        )));
                    }
                    overlay.reset(q.seq);
                    continue 'index;
                };
                if let Err(e) = history_view(payload).and_then(|view| overlay.index(q.seq, view)) {
                    // Nothing half-indexed stays behind.
                    let at = overlay.pruned_upto();
                    overlay.reset(at);
                    return Err(e);
                }
            }
            break;
        }
        if overlay.pruned_upto() > at.seq {
            return Ok(OverlayFor::Stale);
        }
        overlay.prune(at.seq);
        Ok(OverlayFor::Ready(overlay))
    }

    /// Reads `stored` in one snapshot of the SQLite file, then has `pending` add what the
    /// records after that snapshot hold (`crate::overlay`): every batch committed before the
    /// call, without waiting for the fold. Past [`overlay_bytes_max`] not folded, it waits for
    /// the fold as a packet's details do (up to [`READ_WAIT_MAX`], once in each such spell) and
    /// reads the file alone.
    fn with_overlay<S, T>(
        &self,
        stored: impl Fn(&rusqlite::Connection) -> Result<S>,
        pending: impl Fn(S, &Overlay, Folded, &rusqlite::Connection) -> Result<T>,
    ) -> Result<T> {
        let mut too_far = false;
        loop {
            let done = self.inner.in_snapshot(|conn, at| {
                let found = stored(conn)?;
                if too_far {
                    return pending(found, &Overlay::new(at.seq), at, conn).map(Some);
                }
                match self.overlay_for(at)? {
                    OverlayFor::Ready(overlay) => pending(found, &overlay, at, conn).map(Some),
                    OverlayFor::Stale => Ok(None),
                    // A wait ran out lately: the fold is further behind than it folds in one,
                    // so answer from this snapshot of the file rather than read it again.
                    OverlayFor::TooFar if lock(&self.shared.state).recently_behind() => {
                        pending(found, &Overlay::new(at.seq), at, conn).map(Some)
                    }
                    OverlayFor::TooFar => {
                        too_far = true;
                        Ok(None)
                    }
                }
            })?;
            if let Some(done) = done {
                return Ok(done);
            }
            if too_far {
                self.wait_for_the_fold()?;
            }
        }
    }

    /// [`CatchUp::wait`] on this thread, for a query that has one already.
    fn wait_for_the_fold(&self) -> Result<()> {
        if lock(&self.shared.state).recently_behind() {
            return Ok(());
        }
        let caught_up = self.shared.wait_folded_as(READ_WAIT_MAX, Waiter::Query)?;
        lock(&self.shared.state).query_waited(caught_up);
        Ok(())
    }
}

/// Packet details read what the SQLite file holds: read-your-writes is [`Reader::catch_up`]'s,
/// awaited before. A wallet and a user's history add the records not folded
/// ([`JournalReader::with_overlay`]).
impl Reader for JournalReader {
    fn catch_up(&self) -> Option<CatchUp> {
        let s = lock(&self.shared.state);
        Some(CatchUp {
            target: s.queued_seq,
            recently_behind: s.recently_behind(),
            shared: self.shared.clone(),
        })
    }

    fn unapplied_commits(&self) -> Option<u64> {
        let s = lock(&self.shared.state);
        Some(s.queued_seq - s.folded_seq)
    }

    fn fold_giving_way(&self) -> Option<bool> {
        Some(lock(&self.shared.state).giving_way)
    }

    fn balance(&self, user: &UserId) -> Result<Option<i64>> {
        self.with_overlay(|c| sqlite::balance_in(c, user), |stored, o, _, _| o.balance(user, stored))
    }

    fn entries(&self, user: &UserId, before_id: Option<i64>, limit: u32) -> Result<Vec<EntryRow>> {
        self.with_overlay(
            |c| sqlite::entries_in(c, user, before_id, limit),
            |stored, o, at, _| Ok(newer_first(o.entries(user, at, before_id)?, stored, limit)),
        )
    }

    fn packet(&self, id: PacketId) -> Result<Option<PacketRow>> {
        self.inner.packet(id)
    }

    fn claims(&self, id: PacketId, after_index: Option<u32>, limit: u32) -> Result<Vec<Claim>> {
        self.inner.claims(id, after_index, limit)
    }

    fn sent(&self, user: &UserId, span: Span, page: Paging<PacketId>) -> Result<SentPage> {
        self.with_overlay(
            |c| sqlite::sent_in(c, user, span, page),
            |stored, o, _, _| {
                let pending = o.sent(user, span);
                let (count, total_fen) =
                    add_totals(stored.count, stored.total_fen, &pending, |p| p.header.total_fen)?;
                let pending: Vec<_> =
                    pending.into_iter().filter(|p| page.after_cursor(p.header.id)).collect();
                let mut items = stored.items;
                for row in &mut items {
                    o.patch(row);
                }
                Ok(SentPage { count, total_fen, items: newer_first(pending, items, page.limit) })
            },
        )
    }

    fn received(&self, user: &UserId, span: Span, page: Paging<i64>) -> Result<ReceivedPage> {
        self.with_overlay(
            |c| sqlite::received_in(c, user, span, page),
            |stored, o, at, _| received_pending(stored, o, at, user, span, page),
        )
    }

    fn best_luck_count(&self, user: &UserId, span: Span) -> Result<u64> {
        self.with_overlay(
            |c| sqlite::best_luck_count_in(c, user, span),
            |stored, o, _, conn| best_lucks_pending(stored, o, conn, user, span),
        )
    }

    fn received_and_best_lucks(
        &self,
        user: &UserId,
        span: Span,
        page: Paging<i64>,
    ) -> Result<(ReceivedPage, u64)> {
        self.with_overlay(
            |c| Ok((sqlite::received_in(c, user, span, page)?, sqlite::best_luck_count_in(c, user, span)?)),
            |(stored, lucks), o, at, conn| {
                Ok((
                    received_pending(stored, o, at, user, span, page)?,
                    best_lucks_pending(lucks, o, conn, user, span)?,
                ))
            },
        )
    }

    fn claim_of(&self, id: PacketId, user: &UserId) -> Result<Option<Claim>> {
        self.inner.claim_of(id, user)
    }
}

/// A received page read from the file at snapshot `at` (`stored`), with what the records after
/// it hold.
fn received_pending(
    stored: ReceivedPage,
    o: &Overlay,
    at: Folded,
    user: &UserId,
    span: Span,
    page: Paging<i64>,
) -> Result<ReceivedPage> {
    let pending = o.received(user, at, span)?;
    let (count, total_fen) = add_totals(stored.count, stored.total_fen, &pending, |e| e.amount_fen)?;
    let pending: Vec<_> = pending.into_iter().filter(|e| page.after_cursor(e.id)).collect();
    Ok(ReceivedPage { count, total_fen, items: newer_first(pending, stored.items, page.limit) })
}

/// A best-luck count the file holds (`stored`), with the packets that the records not folded
/// exhausted with `user` as best luck.
fn best_lucks_pending(
    stored: u64,
    o: &Overlay,
    conn: &rusqlite::Connection,
    user: &UserId,
    span: Span,
) -> Result<u64> {
    let mut count = stored;
    for (id, created) in o.best_lucks(user) {
        let in_file = sqlite::packet_state_in(conn, id)?;
        if matches!(in_file, Some((PacketStatus::Exhausted, _))) {
            // The file counted it already.
            continue;
        }
        let created = created.or(in_file.map(|(_, at)| at)).ok_or_else(|| {
            StoreError::Corrupt(format!("packet {id} is exhausted in the journal but was never made"))
        })?;
        if span.holds(created) {
            count += 1;
        }
    }
    Ok(count)
}

// ---------------------------------------------------------------------------------------------
// Records and segments.

fn io(what: String, e: std::io::Error) -> StoreError {
    StoreError::Io(format!("{what}: {e}"))
}

fn crc(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Appends one record holding `batch` to `out`.
fn encode_record(out: &mut Vec<u8>, seq: u64, batch: &Batch) -> Result<()> {
    out.resize(HEADER_BYTES, 0);
    let mut out_buf = std::mem::take(out);
    out_buf = postcard::to_extend(batch, out_buf)
        .map_err(|e| StoreError::Io(format!("cannot encode a batch for the journal: {e}")))?;
    let len = out_buf.len() - HEADER_BYTES;
    if len > RECORD_BYTES_MAX {
        return Err(StoreError::Io(format!("a batch of {len} bytes is over the journal's bound")));
    }
    write_header(&mut out_buf, MAGIC, seq);
    *out = out_buf;
    Ok(())
}

/// Fills the header of the record in `record`, whose payload follows it to the end.
fn write_header(record: &mut [u8], magic: u32, seq: u64) {
    let len = record.len() - HEADER_BYTES;
    let sum = crc(seq, &record[HEADER_BYTES..]);
    record[0..4].copy_from_slice(&magic.to_le_bytes());
    record[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    record[8..16].copy_from_slice(&seq.to_le_bytes());
    record[CRC_AT..CRC_AT + 4].copy_from_slice(&sum.to_le_bytes());
}

fn decode(payload: &[u8]) -> Result<Batch> {
    postcard::from_bytes(payload)
        .map_err(|e| StoreError::Corrupt(format!("a journal record does not decode: {e}")))
}

/// The payload of a record written before credits ([`MAGIC_V1`]) as the same batch, with no
/// credits, is written now: postcard writes a struct's fields in order, a `Vec` as its length
/// (a varint) and its items, so the new second field is one zero byte after `wallets`. `None`
/// when `wallets` does not decode; the record is then left as it is, to fail as any
/// undecodable record does.
fn upgrade_v1(payload: &[u8]) -> Option<Vec<u8>> {
    let (_, rest): (Vec<(&str, i64)>, &[u8]) = postcard::take_from_bytes(payload).ok()?;
    let at = payload.len() - rest.len();
    let mut out = Vec::with_capacity(payload.len() + 1);
    out.extend_from_slice(&payload[..at]);
    out.push(0);
    out.extend_from_slice(rest);
    Some(out)
}

/// The payload of the record at the start of `bytes`, if one is there whole: `magic`, a
/// length within [`RECORD_BYTES_MAX`] and within `bytes`, seq `want`, and its CRC.
fn whole_record(bytes: &[u8], want: u64, magic: u32) -> Option<&[u8]> {
    let header = bytes.get(..HEADER_BYTES)?;
    let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let len = word(4) as usize;
    let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    if word(0) != magic || len > RECORD_BYTES_MAX || seq != want {
        return None;
    }
    let payload = bytes.get(HEADER_BYTES..HEADER_BYTES + len)?;
    (crc(seq, payload) == header_crc(header)).then_some(payload)
}

/// What reading a segment found.
struct Scan {
    /// (seq, payload) of every whole record, in order.
    records: Vec<(u64, Vec<u8>)>,
    /// Bytes of whole records: where the segment's log ends.
    good_bytes: u64,
    /// Whether what follows is not zeros: a torn record, or what the file held before it was
    /// recycled (or damage, which cannot be told from those).
    dirty_tail: bool,
}

/// Reads the records of a segment whose first record is `first_seq`: consecutive seqs, each
/// whole and matching its CRC; the first that is not ends the log. Records of the format
/// before credits come back in today's ([`upgrade_v1`]).
fn scan(bytes: &[u8], first_seq: u64) -> Scan {
    let mut records = Vec::new();
    let mut at = 0usize;
    loop {
        let rest = &bytes[at..];
        let want = first_seq + records.len() as u64;
        let whole = whole_record(rest, want, MAGIC)
            .map(|payload| (want, payload.to_vec(), HEADER_BYTES + payload.len()))
            .or_else(|| {
                whole_record(rest, want, MAGIC_V1).map(|payload| {
                    let upgraded = upgrade_v1(payload).unwrap_or_else(|| payload.to_vec());
                    (want, upgraded, HEADER_BYTES + payload.len())
                })
            });
        match whole {
            Some((seq, payload, n)) => {
                records.push((seq, payload));
                at += n;
            }
            None => {
                let dirty_tail = rest.iter().any(|&b| b != 0);
                return Scan { records, good_bytes: at as u64, dirty_tail };
            }
        }
    }
}

/// The segment being appended to.
struct Segment {
    path: PathBuf,
    file: File,
    /// The same file open for reading, shared with the fold.
    reader: Arc<File>,
    /// Where the next record goes: every byte before it is a synced record.
    bytes: u64,
    /// The file's made size.
    capacity: u64,
    /// Made on the spot (16 MiB written and synced by the caller), not reused.
    made: bool,
}

impl Segment {
    /// The segment whose first record will be `first_seq`: `from` (the spare or a folded
    /// segment), renamed, or a new file made on the spot when `from` is not there; its
    /// directory entry is synced so it survives a crash. Records `from` held are told apart
    /// from the new ones by their seqs.
    fn create(dir: &Path, first_seq: u64, from: &Path) -> Result<Segment> {
        let path = dir.join(segment_name(first_seq));
        let made = match std::fs::rename(from, &path) {
            Ok(()) => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                make_zeroed(&path, Pace::Full)?;
                true
            }
            Err(e) => return Err(io(format!("cannot reuse {} as a journal segment", from.display()), e)),
        };
        sync_dir(dir)?;
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| io(format!("cannot open {}", path.display()), e))?;
        let capacity = file.metadata().map_err(|e| io(format!("cannot stat {}", path.display()), e))?.len();
        let reader =
            Arc::new(File::open(&path).map_err(|e| io(format!("cannot open {}", path.display()), e))?);
        Ok(Segment { path, file, reader, bytes: 0, capacity, made })
    }

    /// Whether a record of `len` bytes goes in this segment. A record too large for any
    /// segment goes in an empty one, which grows.
    fn fits(&self, len: usize) -> bool {
        self.bytes == 0 || self.bytes + len as u64 <= self.capacity
    }

    /// Writes `record` and syncs it: when this returns `Ok`, the record survives a crash.
    fn append(&mut self, record: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(record, self.bytes)
            .map_err(|e| io(format!("cannot write {}", self.path.display()), e))?;
        self.file.sync_data().map_err(|e| io(format!("cannot sync {}", self.path.display()), e))?;
        self.bytes += record.len() as u64;
        Ok(())
    }

    /// Zeros the `len` bytes a failed append may have left after the last synced record.
    fn wipe(&mut self, len: usize) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(&vec![0; len], self.bytes)
            .map_err(|e| io(format!("cannot write {}", self.path.display()), e))?;
        self.file.sync_data().map_err(|e| io(format!("cannot sync {}", self.path.display()), e))
    }
}

/// How a segment's zeros go to the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// All written, then synced: the fastest, for a segment the set waits for.
    Full,
    /// Each MiB written back before the next is written, for a spare made beside the claims:
    /// every `fdatasync` of the set's appends flushes the disk's cache, and so waits for
    /// whatever of the 16 MiB was written before it, one MiB at most this way. (Spares made
    /// whole at every rotation raised the half-rate festival's p99.9 to 13.5–21.6 ms, a MiB
    /// at a time to 5.7–16.6 ms; folded segments reused first make them rare.)
    Gentle,
}

/// Makes a segment file of [`SEGMENT_BYTES`] zeros at `path`, under a temporary name first, so
/// a crash never leaves a short one.
fn make_zeroed(path: &Path, pace: Pace) -> Result<()> {
    use std::os::fd::AsRawFd;
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&tmp)
        .map_err(|e| io(format!("cannot create {}", tmp.display()), e))?;
    let zeros = vec![0u8; 1 << 20];
    let chunk = zeros.len() as i64;
    for k in 0..SEGMENT_BYTES as i64 / chunk {
        f.write_all(&zeros).map_err(|e| io(format!("cannot write {}", tmp.display()), e))?;
        if pace == Pace::Gentle {
            // Data only: no metadata and no cache flush, so no filesystem journal commit.
            let how = libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER;
            // SAFETY: a plain syscall on a descriptor this function owns; no memory is passed.
            if unsafe { libc::sync_file_range(f.as_raw_fd(), k * chunk, chunk, how) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(io(format!("cannot write back {}", tmp.display()), e));
            }
        }
    }
    f.sync_all().map_err(|e| io(format!("cannot sync {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(format!("cannot rename {}", tmp.display()), e))
}

/// Makes the spare segment when there is none.
fn make_spare(dir: &Path) -> Result<()> {
    let spare = dir.join(SPARE);
    if spare.exists() {
        return Ok(());
    }
    make_zeroed(&spare, Pace::Gentle)?;
    sync_dir(dir)
}

/// A segment whose records are all folded: kept as the spare when there is none (its old
/// records are told apart by their seqs), removed otherwise.
fn recycle(dir: &Path, path: &Path) -> std::io::Result<()> {
    let spare = dir.join(SPARE);
    if spare.exists() {
        std::fs::remove_file(path)
    } else {
        std::fs::rename(path, spare)
    }
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.log")
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(format!("cannot sync directory {}", dir.display()), e))
}

/// The journal directory of set `set` under the data dir.
pub(crate) fn journal_dir(data_dir: &Path, set: u32) -> PathBuf {
    data_dir.join(format!("set-{set}.journal"))
}

/// Folds whatever a journal at `dir` holds into `sqlite`. Then, with `keep_spare`, leaves one
/// of its segment files as the spare for the journal about to open; without, removes the whole
/// journal (a run with the journal off). Nothing to do when there is none.
pub(crate) fn fold_leftovers(dir: &Path, sqlite: &mut SqliteStore, keep_spare: bool) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    recover(dir, sqlite)?;
    if !keep_spare {
        std::fs::remove_dir_all(dir).map_err(|e| io(format!("cannot remove {}", dir.display()), e))?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Folds into `sqlite` every record the journal holds past what it already has (a torn last
/// record was never acknowledged and ends the log), recycles or removes every segment, and
/// returns the last seq now folded.
fn recover(dir: &Path, sqlite: &mut SqliteStore) -> Result<u64> {
    let mut folded = sqlite.journal_seq()?;
    let mut segments: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io(format!("cannot list {}", dir.display()), e))? {
        let path = entry.map_err(|e| io(format!("cannot list {}", dir.display()), e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name == SPARE || name.ends_with(".tmp") {
            // The spare, or a file a crash left half made: no records in either.
            if name.ends_with(".tmp") {
                std::fs::remove_file(&path)
                    .map_err(|e| io(format!("cannot remove {}", path.display()), e))?;
            }
            continue;
        }
        match name.strip_suffix(".log").and_then(|n| n.parse::<u64>().ok()) {
            Some(first) => segments.push((first, path)),
            None => {
                return Err(StoreError::Corrupt(format!("{} is not a journal segment", path.display())));
            }
        }
    }
    segments.sort();
    let count = segments.len();
    let mut expected = None::<u64>;
    let mut pending: Vec<Batch> = Vec::new();
    let mut pending_bytes = 0usize;
    for (i, (first, path)) in segments.iter().enumerate() {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| io(format!("cannot read {}", path.display()), e))?;
        if let Some(want) = expected {
            // A gap is harmless when every record missing from it was folded already: a
            // folded segment that could not be recycled (a failed rename or remove) stays
            // behind while newer folded ones go.
            let folded_gap = *first > want && *first - 1 <= folded;
            if folded_gap {
                tracing::warn!(
                    path = %path.display(),
                    missing = %format_args!("{want}..={}", *first - 1),
                    folded,
                    "journal segments skip records the store already holds"
                );
            } else if *first != want {
                return Err(StoreError::Corrupt(format!(
                    "{} starts at record {first} where {want} was due: the segment before it is \
                     damaged or records are missing",
                    path.display()
                )));
            }
        }
        let s = scan(&bytes, *first);
        if s.dirty_tail && i + 1 == count {
            tracing::warn!(
                path = %path.display(),
                at = s.good_bytes,
                "the journal ends at a torn record (written, never acknowledged)"
            );
        }
        expected = Some(*first + s.records.len() as u64);
        for (seq, payload) in s.records {
            if seq <= folded {
                continue;
            }
            if seq != folded + pending.len() as u64 + 1 {
                return Err(StoreError::Corrupt(format!(
                    "the journal resumes at record {seq}, but the store holds up to {folded}"
                )));
            }
            pending_bytes += payload.len();
            pending.push(decode(&payload)?);
            if pending_bytes >= FOLD_BYTES_MAX {
                folded += pending.len() as u64;
                sqlite.commit_folded(&merge(std::mem::take(&mut pending)), folded)?;
                pending_bytes = 0;
            }
        }
    }
    if !pending.is_empty() {
        folded += pending.len() as u64;
        sqlite.commit_folded(&merge(pending), folded)?;
    }
    if folded > 0 || count > 0 {
        tracing::info!(dir = %dir.display(), segments = count, last_seq = folded, "journal recovered");
    }
    // Everything is in SQLite now (synced by its commit): the segments can go.
    for (_, path) in &segments {
        recycle(dir, path).map_err(|e| io(format!("cannot remove {}", path.display()), e))?;
    }
    sync_dir(dir)?;
    Ok(folded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Entry, EntryKind, Totals};

    fn batch(user: &str, fen: i64) -> Batch {
        let user = UserId::parse(user).unwrap();
        Batch {
            wallets: vec![(user.clone(), fen)],
            entries: vec![Entry {
                user,
                kind: EntryKind::Deposit,
                amount_fen: fen,
                packet_id: None,
                at_ms: 1,
            }],
            totals: Some(Totals { deposits_fen: fen, withdrawals_fen: 0 }),
            ..Batch::default()
        }
    }

    /// A user id is journaled as a bare string: the bytes a `String` gives, which records
    /// written by earlier builds hold. A stored id that is not a valid one does not decode.
    #[test]
    fn user_ids_are_journaled_as_plain_strings_and_checked_when_read() {
        let as_id = postcard::to_allocvec(&(UserId::parse("alice").unwrap(), 7_i64)).unwrap();
        let as_string = postcard::to_allocvec(&("alice".to_owned(), 7_i64)).unwrap();
        assert_eq!(as_id, as_string);
        let back: (UserId, i64) = postcard::from_bytes(&as_string).unwrap();
        assert_eq!((back.0.as_str(), back.1), ("alice", 7));

        let bad = postcard::to_allocvec(&("al ice".to_owned(), 7_i64)).unwrap();
        assert!(postcard::from_bytes::<(UserId, i64)>(&bad).is_err());
        let empty = postcard::to_allocvec(&(String::new(), 7_i64)).unwrap();
        assert!(postcard::from_bytes::<(UserId, i64)>(&empty).is_err());
    }

    /// A journal left by the version before credits ("HBJ1" records, without the field) is
    /// read as the same batches with no credits, beside records of today's format; the old
    /// format is read, never written.
    #[test]
    fn records_of_the_format_before_credits_are_read_as_batches_without_them() {
        let old = batch("alice", 10);
        // The record as that version wrote it: the same fields in order, but credits.
        let rest = (
            &old.entries,
            &old.new_packets,
            &old.packet_updates,
            &old.claims,
            &old.outbox_new,
            &old.outbox_acked,
            &old.watermarks,
            &old.idempotency,
            &old.totals,
        );
        let mut v1 = vec![0; HEADER_BYTES];
        v1.extend(postcard::to_allocvec(&old.wallets).unwrap());
        v1.extend(postcard::to_allocvec(&rest).unwrap());
        write_header(&mut v1, MAGIC_V1, 1);
        let mut new = batch("bob", 5);
        new.credits.push((UserId::parse("carol").unwrap(), 3));
        let mut v2 = Vec::new();
        encode_record(&mut v2, 2, &new).unwrap();
        assert_eq!(v2[0..4], MAGIC.to_le_bytes());
        let file = [v1, v2].concat();
        let s = scan(&file, 1);
        assert_eq!((s.records.len(), s.dirty_tail, s.good_bytes as usize), (2, false, file.len()));
        let back = decode(&s.records[0].1).unwrap();
        assert!(back.credits.is_empty());
        assert_eq!(postcard::to_allocvec(&back).unwrap(), postcard::to_allocvec(&old).unwrap());
        assert_eq!(decode(&s.records[1].1).unwrap().credits, new.credits);
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_found() {
        let mut file = Vec::new();
        for seq in 1..=3 {
            let mut rec = Vec::new();
            encode_record(&mut rec, seq, &batch("alice", seq as i64 * 10)).unwrap();
            file.extend_from_slice(&rec);
        }
        let whole = scan(&file, 1);
        assert!(!whole.dirty_tail);
        assert_eq!(whole.records.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 3]);
        let b = decode(&whole.records[2].1).unwrap();
        assert_eq!(b.wallets[0].1, 30);
        assert_eq!(whole.good_bytes as usize, file.len());

        // Zeros after the records (a made segment's unused part) are a clean end.
        let mut padded = file.clone();
        padded.resize(file.len() + 4096, 0);
        let s = scan(&padded, 1);
        assert_eq!((s.records.len(), s.dirty_tail), (3, false));

        // Cut anywhere inside the last record: the first two stand, the rest is torn.
        for cut in [file.len() - 1, file.len() - 7, file.len() - 30] {
            let s = scan(&file[..cut], 1);
            assert!(s.dirty_tail, "cut at {cut}");
            assert_eq!(s.records.len(), 2, "cut at {cut}");
        }

        // A flipped bit fails the CRC.
        let mut bad = file.clone();
        let n = bad.len();
        bad[n - 3] ^= 0x10;
        let s = scan(&bad, 1);
        assert!(s.dirty_tail);
        assert_eq!(s.records.len(), 2);

        // Records of another seq (what a recycled file held before) are not this log's.
        assert_eq!(scan(&file, 7).records.len(), 0);
    }

    #[test]
    fn a_packet_read_behind_a_stalled_fold_is_refused_as_busy_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        let id = PacketId::from_raw(1 << 30).unwrap();
        // Caught up: the read goes to SQLite (no such packet there).
        assert!(matches!(store.packet(id), Ok(None)));

        // The fold cannot write while the write connection is held elsewhere.
        let shared = store.shared.clone();
        let held = lock(&shared.store);
        store.commit(&batch("alice", 100)).unwrap();
        let started = Instant::now();
        let first = store.packet(id);
        let waited = started.elapsed();
        assert!(matches!(first, Err(StoreError::Busy(_))), "{first:?}");
        assert!(waited >= PACKET_WAIT_MAX && waited < PACKET_WAIT_MAX * 10, "waited {waited:?}");
        // Within the busy spell the next one is refused without the wait.
        let started = Instant::now();
        assert!(matches!(store.packet(id), Err(StoreError::Busy(_))));
        assert!(started.elapsed() < PACKET_WAIT_MAX, "refused at once, not after {:?}", started.elapsed());

        // Once the fold has caught up, reads are answered again, spell or not.
        drop(held);
        assert!(store.shared.wait_folded(Duration::from_secs(10)).unwrap());
        assert!(matches!(store.packet(id), Ok(None)));
    }

    #[test]
    fn a_restart_folds_what_the_journal_holds() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut store, _reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
            store.commit(&batch("alice", 100)).unwrap();
            store.commit(&batch("bob", 50)).unwrap();
            // No clean stop, as kill -9: the records are synced; the fold may or may not have
            // applied them.
            store.kill();
        }
        let (mut store, reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        let loaded = store.load(0).unwrap();
        let mut wallets = loaded.wallets.clone();
        wallets.sort();
        assert_eq!(wallets, [(UserId::parse("alice").unwrap(), 100), (UserId::parse("bob").unwrap(), 50)]);
        assert_eq!(reader.balance(&UserId::parse("bob").unwrap()).unwrap(), Some(50));
        // Nothing is folded twice: the entries are one each.
        assert_eq!(reader.entries(&UserId::parse("alice").unwrap(), None, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_torn_record_at_the_end_is_cut_off_and_the_rest_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("set-0.journal");
        {
            let (mut store, _reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
            store.commit(&batch("alice", 100)).unwrap();
            store.kill();
        }
        // A second record half written when the power went, right after the first.
        let seg = jdir.join(segment_name(1));
        let first_len = scan(&std::fs::read(&seg).unwrap(), 1).good_bytes;
        assert!(first_len > 0);
        let mut rec = Vec::new();
        encode_record(&mut rec, 2, &batch("bob", 50)).unwrap();
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &rec[..rec.len() / 2], first_len).unwrap();
        drop(f);
        let (mut store, reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        store.load(0).unwrap();
        assert_eq!(reader.balance(&UserId::parse("alice").unwrap()).unwrap(), Some(100));
        assert_eq!(reader.balance(&UserId::parse("bob").unwrap()).unwrap(), None);
        // And the journal goes on from record 2.
        store.commit(&batch("carol", 7)).unwrap();
        assert!(caught_up(&reader));
        assert_eq!(reader.balance(&UserId::parse("carol").unwrap()).unwrap(), Some(7));
    }

    #[test]
    fn damage_before_the_last_segment_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("set-0.journal");
        drop(open_journaled_sqlite(dir.path(), 0, 1).unwrap());
        for f in std::fs::read_dir(&jdir).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        let mut rec = Vec::new();
        encode_record(&mut rec, 1, &batch("alice", 100)).unwrap();
        let n = rec.len();
        rec[n - 1] ^= 1;
        std::fs::write(jdir.join(segment_name(1)), &rec).unwrap();
        let mut rec2 = Vec::new();
        encode_record(&mut rec2, 2, &batch("bob", 1)).unwrap();
        std::fs::write(jdir.join(segment_name(2)), &rec2).unwrap();
        match open_journaled_sqlite(dir.path(), 0, 1) {
            Err(StoreError::Corrupt(msg)) => assert!(msg.contains("damaged"), "{msg}"),
            other => panic!("expected Corrupt, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn segments_rotate_recycle_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("set-0.journal");
        // 200 big batches fill two segments.
        let name = |i: i64| format!("u{i:0>59}");
        {
            let (mut store, reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
            for i in 1..=200 {
                store.commit(&big_batch(i)).unwrap();
            }
            assert!(store.segment.path != jdir.join(segment_name(1)), "the journal rotated");
            // Hundreds of thousands of entries take the fold longer than a query waits.
            store.sums().unwrap();
            assert_eq!(reader.balance(&UserId::parse(&name(200)).unwrap()).unwrap(), Some(200));
            store.kill();
        }
        // Folded segments were kept for reuse, recycled into the spare or removed: a few files
        // (the pool, the spare, the segment, one being made), not one per 16 MiB written.
        let files = std::fs::read_dir(&jdir).unwrap().count();
        assert!(files <= POOL_MAX + 3, "{files} files in the journal");
        let (mut store, reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        assert_eq!(store.load(0).unwrap().wallets.len(), 200);
        let u7 = UserId::parse(&name(7)).unwrap();
        // A page is at most 1,000 entries; every batch wrote 2,000.
        assert_eq!(reader.entries(&u7, None, 1_000).unwrap().len(), 1_000);
        assert_eq!(store.sums().unwrap().balances_fen, (1..=200).sum::<i64>());
        // The spare a restart kept holds old records; the journal goes on past them.
        store.commit(&batch("after", 1)).unwrap();
        drop(store);
        let (mut store, reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        store.load(0).unwrap();
        assert_eq!(reader.balance(&UserId::parse("after").unwrap()).unwrap(), Some(1));
        assert_eq!(store.sums().unwrap().balances_fen, (1..=200).sum::<i64>() + 1);
    }

    /// Batches of ~130 KB (2,000 entries of a 60-character user): about 130 fill a segment.
    fn big_batch(i: i64) -> Batch {
        let user = UserId::parse(&format!("u{i:0>59}")).unwrap();
        let mut b = batch(user.as_str(), i);
        b.entries = (0..2_000)
            .map(|k| Entry {
                user: user.clone(),
                kind: EntryKind::Deposit,
                amount_fen: 1,
                packet_id: None,
                at_ms: k,
            })
            .collect();
        b
    }

    /// Commits big batches from `*i` on until the journal moves to its next segment.
    fn rotate(store: &mut JournalStore, i: &mut i64) {
        let before = store.segment.path.clone();
        while store.segment.path == before {
            *i += 1;
            store.commit(&big_batch(*i)).unwrap();
        }
    }

    fn wait_for_spare(jdir: &Path, why: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !jdir.join(SPARE).exists() {
            assert!(Instant::now() < deadline, "no spare: {why}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A journal in a fresh data dir, once the fold has made its first spare; with the dir
    /// and the journal's directory.
    fn fresh_journal() -> (tempfile::TempDir, PathBuf, JournalStore) {
        let dir = tempfile::tempdir().unwrap();
        let jdir = dir.path().join("set-0.journal");
        let (store, _reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        wait_for_spare(&jdir, "the fold makes one when the journal opens");
        (dir, jdir, store)
    }

    /// Has the fold give way with no bound in sight: it folds only when the set waits for it
    /// (`sums`, `load`).
    fn hold_the_fold(store: &JournalStore) {
        let mut s = lock(&store.shared.state);
        s.busy_override = Some(true);
        s.lag_max = Duration::from_secs(3600);
        s.lag_bytes_max = usize::MAX;
    }

    /// Stops `store` as `kill -9` would and opens the data dir again: every batch up to the
    /// `last`th big one is back.
    fn restart_has_every_big_batch(store: JournalStore, dir: &Path, last: i64) {
        store.kill();
        let (mut store, reader) = open_journaled_sqlite(dir, 0, 1).unwrap();
        assert_eq!(store.load(0).unwrap().wallets.len(), last as usize);
        assert_eq!(reader.balance(&UserId::parse(&format!("u{last:0>59}")).unwrap()).unwrap(), Some(last));
    }

    #[test]
    fn a_rotation_that_takes_the_spare_has_the_fold_make_another_while_it_gives_way() {
        let (_dir, jdir, mut store) = fresh_journal();
        // The claims want the CPU: the fold folds nothing (the lag bounds are far off).
        lock(&store.shared.state).busy_override = Some(true);
        let mut i = 0;
        rotate(&mut store, &mut i);
        assert!(store.pool.is_empty() && !store.segment.made, "the rotation took the spare");
        wait_for_spare(&jdir, "the fold makes the next one while it gives way");
        assert!(lock(&store.shared.state).folded_seq < store.last_seq, "and folded nothing meanwhile");
        rotate(&mut store, &mut i);
        assert_eq!(store.segments_made, 0, "no segment was made on the commit path");
    }

    #[test]
    fn rotations_take_folded_segments_before_the_spare() {
        use std::os::unix::fs::MetadataExt;
        let (dir, jdir, mut store) = fresh_journal();
        let first = std::fs::metadata(&store.segment.path).unwrap().ino();
        let mut i = 0;
        rotate(&mut store, &mut i);
        wait_for_spare(&jdir, "the fold makes the next one");
        // Everything folded; the next commit keeps the first segment for reuse.
        store.sums().unwrap();
        i += 1;
        store.commit(&big_batch(i)).unwrap();
        assert_eq!(store.pool.len(), 1, "the folded segment is kept");
        rotate(&mut store, &mut i);
        assert_eq!(
            std::fs::metadata(&store.segment.path).unwrap().ino(),
            first,
            "the folded segment is reused"
        );
        assert!(jdir.join(SPARE).exists(), "the spare is left for when none is folded");
        assert_eq!(store.segments_made, 0);
        // Its old records are told apart from the new ones: a restart folds every batch.
        restart_has_every_big_batch(store, dir.path(), i);
    }

    #[test]
    fn a_full_pool_keeps_the_newest_folded_segments_and_a_restart_reads_them_all() {
        let (dir, jdir, mut store) = fresh_journal();
        // Segments close unfolded, then one fold takes them all.
        hold_the_fold(&store);
        let mut i = 0;
        let mut segments = vec![store.segment.path.clone()];
        for _ in 0..POOL_MAX + 2 {
            rotate(&mut store, &mut i);
            segments.push(store.segment.path.clone());
        }
        store.sums().unwrap();
        i += 1;
        store.commit(&big_batch(i)).unwrap();
        assert_eq!(store.pool.len(), POOL_MAX);
        // Every folded segment but the newest POOL_MAX was taken or recycled; those that are
        // left and the segment in use are one run of seqs.
        let on_disk: Vec<&PathBuf> = segments.iter().filter(|p| p.exists()).collect();
        assert_eq!(on_disk.len(), POOL_MAX + 1, "{on_disk:?}");
        assert_eq!(on_disk[..POOL_MAX], store.pool.iter().collect::<Vec<_>>()[..]);
        restart_has_every_big_batch(store, dir.path(), i);
        assert!(std::fs::read_dir(&jdir).unwrap().count() <= POOL_MAX + 3);
    }

    #[test]
    fn a_gap_of_folded_records_between_segments_does_not_stop_a_restart() {
        let (dir, jdir, mut store) = fresh_journal();
        // Segments close unfolded, so no rotation reuses one; then one fold takes them all.
        hold_the_fold(&store);
        let mut i = 0;
        for _ in 0..3 {
            rotate(&mut store, &mut i);
        }
        store.sums().unwrap();
        i += 1;
        store.commit(&big_batch(i)).unwrap();
        assert_eq!(store.pool.len(), 3, "three folded segments kept: {:?}", store.pool);
        // The middle one goes while the oldest stays, as a failed recycle of the oldest
        // would leave them; the records between are all folded.
        std::fs::remove_file(&store.pool[1]).unwrap();
        // Batches after the fold are in the segment in use only.
        for _ in 0..3 {
            i += 1;
            store.commit(&big_batch(i)).unwrap();
        }
        restart_has_every_big_batch(store, dir.path(), i);
        assert!(std::fs::read_dir(&jdir).unwrap().count() <= POOL_MAX + 3);
    }

    #[test]
    fn a_gap_of_unfolded_records_refuses_to_open() {
        let (dir, jdir, mut store) = fresh_journal();
        // Nothing folds: the segment that goes missing holds records the store never got.
        hold_the_fold(&store);
        let mut i = 0;
        rotate(&mut store, &mut i);
        let middle = store.segment.path.clone();
        rotate(&mut store, &mut i);
        store.kill();
        std::fs::remove_file(&middle).unwrap();
        match open_journaled_sqlite(dir.path(), 0, 1) {
            Err(StoreError::Corrupt(msg)) => assert!(msg.contains("was due"), "{msg}"),
            other => panic!("expected Corrupt, got {:?}", other.map(|_| ())),
        }
        assert!(jdir.exists());
    }

    #[test]
    fn a_failed_append_is_wiped_back_off_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), 1, &dir.path().join(SPARE)).unwrap();
        assert_eq!(seg.capacity, SEGMENT_BYTES, "a segment is made at its full size");
        let mut rec = Vec::new();
        encode_record(&mut rec, 1, &batch("alice", 100)).unwrap();
        seg.append(&rec).unwrap();
        // Half of the next record reached the file before the write failed.
        let mut next = Vec::new();
        encode_record(&mut next, 2, &batch("bob", 5)).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&seg.file, &next[..next.len() / 2], seg.bytes).unwrap();
        seg.wipe(next.len()).unwrap();
        let s = scan(&std::fs::read(&seg.path).unwrap(), 1);
        assert_eq!((s.records.len(), s.dirty_tail), (1, false));
        // And the next append lands right after the first record.
        seg.append(&next).unwrap();
        assert_eq!(scan(&std::fs::read(&seg.path).unwrap(), 1).records.len(), 2);
    }

    #[test]
    fn merged_batches_write_what_the_batches_wrote() {
        let dir_a = tempfile::tempdir().unwrap();
        let dir_b = tempfile::tempdir().unwrap();
        let batches: Vec<Batch> =
            (1..=50).map(|i| batch(if i % 3 == 0 { "alice" } else { "bob" }, i)).collect();
        let (mut one_by_one, reader_a) = crate::open_sqlite(dir_a.path(), 0, 1).unwrap();
        for b in &batches {
            one_by_one.commit(b).unwrap();
        }
        let (mut merged, reader_b) = crate::open_sqlite(dir_b.path(), 0, 1).unwrap();
        let m = merge(batches);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].wallets.len(), 2, "one row per wallet");
        merged.commit_folded(&m, 50).unwrap();
        for who in ["alice", "bob"] {
            let u = UserId::parse(who).unwrap();
            assert_eq!(reader_a.balance(&u).unwrap(), reader_b.balance(&u).unwrap());
            assert_eq!(reader_a.entries(&u, None, 100).unwrap(), reader_b.entries(&u, None, 100).unwrap());
        }
        assert_eq!(one_by_one.sums().unwrap(), merged.sums().unwrap());
        assert_eq!(merged.journal_seq().unwrap(), 50);
    }

    /// Credits merged: a user's add up, a balance written counts those before it, and those
    /// after it add to it; the fold writes what the batches one by one would have.
    #[test]
    fn merged_credits_write_what_the_batches_wrote() {
        let u = |s: &str| UserId::parse(s).unwrap();
        let batches = || {
            vec![
                Batch { wallets: vec![(u("ben"), 40)], ..Batch::default() },
                Batch { credits: vec![(u("amy"), 7), (u("ben"), 3), (u("dee"), 2)], ..Batch::default() },
                // ben spends 10 of the 43 the set read, dee 1 of 2.
                Batch {
                    wallets: vec![(u("ben"), 33), (u("dee"), 1)],
                    credits: vec![(u("cy"), 1)],
                    ..Batch::default()
                },
                Batch { credits: vec![(u("ben"), 1), (u("amy"), 2), (u("cy"), 4)], ..Batch::default() },
            ]
        };
        let m = merge(batches());
        assert_eq!(m[0].wallets, vec![(u("ben"), 34), (u("dee"), 1)]);
        assert_eq!(m[0].credits, vec![(u("amy"), 9), (u("dee"), 0), (u("cy"), 5)], "dee's 2 are spent");
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut one_by_one, reader_a) = crate::open_sqlite(dir_a.path(), 0, 1).unwrap();
        for b in &batches() {
            one_by_one.commit(b).unwrap();
        }
        let (mut merged, reader_b) = crate::open_sqlite(dir_b.path(), 0, 1).unwrap();
        merged.commit_folded(&m, 4).unwrap();
        for who in ["amy", "ben", "cy", "dee", "eve"] {
            assert_eq!(reader_a.balance(&u(who)).unwrap(), reader_b.balance(&u(who)).unwrap(), "{who}");
        }
        assert_eq!(reader_b.balance(&u("ben")).unwrap(), Some(34));
        assert_eq!(one_by_one.sums().unwrap(), merged.sums().unwrap());
    }

    /// The set's read of a wallet it does not hold counts every credit committed: those the
    /// fold applied, and those it has not, read beside the file; when more is not folded than
    /// the index takes, the fold catches up first rather than the file be read alone.
    #[test]
    fn a_balance_the_set_does_not_hold_counts_every_credit_committed() {
        let (_dir, _jdir, mut store) = fresh_journal();
        let u = |s: &str| UserId::parse(s).unwrap();
        store.commit(&Batch { wallets: vec![(u("amy"), 50)], ..Batch::default() }).unwrap();
        store.sums().unwrap();
        hold_the_fold(&store);
        store.commit(&Batch { credits: vec![(u("amy"), 7), (u("ben"), 3)], ..Batch::default() }).unwrap();
        store.commit(&Batch { credits: vec![(u("ben"), 4)], ..Batch::default() }).unwrap();
        store.commit(&Batch { wallets: vec![(u("cy"), 5)], ..Batch::default() }).unwrap();
        store.commit(&Batch { credits: vec![(u("cy"), 1)], ..Batch::default() }).unwrap();
        for (who, want) in [("amy", Some(57)), ("ben", Some(7)), ("cy", Some(6)), ("dee", None)] {
            assert_eq!(store.balance(&u(who)).unwrap(), want, "{who}");
        }
        assert_eq!(lock(&store.shared.state).folded_seq, 1, "read beside the file, none folded");
        lock(&store.shared.state).overlay_bytes_max = 0;
        assert_eq!(store.balance(&u("ben")).unwrap(), Some(7));
        assert_eq!(lock(&store.shared.state).folded_seq, store.last_seq, "the fold caught up first");
        assert_eq!(store.sums().unwrap().balances_fen, 57 + 7 + 6);
    }

    #[test]
    fn outbox_rows_acknowledged_within_a_fold_are_never_written() {
        let packet = hongbao_core::PacketIdGen::new(0, None).next(1_000);
        let row = |target_set: u32, seq: u64| crate::OutboxItem {
            target_set,
            seq,
            user: UserId::parse(&format!("u{target_set}x{seq}")).unwrap(),
            amount_fen: 7,
            packet_id: packet,
            at_ms: 1,
        };
        let with = |outbox_new: Vec<crate::OutboxItem>, outbox_acked: Vec<(u32, u64)>, watermarks| Batch {
            outbox_new,
            outbox_acked,
            watermarks,
            ..Batch::default()
        };
        let batches = vec![
            with(vec![row(1, 1), row(1, 2), row(1, 3)], vec![], vec![(2, 4)]),
            with(vec![row(1, 4), row(2, 1)], vec![(1, 2)], vec![]),
            with(vec![row(1, 5), row(2, 2), row(2, 3)], vec![(1, 4)], vec![(2, 6)]),
            with(vec![], vec![(2, 3), (1, 5)], vec![(2, 9)]),
            with(vec![row(2, 4)], vec![], vec![]),
        ];
        let m = merge(batches.clone());
        let kept: Vec<(u32, u64)> = m[0].outbox_new.iter().map(|o| (o.target_set, o.seq)).collect();
        // Target 1: everything was acknowledged; its last row stays to move outbox_seq on.
        // Target 2: 1–3 acknowledged, 3 is not its last (4 is), so only 4 is written.
        assert_eq!(kept, vec![(1, 5), (2, 4)]);
        assert_eq!(m[0].outbox_acked, vec![(1, 5), (2, 3)]);
        assert_eq!(m[0].watermarks, vec![(2, 9)]);

        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut one_by_one, _) = crate::open_sqlite(dir_a.path(), 0, 3).unwrap();
        for b in &batches {
            one_by_one.commit(b).unwrap();
        }
        let (mut merged, _) = crate::open_sqlite(dir_b.path(), 0, 3).unwrap();
        merged.commit_folded(&m, 5).unwrap();
        let (a, b) = (one_by_one.load(0).unwrap(), merged.load(0).unwrap());
        assert_eq!(a.outbox_pending, b.outbox_pending);
        assert_eq!(b.outbox_pending.iter().map(|o| (o.target_set, o.seq)).collect::<Vec<_>>(), vec![(2, 4)]);
        assert_eq!(a.outbox_last_seq, b.outbox_last_seq);
        assert_eq!(b.outbox_last_seq, vec![(1, 5), (2, 4)]);
        assert_eq!(a.watermarks, b.watermarks);
        assert_eq!(one_by_one.sums().unwrap(), merged.sums().unwrap());
    }

    /// What a query does before it reads: awaits its catch-up.
    fn caught_up(reader: &JournalReader) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(reader.catch_up().expect("a journal reader waits for its fold").wait()).unwrap()
    }

    /// Catches up, asking again while a bound runs out: a nice-19 fold on a machine whose two
    /// cores run other tests can take longer than one [`READ_WAIT_MAX`].
    fn caught_up_within(reader: &JournalReader, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !caught_up(reader) {
            if Instant::now() >= deadline {
                return false;
            }
        }
        true
    }

    /// Asks again right after a query's whole wait ran out, and checks it did not wait again
    /// (the wait-ran-out mark is unchanged): when it began inside the spell, which on a
    /// starved machine it may not have.
    fn asks_again_without_waiting(store: &JournalStore, ask: impl FnOnce()) {
        let ran_out = lock(&store.shared.state).query_wait_ran_out.expect("the last wait ran out");
        let began = Instant::now();
        ask();
        if began.duration_since(ran_out) < READ_WAIT_MAX / 2 {
            assert_eq!(
                lock(&store.shared.state).query_wait_ran_out,
                Some(ran_out),
                "the next one does not wait again"
            );
        }
    }

    #[test]
    fn reads_after_a_catch_up_see_what_was_committed_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        for i in 1..=200 {
            store.commit(&batch(&format!("u{i}"), i)).unwrap();
            // Each commit is visible to the very next query, though the fold runs apart...
            let user = UserId::parse(&format!("u{i}")).unwrap();
            assert_eq!(reader.balance(&user).unwrap(), Some(i));
            // ...and a catch-up that says it caught up has the fold past it.
            assert!(caught_up_within(&reader, Duration::from_secs(10)));
            assert!(lock(&store.shared.state).folded_seq >= store.last_seq);
            assert_eq!(reader.balance(&user).unwrap(), Some(i));
        }
        let sums = store.sums().unwrap();
        assert_eq!(sums.balances_fen, (1..=200).sum::<i64>());
    }

    /// Polls, without waiting on the fold or waking it, until it has folded up to `seq`.
    fn folded_by_itself(store: &JournalStore, seq: u64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if lock(&store.shared.state).folded_seq >= seq {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn the_fold_starts_by_itself_after_every_idle_spell() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        // Nobody waits here: the fold must start on its own after each idle spell. A commit
        // that did not wake it would stay unfolded, the fold asleep on an empty queue.
        for round in 1..=3u64 {
            store.commit(&batch(&format!("idle{round}"), 5)).unwrap();
            assert!(
                folded_by_itself(&store, store.last_seq, FOLD_DELAY * 20),
                "round {round}: a lone commit is folded after the gathering"
            );
        }
    }

    #[test]
    fn while_the_claims_want_the_cpu_the_fold_gives_way_until_the_load_ebbs() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        lock(&store.shared.state).busy_override = Some(true);
        store.commit(&batch("alice", 5)).unwrap();
        assert!(
            !folded_by_itself(&store, store.last_seq, FOLD_DELAY * 3),
            "past its gathering, the fold still gives way"
        );
        assert_eq!(reader.fold_giving_way(), Some(true), "and says so");
        // A query does not make it fold either: a catch-up waits its bound, and a wallet reads
        // the record beside the file.
        assert!(!caught_up(&reader));
        assert_eq!(reader.balance(&UserId::parse("alice").unwrap()).unwrap(), Some(5));
        assert_eq!(reader.unapplied_commits(), Some(1), "still not folded");
        // The set's own waits (the audit's sums, a load, a packet read back) fold at once;
        // with nothing left to fold, nothing is held back.
        assert_eq!(store.sums().unwrap().balances_fen, 5);
        let deadline = Instant::now() + Duration::from_secs(10);
        while reader.fold_giving_way() != Some(false) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(reader.fold_giving_way(), Some(false), "an empty queue holds nothing back");
        store.commit(&batch("bob", 7)).unwrap();
        assert!(!folded_by_itself(&store, store.last_seq, FOLD_DELAY * 2));
        // The load ebbs: the fold catches up by itself, after a measurement and a gathering
        // (the bound leaves room for a starved nice-19 thread on a loaded machine).
        lock(&store.shared.state).busy_override = Some(false);
        assert!(folded_by_itself(&store, store.last_seq, FOLD_DELAY * 20));
        assert_eq!(reader.fold_giving_way(), Some(false));
        assert!(caught_up(&reader));
        assert_eq!(reader.balance(&UserId::parse("bob").unwrap()).unwrap(), Some(7));
    }

    #[test]
    fn a_fold_that_gives_way_folds_again_at_either_lag_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        {
            let mut s = lock(&store.shared.state);
            s.busy_override = Some(true);
            s.lag_max = Duration::from_millis(300);
        }
        // The age bound: a lone record is folded once it is that old.
        let started = Instant::now();
        store.commit(&batch("alice", 5)).unwrap();
        assert!(folded_by_itself(&store, store.last_seq, Duration::from_secs(10)));
        assert!(started.elapsed() >= Duration::from_millis(300), "not before the age bound");
        // The size bound: the commit that crosses it wakes the fold.
        let bytes = {
            let mut s = lock(&store.shared.state);
            s.lag_max = Duration::from_secs(3600);
            s.appended_bytes
        };
        lock(&store.shared.state).lag_bytes_max = bytes as usize * 20;
        let mut i = 0;
        while lock(&store.shared.state).queued_bytes < bytes as usize * 20 {
            i += 1;
            store.commit(&batch(&format!("u{i}"), 1)).unwrap();
        }
        assert!(i > 5, "the bound took {i} commits");
        // Within seconds (however starved this nice-19 thread is), not at the hour-long age bound.
        assert!(
            folded_by_itself(&store, store.last_seq, Duration::from_secs(10)),
            "folded at the size bound"
        );
    }

    #[test]
    fn the_fold_gives_way_only_to_a_busy_process_and_a_busy_set() {
        let (rate, share) = (YIELD_RATE, YIELD_CPU_SHARE);
        assert!(Yield::verdict(false, rate, share), "a busy process and a set journaling fast");
        assert!(!Yield::verdict(false, rate * 0.9, 1.0), "a busy process, but a quieter set");
        assert!(!Yield::verdict(false, rate * 10.0, share * 0.9), "a fast set, but a quieter process");
        // Once busy, a dip to half of either threshold keeps it busy; below that it is not.
        assert!(Yield::verdict(true, rate * YIELD_KEEP, share * YIELD_KEEP));
        assert!(!Yield::verdict(true, rate * YIELD_KEEP * 0.9, 1.0));
        assert!(!Yield::verdict(true, rate * 10.0, share * YIELD_KEEP * 0.9));
        assert!(!Yield::verdict(true, 0.0, 0.0), "a load that stops ends it at once");
    }

    #[test]
    fn the_load_is_measured_once_a_tick_and_the_last_verdict_stands_between() {
        let now = Instant::now();
        let fast = (YIELD_RATE * 10.0) as u64;
        // Measured over the last second: this process did not use every core the whole
        // second (this test's thread sleeps), so whatever the set's rate, the claims do not
        // want the CPU; and unmeasured, never.
        let mut load = Yield::new(now - Duration::from_secs(1), 0);
        load.cpu_us = Yield::cpu_now();
        std::thread::sleep(Duration::from_millis(1));
        assert!(!load.busy(0, Instant::now(), fast));
        let mut load = Yield::new(now - Duration::from_secs(1), 0);
        load.cpu_us = None;
        assert!(!load.busy(0, now, fast));
        // Between ticks the last verdict stands, and a measurement restarts the tick.
        let mut load = Yield::new(now, 0);
        load.busy = true;
        assert!(load.busy(0, now + LOAD_TICK / 2, 0));
        assert_eq!(load.next_tick(), now + LOAD_TICK);
        assert!(!load.busy(0, now + LOAD_TICK, 0), "measured: nothing journaled");
        assert_eq!(load.next_tick(), now + LOAD_TICK * 2);
    }

    /// The fold measures the load again at the first gather after a fold that took longer
    /// than a tick, over the whole fold: claims that took the CPU meanwhile make it give way.
    /// The fold's own CPU is left out.
    #[test]
    fn after_a_long_fold_the_load_is_measured_again_and_the_folds_own_cpu_is_left_out() {
        let fast = (YIELD_RATE * 10.0) as u64;
        let mut load = Yield::new(Instant::now(), 0);
        assert!(!load.busy, "a fold starts believing the claims quiet");
        // A fold of three ticks (this thread, busy), beside claims that keep every core busy.
        let spin = |ticks: u32| {
            let started = Instant::now();
            let mut x = 0u64;
            while started.elapsed() < LOAD_TICK * ticks {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        };
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let claims: Vec<_> = (0..cores).map(|_| std::thread::spawn(move || spin(4))).collect();
        let started = Instant::now();
        spin(3);
        for c in claims {
            c.join().unwrap();
        }
        let appended = (fast as f64 * started.elapsed().as_secs_f64()) as u64;
        assert!(
            load.busy(0, Instant::now(), appended),
            "measured again, over the fold: the claims want the CPU"
        );
        // The share: the process's CPU less the fold's own, over the machine's cores.
        assert_eq!(Yield::claims_share(3_000_000, 1_000_000, 2.0, 2.0), 0.5);
        assert_eq!(Yield::claims_share(1_000_000, 1_000_000, 1.0, 2.0), 0.0);
        assert_eq!(Yield::claims_share(500_000, 1_000_000, 1.0, 2.0), 0.0, "never below nothing");
    }

    #[test]
    fn the_sets_share_one_lag_budget_and_each_keeps_a_floor() {
        assert_eq!(yield_lag_bytes(1), YIELD_LAG_BUDGET, "a set alone has the whole budget");
        assert_eq!(yield_lag_bytes(2), 32 * 1024 * 1024, "two sets: 32 MiB each, as before the budget");
        assert_eq!(yield_lag_bytes(4) * 4, YIELD_LAG_BUDGET);
        assert_eq!(yield_lag_bytes(64), YIELD_LAG_BYTES_MIN, "many sets keep the floor");
        assert_eq!(yield_lag_bytes(0), YIELD_LAG_BUDGET, "no division by zero");
        assert_eq!(overlay_bytes_max(2), 2 * yield_lag_bytes(2));
        // The bound an opened journal uses is its share.
        let dir = tempfile::tempdir().unwrap();
        let (store, _reader) = open_journaled_sqlite(dir.path(), 0, 2).unwrap();
        let s = lock(&store.shared.state);
        assert_eq!((s.lag_bytes_max, s.overlay_bytes_max), (yield_lag_bytes(2), overlay_bytes_max(2)));
    }

    #[test]
    fn a_catch_up_waits_for_what_was_committed_before_it_not_after() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        store.commit(&batch("alice", 5)).unwrap();
        let before = reader.catch_up().unwrap();
        // Held by the test, the SQLite side takes nothing more: a wait for this commit could
        // only time out.
        let shared = store.shared.clone();
        assert!(shared.wait_folded(Duration::from_secs(10)).unwrap());
        let held = lock(&shared.store);
        store.commit(&batch("bob", 7)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let started = Instant::now();
        assert!(rt.block_on(before.wait()).unwrap(), "alice's commit was folded");
        assert!(started.elapsed() < READ_WAIT_MAX / 2, "bob's commit is not waited for");
        drop(held);
    }

    #[test]
    fn a_query_folds_at_once_after_a_quiet_spell_and_at_the_pace_after_a_long_fold() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        // The fold's first work is the spare: done before the clock starts, so the figures
        // below time folds, not 16 MiB of writes on a disk others are writing to.
        wait_for_spare(&dir.path().join("set-0.journal"), "the fold makes one when the journal opens");
        // Nothing folded yet: a query does not wait for the gathering (FOLD_DELAY).
        store.commit(&batch("alice", 5)).unwrap();
        let started = Instant::now();
        assert!(caught_up(&reader));
        assert!(started.elapsed() < FOLD_DELAY / 2, "a query after a quiet spell folds at once");
        // A fold that takes long (the SQLite side held for it, as a CPU-starved fold would
        // be) sets the pace: the next query waits QUERY_FOLD_SPACING_MAX after it ended.
        let shared = store.shared.clone();
        let held = lock(&shared.store);
        store.commit(&batch("bob", 7)).unwrap();
        let waiter = std::thread::spawn(move || caught_up(&reader).then_some(reader));
        // Held from when the query asks, which wakes the fold to take bob's record and wait on
        // the store: a thread slow to start must not shorten the fold the test means to be long.
        let deadline = Instant::now() + Duration::from_secs(30);
        while lock(&shared.state).query_waiters == 0 {
            assert!(Instant::now() < deadline, "the query never asked");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Held three times the spacing: the fold may be slow to reach the store after it is
        // woken, and what it waits here is what it took (a quarter of the spacing sets it all).
        std::thread::sleep(QUERY_FOLD_SPACING_MAX * 3);
        let released = Instant::now();
        drop(held);
        let reader = waiter.join().unwrap().expect("bob's commit was folded");
        store.commit(&batch("carol", 9)).unwrap();
        assert!(caught_up(&reader));
        // Timed from the release, not from the query: the fold ended after it, and carol's
        // commit (an fdatasync, tens of milliseconds on a busy disk) is part of the pace.
        assert!(
            released.elapsed() >= QUERY_FOLD_SPACING_MAX,
            "a query right after a long fold waits for the pace, not a fold of its own"
        );
        assert_eq!(reader.balance(&UserId::parse("carol").unwrap()).unwrap(), Some(9));
    }

    #[test]
    fn queries_wait_once_for_a_fold_that_is_behind_then_answer_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        let alice = UserId::parse("alice").unwrap();
        // The fold cannot apply anything while the SQLite side is held.
        let shared = store.shared.clone();
        let held = lock(&shared.store);
        store.commit(&batch("alice", 5)).unwrap();
        assert_eq!(reader.unapplied_commits(), Some(1));
        let started = Instant::now();
        assert!(!caught_up(&reader), "the fold is held");
        assert!(started.elapsed() >= READ_WAIT_MAX, "the first query waits the whole bound");
        assert_eq!(reader.balance(&alice).unwrap(), Some(5), "not folded, yet the wallet has it");
        asks_again_without_waiting(&store, || assert!(!caught_up(&reader)));
        drop(held);
        std::thread::sleep(READ_WAIT_MAX);
        // Past the bound a query waits again, and the fold has caught up by then.
        assert!(caught_up(&reader));
        assert_eq!(reader.unapplied_commits(), Some(0));
        assert_eq!(reader.balance(&alice).unwrap(), Some(5));
        store.commit(&batch("bob", 7)).unwrap();
        assert!(caught_up(&reader), "read-your-writes is back");
        assert_eq!(reader.balance(&UserId::parse("bob").unwrap()).unwrap(), Some(7));
    }

    #[test]
    fn a_record_written_over_before_its_fold_stops_the_fold_instead_of_being_folded() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let (mut store, reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        let shared = store.shared.clone();
        let held = lock(&shared.store);
        store.commit(&batch("alice", 5)).unwrap();
        // Another whole record of the same seq and length over it, header, CRC and all (as an
        // older life of the file would hold): it would decode.
        let q = lock(&shared.state).queue[0].clone();
        let mut other = Vec::new();
        encode_record(&mut other, q.seq, &batch("bobby", 9)).unwrap();
        assert_eq!(other.len(), HEADER_BYTES + q.len, "the same length as the record it covers");
        let writer = OpenOptions::new().write(true).open(&store.segment.path).unwrap();
        writer.write_all_at(&other, q.offset - HEADER_BYTES as u64).unwrap();
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(10);
        let error = loop {
            if let Some(e) = lock(&shared.state).error.clone() {
                break e;
            }
            assert!(Instant::now() < deadline, "the fold neither failed nor stopped");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(error.contains(&format!("journal record {} is not whole", q.seq)), "{error}");
        assert_eq!(lock(&shared.state).folded_seq, 0, "nothing was folded");
        // History beside the fold checks the record the same way, and says so too.
        let read = reader.balance(&UserId::parse("bobby").unwrap());
        assert!(
            matches!(&read, Err(StoreError::Corrupt(e)) if e.contains("no longer in its segment")),
            "{read:?}"
        );
        store.kill();
    }

    // -----------------------------------------------------------------------------------------
    // History beside the fold: what queries read from the records not folded.

    /// A set's batches over a new year's eve: deposits, packets sent (to anyone or a group),
    /// shares opened, packets exhausted with their best luck, packets expired and refunded.
    struct Eve {
        rng: u64,
        t: Millis,
        ids: hongbao_core::PacketIdGen,
        balances: HashMap<UserId, i64>,
        open: Vec<OpenPacket>,
        /// The last state written of packets that closed.
        closed: Vec<crate::PacketUpdate>,
        deposits_fen: i64,
    }

    struct OpenPacket {
        header: hongbao_core::packet::PacketHeader,
        claims: Vec<Claim>,
    }

    /// 2026-01-01T00:00:00Z.
    const Y2026_MS: Millis = 1_767_225_600_000;

    impl Eve {
        fn new(seed: u64) -> Eve {
            Eve {
                rng: seed | 1,
                t: Y2026_MS - 3 * 3_600_000,
                ids: hongbao_core::PacketIdGen::new(0, None),
                balances: HashMap::new(),
                open: Vec::new(),
                closed: Vec::new(),
                deposits_fen: 0,
            }
        }

        /// xorshift64: reproducible without a dependency.
        fn roll(&mut self, n: u64) -> u64 {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng % n
        }

        fn user(&mut self) -> UserId {
            UserId::parse(&format!("u{}", self.roll(5))).unwrap()
        }

        fn credit(
            &mut self,
            b: &mut Batch,
            user: &UserId,
            kind: EntryKind,
            fen: i64,
            packet: Option<PacketId>,
        ) {
            let balance = self.balances.entry(user.clone()).or_insert(0);
            *balance += if kind == EntryKind::Send { -fen } else { fen };
            b.wallets.push((user.clone(), *balance));
            b.entries.push(Entry {
                user: user.clone(),
                kind,
                amount_fen: fen,
                packet_id: packet,
                at_ms: self.t,
            });
        }

        fn update(b: &mut Batch, p: &OpenPacket, status: PacketStatus, refunded_fen: i64) {
            let best = (status == PacketStatus::Exhausted)
                .then(|| p.claims.iter().rev().max_by_key(|c| c.amount_fen))
                .flatten()
                .map(|c| (c.user.clone(), c.amount_fen));
            b.packet_updates.push(crate::PacketUpdate {
                id: p.header.id,
                status,
                opened_count: p.claims.len() as u32,
                opened_fen: p.claims.iter().map(|c| c.amount_fen).sum(),
                refunded_fen,
                best,
            });
        }

        fn batch(&mut self) -> Batch {
            let mut b = Batch::default();
            for _ in 0..1 + self.roll(4) {
                self.t += 1 + self.roll(20 * 60_000) as i64;
                let who = self.user();
                let op = self.roll(10);
                let balance = self.balances.get(&who).copied().unwrap_or(0);
                if op < 3 && balance >= 40 {
                    let count = 1 + self.roll(4) as u32;
                    let total = i64::from(count) * (1 + self.roll(10) as i64);
                    let audience = if self.roll(2) == 0 {
                        hongbao_core::Audience::Anyone
                    } else {
                        let (a, c) = (self.user(), self.user());
                        hongbao_core::Audience::users([a, c])
                    };
                    let header = hongbao_core::packet::PacketHeader {
                        id: self.ids.next(self.t),
                        sender: who.clone(),
                        kind: hongbao_core::Kind::Lucky,
                        total_fen: total,
                        count,
                        audience,
                        greeting: "新年快乐".into(),
                        created_at_ms: self.t,
                        expires_at_ms: self.t + 86_400_000,
                        seed: self.roll(u64::MAX),
                        amount_rule: hongbao_core::AmountRule::CURRENT,
                    };
                    self.credit(&mut b, &who, EntryKind::Send, total, Some(header.id));
                    b.new_packets.push(header.clone());
                    self.open.push(OpenPacket { header, claims: Vec::new() });
                } else if op < 8 && !self.open.is_empty() {
                    let k = self.roll(self.open.len() as u64) as usize;
                    let p = &self.open[k];
                    if !p.header.audience.admits(&who) || p.claims.iter().any(|c| c.user == who) {
                        continue;
                    }
                    let opened: i64 = p.claims.iter().map(|c| c.amount_fen).sum();
                    let left = p.header.count as usize - p.claims.len();
                    let rest = p.header.total_fen - opened;
                    let (id, index) = (p.header.id, p.claims.len() as u32);
                    // At least a fen for each share after it.
                    let fen = if left == 1 {
                        rest
                    } else {
                        1 + self.roll((rest - left as i64) as u64 + 1) as i64 / 2
                    };
                    let claim = Claim { user: who.clone(), amount_fen: fen, at_ms: self.t, index };
                    self.credit(&mut b, &who, EntryKind::Claim, fen, Some(id));
                    b.claims.push(crate::ClaimRow { packet_id: id, claim: claim.clone() });
                    let p = &mut self.open[k];
                    p.claims.push(claim);
                    if left == 1 {
                        let p = self.open.remove(k);
                        Eve::update(&mut b, &p, PacketStatus::Exhausted, 0);
                        self.closed.extend(b.packet_updates.last().cloned());
                    } else {
                        Eve::update(&mut b, p, PacketStatus::Active, 0);
                    }
                } else if op == 8 && !self.open.is_empty() {
                    let p = self.open.remove(0);
                    let opened: i64 = p.claims.iter().map(|c| c.amount_fen).sum();
                    let rest = p.header.total_fen - opened;
                    let sender = p.header.sender.clone();
                    self.credit(&mut b, &sender, EntryKind::Refund, rest, Some(p.header.id));
                    Eve::update(&mut b, &p, PacketStatus::Expired, rest);
                    self.closed.extend(b.packet_updates.last().cloned());
                } else if op == 9 && !self.closed.is_empty() {
                    // A closed packet's state written again, unchanged: counted once.
                    let k = self.roll(self.closed.len() as u64) as usize;
                    b.packet_updates.push(self.closed[k].clone());
                } else {
                    let fen = 1 + self.roll(100) as i64;
                    self.deposits_fen += fen;
                    self.credit(&mut b, &who, EntryKind::Deposit, fen, None);
                    b.totals = Some(Totals { deposits_fen: self.deposits_fen, withdrawals_fen: 0 });
                }
            }
            b
        }
    }

    /// Everything a wallet and a user's history answer, every page followed by its cursor.
    fn histories(r: &dyn Reader) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let spans =
            [Span::ALL, Span { from_ms: 0, to_ms: Y2026_MS }, Span { from_ms: Y2026_MS, to_ms: Millis::MAX }];
        for u in 0..5 {
            let user = UserId::parse(&format!("u{u}")).unwrap();
            writeln!(out, "{user}: balance {:?}", r.balance(&user).unwrap()).unwrap();
            let mut cursor = None;
            loop {
                let page = r.entries(&user, cursor, 3).unwrap();
                writeln!(out, "  entries {page:?}").unwrap();
                match page.last() {
                    Some(e) if page.len() == 3 => cursor = Some(e.id),
                    _ => break,
                }
            }
            for span in spans {
                writeln!(out, "  best luck {span:?}: {}", r.best_luck_count(&user, span).unwrap()).unwrap();
                let mut cursor = None;
                loop {
                    let page = r.received(&user, span, Paging { before: cursor, limit: 2 }).unwrap();
                    writeln!(out, "  received {page:?}").unwrap();
                    // The journal reads this page and the best lucks in one snapshot; the
                    // plain file reads them apart.
                    let both =
                        r.received_and_best_lucks(&user, span, Paging { before: cursor, limit: 2 }).unwrap();
                    writeln!(out, "  received with best lucks {both:?}").unwrap();
                    match page.items.last() {
                        Some(e) if page.items.len() == 2 => cursor = Some(e.id),
                        _ => break,
                    }
                }
                let mut cursor = None;
                loop {
                    let page = r.sent(&user, span, Paging { before: cursor, limit: 2 }).unwrap();
                    writeln!(out, "  sent {page:?}").unwrap();
                    match page.items.last() {
                        Some(p) if page.items.len() == 2 => cursor = Some(p.header.id),
                        _ => break,
                    }
                }
            }
        }
        out
    }

    /// The same batches into a journal whose fold is held (folded only now and then) and into
    /// a plain SQLite file: after every batch, each wallet and history reads the same from
    /// both, pages, cursors (entry ids not issued yet) and totals alike.
    #[test]
    fn history_beside_a_held_fold_reads_what_a_folded_file_reads() {
        for seed in [7, 2026, 88_888] {
            let (jdir, rdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let (mut journal, reader) = open_journaled_sqlite(jdir.path(), 0, 1).unwrap();
            let (mut plain, expected) = crate::open_sqlite(rdir.path(), 0, 1).unwrap();
            hold_the_fold(&journal);
            let mut eve = Eve::new(seed);
            let mut held_back = 0;
            for step in 0..80 {
                let b = eve.batch();
                journal.commit(&b).unwrap();
                plain.commit(&b).unwrap();
                if eve.roll(6) == 0 {
                    // The fold catches up: the boundary between file and records moves.
                    assert!(journal.shared.wait_folded(Duration::from_secs(30)).unwrap());
                }
                held_back = held_back.max(reader.unapplied_commits().unwrap());
                assert_eq!(histories(&reader), histories(&expected), "seed {seed}, step {step}");
            }
            assert!(held_back >= 5, "seed {seed}: the records not folded were read ({held_back} at most)");
            // Caught up, the fold lets the index go.
            assert!(journal.shared.wait_folded(Duration::from_secs(30)).unwrap());
            let deadline = Instant::now() + Duration::from_secs(10);
            while !lock(&journal.shared.overlay).is_empty() {
                assert!(Instant::now() < deadline, "seed {seed}: the index outlived the fold's catch-up");
                std::thread::sleep(Duration::from_millis(5));
            }
            assert_eq!(histories(&reader), histories(&expected), "seed {seed}, folded");
        }
    }

    /// The fold runs free and is made to fold often, while queries on two threads read: every
    /// read sees every deposit made before it, and entry ids never move, whichever side of a
    /// fold a snapshot falls on.
    #[test]
    fn a_wallet_reads_its_own_writes_while_the_fold_races_the_reads() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        let alice = UserId::parse("alice").unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let folder = {
            let (shared, stop) = (store.shared.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    shared.wait_folded(Duration::from_millis(20)).unwrap();
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let watcher = {
            let (reader, alice, stop) = (reader.clone(), alice.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut seen = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let newest = reader.entries(&alice, None, 1).unwrap();
                    let id = newest.first().map_or(0, |e| e.id);
                    assert!(id >= seen, "entry {id} after entry {seen}");
                    seen = id;
                    let page = reader.received(&alice, Span::ALL, Paging { before: None, limit: 1 }).unwrap();
                    assert_eq!(page.count, 0, "alice only deposits");
                }
                seen
            })
        };
        for i in 1..=400 {
            store.commit(&batch("alice", i)).unwrap();
            // `batch` leaves alice's balance at i, with one deposit entry of i.
            assert_eq!(reader.balance(&alice).unwrap(), Some(i));
            let newest = reader.entries(&alice, None, 2).unwrap();
            assert_eq!(newest[0].id, i, "deposit {i} has the id the fold gives it");
            assert_eq!(newest[0].amount_fen, i);
            if i > 1 {
                assert_eq!(newest[1].id, i - 1);
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        folder.join().unwrap();
        assert!(watcher.join().unwrap() > 0, "the watcher read deposits");
        assert_eq!(store.sums().unwrap().balances_fen, 400);
    }

    /// A query whose snapshot is older than what another query (or the fold) dropped from the
    /// index is told to read a newer one: the records between are in neither.
    #[test]
    fn a_snapshot_older_than_what_the_index_dropped_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        hold_the_fold(&store);
        store.commit(&batch("alice", 5)).unwrap();
        let shared = store.shared.clone();
        reader
            .inner
            .in_snapshot(|_, at| {
                assert_eq!(at.seq, 0, "the snapshot holds nothing");
                // Meanwhile the fold applies record 1 and a newer snapshot drops it.
                assert!(shared.wait_folded(Duration::from_secs(30)).unwrap());
                lock(&shared.overlay).prune(1);
                assert!(matches!(reader.overlay_for(at)?, OverlayFor::Stale));
                Ok(())
            })
            .unwrap();
        assert_eq!(reader.balance(&UserId::parse("alice").unwrap()).unwrap(), Some(5), "read again");
    }

    /// A backlog past the index's bound (a failing or overrun fold): history waits for the
    /// fold as a packet's details do, once in each such spell, and reads the file.
    #[test]
    fn past_its_bound_history_waits_for_the_fold_then_reads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        let alice = UserId::parse("alice").unwrap();
        lock(&store.shared.state).overlay_bytes_max = 0;
        let shared = store.shared.clone();
        let held = lock(&shared.store);
        store.commit(&batch("alice", 5)).unwrap();
        let started = Instant::now();
        assert_eq!(reader.balance(&alice).unwrap(), None, "not folded, not indexed: the file's answer");
        assert!(started.elapsed() >= READ_WAIT_MAX, "it waited the bound for the fold");
        asks_again_without_waiting(&store, || assert_eq!(reader.balance(&alice).unwrap(), None));
        drop(held);
        std::thread::sleep(READ_WAIT_MAX);
        assert_eq!(
            reader.balance(&alice).unwrap(),
            Some(5),
            "past the spell it waits, and the fold caught up"
        );
    }

    /// Once a backlog that was past the bound is back under it, history indexes the records
    /// not folded again, all of them, while the fold still trails.
    #[test]
    fn history_indexes_again_once_a_backlog_is_back_under_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, reader) = open_journaled_sqlite(dir.path(), 0, 1).unwrap();
        let shared = store.shared.clone();
        lock(&shared.state).overlay_bytes_max = 0;
        let held = lock(&shared.store);
        for (i, user) in ["alice", "bob", "carol"].into_iter().enumerate() {
            store.commit(&batch(user, i as i64 + 1)).unwrap();
        }
        assert_eq!(reader.balance(&UserId::parse("carol").unwrap()).unwrap(), None, "past the bound");
        // Back under it, the fold still held: every record is read from the journal.
        lock(&shared.state).overlay_bytes_max = usize::MAX;
        let (tx, rx) = std::sync::mpsc::channel();
        let asker = std::thread::spawn(move || {
            let alice = reader.balance(&UserId::parse("alice").unwrap()).unwrap();
            let carol = reader.balance(&UserId::parse("carol").unwrap()).unwrap();
            tx.send((alice, carol)).unwrap();
        });
        let answer = rx.recv_timeout(Duration::from_secs(10));
        drop(held);
        assert_eq!(answer.expect("answered while the fold trails"), (Some(1), Some(3)));
        asker.join().unwrap();
    }
}
