//! The paged KV cache (vLLM style): a pool of fixed-size blocks with a free
//! list and reference counts, a block table per sequence, and per-layer K/V
//! tensors in the layout the paged kernels read ([`PagedLayout`]).
//!
//! ```text
//! block table of seq 7:  [ 12 | 3 | 40 ]          block_size = 16
//! position p lives in block table[p / 16] at offset p % 16
//! slot = block * block_size + offset  (what the write kernel's slot mapping holds)
//! ```

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::manager::KvManager;
use crate::{KvCacheError, PagedLayout, Result, SeqId};

/// Free list and reference counts of the physical blocks. Plain bookkeeping:
/// no tensors, testable on its own.
#[derive(Debug, Clone)]
pub struct BlockPool {
    /// Free block ids; allocation pops from the end.
    free: Vec<u32>,
    /// Sequences (tables) referencing each block; 0 = free.
    refs: Vec<u16>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        // Reversed so that blocks are handed out 0, 1, 2, ... at first.
        Self {
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Takes a free block, or `None` when the pool is empty.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = self.free.pop()?;
        debug_assert_eq!(
            self.refs[b as usize], 0,
            "block {b} on the free list is referenced"
        );
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// One more table references `block` (a forked sequence).
    pub fn share(&mut self, block: u32) {
        debug_assert!(self.refs[block as usize] > 0, "sharing free block {block}");
        self.refs[block as usize] += 1;
    }

    /// Drops one reference; the block returns to the free list at zero.
    pub fn free(&mut self, block: u32) {
        let r = &mut self.refs[block as usize];
        debug_assert!(*r > 0, "double free of block {block}");
        *r -= 1;
        if *r == 0 {
            self.free.push(block);
        }
    }

    pub fn refs(&self, block: u32) -> u16 {
        self.refs[block as usize]
    }
}

/// Block tables and the pool, plus the per-layer K/V tensors.
#[derive(Debug)]
pub struct PagedCache {
    layout: PagedLayout,
    pool: BlockPool,
    tables: HashMap<SeqId, Vec<u32>>,
    max_seq_len: usize,
    /// Per layer: K `[num_blocks, kv_heads, head_dim / x, block_size, x]`.
    k: Vec<Tensor>,
    /// Per layer: V `[num_blocks, kv_heads, head_dim, block_size]`.
    v: Vec<Tensor>,
}

impl PagedCache {
    /// A cache of `num_blocks` blocks per layer; the tensors are zeroed.
    pub fn new(
        num_layers: usize,
        layout: PagedLayout,
        max_seq_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut k = Vec::with_capacity(num_layers);
        let mut v = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            k.push(Tensor::zeros(layout.k_shape().to_vec(), dtype, device)?);
            v.push(Tensor::zeros(layout.v_shape().to_vec(), dtype, device)?);
        }
        Ok(Self {
            layout,
            pool: BlockPool::new(layout.num_blocks),
            tables: HashMap::new(),
            max_seq_len,
            k,
            v,
        })
    }

    /// Blocks that fit `budget_bytes` of KV for `num_layers` layers.
    pub fn blocks_for_budget(
        budget_bytes: usize,
        num_layers: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> usize {
        let per_block = 2 * num_layers * block_size * kv_heads * head_dim * dtype.size_in_bytes();
        budget_bytes / per_block.max(1)
    }

    pub fn layout(&self) -> &PagedLayout {
        &self.layout
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn block_table(&self, seq: SeqId) -> Option<&[u32]> {
        self.tables.get(&seq).map(Vec::as_slice)
    }

    pub fn k(&self, layer: usize) -> &Tensor {
        &self.k[layer]
    }

    pub fn v(&self, layer: usize) -> &Tensor {
        &self.v[layer]
    }

    /// The slot of `position` in `seq` (`block * block_size + offset`).
    pub fn slot(&self, seq: SeqId, position: usize) -> Result<i64> {
        let table = self
            .tables
            .get(&seq)
            .ok_or(KvCacheError::UnknownSequence { seq })?;
        let bs = self.layout.block_size;
        let block = table.get(position / bs).ok_or(KvCacheError::LengthMismatch {
            seq,
            layer: 0,
            have: table.len() * bs,
            expected: position + 1,
        })?;
        Ok((*block as usize * bs + position % bs) as i64)
    }

    /// A child sequence sharing all of `parent`'s blocks (copy-on-write is
    /// the caller's business: shared blocks must not be written).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<()> {
        let table = self
            .tables
            .get(&parent)
            .ok_or(KvCacheError::UnknownSequence { seq: parent })?
            .clone();
        for &b in &table {
            self.pool.share(b);
        }
        self.tables.insert(child, table);
        Ok(())
    }

    /// Every block is either free (once) or referenced exactly as often as
    /// the tables name it. Panics otherwise (tests).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        let mut refs = vec![0u16; self.pool.num_blocks()];
        for t in self.tables.values() {
            for &b in t {
                refs[b as usize] += 1;
            }
        }
        let mut free = self.pool.free.clone();
        free.sort_unstable();
        free.dedup();
        assert_eq!(
            free.len(),
            self.pool.free.len(),
            "a block is on the free list twice"
        );
        for (b, &r) in refs.iter().enumerate() {
            assert_eq!(self.pool.refs(b as u32), r, "block {b} reference count");
            assert_eq!(
                r == 0,
                free.binary_search(&(b as u32)).is_ok(),
                "block {b} free-list membership"
            );
        }
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.layout.block_size)
    }
}

impl KvManager for PagedCache {
    fn free_tokens(&self) -> usize {
        self.pool.num_free() * self.layout.block_size
    }

    fn total_tokens(&self) -> usize {
        self.pool.num_blocks() * self.layout.block_size
    }

    fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    fn can_admit(&self, tokens: usize, reserve_tokens: usize) -> bool {
        tokens <= self.max_seq_len
            && self.blocks_for(tokens) + self.blocks_for(reserve_tokens) <= self.pool.num_free()
    }

    fn max_admissible(&self, reserve_tokens: usize) -> usize {
        let blocks = self
            .pool
            .num_blocks()
            .saturating_sub(self.blocks_for(reserve_tokens));
        (blocks * self.layout.block_size).min(self.max_seq_len)
    }

    fn admit(&mut self, seq: SeqId, tokens: usize) -> Result<()> {
        if self.tables.contains_key(&seq) {
            return Err(KvCacheError::Layout(format!(
                "sequence {seq} is already in the cache"
            )));
        }
        if tokens > self.max_seq_len {
            return Err(KvCacheError::SequenceTooLong {
                seq,
                needed: tokens,
                limit: self.max_seq_len,
            });
        }
        self.tables.insert(seq, Vec::new());
        if let Err(e) = self.grow(seq, tokens) {
            self.release(seq);
            return Err(e);
        }
        Ok(())
    }

    fn can_grow(&self, seq: SeqId, new_len: usize) -> bool {
        let Some(table) = self.tables.get(&seq) else {
            return false;
        };
        new_len <= self.max_seq_len
            && self.blocks_for(new_len).saturating_sub(table.len()) <= self.pool.num_free()
    }

    fn grow(&mut self, seq: SeqId, new_len: usize) -> Result<()> {
        if new_len > self.max_seq_len {
            return Err(KvCacheError::SequenceTooLong {
                seq,
                needed: new_len,
                limit: self.max_seq_len,
            });
        }
        let need = self.blocks_for(new_len);
        let have = self
            .tables
            .get(&seq)
            .ok_or(KvCacheError::UnknownSequence { seq })?
            .len();
        let missing = need.saturating_sub(have);
        if missing > self.pool.num_free() {
            return Err(KvCacheError::OutOfMemory {
                seq,
                needed_tokens: missing * self.layout.block_size,
                free_tokens: self.free_tokens(),
            });
        }
        let table = self
            .tables
            .get_mut(&seq)
            .ok_or(KvCacheError::UnknownSequence { seq })?;
        for _ in 0..missing {
            let Some(b) = self.pool.allocate() else {
                unreachable!("the free count was checked")
            };
            table.push(b);
        }
        Ok(())
    }

    fn release(&mut self, seq: SeqId) {
        if let Some(table) = self.tables.remove(&seq) {
            for b in table {
                self.pool.free(b);
            }
        }
    }

    fn capacity(&self, seq: SeqId) -> Option<usize> {
        self.tables.get(&seq).map(|t| t.len() * self.layout.block_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(blocks: usize) -> PagedCache {
        let layout = PagedLayout::new(blocks, 16, 2, 8, 4).unwrap();
        PagedCache::new(2, layout, 100, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn admit_grow_release_account_in_blocks() {
        let mut c = cache(8);
        assert_eq!(c.total_tokens(), 128);
        assert!(c.can_admit(40, 0));
        c.admit(1, 40).unwrap(); // 3 blocks
        assert_eq!(c.free_tokens(), 5 * 16);
        assert_eq!(c.capacity(1), Some(48));
        c.grow(1, 48).unwrap(); // still 3 blocks
        assert_eq!(c.pool().num_free(), 5);
        c.grow(1, 49).unwrap();
        assert_eq!(c.pool().num_free(), 4);
        let t = c.block_table(1).unwrap().to_vec();
        assert_eq!(c.slot(1, 17).unwrap(), (t[1] * 16 + 1) as i64);
        assert!(!c.can_admit(65, 0));
        assert!(c.can_admit(40, 16));
        assert!(!c.can_admit(40, 17), "the watermark keeps two blocks free");
        assert!(matches!(c.admit(2, 65), Err(KvCacheError::OutOfMemory { .. })));
        assert_eq!(c.pool().num_free(), 4, "a failed admission leaves nothing behind");
        assert!(matches!(
            c.admit(3, 101),
            Err(KvCacheError::SequenceTooLong { .. })
        ));
        c.fork(1, 9).unwrap();
        c.release(1);
        assert_eq!(c.pool().num_free(), 4, "the fork still holds the blocks");
        c.release(9);
        assert_eq!(c.free_tokens(), c.total_tokens());
        assert_eq!(c.k(1).dims(), &[8, 2, 2, 16, 4]);
    }
}
