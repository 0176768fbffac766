//! Veil's client: holds the prompt, the embeddings, the KV cache and the mask secrets, and has a
//! blind server compute every linear layer on one-time-padded rows.
//!
//! The forward pass itself is `veil_core`'s sans-IO state machine; this crate only owns files
//! (weights, mask pools), the TCP connection, the tokenizer and the command line.
//! - [`files`]: memory-mapped weight files and the tokenizer.
//! - [`pool`]: the mask pool file (precomputed unmasking terms, slots marked used durably).
//! - [`transport`]: one request/reply exchange per linear layer over a byte stream.
//! - [`generate`]: the generation loop shared by the private and the local reference paths.
//! - [`link`]: a link emulator (a loopback TCP proxy with a round-trip time and a rate).
//! - [`bench`]: `veil-client bench`, an end-to-end benchmark over separate processes.

pub mod bench;
pub mod chat;
pub mod files;
pub mod generate;
pub mod link;
pub mod offline;
pub mod pool;
pub mod serve;
pub mod speculate;
pub mod text;
pub mod transport;
