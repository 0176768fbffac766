//! Length-prefixed frames: encoding into caller buffers, and [`FrameDecoder`], which rebuilds
//! frames from a byte stream read in arbitrary pieces without allocating.
//!
//! A frame is a `u32` little-endian body length in `1..=MAX_FRAME_BODY` followed by one
//! postcard-encoded [`Message`]. A zero length is malformed (no message encodes to zero bytes);
//! a larger one is refused before any of its body is read.

use super::message::{Message, MAX_CHUNK_BYTES, MAX_FRAME_BODY};

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Bytes of the largest frame, prefix included: the least a [`FrameDecoder`] or an output buffer
/// handed to a connection's `poll_transmit` must hold.
pub const MAX_FRAME: usize = LEN_PREFIX + MAX_FRAME_BODY;

/// Why bytes are not a frame, or a message could not be framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix announces an empty body, which no message encodes to.
    Empty,
    /// The announced body length exceeds [`MAX_FRAME_BODY`].
    TooLarge(u32),
    /// The body is not exactly one valid message.
    Malformed {
        /// Bytes of the body.
        len: usize,
    },
    /// The caller's buffer cannot hold the frame.
    BufferTooSmall,
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameError::Empty => f.write_str("a frame announced an empty body"),
            FrameError::TooLarge(n) => write!(
                f,
                "a frame announced {n} bytes, more than the {MAX_FRAME_BODY}-byte limit"
            ),
            FrameError::Malformed { len } => {
                write!(f, "a {len}-byte frame is not a valid message")
            }
            FrameError::BufferTooSmall => f.write_str("the buffer is too small for the frame"),
        }
    }
}

impl core::error::Error for FrameError {}

/// A parsed length prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Body length in bytes, in `1..=MAX_FRAME_BODY`.
    pub body_len: usize,
}

impl FrameHeader {
    /// Parses and checks a length prefix.
    pub fn parse(prefix: [u8; LEN_PREFIX]) -> Result<Self, FrameError> {
        match u32::from_le_bytes(prefix) {
            0 => Err(FrameError::Empty),
            n if n as usize > MAX_FRAME_BODY => Err(FrameError::TooLarge(n)),
            n => Ok(FrameHeader {
                body_len: n as usize,
            }),
        }
    }
}

/// Encodes `msg` as a whole frame (prefix and body) at the start of `buf`; returns its length.
pub fn encode_frame(msg: &Message<'_>, buf: &mut [u8]) -> Result<usize, FrameError> {
    if buf.len() < LEN_PREFIX {
        return Err(FrameError::BufferTooSmall);
    }
    let (prefix, body) = buf.split_at_mut(LEN_PREFIX);
    let n = postcard::to_slice(msg, body)
        .map_err(|_| FrameError::BufferTooSmall)?
        .len();
    if n > MAX_FRAME_BODY {
        return Err(FrameError::TooLarge(n as u32));
    }
    prefix.copy_from_slice(&(n as u32).to_le_bytes());
    Ok(LEN_PREFIX + n)
}

/// Postcard's discriminant of [`Message::Data`] (its index among the variants, one varint byte).
const DATA_TAG: u8 = 4;

/// Encodes `words` (at most [`MAX_CHUNK_BYTES`] / 4) as one `Data` frame at the start of `buf`,
/// writing each word's little-endian bytes straight into the frame: the only copy of a row
/// between its buffer and the transport. Byte-for-byte what [`encode_frame`] makes of
/// `Message::Data` (a test holds them equal). Returns the frame's length.
pub fn encode_data_frame(words: &[u32], buf: &mut [u8]) -> Result<usize, FrameError> {
    let bytes = words.len() * 4;
    if bytes > MAX_CHUNK_BYTES {
        return Err(FrameError::TooLarge(bytes as u32));
    }
    // Body: tag, varint byte length, the bytes.
    let mut varint = [0u8; 5];
    let mut v = bytes as u32;
    let mut vlen = 0;
    loop {
        let low = (v & 0x7f) as u8;
        v >>= 7;
        varint[vlen] = if v == 0 { low } else { low | 0x80 };
        vlen += 1;
        if v == 0 {
            break;
        }
    }
    let body = 1 + vlen + bytes;
    let total = LEN_PREFIX + body;
    let out = buf.get_mut(..total).ok_or(FrameError::BufferTooSmall)?;
    out[..LEN_PREFIX].copy_from_slice(&(body as u32).to_le_bytes());
    out[LEN_PREFIX] = DATA_TAG;
    out[LEN_PREFIX + 1..LEN_PREFIX + 1 + vlen].copy_from_slice(&varint[..vlen]);
    for (dst, w) in out[LEN_PREFIX + 1 + vlen..].chunks_exact_mut(4).zip(words) {
        dst.copy_from_slice(&w.to_le_bytes());
    }
    Ok(total)
}

/// Decodes a frame body; trailing bytes make it malformed.
pub fn decode_body(body: &[u8]) -> Result<Message<'_>, FrameError> {
    match postcard::take_from_bytes::<Message<'_>>(body) {
        Ok((msg, [])) => Ok(msg),
        _ => Err(FrameError::Malformed { len: body.len() }),
    }
}

/// Rebuilds frames from a byte stream, in the shape of postcard's `CobsAccumulator`: the host
/// reads transport bytes straight into [`FrameDecoder::spare`] (or copies them in with
/// [`FrameDecoder::feed`]), and [`FrameDecoder::next_message`] yields each complete frame's
/// message, borrowed from the buffer: nothing is allocated and a body is copied only when a frame
/// straddles the end of the buffer (it is moved to the front once).
#[derive(Debug)]
pub struct FrameDecoder<B> {
    buf: B,
    /// Unconsumed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// After an error, the stream is unusable (framing is lost).
    failed: bool,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> FrameDecoder<B> {
    /// A decoder over `buf`, which must hold at least [`MAX_FRAME`] bytes (more lets one read
    /// bring in several frames).
    pub fn new(buf: B) -> Result<Self, FrameError> {
        if buf.as_ref().len() < MAX_FRAME {
            return Err(FrameError::BufferTooSmall);
        }
        Ok(FrameDecoder {
            buf,
            start: 0,
            end: 0,
            failed: false,
        })
    }

    /// Bytes received but not yet consumed as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// True when no partial frame is pending: the stream is at a frame boundary.
    pub fn at_boundary(&self) -> bool {
        self.start == self.end
    }

    /// Whether [`FrameDecoder::next_message`] would yield something now (a complete frame, or an
    /// invalid length prefix).
    pub fn frame_ready(&self) -> bool {
        match self.peek_header() {
            None => self.failed,
            Some(Err(_)) => true,
            Some(Ok(h)) => self.end - self.start >= LEN_PREFIX + h.body_len,
        }
    }

    /// Where the host should put the next bytes it reads; then call [`FrameDecoder::filled`].
    /// Empty only while a complete frame waits to be consumed and the buffer is full.
    pub fn spare(&mut self) -> &mut [u8] {
        let cap = self.buf.as_ref().len();
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if cap - self.end < self.pending_need() {
            // The partial frame at the end would not fit: move it to the front (less than a frame).
            self.buf.as_mut().copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let end = self.end;
        &mut self.buf.as_mut()[end..]
    }

    /// Bytes the partial frame at the front still needs in the buffer to be complete (counted from
    /// `end`), or a whole frame's worth when its prefix is not in yet or is invalid.
    fn pending_need(&self) -> usize {
        let have = self.end - self.start;
        match self.peek_header() {
            Some(Ok(h)) => (LEN_PREFIX + h.body_len).saturating_sub(have),
            _ => MAX_FRAME - have.min(MAX_FRAME),
        }
    }

    fn peek_header(&self) -> Option<Result<FrameHeader, FrameError>> {
        let b = self.buf.as_ref().get(self.start..self.end)?;
        let prefix: [u8; LEN_PREFIX] = b.get(..LEN_PREFIX)?.try_into().ok()?;
        Some(FrameHeader::parse(prefix))
    }

    /// Records that the host wrote `n` bytes at the start of [`FrameDecoder::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.as_ref().len());
    }

    /// Copies as much of `bytes` as fits into the buffer; returns how many were taken. Feed the
    /// rest after consuming messages.
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        let spare = self.spare();
        let n = spare.len().min(bytes.len());
        spare[..n].copy_from_slice(&bytes[..n]);
        self.filled(n);
        n
    }

    /// The next complete frame's message, consumed from the buffer; `None` until one is
    /// complete. After an error every later call fails the same way: the stream has lost its
    /// framing and the connection must close.
    pub fn next_message(&mut self) -> Option<Result<Message<'_>, FrameError>> {
        if self.failed {
            return Some(Err(FrameError::Malformed { len: 0 }));
        }
        let header = match self.peek_header()? {
            Ok(h) => h,
            Err(e) => {
                self.failed = true;
                return Some(Err(e));
            }
        };
        let frame_end = self.start + LEN_PREFIX + header.body_len;
        if frame_end > self.end {
            return None;
        }
        let body_start = self.start + LEN_PREFIX;
        self.start = frame_end;
        let body = &self.buf.as_ref()[body_start..frame_end];
        match decode_body(body) {
            Ok(msg) => Some(Ok(msg)),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }

    /// Reads once from `r` into the spare space (one `read` call). `Ok(0)` is end of stream.
    pub fn read_from<R: embedded_io::Read>(&mut self, r: &mut R) -> Result<usize, R::Error> {
        let n = r.read(self.spare())?;
        self.filled(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::super::message::*;
    use super::*;
    use crate::model::{LinearId, LinearKind};
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    pub(crate) fn every_message(words: &[u8]) -> Vec<Message<'_>> {
        vec![
            Message::Hello {
                protocol: 1,
                fingerprint: [3; 32],
            },
            Message::Welcome {
                protocol: 1,
                fingerprint: [3; 32],
                max_rows: 64,
            },
            Message::Compute {
                request: 9,
                linear: LinearId {
                    layer: 5,
                    kind: LinearKind::MlpDown,
                },
                rows: 3,
            },
            Message::Result {
                request: 9,
                rows: 3,
            },
            Message::Data {
                words: WordBytes(words),
            },
            Message::Error {
                code: ErrorCode::TooManyRows,
            },
            Message::Bye,
            Message::Challenge { nonce: [1; 32] },
            Message::Proof {
                mac: [2; 32],
                nonce: [3; 32],
            },
            Message::ServerProof { mac: [4; 32] },
        ]
    }

    fn frames_of(msgs: &[Message<'_>]) -> Vec<u8> {
        let mut out = vec![];
        let mut buf = vec![0u8; MAX_FRAME];
        for m in msgs {
            let n = encode_frame(m, &mut buf).unwrap();
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[test]
    fn test_every_message_roundtrips_through_the_decoder() {
        let words = [7u8; MAX_CHUNK_BYTES];
        let msgs = every_message(&words);
        let stream = frames_of(&msgs);
        let mut dec = FrameDecoder::new(vec![0u8; 2 * MAX_FRAME]).unwrap();
        let mut rest = &stream[..];
        let mut got = 0;
        while got < msgs.len() {
            let n = dec.feed(rest);
            rest = &rest[n..];
            while let Some(m) = dec.next_message() {
                assert_eq!(m.unwrap(), msgs[got]);
                got += 1;
            }
        }
        assert!(dec.at_boundary());
    }

    #[test]
    fn test_data_frame_encoding_equals_postcard() {
        for n in [0usize, 1, 31, 32, 33, 4095, MAX_CHUNK_BYTES / 4] {
            let words: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(0x9e37_79b9)).collect();
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let mut a = vec![0u8; MAX_FRAME];
            let mut b = vec![0u8; MAX_FRAME];
            let na = encode_data_frame(&words, &mut a).unwrap();
            let nb = encode_frame(
                &Message::Data {
                    words: WordBytes(&bytes),
                },
                &mut b,
            )
            .unwrap();
            assert_eq!(a[..na], b[..nb], "{n} words");
        }
        let too_many = vec![0u32; MAX_CHUNK_BYTES / 4 + 1];
        assert!(encode_data_frame(&too_many, &mut vec![0u8; 2 * MAX_FRAME]).is_err());
    }

    #[test]
    fn test_zero_length_prefix_is_malformed_not_oversized() {
        let mut dec = FrameDecoder::new(vec![0u8; MAX_FRAME]).unwrap();
        dec.feed(&0u32.to_le_bytes());
        assert_eq!(dec.next_message(), Some(Err(FrameError::Empty)));
        assert_eq!(FrameHeader::parse([0; 4]), Err(FrameError::Empty));
    }

    #[test]
    fn test_oversized_prefix_is_rejected_before_the_body() {
        let mut dec = FrameDecoder::new(vec![0u8; MAX_FRAME]).unwrap();
        dec.feed(&((MAX_FRAME_BODY + 1) as u32).to_le_bytes());
        assert_eq!(
            dec.next_message(),
            Some(Err(FrameError::TooLarge(MAX_FRAME_BODY as u32 + 1)))
        );
        // The stream is dead after a framing error.
        assert!(matches!(dec.next_message(), Some(Err(_))));
    }

    #[test]
    fn test_truncated_frame_waits_for_more() {
        let stream = frames_of(&[Message::Bye]);
        let mut dec = FrameDecoder::new(vec![0u8; MAX_FRAME]).unwrap();
        dec.feed(&stream[..stream.len() - 1]);
        assert_eq!(dec.next_message(), None);
        assert!(!dec.at_boundary());
        dec.feed(&stream[stream.len() - 1..]);
        assert_eq!(dec.next_message(), Some(Ok(Message::Bye)));
    }

    #[test]
    fn test_small_buffer_is_refused() {
        assert_eq!(
            FrameDecoder::new(vec![0u8; MAX_FRAME - 1]).err(),
            Some(FrameError::BufferTooSmall)
        );
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder, and whatever decodes re-encodes to the same
        /// message.
        #[test]
        fn prop_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(m) = decode_body(&bytes) {
                let mut buf = vec![0u8; MAX_FRAME];
                let n = encode_frame(&m, &mut buf).unwrap();
                prop_assert_eq!(decode_body(&buf[LEN_PREFIX..n]).unwrap(), m);
            }
            let mut dec = FrameDecoder::new(vec![0u8; MAX_FRAME]).unwrap();
            let mut rest = &bytes[..];
            loop {
                let n = dec.feed(rest);
                rest = &rest[n..];
                let mut progressed = n > 0;
                while let Some(m) = dec.next_message() {
                    progressed = true;
                    if m.is_err() { break; }
                }
                if !progressed || rest.is_empty() { break; }
            }
        }

        /// However a stream of valid frames is cut into reads, the same messages come out in the
        /// same order.
        #[test]
        fn prop_any_fragmentation_yields_the_same_messages(
            cuts in proptest::collection::vec(1usize..5000, 1..40),
            cap_extra in 0usize..3000,
        ) {
            let words: Vec<u8> = (0..MAX_CHUNK_BYTES).map(|i| i as u8).collect();
            let msgs = every_message(&words);
            let stream = frames_of(&msgs);
            let mut dec = FrameDecoder::new(vec![0u8; MAX_FRAME + cap_extra]).unwrap();
            let mut rest = &stream[..];
            let mut got = 0;
            let mut k = 0;
            while got < msgs.len() {
                let take = cuts[k % cuts.len()].min(rest.len());
                k += 1;
                let spare = dec.spare();
                let n = take.min(spare.len());
                spare[..n].copy_from_slice(&rest[..n]);
                dec.filled(n);
                rest = &rest[n..];
                while let Some(m) = dec.next_message() {
                    prop_assert_eq!(m.unwrap(), msgs[got]);
                    got += 1;
                }
            }
            prop_assert!(rest.is_empty() && dec.at_boundary());
        }
    }
}
