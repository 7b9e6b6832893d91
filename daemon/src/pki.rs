//! The gateway's own certificate authority and its TLS server configuration.
//!
//! `fleetcastd` creates a CA and a server certificate on first start ([`Pki::load_or_create`])
//! and keeps them in its state directory:
//!
//! | file         | content                                   | mode |
//! |--------------|-------------------------------------------|------|
//! | `ca.pem`     | self-signed CA certificate                | 0644 |
//! | `ca.key`     | CA private key, PKCS#8 PEM                 | 0600 |
//! | `server.pem` | server certificate, signed by the CA      | 0644 |
//! | `server.key` | server private key, PKCS#8 PEM             | 0600 |
//!
//! Enrolment: an agent connects without a client certificate (the server accepts that, see
//! [`Pki::server_config`]; the daemon must treat such a session as enrolment-only), sends its
//! one-time token and the SubjectPublicKeyInfo of a key pair it generated itself, and receives
//! a certificate from [`Pki::issue_device_cert`]. Later sessions use mutual TLS; after the
//! handshake the daemon reads [`device_identity`] from the peer certificate and checks the
//! device id and certificate fingerprint against its store (revocation lives there, not in a
//! CRL). It must do so after every handshake, resumed ones included: a resumed session skips
//! certificate verification and carries the certificate of the session it resumes, so the
//! store check is what makes a revocation take effect at once.
//!
//! Invariants:
//! - The CA is never silently replaced: if one of `ca.pem`/`ca.key` exists without the other,
//!   or they do not match, loading fails with an error naming the file. The server
//!   certificate, in contrast, is re-issued from `server.key` whenever it no longer verifies
//!   against the CA at `now` for every configured server name (expired, names changed,
//!   replaced key), since agents trust the CA, not the server certificate.
//! - Key files are written with mode 0600 through a temporary file and an atomic rename, and
//!   are refused on load when group or others may read them.
//! - No `Debug` output contains private key material.
//! - Crypto is the `ring` provider, chosen explicitly.
//! - Time is an input (`now`); certificate validity during handshakes is checked by rustls
//!   through its `TimeProvider` (the default one reads the system clock inside rustls;
//!   [`Pki::server_config_with_time`] takes another, e.g. virtual time).

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fleetcast_wire::hex;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use ring::rand::{SecureRandom as _, SystemRandom};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ServerConfig, VerifierBuilderError, WebPkiClientVerifier};
use rustls::time_provider::{DefaultTimeProvider, TimeProvider};
use rustls::RootCertStore;

/// SHA-256.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The ALPN protocol name both ends offer.
pub const ALPN: &[u8] = b"fleetcast/1";
/// CA certificate file name inside the state directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// CA private key file name inside the state directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Server certificate file name inside the state directory.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// Server private key file name inside the state directory.
pub const SERVER_KEY_FILE: &str = "server.key";
/// Prefix of the URI subject alternative name that carries the device id.
pub const DEVICE_URI_PREFIX: &str = "fleetcast:device:";

/// Tolerated clock skew: certificates become valid this long before `now`.
const BACKDATE: Duration = Duration::from_secs(24 * 3600);
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
const CA_VALIDITY: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
const SERVER_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const DEVICE_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Longest device name put in a certificate (X.520 `ub-pseudonym` is 128 characters).
const MAX_DEVICE_NAME: usize = 128;

/// DER prefix of an ECDSA P-256 SubjectPublicKeyInfo with an uncompressed point (RFC 5480).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410 §4).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// X.520 pseudonym attribute (2.5.4.65): carries the operator's name for the device.
const OID_PSEUDONYM: [u64; 4] = [2, 5, 4, 65];

/// Errors of the gateway PKI.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file holds no PEM section of the expected kind, or an unusable key.
    #[error("{path}: no valid PEM {expected}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was looked for, e.g. `CERTIFICATE`.
        expected: &'static str,
    },
    /// Half of the CA is missing; the other half is never overwritten.
    #[error(
        "{present} exists but {missing} does not; refusing to create a new CA over part of an \
         existing one (restore {missing}, or remove {present} for a fresh CA, which \
         invalidates every enrolled device)"
    )]
    IncompleteCa {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// A certificate does not belong to the key stored beside it.
    #[error("{cert} does not match the key in {key}")]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A key file is readable or writable by group or others.
    #[error("{path} has mode {mode:03o}; a key file must be private to its owner (chmod 600)")]
    InsecurePermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// There is no CA to read yet.
    #[error(
        "no CA yet: {0} does not exist (fleetcastd creates it on its first start; check \
         --data-dir)"
    )]
    NoCa(PathBuf),
    /// No server name was configured for the server certificate.
    #[error("no server name configured for the gateway certificate")]
    NoServerNames,
    /// A configured server name is neither a DNS name nor an IP address.
    #[error("invalid server name {0:?} (expected a DNS name or an IP address)")]
    InvalidServerName(String),
    /// A device name is empty, too long, or contains control characters.
    #[error("invalid device name (1 to 128 bytes, no control characters)")]
    InvalidDeviceName,
    /// The public key offered at enrolment is not a well-formed ECDSA P-256 or Ed25519
    /// SubjectPublicKeyInfo.
    #[error("unsupported or malformed device public key (expected ECDSA P-256 or Ed25519 SPKI)")]
    UnsupportedPublicKey,
    /// `now` lies before 1970 or too far in the future to encode.
    #[error("time outside the range certificates can encode")]
    TimeOutOfRange,
    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Random,
    /// Certificate or key generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// The client certificate verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(#[from] VerifierBuilderError),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// What the daemon learns from a device's (already verified) client certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceIdentity {
    /// Device id, from the `fleetcast:device:<id>` URI subject alternative name.
    pub id: u64,
    /// SHA-256 of the certificate's DER: what the store records at enrolment.
    pub fingerprint: [u8; 32],
}

/// The gateway CA, the server certificate and the TLS server configuration built on them.
pub struct Pki {
    ca_der: CertificateDer<'static>,
    ca_fingerprint: [u8; 32],
    issuer: Issuer<'static, KeyPair>,
    server_cert: CertificateDer<'static>,
    server_key: PrivatePkcs8KeyDer<'static>,
    server_config: Arc<ServerConfig>,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("ca_fingerprint_sha256", &self.ca_fingerprint_sha256())
            .field("server_cert_sha256", &hex(&sha256(&self.server_cert)))
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Loads the CA and server certificate from `dir`, creating what is missing (the
    /// directory with mode 0700, the CA, the server key and certificate). The server
    /// certificate names every entry of `server_names` (DNS names or IP addresses) and is
    /// re-issued when it does not (see the module invariants).
    pub fn load_or_create(
        dir: &Path,
        server_names: &[String],
        now: SystemTime,
    ) -> Result<Pki, PkiError> {
        if server_names.is_empty() {
            return Err(PkiError::NoServerNames);
        }
        let server_names = server_names
            .iter()
            .map(|n| {
                ServerName::try_from(n.as_str())
                    .map(|s| s.to_owned())
                    .map_err(|_| PkiError::InvalidServerName(n.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        fleetcast_os::create_private_dir(dir).map_err(io_err(dir))?;

        let (ca_der, issuer) = load_or_create_ca(dir, now)?;
        let (server_cert, server_key) =
            load_or_create_server(dir, &ca_der, &issuer, &server_names, now)?;

        let server_config = build_server_config(
            &ca_der,
            &server_cert,
            &server_key,
            Arc::new(DefaultTimeProvider),
        )?;
        Ok(Pki {
            ca_fingerprint: sha256(&ca_der),
            ca_der,
            issuer,
            server_cert,
            server_key,
            server_config,
        })
    }

    /// The fingerprint ([`Pki::ca_fingerprint_sha256`]) of the CA stored in `dir`, read
    /// without creating, checking or re-issuing anything: a print command never writes.
    pub fn read_ca_fingerprint(dir: &Path) -> Result<String, PkiError> {
        let path = dir.join(CA_CERT_FILE);
        if !exists(&path)? {
            return Err(PkiError::NoCa(path));
        }
        Ok(hex(&sha256(&read_cert(&path)?)))
    }

    /// The CA certificate (DER), to hand to agents.
    pub fn ca_cert_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// SHA-256 of the CA certificate's DER, lower-case hex (64 characters), for the operator
    /// to give agents out-of-band.
    pub fn ca_fingerprint_sha256(&self) -> String {
        hex(&self.ca_fingerprint)
    }

    /// The server configuration: ring provider, TLS 1.3 and 1.2, chain = server certificate
    /// and CA certificate, client certificates verified against the CA but optional
    /// (enrolment connections have none), stateless session
    /// resumption with rotating ticket keys, ALPN `fleetcast/1`. It is built once; every
    /// connection must share this `Arc` (and so its ticket keys) for resumption to work.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config.clone()
    }

    /// Builds a new server configuration like [`Pki::server_config`] with an explicit source of
    /// wall time for certificate validity and ticket ages (virtual time in tests). It has its
    /// own ticket keys.
    pub fn server_config_with_time(
        &self,
        time: Arc<dyn TimeProvider>,
    ) -> Result<Arc<ServerConfig>, PkiError> {
        build_server_config(&self.ca_der, &self.server_cert, &self.server_key, time)
    }

    /// Issues a client certificate for a device's public key (DER SubjectPublicKeyInfo, ECDSA
    /// P-256 or Ed25519), signed by the CA: subject `CN=fleetcast-device-<id>` with the device
    /// name as pseudonym, URI SAN `fleetcast:device:<id>`, extended key usage clientAuth,
    /// valid from a day before `now` for ten years, random serial.
    pub fn issue_device_cert(
        &self,
        device_id: u64,
        device_name: &str,
        spki_der: &[u8],
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let key = ForeignPublicKey::from_spki_der(spki_der)?;
        if device_name.is_empty()
            || device_name.len() > MAX_DEVICE_NAME
            || device_name.chars().any(char::is_control)
        {
            return Err(PkiError::InvalidDeviceName);
        }
        let mut params = leaf_params(now, DEVICE_VALIDITY)?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("fleetcast-device-{device_id}"));
        params
            .distinguished_name
            .push(DnType::CustomDnType(OID_PSEUDONYM.to_vec()), device_name);
        params.subject_alt_names = vec![SanType::URI(
            format!("{DEVICE_URI_PREFIX}{device_id}").try_into()?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok(params.signed_by(&key, &self.issuer)?.der().clone())
    }
}

/// Reads the device identity from a client certificate. Call it only on a certificate rustls
/// has verified against the CA (`ServerConnection::peer_certificates()[0]` after the handshake
/// with [`Pki::server_config`]); it checks no signature itself. Returns `None` when the
/// certificate does not parse or does not carry exactly one well-formed
/// `fleetcast:device:<id>` URI.
pub fn device_identity(cert: &CertificateDer<'_>) -> Option<DeviceIdentity> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let mut ids = parsed
        .valid_uri_names()
        .filter_map(|uri| uri.strip_prefix(DEVICE_URI_PREFIX))
        .map(parse_decimal_u64);
    let id = ids.next()??;
    if ids.next().is_some() {
        return None;
    }
    Some(DeviceIdentity {
        id,
        fingerprint: sha256(cert),
    })
}

/// Canonical decimal only: digits, no sign, no leading zero (so one id has one spelling).
fn parse_decimal_u64(s: &str) -> Option<u64> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if canonical {
        s.parse().ok()
    } else {
        None
    }
}

/// A device public key accepted for certification.
struct ForeignPublicKey {
    alg: &'static SignatureAlgorithm,
    /// The BIT STRING contents of the SPKI: the raw public key.
    raw: Vec<u8>,
}

impl ForeignPublicKey {
    /// DER is canonical, so a well-formed SPKI of an accepted algorithm is exactly the fixed
    /// prefix followed by the key; anything else (other curves, RSA, trailing bytes) is refused.
    fn from_spki_der(spki: &[u8]) -> Result<ForeignPublicKey, PkiError> {
        if let Some(point) = spki.strip_prefix(&P256_SPKI_PREFIX[..]) {
            // SEC 1 §2.3.3 uncompressed point, and on the curve: ring validates the peer point
            // of a key agreement (SEC 1 §3.2.2), which is cheaper than writing that check here.
            if point.len() != 65 || point[0] != 0x04 || !p256_point_is_valid(point)? {
                return Err(PkiError::UnsupportedPublicKey);
            }
            return Ok(ForeignPublicKey {
                alg: &rcgen::PKCS_ECDSA_P256_SHA256,
                raw: point.to_vec(),
            });
        }
        if let Some(key) = spki.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
            if key.len() != 32 {
                return Err(PkiError::UnsupportedPublicKey);
            }
            return Ok(ForeignPublicKey {
                alg: &rcgen::PKCS_ED25519,
                raw: key.to_vec(),
            });
        }
        Err(PkiError::UnsupportedPublicKey)
    }
}

impl PublicKeyData for ForeignPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

fn p256_point_is_valid(point: &[u8]) -> Result<bool, PkiError> {
    use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, ECDH_P256};
    let ours = EphemeralPrivateKey::generate(&ECDH_P256, &SystemRandom::new())
        .map_err(|_| PkiError::Random)?;
    Ok(agree_ephemeral(ours, &UnparsedPublicKey::new(&ECDH_P256, point), |_| ()).is_ok())
}

/// The CA's certificate parameters. The subject is derived from the CA key alone, so the
/// issuer can be rebuilt from `ca.key` on every start (checked against `ca.pem` on load).
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "fleetcast");
    // A per-gateway name, so two gateways' CAs never share a subject.
    let id = hex(&sha256(&key.subject_public_key_info())[..8]);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("fleetcast gateway CA {id}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Parameters shared by certificates the CA issues: validity, random serial, key usage, AKI.
fn leaf_params(now: SystemTime, validity: Duration) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    set_validity(&mut params, now, validity)?;
    params.serial_number = Some(random_serial()?);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn set_validity(
    params: &mut CertificateParams,
    now: SystemTime,
    validity: Duration,
) -> Result<(), PkiError> {
    let to_time = |t: SystemTime| -> Result<time::OffsetDateTime, PkiError> {
        let secs = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| PkiError::TimeOutOfRange)?
            .as_secs();
        let secs = i64::try_from(secs).map_err(|_| PkiError::TimeOutOfRange)?;
        time::OffsetDateTime::from_unix_timestamp(secs).map_err(|_| PkiError::TimeOutOfRange)
    };
    let start = now.checked_sub(BACKDATE).ok_or(PkiError::TimeOutOfRange)?;
    let end = now.checked_add(validity).ok_or(PkiError::TimeOutOfRange)?;
    params.not_before = to_time(start)?;
    params.not_after = to_time(end)?;
    Ok(())
}

/// 16 random bytes, positive (RFC 5280 §4.1.2.2: positive, at most 20 octets) and non-zero.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn load_or_create_ca(
    dir: &Path,
    now: SystemTime,
) -> Result<(CertificateDer<'static>, Issuer<'static, KeyPair>), PkiError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    match (exists(&cert_path)?, exists(&key_path)?) {
        (false, false) => {
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = ca_params(&key);
            set_validity(&mut params, now, CA_VALIDITY)?;
            params.serial_number = Some(random_serial()?);
            let cert = params.self_signed(&key)?.der().clone();
            // Key first: a crash in between leaves a key without a certificate, which the next
            // start reports instead of silently minting a second CA.
            write_file_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_file_atomic(
                &cert_path,
                pem_encode("CERTIFICATE", &cert).as_bytes(),
                0o644,
            )?;
            Ok((cert, Issuer::new(ca_params(&key), key)))
        }
        (true, true) => {
            let cert = read_cert(&cert_path)?;
            let key = read_key(&key_path)?;
            let parsed = webpki::EndEntityCert::try_from(&cert).map_err(|_| PkiError::Pem {
                path: cert_path.clone(),
                expected: "CERTIFICATE",
            })?;
            let mismatch = || PkiError::KeyMismatch {
                cert: cert_path.clone(),
                key: key_path.clone(),
            };
            if parsed.subject_public_key_info().as_ref() != key.subject_public_key_info() {
                return Err(mismatch());
            }
            let issuer = Issuer::new(ca_params(&key), key);
            // The rebuilt issuer must name the CA exactly as ca.pem does, or every certificate
            // it signs would fail path building: sign a throwaway and compare the names.
            let probe_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let probe = leaf_params(now, YEAR)?.signed_by(&probe_key, &issuer)?;
            let probe_parsed = webpki::EndEntityCert::try_from(probe.der())
                .map_err(|_| PkiError::Generate(rcgen::Error::CouldNotParseCertificate))?;
            if probe_parsed.issuer() != parsed.subject() {
                return Err(mismatch());
            }
            Ok((cert, issuer))
        }
        (true, false) => Err(PkiError::IncompleteCa {
            present: cert_path,
            missing: key_path,
        }),
        (false, true) => Err(PkiError::IncompleteCa {
            present: key_path,
            missing: cert_path,
        }),
    }
}

fn load_or_create_server(
    dir: &Path,
    ca_der: &CertificateDer<'static>,
    issuer: &Issuer<'static, KeyPair>,
    names: &[ServerName<'static>],
    now: SystemTime,
) -> Result<(CertificateDer<'static>, PrivatePkcs8KeyDer<'static>), PkiError> {
    let cert_path = dir.join(SERVER_CERT_FILE);
    let key_path = dir.join(SERVER_KEY_FILE);
    let key = if exists(&key_path)? {
        read_key(&key_path)?
    } else {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        write_file_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        key
    };
    let pkcs8 = PrivatePkcs8KeyDer::from(key.serialize_der());
    if exists(&cert_path)? {
        let cert = read_cert(&cert_path)?;
        match server_cert_problem(&cert, &key, ca_der, names, now) {
            None => return Ok((cert, pkcs8)),
            Some(reason) => tracing::info!(
                path = %cert_path.display(),
                %reason,
                "re-issuing the server certificate"
            ),
        }
    }
    let mut params = leaf_params(now, SERVER_VALIDITY)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "fleetcast gateway");
    params.subject_alt_names = names
        .iter()
        .map(|name| match name {
            ServerName::IpAddress(ip) => Ok(SanType::IpAddress(std::net::IpAddr::from(*ip))),
            other => Ok(SanType::DnsName(other.to_str().into_owned().try_into()?)),
        })
        .collect::<Result<Vec<_>, PkiError>>()?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, issuer)?.der().clone();
    write_file_atomic(
        &cert_path,
        pem_encode("CERTIFICATE", &cert).as_bytes(),
        0o644,
    )?;
    Ok((cert, pkcs8))
}

/// Why an existing server certificate cannot be kept, or `None` if it can.
fn server_cert_problem(
    cert: &CertificateDer<'_>,
    key: &KeyPair,
    ca_der: &CertificateDer<'static>,
    names: &[ServerName<'static>],
    now: SystemTime,
) -> Option<String> {
    let parsed = match webpki::EndEntityCert::try_from(cert) {
        Ok(p) => p,
        Err(e) => return Some(format!("unparsable: {e}")),
    };
    if parsed.subject_public_key_info().as_ref() != key.subject_public_key_info() {
        return Some("does not match server.key".to_owned());
    }
    let Ok(since_epoch) = now.duration_since(SystemTime::UNIX_EPOCH) else {
        return Some("time before 1970".to_owned());
    };
    let mut roots = RootCertStore::empty();
    if let Err(e) = roots.add(ca_der.clone()) {
        return Some(format!("CA unusable: {e}"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        match WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build() {
            Ok(v) => v,
            Err(e) => return Some(format!("verifier: {e}")),
        };
    use rustls::client::danger::ServerCertVerifier as _;
    for name in names {
        if let Err(e) = verifier.verify_server_cert(
            cert,
            &[],
            name,
            &[],
            UnixTime::since_unix_epoch(since_epoch),
        ) {
            use rustls::CertificateError as C;
            // rustls's own text of these two shows Rust debug output (`IpAddress(..)`).
            let why = match e {
                rustls::Error::InvalidCertificate(
                    C::NotValidForName | C::NotValidForNameContext { .. },
                ) => "the name is not in it".to_owned(),
                rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
                    "expired".to_owned()
                }
                other => other.to_string(),
            };
            return Some(format!("not valid for {}: {why}", name.to_str()));
        }
    }
    None
}

fn build_server_config(
    ca_der: &CertificateDer<'static>,
    server_cert: &CertificateDer<'static>,
    server_key: &PrivatePkcs8KeyDer<'static>,
    time: Arc<dyn TimeProvider>,
) -> Result<Arc<ServerConfig>, PkiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.clone())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder_with_details(provider, time)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        // The CA travels in the chain so an agent given only the CA's fingerprint can
        // verify the server and keep the CA (`fleetcast_agent::tls::client_config_pinned`).
        .with_single_cert(
            vec![server_cert.clone(), ca_der.clone()],
            PrivateKeyDer::Pkcs8(server_key.clone_key()),
        )?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // Stateless resumption: tickets encrypted under keys rotated every 6 hours.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(Arc::new(config))
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists().map_err(io_err(path))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError {
    let path = path.to_owned();
    move |source| PkiError::Io { path, source }
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    CertificateDer::from_pem_slice(&bytes).map_err(|_| PkiError::Pem {
        path: path.to_owned(),
        expected: "CERTIFICATE",
    })
}

fn read_key(path: &Path) -> Result<KeyPair, PkiError> {
    let mode = fs::metadata(path)
        .map_err(io_err(path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(PkiError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let bytes = fs::read(path).map_err(io_err(path))?;
    let pem_err = || PkiError::Pem {
        path: path.to_owned(),
        expected: "PRIVATE KEY (PKCS#8)",
    };
    let pkcs8 = PrivatePkcs8KeyDer::from_pem_slice(&bytes).map_err(|_| pem_err())?;
    KeyPair::try_from(&pkcs8).map_err(|_| pem_err())
}

/// Replaces `path` with `bytes` (mode `mode`) atomically and durably
/// ([`fleetcast_os::write_atomic`]), so a crash leaves either no file or the complete one.
fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    fleetcast_os::write_atomic(path, bytes, mode).map_err(io_err(path))
}

/// RFC 7468 PEM: base64 (RFC 4648 §4, padded) in 64-column lines.
fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            b64.push(if i <= n {
                ALPHABET[((v >> (18 - 6 * i)) & 0x3f) as usize]
            } else {
                b'='
            });
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.extend(line.iter().map(|&c| char::from(c)));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_agent::tls::{client_config_with_time, DeviceKey};
    use rustls::client::ClientConfig;
    use rustls::{ClientConnection, HandshakeKind, ServerConnection};

    /// 2026-06-01T00:00:00Z: the virtual wall time certificates are issued at.
    const T0: u64 = 1_780_272_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// Virtual wall time for rustls: an hour after issuance.
    #[derive(Debug)]
    struct FixedTime;
    impl TimeProvider for FixedTime {
        fn current_time(&self) -> Option<UnixTime> {
            Some(UnixTime::since_unix_epoch(Duration::from_secs(T0 + 3600)))
        }
    }

    fn names() -> Vec<String> {
        vec!["gw.test".to_owned(), "127.0.0.1".to_owned()]
    }

    fn pki(dir: &Path) -> Pki {
        Pki::load_or_create(dir, &names(), at(T0)).unwrap()
    }

    fn gateway(pki: &Pki) -> Arc<ServerConfig> {
        pki.server_config_with_time(Arc::new(FixedTime)).unwrap()
    }

    fn agent(pki: &Pki, identity: Option<(&CertificateDer<'_>, &DeviceKey)>) -> Arc<ClientConfig> {
        client_config_with_time(pki.ca_cert_der(), identity, Arc::new(FixedTime)).unwrap()
    }

    /// Moves every pending TLS record from one connection to the other.
    macro_rules! pump {
        ($from:expr => $to:expr) => {{
            let mut buf = Vec::new();
            while $from.wants_write() {
                $from.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                $to.read_tls(&mut rd).unwrap();
            }
        }};
    }

    /// Runs a handshake in memory (no sockets), then delivers the post-handshake messages
    /// (TLS 1.3 session tickets). Returns the first error either side reports.
    fn handshake(
        client_cfg: Arc<ClientConfig>,
        server_cfg: Arc<ServerConfig>,
        name: &str,
    ) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let mut client = ClientConnection::new(client_cfg, name)?;
        let mut server = ServerConnection::new(server_cfg)?;
        for _ in 0..10 {
            pump!(client => server);
            server.process_new_packets()?;
            pump!(server => client);
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() && !server.wants_write() {
                return Ok((client, server));
            }
        }
        panic!("handshake did not finish in 10 rounds");
    }

    #[test]
    fn load_or_create_persists_and_protects_keys() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = pki(&state);
        let dir_mode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        for (file, mode) in [
            (CA_CERT_FILE, 0o644),
            (CA_KEY_FILE, 0o600),
            (SERVER_CERT_FILE, 0o644),
            (SERVER_KEY_FILE, 0o600),
        ] {
            let m = fs::metadata(state.join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(m, mode, "{file}");
        }
        // A day later, a second start loads the same CA and keeps the server certificate.
        let second = Pki::load_or_create(&state, &names(), at(T0 + 86_400)).unwrap();
        assert_eq!(first.ca_cert_der(), second.ca_cert_der());
        assert_eq!(first.server_cert, second.server_cert);
        assert_eq!(
            first.ca_fingerprint_sha256(),
            second.ca_fingerprint_sha256()
        );
        assert_eq!(
            first.ca_fingerprint_sha256(),
            hex(&fleetcast_agent::tls::cert_fingerprint_sha256(
                first.ca_cert_der()
            ))
        );
        assert_eq!(first.ca_fingerprint_sha256().len(), 64);
        // Another directory is another CA.
        let other = pki(&dir.path().join("other"));
        assert_ne!(first.ca_cert_der(), other.ca_cert_der());
    }

    #[test]
    fn reading_the_fingerprint_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let e = Pki::read_ca_fingerprint(&state).unwrap_err();
        assert!(matches!(e, PkiError::NoCa(_)), "{e}");
        assert!(e.to_string().contains("no CA yet"), "{e}");
        assert!(!state.exists(), "the read created the directory");
        let p = pki(&state);
        assert_eq!(
            Pki::read_ca_fingerprint(&state).unwrap(),
            p.ca_fingerprint_sha256()
        );
    }

    #[test]
    fn enrolment_connection_has_no_peer_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let (client, server) = handshake(agent(&pki, None), gateway(&pki), "gw.test").unwrap();
        assert!(server.peer_certificates().is_none());
        assert_eq!(client.alpn_protocol(), Some(ALPN));
        assert_eq!(server.alpn_protocol(), Some(ALPN));
        assert_eq!(
            client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        // The IP address the certificate names works too.
        handshake(agent(&pki, None), gateway(&pki), "127.0.0.1").unwrap();
    }

    #[test]
    fn enrolled_device_authenticates_and_is_identified() {
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::generate().unwrap();
        let cert = {
            let pki = pki(dir.path());
            pki.issue_device_cert(42, "pump-house-3", &key.spki_der(), at(T0))
                .unwrap()
        };
        // The daemon restarted: the reloaded CA verifies what the first run issued, and issues
        // certificates that verify too.
        let pki = pki(dir.path());
        let (_, server) =
            handshake(agent(&pki, Some((&cert, &key))), gateway(&pki), "gw.test").unwrap();
        let peer = server.peer_certificates().unwrap();
        let id = device_identity(&peer[0]).unwrap();
        assert_eq!(id.id, 42);
        assert_eq!(
            id.fingerprint,
            fleetcast_agent::tls::cert_fingerprint_sha256(&cert)
        );

        let key2 = DeviceKey::generate().unwrap();
        let cert2 = pki
            .issue_device_cert(u64::MAX, "edge", &key2.spki_der(), at(T0))
            .unwrap();
        let (_, server) =
            handshake(agent(&pki, Some((&cert2, &key2))), gateway(&pki), "gw.test").unwrap();
        let id2 = device_identity(&server.peer_certificates().unwrap()[0]).unwrap();
        assert_eq!(id2.id, u64::MAX);
        assert_ne!(id2.fingerprint, id.fingerprint);
    }

    #[test]
    fn ed25519_device_key_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = pki
            .issue_device_cert(7, "ed", &key.subject_public_key_info(), at(T0))
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca_cert_der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client = ClientConfig::builder_with_details(provider, Arc::new(FixedTime))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![cert.clone()],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        client.alpn_protocols = vec![ALPN.to_vec()];
        let (_, server) = handshake(Arc::new(client), gateway(&pki), "gw.test").unwrap();
        let id = device_identity(&server.peer_certificates().unwrap()[0]).unwrap();
        assert_eq!(id.id, 7);
    }

    #[test]
    fn client_certificate_from_another_ca_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(&dir.path().join("a"));
        let rogue = Pki::load_or_create(&dir.path().join("b"), &names(), at(T0)).unwrap();
        let key = DeviceKey::generate().unwrap();
        let cert = rogue
            .issue_device_cert(42, "impostor", &key.spki_der(), at(T0))
            .unwrap();
        // The agent trusts the real gateway, but presents a certificate from the rogue CA.
        let err = handshake(agent(&pki, Some((&cert, &key))), gateway(&pki), "gw.test")
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                        | rustls::CertificateError::BadSignature
                )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn server_of_another_ca_fails_verification() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(&dir.path().join("a"));
        let rogue = Pki::load_or_create(&dir.path().join("b"), &names(), at(T0)).unwrap();
        let err = handshake(agent(&pki, None), gateway(&rogue), "gw.test")
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                        | rustls::CertificateError::BadSignature
                )
            ),
            "{err:?}"
        );
        // And a name the certificate does not carry is refused.
        let err = handshake(agent(&pki, None), gateway(&pki), "other.test")
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. }
                )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn second_connection_resumes_and_keeps_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let key = DeviceKey::generate().unwrap();
        let cert = pki
            .issue_device_cert(9, "resumer", &key.spki_der(), at(T0))
            .unwrap();
        let client = agent(&pki, Some((&cert, &key)));
        let server = gateway(&pki);
        let (c1, _) = handshake(client.clone(), server.clone(), "gw.test").unwrap();
        assert_eq!(c1.handshake_kind(), Some(HandshakeKind::Full));
        let (c2, s2) = handshake(client, server, "gw.test").unwrap();
        assert_eq!(c2.handshake_kind(), Some(HandshakeKind::Resumed));
        assert_eq!(s2.handshake_kind(), Some(HandshakeKind::Resumed));
        // The resumed session still carries the device's certificate.
        let id = device_identity(&s2.peer_certificates().unwrap()[0]).unwrap();
        assert_eq!(id.id, 9);
        // A server with other ticket keys cannot resume the session: full handshake.
        let (c3, _) = handshake(
            agent(&pki, Some((&cert, &key))),
            pki.server_config_with_time(Arc::new(FixedTime)).unwrap(),
            "gw.test",
        )
        .unwrap();
        assert_eq!(c3.handshake_kind(), Some(HandshakeKind::Full));
    }

    #[test]
    fn the_production_config_shares_ticket_keys() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        assert!(Arc::ptr_eq(&pki.server_config(), &pki.server_config()));
        assert!(pki.server_config().ticketer.enabled());
        assert_eq!(pki.server_config().alpn_protocols, vec![ALPN.to_vec()]);
    }

    #[test]
    fn unsupported_public_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let good = DeviceKey::generate().unwrap().spki_der();
        let mut off_curve = good.clone();
        off_curve[90] ^= 1; // the point's last byte: almost surely no longer on the curve
        let mut trailing = good.clone();
        trailing.push(0);
        let mut compressed = good.clone();
        compressed[26] = 0x02;
        for (what, spki) in [
            ("empty", Vec::new()),
            ("garbage", b"not a key".to_vec()),
            ("P-384", p384.subject_public_key_info()),
            ("off-curve", off_curve),
            ("trailing", trailing),
            ("compressed tag", compressed),
            ("truncated", good[..60].to_vec()),
        ] {
            assert!(
                matches!(
                    pki.issue_device_cert(1, "x", &spki, at(T0)),
                    Err(PkiError::UnsupportedPublicKey)
                ),
                "{what}"
            );
        }
        for name in ["", "a\nb", &"x".repeat(129)] {
            assert!(matches!(
                pki.issue_device_cert(1, name, &good, at(T0)),
                Err(PkiError::InvalidDeviceName)
            ));
        }
        assert!(pki
            .issue_device_cert(1, "ünïcode ok", &good, at(T0))
            .is_ok());
    }

    #[test]
    fn device_identity_needs_exactly_one_canonical_device_uri() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        // The server certificate names no device.
        assert_eq!(device_identity(&pki.server_cert), None);
        assert_eq!(
            device_identity(&CertificateDer::from(vec![0x30, 0x00])),
            None
        );
        let key = KeyPair::generate().unwrap();
        let with_uris = |uris: &[&str]| {
            let mut params = leaf_params(at(T0), YEAR).unwrap();
            params.subject_alt_names = uris
                .iter()
                .map(|u| SanType::URI((*u).try_into().unwrap()))
                .collect();
            params.signed_by(&key, &pki.issuer).unwrap().der().clone()
        };
        assert_eq!(
            device_identity(&with_uris(&["https://x.test/", "fleetcast:device:0"])).map(|i| i.id),
            Some(0)
        );
        for bad in [
            &["fleetcast:device:1", "fleetcast:device:2"][..],
            &["fleetcast:device:01"],
            &["fleetcast:device:+1"],
            &["fleetcast:device:"],
            &["fleetcast:device:18446744073709551616"],
            &["fleetcast:device:1x"],
        ] {
            assert_eq!(device_identity(&with_uris(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn changed_server_names_reissue_the_server_certificate_only() {
        let dir = tempfile::tempdir().unwrap();
        let first = pki(dir.path());
        let names2 = vec!["gw2.test".to_owned()];
        let second = Pki::load_or_create(dir.path(), &names2, at(T0)).unwrap();
        assert_eq!(first.ca_cert_der(), second.ca_cert_der());
        assert_ne!(first.server_cert, second.server_cert);
        handshake(agent(&second, None), gateway(&second), "gw2.test").unwrap();
        // Expired at `now`: re-issued as well.
        let later = at(T0 + 11 * 365 * 86_400);
        let third = Pki::load_or_create(dir.path(), &names2, later).unwrap();
        assert_ne!(second.server_cert, third.server_cert);
        assert_eq!(first.ca_cert_der(), third.ca_cert_der());
        // Unchanged: kept.
        let fourth = Pki::load_or_create(dir.path(), &names2, later).unwrap();
        assert_eq!(third.server_cert, fourth.server_cert);
    }

    #[test]
    fn broken_state_is_reported_with_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        pki(d);

        // Insecure key permissions.
        fs::set_permissions(d.join(CA_KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        match Pki::load_or_create(d, &names(), at(T0)) {
            Err(e @ PkiError::InsecurePermissions { mode: 0o644, .. }) => {
                assert!(e.to_string().contains("ca.key"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        fs::set_permissions(d.join(CA_KEY_FILE), fs::Permissions::from_mode(0o600)).unwrap();

        // Corrupt certificate.
        let good_ca = fs::read(d.join(CA_CERT_FILE)).unwrap();
        fs::write(d.join(CA_CERT_FILE), b"-----BEGIN NOTHING-----\n").unwrap();
        match Pki::load_or_create(d, &names(), at(T0)) {
            Err(e @ PkiError::Pem { .. }) => assert!(e.to_string().contains("ca.pem"), "{e}"),
            other => panic!("{other:?}"),
        }

        // CA certificate of another CA beside our key.
        let other = tempfile::tempdir().unwrap();
        pki(other.path());
        fs::copy(other.path().join(CA_CERT_FILE), d.join(CA_CERT_FILE)).unwrap();
        assert!(matches!(
            Pki::load_or_create(d, &names(), at(T0)),
            Err(PkiError::KeyMismatch { .. })
        ));
        fs::write(d.join(CA_CERT_FILE), &good_ca).unwrap();

        // Half a CA is never completed by minting a new one.
        fs::remove_file(d.join(CA_KEY_FILE)).unwrap();
        match Pki::load_or_create(d, &names(), at(T0)) {
            Err(e @ PkiError::IncompleteCa { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.starts_with(&format!("{}", d.join("ca.pem").display())),
                    "{msg}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fs::read(d.join(CA_CERT_FILE)).unwrap(), good_ca);

        assert!(matches!(
            Pki::load_or_create(d, &[], at(T0)),
            Err(PkiError::NoServerNames)
        ));
        assert!(matches!(
            Pki::load_or_create(d, &["not a name!".to_owned()], at(T0)),
            Err(PkiError::InvalidServerName(_))
        ));
    }

    #[test]
    fn replaced_server_key_gets_a_matching_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let first = pki(dir.path());
        let new_key = KeyPair::generate().unwrap();
        write_file_atomic(
            &dir.path().join(SERVER_KEY_FILE),
            new_key.serialize_pem().as_bytes(),
            0o600,
        )
        .unwrap();
        let second = pki(dir.path());
        assert_ne!(first.server_cert, second.server_cert);
        handshake(agent(&second, None), gateway(&second), "gw.test").unwrap();
    }

    #[test]
    fn debug_prints_no_key_material() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let dbg = format!("{pki:?}");
        assert!(dbg.contains(&pki.ca_fingerprint_sha256()), "{dbg}");
        for secret in [
            pki.server_key.secret_pkcs8_der().to_vec(),
            pki.issuer.key().serialize_der(),
        ] {
            for w in secret.windows(8) {
                assert!(!dbg.contains(&hex(w)));
            }
        }
        assert!(!dbg.contains("PRIVATE"));
    }

    #[test]
    fn pem_encoding_round_trips() {
        for len in 1..=150usize {
            let der: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let pem = pem_encode("CERTIFICATE", &der);
            let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(back.as_ref(), &der[..]);
        }
    }

    #[test]
    fn enrolment_with_only_the_ca_fingerprint() {
        use fleetcast_agent::tls::{client_config_pinned_with_time, parse_fingerprint, pinned_ca};
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        // The operator reads the fingerprint off the gateway and types it into the device.
        let pin = parse_fingerprint(&pki.ca_fingerprint_sha256()).unwrap();
        let cfg = client_config_pinned_with_time(pin, Arc::new(FixedTime)).unwrap();
        let (client, server) = handshake(cfg, gateway(&pki), "gw.test").unwrap();
        assert!(server.peer_certificates().is_none());
        let ca = pinned_ca(client.peer_certificates().unwrap(), pin).unwrap();
        assert_eq!(&ca, pki.ca_cert_der());
        // Enrolment over that session, then mutual TLS with the saved CA.
        let key = DeviceKey::generate().unwrap();
        let cert = pki
            .issue_device_cert(5, "pinned", &key.spki_der(), at(T0))
            .unwrap();
        let cfg = client_config_with_time(&ca, Some((&cert, &key)), Arc::new(FixedTime)).unwrap();
        let (_, server) = handshake(cfg, gateway(&pki), "gw.test").unwrap();
        assert_eq!(
            device_identity(&server.peer_certificates().unwrap()[0]).map(|i| i.id),
            Some(5)
        );
    }

    #[test]
    fn tls12_client_authenticates_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path());
        let key = KeyPair::generate().unwrap();
        let cert = pki
            .issue_device_cert(12, "old-stack", &key.subject_public_key_info(), at(T0))
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(pki.ca_cert_der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = ClientConfig::builder_with_details(provider, Arc::new(FixedTime))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
            .unwrap();
        let client = Arc::new(client);
        let server = gateway(&pki);
        let (c1, s1) = handshake(client.clone(), server.clone(), "gw.test").unwrap();
        assert_eq!(
            c1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        assert_eq!(
            device_identity(&s1.peer_certificates().unwrap()[0]).map(|i| i.id),
            Some(12)
        );
        let (c2, s2) = handshake(client, server, "gw.test").unwrap();
        assert_eq!(c2.handshake_kind(), Some(HandshakeKind::Resumed));
        assert_eq!(
            device_identity(&s2.peer_certificates().unwrap()[0]).map(|i| i.id),
            Some(12)
        );
    }
}
