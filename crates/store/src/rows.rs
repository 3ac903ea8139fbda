//! Turning rows of either back end back into typed values, and typed values into column
//! values.
//!
//! Every value read back goes through a checking constructor: a row that could not have been
//! written (unknown kind, bad id, negative balance, a NULL where none belongs) is
//! [`StoreError::Corrupt`], never a panic and never a value passed on as if it were good. The
//! decoders are written once, over [`Columns`]; each back end says how it reads a column.

use hongbao_core::packet::PacketHeader;
use hongbao_core::{AmountRule, Audience, Claim, Kind, Packet, PacketId, PacketStatus, UserId};

pub(crate) use crate::users::Users;
use crate::{EntryKind, EntryRow, IdemRecord, IdemResult, OutboxItem, PacketRow, Result, StoreError};

/// What the decoders read of a row, column by column. A column of the wrong type, or NULL
/// where a value belongs, is an error.
pub(crate) trait Columns {
    fn int(&self, i: usize) -> Result<i64>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>>;
    fn text(&self, i: usize) -> Result<&str>;
    fn opt_text(&self, i: usize) -> Result<Option<&str>>;
    /// A yes or no (SQLite: an integer 0 or 1; PostgreSQL: a boolean).
    fn flag(&self, i: usize) -> Result<bool>;
    /// A small code (SQLite: an integer; PostgreSQL: a smallint).
    fn small(&self, i: usize) -> Result<i64>;
}

pub(crate) fn corrupt(msg: impl Into<String>) -> StoreError {
    StoreError::Corrupt(msg.into())
}

pub(crate) fn packet_id(v: i64) -> Result<PacketId> {
    u64::try_from(v)
        .ok()
        .and_then(|v| PacketId::from_raw(v).ok())
        .ok_or_else(|| corrupt(format!("bad packet id {v}")))
}

pub(crate) fn to_u32(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| corrupt(format!("{what} {v} out of range")))
}

pub(crate) fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| corrupt(format!("{what} {v} out of range")))
}

/// For values the engine hands in: a seq past `i64::MAX` is a bug upstream, refused by
/// failing the commit rather than wrapping into a negative number on disk.
pub(crate) fn to_i64(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| StoreError::Io(format!("{what} {v} does not fit a signed 64-bit column")))
}

fn amount(v: i64, what: &str) -> Result<i64> {
    if v >= 1 {
        Ok(v)
    } else {
        Err(corrupt(format!("{what} {v} is not positive")))
    }
}

pub(crate) fn balance(v: i64, user: &UserId) -> Result<i64> {
    if v >= 0 {
        Ok(v)
    } else {
        Err(corrupt(format!("wallet {user} has a negative balance {v}")))
    }
}

/// Decodes the columns of `packet_columns!()` (SQLite) or `pg_packet_columns!()`
/// (PostgreSQL). The audience comes back as `Anyone` or as an empty group; the caller fills the
/// group from the audience table.
pub(crate) fn packet_row(row: &impl Columns, users: &mut Users) -> Result<PacketRow> {
    let id = packet_id(row.int(0)?)?;
    let sender = users.get(row.text(1)?)?;
    let kind_s = row.text(2)?;
    let kind = Kind::parse(kind_s).ok_or_else(|| corrupt(format!("packet {id} has kind {kind_s:?}")))?;
    let total_fen = amount(row.int(3)?, "packet total")?;
    let count = to_u32(row.int(4)?, "share count")?;
    let audience = if row.flag(5)? { Audience::Anyone } else { Audience::Users(Box::default()) };
    let greeting = row.text(6)?.to_owned();
    let created_at_ms = row.int(7)?;
    let expires_at_ms = row.int(8)?;
    // Stored bit-cast: both back ends' integers are signed.
    let seed = row.int(9)? as u64;
    let status_s = row.text(10)?;
    let status = PacketStatus::parse(status_s)
        .ok_or_else(|| corrupt(format!("packet {id} has status {status_s:?}")))?;
    let opened_count = to_u32(row.int(11)?, "opened count")?;
    let opened_fen = row.int(12)?;
    let refunded_fen = row.int(13)?;
    if opened_fen < 0 || refunded_fen < 0 {
        return Err(corrupt(format!("packet {id} has negative opened or refunded fen")));
    }
    let best = match (row.opt_text(14)?, row.opt_int(15)?) {
        (Some(u), Some(fen)) => Some((users.get(u)?, amount(fen, "best luck")?)),
        (None, None) => None,
        _ => return Err(corrupt(format!("packet {id} has half a best luck"))),
    };
    let rule_code = row.small(16)?;
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
pub(crate) fn set_audience(row: &mut PacketRow, group: Vec<UserId>) -> Result<()> {
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
pub(crate) fn claim(row: &impl Columns, first: usize, users: &mut Users) -> Result<Claim> {
    Ok(Claim {
        index: to_u32(row.int(first)?, "share index")?,
        user: users.get(row.text(first + 1)?)?,
        amount_fen: amount(row.int(first + 2)?, "share")?,
        at_ms: row.int(first + 3)?,
    })
}

/// The packet row must agree with its claims: the engine writes both in the same batch, so a
/// difference means a lost write or a bug. Checked before `Packet::restore`, which would
/// otherwise rebuild the packet from the claims alone and hide the difference.
pub(crate) fn check_claims(row: &PacketRow, claims: &[Claim]) -> Result<()> {
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

/// A packet row read while loading `set`: one of another set's packets in its file is corrupt.
pub(crate) fn of_set(row: PacketRow, set: u32) -> Result<PacketRow> {
    if row.header.id.set() != set {
        return Err(corrupt(format!(
            "set {set} holds packet {} of set {}",
            row.header.id,
            row.header.id.set()
        )));
    }
    Ok(row)
}

/// Moves `cursor` forward through `ids` (sorted) to `id` and returns its position. Rows come
/// in packet order, so the whole join is one forward walk.
pub(crate) fn advance(ids: &[PacketId], cursor: &mut usize, id: PacketId) -> Result<usize> {
    while *cursor < ids.len() && ids[*cursor] < id {
        *cursor += 1;
    }
    if ids.get(*cursor) == Some(&id) {
        Ok(*cursor)
    } else {
        Err(corrupt(format!("row of packet {id} out of packet order")))
    }
}

/// Active packets rebuilt from their rows, each with its audience and its claims (the three in
/// the same order), every row checked against its claims.
#[expect(clippy::vec_box, reason = "the set keeps packets boxed; see `Loaded::active_packets`")]
pub(crate) fn restore(
    packets: Vec<PacketRow>,
    groups: Vec<Vec<UserId>>,
    claims: Vec<Vec<Claim>>,
) -> Result<Vec<Box<Packet>>> {
    let mut out = Vec::with_capacity(packets.len());
    for ((mut row, group), claims) in packets.into_iter().zip(groups).zip(claims) {
        set_audience(&mut row, group)?;
        check_claims(&row, &claims)?;
        out.push(Box::new(Packet::restore(row.header, row.status, row.refunded_fen, claims)));
    }
    Ok(out)
}

/// Decodes `id, kind, amount_fen, packet_id, at_ms`.
pub(crate) fn entry_row(row: &impl Columns) -> Result<EntryRow> {
    let kind_s = row.text(1)?;
    Ok(EntryRow {
        id: row.int(0)?,
        kind: EntryKind::parse(kind_s).ok_or_else(|| corrupt(format!("entry kind {kind_s:?}")))?,
        amount_fen: amount(row.int(2)?, "entry amount")?,
        packet_id: row.opt_int(3)?.map(packet_id).transpose()?,
        at_ms: row.int(4)?,
    })
}

/// Decodes `target_set, seq, user, amount_fen, packet_id, at_ms`.
pub(crate) fn outbox_item(row: &impl Columns, users: &mut Users) -> Result<OutboxItem> {
    Ok(OutboxItem {
        target_set: to_u32(row.int(0)?, "outbox target set")?,
        seq: to_u64(row.int(1)?, "outbox seq")?,
        user: users.get(row.text(2)?)?,
        amount_fen: amount(row.int(3)?, "outbox amount")?,
        packet_id: packet_id(row.int(4)?)?,
        at_ms: row.int(5)?,
    })
}

/// Decodes `a set, a seq` pairs (watermarks, outbox seqs).
pub(crate) fn set_seq(row: &impl Columns, what: &str) -> Result<(u32, u64)> {
    Ok((to_u32(row.int(0)?, what)?, to_u64(row.int(1)?, what)?))
}

/// The `op` text and `result` integer an idempotent result is stored as.
pub(crate) fn idem_encode(r: IdemResult) -> (&'static str, i64) {
    match r {
        IdemResult::Deposit { balance_fen } => ("deposit", balance_fen),
        IdemResult::Withdraw { balance_fen } => ("withdraw", balance_fen),
        IdemResult::Send { packet_id } => ("send", packet_id.as_i64()),
    }
}

/// Decodes `user, request_id, fingerprint, op, result, at_ms`.
pub(crate) fn idem_record(row: &impl Columns, users: &mut Users) -> Result<IdemRecord> {
    let user = users.get(row.text(0)?)?;
    let op = row.text(3)?;
    let v = row.int(4)?;
    let result = match op {
        "deposit" => IdemResult::Deposit { balance_fen: balance(v, &user)? },
        "withdraw" => IdemResult::Withdraw { balance_fen: balance(v, &user)? },
        "send" => IdemResult::Send { packet_id: packet_id(v)? },
        _ => return Err(corrupt(format!("idempotency op {op:?}"))),
    };
    Ok(IdemRecord {
        request_id: row.text(1)?.to_owned(),
        // Stored bit-cast: both back ends' integers are signed.
        fingerprint: row.int(2)? as u64,
        result,
        at_ms: row.int(5)?,
        user,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_walks_forward_and_refuses_a_row_out_of_packet_order() {
        let ids: Vec<PacketId> = [3, 5, 9].map(|v| PacketId::from_raw(v << 8).unwrap()).to_vec();
        let mut cursor = 0;
        assert_eq!(advance(&ids, &mut cursor, ids[0]).unwrap(), 0);
        assert_eq!(advance(&ids, &mut cursor, ids[2]).unwrap(), 2, "skips a packet with no rows");
        assert_eq!(advance(&ids, &mut cursor, ids[2]).unwrap(), 2, "a packet's next row");
        // Back to an earlier packet, or a packet that was not read: both corrupt.
        assert!(matches!(advance(&ids, &mut cursor, ids[1]), Err(StoreError::Corrupt(_))));
        let mut cursor = 0;
        let stray = PacketId::from_raw(4 << 8).unwrap();
        assert!(matches!(advance(&ids, &mut cursor, stray), Err(StoreError::Corrupt(_))));
    }
}
