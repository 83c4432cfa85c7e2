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
    buckets(max_seqs).into_iter().find(|&r| r >= n)
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
}

#[cfg(feature = "cuda")]
pub(crate) use gpu::Graphs;

#[cfg(feature = "cuda")]
mod gpu {
    use std::collections::{HashMap, HashSet};
    use std::time::Instant;

    use candle_core::cuda_backend::cudarc::driver::{CudaGraph, sys};
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

    /// A captured step. The graph's handles are used by the engine's owner
    /// only, one step at a time.
    struct Captured(CudaGraph);

    // SAFETY: see above; cudarc's graph is a pair of driver handles.
    unsafe impl Send for Captured {}

    impl std::fmt::Debug for Captured {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("CudaGraph")
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
        /// Keys whose capture failed, with the reason (they run eagerly).
        failed: HashMap<(usize, String), String>,
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
            let Some(plan) = backend.plan_static_step(&meta)? else {
                return Ok(None);
            };
            let key = (rows, plan.key);
            let out = io.logits.narrow(0, 0, n)?;
            if let Some(g) = self.graphs.get(&key) {
                g.0.launch().map_err(cuda_err)?;
                return Ok(Some((
                    out,
                    GraphStep {
                        replayed: true,
                        rows,
                        note: key.1,
                    },
                )));
            }
            let eager = |note: String| GraphStep {
                replayed: false,
                rows,
                note,
            };
            let _cache = capture.then(|| dev.enable_cuda_graph_htod_cache());
            let run = |backend: &mut dyn AttentionBackend| -> Result<()> {
                let mut attn = AttentionStep::planned(backend, &meta);
                let logits = model.forward(&io.tokens, &mut attn)?;
                io.logits.slice_set(&logits, 0, 0)?;
                Ok(())
            };
            if !capture {
                run(backend)?;
                return Ok(Some((out, eager("eager: --cuda-graphs off".into()))));
            }
            if let Some(why) = self.failed.get(&key) {
                run(backend)?;
                return Ok(Some((out, eager(format!("eager: capture failed: {why}")))));
            }
            if self.warm.insert(key.clone()) {
                run(backend)?;
                return Ok(Some((
                    out,
                    eager(format!("eager: first step of {} (warm-up)", key.1)),
                )));
            }
            let t0 = Instant::now();
            let stream = dev.cuda_stream();
            let captured = stream
                .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(cuda_err)
                .and_then(|()| {
                    let r = run(backend);
                    // Always leave capture mode, whatever the forward did.
                    let g = stream
                        .end_capture(
                            sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
                        )
                        .map_err(cuda_err);
                    r?;
                    match g? {
                        Some(g) => Ok(g),
                        None => Err(candle_core::Error::Msg("the capture recorded no work".into()).into()),
                    }
                });
            match captured.and_then(|g| {
                g.upload().map_err(cuda_err)?;
                Ok(g)
            }) {
                Ok(g) => {
                    let nodes = node_count(&g);
                    g.launch().map_err(cuda_err)?;
                    self.captures.push(CaptureRecord {
                        rows,
                        key: key.1.clone(),
                        capture_ms: t0.elapsed().as_secs_f64() * 1e3,
                        nodes,
                        graph_mem_bytes: graph_mem(dev),
                    });
                    let note = format!("captured: {}", key.1);
                    self.graphs.insert(key, Captured(g));
                    Ok(Some((
                        out,
                        GraphStep {
                            replayed: true,
                            rows,
                            note,
                        },
                    )))
                }
                Err(e) => {
                    let why = e.to_string();
                    self.failed.insert(key, why.clone());
                    run(backend)?;
                    Ok(Some((out, eager(format!("eager: capture failed: {why}")))))
                }
            }
        }
    }

    fn cuda_err(e: cudarc::driver::DriverError) -> crate::EngineError {
        candle_core::Error::Cuda(Box::new(e)).into()
    }

    /// Nodes of a captured graph.
    fn node_count(g: &CudaGraph) -> usize {
        let mut n = 0usize;
        // SAFETY: a null node array asks for the count only.
        let r = unsafe { sys::cuGraphGetNodes(g.cu_graph(), std::ptr::null_mut(), &mut n) };
        if r == sys::CUresult::CUDA_SUCCESS { n } else { 0 }
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
                assert!(b >= n && b <= max, "{n} of {max} -> {b}");
                assert!(b - n < 8, "a bucket wastes under 8 rows");
            }
            assert_eq!(bucket_for(max + 1, max), None);
        }
        assert_eq!("off".parse::<CudaGraphs>(), Ok(CudaGraphs::Off));
        assert!("yes".parse::<CudaGraphs>().is_err());
    }
}
