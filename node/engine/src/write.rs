//! Local writes: create and update, checked against this node's own certificate and signed.
//!
//! A write is validated (openIMIS profile), its references translated to logical ones, checked
//! against this node's certificate (403 before anything is written), turned into one Automerge
//! change by this node's key, signed, and staged. The caller commits ([`Engine::flush`]) before it
//! acknowledges.

use automerge::AutoCommit;
use fieldmesh_fhir_docs::identifiers::OPENIMIS_IDENTIFIER_TYPES;
use fieldmesh_fhir_docs::limits::check_json;
use fieldmesh_fhir_docs::openimis::numbers::NumberKind;
use fieldmesh_fhir_docs::openimis::{
    DEPENDENT_TYPES, declare_places, place_references, places_taken_from,
};
use fieldmesh_fhir_docs::resource::format_instant;
use fieldmesh_fhir_docs::{
    DocId, Prepared, Resolver, ValidationError, apply_diff, document_to_json, new_document,
    prepare, profile, render, version_id,
};
use fieldmesh_storage::{DocData, DocMeta, IndexEntries};
use fieldmesh_trust::{Envelope, Policy, Trust, claimed_identity, places_at};
use serde_json::{Map, Value};

use crate::Engine;
use crate::core::{Live, author_entry, derived_entries, heads_bytes, saved_after_edit, with_left};
use crate::error::{DocError, ReadError, WriteError};
use crate::identity::NodeIdentity;
use crate::read::Served;
use crate::source::Source;

/// A document's resource type and stored JSON.
pub(crate) type TypedJson = (String, Map<String, Value>);

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new resource.
    Created,
    /// An existing resource changed.
    Updated,
    /// The update changed nothing.
    Unchanged,
}

pub(crate) fn entries_of(p: &Prepared) -> IndexEntries {
    let mut references: Vec<(String, String, String)> = p
        .references
        .iter()
        .map(|r| (r.ty.clone(), r.key.system.clone(), r.key.value.clone()))
        .collect();
    references.extend(derived_entries(&p.ty, &p.json));
    IndexEntries {
        identifiers: p
            .identifiers
            .iter()
            .map(|k| (k.system.clone(), k.value.clone()))
            .collect(),
        references,
    }
}

/// What a write changes from: the places of the document (if it names any) and its state.
pub(crate) type Before<'a> = Option<(Option<&'a [String]>, &'a Map<String, Value>)>;

/// Whether `me`'s certificate allows writing document `doc`, a `ty` that lies at `before` (its
/// places, if it existed: [`places_at`]) and then reads `after`; the same decision its peers
/// will take on the change.
#[allow(clippy::too_many_arguments)]
pub(crate) fn authorize(
    trust: &Trust,
    policy: &dyn Policy,
    me: &NodeIdentity,
    doc: &DocId,
    ty: &str,
    before: Before<'_>,
    after: &Map<String, Value>,
) -> Result<(), WriteError> {
    let authority = trust
        .authority(&me.public(), me.time(), trust.revocations_held())
        .map_err(WriteError::Forbidden)?;
    authority
        .permits(policy, ty, before.map(|b| b.0), after)
        .map_err(WriteError::Forbidden)?;
    if authority
        .grants(policy, ty)
        .map_err(WriteError::Forbidden)?
    {
        claimed_identity(doc, before.map(|b| b.1), after).map_err(WriteError::Forbidden)?;
    }
    Ok(())
}

/// Refuses a business number of `prepared` that breaks the deployment's rule in `numbers`
/// (length, check digit), as openIMIS would.
pub(crate) fn check_number(
    numbers: Option<&crate::central::NumberConfig>,
    prepared: &Prepared,
) -> Result<(), WriteError> {
    let Some(kind) = NumberKind::of_type(&prepared.ty) else {
        return Ok(());
    };
    if let (Some(config), Some(number)) = (numbers, crate::central::business_number(&prepared.json))
    {
        config.rule(kind).check(kind, number).map_err(|e| {
            WriteError::Invalid(ValidationError::one(
                format!("{}.identifier", prepared.ty),
                format!("{e} (openIMIS error {})", e.code()),
            ))
        })?;
    }
    Ok(())
}

/// Whether a document of a [`DEPENDENT_TYPES`] type `ty` takes on the places of a `target` it
/// points at. An adjudication lies where its claim does (the facility), not at the insuree's
/// village.
pub(crate) fn takes_places_of(ty: &str, target: &str) -> bool {
    places_taken_from(target) && (ty != "ClaimResponse" || target == "Claim")
}

/// The `valueReference`s of the places a `ty` reading `json` is held at.
pub(crate) fn held_at(ty: &str, json: &Map<String, Value>) -> Vec<Value> {
    place_references(ty, json)
        .into_iter()
        .flatten()
        .map(|(v, _)| v.clone())
        .collect()
}

/// Declares `found`, the places of the insurees and families a [`DEPENDENT_TYPES`] document
/// `prepared` concerns, on it (and indexes them). A device whose writes are scoped must name an
/// insuree or family it holds: finding none refuses the document.
pub(crate) fn declare_found_places(
    trust: &Trust,
    policy: &dyn Policy,
    me: &NodeIdentity,
    check_local: bool,
    prepared: &mut Prepared,
    found: Vec<Value>,
) -> Result<(), WriteError> {
    if found.is_empty() {
        if check_local && scoped_writer(trust, policy, me, &prepared.ty)? {
            return Err(ValidationError::one(
                prepared.ty.clone(),
                "names no insuree or family this device holds: a policy, coverage or payment \
                 lies where the family it concerns lives"
                    .to_string(),
            )
            .into());
        }
        return Ok(());
    }
    declare_places(&mut prepared.json, found);
    // The declared places are references too: index them like the rest.
    prepared.references = fieldmesh_fhir_docs::references::targets_in(&prepared.json);
    Ok(())
}

/// Whether `me`'s certificate limits its writes of `ty` to its scope (an error if it may not
/// write a `ty` at all).
fn scoped_writer(
    trust: &Trust,
    policy: &dyn Policy,
    me: &NodeIdentity,
    ty: &str,
) -> Result<bool, WriteError> {
    trust
        .authority(&me.public(), me.time(), trust.revocations_held())
        .and_then(|a| a.grants(policy, ty))
        .map_err(WriteError::Forbidden)
}

/// Signs the change a local commit just made (the document's single head) in document `id` of
/// type `ty`.
pub(crate) fn sign_heads(
    me: &NodeIdentity,
    trust: &Trust,
    id: &DocId,
    ty: &str,
    doc: &mut AutoCommit,
) -> Vec<u8> {
    let seen = trust.revocations_held();
    let mut out = Vec::new();
    for h in doc.get_heads() {
        Envelope::sign(&me.key, id.as_bytes(), ty, h.0, seen).encode_into(&mut out);
    }
    out
}

impl Engine {
    /// For a document of a [`DEPENDENT_TYPES`] type (a policy, its coverage, a payment), declares
    /// the places of the insurees and families it concerns, read from them here: that is where
    /// the document lies for the trust decision (and for partial replication). A device whose
    /// writes are scoped must name an insuree or family it holds.
    fn declare_places(&mut self, prepared: &mut Prepared) -> Result<(), WriteError> {
        if !DEPENDENT_TYPES.contains(&prepared.ty.as_str()) {
            return Ok(());
        }
        let mut found: Vec<Value> = Vec::new();
        for r in &prepared.references {
            let Some(id) = takes_places_of(&prepared.ty, &r.ty)
                .then(|| Resolver::find(&*self, &r.ty, &r.key))
                .flatten()
            else {
                continue;
            };
            let json = match self.with_doc(&r.ty, &id, |_, doc_id, live| {
                Ok(document_to_json(live.doc(doc_id)?)?)
            }) {
                Ok(json) => json,
                Err(ReadError::Store(e)) => return Err(e.into()),
                Err(ReadError::Commit(e)) => return Err(e.into()),
                Err(_) => continue,
            };
            found.extend(held_at(&r.ty, &json));
        }
        declare_found_places(
            &self.trust,
            self.policy.as_ref(),
            &self.me,
            self.check_local,
            prepared,
            found,
        )
    }

    /// A new Patient or Claim that comes without its business number (an identifier typed
    /// `Code`) takes the next one of the leases central gave this device, if it holds one with
    /// numbers left; central assigns one otherwise when the resource reaches it.
    fn number_from_lease(&mut self, resource: &mut Value) -> Result<(), WriteError> {
        let Some(kind) = resource
            .get("resourceType")
            .and_then(Value::as_str)
            .and_then(NumberKind::of_type)
        else {
            return Ok(());
        };
        let Some(map) = resource.as_object_mut() else {
            return Ok(());
        };
        if !self.check_local || crate::central::business_number(map).is_some() {
            return Ok(());
        }
        if let Some(number) = self.take_leased_number(kind)? {
            let code = serde_json::json!({"type": {"coding": [{"system": OPENIMIS_IDENTIFIER_TYPES, "code": "Code"}]},
                "value": number});
            match map.get_mut("identifier") {
                Some(Value::Array(list)) => list.push(code),
                _ => {
                    map.insert("identifier".into(), Value::Array(vec![code]));
                }
            }
        }
        Ok(())
    }

    /// Refuses a business number that breaks the deployment's rule (length, check digit), as
    /// openIMIS would, before anything is written: the officer retypes the card's number.
    fn check_number(&self, prepared: &Prepared) -> Result<(), WriteError> {
        check_number(self.numbers.as_ref(), prepared)
    }

    /// Creates a resource. `bundle_ids` resolves bundle-local `urn:uuid:` references.
    /// `keep_id` keeps the resource's own `id` as document id when it is a UUID not used here yet
    /// (loading exported data keeps its references working).
    pub fn create(
        &mut self,
        resource: Value,
        expected_type: Option<&str>,
        keep_id: bool,
        bundle_ids: &dyn Fn(&str) -> Option<(String, String)>,
    ) -> Result<DocId, WriteError> {
        let id = match resource
            .get("id")
            .and_then(Value::as_str)
            .and_then(DocId::parse)
        {
            Some(given) if keep_id && self.meta_of(&given)?.is_none() => given,
            _ => DocId::new(),
        };
        self.create_with_id(id, resource, expected_type, bundle_ids)
    }

    fn create_with_id(
        &mut self,
        id: DocId,
        resource: Value,
        expected_type: Option<&str>,
        bundle_ids: &dyn Fn(&str) -> Option<(String, String)>,
    ) -> Result<DocId, WriteError> {
        check_json(&resource, &self.limits)?;
        let mut resource = resource;
        self.number_from_lease(&mut resource)?;
        let mut prepared = prepare(
            resource,
            expected_type,
            &self.me.system,
            &id,
            &*self,
            bundle_ids,
        )?;
        self.check_number(&prepared)?;
        self.declare_places(&mut prepared)?;
        self.price_policy(&mut prepared, &id, None)?;
        let family = self.family_edits(&prepared.ty, &id, &prepared.json)?;
        self.authorize_family_edits(&family)?;
        if self.check_local {
            authorize(
                &self.trust,
                self.policy.as_ref(),
                &self.me,
                &id,
                &prepared.ty,
                None,
                &prepared.json,
            )?;
        }
        let verdict = self.check_claim(&mut prepared, &id)?;
        let doc = new_document(&prepared.json, self.me.actor.clone(), self.me.time())?;
        let ty = prepared.ty.clone();
        let origin = self.me.system.clone();
        self.learn(&prepared.json);
        let mut entries = entries_of(&prepared);
        entries.references.push(author_entry(&self.me.public()));
        self.stage_new(id, ty, origin, doc, entries);
        if let Some(v) = verdict {
            self.keep_verdict(&id, &v);
        }
        self.apply_family_edits(family)?;
        Ok(id)
    }

    /// Stages a document created here and keeps it staged.
    fn stage_new(
        &mut self,
        id: DocId,
        ty: String,
        origin: String,
        mut doc: AutoCommit,
        entries: IndexEntries,
    ) {
        let meta = DocMeta {
            ty,
            origin,
            chunks: 1,
            seq: 0,
            heads: heads_bytes(&doc.get_heads()),
            updated: self.me.time(),
        };
        let envelopes = sign_heads(&self.me, &self.trust, &id, &meta.ty, &mut doc);
        self.stage(
            &id,
            &meta,
            &entries,
            DocData::Full(doc.save_nocompress()),
            IndexEntries::default(),
            envelopes,
            Source::Local,
        );
        // Bulk loads give the live document's memory back at once.
        let doc = self.keep_flushed.then_some(doc);
        self.dirty.insert(
            id,
            Live {
                doc: doc.map(Box::new),
                meta,
                entries,
            },
        );
    }

    /// Updates (or, for an unused UUID, creates) the resource `ty/id` to read as `resource`,
    /// editing only what differs. `if_match` is the version the client last saw, if it says.
    pub fn update(
        &mut self,
        ty: &str,
        id: &str,
        resource: Value,
        if_match: Option<&str>,
    ) -> Result<(DocId, Outcome), WriteError> {
        if !profile::is_supported(ty) {
            return Err(WriteError::Unsupported(ty.into()));
        }
        if let Some(body_id) = resource.get("id").and_then(Value::as_str)
            && body_id != id
        {
            return Err(ValidationError::one(
                format!("{ty}.id"),
                format!("is {body_id:?} but the URL names {id:?}"),
            )
            .into());
        }
        let not_found = || WriteError::NotFound {
            ty: ty.into(),
            id: id.into(),
        };
        let doc_id = DocId::parse(id).ok_or_else(not_found)?;
        let Some(mut live) = self.take(&doc_id)? else {
            if if_match.is_some() {
                return Err(not_found());
            }
            let id = self.create_with_id(doc_id, resource, Some(ty), &|_| None)?;
            return Ok((id, Outcome::Created));
        };
        let was_dirty = self.has_pending_write(&doc_id);
        let result = self.update_live(ty, &doc_id, &mut live, resource, if_match);
        let dirty = was_dirty || matches!(result, Ok(Outcome::Updated));
        self.put_back(doc_id, live, dirty);
        result.map(|o| (doc_id, o))
    }

    fn update_live(
        &mut self,
        ty: &str,
        doc_id: &DocId,
        live: &mut Live,
        resource: Value,
        if_match: Option<&str>,
    ) -> Result<Outcome, WriteError> {
        if live.meta.ty != ty {
            return Err(WriteError::TypeMismatch {
                id: doc_id.to_string(),
                actual: live.meta.ty.clone(),
                asked: ty.into(),
            });
        }
        if let Some(expected) = if_match {
            let current = version_id(&live.doc(doc_id)?.get_heads());
            if expected != current {
                return Err(WriteError::VersionConflict {
                    expected: expected.into(),
                    current,
                });
            }
        }
        check_json(&resource, &self.limits)?;
        let mut prepared = prepare(
            resource,
            Some(ty),
            &live.meta.origin,
            doc_id,
            &*self,
            &|_| None,
        )?;
        self.check_number(&prepared)?;
        self.declare_places(&mut prepared)?;
        let old = document_to_json(live.doc(doc_id)?)?;
        self.price_policy(&mut prepared, doc_id, Some(&old))?;
        let doc = live.doc(doc_id)?;
        if old == prepared.json {
            return Ok(Outcome::Unchanged);
        }
        if self.check_local {
            let places = places_at(self.policy.as_ref(), ty, doc)
                .map_err(|e| WriteError::Document(DocError::from(e)))?;
            authorize(
                &self.trust,
                self.policy.as_ref(),
                &self.me,
                doc_id,
                ty,
                Some((places.as_deref(), &old)),
                &prepared.json,
            )?;
        }
        let verdict = self.check_claim(&mut prepared, doc_id)?;
        let family = self.family_edits(ty, doc_id, &prepared.json)?;
        self.authorize_family_edits(&family)?;
        let outcome =
            self.commit_edit(doc_id, live, &old, &prepared.json, entries_of(&prepared))?;
        if let (Outcome::Updated, Some(v)) = (&outcome, verdict) {
            self.keep_verdict(doc_id, &v);
        }
        self.apply_family_edits(family)?;
        Ok(outcome)
    }

    /// Edits the live document `doc_id` from reading `old` to reading `new` (one change by this
    /// node, signed) and stages it with its index entries `entries`.
    pub(crate) fn commit_edit(
        &mut self,
        doc_id: &DocId,
        live: &mut Live,
        old: &Map<String, Value>,
        new: &Map<String, Value>,
        entries: IndexEntries,
    ) -> Result<Outcome, WriteError> {
        let chunks = live.meta.chunks;
        let ty = live.meta.ty.clone();
        let doc = live.doc(doc_id)?;
        let heads_before = doc.get_heads();
        if apply_diff(doc, old, new)? == 0 {
            return Ok(Outcome::Unchanged);
        }
        doc.commit_with(automerge::transaction::CommitOptions::default().with_time(self.me.time()));
        let envelopes = sign_heads(&self.me, &self.trust, doc_id, &ty, doc);
        let (data, chunks) = saved_after_edit(doc, &heads_before, chunks);
        let heads = heads_bytes(&doc.get_heads());
        live.meta.chunks = chunks;
        live.meta.heads = heads;
        live.meta.updated = self.me.time();
        let mut entries = with_left(entries, &live.entries);
        entries.references.push(author_entry(&self.me.public()));
        let previous = std::mem::replace(&mut live.entries, entries);
        self.stage(
            doc_id,
            &live.meta,
            &live.entries,
            data,
            previous,
            envelopes,
            Source::Local,
        );
        Ok(Outcome::Updated)
    }

    /// The stored JSON of document `id` (staged writes included), if this node holds it.
    pub(crate) fn stored_json(&mut self, id: &DocId) -> Result<Option<TypedJson>, ReadError> {
        let Some(mut live) = self.take(id)? else {
            return Ok(None);
        };
        let was_dirty = self.has_pending_write(id);
        let json = live
            .doc(id)
            .map_err(ReadError::from)
            .and_then(|d| Ok(document_to_json(d)?));
        let ty = live.meta.ty.clone();
        self.put_back(*id, live, was_dirty);
        Ok(Some((ty, json?)))
    }

    /// Edits the preloaded document `id` ([`Engine::preload`]) from `old` to `new`, as
    /// [`Engine::edit_stored`] does. When `partial`, `old` holds only some root fields of it:
    /// `old` and `new` are those fields: the change touches only them, and the index entries
    /// they give (identifiers, references, places, flags, blocking keys) are replaced in the
    /// store, the others kept. The document is then not kept in memory (its entries there would
    /// be partial): it is read again when next needed.
    pub(crate) fn edit_loaded(
        &mut self,
        id: &DocId,
        mut live: Live,
        partial: bool,
        old: &Map<String, Value>,
        new: &Map<String, Value>,
    ) -> Result<Outcome, WriteError> {
        if partial {
            live.entries = crate::entries_of_json(old);
        }
        let result = self.commit_edit(id, &mut live, old, new, crate::entries_of_json(new));
        if partial {
            live.doc = None;
        }
        let dirty = matches!(result, Ok(Outcome::Updated));
        if dirty {
            self.dirty.insert(*id, live);
        } else if live.doc.is_some() {
            self.put_back(*id, live, false);
        }
        result
    }

    /// Edits document `id`, which reads `old`, to read `new`: one signed change by this node,
    /// staged. For central's services, which decide edits from what the store holds rather
    /// than from a client's request.
    pub(crate) fn edit_stored(
        &mut self,
        id: &DocId,
        old: &Map<String, Value>,
        new: &Map<String, Value>,
    ) -> Result<Outcome, WriteError> {
        let Some(mut live) = self.take(id)? else {
            return Err(WriteError::NotFound {
                ty: String::new(),
                id: id.to_string(),
            });
        };
        let was_dirty = self.has_pending_write(id);
        let result = self.commit_edit(id, &mut live, old, new, crate::entries_of_json(new));
        let dirty = was_dirty || matches!(result, Ok(Outcome::Updated));
        self.put_back(*id, live, dirty);
        result
    }

    /// The resource `ty/id` as this node holds it now, staged writes included: the answer to a
    /// write, sent once the write is durable. Reads for clients go through [`crate::Reader`],
    /// which sees committed data only.
    pub fn served(&mut self, ty: &str, id: &str) -> Result<Served, ReadError> {
        self.with_doc(ty, id, |me, doc_id, live| {
            let doc = live.doc(doc_id)?;
            let json = document_to_json(doc)?;
            let version = version_id(&doc.get_heads());
            let updated = (live.meta.updated > 0).then(|| format_instant(live.meta.updated));
            let resource = render(json, &doc_id.to_string(), &version, updated.as_deref(), me);
            Ok(Served {
                id: doc_id.to_string(),
                version,
                resource,
                notes: Vec::new(),
            })
        })
    }
}
