//! Veil's host-side tools: everything that touches floating point or model files.
//!
//! The data path runs in integers in `veil-core`; this crate prepares its inputs and measures it:
//! - [`hf`]: load and validate Hugging Face GPT-2 checkpoints (`config.json` + `model.safetensors`).
//! - [`hub`]: resolve `--model` to a local directory or a Hugging Face Hub download.
//! - [`tokenizer`]: the GPT-2 BPE tokenizer from `tokenizer.json`.
//! - [`float_ref`]: the f32 reference forward pass every integer pipeline is measured against, with
//!   activation statistics for calibration.
//! - [`llama`]: the LLaMA family (Llama, Qwen2, SmolLM): checkpoints (single or sharded
//!   safetensors), its f32 reference and its quantization.
//! - [`synth`]: random checkpoints in the Hugging Face layout, for tests where no real model can be
//!   downloaded.
#![warn(missing_docs)]

pub mod eval;
pub mod float_ref;
pub mod hf;
pub mod hub;
pub mod llama;
pub mod quantize;
pub mod synth;
pub mod tokenizer;
