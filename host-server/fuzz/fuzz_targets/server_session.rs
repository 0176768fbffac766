//! The server's request handling: the input is everything a client sends on one connection.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| veil_server_fuzz::check_session(data));
