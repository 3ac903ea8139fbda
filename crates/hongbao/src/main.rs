//! The `hongbao` binary: parses the command line and calls into the crates. Thin on purpose.

mod archive;
mod config;

use std::io::Write;
use std::sync::Arc;

use axum::serve::ListenerExt;
use clap::{Parser, Subcommand};
use hongbao_api::{AppState, Keys, Tokens};
use hongbao_core::SystemClock;
use hongbao_engine::{Engine, EngineConfig};

use crate::config::{LogFormat, ServeArgs, Settings};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "hongbao", version, about = "A red packet (红包) service: wallets, lucky packets, claims")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API
    Serve(ServeArgs),
    /// Move old days of claims and wallet entries from a PostgreSQL store to CSV files
    Archive(archive::ArchiveArgs),
    /// Load a server (or the engine in process) and measure it: storm, festival, ceiling, resident
    Bench(hongbao_bench::BenchArgs),
}

/// How often idle per-user rate-limit buckets are dropped.
const RATE_LIMIT_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

fn main() -> std::process::ExitCode {
    // Before any other thread: see `hongbao_engine::allocator`.
    for warning in hongbao_engine::allocator::configure() {
        eprintln!("warning: {warning}");
    }
    let cli = Cli::parse();
    let done = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Archive(args) => init_logs(LogFormat::Text, None).and_then(|()| archive::run(args)),
        Command::Bench(args) => hongbao_bench::run(args).map_err(|e| format!("{e:#}")),
    };
    match done {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hongbao: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn init_logs(format: LogFormat, log: Option<&str>) -> Result<(), String> {
    let filter = match log {
        Some(directives) => tracing_subscriber::EnvFilter::try_new(directives)
            .map_err(|e| format!("invalid log filter {directives:?}: {e}"))?,
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let settings = Settings::resolve(args)?;
    init_logs(settings.log_format, settings.log.as_deref())?;
    let (api_key, admin_key, keys_file) = config::keys(&settings)?;
    if api_key == admin_key {
        return Err("the service key and the admin key must differ".into());
    }
    if let Some(path) = keys_file {
        tracing::info!(path = %path.display(), "keys are in this file (generated on first start)");
        eprintln!("hongbao: service and admin keys are in {}", path.display());
    }
    let tokens = settings.token_secret.as_ref().map(|s| Tokens::hs256(s.expose())).transpose()?;
    let user_tokens = tokens.is_some();
    let mut config = EngineConfig::new(settings.data.clone());
    config.sets = settings.sets;
    config.store_url = settings.store.clone();
    config.replica_url = settings.replica.clone();
    config.journal = settings.journal;
    config.limits = settings.limits.clone();
    config.queue_depth = settings.queue_depth;
    config.batch_max = settings.batch_max;
    config.commit_spacing = settings.commit_spacing;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async move {
        let engine = tokio::task::spawn_blocking(move || Engine::start(config, Arc::new(SystemClock)))
            .await
            .map_err(|e| format!("engine start panicked: {e}"))??;
        let keys = Keys { service: api_key.into_bytes(), admin: admin_key.into_bytes() };
        let mut state =
            AppState::with_user_rate(engine.clone(), keys, settings.user_rate, settings.user_rate * 2);
        if let Some(tokens) = tokens {
            state = state.with_tokens(tokens);
        }
        let pruner = state.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(RATE_LIMIT_PRUNE_EVERY);
            loop {
                every.tick().await;
                pruner.prune_rate_limits();
            }
        });
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        tracing::info!(%addr, sets = settings.sets, data = %settings.data.display(), user_tokens, "hongbao serving");
        // Tests and scripts read this line to learn the port.
        println!("hongbao listening on http://{addr}");
        let _ = std::io::stdout().flush();
        // Answers go out as soon as they are written: without TCP_NODELAY, Nagle's algorithm
        // holds a small segment while one before it waits for an acknowledgement, and a client
        // that delays its acknowledgements (Linux: 40 ms) stalls every answer on that connection.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY on a connection");
            }
        });
        axum::serve(listener, hongbao_api::router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| format!("server failed: {e}"))?;
        tracing::info!("no longer accepting; committing what is in flight");
        engine.shutdown().await;
        Ok::<(), String>(())
    })
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested");
}
