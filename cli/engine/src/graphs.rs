//! Decode steps as CUDA graphs.
//!
//! A decode step of Llama-3-8B is ~260 small kernels; at batch 1 the host
//! spends ~1.5 ms a step launching them (issue 22: 74 % of the bandwidth
//! floor on an H200). The engine captures a decode step once per batch-size
//! bucket (1, 2, 4, 8, then multiples of 8 up to `--max-seqs`) and replays
//! it: one launch per step.
//!
//! How it coexists with candle: candle's own ops run under stream capture.
//! Their allocations are stream-ordered (`cuMemAllocAsync` on the device's
//! stream, which a capture records as graph allocation nodes, freed inside
//! the graph when the step's intermediate tensors drop), and candle keeps
//! its small per-op parameter uploads in a content cache while candle's
//! `CudaDevice::enable_cuda_graph_htod_cache` is on (the eager run of a
//! bucket fills it, the capture reads it). So the captured step is the eager
//! step, kernel for kernel, with nothing rewritten.
//!
//! What a replay reads in place, refilled by the host before each replay in
//! stream order: the step's token ids and positions (`[rows]` buffers per
//! bucket, here) and the attention plan's addressing (slots, lengths, block
//! tables: [`vpod_attention::AttentionBackend::plan_static_step`]). The
//! logits land in a `[rows, vocab]` buffer per bucket. Padding rows of a
//! bucket repeat the first sequence ([`BatchMeta::padded`]). A captured
//! step's key is (rows, the backend's plan key: decode splits or the
//! padded max context), so a change of launch shapes captures a new graph.
//!
//! Failures are never silent: a key whose capture (or replay launch) fails
//! runs eagerly from then on with the reason in its step records; a device
//! without stream-ordered allocation (memory pools) captures nothing; a
//! capture always ends the stream's capture mode (with the driver's raw
//! call), and should the stream still be capturing, the step fails and the
//! engine captures nothing more.
//!
//! Page mapping is untouched: `plan_static_step` grows and fences the cache
//! before the replay exactly as an eager step's plan does, and the mapper
//! thread maps ahead while the replay runs; the cache never moves, so the
//! addresses a graph holds stay valid.
//!
//! [`BatchMeta::padded`]: vpod_attention::BatchMeta::padded

use serde::Serialize;

/// `--cuda-graphs on|off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CudaGraphs {
    /// Decode steps replay captured graphs on a GPU (the default).
    #[default]
    On,
    /// Every step runs eagerly.
    Off,
}

impl std::str::FromStr for CudaGraphs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            _ => Err(format!("--cuda-graphs takes on or off, not '{s}'")),
        }
    }
}

/// The batch sizes decode steps are captured at, up to `max_seqs`: 1, 2, 4,
/// 8, then every multiple of 8 (vLLM's buckets), and `max_seqs` itself.
pub fn buckets(max_seqs: usize) -> Vec<usize> {
    let mut b: Vec<usize> = [1, 2, 4]
        .into_iter()
        .chain((8..).step_by(8))
        .take_while(|&r| r < max_seqs)
        .collect();
    if max_seqs > 0 {
        b.push(max_seqs);
    }
    b
}

/// The bucket a decode step of `n` sequences runs in (the smallest that
/// holds it).
pub fn bucket_for(n: usize, max_seqs: usize) -> Option<usize> {
    // (Arithmetic, not a search of `buckets`: once per decode step.)
    let up = match n {
        0..=2 => n.max(1),
        3 | 4 => 4,
        _ => n.div_ceil(8) * 8,
    };
    (n <= max_seqs && max_seqs > 0).then(|| up.min(max_seqs))
}

/// How a step used CUDA graphs (in its [`crate::StepRecord`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GraphStep {
    /// The step replayed a graph (captured now or earlier).
    pub replayed: bool,
    /// Rows of its bucket (0: none).
    pub rows: usize,
    /// The graph's key, or why the step ran eagerly.
    pub note: String,
}

/// One capture, for reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaptureRecord {
    pub rows: usize,
    /// The backend's static plan key.
    pub key: String,
    pub capture_ms: f64,
    /// Nodes of the graph: kernel launches (and copies, graph allocations)
    /// that the eager step makes one by one.
    pub nodes: usize,
    /// The device's graph memory reserved after this capture (all graphs;
    /// `CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT`).
    pub graph_mem_bytes: u64,
    /// Kernel nodes captured with a programmatic edge from the kernel
    /// before them (programmatic dependent launch inside the graph:
    /// `vpod_attention::ops::cuda::PdlChain`), 0 with PDL off.
    pub pdl_edges: usize,
}

#[cfg(feature = "cuda")]
pub(crate) use gpu::Graphs;

#[cfg(feature = "cuda")]
mod gpu {
    use std::collections::{HashMap, HashSet};
    use std::time::Instant;

    use candle_core::cuda_backend::cudarc::driver::{CudaStream, sys};
    use candle_core::cuda_backend::{CudaDevice, cudarc};
    use candle_core::{DType, Device, Tensor};
    use vpod_attention::{AttentionBackend, AttentionStep, BatchMeta, SeqChunk};
    use vpod_models::Llama;

    use super::{CaptureRecord, GraphStep};
    use crate::Result;

    /// The fixed buffers of every bucket up to `rows` rows (a bucket reads
    /// and writes their first rows): token ids and positions in, logits out.
    /// One set for all buckets (a `[rows, vocab]` f32 logits buffer per
    /// bucket would be GBs with a 128K vocabulary and hundreds of rows).
    #[derive(Debug)]
    struct Io {
        rows: usize,
        tokens: Tensor,    // [rows] u32
        positions: Tensor, // [rows] u32
        logits: Tensor,    // [rows, vocab] f32
    }

    /// A captured step: the graph and its executable (raw driver handles:
    /// cudarc's `end_capture` gives up before ending a capture when an
    /// earlier call stored an error, which would leave the stream capturing).
    /// Used by the engine's owner only, one step at a time.
    struct Captured {
        graph: sys::CUgraph,
        exec: sys::CUgraphExec,
        pdl_edges: usize,
    }

    // SAFETY: see above; two driver handles.
    unsafe impl Send for Captured {}

    impl std::fmt::Debug for Captured {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("CudaGraph")
        }
    }

    impl Drop for Captured {
        fn drop(&mut self) {
            // SAFETY: created by `capture`, owned here; errors at teardown are ignored.
            unsafe {
                let _ = cudarc::driver::result::graph::exec_destroy(self.exec);
                let _ = cudarc::driver::result::graph::destroy(self.graph);
            }
        }
    }

    impl Captured {
        fn launch(&self, stream: &CudaStream) -> std::result::Result<(), String> {
            // SAFETY: a live executable, launched on the stream it was captured on.
            unsafe { cudarc::driver::result::graph::launch(self.exec, stream.cu_stream()) }
                .map_err(|e| format!("graph launch: {e}"))
        }

        /// Nodes of the graph.
        fn nodes(&self) -> usize {
            let mut n = 0usize;
            // SAFETY: a null node array asks for the count only.
            let r = unsafe { sys::cuGraphGetNodes(self.graph, std::ptr::null_mut(), &mut n) };
            if r == sys::CUresult::CUDA_SUCCESS { n } else { 0 }
        }
    }

    /// Captures what `run` queues on `stream` and instantiates it. Whatever
    /// `run` does, the stream leaves capture mode; errors the driver stored
    /// meanwhile (a free during the capture) count as a failed capture.
    fn capture_step(
        stream: &CudaStream,
        run: impl FnOnce() -> Result<()>,
    ) -> std::result::Result<Captured, String> {
        use cudarc::driver::result::{graph, stream as st};
        let ctx = stream.context();
        if let Err(e) = ctx.check_err() {
            return Err(format!("an earlier CUDA call failed: {e}"));
        }
        // SAFETY: the device's stream; THREAD_LOCAL: only this thread's calls are restricted.
        unsafe {
            st::begin_capture(
                stream.cu_stream(),
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| format!("begin capture: {e}"))?;
        vpod_attention::ops::cuda::take_pdl_edges();
        let ran = run();
        // SAFETY: the stream began capturing above; this ends it, valid or invalidated.
        let ended = unsafe { st::end_capture(stream.cu_stream()) };
        let stored = ctx.check_err();
        let g = match ended {
            Ok(g) if !g.is_null() => g,
            Ok(_) => return Err("the capture recorded no graph".into()),
            Err(e) => {
                return Err(match ran {
                    Err(r) => format!("{r} (end capture: {e})"),
                    Ok(()) => format!("end capture: {e}"),
                });
            }
        };
        let fail = match (ran, stored) {
            (Err(r), _) => Some(r.to_string()),
            (Ok(()), Err(e)) => Some(format!("a call during the capture failed: {e}")),
            (Ok(()), Ok(())) => None,
        };
        let flags = sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH;
        let pdl_edges = vpod_attention::ops::cuda::take_pdl_edges();
        // SAFETY: `g` is the graph just captured, owned here.
        let exec = match fail {
            None => unsafe { graph::instantiate(g, flags) }.map_err(|e| format!("instantiate: {e}")),
            Some(f) => Err(f),
        };
        match exec {
            Ok(exec) => {
                let c = Captured {
                    graph: g,
                    exec,
                    pdl_edges,
                };
                // SAFETY: as in `launch`.
                unsafe { graph::upload(c.exec, stream.cu_stream()) }
                    .map_err(|e| format!("graph upload: {e}"))?;
                Ok(c)
            }
            Err(e) => {
                // SAFETY: not instantiated; destroyed once.
                let _ = unsafe { graph::destroy(g) };
                Err(e)
            }
        }
    }

    /// The engine's graphs, by (rows, backend plan key).
    #[derive(Debug, Default)]
    pub(crate) struct Graphs {
        io: Option<Io>,
        graphs: HashMap<(usize, String), Captured>,
        /// Keys whose step ran eagerly once (candle's modules and parameter
        /// cache are then filled; the next step of the key is captured).
        warm: HashSet<(usize, String)>,
        /// Keys whose capture (or replay) failed, with the reason (they run eagerly).
        failed: HashMap<(usize, String), String>,
        /// Why this engine captures nothing any more (all steps eager).
        disabled: Option<String>,
        pub captures: Vec<CaptureRecord>,
    }

    impl Graphs {
        /// Runs the decode step `chunks` (one token each) in the bucket of
        /// `rows` rows: with `capture`, replays its graph, or captures it
        /// (the second time its key is seen), or runs it eagerly over the
        /// static plan (the first time); without, always eagerly over the
        /// static plan, so that a step computes the same thing (rows, decode
        /// splits) with graphs on or off and only its launches differ.
        /// `Ok(None)`: the backend has no static plan here; the caller runs
        /// the step eagerly. The logits `[n, vocab]` are a view of the
        /// bucket's buffer: read them before the next step.
        pub(crate) fn decode(
            &mut self,
            model: &Llama,
            backend: &mut dyn AttentionBackend,
            (rows, max_rows): (usize, usize),
            chunks: &[SeqChunk],
            tokens: &[u32],
            capture: bool,
        ) -> Result<Option<(Tensor, GraphStep)>> {
            let n = chunks.len();
            let device = model.device().clone();
            let Device::Cuda(dev) = &device else {
                return Ok(None);
            };
            let vocab = model.config().vocab_size;
            // Buffers for `max_rows` (the largest bucket of the scheduler's
            // batch), grown only past it: the graphs captured over the old
            // buffers go with them.
            if self.io.as_ref().is_none_or(|io| io.rows < rows) {
                let cap = rows.max(max_rows);
                self.graphs.clear();
                self.warm.clear();
                self.failed.clear();
                self.io = Some(Io {
                    rows: cap,
                    tokens: Tensor::zeros(cap, DType::U32, &device)?,
                    positions: Tensor::zeros(cap, DType::U32, &device)?,
                    logits: Tensor::zeros((cap, vocab), DType::F32, &device)?,
                });
            }
            let Some(buf) = &self.io else {
                unreachable!("allocated above")
            };
            let io = Io {
                rows,
                tokens: buf.tokens.narrow(0, 0, rows)?,
                positions: buf.positions.narrow(0, 0, rows)?,
                logits: buf.logits.narrow(0, 0, rows)?,
            };
            let pad = |v: Vec<u32>| -> Vec<u32> {
                let first = v[0];
                v.into_iter().chain(std::iter::repeat(first)).take(rows).collect()
            };
            let positions = pad(chunks.iter().map(|c| c.context_len as u32).collect());
            vpod_attention::ops::cuda::write_host(&io.tokens, &pad(tokens.to_vec()))?;
            vpod_attention::ops::cuda::write_host(&io.positions, &positions)?;
            let meta = BatchMeta::padded(chunks.to_vec(), rows, io.positions.clone())?;
            let plan = match backend.plan_static_step(&meta) {
                Ok(Some(plan)) => plan,
                Ok(None) => return Ok(None),
                Err(e) => {
                    // The backend may have lost a static plan with the error:
                    // no graph may read its buffers again.
                    self.graphs.clear();
                    return Err(e.into());
                }
            };
            let key = (rows, plan.key);
            let out = io.logits.narrow(0, 0, n)?;
            let stream = dev.cuda_stream();
            let eager = |note: String| GraphStep {
                replayed: false,
                rows,
                note: format!("eager: {note}"),
            };
            let _cache = capture.then(|| dev.enable_cuda_graph_htod_cache());
            let run = |backend: &mut dyn AttentionBackend| -> Result<()> {
                let mut attn = AttentionStep::planned(backend, &meta);
                let logits = model.forward(&io.tokens, &mut attn)?;
                io.logits.slice_set(&logits, 0, 0)?;
                Ok(())
            };
            if self.disabled.is_none() && !stream.context().has_async_alloc() {
                self.disabled = Some("the device has no stream-ordered allocator (memory pools)".into());
            }
            let why_not = if !capture {
                Some("--cuda-graphs off".to_string())
            } else if let Some(d) = &self.disabled {
                Some(format!("graphs are off for this engine: {d}"))
            } else {
                self.failed.get(&key).map(|f| format!("capture failed: {f}"))
            };
            if let Some(why) = why_not {
                run(backend)?;
                return Ok(Some((out, eager(why))));
            }
            if let Some(g) = self.graphs.get(&key) {
                match g.launch(&stream) {
                    Ok(()) => {
                        return Ok(Some((
                            out,
                            GraphStep {
                                replayed: true,
                                rows,
                                note: key.1,
                            },
                        )));
                    }
                    Err(e) => {
                        // The step did not run: eagerly, and this key stays eager.
                        self.graphs.remove(&key);
                        self.failed.insert(key, e.clone());
                        run(backend)?;
                        return Ok(Some((out, eager(e))));
                    }
                }
            }
            if self.warm.insert(key.clone()) {
                run(backend)?;
                return Ok(Some((out, eager(format!("first step of {} (warm-up)", key.1)))));
            }
            let t0 = Instant::now();
            let captured = capture_step(&stream, || run(&mut *backend)).and_then(|g| {
                let nodes = g.nodes();
                g.launch(&stream)?;
                Ok((g, nodes))
            });
            match captured {
                Ok((g, nodes)) => {
                    self.captures.push(CaptureRecord {
                        rows,
                        key: key.1.clone(),
                        capture_ms: t0.elapsed().as_secs_f64() * 1e3,
                        nodes,
                        graph_mem_bytes: graph_mem(dev),
                        pdl_edges: g.pdl_edges,
                    });
                    let note = format!("captured: {}", key.1);
                    self.graphs.insert(key, g);
                    Ok(Some((
                        out,
                        GraphStep {
                            replayed: true,
                            rows,
                            note,
                        },
                    )))
                }
                Err(why) => {
                    self.failed.insert(key, why.clone());
                    // A stream still capturing would fail every later call.
                    // SAFETY: the device's stream.
                    let status = unsafe { cudarc::driver::result::stream::is_capturing(stream.cu_stream()) };
                    if status != Ok(sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE) {
                        self.disabled = Some(format!("a capture left the stream capturing ({status:?})"));
                        return Err(candle_core::Error::Msg(format!(
                            "CUDA graph capture failed and left the stream capturing: {why}"
                        ))
                        .into());
                    }
                    run(backend)?;
                    Ok(Some((out, eager(format!("capture failed: {why}")))))
                }
            }
        }
    }

    /// The device's reserved graph memory, in bytes (0 if the driver does not say).
    fn graph_mem(dev: &CudaDevice) -> u64 {
        let mut v = 0u64;
        let cu_dev = dev.cuda_stream().context().cu_device();
        // SAFETY: the attribute is a 64-bit value written to `v`.
        let r = unsafe {
            sys::cuDeviceGetGraphMemAttribute(
                cu_dev,
                sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT,
                (&mut v as *mut u64).cast(),
            )
        };
        if r == sys::CUresult::CUDA_SUCCESS { v } else { 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_batch_size() {
        assert_eq!(buckets(1), vec![1]);
        assert_eq!(buckets(6), vec![1, 2, 4, 6]);
        assert_eq!(buckets(8), vec![1, 2, 4, 8]);
        assert_eq!(buckets(20), vec![1, 2, 4, 8, 16, 20]);
        assert_eq!(buckets(32), vec![1, 2, 4, 8, 16, 24, 32]);
        for max in 1..=70 {
            for n in 1..=max {
                let b = bucket_for(n, max).unwrap();
                assert_eq!(
                    Some(b),
                    buckets(max).into_iter().find(|&r| r >= n),
                    "{n} of {max}"
                );
                assert!(b >= n && b <= max, "{n} of {max} -> {b}");
                assert!(b - n < 8, "a bucket wastes under 8 rows");
            }
            assert_eq!(bucket_for(max + 1, max), None);
        }
        assert_eq!("off".parse::<CudaGraphs>(), Ok(CudaGraphs::Off));
        assert!("yes".parse::<CudaGraphs>().is_err());
    }
}
