//! The memory behind a [`VirtualCache`](crate::VirtualCache): reserved
//! address ranges ("regions") whose pages are committed and decommitted at
//! the same offsets in every region, and the mapper thread that does that
//! work off the critical path.
//!
//! Two implementations: [`HostMemory`] (the CPU twin: `mmap(PROT_NONE)`,
//! `mprotect`, `madvise`) and, with the `cuda` feature, `VmmMemory` (CUDA
//! virtual memory management: `cuMemAddressReserve`, a pool of `cuMemCreate`
//! handles, `cuMemMap` + `cuMemSetAccess`, `cuMemUnmap`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Instant;

use crate::{KvCacheError, Result};

/// Reserved regions of equal length whose pages are (de)committed together.
pub(crate) trait PageMemory: Send + Sync + std::fmt::Debug {
    /// Makes bytes `[offset, offset + len)` of every region usable (page aligned).
    fn commit(&self, offset: usize, len: usize) -> Result<()>;
    /// Gives the pages of `[offset, offset + len)` of every region back.
    fn decommit(&self, offset: usize, len: usize) -> Result<()>;
    /// Address of region `i` (a device address for device memory).
    fn base(&self, i: usize) -> u64;
    /// Whether the regions are host memory this process may read.
    fn is_host(&self) -> bool;
}

/// Reserved host address space whose pages are committed on demand.
#[derive(Debug)]
struct Region {
    base: *mut u8,
    len: usize,
}

// SAFETY: the region is plain memory owned by this value; the cache hands
// out row slices only through &self / &mut self.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    fn reserve(len: usize) -> Result<Self> {
        // SAFETY: an anonymous private mapping with no access; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(KvCacheError::Layout(format!(
                "cannot reserve {len} bytes of address space: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Self { base: p.cast(), len })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; nothing borrows it past the cache's lifetime.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// The CPU twin: regions reserved with `mmap(PROT_NONE)`, pages committed
/// with `mprotect(PROT_READ | PROT_WRITE)` and decommitted with
/// `madvise(MADV_DONTNEED)` + `mprotect(PROT_NONE)`, so touching an
/// uncommitted page faults and reclaimed pages come back zeroed.
#[derive(Debug)]
pub(crate) struct HostMemory {
    regions: Vec<Region>,
}

impl HostMemory {
    pub(crate) fn new(count: usize, len: usize) -> Result<Self> {
        Ok(Self {
            regions: (0..count).map(|_| Region::reserve(len)).collect::<Result<_>>()?,
        })
    }
}

impl PageMemory for HostMemory {
    fn commit(&self, offset: usize, len: usize) -> Result<()> {
        for r in &self.regions {
            debug_assert!(offset + len <= r.len);
            // SAFETY: [offset, offset + len) lies inside the mapping (the cache checks slot bounds).
            let rc =
                unsafe { libc::mprotect(r.base.add(offset).cast(), len, libc::PROT_READ | libc::PROT_WRITE) };
            if rc != 0 {
                return Err(KvCacheError::Layout(format!(
                    "mprotect: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        Ok(())
    }

    fn decommit(&self, offset: usize, len: usize) -> Result<()> {
        for r in &self.regions {
            debug_assert!(offset + len <= r.len);
            // SAFETY: as above; nothing reads these pages any more (idle or surplus pages).
            let rc = unsafe {
                let p = r.base.add(offset).cast();
                libc::madvise(p, len, libc::MADV_DONTNEED) | libc::mprotect(p, len, libc::PROT_NONE)
            };
            if rc != 0 {
                return Err(KvCacheError::Layout(format!(
                    "madvise/mprotect: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        Ok(())
    }

    fn base(&self, i: usize) -> u64 {
        self.regions[i].base as u64
    }

    fn is_host(&self) -> bool {
        true
    }
}

enum Job {
    Commit(usize, usize),
    Decommit(usize, usize),
}

#[derive(Debug, Default)]
struct Progress {
    done: u64,
    error: Option<String>,
    busy: std::time::Duration,
}

/// One persistent thread that (de)commits pages in submission order. The
/// owner submits jobs and later calls [`Mapper::fence`], which blocks (on a
/// condition variable, no spinning) until every job submitted so far has
/// run, and reports the first error. Between the two the owner launches GPU
/// work: the mapping overlaps it.
#[derive(Debug)]
pub(crate) struct Mapper {
    tx: Option<mpsc::Sender<Job>>,
    issued: AtomicU64,
    state: Arc<(Mutex<Progress>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Commit(o, l) => write!(f, "commit {o}+{l}"),
            Job::Decommit(o, l) => write!(f, "decommit {o}+{l}"),
        }
    }
}

impl Mapper {
    pub(crate) fn spawn(memory: Arc<dyn PageMemory>, on_start: Box<dyn FnOnce() + Send>) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let state = Arc::new((Mutex::new(Progress::default()), Condvar::new()));
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("vpod-kv-mapper".into())
            .spawn(move || {
                on_start();
                for job in rx {
                    let t = Instant::now();
                    let r = match job {
                        Job::Commit(o, l) => memory.commit(o, l),
                        Job::Decommit(o, l) => memory.decommit(o, l),
                    };
                    let (lock, cv) = &*shared;
                    let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
                    p.busy += t.elapsed();
                    p.done += 1;
                    if let Err(e) = r
                        && p.error.is_none()
                    {
                        p.error = Some(format!("{job:?}: {e}"));
                    }
                    cv.notify_all();
                }
            })
            .map_err(|e| KvCacheError::Layout(format!("cannot start the mapper thread: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            issued: AtomicU64::new(0),
            state,
            thread: Some(thread),
        })
    }

    fn submit(&self, job: Job) -> Result<()> {
        self.issued.fetch_add(1, Ordering::SeqCst);
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(job).ok())
            .ok_or_else(|| KvCacheError::Layout("the mapper thread is gone".into()))
    }

    pub(crate) fn commit(&self, offset: usize, len: usize) -> Result<()> {
        self.submit(Job::Commit(offset, len))
    }

    pub(crate) fn decommit(&self, offset: usize, len: usize) -> Result<()> {
        self.submit(Job::Decommit(offset, len))
    }

    /// Whether submitted jobs have not all run yet.
    pub(crate) fn pending(&self) -> bool {
        let (lock, _) = &*self.state;
        let done = lock.lock().unwrap_or_else(|e| e.into_inner()).done;
        done < self.issued.load(Ordering::SeqCst)
    }

    /// Waits until every submitted job has run; the first failure, if any.
    pub(crate) fn fence(&self) -> Result<()> {
        let issued = self.issued.load(Ordering::SeqCst);
        let (lock, cv) = &*self.state;
        let mut p = lock.lock().unwrap_or_else(|e| e.into_inner());
        while p.done < issued && p.error.is_none() {
            p = cv.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        match &p.error {
            Some(e) => Err(KvCacheError::Device(format!("page mapping failed: {e}"))),
            None => Ok(()),
        }
    }

    /// Time the thread spent mapping and unmapping.
    pub(crate) fn busy(&self) -> std::time::Duration {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner()).busy
    }
}

impl Drop for Mapper {
    fn drop(&mut self) {
        self.tx.take(); // ends the thread's loop after the queued jobs
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
