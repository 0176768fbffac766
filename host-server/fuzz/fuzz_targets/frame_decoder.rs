//! The frame decoder: the input as one body, and as a stream in arbitrary fragmentation (the same
//! messages as one-shot decoding).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| veil_server_fuzz::check_frames(data));
