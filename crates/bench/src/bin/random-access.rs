//! What one read at a random place in a table of N MiB costs on this machine: the cost a set
//! pays for a claimer's wallet when every claimer is new (BENCHMARKS.md, fortieth session).
//!
//! For each size it prints, in nanoseconds an item:
//! - `dependent`: each read's place comes from the one before (the latency);
//! - `independent`: reads of known places in a tight loop (as many in flight as the CPU allows);
//! - with about 400 ns of other work an item, as a set has around each wallet: the read's extra
//!   cost with no prefetch, with a prefetch 4, 16 and 64 items ahead, and with the next 64
//!   items' prefetches issued together once every 64 items (`burst`).
//!
//! The memory is ordinary heap (4 KiB pages unless transparent huge pages are `always`), each
//! page touched before the clock. It measures and prints; it asserts nothing.
//!
//! `cargo run --release -p hongbao-bench --bin random-access -- --mib 8,64,512,2048`

use std::hint::black_box;
use std::time::Instant;

use clap::Parser;
use rand::{rngs::SmallRng, Rng, SeedableRng};

#[derive(Debug, Parser)]
#[command(about = "What one read at a random place in a table of N MiB costs on this machine")]
struct Args {
    /// Table sizes, in MiB
    #[arg(long, value_delimiter = ',', default_values_t = [8, 64, 512, 2048])]
    mib: Vec<usize>,
    /// Items measured with work beside each read (the tight loops read ten times as many)
    #[arg(long, default_value_t = 200_000)]
    items: usize,
    /// Write the figures as JSON here
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

const LINE: usize = 64;
const PAGE: usize = 4096;
/// The prefetch distances measured, in items.
const AHEAD: [usize; 3] = [4, 16, 64];
/// Items a burst asks for at once.
const BURST: usize = 64;
/// Rounds of `work` an item.
const WORK_ROUNDS: usize = 300;

#[derive(Debug, serde::Serialize)]
struct Figures {
    mib: usize,
    dependent_ns: f64,
    independent_ns: f64,
    work_ns: f64,
    read_no_prefetch_ns: f64,
    /// (distance, extra ns an item)
    read_prefetched_ns: Vec<(usize, f64)>,
    read_burst_ns: f64,
}

/// About 400 ns of arithmetic that depends on itself, so it cannot overlap with the next item's
/// (a shift, an xor and a multiply a round: not affine, so the compiler cannot fold the rounds).
fn work(mut w: u64) -> u64 {
    for _ in 0..WORK_ROUNDS {
        w = (w ^ (w >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    }
    w
}

fn per_item(start: Instant, n: usize) -> f64 {
    start.elapsed().as_secs_f64() * 1e9 / n as f64
}

fn measure(mib: usize, items: usize, rng: &mut SmallRng) -> Figures {
    let len = mib << 20;
    let mut table = vec![0u8; len];
    for page in table.chunks_mut(PAGE) {
        page[0] = 1;
    }
    let lines = len / LINE;
    let tight = items * 10;
    // Places for every loop, plus room to look ahead past the last item.
    let at: Vec<usize> = (0..tight + BURST * 2).map(|_| rng.random_range(0..lines) * LINE).collect();
    let read = |i: usize| table[at[i]] as u64;

    let start = Instant::now();
    let mut j = 0usize;
    for &a in &at[..tight / 10] {
        j = (a + (table[j * LINE] as usize & 1) * LINE) % len / LINE;
    }
    black_box(j);
    let dependent_ns = per_item(start, tight / 10);

    let start = Instant::now();
    let mut sum = 0u64;
    for i in 0..tight {
        sum += read(i);
    }
    black_box(sum);
    let independent_ns = per_item(start, tight);

    let start = Instant::now();
    let mut w = 1u64;
    for _ in 0..items {
        w = work(w);
    }
    black_box(w);
    let work_ns = per_item(start, items);

    let with_work = |ahead: Option<usize>, burst: bool| {
        let start = Instant::now();
        let (mut w, mut sum) = (1u64, 0u64);
        for i in 0..items {
            if let Some(d) = ahead {
                hongbao_core::hint::prefetch(&table[at[i + d]]);
            }
            if burst && i % BURST == 0 {
                for k in i + BURST..i + 2 * BURST {
                    hongbao_core::hint::prefetch(&table[at[k]]);
                }
            }
            w = work(w);
            sum += read(i);
        }
        black_box((w, sum));
        per_item(start, items) - work_ns
    };
    let read_no_prefetch_ns = with_work(None, false);
    let read_prefetched_ns = AHEAD.iter().map(|&d| (d, with_work(Some(d), false))).collect();
    let read_burst_ns = with_work(None, true);
    Figures {
        mib,
        dependent_ns,
        independent_ns,
        work_ns,
        read_no_prefetch_ns,
        read_prefetched_ns,
        read_burst_ns,
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.items >= 1, "--items must be at least 1");
    anyhow::ensure!(args.mib.iter().all(|&m| m >= 1), "--mib sizes must be at least 1");
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let mut all = Vec::new();
    for &mib in &args.mib {
        let f = measure(mib, args.items, &mut rng);
        let ahead: Vec<String> =
            f.read_prefetched_ns.iter().map(|(d, ns)| format!("{d} ahead {ns:+.0}")).collect();
        println!(
            "{:>6} MiB: dependent {:.1} ns, independent {:.1} ns; with {:.0} ns of work an item, the read adds: \
             no prefetch {:+.0}, prefetch {}, burst of {BURST} {:+.0} ns",
            f.mib,
            f.dependent_ns,
            f.independent_ns,
            f.work_ns,
            f.read_no_prefetch_ns,
            ahead.join(", "),
            f.read_burst_ns
        );
        all.push(f);
    }
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_vec_pretty(&all)?)?;
        println!("result: {}", path.display());
    }
    Ok(())
}
