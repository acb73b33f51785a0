//! Certificates and revocations, signed by central's key (the root of trust) and carried as
//! compact tokens: `fmc1.<payload>.<signature>` and `fmr1.…` (base64url; the signature is over a
//! domain-separated message and checked with `verify_strict`).

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use fieldmesh_fhir_docs::openimis::Role;
use serde::{Deserialize, Serialize};

use crate::{PublicKey, TrustError, parse_key};

/// Domain separator of certificate signatures.
pub const CERTIFICATE_DOMAIN: &[u8] = b"fieldmesh/certificate/v1\0";
/// Domain separator of revocation signatures.
pub const REVOCATION_DOMAIN: &[u8] = b"fieldmesh/revocation/v1\0";

/// A certificate: what central vouches for about a device key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// Serial (a UUID).
    pub serial: String,
    /// The device key (hex).
    pub subject: String,
    /// The user it is issued to (Practitioner code or id).
    pub user: String,
    /// Roles.
    pub roles: Vec<Role>,
    /// Villages (Location UUIDs or codes) an enrolment officer works in.
    #[serde(default)]
    pub locations: Vec<String>,
    /// Facilities (Organization UUIDs or codes) a claim administrator works at.
    #[serde(default)]
    pub facilities: Vec<String>,
    /// Valid from (Unix seconds, inclusive).
    pub not_before: i64,
    /// Valid until (Unix seconds, exclusive).
    pub not_after: i64,
}

impl Certificate {
    /// The subject key.
    pub fn subject_key(&self) -> Result<PublicKey, TrustError> {
        parse_key(&self.subject)
    }

    /// Where the certificate lets its holder write: every location and facility.
    pub fn scope(&self) -> Vec<String> {
        self.locations
            .iter()
            .chain(&self.facilities)
            .cloned()
            .collect()
    }
}

/// A document's changes by a revoked key that central held when it revoked the key: the last
/// of them (its ancestors are the others).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vouched {
    /// The document id.
    pub doc: String,
    /// The hash of the key's last change central held in it (hex).
    pub head: String,
}

/// A revocation: central withdraws a device key's certificates.
///
/// Once a node holds it, a change by the key is accepted only if central vouched for it: if it
/// is one of the changes central held when it revoked the key (`vouched`), whatever the key
/// claims about its clock or the revocations it had seen. Everything else the key made (before
/// or after, on a stolen phone) stays in quarantine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Number, 1, 2, 3… in the order central issued them.
    pub number: u32,
    /// The revoked key (hex).
    pub subject: String,
    /// Why, in words.
    pub reason: String,
    /// When central issued it (Unix seconds; informational).
    pub issued: i64,
    /// The key's changes central held, per document.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vouched: Vec<Vouched>,
}

pub(crate) const B64: base64::engine::GeneralPurpose =
    base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn seal(root: &SigningKey, prefix: &str, domain: &[u8], payload: &[u8]) -> String {
    let mut message = domain.to_vec();
    message.extend_from_slice(payload);
    let sig = root.sign(&message).to_bytes();
    format!("{prefix}.{}.{}", B64.encode(payload), B64.encode(sig))
}

fn open(
    root: &PublicKey,
    token: &str,
    prefix: &str,
    domain: &[u8],
    what: &'static str,
) -> Result<Vec<u8>, TrustError> {
    let mut parts = token.trim().split('.');
    let (Some(p), Some(payload), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TrustError::Malformed(what));
    };
    if p != prefix {
        return Err(TrustError::Malformed(what));
    }
    let payload = B64
        .decode(payload)
        .map_err(|_| TrustError::Malformed(what))?;
    let sig: [u8; 64] = B64
        .decode(sig)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or(TrustError::Malformed(what))?;
    let key = VerifyingKey::from_bytes(root).map_err(|_| TrustError::NotSignedByRoot(what))?;
    let mut message = domain.to_vec();
    message.extend_from_slice(&payload);
    key.verify_strict(&message, &Signature::from_bytes(&sig))
        .map_err(|_| TrustError::NotSignedByRoot(what))?;
    Ok(payload)
}

/// Signs a certificate with the root key.
pub fn issue_certificate(root: &SigningKey, cert: &Certificate) -> String {
    let payload = serde_json::to_vec(cert).unwrap_or_default();
    seal(root, "fmc1", CERTIFICATE_DOMAIN, &payload)
}

/// Signs a revocation with the root key.
pub fn issue_revocation(root: &SigningKey, rev: &Revocation) -> String {
    let payload = serde_json::to_vec(rev).unwrap_or_default();
    seal(root, "fmr1", REVOCATION_DOMAIN, &payload)
}

/// Checks a certificate token against the root and reads it.
pub fn verify_certificate(root: &PublicKey, token: &str) -> Result<Certificate, TrustError> {
    let payload = open(root, token, "fmc1", CERTIFICATE_DOMAIN, "certificate")?;
    let cert: Certificate =
        serde_json::from_slice(&payload).map_err(|_| TrustError::Malformed("certificate"))?;
    cert.subject_key()?;
    Ok(cert)
}

/// Checks a revocation token against the root and reads it.
pub fn verify_revocation(root: &PublicKey, token: &str) -> Result<Revocation, TrustError> {
    let payload = open(root, token, "fmr1", REVOCATION_DOMAIN, "revocation")?;
    let rev: Revocation =
        serde_json::from_slice(&payload).map_err(|_| TrustError::Malformed("revocation"))?;
    parse_key(&rev.subject)?;
    if rev.number == 0 {
        return Err(TrustError::Malformed("revocation"));
    }
    Ok(rev)
}
