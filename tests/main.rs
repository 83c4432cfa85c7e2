//! The workspace's integration tests: one binary, a module per topic. They
//! run on the CPU in f32 against the tiny checkpoints of `tests/fixtures/`,
//! made by `scripts/make_fixtures.py` with Hugging Face transformers (the
//! reference implementation).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

mod bad_input;
mod compare;
mod conformance;
mod demo;
mod engine;
#[cfg(feature = "cuda")]
mod gpu;
mod hub;
mod parity;
mod serve;
mod tokenizer;
mod tp;
