//! Limits on what one request may ask for, and the validation of a send against them.
//!
//! Every limit has a default that suits a chat app's group packets and a campaign's
//! 100,000-share packets alike; each one is set in the config file under `[limits]`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{RequestId, UserId};
use crate::money::{Amount, AMOUNT_MAX_FEN};
use crate::packet::{Audience, Kind};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most shares in one packet. Campaigns need 100,000; each share costs the engine a few
    /// dozen bytes while the packet is active.
    pub count_max: u32,
    /// Largest packet, in fen (default 100 million yuan).
    pub total_max_fen: i64,
    /// Largest average share (total / count), in fen (default 100,000 yuan). Lucky shares are
    /// at most twice the remaining average, so this also bounds a single share.
    pub share_average_max_fen: i64,
    /// Most users in a group audience: the list travels in one request body.
    pub audience_max: u32,
    /// Shortest and longest life of a packet, and the default when a send names none.
    pub expires_in_s_min: i64,
    pub expires_in_s_max: i64,
    pub expires_in_s_default: i64,
    /// How long a grabbed share waits to be opened before it returns to the pool.
    pub hold_s: i64,
    /// Longest greeting, in characters.
    pub greeting_chars_max: usize,
    /// Largest single deposit or withdrawal, in fen.
    pub transfer_max_fen: i64,
    /// Largest wallet balance, in fen: deposits past it are refused.
    pub balance_max_fen: i64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            count_max: 100_000,
            total_max_fen: 10_000_000_000,
            share_average_max_fen: 10_000_000,
            audience_max: 10_000,
            expires_in_s_min: 1,
            expires_in_s_max: 7 * 24 * 3600,
            expires_in_s_default: 24 * 3600,
            hold_s: 30,
            greeting_chars_max: 256,
            transfer_max_fen: AMOUNT_MAX_FEN,
            balance_max_fen: 1_000_000_000_000_000,
        }
    }
}

/// A send as the API parsed it: ids are already valid, numbers are not yet checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRequest {
    pub sender: UserId,
    pub kind: Kind,
    pub total_fen: i64,
    pub count: i64,
    pub audience: Audience,
    pub greeting: Option<String>,
    pub expires_in_s: Option<i64>,
    pub request_id: RequestId,
}

/// A send that passed every limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSend {
    pub sender: UserId,
    pub kind: Kind,
    pub total: Amount,
    pub count: u32,
    pub audience: Audience,
    pub greeting: String,
    pub expires_in_s: i64,
    pub request_id: RequestId,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SendError {
    #[error("count must be between 1 and {0}")]
    CountOutOfRange(u32),
    #[error("total_amount must be between 1 and {0} fen")]
    TotalOutOfRange(i64),
    #[error("total_amount must be at least 1 fen per share")]
    TotalBelowCount,
    #[error("an equal packet's total_amount must divide exactly by count")]
    NotDivisible,
    #[error("the average share must be at most {0} fen")]
    ShareTooLarge(i64),
    #[error("audience must list at least one user, or be anyone")]
    EmptyAudience,
    #[error("audience may list at most {0} users")]
    AudienceTooLarge(u32),
    #[error("count must not exceed the number of users in the audience")]
    CountAboveAudience,
    #[error("expires_in_s must be between {0} and {1}")]
    ExpiryOutOfRange(i64, i64),
    #[error("greeting must be at most {0} characters")]
    GreetingTooLong(usize),
}

impl Limits {
    pub fn validate_send(&self, req: SendRequest) -> Result<ValidSend, SendError> {
        let count = u32::try_from(req.count)
            .ok()
            .filter(|c| (1..=self.count_max).contains(c))
            .ok_or(SendError::CountOutOfRange(self.count_max))?;
        if req.total_fen < 1 || req.total_fen > self.total_max_fen {
            return Err(SendError::TotalOutOfRange(self.total_max_fen));
        }
        let total = Amount::new(req.total_fen).map_err(|_| SendError::TotalOutOfRange(self.total_max_fen))?;
        if total.fen() < i64::from(count) {
            return Err(SendError::TotalBelowCount);
        }
        if req.kind == Kind::Equal && total.fen() % i64::from(count) != 0 {
            return Err(SendError::NotDivisible);
        }
        if total.fen() / i64::from(count) > self.share_average_max_fen {
            return Err(SendError::ShareTooLarge(self.share_average_max_fen));
        }
        if let Audience::Users(users) = &req.audience {
            if users.is_empty() {
                return Err(SendError::EmptyAudience);
            }
            if users.len() > self.audience_max as usize {
                return Err(SendError::AudienceTooLarge(self.audience_max));
            }
            if count as usize > users.len() {
                return Err(SendError::CountAboveAudience);
            }
        }
        let expires_in_s = req.expires_in_s.unwrap_or(self.expires_in_s_default);
        if !(self.expires_in_s_min..=self.expires_in_s_max).contains(&expires_in_s) {
            return Err(SendError::ExpiryOutOfRange(self.expires_in_s_min, self.expires_in_s_max));
        }
        let greeting = req.greeting.unwrap_or_default();
        if greeting.chars().count() > self.greeting_chars_max {
            return Err(SendError::GreetingTooLong(self.greeting_chars_max));
        }
        Ok(ValidSend {
            sender: req.sender,
            kind: req.kind,
            total,
            count,
            audience: req.audience,
            greeting,
            expires_in_s,
            request_id: req.request_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(kind: Kind, total_fen: i64, count: i64, audience: Audience) -> SendRequest {
        SendRequest {
            sender: UserId::parse("s").unwrap(),
            kind,
            total_fen,
            count,
            audience,
            greeting: None,
            expires_in_s: None,
            request_id: RequestId::parse("r1").unwrap(),
        }
    }

    fn users(n: usize) -> Audience {
        Audience::users((0..n).map(|i| UserId::parse(&format!("u{i}")).unwrap()))
    }

    #[test]
    fn table_of_bad_sends() {
        let l = Limits::default();
        let cases = [
            (req(Kind::Lucky, 100, 0, Audience::Anyone), SendError::CountOutOfRange(l.count_max)),
            (req(Kind::Lucky, 100, -3, Audience::Anyone), SendError::CountOutOfRange(l.count_max)),
            (
                req(Kind::Lucky, 10_000_000, 100_001, Audience::Anyone),
                SendError::CountOutOfRange(l.count_max),
            ),
            (req(Kind::Lucky, 0, 1, Audience::Anyone), SendError::TotalOutOfRange(l.total_max_fen)),
            (req(Kind::Lucky, -5, 1, Audience::Anyone), SendError::TotalOutOfRange(l.total_max_fen)),
            (req(Kind::Lucky, i64::MAX, 1, Audience::Anyone), SendError::TotalOutOfRange(l.total_max_fen)),
            (req(Kind::Lucky, 3, 4, Audience::Anyone), SendError::TotalBelowCount),
            (req(Kind::Equal, 10, 3, Audience::Anyone), SendError::NotDivisible),
            (req(Kind::Lucky, 10, 1, users(0)), SendError::EmptyAudience),
            (req(Kind::Lucky, 10, 3, users(2)), SendError::CountAboveAudience),
            (
                req(Kind::Lucky, 100_000_000, 1, Audience::Anyone),
                SendError::ShareTooLarge(l.share_average_max_fen),
            ),
        ];
        for (r, want) in cases {
            assert_eq!(l.validate_send(r.clone()), Err(want), "{r:?}");
        }
        let mut r = req(Kind::Lucky, 10, 1, Audience::Anyone);
        r.expires_in_s = Some(0);
        assert!(matches!(l.validate_send(r), Err(SendError::ExpiryOutOfRange(..))));
        let mut r = req(Kind::Lucky, 10, 1, Audience::Anyone);
        r.greeting = Some("x".repeat(257));
        assert!(matches!(l.validate_send(r), Err(SendError::GreetingTooLong(_))));
    }

    #[test]
    fn good_send() {
        let v = Limits::default().validate_send(req(Kind::Equal, 300, 3, users(3))).unwrap();
        assert_eq!(v.total.fen(), 300);
        assert_eq!(v.count, 3);
        assert_eq!(v.expires_in_s, 24 * 3600);
    }
}
