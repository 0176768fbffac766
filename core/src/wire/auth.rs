//! The pre-shared-key handshake's shared definitions: how a key file is read and what each side's
//! HMAC covers. Both hosts compute HMAC-SHA256 over [`transcript`]; keeping the layout here means the
//! two cannot drift apart.

use super::message::PROTOCOL_VERSION;

/// Shortest pre-shared key accepted, in bytes (after hex decoding).
pub const PSK_MIN_BYTES: usize = 16;
/// Largest key file read.
pub const PSK_FILE_MAX_BYTES: usize = 4096;
/// MAC label of the client's proof. Both labels have the same length, so the transcript layout is
/// unambiguous, and differ, so neither side's proof can be reflected back as the other's.
pub const CLIENT_LABEL: &[u8; 16] = b"veil-auth-client";
/// MAC label of the server's proof.
pub const SERVER_LABEL: &[u8; 16] = b"veil-auth-server";
/// Bytes of a transcript.
pub const TRANSCRIPT_LEN: usize = 16 + 4 + 32 + 32 + 32;

/// What one side's MAC covers: `label (16) ‖ protocol version (u32 LE) ‖ weights fingerprint (32)
/// ‖ server nonce (32) ‖ client nonce (32)`.
pub fn transcript(
    label: &[u8; 16],
    fingerprint: &[u8; 32],
    server_nonce: &[u8; 32],
    client_nonce: &[u8; 32],
) -> [u8; TRANSCRIPT_LEN] {
    let mut t = [0u8; TRANSCRIPT_LEN];
    t[..16].copy_from_slice(label);
    t[16..20].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    t[20..52].copy_from_slice(fingerprint);
    t[52..84].copy_from_slice(server_nonce);
    t[84..116].copy_from_slice(client_nonce);
    t
}

/// Why a key file was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PskError {
    /// The key has fewer than [`PSK_MIN_BYTES`] bytes (the number it has).
    TooShort(usize),
    /// The file is larger than [`PSK_FILE_MAX_BYTES`]: not a key file.
    TooLarge,
    /// The output buffer is smaller than the file.
    BufferTooSmall,
}

impl core::fmt::Display for PskError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PskError::TooShort(n) => write!(
                f,
                "the pre-shared key has {n} bytes, at least {PSK_MIN_BYTES} are needed (make one with `openssl rand -hex 32 > veil.psk`)"
            ),
            PskError::TooLarge => write!(f, "larger than {PSK_FILE_MAX_BYTES} bytes: not a key file"),
            PskError::BufferTooSmall => f.write_str("buffer too small for the key"),
        }
    }
}

impl core::error::Error for PskError {}

/// Decodes a key file's contents into `out` (at least `contents.len()` bytes) and returns the key's
/// length: hex text if the contents, surrounding ASCII whitespace ignored, are an even number of
/// hex digits; the raw bytes as stored otherwise.
pub fn decode_psk(contents: &[u8], out: &mut [u8]) -> Result<usize, PskError> {
    if contents.len() > PSK_FILE_MAX_BYTES {
        return Err(PskError::TooLarge);
    }
    if out.len() < contents.len() {
        return Err(PskError::BufferTooSmall);
    }
    let text = contents.trim_ascii();
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let is_hex = !text.is_empty()
        && text.len().is_multiple_of(2)
        && text.iter().all(|&c| nibble(c).is_some());
    let n = if is_hex {
        for (o, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
            *o = (nibble(pair[0]).unwrap_or(0) << 4) | nibble(pair[1]).unwrap_or(0);
        }
        text.len() / 2
    } else {
        out[..contents.len()].copy_from_slice(contents);
        contents.len()
    };
    if n < PSK_MIN_BYTES {
        return Err(PskError::TooShort(n));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_hex_raw_and_short_keys() {
        let mut out = [0u8; 128];
        let hex = b"  00112233445566778899aabbccddeeff\n";
        assert_eq!(decode_psk(hex, &mut out), Ok(16));
        assert_eq!(out[..2], [0x00, 0x11]);
        let raw = b"a passphrase, not hex at all";
        assert_eq!(decode_psk(raw, &mut out), Ok(raw.len()));
        assert_eq!(&out[..raw.len()], raw);
        assert_eq!(decode_psk(b"0011", &mut out), Err(PskError::TooShort(2)));
        assert_eq!(
            decode_psk(&[7u8; 5000], &mut [0u8; 5000]),
            Err(PskError::TooLarge)
        );
    }

    #[test]
    fn test_transcript_layout() {
        let t = transcript(CLIENT_LABEL, &[1; 32], &[2; 32], &[3; 32]);
        assert_eq!(&t[..16], CLIENT_LABEL);
        assert_eq!(t[16..20], PROTOCOL_VERSION.to_le_bytes());
        assert_eq!((t[20], t[52], t[84]), (1, 2, 3));
    }
}
