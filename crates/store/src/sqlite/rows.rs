//! How a SQLite row gives its columns to the decoders both back ends share ([`crate::rows`]).

use rusqlite::Row;

pub(super) use crate::rows::*;
use crate::Result;

impl Columns for Row<'_> {
    fn int(&self, i: usize) -> Result<i64> {
        Ok(self.get(i)?)
    }

    fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        Ok(self.get(i)?)
    }

    fn text(&self, i: usize) -> Result<&str> {
        self.get_ref(i)?.as_str().map_err(|e| corrupt(format!("column {i}: {e}")))
    }

    fn opt_text(&self, i: usize) -> Result<Option<&str>> {
        self.get_ref(i)?.as_str_or_null().map_err(|e| corrupt(format!("column {i}: {e}")))
    }

    fn flag(&self, i: usize) -> Result<bool> {
        match self.get::<_, i64>(i)? {
            1 => Ok(true),
            0 => Ok(false),
            v => Err(corrupt(format!("column {i}: {v} is neither 0 nor 1"))),
        }
    }

    fn small(&self, i: usize) -> Result<i64> {
        self.int(i)
    }
}
