//! The wire format: request and response bodies. Amounts are integer fen, times RFC 3339 UTC,
//! ids strings. Only this module knows field names.

use chrono::{DateTime, SecondsFormat, Utc};
use hongbao_core::{Millis, PacketId, UserId};
use hongbao_engine::{
    AuditReport, ClaimReply, ClaimView, EntriesPage, PacketDetails, PacketSummary, ReceivedHistory,
    SentHistory, SentItem, WalletReply,
};
use serde::de::{DeserializeOwned, Deserializer, Error as _, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use utoipa::{ToResponse, ToSchema};

/// RFC 3339 UTC with milliseconds, e.g. `2026-01-01T00:00:00.000Z`.
pub fn time(ms: Millis) -> String {
    written(ms, str::to_owned)
}

/// Hands `f` the text of [`time`]: from a buffer on the stack for a year from 0 to 9999.
fn written<R>(ms: Millis, f: impl FnOnce(&str) -> R) -> R {
    match rfc3339_ms(ms, &mut [0; RFC3339_MS_BYTES]) {
        Some(text) => f(text),
        None => f(&chrono_time(ms)),
    }
}

/// [`time`] as chrono writes it: the reference, and the writer of years outside 0–9999
/// (`+10000-…`, `-0001-…`) and of instants chrono cannot hold (the epoch).
fn chrono_time(ms: Millis) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
const RFC3339_MS_BYTES: usize = 24;

/// Writes [`time`] into `buf` for a year from 0 to 9999 (else `None`), with the civil date
/// taken from the day number by H. Hinnant's `civil_from_days`.
fn rfc3339_ms(ms: Millis, buf: &mut [u8; RFC3339_MS_BYTES]) -> Option<&str> {
    let (days, in_day) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Days from 0000-03-01, in 400-year eras of 146,097 days.
    let z = days.checked_add(719_468)?;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = (era * 400 + yoe).checked_add(i64::from(month <= 2))?;
    if !(0..=9_999).contains(&year) {
        return None;
    }
    let fields = [
        (0, 4, year),
        (5, 2, month),
        (8, 2, day),
        (11, 2, in_day / 3_600_000),
        (14, 2, in_day / 60_000 % 60),
        (17, 2, in_day / 1_000 % 60),
        (20, 3, in_day % 1_000),
    ];
    for (at, width, mut value) in fields {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    for (at, sep) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':'), (19, b'.'), (23, b'Z')] {
        buf[at] = sep;
    }
    Some(std::str::from_utf8(buf).expect("digits and separators are ASCII"))
}

/// A time on the wire ([`time`]), written into the body from a buffer on the stack rather than
/// a `String` of its own: a claim's answer, the body the server writes most, holds one, and
/// every row of a history page one or two.
#[derive(Debug, Clone, Copy)]
pub struct Time(pub Millis);

impl Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        written(self.0, |text| s.serialize_str(text))
    }
}

/// An id written as its decimal string, straight into the body (serde_json's `collect_str`
/// formats in place).
fn as_text<T: std::fmt::Display, S: serde::Serializer>(id: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

/// [`as_text`] for an id that may be absent (written as `null`).
fn some_as_text<T: std::fmt::Display, S: serde::Serializer>(id: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.collect_str(id),
        None => s.serialize_none(),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MoneyBody {
    /// Integer fen, at least 1.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64)]
    pub amount: i64,
    /// Idempotency key: a repeat with the same id returns the first result and moves nothing.
    #[schema(pattern = "^[!-~]{1,128}$")]
    pub request_id: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AudienceBody {
    /// A group (one user is a 1:1 packet).
    #[schema(min_items = 1)]
    pub users: Option<Vec<String>>,
    /// `true`: anyone may claim (a campaign).
    pub anyone: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    pub sender: String,
    /// `lucky` or `equal`.
    #[schema(pattern = "^(lucky|equal)$")]
    pub kind: String,
    /// Integer fen.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_i64)]
    pub total_amount: i64,
    #[schema(minimum = 1)]
    pub count: i64,
    #[serde(deserialize_with = "object")]
    pub audience: AudienceBody,
    pub greeting: Option<String>,
    #[schema(minimum = 1)]
    pub expires_in_s: Option<i64>,
    #[schema(pattern = "^[!-~]{1,128}$")]
    pub request_id: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    #[schema(pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    pub user: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Wallet {
    pub user: String,
    pub balance: i64,
}

impl From<WalletReply> for Wallet {
    fn from(w: WalletReply) -> Wallet {
        Wallet { user: w.user.to_string(), balance: w.balance_fen }
    }
}

// A packet, as a send answers and as each row of a sent page says. Ids, times and names are
// written into the body from the reply's own values, not copied into `String`s first: a page
// has up to 200 rows (a `//` comment: a doc comment would become the schema's description).
#[derive(Debug, Serialize, ToSchema)]
pub struct PacketOut {
    #[serde(serialize_with = "as_text")]
    #[schema(value_type = String)]
    pub id: PacketId,
    #[schema(value_type = String)]
    pub sender: UserId,
    pub kind: &'static str,
    pub total_amount: i64,
    pub count: u32,
    pub greeting: String,
    #[schema(value_type = String)]
    pub created_at: Time,
    #[schema(value_type = String)]
    pub expires_at: Time,
    pub status: &'static str,
    pub remaining_amount: i64,
    pub remaining_count: u32,
}

impl PacketOut {
    pub fn new(
        s: PacketSummary,
        status: &'static str,
        remaining_amount: i64,
        remaining_count: u32,
    ) -> PacketOut {
        PacketOut {
            id: s.id,
            sender: s.sender,
            kind: s.kind.as_str(),
            total_amount: s.total_fen,
            count: s.count,
            greeting: s.greeting,
            created_at: Time(s.created_at_ms),
            expires_at: Time(s.expires_at_ms),
            status,
            remaining_amount,
            remaining_count,
        }
    }

    pub fn sent(i: SentItem) -> PacketOut {
        PacketOut::new(i.summary, i.status.as_str(), i.remaining_fen, i.remaining_count)
    }
}

// Written as four strings and a number, like every body here, but built without a `String`:
// the claim's answer is the body the server writes most. (A `//` comment: a doc comment would
// become the schema's description.)
#[derive(Debug, Serialize, ToSchema)]
pub struct ClaimOut {
    #[serde(serialize_with = "as_text")]
    #[schema(value_type = String)]
    pub packet_id: PacketId,
    #[schema(value_type = String)]
    pub user: UserId,
    pub amount: i64,
    #[schema(value_type = String)]
    pub at: Time,
}

impl From<ClaimReply> for ClaimOut {
    fn from(c: ClaimReply) -> ClaimOut {
        ClaimOut { packet_id: c.packet_id, user: c.user, amount: c.amount_fen, at: Time(c.at_ms) }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GrabOut {
    /// `grabbed`, or `opened` when the user already has a share.
    pub status: &'static str,
    pub packet_id: String,
    pub user: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ClaimLine {
    #[schema(value_type = String)]
    pub user: UserId,
    pub amount: i64,
    #[schema(value_type = String)]
    pub at: Time,
}

impl From<ClaimView> for ClaimLine {
    fn from(c: ClaimView) -> ClaimLine {
        ClaimLine { user: c.user, amount: c.amount_fen, at: Time(c.at_ms) }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PacketDetailsOut {
    #[serde(serialize_with = "as_text")]
    #[schema(value_type = String)]
    pub id: PacketId,
    #[schema(value_type = String)]
    pub sender: UserId,
    pub kind: &'static str,
    pub total_amount: i64,
    pub count: u32,
    pub remaining_amount: i64,
    pub remaining_count: u32,
    pub status: &'static str,
    #[schema(value_type = String)]
    pub created_at: Time,
    #[schema(value_type = String)]
    pub expires_at: Time,
    pub greeting: String,
    pub best_luck: Option<ClaimLine>,
    pub claims: Vec<ClaimLine>,
    pub next_cursor: Option<String>,
    /// Set when the packet's claims may have been moved to the archive (`hongbao archive`):
    /// it was created before this instant, so `claims` may lack some it paid.
    pub archived_before: Option<String>,
}

impl From<PacketDetails> for PacketDetailsOut {
    fn from(d: PacketDetails) -> PacketDetailsOut {
        let s = d.summary;
        PacketDetailsOut {
            id: s.id,
            sender: s.sender,
            kind: s.kind.as_str(),
            total_amount: s.total_fen,
            count: s.count,
            remaining_amount: d.remaining_fen,
            remaining_count: d.remaining_count,
            status: d.status.as_str(),
            created_at: Time(s.created_at_ms),
            expires_at: Time(s.expires_at_ms),
            greeting: s.greeting,
            best_luck: d.best_luck.map(ClaimLine::from),
            claims: d.claims.into_iter().map(ClaimLine::from).collect(),
            next_cursor: d.next_cursor.map(|c| c.to_string()),
            archived_before: d.archived_before_ms.map(time),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EntryOut {
    /// `deposit`, `withdraw`, `send`, `claim` or `refund`.
    pub kind: &'static str,
    /// Integer fen, always positive; `kind` says the direction.
    pub amount: i64,
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "some_as_text")]
    #[schema(value_type = Option<String>)]
    pub packet_id: Option<PacketId>,
    #[schema(value_type = String)]
    pub at: Time,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct EntriesOut {
    pub entries: Vec<EntryOut>,
    pub next_cursor: Option<String>,
    /// Entries before this instant may have been moved to the archive (`hongbao archive`):
    /// this history holds what is live only.
    pub archived_before: Option<String>,
}

impl From<EntriesPage> for EntriesOut {
    fn from(p: EntriesPage) -> EntriesOut {
        EntriesOut {
            entries: p
                .entries
                .into_iter()
                .map(|e| EntryOut {
                    kind: e.kind.as_str(),
                    amount: e.amount_fen,
                    packet_id: e.packet_id,
                    at: Time(e.at_ms),
                })
                .collect(),
            next_cursor: p.next_cursor.map(|c| c.to_string()),
            archived_before: p.archived_before_ms.map(time),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReceivedItemOut {
    #[serde(serialize_with = "as_text")]
    #[schema(value_type = String)]
    pub packet_id: PacketId,
    pub amount: i64,
    #[schema(value_type = String)]
    pub at: Time,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReceivedOut {
    pub count: u64,
    pub total_amount: i64,
    pub best_luck_count: u64,
    pub items: Vec<ReceivedItemOut>,
    pub next_cursor: Option<String>,
    /// Shares received before this instant may have been moved to the archive (`hongbao
    /// archive`): `items`, `count` and `total_amount` cover what is live only.
    pub archived_before: Option<String>,
}

impl From<ReceivedHistory> for ReceivedOut {
    fn from(h: ReceivedHistory) -> ReceivedOut {
        ReceivedOut {
            count: h.count,
            total_amount: h.total_fen,
            best_luck_count: h.best_luck_count,
            items: h
                .items
                .into_iter()
                .map(|i| ReceivedItemOut { packet_id: i.packet_id, amount: i.amount_fen, at: Time(i.at_ms) })
                .collect(),
            next_cursor: h.next_cursor.map(|c| c.to_string()),
            archived_before: h.archived_before_ms.map(time),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SentOut {
    pub count: u64,
    pub total_amount: i64,
    pub items: Vec<PacketOut>,
    pub next_cursor: Option<String>,
}

impl From<SentHistory> for SentOut {
    fn from(h: SentHistory) -> SentOut {
        SentOut {
            count: h.count,
            total_amount: h.total_fen,
            items: h.items.into_iter().map(PacketOut::sent).collect(),
            next_cursor: h.next_cursor.map(|c| c.to_string()),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditOut {
    pub ok: bool,
    pub deposits: i64,
    pub withdrawals: i64,
    pub balances: i64,
    pub escrow: i64,
    pub in_flight: i64,
    pub problems: Vec<String>,
}

impl From<AuditReport> for AuditOut {
    fn from(a: AuditReport) -> AuditOut {
        AuditOut {
            ok: a.ok,
            deposits: a.deposits_fen,
            withdrawals: a.withdrawals_fen,
            balances: a.balances_fen,
            escrow: a.escrow_fen,
            in_flight: a.in_flight_fen,
            problems: a.problems,
        }
    }
}

/// An error: `application/problem+json` with a stable `code` (DESIGN.md §4). It describes
/// what `error.rs` renders, for the API description only.
#[derive(Debug, Serialize, ToResponse)]
#[response(content_type = "application/problem+json")]
pub struct Problem {
    /// Always `about:blank`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The status's reason phrase.
    pub title: String,
    pub status: u16,
    /// `invalid_request`, `unauthorized`, `forbidden`, `not_eligible`, `not_found`,
    /// `insufficient_funds`, `balance_limit`, `not_grabbed`, `idempotency_conflict`,
    /// `packet_exhausted`, `packet_expired`, `rate_limited`, `overloaded`, `headers_too_large`
    /// or `internal`.
    pub code: String,
    /// What went wrong, in words.
    pub detail: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct PageQuery {
    pub limit: Option<String>,
    pub cursor: Option<String>,
    pub year: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
}

/// Deserializes a nested body struct from a JSON object only. serde's derive also takes a
/// JSON array of the fields in order (`"audience": [["bob"], null]`), which is not the
/// contract; the top-level body gets the same check in `json.rs`. Duplicate keys are refused,
/// as the derive refuses them.
fn object<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<T, D::Error> {
    struct ObjectVisitor;

    impl<'de> Visitor<'de> for ObjectVisitor {
        type Value = serde_json::Map<String, serde_json::Value>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = serde_json::Map::new();
            while let Some((key, value)) = map.next_entry::<String, serde_json::Value>()? {
                if out.contains_key(&key) {
                    return Err(A::Error::custom(format_args!("duplicate field `{key}`")));
                }
                out.insert(key, value);
            }
            Ok(out)
        }
    }

    let map = d.deserialize_map(ObjectVisitor)?;
    T::deserialize(serde_json::Value::Object(map)).map_err(D::Error::custom)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Year 0 to 9999, the years `rfc3339_ms` writes itself.
    const FOUR_DIGIT_YEARS: std::ops::RangeInclusive<Millis> = -62_167_219_200_000..=253_402_300_799_999;

    fn written_as_chrono_writes_it(ms: Millis) -> Result<(), TestCaseError> {
        let expected = chrono_time(ms);
        prop_assert_eq!(time(ms), expected.clone());
        prop_assert_eq!(serde_json::to_string(&Time(ms)).unwrap(), format!("\"{expected}\""));
        Ok(())
    }

    proptest! {
        /// A time is written as chrono writes it, whatever the instant: from year 0 to 9999 by
        /// `rfc3339_ms`, outside them by chrono.
        #[test]
        fn times_are_written_as_chrono_writes_them(ms in prop_oneof![FOUR_DIGIT_YEARS, any::<Millis>()]) {
            written_as_chrono_writes_it(ms)?;
        }
    }

    /// The edges: the epoch and just before it, a leap day, the first and last instants of
    /// the four-digit years and just outside them, and the ends of the type.
    #[test]
    fn edge_times_are_written_as_chrono_writes_them() {
        for ms in [
            0,
            -1,
            951_782_400_000,
            951_868_799_999,
            *FOUR_DIGIT_YEARS.start(),
            *FOUR_DIGIT_YEARS.start() - 1,
            *FOUR_DIGIT_YEARS.end(),
            *FOUR_DIGIT_YEARS.end() + 1,
            Millis::MIN,
            Millis::MAX,
        ] {
            written_as_chrono_writes_it(ms).unwrap();
        }
    }

    /// A claim's answer holds its ids and its time as strings, as before they were written
    /// from the reply's own values.
    #[test]
    fn a_claim_answer_is_written_as_strings() {
        let out = ClaimOut {
            packet_id: PacketId::parse("65356955429896192").unwrap(),
            user: UserId::parse("alice").unwrap(),
            amount: 138,
            at: Time(1_765_021_410_095),
        };
        assert_eq!(
            serde_json::to_value(&out).unwrap(),
            serde_json::json!({
                "packet_id": "65356955429896192",
                "user": "alice",
                "amount": 138,
                "at": "2025-12-06T11:43:30.095Z",
            })
        );
    }

    /// History rows write their ids, names, kinds and times as strings, as they did when each
    /// was a `String` of its own; an entry without a packet leaves the field out.
    #[test]
    fn history_rows_are_written_as_strings() {
        let summary = PacketSummary {
            id: PacketId::parse("65356955429896192").unwrap(),
            sender: UserId::parse("bob").unwrap(),
            kind: hongbao_core::Kind::Lucky,
            total_fen: 10_000,
            count: 10,
            greeting: "恭喜发财 \"quoted\"".to_string(),
            created_at_ms: 1_765_021_410_095,
            expires_at_ms: 1_765_107_810_095,
        };
        let sent = SentItem {
            summary: summary.clone(),
            status: hongbao_core::PacketStatus::Exhausted,
            remaining_fen: 0,
            remaining_count: 0,
        };
        assert_eq!(
            serde_json::to_value(PacketOut::sent(sent)).unwrap(),
            serde_json::json!({
                "id": "65356955429896192",
                "sender": "bob",
                "kind": "lucky",
                "total_amount": 10_000,
                "count": 10,
                "greeting": "恭喜发财 \"quoted\"",
                "created_at": "2025-12-06T11:43:30.095Z",
                "expires_at": "2025-12-07T11:43:30.095Z",
                "status": "exhausted",
                "remaining_amount": 0,
                "remaining_count": 0,
            })
        );
        let received =
            ReceivedItemOut { packet_id: summary.id, amount: 138, at: Time(summary.created_at_ms) };
        assert_eq!(
            serde_json::to_value(&received).unwrap(),
            serde_json::json!({ "packet_id": "65356955429896192", "amount": 138, "at": "2025-12-06T11:43:30.095Z" })
        );
        let claim = EntryOut { kind: "claim", amount: 138, packet_id: Some(summary.id), at: Time(0) };
        assert_eq!(
            serde_json::to_string(&claim).unwrap(),
            r#"{"kind":"claim","amount":138,"packet_id":"65356955429896192","at":"1970-01-01T00:00:00.000Z"}"#
        );
        let deposit = EntryOut { kind: "deposit", amount: 500, packet_id: None, at: Time(0) };
        assert_eq!(
            serde_json::to_string(&deposit).unwrap(),
            r#"{"kind":"deposit","amount":500,"at":"1970-01-01T00:00:00.000Z"}"#
        );
        let line = ClaimLine::from(ClaimView { user: summary.sender.clone(), amount_fen: 138, at_ms: 0 });
        assert_eq!(
            serde_json::to_value(&line).unwrap(),
            serde_json::json!({ "user": "bob", "amount": 138, "at": "1970-01-01T00:00:00.000Z" })
        );
    }
}
