//! Arbitrary text through the id parsers: they never panic, accept exactly what their rules
//! say, and what they accept comes back out unchanged (`UserId`, `RequestId`) or parses back
//! to the same id (`PacketId`, which also survives its store form `as_i64` / `from_raw`).

#![no_main]

use hongbao_core::ids::{REQUEST_ID_LEN_MAX, SETS_MAX, USER_ID_LEN_MAX};
use hongbao_core::{Kind, PacketId, RequestId, UserId};
use libfuzzer_sys::fuzz_target;

/// 2025-01-01T00:00:00Z, where packet id time starts.
const PACKET_EPOCH_MS: i64 = 1_735_689_600_000;

fuzz_target!(|input: (&str, u64)| {
    let (s, raw) = input;

    let user_rule = (1..=USER_ID_LEN_MAX).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    match UserId::parse(s) {
        Ok(id) => {
            assert!(user_rule, "UserId accepted {s:?}");
            assert_eq!(id.as_str(), s);
            assert_eq!(id.to_string(), s);
        }
        Err(_) => assert!(!user_rule, "UserId refused {s:?}"),
    }

    let request_rule = (1..=REQUEST_ID_LEN_MAX).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic());
    match RequestId::parse(s) {
        Ok(id) => {
            assert!(request_rule, "RequestId accepted {s:?}");
            assert_eq!(id.as_str(), s);
        }
        Err(_) => assert!(!request_rule, "RequestId refused {s:?}"),
    }

    if let Ok(id) = PacketId::parse(s) {
        assert!(!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()), "PacketId accepted {s:?}");
        assert_eq!(s.parse::<u64>().ok(), Some(id.raw()), "PacketId {s:?} read as {}", id.raw());
        packet_id_round_trips(id);
    }
    match PacketId::from_raw(raw) {
        Ok(id) => {
            assert!(raw != 0 && raw < 1 << 63, "from_raw accepted {raw}");
            packet_id_round_trips(id);
        }
        Err(_) => assert!(raw == 0 || raw >= 1 << 63, "from_raw refused {raw}"),
    }

    if let Some(kind) = Kind::parse(s) {
        assert_eq!(kind.as_str(), s);
    }
});

fn packet_id_round_trips(id: PacketId) {
    assert!(id.raw() > 0);
    assert_eq!(PacketId::parse(&id.to_string()), Ok(id), "{id} does not parse back");
    assert!(id.as_i64() > 0, "{id} is not positive as i64");
    assert_eq!(PacketId::from_raw(id.as_i64() as u64), Ok(id));
    assert!(id.set() < SETS_MAX);
    assert!(id.created_s_ms() >= PACKET_EPOCH_MS && id.created_s_ms() % 1000 == 0);
}
