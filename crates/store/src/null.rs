//! A store that keeps nothing: for measuring the engine alone (`hongbao bench --store-off`).
//! Never for serving: nothing it acknowledges survives a restart.

use hongbao_core::{Claim, Millis, Packet, PacketId, UserId};

use crate::{
    Batch, EntryRow, Loaded, PacketRow, Paging, Reader, ReceivedPage, Result, SentPage, Span, Store,
    StoreSums,
};

/// Accepts every batch and forgets it, credits to wallets the set does not hold included: a
/// claimer's balance reads 0 here once the set first debits them.
#[derive(Debug, Default)]
pub struct NullStore;

impl Store for NullStore {
    fn load(&mut self, _idempotency_since_ms: Millis) -> Result<Loaded> {
        Ok(Loaded::default())
    }

    fn commit(&mut self, _batch: &Batch) -> Result<()> {
        Ok(())
    }

    fn packet(&mut self, _id: PacketId) -> Result<Option<Packet>> {
        Ok(None)
    }

    fn balance(&mut self, _user: &UserId) -> Result<Option<i64>> {
        Ok(None)
    }

    fn sums(&mut self) -> Result<StoreSums> {
        Ok(StoreSums::default())
    }
}

/// Answers every query with nothing.
#[derive(Debug, Default)]
pub struct NullReader;

impl Reader for NullReader {
    /// Nothing to wait for: in the memory-only festival (17,000 history queries a second) the
    /// trips to the blocking pool woke a thread a query and preempted the load thread as often.
    fn blocks(&self) -> bool {
        false
    }

    fn balance(&self, _user: &UserId) -> Result<Option<i64>> {
        Ok(None)
    }
    fn entries(&self, _user: &UserId, _before_id: Option<i64>, _limit: u32) -> Result<Vec<EntryRow>> {
        Ok(Vec::new())
    }
    fn packet(&self, _id: PacketId) -> Result<Option<PacketRow>> {
        Ok(None)
    }
    fn claims(&self, _id: PacketId, _after_index: Option<u32>, _limit: u32) -> Result<Vec<Claim>> {
        Ok(Vec::new())
    }
    fn sent(&self, _user: &UserId, _span: Span, _page: Paging<PacketId>) -> Result<SentPage> {
        Ok(SentPage::default())
    }
    fn received(&self, _user: &UserId, _span: Span, _page: Paging<i64>) -> Result<ReceivedPage> {
        Ok(ReceivedPage::default())
    }
    fn best_luck_count(&self, _user: &UserId, _span: Span) -> Result<u64> {
        Ok(0)
    }
}
