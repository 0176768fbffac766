//! Length-prefixed frames over `embedded-io`, and the sans-IO encode/decode they are built on.

use super::message::{Message, MAX_FRAME_BODY};

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError<E> {
    /// The transport failed.
    Io(E),
    /// The peer closed the connection (at a frame boundary, or inside a frame).
    Closed,
    /// The announced body length exceeds [`MAX_FRAME_BODY`] (or the caller's buffer).
    TooLarge(u32),
    /// The body is not a valid message.
    Malformed,
    /// The caller's buffer cannot hold the encoded message.
    BufferTooSmall,
}

impl<E: core::fmt::Debug> core::fmt::Display for FrameError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameError::Io(e) => write!(f, "transport error: {e:?}"),
            FrameError::Closed => f.write_str("connection closed by peer"),
            FrameError::TooLarge(n) => write!(
                f,
                "frame of {n} bytes exceeds the {MAX_FRAME_BODY}-byte limit"
            ),
            FrameError::Malformed => f.write_str("malformed frame"),
            FrameError::BufferTooSmall => f.write_str("buffer too small for frame"),
        }
    }
}

/// A parsed length prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Body length in bytes.
    pub body_len: usize,
}

impl FrameHeader {
    /// Parses and checks a length prefix against [`MAX_FRAME_BODY`].
    pub fn parse(prefix: [u8; LEN_PREFIX]) -> Result<Self, FrameError<core::convert::Infallible>> {
        let n = u32::from_le_bytes(prefix);
        if n as usize > MAX_FRAME_BODY || n == 0 {
            return Err(FrameError::TooLarge(n));
        }
        Ok(FrameHeader {
            body_len: n as usize,
        })
    }
}

/// Encodes `msg` as a whole frame (prefix + body) into `buf`; returns the frame bytes.
pub fn encode_frame<'b>(
    msg: &Message<'_>,
    buf: &'b mut [u8],
) -> Result<&'b [u8], FrameError<core::convert::Infallible>> {
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
    Ok(&buf[..LEN_PREFIX + n])
}

/// Decodes a frame body; trailing bytes make it malformed.
pub fn decode_body(body: &[u8]) -> Result<Message<'_>, FrameError<core::convert::Infallible>> {
    match postcard::take_from_bytes::<Message<'_>>(body) {
        Ok((msg, [])) => Ok(msg),
        _ => Err(FrameError::Malformed),
    }
}

/// Reads exactly `buf.len()` bytes, looping over short reads (a TCP read returns what has
/// arrived, not what was asked for).
fn read_exact<R: embedded_io::Read>(
    r: &mut R,
    mut buf: &mut [u8],
) -> Result<(), FrameError<R::Error>> {
    while !buf.is_empty() {
        match r.read(buf) {
            Ok(0) => return Err(FrameError::Closed),
            Ok(n) => buf = &mut buf[n..],
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(())
}

/// Reads one frame into `buf` (at least [`MAX_FRAME_BODY`] bytes) and decodes it.
pub fn read_frame<'b, R: embedded_io::Read>(
    r: &mut R,
    buf: &'b mut [u8],
) -> Result<Message<'b>, FrameError<R::Error>> {
    let mut prefix = [0u8; LEN_PREFIX];
    read_exact(r, &mut prefix)?;
    let header = FrameHeader::parse(prefix).map_err(|e| match e {
        FrameError::TooLarge(n) => FrameError::TooLarge(n),
        _ => FrameError::Malformed,
    })?;
    if header.body_len > buf.len() {
        return Err(FrameError::TooLarge(header.body_len as u32));
    }
    let body = &mut buf[..header.body_len];
    read_exact(r, body)?;
    decode_body(body).map_err(|_| FrameError::Malformed)
}

/// Encodes `msg` into `scratch` and writes the frame.
pub fn write_frame<W: embedded_io::Write>(
    w: &mut W,
    msg: &Message<'_>,
    scratch: &mut [u8],
) -> Result<(), FrameError<W::Error>> {
    let frame = encode_frame(msg, scratch).map_err(|e| match e {
        FrameError::TooLarge(n) => FrameError::TooLarge(n),
        _ => FrameError::BufferTooSmall,
    })?;
    w.write_all(frame).map_err(FrameError::Io)
}

#[cfg(test)]
mod tests {
    use super::super::message::*;
    use super::*;
    use crate::model::{LinearId, LinearKind};
    use proptest::prelude::*;

    fn roundtrip(msg: Message<'_>) {
        let mut buf = [0u8; MAX_FRAME_BODY + LEN_PREFIX];
        let frame = encode_frame(&msg, &mut buf).unwrap();
        let mut reader = frame;
        let mut rbuf = [0u8; MAX_FRAME_BODY];
        let back = read_frame(&mut reader, &mut rbuf).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn test_every_message_roundtrips() {
        let words = [7u8; MAX_CHUNK_BYTES];
        roundtrip(Message::Hello {
            protocol: 1,
            fingerprint: [3; 32],
        });
        roundtrip(Message::Welcome {
            protocol: 1,
            fingerprint: [3; 32],
            max_rows: 64,
        });
        roundtrip(Message::Compute {
            request: 9,
            linear: LinearId {
                layer: 5,
                kind: LinearKind::MlpDown,
            },
            rows: 3,
        });
        roundtrip(Message::Result {
            request: 9,
            rows: 3,
        });
        roundtrip(Message::Data {
            words: WordBytes(&words),
        });
        roundtrip(Message::Error {
            code: ErrorCode::TooManyRows,
        });
        roundtrip(Message::Bye);
    }

    #[test]
    fn test_oversized_prefix_is_rejected_before_reading_body() {
        let frame = ((MAX_FRAME_BODY + 1) as u32).to_le_bytes();
        let mut r = &frame[..];
        let mut buf = [0u8; MAX_FRAME_BODY];
        assert_eq!(
            read_frame(&mut r, &mut buf),
            Err(FrameError::TooLarge(MAX_FRAME_BODY as u32 + 1))
        );
    }

    #[test]
    fn test_truncated_frame_is_closed_not_panic() {
        let mut buf = [0u8; 64];
        let frame = encode_frame(&Message::Bye, &mut buf).unwrap().to_vec();
        let cut = &frame[..frame.len() - 1];
        let mut r = cut;
        let mut rbuf = [0u8; MAX_FRAME_BODY];
        assert_eq!(read_frame(&mut r, &mut rbuf), Err(FrameError::Closed));
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn prop_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_body(&bytes);
            let mut r = &bytes[..];
            let mut rbuf = [0u8; MAX_FRAME_BODY];
            let _ = read_frame(&mut r, &mut rbuf);
        }
    }
}
