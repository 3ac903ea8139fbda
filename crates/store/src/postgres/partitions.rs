//! Day partitions of the two tables that grow with every claim: `claims`, by the creation day
//! of the packet (which its id carries), and `entries`, by the day of `at_ms`.
//!
//! A day's partition is a range of the table's key: for `entries`, `[day start, next day
//! start)` in Unix milliseconds; for `claims`, the packet ids from the smallest id of the
//! day's first second to the smallest id of the next day's first second, since the creation
//! second fills a packet id's high bits. Partitions are made ahead of time, yesterday to a week
//! from today by the wall clock, at open and again on the first commit of each new day, each in
//! a transaction of its own before the batch. A DEFAULT partition takes every row of any other
//! day, so a write never fails for lack of a partition; when a day that already has rows there
//! gets its own partition, those rows move into it in the same transaction.
//!
//! This module must never make a commit fail because a partition could not be made (the
//! default partition has the rows), and never query the catalog on the commit path: which days
//! exist is cached.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hongbao_core::{Millis, PacketIdGen};
use postgres::Client;

use crate::Result;

pub(super) const DAY_MS: i64 = 86_400_000;

/// Days before today that get a partition: yesterday's, for packets created just before
/// midnight whose claims come after it.
pub(super) const DAYS_BEHIND: i64 = 1;

/// Days after today that get a partition: a week of slack, so a set that runs for days
/// without a restart never writes a current row to the default partition.
const DAYS_AHEAD: i64 = 7;

/// How long making a partition may wait for a query holding a table lock before it gives up
/// and leaves the day to the default partition for now: commits wait behind it meanwhile.
const LOCK_WAIT_MAX_MS: u32 = 2_000;

/// After a failed attempt, commits go on without trying again for this long.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// The two partitioned tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Table {
    Claims,
    Entries,
}

impl Table {
    pub(super) const ALL: [Table; 2] = [Table::Claims, Table::Entries];

    pub(super) fn name(self) -> &'static str {
        match self {
            Table::Claims => "claims",
            Table::Entries => "entries",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Table::Claims => "packet_id",
            Table::Entries => "at_ms",
        }
    }

    /// `claims_d20261124`: the day is readable in `\d+` and sorts by date.
    pub(super) fn partition(self, day: i64) -> String {
        let (y, m, d) = civil_from_days(day);
        format!("{}_d{y:04}{m:02}{d:02}", self.name())
    }

    /// The day a partition's name stands for, if it is one of ours.
    pub(super) fn day_of(self, partition: &str) -> Option<i64> {
        let digits = partition.strip_prefix(self.name())?.strip_prefix("_d")?;
        if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let y: i64 = digits[0..4].parse().ok()?;
        let m: u32 = digits[4..6].parse().ok()?;
        let d: u32 = digits[6..8].parse().ok()?;
        let day = days_from_civil(y, m, d);
        (civil_from_days(day) == (y, m, d)).then_some(day)
    }

    /// The key range `[from, to)` of a day; `None` for a day no packet id can fall on (before
    /// the id epoch), which keeps its claims in the default partition.
    pub(super) fn bounds(self, day: i64) -> Option<(i64, i64)> {
        match self {
            Table::Entries => Some((day * DAY_MS, (day + 1) * DAY_MS)),
            Table::Claims => Some((first_packet_id(day * DAY_MS)?, first_packet_id((day + 1) * DAY_MS)?)),
        }
    }
}

/// The smallest packet id any set can issue in the second starting at `ms`: set 0, sequence
/// 0. `None` when ids cannot stand for that second.
fn first_packet_id(ms: Millis) -> Option<i64> {
    let id = PacketIdGen::new(0, None).next(ms);
    (id.created_s_ms() == ms).then_some(id.as_i64())
}

/// The day (since the Unix epoch) a time falls on, in UTC.
pub(super) fn day_of_ms(ms: Millis) -> i64 {
    ms.div_euclid(DAY_MS)
}

pub(super) fn today() -> i64 {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    day_of_ms(now_ms)
}

/// Which day partitions exist, and when to look again. Owned by the writer.
#[derive(Debug, Default)]
pub(super) struct Partitions {
    claims: BTreeSet<i64>,
    entries: BTreeSet<i64>,
    /// The day whose window is complete: until the date changes, commits check nothing else.
    window_done: Option<i64>,
    /// After a failure, no new attempt before this.
    retry_at: Option<Instant>,
}

impl Partitions {
    /// Reads which day partitions exist from the catalog.
    pub(super) fn discover(client: &mut Client) -> Result<Partitions> {
        let mut p = Partitions::default();
        for table in Table::ALL {
            let rows = client.query(
                "SELECT c.relname::text FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = to_regclass($1)",
                &[&table.name()],
            )?;
            for row in rows {
                let name: String = row.try_get(0)?;
                if let Some(day) = table.day_of(&name) {
                    p.days(table).insert(day);
                }
            }
        }
        Ok(p)
    }

    fn days(&mut self, table: Table) -> &mut BTreeSet<i64> {
        match table {
            Table::Claims => &mut self.claims,
            Table::Entries => &mut self.entries,
        }
    }

    /// Makes every missing partition of the window around today; an error is returned, for
    /// `open` to fail on.
    pub(super) fn make_window(&mut self, client: &mut Client) -> Result<()> {
        let today = today();
        for day in today - DAYS_BEHIND..=today + DAYS_AHEAD {
            for table in Table::ALL {
                if !self.days(table).contains(&day) && make_day(client, table, day)? {
                    self.days(table).insert(day);
                }
            }
        }
        self.window_done = Some(today);
        self.retry_at = None;
        Ok(())
    }

    /// Called before every commit: nothing but a clock read unless the date changed since the
    /// window was last made. A failure is logged and retried later; only a lost connection is
    /// returned, since the batch cannot commit on it either.
    pub(super) fn ensure(&mut self, client: &mut Client, set: u32) -> Result<()> {
        if self.window_done == Some(today()) {
            return Ok(());
        }
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        match self.make_window(client) {
            Ok(()) => Ok(()),
            Err(e) if client.is_closed() => Err(e),
            Err(e) => {
                tracing::warn!(set, error = %e, "cannot make day partitions; rows go to the default partition for now");
                self.retry_at = Some(Instant::now() + RETRY_AFTER);
                Ok(())
            }
        }
    }
}

/// Makes the partition of `day` in its own transaction, moving any rows of that day out of the
/// default partition into it. Returns false for a day that cannot have a partition.
pub(super) fn make_day(client: &mut Client, table: Table, day: i64) -> Result<bool> {
    let Some((from, to)) = table.bounds(day) else { return Ok(false) };
    let (name, partition, key) = (table.name(), table.partition(day), table.key());
    let mut tx = client.transaction()?;
    // Only integers go into this SQL, all computed here: nothing to quote. Rows of the day
    // already in the default partition would make the new partition's bounds overlap it, so
    // they are set aside, and put back through the parent once the partition exists.
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = {LOCK_WAIT_MAX_MS};
         CREATE TEMP TABLE hongbao_moving (LIKE {name}) ON COMMIT DROP;
         WITH moved AS (DELETE FROM {name}_default WHERE {key} >= {from} AND {key} < {to} RETURNING *)
             INSERT INTO hongbao_moving SELECT * FROM moved;
         CREATE TABLE IF NOT EXISTS {partition} PARTITION OF {name} FOR VALUES FROM ({from}) TO ({to});
         INSERT INTO {name} SELECT * FROM hongbao_moving;"
    ))?;
    tx.commit()?;
    tracing::debug!(partition = %partition, "day partition made");
    Ok(true)
}

/// Year, month, day of a day counted from 1970-01-01 (proleptic Gregorian; Howard Hinnant's
/// `civil_from_days`).
pub(super) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(day_of_ms(1_767_225_600_000)), (2026, 1, 1));
        assert_eq!(civil_from_days(day_of_ms(1_709_164_800_000)), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for day in -800_000..800_000 {
            let (y, m, d) = civil_from_days(day);
            assert_eq!(days_from_civil(y, m, d), day);
        }
        assert_eq!(Table::Claims.partition(day_of_ms(1_767_225_600_000)), "claims_d20260101");
        assert_eq!(Table::Entries.day_of("entries_d20260101"), Some(day_of_ms(1_767_225_600_000)));
        assert_eq!(Table::Entries.day_of("entries_d20260230"), None);
        assert_eq!(Table::Entries.day_of("claims_d20260101"), None);
        assert_eq!(Table::Entries.day_of("entries_default"), None);
    }

    /// Every id a set issues during a day falls in that day's claims range, whatever its set
    /// and sequence, and the ranges of consecutive days meet without a gap.
    #[test]
    fn claim_bounds_follow_the_creation_day_in_packet_ids() {
        let day = day_of_ms(1_767_225_600_000) + 40;
        let (from, to) = Table::Claims.bounds(day).unwrap();
        assert_eq!(Table::Claims.bounds(day + 1).unwrap().0, to);
        for set in [0, 1, 513, 1023] {
            for ms in [day * DAY_MS, day * DAY_MS + 43_200_123, (day + 1) * DAY_MS - 1] {
                let mut ids = PacketIdGen::new(set, None);
                for _ in 0..3 {
                    let id = ids.next(ms);
                    assert!((from..to).contains(&id.as_i64()), "{id} of set {set} at {ms}");
                    assert_eq!(day_of_ms(id.created_s_ms()), day);
                }
            }
        }
        assert_eq!(Table::Claims.bounds(0), None, "no packet id falls in 1970");
        assert_eq!(Table::Entries.bounds(1), Some((DAY_MS, 2 * DAY_MS)));
    }
}
