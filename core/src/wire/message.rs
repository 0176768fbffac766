//! Protocol messages.

use crate::model::LinearId;
use serde::{Deserialize, Serialize};

/// Version of this protocol; peers with another version refuse each other in the hello.
///
/// 2: an empty `Data` frame is refused by both sides, and [`ErrorCode::ComputeFailed`] exists.
/// 3: the offline phase ([`Message::OfflineLayer`], [`Message::OfflineResult`],
/// [`ErrorCode::OfflineRefused`]) and the weights download ([`Message::FetchWeights`],
/// [`Message::Weights`]).
pub const PROTOCOL_VERSION: u32 = 3;
/// Largest `Data` payload in bytes (a multiple of 4).
pub const MAX_CHUNK_BYTES: usize = 32 * 1024;
/// Largest frame body (a `Data` frame with a full chunk plus postcard overhead).
pub const MAX_FRAME_BODY: usize = MAX_CHUNK_BYTES + 64;

/// A run of little-endian `u32` words carried as raw bytes (postcard encodes `&[u8]` as a length
/// and the bytes, 4 bytes a word; a sequence of `u32` would cost up to 5 bytes a word as varints).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WordBytes<'a>(pub &'a [u8]);

impl WordBytes<'_> {
    /// Number of whole words.
    pub fn words(&self) -> usize {
        self.0.len() / 4
    }

    /// Iterates the words.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    }
}

impl Serialize for WordBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for WordBytes<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = WordBytes<'de>;
            fn expecting(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str("borrowed bytes")
            }
            fn visit_borrowed_bytes<E: serde::de::Error>(
                self,
                v: &'de [u8],
            ) -> Result<Self::Value, E> {
                Ok(WordBytes(v))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// Why a peer refused something; sent in [`Message::Error`] before closing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A frame could not be decoded, or was too large.
    MalformedFrame,
    /// A message that is not allowed at this point of the conversation.
    UnexpectedMessage,
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// The peer's weights differ (fingerprints disagree).
    WeightsMismatch,
    /// A linear layer that does not exist in this model.
    UnknownLayer,
    /// More rows than the server accepts in one request.
    TooManyRows,
    /// Data beyond or short of what the request announced.
    WrongDataLength,
    /// The server is at its connection limit.
    Busy,
    /// The peer was idle or too slow.
    Timeout,
    /// Authentication failed.
    Unauthorized,
    /// The server could not compute a request it had accepted (an internal fault, not the
    /// client's); the client may retry on a new connection.
    ComputeFailed,
    /// The server takes no offline work, no more from this connection, or not with these
    /// parameters.
    OfflineRefused,
}

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ErrorCode::MalformedFrame => "malformed frame",
            ErrorCode::UnexpectedMessage => "unexpected message",
            ErrorCode::VersionMismatch => "protocol version mismatch",
            ErrorCode::WeightsMismatch => "weights fingerprint mismatch",
            ErrorCode::UnknownLayer => "unknown layer",
            ErrorCode::TooManyRows => "too many rows in one request",
            ErrorCode::WrongDataLength => "data length differs from the request",
            ErrorCode::Busy => "server busy",
            ErrorCode::Timeout => "timed out",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ComputeFailed => "the server failed to compute the request",
            ErrorCode::OfflineRefused => "offline work refused",
        })
    }
}

impl core::error::Error for ErrorCode {}

/// One protocol message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message<'a> {
    /// Client → server: opens a session.
    Hello {
        /// [`PROTOCOL_VERSION`] of the client.
        protocol: u32,
        /// SHA-256 of the client's `linear.veil`.
        fingerprint: [u8; 32],
    },
    /// Server → client: accepts a session.
    Welcome {
        /// [`PROTOCOL_VERSION`] of the server.
        protocol: u32,
        /// SHA-256 of the server's `linear.veil`.
        fingerprint: [u8; 32],
        /// Most rows the server takes in one `Compute`.
        max_rows: u32,
    },
    /// Client → server: compute `rows` masked rows through `linear`; the rows follow as `Data`.
    Compute {
        /// Client-chosen id echoed in the result (fixed width, so that every token's traffic is
        /// the same size however long the session runs).
        #[serde(with = "postcard::fixint::le")]
        request: u32,
        /// The layer.
        linear: LinearId,
        /// Row count.
        rows: u32,
    },
    /// Server → client: the products of `request` follow as `Data`.
    Result {
        /// The request's id (fixed width, as in `Compute`).
        #[serde(with = "postcard::fixint::le")]
        request: u32,
        /// Row count.
        rows: u32,
    },
    /// A chunk of words of the current request or result.
    Data {
        /// Little-endian words.
        #[serde(borrow)]
        words: WordBytes<'a>,
    },
    /// Either way: refusal; the sender closes the connection after it.
    Error {
        /// Why.
        code: ErrorCode,
    },
    /// Client → server: the session is over.
    Bye,
    // Access control with a pre-shared key (optional on the server). Appended after the original
    // variants so that their postcard discriminants, and so their encodings, stay as they were.
    /// Server → client, instead of `Welcome`, when the server holds a pre-shared key: prove you
    /// hold it too. The client answers with [`Message::Proof`].
    Challenge {
        /// Fresh random server nonce.
        nonce: [u8; 32],
    },
    /// Client → server: the answer to a `Challenge`. No `Compute` is accepted before it checks.
    Proof {
        /// HMAC-SHA256 under the key of the client's transcript (labels and layout in the hosts).
        mac: [u8; 32],
        /// Fresh random client nonce, for the server's proof.
        nonce: [u8; 32],
    },
    /// Server → client, right before `Welcome` after a valid `Proof`: the server holds the key
    /// too (HMAC-SHA256 of the server's transcript, which includes the client nonce).
    ServerProof {
        /// The server's MAC.
        mac: [u8; 32],
    },
    /// Client → server: the offline phase of one layer for one RLWE key. The layer's `in_dim`
    /// input ciphertexts follow in order, one `Data` frame each (the `b` half,
    /// [`crate::rlwe::INPUT_WORDS`] words); ciphertext `i`'s `a` half is
    /// [`crate::rlwe::expand_a`]`(seed, i)`. The server answers with [`Message::OfflineResult`].
    OfflineLayer {
        /// Client-chosen id echoed in the result.
        #[serde(with = "postcard::fixint::le")]
        request: u32,
        /// The layer.
        linear: LinearId,
        /// The seed of the `a` halves (fresh per key and layer, chosen by the client).
        seed: [u8; 32],
        /// Low bits the server drops from each result's `a` half ([`crate::rlwe::ModSwitch`]).
        drop_a: u8,
        /// Low bits dropped from each result's `b` half.
        drop_b: u8,
    },
    /// Server → client: the layer's `out_dim` result ciphertexts follow in order, each as
    /// [`crate::rlwe::pack_result`]'s words in whole `Data` frames (a ciphertext's last frame is
    /// short; no frame holds two ciphertexts).
    OfflineResult {
        /// The `OfflineLayer`'s id.
        #[serde(with = "postcard::fixint::le")]
        request: u32,
    },
    /// Client → server: send me your `linear.veil` (a client without the linear weights derives
    /// its secret check projections from them once, checking them against the fingerprint).
    FetchWeights,
    /// Server → client: `linear.veil` follows as `Data` (its bytes as little-endian words, the
    /// last word zero-padded).
    Weights {
        /// The file's length in bytes.
        bytes: u64,
    },
}

impl Message<'_> {
    /// The variant's name, for error messages and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Welcome { .. } => "Welcome",
            Message::Compute { .. } => "Compute",
            Message::Result { .. } => "Result",
            Message::Data { .. } => "Data",
            Message::Error { .. } => "Error",
            Message::Bye => "Bye",
            Message::Challenge { .. } => "Challenge",
            Message::Proof { .. } => "Proof",
            Message::ServerProof { .. } => "ServerProof",
            Message::OfflineLayer { .. } => "OfflineLayer",
            Message::OfflineResult { .. } => "OfflineResult",
            Message::FetchWeights => "FetchWeights",
            Message::Weights { .. } => "Weights",
        }
    }
}
