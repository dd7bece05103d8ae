//! Why a frame was rejected.

use crate::frame::FrameKind;

/// Every way decoding can refuse bytes. Each fires before anything is allocated for the
/// offending length; the receiver closes the connection with a logged reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The first four bytes are not [`crate::MAGIC`] (e.g. an HTTP request, random bytes, or a
    /// stream that lost its framing).
    #[error("bad magic {found:02x?}: not a sparktorch frame")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The header carries another protocol version than [`crate::PROTOCOL_VERSION`].
    #[error("protocol version {found} not supported (this side speaks {supported})")]
    UnsupportedVersion {
        /// The peer's version.
        found: u16,
        /// Ours.
        supported: u16,
    },
    /// The frame kind byte is not one of [`FrameKind`].
    #[error("unknown frame kind {kind}")]
    UnknownKind {
        /// The byte found.
        kind: u8,
    },
    /// The flags byte has bits set that this version does not define (all are reserved).
    #[error("reserved flags set: {flags:#04x}")]
    ReservedFlags {
        /// The byte found.
        flags: u8,
    },
    /// The meta length in the header exceeds [`crate::MAX_META_BYTES`].
    #[error("meta of {len} bytes exceeds the bound of {max}")]
    MetaTooLarge {
        /// Length announced.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The payload length in the header exceeds the receiver's bound ([`crate::MAX_PAYLOAD_BYTES`]
    /// or the size of the model).
    #[error("payload of {len} bytes exceeds the bound of {max}")]
    PayloadTooLarge {
        /// Length announced.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The payload length is not a multiple of the element size (4 for `f32`, 2 for bfloat16).
    #[error("payload of {len} bytes is not a whole number of values of its dtype")]
    PayloadMisaligned {
        /// Length announced.
        len: usize,
    },
    /// A frame kind that carries no tensor announced a payload.
    #[error("{kind} frames carry no payload, got {len} bytes")]
    UnexpectedPayload {
        /// The frame kind.
        kind: FrameKind,
        /// Length announced.
        len: usize,
    },
    /// The meta length does not match the fixed size of this frame kind.
    #[error("{kind} meta must be {expected} bytes, got {found}")]
    MetaLength {
        /// The frame kind.
        kind: FrameKind,
        /// The size this kind has.
        expected: usize,
        /// The size announced.
        found: usize,
    },
    /// A field holds a value outside its domain (a bool that is not 0/1, an unknown mode, a
    /// message that is not UTF-8, ...).
    #[error("{kind} field {field}: {reason}")]
    InvalidField {
        /// The frame kind.
        kind: FrameKind,
        /// The field name as documented in docs/protocol.md.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The input ended in the middle of a frame (the peer closed, or a buffer was cut).
    #[error("truncated frame: {needed} bytes needed, {available} available")]
    Truncated {
        /// Bytes the frame needs in total.
        needed: usize,
        /// Bytes there were.
        available: usize,
    },
    /// An encoder was asked for a message that does not fit the bounds (a payload over
    /// [`crate::MAX_PAYLOAD_BYTES`], or a payload on a kind that has none).
    #[error("cannot encode {kind}: {reason}")]
    Unencodable {
        /// The frame kind.
        kind: FrameKind,
        /// Why.
        reason: &'static str,
    },
}
