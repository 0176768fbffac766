//! The pre-shared-key handshake's one definition: how a key file is read ([`decode_psk`]), what
//! each side's HMAC-SHA256 covers ([`transcript`]) and the key itself ([`PskKey`]: wiped on drop,
//! MACs checked in constant time). The connections in [`super::server`] and [`super::client`] use
//! it; the hosts only read the key file.

use hmac::Mac as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::message::PROTOCOL_VERSION;

type HmacSha256 = hmac::Hmac<Sha256>;

/// HMAC-SHA256's block size: longer keys are hashed first (RFC 2104), shorter ones zero-padded.
const BLOCK: usize = 64;

/// A pre-shared key, held as the HMAC key it is equivalent to (RFC 2104: a key longer than the
/// 64-byte block is replaced by its SHA-256, a shorter one is zero-padded), so it has a fixed
/// size. Zeroized on drop; never printed; compared in constant time.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PskKey {
    block: [u8; BLOCK],
    /// Length of the key as given (for messages only; not secret).
    len: usize,
}

impl PskKey {
    /// A key of raw bytes, at least [`PSK_MIN_BYTES`] long.
    pub fn new(key: &[u8]) -> Result<Self, PskError> {
        if key.len() < PSK_MIN_BYTES {
            return Err(PskError::TooShort(key.len()));
        }
        let mut block = [0u8; BLOCK];
        if key.len() > BLOCK {
            block[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        Ok(PskKey {
            block,
            len: key.len(),
        })
    }

    /// A key from a key file's contents (see [`decode_psk`]).
    pub fn from_file_contents(contents: &[u8]) -> Result<Self, PskError> {
        let mut raw = [0u8; PSK_FILE_MAX_BYTES];
        let result = decode_psk(contents, &mut raw).and_then(|n| PskKey::new(&raw[..n]));
        raw.zeroize();
        result
    }

    /// Reads a key file's contents from `r` (at most [`PSK_FILE_MAX_BYTES`] bytes; a longer file
    /// is not a key file) and decodes them as [`PskKey::from_file_contents`] does. Both hosts read
    /// their `--psk-file` through this.
    pub fn read_from<R: embedded_io::Read>(r: &mut R) -> Result<Self, PskReadError<R::Error>> {
        let mut contents = [0u8; PSK_FILE_MAX_BYTES + 1];
        let mut n = 0;
        let result = loop {
            match r.read(&mut contents[n..]) {
                Ok(0) => {
                    break PskKey::from_file_contents(&contents[..n]).map_err(PskReadError::Key)
                }
                Ok(k) => {
                    n += k;
                    if n > PSK_FILE_MAX_BYTES {
                        break Err(PskReadError::Key(PskError::TooLarge));
                    }
                }
                Err(e) => break Err(PskReadError::Io(e)),
            }
        };
        contents.zeroize();
        result
    }

    /// Bytes of the key as given.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a key has at least [`PSK_MIN_BYTES`] bytes.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn mac(
        &self,
        label: &[u8; 16],
        fingerprint: &[u8; 32],
        server_nonce: &[u8; 32],
        client_nonce: &[u8; 32],
    ) -> HmacSha256 {
        // HMAC takes keys of any length: this never fails.
        let mut mac = HmacSha256::new_from_slice(&self.block)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(&transcript(label, fingerprint, server_nonce, client_nonce));
        mac
    }

    /// The MAC of `label`'s transcript ([`CLIENT_LABEL`] or [`SERVER_LABEL`]).
    pub fn sign(
        &self,
        label: &[u8; 16],
        fingerprint: &[u8; 32],
        server_nonce: &[u8; 32],
        client_nonce: &[u8; 32],
    ) -> [u8; 32] {
        self.mac(label, fingerprint, server_nonce, client_nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks a peer's MAC of `label`'s transcript, in constant time.
    pub fn verify(
        &self,
        label: &[u8; 16],
        fingerprint: &[u8; 32],
        server_nonce: &[u8; 32],
        client_nonce: &[u8; 32],
        mac: &[u8; 32],
    ) -> bool {
        self.mac(label, fingerprint, server_nonce, client_nonce)
            .verify_slice(mac)
            .is_ok()
    }
}

impl core::fmt::Debug for PskKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "PskKey(<{} bytes, redacted>)", self.len)
    }
}

impl PartialEq for PskKey {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.block.ct_eq(&other.block))
    }
}

impl Eq for PskKey {}

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

/// Why a key file could not be read.
#[derive(Debug)]
pub enum PskReadError<E> {
    /// Reading failed.
    Io(E),
    /// The contents are not a usable key.
    Key(PskError),
}

impl<E: core::fmt::Debug> core::fmt::Display for PskReadError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PskReadError::Io(e) => write!(f, "cannot read it: {e:?}"),
            PskReadError::Key(e) => write!(f, "{e}"),
        }
    }
}

impl<E: core::fmt::Debug> core::error::Error for PskReadError<E> {}

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

    /// The MAC equals HMAC-SHA256 of RFC 4231's test case 6 (a 131-byte key, longer than a
    /// block) and case 2 style short keys computed by the `hmac` crate directly: the key's
    /// normalisation to one block changes no MAC.
    #[test]
    fn test_normalised_key_gives_the_same_mac_as_the_raw_key() {
        for len in [16usize, 32, 64, 65, 131, 4096] {
            let raw: std::vec::Vec<u8> = (0..len).map(|i| (i * 7 + 1) as u8).collect();
            let key = PskKey::new(&raw).unwrap();
            let t = transcript(CLIENT_LABEL, &[1; 32], &[2; 32], &[3; 32]);
            let mut direct = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(&raw).unwrap();
            direct.update(&t);
            let want: [u8; 32] = direct.finalize().into_bytes().into();
            assert_eq!(
                key.sign(CLIENT_LABEL, &[1; 32], &[2; 32], &[3; 32]),
                want,
                "{len}"
            );
            assert!(key.verify(CLIENT_LABEL, &[1; 32], &[2; 32], &[3; 32], &want));
            let mut bad = want;
            bad[31] ^= 1;
            assert!(!key.verify(CLIENT_LABEL, &[1; 32], &[2; 32], &[3; 32], &bad));
            assert!(!key.verify(SERVER_LABEL, &[1; 32], &[2; 32], &[3; 32], &want));
        }
    }

    /// RFC 4231 test case 6: key = 0xaa × 131, data "Test Using Larger Than Block-Size Key -
    /// Hash Key First", an independent check of the HMAC itself.
    #[test]
    fn test_rfc4231_case_6() {
        let key = [0xaau8; 131];
        let mut m =
            <HmacSha256 as hmac::Mac>::new_from_slice(&PskKey::new(&key).unwrap().block).unwrap();
        m.update(b"Test Using Larger Than Block-Size Key - Hash Key First");
        let got: [u8; 32] = m.finalize().into_bytes().into();
        let want = [
            0x60, 0xe4, 0x31, 0x59, 0x1e, 0xe0, 0xb6, 0x7f, 0x0d, 0x8a, 0x26, 0xaa, 0xcb, 0xf5,
            0xb7, 0x7f, 0x8e, 0x0b, 0xc6, 0x21, 0x37, 0x28, 0xc5, 0x14, 0x05, 0x46, 0x04, 0x0f,
            0x0e, 0xe3, 0x7f, 0x54,
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn test_key_read_from_a_reader() {
        let mut r: &[u8] = b"  00112233445566778899aabbccddeeff  \n";
        assert_eq!(PskKey::read_from(&mut r).unwrap().len(), 16);
        let big = [b'a'; PSK_FILE_MAX_BYTES + 1];
        let mut r: &[u8] = &big;
        assert!(matches!(
            PskKey::read_from(&mut r),
            Err(PskReadError::Key(PskError::TooLarge))
        ));
    }

    #[test]
    fn test_key_file_contents_and_redaction() {
        let k = PskKey::from_file_contents(b"00112233445566778899aabbccddeeff\n").unwrap();
        assert_eq!(k.len(), 16);
        assert_eq!(
            k,
            PskKey::new(&[
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ])
            .unwrap()
        );
        assert!(!std::format!("{k:?}").contains("00"));
        assert_eq!(
            PskKey::from_file_contents(b"0011"),
            Err(PskError::TooShort(2))
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
