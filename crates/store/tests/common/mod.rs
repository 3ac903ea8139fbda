//! What the store's tests share across its back ends (`sqlite.rs`, `postgres.rs`): the
//! dates they write at, row builders, `world` (one batch that touches every table), and the
//! cases both must pass, each run by both with its own way to open the store.

use hongbao_core::packet::PacketHeader;
use hongbao_core::{AmountRule, Audience, Claim, Kind, PacketId, PacketIdGen, PacketStatus, UserId};
use hongbao_store::{
    Batch, ClaimRow, Entry, EntryKind, IdemRecord, IdemResult, OutboxItem, PacketUpdate, Paging, Reader,
    Span, Store, Totals,
};

/// 2026-01-01T00:00:00Z.
pub const Y2026_MS: i64 = 1_767_225_600_000;
/// 2027-01-01T00:00:00Z.
pub const Y2027_MS: i64 = 1_798_761_600_000;
/// 2025-06-01T00:00:00Z.
pub const MID_2025_MS: i64 = 1_748_736_000_000;

pub fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

pub fn span(from_ms: i64, to_ms: i64) -> Span {
    Span { from_ms, to_ms }
}

pub fn page<C>(before: Option<C>, limit: u32) -> Paging<C> {
    Paging { before, limit }
}

pub fn header(
    id: PacketId,
    sender: &str,
    kind: Kind,
    total_fen: i64,
    count: u32,
    audience: Audience,
    at_ms: i64,
) -> PacketHeader {
    PacketHeader {
        id,
        sender: user(sender),
        kind,
        total_fen,
        count,
        audience,
        greeting: "恭喜发财".to_owned(),
        created_at_ms: at_ms,
        expires_at_ms: at_ms + 86_400_000,
        // Past i64::MAX: the bit-cast must round-trip.
        seed: u64::MAX - 7,
        amount_rule: AmountRule::CURRENT,
    }
}

pub fn claim(who: &str, amount_fen: i64, index: u32, at_ms: i64) -> Claim {
    Claim { user: user(who), amount_fen, at_ms, index }
}

pub fn entry(who: &str, kind: EntryKind, amount_fen: i64, packet_id: Option<PacketId>, at_ms: i64) -> Entry {
    Entry { user: user(who), kind, amount_fen, packet_id, at_ms }
}

pub fn outbox(target_set: u32, seq: u64, who: &str, amount_fen: i64, packet_id: PacketId) -> OutboxItem {
    OutboxItem { target_set, seq, user: user(who), amount_fen, packet_id, at_ms: Y2026_MS + 10 }
}

/// What `world` wrote, to compare against what comes back.
pub struct World {
    pub active: PacketId,
    pub exhausted: PacketId,
    pub batch: Batch,
}

/// alice deposits 1,000 and sends two packets: `active` (lucky, 300 fen in 3 shares to bob and
/// carol; bob opened 120) and `exhausted` (equal, 200 fen in 2 shares to anyone; bob and dave
/// opened 100 each, dave's wallet lives in set 1 so his credit goes through the outbox).
pub fn world() -> World {
    world_at(0, Y2026_MS)
}

/// The same as `world`, with packet ids of set `set` made at `t`.
pub fn world_at(set: u32, t: i64) -> World {
    let mut ids = PacketIdGen::new(set, None);
    let active = ids.next(t);
    let exhausted = ids.next(t);
    let batch = Batch {
        wallets: vec![(user("alice"), 500), (user("bob"), 220), (user("carol"), 0)],
        credits: vec![],
        entries: vec![
            entry("alice", EntryKind::Deposit, 1_000, None, t),
            entry("alice", EntryKind::Send, 300, Some(active), t + 1),
            entry("alice", EntryKind::Send, 200, Some(exhausted), t + 2),
            entry("bob", EntryKind::Claim, 120, Some(active), t + 3),
            entry("bob", EntryKind::Claim, 100, Some(exhausted), t + 4),
        ],
        new_packets: vec![
            header(
                active,
                "alice",
                Kind::Lucky,
                300,
                3,
                Audience::users([user("carol"), user("bob")]),
                t + 1,
            ),
            header(exhausted, "alice", Kind::Equal, 200, 2, Audience::Anyone, t + 2),
        ],
        packet_updates: vec![
            PacketUpdate {
                id: active,
                status: PacketStatus::Active,
                opened_count: 1,
                opened_fen: 120,
                refunded_fen: 0,
                best: None,
            },
            PacketUpdate {
                id: exhausted,
                status: PacketStatus::Exhausted,
                opened_count: 2,
                opened_fen: 200,
                refunded_fen: 0,
                best: Some((user("bob"), 100)),
            },
        ],
        claims: vec![
            ClaimRow { packet_id: active, claim: claim("bob", 120, 0, t + 3) },
            ClaimRow { packet_id: exhausted, claim: claim("bob", 100, 0, t + 4) },
            ClaimRow { packet_id: exhausted, claim: claim("dave", 100, 1, t + 5) },
        ],
        outbox_new: vec![outbox(1, 1, "dave", 100, exhausted)],
        outbox_acked: vec![],
        watermarks: vec![(1, 4)],
        idempotency: vec![
            IdemRecord {
                user: user("alice"),
                request_id: "dep-1".to_owned(),
                fingerprint: u64::MAX,
                result: IdemResult::Deposit { balance_fen: 1_000 },
                at_ms: t,
            },
            IdemRecord {
                user: user("alice"),
                request_id: "send-1".to_owned(),
                fingerprint: 42,
                result: IdemResult::Send { packet_id: active },
                at_ms: t + 1,
            },
        ],
        totals: Some(Totals { deposits_fen: 1_000, withdrawals_fen: 0 }),
    };
    World { active, exhausted, batch }
}

pub fn sorted_claims<'a>(claims: impl Iterator<Item = &'a Claim>) -> Vec<Claim> {
    let mut v: Vec<Claim> = claims.cloned().collect();
    v.sort_by_key(|c| c.index);
    v
}

// The cases both back ends must pass, each given a way to open (and reopen) the same store.

pub fn reopen_loads_exactly_what_was_committed<S: Store, R: Reader>(open: impl Fn() -> (S, R)) {
    let w = world();
    {
        let (mut store, _reader) = open();
        store.commit(&w.batch).unwrap();
    }

    let (mut store, _reader) = open();
    let loaded = store.load(0).unwrap();

    let mut wallets = loaded.wallets.clone();
    wallets.sort();
    assert_eq!(wallets, vec![(user("alice"), 500), (user("bob"), 220), (user("carol"), 0)]);

    assert_eq!(loaded.active_packets.len(), 1, "the exhausted packet is not loaded");
    let p = &loaded.active_packets[0];
    assert_eq!(p.header(), &w.batch.new_packets[0]);
    assert_eq!(p.status(), PacketStatus::Active);
    assert_eq!((p.opened_count(), p.opened_fen(), p.escrow_fen()), (1, 120, 180));
    assert_eq!(sorted_claims(p.claims()), vec![claim("bob", 120, 0, Y2026_MS + 3)]);
    assert!(p.header().audience.admits(&user("carol")));
    assert!(!p.header().audience.admits(&user("dave")));

    assert_eq!(loaded.max_packet_id, Some(w.exhausted));
    assert_eq!(loaded.escrow_fen, 180);
    assert_eq!(loaded.idempotency.len(), 2);
    for rec in &w.batch.idempotency {
        assert!(loaded.idempotency.contains(rec), "{rec:?} lost");
    }
    assert_eq!(loaded.outbox_pending, w.batch.outbox_new);
    assert_eq!(loaded.outbox_last_seq, vec![(1, 1)]);
    assert_eq!(loaded.watermarks, vec![(1, 4)]);
    assert_eq!(loaded.totals, Totals { deposits_fen: 1_000, withdrawals_fen: 0 });

    let closed = store.packet(w.exhausted).unwrap().expect("exhausted packet is still in the store");
    assert_eq!(closed.status(), PacketStatus::Exhausted);
    assert_eq!(closed.header(), &w.batch.new_packets[1]);
    assert_eq!(closed.best_luck().map(|c| c.user.clone()), Some(user("bob")));
    assert_eq!(closed.claim_of(&user("dave")).map(|c| c.amount_fen), Some(100));
    assert!(store.packet(PacketIdGen::new(0, Some(w.exhausted)).next(Y2026_MS)).unwrap().is_none());
    assert_eq!(store.packet(w.active).unwrap().unwrap().opened_fen(), 120);
}

/// Credits ([`Batch::credits`]) add to the balance the store holds, make a wallet it does not
/// have, add up within a batch, and give way to a balance the same batch writes for the user
/// (which counts them); `Store::balance`, the reader, the sums and a reload all see them.
pub fn credits_add_to_the_stored_balance<S: Store, R: Reader>(open: impl Fn() -> (S, R)) {
    {
        let (mut store, reader) = open();
        store
            .commit(&Batch { wallets: vec![(user("amy"), 50), (user("cy"), 15)], ..Batch::default() })
            .unwrap();
        store
            .commit(&Batch {
                credits: vec![(user("amy"), 7), (user("ben"), 3), (user("cy"), 10), (user("ben"), 4)],
                // cy's 15 and 10 more, then 2 spent: the set read 25 and wrote 23.
                wallets: vec![(user("cy"), 23)],
                ..Batch::default()
            })
            .unwrap();
        for (who, want) in [("amy", Some(57)), ("ben", Some(7)), ("cy", Some(23)), ("dee", None)] {
            assert_eq!(store.balance(&user(who)).unwrap(), want, "{who}, the set's read");
            assert_eq!(reader.balance(&user(who)).unwrap(), want, "{who}, a query");
        }
        assert_eq!(store.sums().unwrap().balances_fen, 57 + 7 + 23);
        store.commit(&Batch { credits: vec![(user("ben"), 1)], ..Batch::default() }).unwrap();
        assert_eq!(store.balance(&user("ben")).unwrap(), Some(8));
    }
    let (mut store, _reader) = open();
    let mut wallets = store.load(0).unwrap().wallets;
    wallets.sort();
    assert_eq!(wallets, vec![(user("amy"), 57), (user("ben"), 8), (user("cy"), 23)]);
}

pub fn load_prunes_idempotency_records_past_retention<S: Store, R: Reader>(open: impl Fn() -> (S, R)) {
    let w = world();
    let (mut store, _reader) = open();
    store.commit(&w.batch).unwrap();

    let kept = store.load(Y2026_MS + 1).unwrap().idempotency;
    assert_eq!(kept.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(), vec!["send-1"]);
    // Pruned, not just filtered: a later load with no cut-off does not bring it back.
    assert_eq!(store.load(0).unwrap().idempotency.len(), 1);
}

pub fn sums_see_balances_escrow_and_the_outbox<S: Store, R: Reader>(open: impl Fn() -> (S, R)) {
    let w = world();
    let (mut store, _reader) = open();
    store.commit(&w.batch).unwrap();
    let sums = store.sums().unwrap();
    assert_eq!(sums.balances_fen, 720);
    assert_eq!(sums.escrow_fen, 180);
    assert_eq!(sums.totals.deposits_fen, 1_000);
    // Conservation (DESIGN.md §2.1) for this world: 1,000 = 720 + 180 + 100 in flight.
    let in_flight: i64 = sums.outbox_pending.iter().map(|o| o.amount_fen).sum();
    assert_eq!(
        sums.totals.deposits_fen - sums.totals.withdrawals_fen,
        sums.balances_fen + sums.escrow_fen + in_flight
    );
    assert_eq!(sums.watermarks, vec![(1, 4)]);
}

pub fn acknowledged_outbox_rows_are_deleted_but_their_seq_is_remembered<S: Store, R: Reader>(
    open: impl Fn() -> (S, R),
) {
    let w = world();
    let (mut store, _reader) = open();
    store.commit(&w.batch).unwrap();
    let more = Batch {
        outbox_new: vec![
            outbox(1, 2, "erin", 5, w.active),
            outbox(1, 3, "erin", 6, w.active),
            outbox(2, 1, "finn", 7, w.active),
        ],
        ..Batch::default()
    };
    store.commit(&more).unwrap();
    store.commit(&Batch { outbox_acked: vec![(1, 2)], ..Batch::default() }).unwrap();

    let loaded = store.load(0).unwrap();
    let pending: Vec<(u32, u64)> = loaded.outbox_pending.iter().map(|o| (o.target_set, o.seq)).collect();
    assert_eq!(pending, vec![(1, 3), (2, 1)]);
    assert_eq!(loaded.outbox_last_seq, vec![(1, 3), (2, 1)]);

    store.commit(&Batch { outbox_acked: vec![(1, 3), (2, 1)], ..Batch::default() }).unwrap();
    let loaded = store.load(0).unwrap();
    assert!(loaded.outbox_pending.is_empty());
    assert_eq!(loaded.outbox_last_seq, vec![(1, 3), (2, 1)], "acked seqs are never issued again");
}

pub fn a_second_share_for_the_same_user_is_refused<S: Store, R: Reader>(open: impl Fn() -> (S, R)) {
    let w = world();
    let (mut store, _reader) = open();
    store.commit(&w.batch).unwrap();
    let twice = Batch {
        claims: vec![ClaimRow { packet_id: w.active, claim: claim("bob", 10, 1, Y2026_MS + 30) }],
        ..Batch::default()
    };
    assert!(store.commit(&twice).is_err(), "DESIGN.md §2.5: one share per user per packet");
    assert_eq!(store.load(0).unwrap().active_packets[0].opened_count(), 1);
}

pub fn reader_pages_entries_newest_first_with_an_exclusive_cursor<S: Store, R: Reader>(
    open: impl Fn() -> (S, R),
) {
    let w = world();
    let (mut store, reader) = open();
    store.commit(&w.batch).unwrap();

    let first = reader.entries(&user("alice"), None, 2).unwrap();
    assert_eq!(first.iter().map(|e| e.amount_fen).collect::<Vec<_>>(), vec![200, 300]);
    assert_eq!(first[0].kind, EntryKind::Send);
    assert_eq!(first[0].packet_id, Some(w.exhausted));
    let second = reader.entries(&user("alice"), Some(first[1].id), 2).unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(
        (second[0].kind, second[0].amount_fen, second[0].packet_id),
        (EntryKind::Deposit, 1_000, None)
    );
    assert!(reader.entries(&user("alice"), Some(second[0].id), 2).unwrap().is_empty());

    assert_eq!(reader.balance(&user("alice")).unwrap(), Some(500));
    assert_eq!(reader.balance(&user("carol")).unwrap(), Some(0));
    assert_eq!(reader.balance(&user("nobody")).unwrap(), None);
}

pub fn reader_packet_and_claims_in_opening_order<S: Store, R: Reader>(open: impl Fn() -> (S, R)) {
    let w = world();
    let (mut store, reader) = open();
    store.commit(&w.batch).unwrap();

    let row = reader.packet(w.exhausted).unwrap().unwrap();
    assert_eq!(row.header, w.batch.new_packets[1]);
    assert_eq!(
        (row.status, row.opened_count, row.opened_fen, row.refunded_fen),
        (PacketStatus::Exhausted, 2, 200, 0)
    );
    assert_eq!(row.best, Some((user("bob"), 100)));
    let group = reader.packet(w.active).unwrap().unwrap();
    assert_eq!(group.header.audience, Audience::users([user("bob"), user("carol")]));
    assert_eq!(reader.packet(PacketIdGen::new(0, Some(w.exhausted)).next(Y2026_MS)).unwrap(), None);

    let page = reader.claims(w.exhausted, None, 1).unwrap();
    assert_eq!(page, vec![claim("bob", 100, 0, Y2026_MS + 4)]);
    let page = reader.claims(w.exhausted, Some(0), 10).unwrap();
    assert_eq!(page, vec![claim("dave", 100, 1, Y2026_MS + 5)]);
    assert!(reader.claims(w.exhausted, Some(1), 10).unwrap().is_empty());

    assert_eq!(
        reader.claim_of(w.exhausted, &user("dave")).unwrap(),
        Some(claim("dave", 100, 1, Y2026_MS + 5))
    );
    assert_eq!(reader.claim_of(w.active, &user("dave")).unwrap(), None);
}

pub fn reader_sent_received_and_best_luck_by_year<S: Store, R: Reader>(open: impl Fn() -> (S, R)) {
    let w = world();
    let (mut store, reader) = open();
    // A packet from 2025 that bob also won, to be left out of the 2026 figures.
    let mut ids = PacketIdGen::new(0, None);
    let old = ids.next(MID_2025_MS);
    let old_batch = Batch {
        entries: vec![entry("bob", EntryKind::Claim, 50, Some(old), MID_2025_MS + 1)],
        new_packets: vec![header(old, "alice", Kind::Equal, 50, 1, Audience::Anyone, MID_2025_MS)],
        packet_updates: vec![PacketUpdate {
            id: old,
            status: PacketStatus::Exhausted,
            opened_count: 1,
            opened_fen: 50,
            refunded_fen: 0,
            best: Some((user("bob"), 50)),
        }],
        claims: vec![ClaimRow { packet_id: old, claim: claim("bob", 50, 0, MID_2025_MS + 1) }],
        ..Batch::default()
    };
    store.commit(&old_batch).unwrap();
    store.commit(&w.batch).unwrap();

    let alice = user("alice");
    let sent = reader.sent(&alice, span(Y2026_MS, Y2027_MS), page(None, 1)).unwrap();
    assert_eq!((sent.count, sent.total_fen), (2, 500), "totals cover the year, not the page");
    assert_eq!(sent.items.iter().map(|p| p.header.id).collect::<Vec<_>>(), vec![w.exhausted]);
    let rest = reader.sent(&alice, span(Y2026_MS, Y2027_MS), page(Some(w.exhausted), 10)).unwrap();
    assert_eq!(rest.items.iter().map(|p| p.header.id).collect::<Vec<_>>(), vec![w.active]);
    assert_eq!(rest.items[0].header.audience, Audience::users([user("bob"), user("carol")]));
    assert_eq!(rest.items[0].opened_fen, 120);
    let all = reader.sent(&alice, span(0, Y2027_MS), page(None, 10)).unwrap();
    assert_eq!(all.items.iter().map(|p| p.header.id).collect::<Vec<_>>(), vec![w.exhausted, w.active, old]);
    assert_eq!(all.items[0].header.audience, Audience::Anyone);
    assert_eq!(all.items[1].header.audience, Audience::users([user("bob"), user("carol")]));
    let last_year = reader.sent(&alice, span(0, Y2026_MS), page(None, 10)).unwrap();
    assert_eq!((last_year.count, last_year.total_fen), (1, 50));
    assert_eq!(reader.sent(&user("bob"), span(Y2026_MS, Y2027_MS), page(None, 10)).unwrap().count, 0);

    let bob = user("bob");
    let received = reader.received(&bob, span(Y2026_MS, Y2027_MS), page(None, 1)).unwrap();
    assert_eq!((received.count, received.total_fen), (2, 220));
    assert_eq!(received.items.len(), 1);
    assert_eq!((received.items[0].amount_fen, received.items[0].packet_id), (100, Some(w.exhausted)));
    let rest = reader.received(&bob, span(Y2026_MS, Y2027_MS), page(Some(received.items[0].id), 10)).unwrap();
    assert_eq!(rest.items.iter().map(|e| e.amount_fen).collect::<Vec<_>>(), vec![120]);
    assert!(rest.items.iter().all(|e| e.kind == EntryKind::Claim));
    // alice's deposit and sends are entries, but not claims.
    assert_eq!(reader.received(&alice, span(Y2026_MS, Y2027_MS), page(None, 10)).unwrap().count, 0);

    assert_eq!(reader.best_luck_count(&bob, span(Y2026_MS, Y2027_MS)).unwrap(), 1);
    assert_eq!(reader.best_luck_count(&bob, span(0, Y2027_MS)).unwrap(), 2);
    assert_eq!(reader.best_luck_count(&user("dave"), span(0, Y2027_MS)).unwrap(), 0);

    // A received page and the set's best lucks read together are the two read apart.
    for (who, from) in [(&bob, Y2026_MS), (&bob, 0), (&alice, 0)] {
        let both = reader.received_and_best_lucks(who, span(from, Y2027_MS), page(None, 1)).unwrap();
        let apart = (
            reader.received(who, span(from, Y2027_MS), page(None, 1)).unwrap(),
            reader.best_luck_count(who, span(from, Y2027_MS)).unwrap(),
        );
        assert_eq!(both, apart, "{who} from {from}");
    }
    assert_eq!(reader.received_and_best_lucks(&bob, span(0, Y2027_MS), page(None, 1)).unwrap().1, 2);
}

/// Returns the reader, still open, for a back end to look at its connections.
pub fn the_reader_is_shared_across_threads<S: Store, R: Reader + Clone>(open: impl Fn() -> (S, R)) -> R {
    let w = world();
    let (mut store, reader) = open();
    store.commit(&w.batch).unwrap();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let r = reader.clone();
            std::thread::spawn(move || r.balance(&user("bob")).unwrap())
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), Some(220));
    }
    reader
}
