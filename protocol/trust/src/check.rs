//! Checking received changes against the deployment's trust before they are applied.
//!
//! A payload from a peer (or a certificate file) brings Automerge changes and their signed
//! envelopes. [`check`] merges them into a scratch copy of the document, takes every change the
//! copy has beyond what this node held, in causal order, and asks
//! [`Trust::decide`] about each, reading the document as of that change's
//! own causal past (not as of whatever else arrived). If any is refused, the document is rebuilt
//! from the accepted changes only: refused changes and everything built on them are never applied.

use std::collections::{HashMap, HashSet};

use automerge::{AutoCommit, ChangeHash};
use fieldmesh_fhir_docs::{ConvertError, DocId, document_to_json};
use serde_json::{Map, Value};

use crate::decide::claimed_identity;
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
    /// The authors (actor bytes) of the accepted new changes, sorted, each once.
    pub authors: Vec<Vec<u8>>,
}

/// Where a state that merges concurrent branches lies, for the trust decision: the places of
/// the merged state when each of them is a place of some branch's own state, else the places
/// of the branches' states together.
///
/// Each branch's state (the document as of one head) was checked against its author's scope
/// when that head was accepted; their merge was not, and may name a place no author chose (two
/// concurrent edits of the parts of one place reference, each fine alone). Such a place never
/// counts: the document lies where its branches' authors put it, so a merge can never move a
/// document out of its authors' scope, and a later change by someone scoped only for the
/// emergent place is refused. The rule reads only the document's history up to `heads`, so
/// every node decides alike.
fn merge_places(
    policy: &dyn Policy,
    ty: &str,
    merged_state: &Map<String, Value>,
    doc: &mut AutoCommit,
    heads: &[ChangeHash],
) -> Result<Option<Vec<String>>, CheckError> {
    let Some(merged) = policy.places(ty, merged_state) else {
        return Ok(None);
    };
    let mut branches: Vec<String> = Vec::new();
    for h in heads {
        let fork = doc.fork_at(std::slice::from_ref(h))?;
        branches.extend(
            policy
                .places(ty, &document_to_json(&fork)?)
                .unwrap_or_default(),
        );
    }
    branches.sort();
    branches.dedup();
    if !merged.is_empty() && merged.iter().all(|p| branches.contains(p)) {
        Ok(Some(merged))
    } else {
        Ok(Some(branches))
    }
}

/// The places of `doc` at its current heads, as the trust decision reads them: see
/// [`merge_places`] for a document whose heads are concurrent. `None` for a type that names no
/// place.
pub fn places_at(
    policy: &dyn Policy,
    ty: &str,
    doc: &mut AutoCommit,
) -> Result<Option<Vec<String>>, CheckError> {
    let state = document_to_json(doc)?;
    let heads = doc.get_heads();
    if heads.len() > 1 {
        merge_places(policy, ty, &state, doc, &heads)
    } else {
        Ok(policy.places(ty, &state))
    }
}

/// The new changes in causal order (Kahn's algorithm: linear in changes and dependencies).
fn causal_order(facts: &[ChangeFacts]) -> Result<Vec<usize>, CheckError> {
    let index: HashMap<[u8; 32], usize> =
        facts.iter().enumerate().map(|(i, f)| (f.hash, i)).collect();
    let mut waiting = vec![0usize; facts.len()];
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); facts.len()];
    for (i, f) in facts.iter().enumerate() {
        for d in &f.deps {
            if let Some(&j) = index.get(d) {
                waiting[i] += 1;
                dependents[j].push(i);
            }
        }
    }
    let mut ready: Vec<usize> = (0..facts.len()).filter(|i| waiting[*i] == 0).collect();
    // Deterministic: among ready changes, the smallest hash first.
    ready.sort_by_key(|i| std::cmp::Reverse(facts[*i].hash));
    let mut order = Vec::with_capacity(facts.len());
    while let Some(i) = ready.pop() {
        order.push(i);
        let mut freed = Vec::new();
        for &j in &dependents[i] {
            waiting[j] -= 1;
            if waiting[j] == 0 {
                freed.push(j);
            }
        }
        ready.extend(freed);
        ready.sort_by_key(|i| std::cmp::Reverse(facts[*i].hash));
    }
    if order.len() != facts.len() {
        return Err(CheckError::Cycle);
    }
    Ok(order)
}

/// The changes a merged document holds beyond what this node held, and the envelopes that came
/// with them matched to them: what the signature checks read, before any decision.
pub struct Signed {
    /// The new changes.
    pub facts: Vec<ChangeFacts>,
    /// Their envelopes, by change hash (a change without one is absent).
    pub envelopes: HashMap<[u8; 32], Envelope>,
}

impl Signed {
    /// Reads the changes `merged` (document `doc` of type `ty`) holds beyond `before_heads`, and
    /// matches `wire_envelopes` (wire form, [`Envelope::match_wire`]) to them.
    pub fn read(
        merged: &mut AutoCommit,
        before_heads: &[ChangeHash],
        doc: &DocId,
        ty: &str,
        wire_envelopes: &[u8],
    ) -> Result<Self, CheckError> {
        let facts: Vec<ChangeFacts> = merged
            .get_changes_meta(before_heads)
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
        let envelopes = Envelope::match_wire(wire_envelopes, &pairs, doc.as_bytes(), ty)?;
        Ok(Self { facts, envelopes })
    }

    /// The signatures to check: each new change's envelope and author.
    pub fn signatures(&self) -> impl Iterator<Item = (&Envelope, &[u8])> {
        self.facts.iter().filter_map(|f| {
            self.envelopes
                .get(&f.hash)
                .filter(|e| e.hash == f.hash)
                .map(|e| (e, f.actor.as_slice()))
        })
    }

    /// The hashes of the changes whose signature holds, checked here one document at a time
    /// (a receiver checks a whole batch's with [`Trust::verify_envelopes`] instead).
    pub fn verify(&self, trust: &Trust, doc: &DocId, ty: &str) -> HashSet<[u8; 32]> {
        let items: Vec<(&Envelope, &[u8], &[u8; 16], &str)> = self
            .signatures()
            .map(|(e, a)| (e, a, doc.as_bytes(), ty))
            .collect();
        items
            .iter()
            .zip(trust.verify_envelopes(&items))
            .filter(|(_, ok)| *ok)
            .map(|((e, ..), _)| e.hash)
            .collect()
    }
}

/// Checks the changes `merged` (document `doc`, its id) holds beyond what `before` held, with the envelopes that came
/// with them (wire form, [`Envelope::match_wire`]). `before` is the document this node held
/// (`None` for a document new here). Whether the sender may send this at all is decided before
/// (a peer without a valid certificate may send only certificates and revocations).
///
/// Work is spent in order of cost. First, for every change, what reads no document state: its
/// signature, its dependencies, its author's certificate and revocations, the capability. Only
/// then, and only for changes by scoped authors, the document as of the change: the state before
/// and after each change is read once, walking the changes in causal order on a working copy
/// (a fork at the change's dependencies only where history branches), so the cost grows with the
/// changes, not with their square.
pub fn check(
    trust: &Trust,
    policy: &dyn Policy,
    doc: &DocId,
    ty: &str,
    mut merged: AutoCommit,
    before: Option<(&mut AutoCommit, &Map<String, Value>)>,
    wire_envelopes: &[u8],
) -> Result<Checked, CheckError> {
    let mut before = before;
    let before_heads: Vec<ChangeHash> = match &mut before {
        Some((doc, _)) => doc.get_heads(),
        None => Vec::new(),
    };
    let signed = Signed::read(&mut merged, &before_heads, doc, ty, wire_envelopes)?;
    let verified = signed.verify(trust, doc, ty);
    check_signed(trust, policy, doc, ty, merged, before, signed, &verified)
}

/// [`check`], with the changes and envelopes read ([`Signed::read`]) and their signatures
/// checked already: `verified` holds the hashes of the changes whose signature holds (a receiver
/// checks a whole batch's signatures at once, [`Trust::verify_envelopes`]).
#[allow(clippy::too_many_arguments)]
pub fn check_signed(
    trust: &Trust,
    policy: &dyn Policy,
    doc: &DocId,
    ty: &str,
    mut merged: AutoCommit,
    before: Option<(&mut AutoCommit, &Map<String, Value>)>,
    signed: Signed,
    verified: &HashSet<[u8; 32]>,
) -> Result<Checked, CheckError> {
    let mut before = before;
    let before_heads: Vec<ChangeHash> = match &mut before {
        Some((doc, _)) => doc.get_heads(),
        None => Vec::new(),
    };
    let Signed { facts, envelopes } = signed;
    let order = causal_order(&facts)?;
    let mut rejected: Vec<([u8; 32], Rejection)> = Vec::new();
    let mut rejected_set: HashSet<[u8; 32]> = HashSet::new();
    // The changes central vouched for, read only for documents a revoked key touched.
    let mut vouched: HashSet<[u8; 32]> = HashSet::new();
    let mut revoked: Vec<&[u8]> = facts
        .iter()
        .map(|f| f.actor.as_slice())
        .filter(|a| trust.revocation_of(a).is_some())
        .collect();
    revoked.sort();
    revoked.dedup();
    if !revoked.is_empty() {
        let all: Vec<([u8; 32], Vec<[u8; 32]>)> = merged
            .get_changes_meta(&[])
            .into_iter()
            .map(|m| (m.hash.0, m.deps.iter().map(|d| d.0).collect()))
            .collect();
        for a in revoked {
            vouched.extend(trust.vouched_changes(a, doc.as_bytes(), &all));
        }
    }

    // 1. Signatures, dependencies, certificates, capabilities: no document state read.
    let mut scoped: HashMap<usize, crate::Authority<'_>> = HashMap::new();
    for &i in &order {
        let f = &facts[i];
        match trust.decide_signed(
            policy,
            doc,
            ty,
            f,
            envelopes.get(&f.hash),
            &|e| verified.contains(&e.hash),
            &|d| rejected_set.contains(d),
            &|h| vouched.contains(h),
        ) {
            Ok(None) => {}
            Ok(Some(authority)) => {
                scoped.insert(i, authority);
            }
            Err(r) => {
                rejected_set.insert(f.hash);
                rejected.push((f.hash, r));
            }
        }
    }

    // 2. Scope and identity, for the changes by scoped authors, on the document as of each
    // change. A working copy follows the causal order; where history branches (or a refused
    // change was applied to it) it is re-forked once at the next change's dependencies.
    // The document's state at its heads, when the walk below ends there (its JSON is then the
    // merged document's, not read a second time).
    let mut at_heads: Option<Map<String, Value>> = None;
    if !scoped.is_empty() {
        let mut merged_heads = merged.get_heads();
        merged_heads.sort();
        let mut work = match &mut before {
            Some((doc, _)) => doc.fork(),
            None => AutoCommit::new(),
        };
        let mut work_heads: Vec<ChangeHash> = before_heads.clone();
        work_heads.sort();
        let mut work_json: Option<Map<String, Value>> = before.as_ref().map(|(_, j)| (*j).clone());
        for &i in &order {
            let f = &facts[i];
            if rejected_set.contains(&f.hash) {
                continue;
            }
            if let Some(dep) = f.deps.iter().find(|d| rejected_set.contains(*d)) {
                let dep = crate::keys::short(dep);
                rejected_set.insert(f.hash);
                rejected.push((f.hash, Rejection::DependsOnRejected { dep }));
                continue;
            }
            let mut deps: Vec<ChangeHash> = f.deps.iter().map(|d| ChangeHash(*d)).collect();
            deps.sort();
            let Some(authority) = scoped.get(&i) else {
                // Not scoped: follow it only if it continues the working copy.
                if deps == work_heads {
                    let change = merged
                        .get_change_by_hash(&ChangeHash(f.hash))
                        .ok_or(CheckError::Cycle)?;
                    work.apply_changes([change])?;
                    work_heads = vec![ChangeHash(f.hash)];
                    work_json = None;
                }
                continue;
            };
            if deps != work_heads {
                work = if deps.is_empty() {
                    AutoCommit::new()
                } else {
                    merged.fork_at(&deps)?
                };
                work_heads = deps;
                work_json = None;
            }
            let prior = if work_heads.is_empty() {
                None
            } else {
                Some(match work_json.take() {
                    Some(j) => j,
                    None => document_to_json(&work)?,
                })
            };
            let prior_places = match &prior {
                None => None,
                Some(p) if work_heads.len() > 1 => {
                    Some(merge_places(policy, ty, p, &mut merged, &work_heads)?)
                }
                Some(p) => Some(policy.places(ty, p)),
            };
            // The change that makes the document's only head: the state after it is the merged
            // document itself, read without replaying the change on the working copy.
            let last = merged_heads.len() == 1 && merged_heads[0].0 == f.hash;
            let after = if last {
                document_to_json(&merged)?
            } else {
                let change = merged
                    .get_change_by_hash(&ChangeHash(f.hash))
                    .ok_or(CheckError::Cycle)?;
                work.apply_changes([change])?;
                document_to_json(&work)?
            };
            let verdict = prior_places
                .as_ref()
                .map_or(Ok(()), |p| authority.places_in_scope(ty, p.as_deref()))
                .and_then(|()| authority.in_scope(policy, ty, &after))
                .and_then(|()| claimed_identity(doc, prior.as_ref(), &after));
            match verdict {
                Ok(()) => {
                    work_heads = vec![ChangeHash(f.hash)];
                    work_json = Some(after);
                }
                Err(r) => {
                    rejected_set.insert(f.hash);
                    rejected.push((f.hash, r));
                    // The working copy holds a refused change (or, for the last one, was not
                    // brought up to date): re-fork before it is read again.
                    work_heads = vec![ChangeHash([0xff; 32])];
                    work_json = None;
                }
            }
        }
        if work_heads == merged_heads {
            at_heads = work_json;
        }
    }

    let mut accepted_envelopes = Vec::new();
    for &i in &order {
        let f = &facts[i];
        if !rejected_set.contains(&f.hash)
            && let Some(e) = envelopes.get(&f.hash)
        {
            e.encode_into(&mut accepted_envelopes);
        }
    }
    let accepted = facts.len() - rejected.len();
    let mut authors: Vec<Vec<u8>> = facts
        .iter()
        .filter(|f| !rejected_set.contains(&f.hash))
        .map(|f| f.actor.clone())
        .collect();
    authors.sort();
    authors.dedup();
    if rejected.is_empty() {
        let json = match at_heads {
            Some(json) => json,
            None => document_to_json(&merged)?,
        };
        return Ok(Checked {
            doc: merged,
            json,
            envelopes: accepted_envelopes,
            accepted,
            rejected,
            authors,
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
        authors,
    })
}
