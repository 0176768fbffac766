//! Veil's core: a `no_std`, allocation-free, fixed-point GPT-2 whose linear layers can be computed
//! by a server that only ever sees one-time-padded numbers.
//!
//! Modules follow the data path of one token through the client:
//! - [`fixed`]: the Q16.16 fixed-point domain of the residual stream and rounding helpers.
//! - [`quant`]: int8 activation rows with per-row scales, per-output-channel weight scales
//!   (integer multiplier and shift), and 16-bit block floating point for embeddings and the KV cache.
//! - [`kernels`]: int8 × Z_2^32 wrapping matrix products (what the server runs, and what the client
//!   runs for the plaintext reference and for mask precomputation).
//! - [`mask`]: additive shares in Z_2^32 and the ChaCha20 mask streams addressed by
//!   (slot, layer, kind).
//! - [`nonlinear`]: integer LayerNorm, RMSNorm, GELU (tanh form), SiLU and softmax, each with a
//!   stated error bound.
//! - [`rope`]: rotary position embeddings for the LLaMA family (frequencies from the configuration,
//!   cosines and sines by the pure-Rust `libm`, the rotation in integers).
//! - [`model`]: the model configuration (GPT-2 or the LLaMA family, one forward pass for both), the on-disk weight format, the sans-IO forward pass (a state
//!   machine that asks for linear layers and consumes their exact integer results), the KV cache and
//!   sampling.
//!
//! The core never opens a socket, reads a clock, allocates or draws its own randomness: hosts pass
//! bytes, buffers and random numbers in.
#![no_std]
#![deny(unsafe_code)] // Allowed only in the SIMD kernels (`kernels::x86`, `kernels::neon`).
#![warn(missing_docs)]
#![warn(clippy::std_instead_of_core, clippy::alloc_instead_of_core)]

#[cfg(test)]
extern crate std;

pub mod fixed;
pub mod integrity;
pub mod kernels;
pub mod mask;
pub mod model;
pub mod nonlinear;
pub mod quant;
pub mod rlwe;
pub mod rope;
pub mod session;
pub mod wire;

mod tables {
    include!(concat!(env!("OUT_DIR"), "/tables.rs"));
}
