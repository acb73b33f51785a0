//! Documents received from peers and files: checked, merged, quarantined.
//!
//! Every new change is checked before it is applied (signature, certificate, capability, scope;
//! see `fieldmesh-trust`): refused changes go to quarantine and are never applied, so never
//! forwarded. Documents new to the node (most of a first sync) are loaded, checked and indexed on
//! every core at once and stored as received; a payload for a document the node holds is merged
//! into a fork first and kept only if it loads, keeps the `resourceType` and changes the heads.

use std::collections::HashSet;

use automerge::{AutoCommit, ReadDoc};
use fieldmesh_fhir_docs::limits::{DocLimits, Shape, TooLarge, chunks, inspect};
use fieldmesh_fhir_docs::{DocId, document_to_json, profile};
use fieldmesh_protocol::DocPayload;
use fieldmesh_storage::{DocMeta, Quarantine, StoreError, Write};
use fieldmesh_trust::{Checked, Policy, Rejection, Signed, Trust, check, check_signed, token_of};
use serde_json::Value;

use crate::Engine;
use crate::core::{
    Live, PreparedDoc, author_entries, entries_of_json, heads_bytes, saved_after_edit, saves_whole,
    with_left,
};
use crate::error::{MergeError, ReadError, Refusal, WriteError, contain};
use crate::identity::NodeIdentity;
use crate::par::{par_map, par_map_each};
use crate::scope::Reach;
use crate::source::Source;

/// Received documents new to this node are loaded, their signatures checked and decided in
/// slices of this many, a slice at a time on each core: enough signatures (one to three per
/// document) for a batch check to pay (checked in slices of 32 documents, signatures took 5 % of
/// a hub's first sync, against 2 % in batches of 256), few loaded documents in memory at once,
/// and slices small enough that the cores finish a peer's batch of 512 together.
const RECEIVE_GROUP: usize = 64;

/// Operations loaded at once across the cores, at most (a Patient is about 200, and a loaded
/// document takes about 100 bytes per operation): each core's slice holds at most its share, and
/// a document over that share is loaded alone while the other cores wait. A frame of documents
/// crafted at the bounds of [`DocLimits`] is thus loaded one at a time.
const RECEIVE_OPS_AT_ONCE: u64 = 200_000;

/// Refused changes: hash and reason.
pub type Refused = Vec<([u8; 32], Rejection)>;

/// The identity of a payload as received (document, bytes and signatures).
fn payload_hash(p: &DocPayload) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(p.id);
    h.update((p.data.len() as u64).to_be_bytes());
    h.update(&p.data);
    h.update(&p.envelopes);
    h.finalize().into()
}

/// The `resourceType` a document's root names, read without converting the whole document.
fn type_of(doc: &AutoCommit) -> Option<String> {
    match doc.get(automerge::ROOT, "resourceType").ok()?? {
        (automerge::Value::Scalar(s), _) => match s.as_ref() {
            automerge::ScalarValue::Str(t) => Some(t.to_string()),
            _ => None,
        },
        _ => None,
    }
}

/// What merging a payload into the copy held here found.
enum Probe {
    /// Nothing new.
    Same,
    /// The payload holds a change by `actor` numbered `seq` other than the one held here.
    Equivocated { seq: u64, actor: automerge::ActorId },
    /// New changes, checked.
    Checked(Box<Checked>),
}

/// The evidence that `actor` equivocated in document `id`: its change numbered `seq` held here
/// and the other one `p` brings, each with its signature, if both are signed.
fn evidence(
    id: DocId,
    held: &mut AutoCommit,
    p: &DocPayload,
    actor: &automerge::ActorId,
    seq: u64,
    store: &dyn fieldmesh_storage::Store,
) -> Option<(String, fieldmesh_trust::Equivocation)> {
    let ours = held
        .get_changes(&[])
        .into_iter()
        .find(|c| c.actor_id() == actor && c.seq() == seq)?;
    let stored = store.envelopes(id.as_bytes()).ok()?;
    let usable = stored.len() - stored.len() % fieldmesh_trust::Envelope::LEN;
    let our_env = *fieldmesh_trust::Envelope::decode_all(&stored[..usable])
        .ok()?
        .get(&ours.hash().0)?;
    let theirs = contain(
        || -> Result<Option<automerge::Change>, Refusal> {
            let mut found = None;
            for (kind, chunk) in chunks(&p.data) {
                let changes = match kind {
                    1 | 2 => automerge::Change::from_bytes(chunk.to_vec())
                        .map(|c| vec![c])
                        .unwrap_or_default(),
                    0 => AutoCommit::load(chunk)
                        .map(|mut d| d.get_changes(&[]))
                        .unwrap_or_default(),
                    _ => Vec::new(),
                };
                found = found.or(changes
                    .into_iter()
                    .find(|c| c.actor_id() == actor && c.seq() == seq));
            }
            Ok(found)
        },
        Refusal::Panicked,
    )
    .ok()??;
    let author = actor.to_bytes().to_vec();
    let their_env = *fieldmesh_trust::Envelope::match_wire(
        &p.envelopes,
        &[(theirs.hash().0, author.as_slice())],
        id.as_bytes(),
        &p.ty,
    )
    .ok()?
    .get(&theirs.hash().0)?;
    fieldmesh_trust::make_evidence(
        id.as_bytes(),
        &p.ty,
        (ours.raw_bytes(), &our_env),
        (theirs.raw_bytes(), &their_env),
    )
    .map_err(|e| tracing::warn!(doc = %id, error = %e, "an equivocation without valid signatures"))
    .ok()
}

/// What a merge did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Documents that changed here.
    pub changed: usize,
    /// Documents refused whole or in part (their refused changes are in quarantine).
    pub refused: usize,
    /// Documents new to this node outside its scope, not kept.
    pub outside: usize,
    /// Documents the peer sent that are outside its own scope by this node's copy (an insuree
    /// who moved away from its villages): the peer holds a stale copy, and is told so in the
    /// next session (`Outside`).
    pub stale: usize,
}

/// A received document new to this node, checked: what to stage (if any change was accepted)
/// and what to quarantine.
pub(crate) struct Received {
    doc: Option<PreparedDoc>,
    rejected: Refused,
    /// Central gave it its canonical id as it received it: what its services need of it.
    canonical: Option<crate::central::Facts>,
}

/// A received document new to this node, loaded, its new changes and their envelopes read; its
/// signatures not checked yet (a batch's are checked together, [`verify_batch`]).
pub(crate) struct Loaded {
    doc: AutoCommit,
    signed: Signed,
}

/// Loads a document received from a peer that this node does not hold yet (which checks its
/// change hashes), checks its type, and reads its changes and their envelopes. `shape` is what
/// [`inspect`] found of its bytes (a document over the bounds is refused unloaded).
fn load_received(p: &DocPayload, shape: &Result<Shape, TooLarge>) -> Result<Loaded, Refusal> {
    if let Err(e) = shape {
        return Err(e.clone().into());
    }
    contain(
        || {
            let id = DocId(uuid::Uuid::from_bytes(p.id));
            if !profile::is_supported(&p.ty) {
                return Err(Refusal::WrongType(p.ty.clone()));
            }
            let mut doc = AutoCommit::load(&p.data)?;
            if type_of(&doc).as_deref() != Some(p.ty.as_str()) {
                return Err(Refusal::WrongType(p.ty.clone()));
            }
            let signed = Signed::read(&mut doc, &[], &id, &p.ty, &p.envelopes)?;
            Ok(Loaded { doc, signed })
        },
        Refusal::Panicked,
    )
}

/// Cuts received documents into the slices [`Engine::merge`] loads at once on one core: at most
/// [`RECEIVE_GROUP`] documents and `budget` operations (as [`inspect`] counted them) each, a
/// single document over the budget alone. Returns the end of each slice.
fn group_ends(shapes: &[Result<Shape, TooLarge>], budget: u64) -> Vec<usize> {
    let mut ends = Vec::new();
    let (mut count, mut ops) = (0usize, 0u64);
    for (i, shape) in shapes.iter().enumerate() {
        let these = shape.as_ref().map_or(0, |s| s.ops);
        if count > 0 && (count == RECEIVE_GROUP || ops.saturating_add(these) > budget) {
            ends.push(i);
            (count, ops) = (0, 0);
        }
        count += 1;
        ops = ops.saturating_add(these);
    }
    if count > 0 {
        ends.push(shapes.len());
    }
    ends
}

/// Slices of received documents, in the order they are prepared ([`slice_batches`]).
#[derive(Debug, PartialEq)]
enum SliceBatch {
    /// Slices within a core's share of operations, shared among the cores.
    Shared(Vec<std::ops::Range<usize>>),
    /// One document over a core's share, loaded while no other is.
    Alone(std::ops::Range<usize>),
}

/// Cuts received documents into slices ([`group_ends`] with `budget`) and the slices into
/// batches: runs of slices shared among the cores, and each slice over the budget alone.
fn slice_batches(shapes: &[Result<Shape, TooLarge>], budget: u64) -> Vec<SliceBatch> {
    let mut out = Vec::new();
    let mut shared = Vec::new();
    let mut start = 0;
    for end in group_ends(shapes, budget) {
        let ops: u64 = shapes[start..end]
            .iter()
            .map(|s| s.as_ref().map_or(0, |s| s.ops))
            .sum();
        if ops > budget {
            if !shared.is_empty() {
                out.push(SliceBatch::Shared(std::mem::take(&mut shared)));
            }
            out.push(SliceBatch::Alone(start..end));
        } else {
            shared.push(start..end);
        }
        start = end;
    }
    if !shared.is_empty() {
        out.push(SliceBatch::Shared(shared));
    }
    out
}

/// Checks the signatures of every loaded document of a slice at once: for each document, the
/// hashes of its changes whose signature holds (decided exactly as one at a time, see
/// [`fieldmesh_trust::signature`]).
fn verify_slice(
    trust: &Trust,
    payloads: &[DocPayload],
    loaded: &[Result<Loaded, Refusal>],
) -> Vec<HashSet<[u8; 32]>> {
    let mut items = Vec::new();
    let mut owner = Vec::new();
    for (i, (p, l)) in payloads.iter().zip(loaded).enumerate() {
        if let Ok(l) = l {
            for (e, author) in l.signed.signatures() {
                items.push((e, author, &p.id, p.ty.as_str()));
                owner.push(i);
            }
        }
    }
    let holds = trust.verify_envelopes(&items);
    let mut out = vec![HashSet::new(); payloads.len()];
    for ((item, i), ok) in items.iter().zip(owner).zip(holds) {
        if ok {
            out[i].insert(item.0.hash);
        }
    }
    out
}

/// Prepares a document received from a peer that this node does not hold yet: loads it (which
/// checks its change hashes), checks every change's signature and authority, reads it, checks its
/// type and computes its index entries.
fn prepare_received(
    p: &DocPayload,
    trust: &Trust,
    policy: &dyn Policy,
    limits: &DocLimits,
    time: i64,
    central: Option<&AtReceipt<'_>>,
) -> Result<Received, Refusal> {
    // Bounded before anything is built: a few kilobytes may describe millions of operations.
    let loaded = load_received(p, &inspect(&p.data, limits))?;
    let id = DocId(uuid::Uuid::from_bytes(p.id));
    let verified = loaded.signed.verify(trust, &id, &p.ty);
    prepare_loaded(p, loaded, &verified, trust, policy, time, central)
}

/// What central needs to give a document its canonical id as it receives it
/// ([`crate::central`]): its identity, and its store to see that no other resource has that id.
pub(crate) struct AtReceipt<'a> {
    pub me: &'a NodeIdentity,
    pub seen: u32,
    pub store: &'a dyn fieldmesh_storage::Store,
}

/// Decides on a loaded document's changes (their signatures checked: `verified`), reads it and
/// computes its index entries.
fn prepare_loaded(
    p: &DocPayload,
    loaded: Loaded,
    verified: &HashSet<[u8; 32]>,
    trust: &Trust,
    policy: &dyn Policy,
    time: i64,
    central: Option<&AtReceipt<'_>>,
) -> Result<Received, Refusal> {
    contain(
        move || prepare_checked(p, loaded, verified, trust, policy, time, central),
        Refusal::Panicked,
    )
}

fn prepare_checked(
    p: &DocPayload,
    loaded: Loaded,
    verified: &HashSet<[u8; 32]>,
    trust: &Trust,
    policy: &dyn Policy,
    time: i64,
    central: Option<&AtReceipt<'_>>,
) -> Result<Received, Refusal> {
    let id = DocId(uuid::Uuid::from_bytes(p.id));
    let checked = check_signed(
        trust,
        policy,
        &id,
        &p.ty,
        loaded.doc,
        None,
        loaded.signed,
        verified,
    )?;
    if checked.accepted > 0
        && checked.json.get("resourceType").and_then(Value::as_str) != Some(p.ty.as_str())
    {
        return Err(Refusal::WrongType(p.ty.clone()));
    }
    if checked.accepted == 0 {
        return Ok(Received {
            doc: None,
            rejected: checked.rejected,
            canonical: None,
        });
    }
    let mut doc = checked.doc;
    let mut json = checked.json;
    let mut envelopes = checked.envelopes;
    let given = match central {
        Some(c) if checked.rejected.is_empty() => {
            crate::central::canonical_at_receipt(c, &id, &p.ty, &mut doc, &mut json, &mut envelopes)
        }
        _ => None,
    };
    let bytes = match (&given, checked.rejected.is_empty()) {
        (None, true) => fieldmesh_storage::codec::encode(&p.data),
        // With central's change: saved whole (what central serves to every peer then loads in
        // one step, see `saved_after_edit`) ...
        (Some(_), true) if saves_whole(&doc) => {
            fieldmesh_storage::codec::encode(&doc.save_nocompress())
        }
        // ... unless it is large: the received document followed by central's change (Automerge
        // loads the two chunks as one document).
        (Some((_, change)), true) => {
            let mut both = Vec::with_capacity(p.data.len() + change.len());
            both.extend_from_slice(&p.data);
            both.extend_from_slice(change);
            fieldmesh_storage::codec::encode(&both)
        }
        (_, false) => fieldmesh_storage::codec::encode(&doc.save_nocompress()),
    }
    .map_err(|e| Refusal::Unreadable(e.into()))?;
    let mut entries = entries_of_json(&json);
    let given = given.map(|(mut facts, _)| {
        facts.keys = entries
            .references
            .iter()
            .filter(|(t, _, _)| t == fieldmesh_fhir_docs::openimis::persons::PERSON_KEY_INDEX)
            .map(|(_, _, k)| k.clone())
            .collect();
        facts
    });
    // Its authors, as the check found them (not read from the document again), and central
    // when it added its change.
    let mut authors = checked.authors;
    if given.is_some()
        && let Some(c) = central
    {
        authors.push(c.me.public().to_vec());
        authors.sort();
        authors.dedup();
    }
    entries.references.extend(author_entries(&authors));
    let own = id.to_string();
    let origin = entries
        .identifiers
        .iter()
        .find(|(s, v)| *v == own && s.starts_with("urn:fieldmesh:"))
        .map(|(s, _)| s.clone())
        .unwrap_or_else(|| "urn:fieldmesh:unknown".into());
    Ok(Received {
        doc: Some(PreparedDoc {
            id,
            meta: DocMeta {
                ty: p.ty.clone(),
                origin,
                chunks: 1,
                seq: 0,
                heads: heads_bytes(&doc.get_heads()),
                updated: time,
            },
            entries,
            bytes,
            envelopes,
            token: token_of(&json).map(String::from),
        }),
        rejected: checked.rejected,
        canonical: given,
    })
}

impl Engine {
    /// Merges documents received from `from` and starts committing them in the background (the
    /// next [`Engine::flush`] waits for it).
    ///
    /// Certificates and revocations in the batch are taken in (committed and learnt) before
    /// anything else, so that a batch carrying a new device's certificate and its writes is
    /// decided as if they had come in order. A peer without a valid certificate may send nothing
    /// else: anything else from it is an error that ends the session, and nothing of it is kept
    /// (not even in quarantine). A payload that is not a loadable document of the type it claims
    /// is refused and nothing of it is applied.
    pub fn merge(
        &mut self,
        docs: Vec<DocPayload>,
        from: &Source,
    ) -> Result<MergeReport, MergeError> {
        self.scope.accepted.clear();
        let (certs, docs): (Vec<_>, Vec<_>) = docs.into_iter().partition(|p| p.ty == "Basic");
        let (evidence, docs): (Vec<_>, Vec<_>) =
            docs.into_iter().partition(|p| p.ty == "AuditEvent");
        // Certificates and revocations are central's changes, checked as such whoever relays
        // them: a new device brings its own certificate.
        let mut report = self.merge_batch(certs, from)?;
        if self.tokens_pending() {
            self.flush()?;
        }
        let more = !docs.is_empty() || !evidence.is_empty();
        if more && !self.certified(from) {
            let peer = from
                .peer()
                .map_or_else(|| from.to_string(), |k| k.peer_id());
            tracing::warn!(%peer, documents = docs.len() + evidence.len(), "an uncertified peer sent documents other than certificates");
            self.flush_behind()?;
            return Err(MergeError::Uncertified { peer });
        }
        // Evidence of equivocations next, so that a batch carrying it and the equivocating
        // document is decided as if they had come in order; then locations and facilities,
        // so that the documents of a place below them are kept by a node certified for it.
        let (places, docs): (Vec<_>, Vec<_>) = docs
            .into_iter()
            .partition(|p| matches!(p.ty.as_str(), "Location" | "Organization"));
        for batch in [evidence, places, docs] {
            let places = batch
                .iter()
                .any(|p| matches!(p.ty.as_str(), "Location" | "Organization"));
            let r = self.merge_batch(batch, from)?;
            report.changed += r.changed;
            report.refused += r.refused;
            report.outside += r.outside;
            if places && r.changed > 0 {
                self.flush()?;
            }
            self.report_equivocations()?;
            if self.tokens_pending() {
                self.flush()?;
            }
            if !self.retractions.is_empty() {
                self.retract()
                    .map_err(|e| MergeError::Retract(Box::new(e)))?;
            }
        }
        if let Source::Peer(peer) = from
            && self.certified(from)
        {
            let accepted = std::mem::take(&mut self.scope.accepted);
            report.stale = self.note_stale(peer, &accepted)?;
        }
        // The commit overlaps the next batch; the engine thread waits for it before replying.
        self.flush_behind()?;
        Ok(report)
    }

    /// Writes the evidence of the equivocations met while merging (an `AuditEvent` each, which
    /// syncs to every node); learnt once durable like a certificate. A node that may not write
    /// evidence (no valid certificate) only logs it.
    fn report_equivocations(&mut self) -> Result<(), MergeError> {
        for (token, e) in std::mem::take(&mut self.equivocations) {
            let recorded = fieldmesh_fhir_docs::resource::format_instant(self.me.time());
            let resource = fieldmesh_trust::evidence_resource(&token, &e, &recorded);
            match self.create(resource, Some("AuditEvent"), false, &|_| None) {
                Ok(id) => {
                    tracing::warn!(evidence = %id, key = %hex::encode(&e.key[..8]), doc = %uuid::Uuid::from_bytes(e.doc), seq = e.seq, "a key equivocated: evidence written");
                }
                Err(WriteError::Forbidden(why)) => {
                    tracing::warn!(key = %hex::encode(&e.key[..8]), doc = %uuid::Uuid::from_bytes(e.doc), seq = e.seq, %why, "a key equivocated; this node may not write the evidence");
                }
                Err(other) => return Err(MergeError::Evidence(Box::new(other))),
            }
        }
        Ok(())
    }

    /// The reach a document new to this node must be within to be kept, when it comes from a
    /// peer (`None`: anything is kept; a file or this node's own data is taken whole, and a node
    /// that holds no certificate of its own, which certified peers send only certificates, is
    /// not limited).
    fn reach_for_receiving(&mut self, from: &Source) -> Result<Option<Reach>, StoreError> {
        let me = self.me.public();
        if !matches!(from, Source::Peer(_))
            || (self.trust.certificates(&me).is_empty() && me != self.me.root)
        {
            return Ok(None);
        }
        Ok(Some(self.my_reach()?).filter(|r| *r != Reach::All))
    }

    fn merge_batch(
        &mut self,
        docs: Vec<DocPayload>,
        from: &Source,
    ) -> Result<MergeReport, MergeError> {
        // Documents new to this node are prepared on every core; the received bytes are stored
        // as they came, without a second save.
        let mut fresh = Vec::new();
        let mut known = Vec::new();
        let mut seen = HashSet::new();
        let ids: Vec<DocId> = docs
            .iter()
            .map(|p| DocId(uuid::Uuid::from_bytes(p.id)))
            .collect();
        let metas = self.metas_of(&ids)?;
        for ((p, id), meta) in docs.into_iter().zip(ids).zip(metas) {
            // A record this (damaged) store cannot read counts as held: merging into it then
            // refuses that one document, not the session.
            let held = match meta {
                Ok(meta) => meta.is_some(),
                Err(StoreError::Corrupt(_)) => true,
                Err(e) => return Err(e.into()),
            };
            if seen.insert(id) && !held {
                fresh.push(p);
            } else {
                known.push(p);
            }
        }
        let (trust, policy, time) = (&self.trust, self.policy.as_ref(), self.me.time());
        let limits = &self.limits;
        let at_receipt = self.canonical_at_receipt.then(|| AtReceipt {
            me: &self.me,
            seen: trust.revocations_held(),
            store: self.store.as_ref(),
        });
        // On every core, a slice of documents at a time (so that few loaded documents are in
        // memory at once): load them, check every signature of the slice at once, then decide
        // and read them. Each document's bytes are bounded before anything is built from them (a
        // few kilobytes may describe millions of operations), and a slice is cut by the
        // operations they hold: each core's share of RECEIVE_OPS_AT_ONCE, a document over it
        // alone, while no other slice is loaded.
        let shapes = par_map(&fresh, self.threads, |p| inspect(&p.data, limits))
            .ok_or(MergeError::Thread)?;
        let budget = (RECEIVE_OPS_AT_ONCE / self.threads.max(1) as u64).max(1);
        let prepare_slice = |slice: &std::ops::Range<usize>| -> Vec<Result<Received, Refusal>> {
            let (group, shapes) = (&fresh[slice.clone()], &shapes[slice.clone()]);
            let loaded: Vec<_> = group
                .iter()
                .zip(shapes)
                .map(|(p, shape)| load_received(p, shape))
                .collect();
            let verified = match contain(|| Ok(verify_slice(trust, group, &loaded)), |e| e) {
                Ok(v) => v,
                Err(e) => {
                    return group
                        .iter()
                        .map(|_| Err(Refusal::Panicked(e.clone())))
                        .collect();
                }
            };
            group
                .iter()
                .zip(loaded)
                .zip(verified)
                .map(|((p, loaded), verified)| {
                    prepare_loaded(
                        p,
                        loaded?,
                        &verified,
                        trust,
                        policy,
                        time,
                        at_receipt.as_ref(),
                    )
                })
                .collect()
        };
        let mut prepared: Vec<Result<Received, Refusal>> = Vec::with_capacity(fresh.len());
        for batch in slice_batches(&shapes, budget) {
            match batch {
                SliceBatch::Shared(slices) => prepared.extend(
                    par_map_each(&slices, self.threads, prepare_slice)
                        .ok_or(MergeError::Thread)?
                        .into_iter()
                        .flatten(),
                ),
                SliceBatch::Alone(slice) => prepared.extend(prepare_slice(&slice)),
            }
        }
        let mut report = MergeReport::default();
        let reach = self.reach_for_receiving(from)?;
        for (p, prepared) in fresh.iter().zip(prepared) {
            match prepared {
                Ok(r) => {
                    if !r.rejected.is_empty() {
                        report.refused += 1;
                        self.quarantine(p, from, r.rejected);
                    }
                    if let Some(d) = r.doc {
                        let keep = match &reach {
                            Some(reach) => self.keeps_new(reach, &d)?,
                            None => true,
                        };
                        if !keep {
                            tracing::debug!(source = %from, doc = %d.id, ty = %d.meta.ty, "a peer sent a document outside this node's scope: not kept");
                            report.outside += 1;
                            if let Source::Peer(peer) = from {
                                // This node's reach may still be growing (its locations came in
                                // this session): no checkpoint, and one more session.
                                self.scope.unchecked.insert(*peer);
                                *self.scope.stale_found.entry(*peer).or_default() += 1;
                            }
                            continue;
                        }
                        self.scope.accepted.push(*d.id.as_bytes());
                        if let Some(facts) = r.canonical {
                            self.canonical_given.insert(d.id, facts);
                        }
                        self.stage_received(d, from.clone());
                        report.changed += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(source = %from, doc = %uuid::Uuid::from_bytes(p.id), ty = %p.ty, bytes = p.data.len(), error = %e, "refused a document");
                    report.refused += 1;
                }
            }
        }
        if known.iter().any(|p| {
            self.dirty
                .contains_key(&DocId(uuid::Uuid::from_bytes(p.id)))
        }) {
            // The batch carried a document twice: commit the first copy before merging the next.
            self.flush()?;
        }
        for p in known {
            let id = DocId(uuid::Uuid::from_bytes(p.id));
            match self.merge_one(id, &p, from) {
                Ok((doc_changed, rejected)) => {
                    if rejected.is_empty() {
                        self.scope.accepted.push(p.id);
                    }
                    report.changed += usize::from(doc_changed);
                    if !rejected.is_empty() {
                        report.refused += 1;
                        self.quarantine(&p, from, rejected);
                    }
                }
                Err(MergeOne::Engine(e)) => return Err(e),
                Err(MergeOne::Refused(e)) => {
                    tracing::warn!(source = %from, doc = %id, ty = %p.ty, bytes = p.data.len(), error = %e, "refused a document");
                    report.refused += 1;
                }
            }
        }
        Ok(report)
    }

    /// Keeps the refused changes of a payload in quarantine: one record for the payload, whatever
    /// the number of changes, the payload kept once (the store dedups and bounds it).
    fn quarantine(&mut self, p: &DocPayload, from: &Source, rejected: Refused) {
        if rejected.is_empty() {
            return;
        }
        if let Source::Peer(peer) = from
            && rejected
                .iter()
                .any(|(_, r)| matches!(r, Rejection::UnknownKey { .. }))
        {
            // Its author's certificate may come later in this session, or only in another:
            // no checkpoint, so the next session reconciles everything and offers it again.
            self.scope.unchecked.insert(*peer);
        }
        let hash = payload_hash(p);
        if self.refused.put(hash, ()).is_some() {
            return;
        }
        let doc = uuid::Uuid::from_bytes(p.id);
        const SHOWN: usize = 8;
        let mut reasons: Vec<String> = rejected
            .iter()
            .take(SHOWN)
            .map(|(hash, why)| format!("change {}: {why}", hex::encode(&hash[..6])))
            .collect();
        if rejected.len() > SHOWN {
            reasons.push(format!("and {} more", rejected.len() - SHOWN));
        }
        let reason = format!("{} {doc}: {}", p.ty, reasons.join("; "));
        tracing::warn!(source = %from, doc = %doc, ty = %p.ty, changes = rejected.len(), bytes = p.data.len(), reason = %reason, "quarantined");
        let mut data = p.data.clone();
        data.extend_from_slice(&p.envelopes);
        self.push(
            Write::Quarantine(Quarantine {
                reason,
                from: from.to_string(),
                doc: p.id,
                ty: p.ty.clone(),
                changes: u32::try_from(rejected.len()).unwrap_or(u32::MAX),
                data,
            }),
            None,
        );
    }

    /// Merges a payload into a document this node holds; returns whether it changed and the
    /// changes refused.
    fn merge_one(
        &mut self,
        id: DocId,
        p: &DocPayload,
        from: &Source,
    ) -> Result<(bool, Refused), MergeOne> {
        let taken = self.take(&id).map_err(|e| match e {
            ReadError::Store(StoreError::Corrupt(why)) => {
                self.unreadable.insert(*id.as_bytes());
                MergeOne::Refused(Refusal::Damaged(why))
            }
            ReadError::Store(s) => MergeOne::Engine(s.into()),
            ReadError::Commit(c) => MergeOne::Engine(c.into()),
            ReadError::Document(d) => MergeOne::Refused(Refusal::Unreadable(d)),
            ReadError::Damaged(why) => MergeOne::Refused(Refusal::Panicked(why)),
            ReadError::NotFound { ty, .. } | ReadError::Unsupported(ty) => {
                MergeOne::Refused(Refusal::WrongType(ty))
            }
        })?;
        let Some(mut live) = taken else {
            let time = self.me.time();
            // (A document thought held but gone: the services give it its canonical id.)
            let r = prepare_received(
                p,
                &self.trust,
                self.policy.as_ref(),
                &self.limits,
                time,
                None,
            )
            .map_err(MergeOne::Refused)?;
            let reach = self
                .reach_for_receiving(from)
                .map_err(|e| MergeOne::Engine(e.into()))?;
            let d = match (r.doc, &reach) {
                (Some(d), Some(reach)) => self
                    .keeps_new(reach, &d)
                    .map_err(|e| MergeOne::Engine(e.into()))?
                    .then_some(d),
                (d, _) => d,
            };
            let changed = d.is_some();
            if let Some(d) = d {
                self.stage_received(d, from.clone());
            }
            return Ok((changed, r.rejected));
        };
        let was_dirty = self.has_pending_write(&id);
        let result = self.merge_live(id, &mut live, p, from);
        if let Err(Refusal::Panicked(_)) = &result {
            // The live copy may be in any state: commit what was staged for it and read it from
            // the store when it is next needed.
            drop(live);
            self.flush().map_err(|e| MergeOne::Engine(e.into()))?;
            return result.map_err(MergeOne::Refused);
        }
        let dirty = was_dirty || matches!(result, Ok((true, _)));
        self.put_back(id, live, dirty);
        result.map_err(MergeOne::Refused)
    }

    fn merge_live(
        &mut self,
        id: DocId,
        live: &mut Live,
        p: &DocPayload,
        from: &Source,
    ) -> Result<(bool, Refused), Refusal> {
        if live.meta.ty != p.ty {
            return Err(Refusal::TypeChanged {
                held: live.meta.ty.clone(),
                sent: p.ty.clone(),
            });
        }
        let chunks = live.meta.chunks;
        let limits = self.limits;
        let doc = live.doc(&id)?;
        // Bounded before anything is built, alone and once added to the copy held here.
        let shape = inspect(&p.data, &limits)?;
        let held = doc.stats();
        if held.num_ops.saturating_add(shape.ops) > limits.ops {
            return Err(TooLarge::Ops { limit: limits.ops }.into());
        }
        if held.num_changes.saturating_add(shape.changes) > limits.changes {
            return Err(TooLarge::Changes {
                limit: limits.changes,
            }
            .into());
        }
        let before = doc.get_heads();
        let (trust, policy) = (&self.trust, self.policy.as_ref());
        let checked = contain(
            || -> Result<Probe, Refusal> {
                let mut probe = doc.fork();
                if let Err(e) = probe.load_incremental(&p.data) {
                    if let automerge::AutomergeError::DuplicateSeqNumber(seq, actor) = e {
                        // The author signed two different changes with one sequence number.
                        return Ok(Probe::Equivocated { seq, actor });
                    }
                    return Err(e.into());
                }
                if probe.get_heads() == before {
                    return Ok(Probe::Same);
                }
                let sent = type_of(&probe);
                if sent.as_deref() != Some(p.ty.as_str()) {
                    return Err(Refusal::TypeChanged {
                        held: p.ty.clone(),
                        sent: sent.unwrap_or_else(|| "nothing".into()),
                    });
                }
                let old_json = document_to_json(doc)?;
                let checked = check(
                    trust,
                    policy,
                    &id,
                    &p.ty,
                    probe,
                    Some((doc, &old_json)),
                    &p.envelopes,
                )?;
                if checked.json.get("resourceType").and_then(Value::as_str) != Some(p.ty.as_str()) {
                    return Err(Refusal::TypeChanged {
                        held: p.ty.clone(),
                        sent: "nothing".into(),
                    });
                }
                Ok(Probe::Checked(Box::new(checked)))
            },
            Refusal::Panicked,
        )?;
        let checked = match checked {
            Probe::Same => return Ok((false, Vec::new())),
            Probe::Equivocated { seq, actor } => {
                if let Some(proof) = evidence(id, doc, p, &actor, seq, self.store.as_ref()) {
                    self.equivocations.push(proof);
                }
                return Ok((false, vec![([0; 32], Rejection::Equivocation { seq })]));
            }
            Probe::Checked(c) => *c,
        };
        if checked.accepted == 0 {
            return Ok((false, checked.rejected));
        }
        *doc = checked.doc;
        // A fork gets a random actor; this node's own later edits must name its key.
        doc.set_actor(self.me.actor.clone());
        let (data, chunks) = saved_after_edit(doc, &before, chunks);
        let heads = heads_bytes(&doc.get_heads());
        // The authors of the accepted new changes, as the check found them.
        let authors = author_entries(&checked.authors);
        live.meta.chunks = chunks;
        live.meta.heads = heads;
        live.meta.updated = self.me.time();
        let mut entries = with_left(entries_of_json(&checked.json), &live.entries);
        entries.references.extend(authors);
        let previous = std::mem::replace(&mut live.entries, entries);
        self.learn(&checked.json);
        self.stage(
            &id,
            &live.meta,
            &live.entries,
            data,
            previous,
            checked.envelopes,
            from.clone(),
        );
        Ok((true, checked.rejected))
    }
}

/// Why merging one document stopped: the engine failed (the whole merge fails) or the document
/// was refused (the rest goes on).
enum MergeOne {
    Engine(MergeError),
    Refused(Refusal),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(ops: u64) -> Result<Shape, TooLarge> {
        Ok(Shape {
            ops,
            ..Shape::default()
        })
    }

    #[test]
    fn groups_are_cut_by_count_and_by_operations() {
        let group_ends = |shapes: &[Result<Shape, TooLarge>]| group_ends(shapes, 50_000);
        assert!(group_ends(&[]).is_empty());
        // Patients: by count.
        let patients: Vec<_> = (0..150).map(|_| shape(200)).collect();
        assert_eq!(group_ends(&patients), vec![64, 128, 150]);
        // Documents at the bounds of a document: one at a time, each alone.
        let heavy: Vec<_> = (0..3).map(|_| shape(60_000)).collect();
        assert_eq!(group_ends(&heavy), vec![1, 2, 3]);
        // A heavy one among light ones closes the group before it; refused ones count nothing.
        let mut mixed: Vec<_> = (0..10).map(|_| shape(4_000)).collect();
        mixed.insert(3, Err(TooLarge::Ops { limit: 1 }));
        assert_eq!(group_ends(&mixed), vec![11]);
        mixed[5] = shape(48_000);
        assert_eq!(group_ends(&mixed), vec![5, 6, 11]);
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // a slice of one document is one range
    fn a_document_over_a_cores_share_is_prepared_alone() {
        use SliceBatch::{Alone, Shared};
        assert!(slice_batches(&[], 100).is_empty());
        // Light documents: slices shared among the cores.
        let light: Vec<_> = (0..70).map(|_| shape(10)).collect();
        assert_eq!(
            slice_batches(&light, 100_000),
            vec![Shared(vec![0..64, 64..70])]
        );
        // Heavy ones (over the share, as a frame crafted at the bounds would carry): each alone,
        // in order, never beside another slice.
        let mut mixed: Vec<_> = (0..4).map(|_| shape(10)).collect();
        mixed.insert(1, shape(150_000));
        mixed.push(shape(150_000));
        mixed.push(shape(150_000));
        assert_eq!(
            slice_batches(&mixed, 100_000),
            vec![
                Shared(vec![0..1]),
                Alone(1..2),
                Shared(vec![2..5]),
                Alone(5..6),
                Alone(6..7),
            ]
        );
        // At the share exactly: shared.
        assert_eq!(
            slice_batches(&[shape(100_000)], 100_000),
            vec![Shared(vec![0..1])]
        );
    }
}
