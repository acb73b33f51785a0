//! Evidence that a key equivocated: two different changes it signed in one document under one
//! sequence number.
//!
//! Automerge holds at most one change per author and sequence number, so two honest nodes that
//! received different branches first would each keep theirs for ever. The node that meets the
//! second one makes an evidence token of both signed changes and carries it in an `AuditEvent`
//! that syncs like any document. The token proves itself (both signatures are the key's own), so
//! any certified device may report it; every node that holds it refuses the key's changes in that
//! document from that sequence number on, and takes out those it applied and what was built on
//! them: every honest node ends with the same document.
//!
//! Token: `fme1.<doc id hex>.<resource type>.<change a>.<envelope a>.<change b>.<envelope b>`,
//! changes as raw Automerge change chunks, envelopes as stored ([`Envelope::LEN`] bytes), all
//! base64url.

use automerge::Change;
use base64::Engine as _;
use serde_json::{Value, json};

use crate::token::B64;
use crate::{Envelope, PublicKey, TrustError};

/// Extension of an `AuditEvent` holding an evidence token.
pub const EVIDENCE_EXTENSION: &str = "urn:fieldmesh:evidence";
/// Code system of fieldmesh `AuditEvent` types.
pub const AUDIT_SYSTEM: &str = "urn:fieldmesh:audit";

/// What an evidence token proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Equivocation {
    /// The key.
    pub key: PublicKey,
    /// The document.
    pub doc: [u8; 16],
    /// Its resource type.
    pub ty: String,
    /// The sequence number both changes carry.
    pub seq: u64,
}

/// Makes the evidence token of two changes (raw chunks) with their envelopes, if they do prove an
/// equivocation in document `doc` of type `ty`.
pub fn make_evidence(
    doc: &[u8; 16],
    ty: &str,
    (change_a, env_a): (&[u8], &Envelope),
    (change_b, env_b): (&[u8], &Envelope),
) -> Result<(String, Equivocation), TrustError> {
    let token = format!(
        "fme1.{}.{}.{}.{}.{}.{}",
        hex::encode(doc),
        B64.encode(ty),
        B64.encode(change_a),
        B64.encode(Envelope::encode_all(&[*env_a])),
        B64.encode(change_b),
        B64.encode(Envelope::encode_all(&[*env_b])),
    );
    let proven = verify_evidence(&token)?;
    Ok((token, proven))
}

/// Checks an evidence token: two well-formed changes by one key, in one document, under one
/// sequence number, different, each signed by the key for that document.
pub fn verify_evidence(token: &str) -> Result<Equivocation, TrustError> {
    const WHAT: &str = "evidence";
    let bad = || TrustError::Malformed(WHAT);
    let parts: Vec<&str> = token.trim().split('.').collect();
    let [prefix, doc, ty, a, ea, b, eb] = parts.as_slice() else {
        return Err(bad());
    };
    if *prefix != "fme1" {
        return Err(bad());
    }
    let doc: [u8; 16] = hex::decode(doc)
        .ok()
        .and_then(|d| d.try_into().ok())
        .ok_or_else(bad)?;
    let ty = String::from_utf8(B64.decode(ty).map_err(|_| bad())?).map_err(|_| bad())?;
    let change = |c: &str| -> Result<Change, TrustError> {
        let bytes = B64.decode(c).map_err(|_| bad())?;
        // The Automerge decoder has panicked on crafted input before: contain it.
        std::panic::catch_unwind(|| Change::from_bytes(bytes))
            .map_err(|_| bad())?
            .map_err(|_| bad())
    };
    let envelope = |e: &str| -> Result<Envelope, TrustError> {
        let bytes = B64.decode(e).map_err(|_| bad())?;
        Envelope::decode_all(&bytes)?
            .into_values()
            .next()
            .ok_or_else(bad)
    };
    let (ca, cb) = (change(a)?, change(b)?);
    let (ea, eb) = (envelope(ea)?, envelope(eb)?);
    if ca.actor_id() != cb.actor_id() || ca.seq() != cb.seq() || ca.hash() == cb.hash() {
        return Err(TrustError::NotEvidence);
    }
    let key: PublicKey = ca
        .actor_id()
        .to_bytes()
        .try_into()
        .map_err(|_| TrustError::NotEvidence)?;
    for (c, e) in [(&ca, &ea), (&cb, &eb)] {
        if e.hash != c.hash().0 || !e.verify(&key, &doc, &ty) {
            return Err(TrustError::NotEvidence);
        }
    }
    Ok(Equivocation {
        key,
        doc,
        ty,
        seq: ca.seq(),
    })
}

/// The `AuditEvent` that carries an evidence token, readable by a person too.
pub fn evidence_resource(token: &str, e: &Equivocation, recorded: &str) -> Value {
    json!({
        "resourceType": "AuditEvent",
        "type": {"system": AUDIT_SYSTEM, "code": "equivocation",
            "display": "a key signed two different changes under one sequence number"},
        "recorded": recorded,
        "outcome": "8",
        "agent": [{"requestor": true, "who": {"identifier": {"system": crate::SUBJECT_SYSTEM, "value": hex::encode(e.key)}}}],
        "source": {"observer": {"display": "fieldmesh"}},
        "entity": [{"what": {"type": e.ty, "identifier": {"value": uuid_text(&e.doc)}},
            "detail": [{"type": "sequence", "valueString": e.seq.to_string()}]}],
        "extension": [{"url": EVIDENCE_EXTENSION, "valueString": token}],
    })
}

fn uuid_text(b: &[u8; 16]) -> String {
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}
