//! Checking received changes against the deployment's trust before they are applied.
//!
//! A payload from a peer (or a certificate file) brings Automerge changes and their signed
//! envelopes. [`check`] merges them into a scratch copy of the document, takes every change the
//! copy has beyond what this node held, in causal order, and asks
//! [`Trust::decide`] about each, reading the document as of that change's
//! own causal past (not as of whatever else arrived). If any is refused, the document is rebuilt
//! from the accepted changes only: refused changes and everything built on them are never applied.

use std::collections::HashSet;

use automerge::{AutoCommit, ChangeHash};
use fieldmesh_fhir_docs::{ConvertError, document_to_json};
use serde_json::{Map, Value};

use crate::{ChangeFacts, Envelope, Policy, Rejection, Trust, TrustError};

/// Why a received document could not be checked at all (nothing of it is applied).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// Automerge could not read or rebuild the document.
    #[error("the document cannot be read: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// The document holds values FHIR JSON cannot express.
    #[error("the document is not FHIR JSON: {0}")]
    Convert(#[from] ConvertError),
    /// The changes' dependencies form a cycle.
    #[error("the changes form a cycle")]
    Cycle,
    /// The envelopes that came with the changes are malformed.
    #[error(transparent)]
    Envelopes(#[from] TrustError),
}

/// What checking a document's new changes found.
pub struct Checked {
    /// The document with every accepted change (and nothing refused).
    pub doc: AutoCommit,
    /// Its JSON.
    pub json: Map<String, Value>,
    /// The envelopes of the accepted new changes, encoded.
    pub envelopes: Vec<u8>,
    /// How many new changes were accepted.
    pub accepted: usize,
    /// The refused changes: hash and reason.
    pub rejected: Vec<([u8; 32], Rejection)>,
}

fn json_at(doc: &mut AutoCommit, heads: &[ChangeHash]) -> Result<Map<String, Value>, CheckError> {
    let fork = doc.fork_at(heads)?;
    Ok(document_to_json(&fork)?)
}

/// Checks the changes `merged` holds beyond `before_heads`, with the envelopes that came with
/// them (wire form, [`Envelope::match_wire`]). `before` is the document this node
/// held (`None` for a document new here); `uncertified` names the sending peer if it has no valid
/// certificate (then everything it sent is refused).
#[allow(clippy::too_many_arguments)]
pub fn check(
    trust: &Trust,
    policy: &dyn Policy,
    ty: &str,
    mut merged: AutoCommit,
    merged_json: Map<String, Value>,
    before: Option<(&mut AutoCommit, &Map<String, Value>)>,
    wire_envelopes: &[u8],
    uncertified: Option<&str>,
) -> Result<Checked, CheckError> {
    let mut before = before;
    let before_heads: Vec<ChangeHash> = match &mut before {
        Some((doc, _)) => doc.get_heads(),
        None => Vec::new(),
    };
    let facts: Vec<ChangeFacts> = merged
        .get_changes_meta(&before_heads)
        .into_iter()
        .map(|m| ChangeFacts {
            hash: m.hash.0,
            actor: m.actor.to_bytes().to_vec(),
            seq: m.seq,
            time: m.timestamp,
            deps: m.deps.iter().map(|d| d.0).collect(),
        })
        .collect();
    let pairs: Vec<([u8; 32], &[u8])> =
        facts.iter().map(|f| (f.hash, f.actor.as_slice())).collect();
    let envelopes = Envelope::match_wire(wire_envelopes, &pairs)?;
    let envelopes = &envelopes;
    // Causal order: a change after every new change it depends on.
    let new: HashSet<[u8; 32]> = facts.iter().map(|f| f.hash).collect();
    let mut order: Vec<usize> = Vec::with_capacity(facts.len());
    let mut placed: HashSet<[u8; 32]> = HashSet::new();
    while order.len() < facts.len() {
        let before_round = order.len();
        for (i, f) in facts.iter().enumerate() {
            if !placed.contains(&f.hash)
                && f.deps
                    .iter()
                    .all(|d| !new.contains(d) || placed.contains(d))
            {
                placed.insert(f.hash);
                order.push(i);
            }
        }
        if order.len() == before_round {
            return Err(CheckError::Cycle);
        }
    }
    let merged_heads = merged.get_heads();
    let mut rejected: Vec<([u8; 32], Rejection)> = Vec::new();
    let mut rejected_set: HashSet<[u8; 32]> = HashSet::new();
    let mut accepted_envelopes = Vec::new();
    let mut sorted_before = before_heads.clone();
    sorted_before.sort();
    for i in order {
        let f = &facts[i];
        let verdict = if let Some(peer) = uncertified {
            Err(Rejection::UncertifiedPeer { peer: peer.into() })
        } else {
            let after = if merged_heads.len() == 1 && merged_heads[0].0 == f.hash {
                None
            } else {
                Some(json_at(&mut merged, &[ChangeHash(f.hash)])?)
            };
            let mut deps: Vec<ChangeHash> = f.deps.iter().map(|d| ChangeHash(*d)).collect();
            deps.sort();
            let prior = if deps.is_empty() {
                None
            } else if deps == sorted_before {
                before.as_ref().map(|(_, j)| (*j).clone())
            } else if deps.iter().all(|d| !rejected_set.contains(&d.0)) {
                Some(json_at(&mut merged, &deps)?)
            } else {
                None
            };
            trust.decide(
                policy,
                ty,
                f,
                envelopes.get(&f.hash),
                &|d| rejected_set.contains(d),
                prior.as_ref(),
                after.as_ref().unwrap_or(&merged_json),
            )
        };
        match verdict {
            Ok(()) => {
                if let Some(e) = envelopes.get(&f.hash) {
                    e.encode_into(&mut accepted_envelopes);
                }
            }
            Err(r) => {
                rejected_set.insert(f.hash);
                rejected.push((f.hash, r));
            }
        }
    }
    let accepted = facts.len() - rejected.len();
    if rejected.is_empty() {
        return Ok(Checked {
            doc: merged,
            json: merged_json,
            envelopes: accepted_envelopes,
            accepted,
            rejected,
        });
    }
    // Rebuild from what this node held plus the accepted changes.
    let keep: Vec<automerge::Change> = merged
        .get_changes(&before_heads)
        .into_iter()
        .filter(|c| !rejected_set.contains(&c.hash().0))
        .collect();
    let mut doc = match before {
        Some((doc, _)) => doc.fork(),
        None => AutoCommit::new(),
    };
    doc.apply_changes(keep)?;
    let json = document_to_json(&doc)?;
    Ok(Checked {
        doc,
        json,
        envelopes: accepted_envelopes,
        accepted,
        rejected,
    })
}
