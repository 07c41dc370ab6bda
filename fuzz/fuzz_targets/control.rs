//! Control-link messages (WebSocket binary messages) as the relay and agent decode them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::fuzzing::control(data));
