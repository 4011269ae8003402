//! What the agent offers in a TLS handshake: rustls' *ring* defaults without ChaCha20-Poly1305
//! or X25519.
//!
//! TLS 1.3 and 1.2 with AES-GCM, ECDHE over P-256 and P-384, and every certificate signature
//! ring verifies (ECDSA, Ed25519, RSA PKCS#1 and PSS). Every TLS 1.3 server must offer
//! AES-128-GCM with P-256 (RFC 8446 §9.1), and TLS 1.2 servers offer ECDHE over P-256 with
//! AES-GCM; a server configured for X25519 alone would refuse the handshake.
//!
//! Why not rustls' `default_provider()`: building it links every suite it lists, whether
//! offered or not. ChaCha20-Poly1305, the signing code of client certificates (which the agent
//! never presents) and X25519 (its key-generation tables; Ed25519 certificates still verify)
//! cost 127 KB of a static binary that constrained hosts download and keep on small disks.

use std::sync::Arc;

use rustls::crypto::ring::{cipher_suite as suite, kx_group};
use rustls::crypto::{
    CryptoProvider, GetRandomFailed, KeyProvider, SecureRandom, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::PrivateKeyDer;
use rustls::sign::SigningKey;
use rustls::SignatureScheme;
use webpki::ring as alg;

/// The crypto provider every HTTPS connection of the agent uses.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        // rustls' order (the stronger AES first), ChaCha20-Poly1305 left out.
        cipher_suites: vec![
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS13_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        ],
        // rustls' order without X25519: P-256 first, the group every server has.
        kx_groups: vec![kx_group::SECP256R1, kx_group::SECP384R1],
        signature_verification_algorithms: SIGNATURES,
        secure_random: &OsRandom,
        key_provider: &NoClientKeys,
    })
}

/// rustls' *ring* table of certificate signatures (private there), the same entries in the same
/// order: a test compares the two.
static SIGNATURES: WebPkiSupportedAlgorithms = WebPkiSupportedAlgorithms {
    all: &[
        alg::ECDSA_P256_SHA256,
        alg::ECDSA_P256_SHA384,
        alg::ECDSA_P384_SHA256,
        alg::ECDSA_P384_SHA384,
        alg::ED25519,
        alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
        alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
        alg::RSA_PKCS1_2048_8192_SHA256,
        alg::RSA_PKCS1_2048_8192_SHA384,
        alg::RSA_PKCS1_2048_8192_SHA512,
        alg::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
        alg::RSA_PKCS1_2048_8192_SHA384_ABSENT_PARAMS,
        alg::RSA_PKCS1_2048_8192_SHA512_ABSENT_PARAMS,
    ],
    mapping: &[
        // TLS 1.2 does not tie an ECDSA scheme to a curve; TLS 1.3 does.
        (
            SignatureScheme::ECDSA_NISTP384_SHA384,
            &[alg::ECDSA_P384_SHA384, alg::ECDSA_P256_SHA384],
        ),
        (
            SignatureScheme::ECDSA_NISTP256_SHA256,
            &[alg::ECDSA_P256_SHA256, alg::ECDSA_P384_SHA256],
        ),
        (SignatureScheme::ED25519, &[alg::ED25519]),
        (
            SignatureScheme::RSA_PSS_SHA512,
            &[alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY],
        ),
        (
            SignatureScheme::RSA_PSS_SHA384,
            &[alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY],
        ),
        (
            SignatureScheme::RSA_PSS_SHA256,
            &[alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY],
        ),
        (
            SignatureScheme::RSA_PKCS1_SHA512,
            &[alg::RSA_PKCS1_2048_8192_SHA512],
        ),
        (
            SignatureScheme::RSA_PKCS1_SHA384,
            &[alg::RSA_PKCS1_2048_8192_SHA384],
        ),
        (
            SignatureScheme::RSA_PKCS1_SHA256,
            &[alg::RSA_PKCS1_2048_8192_SHA256],
        ),
    ],
};

/// Handshake randomness from the kernel (getrandom(2)), as ring's own generator does.
#[derive(Debug)]
struct OsRandom;

impl SecureRandom for OsRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        getrandom::fill(buf).map_err(|_| GetRandomFailed)
    }
}

/// The agent authenticates with its API key, never with a client certificate, so no private
/// key is ever loaded; refusing keeps ring's signing code out of the binary.
#[derive(Debug)]
struct NoClientKeys;

impl KeyProvider for NoClientKeys {
    fn load_private_key(
        &self,
        _key: PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn SigningKey>, rustls::Error> {
        Err(rustls::Error::General(
            "grapheon-agent does not use TLS client certificates".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::crypto::ring::default_provider;
    use rustls::pki_types::SignatureVerificationAlgorithm;

    /// An algorithm by what it verifies: the key and signature algorithm identifiers.
    fn ids(a: &dyn SignatureVerificationAlgorithm) -> (Vec<u8>, Vec<u8>) {
        (
            a.public_key_alg_id().as_ref().to_vec(),
            a.signature_alg_id().as_ref().to_vec(),
        )
    }

    /// One line per entry: `all` first, then each scheme of `mapping` with its algorithms.
    fn table(t: &WebPkiSupportedAlgorithms) -> Vec<String> {
        let all = t.all.iter().map(|a| format!("all {:?}", ids(*a)));
        let mapping = t.mapping.iter().map(|(scheme, algs)| {
            let algs: Vec<_> = algs.iter().map(|a| ids(*a)).collect();
            format!("{scheme:?} {algs:?}")
        });
        all.chain(mapping).collect()
    }

    #[test]
    fn offers_the_ring_default_suites_without_chacha20() {
        let names = |suites: &[rustls::SupportedCipherSuite]| -> Vec<String> {
            suites.iter().map(|s| format!("{:?}", s.suite())).collect()
        };
        assert_eq!(
            names(&crypto_provider().cipher_suites),
            [
                "TLS13_AES_256_GCM_SHA384",
                "TLS13_AES_128_GCM_SHA256",
                "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
                "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
                "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
                "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
            ]
        );
        let without_chacha: Vec<_> = names(&default_provider().cipher_suites)
            .into_iter()
            .filter(|n| !n.contains("CHACHA20"))
            .collect();
        assert_eq!(names(&crypto_provider().cipher_suites), without_chacha);
    }

    #[test]
    fn key_exchange_groups_are_the_ring_defaults_without_x25519() {
        let names = |p: &CryptoProvider| -> Vec<String> {
            p.kx_groups
                .iter()
                .map(|g| format!("{:?}", g.name()))
                .collect()
        };
        assert_eq!(names(&crypto_provider()), ["secp256r1", "secp384r1"]);
        let without_x25519: Vec<_> = names(&default_provider())
            .into_iter()
            .filter(|n| n != "X25519")
            .collect();
        assert_eq!(names(&crypto_provider()), without_x25519);
    }

    #[test]
    fn verifies_exactly_the_certificate_signatures_ring_verifies() {
        let ours = table(&crypto_provider().signature_verification_algorithms);
        let ring = table(&default_provider().signature_verification_algorithms);
        assert_eq!(ours.len(), 14 + 9);
        assert_eq!(ours, ring);
    }

    #[test]
    fn random_bytes_are_filled_and_differ_between_calls() {
        let mut a = [0u8; 32];
        let mut b = [0u8; 32];
        OsRandom.fill(&mut a).expect("getrandom");
        OsRandom.fill(&mut b).expect("getrandom");
        assert_ne!(a, [0u8; 32]);
        assert_ne!(a, b);
    }

    #[test]
    fn a_client_key_is_refused_with_the_reason() {
        let key = PrivateKeyDer::Pkcs8(vec![0u8; 8].into());
        let err = NoClientKeys.load_private_key(key).expect_err("refused");
        assert_eq!(
            err.to_string(),
            "unexpected error: grapheon-agent does not use TLS client certificates"
        );
    }
}
