//! The PostgreSQL store: one schema per set, `hongbao_set_{set}`, in a database any number of
//! sets share, written by that set's engine thread alone on one connection and read by queries
//! through a small pool of connections.
//!
//! Every batch is one transaction with `synchronous_commit = on`, written in bulk: one
//! statement per row type per batch, its rows passed as arrays and expanded with `unnest`, so a
//! batch costs a dozen round trips whether it holds one claim or ten thousand. Claims and
//! wallet entries are partitioned by day (see `partitions`). This module must never decide
//! anything about money, never write a row outside a transaction, never send one statement
//! per row, never panic on an I/O error, never open a schema made for another set count, and
//! never run the blocking client on a thread that drives a tokio runtime.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hongbao_core::ids::SETS_MAX;
use postgres::{Client, Config, GenericClient, NoTls, Statement};
use scheduled_thread_pool::ScheduledThreadPool;

use crate::{Result, StoreError};

/// The packet columns in the order [`rows::packet_row`] decodes them. A macro, not a const,
/// so that `concat!` builds each query as a `&'static str` the statement cache can key on.
macro_rules! pg_packet_columns {
    () => {
        "id, sender, kind, total_fen, count, audience_anyone, greeting, created_at_ms, \
         expires_at_ms, seed, status, opened_count, opened_fen, refunded_fen, best_user, best_fen, \
         amount_rule"
    };
}

mod archive;
mod partitions;
mod read;
mod replica;
mod rows;
mod schema;
mod write;

pub use archive::{archive_postgres, make_postgres_day_partitions, ArchiveReport, ArchivedDay, SkippedDay};
pub use read::PgReader;
pub use replica::open_postgres_reader;
pub use write::PgStore;

/// Query connections per set. Queries run beside the engine threads on a 2-core machine, and
/// every set of every node shares the server's `max_connections`: a set holds at most one
/// write connection and this many read connections, opened only when queries need them.
const READ_CONNECTIONS_MAX: u32 = 4;

/// How long a query waits for a free read connection before it fails, so a flood of history
/// queries turns into errors instead of an unbounded queue of blocked threads.
const READ_WAIT_MAX: Duration = Duration::from_secs(5);

/// A read connection unused this long is closed: a set's queries come in bursts, and idle
/// connections hold server memory every other set could use.
const READ_IDLE_MAX: Duration = Duration::from_secs(60);

/// Longest a query may run on a read connection: one page never needs more, and a runaway
/// plan must not hold one of the four connections forever.
const READ_STATEMENT_MAX: Duration = Duration::from_secs(30);

/// How long a connection attempt may take before the store reports the server unreachable.
const CONNECT_WAIT_MAX: Duration = Duration::from_secs(10);

/// How long sent data may stay unacknowledged, and how long a connection may sit idle before
/// TCP probes it: a server that vanished (host down, failover) fails the next commit within
/// this bound instead of after the kernel's fifteen minutes of retransmissions.
const TCP_SILENCE_MAX: Duration = Duration::from_secs(30);

/// Threads r2d2 uses to open and reap pooled connections, shared by every set's pool: by
/// default each pool starts three of its own, which is thousands at a large set count.
const POOL_HELPER_THREADS: usize = 1;

/// Opens the store of set `set` of `sets` in the database at `url` (creating the set's schema
/// when missing), applies pending migrations, creates the day partitions around today, and
/// returns its write side and its read side.
///
/// A schema made for another set count or another set index is refused with
/// [`StoreError::Incompatible`]: users are hashed to sets, so reading it would put wallets in
/// the wrong place. Safe to call from inside a tokio runtime: the connecting happens on a
/// thread of its own.
pub fn open_postgres(url: &str, set: u32, sets: u32) -> Result<(PgStore, PgReader)> {
    check_set(set, sets)?;
    let config = client_config(url)?;
    // The blocking client runs a runtime of its own and panics inside another one, and the
    // binary opens its stores from async main: connect on a plain thread.
    std::thread::scope(|s| {
        s.spawn(|| write::PgStore::open(config.clone(), set, sets).map(|store| (store, config)))
            .join()
            .unwrap_or_else(|_| Err(StoreError::Io("opening the PostgreSQL store panicked".into())))
    })
    .and_then(|(store, config)| {
        let reader = PgReader::new(open_read_pool(config, set)?, set);
        Ok((store, reader))
    })
}

fn check_set(set: u32, sets: u32) -> Result<()> {
    if sets == 0 || sets > SETS_MAX || set >= sets {
        return Err(StoreError::Incompatible(format!(
            "set {set} of {sets} sets is out of range (1 to {SETS_MAX} sets)"
        )));
    }
    Ok(())
}

/// The client configuration of `url`, with the store's bounds on connecting and on a silent
/// server.
fn client_config(url: &str) -> Result<Config> {
    // The URL may hold a password: the error says what is wrong, not what was given.
    let mut config: Config =
        url.parse().map_err(|e| StoreError::Io(format!("bad PostgreSQL URL: {}", error_text(&e))))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_WAIT_MAX);
    }
    config.keepalives_idle(TCP_SILENCE_MAX);
    config.tcp_user_timeout(TCP_SILENCE_MAX);
    Ok(config)
}

/// Runs blocking client work on a plain thread of its own: the blocking client runs a runtime
/// of its own and panics inside another one, and the binary calls in from async main.
fn on_plain_thread<T: Send>(what: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(f).join().unwrap_or_else(|_| Err(StoreError::Io(format!("{what} panicked"))))
    })
}

/// Takes the session's advisory lock `(class, set)` if nobody holds it; whether it did.
fn try_set_lock(client: &mut Client, class: i32, set: u32) -> Result<bool> {
    Ok(client.query_one("SELECT pg_try_advisory_lock($1, $2)", &[&class, &(set as i32)])?.try_get(0)?)
}

/// The schema that holds one set's tables.
fn schema_name(set: u32) -> String {
    format!("hongbao_set_{set}")
}

/// Which side of the store a connection serves: it decides the session settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Writer,
    Reader,
}

/// A connection with its prepared statements, safe to drop on any thread.
///
/// Dropping a blocking `postgres::Client` runs (and drops) the client's own runtime, which
/// panics on a thread that drives tokio; the engine's `Arc<dyn Reader>` may well be dropped
/// there. Such a drop hands the client to a short-lived plain thread instead.
pub(crate) struct PgConn {
    /// `None` only while dropping.
    client: Option<Client>,
    statements: Statements,
}

impl std::fmt::Debug for PgConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConn").field("closed", &self.is_closed()).finish()
    }
}

impl PgConn {
    fn connect(config: &Config, set: u32, role: Role) -> Result<PgConn> {
        let mut config = config.clone();
        let role_name = match role {
            Role::Writer => "writer",
            Role::Reader => "reader",
        };
        config.application_name(&format!("hongbao-set-{set}-{role_name}"));
        let mut client = config
            .connect(NoTls)
            .map_err(|e| StoreError::Io(format!("cannot connect to PostgreSQL: {}", error_text(&e))))?;
        // Unqualified names resolve in the set's own schema, so every statement is a static
        // string shared by all sets, and no set can touch another set's rows by accident.
        let mut session = format!("SET search_path TO {};", schema_name(set));
        match role {
            // DESIGN.md §2.6: a commit returns only once its WAL is flushed (and, with
            // synchronous standbys configured on the server, once a standby has it too).
            Role::Writer => {
                session.push_str("SET synchronous_commit TO on;");
                // A writer whose host dies leaves its session, and the set's writer lock, to
                // the server's TCP keepalives: these find it out in about 25 s, not hours.
                // (Ignored on a Unix socket, where a dead client is seen at once.)
                session.push_str(
                    "SET tcp_keepalives_idle TO 10; SET tcp_keepalives_interval TO 5; SET tcp_keepalives_count TO 3;",
                );
            }
            Role::Reader => {
                session.push_str("SET default_transaction_read_only TO on;");
                session.push_str(&format!("SET statement_timeout TO {};", READ_STATEMENT_MAX.as_millis()));
            }
        }
        client.batch_execute(&session)?;
        Ok(PgConn { client: Some(client), statements: Statements::default() })
    }

    fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("client taken only by drop")
    }

    /// The client and the statement cache, borrowed apart so a transaction on the one can
    /// prepare through the other.
    fn split(&mut self) -> (&mut Client, &mut Statements) {
        (self.client.as_mut().expect("client taken only by drop"), &mut self.statements)
    }

    fn is_closed(&self) -> bool {
        self.client.as_ref().is_none_or(Client::is_closed)
    }
}

impl Drop for PgConn {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else { return };
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::spawn(move || drop(client));
        } else {
            drop(client);
        }
    }
}

/// Statements prepared once per connection and reused: a batch never re-parses its SQL.
/// PostgreSQL keeps prepared statements across transactions, rolled back ones included.
#[derive(Default)]
struct Statements {
    prepared: HashMap<&'static str, Statement>,
}

impl Statements {
    fn get(&mut self, client: &mut impl GenericClient, sql: &'static str) -> Result<Statement> {
        if let Some(st) = self.prepared.get(sql) {
            return Ok(st.clone());
        }
        let st = client.prepare(sql)?;
        self.prepared.insert(sql, st.clone());
        Ok(st)
    }
}

/// Opens and checks read connections for r2d2.
#[derive(Debug)]
struct Manager {
    config: Config,
    set: u32,
}

impl r2d2::ManageConnection for Manager {
    type Connection = PgConn;
    type Error = StoreError;

    fn connect(&self) -> Result<PgConn> {
        PgConn::connect(&self.config, self.set, Role::Reader)
    }

    /// One empty query at check-out: after a server restart or a failover the pool hands out
    /// a working connection instead of failing the first query on each stale one.
    fn is_valid(&self, conn: &mut PgConn) -> Result<()> {
        conn.client().is_valid(READ_WAIT_MAX)?;
        Ok(())
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.is_closed()
    }
}

fn open_read_pool(config: Config, set: u32) -> Result<r2d2::Pool<Manager>> {
    r2d2::Pool::builder()
        .max_size(READ_CONNECTIONS_MAX)
        // None opened ahead: with hundreds of sets, idle read connections would crowd the
        // server's connection limit for nothing.
        .min_idle(Some(0))
        .idle_timeout(Some(READ_IDLE_MAX))
        .connection_timeout(READ_WAIT_MAX)
        .test_on_check_out(true)
        .thread_pool(pool_helper())
        .build(Manager { config, set })
        .map_err(|e| StoreError::Io(format!("cannot open read connections: {e}")))
}

fn pool_helper() -> Arc<ScheduledThreadPool> {
    static HELPER: OnceLock<Arc<ScheduledThreadPool>> = OnceLock::new();
    HELPER
        .get_or_init(|| {
            let pool = ScheduledThreadPool::builder()
                .num_threads(POOL_HELPER_THREADS)
                .thread_name_pattern("hongbao-pg-pool-{}")
                .build();
            Arc::new(pool)
        })
        .clone()
}

/// rust-postgres shows only "db error" for a server error; the server's message, detail and
/// SQLSTATE are what an operator needs.
fn error_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                s.push_str(": ");
                s.push_str(detail);
            }
            s
        }
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// Everything the server or the connection reports is the store failing at its job: a lost
/// connection, a full disk, or a constraint a write broke. Values that cannot be what was
/// written are caught where rows are decoded, as [`StoreError::Corrupt`].
impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> StoreError {
        StoreError::Io(error_text(&e))
    }
}
