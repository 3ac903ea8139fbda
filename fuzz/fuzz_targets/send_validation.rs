//! Arbitrary send numbers through `Limits::validate_send`, under the default limits and under
//! arbitrary ones: it never panics, it accepts exactly the sends a plain reading of the rules
//! accepts, and an accepted send carries what was asked with every limit met.

#![no_main]

use arbitrary::Arbitrary;
use hongbao_core::money::AMOUNT_MAX_FEN;
use hongbao_core::{Audience, Kind, Limits, RequestId, SendRequest, UserId};
use libfuzzer_sys::fuzz_target;

/// Most users in a fuzzed audience: enough to cross small fuzzed limits, few enough that
/// every execution stays fast.
const AUDIENCE_FUZZ_MAX: usize = 300;

#[derive(Debug, Arbitrary)]
struct Input {
    limits: Option<FuzzLimits>,
    equal: bool,
    /// Folds `total_fen` and `count` into small ranges around the limits, so that sends are
    /// accepted often enough to check what an accepted send carries.
    small: bool,
    total_fen: i64,
    count: i64,
    /// `None` is anyone; else how many distinct users the group lists.
    audience: Option<u16>,
    greeting: Option<String>,
    expires_in_s: Option<i64>,
}

/// Limits as a config file may set them, folded into ranges where a send can pass (a raw
/// arbitrary minimum above its maximum would refuse everything and test nothing).
#[derive(Debug, Arbitrary)]
struct FuzzLimits {
    count_max: u32,
    total_max_fen: i64,
    share_average_max_fen: i64,
    audience_max: u16,
    expires_in_s_min: i64,
    expires_in_s_span: i64,
    expires_in_s_default: i64,
    greeting_chars_max: u16,
}

impl FuzzLimits {
    fn limits(&self) -> Limits {
        let expires_in_s_min = self.expires_in_s_min.rem_euclid(100);
        Limits {
            count_max: 1 + self.count_max % 1_000,
            // Up to twice the largest amount: the cap on `Amount` must still hold.
            total_max_fen: 1 + self.total_max_fen.rem_euclid(2 * AMOUNT_MAX_FEN),
            share_average_max_fen: 1 + self.share_average_max_fen.rem_euclid(AMOUNT_MAX_FEN),
            audience_max: u32::from(self.audience_max % 400),
            expires_in_s_min,
            expires_in_s_max: expires_in_s_min + self.expires_in_s_span.rem_euclid(1_000_000),
            // Sometimes outside [min, max]: then a send that names no expiry is refused.
            expires_in_s_default: self.expires_in_s_default.rem_euclid(1_100_000),
            greeting_chars_max: usize::from(self.greeting_chars_max % 300),
            ..Limits::default()
        }
    }
}

fuzz_target!(|input: Input| {
    let limits = input.limits.as_ref().map_or_else(Limits::default, FuzzLimits::limits);
    let (total_fen, count) = if input.small {
        (input.total_fen.rem_euclid(100_000) - 10, input.count.rem_euclid(1_100) - 10)
    } else {
        (input.total_fen, input.count)
    };
    let kind = if input.equal { Kind::Equal } else { Kind::Lucky };
    let audience = match input.audience {
        None => Audience::Anyone,
        Some(n) => Audience::users(
            (0..usize::from(n) % (AUDIENCE_FUZZ_MAX + 1))
                .map(|i| UserId::parse(&format!("u{i}")).expect("a valid user id")),
        ),
    };
    let req = SendRequest {
        sender: UserId::parse("sender").expect("a valid user id"),
        kind,
        total_fen,
        count,
        audience: audience.clone(),
        greeting: input.greeting.clone(),
        expires_in_s: input.expires_in_s,
        request_id: RequestId::parse("fuzz-1").expect("a valid request id"),
    };

    let want = model(&limits, &input, total_fen, count, &audience);
    match limits.validate_send(req) {
        Ok(v) => {
            assert!(want, "accepted a send the rules refuse: {input:?}");
            let (total, shares) = (v.total.fen(), i64::from(v.count));
            assert_eq!((total, shares), (total_fen, count), "the send changed its numbers");
            assert!(v.count >= 1 && v.count <= limits.count_max);
            assert!(total >= shares && total <= limits.total_max_fen && total <= AMOUNT_MAX_FEN);
            assert!(total / shares <= limits.share_average_max_fen);
            if v.kind == Kind::Equal {
                assert_eq!(total % shares, 0);
                assert!(hongbao_core::equal_share(total, v.count) >= 1);
            }
            assert!((limits.expires_in_s_min..=limits.expires_in_s_max).contains(&v.expires_in_s));
            assert!(v.greeting.chars().count() <= limits.greeting_chars_max);
            assert_eq!(v.greeting, input.greeting.clone().unwrap_or_default());
            assert_eq!(v.audience, audience);
            if let Audience::Users(users) = &v.audience {
                assert!(!users.is_empty() && users.len() >= v.count as usize);
                assert!(users.len() <= limits.audience_max as usize);
            }
            // Doubling the total (the double-average rule) stays far from overflow.
            assert!(total.checked_mul(2).is_some());
        }
        Err(e) => {
            assert!(!want, "refused a send the rules accept ({e}): {input:?}");
            assert!(!e.to_string().is_empty());
        }
    }
});

/// The rules of `validate_send` read plainly, one after another.
fn model(l: &Limits, input: &Input, total: i64, count: i64, audience: &Audience) -> bool {
    let count_ok = count >= 1 && count <= i64::from(l.count_max);
    let total_ok = total >= 1 && total <= l.total_max_fen && total <= AMOUNT_MAX_FEN;
    if !count_ok || !total_ok || total < count {
        return false;
    }
    if input.equal && total % count != 0 {
        return false;
    }
    if total / count > l.share_average_max_fen {
        return false;
    }
    if let Audience::Users(users) = audience {
        let n = users.len();
        if n == 0 || n > l.audience_max as usize || count as usize > n {
            return false;
        }
    }
    let expires_in_s = input.expires_in_s.unwrap_or(l.expires_in_s_default);
    if expires_in_s < l.expires_in_s_min || expires_in_s > l.expires_in_s_max {
        return false;
    }
    input.greeting.as_deref().unwrap_or("").chars().count() <= l.greeting_chars_max
}
