//! Arbitrary bytes into the frame decoder and the handshake parsing: never a panic, never an
//! allocation beyond the checked bounds, and every accepted frame re-encodes to bytes that
//! decode to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("frame_decoder_check.rs");

fuzz_target!(|data: &[u8]| check(data));
