//! The protocol handshake: `Hello` with a server nonce, the client's proof of the secret, the
//! server's proof back.

use std::sync::atomic::Ordering;

use sparktorch_proto::{auth, Dtype, ErrorCode, Message, ProtoError, NONCE_LEN, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::timeout;
use tracing::warn;

use super::{Conn, End};
use crate::framing::Values;
use crate::wire::{read_head, write_frame, ReadError};

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub(super) async fn handshake(&mut self) -> Result<(), End> {
        let mut server_nonce = [0u8; NONCE_LEN];
        if let Err(e) = getrandom::fill(&mut server_nonce) {
            return Err(End::Io(std::io::Error::other(format!("getrandom: {e}"))));
        }
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            server_nonce,
        };
        let ht = self.inner.config.handshake_timeout;
        match timeout(
            ht,
            write_frame(
                &mut self.stream,
                &hello,
                Values::Slice(&[]),
                Dtype::F32,
                &mut self.out,
            ),
        )
        .await
        {
            Err(_) => return Err(End::Timeout("handshake write")),
            Ok(Err(e)) => return Err(End::Io(e)),
            Ok(Ok(_)) => {}
        }
        let head = match timeout(ht, read_head(&mut self.stream, 0)).await {
            Err(_) => return Err(End::Timeout("handshake")),
            Ok(Ok(None)) => return Err(End::Closed),
            Ok(Err(e)) => {
                if matches!(e, ReadError::Proto(ProtoError::UnsupportedVersion { .. })) {
                    self.inner
                        .counters
                        .auth_failures
                        .fetch_add(1, Ordering::Relaxed);
                }
                return Err(self.reject(e).await);
            }
            Ok(Ok(Some(h))) => h,
        };
        self.inner
            .counters
            .bytes_in
            .fetch_add(head.0.frame_len() as u64, Ordering::Relaxed);
        let ok = match &head.1 {
            Message::Auth {
                client_nonce,
                proof,
            } => auth::verify_client_proof(
                &self.inner.config.secret,
                &server_nonce,
                client_nonce,
                proof,
            )
            .then_some(*client_nonce),
            _ => None,
        };
        let Some(client_nonce) = ok else {
            self.inner
                .counters
                .auth_failures
                .fetch_add(1, Ordering::Relaxed);
            warn!(peer = %self.peer, got = %head.1.kind(), "authentication failed");
            self.refuse(
                ErrorCode::AuthFailed,
                "authentication failed: wrong or missing proof of the secret".into(),
            )
            .await?;
            return Err(End::Closed);
        };
        let server_proof =
            auth::server_proof(&self.inner.config.secret, &server_nonce, &client_nonce);
        self.send(&Message::AuthOk { server_proof }).await
    }
}
