//! The server's connection machine: the input (after a control byte) is everything a client sends
//! on one connection.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| veil_server_fuzz::check_session(data));
