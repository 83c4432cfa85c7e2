//! Device memory for the virtual cache through the CUDA virtual memory
//! management API (driver API, via cudarc's bindings):
//!
//! - every region (per layer K and V, or the megacache's two) is a range of
//!   virtual addresses from `cuMemAddressReserve`, nothing behind it;
//! - physical memory is a pool of page-sized handles from `cuMemCreate`,
//!   created up front for the whole KV budget (so that the budget is really
//!   ours, and no `cuMemCreate` runs on the critical path);
//! - commit = `cuMemMap` of one pool handle per page, then one
//!   `cuMemSetAccess` per contiguous run and region; decommit = `cuMemUnmap`
//!   per page and the handle goes back to the pool;
//! - teardown waits for the device, unmaps, releases every handle and frees
//!   every address range.
//!
//! A page must be a multiple of the allocation granularity (2 MiB on the
//! H100); devices without VMM support are refused with that reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{CudaContext, sys};

use crate::memory::PageMemory;
use crate::{KvCacheError, Result};

fn check(what: &str, r: sys::CUresult) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(KvCacheError::Device(format!("{what} failed: {r:?}")))
    }
}

fn props(ordinal: i32) -> sys::CUmemAllocationProp {
    // SAFETY: a plain C struct for which all-zero is a valid (default) value.
    let mut p: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    p.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    p.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = ordinal;
    p
}

/// Whether `ctx`'s device supports VMM, and its allocation granularity.
pub fn vmm_granularity(ctx: &CudaContext) -> Result<usize> {
    ctx.bind_to_thread()
        .map_err(|e| KvCacheError::Device(e.to_string()))?;
    let supported = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)
        .map_err(|e| KvCacheError::Device(e.to_string()))?;
    if supported == 0 {
        return Err(KvCacheError::Device(
            "this GPU/driver does not support CUDA virtual memory management (cuMemMap); \
             use the `paged` backend"
                .into(),
        ));
    }
    let p = props(ctx.ordinal() as i32);
    let mut g = 0usize;
    // SAFETY: valid out pointer and property struct.
    check("cuMemGetAllocationGranularity", unsafe {
        sys::cuMemGetAllocationGranularity(
            &mut g,
            &p,
            sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
    })?;
    Ok(g)
}

#[derive(Debug, Default)]
struct Pool {
    free: Vec<sys::CUmemGenericAllocationHandle>,
    /// (region, page index) -> handle mapped there.
    mapped: HashMap<(usize, usize), sys::CUmemGenericAllocationHandle>,
}

#[derive(Debug)]
pub(crate) struct VmmMemory {
    ctx: Arc<CudaContext>,
    ranges: Vec<(sys::CUdeviceptr, usize)>,
    page: usize,
    total_handles: usize,
    pool: Mutex<Pool>,
    access: sys::CUmemAccessDesc,
}

// SAFETY: handles and device addresses are plain integers; the pool is behind a mutex.
unsafe impl Send for VmmMemory {}
unsafe impl Sync for VmmMemory {}

impl VmmMemory {
    /// Reserves `count` regions of `len` bytes and creates `handles` pages of `page` bytes.
    pub(crate) fn new(
        ctx: Arc<CudaContext>,
        count: usize,
        len: usize,
        page: usize,
        handles: usize,
    ) -> Result<Self> {
        let gran = vmm_granularity(&ctx)?;
        if page == 0 || !page.is_multiple_of(gran) {
            return Err(KvCacheError::Layout(format!(
                "page size {page} is not a multiple of the GPU's VMM allocation granularity ({gran} bytes)"
            )));
        }
        let mut me = Self {
            access: sys::CUmemAccessDesc {
                location: props(ctx.ordinal() as i32).location,
                flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            },
            ctx,
            ranges: Vec::with_capacity(count),
            page,
            total_handles: 0,
            pool: Mutex::new(Pool::default()),
        };
        for _ in 0..count {
            let mut ptr: sys::CUdeviceptr = 0;
            // SAFETY: valid out pointer; the range is freed in Drop.
            check("cuMemAddressReserve", unsafe {
                sys::cuMemAddressReserve(&mut ptr, len, page, 0, 0)
            })?;
            me.ranges.push((ptr, len));
        }
        let p = props(me.ctx.ordinal() as i32);
        let mut pool = Pool::default();
        pool.free.reserve(handles);
        for i in 0..handles {
            let mut h: sys::CUmemGenericAllocationHandle = 0;
            // SAFETY: valid out pointer and properties; released in Drop.
            let r = unsafe { sys::cuMemCreate(&mut h, page, &p, 0) };
            if r != sys::CUresult::CUDA_SUCCESS {
                me.pool = Mutex::new(pool);
                me.total_handles = i;
                return Err(KvCacheError::Device(format!(
                    "cuMemCreate of physical page {} of {handles} ({} MiB each) failed: {r:?} \
                     (lower --kv-memory)",
                    i + 1,
                    page >> 20
                )));
            }
            pool.free.push(h);
        }
        me.total_handles = handles;
        me.pool = Mutex::new(pool);
        Ok(me)
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| KvCacheError::Device(e.to_string()))
    }
}

impl PageMemory for VmmMemory {
    fn commit(&self, offset: usize, len: usize) -> Result<()> {
        self.bind()?;
        let mut pool = self
            .pool
            .lock()
            .map_err(|e| KvCacheError::Device(e.to_string()))?;
        let pages = len / self.page;
        if pool.free.len() < pages * self.ranges.len() {
            return Err(KvCacheError::Device(format!(
                "physical page pool exhausted: {} pages needed, {} free of {}",
                pages * self.ranges.len(),
                pool.free.len(),
                self.total_handles
            )));
        }
        for (r, &(base, _)) in self.ranges.iter().enumerate() {
            for i in 0..pages {
                let at = offset + i * self.page;
                let h = pool.free.pop().expect("checked above");
                // SAFETY: [base + at, + page) lies in our reserved range and is unmapped
                // (the cache commits each page once); h is an unmapped pool handle.
                let rc = unsafe { sys::cuMemMap(base + at as u64, self.page, 0, h, 0) };
                if let Err(e) = check("cuMemMap", rc) {
                    pool.free.push(h);
                    return Err(e);
                }
                pool.mapped.insert((r, at / self.page), h);
            }
            // One access call for the whole contiguous run of this region.
            // SAFETY: the run is mapped just above.
            check("cuMemSetAccess", unsafe {
                sys::cuMemSetAccess(base + offset as u64, len, &self.access, 1)
            })?;
        }
        Ok(())
    }

    fn decommit(&self, offset: usize, len: usize) -> Result<()> {
        self.bind()?;
        let mut pool = self
            .pool
            .lock()
            .map_err(|e| KvCacheError::Device(e.to_string()))?;
        for (r, &(base, _)) in self.ranges.iter().enumerate() {
            for i in 0..len / self.page {
                let at = offset + i * self.page;
                if let Some(h) = pool.mapped.remove(&(r, at / self.page)) {
                    // SAFETY: exactly one handle is mapped at this page; no kernel reads it
                    // (idle or surplus pages only).
                    check("cuMemUnmap", unsafe {
                        sys::cuMemUnmap(base + at as u64, self.page)
                    })?;
                    pool.free.push(h);
                }
            }
        }
        Ok(())
    }

    fn base(&self, i: usize) -> u64 {
        self.ranges[i].0
    }

    fn is_host(&self) -> bool {
        false
    }
}

impl Drop for VmmMemory {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        // Kernels in flight may still read the cache.
        let _ = self.ctx.synchronize();
        let pool = std::mem::take(self.pool.get_mut().unwrap_or_else(|e| e.into_inner()));
        // SAFETY: each (region, page) is mapped exactly once; then every handle we created
        // is released once and every range we reserved is freed once.
        unsafe {
            for (&(r, i), &h) in &pool.mapped {
                sys::cuMemUnmap(self.ranges[r].0 + (i * self.page) as u64, self.page);
                sys::cuMemRelease(h);
            }
            for &h in &pool.free {
                sys::cuMemRelease(h);
            }
            for &(p, len) in &self.ranges {
                sys::cuMemAddressFree(p, len);
            }
        }
    }
}
