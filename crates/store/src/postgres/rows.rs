//! How a PostgreSQL row gives its columns to the decoders both back ends share
//! ([`crate::rows`]).

use postgres::types::FromSql;
use postgres::Row;

pub(super) use crate::rows::*;
use crate::Result;

/// Column `i` of a row as `T`: a wrong type or an unexpected NULL is corrupt data.
pub(super) fn get<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> Result<T> {
    row.try_get(i).map_err(|e| corrupt(format!("column {i}: {}", super::error_text(&e))))
}

impl Columns for Row {
    fn int(&self, i: usize) -> Result<i64> {
        get(self, i)
    }

    fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        get(self, i)
    }

    fn text(&self, i: usize) -> Result<&str> {
        get(self, i)
    }

    fn opt_text(&self, i: usize) -> Result<Option<&str>> {
        get(self, i)
    }

    fn flag(&self, i: usize) -> Result<bool> {
        get(self, i)
    }

    fn small(&self, i: usize) -> Result<i64> {
        get::<i16>(self, i).map(i64::from)
    }
}
