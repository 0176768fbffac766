//! Veil's blind calculator: the server half of private GPT-2 inference.
//!
//! The server holds only `linear.veil` (the int8 weights of the offloaded linear layers) and answers
//! one kind of question: "multiply these rows by layer `L`'s matrix, modulo 2^32". Every row it sees
//! is one-time padded by the client, so it learns shapes, counts and timing, never values.
//!
//! The conversation itself (hello, pre-shared-key challenge, limits, every refusal, request and
//! result pairing, chunking) is [`veil_core::wire::ServerConnection`], a sans-IO state machine
//! written once in core. This crate only moves bytes and runs kernels:
//!
//! - [`ServerWeights`] (module `weights`): the memory-mapped `linear.veil`, its validated layout
//!   and its SHA-256 fingerprint (what the client compares in the hello).
//! - [`handle_connection`] (module `conn`): drives one connection's machine over any
//!   `AsyncRead + AsyncWrite` (tests use `tokio::io::duplex`): socket bytes straight into the
//!   machine's frame buffer, its frames straight out, its jobs to a kernel, the idle timer.
//! - [`serve`] (module `serve`): the accept loop (one task per connection, a connection limit
//!   answered `Error{Busy}`, graceful stop).
//! - [`Batcher`] (module [`batch`]): continuous batching; concurrent clients' rows for the same
//!   layer are multiplied in one pass over that layer's weights. [`serve`] starts one.
//! - [`PskKey`]: an optional pre-shared key (core's); with one, a client must answer an
//!   HMAC-SHA256 challenge in the hello before the server computes anything for it.
//!
//! A bad frame gets a typed [`ErrorCode`] and closes that connection only. Per-connection memory is
//! bounded by `max_rows · (max_in + max_out) · 4` bytes plus three frame buffers; each batching
//! thread adds at most `max_input_words + max_rows · 256` words of scratch.

pub mod batch;
mod conn;
mod serve;
mod weights;

pub use batch::{BatchConfig, BatchStats, Batcher, JobFailed, Registration};
pub use conn::{handle_connection, handle_connection_with, ConnError};
pub use serve::{serve, serve_with, OfflineLimit, ServerConfig};
pub use veil_core::wire::auth::{PskKey, PSK_MIN_BYTES};
pub use veil_core::wire::{Ending, ErrorCode, ServerError};
pub use weights::{hex, ServerWeights};
