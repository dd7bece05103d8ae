//! Property tests: roundtrips, and hostile bytes never panic, never over-allocate.

use proptest::prelude::*;
use sparktorch_proto::{
    decode_header, Decoded, Decoder, ErrorCode, Frame, Message, Mode, ProtoError, PushMeta,
    HEADER_LEN, MAX_PAYLOAD_BYTES, NONCE_LEN,
};

fn push_meta() -> impl Strategy<Value = PushMeta> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        -1e6f64..1e6,
        -1e6f64..1e6,
        any::<u64>(),
    )
        .prop_map(
            |(worker, attempt, step, batch_size, loss, val_loss, base_version)| PushMeta {
                worker,
                attempt,
                step,
                batch_size,
                loss,
                val_loss,
                base_version,
            },
        )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        any::<[u8; NONCE_LEN]>().prop_map(|n| Message::Hello {
            version: sparktorch_proto::PROTOCOL_VERSION,
            server_nonce: n
        }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(worker, attempt)| Message::Register { worker, attempt }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            0u8..3,
            any::<u64>()
        )
            .prop_map(|(num_params, resume_step, version, m, round_timeout_ms)| {
                Message::Registered {
                    num_params,
                    resume_step,
                    version,
                    mode: [Mode::Hogwild, Mode::Async, Mode::Synchronous][m as usize],
                    round_timeout_ms,
                }
            }),
        any::<i64>().prop_map(|newer_than| Message::Pull { newer_than }),
        (any::<u64>(), any::<bool>()).prop_map(|(version, should_stop)| Message::Params {
            version,
            should_stop
        }),
        push_meta().prop_map(Message::Push),
        push_meta().prop_map(Message::PushPull),
        (any::<u64>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(version, should_stop, duplicate, stale)| {
                Message::PushAck {
                    version,
                    should_stop,
                    duplicate,
                    stale,
                }
            }
        ),
        Just(Message::Bye),
        (any::<u16>(), ".{0,40}").prop_map(|(c, s)| Message::error(ErrorCode::from_u16(c), s)),
    ]
}

proptest! {
    #[test]
    fn roundtrip(msg in message(), payload in proptest::collection::vec(-1e9f32..1e9, 0..64)) {
        let payload = if msg.kind().has_payload() { payload } else { vec![] };
        let frame = Frame { message: msg, payload };
        let bytes = frame.encode().unwrap();
        let back = Decoder::default().decode_exact(&bytes).unwrap();
        prop_assert_eq!(back, frame);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Decoder::default().decode(&bytes);
        let _ = Decoder::new(64).decode_exact(&bytes);
    }

    #[test]
    fn corrupted_frames_never_panic(
        msg in message(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let payload = if msg.kind().has_payload() { vec![1.0; 4] } else { vec![] };
        let mut bytes = Frame { message: msg, payload }.encode().unwrap();
        for (at, v) in flips {
            let i = at % bytes.len();
            bytes[i] = v;
        }
        if let Ok(Decoded::Frame { consumed, .. }) = Decoder::default().decode(&bytes) {
            prop_assert!(consumed <= bytes.len());
        }
    }

    #[test]
    fn truncated_frames_rejected(msg in message(), cut in any::<prop::sample::Index>()) {
        let payload = if msg.kind().has_payload() { vec![2.0; 8] } else { vec![] };
        let bytes = Frame { message: msg, payload }.encode().unwrap();
        let cut = cut.index(bytes.len());
        let is_truncated = matches!(
            Decoder::default().decode_exact(&bytes[..cut]),
            Err(ProtoError::Truncated { .. })
        );
        prop_assert!(is_truncated);
    }

    #[test]
    fn oversized_lengths_rejected_before_allocating(meta in any::<u32>(), payload in any::<u32>()) {
        let mut head = [0u8; HEADER_LEN];
        head[..4].copy_from_slice(&sparktorch_proto::MAGIC);
        head[4..6].copy_from_slice(&sparktorch_proto::PROTOCOL_VERSION.to_le_bytes());
        head[6] = 8; // Push
        head[8..12].copy_from_slice(&meta.to_le_bytes());
        head[12..16].copy_from_slice(&payload.to_le_bytes());
        // Only the 16 header bytes exist: the decoder must decide from them alone, and it only
        // ever asks for a bounded amount of bytes.
        match Decoder::default().decode(&head) {
            Ok(Decoded::NeedMore { needed }) => {
                prop_assert!(needed <= sparktorch_proto::MAX_FRAME_BYTES);
                prop_assert!(payload as usize <= MAX_PAYLOAD_BYTES);
            }
            Ok(Decoded::Frame { .. }) => prop_assert!(false, "a frame from a bare header"),
            Err(_) => {}
        }
        let h = decode_header(&head, 1024);
        if let Ok(h) = h {
            prop_assert!(h.payload_len <= 1024);
        }
    }
}
