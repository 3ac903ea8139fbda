//! Hot/cold separation on a real PostgreSQL: `archive_postgres` moves whole old days of claims
//! and entries into CSV files, records them, and drops their partitions, while the hot path
//! keeps committing; it never takes the claims of a packet that is still active, never a day
//! the sets may still write, never rows of the DEFAULT partitions; it finishes what a crashed
//! run left, and a second run finds nothing more to do. Needs PostgreSQL's server binaries.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hongbao_core::packet::PacketHeader;
use hongbao_core::{AmountRule, Audience, Claim, Kind, PacketId, PacketIdGen, PacketStatus, UserId};
use hongbao_store::{
    archive_postgres, make_postgres_day_partitions, open_postgres, Batch, ClaimRow, Entry, EntryKind,
    PacketUpdate, Reader, Store,
};
use hongbao_testkit::PgCluster;

const DAY_MS: i64 = 86_400_000;
const SETS: u32 = 2;
/// How long a history query holds the claims table while the archive wants to detach: longer
/// than any commit may wait behind the archive.
const BLOCKER_HOLD: Duration = Duration::from_secs(3);

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn today() -> i64 {
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    now_ms.div_euclid(DAY_MS)
}

/// One packet of 3 equal shares of 100 fen sent by `sender` on `day` at `hour`, `opened` of
/// them claimed the same day, closed as `status`; with the wallet entries it makes.
fn packet_on(
    set: u32,
    day: i64,
    hour: i64,
    sender: &str,
    opened: u32,
    status: PacketStatus,
) -> (PacketId, Batch) {
    let at = day * DAY_MS + hour * 3_600_000;
    let id = PacketIdGen::new(set, None).next(at);
    let header = PacketHeader {
        id,
        sender: user(sender),
        kind: Kind::Equal,
        total_fen: 300,
        count: 3,
        audience: Audience::Anyone,
        greeting: String::new(),
        created_at_ms: at,
        expires_at_ms: at + DAY_MS,
        seed: 7,
        amount_rule: AmountRule::CURRENT,
    };
    let mut batch = Batch {
        wallets: vec![(user(sender), 0)],
        entries: vec![Entry {
            user: user(sender),
            kind: EntryKind::Send,
            amount_fen: 300,
            packet_id: Some(id),
            at_ms: at,
        }],
        new_packets: vec![header],
        ..Batch::default()
    };
    for i in 0..opened {
        let who = format!("{sender}-grabber{i}");
        let claim = Claim { user: user(&who), amount_fen: 100, at_ms: at + 1_000 + i64::from(i), index: i };
        batch.entries.push(Entry {
            user: user(&who),
            kind: EntryKind::Claim,
            amount_fen: 100,
            packet_id: Some(id),
            at_ms: claim.at_ms,
        });
        batch.wallets.push((user(&who), 100));
        batch.claims.push(ClaimRow { packet_id: id, claim });
    }
    let opened_fen = i64::from(opened) * 100;
    let refunded_fen = if status == PacketStatus::Expired { 300 - opened_fen } else { 0 };
    batch.packet_updates.push(PacketUpdate {
        id,
        status,
        opened_count: opened,
        opened_fen,
        refunded_fen,
        best: (status == PacketStatus::Exhausted).then(|| (user(&format!("{sender}-grabber0")), 100)),
    });
    (id, batch)
}

/// The data lines of a CSV file (after the header), checking the header.
fn csv_rows(path: &Path, header: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(header), "{}", path.display());
    lines.map(str::to_owned).collect()
}

/// The same rows as PostgreSQL prints them in CSV, from a live table, for comparison.
fn live_csv(pg: &PgCluster, query: &str) -> BTreeSet<String> {
    let out = pg.psql(&format!("COPY ({query}) TO STDOUT (FORMAT csv)"));
    out.lines().map(str::to_owned).collect()
}

#[test]
fn archive_moves_old_days_to_files_without_blocking_commits() {
    // Arrange: two sets; partitions for days long past; set 0 has packets on three old days
    // (the third still active), one after the cut and one so old it has no partition.
    let pg = PgCluster::start();
    let url = pg.url();
    let today = today();
    let (d1, d2, d3, d_after, d_default) = (today - 10, today - 9, today - 8, today - 5, today - 40);
    let cut_day = today - 7;
    let (mut store0, reader0) = open_postgres(&url, 0, SETS).unwrap();
    let (mut store1, reader1) = open_postgres(&url, 1, SETS).unwrap();
    make_postgres_day_partitions(&url, SETS, today - 12..=today - 4).unwrap();

    let (p1, b1) = packet_on(0, d1, 9, "alice", 3, PacketStatus::Exhausted);
    let (p2, b2) = packet_on(0, d2, 10, "alice", 1, PacketStatus::Expired);
    let (p3, b3) = packet_on(0, d3, 11, "alice", 1, PacketStatus::Active);
    let (p_after, b_after) = packet_on(0, d_after, 12, "alice", 2, PacketStatus::Active);
    let (p_default, b_default) = packet_on(0, d_default, 13, "alice", 2, PacketStatus::Exhausted);
    for b in [&b1, &b2, &b3, &b_after, &b_default] {
        store0.commit(b).unwrap();
    }
    let (_, b_set1) = packet_on(1, d1, 14, "bob", 2, PacketStatus::Exhausted);
    store1.commit(&b_set1).unwrap();
    let claims_before = |p: PacketId| {
        live_csv(
            &pg,
            &format!("SELECT * FROM hongbao_set_0.claims WHERE packet_id = {} ORDER BY idx", p.as_i64()),
        )
    };
    let claims_d1 = claims_before(p1);
    let claims_d2 = claims_before(p2);
    assert_eq!((claims_d1.len(), claims_d2.len()), (3, 1));
    let entries_of = |set: u32, day: i64| {
        live_csv(
            &pg,
            &format!(
                "SELECT * FROM hongbao_set_{set}.entries WHERE at_ms >= {} AND at_ms < {} ORDER BY id",
                day * DAY_MS,
                (day + 1) * DAY_MS
            ),
        )
    };
    let entries_0 = [d1, d2, d3].map(|d| entries_of(0, d));
    assert_eq!(entries_0.each_ref().map(BTreeSet::len), [4, 2, 2]);
    let entries_1_d1 = entries_of(1, d1);

    // A crashed run left one day of set 1 detached and renamed, not yet exported.
    let d1_name = pg.psql(&format!("SELECT to_char(DATE '1970-01-01' + {d1}, 'YYYYMMDD')"));
    pg.psql(&format!(
        "ALTER TABLE hongbao_set_1.entries DETACH PARTITION hongbao_set_1.entries_d{d1_name}; \
         ALTER TABLE hongbao_set_1.entries_d{d1_name} RENAME TO archiving_entries_d{d1_name}"
    ));

    // The hot path: a set keeps committing claims and entries of today.
    let (p_live, b_live) = packet_on(0, today, 0, "carol", 0, PacketStatus::Active);
    store0.commit(&b_live).unwrap();
    let running = Arc::new(AtomicBool::new(true));
    let hot = {
        let running = running.clone();
        std::thread::spawn(move || {
            let (mut commits, mut slowest) = (0u32, Duration::ZERO);
            while running.load(Ordering::SeqCst) {
                let at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
                let who = user(&format!("hot{commits}"));
                let batch = Batch {
                    entries: vec![Entry {
                        user: who.clone(),
                        kind: EntryKind::Deposit,
                        amount_fen: 1,
                        packet_id: None,
                        at_ms: at,
                    }],
                    claims: vec![ClaimRow {
                        packet_id: p_live,
                        claim: Claim { user: who, amount_fen: 1, at_ms: at, index: commits },
                    }],
                    ..Batch::default()
                };
                let started = Instant::now();
                store0.commit(&batch).expect("a commit during the archive");
                slowest = slowest.max(started.elapsed());
                commits += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (commits, slowest)
        })
    };
    // A history query holds the claims table: the first detaches must wait or give up.
    let blocker = {
        let url = url.clone();
        std::thread::spawn(move || {
            let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let mut tx = client.transaction().unwrap();
            tx.query_one("SELECT count(*) FROM hongbao_set_0.claims", &[]).unwrap();
            std::thread::sleep(BLOCKER_HOLD);
            tx.commit().unwrap();
        })
    };
    std::thread::sleep(Duration::from_millis(200));

    // Act
    let out = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let report = archive_postgres(&url, SETS, cut_day * DAY_MS, out.path()).unwrap();
    let took = started.elapsed();
    running.store(false, Ordering::SeqCst);
    let (commits, slowest) = hot.join().unwrap();
    blocker.join().unwrap();
    println!(
        "archive: {} days archived, {} skipped, {} default rows kept, in {took:?}; longest detach {} ms; \
         {commits} commits meanwhile, the slowest {slowest:?} (a query held the claims table for {BLOCKER_HOLD:?})",
        report.archived.len(),
        report.skipped.len(),
        report.default_rows_kept,
        report.detach_ms_max
    );

    // Assert: the hot path waited at most about one bounded lock wait, not the query's hold.
    assert!(slowest < Duration::from_millis(1_500), "a commit waited {slowest:?} behind the archive");

    // Which days went: every partitioned day before the cut in both tables of both sets,
    // except set 0's claims of the day with an active packet.
    let went: BTreeSet<(u32, String, i64)> =
        report.archived.iter().map(|a| (a.set, a.table.clone(), a.day)).collect();
    let mut expected = BTreeSet::new();
    for set in 0..SETS {
        for table in ["claims", "entries"] {
            for day in today - 12..cut_day {
                if !(set == 0 && table == "claims" && day == d3) {
                    expected.insert((set, table.to_owned(), day));
                }
            }
        }
    }
    assert_eq!(went, expected);
    assert_eq!(report.archived.len(), expected.len(), "each day once");
    assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
    assert_eq!(
        (report.skipped[0].set, report.skipped[0].table.as_str(), report.skipped[0].day),
        (0, "claims", d3)
    );
    assert!(report.skipped[0].reason.contains("active"), "{}", report.skipped[0].reason);
    // The packet so old it had no partition: its 2 claims and 3 entries stay in DEFAULT.
    assert_eq!(report.default_rows_kept, 5);

    // The files hold exactly the rows the partitions held.
    let file_of = |set: u32, table: &str, day: i64| {
        let a = report.archived.iter().find(|a| a.set == set && a.table == table && a.day == day).unwrap();
        assert!(a.file.ends_with(&format!("set-{set}/{table}-{}.csv", a.date)), "{}", a.file);
        (Path::new(&a.file).to_owned(), a.rows)
    };
    const CLAIMS_HEADER: &str = "packet_id,idx,user_id,amount_fen,at_ms";
    const ENTRIES_HEADER: &str = "id,user_id,kind,amount_fen,packet_id,at_ms";
    for (day, rows) in [(d1, &claims_d1), (d2, &claims_d2)] {
        let (file, n) = file_of(0, "claims", day);
        assert_eq!(&csv_rows(&file, CLAIMS_HEADER), rows);
        assert_eq!(n as usize, rows.len());
    }
    for (day, rows) in [d1, d2, d3].into_iter().zip(&entries_0) {
        let (file, n) = file_of(0, "entries", day);
        assert_eq!(&csv_rows(&file, ENTRIES_HEADER), rows);
        assert_eq!(n as usize, rows.len());
    }
    let (file, n) = file_of(1, "entries", d1);
    assert_eq!(csv_rows(&file, ENTRIES_HEADER), entries_1_d1, "the crashed run's day, finished");
    assert_eq!(n, 3);
    let (file, n) = file_of(0, "claims", today - 12);
    assert!(csv_rows(&file, CLAIMS_HEADER).is_empty());
    assert_eq!(n, 0);
    let leftovers: Vec<_> = walk(out.path()).into_iter().filter(|p| p.ends_with(".partial")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The partitions are gone, detached leftovers too; the active packet's day stays.
    for set in 0..SETS {
        let names = pg.psql(&format!(
            "SELECT string_agg(relname, ' ' ORDER BY relname) FROM pg_class \
             WHERE relnamespace = 'hongbao_set_{set}'::regnamespace AND relkind = 'r'"
        ));
        for day in today - 12..cut_day {
            let date = pg.psql(&format!("SELECT to_char(DATE '1970-01-01' + {day}, 'YYYYMMDD')"));
            let keeps_claims = set == 0 && day == d3;
            assert_eq!(names.contains(&format!(" claims_d{date}")), keeps_claims, "set {set}: {names}");
            assert!(!names.contains(&format!("entries_d{date}")), "set {set}: {names}");
        }
        assert!(!names.contains("archiving_"), "set {set}: {names}");
    }

    // Queries answer from what is live, and say where that stops being whole.
    assert!(reader0.claims(p1, None, 100).unwrap().is_empty(), "claims of an archived day");
    assert_eq!(reader0.packet(p1).unwrap().unwrap().opened_count, 3, "packets stay");
    assert_eq!(reader0.claims(p3, None, 100).unwrap().len(), 1, "the active packet keeps its claims");
    assert_eq!(reader0.claims(p_after, None, 100).unwrap().len(), 2, "days after the cut stay");
    assert_eq!(reader0.claims(p_default, None, 100).unwrap().len(), 2, "DEFAULT rows stay");
    assert_eq!(
        reader0.claims(p_live, None, 100_000).unwrap().len(),
        commits as usize,
        "hot claims all there"
    );
    let alice: Vec<i64> =
        reader0.entries(&user("alice"), None, 100).unwrap().iter().map(|e| e.at_ms).collect();
    assert_eq!(alice.len(), 2, "alice's send entries after the cut and in DEFAULT: {alice:?}");
    assert!(alice.iter().all(|&at| at >= cut_day * DAY_MS || at < (d_default + 1) * DAY_MS));
    let recorded = reader0.archived_days().unwrap();
    let mine: Vec<_> = report.archived.iter().filter(|a| a.set == 0).cloned().collect();
    assert_eq!(recorded.len(), mine.len());
    for a in &mine {
        assert!(recorded.contains(a), "{a:?} not recorded in {recorded:?}");
    }
    assert_eq!(reader0.archived_before().unwrap(), Some(cut_day * DAY_MS));
    assert_eq!(reader1.archived_days().unwrap().len(), report.archived.iter().filter(|a| a.set == 1).count());
    let (_, fresh_reader) = open_postgres(&url, 0, SETS).unwrap();
    assert_eq!(fresh_reader.archived_before().unwrap(), Some(cut_day * DAY_MS));

    // A second run finds nothing more to take.
    let again = archive_postgres(&url, SETS, cut_day * DAY_MS, out.path()).unwrap();
    assert!(again.archived.is_empty(), "{:?}", again.archived);
    assert_eq!(again.skipped, report.skipped);
    // A cut inside the days the sets write archives none of them.
    let hot_cut = archive_postgres(&url, SETS, (today + 1) * DAY_MS, out.path()).unwrap();
    assert!(hot_cut.archived.iter().all(|a| a.day < today - 1), "{:?}", hot_cut.archived);
    assert!(hot_cut.skipped.iter().any(|s| s.day == today && s.reason.contains("still write")));
}

#[test]
fn archive_refuses_a_database_of_another_set_count() {
    let pg = PgCluster::start();
    let _stores = open_postgres(&pg.url(), 0, 1).unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = archive_postgres(&pg.url(), 2, 0, out.path()).unwrap_err();
    assert!(err.to_string().contains("1 sets"), "{err}");
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}
