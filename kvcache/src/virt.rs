//! The virtual (vAttention) KV cache, CPU twin: each sequence owns a *slot*
//! of a virtually contiguous region, and physical memory is committed page
//! by page as the sequence grows. Kernels address K/V by (slot, position)
//! with plain strides: no block tables.
//!
//! ```text
//! per layer, K and V each:  [max_seqs, max_len, kv_heads, head_dim]   (reserved, PROT_NONE)
//! slot r owns bytes [r * S, (r + 1) * S),  S = round_up(max_len * kv_heads * head_dim * elem, page)
//! megacache: one K and one V region for all layers, [max_seqs, max_len, layers, kv_heads, head_dim]
//! ```
//!
//! Growing a slot by one *page group* commits the next page of every region
//! (K and V of every layer; 2 regions with the megacache), so the pool is
//! counted in page groups. Releasing a sequence keeps its pages mapped
//! (deferred reclamation); the next admission takes the best-fit idle slot,
//! and pages are taken away from idle slots only when the pool runs dry.
//! The free capacity counts pages parked on idle slots as free.
//!
//! Here the address space is reserved with `mmap(PROT_NONE)` and pages are
//! committed with `mprotect(PROT_READ | PROT_WRITE)` and decommitted with
//! `madvise(MADV_DONTNEED)` + `mprotect(PROT_NONE)`: the page accounting is
//! real (touching an uncommitted page faults). On a GPU ([`VirtualCache::on_cuda`])
//! the same type does this with `cuMemAddressReserve` / `cuMemMap` /
//! `cuMemUnmap` over a pool of `cuMemCreate` pages (see `vmm.rs`).
//!
//! Mapping modes ([`Mapping`]): `Sync` maps inside `grow` (on the critical
//! path, as a plain implementation would); `Overlapped` hands every
//! (de)commit to one persistent mapper thread and [`VirtualCache::fence`]
//! waits for it. With [`VirtualCache::map_ahead`] the backend asks, right
//! after launching step N, for the pages step N+1 will need; the mapper maps
//! them while the GPU runs step N, and step N+1's `grow` finds them there.
//! Pages mapped ahead are surplus (reclaimable by anyone), never claimed, so
//! the accounting the scheduler sees is the same in both modes.

use std::collections::HashMap;
use std::sync::Arc;

use crate::manager::KvManager;
use crate::memory::{HostMemory, Mapper, PageMemory};
use crate::{KvCacheError, Result, SeqId};

/// When pages are (de)committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mapping {
    /// In the calling thread, inside `grow` / reclaim.
    Sync,
    /// On the persistent mapper thread; `fence` waits for it.
    #[default]
    Overlapped,
}

/// Geometry and budget of a virtual cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtualConfig {
    pub num_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Bytes per element (2 for bf16, 4 for f32).
    pub elem_bytes: usize,
    pub max_seqs: usize,
    pub max_len: usize,
    /// Physical page size in bytes (default 2 MiB, the CUDA VMM granularity).
    pub page_size: usize,
    /// Physical memory for KV, in bytes.
    pub budget_bytes: usize,
    /// All layers of a token in one region (finer granularity per page).
    pub megacache: bool,
    pub mapping: Mapping,
}

/// Where a kernel finds the rows of one (layer, K or V): row of (slot,
/// position) at `base + slot * slot_stride + position * pos_stride` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    /// Address of (slot 0, position 0) of this layer (device address on a GPU).
    pub base: u64,
    pub slot_stride: usize,
    pub pos_stride: usize,
}

pub const DEFAULT_PAGE_SIZE: usize = 2 << 20;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    owner: Option<SeqId>,
    /// Page groups committed to this slot (from its start).
    pages: usize,
    /// Page groups the owner's length needs (0 when idle); `pages - used`
    /// is surplus that best-fit reuse left mapped, and can be taken back.
    used: usize,
}

/// K or V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kv {
    K,
    V,
}

/// The virtual KV cache (CPU twin).
#[derive(Debug)]
pub struct VirtualCache {
    cfg: VirtualConfig,
    /// Dropped before `memory`: the queue drains, then the memory goes.
    mapper: Option<Mapper>,
    /// Non-megacache regions: [layer0 K, layer0 V, layer1 K, ...]; megacache: [K, V].
    memory: Arc<dyn PageMemory>,
    /// Bytes of one slot in one region (a whole number of pages).
    slot_stride: usize,
    /// Bytes of one token's row in one region.
    token_bytes: usize,
    tokens_per_page: usize,
    slots: Vec<Slot>,
    seq_slot: HashMap<SeqId, usize>,
    /// Page groups in the pool, not committed to any slot.
    free_pages: usize,
    total_pages: usize,
    /// Page groups committed / decommitted so far (for reports).
    pub mapped_total: usize,
    pub unmapped_total: usize,
}

/// Geometry derived from a [`VirtualConfig`], checked.
struct Geometry {
    token_bytes: usize,
    tokens_per_page: usize,
    slot_stride: usize,
    num_regions: usize,
    total_pages: usize,
}

impl VirtualCache {
    /// The CPU twin over host virtual memory.
    pub fn new(cfg: VirtualConfig) -> Result<Self> {
        let geo = Self::geometry(&cfg)?;
        let memory = Arc::new(HostMemory::new(geo.num_regions, cfg.max_seqs * geo.slot_stride)?);
        Self::build(cfg, geo, memory, Box::new(|| {}))
    }

    /// The cache in GPU memory through the CUDA VMM API; the physical pages
    /// of the whole budget are created up front.
    #[cfg(feature = "cuda")]
    pub fn on_cuda(
        cfg: VirtualConfig,
        ctx: Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
    ) -> Result<Self> {
        let geo = Self::geometry(&cfg)?;
        let memory = Arc::new(crate::vmm::VmmMemory::new(
            ctx.clone(),
            geo.num_regions,
            cfg.max_seqs * geo.slot_stride,
            cfg.page_size,
            geo.total_pages * geo.num_regions,
        )?);
        // The mapper thread makes driver calls: it needs the context current.
        let bind = Box::new(move || {
            let _ = ctx.bind_to_thread();
        });
        Self::build(cfg, geo, memory, bind)
    }

    fn build(
        cfg: VirtualConfig,
        geo: Geometry,
        memory: Arc<dyn PageMemory>,
        on_mapper_start: Box<dyn FnOnce() + Send>,
    ) -> Result<Self> {
        let mapper = match cfg.mapping {
            Mapping::Sync => None,
            Mapping::Overlapped => Some(Mapper::spawn(memory.clone(), on_mapper_start)?),
        };
        Ok(Self {
            cfg,
            mapper,
            memory,
            slot_stride: geo.slot_stride,
            token_bytes: geo.token_bytes,
            tokens_per_page: geo.tokens_per_page,
            slots: vec![Slot::default(); cfg.max_seqs],
            seq_slot: HashMap::new(),
            free_pages: geo.total_pages,
            total_pages: geo.total_pages,
            mapped_total: 0,
            unmapped_total: 0,
        })
    }

    fn geometry(cfg: &VirtualConfig) -> Result<Geometry> {
        let bad = |m: String| Err(KvCacheError::Layout(m));
        let os_page = 4096;
        if cfg.page_size == 0 || !cfg.page_size.is_multiple_of(os_page) {
            return bad(format!(
                "page size {} is not a multiple of {os_page} bytes",
                cfg.page_size
            ));
        }
        let row = cfg.kv_heads * cfg.head_dim * cfg.elem_bytes;
        let token_bytes = if cfg.megacache { cfg.num_layers * row } else { row };
        if token_bytes == 0 || !cfg.page_size.is_multiple_of(token_bytes) {
            return bad(format!(
                "a {} byte page does not hold a whole number of {token_bytes} byte token rows",
                cfg.page_size
            ));
        }
        let tokens_per_page = cfg.page_size / token_bytes;
        let slot_stride = (cfg.max_len * token_bytes).div_ceil(cfg.page_size) * cfg.page_size;
        let num_regions = if cfg.megacache { 2 } else { 2 * cfg.num_layers };
        let total_pages = cfg.budget_bytes / (cfg.page_size * num_regions);
        if total_pages == 0 {
            return bad(format!(
                "a KV budget of {} bytes holds no page group ({} regions x {} byte pages)",
                cfg.budget_bytes, num_regions, cfg.page_size
            ));
        }
        Ok(Geometry {
            token_bytes,
            tokens_per_page,
            slot_stride,
            num_regions,
            total_pages,
        })
    }

    /// Whether the memory is on a GPU (kernels read it through [`Self::view`]).
    pub fn is_device(&self) -> bool {
        !self.memory.is_host()
    }

    /// Where kernels find (layer, K or V).
    pub fn view(&self, layer: usize, kv: Kv) -> SlotView {
        let e = self.cfg.elem_bytes;
        SlotView {
            base: self.memory.base(self.region_index(layer, kv)) + self.offset(layer, 0, 0) as u64,
            slot_stride: self.slot_stride / e,
            pos_stride: self.token_bytes / e,
        }
    }

    /// Waits until every page (de)commit submitted so far has run (a no-op in
    /// `Sync` mode). Call before launching work that touches new pages.
    pub fn fence(&self) -> Result<()> {
        self.mapper.as_ref().map_or(Ok(()), Mapper::fence)
    }

    /// Time the mapper thread has spent (de)committing pages.
    pub fn mapper_busy(&self) -> std::time::Duration {
        self.mapper.as_ref().map_or(Default::default(), Mapper::busy)
    }

    /// Maps, from the free pool only and without claiming them, the pages
    /// `seq` needs to reach `tokens` (the next step's length): in
    /// `Overlapped` mode they are mapped while the current step runs. Best
    /// effort: does nothing when the pool is short or `seq` is unknown, and
    /// in `Sync` mode (which maps only on demand).
    pub fn map_ahead(&mut self, seq: SeqId, tokens: usize) -> Result<()> {
        let Some(&slot) = self.seq_slot.get(&seq) else {
            return Ok(());
        };
        if self.cfg.mapping == Mapping::Sync {
            return Ok(()); // pages are mapped when needed, in grow
        }
        let want = self.pages_for(tokens.min(self.cfg.max_len));
        let have = self.slots[slot].pages;
        let take = want.saturating_sub(have).min(self.free_pages);
        if take > 0 {
            self.map(slot, take)?;
        }
        Ok(())
    }

    pub fn config(&self) -> &VirtualConfig {
        &self.cfg
    }

    pub fn tokens_per_page(&self) -> usize {
        self.tokens_per_page
    }

    pub fn slot_of(&self, seq: SeqId) -> Option<usize> {
        self.seq_slot.get(&seq).copied()
    }

    /// Page groups committed to slots, idle ones included.
    pub fn mapped_pages(&self) -> usize {
        self.slots.iter().map(|s| s.pages).sum()
    }

    fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.tokens_per_page)
    }

    /// Mapped page groups no sequence needs: idle slots' and owned slots' surplus.
    fn spare_pages(&self) -> usize {
        self.slots.iter().map(|s| s.pages - s.used).sum()
    }

    fn region_index(&self, layer: usize, kv: Kv) -> usize {
        let i = if self.cfg.megacache { 0 } else { 2 * layer };
        i + usize::from(kv == Kv::V)
    }

    /// Byte offset of (layer, slot, position) within its region.
    fn offset(&self, layer: usize, slot: usize, position: usize) -> usize {
        let row = self.cfg.kv_heads * self.cfg.head_dim * self.cfg.elem_bytes;
        let within = if self.cfg.megacache {
            position * self.token_bytes + layer * row
        } else {
            position * row
        };
        slot * self.slot_stride + within
    }

    /// Moves `n` page groups from the pool to the end of `slot`'s mapping and
    /// commits them in every region (the caller checked that the pool has them).
    fn map(&mut self, slot: usize, n: usize) -> Result<()> {
        let from = self.slots[slot].pages;
        let (off, len) = (
            slot * self.slot_stride + from * self.cfg.page_size,
            n * self.cfg.page_size,
        );
        match &self.mapper {
            Some(m) => m.commit(off, len)?,
            None => self.memory.commit(off, len)?,
        }
        self.free_pages -= n;
        self.slots[slot].pages += n;
        self.mapped_total += n;
        Ok(())
    }

    /// Takes `n` page groups back from spare mappings (idle slots, and the
    /// surplus beyond what owners need; the largest first), so that the pool
    /// can serve them.
    fn reclaim(&mut self, mut n: usize) -> Result<()> {
        while n > 0 {
            let Some(i) = (0..self.slots.len())
                .filter(|&i| self.slots[i].pages > self.slots[i].used)
                .max_by_key(|&i| self.slots[i].pages - self.slots[i].used)
            else {
                break;
            };
            let take = n.min(self.slots[i].pages - self.slots[i].used);
            let keep = self.slots[i].pages - take;
            // Account first: if a decommit fails half-way, no row of the
            // affected pages is handed out again.
            self.slots[i].pages = keep;
            self.free_pages += take;
            self.unmapped_total += take;
            n -= take;
            let (off, len) = (
                i * self.slot_stride + keep * self.cfg.page_size,
                take * self.cfg.page_size,
            );
            match &self.mapper {
                Some(m) => m.decommit(off, len)?,
                None => self.memory.decommit(off, len)?,
            }
        }
        Ok(())
    }

    /// The pool plus the pages committed to slots make up the budget; each
    /// slot holds at most a full sequence; owners are unique. Panics
    /// otherwise (tests).
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        assert_eq!(
            self.free_pages + self.mapped_pages(),
            self.total_pages,
            "page accounting"
        );
        let max_pages = self.pages_for(self.cfg.max_len);
        let mut owners = std::collections::HashSet::new();
        for (i, s) in self.slots.iter().enumerate() {
            assert!(s.pages <= max_pages, "slot {i} over-mapped");
            if let Some(o) = s.owner {
                assert!(owners.insert(o), "sequence {o} owns two slots");
                assert_eq!(self.seq_slot.get(&o), Some(&i));
            }
        }
        assert_eq!(owners.len(), self.seq_slot.len());
    }

    /// Bytes of one token row of (layer, K or V) in `slot` at `position`,
    /// if that memory is committed.
    pub fn row(&self, layer: usize, kv: Kv, slot: usize, position: usize) -> Result<&[u8]> {
        let (off, len) = self.checked(layer, slot, position)?;
        let base = self.memory.base(self.region_index(layer, kv)) as *const u8;
        // SAFETY: checked() verified that the row lies in committed host pages of
        // this region, and that no commit is still queued.
        Ok(unsafe { std::slice::from_raw_parts(base.add(off), len) })
    }

    /// Mutable bytes of one token row (the CPU twin of the K/V write).
    pub fn row_mut(&mut self, layer: usize, kv: Kv, slot: usize, position: usize) -> Result<&mut [u8]> {
        let (off, len) = self.checked(layer, slot, position)?;
        let base = self.memory.base(self.region_index(layer, kv)) as *mut u8;
        // SAFETY: as in row(); &mut self guarantees no other borrow of the region.
        Ok(unsafe { std::slice::from_raw_parts_mut(base.add(off), len) })
    }

    fn checked(&self, layer: usize, slot: usize, position: usize) -> Result<(usize, usize)> {
        if !self.memory.is_host() {
            return Err(KvCacheError::Layout(
                "the cache is in GPU memory: rows are read by kernels".into(),
            ));
        }
        if self.mapper.as_ref().is_some_and(Mapper::pending) {
            self.fence()?;
        }
        let row = self.cfg.kv_heads * self.cfg.head_dim * self.cfg.elem_bytes;
        let s = self
            .slots
            .get(slot)
            .ok_or_else(|| KvCacheError::Layout(format!("no slot {slot}")))?;
        if layer >= self.cfg.num_layers {
            return Err(KvCacheError::LayerOutOfRange {
                layer,
                num_layers: self.cfg.num_layers,
            });
        }
        if position >= (s.pages * self.tokens_per_page).min(self.cfg.max_len) {
            return Err(KvCacheError::Layout(format!(
                "position {position} of slot {slot} is not mapped ({} tokens are)",
                s.pages * self.tokens_per_page
            )));
        }
        Ok((self.offset(layer, slot, position), row))
    }
}

impl KvManager for VirtualCache {
    fn free_tokens(&self) -> usize {
        (self.free_pages + self.spare_pages()) * self.tokens_per_page
    }

    fn total_tokens(&self) -> usize {
        self.total_pages * self.tokens_per_page
    }

    fn max_seq_len(&self) -> usize {
        self.cfg.max_len
    }

    fn can_admit(&self, tokens: usize, reserve_tokens: usize) -> bool {
        tokens <= self.cfg.max_len
            && self.slots.iter().any(|s| s.owner.is_none())
            && self.pages_for(tokens) + self.pages_for(reserve_tokens) <= self.free_pages + self.spare_pages()
    }

    fn max_admissible(&self, reserve_tokens: usize) -> usize {
        let pages = self.total_pages.saturating_sub(self.pages_for(reserve_tokens));
        (pages * self.tokens_per_page).min(self.cfg.max_len)
    }

    fn admit(&mut self, seq: SeqId, tokens: usize) -> Result<()> {
        if self.seq_slot.contains_key(&seq) {
            return Err(KvCacheError::Layout(format!(
                "sequence {seq} is already in the cache"
            )));
        }
        if tokens > self.cfg.max_len {
            return Err(KvCacheError::SequenceTooLong {
                seq,
                needed: tokens,
                limit: self.cfg.max_len,
            });
        }
        let need = self.pages_for(tokens);
        let idle = (0..self.slots.len()).filter(|&i| self.slots[i].owner.is_none());
        // Best fit: the idle slot already holding enough pages with the fewest
        // to spare; else the one holding the most (least new mapping).
        let best = idle
            .clone()
            .filter(|&i| self.slots[i].pages >= need)
            .min_by_key(|&i| self.slots[i].pages)
            .or_else(|| idle.max_by_key(|&i| self.slots[i].pages));
        let Some(slot) = best else {
            return Err(KvCacheError::OutOfSlots {
                seq,
                max_seqs: self.cfg.max_seqs,
            });
        };
        self.slots[slot].owner = Some(seq);
        self.slots[slot].used = 0;
        self.seq_slot.insert(seq, slot);
        if let Err(e) = self.grow(seq, tokens) {
            self.release(seq);
            return Err(e);
        }
        Ok(())
    }

    fn can_grow(&self, seq: SeqId, new_len: usize) -> bool {
        let Some(&slot) = self.seq_slot.get(&seq) else {
            return false;
        };
        let st = self.slots[slot];
        // This slot's own surplus is not spare for itself.
        let spare_elsewhere = self.spare_pages() - (st.pages - st.used);
        new_len <= self.cfg.max_len
            && self.pages_for(new_len).saturating_sub(st.pages) <= self.free_pages + spare_elsewhere
    }

    fn grow(&mut self, seq: SeqId, new_len: usize) -> Result<()> {
        let slot = *self
            .seq_slot
            .get(&seq)
            .ok_or(KvCacheError::UnknownSequence { seq })?;
        if new_len > self.cfg.max_len {
            return Err(KvCacheError::SequenceTooLong {
                seq,
                needed: new_len,
                limit: self.cfg.max_len,
            });
        }
        let need = self.pages_for(new_len).max(self.slots[slot].used);
        let have = self.slots[slot].pages;
        let missing = need.saturating_sub(have);
        // This slot's own surplus is not spare for itself.
        let spare_elsewhere = self.spare_pages() - (have - self.slots[slot].used);
        if missing > self.free_pages + spare_elsewhere {
            return Err(KvCacheError::OutOfMemory {
                seq,
                needed_tokens: missing * self.tokens_per_page,
                free_tokens: self.free_tokens(),
            });
        }
        if missing > 0 {
            if missing > self.free_pages {
                // Keep this slot's surplus out of the reclaim (it is needed now).
                let own = self.slots[slot].used;
                self.slots[slot].used = have;
                let r = self.reclaim(missing - self.free_pages);
                self.slots[slot].used = own;
                r?;
            }
            self.map(slot, missing)?;
        }
        self.slots[slot].used = need;
        Ok(())
    }

    fn release(&mut self, seq: SeqId) {
        if let Some(slot) = self.seq_slot.remove(&seq) {
            // Deferred reclamation: the pages stay mapped for the next tenant.
            self.slots[slot].owner = None;
            self.slots[slot].used = 0;
        }
    }

    /// Tokens of the pages the sequence has claimed (`used`); surplus pages
    /// left on its slot may still be taken back by others.
    fn capacity(&self, seq: SeqId) -> Option<usize> {
        let slot = *self.seq_slot.get(&seq)?;
        Some((self.slots[slot].used * self.tokens_per_page).min(self.cfg.max_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(megacache: bool, budget_groups: usize) -> VirtualConfig {
        // 2 layers, 1 head of 64 f32 = 256 B rows; 4 KiB pages hold 16 tokens
        // (8 with the megacache, whose token rows hold both layers).
        let regions = if megacache { 2 } else { 4 };
        VirtualConfig {
            num_layers: 2,
            kv_heads: 1,
            head_dim: 64,
            elem_bytes: 4,
            max_seqs: 3,
            max_len: 64,
            page_size: 4096,
            budget_bytes: budget_groups * regions * 4096,
            megacache,
            mapping: Mapping::Sync,
        }
    }

    #[test]
    fn grows_page_by_page_and_rows_are_real_memory() {
        let mut c = VirtualCache::new(cfg(false, 6)).unwrap();
        assert_eq!(c.tokens_per_page(), 16);
        assert_eq!(c.total_tokens(), 96);
        c.admit(1, 20).unwrap(); // 2 page groups
        assert_eq!(c.capacity(1), Some(32));
        let slot = c.slot_of(1).unwrap();
        c.row_mut(1, Kv::V, slot, 31).unwrap().fill(7);
        assert!(c.row(1, Kv::V, slot, 31).unwrap().iter().all(|&b| b == 7));
        assert!(c.row(1, Kv::V, slot, 32).is_err(), "position 32 is not mapped");
        c.grow(1, 33).unwrap();
        assert_eq!(c.free_tokens(), 3 * 16);
        assert!(!c.can_grow(1, 65));
    }

    #[test]
    fn deferred_reclamation_and_best_fit() {
        let mut c = VirtualCache::new(cfg(false, 6)).unwrap();
        c.admit(1, 48).unwrap(); // 3 groups
        c.admit(2, 48).unwrap(); // 3 groups: the pool is empty
        c.release(1);
        assert_eq!(c.mapped_pages(), 6, "a released slot keeps its pages");
        assert_eq!(c.free_tokens(), 48, "idle pages count as free");
        c.grow(2, 64).unwrap(); // one more group, taken back from the idle slot
        assert_eq!((c.mapped_total, c.unmapped_total), (7, 1));
        // A 2-group request takes the idle slot that still holds 2 groups: no mapping.
        c.admit(3, 32).unwrap();
        assert_eq!(c.mapped_total, 7);
        assert_eq!(c.free_tokens(), 0);
        assert!(matches!(c.admit(4, 1), Err(KvCacheError::OutOfMemory { .. })));
        assert!(!c.can_admit(1, 0));
        c.release(2);
        c.release(3);
        assert_eq!(c.free_tokens(), c.total_tokens());
    }

    /// A short request placed on a slot with many parked pages must not hold
    /// them: the surplus goes to whoever grows (no preemption thrash).
    #[test]
    fn best_fit_surplus_is_reclaimable() {
        let mut c = VirtualCache::new(cfg(false, 6)).unwrap();
        c.admit(1, 64).unwrap(); // 4 groups on slot 0
        c.admit(2, 16).unwrap(); // 1 group
        c.release(1);
        c.admit(3, 1).unwrap(); // best fit: slot 0 with its 4 parked groups; uses 1
        assert_eq!(c.capacity(3), Some(16));
        assert_eq!(
            c.free_tokens(),
            16 + 3 * 16,
            "the pool plus slot 0's 3 surplus groups"
        );
        assert!(c.can_grow(2, 64));
        c.grow(2, 64).unwrap(); // 3 more groups: the free one and 2 of slot 0's surplus
        c.check_invariants();
        assert_eq!(c.capacity(3), Some(16));
        assert!(c.row(0, Kv::K, c.slot_of(3).unwrap(), 15).is_ok());
    }

    #[test]
    fn reclaimed_pages_come_back_zeroed() {
        let mut small = cfg(true, 2);
        small.max_seqs = 2;
        let mut c = VirtualCache::new(small).unwrap();
        assert_eq!(c.tokens_per_page(), 8); // 2 layers x 256 B per token in one region
        c.admit(1, 16).unwrap(); // slot 0, both groups
        c.admit(2, 0).unwrap(); // slot 1, nothing mapped
        let s0 = c.slot_of(1).unwrap();
        c.row_mut(1, Kv::K, s0, 15).unwrap().fill(9);
        c.release(1);
        c.grow(2, 16).unwrap(); // takes both groups back from slot 0
        c.release(2);
        c.admit(3, 0).unwrap(); // best fit for 0 pages: slot 0
        assert_eq!(c.slot_of(3), Some(s0));
        c.grow(3, 16).unwrap(); // slot 0 is mapped again, from the pool via slot 1
        assert!(
            c.row(1, Kv::K, s0, 15).unwrap().iter().all(|&b| b == 0),
            "decommitted memory is gone"
        );
    }

    /// Overlapped mode: commits run on the mapper thread; pages mapped ahead
    /// are surplus (free for others), and the next grow finds them mapped.
    #[test]
    fn overlapped_mapping_and_map_ahead() {
        let mut o = cfg(false, 6);
        o.mapping = Mapping::Overlapped;
        let mut c = VirtualCache::new(o).unwrap();
        c.admit(1, 16).unwrap(); // 1 group
        let slot = c.slot_of(1).unwrap();
        c.row_mut(0, Kv::K, slot, 15).unwrap().fill(3); // row access fences first
        c.map_ahead(1, 17).unwrap(); // the next step's page, mapped in the background
        assert_eq!(c.capacity(1), Some(16), "mapped ahead, not claimed");
        assert_eq!(
            c.free_tokens(),
            5 * 16,
            "the page mapped ahead still counts as free"
        );
        c.fence().unwrap();
        assert_eq!(c.mapped_total, 2);
        c.grow(1, 17).unwrap();
        assert_eq!(c.mapped_total, 2, "grow found the page mapped");
        c.row_mut(0, Kv::V, slot, 16).unwrap().fill(4);
        // Another sequence may take the surplus back.
        c.map_ahead(1, 64).unwrap();
        c.admit(2, 64).unwrap();
        c.check_invariants();
        assert!(c.row(0, Kv::K, slot, 15).unwrap().iter().all(|&b| b == 3));
        assert!(c.mapper_busy() > std::time::Duration::ZERO);
    }

    #[test]
    fn refuses_bad_geometry() {
        let mut bad = cfg(false, 1);
        bad.page_size = 1000;
        assert!(VirtualCache::new(bad).is_err());
        let mut tiny = cfg(false, 1);
        tiny.budget_bytes = 4096;
        assert!(VirtualCache::new(tiny).is_err());
    }
}
