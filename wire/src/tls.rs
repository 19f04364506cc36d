//! TLS 1.3 authenticated by ed25519 identity keys instead of a CA: between two peers (the
//! session's QUIC handshake), and between a peer or relay and the rendezvous (signaling).
//!
//! Each side presents a self-signed certificate made from its identity key (rcgen).
//! Between peers both sides accept exactly one key: the one the rendezvous named in the
//! broker message and, on the reaching side, the one pinned in `known_peers`. For
//! signaling only the rendezvous presents one, and its clients accept the key they pinned
//! (or, on first contact, any ed25519 key, which they then pin: [`ServerKey::Learn`]).
//! Certificates are only carriers of the key: TLS 1.3's CertificateVerify proves the
//! holder. Ring provider only.

use std::sync::Arc;

use crate::signal::PublicKey;
use ed25519_dalek::SigningKey;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Making the certificate failed.
    #[error("making the identity certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The DER SubjectPublicKeyInfo prefix of an Ed25519 key (RFC 8410): the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// The DER PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410): the 32 seed bytes follow.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The name both sides put in and expect from certificates (it carries no trust).
pub const SERVER_NAME: &str = "chuantou-peer";

fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    // AES-128-GCM first: as safe for a tunnel's lifetime and about a third faster than
    // AES-256-GCM on the same core (ring's default puts AES-256 first); ChaCha20 last, for
    // machines without AES instructions, where clients that prefer it will ask for it.
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

/// A self-signed certificate for `key`, with the matching private key for rustls.
fn identity(
    key: &SigningKey,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
    let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
    pkcs8.extend_from_slice(&key.to_bytes());
    let der = PrivatePkcs8KeyDer::from(pkcs8);
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)?;
    let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])?.self_signed(&pair)?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(der.clone_key())))
}

/// The Ed25519 key inside a certificate, if that is what it carries.
pub fn cert_key(cert: &CertificateDer<'_>) -> Option<PublicKey> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    let spki = ee.subject_public_key_info();
    let raw = spki.as_ref().strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    Some(PublicKey(raw.try_into().ok()?))
}

/// Which server keys a signaling client accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKey {
    /// Exactly this one (configured, or pinned at first contact).
    Pinned(PublicKey),
    /// Any Ed25519 key (first contact: the caller pins what it got). The handshake still
    /// proves the server holds the key it shows.
    Learn,
}

/// Accepts exactly one Ed25519 key (or, with `key: None`, any), as server or as client
/// verifier.
#[derive(Debug)]
struct Pinned {
    key: Option<PublicKey>,
    algs: WebPkiSupportedAlgorithms,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        match (cert_key(cert), self.key) {
            (Some(_), None) => Ok(()),
            (Some(k), Some(want)) if k == want => Ok(()),
            (Some(k), Some(want)) => Err(rustls::Error::General(format!(
                "the other side presented key {k}, expected {want}"
            ))),
            (None, _) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            )),
        }
    }

    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }
}

/// Identity keys are Ed25519, so that is the only scheme either side accepts.
const SCHEMES: [SignatureScheme; 1] = [SignatureScheme::ED25519];

/// Both configs allow TLS 1.3 only; a TLS 1.2 signature never needs checking.
fn tls12_refused() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls12_refused()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

fn pinned(key: Option<PublicKey>) -> Arc<Pinned> {
    Arc::new(Pinned {
        key,
        algs: provider().signature_verification_algorithms,
    })
}

/// Client side (the reaching peer): our identity, accepting only `peer`.
pub fn client_config(me: &SigningKey, peer: PublicKey) -> Result<ClientConfig, TlsError> {
    let (cert, key) = identity(me)?;
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(pinned(Some(peer)))
        .with_client_auth_cert(vec![cert], key)?)
}

/// Server side (the exposing peer): our identity, requiring a client cert of `peer`.
pub fn server_config(me: &SigningKey, peer: PublicKey) -> Result<ServerConfig, TlsError> {
    let (cert, key) = identity(me)?;
    Ok(ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(pinned(Some(peer)))
        .with_single_cert(vec![cert], key)?)
}

/// A signaling client: no identity of its own (peers prove theirs by signing inside),
/// accepting the rendezvous key `server` allows.
pub fn signaling_client_config(server: ServerKey) -> Result<ClientConfig, TlsError> {
    let key = match server {
        ServerKey::Pinned(k) => Some(k),
        ServerKey::Learn => None,
    };
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(pinned(key))
        .with_no_client_auth())
}

/// The rendezvous' side of signaling: its identity, no client certificates.
pub fn signaling_server_config(me: &SigningKey) -> Result<ServerConfig, TlsError> {
    let (cert, key) = identity(me)?;
    Ok(ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_identity_key() {
        let k = SigningKey::from_bytes(&[4; 32]);
        let (cert, _) = identity(&k).unwrap();
        assert_eq!(
            cert_key(&cert),
            Some(PublicKey(k.verifying_key().to_bytes()))
        );
    }
}
