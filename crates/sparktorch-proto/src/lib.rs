//! The sparktorch wire protocol: versioned binary frames, sans-IO.
//!
//! This crate turns messages into bytes and bytes into messages; it never touches a socket, so
//! it can be fuzzed and tested without I/O (and without tokio). The server (`sparktorch-ps`,
//! async) and the client (blocking) share it.
//!
//! A frame is a fixed 16-byte little-endian [`FrameHeader`], then `meta_len` bytes of *meta*
//! (the fixed fields of the [`Message`], little-endian), then `payload_len` bytes of *payload*:
//! raw little-endian `f32` values (parameters or gradients). The split lets a receiver read the
//! header and the small meta first, check every length against its bounds, and then read the
//! tensor bytes straight into their destination buffer (see [`payload`]): no intermediate copy.
//!
//! Modules:
//! - [`frame`]: the header, the message enum, encoding and the incremental [`Decoder`];
//! - [`auth`]: the HMAC-SHA256 handshake proofs;
//! - [`payload`]: zero-copy views of `f32` slices as wire bytes;
//! - [`error`]: [`ProtoError`], every way a frame can be rejected.
//!
//! The full specification is `docs/protocol.md`.

pub mod auth;
pub mod error;
pub mod frame;
pub mod payload;

use std::time::Duration;

pub use error::ProtoError;
pub use frame::{
    decode_header, decode_meta, encode_head, encode_head_as, Decoded, Decoder, ErrorCode, Frame,
    FrameHeader, FrameKind, Message, Mode, PushMeta, FLAG_BF16,
};
pub use payload::Dtype;

/// The four bytes every frame starts with (`"SPT1"`), so that a stray HTTP request or random
/// bytes are recognised at once.
pub const MAGIC: [u8; 4] = *b"SPT1";

/// The protocol version this crate speaks; carried in every frame header and in [`Message::Hello`].
/// Peers with a different version are refused during the handshake.
pub const PROTOCOL_VERSION: u16 = 2;

/// Size of the fixed frame header, in bytes.
pub const HEADER_LEN: usize = 16;

/// Upper bound on the meta section of a frame, in bytes (the largest real meta is an error
/// message of [`MAX_ERROR_MESSAGE_BYTES`] plus 4 bytes).
pub const MAX_META_BYTES: usize = 8 * 1024;

/// Upper bound on an error message carried in [`Message::Error`], in bytes (longer messages are
/// truncated by the sender at a UTF-8 boundary).
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4 * 1024;

/// Upper bound on the tensor payload of one frame, in bytes: 1 GiB, i.e. 256M `f32` parameters
/// (the product targets models of up to 64M parameters; four times that is allowed).
pub const MAX_PAYLOAD_BYTES: usize = 1 << 30;

/// Upper bound on the number of `f32` parameters a frame can carry.
pub const MAX_PARAMS: usize = MAX_PAYLOAD_BYTES / 4;

/// Upper bound on a whole frame, in bytes (header + meta + payload).
pub const MAX_FRAME_BYTES: usize = HEADER_LEN + MAX_META_BYTES + MAX_PAYLOAD_BYTES;

/// Length of the server and client nonces of the handshake, in bytes.
pub const NONCE_LEN: usize = 32;

/// Length of an HMAC-SHA256 proof, in bytes.
pub const PROOF_LEN: usize = 32;

/// Shortest secret a server accepts, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// How long each side waits for the other's next handshake frame before closing.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Upper bound on the extra time a `Pull` with `newer_than` waits beyond the round timeout, so
/// that a round closed by its own timeout (lost worker) still answers the pulls waiting for it.
pub const PULL_WAIT_GRACE: Duration = Duration::from_secs(5);

/// How long a server lets a `Pull` with `newer_than` wait: the round timeout plus a grace of
/// `min(PULL_WAIT_GRACE, round_timeout)`.
pub fn pull_wait(round_timeout: Duration) -> Duration {
    round_timeout.saturating_add(round_timeout.min(PULL_WAIT_GRACE))
}

/// Default bound on every read and write of an established connection.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(60);
