// The frame_decoder target's checks, shared by the cargo-fuzz target (fuzz_targets/
// frame_decoder.rs) and the corpus replay that `cargo nextest` runs
// (crates/sparktorch-proto/tests/fuzz_corpus.rs), through `include!`.

use sparktorch_proto::{
    auth, decode_header, decode_meta, Decoded, Decoder, Frame, Message, HEADER_LEN,
    MAX_PAYLOAD_BYTES,
};

/// Payload bound of the fuzzed decoder: small, so that a frame claiming a large payload is
/// refused (as a server with a small model refuses it) instead of waiting for bytes.
const MAX_PAYLOAD: usize = 1 << 16;

/// The secret the handshake checks run with.
const SECRET: &[u8] = b"fuzz-secret-0123456789";

fn roundtrip(frame: &Frame) {
    // A frame the decoder accepted must encode again, and decode to itself (compared as
    // bytes: NaN payloads are not equal to themselves as floats).
    let Ok(bytes) = frame.encode() else {
        panic!(
            "a decoded frame does not encode: {:?}",
            frame.message.kind()
        );
    };
    match Decoder::new(MAX_PAYLOAD).decode_exact(&bytes) {
        Ok(again) => match again.encode() {
            Ok(b2) => assert_eq!(b2, bytes, "re-encoding is not stable"),
            Err(e) => panic!("re-decoded frame does not encode: {e}"),
        },
        Err(e) => panic!("an encoded frame does not decode: {e}"),
    }
}

fn handshake(message: &Message) {
    // The server's and the client's checks of the handshake frames (constant-time HMAC
    // verification over attacker-chosen nonces and proofs).
    match message {
        Message::Hello { server_nonce, .. } => {
            let client_nonce = [7u8; 32];
            let proof = auth::client_proof(SECRET, server_nonce, &client_nonce);
            assert!(auth::verify_client_proof(
                SECRET,
                server_nonce,
                &client_nonce,
                &proof
            ));
            let _ = auth::verify_server_proof(SECRET, server_nonce, &client_nonce, &proof);
        }
        Message::Auth {
            client_nonce,
            proof,
        } => {
            let server_nonce = [3u8; 32];
            let _ = auth::verify_client_proof(SECRET, &server_nonce, client_nonce, proof);
        }
        Message::AuthOk { server_proof } => {
            let _ = auth::verify_server_proof(SECRET, &[3u8; 32], &[7u8; 32], server_proof);
        }
        _ => {}
    }
}

/// Everything one input is checked for (the fuzz target's body).
pub fn check(data: &[u8]) {
    // 1. The buffered decoder over a stream of frames, as a buffered reader uses it.
    let decoder = Decoder::new(MAX_PAYLOAD);
    let mut rest = data;
    while !rest.is_empty() {
        match decoder.decode(rest) {
            Ok(Decoded::Frame { frame, consumed }) => {
                assert!(consumed > 0 && consumed <= rest.len());
                handshake(&frame.message);
                roundtrip(&frame);
                rest = &rest[consumed..];
            }
            Ok(Decoded::NeedMore { needed }) => {
                assert!(needed > rest.len());
                assert!(needed <= HEADER_LEN + sparktorch_proto::MAX_META_BYTES + MAX_PAYLOAD);
                break;
            }
            Err(_) => break,
        }
    }
    let _ = decoder.decode_exact(data);
    // 2. The stream path the server and client use: header, then meta, with the protocol's
    //    largest payload bound (the header check must refuse before anything is allocated).
    if let Some(head) = data.first_chunk::<HEADER_LEN>() {
        if let Ok(header) = decode_header(head, MAX_PAYLOAD_BYTES) {
            assert!(header.meta_len <= sparktorch_proto::MAX_META_BYTES);
            assert!(header.payload_len <= MAX_PAYLOAD_BYTES);
            let meta = &data[HEADER_LEN..];
            let meta = &meta[..meta.len().min(header.meta_len)];
            if meta.len() == header.meta_len {
                if let Ok(m) = decode_meta(&header, meta) {
                    handshake(&m);
                }
            }
        }
    }
}
