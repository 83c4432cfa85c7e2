//! Attention timing for the step records: a backend wrapper that adds up the
//! time its calls take, on a CUDA device by a pair of timing events around
//! each call on the device's stream (nothing waits; [`AttentionTimes::take_ms`]
//! reads them once the step's results are on the host), elsewhere by the
//! host clock.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use vpod_attention::{AttentionBackend, BatchMeta, SeqId};

/// Forwards to a backend and adds up the time its calls take.
#[derive(Debug)]
pub(crate) struct Timed<'a> {
    pub inner: &'a mut dyn AttentionBackend,
    pub device: candle_core::Device,
    pub times: &'a mut AttentionTimes,
}

/// The attention time of the step in flight.
#[derive(Debug, Default)]
pub(crate) struct AttentionTimes {
    host: Duration,
    #[cfg(feature = "cuda")]
    events: Vec<(
        candle_core::cuda_backend::cudarc::driver::CudaEvent,
        candle_core::cuda_backend::cudarc::driver::CudaEvent,
    )>,
}

impl AttentionTimes {
    /// The step's total in ms (waits for its events: call after the step's
    /// results have arrived, when they are all complete), and resets.
    pub fn take_ms(&mut self) -> candle_core::Result<f64> {
        #[allow(unused_mut)]
        let mut ms = std::mem::take(&mut self.host).as_secs_f64() * 1e3;
        #[cfg(feature = "cuda")]
        for (a, b) in self.events.drain(..) {
            ms += a.elapsed_ms(&b).map_err(event_err)? as f64;
        }
        Ok(ms)
    }
}

#[cfg(feature = "cuda")]
fn event_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA event: {e:?}"))
}

impl Timed<'_> {
    /// Runs `f` on the inner backend between two CUDA events (GPU time, read
    /// at the step's end), or between two device synchronizations elsewhere.
    fn timed<T>(
        &mut self,
        f: impl FnOnce(&mut dyn AttentionBackend) -> vpod_attention::Result<T>,
    ) -> vpod_attention::Result<T> {
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = &self.device {
            use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
            let stream = dev.cuda_stream();
            let event = || {
                stream
                    .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(event_err)
            };
            let start = event()?;
            let out = f(&mut *self.inner)?;
            self.times.events.push((start, event()?));
            return Ok(out);
        }
        self.device.synchronize()?;
        let t = Instant::now();
        let out = f(&mut *self.inner)?;
        self.device.synchronize()?;
        self.times.host += t.elapsed();
        Ok(out)
    }
}

impl AttentionBackend for Timed<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn plan_step(&mut self, meta: &BatchMeta) -> vpod_attention::Result<()> {
        self.inner.plan_step(meta)
    }

    fn forward(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        meta: &BatchMeta,
    ) -> vpod_attention::Result<Tensor> {
        self.timed(|inner| inner.forward(layer, q, k, v, meta))
    }

    /// The backend's fused RoPE + K/V write + attention, timed as
    /// [`Self::forward`] (so the time includes RoPE where it is fused).
    fn forward_rope(
        &mut self,
        layer: usize,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        meta: &BatchMeta,
    ) -> vpod_attention::Result<Option<Tensor>> {
        self.timed(|inner| inner.forward_rope(layer, qkv, cos, sin, meta))
    }

    fn release(&mut self, seq: SeqId) {
        self.inner.release(seq)
    }
}
