//! The frame decoder: `decode_body` on the input as one body, and `read_frame` over it as a stream.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| veil_server_fuzz::check_frames(data));
