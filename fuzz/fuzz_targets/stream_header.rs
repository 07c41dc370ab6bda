//! The framed headers at the front of QUIC streams (stream open and status, data hello).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::fuzzing::stream_header(data));
