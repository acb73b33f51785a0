//! Trust: certificates issued by central, signed change envelopes, the capability matrix, and the
//! decision every node takes alike on every change it receives.
//!
//! # Keys and envelopes
//!
//! A node's ed25519 key is its libp2p identity and, as the Automerge actor id, the author of every
//! change it makes. Each change travels with an [`Envelope`]: the change hash, the number of
//! revocations its author had seen, and the author's signature over both, domain-separated by
//! [`CHANGE_DOMAIN`]. The change hash covers the whole change (actor, sequence number, time,
//! dependencies, operations), so the signature covers it too. Signatures are checked with
//! `verify_strict` (no malleable or small-order encodings).
//!
//! # Certificates and revocations
//!
//! Central's key is the root of trust. A [`Certificate`] (subject key, user, roles, scope, validity)
//! and a [`Revocation`] are JSON payloads signed by the root, carried as compact tokens
//! (`fmc1.<payload>.<signature>`, `fmr1.…`, base64url) inside `Basic` resources that sync like any
//! other document ([`certificate_resource`]). Revocations are numbered 1, 2, 3… by central.
//!
//! Why not `biscuit-auth`: biscuit's strengths are attenuation by the holder and Datalog
//! policies. Here the policy is a fixed matrix ([`Capability`], [`Role::grants`]) that every node
//! must evaluate identically, and verification must not depend on an authorizer's clock. A biscuit
//! would add a Datalog engine and protobuf to the phone build for one signature check per
//! certificate. A certificate here is one `verify_strict` and a small serde struct.
//!
//! # The decision ([`Trust::decide`])
//!
//! A received change is applied only if, in this order:
//! 1. it has an envelope whose signature by its author verifies ([`Rejection::Unsigned`],
//!    [`Rejection::BadSignature`]);
//! 2. none of its dependencies was rejected ([`Rejection::DependsOnRejected`]);
//! 3. its author is the root or holds a certificate that was valid at the change's time
//!    ([`Rejection::UnknownKey`], [`Rejection::NotYetValid`], [`Rejection::Expired`]) and that no
//!    revocation among those the author had seen revokes ([`Rejection::Revoked`]); the node must
//!    hold every revocation the author had seen ([`Rejection::MissingRevocations`]);
//! 4. a role of the certificate grants the capability the resource type needs
//!    ([`Rejection::NotPermitted`]);
//! 5. the document, before and after the change, lies in the certificate's scope
//!    ([`Rejection::OutOfScope`]).
//!
//! Everything it reads is the change itself, its envelope, the certificates and revocations, and
//! the document as of the change's own causal past: never the arrival order or the receiving
//! node's clock. Two honest nodes holding the same certificates therefore decide alike. The
//! change's time is the author's claim; a device with a wrong clock gets its changes refused as
//! outside its certificate's validity, and a revoked device that lies about the revocations it
//! had seen is bounded by its certificate's expiry.

use std::collections::{BTreeMap, HashMap, HashSet};

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Domain separator of change envelope signatures.
pub const CHANGE_DOMAIN: &[u8] = b"fieldmesh/change-envelope/v1\0";
/// Domain separator of certificate signatures.
pub const CERTIFICATE_DOMAIN: &[u8] = b"fieldmesh/certificate/v1\0";
/// Domain separator of revocation signatures.
pub const REVOCATION_DOMAIN: &[u8] = b"fieldmesh/revocation/v1\0";
/// Code system of trust documents (`Basic.code`).
pub const TRUST_SYSTEM: &str = "urn:fieldmesh:trust";
/// Identifier system of certificate documents (value: the serial).
pub const CERTIFICATE_SYSTEM: &str = "urn:fieldmesh:certificate";
/// Identifier system of revocation documents (value: the number).
pub const REVOCATION_SYSTEM: &str = "urn:fieldmesh:revocation";
/// Extension holding a trust token.
pub const TOKEN_EXTENSION: &str = "urn:fieldmesh:token";
/// Extension pointing at the village of an address (openIMIS IG).
pub const LOCATION_EXTENSION: &str =
    "https://openimis.github.io/openimis_fhir_r4_ig/StructureDefinition/address-location-reference";

/// An ed25519 public key.
pub type PublicKey = [u8; 32];

/// Errors reading trust material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// A token is not of the expected form.
    #[error("not a fieldmesh {0} token")]
    Malformed(&'static str),
    /// A token's signature is not the root's.
    #[error("the {0} is not signed by this deployment's central key")]
    NotSignedByRoot(&'static str),
    /// Envelope bytes are not a whole number of envelopes.
    #[error("signed envelopes are truncated ({0} bytes)")]
    TruncatedEnvelopes(usize),
    /// A key is not a valid ed25519 public key.
    #[error("not an ed25519 public key: {0}")]
    BadKey(String),
}

/// Why a change was refused. Each reason is a distinct variant; `Display` says it in words a
/// person understands.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// No envelope came with the change.
    #[error("the change came without its author's signature")]
    Unsigned,
    /// The envelope's signature does not verify against the change's author.
    #[error("the signature does not match the change or its author (forged or damaged)")]
    BadSignature,
    /// The author's key has no certificate from central.
    #[error("the author {author} has no certificate from central")]
    UnknownKey {
        /// Author key (hex, shortened).
        author: String,
    },
    /// The change is dated before the certificate's validity.
    #[error("the change is dated {at} but the author's certificate is valid only from {from}")]
    NotYetValid {
        /// Change time (Unix seconds).
        at: i64,
        /// Start of validity.
        from: i64,
    },
    /// The change is dated after the certificate's validity.
    #[error("the change is dated {at} but the author's certificate expired at {until}")]
    Expired {
        /// Change time (Unix seconds).
        at: i64,
        /// End of validity.
        until: i64,
    },
    /// A revocation the author had seen revokes its certificate.
    #[error("the author's certificate was revoked (revocation #{number}: {reason})")]
    Revoked {
        /// Revocation number.
        number: u32,
        /// Its reason.
        reason: String,
    },
    /// The author had seen revocations this node does not hold yet.
    #[error(
        "the author had seen revocations up to #{seen} but this node holds them only up to #{held}; it will be decided when they arrive"
    )]
    MissingRevocations {
        /// What the author had seen.
        seen: u32,
        /// What this node holds.
        held: u32,
    },
    /// No role of the author grants the capability.
    #[error("{roles} may not {capability} ({ty})")]
    NotPermitted {
        /// The author's roles.
        roles: String,
        /// The missing capability.
        capability: Capability,
        /// Resource type.
        ty: String,
    },
    /// The document lies outside the author's scope.
    #[error("{ty} at {place} is outside the author's scope ({scope})")]
    OutOfScope {
        /// Resource type.
        ty: String,
        /// The place the document names (or "no place").
        place: String,
        /// The author's scope.
        scope: String,
    },
    /// A change it depends on was rejected.
    #[error("it builds on change {dep} which was rejected")]
    DependsOnRejected {
        /// The rejected dependency (hex, shortened).
        dep: String,
    },
    /// Its author signed two different changes with the same sequence number.
    #[error("equivocation: the author made two different changes numbered {seq} in this document")]
    Equivocation {
        /// The sequence number.
        seq: u64,
    },
    /// It was sent by a peer that has no valid certificate.
    #[error("sent by peer {peer}, which has no valid certificate")]
    UncertifiedPeer {
        /// Peer id.
        peer: String,
    },
}

impl Rejection {
    /// Whether the same change may be accepted later, when more certificates or revocations
    /// have arrived (it is then offered again by reconciliation).
    pub fn may_change(&self) -> bool {
        matches!(
            self,
            Rejection::UnknownKey { .. }
                | Rejection::MissingRevocations { .. }
                | Rejection::UncertifiedPeer { .. }
        )
    }
}

fn short(bytes: &[u8]) -> String {
    hex::encode(&bytes[..bytes.len().min(8)])
}

/// The signature of one change by its author.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    /// The Automerge change hash.
    pub hash: [u8; 32],
    /// How many revocations (1..=n, contiguous) the author held when it made the change.
    pub revocations_seen: u32,
    /// ed25519 signature over [`CHANGE_DOMAIN`] ‖ hash ‖ revocations_seen (u32 BE).
    pub signature: [u8; 64],
}

impl Envelope {
    /// Encoded size.
    pub const LEN: usize = 100;

    fn message(hash: &[u8; 32], seen: u32) -> Vec<u8> {
        let mut m = Vec::with_capacity(CHANGE_DOMAIN.len() + 36);
        m.extend_from_slice(CHANGE_DOMAIN);
        m.extend_from_slice(hash);
        m.extend_from_slice(&seen.to_be_bytes());
        m
    }

    /// Signs a change.
    pub fn sign(key: &SigningKey, hash: [u8; 32], revocations_seen: u32) -> Self {
        let signature = key.sign(&Self::message(&hash, revocations_seen)).to_bytes();
        Self {
            hash,
            revocations_seen,
            signature,
        }
    }

    /// Whether the signature is `author`'s, strictly.
    pub fn verify(&self, author: &[u8]) -> bool {
        let Ok(key) = <[u8; 32]>::try_from(author) else {
            return false;
        };
        let Ok(key) = VerifyingKey::from_bytes(&key) else {
            return false;
        };
        key.verify_strict(
            &Self::message(&self.hash, self.revocations_seen),
            &Signature::from_bytes(&self.signature),
        )
        .is_ok()
    }

    /// Appends the encoded envelope to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hash);
        out.extend_from_slice(&self.revocations_seen.to_be_bytes());
        out.extend_from_slice(&self.signature);
    }

    /// Size on the wire: the receiver holds the change and so its full hash; an 8-byte prefix
    /// of it finds the change, then the count and the signature.
    pub const WIRE_LEN: usize = 76;

    /// Appends the wire form of the envelope to `out`.
    pub fn encode_wire_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hash[..8]);
        out.extend_from_slice(&self.revocations_seen.to_be_bytes());
        out.extend_from_slice(&self.signature);
    }

    /// The wire form of envelopes.
    pub fn encode_wire(envelopes: &[Envelope]) -> Vec<u8> {
        let mut out = Vec::with_capacity(envelopes.len() * Self::WIRE_LEN);
        for e in envelopes {
            e.encode_wire_into(&mut out);
        }
        out
    }

    /// The wire form of stored envelopes (as [`Envelope::encode_all`] wrote them), keeping those
    /// whose hash `keep` accepts. Unreadable trailing bytes are dropped.
    pub fn stored_to_wire(stored: &[u8], keep: impl Fn(&[u8; 32]) -> bool) -> Vec<u8> {
        let mut out = Vec::new();
        if let Ok(all) = Self::decode_all(&stored[..stored.len() - stored.len() % Self::LEN]) {
            let mut envs: Vec<&Envelope> = all.values().filter(|e| keep(&e.hash)).collect();
            envs.sort_by_key(|e| e.hash);
            for e in envs {
                e.encode_wire_into(&mut out);
            }
        }
        out
    }

    /// Matches envelopes in wire form to `changes` (hash, author): each change gets the envelope
    /// whose prefix is its hash's; if a crafted collision gives several, the one whose signature
    /// verifies. Changes without one are absent from the result.
    pub fn match_wire(
        wire: &[u8],
        changes: &[([u8; 32], &[u8])],
    ) -> Result<HashMap<[u8; 32], Envelope>, TrustError> {
        if !wire.len().is_multiple_of(Self::WIRE_LEN) {
            return Err(TrustError::TruncatedEnvelopes(wire.len()));
        }
        let mut by_prefix: HashMap<[u8; 8], Vec<(u32, [u8; 64])>> = HashMap::new();
        for c in wire.chunks_exact(Self::WIRE_LEN) {
            let mut prefix = [0u8; 8];
            prefix.copy_from_slice(&c[..8]);
            let seen = u32::from_be_bytes([c[8], c[9], c[10], c[11]]);
            let mut signature = [0u8; 64];
            signature.copy_from_slice(&c[12..]);
            by_prefix.entry(prefix).or_default().push((seen, signature));
        }
        let mut out = HashMap::new();
        for (hash, author) in changes {
            let mut prefix = [0u8; 8];
            prefix.copy_from_slice(&hash[..8]);
            let Some(candidates) = by_prefix.get(&prefix) else {
                continue;
            };
            let envs: Vec<Envelope> = candidates
                .iter()
                .map(|(seen, signature)| Envelope {
                    hash: *hash,
                    revocations_seen: *seen,
                    signature: *signature,
                })
                .collect();
            let chosen = if envs.len() == 1 {
                envs[0]
            } else {
                envs.iter()
                    .find(|e| e.verify(author))
                    .copied()
                    .unwrap_or(envs[0])
            };
            out.insert(*hash, chosen);
        }
        Ok(out)
    }

    /// Encodes envelopes back to back.
    pub fn encode_all(envelopes: &[Envelope]) -> Vec<u8> {
        let mut out = Vec::with_capacity(envelopes.len() * Self::LEN);
        for e in envelopes {
            e.encode_into(&mut out);
        }
        out
    }

    /// Decodes envelopes encoded back to back, keyed by change hash.
    pub fn decode_all(bytes: &[u8]) -> Result<HashMap<[u8; 32], Envelope>, TrustError> {
        if !bytes.len().is_multiple_of(Self::LEN) {
            return Err(TrustError::TruncatedEnvelopes(bytes.len()));
        }
        Ok(bytes
            .chunks_exact(Self::LEN)
            .map(|c| {
                let mut hash = [0u8; 32];
                hash.copy_from_slice(&c[..32]);
                let seen = u32::from_be_bytes([c[32], c[33], c[34], c[35]]);
                let mut signature = [0u8; 64];
                signature.copy_from_slice(&c[36..]);
                (
                    hash,
                    Envelope {
                        hash,
                        revocations_seen: seen,
                        signature,
                    },
                )
            })
            .collect())
    }
}

/// A role in a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The central server beside openIMIS: everything, and alone reference data.
    Central,
    /// A health-facility or district hub: relays, authors nothing.
    Hub,
    /// Enrolment officer: insurees, families, policies, contributions, payments in their villages.
    EnrolmentOfficer,
    /// Claim administrator: claims and eligibility requests at their facility.
    ClaimAdministrator,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [
        Role::Central,
        Role::Hub,
        Role::EnrolmentOfficer,
        Role::ClaimAdministrator,
    ];

    /// The role's name as written in certificates and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Role::Central => "central",
            Role::Hub => "hub",
            Role::EnrolmentOfficer => "enrolment-officer",
            Role::ClaimAdministrator => "claim-administrator",
        }
    }

    /// Parses a role name.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }

    /// The capabilities the role grants (the capability matrix).
    pub fn grants(self) -> &'static [Capability] {
        match self {
            Role::Central => &Capability::ALL,
            Role::Hub => &[],
            Role::EnrolmentOfficer => &[
                Capability::WriteInsurees,
                Capability::WritePolicies,
                Capability::WritePayments,
            ],
            Role::ClaimAdministrator => &[Capability::WriteClaims, Capability::RequestEligibility],
        }
    }

    /// Whether the role's writes are limited to its scope (central's are not).
    pub fn scoped(self) -> bool {
        !matches!(self, Role::Central)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What writing a resource type needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    /// Patients (insurees) and Groups (families).
    WriteInsurees,
    /// Contracts (policies, with their contributions) and Coverage.
    WritePolicies,
    /// PaymentNotice and Invoice.
    WritePayments,
    /// Claims.
    WriteClaims,
    /// CoverageEligibilityRequest.
    RequestEligibility,
    /// ClaimResponse and CoverageEligibilityResponse (central's adjudication).
    Adjudicate,
    /// Locations, facilities, practitioners, items, services, products, price lists, and the
    /// certificates and revocations themselves.
    AuthorReferenceData,
}

impl Capability {
    /// Every capability.
    pub const ALL: [Capability; 7] = [
        Capability::WriteInsurees,
        Capability::WritePolicies,
        Capability::WritePayments,
        Capability::WriteClaims,
        Capability::RequestEligibility,
        Capability::Adjudicate,
        Capability::AuthorReferenceData,
    ];

    /// The capability writing `ty` needs.
    pub fn for_type(ty: &str) -> Capability {
        match ty {
            "Patient" | "Group" => Capability::WriteInsurees,
            "Contract" | "Coverage" => Capability::WritePolicies,
            "PaymentNotice" | "Invoice" => Capability::WritePayments,
            "Claim" => Capability::WriteClaims,
            "CoverageEligibilityRequest" => Capability::RequestEligibility,
            "ClaimResponse" | "CoverageEligibilityResponse" => Capability::Adjudicate,
            _ => Capability::AuthorReferenceData,
        }
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Capability::WriteInsurees => "write insurees and families",
            Capability::WritePolicies => "write policies and contributions",
            Capability::WritePayments => "write payments",
            Capability::WriteClaims => "write claims",
            Capability::RequestEligibility => "request eligibility",
            Capability::Adjudicate => "adjudicate claims",
            Capability::AuthorReferenceData => "author reference data",
        })
    }
}

/// The places a document of type `ty` lies in, as the identifier values (UUIDs or openIMIS codes)
/// its place references carry: the villages of a Patient's or a family's addresses, the facility
/// (`provider`, `facility`) of a Claim or an eligibility request. `None` for types that name no
/// place (policies, payments: checked by type only).
pub fn places(ty: &str, json: &Map<String, Value>) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut push_ref = |r: &Value| {
        if let Some(v) = r.pointer("/identifier/value").and_then(Value::as_str) {
            out.push(v.to_string());
        }
        if let Some(s) = r.get("reference").and_then(Value::as_str)
            && let Some((_, id)) = s.rsplit_once('/')
        {
            out.push(id.to_string());
        }
    };
    let addresses = |json: &Map<String, Value>| -> Vec<Value> {
        let mut all: Vec<Value> = json
            .get("address")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for e in json
            .get("extension")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(a) = e.get("valueAddress") {
                all.push(a.clone());
            }
        }
        all
    };
    match ty {
        "Patient" | "Group" => {
            for a in addresses(json) {
                for e in a
                    .get("extension")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if e.get("url").and_then(Value::as_str) == Some(LOCATION_EXTENSION)
                        && let Some(r) = e.get("valueReference")
                    {
                        push_ref(r);
                    }
                }
            }
        }
        "Claim" | "CoverageEligibilityRequest" => {
            for f in ["provider", "facility"] {
                if let Some(r) = json.get(f) {
                    push_ref(r);
                }
            }
        }
        _ => return None,
    }
    out.sort();
    out.dedup();
    Some(out)
}

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

/// A revocation: central withdraws a device key's certificates.
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
}

/// Parses a hex public key.
pub fn parse_key(hex_key: &str) -> Result<PublicKey, TrustError> {
    let bytes = hex::decode(hex_key).map_err(|_| TrustError::BadKey(hex_key.into()))?;
    let key =
        <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| TrustError::BadKey(hex_key.into()))?;
    VerifyingKey::from_bytes(&key).map_err(|_| TrustError::BadKey(hex_key.into()))?;
    Ok(key)
}

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

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

/// The `Basic` resource that carries a certificate token.
pub fn certificate_resource(token: &str, cert: &Certificate) -> Value {
    trust_resource("certificate", CERTIFICATE_SYSTEM, &cert.serial, token)
}

/// The `Basic` resource that carries a revocation token.
pub fn revocation_resource(token: &str, rev: &Revocation) -> Value {
    trust_resource(
        "revocation",
        REVOCATION_SYSTEM,
        &rev.number.to_string(),
        token,
    )
}

fn trust_resource(code: &str, system: &str, value: &str, token: &str) -> Value {
    json!({
        "resourceType": "Basic",
        "identifier": [{"system": system, "value": value}],
        "code": {"coding": [{"system": TRUST_SYSTEM, "code": code}]},
        "extension": [{"url": TOKEN_EXTENSION, "valueString": token}],
    })
}

/// The token a trust resource carries, if `json` is one.
pub fn token_of(json: &Map<String, Value>) -> Option<&str> {
    if json.get("resourceType").and_then(Value::as_str) != Some("Basic") {
        return None;
    }
    json.get("extension")?
        .as_array()?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(TOKEN_EXTENSION))?
        .get("valueString")?
        .as_str()
}

/// What a change's author may do, as its certificates say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority<'a> {
    /// Roles (union over valid certificates).
    pub roles: Vec<Role>,
    /// Scope (union); ignored for central.
    pub scope: Vec<&'a str>,
}

impl Authority<'_> {
    fn roles_text(&self) -> String {
        if self.roles.is_empty() {
            return "a key without roles".into();
        }
        let names: Vec<&str> = self.roles.iter().map(|r| r.name()).collect();
        let article = if names[0].starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!("{article} {}", names.join(" and "))
    }

    /// Checks that the authority may write a `ty` whose places are `before` (if the document
    /// existed) and `after`.
    pub fn permits(
        &self,
        ty: &str,
        before: Option<&Map<String, Value>>,
        after: &Map<String, Value>,
    ) -> Result<(), Rejection> {
        let capability = Capability::for_type(ty);
        let granting: Vec<Role> = self
            .roles
            .iter()
            .copied()
            .filter(|r| r.grants().contains(&capability))
            .collect();
        if granting.is_empty() {
            return Err(Rejection::NotPermitted {
                roles: self.roles_text(),
                capability,
                ty: ty.into(),
            });
        }
        if granting.iter().any(|r| !r.scoped()) {
            return Ok(());
        }
        for state in before.into_iter().chain([after]) {
            let Some(places) = places(ty, state) else {
                continue;
            };
            let inside =
                !places.is_empty() && places.iter().any(|p| self.scope.contains(&p.as_str()));
            if !inside {
                return Err(Rejection::OutOfScope {
                    ty: ty.into(),
                    place: if places.is_empty() {
                        "no place".into()
                    } else {
                        places.join(", ")
                    },
                    scope: if self.scope.is_empty() {
                        "nothing".into()
                    } else {
                        self.scope.join(", ")
                    },
                });
            }
        }
        Ok(())
    }
}

/// The facts of one change that the decision reads.
#[derive(Debug, Clone)]
pub struct ChangeFacts {
    /// Change hash.
    pub hash: [u8; 32],
    /// Author (Automerge actor id bytes).
    pub actor: Vec<u8>,
    /// Sequence number of the author's changes in the document.
    pub seq: u64,
    /// The author's time (Unix seconds).
    pub time: i64,
    /// Dependencies.
    pub deps: Vec<[u8; 32]>,
}

/// What a node knows of its deployment's trust: the root, every certificate and revocation.
#[derive(Debug, Clone)]
pub struct Trust {
    root: PublicKey,
    certs: HashMap<PublicKey, Vec<Certificate>>,
    serials: HashSet<String>,
    revocations: BTreeMap<u32, Revocation>,
    /// Revocation numbers by revoked key.
    revoked_keys: HashMap<PublicKey, Vec<u32>>,
    /// Decompressed keys of the root and of every certified key (decompressing costs about a
    /// tenth of a signature check).
    keys: HashMap<PublicKey, VerifyingKey>,
}

impl Trust {
    /// A trust state knowing only the root.
    pub fn new(root: PublicKey) -> Self {
        Self {
            root,
            certs: HashMap::new(),
            serials: HashSet::new(),
            revocations: BTreeMap::new(),
            revoked_keys: HashMap::new(),
            keys: VerifyingKey::from_bytes(&root)
                .map(|k| HashMap::from([(root, k)]))
                .unwrap_or_default(),
        }
    }

    /// The root key.
    pub fn root(&self) -> &PublicKey {
        &self.root
    }

    /// Adds a certificate or revocation token; returns whether it was new. A token not signed by
    /// the root is refused.
    pub fn add_token(&mut self, token: &str) -> Result<bool, TrustError> {
        if token.starts_with("fmr1.") {
            let rev = verify_revocation(&self.root, token)?;
            if self.revocations.contains_key(&rev.number) {
                return Ok(false);
            }
            let key = parse_key(&rev.subject)?;
            self.revoked_keys.entry(key).or_default().push(rev.number);
            self.revocations.insert(rev.number, rev);
            return Ok(true);
        }
        let cert = verify_certificate(&self.root, token)?;
        if !self.serials.insert(cert.serial.clone()) {
            return Ok(false);
        }
        let key = cert.subject_key()?;
        if let Ok(k) = VerifyingKey::from_bytes(&key) {
            self.keys.insert(key, k);
        }
        self.certs.entry(key).or_default().push(cert);
        Ok(true)
    }

    /// How many revocations this node holds without a gap (1..=n).
    pub fn revocations_held(&self) -> u32 {
        let mut n = 0;
        while self.revocations.contains_key(&(n + 1)) {
            n += 1;
        }
        n
    }

    /// The certificates of `key`.
    pub fn certificates(&self, key: &PublicKey) -> &[Certificate] {
        self.certs.get(key).map_or(&[], Vec::as_slice)
    }

    /// Every certificate and revocation, for `fieldmesh cert show`.
    pub fn all(&self) -> (Vec<&Certificate>, Vec<&Revocation>) {
        let mut certs: Vec<&Certificate> = self.certs.values().flatten().collect();
        certs.sort_by(|a, b| a.user.cmp(&b.user).then(a.serial.cmp(&b.serial)));
        (certs, self.revocations.values().collect())
    }

    /// The revocation of `key` among the first `seen`, if any.
    pub fn revoked(&self, key: &PublicKey, seen: u32) -> Option<&Revocation> {
        self.revoked_keys
            .get(key)?
            .iter()
            .filter(|n| **n <= seen)
            .min()
            .and_then(|n| self.revocations.get(n))
    }

    /// Whether `envelope` carries `author`'s signature of its change (strictly).
    pub fn verify_envelope(&self, envelope: &Envelope, author: &[u8]) -> bool {
        let Ok(key) = <[u8; 32]>::try_from(author) else {
            return false;
        };
        match self.keys.get(&key) {
            Some(k) => k
                .verify_strict(
                    &Envelope::message(&envelope.hash, envelope.revocations_seen),
                    &Signature::from_bytes(&envelope.signature),
                )
                .is_ok(),
            None => envelope.verify(author),
        }
    }

    /// What `key` may do at time `at`, given that it had seen `seen` revocations.
    pub fn authority(&self, key: &[u8], at: i64, seen: u32) -> Result<Authority<'_>, Rejection> {
        let Ok(key) = <[u8; 32]>::try_from(key) else {
            return Err(Rejection::UnknownKey { author: short(key) });
        };
        if key == self.root {
            return Ok(Authority {
                roles: vec![Role::Central],
                scope: Vec::new(),
            });
        }
        let held = self.revocations_held();
        if seen > held {
            return Err(Rejection::MissingRevocations { seen, held });
        }
        if let Some(r) = self.revoked(&key, seen) {
            return Err(Rejection::Revoked {
                number: r.number,
                reason: r.reason.clone(),
            });
        }
        let certs = self.certificates(&key);
        if certs.is_empty() {
            return Err(Rejection::UnknownKey {
                author: short(&key),
            });
        }
        let valid: Vec<&Certificate> = certs
            .iter()
            .filter(|c| c.not_before <= at && at < c.not_after)
            .collect();
        if valid.is_empty() {
            let latest = certs.iter().map(|c| c.not_after).max().unwrap_or_default();
            if at >= latest {
                return Err(Rejection::Expired { at, until: latest });
            }
            let from = certs.iter().map(|c| c.not_before).min().unwrap_or_default();
            return Err(Rejection::NotYetValid { at, from });
        }
        let mut roles: Vec<Role> = valid.iter().flat_map(|c| c.roles.iter().copied()).collect();
        roles.sort();
        roles.dedup();
        let mut scope: Vec<&str> = valid
            .iter()
            .flat_map(|c| c.locations.iter().chain(&c.facilities))
            .map(String::as_str)
            .collect();
        scope.sort();
        scope.dedup();
        Ok(Authority { roles, scope })
    }

    /// Decides on one received change of a `ty` document. `before` is the document as of the
    /// change's dependencies (`None` when the change creates it), `after` as of the change
    /// itself; `rejected` says whether a dependency was rejected. See the module docs.
    pub fn decide(
        &self,
        ty: &str,
        change: &ChangeFacts,
        envelope: Option<&Envelope>,
        rejected: &dyn Fn(&[u8; 32]) -> bool,
        before: Option<&Map<String, Value>>,
        after: &Map<String, Value>,
    ) -> Result<(), Rejection> {
        let envelope = envelope.ok_or(Rejection::Unsigned)?;
        if envelope.hash != change.hash || !self.verify_envelope(envelope, &change.actor) {
            return Err(Rejection::BadSignature);
        }
        if let Some(dep) = change.deps.iter().find(|d| rejected(d)) {
            return Err(Rejection::DependsOnRejected { dep: short(dep) });
        }
        self.authority(&change.actor, change.time, envelope.revocations_seen)?
            .permits(ty, before, after)
    }
}

#[cfg(test)]
mod tests;
