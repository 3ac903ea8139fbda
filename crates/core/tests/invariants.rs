//! Property tests of DESIGN.md §2 items 2–5 on the packet state machine, against a model kept
//! here: random packets, random users (members, outsiders, repeats), random grab / open /
//! claim / clock moves / expiry, and every invariant checked after every step.

use std::collections::BTreeMap;

use hongbao_core::{
    lucky_share, Audience, ClaimError, GrabOutcome, Kind, Limits, Packet, PacketId, PacketIdGen, RequestId,
    SendRequest, UserId,
};
use proptest::prelude::*;

const T0_MS: i64 = 1_767_225_600_000;
const HOLD_MS: i64 = 5_000;

#[derive(Debug, Clone)]
enum Op {
    Grab(usize),
    Open(usize),
    Claim(usize),
    Wait(i64),
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..40).prop_map(Op::Grab),
        3 => (0usize..40).prop_map(Op::Open),
        6 => (0usize..40).prop_map(Op::Claim),
        2 => (0i64..8_000).prop_map(Op::Wait),
        1 => Just(Op::Expire),
    ]
}

#[derive(Debug, Clone)]
struct Spec {
    kind: Kind,
    count: u32,
    per_share: i64,
    extra: i64,
    group: Option<usize>,
    seed: u64,
}

fn spec() -> impl Strategy<Value = Spec> {
    (any::<bool>(), 1u32..=30, 1i64..=500, 0i64..1_000, proptest::option::of(1usize..=35), any::<u64>())
        .prop_filter("a group holds at least count users", |(_, count, _, _, group, _)| {
            group.is_none_or(|g| g >= *count as usize)
        })
        .prop_map(|(lucky, count, per_share, extra, group, seed)| Spec {
            kind: if lucky { Kind::Lucky } else { Kind::Equal },
            count,
            per_share,
            extra,
            group,
            seed,
        })
}

fn user(i: usize) -> UserId {
    UserId::parse(&format!("u{i}")).unwrap()
}

fn make(spec: &Spec) -> Packet {
    let total =
        spec.per_share * i64::from(spec.count) + if spec.kind == Kind::Lucky { spec.extra } else { 0 };
    let audience = match spec.group {
        None => Audience::Anyone,
        Some(n) => Audience::users((0..n).map(user)),
    };
    let send = Limits::default()
        .validate_send(SendRequest {
            sender: user(999),
            kind: spec.kind,
            total_fen: total,
            count: i64::from(spec.count),
            audience,
            greeting: None,
            expires_in_s: Some(60),
            request_id: RequestId::parse("r").unwrap(),
        })
        .expect("valid packet");
    let id: PacketId = PacketIdGen::new(0, None).next(T0_MS);
    Packet::new(id, &send, T0_MS, spec.seed)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_step_keeps_the_invariants(spec in spec(), ops in proptest::collection::vec(op(), 1..120)) {
        let mut p = make(&spec);
        let total = p.header().total_fen;
        let count = p.header().count;
        let member = |i: usize| spec.group.is_none_or(|g| i < g);
        let mut now = T0_MS;
        // The model: what each user was paid, in opening order, and the refund.
        let mut paid: BTreeMap<usize, i64> = BTreeMap::new();
        let mut order: Vec<i64> = Vec::new();
        let mut refunded: Option<i64> = None;
        for op in ops {
            let before_fen = p.remaining_fen();
            let before_count = p.remaining_count();
            let (who, result) = match op {
                Op::Wait(ms) => { now += ms; continue; }
                Op::Expire => {
                    let r = p.expire(now);
                    if let Some(r) = r {
                        prop_assert!(refunded.is_none(), "refunded twice");
                        prop_assert_eq!(r, total - order.iter().sum::<i64>(), "refund is exactly the unclaimed rest");
                        refunded = Some(r);
                    }
                    continue;
                }
                Op::Grab(i) => {
                    let r = p.grab(&user(i), now, HOLD_MS);
                    match &r {
                        Ok(GrabOutcome::AlreadyOpened(c)) => prop_assert_eq!(Some(&c.amount_fen), paid.get(&i)),
                        Ok(GrabOutcome::Grabbed { hold_expires_at_ms }) => {
                            prop_assert!(member(i) && !paid.contains_key(&i));
                            prop_assert!(*hold_expires_at_ms > now);
                        }
                        Err(_) => {}
                    }
                    (i, r.map(|_| None))
                }
                Op::Open(i) => (i, p.open(&user(i), now).map(|o| Some((o.claim.amount_fen, o.fresh)))),
                Op::Claim(i) => (i, p.claim(&user(i), now).map(|o| Some((o.claim.amount_fen, o.fresh)))),
            };
            match result {
                Ok(Some((amount, fresh))) => {
                    prop_assert!(member(who), "an outsider was paid");
                    if fresh {
                        // §2.5: one share per user; §2.3: at least 1 fen; §2.4: double average.
                        prop_assert!(!paid.contains_key(&who), "user {} paid twice", who);
                        prop_assert!(amount >= 1);
                        if before_count > 1 {
                            if spec.kind == Kind::Lucky {
                                prop_assert!(amount <= 2 * before_fen / i64::from(before_count), "double-average rule");
                            }
                        } else {
                            prop_assert_eq!(amount, before_fen, "the last share takes the rest");
                        }
                        if spec.kind == Kind::Equal {
                            prop_assert_eq!(amount, total / i64::from(count));
                        }
                        paid.insert(who, amount);
                        order.push(amount);
                    } else {
                        prop_assert_eq!(paid.get(&who), Some(&amount), "a repeat returns the same share");
                    }
                }
                Ok(None) => {}
                Err(ClaimError::NotEligible) => prop_assert!(!member(who)),
                Err(ClaimError::Expired) => prop_assert!(now >= p.header().expires_at_ms || refunded.is_some()),
                Err(ClaimError::Exhausted) | Err(ClaimError::NotGrabbed) => prop_assert!(member(who)),
            }
            // §2.2 and conservation within the packet, after every step.
            let paid_fen: i64 = order.iter().sum();
            prop_assert!(order.len() <= count as usize);
            prop_assert!(paid_fen <= total);
            prop_assert_eq!(p.opened_fen(), paid_fen);
            prop_assert_eq!(paid_fen + p.refunded_fen() + p.escrow_fen(), total);
            if p.remaining_count() == 0 {
                prop_assert_eq!(paid_fen, total, "§2.3: a fully opened packet sums to its total");
                let best = p.best_luck().expect("best luck once exhausted");
                let max = *order.iter().max().unwrap();
                prop_assert_eq!(best.amount_fen, max);
                prop_assert_eq!(best.index as usize, order.iter().position(|a| *a == max).unwrap(), "ties go to the earliest");
            } else {
                prop_assert!(p.best_luck().is_none());
            }
        }
    }

    #[test]
    fn restore_continues_with_the_same_amounts(spec in spec(), claimers in 1usize..30, split in 0usize..30) {
        let mut a = make(&spec);
        let n = claimers.min(spec.count as usize).min(spec.group.unwrap_or(usize::MAX));
        let split = split.min(n);
        for i in 0..split {
            a.claim(&user(i), T0_MS).unwrap();
        }
        let claims: Vec<_> = a.claims().cloned().collect();
        let mut b = Packet::restore(a.header().clone(), a.status(), a.refunded_fen(), claims);
        prop_assert_eq!(b.remaining_fen(), a.remaining_fen());
        prop_assert_eq!(b.remaining_count(), a.remaining_count());
        for i in split..n {
            let x = a.claim(&user(i), T0_MS).unwrap().claim.amount_fen;
            let y = b.claim(&user(i), T0_MS).unwrap().claim.amount_fen;
            prop_assert_eq!(x, y, "the amount of a share depends only on the seed and the state");
        }
    }

    #[test]
    fn lucky_share_is_in_range(seed in any::<u64>(), index in 0u32..100_000, count in 1u32..100_000, extra in 0i64..10_000_000) {
        let remaining = i64::from(count) + extra;
        let s = lucky_share(seed, index, remaining, count);
        prop_assert!(s >= 1);
        prop_assert!(remaining - s >= i64::from(count) - 1, "leaves 1 fen for every later share");
        if count == 1 {
            prop_assert_eq!(s, remaining);
        } else {
            prop_assert!(s <= 2 * remaining / i64::from(count));
        }
    }

    #[test]
    fn accepted_sends_are_well_formed(total in -10i64..1_000_000_000_000, count in -5i64..200_000, equal in any::<bool>()) {
        let l = Limits::default();
        let req = SendRequest {
            sender: user(1),
            kind: if equal { Kind::Equal } else { Kind::Lucky },
            total_fen: total,
            count,
            audience: Audience::Anyone,
            greeting: None,
            expires_in_s: None,
            request_id: RequestId::parse("r").unwrap(),
        };
        if let Ok(v) = l.validate_send(req) {
            prop_assert!(v.count >= 1 && v.count <= l.count_max);
            prop_assert!(v.total.fen() >= i64::from(v.count) && v.total.fen() <= l.total_max_fen);
            prop_assert!(!equal || v.total.fen() % i64::from(v.count) == 0);
            prop_assert!(v.total.fen() / i64::from(v.count) <= l.share_average_max_fen);
        }
    }
}
