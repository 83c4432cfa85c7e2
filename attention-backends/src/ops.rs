//! Candle custom ops around our CUDA kernels, each with its CPU twin.
//!
//! [`write_kv`] writes a step's new K or V rows into a cache tensor in the
//! paged or the per-slot layout (an `InplaceOp3`: the cache is updated in
//! place). Every argument is validated with a clear error before the single
//! `unsafe` launch; the CPU path runs the loops of `vpod_kvcache`'s layouts,
//! which define what the kernel must produce.

use candle_core::{CpuStorage, DType, InplaceOp3, Layout, Tensor};
use vpod_kvcache::{PagedLayout, SlotLayout};

use crate::{AttnError, Result};

/// Which cache layout a write targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvLayout {
    /// vLLM's paged K (`is_value == false`) or V layout; the index is a slot mapping.
    Paged { layout: PagedLayout, is_value: bool },
    /// The per-slot (vAttention) layout; the index holds rows `slot * max_len + position`.
    Slot(SlotLayout),
}

impl KvLayout {
    fn row_elems(&self) -> usize {
        match self {
            Self::Paged { layout, .. } => layout.kv_heads * layout.head_dim,
            Self::Slot(s) => s.row_elems(),
        }
    }

    fn cache_elems(&self) -> usize {
        match self {
            Self::Paged { layout, .. } => layout.elems(),
            Self::Slot(s) => s.max_seqs * s.max_len * s.row_elems(),
        }
    }

    fn heads_dim(&self) -> (usize, usize) {
        match self {
            Self::Paged { layout, .. } => (layout.kv_heads, layout.head_dim),
            Self::Slot(s) => (s.kv_heads, s.head_dim),
        }
    }
}

/// Writes `src: [T, kv_heads, head_dim]` (rows may be strided, e.g. a view of
/// a fused QKV output) into `cache` at `index: [T]` i64 (slots or rows, -1
/// skips a token). `cache` must be contiguous with `layout`'s element count.
pub fn write_kv(cache: &Tensor, src: &Tensor, index: &Tensor, layout: KvLayout) -> Result<()> {
    let (kv_heads, head_dim) = layout.heads_dim();
    let t = index.dims1()?;
    let expected = vec![t, kv_heads, head_dim];
    if src.dims() != expected.as_slice() {
        return Err(AttnError::BadShape {
            what: "new K/V rows",
            got: src.dims().to_vec(),
            expected,
        });
    }
    let bad = |m: String| Err(AttnError::InvalidBatch(m));
    if index.dtype() != DType::I64 {
        return bad(format!("KV write index must be i64, got {:?}", index.dtype()));
    }
    if cache.dtype() != src.dtype() {
        return bad(format!(
            "cache is {:?} but the new rows are {:?}",
            cache.dtype(),
            src.dtype()
        ));
    }
    if cache.elem_count() != layout.cache_elems() || !cache.is_contiguous() {
        return bad(format!(
            "cache tensor {:?} (contiguous: {}) does not hold the layout's {} elements contiguously",
            cache.dims(),
            cache.is_contiguous(),
            layout.cache_elems()
        ));
    }
    // The kernels read each row as [kv_heads * head_dim] contiguous elements.
    let src = match src.stride() {
        [_, s1, 1] if *s1 == head_dim => src.clone(),
        _ => src.contiguous()?,
    };
    let index = index.contiguous()?;
    if let KvLayout::Slot(_) = layout {
        let row_bytes = layout.row_elems() * src.dtype().size_in_bytes();
        let stride_bytes = src.stride()[0] * src.dtype().size_in_bytes();
        if !row_bytes.is_multiple_of(16) || !stride_bytes.is_multiple_of(16) {
            return bad(format!(
                "per-slot rows must be multiples of 16 bytes (row {row_bytes}, stride {stride_bytes})"
            ));
        }
    }
    cache.inplace_op3(&src, &index, &KvWrite(layout))?;
    Ok(())
}

struct KvWrite(KvLayout);

fn cpu_write<T: Copy>(
    op: &KvLayout,
    cache: &mut [T],
    src: &[T],
    index: &[i64],
    src_stride: usize,
) -> vpod_kvcache::Result<()> {
    match op {
        KvLayout::Paged { layout, is_value } => layout.write(cache, src, index, src_stride, *is_value),
        KvLayout::Slot(s) => s.write(cache, src, index, src_stride),
    }
}

impl InplaceOp3 for KvWrite {
    fn name(&self) -> &'static str {
        "kv-write"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        l_cache: &Layout,
        src: &CpuStorage,
        l_src: &Layout,
        index: &CpuStorage,
        l_index: &Layout,
    ) -> candle_core::Result<()> {
        let c0 = l_cache.start_offset();
        let s0 = l_src.start_offset();
        let stride = l_src.stride()[0];
        let CpuStorage::I64(idx) = index else {
            candle_core::bail!("kv-write: index must be i64")
        };
        let idx = &idx[l_index.start_offset()..l_index.start_offset() + l_index.shape().elem_count()];
        let r = match (cache, src) {
            (CpuStorage::BF16(c), CpuStorage::BF16(s)) => {
                cpu_write(&self.0, &mut c[c0..], &s[s0..], idx, stride)
            }
            (CpuStorage::F16(c), CpuStorage::F16(s)) => {
                cpu_write(&self.0, &mut c[c0..], &s[s0..], idx, stride)
            }
            (CpuStorage::F32(c), CpuStorage::F32(s)) => {
                cpu_write(&self.0, &mut c[c0..], &s[s0..], idx, stride)
            }
            _ => candle_core::bail!("kv-write: cache and rows must both be bf16, f16 or f32"),
        };
        r.map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        l_cache: &Layout,
        src: &candle_core::CudaStorage,
        l_src: &Layout,
        index: &candle_core::CudaStorage,
        l_index: &Layout,
    ) -> candle_core::Result<()> {
        cuda::write_kv(&self.0, cache, l_cache, src, l_src, index, l_index)
    }
}

/// Benchmarks: queues a one-thread kernel on `dev`'s stream that spins for
/// `cycles` SM cycles (kernels/src/gpu_spin.cu), so that launches queued
/// after it start only once the host has queued them all (no launch latency
/// inside events recorded around them). A no-op on the CPU.
pub fn gpu_spin(dev: &candle_core::Device, cycles: u64) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = dev {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        let f = cuda::function(dev, "gpu_spin")?;
        let cycles = cycles.min(i64::MAX as u64) as i64;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&cycles);
        // SAFETY: gpu_spin(long long) reads no memory.
        unsafe { b.launch(LaunchConfig::for_num_elems(1)) }.map_err(cuda::err)?;
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (dev, cycles);
    Ok(())
}

/// Whether the decode path's kernels (projections, RoPE, K/V write, decode
/// attention, sampling) are launched with programmatic dependent launch on
/// GPUs that have it (compute capability 9.0 and up): each may then start
/// while the kernel before it finishes, and the projections ask their first
/// weight rows into L2 before they wait for their input
/// (`kernels/src/pdl.cuh`). On by default; `vpod-bench e2e --pdl off`
/// measures without it. No effect on the CPU.
static PDL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns programmatic dependent launch on or off for the process (every
/// device; see [`pdl`]).
pub fn set_pdl(on: bool) {
    PDL.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether programmatic dependent launch is asked for: the decode path's
/// kernels may start while the kernel before them finishes, on GPUs that
/// have it (compute capability 9.0 and up; `kernels/src/pdl.cuh`).
pub fn pdl() -> bool {
    PDL.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(feature = "cuda")]
pub mod cuda {
    //! Loading our fatbins (once per device) and launching them.

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use std::ffi::c_void;

    use candle_core::cuda_backend::cudarc::driver::{
        CudaFunction, CudaModule, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
        PushKernelArg, SyncOnDrop, sys,
    };
    use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
    use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
    use candle_core::{CudaStorage, DType, Layout};
    use half::bf16;

    use super::KvLayout;

    type ModuleCache = Mutex<HashMap<(DeviceId, &'static str), Arc<CudaModule>>>;
    static MODULES: OnceLock<ModuleCache> = OnceLock::new();

    /// A CUDA driver (or any) error as a candle error.
    pub(crate) fn err(e: impl std::fmt::Display) -> candle_core::Error {
        candle_core::Error::Cuda(e.to_string().into())
    }

    /// The kernel `name` on `dev`, loading its module's fatbin on first use.
    pub fn function(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
        let kernel = vpod_kernels::kernel(name)
            .ok_or_else(|| err(format!("kernel {name} is not compiled into this build")))?;
        let mut modules = MODULES.get_or_init(Default::default).lock().map_err(err)?;
        let module = match modules.get(&(dev.id(), kernel.name)) {
            Some(m) => m.clone(),
            None => {
                let ctx = dev.cuda_stream().context().clone();
                let m = ctx
                    .load_module(Ptx::from_binary(kernel.fatbin.to_vec()))
                    .map_err(err)?;
                modules.insert((dev.id(), kernel.name), m.clone());
                m
            }
        };
        module.load_function(name).map_err(err)
    }

    /// Whether launches on `dev` carry the PDL attribute: asked for, and
    /// the GPU is a Hopper or later (asked of the driver once per device).
    fn pdl_on(dev: &CudaDevice) -> candle_core::Result<bool> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
        if !super::pdl() {
            return Ok(false);
        }
        static ON: OnceLock<Mutex<HashMap<DeviceId, bool>>> = OnceLock::new();
        let mut cache = ON.get_or_init(Default::default).lock().map_err(err)?;
        if let Some(&on) = cache.get(&dev.id()) {
            return Ok(on);
        }
        let major = dev
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
            .map_err(err)?;
        let mut driver = 0;
        // SAFETY: writes one int.
        unsafe { sys::cuDriverGetVersion(&mut driver) }
            .result()
            .map_err(err)?;
        // Only compute capability 9.x: our fatbins carry sm_90a code (where
        // pdl_wait() is griddepcontrol.wait) and compute_80 PTX, which a
        // newer GPU would JIT with pdl_wait() compiled out, so that its
        // kernels would not wait. The capture-dependency calls of PdlChain
        // need a 12.3 driver.
        let on = major == 9 && driver >= 12030;
        cache.insert(dev.id(), on);
        Ok(on)
    }

    /// Outputs up to this size (per op) are allocated as graph roots by a
    /// [`PdlChain`] under capture: roots cannot reuse memory freed earlier in
    /// the graph, so a step's chained outputs add up in the graph's pool
    /// (~0.3 MB a Llama-3-8B layer at batch 4); larger outputs (big batch
    /// buckets) keep the plain dependency and their reuse.
    pub const PDL_CHAIN_MAX_BYTES: usize = 256 << 10;

    thread_local! {
        /// Programmatic edges [`PdlChain::link`] made on this thread since
        /// [`take_pdl_edges`] was last called.
        static PDL_EDGES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// The programmatic edges made under stream capture on this thread
    /// since the last call (the graphs' capture records report them).
    pub fn take_pdl_edges() -> usize {
        PDL_EDGES.with(|c| c.replace(0))
    }

    /// Programmatic dependent launch inside a captured CUDA graph. Each op
    /// allocates its output in stream order, so a capture records `kernel A
    /// -> [frees of dropped tensors] -> allocation -> kernel B`: B depends
    /// on a memory node, and the launch attribute that lets it start while
    /// A finishes is lost (and the edges of a graph with memory nodes cannot
    /// be removed afterwards: CUDA_ERROR_NOT_SUPPORTED). So an op that
    /// launches a PDL kernel begins a chain *before* it allocates: under
    /// capture, when the stream's dependency is kernel A (directly or
    /// through free nodes only), the op's allocations become roots of the
    /// graph (they no longer reuse memory freed earlier in the step: a few
    /// MB more of graph pool for a decode step) and [`PdlChain::link`] makes
    /// B depend on them and on A by a programmatic edge; the frees stay
    /// after A as leaves (still after every use of their buffers). Outside
    /// a capture, or with any other shape of dependencies, it does nothing
    /// and B is launched with the attribute as usual.
    #[derive(Debug)]
    pub struct PdlChain {
        stream: sys::CUstream,
        /// Kernel A, when the chain applies.
        from: Option<sys::CUgraphNode>,
    }

    /// The stream's capture dependencies (`None` when it is not capturing).
    fn capture_deps(stream: sys::CUstream) -> candle_core::Result<Option<Vec<sys::CUgraphNode>>> {
        let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        let mut deps: *const sys::CUgraphNode = std::ptr::null();
        let mut edges: *const sys::CUgraphEdgeData = std::ptr::null();
        let mut n = 0usize;
        // SAFETY: a live stream; the optional id and graph outputs are null;
        // `deps` (and `edges`: asked for, as a query without them is refused
        // once an edge is programmatic) point at `n` entries owned by the
        // driver until the next call on the stream.
        unsafe {
            sys::cuStreamGetCaptureInfo_v3(
                stream,
                &mut status,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &mut deps,
                &mut edges,
                &mut n,
            )
            .result()
            .map_err(err)?;
            if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE {
                return Ok(None);
            }
            Ok(Some(if n == 0 || deps.is_null() {
                vec![]
            } else {
                std::slice::from_raw_parts(deps, n).to_vec()
            }))
        }
    }

    /// A graph node's type.
    fn node_type(n: sys::CUgraphNode) -> candle_core::Result<sys::CUgraphNodeType> {
        let mut t = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
        // SAFETY: a node of the graph being captured.
        unsafe { sys::cuGraphNodeGetType(n, &mut t) }
            .result()
            .map_err(err)?;
        Ok(t)
    }

    /// A graph node's dependencies.
    fn node_deps(n: sys::CUgraphNode) -> candle_core::Result<Vec<sys::CUgraphNode>> {
        let mut count = 0usize;
        // SAFETY: a node of the graph being captured; null arrays ask for the
        // count, then arrays of that length (edge data too: a query without
        // it is refused when an edge is programmatic).
        unsafe {
            sys::cuGraphNodeGetDependencies_v2(n, std::ptr::null_mut(), std::ptr::null_mut(), &mut count)
                .result()
                .map_err(err)?;
            let mut v = vec![std::ptr::null_mut(); count];
            let mut e: Vec<sys::CUgraphEdgeData> = vec![std::mem::zeroed(); count];
            sys::cuGraphNodeGetDependencies_v2(n, v.as_mut_ptr(), e.as_mut_ptr(), &mut count)
                .result()
                .map_err(err)?;
            v.truncate(count);
            Ok(v)
        }
    }

    /// Sets the capturing stream's dependencies (with one edge datum each).
    fn set_capture_deps(
        stream: sys::CUstream,
        deps: &mut [sys::CUgraphNode],
        data: &[sys::CUgraphEdgeData],
    ) -> candle_core::Result<()> {
        let flags = sys::CUstreamUpdateCaptureDependencies_flags::CU_STREAM_SET_CAPTURE_DEPENDENCIES as u32;
        let (d, e) = if deps.is_empty() {
            (std::ptr::null_mut(), std::ptr::null())
        } else {
            (deps.as_mut_ptr(), data.as_ptr())
        };
        // SAFETY: the capturing stream; nodes of its graph.
        unsafe { sys::cuStreamUpdateCaptureDependencies_v2(stream, d, e, deps.len(), flags) }
            .result()
            .map_err(err)
    }

    impl PdlChain {
        /// Call before the op's allocations (see [`PdlChain`]), which add
        /// up to `bytes`.
        pub fn begin(dev: &CudaDevice, bytes: usize) -> candle_core::Result<Self> {
            use sys::CUgraphNodeType as T;
            let stream = dev.cuda_stream().cu_stream();
            let none = Self { stream, from: None };
            if bytes > PDL_CHAIN_MAX_BYTES || !pdl_on(dev)? {
                return Ok(none);
            }
            let Some(deps) = capture_deps(stream)? else {
                return Ok(none);
            };
            let [mut cur] = deps[..] else { return Ok(none) };
            let from = loop {
                match node_type(cur)? {
                    T::CU_GRAPH_NODE_TYPE_KERNEL => break cur,
                    T::CU_GRAPH_NODE_TYPE_MEM_FREE => match node_deps(cur)?[..] {
                        [prev] => cur = prev,
                        _ => return Ok(none),
                    },
                    _ => return Ok(none),
                }
            };
            // No dependencies: the op's next node (its allocation) is a root.
            set_capture_deps(stream, &mut [], &[])?;
            Ok(Self {
                stream,
                from: Some(from),
            })
        }

        /// Right before the launch: the stream's dependencies become the
        /// op's allocations (default edges) and kernel A (a programmatic
        /// edge). True when it did so (the launch then carries no attribute).
        fn link(mut self) -> candle_core::Result<bool> {
            // (`from` stays set until the dependencies are: on an error, Drop
            // restores it.)
            let Some(from) = self.from else {
                return Ok(false);
            };
            let Some(mut deps) = capture_deps(self.stream)? else {
                return Ok(false);
            };
            let plain = sys::CUgraphEdgeData {
                from_port: 0,
                to_port: 0,
                type_: sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_DEFAULT as u8,
                reserved: [0; 5],
            };
            let mut data = vec![plain; deps.len()];
            deps.push(from);
            data.push(sys::CUgraphEdgeData {
                from_port: sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8,
                to_port: 0,
                type_: sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8,
                reserved: [0; 5],
            });
            set_capture_deps(self.stream, &mut deps, &data)?;
            self.from = None;
            PDL_EDGES.with(|c| c.set(c.get() + 1));
            Ok(true)
        }
    }

    impl Drop for PdlChain {
        /// A chain begun but not linked (the op launched nothing, or failed
        /// before its launch): kernel A goes back into the stream's
        /// dependencies as a plain edge, so that what follows stays ordered
        /// after it.
        fn drop(&mut self) {
            if let Some(from) = self.from.take()
                && let Ok(Some(mut deps)) = capture_deps(self.stream)
            {
                deps.push(from);
                let plain = sys::CUgraphEdgeData {
                    from_port: 0,
                    to_port: 0,
                    type_: sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_DEFAULT as u8,
                    reserved: [0; 5],
                };
                let data = vec![plain; deps.len()];
                // An error here leaves the capture without the edge: the
                // driver then reports the capture invalid or the step's
                // tokens differ from eager ones (the GPU tests compare them).
                let _ = set_capture_deps(self.stream, &mut deps, &data);
            }
        }
    }

    /// Launches `f` on the raw stream `stream` (of `dev`'s context) with the
    /// kernel parameters `args` (pointers to each argument's value), with
    /// the programmatic-stream-serialization attribute where [`pdl_on`].
    ///
    /// # Safety
    /// As cudarc's `launch_kernel`: `args` match the kernel's signature and
    /// the memory it touches is valid. With PDL the kernel must call
    /// `pdl_wait()` (pdl.cuh) on every path before it touches memory that
    /// an earlier kernel writes or reads (only kernels written so are
    /// launched here).
    pub unsafe fn launch_raw(
        dev: &CudaDevice,
        f: &CudaFunction,
        cfg: LaunchConfig,
        stream: sys::CUstream,
        args: &mut [*mut c_void],
        chain: Option<PdlChain>,
    ) -> candle_core::Result<()> {
        dev.cuda_stream().context().bind_to_thread().map_err(err)?;
        // SAFETY: a plain-old-data C struct; zero is a valid (empty) value.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let on = pdl_on(dev)?;
        // Under capture with the edge already set (see PdlChain), no attribute.
        let linked = match chain {
            Some(c) => c.link()?,
            None => false,
        };
        let on = on && !linked;
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: stream,
            attrs: if on { &raw mut attr } else { std::ptr::null_mut() },
            numAttrs: on as u32,
        };
        // SAFETY: the caller vouches for the arguments (see above); config and
        // attr outlive the call.
        unsafe { sys::cuLaunchKernelEx(&config, f.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
            .map_err(err)
    }

    /// A kernel's arguments, for [`Launch::run`]: device buffers by their
    /// addresses, scalars by reference (what cudarc's launch builder takes,
    /// which cannot set launch attributes).
    #[allow(missing_debug_implementations)] // raw pointers and cudarc guards: nothing to show
    pub struct Launch<'a> {
        stream: &'a CudaStream,
        /// Each buffer's address, boxed so that `params` can point at it
        /// (a box stays put while the Vec grows).
        #[allow(clippy::vec_box)]
        addrs: Vec<Box<u64>>,
        params: Vec<*mut c_void>,
        /// cudarc's stream-ordering guards (no-ops with event tracking off,
        /// as the engine runs), dropped after the launch.
        guards: Vec<SyncOnDrop<'a>>,
        chain: Option<PdlChain>,
    }

    impl<'a> Launch<'a> {
        pub fn new(stream: &'a CudaStream) -> Self {
            Self {
                stream,
                addrs: vec![],
                params: vec![],
                guards: vec![],
                chain: None,
            }
        }

        /// The op's [`PdlChain`], begun before its allocations.
        pub fn after(&mut self, chain: PdlChain) -> &mut Self {
            self.chain = Some(chain);
            self
        }

        fn push_addr(&mut self, a: u64) {
            let b = Box::new(a);
            self.params.push((&raw const *b).cast_mut().cast());
            self.addrs.push(b);
        }

        /// A buffer the kernel reads.
        pub fn buf<T>(&mut self, b: &'a impl DevicePtr<T>) -> &mut Self {
            let (a, g) = b.device_ptr(self.stream);
            self.push_addr(a);
            self.guards.push(g);
            self
        }

        /// A buffer the kernel writes.
        pub fn buf_mut<T>(&mut self, b: &'a mut impl DevicePtrMut<T>) -> &mut Self {
            let (a, g) = b.device_ptr_mut(self.stream);
            self.push_addr(a);
            self.guards.push(g);
            self
        }

        /// A raw device address (e.g. the VMM cache's base).
        pub fn addr(&mut self, a: u64) -> &mut Self {
            self.push_addr(a);
            self
        }

        /// A scalar argument.
        pub fn val<T: DeviceRepr>(&mut self, v: &'a T) -> &mut Self {
            self.params.push((v as *const T).cast_mut().cast());
            self
        }

        /// Launches `f` on the stream (see [`launch_raw`]).
        ///
        /// # Safety
        /// As [`launch_raw`].
        pub unsafe fn run(
            mut self,
            dev: &CudaDevice,
            f: &CudaFunction,
            cfg: LaunchConfig,
        ) -> candle_core::Result<()> {
            let stream = self.stream.cu_stream();
            // SAFETY: the caller's (see above).
            let r = unsafe { launch_raw(dev, f, cfg, stream, &mut self.params, self.chain.take()) };
            drop(self.guards);
            r
        }
    }

    /// Copies `v` over the first `v.len()` elements of the contiguous CUDA
    /// tensor `t`, in stream order, without moving it: a buffer that a
    /// captured CUDA graph reads in place (candle has no in-place upload;
    /// its own uploads go through a content cache while a capture is on).
    pub fn write_host<T: DeviceRepr + CudaDType + candle_core::WithDType>(
        t: &candle_core::Tensor,
        v: &[T],
    ) -> candle_core::Result<()> {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        if t.dtype() != T::DTYPE || !t.is_contiguous() || v.len() > t.elem_count() {
            candle_core::bail!(
                "write_host: {} {:?} values into a {:?} tensor of {} elements (contiguous: {})",
                v.len(),
                T::DTYPE,
                t.dtype(),
                t.elem_count(),
                t.is_contiguous()
            );
        }
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(cs) = &*storage else {
            candle_core::bail!("write_host: not a CUDA tensor")
        };
        let stream = cs.device.cuda_stream();
        let slice = cs.as_cuda_slice::<T>()?;
        let (base, _sync) = slice.device_ptr(&stream);
        let dst = base + (layout.start_offset() * size_of::<T>()) as u64;
        // SAFETY: dst .. dst + v.len() lies inside the tensor's allocation
        // (checked above); the copy is ordered on the tensor's stream, and a
        // pageable source is staged before the call returns.
        unsafe {
            candle_core::cuda_backend::cudarc::driver::result::memcpy_htod_async(dst, v, stream.cu_stream())
        }
        .map_err(err)
    }

    /// [`function`], allowed `smem` bytes of dynamic shared memory (above
    /// the default 48 KiB a launch must ask for).
    pub fn function_with_smem(
        dev: &CudaDevice,
        name: &str,
        smem: usize,
    ) -> candle_core::Result<CudaFunction> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
        let f = function(dev, name)?;
        if smem > 48 * 1024 {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(err)?;
        }
        Ok(f)
    }

    /// [`function_with_smem`], preferring the SM configuration with the most
    /// shared memory (carveout 100 %): the slim kernels that share an SM
    /// (`slot_prefill_wsps_bf16` + a slim decode, 227 KiB) need
    /// it, and blocks of SMs in different configurations cannot mix.
    pub fn function_max_carveout(
        dev: &CudaDevice,
        name: &str,
        smem: usize,
    ) -> candle_core::Result<CudaFunction> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
        let f = function_with_smem(dev, name, smem)?;
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
            100,
        )
        .map_err(err)?;
        Ok(f)
    }

    pub fn write_kv(
        op: &KvLayout,
        cache: &mut CudaStorage,
        l_cache: &Layout,
        src: &CudaStorage,
        l_src: &Layout,
        index: &CudaStorage,
        l_index: &Layout,
    ) -> candle_core::Result<()> {
        match candle_core::backend::BackendStorage::dtype(cache) {
            DType::BF16 => launch::<bf16>(op, "bf16", cache, l_cache, src, l_src, index, l_index),
            DType::F32 => launch::<f32>(op, "f32", cache, l_cache, src, l_src, index, l_index),
            d => candle_core::bail!("kv-write: no CUDA kernel for {d:?} (bf16 and f32 are built)"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr>(
        op: &KvLayout,
        suffix: &str,
        cache: &mut CudaStorage,
        l_cache: &Layout,
        src: &CudaStorage,
        l_src: &Layout,
        index: &CudaStorage,
        l_index: &Layout,
    ) -> candle_core::Result<()> {
        let dev = cache.device.clone();
        let tokens = l_index.shape().elem_count();
        if tokens == 0 {
            return Ok(());
        }
        let src_stride = l_src.stride()[0] as i64;
        let src = src.as_cuda_slice::<T>()?.slice(l_src.start_offset()..);
        let index = index.as_cuda_slice::<i64>()?.slice(l_index.start_offset()..);
        let mut cache = cache
            .as_cuda_slice_mut::<T>()?
            .slice_mut(l_cache.start_offset()..);
        let stream = dev.cuda_stream();
        let row_elems = op.row_elems();
        let vector = 16 / size_of::<T>();
        let threads = (row_elems / vector).clamp(32, 512) as u32;
        let cfg = LaunchConfig {
            grid_dim: (tokens as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        match op {
            KvLayout::Paged { layout, is_value } => {
                let name = if suffix == "bf16" {
                    "paged_write_kv_bf16"
                } else {
                    "paged_write_kv_f32"
                };
                let f = function(&dev, name)?;
                let (h, d, b, v) = (
                    layout.kv_heads as i32,
                    layout.head_dim as i32,
                    layout.block_size as i32,
                    *is_value as i32,
                );
                let mut builder = stream.launch_builder(&f);
                builder
                    .arg(&mut cache)
                    .arg(&src)
                    .arg(&index)
                    .arg(&src_stride)
                    .arg(&h)
                    .arg(&d)
                    .arg(&b)
                    .arg(&v);
                // SAFETY: write_kv() checked the shapes, dtypes, contiguity and the
                // index range (the CPU twin's bounds are the kernel's); the views
                // start at the tensors' offsets.
                unsafe { builder.launch(cfg) }.map_err(err)?;
            }
            KvLayout::Slot(_) => {
                let name = if suffix == "bf16" {
                    "slot_write_kv_bf16"
                } else {
                    "slot_write_kv_f32"
                };
                let f = function(&dev, name)?;
                let n = row_elems as i32;
                let mut builder = stream.launch_builder(&f);
                builder
                    .arg(&mut cache)
                    .arg(&src)
                    .arg(&index)
                    .arg(&src_stride)
                    .arg(&n);
                // SAFETY: as above; rows and strides are 16-byte multiples (checked).
                unsafe { builder.launch(cfg) }.map_err(err)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn op_matches_the_layout_loops_and_checks_arguments() -> Result<()> {
        let dev = Device::Cpu;
        let layout = PagedLayout::new(4, 16, 2, 8, 4)?;
        let src = Tensor::randn(0f32, 1.0, (3, 2, 8), &dev)?;
        let slots = Tensor::new(&[5i64, -1, 63], &dev)?;
        let cache = Tensor::full(-7f32, layout.elems(), &dev)?;
        write_kv(
            &cache,
            &src,
            &slots,
            KvLayout::Paged {
                layout,
                is_value: false,
            },
        )?;
        let mut want = vec![-7f32; layout.elems()];
        layout.write(
            &mut want,
            &src.flatten_all()?.to_vec1::<f32>()?,
            &[5, -1, 63],
            16,
            false,
        )?;
        assert_eq!(cache.to_vec1::<f32>()?, want);

        // A strided view (like K out of a fused QKV) is accepted.
        let wide = Tensor::randn(0f32, 1.0, (3, 4, 8), &dev)?;
        let view = wide.narrow(1, 2, 2)?;
        let s = SlotLayout {
            max_seqs: 2,
            max_len: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let cache = Tensor::zeros(s.shape().to_vec(), DType::F32, &dev)?;
        write_kv(
            &cache,
            &view,
            &Tensor::new(&[7i64, 0, -1], &dev)?,
            KvLayout::Slot(s),
        )?;
        let got = cache.flatten_to(1)?.get(7)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(got, view.get(0)?.flatten_all()?.to_vec1::<f32>()?);

        let too_big = Tensor::new(&[64i64, 0, 0], &dev)?;
        let cache = Tensor::zeros(layout.elems(), DType::F32, &dev)?;
        assert!(
            write_kv(
                &cache,
                &src,
                &too_big,
                KvLayout::Paged {
                    layout,
                    is_value: true
                }
            )
            .is_err()
        );
        assert!(
            write_kv(
                &cache,
                &src.narrow(0, 0, 2)?,
                &slots,
                KvLayout::Paged {
                    layout,
                    is_value: true
                }
            )
            .is_err()
        );
        Ok(())
    }
}
