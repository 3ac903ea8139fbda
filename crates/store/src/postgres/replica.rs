//! Read/write separation: a set's queries served by another server, normally a streaming
//! standby of the primary the sets write to, so that floods of history queries use the
//! standby's CPU and connections, not the primary's.
//!
//! Staleness. A standby answers from the WAL it has replayed, which trails the primary's
//! commits:
//!
//! - With `synchronous_commit = on` and `synchronous_standby_names = 'ANY 1 (s1, s2)'` (the
//!   seeds' N = 3, W = 2), a commit waits until one standby has *flushed* its WAL, not until
//!   any standby has *applied* it, and the other standby may not have it at all. A query on a
//!   standby may therefore miss a claim that was just acknowledged: the lag is normally
//!   milliseconds (`pg_stat_replication.replay_lag` on the primary), more under load, and has
//!   no bound while the standby is disconnected or while a long query on it holds replay back
//!   (up to `max_standby_streaming_delay`, 30 s by default).
//! - Each query reads its page and its totals in one snapshot, so an answer is consistent with
//!   itself, only possibly old. History pages are newest first, so a late row shows up on the
//!   first page of a later request.
//! - Read-your-writes would take `synchronous_commit = remote_apply` on the writer *and* a
//!   reader on a standby that is in every commit's quorum (`FIRST 1 (s1)` or `ANY 2 (s1, s2)`
//!   with the reader on s1): every commit would then wait for the standby to replay it, which
//!   adds the standby's replay time to every batch. hongbao does not do that: the engine
//!   decides about money from its memory and its own store, never from a reader, so a stale
//!   read can show an old page but cannot pay anyone twice.
//! - A query on a standby may be cancelled when replay needs a lock it holds ("canceling
//!   statement due to conflict with recovery", e.g. while an archive drops a day): it fails
//!   with a store error and the client asks again.
//!
//! This module must never write, never create or migrate a schema (a standby cannot, and a
//! reader must not race the writer's migrations), and never serve a schema made for another
//! set layout.

use std::time::{Duration, Instant};

use postgres::Client;

use super::read::PgReader;
use super::schema::MIGRATIONS;
use super::{check_set, client_config, on_plain_thread, open_read_pool, schema_name, PgConn, Role};
use crate::{Result, StoreError};

/// How long opening a reader waits for the set's schema to reach the read server: a standby
/// replays the primary's migrations a moment after the primary made them, and a reader opened
/// just after its store must not fail for that.
const SCHEMA_WAIT_MAX: Duration = Duration::from_secs(30);

/// How often the wait looks again.
const SCHEMA_POLL: Duration = Duration::from_millis(100);

/// Opens the read side of set `set` of `sets` on the server at `url` (a standby, usually; any
/// server with the set's schema works), without writing anything there: the schema must
/// already exist, made by [`crate::open_postgres`] on the primary. Waits up to 30 s for a
/// standby to replay it, then refuses with [`StoreError::Incompatible`]; a schema made for
/// another set layout, or by a newer hongbao, is refused at once.
///
/// What the reader returns may trail what the sets acknowledged: see the module doc on
/// staleness (standby replay lag; `remote_apply` would buy read-your-writes at a cost on every
/// commit). Safe to call from inside a tokio runtime.
pub fn open_postgres_reader(url: &str, set: u32, sets: u32) -> Result<PgReader> {
    check_set(set, sets)?;
    let config = client_config(url)?;
    on_plain_thread("opening the PostgreSQL reader", || {
        let mut conn = PgConn::connect(&config, set, Role::Reader)?;
        let deadline = Instant::now() + SCHEMA_WAIT_MAX;
        loop {
            match check_layout(conn.client(), set, sets)? {
                Layout::Ready => return Ok(()),
                Layout::Missing(_) if Instant::now() < deadline => std::thread::sleep(SCHEMA_POLL),
                Layout::Missing(what) => {
                    return Err(StoreError::Incompatible(format!(
                        "{what} on the read server after {}s: open the stores on the primary first, \
                         and check that this server replicates it",
                        SCHEMA_WAIT_MAX.as_secs()
                    )))
                }
            }
        }
    })?;
    Ok(PgReader::new(open_read_pool(config, set)?, set))
}

/// Whether a set's schema is there and usable, as far as reading goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Layout {
    Ready,
    /// Not there (yet): what is missing.
    Missing(String),
}

/// Checks, with reads only, that the schema of `set` exists at the version this build knows
/// and was made for set `set` of `sets`. A schema that does not exist, or is behind, is
/// [`Layout::Missing`]; one made for another layout or by a newer build is an error.
pub(super) fn check_layout(client: &mut Client, set: u32, sets: u32) -> Result<Layout> {
    let schema = schema_name(set);
    let found: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL",
            &[&format!("{schema}.meta"), &format!("{schema}.schema_version")],
        )?
        .try_get(0)?;
    if !found {
        return Ok(Layout::Missing(format!("schema {schema} does not exist")));
    }
    // The schema name is ours, made of a fixed prefix and an integer: nothing to quote.
    let version: i32 = client
        .query_one(&format!("SELECT COALESCE(max(version), 0) FROM {schema}.schema_version"), &[])?
        .try_get(0)?;
    let known = MIGRATIONS.len();
    match usize::try_from(version) {
        Ok(v) if v > known => {
            return Err(StoreError::Incompatible(format!(
            "schema {schema} has version {v}, newer than the {known} this build knows: run a newer hongbao"
        )))
        }
        Ok(v) if v < known => {
            return Ok(Layout::Missing(format!("schema {schema} is at version {v}, not {known}")));
        }
        Ok(_) => {}
        Err(_) => return Err(StoreError::Corrupt(format!("schema {schema} has version {version}"))),
    }
    let mut stored_sets = None;
    let mut stored_set = None;
    for row in
        client.query(&format!("SELECT key, value FROM {schema}.meta WHERE key IN ('sets', 'set')"), &[])?
    {
        let (key, value): (&str, i64) = (row.try_get(0)?, row.try_get(1)?);
        match key {
            "sets" => stored_sets = Some(value),
            _ => stored_set = Some(value),
        }
    }
    match (stored_sets, stored_set) {
        (Some(s), Some(t)) if s == i64::from(sets) && t == i64::from(set) => Ok(Layout::Ready),
        (Some(s), Some(t)) => Err(StoreError::Incompatible(format!(
            "schema {schema} holds set {t} of {s} sets, not set {set} of {sets}"
        ))),
        (None, None) => Ok(Layout::Missing(format!("schema {schema} has no set layout yet"))),
        _ => Err(StoreError::Corrupt(format!("schema {schema} has half of its set layout in meta"))),
    }
}
