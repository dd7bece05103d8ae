//! The server's per-connection state machine, driven by arbitrary bytes: a real
//! `sparktorch_ps::Server` serves one connection over an in-memory pipe (`Server::serve_io`)
//! on a paused-clock runtime, so that every timeout elapses at once.
//!
//! Input: one control byte, then the bytes the client sends.
//! - bits 0-1: the mode (async, hogwild, synchronous; 3 is async);
//! - bit 2 set: no handshake, the fuzzed bytes come first (the pre-authentication state);
//! - bit 3 set: an honest handshake but no registration (the authenticated, unregistered
//!   state); clear: the harness also registers worker 0 (the registered state).
//!
//! Properties beyond "no panic, no sanitizer report": every byte the server sends decodes as
//! valid frames; no connection task panics; the server records no failure; and afterwards the
//! server still serves an honest client (nothing left locked or waiting).
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("server_session_check.rs");

fuzz_target!(|data: &[u8]| check(data));
