//! Bulk loads: many local creates prepared on every core at once.
//!
//! `fieldmesh load` hands the engine NDJSON lines in batches; each batch is prepared on every core
//! (parse, validate, check business numbers against the deployment's rule, translate references
//! against a read-only view of the store plus what is staged, check against this node's
//! certificate, build, sign and encode the Automerge document), staged in order, and committed on
//! a background thread while the next batch is prepared. Policies, coverages and payments are
//! prepared in a second pass over the batch, once what they concern is staged
//! ([`Engine::create_lines`]).

use std::collections::HashMap;
use std::num::NonZeroUsize;

use fieldmesh_fhir_docs::limits::{DocLimits, check_json};
use fieldmesh_fhir_docs::openimis::{DEPENDENT_TYPES, places_taken_from};
use fieldmesh_fhir_docs::{
    DocId, IdentKey, Resolver, ValidationError, document_to_json, new_document, prepare,
};
use fieldmesh_storage::{DocMeta, Store};
use fieldmesh_trust::{Policy, Trust, token_of};
use serde_json::Value;

use crate::Engine;
use crate::core::PreparedDoc;
use crate::core::{Live, heads_bytes, resolve_identifier};
use crate::error::WriteError;
use crate::identity::NodeIdentity;
use crate::par::par_map;
use crate::source::Source;
use crate::write::{
    authorize, check_number, declare_found_places, entries_of, held_at, sign_heads, takes_places_of,
};

/// Parses a JSON body into a resource, naming where it breaks.
pub fn parse_json(body: &[u8]) -> Result<Value, ValidationError> {
    serde_json::from_slice::<Value>(body).map_err(|e| {
        ValidationError::one(
            "(body)",
            format!(
                "is not valid JSON: {e} (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })
}

/// Read-only reference resolution for parallel preparation: the store plus the documents staged
/// but not yet committed.
struct View<'a> {
    store: &'a dyn Store,
    staged: &'a HashMap<DocId, Live>,
    in_flight: &'a HashMap<DocId, Live>,
    /// The places of staged documents this load prepared ([`Engine::bulk_places`]).
    places: &'a HashMap<DocId, Vec<Value>>,
    /// The documents of the batch being prepared that are staged, with their lines.
    batch: &'a HashMap<DocId, usize>,
}

impl View<'_> {
    fn staged(&self, id: &DocId) -> Option<&Live> {
        self.staged.get(id).or_else(|| self.in_flight.get(id))
    }

    /// The `valueReference`s of the places document `id` (a `ty`) is held at, as
    /// [`Engine::declare_places`] reads them; `Ok(None)` for a staged document whose places this
    /// load does not know (it is prepared in order, by the engine).
    fn places_of(&self, ty: &str, id: &DocId) -> Result<Option<Vec<Value>>, WriteError> {
        if self.staged(id).is_some() {
            return Ok(self.places.get(id).cloned());
        }
        let Some(bytes) = self.store.doc_bytes(id.as_bytes())? else {
            return Ok(Some(Vec::new()));
        };
        // A document that does not load or read is passed over, as the engine passes it over.
        let json = crate::error::contain(
            || -> Result<_, String> {
                let doc = automerge::AutoCommit::load(&bytes).map_err(|e| e.to_string())?;
                document_to_json(&doc).map_err(|e| e.to_string())
            },
            |panic| panic,
        );
        Ok(Some(
            json.map_or_else(|_| Vec::new(), |json| held_at(ty, &json)),
        ))
    }
}

impl Resolver for View<'_> {
    fn local(&self, ty: &str, id: &str) -> Option<IdentKey> {
        let doc_id = DocId::parse(id)?;
        let (t, origin) = match self.staged(&doc_id) {
            Some(l) => (l.meta.ty.clone(), l.meta.origin.clone()),
            None => {
                let m = self.store.doc_meta(doc_id.as_bytes()).ok()??;
                (m.ty, m.origin)
            }
        };
        (t == ty).then(|| IdentKey::new(origin, id))
    }

    fn find(&self, ty: &str, key: &IdentKey) -> Option<String> {
        let mut ids: Vec<DocId> = self
            .store
            .find(ty, &key.system, &key.value)
            .ok()?
            .into_iter()
            .map(|b| DocId(uuid::Uuid::from_bytes(b)))
            .collect();
        // Staged documents are found by their identifiers too, as the engine finds them.
        for (id, live) in self.staged.iter().chain(self.in_flight) {
            let hit = live.meta.ty == ty
                && live
                    .entries
                    .identifiers
                    .iter()
                    .any(|(s, v)| *s == key.system && *v == key.value);
            if hit && !ids.contains(id) {
                ids.push(*id);
            }
        }
        resolve_identifier(ids, ty, key, |id| match self.staged(id) {
            Some(l) => Some(l.meta.ty.clone()),
            None => Some(self.store.doc_meta(id.as_bytes()).ok()??.ty),
        })
    }
}

/// What preparing one NDJSON line gave.
enum Line {
    /// A document ready to stage, with the places it is held at if a dependent document may
    /// take them on.
    Ready(Box<PreparedDoc>, Option<Vec<Value>>),
    /// A [`DEPENDENT_TYPES`] document, with the id it asks for: prepared once the rest of its
    /// batch is staged, seeing only what came before it.
    Later(Option<DocId>),
    /// Prepared in order, by the engine.
    InOrder,
}

/// What every line of a batch is prepared with.
struct Ctx<'a> {
    view: View<'a>,
    me: &'a NodeIdentity,
    trust: &'a Trust,
    policy: &'a dyn Policy,
    check_local: bool,
    limits: &'a DocLimits,
    numbers: Option<&'a crate::central::NumberConfig>,
}

/// Prepares one NDJSON line as a new document (validation, business number rule, reference
/// translation, authority, Automerge, signature, encoding). A [`DEPENDENT_TYPES`] document is
/// [`Line::Later`] unless `at` gives its line in the batch: then it declares the places of the
/// insurees and families it concerns that came before it, read from this load's staged
/// documents or from the store, as one create at a time would.
fn prepare_line(ctx: &Ctx<'_>, line: &str, at: Option<usize>) -> Result<Line, WriteError> {
    let view = &ctx.view;
    let resource = parse_json(line.as_bytes())?;
    check_json(&resource, ctx.limits)?;
    let dependent = |ty: &str| DEPENDENT_TYPES.contains(&ty);
    let given = resource
        .get("id")
        .and_then(Value::as_str)
        .and_then(DocId::parse);
    if at.is_none()
        && resource
            .get("resourceType")
            .and_then(Value::as_str)
            .is_some_and(dependent)
    {
        return Ok(Line::Later(given));
    }
    let id = match given {
        Some(given)
            if view.staged(&given).is_none()
                && view.store.doc_meta(given.as_bytes())?.is_none() =>
        {
            given
        }
        _ => DocId::new(),
    };
    let mut prepared = prepare(resource, None, &ctx.me.system, &id, view, &|_| None)?;
    check_number(ctx.numbers, &prepared)?;
    if dependent(&prepared.ty) {
        let Some(at) = at else {
            return Ok(Line::Later(given));
        };
        let mut found: Vec<Value> = Vec::new();
        let mut read: Vec<DocId> = Vec::new();
        for r in &prepared.references {
            if !takes_places_of(&prepared.ty, &r.ty) {
                continue;
            }
            // One dependent document read by another may be in this very batch.
            if dependent(&r.ty) {
                return Ok(Line::InOrder);
            }
            let Some(target) = view.find(&r.ty, &r.key).and_then(|t| DocId::parse(&t)) else {
                continue;
            };
            // A document of a later line is not there yet for this one; one named twice (the
            // head of the family) is read once.
            if view.batch.get(&target).is_some_and(|&line| line > at) || read.contains(&target) {
                continue;
            }
            read.push(target);
            match view.places_of(&r.ty, &target)? {
                Some(places) => found.extend(places),
                None => return Ok(Line::InOrder),
            }
        }
        declare_found_places(
            ctx.trust,
            ctx.policy,
            ctx.me,
            ctx.check_local,
            &mut prepared,
            found,
        )?;
    }
    if ctx.check_local {
        authorize(
            ctx.trust,
            ctx.policy,
            ctx.me,
            &id,
            &prepared.ty,
            None,
            &prepared.json,
        )?;
    }
    let places = (places_taken_from(&prepared.ty)).then(|| held_at(&prepared.ty, &prepared.json));
    let me = ctx.me;
    let mut doc = new_document(&prepared.json, me.actor.clone(), me.time())?;
    let envelopes = sign_heads(me, ctx.trust, &id, &prepared.ty, &mut doc);
    let prepared_doc = PreparedDoc {
        envelopes,
        token: token_of(&prepared.json).map(String::from),
        id,
        meta: DocMeta {
            ty: prepared.ty.clone(),
            origin: me.system.clone(),
            chunks: 1,
            seq: 0,
            heads: heads_bytes(&doc.get_heads()),
            updated: me.time(),
        },
        entries: {
            let mut e = entries_of(&prepared);
            e.references.push(crate::core::author_entry(&me.public()));
            e
        },
        bytes: fieldmesh_storage::codec::encode(&doc.save_nocompress())?,
    };
    Ok(Line::Ready(Box::new(prepared_doc), places))
}

impl Engine {
    /// Creates one resource per NDJSON line, preparing them on `threads` threads at once, and
    /// stages them in order (bulk loads: the documents do not stay in memory). Returns one result
    /// per line.
    ///
    /// Policies, coverages and payments ([`DEPENDENT_TYPES`]) are prepared in a second pass,
    /// once the rest of the batch is staged: they declare the places of the families they
    /// concern, which this load keeps for the documents it staged.
    pub fn create_lines(
        &mut self,
        lines: &[String],
        threads: usize,
    ) -> Vec<Result<DocId, WriteError>> {
        let threads = NonZeroUsize::new(threads).map_or(1, NonZeroUsize::get);
        // Places of documents committed since are read from the store again.
        let (dirty, in_flight) = (&self.dirty, &self.in_flight);
        self.bulk_places
            .retain(|id, _| dirty.contains_key(id) || in_flight.contains_key(id));
        self.bulk_load = true;
        let mut out: Vec<Option<Result<DocId, WriteError>>> =
            std::iter::repeat_with(|| None).take(lines.len()).collect();
        let mut batch: HashMap<DocId, usize> = HashMap::new();
        let all: Vec<usize> = (0..lines.len()).collect();
        let mut later = Vec::new();
        // Ids asked for by dependent lines before the one being staged: theirs, as one create
        // at a time would give them.
        let mut asked: Vec<DocId> = Vec::new();
        for (i, line) in self.prepare_lines(lines, &all, threads, &batch, false) {
            let staged = match line {
                Ok(Line::Later(given)) => {
                    later.push(i);
                    asked.extend(given);
                    continue;
                }
                Ok(Line::Ready(p, _)) if asked.contains(&p.id) => {
                    self.create_again(&lines[i], false)
                }
                line => self.stage_line(line, &lines[i]),
            };
            if let Ok(id) = &staged {
                batch.insert(*id, i);
            }
            out[i] = Some(staged);
        }
        for (i, line) in self.prepare_lines(lines, &later, threads, &batch, true) {
            out[i] = Some(self.stage_line(line, &lines[i]));
        }
        self.bulk_load = false;
        out.into_iter()
            .map(|r| r.unwrap_or(Err(WriteError::Thread)))
            .collect()
    }

    /// Prepares the lines at `which` on `threads` threads; `(index, result)` in order.
    fn prepare_lines(
        &self,
        lines: &[String],
        which: &[usize],
        threads: usize,
        batch: &HashMap<DocId, usize>,
        dependents: bool,
    ) -> Vec<(usize, Result<Line, WriteError>)> {
        if which.is_empty() {
            return Vec::new();
        }
        let ctx = Ctx {
            view: View {
                store: self.store.as_ref(),
                staged: &self.dirty,
                in_flight: &self.in_flight,
                places: &self.bulk_places,
                batch,
            },
            me: &self.me,
            trust: &self.trust,
            policy: self.policy.as_ref(),
            check_local: self.check_local,
            limits: &self.limits,
            numbers: self.numbers.as_ref(),
        };
        let results = par_map(which, threads, |&i| {
            prepare_line(&ctx, &lines[i], dependents.then_some(i))
        })
        .unwrap_or_else(|| which.iter().map(|_| Err(WriteError::Thread)).collect());
        which.iter().copied().zip(results).collect()
    }

    /// Stages one prepared line (or creates it in order, by the engine).
    fn stage_line(
        &mut self,
        line: Result<Line, WriteError>,
        text: &str,
    ) -> Result<DocId, WriteError> {
        match line? {
            // A document that must be read in order (a dependent one is never left for later
            // here).
            Line::InOrder | Line::Later(_) => self.create_again(text, true),
            // Two lines of one batch claimed the same id: prepare the later one again.
            Line::Ready(p, _)
                if self.dirty.contains_key(&p.id) || self.in_flight.contains_key(&p.id) =>
            {
                self.create_again(text, false)
            }
            Line::Ready(p, places) => {
                let id = p.id;
                self.stage_received(*p, Source::Local);
                if let Some(places) = places {
                    self.bulk_places.insert(id, places);
                }
                Ok(id)
            }
        }
    }

    /// Creates a line's resource by the engine, one at a time (`keep_id`: under the id it
    /// gives, if that is free).
    fn create_again(&mut self, text: &str, keep_id: bool) -> Result<DocId, WriteError> {
        let resource = parse_json(text.as_bytes())?;
        self.create(resource, None, keep_id, &|_| None)
    }
}
