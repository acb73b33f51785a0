//! fieldmesh trust: certificates issued by central, signed change envelopes, and the decision
//! every node takes alike on every change it receives.
//!
//! # Layout
//!
//! - [`keys`]: ed25519 keys and [`PeerKey`], a node's key as the network names it.
//! - [`envelope`]: the signature of each change, stored and on the wire.
//! - [`signature`]: the rule a change's signature is checked by (ZIP-215, with small-order and
//!   non-canonical points refused), alone or in batches.
//! - [`token`]: certificates and revocations signed by the root, as tokens.
//! - [`document`]: the `Basic` resources that carry the tokens from node to node.
//! - [`evidence`]: proof that a key equivocated, carried in an `AuditEvent`.
//! - [`state`]: [`Trust`], what a node holds (root, certificates, revocations), and what a key may
//!   do at a time ([`Authority`]).
//! - [`decide`]: [`Trust::decide`] on one change, under a deployment [`Policy`] (openIMIS's:
//!   [`fieldmesh_fhir_docs::openimis`]).
//! - [`check`]: [`check()`] of every new change of a received Automerge document, in causal order,
//!   rebuilding the document from the accepted changes when some are refused.
//!
//! # Keys and envelopes
//!
//! A node's ed25519 key is its libp2p identity and, as the Automerge actor id, the author of every
//! change it makes. Each change travels with an [`Envelope`]: the change hash, the number of
//! revocations its author had seen, and the author's signature over both, domain-separated by
//! [`CHANGE_DOMAIN`]. The change hash covers the whole change (actor, sequence number, time,
//! dependencies, operations), so the signature covers it too. Envelope signatures are checked
//! under the ZIP-215 rules, with keys and `R`s of small order or non-canonical encoding refused
//! ([`signature`]): a single check and a batch decide alike, so a receiver checks a whole sync
//! batch at once ([`Trust::verify_envelopes`]) and still decides as every other node does.
//! Certificates and revocations (one signature each, by the root) are checked with
//! `verify_strict`.
//!
//! # Certificates and revocations
//!
//! Central's key is the root of trust. A [`Certificate`] (subject key, user, roles, scope, validity)
//! and a [`Revocation`] are JSON payloads signed by the root, carried as compact tokens
//! (`fmc1.<payload>.<signature>`, `fmr1.…`, base64url) inside `Basic` resources that sync like any
//! other document ([`certificate_resource`]). Revocations are numbered 1, 2, 3… by central.
//!
//! Why not `biscuit-auth`: biscuit's strengths are attenuation by the holder and Datalog
//! policies. Here the policy is a fixed matrix (`Capability`, `Role::grants`) that every node
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
#![forbid(unsafe_code)]

pub mod check;
pub mod decide;
pub mod document;
pub mod envelope;
pub mod error;
pub mod evidence;
pub mod keys;
pub mod signature;
pub mod state;
pub mod token;

pub use check::{CheckError, Checked, Signed, check, check_signed, places_at};
pub use decide::{ChangeFacts, NODE_SYSTEM_PREFIX, Policy, claimed_identity};
pub use document::{
    CERTIFICATE_SYSTEM, REVOCATION_SYSTEM, SUBJECT_SYSTEM, TOKEN_EXTENSION, TRUST_SYSTEM,
    certificate_resource, revocation_resource, token_of,
};
pub use envelope::{CHANGE_DOMAIN, Envelope};
pub use error::{Rejection, TrustError};
pub use evidence::{
    AUDIT_SYSTEM, EVIDENCE_EXTENSION, Equivocation, evidence_resource, make_evidence,
    verify_evidence,
};
pub use fieldmesh_fhir_docs::openimis::{Capability, Role};
pub use keys::{PeerKey, PublicKey, parse_key};
pub use state::{Authority, Trust};
pub use token::{
    CERTIFICATE_DOMAIN, Certificate, REVOCATION_DOMAIN, Revocation, Vouched, issue_certificate,
    issue_revocation, verify_certificate, verify_revocation,
};

/// The ed25519 implementation the signatures use (`SigningKey` signs certificates and changes).
pub use ed25519_dalek;

#[cfg(test)]
mod tests;
