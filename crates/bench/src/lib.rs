//! hongbao-bench: the load generator. It drives a running `hongbao serve` over HTTP, or the
//! engine and its store directly in this process, and reports what it measured: every answer
//! counted, throughput, HDR latency percentiles, the audit at the end, a JSON result and a plot
//! of throughput and latency over time.
//!
//! It measures and prints; it never asserts a figure (STYLE.md: performance is measured by
//! benchmarks that print figures). Scenarios:
//! - `storm`: one packet, a crowd far larger than its shares, every request counted;
//! - `festival`: many packets drawn Zipf-hot, claimers with senders refilling emptied packets
//!   and a trickle of history queries beside them (on connections of their own, as many as
//!   the claims', so a query that waits for the store holds up no claim);
//! - `ceiling`: `GET /healthz`, the most the HTTP layer and this client can do on this machine;
//! - `resident`: (in process) N active packets, the memory they hold and how long a restart
//!   on their data dir takes.

mod client;
mod http;
mod load;
mod machine;
mod plot;
mod record;
mod report;
mod resident;
mod zipf;

use std::path::PathBuf;

use clap::{Args, ValueEnum};

pub use report::BenchResult;
pub use zipf::Zipf;

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// One packet of --shares shares, --concurrency claimers, every request a new user
    Storm,
    /// --packets packets of --shares shares, claims Zipf-hot, emptied packets re-sent, history queries
    Festival,
    /// GET /healthz: the HTTP ceiling (HTTP only)
    Ceiling,
    /// --packets active packets in process: RSS, then the time a restart on the same data dir takes
    Resident,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Storm => "storm",
            Scenario::Festival => "festival",
            Scenario::Ceiling => "ceiling",
            Scenario::Resident => "resident",
        }
    }
}

/// `hongbao bench` options.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Scenario to run
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// The server to load (ignored with --in-process)
    #[arg(long, env = "HONGBAO_BENCH_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Service key for claims, sends and queries
    #[arg(long, env = "HONGBAO_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Admin key for deposits and the audit
    #[arg(long, env = "HONGBAO_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// How long the load runs, in seconds
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Requests in flight: HTTP connections, or engine calls awaited at once in process
    /// [default: 512 over HTTP, 256 in process]
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Sets: the engine's with --in-process; over HTTP, what the server was started with (for the record)
    #[arg(long, default_value_t = 1)]
    pub sets: u32,
    /// Shares per packet [default: storm 100000, festival 1000, resident 10]
    #[arg(long)]
    pub shares: Option<u32>,
    /// Packets [default: festival 500, resident 1000000]
    #[arg(long)]
    pub packets: Option<u32>,
    /// Drive the engine and its store in this process, with no HTTP
    #[arg(long)]
    pub in_process: bool,
    /// With --in-process: no store at all (memory only; nothing survives, no audit)
    #[arg(long)]
    pub store_off: bool,
    /// With --in-process: claims per engine call (`Engine::claim_many`, one message per set
    /// and call); --concurrency is then calls in flight, each of this many claims [default: 1,
    /// one call per claim]
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Resident: claims to store before the restart, on extra packets of 1,000 shares claimed
    /// to the last share (closed, so only the store keeps them) [default: 0]
    #[arg(long, default_value_t = 0)]
    pub stored_claims: u64,
    /// With --in-process: the data dir [default: a fresh temporary dir, removed afterwards]
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Write the result as JSON here
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Draw throughput and latency over time to this SVG file
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Open loop: this many requests per second in all (festival: claims, with their history
    /// queries beside them), latency measured from when each was due (no coordinated omission)
    /// [default: as fast as answers come]
    #[arg(long)]
    pub rate: Option<u64>,
    /// Festival: the Zipf exponent of packet popularity (0 is uniform)
    #[arg(long, default_value_t = 1.0)]
    pub zipf_s: f64,
    /// Festival: history queries per thousand claims
    #[arg(long, default_value_t = 10)]
    pub history_per_mille: u32,
    /// Over HTTP: start the clock as soon as every connection is open, without first asking
    /// each for `/healthz` once [default: each connection's first exchange, like its connect,
    /// is set-up and not measured]
    #[arg(long)]
    pub no_warm_up: bool,
    /// Threads that run the load [default: 2 over HTTP, 1 in process]
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bar or progress lines
    #[arg(long)]
    pub quiet: bool,
}

/// HTTP connections when `--concurrency` is not given. A festival claim waits about a
/// millisecond for its batch's commit, and at 256 connections the festival left 8 % of the
/// machine idle where healthz left 3 %; at 512 it fills the machine as healthz does, and the
/// healthz ceiling does not move (BENCHMARKS.md, thirty-ninth session). `scripts/lib/serve.sh`
/// passes the same number as `HTTP_CONNECTIONS`, for `wrk` as well.
pub const HTTP_CONCURRENCY: usize = 512;
/// Engine calls in flight in process when `--concurrency` is not given.
pub const IN_PROCESS_CONCURRENCY: usize = 256;

impl BenchArgs {
    /// Requests in flight: `--concurrency`, or the default for the mode.
    pub fn concurrency(&self) -> usize {
        let default = if self.in_process || self.scenario == Scenario::Resident {
            IN_PROCESS_CONCURRENCY
        } else {
            HTTP_CONCURRENCY
        };
        self.concurrency.unwrap_or(default)
    }
}

/// Runs the scenario, prints the summary, writes the JSON result and the plot if asked.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(dir) = std::env::var_os(resident::RESTART_CHILD_ENV) {
        return resident::restart_child(&args, PathBuf::from(dir));
    }
    let result = measure(&args)?;
    print!("{}", result.summary());
    if let Some(path) = &args.out {
        result.write_json(path)?;
        println!("result: {}", path.display());
    }
    if let Some(path) = &args.plot {
        plot::draw(&result, path)?;
        println!("plot: {}", path.display());
    }
    Ok(())
}

/// Runs the scenario and returns what it measured, printing only progress.
pub fn measure(args: &BenchArgs) -> anyhow::Result<BenchResult> {
    anyhow::ensure!(args.concurrency() >= 1, "--concurrency must be at least 1");
    anyhow::ensure!(args.duration_s >= 1, "--duration-s must be at least 1");
    anyhow::ensure!(!args.store_off || args.in_process, "--store-off needs --in-process");
    anyhow::ensure!(args.batch >= 1, "--batch must be at least 1");
    anyhow::ensure!(args.batch == 1 || args.in_process, "--batch needs --in-process");
    anyhow::ensure!(args.batch == 1 || args.rate.is_none(), "--batch and --rate do not go together");
    match args.scenario {
        Scenario::Resident => resident::run(args),
        _ => load::run(args),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn concurrency(args: &[&str]) -> usize {
        Cli::try_parse_from(std::iter::once("hongbao-bench").chain(args.iter().copied()))
            .expect("options parse")
            .bench
            .concurrency()
    }

    #[test]
    fn concurrency_defaults_by_mode_and_an_explicit_one_wins() {
        assert_eq!(concurrency(&["festival"]), HTTP_CONCURRENCY);
        assert_eq!(concurrency(&["storm", "--url", "http://127.0.0.1:1"]), HTTP_CONCURRENCY);
        assert_eq!(concurrency(&["festival", "--in-process"]), IN_PROCESS_CONCURRENCY);
        assert_eq!(
            concurrency(&["resident"]),
            IN_PROCESS_CONCURRENCY,
            "resident runs in process whatever the mode"
        );
        assert_eq!(concurrency(&["festival", "--concurrency", "8"]), 8);
        assert_eq!(concurrency(&["festival", "--in-process", "--concurrency", "16"]), 16);
        assert_ne!(HTTP_CONCURRENCY, IN_PROCESS_CONCURRENCY, "the test tells the two defaults apart");
    }
}
