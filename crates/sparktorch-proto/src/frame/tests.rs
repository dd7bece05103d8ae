//! Frame encoding and decoding: round trips, prefixes, bounds, hostile headers.

use super::*;
use crate::payload::{self, Dtype};
use crate::{
    ProtoError, HEADER_LEN, MAX_ERROR_MESSAGE_BYTES, NONCE_LEN, PROOF_LEN, PROTOCOL_VERSION,
};

#[test]
fn bf16_frames_announce_their_dtype_and_halve_the_payload() {
    let push = Message::Push(PushMeta {
        worker: 1,
        attempt: 0,
        step: 3,
        batch_size: 8,
        loss: 0.5,
        val_loss: f64::NAN,
        base_version: 2,
    });
    let values = [1.0f32, -2.5, 0.1];
    let mut out = Vec::new();
    encode_head_as(&push, Dtype::Bf16, 6, &mut out).expect("encodes");
    let mut bytes = [0u8; 6];
    payload::encode_bf16(&values, &mut bytes);
    out.extend_from_slice(&bytes);
    let head = out.first_chunk::<HEADER_LEN>().expect("header");
    let header = decode_header(head, 6).expect("valid");
    assert_eq!((header.dtype, header.payload_values()), (Dtype::Bf16, 3));
    let frame = Decoder::default().decode_exact(&out).expect("decodes");
    assert_eq!(&frame.payload[..2], &values[..2]);
    // A pull may ask for a bfloat16 answer; an odd byte count or a flag on a kind that
    // has no tensor is refused.
    let mut pull = Vec::new();
    encode_head_as(&Message::Pull { newer_than: -1 }, Dtype::Bf16, 0, &mut pull).expect("encodes");
    let head = pull.first_chunk::<HEADER_LEN>().expect("header");
    assert_eq!(decode_header(head, 0).map(|h| h.dtype), Ok(Dtype::Bf16));
    assert!(encode_head_as(&push, Dtype::Bf16, 5, &mut Vec::new()).is_err());
    assert!(encode_head_as(&Message::Bye, Dtype::Bf16, 0, &mut Vec::new()).is_err());
    let mut odd = out.clone();
    odd[12] = 5;
    let head = odd.first_chunk::<HEADER_LEN>().expect("header");
    assert_eq!(
        decode_header(head, 100),
        Err(ProtoError::PayloadMisaligned { len: 5 })
    );
}

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn push_meta() -> PushMeta {
    PushMeta {
        worker: 3,
        attempt: 1,
        step: 42,
        batch_size: 64,
        loss: 0.25,
        val_loss: f64::NAN,
        base_version: 7,
    }
}

fn all_messages() -> Vec<Message> {
    vec![
        Message::Hello {
            version: PROTOCOL_VERSION,
            server_nonce: [9; NONCE_LEN],
        },
        Message::Auth {
            client_nonce: [1; NONCE_LEN],
            proof: [2; PROOF_LEN],
        },
        Message::AuthOk {
            server_proof: [3; PROOF_LEN],
        },
        Message::Register {
            worker: 2,
            attempt: 5,
        },
        Message::Registered {
            num_params: 10,
            resume_step: 4,
            version: 9,
            mode: Mode::Synchronous,
            round_timeout_ms: 600_000,
        },
        Message::Pull { newer_than: -1 },
        Message::Params {
            version: 3,
            should_stop: true,
        },
        Message::Push(push_meta()),
        Message::PushAck {
            version: 11,
            should_stop: false,
            duplicate: true,
            stale: false,
        },
        Message::PushPull(push_meta()),
        Message::StatsRequest,
        Message::Stats {
            version: 1,
            updates: 2,
            workers_live: 3,
            should_stop: false,
            best_loss: 0.5,
        },
        Message::EarlyStopRequest,
        Message::EarlyStop {
            should_stop: true,
            best_loss: 0.1,
            bad_evaluations: 3,
        },
        Message::Bye,
        Message::error(ErrorCode::StaleAttempt, "attempt 0 < 1 ✓"),
    ]
}

fn same(a: &Message, b: &Message) -> bool {
    // NaN-aware comparison via the encoding.
    let mut x = Vec::new();
    let mut y = Vec::new();
    encode_head(a, 0, &mut x).is_ok() && encode_head(b, 0, &mut y).is_ok() && x == y
}

#[test]
fn every_message_roundtrips() -> TestResult {
    for m in all_messages() {
        let payload = if m.kind().has_payload() {
            vec![1.0, -2.0, 3.5]
        } else {
            vec![]
        };
        let frame = Frame {
            message: m.clone(),
            payload: payload.clone(),
        };
        let bytes = frame.encode()?;
        let back = Decoder::default().decode_exact(&bytes)?;
        assert!(same(&back.message, &m), "{m:?} -> {:?}", back.message);
        assert_eq!(back.payload, payload);
    }
    Ok(())
}

#[test]
fn every_prefix_needs_more_and_never_errors() -> TestResult {
    let frame = Frame {
        message: Message::Push(push_meta()),
        payload: vec![0.5; 5],
    };
    let bytes = frame.encode()?;
    for cut in 0..bytes.len() {
        match Decoder::default().decode(&bytes[..cut])? {
            Decoded::NeedMore { needed } => assert!(needed > cut),
            other => panic!("prefix {cut} decoded: {other:?}"),
        }
        assert!(matches!(
            Decoder::default().decode_exact(&bytes[..cut]),
            Err(ProtoError::Truncated { .. })
        ));
    }
    Ok(())
}

#[test]
fn oversized_payload_rejected_from_the_header_alone() -> TestResult {
    let mut head = Vec::new();
    encode_head(&Message::Push(push_meta()), 0, &mut head)?;
    head[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = Decoder::default().decode(&head[..HEADER_LEN]).err();
    assert!(matches!(err, Some(ProtoError::PayloadTooLarge { .. })));
    // A receiver bound (the model size) is enforced too.
    head[12..16].copy_from_slice(&400u32.to_le_bytes());
    let err = Decoder::new(40).decode(&head[..HEADER_LEN]).err();
    assert_eq!(err, Some(ProtoError::PayloadTooLarge { len: 400, max: 40 }));
    Ok(())
}

#[test]
fn http_request_is_bad_magic_at_once() -> TestResult {
    let err = Decoder::default().decode(b"GE").err();
    assert!(matches!(err, Some(ProtoError::BadMagic { .. })));
    let err = Decoder::default()
        .decode(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .err();
    assert!(matches!(err, Some(ProtoError::BadMagic { .. })));
    Ok(())
}

#[test]
fn header_field_checks() -> TestResult {
    let mut head = Vec::new();
    encode_head(&Message::Bye, 0, &mut head)?;
    let h: [u8; HEADER_LEN] = head[..HEADER_LEN].try_into()?;
    let mut v = h;
    v[4] = 3;
    assert!(matches!(
        decode_header(&v, 0),
        Err(ProtoError::UnsupportedVersion { found: 3, .. })
    ));
    let mut k = h;
    k[6] = 200;
    assert_eq!(
        decode_header(&k, 0),
        Err(ProtoError::UnknownKind { kind: 200 })
    );
    let mut f = h;
    f[7] = 1;
    assert_eq!(
        decode_header(&f, 0),
        Err(ProtoError::ReservedFlags { flags: 1 })
    );
    f[7] = 2;
    assert_eq!(
        decode_header(&f, 0),
        Err(ProtoError::ReservedFlags { flags: 2 })
    );
    let mut p = h;
    p[12] = 4;
    assert!(matches!(
        decode_header(&p, 100),
        Err(ProtoError::UnexpectedPayload { .. })
    ));
    let mut m = h;
    m[8] = 1;
    assert!(matches!(
        decode_header(&m, 0),
        Err(ProtoError::MetaLength { .. })
    ));
    let mut big = h;
    big[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_header(&big, 0),
        Err(ProtoError::MetaTooLarge { .. })
    ));
    Ok(())
}

#[test]
fn invalid_bool_and_mode_rejected() -> TestResult {
    let frame = Frame {
        message: Message::PushAck {
            version: 1,
            should_stop: false,
            duplicate: false,
            stale: true,
        },
        payload: vec![],
    };
    let mut bytes = frame.encode()?;
    bytes[HEADER_LEN + 8] = 2;
    assert!(matches!(
        Decoder::default().decode(&bytes),
        Err(ProtoError::InvalidField {
            field: "should_stop",
            ..
        })
    ));
    Ok(())
}

#[test]
fn long_error_messages_are_truncated_on_a_char_boundary() -> TestResult {
    let m = Message::error(ErrorCode::Protocol, "é".repeat(MAX_ERROR_MESSAGE_BYTES));
    let Message::Error { message, .. } = &m else {
        unreachable!()
    };
    assert!(message.len() <= MAX_ERROR_MESSAGE_BYTES);
    let bytes = Frame {
        message: m.clone(),
        payload: vec![],
    }
    .encode()?;
    assert_eq!(Decoder::default().decode_exact(&bytes)?.message, m);
    Ok(())
}
