//! User ids read back from a store, checked, and shared while a `load` rebuilds a set.

use hongbao_core::{FastSet, UserId};

use crate::{Result, StoreError};

/// Shares one allocation per distinct user while a `load` rebuilds millions of claims, the
/// way the engine keeps users; queries (and the wallets, one row per user) parse without
/// sharing.
pub(crate) struct Users {
    seen: Option<FastSet<UserId>>,
}

impl Users {
    pub(crate) fn interning() -> Users {
        Users { seen: Some(FastSet::default()) }
    }

    pub(crate) fn parsing() -> Users {
        Users { seen: None }
    }

    pub(crate) fn get(&mut self, s: &str) -> Result<UserId> {
        let Some(seen) = &mut self.seen else {
            return parse_user(s);
        };
        if let Some(u) = seen.get(s) {
            return Ok(u.clone());
        }
        let u = parse_user(s)?;
        seen.insert(u.clone());
        Ok(u)
    }
}

/// A stored user id; one this build would not accept is corrupt data.
pub(crate) fn parse_user(s: &str) -> Result<UserId> {
    UserId::parse(s).map_err(|_| StoreError::Corrupt(format!("bad user id {s:?}")))
}
