//! TLS for parameter traffic (rustls, TLS 1.3 only, the `ring` provider).
//!
//! Each server that wants TLS generates its own key pair and a self-signed certificate when it
//! is configured ([`ServerTls::generate`]): there is no CA and no hostname check. Clients pin
//! the SHA-256 digest of that certificate ([`Fingerprint`]), which travels to them the way the
//! HMAC secret does (inside the Spark task closure). The client's verifier compares the end
//! entity's digest with the pin, and still checks the handshake signature with the provider's
//! algorithms, so only the holder of the generated private key can complete the handshake.
//!
//! TLS authenticates the server and protects frames (confidentiality and integrity); the HMAC
//! handshake of the protocol still runs inside the TLS stream, and it is what authenticates the
//! client (the server asks for no client certificate).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::PsError;

/// Bytes in a certificate fingerprint (SHA-256).
pub const FINGERPRINT_LEN: usize = 32;

/// The SHA-256 digest of a server's DER certificate: what a client pins.
pub type Fingerprint = [u8; FINGERPRINT_LEN];

/// The name in the generated certificate, and the server name clients send (SNI). Not checked
/// by anyone: the pin is the identity.
pub const SERVER_NAME: &str = "sparktorch-ps";

/// The crypto provider every TLS config here is built from: `ring`'s, with AES-128-GCM
/// preferred (TLS 1.3's mandatory suite, and the fastest of the three where AES instructions
/// exist: parameter traffic is bulk data), then AES-256-GCM, then ChaCha20-Poly1305.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// A server's TLS identity: its rustls config (certificate and private key) and the
/// certificate's fingerprint. Cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    /// The acceptor's configuration (TLS 1.3, no client certificate).
    config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the certificate.
    fingerprint: Fingerprint,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("fingerprint", &hex(&self.fingerprint))
            .finish()
    }
}

impl ServerTls {
    /// A fresh key pair (ECDSA P-256) and a self-signed certificate for it. The private key
    /// lives only in this process's memory.
    pub fn generate() -> Result<Self, PsError> {
        let bad = |e: &dyn std::fmt::Display| PsError::InvalidConfig {
            param: "tls",
            reason: format!("cannot generate the TLS key pair: {e}"),
        };
        let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .map_err(|e| bad(&e))?;
        let cert: CertificateDer<'static> = certified.cert.der().clone();
        let key =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
        let fingerprint = fingerprint(&cert);
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| bad(&e))?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .map_err(|e| bad(&e))?;
        Ok(Self {
            config: Arc::new(config),
            fingerprint,
        })
    }

    /// The certificate's SHA-256 digest, to hand to clients.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// An acceptor for incoming connections.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}

/// SHA-256 of a DER certificate.
pub fn fingerprint(cert: &CertificateDer<'_>) -> Fingerprint {
    Sha256::digest(cert.as_ref()).into()
}

/// Lower-case hex, for logs and messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A client configuration that accepts exactly the server certificate whose digest is `pin`.
pub fn client_config(pin: Fingerprint) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let provider = provider();
    let verifier = PinnedServerCert {
        pin,
        algorithms: provider.signature_verification_algorithms,
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name clients send: fixed, since the certificate is pinned rather than named.
pub(crate) fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("SERVER_NAME is a valid DNS name")
}

/// Accepts one certificate, identified by its SHA-256 digest; checks handshake signatures with
/// the provider's algorithms (so the peer must hold that certificate's private key).
#[derive(Debug)]
struct PinnedServerCert {
    /// The expected SHA-256 of the server's end-entity certificate.
    pin: Fingerprint,
    /// Signature algorithms for the handshake signature.
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServerCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_server_gets_its_own_key_and_fingerprint() {
        let a = ServerTls::generate().unwrap();
        let b = ServerTls::generate().unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(hex(&a.fingerprint()).len(), 2 * FINGERPRINT_LEN);
        assert!(!format!("{a:?}").contains("PRIVATE"));
    }
}
