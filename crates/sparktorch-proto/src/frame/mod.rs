//! Frames: the fixed header, the messages, encoding, and the incremental decoder.
//!
//! ```text
//! offset size field
//!      0    4 magic        b"SPT1"
//!      4    2 version      u16 LE, PROTOCOL_VERSION
//!      6    1 kind         u8, FrameKind
//!      7    1 flags        u8: bit 0 = BF16 (Pull, Push, PushPull, Params only), others 0
//!      8    4 meta_len     u32 LE, <= MAX_META_BYTES, exactly the kind's meta size
//!     12    4 payload_len  u32 LE, <= MAX_PAYLOAD_BYTES, multiple of the element size (4, or 2
//!                          with BF16), 0 for kinds without
//!     16    . meta         fixed fields of the message, LE
//!      .    . payload      raw f32 LE (bfloat16 LE with BF16)
//! ```
//!
//! The BF16 flag on a request (`Pull`, `Push`, `PushPull`) says that its payload is bfloat16
//! and that the `Params` answering it must be bfloat16 too; the server keeps `f32` values.
//!
//! ```text
//! ```

//!
//! Modules: `header` (the 16 fixed bytes: kind, flags, lengths, and their validation),
//! `message` (what a frame says: [`Message`] and its field types), `codec` (meta encoding and
//! decoding, whole-frame decoding for buffered readers).

mod codec;
mod header;
mod message;
#[cfg(test)]
mod tests;

pub use codec::{decode_meta, encode_head, encode_head_as, Decoded, Decoder, Frame};
pub use header::{decode_header, FrameHeader, FrameKind, FLAG_BF16};
pub use message::{ErrorCode, Message, Mode, PushMeta};
