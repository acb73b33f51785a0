//! Errors: reading trust material, and the reasons a change is refused.

use fieldmesh_fhir_docs::openimis::Capability;

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
    /// Evidence of an equivocation that proves none (same change twice, other keys, bad
    /// signatures).
    #[error("the evidence does not prove an equivocation")]
    NotEvidence,
    /// Signed envelopes whose length is not a whole number of envelopes.
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
    #[error(
        "the signature does not match the change, its author or its document (forged, replayed or damaged)"
    )]
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
    /// The author's key is revoked and central did not hold the change when it revoked it.
    #[error(
        "the author's key was revoked (revocation #{number}: {reason}) and central did not hold this change when it revoked it"
    )]
    RevokedUnvouched {
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
    /// The document claims another document's node identifier.
    #[error("the document claims the identifier {system}|{value}, which names another document")]
    ForeignIdentifier {
        /// Identifier system.
        system: String,
        /// Identifier value.
        value: String,
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
}
