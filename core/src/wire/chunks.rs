//! Chunking of word buffers into `Data` frames, written once for both directions: the client's
//! masked rows up, the server's masked products down.

use super::frame::{encode_data_frame, FrameError};
use super::message::{WordBytes, MAX_CHUNK_BYTES};

/// Words per full `Data` chunk.
pub const CHUNK_WORDS: usize = MAX_CHUNK_BYTES / 4;

/// A `Data` frame that does not fit the words still expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataLengthError {
    /// Bytes of the offending chunk.
    pub bytes: usize,
    /// Words received before it.
    pub received: usize,
    /// Words the request or result announced.
    pub expected: usize,
}

impl core::fmt::Display for DataLengthError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "a Data chunk of {} bytes after {} of {} words (chunks carry 1 to {CHUNK_WORDS} whole words, no more than announced)",
            self.bytes, self.received, self.expected
        )
    }
}

/// Progress through one buffer of `total` words travelling as `Data` chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WordCursor {
    total: usize,
    done: usize,
}

impl WordCursor {
    pub(crate) fn new(total: usize) -> Self {
        WordCursor { total, done: 0 }
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.done == self.total
    }

    /// Takes one received chunk into `dst[done..]` (the only copy of the words on the receiving
    /// side: little-endian bytes of the frame buffer into the destination). Empty chunks, partial
    /// words and words beyond `total` are refused.
    pub(crate) fn accept(
        &mut self,
        words: WordBytes<'_>,
        dst: &mut [u32],
    ) -> Result<(), DataLengthError> {
        let bytes = words.0.len();
        let n = bytes / 4;
        if bytes == 0
            || !bytes.is_multiple_of(4)
            || n > self.total - self.done
            || self.done + n > dst.len()
        {
            return Err(DataLengthError {
                bytes,
                received: self.done,
                expected: self.total,
            });
        }
        for (d, w) in dst[self.done..self.done + n].iter_mut().zip(words.iter()) {
            *d = w;
        }
        self.done += n;
        Ok(())
    }

    /// Encodes the next chunk of `src` (`total` words) into `out`; `Ok(0)` when all are sent.
    pub(crate) fn emit(&mut self, src: &[u32], out: &mut [u8]) -> Result<usize, FrameError> {
        if self.is_complete() {
            return Ok(0);
        }
        let n = CHUNK_WORDS.min(self.total - self.done);
        let words = src
            .get(self.done..self.done + n)
            .ok_or(FrameError::BufferTooSmall)?;
        let len = encode_data_frame(words, out)?;
        self.done += n;
        Ok(len)
    }
}
