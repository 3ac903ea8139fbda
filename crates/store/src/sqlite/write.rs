//! The write side: one connection, owned by the set's engine thread, that commits batches and
//! reads the state back at start.
//!
//! It must never leave a transaction open after an error: a failed commit is rolled back
//! before this returns, and every call first clears whatever a failed rollback left behind,
//! so the engine can `load` again on the same object and carry on.

use std::sync::OnceLock;

use hongbao_core::{hint, Audience, Claim, Millis, Packet, PacketId, PacketStatus, UserId};
use rusqlite::{Connection, OptionalExtension, Statement, Transaction, TransactionBehavior};

use super::rows::{self, corrupt, to_i64, Columns, Users};
use crate::{
    commit_failed, Batch, Loaded, OutboxItem, PacketRow, Result, Store, StoreError, StoreSums, Totals,
};

/// The write side of one set's SQLite file. See the module doc.
#[derive(Debug)]
pub struct SqliteStore {
    /// Owned by the engine thread; `Connection` is `Send` but not `Sync`, as the engine wants.
    conn: Connection,
    set: u32,
    /// Stops the checkpoint thread when the store is dropped.
    _checkpointer: super::Checkpointer,
}

const SELECT_ACTIVE_PACKETS: &str =
    concat!("SELECT ", packet_columns!(), " FROM packets WHERE status = 'active' ORDER BY id");

// CROSS JOIN makes SQLite walk the active packets and look their rows up by primary key, in
// packet order, instead of scanning every audience or claim row ever written; both queries
// come out in packet order, so `load` groups them with one pass and no map.
const SELECT_ACTIVE_AUDIENCE: &str = "SELECT a.packet_id, a.user FROM packets AS p \
     CROSS JOIN audience AS a ON a.packet_id = p.id \
     WHERE p.status = 'active' ORDER BY p.id, a.user";
const SELECT_ACTIVE_CLAIMS: &str = "SELECT c.packet_id, c.idx, c.user, c.amount_fen, c.at_ms \
     FROM packets AS p CROSS JOIN claims AS c ON c.packet_id = p.id \
     WHERE p.status = 'active' ORDER BY p.id, c.idx";

const SELECT_OUTBOX: &str =
    "SELECT target_set, seq, user, amount_fen, packet_id, at_ms FROM outbox ORDER BY target_set, seq";
const SELECT_WATERMARKS: &str = "SELECT source_set, seq FROM watermarks ORDER BY source_set";
const SELECT_TOTALS: &str = "SELECT deposits_fen, withdrawals_fen FROM totals WHERE id = 0";

impl SqliteStore {
    pub(super) fn new(conn: Connection, set: u32, checkpointer: super::Checkpointer) -> SqliteStore {
        SqliteStore { conn, set, _checkpointer: checkpointer }
    }

    /// Ends a transaction a failed rollback may have left open (SQLite rolls back by itself
    /// on most errors, but not all), so the next `BEGIN` does not fail forever.
    fn recover(&mut self) -> Result<()> {
        if !self.conn.is_autocommit() {
            self.conn
                .execute_batch("ROLLBACK")
                .map_err(|e| StoreError::Io(format!("cannot roll back a failed transaction: {e}")))?;
        }
        Ok(())
    }
}

impl SqliteStore {
    /// The last journal record folded into this file; 0 when none ever was.
    pub(crate) fn journal_seq(&mut self) -> Result<u64> {
        self.recover()?;
        let v: Option<i64> = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'journal_seq'", [], |r| r.get(0))
            .optional()?;
        match v {
            None => Ok(0),
            Some(v) => u64::try_from(v).map_err(|_| corrupt(format!("journal_seq {v}"))),
        }
    }

    /// Writes journal records `journal_seq - batches.len() + 1 ..= journal_seq` in order, in
    /// one transaction that also records `journal_seq`: folded exactly once, or not at all.
    pub(crate) fn commit_folded(&mut self, batches: &[Batch], journal_seq: u64) -> Result<()> {
        self.recover()?;
        let set = self.set;
        let done = (|| {
            let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for b in batches {
                write_batch(&tx, b)?;
            }
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('journal_seq', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [to_i64(journal_seq, "journal seq")?],
            )?;
            Ok(tx.commit()?)
        })();
        done.map_err(|e| commit_failed(set, e))
    }
}

impl Store for SqliteStore {
    fn load(&mut self, idempotency_since_ms: Millis) -> Result<Loaded> {
        self.recover()?;
        // IMMEDIATE: the prune below writes, and the reads see the same snapshot.
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM idempotency WHERE at_ms < ?1", [idempotency_since_ms])?;
        let mut users = Users::interning();
        let loaded = load_in(&tx, self.set, idempotency_since_ms, &mut users)?;
        tx.commit()?;
        Ok(loaded)
    }

    fn commit(&mut self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.recover()?;
        let set = self.set;
        // Any failure drops the transaction, which rolls it back: nothing of the batch stays.
        let done = (|| {
            let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            write_batch(&tx, batch)?;
            Ok(tx.commit()?)
        })();
        done.map_err(|e| commit_failed(set, e))
    }

    fn packet(&mut self, id: PacketId) -> Result<Option<Packet>> {
        self.recover()?;
        let tx = self.conn.transaction()?;
        let Some((row, claims)) = read_packet(&tx, id)? else {
            return Ok(None);
        };
        tx.commit()?;
        Ok(Some(Packet::restore(row.header, row.status, row.refunded_fen, claims)))
    }

    fn balance(&mut self, user: &UserId) -> Result<Option<i64>> {
        self.recover()?;
        // The writer's own connection: every batch it committed is there.
        super::read::balance_in(&self.conn, user)
    }

    fn sums(&mut self) -> Result<StoreSums> {
        self.recover()?;
        // One deferred transaction: every figure comes from the same snapshot.
        let tx = self.conn.transaction()?;
        let balances_fen =
            tx.query_row("SELECT COALESCE(SUM(balance_fen), 0) FROM wallets", [], |r| r.get(0))?;
        // Over every packet, not just active ones: a closed packet still holding escrow is
        // exactly what an audit is for.
        let escrow_fen = tx.query_row(
            "SELECT COALESCE(SUM(total_fen - opened_fen - refunded_fen), 0) FROM packets",
            [],
            |r| r.get(0),
        )?;
        let mut users = Users::parsing();
        let sums = StoreSums {
            balances_fen,
            escrow_fen,
            totals: read_totals(&tx)?,
            outbox_pending: read_outbox(&tx, &mut users)?,
            watermarks: read_set_seqs(&tx, SELECT_WATERMARKS, "watermark")?,
        };
        tx.commit()?;
        Ok(sums)
    }
}

fn load_in(tx: &Transaction<'_>, set: u32, since_ms: Millis, users: &mut Users) -> Result<Loaded> {
    let mut wallets = Vec::new();
    {
        let mut stmt = tx.prepare("SELECT user, balance_fen FROM wallets")?;
        let mut q = stmt.query([])?;
        while let Some(r) = q.next()? {
            // One row per user: parsed, not interned.
            let user = crate::users::parse_user(r.text(0)?)?;
            let fen = rows::balance(r.get(1)?, &user)?;
            wallets.push((user, fen));
        }
    }

    let max_packet_id: Option<i64> = tx.query_row("SELECT MAX(id) FROM packets", [], |r| r.get(0))?;
    let max_packet_id = max_packet_id.map(rows::packet_id).transpose()?;
    if let Some(id) = max_packet_id {
        if id.set() != set {
            return Err(corrupt(format!("set {set} holds packet {id} of set {}", id.set())));
        }
    }

    let active_packets = load_active_packets(tx, set, users)?;
    // Only active packets hold escrow; summing just them keeps start-up independent of how
    // many packets were ever sent. `sums` checks every packet for the audit.
    let escrow_fen = tx.query_row(
        "SELECT COALESCE(SUM(total_fen - opened_fen - refunded_fen), 0) FROM packets WHERE status = 'active'",
        [],
        |r| r.get(0),
    )?;

    let mut idempotency = Vec::new();
    {
        let mut stmt = tx.prepare(
            "SELECT user, request_id, fingerprint, op, result, at_ms FROM idempotency WHERE at_ms >= ?1",
        )?;
        let mut q = stmt.query([since_ms])?;
        while let Some(r) = q.next()? {
            idempotency.push(rows::idem_record(r, users)?);
        }
    }

    Ok(Loaded {
        wallets,
        active_packets,
        max_packet_id,
        idempotency,
        outbox_pending: read_outbox(tx, users)?,
        outbox_last_seq: read_set_seqs(
            tx,
            "SELECT target_set, last_seq FROM outbox_seq ORDER BY target_set",
            "outbox seq",
        )?,
        watermarks: read_set_seqs(tx, SELECT_WATERMARKS, "watermark")?,
        totals: read_totals(tx)?,
        escrow_fen,
    })
}

/// Three streaming queries in packet order (packets, audience rows, claims), joined in one
/// pass: a restart with a million active packets and ten million claims stays a few scans.
#[expect(clippy::vec_box, reason = "the set keeps packets boxed; see `Loaded::active_packets`")]
fn load_active_packets(tx: &Transaction<'_>, set: u32, users: &mut Users) -> Result<Vec<Box<Packet>>> {
    let mut packets: Vec<PacketRow> = Vec::new();
    {
        let mut stmt = tx.prepare(SELECT_ACTIVE_PACKETS)?;
        let mut q = stmt.query([])?;
        while let Some(r) = q.next()? {
            packets.push(rows::of_set(rows::packet_row(r, users)?, set)?);
        }
    }
    let ids: Vec<PacketId> = packets.iter().map(|p| p.header.id).collect();

    let mut groups: Vec<Vec<_>> = vec![Vec::new(); packets.len()];
    {
        let mut stmt = tx.prepare(SELECT_ACTIVE_AUDIENCE)?;
        let mut q = stmt.query([])?;
        let mut cursor = 0;
        while let Some(r) = q.next()? {
            let slot = rows::advance(&ids, &mut cursor, rows::packet_id(r.get(0)?)?)?;
            groups[slot].push(users.get(r.text(1)?)?);
        }
    }

    let mut claims: Vec<Vec<Claim>> = vec![Vec::new(); packets.len()];
    {
        let mut stmt = tx.prepare(SELECT_ACTIVE_CLAIMS)?;
        let mut q = stmt.query([])?;
        let mut cursor = 0;
        while let Some(r) = q.next()? {
            let slot = rows::advance(&ids, &mut cursor, rows::packet_id(r.get(0)?)?)?;
            claims[slot].push(rows::claim(r, 1, users)?);
        }
    }

    rows::restore(packets, groups, claims)
}

/// A packet's row by id.
pub(super) const SELECT_PACKET: &str = concat!("SELECT ", packet_columns!(), " FROM packets WHERE id = ?1");

/// One packet of any status, with its audience and claims, checked to agree.
pub(super) fn read_packet(conn: &Connection, id: PacketId) -> Result<Option<(PacketRow, Vec<Claim>)>> {
    let mut users = Users::parsing();
    let Some(row) = read_packet_row(conn, id, &mut users)? else { return Ok(None) };
    let mut claims = Vec::new();
    {
        let mut stmt = conn.prepare_cached(
            "SELECT idx, user, amount_fen, at_ms FROM claims WHERE packet_id = ?1 ORDER BY idx",
        )?;
        let mut q = stmt.query([id.as_i64()])?;
        while let Some(r) = q.next()? {
            claims.push(rows::claim(r, 0, &mut users)?);
        }
    }
    rows::check_claims(&row, &claims)?;
    Ok(Some((row, claims)))
}

/// One packet of any status, with its audience: what the writer's `read_packet` and the
/// reader's `packet` both read.
pub(super) fn read_packet_row(
    conn: &Connection,
    id: PacketId,
    users: &mut Users,
) -> Result<Option<PacketRow>> {
    let mut row = {
        let mut stmt = conn.prepare_cached(SELECT_PACKET)?;
        let mut q = stmt.query([id.as_i64()])?;
        match q.next()? {
            Some(r) => rows::packet_row(r, users)?,
            None => return Ok(None),
        }
    };
    let group = read_group(conn, &row, users)?;
    rows::set_audience(&mut row, group)?;
    Ok(Some(row))
}

/// The audience rows of a group packet; none for an `Anyone` packet (and none are read).
pub(super) fn read_group(conn: &Connection, row: &PacketRow, users: &mut Users) -> Result<Vec<UserId>> {
    let mut group = Vec::new();
    if row.header.audience == Audience::Anyone {
        return Ok(group);
    }
    let mut stmt = conn.prepare_cached("SELECT user FROM audience WHERE packet_id = ?1 ORDER BY user")?;
    let mut q = stmt.query([row.header.id.as_i64()])?;
    while let Some(r) = q.next()? {
        group.push(users.get(r.text(0)?)?);
    }
    Ok(group)
}

fn read_outbox(conn: &Connection, users: &mut Users) -> Result<Vec<OutboxItem>> {
    let mut out = Vec::new();
    let mut stmt = conn.prepare_cached(SELECT_OUTBOX)?;
    let mut q = stmt.query([])?;
    while let Some(r) = q.next()? {
        out.push(rows::outbox_item(r, users)?);
    }
    Ok(out)
}

fn read_set_seqs(conn: &Connection, sql: &str, what: &str) -> Result<Vec<(u32, u64)>> {
    let mut out = Vec::new();
    let mut stmt = conn.prepare_cached(sql)?;
    let mut q = stmt.query([])?;
    while let Some(r) = q.next()? {
        out.push(rows::set_seq(r, what)?);
    }
    Ok(out)
}

fn read_totals(conn: &Connection) -> Result<Totals> {
    let totals = conn
        .query_row(SELECT_TOTALS, [], |r| Ok(Totals { deposits_fen: r.get(0)?, withdrawals_fen: r.get(1)? }))
        .optional()?
        .ok_or_else(|| corrupt("the totals row is missing"))?;
    if totals.deposits_fen < 0 || totals.withdrawals_fen < 0 {
        return Err(corrupt(format!("negative totals {totals:?}")));
    }
    Ok(totals)
}

/// Writes the whole batch in one transaction; the caller turns any error into `Io`.
/// Order matters: packets exist before their updates, audience and claims refer to them.
/// Writes one batch's rows inside `tx`; the caller commits.
fn write_batch(tx: &Transaction<'_>, b: &Batch) -> Result<()> {
    // Credits first: a balance in `wallets` already counts its user's credits here.
    write_wallet_rows(tx, &CREDITS, &b.credits)?;
    // In key order, here and for entries and claims: each insert then descends the B-tree
    // along the path the last one took, through pages already in the CPU's cache (the fold's
    // rows arrive in the order they were made, scattered over the whole table). Should a user
    // appear twice, the later balance is still written last: the rows of one statement are
    // written in the order they are listed.
    write_wallet_rows(tx, &WALLETS, &b.wallets)?;

    if !b.entries.is_empty() {
        // Ids in the order the entries were made, after the last one ever issued; written in
        // (user, id) order, the table's.
        let issued: i64 = tx
            .prepare_cached("SELECT value FROM meta WHERE key = 'last_entry_id'")?
            .query_row([], |r| r.get(0))
            .optional()?
            .ok_or_else(|| corrupt("meta has no last_entry_id"))?;
        let count = i64::try_from(b.entries.len()).map_err(|_| corrupt("too many entries"))?;
        let last = issued.checked_add(count).ok_or_else(|| corrupt("entry ids are exhausted"))?;
        // The n-th entry made gets id `issued + 1 + n`: a user's entries are written in the
        // order they were made.
        let order = in_name_order(&b.entries, |e| e.user.as_str());
        insert_rows(
            tx,
            &ENTRIES,
            &b.entries,
            &order,
            |e| e.user.as_str(),
            |st, first, at, e| {
                st.raw_bind_parameter(first, e.user.as_str())?;
                st.raw_bind_parameter(first + 1, issued + 1 + at as i64)?;
                st.raw_bind_parameter(first + 2, e.kind.as_str())?;
                st.raw_bind_parameter(first + 3, e.amount_fen)?;
                st.raw_bind_parameter(first + 4, e.packet_id.map(PacketId::as_i64))?;
                st.raw_bind_parameter(first + 5, e.at_ms)
            },
        )?;
        tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'last_entry_id'")?.execute([last])?;
    }

    if !b.new_packets.is_empty() {
        let mut st = tx.prepare_cached(concat!(
            "INSERT INTO packets (",
            packet_columns!(),
            ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'active', 0, 0, 0, NULL, NULL, ?11)"
        ))?;
        let mut member = tx.prepare_cached("INSERT INTO audience (packet_id, user) VALUES (?1, ?2)")?;
        for h in &b.new_packets {
            let anyone = matches!(h.audience, Audience::Anyone);
            st.execute(rusqlite::params![
                h.id.as_i64(),
                h.sender.as_str(),
                h.kind.as_str(),
                h.total_fen,
                h.count,
                anyone,
                h.greeting,
                h.created_at_ms,
                h.expires_at_ms,
                // Bit-cast: SQLite integers are signed.
                h.seed as i64,
                h.amount_rule.code(),
            ])?;
            if let Audience::Users(group) = &h.audience {
                for user in group.iter() {
                    member.execute((h.id.as_i64(), user.as_str()))?;
                }
            }
        }
    }

    if !b.packet_updates.is_empty() {
        let mut st = tx.prepare_cached(
            "UPDATE packets SET status = ?2, opened_count = ?3, opened_fen = ?4, refunded_fen = ?5, \
             best_user = ?6, best_fen = ?7 WHERE id = ?1",
        )?;
        for u in &b.packet_updates {
            let (best_user, best_fen) = match &u.best {
                Some((user, fen)) => (Some(user.as_str()), Some(*fen)),
                None => (None, None),
            };
            let changed = st.execute((
                u.id.as_i64(),
                u.status.as_str(),
                u.opened_count,
                u.opened_fen,
                u.refunded_fen,
                best_user,
                best_fen,
            ))?;
            if changed != 1 {
                return Err(StoreError::Io(format!("update of packet {} that does not exist", u.id)));
            }
            if u.status != PacketStatus::Exhausted && u.best.is_some() {
                return Err(StoreError::Io(format!(
                    "packet {} has a best luck before it is exhausted",
                    u.id
                )));
            }
        }
    }

    if !b.claims.is_empty() {
        // Packet by packet: the rows and the (packet, user) index pages of one packet together.
        // The keys are sorted apart from the rows, and each row is fetched ahead of its insert
        // (see `in_name_order`).
        let mut keys: Vec<(PacketId, u32, u32)> =
            b.claims.iter().zip(0u32..).map(|(c, at)| (c.packet_id, c.claim.index, at)).collect();
        keys.sort_unstable();
        let order: Vec<usize> = keys.into_iter().map(|(_, _, at)| at as usize).collect();
        insert_rows(
            tx,
            &CLAIMS,
            &b.claims,
            &order,
            |c| c.claim.user.as_str(),
            |st, first, _, c| {
                st.raw_bind_parameter(first, c.packet_id.as_i64())?;
                st.raw_bind_parameter(first + 1, c.claim.index)?;
                st.raw_bind_parameter(first + 2, c.claim.user.as_str())?;
                st.raw_bind_parameter(first + 3, c.claim.amount_fen)?;
                st.raw_bind_parameter(first + 4, c.claim.at_ms)
            },
        )?;
    }

    if !b.outbox_new.is_empty() {
        let mut st = tx.prepare_cached(
            "INSERT INTO outbox (target_set, seq, user, amount_fen, packet_id, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        // max(): the last seq issued only moves forward, whatever order the batch lists rows in.
        let mut last = tx.prepare_cached(
            "INSERT INTO outbox_seq (target_set, last_seq) VALUES (?1, ?2) \
             ON CONFLICT (target_set) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
        )?;
        // One upsert per target, not per row: (target, highest seq in the batch).
        let mut issued: Vec<(u32, u64)> = Vec::new();
        for o in &b.outbox_new {
            let seq = to_i64(o.seq, "outbox seq")?;
            st.execute((o.target_set, seq, o.user.as_str(), o.amount_fen, o.packet_id.as_i64(), o.at_ms))?;
            match issued.iter_mut().find(|(t, _)| *t == o.target_set) {
                Some((_, s)) => *s = (*s).max(o.seq),
                None => issued.push((o.target_set, o.seq)),
            }
        }
        for (target, seq) in issued {
            last.execute((target, to_i64(seq, "outbox seq")?))?;
        }
    }

    if !b.outbox_acked.is_empty() {
        let mut st = tx.prepare_cached("DELETE FROM outbox WHERE target_set = ?1 AND seq <= ?2")?;
        for (target, upto) in &b.outbox_acked {
            st.execute((target, to_i64(*upto, "acknowledged seq")?))?;
        }
    }

    if !b.watermarks.is_empty() {
        let mut st = tx.prepare_cached(
            "INSERT INTO watermarks (source_set, seq) VALUES (?1, ?2) \
             ON CONFLICT (source_set) DO UPDATE SET seq = excluded.seq",
        )?;
        for (source, seq) in &b.watermarks {
            st.execute((source, to_i64(*seq, "watermark")?))?;
        }
    }

    if !b.idempotency.is_empty() {
        // An upsert, not a plain insert: the engine may forget a record at the end of its
        // retention window before `load` prunes it here, and a reused request id must then
        // replace the old record rather than fail every commit of the set.
        let mut st = tx.prepare_cached(
            "INSERT INTO idempotency (user, request_id, fingerprint, op, result, at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
             ON CONFLICT (user, request_id) DO UPDATE SET fingerprint = excluded.fingerprint, \
             op = excluded.op, result = excluded.result, at_ms = excluded.at_ms",
        )?;
        for rec in &b.idempotency {
            let (op, result) = rows::idem_encode(rec.result);
            // Bit-cast: SQLite integers are signed.
            let fingerprint = rec.fingerprint as i64;
            st.execute((rec.user.as_str(), rec.request_id.as_str(), fingerprint, op, result, rec.at_ms))?;
        }
    }

    if let Some(t) = b.totals {
        let mut st =
            tx.prepare_cached("UPDATE totals SET deposits_fen = ?1, withdrawals_fen = ?2 WHERE id = 0")?;
        st.execute((t.deposits_fen, t.withdrawals_fen))?;
    }
    Ok(())
}

/// Rows one `INSERT` writes (in a fold, or a commit with as many of a kind). SQLite starts a
/// statement's program, opens a cursor on each B-tree it writes and closes them again at every
/// execution: for one row that was about a quarter of a claim's insert. In a test of a fold's
/// inserts (1,200,000 claims in transactions of 40,000, in the fold's key order, into a file
/// like a set's), 256 rows a statement against one cost a claim's row 0.69 µs against 0.95, its
/// entry 0.75 against 0.83 and its wallet 0.52 against 0.60 (BENCHMARKS.md, thirty-third
/// session). 256 rows of six values are far below SQLite's limit of 32,766 parameters.
const ROWS_PER_INSERT: usize = 256;

/// One kind of row the fold inserts: its statement for one row and for [`ROWS_PER_INSERT`].
///
/// `OR ROLLBACK`: a row that breaks a constraint ends the whole transaction at once, which is
/// what a commit and a fold do with any error anyway. With the default (`ABORT`) SQLite must be
/// able to undo the one statement, and keeps a copy of every page it changes first (a statement
/// journal). Without it, in the same test: a claim 0.63 µs against 0.69, an entry 0.71 against
/// 0.75, a wallet 0.50 against 0.52.
struct Insert {
    /// `INSERT INTO t (columns) VALUES`, before the rows.
    head: &'static str,
    /// One row's placeholders, `(?, ?)`.
    row: &'static str,
    /// After the rows: an upsert's `ON CONFLICT` clause, or nothing.
    tail: &'static str,
    one: OnceLock<String>,
    run: OnceLock<String>,
}

impl Insert {
    const fn new(head: &'static str, row: &'static str, tail: &'static str) -> Insert {
        Insert { head, row, tail, one: OnceLock::new(), run: OnceLock::new() }
    }

    /// The statement for one row, or for [`ROWS_PER_INSERT`].
    fn sql(&self, rows: usize) -> &str {
        debug_assert!(rows == 1 || rows == ROWS_PER_INSERT);
        let cell = if rows == 1 { &self.one } else { &self.run };
        cell.get_or_init(|| format!("{} {}{}", self.head, vec![self.row; rows].join(", "), self.tail))
    }

    /// Values a row binds.
    fn values(&self) -> usize {
        self.row.matches('?').count()
    }
}

static WALLETS: Insert = Insert::new(
    "INSERT OR ROLLBACK INTO wallets (user, balance_fen) VALUES",
    "(?, ?)",
    " ON CONFLICT (user) DO UPDATE SET balance_fen = excluded.balance_fen",
);
/// A credit to a wallet the set does not hold: added to the stored balance, or the wallet made
/// with it. The sum cannot overflow: balances are never negative, and the set keeps their
/// total in checked arithmetic.
static CREDITS: Insert = Insert::new(
    "INSERT OR ROLLBACK INTO wallets (user, balance_fen) VALUES",
    "(?, ?)",
    " ON CONFLICT (user) DO UPDATE SET balance_fen = balance_fen + excluded.balance_fen",
);
static ENTRIES: Insert = Insert::new(
    "INSERT OR ROLLBACK INTO entries (user, id, kind, amount_fen, packet_id, at_ms) VALUES",
    "(?, ?, ?, ?, ?, ?)",
    "",
);
static CLAIMS: Insert = Insert::new(
    "INSERT OR ROLLBACK INTO claims (packet_id, idx, user, amount_fen, at_ms) VALUES",
    "(?, ?, ?, ?, ?)",
    "",
);

/// Writes (user, fen) rows by `kind` (balances or credits), in the users' order.
fn write_wallet_rows(tx: &Transaction<'_>, kind: &Insert, rows: &[(UserId, i64)]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let order = in_name_order(rows, |w| w.0.as_str());
    insert_rows(
        tx,
        kind,
        rows,
        &order,
        |w| w.0.as_str(),
        |st, first, _, (user, fen)| {
            st.raw_bind_parameter(first, user.as_str())?;
            st.raw_bind_parameter(first + 1, fen)
        },
    )
}

/// Inserts `rows` in `order` (their places), [`ROWS_PER_INSERT`] a statement and the rest one
/// by one (a statement for each length left over would crowd the statement cache), each row
/// fetched ahead of its insert by `name` (see [`ahead`]). `bind(statement, first, at, row)`
/// binds the values of `row`, at place `at` of `rows`, from parameter `first` on.
fn insert_rows<T>(
    tx: &Transaction<'_>,
    kind: &Insert,
    rows: &[T],
    order: &[usize],
    name: impl Fn(&T) -> &str,
    mut bind: impl FnMut(&mut Statement<'_>, usize, usize, &T) -> rusqlite::Result<()>,
) -> Result<()> {
    let mut one = |st: &mut Statement<'_>, first: usize, i: usize| {
        ahead(rows, order, i, &name);
        let at = order[i];
        bind(st, first, at, &rows[at])
    };
    let count = order.len();
    let whole = count - count % ROWS_PER_INSERT;
    if whole > 0 {
        let mut st = tx.prepare_cached(kind.sql(ROWS_PER_INSERT))?;
        let values = kind.values();
        for start in (0..whole).step_by(ROWS_PER_INSERT) {
            for k in 0..ROWS_PER_INSERT {
                one(&mut st, k * values + 1, start + k)?;
            }
            st.raw_execute()?;
        }
    }
    if whole < count {
        let mut st = tx.prepare_cached(kind.sql(1))?;
        for i in whole..count {
            one(&mut st, 1, i)?;
            st.raw_execute()?;
        }
    }
    Ok(())
}

/// The places of `rows` in the order of their names (SQLite's BINARY collation, the tables'
/// key order), a name's rows in the order they came. The sort compares the names' first 16 bytes
/// as numbers taken in one pass over the rows, and reads two names only when those are equal:
/// a fold's rows are hundreds of thousands, each name behind its own pointer, and comparing
/// through the pointers and then reading the rows in the sorted order missed the CPU's cache at
/// nearly every step (a sixth of the fold's samples in the HTTP festival: BENCHMARKS.md,
/// thirtieth session).
fn in_name_order<T>(rows: &[T], name: impl Fn(&T) -> &str) -> Vec<usize> {
    let mut keys: Vec<(u128, usize)> =
        rows.iter().enumerate().map(|(at, r)| (name_key(name(r)), at)).collect();
    keys.sort_unstable_by(|&(kx, x), &(ky, y)| {
        kx.cmp(&ky).then_with(|| name(&rows[x]).cmp(name(&rows[y]))).then(x.cmp(&y))
    });
    keys.into_iter().map(|(_, at)| at).collect()
}

/// A name's first 16 bytes, zero-padded, as a number: two names' numbers are in the order of
/// the names, or equal. A user id holds no zero byte, so a name that is another's beginning
/// comes first either way.
fn name_key(name: &str) -> u128 {
    let mut head = [0u8; 16];
    let n = name.len().min(16);
    head[..n].copy_from_slice(&name.as_bytes()[..n]);
    u128::from_be_bytes(head)
}

/// How many rows ahead of its insert a row, and then its name, is fetched.
const AHEAD: usize = 8;

/// Asks for the row `AHEAD` places after place `i` of `order`, and the name of the one half as
/// far ahead (its row arrived meanwhile), so that neither is a cache miss when its insert comes.
fn ahead<T>(rows: &[T], order: &[usize], i: usize, name: impl Fn(&T) -> &str) {
    if let Some(&at) = order.get(i + AHEAD) {
        hint::prefetch(&rows[at]);
    }
    if let Some(&at) = order.get(i + AHEAD / 2) {
        hint::prefetch(name(&rows[at]));
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The fold writes rows in the order of their names, byte by byte as SQLite's BINARY
        /// collation orders them, and a name's rows in the order they came (a wallet's later
        /// balance last, a user's entries by id), however long the names are and however much
        /// of their beginnings they share around the 16 bytes the sort compares as numbers.
        #[test]
        fn rows_are_written_in_name_order(
            names in prop::collection::vec(
                prop_oneof!["[a-c]{1,4}", "aaaaaaaaaaaaaa[ab]{0,4}", "aaaaaaaaaaaaaaaa[ab.]{0,3}"],
                0..80,
            )
        ) {
            let order = in_name_order(&names, |n| n.as_str());
            let mut expected: Vec<usize> = (0..names.len()).collect();
            expected.sort_by(|&x, &y| names[x].as_bytes().cmp(names[y].as_bytes()));
            prop_assert_eq!(order, expected);
        }
    }

    /// Every row `sql` returns, each as `row` reads it.
    fn all<T>(
        conn: &Connection,
        sql: &str,
        row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Vec<T> {
        conn.prepare(sql).unwrap().query_map([], row).unwrap().collect::<rusqlite::Result<_>>().unwrap()
    }

    /// A fold of more rows than one statement takes writes all of them, the wallets' later
    /// balances last (within one statement too), and the store still refuses a second claim
    /// of a packet by one user when both are in one statement.
    #[test]
    fn rows_past_one_statements_worth_are_written_in_order() {
        use crate::{ClaimRow, Entry, EntryKind};
        use hongbao_core::{Claim, PacketIdGen};

        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn, std::path::Path::new("mem"), 0, 1).unwrap();
        let n = 2 * ROWS_PER_INSERT + 5;
        let user = |i: usize| UserId::parse(&format!("u{i:04}")).unwrap();
        let mut ids = PacketIdGen::new(0, None);
        let (p1, p2) = (ids.next(1_000), ids.next(1_000));
        let claim = |i: usize| {
            let (packet_id, index) = if i < 300 { (p1, i) } else { (p2, i - 300) };
            ClaimRow {
                packet_id,
                claim: Claim { user: user(i), amount_fen: 1, at_ms: 5, index: index as u32 },
            }
        };
        let mut batch = Batch {
            wallets: (0..n).map(|i| (user(i), i as i64)).collect(),
            entries: (0..n)
                .map(|i| Entry {
                    user: user(i % 50),
                    kind: EntryKind::Claim,
                    amount_fen: i as i64 + 1,
                    packet_id: Some(p1),
                    at_ms: 5,
                })
                .collect(),
            claims: (0..n).rev().map(claim).collect(),
            ..Batch::default()
        };
        // u0000's rows sort first, side by side in the first statement; u0516's fall in the rest.
        batch.wallets.push((user(0), 7_777));
        batch.wallets.push((user(n - 1), 8_888));
        {
            let tx = conn.transaction().unwrap();
            write_batch(&tx, &batch).unwrap();
            tx.commit().unwrap();
        }

        let wallets: Vec<(String, i64)> =
            all(&conn, "SELECT user, balance_fen FROM wallets ORDER BY user", |r| Ok((r.get(0)?, r.get(1)?)));
        let mut want: Vec<(String, i64)> = (0..n).map(|i| (format!("u{i:04}"), i as i64)).collect();
        want[0].1 = 7_777;
        want[n - 1].1 = 8_888;
        assert_eq!(wallets, want);

        let entries: Vec<(i64, String, i64)> =
            all(&conn, "SELECT id, user, amount_fen FROM entries ORDER BY id", |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            });
        let want: Vec<(i64, String, i64)> =
            (0..n).map(|i| (i as i64 + 1, format!("u{:04}", i % 50), i as i64 + 1)).collect();
        assert_eq!(entries, want);

        let claims: Vec<(i64, u32, String)> =
            all(&conn, "SELECT packet_id, idx, user FROM claims ORDER BY packet_id, idx", |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            });
        let want: Vec<(i64, u32, String)> = (0..n)
            .map(claim)
            .map(|c| (c.packet_id.as_i64(), c.claim.index, c.claim.user.as_str().to_owned()))
            .collect();
        assert_eq!(claims, want);

        // A second claim of p1 by u0001, in the first statement: the whole batch is refused.
        let mut again = Batch {
            claims: (0..ROWS_PER_INSERT)
                .map(|i| ClaimRow {
                    packet_id: p1,
                    claim: Claim { user: user(10_000 + i), amount_fen: 1, at_ms: 6, index: 1_000 + i as u32 },
                })
                .collect(),
            ..Batch::default()
        };
        again.claims[7].claim.user = user(1);
        let tx = conn.transaction().unwrap();
        assert!(write_batch(&tx, &again).is_err(), "a second claim of one packet by one user was stored");
        drop(tx);
        let count: i64 = conn.query_row("SELECT COUNT(*) FROM claims", [], |r| r.get(0)).unwrap();
        assert_eq!(count, n as i64, "the refused batch left rows behind");
    }

    /// A restart with millions of active packets must stream, not sort: the load queries
    /// must come straight off an index in packet order.
    #[test]
    fn load_queries_read_in_index_order_without_sorting() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn, std::path::Path::new("mem"), 0, 1).unwrap();
        for sql in [SELECT_ACTIVE_PACKETS, SELECT_ACTIVE_AUDIENCE, SELECT_ACTIVE_CLAIMS, SELECT_OUTBOX] {
            let mut plan = String::new();
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let mut q = stmt.query([]).unwrap();
            while let Some(r) = q.next().unwrap() {
                plan.push_str(&r.get::<_, String>(3).unwrap());
                plan.push('\n');
            }
            assert!(!plan.contains("TEMP B-TREE"), "{sql}\nsorts:\n{plan}");
            assert!(!plan.contains("SCAN a") && !plan.contains("SCAN c"), "{sql}\nscans every row:\n{plan}");
        }
    }
}
