//! Money: integer fen, checked arithmetic, never a float.

use thiserror::Error;

/// The largest amount one request may carry: 10^12 fen (ten billion yuan). It keeps every sum
/// of a few million amounts far from `i64::MAX`, so checked arithmetic only fails on a bug.
pub const AMOUNT_MAX_FEN: i64 = 1_000_000_000_000;

/// A positive amount of money in fen, at most [`AMOUNT_MAX_FEN`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(i64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AmountError {
    #[error("amount must be at least 1 fen")]
    NotPositive,
    #[error("amount must be at most {AMOUNT_MAX_FEN} fen")]
    TooLarge,
}

impl Amount {
    pub fn new(fen: i64) -> Result<Amount, AmountError> {
        if fen < 1 {
            Err(AmountError::NotPositive)
        } else if fen > AMOUNT_MAX_FEN {
            Err(AmountError::TooLarge)
        } else {
            Ok(Amount(fen))
        }
    }

    pub fn fen(self) -> i64 {
        self.0
    }
}

/// Adds two balances; `None` means an overflow, which the caller turns into an error value.
pub fn add_fen(a: i64, b: i64) -> Option<i64> {
    a.checked_add(b)
}

/// Subtracts `b` from `a` when the result stays non-negative.
pub fn sub_fen(a: i64, b: i64) -> Option<i64> {
    a.checked_sub(b).filter(|v| *v >= 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amount_bounds() {
        assert_eq!(Amount::new(0), Err(AmountError::NotPositive));
        assert_eq!(Amount::new(-5), Err(AmountError::NotPositive));
        assert_eq!(Amount::new(AMOUNT_MAX_FEN + 1), Err(AmountError::TooLarge));
        assert_eq!(Amount::new(1).unwrap().fen(), 1);
        assert_eq!(Amount::new(AMOUNT_MAX_FEN).unwrap().fen(), AMOUNT_MAX_FEN);
    }

    #[test]
    fn checked_helpers() {
        assert_eq!(add_fen(i64::MAX, 1), None);
        assert_eq!(sub_fen(5, 6), None);
        assert_eq!(sub_fen(6, 6), Some(0));
    }
}
