//! The write side: one connection, owned by the set's engine thread, that commits batches in
//! bulk and reads the state back at start.
//!
//! A failed commit leaves nothing: the transaction is rolled back before `commit` returns (or
//! dies with the connection). A lost connection is made again at the start of the next call,
//! which after a failed commit is the engine's `load`, so the set comes back by itself once the
//! server does.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

use hongbao_core::{Audience, Claim, Millis, Packet, PacketId, PacketStatus, UserId};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Config, GenericClient, IsolationLevel, Transaction};

use super::partitions::Partitions;
use super::rows::{self, corrupt, get, to_i64, Columns, Users};
use super::{schema, PgConn, Role, Statements};
use crate::{Batch, Loaded, OutboxItem, PacketRow, Result, Store, StoreError, StoreSums, Totals};

/// The write side of one set's schema. See the module doc.
pub struct PgStore {
    /// Owned by the engine thread. `None` after a failed call (see [`PgStore::on_connection`]);
    /// the next call connects again.
    conn: Option<PgConn>,
    config: Config,
    set: u32,
    sets: u32,
    partitions: Partitions,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("set", &self.set).field("conn", &self.conn).finish()
    }
}

// Every statement takes its rows as arrays, one array per column, expanded by `unnest`.
//
// A batch is written by one statement, whatever it holds: a data-modifying CTE per kind of row
// (an empty array writes nothing), so a batch costs one round trip and, when it sends no
// packet, runs on its own as one implicit transaction. The CTEs share one snapshot and cannot
// see each other's rows, which is why new packets (which their own claims and updates may
// follow in the same batch) are inserted first, by statements of their own in a transaction
// around this one. Nothing else in a batch depends on another CTE's rows: an acknowledgement
// only ever covers outbox rows of earlier batches. An update of a packet that does not exist
// must fail the whole batch before anything commits, so the statement checks it itself: the
// cast of the message to an integer raises, and the error carries the message.
const WRITE_BATCH: &str = "WITH \
 w AS (INSERT INTO wallets (user_id, balance_fen) \
     SELECT * FROM unnest($1::text[], $2::int8[]) \
     ON CONFLICT (user_id) DO UPDATE SET balance_fen = excluded.balance_fen), \
 cr AS (INSERT INTO wallets (user_id, balance_fen) \
     SELECT * FROM unnest($41::text[], $42::int8[]) \
     ON CONFLICT (user_id) DO UPDATE SET balance_fen = wallets.balance_fen + excluded.balance_fen), \
 e AS (INSERT INTO entries (id, user_id, kind, amount_fen, packet_id, at_ms) \
     SELECT nextval('entries_id_seq'), e.u, e.k, e.a, e.p, e.t \
     FROM unnest($3::text[], $4::text[], $5::int8[], $6::int8[], $7::int8[]) \
         WITH ORDINALITY AS e(u, k, a, p, t, n) \
     ORDER BY e.n), \
 u AS (UPDATE packets AS p SET status = u.st, opened_count = u.oc, \
         opened_fen = u.ofen, refunded_fen = u.rfen, best_user = u.bu, best_fen = u.bf \
     FROM unnest($8::int8[], $9::text[], $10::int8[], $11::int8[], $12::int8[], $13::text[], $14::int8[]) \
         AS u(id, st, oc, ofen, rfen, bu, bf) \
     WHERE p.id = u.id \
     RETURNING p.id), \
 c AS (INSERT INTO claims (packet_id, idx, user_id, amount_fen, at_ms) \
     SELECT * FROM unnest($15::int8[], $16::int8[], $17::text[], $18::int8[], $19::int8[])), \
 o AS (INSERT INTO outbox (target_set, seq, user_id, amount_fen, packet_id, at_ms) \
     SELECT * FROM unnest($20::int8[], $21::int8[], $22::text[], $23::int8[], $24::int8[], $25::int8[])), \
 os AS (INSERT INTO outbox_seq (target_set, last_seq) \
     SELECT * FROM unnest($26::int8[], $27::int8[]) \
     ON CONFLICT (target_set) DO UPDATE SET last_seq = GREATEST(outbox_seq.last_seq, excluded.last_seq)), \
 oa AS (DELETE FROM outbox AS o USING unnest($28::int8[], $29::int8[]) AS a(t, s) \
     WHERE o.target_set = a.t AND o.seq <= a.s), \
 wm AS (INSERT INTO watermarks (source_set, seq) \
     SELECT * FROM unnest($30::int8[], $31::int8[]) \
     ON CONFLICT (source_set) DO UPDATE SET seq = excluded.seq), \
 i AS (INSERT INTO idempotency (user_id, request_id, fingerprint, op, result, at_ms) \
     SELECT * FROM unnest($32::text[], $33::text[], $34::int8[], $35::text[], $36::int8[], $37::int8[]) \
     ON CONFLICT (user_id, request_id) DO UPDATE SET fingerprint = excluded.fingerprint, \
         op = excluded.op, result = excluded.result, at_ms = excluded.at_ms), \
 t AS (UPDATE totals SET deposits_fen = $38, withdrawals_fen = $39 WHERE id = 0 AND $40::bool) \
 SELECT CASE WHEN (SELECT count(*) FROM u) = cardinality($8::int8[]) THEN 0 \
     ELSE ('update of packet ' || (SELECT min(x) FROM unnest($8::int8[]) AS x WHERE x NOT IN (SELECT id FROM u)) \
         || ' that does not exist')::int END";

const INSERT_PACKETS: &str = "INSERT INTO packets (id, sender, kind, total_fen, count, audience_anyone, \
         greeting, created_at_ms, expires_at_ms, seed, status, opened_count, opened_fen, refunded_fen, \
         amount_rule) \
     SELECT p.i, p.s, p.k, p.t, p.c, p.a, p.g, p.cr, p.ex, p.sd, 'active', 0, 0, 0, p.r \
     FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::bool[], $7::text[], \
         $8::int8[], $9::int8[], $10::int8[], $11::int2[]) AS p(i, s, k, t, c, a, g, cr, ex, sd, r)";

const INSERT_AUDIENCE: &str =
    "INSERT INTO audience (packet_id, user_id) SELECT * FROM unnest($1::int8[], $2::text[])";

const PRUNE_IDEMPOTENCY: &str = "DELETE FROM idempotency WHERE at_ms < $1";
const SELECT_WALLETS: &str = "SELECT user_id, balance_fen FROM wallets";
const SELECT_MAX_PACKET: &str = "SELECT max(id) FROM packets";
const SELECT_ACTIVE_PACKETS: &str =
    concat!("SELECT ", pg_packet_columns!(), " FROM packets WHERE status = 'active' ORDER BY id");
// By id list rather than a join: each list entry is one index probe in the one partition the
// id names, never a scan of every claim ever written.
const SELECT_AUDIENCES: &str =
    "SELECT packet_id, user_id FROM audience WHERE packet_id = ANY($1) ORDER BY packet_id, user_id";
const SELECT_CLAIMS_OF: &str = "SELECT packet_id, idx, user_id, amount_fen, at_ms FROM claims \
     WHERE packet_id = ANY($1) ORDER BY packet_id, idx";
// sum(bigint) is numeric in PostgreSQL; the casts bring it back (and fail loudly on overflow).
const SELECT_ACTIVE_ESCROW: &str = "SELECT COALESCE(sum(total_fen - opened_fen - refunded_fen), 0)::int8 \
     FROM packets WHERE status = 'active'";
const SELECT_IDEMPOTENCY: &str =
    "SELECT user_id, request_id, fingerprint, op, result, at_ms FROM idempotency WHERE at_ms >= $1";
const SELECT_OUTBOX: &str =
    "SELECT target_set, seq, user_id, amount_fen, packet_id, at_ms FROM outbox ORDER BY target_set, seq";
const SELECT_OUTBOX_SEQ: &str = "SELECT target_set, last_seq FROM outbox_seq ORDER BY target_set";
const SELECT_WATERMARKS: &str = "SELECT source_set, seq FROM watermarks ORDER BY source_set";
const SELECT_TOTALS: &str = "SELECT deposits_fen, withdrawals_fen FROM totals WHERE id = 0";
const SELECT_BALANCES_SUM: &str = "SELECT COALESCE(sum(balance_fen), 0)::int8 FROM wallets";
const SELECT_ESCROW_SUM: &str =
    "SELECT COALESCE(sum(total_fen - opened_fen - refunded_fen), 0)::int8 FROM packets";
const SELECT_PACKET: &str = concat!("SELECT ", pg_packet_columns!(), " FROM packets WHERE id = $1");
const SELECT_AUDIENCE: &str = "SELECT user_id FROM audience WHERE packet_id = $1 ORDER BY user_id";
const SELECT_CLAIMS: &str =
    "SELECT idx, user_id, amount_fen, at_ms FROM claims WHERE packet_id = $1 ORDER BY idx";

impl PgStore {
    /// Connects, migrates and makes the partitions around today. Runs on a plain thread.
    pub(super) fn open(config: Config, set: u32, sets: u32) -> Result<PgStore> {
        let (conn, partitions) = connect(&config, set, sets)?;
        Ok(PgStore { conn: Some(conn), config, set, sets, partitions })
    }

    /// Makes sure there is a live connection, making a new one when the last was lost, and
    /// checks the schema on it again: after a failover the server is another one.
    fn connected(&mut self) -> Result<(&mut PgConn, &mut Partitions)> {
        if self.conn.as_ref().is_none_or(PgConn::is_closed) {
            self.conn = None;
            let (conn, partitions) = connect(&self.config, self.set, self.sets)?;
            tracing::warn!(set = self.set, "store connection made again");
            self.conn = Some(conn);
            self.partitions = partitions;
        }
        Ok((self.conn.as_mut().expect("connected above"), &mut self.partitions))
    }

    /// Runs one call on a live connection. A failed call drops the connection, so the next one
    /// connects again: the client learns that the server reset a connection only from the I/O
    /// that hits it, and a connection a killed server left behind could still look open after
    /// a failed call. Once, in a clean-clone CI run, `load` after a restart then failed with
    /// "Connection reset by peer" on that connection (test
    /// `a_lost_connection_fails_the_commit_and_load_connects_again`). A call fails rarely (the
    /// set then reloads from the store), so connecting again costs nothing that matters.
    fn on_connection<T>(
        &mut self,
        call: impl FnOnce(&mut PgConn, &mut Partitions) -> Result<T>,
    ) -> Result<T> {
        let done = self.connected().and_then(|(conn, partitions)| call(conn, partitions));
        if done.is_err() {
            self.conn = None;
        }
        done
    }
}

/// First key of the advisory lock a set's writer session holds for as long as it is connected
/// ("Hbwr"); the second is the set.
const WRITER_LOCK_CLASS: i32 = 0x4862_7772;

/// How long a new writer session waits for the set's last one to end before it gives up.
/// A writer killed on this host ends its session within milliseconds (its server process
/// finishes the statement it was given, then finds the socket closed); one on a host that
/// died is found out by TCP keepalives, set short on every writer session (`PgConn::connect`).
const WRITER_LOCK_WAIT: Duration = Duration::from_secs(60);

fn connect(config: &Config, set: u32, sets: u32) -> Result<(PgConn, Partitions)> {
    let mut conn = PgConn::connect(config, set, Role::Writer)?;
    take_writer_lock(conn.client(), set)?;
    schema::migrate(&mut conn, set, sets)?;
    let mut partitions = Partitions::discover(conn.client())?;
    partitions.make_window(conn.client())?;
    Ok((conn, partitions))
}

/// Takes the set's writer lock for this session, waiting up to [`WRITER_LOCK_WAIT`] for the
/// session that holds it to end.
///
/// A writer that dies (`kill -9`, a lost connection) can leave its last COMMIT running in its
/// server process: the server received it and finishes it whatever became of the client. A new
/// writer that loaded the set meanwhile would miss what that COMMIT then writes, and its memory
/// and the store would part: claims in the store the set never made, credits in its outbox it
/// never relays, their seqs issued again. A session's advisory lock is let go only when its
/// server process ends, after its last transaction has ended one way or the other; so once this
/// session holds it, everything any earlier writer of the set will ever commit is committed.
/// It also keeps two live processes from writing one set.
fn take_writer_lock(client: &mut postgres::Client, set: u32) -> Result<()> {
    let started = Instant::now();
    let mut waited = false;
    loop {
        if super::try_set_lock(client, WRITER_LOCK_CLASS, set)? {
            if waited {
                tracing::warn!(
                    set,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "set's last writer session ended; writing"
                );
            }
            return Ok(());
        }
        // Who holds it is asked only to be told: once in the log, once in the error.
        if started.elapsed() >= WRITER_LOCK_WAIT {
            let holder = writer_lock_holder(client, set)?;
            return Err(StoreError::Io(format!(
                "set {set} is still written by another session after {WRITER_LOCK_WAIT:?} ({holder}): \
                 another hongbao writes this database, or a dead one's session lingers \
                 (pg_terminate_backend ends it)"
            )));
        }
        if !waited {
            let holder = writer_lock_holder(client, set)?;
            tracing::warn!(set, holder = %holder, "waiting for the set's last writer session to end");
            waited = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Who holds `set`'s writer lock, for the log and the error: its server process, client, state.
fn writer_lock_holder(client: &mut postgres::Client, set: u32) -> Result<String> {
    let rows = client.query(
        "SELECT a.pid, COALESCE(a.client_addr::text, 'local'), COALESCE(a.application_name, ''), \
         COALESCE(a.state, ''), COALESCE(to_char(a.state_change, 'YYYY-MM-DD HH24:MI:SS'), '') \
         FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.classid::int8 = $1 AND l.objid::int8 = $2 \
         AND l.objsubid = 2",
        &[&i64::from(WRITER_LOCK_CLASS), &i64::from(set)],
    )?;
    Ok(match rows.first() {
        Some(r) => format!(
            "server process {} for {} ({}), {} since {}",
            r.get::<_, i32>(0),
            r.get::<_, String>(1),
            r.get::<_, String>(2),
            r.get::<_, String>(3),
            r.get::<_, String>(4)
        ),
        None => "gone meanwhile".to_string(),
    })
}

/// A transaction that reads one snapshot: every figure of a `load` or an audit agrees.
fn snapshot(client: &mut postgres::Client) -> Result<Transaction<'_>> {
    Ok(client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).start()?)
}

impl Store for PgStore {
    fn load(&mut self, idempotency_since_ms: Millis) -> Result<Loaded> {
        let set = self.set;
        self.on_connection(|conn, _| {
            let (client, st) = conn.split();
            let mut tx = snapshot(client)?;
            let prune = st.get(&mut tx, PRUNE_IDEMPOTENCY)?;
            tx.execute(&prune, &[&idempotency_since_ms])?;
            let loaded = load_in(&mut tx, st, set, idempotency_since_ms, &mut Users::interning())?;
            tx.commit()?;
            Ok(loaded)
        })
    }

    fn commit(&mut self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let set = self.set;
        let written = self.on_connection(|conn, partitions| {
            partitions.ensure(conn.client(), set)?;
            write_batch(conn, batch)
        });
        // Any failure dropped the transaction, which rolled it back (or the connection went
        // with it): nothing of the batch stays.
        written.map_err(|e| crate::commit_failed(set, e))
    }

    /// Read on the set's own connection, where every batch it wrote is committed.
    fn balance(&mut self, user: &UserId) -> Result<Option<i64>> {
        self.on_connection(|conn, _| {
            let (client, st) = conn.split();
            super::read::balance_in(client, st, user)
        })
    }

    fn packet(&mut self, id: PacketId) -> Result<Option<Packet>> {
        self.on_connection(|conn, _| {
            let (client, st) = conn.split();
            let mut tx = snapshot(client)?;
            let mut users = Users::parsing();
            let Some(row) = read_packet_row(&mut tx, st, id, &mut users)? else {
                return Ok(None);
            };
            let mut claims = Vec::new();
            let select = st.get(&mut tx, SELECT_CLAIMS)?;
            for r in tx.query(&select, &[&id.as_i64()])? {
                claims.push(rows::claim(&r, 0, &mut users)?);
            }
            tx.commit()?;
            rows::check_claims(&row, &claims)?;
            Ok(Some(Packet::restore(row.header, row.status, row.refunded_fen, claims)))
        })
    }

    fn sums(&mut self) -> Result<StoreSums> {
        self.on_connection(|conn, _| {
            let (client, st) = conn.split();
            let mut tx = snapshot(client)?;
            let balances_fen = get(&one_row(&mut tx, st, SELECT_BALANCES_SUM)?, 0)?;
            // Over every packet, not just active ones: a closed packet still holding escrow is
            // exactly what an audit is for.
            let escrow_fen = get(&one_row(&mut tx, st, SELECT_ESCROW_SUM)?, 0)?;
            let mut users = Users::parsing();
            let sums = StoreSums {
                balances_fen,
                escrow_fen,
                totals: read_totals(&mut tx, st)?,
                outbox_pending: read_outbox(&mut tx, st, &mut users)?,
                watermarks: read_set_seqs(&mut tx, st, SELECT_WATERMARKS, "watermark")?,
            };
            tx.commit()?;
            Ok(sums)
        })
    }
}

fn no_params() -> [&'static (dyn ToSql + Sync); 0] {
    []
}

fn one_row(c: &mut impl GenericClient, st: &mut Statements, sql: &'static str) -> Result<postgres::Row> {
    let s = st.get(c, sql)?;
    Ok(c.query_one(&s, &[])?)
}

fn load_in(
    tx: &mut Transaction<'_>,
    st: &mut Statements,
    set: u32,
    since_ms: Millis,
    users: &mut Users,
) -> Result<Loaded> {
    let mut wallets = Vec::new();
    {
        let s = st.get(tx, SELECT_WALLETS)?;
        let mut it = tx.query_raw(&s, no_params())?;
        while let Some(r) = it.next()? {
            // One row per user: parsed, not interned.
            let user = crate::users::parse_user(get(&r, 0)?)?;
            let fen = rows::balance(get(&r, 1)?, &user)?;
            wallets.push((user, fen));
        }
    }

    let max_packet_id: Option<i64> = get(&one_row(tx, st, SELECT_MAX_PACKET)?, 0)?;
    let max_packet_id = max_packet_id.map(rows::packet_id).transpose()?;
    if let Some(id) = max_packet_id {
        if id.set() != set {
            return Err(corrupt(format!("set {set} holds packet {id} of set {}", id.set())));
        }
    }

    let active_packets = load_active_packets(tx, st, set, users)?;
    // Only active packets hold escrow; summing just them keeps start-up independent of how
    // many packets were ever sent. `sums` checks every packet for the audit.
    let escrow_fen = get(&one_row(tx, st, SELECT_ACTIVE_ESCROW)?, 0)?;

    let mut idempotency = Vec::new();
    {
        let s = st.get(tx, SELECT_IDEMPOTENCY)?;
        let mut it = tx.query_raw(&s, [&since_ms])?;
        while let Some(r) = it.next()? {
            idempotency.push(rows::idem_record(&r, users)?);
        }
    }

    Ok(Loaded {
        wallets,
        active_packets,
        max_packet_id,
        idempotency,
        outbox_pending: read_outbox(tx, st, users)?,
        outbox_last_seq: read_set_seqs(tx, st, SELECT_OUTBOX_SEQ, "outbox seq")?,
        watermarks: read_set_seqs(tx, st, SELECT_WATERMARKS, "watermark")?,
        totals: read_totals(tx, st)?,
        escrow_fen,
    })
}

/// Three streaming queries in packet order (packets, audience rows, claims), joined in one
/// pass: a restart with a million active packets and ten million claims stays a few scans.
#[expect(clippy::vec_box, reason = "the set keeps packets boxed; see `Loaded::active_packets`")]
fn load_active_packets(
    tx: &mut Transaction<'_>,
    st: &mut Statements,
    set: u32,
    users: &mut Users,
) -> Result<Vec<Box<Packet>>> {
    let mut packets: Vec<PacketRow> = Vec::new();
    {
        let s = st.get(tx, SELECT_ACTIVE_PACKETS)?;
        let mut it = tx.query_raw(&s, no_params())?;
        while let Some(r) = it.next()? {
            packets.push(rows::of_set(rows::packet_row(&r, users)?, set)?);
        }
    }
    let ids: Vec<PacketId> = packets.iter().map(|p| p.header.id).collect();
    let raw_ids: Vec<i64> = ids.iter().map(|id| id.as_i64()).collect();

    let mut groups: Vec<Vec<UserId>> = vec![Vec::new(); packets.len()];
    {
        let s = st.get(tx, SELECT_AUDIENCES)?;
        let mut it = tx.query_raw(&s, [&raw_ids])?;
        let mut cursor = 0;
        while let Some(r) = it.next()? {
            let slot = rows::advance(&ids, &mut cursor, rows::packet_id(get(&r, 0)?)?)?;
            groups[slot].push(users.get(r.text(1)?)?);
        }
    }

    let mut claims: Vec<Vec<Claim>> = vec![Vec::new(); packets.len()];
    {
        let s = st.get(tx, SELECT_CLAIMS_OF)?;
        let mut it = tx.query_raw(&s, [&raw_ids])?;
        let mut cursor = 0;
        while let Some(r) = it.next()? {
            let slot = rows::advance(&ids, &mut cursor, rows::packet_id(get(&r, 0)?)?)?;
            claims[slot].push(rows::claim(&r, 1, users)?);
        }
    }

    rows::restore(packets, groups, claims)
}

/// One packet row of any status, with its audience.
pub(super) fn read_packet_row(
    c: &mut impl GenericClient,
    st: &mut Statements,
    id: PacketId,
    users: &mut Users,
) -> Result<Option<PacketRow>> {
    let select = st.get(c, SELECT_PACKET)?;
    let Some(r) = c.query_opt(&select, &[&id.as_i64()])? else {
        return Ok(None);
    };
    let mut row = rows::packet_row(&r, users)?;
    let mut group = Vec::new();
    if row.header.audience != Audience::Anyone {
        let select = st.get(c, SELECT_AUDIENCE)?;
        for r in c.query(&select, &[&id.as_i64()])? {
            group.push(users.get(r.text(0)?)?);
        }
    }
    rows::set_audience(&mut row, group)?;
    Ok(Some(row))
}

fn read_outbox(
    c: &mut impl GenericClient,
    st: &mut Statements,
    users: &mut Users,
) -> Result<Vec<OutboxItem>> {
    let s = st.get(c, SELECT_OUTBOX)?;
    c.query(&s, &[])?.iter().map(|r| rows::outbox_item(r, users)).collect()
}

fn read_set_seqs(
    c: &mut impl GenericClient,
    st: &mut Statements,
    sql: &'static str,
    what: &str,
) -> Result<Vec<(u32, u64)>> {
    let s = st.get(c, sql)?;
    c.query(&s, &[])?.iter().map(|r| rows::set_seq(r, what)).collect()
}

fn read_totals(c: &mut impl GenericClient, st: &mut Statements) -> Result<Totals> {
    let s = st.get(c, SELECT_TOTALS)?;
    let r = c.query_opt(&s, &[])?.ok_or_else(|| corrupt("the totals row is missing"))?;
    let totals = Totals { deposits_fen: get(&r, 0)?, withdrawals_fen: get(&r, 1)? };
    if totals.deposits_fen < 0 || totals.withdrawals_fen < 0 {
        return Err(corrupt(format!("negative totals {totals:?}")));
    }
    Ok(totals)
}

/// The items of a list that has one key several times, keeping each key's last item (where an
/// upsert per row would have left it) at its first place. `ON CONFLICT DO UPDATE` refuses to
/// touch one row twice in a statement, so keys must be unique before the rows go in.
fn last_per_key<'a, T, K: Eq + Hash>(items: &'a [T], key: impl Fn(&'a T) -> K) -> Vec<&'a T> {
    let mut at: HashMap<K, usize> = HashMap::with_capacity(items.len());
    let mut out: Vec<&'a T> = Vec::with_capacity(items.len());
    for item in items {
        match at.entry(key(item)) {
            std::collections::hash_map::Entry::Occupied(e) => out[*e.get()] = item,
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(out.len());
                out.push(item);
            }
        }
    }
    out
}

/// A batch's credits as one sum per user, leaving out the users whose balance the batch
/// writes (`balanced`): that balance counts their credits, and the statement's CTEs must not
/// touch one wallet row twice (PostgreSQL would apply one of the two, unpredictably), nor one
/// upsert the same row twice (it refuses).
fn credits_per_user<'a>(credits: &'a [(UserId, i64)], balanced: &[&str]) -> Result<(Vec<&'a str>, Vec<i64>)> {
    if credits.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let balanced: std::collections::HashSet<&str> = balanced.iter().copied().collect();
    let mut at: HashMap<&str, usize> = HashMap::with_capacity(credits.len());
    let (mut users, mut fens): (Vec<&str>, Vec<i64>) = (Vec::new(), Vec::new());
    for (user, fen) in credits {
        let user = user.as_str();
        if balanced.contains(user) {
            continue;
        }
        match at.entry(user) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let sum = &mut fens[*e.get()];
                *sum = sum.checked_add(*fen).ok_or_else(|| corrupt(format!("credits to {user} overflow")))?;
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(users.len());
                users.push(user);
                fens.push(*fen);
            }
        }
    }
    Ok((users, fens))
}

/// Writes the whole batch atomically: new packets first (in a transaction around the rest,
/// when there are any), then everything else in one statement; the caller turns any error into
/// `Io`. Idempotency records are upserts, not plain inserts: the engine may forget a record at
/// the end of its retention window before `load` prunes it here, and a reused request id must
/// then replace the old record rather than fail every commit of the set.
fn write_batch(conn: &mut PgConn, b: &Batch) -> Result<()> {
    for u in &b.packet_updates {
        if u.status != PacketStatus::Exhausted && u.best.is_some() {
            return Err(StoreError::Io(format!("packet {} has a best luck before it is exhausted", u.id)));
        }
    }
    let (client, st) = conn.split();
    if b.new_packets.is_empty() {
        return write_rest(client, st, b);
    }
    let mut tx = client.transaction()?;
    let p = &b.new_packets;
    let ids: Vec<i64> = p.iter().map(|h| h.id.as_i64()).collect();
    let senders: Vec<&str> = p.iter().map(|h| h.sender.as_str()).collect();
    let kinds: Vec<&str> = p.iter().map(|h| h.kind.as_str()).collect();
    let totals: Vec<i64> = p.iter().map(|h| h.total_fen).collect();
    let counts: Vec<i64> = p.iter().map(|h| i64::from(h.count)).collect();
    let anyone: Vec<bool> = p.iter().map(|h| h.audience == Audience::Anyone).collect();
    let greetings: Vec<&str> = p.iter().map(|h| h.greeting.as_str()).collect();
    let created: Vec<i64> = p.iter().map(|h| h.created_at_ms).collect();
    let expires: Vec<i64> = p.iter().map(|h| h.expires_at_ms).collect();
    // Bit-cast: PostgreSQL integers are signed.
    let seeds: Vec<i64> = p.iter().map(|h| h.seed as i64).collect();
    let rules: Vec<i16> = p.iter().map(|h| h.amount_rule.code() as i16).collect();
    let s = st.get(&mut tx, INSERT_PACKETS)?;
    tx.execute(
        &s,
        &[&ids, &senders, &kinds, &totals, &counts, &anyone, &greetings, &created, &expires, &seeds, &rules],
    )?;
    let mut member_packets: Vec<i64> = Vec::new();
    let mut members: Vec<&str> = Vec::new();
    for h in p {
        if let Audience::Users(group) = &h.audience {
            for user in group.iter() {
                member_packets.push(h.id.as_i64());
                members.push(user.as_str());
            }
        }
    }
    if !members.is_empty() {
        let s = st.get(&mut tx, INSERT_AUDIENCE)?;
        tx.execute(&s, &[&member_packets, &members])?;
    }
    write_rest(&mut tx, st, b)?;
    tx.commit()?;
    Ok(())
}

/// Everything of a batch but its new packets, in one statement ([`WRITE_BATCH`]).
fn write_rest(c: &mut impl GenericClient, st: &mut Statements, b: &Batch) -> Result<()> {
    let wallets = last_per_key(&b.wallets, |(user, _)| user.as_str());
    let w_users: Vec<&str> = wallets.iter().map(|(u, _)| u.as_str()).collect();
    let w_fens: Vec<i64> = wallets.iter().map(|(_, fen)| *fen).collect();
    let (cr_users, cr_fens) = credits_per_user(&b.credits, &w_users)?;

    let e = &b.entries;
    let e_users: Vec<&str> = e.iter().map(|e| e.user.as_str()).collect();
    let e_kinds: Vec<&str> = e.iter().map(|e| e.kind.as_str()).collect();
    let e_amounts: Vec<i64> = e.iter().map(|e| e.amount_fen).collect();
    let e_packets: Vec<Option<i64>> = e.iter().map(|e| e.packet_id.map(PacketId::as_i64)).collect();
    let e_ats: Vec<i64> = e.iter().map(|e| e.at_ms).collect();

    let updates = last_per_key(&b.packet_updates, |u| u.id);
    let u_ids: Vec<i64> = updates.iter().map(|u| u.id.as_i64()).collect();
    let u_statuses: Vec<&str> = updates.iter().map(|u| u.status.as_str()).collect();
    let u_opened: Vec<i64> = updates.iter().map(|u| i64::from(u.opened_count)).collect();
    let u_opened_fen: Vec<i64> = updates.iter().map(|u| u.opened_fen).collect();
    let u_refunded: Vec<i64> = updates.iter().map(|u| u.refunded_fen).collect();
    let u_best_users: Vec<Option<&str>> =
        updates.iter().map(|u| u.best.as_ref().map(|(user, _)| user.as_str())).collect();
    let u_best_fens: Vec<Option<i64>> =
        updates.iter().map(|u| u.best.as_ref().map(|(_, fen)| *fen)).collect();

    let cl = &b.claims;
    let c_packets: Vec<i64> = cl.iter().map(|c| c.packet_id.as_i64()).collect();
    let c_indexes: Vec<i64> = cl.iter().map(|c| i64::from(c.claim.index)).collect();
    let c_users: Vec<&str> = cl.iter().map(|c| c.claim.user.as_str()).collect();
    let c_amounts: Vec<i64> = cl.iter().map(|c| c.claim.amount_fen).collect();
    let c_ats: Vec<i64> = cl.iter().map(|c| c.claim.at_ms).collect();

    let o = &b.outbox_new;
    let o_targets: Vec<i64> = o.iter().map(|o| i64::from(o.target_set)).collect();
    let o_seqs: Vec<i64> = o.iter().map(|o| to_i64(o.seq, "outbox seq")).collect::<Result<_>>()?;
    let o_users: Vec<&str> = o.iter().map(|o| o.user.as_str()).collect();
    let o_amounts: Vec<i64> = o.iter().map(|o| o.amount_fen).collect();
    let o_packets: Vec<i64> = o.iter().map(|o| o.packet_id.as_i64()).collect();
    let o_ats: Vec<i64> = o.iter().map(|o| o.at_ms).collect();
    let mut last: BTreeMap<i64, i64> = BTreeMap::new();
    for (target, seq) in o_targets.iter().zip(&o_seqs) {
        let l = last.entry(*target).or_insert(*seq);
        *l = (*l).max(*seq);
    }
    let (os_targets, os_seqs): (Vec<i64>, Vec<i64>) = last.into_iter().unzip();

    let a_targets: Vec<i64> = b.outbox_acked.iter().map(|(t, _)| i64::from(*t)).collect();
    let a_upto: Vec<i64> =
        b.outbox_acked.iter().map(|(_, seq)| to_i64(*seq, "acknowledged seq")).collect::<Result<_>>()?;

    let marks = last_per_key(&b.watermarks, |(source, _)| *source);
    let m_sources: Vec<i64> = marks.iter().map(|(s, _)| i64::from(*s)).collect();
    let m_seqs: Vec<i64> = marks.iter().map(|(_, seq)| to_i64(*seq, "watermark")).collect::<Result<_>>()?;

    let recs = last_per_key(&b.idempotency, |r| (r.user.as_str(), r.request_id.as_str()));
    let i_users: Vec<&str> = recs.iter().map(|r| r.user.as_str()).collect();
    let i_request_ids: Vec<&str> = recs.iter().map(|r| r.request_id.as_str()).collect();
    // Bit-cast: PostgreSQL integers are signed.
    let i_fingerprints: Vec<i64> = recs.iter().map(|r| r.fingerprint as i64).collect();
    let (i_ops, i_results): (Vec<&str>, Vec<i64>) = recs.iter().map(|r| rows::idem_encode(r.result)).unzip();
    let i_ats: Vec<i64> = recs.iter().map(|r| r.at_ms).collect();

    let totals = b.totals.unwrap_or_default();
    let write_totals = b.totals.is_some();

    let s = st.get(c, WRITE_BATCH)?;
    let params: [&(dyn ToSql + Sync); 42] = [
        &w_users,
        &w_fens,
        &e_users,
        &e_kinds,
        &e_amounts,
        &e_packets,
        &e_ats,
        &u_ids,
        &u_statuses,
        &u_opened,
        &u_opened_fen,
        &u_refunded,
        &u_best_users,
        &u_best_fens,
        &c_packets,
        &c_indexes,
        &c_users,
        &c_amounts,
        &c_ats,
        &o_targets,
        &o_seqs,
        &o_users,
        &o_amounts,
        &o_packets,
        &o_ats,
        &os_targets,
        &os_seqs,
        &a_targets,
        &a_upto,
        &m_sources,
        &m_seqs,
        &i_users,
        &i_request_ids,
        &i_fingerprints,
        &i_ops,
        &i_results,
        &i_ats,
        &totals.deposits_fen,
        &totals.withdrawals_fen,
        &write_totals,
        &cr_users,
        &cr_fens,
    ];
    c.query_one(&s, &params)?;
    Ok(())
}
