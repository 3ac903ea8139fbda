//! `hongbao-bench`: the load generator on its own, for scripts and for testing the bench
//! without the `hongbao` binary. `hongbao bench` takes the same options.

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "hongbao-bench",
    version,
    about = "Load generator for hongbao: storm, festival, ceiling, resident"
)]
struct Cli {
    #[command(flatten)]
    bench: hongbao_bench::BenchArgs,
}

fn main() -> std::process::ExitCode {
    // Before any other thread: see `hongbao_engine::allocator`.
    for warning in hongbao_engine::allocator::configure() {
        eprintln!("warning: {warning}");
    }
    match hongbao_bench::run(Cli::parse().bench) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hongbao-bench: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
