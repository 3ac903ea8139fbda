//! hongbao-engine: sets, each one thread that owns its wallets and packets.
//!
//! Commands reach a set through a bounded queue; the set applies them in memory in batches,
//! commits each batch in one store transaction, and only then replies (DESIGN.md §3). The
//! engine never parses HTTP or JSON and never blocks an async task: callers await a reply.

pub mod allocator;
mod closed;
mod engine;
mod queries;
mod reply;
mod set;
#[cfg(test)]
mod sim;
mod wallets;

pub use engine::{Engine, EngineConfig, COMMIT_SPACING_DEFAULT};
pub use reply::*;

/// What the engine's threads and its store's call themselves, for whoever reports on them
/// (the CPU by thread kind in `/metrics`).
pub mod threads {
    pub use crate::engine::SET_THREAD;
    pub use crate::queries::QUERY_THREAD;
    pub use hongbao_store::{CHECKPOINT_THREAD, FOLD_THREAD};
}
