//! Device-side TLS: the device's key pair and the rustls client configuration.
//!
//! Enrolment story (see `fleetcast_daemon::pki` for the gateway side):
//! 1. The operator hands the device the gateway CA certificate (PEM) and a one-time token;
//!    or, instead of the certificate, its SHA-256 fingerprint ([`parse_fingerprint`]): then the
//!    enrolment connection uses [`client_config_pinned`] and [`pinned_ca`] extracts the CA
//!    from the verified chain for the device to save.
//! 2. The agent generates a [`DeviceKey`] locally and saves it with mode 0600.
//! 3. It connects with [`client_config`]`(ca, None)` (server verified, no client certificate)
//!    and sends the token plus [`DeviceKey::spki_der`]; the gateway answers with a client
//!    certificate for that public key.
//! 4. From then on it connects with [`client_config`]`(ca, Some((&cert, &key)))` (mutual TLS).
//!
//! Invariants:
//! - The private key is generated on the device and never leaves it: the only key material this
//!   module exports is the public [`DeviceKey::spki_der`]; the private half is written only to
//!   the key file (mode 0600, written via a temporary file and an atomic rename,
//!   [`fleetcast_os::write_atomic`]).
//! - No `Debug` output contains private key material.
//! - The server is verified against the gateway CA alone, never against the system roots.
//! - Crypto is the `ring` provider, chosen explicitly (no aws-lc anywhere in the agent).
//! - No clock is read here: certificate validity is checked by rustls through its
//!   `TimeProvider` ([`client_config`] uses rustls' default one, tests inject a fixed one).

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING};
use rustls::client::ClientConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::time_provider::{DefaultTimeProvider, TimeProvider};
use rustls::RootCertStore;

/// The ALPN protocol name both ends offer (defined once, with the ladder's protocol).
pub use fleetcast_wire::ladder::ALPN;

/// DER prefix of a SubjectPublicKeyInfo for an uncompressed ECDSA P-256 point (RFC 5480 §2):
/// SEQUENCE { SEQUENCE { id-ecPublicKey, secp256r1 }, BIT STRING (0 unused bits, 65 bytes) }.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// Length of an uncompressed P-256 point (0x04 || X || Y).
const P256_POINT_LEN: usize = 65;

/// Errors of the device-side TLS set-up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The system random number generator failed while generating a key.
    #[error("device key generation failed (system random number generator)")]
    KeyGeneration,
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file holds no PEM section of the expected kind.
    #[error("{path}: no PEM {expected} section")]
    Pem {
        /// The file.
        path: PathBuf,
        /// The PEM label looked for, e.g. `PRIVATE KEY`.
        expected: &'static str,
    },
    /// The key is not an ECDSA P-256 PKCS#8 private key (or is corrupt).
    #[error("{path}: not an ECDSA P-256 PKCS#8 private key")]
    InvalidKey {
        /// The file the key came from (empty when it came from memory).
        path: PathBuf,
    },
    /// A key file is readable or writable by group or others.
    #[error("{path} has mode {mode:03o}; a key file must be private to its owner (chmod 600)")]
    InsecurePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The gateway CA certificate was rejected as a trust anchor.
    #[error("gateway CA certificate rejected: {0}")]
    InvalidCa(rustls::Error),
    /// rustls refused the configuration (e.g. the client certificate does not match the key).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The gateway's chain holds no certificate with the CA fingerprint the agent was given (another
/// gateway, an intercepting proxy, or a mistyped fingerprint). The pinned verifier's error,
/// carried in `rustls::CertificateError::Other`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the gateway's CA does not match the fingerprint given: expected {}, but the gateway sent {} (compare with `fleetcastd --print-ca-fingerprint`)", Hex(.expected), list_fingerprints(.presented))]
pub struct CaPinMismatch {
    /// The fingerprint the agent was given.
    pub expected: [u8; 32],
    /// SHA-256 of each certificate the gateway sent after its own (the CA certificates).
    pub presented: Vec<[u8; 32]>,
}

fn list_fingerprints(fps: &[[u8; 32]]) -> String {
    if fps.is_empty() {
        return "no CA certificate".into();
    }
    let hex: Vec<String> = fps.iter().map(|f| format!("{:?}", Hex(f))).collect();
    format!("a CA with fingerprint {}", hex.join(" or "))
}

/// The device's ECDSA P-256 key pair. The private half never leaves the device.
///
/// `Debug` prints only the SHA-256 of the public key.
pub struct DeviceKey {
    /// PKCS#8 v1 document (zeroised on drop by `rustls-pki-types`).
    pkcs8: PrivatePkcs8KeyDer<'static>,
    /// Uncompressed public point, 0x04 || X || Y.
    public: [u8; P256_POINT_LEN],
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.spki_der());
        f.debug_struct("DeviceKey")
            .field("alg", &"ECDSA P-256")
            .field("spki_sha256", &Hex(digest.as_ref()))
            .finish_non_exhaustive()
    }
}

impl DeviceKey {
    /// Generates a fresh ECDSA P-256 key pair from the system random number generator.
    pub fn generate() -> Result<DeviceKey, TlsError> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| TlsError::KeyGeneration)?;
        DeviceKey::from_pkcs8_der(doc.as_ref().to_vec()).map_err(|_| TlsError::KeyGeneration)
    }

    /// Parses a PKCS#8 DER private key; it must be ECDSA P-256.
    pub fn from_pkcs8_der(der: Vec<u8>) -> Result<DeviceKey, TlsError> {
        let pkcs8 = PrivatePkcs8KeyDer::from(der);
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &SystemRandom::new(),
        )
        .map_err(|_| TlsError::InvalidKey {
            path: PathBuf::new(),
        })?;
        let public: [u8; P256_POINT_LEN] =
            pair.public_key()
                .as_ref()
                .try_into()
                .map_err(|_| TlsError::InvalidKey {
                    path: PathBuf::new(),
                })?;
        Ok(DeviceKey { pkcs8, public })
    }

    /// The public key as a DER SubjectPublicKeyInfo: what the agent sends at enrolment.
    pub fn spki_der(&self) -> Vec<u8> {
        let mut spki = Vec::with_capacity(P256_SPKI_PREFIX.len() + P256_POINT_LEN);
        spki.extend_from_slice(&P256_SPKI_PREFIX);
        spki.extend_from_slice(&self.public);
        spki
    }

    /// Writes the key as a PKCS#8 PEM file (`PRIVATE KEY`) with mode 0600, atomically
    /// (temporary file in the same directory, fsync, rename).
    pub fn save_pem(&self, path: &Path) -> Result<(), TlsError> {
        let pem = pem_encode("PRIVATE KEY", self.pkcs8.secret_pkcs8_der());
        write_file_atomic(path, pem.as_bytes(), 0o600)
    }

    /// Loads a key written by [`DeviceKey::save_pem`]. Refuses a file readable or writable by
    /// group or others.
    pub fn load_pem(path: &Path) -> Result<DeviceKey, TlsError> {
        check_private_mode(path)?;
        let bytes = read_file(path)?;
        let pkcs8 = PrivatePkcs8KeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::Pem {
            path: path.to_owned(),
            expected: "PRIVATE KEY",
        })?;
        DeviceKey::from_pkcs8_der(pkcs8.secret_pkcs8_der().to_vec()).map_err(|_| {
            TlsError::InvalidKey {
                path: path.to_owned(),
            }
        })
    }
}

/// Parses the first `CERTIFICATE` section of a PEM file (e.g. the gateway CA the operator gave
/// the device, or the device's own certificate saved after enrolment).
pub fn load_cert_pem(path: &Path) -> Result<CertificateDer<'static>, TlsError> {
    let bytes = read_file(path)?;
    CertificateDer::from_pem_slice(&bytes).map_err(|_| TlsError::Pem {
        path: path.to_owned(),
        expected: "CERTIFICATE",
    })
}

/// Writes a certificate as PEM (mode 0644; certificates are public), atomically.
pub fn save_cert_pem(path: &Path, cert: &CertificateDer<'_>) -> Result<(), TlsError> {
    write_file_atomic(path, pem_encode("CERTIFICATE", cert).as_bytes(), 0o644)
}

/// SHA-256 of a certificate's DER: compare with the fingerprint the operator gave out-of-band
/// (`fleetcastd` prints it, lower-case hex) before trusting a CA file.
pub fn cert_fingerprint_sha256(cert: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, cert).as_ref());
    out
}

/// The agent's crypto: *ring*, cut down to what a fleetcast gateway speaks. The gateway
/// (`fleetcast_daemon::pki`) has ECDSA P-256 CA and server keys and rustls' whole ring
/// provider, so the agent needs one of each: TLS 1.3 with its mandatory suite and key exchange
/// (`TLS_AES_128_GCM_SHA256` and secp256r1, RFC 8446 §9.1: X25519 is only a "SHOULD", and
/// P-256's code is linked for the signatures anyway), ECDSA P-256 signatures to verify and
/// its own P-256 key to sign with ([`P256SigningKey`]). The session carries only control
/// messages (files travel by multicast, UDP catch-up and HTTP), so a second AEAD would buy no
/// speed that matters. Every algorithm named here keeps its code in the embedded binary; what
/// each one left out cost is in docs/performance.md ("Agent footprint").
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite as cs, kx_group};
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![cs::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![kx_group::SECP256R1],
        signature_verification_algorithms: SIG_ALGS,
        secure_random: &AgentCrypto,
        key_provider: &AgentCrypto,
    })
}

/// Signatures a gateway's certificates and handshakes carry (see [`provider`]).
static SIG_ALGS: rustls::crypto::WebPkiSupportedAlgorithms =
    rustls::crypto::WebPkiSupportedAlgorithms {
        all: &[webpki::ring::ECDSA_P256_SHA256],
        mapping: &[(
            rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
            &[webpki::ring::ECDSA_P256_SHA256],
        )],
    };

/// Randomness and key loading for [`provider`].
#[derive(Debug)]
struct AgentCrypto;

impl rustls::crypto::SecureRandom for AgentCrypto {
    fn fill(&self, buf: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
        ring::rand::SecureRandom::fill(&SystemRandom::new(), buf)
            .map_err(|_| rustls::crypto::GetRandomFailed)
    }
}

impl rustls::crypto::KeyProvider for AgentCrypto {
    /// Only the device's own kind of key, ECDSA P-256 in PKCS#8 ([`DeviceKey`]): rustls'
    /// `any_ecdsa_type` would try P-384 too and link its signing code.
    fn load_private_key(
        &self,
        key_der: PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
        let not_p256 = || rustls::Error::General("not an ECDSA P-256 PKCS#8 key".into());
        let PrivateKeyDer::Pkcs8(pkcs8) = &key_der else {
            return Err(not_p256());
        };
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &SystemRandom::new(),
        )
        .map_err(|_| not_p256())?;
        let spki = [&P256_SPKI_PREFIX[..], pair.public_key().as_ref()].concat();
        Ok(Arc::new(P256SigningKey {
            pair: Arc::new(pair),
            spki,
        }))
    }
}

/// The device key as rustls signs with it: ECDSA P-256 with SHA-256 (ASN.1 signatures), the
/// one scheme a P-256 key has in TLS 1.3. `Debug` shows no key material (ring's key pair
/// prints only its public key).
#[derive(Debug)]
struct P256SigningKey {
    pair: Arc<EcdsaKeyPair>,
    /// DER SubjectPublicKeyInfo, for rustls' check that the certificate matches the key.
    spki: Vec<u8>,
}

impl rustls::sign::SigningKey for P256SigningKey {
    fn choose_scheme(
        &self,
        offered: &[rustls::SignatureScheme],
    ) -> Option<Box<dyn rustls::sign::Signer>> {
        offered
            .contains(&rustls::SignatureScheme::ECDSA_NISTP256_SHA256)
            .then(|| Box::new(P256Signer(self.pair.clone())) as Box<dyn rustls::sign::Signer>)
    }

    fn public_key(&self) -> Option<rustls::pki_types::SubjectPublicKeyInfoDer<'_>> {
        Some(self.spki.as_slice().into())
    }

    fn algorithm(&self) -> rustls::SignatureAlgorithm {
        rustls::SignatureAlgorithm::ECDSA
    }
}

#[derive(Debug)]
struct P256Signer(Arc<EcdsaKeyPair>);

impl rustls::sign::Signer for P256Signer {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        self.0
            .sign(&SystemRandom::new(), message)
            .map(|sig| sig.as_ref().to_vec())
            .map_err(|_| rustls::Error::General("ECDSA P-256 signing failed".into()))
    }

    fn scheme(&self) -> rustls::SignatureScheme {
        rustls::SignatureScheme::ECDSA_NISTP256_SHA256
    }
}

/// Client configuration for talking to the gateway: ring provider, TLS 1.3 only, server
/// verified against `ca_der` only, ALPN `fleetcast/1`, in-memory session resumption (reuse the
/// returned `Arc` across connections to resume). `identity` is the enrolled certificate and
/// key; `None` for the enrolment connection.
///
/// The caller names the gateway (`ServerName`) when it opens a connection; it must be one of
/// the names the gateway's server certificate was issued for.
pub fn client_config(
    ca_der: &[u8],
    identity: Option<(&CertificateDer<'_>, &DeviceKey)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with_time(ca_der, identity, Arc::new(DefaultTimeProvider))
}

/// [`client_config`] with an explicit source of wall time for certificate validity (virtual
/// time in tests and simulations).
pub fn client_config_with_time(
    ca_der: &[u8],
    identity: Option<(&CertificateDer<'_>, &DeviceKey)>,
    time: Arc<dyn TimeProvider>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_der.to_vec()))
        .map_err(TlsError::InvalidCa)?;
    let provider = provider();
    let builder = ClientConfig::builder_with_details(provider, time)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(
            vec![cert.clone().into_owned()],
            PrivateKeyDer::Pkcs8(key.pkcs8.clone_key()),
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    // `resumption` keeps rustls' default: an in-memory cache of 256 sessions, tickets allowed.
    Ok(Arc::new(config))
}

/// Client configuration for the enrolment connection when the operator gave the device only
/// the SHA-256 fingerprint of the gateway CA instead of its certificate: the gateway sends its
/// CA certificate in the chain; the connection is accepted only if a certificate in the chain
/// has exactly this fingerprint and the server certificate verifies against it (as if it were
/// the sole root). After the handshake, [`pinned_ca`] extracts the CA to save for later
/// connections. No client certificate; otherwise like [`client_config`].
pub fn client_config_pinned(ca_fingerprint: [u8; 32]) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_pinned_with_time(ca_fingerprint, Arc::new(DefaultTimeProvider))
}

/// [`client_config_pinned`] with an explicit source of wall time.
pub fn client_config_pinned_with_time(
    ca_fingerprint: [u8; 32],
    time: Arc<dyn TimeProvider>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCaVerifier {
        pin: ca_fingerprint,
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_details(provider, time)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The certificate in a verified peer chain (`ClientConnection::peer_certificates()`) whose
/// SHA-256 is `ca_fingerprint`: the gateway CA to save after a pinned enrolment.
pub fn pinned_ca(
    peer_chain: &[CertificateDer<'_>],
    ca_fingerprint: [u8; 32],
) -> Option<CertificateDer<'static>> {
    peer_chain
        .iter()
        .find(|c| cert_fingerprint_sha256(c) == ca_fingerprint)
        .map(|c| c.clone().into_owned())
}

/// Parses a SHA-256 fingerprint written as 64 hex digits, optionally separated by colons
/// (`ab:cd:…`), in either case.
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let digits: Vec<u8> = text
        .trim()
        .bytes()
        .filter(|&b| b != b':')
        .map(|b| match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        })
        .collect::<Option<_>>()?;
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(digits.chunks(2)) {
        *o = pair[0] << 4 | pair[1];
    }
    Some(out)
}

/// Verifies the server against the CA certificate in its own chain whose SHA-256 is pinned.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let ca = pinned_ca(intermediates, self.pin).ok_or_else(|| {
            let mismatch = CaPinMismatch {
                expected: self.pin,
                presented: intermediates
                    .iter()
                    .map(|c| cert_fingerprint_sha256(c))
                    .collect(),
            };
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(mismatch),
            )))
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca)?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Lower-case hex formatting of a byte slice.
struct Hex<'a>(&'a [u8]);

impl fmt::Debug for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Base64 (RFC 4648 §4, with padding), as ASCII bytes.
pub(crate) fn base64(data: &[u8]) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                b64.push(ALPHABET[((v >> (18 - 6 * i)) & 0x3f) as usize]);
            } else {
                b64.push(b'=');
            }
        }
    }
    b64
}

/// RFC 7468 PEM encoding: base64 (RFC 4648 §4, with padding) in 64-column lines.
fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.chunks(64) {
        // The alphabet is ASCII, so every chunk is valid UTF-8.
        out.extend(line.iter().map(|&c| char::from(c)));
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

fn check_private_mode(path: &Path) -> Result<(), TlsError> {
    let meta = fs::metadata(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Replaces `path` with `bytes` (mode `mode`) atomically and durably
/// ([`fleetcast_os::write_atomic`]), so a crash leaves either the old file or the new one.
fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    fleetcast_os::write_atomic(path, bytes, mode).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, PublicKeyData,
        SignatureAlgorithm,
    };
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::server::{ServerConfig, WebPkiClientVerifier};
    use rustls::{ClientConnection, ServerConnection};
    use std::time::Duration;

    /// 2026-06-01T00:00:00Z, the virtual wall time of these tests.
    const NOW_SECS: u64 = 1_780_272_000;

    #[derive(Debug)]
    struct FixedTime;
    impl TimeProvider for FixedTime {
        fn current_time(&self) -> Option<UnixTime> {
            Some(UnixTime::since_unix_epoch(Duration::from_secs(NOW_SECS)))
        }
    }

    /// A device public key as rcgen sees it (rcgen's own SPKI parser needs x509-parser).
    struct RawP256(Vec<u8>);
    impl PublicKeyData for RawP256 {
        fn der_bytes(&self) -> &[u8] {
            &self.0
        }
        fn algorithm(&self) -> &'static SignatureAlgorithm {
            &rcgen::PKCS_ECDSA_P256_SHA256
        }
    }

    /// A stand-in gateway: CA, server certificate for "gw.test", client-cert issuing.
    struct TestGateway {
        ca_der: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
        server: Arc<ServerConfig>,
    }

    impl TestGateway {
        fn new() -> TestGateway {
            let ca_key = KeyPair::generate().unwrap();
            let mut ca_params = CertificateParams::default();
            ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(DnType::CommonName, "test CA");
            let ca_der = ca_params.self_signed(&ca_key).unwrap().der().clone();
            let issuer = Issuer::new(ca_params, ca_key);
            let server_key = KeyPair::generate().unwrap();
            let server_cert = CertificateParams::new(vec!["gw.test".to_owned()])
                .unwrap()
                .signed_by(&server_key, &issuer)
                .unwrap();
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut roots = RootCertStore::empty();
            roots.add(ca_der.clone()).unwrap();
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .allow_unauthenticated()
                    .build()
                    .unwrap();
            let mut server = ServerConfig::builder_with_details(provider, Arc::new(FixedTime))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(
                    vec![server_cert.der().clone(), ca_der.clone()],
                    PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
                )
                .unwrap();
            server.alpn_protocols = vec![ALPN.to_vec()];
            TestGateway {
                ca_der,
                issuer,
                server: Arc::new(server),
            }
        }

        /// Issues a client certificate for an SPKI received from a device.
        fn issue(&self, spki: &[u8]) -> CertificateDer<'static> {
            assert_eq!(spki[..P256_SPKI_PREFIX.len()], P256_SPKI_PREFIX);
            let key = RawP256(spki[P256_SPKI_PREFIX.len()..].to_vec());
            let mut params = CertificateParams::default();
            params
                .distinguished_name
                .push(DnType::CommonName, "fleetcast-device-7");
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params.signed_by(&key, &self.issuer).unwrap().der().clone()
        }
    }

    /// Runs a handshake in memory; returns both ends or the first error either side hit.
    fn handshake(
        client_cfg: Arc<ClientConfig>,
        server_cfg: Arc<ServerConfig>,
    ) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
        let name = ServerName::try_from("gw.test").unwrap();
        let mut client = ClientConnection::new(client_cfg, name)?;
        let mut server = ServerConnection::new(server_cfg)?;
        let mut buf = Vec::new();
        for _ in 0..20 {
            buf.clear();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                server.read_tls(&mut rd).unwrap();
            }
            server.process_new_packets()?;
            buf.clear();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
            }
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok((client, server));
            }
        }
        panic!("handshake did not finish in 20 rounds");
    }

    fn config(ca: &[u8], identity: Option<(&CertificateDer<'_>, &DeviceKey)>) -> Arc<ClientConfig> {
        client_config_with_time(ca, identity, Arc::new(FixedTime)).unwrap()
    }

    #[test]
    fn key_pem_round_trip_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        let key = DeviceKey::generate().unwrap();
        key.save_pem(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = DeviceKey::load_pem(&path).unwrap();
        assert_eq!(loaded.spki_der(), key.spki_der());
        // Saving again replaces the file and keeps the mode.
        loaded.save_pem(&path).unwrap();
        assert_eq!(
            DeviceKey::load_pem(&path).unwrap().spki_der(),
            key.spki_der()
        );
        assert!(!dir.path().join("device.key.tmp").exists());
    }

    #[test]
    fn two_generated_keys_differ() {
        let a = DeviceKey::generate().unwrap();
        let b = DeviceKey::generate().unwrap();
        assert_ne!(a.spki_der(), b.spki_der());
        assert_eq!(a.spki_der().len(), 91);
    }

    #[test]
    fn load_refuses_group_readable_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        DeviceKey::generate().unwrap().save_pem(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        match DeviceKey::load_pem(&path) {
            Err(TlsError::InsecurePermissions { mode: 0o640, .. }) => {}
            other => panic!("expected InsecurePermissions, got {other:?}"),
        }
    }

    #[test]
    fn load_rejects_non_key_and_wrong_curve() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.key");
        write_file_atomic(&path, b"not a pem file\n", 0o600).unwrap();
        assert!(matches!(
            DeviceKey::load_pem(&path),
            Err(TlsError::Pem { .. })
        ));
        // A valid PKCS#8 key of another algorithm is refused, naming the file.
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        write_file_atomic(&path, ed.serialize_pem().as_bytes(), 0o600).unwrap();
        match DeviceKey::load_pem(&path) {
            Err(e @ TlsError::InvalidKey { .. }) => {
                assert!(e.to_string().contains("device.key"), "{e}")
            }
            other => panic!("expected InvalidKey, got {other:?}"),
        }
    }

    #[test]
    fn key_provider_loads_only_p256_keys() {
        use rustls::crypto::KeyProvider as _;
        let key = DeviceKey::generate().unwrap();
        let signing = AgentCrypto
            .load_private_key(PrivateKeyDer::Pkcs8(key.pkcs8.clone_key()))
            .unwrap();
        assert_eq!(signing.public_key().unwrap().as_ref(), &key.spki_der()[..]);
        let signer = signing
            .choose_scheme(&[
                rustls::SignatureScheme::ED25519,
                rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
            ])
            .unwrap();
        assert_eq!(
            signer.scheme(),
            rustls::SignatureScheme::ECDSA_NISTP256_SHA256
        );
        let sig = signer.sign(b"transcript").unwrap();
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            key.public,
        )
        .verify(b"transcript", &sig)
        .unwrap();
        assert!(signing
            .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP384_SHA384])
            .is_none());
        for alg in [&rcgen::PKCS_ED25519, &rcgen::PKCS_ECDSA_P384_SHA384] {
            let other = KeyPair::generate_for(alg).unwrap();
            let der = PrivateKeyDer::Pkcs8(other.serialize_der().into());
            assert!(AgentCrypto.load_private_key(der).is_err());
        }
    }

    #[test]
    fn pem_encoding_matches_an_independent_decoder() {
        // Lengths 0..=200 cover every padding case and multi-line output; the decoder in
        // rustls-pki-types is the reference.
        for len in 0..=200usize {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let pem = pem_encode("CERTIFICATE", &der);
            assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
            let parsed = CertificateDer::from_pem_slice(pem.as_bytes());
            if len == 0 {
                // An empty section decodes to an empty body or is refused; never garbage.
                if let Ok(c) = parsed {
                    assert!(c.is_empty());
                }
                continue;
            }
            assert_eq!(parsed.unwrap().as_ref(), &der[..], "len {len}");
        }
        assert_eq!(
            pem_encode("X", b"foobar"),
            "-----BEGIN X-----\nZm9vYmFy\n-----END X-----\n"
        );
        assert_eq!(
            pem_encode("X", b"fo"),
            "-----BEGIN X-----\nZm8=\n-----END X-----\n"
        );
    }

    #[test]
    fn debug_prints_no_key_material() {
        let key = DeviceKey::generate().unwrap();
        let dbg = format!("{key:?}");
        assert!(dbg.starts_with("DeviceKey {"), "{dbg}");
        let secret = key.pkcs8.secret_pkcs8_der();
        // No 8-byte window of the PKCS#8 document appears in hex or as raw bytes.
        for w in secret.windows(8) {
            let hex: String = w.iter().map(|b| format!("{b:02x}")).collect();
            assert!(!dbg.contains(&hex));
        }
        assert!(!dbg.contains("PRIVATE"));
    }

    #[test]
    fn enrol_then_mutual_tls_with_alpn() {
        let gw = TestGateway::new();
        let key = DeviceKey::generate().unwrap();

        // Enrolment connection: no client certificate, server verified.
        let (client, server) = handshake(config(&gw.ca_der, None), gw.server.clone()).unwrap();
        assert!(server.peer_certificates().is_none());
        assert_eq!(client.alpn_protocol(), Some(ALPN));
        assert_eq!(
            client.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        assert_eq!(
            client.negotiated_key_exchange_group().map(|g| g.name()),
            Some(rustls::NamedGroup::secp256r1)
        );

        // The gateway issues a certificate for the SPKI; the agent persists it and reconnects.
        let cert = gw.issue(&key.spki_der());
        let dir = tempfile::tempdir().unwrap();
        save_cert_pem(&dir.path().join("device.pem"), &cert).unwrap();
        let cert = load_cert_pem(&dir.path().join("device.pem")).unwrap();
        let (_, server) =
            handshake(config(&gw.ca_der, Some((&cert, &key))), gw.server.clone()).unwrap();
        let peer = server.peer_certificates().unwrap();
        assert_eq!(peer[0], cert);
        assert_eq!(server.alpn_protocol(), Some(ALPN));
    }

    #[test]
    fn certificate_for_another_key_is_refused_by_config() {
        let gw = TestGateway::new();
        let key = DeviceKey::generate().unwrap();
        let other = DeviceKey::generate().unwrap();
        let cert = gw.issue(&other.spki_der());
        let err = client_config_with_time(&gw.ca_der, Some((&cert, &key)), Arc::new(FixedTime))
            .unwrap_err();
        assert!(matches!(err, TlsError::Config(_)), "{err:?}");
    }

    #[test]
    fn server_of_another_ca_is_rejected() {
        let gw = TestGateway::new();
        let impostor = TestGateway::new();
        let err = handshake(config(&gw.ca_der, None), impostor.server.clone()).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)
                    | rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)
            ),
            "{err:?}"
        );
    }

    #[test]
    fn garbage_ca_is_a_typed_error() {
        assert!(matches!(
            client_config(b"\x30\x03\x02\x01\x00", None),
            Err(TlsError::InvalidCa(_))
        ));
    }

    #[test]
    fn fingerprint_is_sha256_of_der() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            cert_fingerprint_sha256(b"abc")[..4],
            [0xba, 0x78, 0x16, 0xbf]
        );
    }

    #[test]
    fn pinned_enrolment_accepts_only_the_pinned_ca() {
        let gw = TestGateway::new();
        let pin = cert_fingerprint_sha256(&gw.ca_der);
        let cfg = client_config_pinned_with_time(pin, Arc::new(FixedTime)).unwrap();
        let (client, server) = handshake(cfg, gw.server.clone()).unwrap();
        assert!(server.peer_certificates().is_none());
        let ca = pinned_ca(client.peer_certificates().unwrap(), pin).unwrap();
        assert_eq!(ca, gw.ca_der);
        // The saved CA then works for the ordinary configuration.
        handshake(config(&ca, None), gw.server.clone()).unwrap();

        // Another gateway (its own CA in its chain) does not match the pin: a typed error
        // naming both fingerprints.
        let impostor = TestGateway::new();
        let cfg = client_config_pinned_with_time(pin, Arc::new(FixedTime)).unwrap();
        let err = handshake(cfg, impostor.server.clone()).unwrap_err();
        let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) = &err else {
            panic!("{err:?}");
        };
        let mismatch = o.0.downcast_ref::<CaPinMismatch>().expect("a pin mismatch");
        assert_eq!(
            mismatch,
            &CaPinMismatch {
                expected: pin,
                presented: vec![cert_fingerprint_sha256(&impostor.ca_der)],
            }
        );
        let text = mismatch.to_string();
        assert!(
            text.contains(&format!("{:?}", Hex(&pin)))
                && text.contains(&format!(
                    "{:?}",
                    Hex(&cert_fingerprint_sha256(&impostor.ca_der))
                )),
            "{text}"
        );
        // An impostor that sends the genuine CA certificate beside its own server
        // certificate still fails: its certificate is not signed by that CA.
        let mut forged = (*impostor.server).clone();
        let key = KeyPair::generate().unwrap();
        let own = CertificateParams::new(vec!["gw.test".to_owned()])
            .unwrap()
            .signed_by(&key, &impostor.issuer)
            .unwrap();
        forged.cert_resolver = Arc::new(rustls::sign::SingleCertAndKey::from(
            rustls::sign::CertifiedKey::from_der(
                vec![own.der().clone(), gw.ca_der.clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                &rustls::crypto::ring::default_provider(),
            )
            .unwrap(),
        ));
        let cfg = client_config_pinned_with_time(pin, Arc::new(FixedTime)).unwrap();
        let err = handshake(cfg, Arc::new(forged)).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::BadSignature
                        | rustls::CertificateError::UnknownIssuer
                )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let fp: [u8; 32] = core::array::from_fn(|i| (i * 8 + 1) as u8);
        let plain: String = fp.iter().map(|b| format!("{b:02x}")).collect();
        let colons: Vec<String> = fp.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_fingerprint(&plain), Some(fp));
        assert_eq!(
            parse_fingerprint(&format!(" {}\n", colons.join(":"))),
            Some(fp)
        );
        assert_eq!(parse_fingerprint(&plain[..62]), None);
        assert_eq!(parse_fingerprint(&format!("{plain}00")), None);
        assert_eq!(parse_fingerprint(&plain.replace('1', "g")), None);
    }
}
