//! Turning rows back into typed values, and typed values into column values.
//!
//! Every value read back goes through a checking constructor: a row that could not have been
//! written (unknown kind, bad id, negative balance) is [`StoreError::Corrupt`], never a panic
//! and never a value passed on as if it were good.

use hongbao_core::packet::PacketHeader;
use hongbao_core::{AmountRule, Audience, Claim, Kind, PacketId, PacketStatus, UserId};
use rusqlite::Row;

pub(super) use crate::users::Users;
use crate::{EntryKind, EntryRow, IdemRecord, IdemResult, OutboxItem, PacketRow, Result, StoreError};

pub(super) fn corrupt(msg: impl Into<String>) -> StoreError {
    StoreError::Corrupt(msg.into())
}

pub(super) fn text<'r>(row: &'r Row<'_>, i: usize) -> Result<&'r str> {
    row.get_ref(i)?.as_str().map_err(|e| corrupt(format!("column {i}: {e}")))
}

pub(super) fn opt_text<'r>(row: &'r Row<'_>, i: usize) -> Result<Option<&'r str>> {
    row.get_ref(i)?.as_str_or_null().map_err(|e| corrupt(format!("column {i}: {e}")))
}

pub(super) fn packet_id(v: i64) -> Result<PacketId> {
    u64::try_from(v)
        .ok()
        .and_then(|v| PacketId::from_raw(v).ok())
        .ok_or_else(|| corrupt(format!("bad packet id {v}")))
}

pub(super) fn to_u32(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| corrupt(format!("{what} {v} out of range")))
}

pub(super) fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| corrupt(format!("{what} {v} out of range")))
}

/// For values the engine hands in: a seq past `i64::MAX` is a bug upstream, refused by
/// failing the commit rather than wrapping into a negative number on disk.
pub(super) fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Io(format!("{what} {v} does not fit a signed 64-bit column")))
}

fn amount(v: i64, what: &str) -> Result<i64> {
    if v >= 1 {
        Ok(v)
    } else {
        Err(corrupt(format!("{what} {v} is not positive")))
    }
}

pub(super) fn balance(v: i64, user: &UserId) -> Result<i64> {
    if v >= 0 {
        Ok(v)
    } else {
        Err(corrupt(format!("wallet {user} has a negative balance {v}")))
    }
}

/// Decodes the columns of `packet_columns!()`. The audience comes back as `Anyone` or as an
/// empty group; the caller fills the group from the audience table.
pub(super) fn packet_row(row: &Row<'_>, users: &mut Users) -> Result<PacketRow> {
    let id = packet_id(row.get(0)?)?;
    let sender = users.get(text(row, 1)?)?;
    let kind_s = text(row, 2)?;
    let kind = Kind::parse(kind_s).ok_or_else(|| corrupt(format!("packet {id} has kind {kind_s:?}")))?;
    let total_fen = amount(row.get(3)?, "packet total")?;
    let count = to_u32(row.get(4)?, "share count")?;
    let audience = match row.get::<_, i64>(5)? {
        1 => Audience::Anyone,
        0 => Audience::Users(Box::default()),
        v => return Err(corrupt(format!("packet {id} has audience_anyone {v}"))),
    };
    let greeting: String = row.get(6)?;
    let created_at_ms = row.get(7)?;
    let expires_at_ms = row.get(8)?;
    // Stored bit-cast: SQLite integers are signed.
    let seed = row.get::<_, i64>(9)? as u64;
    let status_s = text(row, 10)?;
    let status = PacketStatus::parse(status_s)
        .ok_or_else(|| corrupt(format!("packet {id} has status {status_s:?}")))?;
    let opened_count = to_u32(row.get(11)?, "opened count")?;
    let opened_fen: i64 = row.get(12)?;
    let refunded_fen: i64 = row.get(13)?;
    if opened_fen < 0 || refunded_fen < 0 {
        return Err(corrupt(format!("packet {id} has negative opened or refunded fen")));
    }
    let best = match (opt_text(row, 14)?, row.get::<_, Option<i64>>(15)?) {
        (Some(u), Some(fen)) => Some((users.get(u)?, amount(fen, "best luck")?)),
        (None, None) => None,
        _ => return Err(corrupt(format!("packet {id} has half a best luck"))),
    };
    let rule_code: i64 = row.get(16)?;
    let amount_rule = AmountRule::from_code(rule_code)
        .ok_or_else(|| corrupt(format!("packet {id} has amount rule {rule_code}")))?;
    let header = PacketHeader {
        id,
        sender,
        kind,
        total_fen,
        count,
        audience,
        greeting,
        created_at_ms,
        expires_at_ms,
        seed,
        amount_rule,
    };
    Ok(PacketRow { header, status, opened_count, opened_fen, refunded_fen, best })
}

/// Sets a group packet's audience from its rows (any order); an `Anyone` packet has none.
pub(super) fn set_audience(row: &mut PacketRow, group: Vec<UserId>) -> Result<()> {
    match &row.header.audience {
        Audience::Anyone if !group.is_empty() => {
            Err(corrupt(format!("packet {} is for anyone but has audience rows", row.header.id)))
        }
        Audience::Anyone => Ok(()),
        Audience::Users(_) => {
            row.header.audience = Audience::users(group);
            Ok(())
        }
    }
}

/// Decodes `idx, user, amount_fen, at_ms` starting at column `first`.
pub(super) fn claim(row: &Row<'_>, first: usize, users: &mut Users) -> Result<Claim> {
    Ok(Claim {
        index: to_u32(row.get(first)?, "share index")?,
        user: users.get(text(row, first + 1)?)?,
        amount_fen: amount(row.get(first + 2)?, "share")?,
        at_ms: row.get(first + 3)?,
    })
}

/// The packet row must agree with its claims: the engine writes both in the same batch, so a
/// difference means a lost write or a bug. Checked before `Packet::restore`, which would
/// otherwise rebuild the packet from the claims alone and hide the difference.
pub(super) fn check_claims(row: &PacketRow, claims: &[Claim]) -> Result<()> {
    let id = row.header.id;
    for (i, c) in claims.iter().enumerate() {
        if c.index as usize != i {
            return Err(corrupt(format!("packet {id} has share {} where share {i} belongs", c.index)));
        }
    }
    let opened_fen = claims.iter().try_fold(0i64, |sum, c| sum.checked_add(c.amount_fen));
    if claims.len() != row.opened_count as usize || opened_fen != Some(row.opened_fen) {
        return Err(corrupt(format!(
            "packet {id} says {} shares and {} fen opened, its claims say {} and {opened_fen:?}",
            row.opened_count,
            row.opened_fen,
            claims.len()
        )));
    }
    Ok(())
}

/// Decodes `id, kind, amount_fen, packet_id, at_ms`.
pub(super) fn entry_row(row: &Row<'_>) -> Result<EntryRow> {
    let kind_s = text(row, 1)?;
    Ok(EntryRow {
        id: row.get(0)?,
        kind: EntryKind::parse(kind_s).ok_or_else(|| corrupt(format!("entry kind {kind_s:?}")))?,
        amount_fen: amount(row.get(2)?, "entry amount")?,
        packet_id: row.get::<_, Option<i64>>(3)?.map(packet_id).transpose()?,
        at_ms: row.get(4)?,
    })
}

/// Decodes `target_set, seq, user, amount_fen, packet_id, at_ms`.
pub(super) fn outbox_item(row: &Row<'_>, users: &mut Users) -> Result<OutboxItem> {
    Ok(OutboxItem {
        target_set: to_u32(row.get(0)?, "outbox target set")?,
        seq: to_u64(row.get(1)?, "outbox seq")?,
        user: users.get(text(row, 2)?)?,
        amount_fen: amount(row.get(3)?, "outbox amount")?,
        packet_id: packet_id(row.get(4)?)?,
        at_ms: row.get(5)?,
    })
}

/// Decodes `a set, a seq` pairs (watermarks, outbox seqs).
pub(super) fn set_seq(row: &Row<'_>, what: &str) -> Result<(u32, u64)> {
    Ok((to_u32(row.get(0)?, what)?, to_u64(row.get(1)?, what)?))
}

/// The `op` text and `result` integer an idempotent result is stored as.
pub(super) fn idem_encode(r: IdemResult) -> (&'static str, i64) {
    match r {
        IdemResult::Deposit { balance_fen } => ("deposit", balance_fen),
        IdemResult::Withdraw { balance_fen } => ("withdraw", balance_fen),
        IdemResult::Send { packet_id } => ("send", packet_id.as_i64()),
    }
}

/// Decodes `user, request_id, fingerprint, op, result, at_ms`.
pub(super) fn idem_record(row: &Row<'_>, users: &mut Users) -> Result<IdemRecord> {
    let user = users.get(text(row, 0)?)?;
    let op = text(row, 3)?;
    let v: i64 = row.get(4)?;
    let result = match op {
        "deposit" => IdemResult::Deposit { balance_fen: balance(v, &user)? },
        "withdraw" => IdemResult::Withdraw { balance_fen: balance(v, &user)? },
        "send" => IdemResult::Send { packet_id: packet_id(v)? },
        _ => return Err(corrupt(format!("idempotency op {op:?}"))),
    };
    Ok(IdemRecord {
        request_id: text(row, 1)?.to_owned(),
        // Stored bit-cast: SQLite integers are signed.
        fingerprint: row.get::<_, i64>(2)? as u64,
        result,
        at_ms: row.get(5)?,
        user,
    })
}
