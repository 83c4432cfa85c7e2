//! The serving engine as a library: requests, the scheduler, the sampler,
//! step records, the KV budget and preemption. It depends only on the model
//! ([`vpod_models`]), the attention backends ([`vpod_attention`]) and the KV
//! caches ([`vpod_kvcache`]); the command line, the plots and the HTTP server
//! live in `vpod-cli` and drive it through the same four verbs.
//!
//! The principal type is [`Engine`]: [`Engine::add_request`] checks and
//! queues a request and returns its [`RequestId`], [`Engine::step`] runs one
//! scheduled, packed forward pass and returns the tokens it generated and the
//! requests that finished, [`Engine::abort`] ends a request and frees its KV
//! at once, and [`Engine::stats`] reads the live load. Offline runs
//! ([`Engine::run_batch`], [`Engine::generate`]) are loops over these verbs.
//!
//! Driving it by hand, greedy, on the demo checkpoint that ships in the repo:
//!
//! ```no_run
//! use vpod_engine::{Engine, NewRequest, SamplingParams};
//! use vpod_models::{HubOptions, ModelSource, fetch_model_files, load_model};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let files = fetch_model_files(&ModelSource::parse("demo/tiny-verne", "main")?, &HubOptions::from_env())?;
//! let model = load_model(files, candle_core::DType::F32, &candle_core::Device::Cpu, &mut |_, _| {})?;
//! let mut engine = Engine::new(model, "vattention")?;
//! let tok = engine.model.tokenizer()?.clone();
//! let a = engine.add_request(NewRequest::new(tok.encode_with_bos("Phileas Fogg")?, 16, SamplingParams::default()))?;
//! let b = engine.add_request(NewRequest::new(tok.encode_with_bos("Passepartout")?, 16, SamplingParams::default()))?;
//! let mut text = std::collections::HashMap::from([(a, vec![]), (b, vec![])]);
//! while engine.has_unfinished() {
//!     let out = engine.step()?; // both requests in the same packed steps
//!     for t in &out.tokens {
//!         text.get_mut(&t.id).map(|ids| ids.push(t.token));
//!     }
//!     for f in &out.finished {
//!         println!("{} finished ({:?}): {}", f.id, f.output.finish_reason, tok.decode(&f.output.tokens)?);
//!     }
//!     println!("{:?}", engine.stats()); // running, waiting, KV in use, preemptions
//! }
//! # Ok(()) }
//! ```

pub mod engine;
pub mod graphs;
mod offline;
pub mod sampler;
pub mod scheduler;
mod timing;
pub mod tp;

pub use engine::{
    Engine, EngineError, EngineStats, FinishReason, Finished, NewRequest, NewToken, RequestId, RequestOutput,
    Result, StepOutput, StepRecord,
};
pub use graphs::{CaptureRecord, CudaGraphs, GraphStep};
pub use offline::{BatchOutput, Generation, Request, Score};
pub use sampler::{Sampler, SamplingParams};
pub use scheduler::{Policy, Scheduler, SchedulerConfig};
