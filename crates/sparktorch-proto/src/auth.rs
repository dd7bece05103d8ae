//! The handshake proofs: HMAC-SHA256 keyed by the per-server secret.
//!
//! The server sends a fresh random nonce in [`crate::Message::Hello`]; the client answers with
//! its own nonce and `client_proof = HMAC(secret, CLIENT_LABEL || server_nonce || client_nonce)`;
//! the server checks it in constant time and answers with
//! `server_proof = HMAC(secret, SERVER_LABEL || server_nonce || client_nonce)` so that the client
//! knows it reached the server holding the secret (mutual authentication). The secret itself
//! never travels.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{NONCE_LEN, PROOF_LEN};

type HmacSha256 = Hmac<Sha256>;

/// Domain separation label of the client's proof.
pub const CLIENT_LABEL: &[u8] = b"sparktorch/v1/client-proof";
/// Domain separation label of the server's proof.
pub const SERVER_LABEL: &[u8] = b"sparktorch/v1/server-proof";

fn mac(
    secret: &[u8],
    label: &[u8],
    server_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
) -> HmacSha256 {
    // HMAC accepts keys of any length (long keys are hashed first): this cannot fail.
    let mut m = match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    };
    m.update(label);
    m.update(server_nonce);
    m.update(client_nonce);
    m
}

#[cold]
fn unreachable_hmac() -> HmacSha256 {
    // `Hmac::new_from_slice` documents that it never fails; keep a defined result anyway.
    <HmacSha256 as hmac::digest::KeyInit>::new(&Default::default())
}

/// The client's proof of the secret.
pub fn client_proof(
    secret: &[u8],
    server_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
) -> [u8; PROOF_LEN] {
    mac(secret, CLIENT_LABEL, server_nonce, client_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// The server's proof of the secret.
pub fn server_proof(
    secret: &[u8],
    server_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
) -> [u8; PROOF_LEN] {
    mac(secret, SERVER_LABEL, server_nonce, client_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// Check a client's proof in constant time.
pub fn verify_client_proof(
    secret: &[u8],
    server_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
    proof: &[u8; PROOF_LEN],
) -> bool {
    mac(secret, CLIENT_LABEL, server_nonce, client_nonce)
        .verify_slice(proof)
        .is_ok()
}

/// Check the server's proof in constant time.
pub fn verify_server_proof(
    secret: &[u8],
    server_nonce: &[u8; NONCE_LEN],
    client_nonce: &[u8; NONCE_LEN],
    proof: &[u8; PROOF_LEN],
) -> bool {
    mac(secret, SERVER_LABEL, server_nonce, client_nonce)
        .verify_slice(proof)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_secret() {
        let sn = [1u8; NONCE_LEN];
        let cn = [2u8; NONCE_LEN];
        let p = client_proof(b"0123456789abcdef", &sn, &cn);
        assert!(verify_client_proof(b"0123456789abcdef", &sn, &cn, &p));
        assert!(!verify_client_proof(b"0123456789abcdeX", &sn, &cn, &p));
        assert!(!verify_client_proof(b"0123456789abcdef", &cn, &sn, &p));
        // The two directions never share a proof.
        let s = server_proof(b"0123456789abcdef", &sn, &cn);
        assert_ne!(p, s);
        assert!(verify_server_proof(b"0123456789abcdef", &sn, &cn, &s));
        assert!(!verify_server_proof(b"0123456789abcdef", &sn, &cn, &p));
    }
}
