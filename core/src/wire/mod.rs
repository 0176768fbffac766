//! The wire protocol: postcard messages in length-prefixed frames.
//!
//! A frame is a `u32` little-endian body length (at most [`MAX_FRAME_BODY`]) followed by one
//! postcard-encoded [`Message`]. Large buffers (masked rows up, masked products down) travel as
//! consecutive [`Message::Data`] frames of at most [`MAX_CHUNK_BYTES`] payload each, so neither
//! side ever needs a frame larger than that; the receiver knows how many words to expect from the
//! [`Message::Compute`] or [`Message::Result`] that precedes them.
//!
//! Conversation:
//! ```text
//! client                                   server
//! Hello {protocol, fingerprint}      →
//!                                    ←     Challenge {nonce}        (only if the server has a key)
//! Proof {mac, nonce}                 →                              (only after a Challenge)
//!                                    ←     ServerProof {mac}        (only after a valid Proof)
//!                                    ←     Welcome {protocol, fingerprint, max_rows} | Error
//! Compute {request, linear, rows}    →
//! Data × ⌈rows·in·4 / chunk⌉         →
//!                                    ←     Result {request, rows}
//!                                    ←     Data × ⌈rows·out·4 / chunk⌉
//! ... one Compute per linear layer ...
//! Bye                                →
//! ```
//! Every word the server sees in `Data` is a one-time-padded value: uniform in Z_2^32.
//!
//! The optional pre-shared key check (HMAC-SHA256 over both nonces and the fingerprint, one label
//! per direction, [`auth`]) authenticates the hello only: later frames carry no MAC, so it keeps
//! strangers off the server's compute, not an attacker who can rewrite the connection.
//!
//! The whole conversation exists once, as two sans-IO state machines in the shape of quinn-proto:
//! [`ServerConnection`] and [`ClientConnection`]. They take received bytes (any split: partial
//! reads, many frames per read), end of stream and timer events from the host, and encode their
//! frames into the host's buffers; they own the handshake, every limit and refusal, request and
//! result pairing and chunking. Hosts only move bytes, run kernels and keep the clock.

pub mod auth;
mod chunks;
mod client;
mod frame;
mod message;
mod server;
#[cfg(test)]
mod tests;

pub use chunks::{DataLengthError, CHUNK_WORDS};

/// An offline layer in progress, as both machines track it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OfflineLayer {
    pub(crate) request: u32,
    pub(crate) linear: crate::model::LinearId,
    pub(crate) in_dim: usize,
    pub(crate) out_dim: usize,
    pub(crate) seed: crate::rlwe::Seed,
    pub(crate) switch: crate::rlwe::ModSwitch,
}
pub use client::{ClientConnection, ClientError, ClientEvent, ClientSettings, Waiting};
pub use frame::{
    decode_body, encode_data_frame, encode_frame, FrameDecoder, FrameError, FrameHeader,
    LEN_PREFIX, MAX_FRAME,
};
pub use message::{
    ErrorCode, Message, WordBytes, MAX_CHUNK_BYTES, MAX_FRAME_BODY, PROTOCOL_VERSION,
};
pub use server::{
    busy_frame, ComputeJob, Ending, JobHeader, JobKind, OfflineRefusal, ServerConnection,
    ServerError, ServerSettings, SetupError,
};
