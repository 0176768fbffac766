//! The client's connection machine: the input (after a control byte) is everything a server sends
//! after the client's hello, optionally with a request pending once connected.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| veil_server_fuzz::check_client(data));
