//! `hongbao archive --before DATE`: moves whole days of claims and wallet entries out of a
//! PostgreSQL store into CSV files, while the service keeps running. The work is the store's
//! (`hongbao_store::archive_postgres`); this module reads the options and prints the report.

use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use clap::Args;

use crate::config::{check_sets, is_postgres_url, FileConfig};

/// `hongbao archive` options. The store and the set count also come from the environment
/// and the config file, as for `serve`.
#[derive(Debug, Args)]
pub struct ArchiveArgs {
    /// First day to keep (YYYY-MM-DD, UTC): days before it are archived, where the sets no
    /// longer write them and no packet created that day is still active
    #[arg(long)]
    pub before: String,
    /// Where the CSV files go: `<out>/set-<n>/<table>-<date>.csv` [default: ./hongbao-archive]
    #[arg(long, env = "HONGBAO_ARCHIVE_OUT")]
    pub out: Option<PathBuf>,
    /// The postgres:// URL the sets write to
    #[arg(long, env = "HONGBAO_STORE")]
    pub store: Option<String>,
    /// The set count the store was made with [default: 1]
    #[arg(long, env = "HONGBAO_SETS")]
    pub sets: Option<u32>,
    /// TOML config file (its `store` and `sets`); flags and environment variables override it
    #[arg(long, env = "HONGBAO_CONFIG")]
    pub config: Option<PathBuf>,
}

pub fn run(args: ArchiveArgs) -> Result<(), String> {
    let file = FileConfig::read(args.config.as_deref())?;
    let url =
        args.store.or(file.store).filter(|u| is_postgres_url(u)).ok_or(
            "archive needs a postgres:// store (--store, HONGBAO_STORE or `store` in the config file)",
        )?;
    let sets = check_sets(args.sets.or(file.sets).unwrap_or(1))?;
    let before_ms = midnight_ms(&args.before)?;
    let out = args.out.unwrap_or_else(|| PathBuf::from("hongbao-archive"));
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let report = hongbao_store::archive_postgres(&url, sets, before_ms, &out).map_err(|e| e.to_string())?;
    print_report(&report, &out);
    Ok(())
}

/// Midnight UTC at the start of `date` (YYYY-MM-DD), in ms since the epoch.
fn midnight_ms(date: &str) -> Result<i64, String> {
    let day = NaiveDate::parse_from_str(date, "%Y-%m-%d")
        .map_err(|e| format!("--before must be a date like 2026-01-31: {e}"))?;
    Ok(day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc().timestamp_millis())
}

fn print_report(r: &hongbao_store::ArchiveReport, out: &Path) {
    for d in &r.archived {
        println!("archived set {} {} {}: {} rows to {}", d.set, d.table, d.date, d.rows, d.file);
    }
    for d in &r.skipped {
        println!("kept     set {} {} {}: {}", d.set, d.table, d.date, d.reason);
    }
    let rows: u64 = r.archived.iter().map(|d| d.rows).sum();
    println!(
        "archive: {} days ({rows} rows) written under {}, {} days kept, {} rows before the cut kept in \
         default partitions; the longest a table was held for a detach: {} ms",
        r.archived.len(),
        out.display(),
        r.skipped.len(),
        r.default_rows_kept,
        r.detach_ms_max
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_midnight_utc() {
        assert_eq!(midnight_ms("1970-01-02"), Ok(86_400_000));
        assert_eq!(midnight_ms("2026-01-01"), Ok(1_767_225_600_000));
        assert!(midnight_ms("2026-13-01").is_err());
        assert!(midnight_ms("yesterday").is_err());
    }
}
