//! Bulk loads: many local creates prepared on every core at once.
//!
//! `fieldmesh load` hands the engine NDJSON lines in batches; each batch is prepared on every core
//! (parse, validate, translate references against a read-only view of the store plus what is
//! staged, check against this node's certificate, build, sign and encode the Automerge document),
//! staged in order, and committed on a background thread while the next batch is prepared.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use fieldmesh_fhir_docs::limits::{DocLimits, check_json};
use fieldmesh_fhir_docs::openimis::DEPENDENT_TYPES;
use fieldmesh_fhir_docs::{DocId, IdentKey, Resolver, ValidationError, new_document, prepare};
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
use crate::write::{authorize, entries_of, sign_heads};

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
}

impl View<'_> {
    fn staged(&self, id: &DocId) -> Option<&Live> {
        self.staged.get(id).or_else(|| self.in_flight.get(id))
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
        let ids: Vec<DocId> = self
            .store
            .find(ty, &key.system, &key.value)
            .ok()?
            .into_iter()
            .map(|b| DocId(uuid::Uuid::from_bytes(b)))
            .collect();
        resolve_identifier(ids, ty, key, |id| match self.staged(id) {
            Some(l) => Some(l.meta.ty.clone()),
            None => Some(self.store.doc_meta(id.as_bytes()).ok()??.ty),
        })
    }
}

/// Prepares one NDJSON line as a new document (validation, reference translation, authority,
/// Automerge, signature, encoding). `None` for a document that must be prepared in order, with
/// the engine (one that lies where the family it concerns lies reads that family).
fn prepare_line(
    view: &View<'_>,
    me: &NodeIdentity,
    trust: &Trust,
    policy: Option<&dyn Policy>,
    limits: &DocLimits,
    line: &str,
) -> Result<Option<PreparedDoc>, WriteError> {
    let resource = parse_json(line.as_bytes())?;
    check_json(&resource, limits)?;
    let id = match resource
        .get("id")
        .and_then(Value::as_str)
        .and_then(DocId::parse)
    {
        Some(given)
            if view.staged(&given).is_none()
                && view.store.doc_meta(given.as_bytes())?.is_none() =>
        {
            given
        }
        _ => DocId::new(),
    };
    let prepared = prepare(resource, None, &me.system, &id, view, &|_| None)?;
    if DEPENDENT_TYPES.contains(&prepared.ty.as_str()) {
        return Ok(None);
    }
    if let Some(policy) = policy {
        authorize(trust, policy, me, &id, &prepared.ty, None, &prepared.json)?;
    }
    let mut doc = new_document(&prepared.json, me.actor.clone(), me.time())?;
    let envelopes = sign_heads(me, trust, &id, &prepared.ty, &mut doc);
    Ok(Some(PreparedDoc {
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
    }))
}

impl Engine {
    /// Creates one resource per NDJSON line, preparing them on `threads` threads at once, and
    /// stages them in order (bulk loads: the documents do not stay in memory). Returns one result
    /// per line.
    pub fn create_lines(
        &mut self,
        lines: &[String],
        threads: usize,
    ) -> Vec<Result<DocId, WriteError>> {
        let prepared: Vec<Result<Option<PreparedDoc>, WriteError>> = {
            let view = View {
                store: self.store.as_ref(),
                staged: &self.dirty,
                in_flight: &self.in_flight,
            };
            let policy: Option<&dyn Policy> = self.check_local.then_some(self.policy.as_ref());
            let (me, trust, limits) = (&self.me, &self.trust, &self.limits);
            let threads = NonZeroUsize::new(threads).map_or(1, NonZeroUsize::get);
            match par_map(lines, threads, |l| {
                prepare_line(&view, me, trust, policy, limits, l)
            }) {
                Some(out) => out,
                None => {
                    return lines.iter().map(|_| Err(WriteError::Thread)).collect();
                }
            }
        };
        self.bulk_load = true;
        let out = prepared
            .into_iter()
            .zip(lines)
            .map(|(p, line)| match p {
                // Two lines of one batch claimed the same id (prepare the later one again), or a
                // document that reads others.
                Ok(None) => {
                    let resource = parse_json(line.as_bytes())?;
                    self.create(resource, None, true, &|_| None)
                }
                Ok(Some(p))
                    if self.dirty.contains_key(&p.id) || self.in_flight.contains_key(&p.id) =>
                {
                    let resource = parse_json(line.as_bytes())?;
                    self.create(resource, None, false, &|_| None)
                }
                Ok(Some(p)) => {
                    let id = p.id;
                    self.stage_received(p, Source::Local);
                    Ok(id)
                }
                Err(e) => Err(e),
            })
            .collect();
        self.bulk_load = false;
        out
    }
}
