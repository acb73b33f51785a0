//! Reads and searches from committed data, off the write path.
//!
//! A [`Reader`] reads the store directly: a redb read transaction sees the last committed state
//! (and every commit is durable before it becomes visible), so a read never waits behind a batch
//! of writes and never shows a write that could still be lost. It keeps a small cache of
//! documents already read as JSON, checked against the document's heads on every read. Cloning a
//! reader is cheap; the node runs reads on a pool of blocking threads while its engine thread
//! writes.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use automerge::AutoCommit;
use fieldmesh_fhir_docs::references::targets_in;
use fieldmesh_fhir_docs::resource::format_instant;
use fieldmesh_fhir_docs::{
    Conflict, DocId, IdentKey, IdentifierQuery, Resolver, document_to_json, profile, render,
    version_id,
};
use fieldmesh_storage::{DocMeta, Store, StoreError};
use lru::LruCache;
use serde_json::{Map, Value};

use crate::core::resolve_identifier;
use crate::error::{DocError, ReadError, contain};

/// A resource as served to a client.
#[derive(Debug, Clone)]
pub struct Served {
    /// Local id.
    pub id: String,
    /// `meta.versionId`, also the ETag.
    pub version: String,
    /// The rendered resource.
    pub resource: Value,
    /// For the answer to a write: OperationOutcome issues about it (values the rules
    /// replaced, warnings); empty for reads.
    pub notes: Vec<Value>,
}

/// A document read before, valid while its heads are the stored ones.
struct Cached {
    heads: Vec<[u8; 32]>,
    json: Arc<Map<String, Value>>,
}

struct Inner {
    store: Arc<dyn Store>,
    cache: Mutex<LruCache<DocId, Cached>>,
}

/// A committed document: its id, its record and its JSON.
pub(crate) type Committed = (DocId, DocMeta, Arc<Map<String, Value>>);

/// Reads of committed data. See the module docs.
#[derive(Clone)]
pub struct Reader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

/// Resolves logical references against committed data.
pub(crate) struct StoreResolver<'a>(pub(crate) &'a dyn Store);

impl Resolver for StoreResolver<'_> {
    fn local(&self, ty: &str, id: &str) -> Option<IdentKey> {
        let doc_id = DocId::parse(id)?;
        let m = self.0.doc_meta(doc_id.as_bytes()).ok()??;
        (m.ty == ty).then(|| IdentKey::new(m.origin, id))
    }

    fn find(&self, ty: &str, key: &IdentKey) -> Option<String> {
        let ids: Vec<DocId> = self
            .0
            .find(ty, &key.system, &key.value)
            .ok()?
            .into_iter()
            .map(|b| DocId(uuid::Uuid::from_bytes(b)))
            .collect();
        resolve_identifier(ids, ty, key, |id| {
            Some(self.0.doc_meta(id.as_bytes()).ok()??.ty)
        })
    }
}

impl Reader {
    /// A reader of `store` caching up to `cache_documents` documents as JSON.
    pub fn new(store: Arc<dyn Store>, cache_documents: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                cache: Mutex::new(LruCache::new(
                    NonZeroUsize::new(cache_documents).unwrap_or(NonZeroUsize::MIN),
                )),
            }),
        }
    }

    /// How many documents of type `ty` this node holds.
    pub fn count_of_type(&self, ty: &str) -> Result<usize, ReadError> {
        Ok(self.store().count_of_type(ty)?)
    }

    pub(crate) fn store(&self) -> &dyn Store {
        self.inner.store.as_ref()
    }

    /// The committed document `id` of type `ty` with its record.
    pub(crate) fn document(&self, ty: &str, id: &str) -> Result<Committed, ReadError> {
        let not_found = || ReadError::NotFound {
            ty: ty.into(),
            id: id.into(),
        };
        if !profile::is_supported(ty) {
            return Err(ReadError::Unsupported(ty.into()));
        }
        let doc_id = DocId::parse(id).ok_or_else(not_found)?;
        let meta = self
            .store()
            .doc_meta(doc_id.as_bytes())?
            .filter(|m| m.ty == ty)
            .ok_or_else(not_found)?;
        {
            let mut cache = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.get(&doc_id)
                && c.heads == meta.heads
            {
                return Ok((doc_id, meta, Arc::clone(&c.json)));
            }
        }
        let json = contain(
            || -> Result<_, ReadError> { Ok(Arc::new(document_to_json(&self.load(&doc_id)?)?)) },
            ReadError::Damaged,
        )?;
        let mut cache = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.put(
            doc_id,
            Cached {
                heads: meta.heads.clone(),
                json: Arc::clone(&json),
            },
        );
        Ok((doc_id, meta, json))
    }

    fn load(&self, id: &DocId) -> Result<AutoCommit, ReadError> {
        let bytes = self
            .store()
            .doc_bytes(id.as_bytes())?
            .ok_or_else(|| DocError::Missing(id.to_string()))?;
        contain(
            || -> Result<_, ReadError> { Ok(AutoCommit::load(&bytes)?) },
            ReadError::Damaged,
        )
    }

    /// The store's counters (committed state).
    pub fn stats(&self) -> Result<fieldmesh_storage::Stats, StoreError> {
        self.store().stats()
    }

    /// Up to `limit` quarantined changes, oldest first.
    pub fn quarantined(
        &self,
        limit: usize,
    ) -> Result<Vec<fieldmesh_storage::Quarantined>, StoreError> {
        self.store().quarantined(limit)
    }

    /// Reads `ty/id` as served to a client.
    pub fn read(&self, ty: &str, id: &str) -> Result<Served, ReadError> {
        let (doc_id, meta, json) = self.document(ty, id)?;
        let heads: Vec<automerge::ChangeHash> = meta
            .heads
            .iter()
            .map(|h| automerge::ChangeHash(*h))
            .collect();
        let version = version_id(&heads);
        let updated = (meta.updated > 0).then(|| format_instant(meta.updated));
        let resource = render(
            (*json).clone(),
            &doc_id.to_string(),
            &version,
            updated.as_deref(),
            &StoreResolver(self.store()),
        );
        Ok(Served {
            id: doc_id.to_string(),
            version,
            resource,
            notes: Vec::new(),
        })
    }

    /// The versions of `ty/id`, newest first: the current one, then the state each change left
    /// on its author's node (its causal past), at most `limit`.
    pub fn history(&self, ty: &str, id: &str, limit: usize) -> Result<Vec<Served>, ReadError> {
        let current = self.read(ty, id)?;
        let doc_id = DocId::parse(id).ok_or_else(|| ReadError::NotFound {
            ty: ty.into(),
            id: id.into(),
        })?;
        let mut doc = self.load(&doc_id)?;
        let mut out = vec![current];
        let changes: Vec<(automerge::ChangeHash, i64)> = doc
            .get_changes(&[])
            .iter()
            .map(|c| (c.hash(), c.timestamp()))
            .collect();
        for (hash, time) in changes.into_iter().rev() {
            if out.len() >= limit.max(1) {
                break;
            }
            let version = version_id(&[hash]);
            if out.iter().any(|s| s.version == version) {
                continue;
            }
            let json = document_to_json(&doc.fork_at(&[hash])?)?;
            let updated = (time > 0).then(|| format_instant(time));
            out.push(Served {
                id: doc_id.to_string(),
                resource: render(
                    json,
                    &doc_id.to_string(),
                    &version,
                    updated.as_deref(),
                    &StoreResolver(self.store()),
                ),
                version,
                notes: Vec::new(),
            });
        }
        Ok(out)
    }

    /// The version `vid` of `ty/id` (see [`Reader::history`]).
    pub fn version(&self, ty: &str, id: &str, vid: &str) -> Result<Served, ReadError> {
        self.history(ty, id, usize::MAX)?
            .into_iter()
            .find(|s| s.version == vid)
            .ok_or_else(|| ReadError::NotFound {
                ty: ty.into(),
                id: format!("{id} version {vid}"),
            })
    }

    /// The document of `ty/id` as saved by Automerge (loadable by any implementation).
    pub fn automerge_bytes(&self, ty: &str, id: &str) -> Result<Vec<u8>, ReadError> {
        let (doc_id, _, _) = self.document(ty, id)?;
        Ok(self.load(&doc_id)?.save())
    }

    /// Fields of `ty/id` that hold concurrent values.
    pub fn conflicts(&self, ty: &str, id: &str) -> Result<Vec<Conflict>, ReadError> {
        let (doc_id, _, _) = self.document(ty, id)?;
        Ok(fieldmesh_fhir_docs::conflicts(&self.load(&doc_id)?))
    }

    /// Document ids of type `ty` matching an identifier query.
    pub fn find_ids(&self, ty: &str, query: &IdentifierQuery) -> Result<Vec<DocId>, StoreError> {
        Ok(match query {
            IdentifierQuery::Exact(k) => self.store().find(ty, &k.system, &k.value)?,
            IdentifierQuery::ValueOnly(v) => self.store().find_value(ty, v)?,
        }
        .into_iter()
        .map(|b| DocId(uuid::Uuid::from_bytes(b)))
        .collect())
    }

    /// Resources of type `ty` matching an identifier query, as served.
    pub fn search_identifier(
        &self,
        ty: &str,
        query: &IdentifierQuery,
    ) -> Result<Vec<Served>, ReadError> {
        if !profile::is_supported(ty) {
            return Err(ReadError::Unsupported(ty.into()));
        }
        self.serve_all(ty, self.find_ids(ty, query)?)
    }

    /// Resources of type `ty` whose element `param` references `target_ty/target_id` (a
    /// resource this node holds), as served: `GET /Claim?patient=Patient/<id>`. Answered from
    /// the reference index, which holds every logical reference of every document under every
    /// identity of its target.
    pub fn search_reference(
        &self,
        ty: &str,
        param: &str,
        target_ty: &str,
        target_id: &str,
    ) -> Result<Vec<Served>, ReadError> {
        if !profile::is_supported(ty) {
            return Err(ReadError::Unsupported(ty.into()));
        }
        let (target, meta, json) = match self.document(target_ty, target_id) {
            Ok(t) => t,
            Err(ReadError::NotFound { .. } | ReadError::Unsupported(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let keys =
            fieldmesh_fhir_docs::identifiers::identities(&json, &meta.origin, &target.to_string());
        let mut candidates = Vec::new();
        for k in &keys {
            candidates.extend(self.store().referrers(target_ty, &k.system, &k.value)?);
        }
        candidates.sort_unstable();
        candidates.dedup();
        let mut out = Vec::new();
        for c in candidates {
            let id = DocId(uuid::Uuid::from_bytes(c));
            let (_, _, json) = match self.document(ty, &id.to_string()) {
                Ok(d) => d,
                Err(ReadError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            let Some(element) = json.get(param) else {
                continue;
            };
            let mut wrapper = Map::new();
            wrapper.insert(param.to_string(), element.clone());
            if targets_in(&wrapper)
                .iter()
                .any(|t| t.ty == target_ty && keys.contains(&t.key))
            {
                out.push(self.read(ty, &id.to_string())?);
            }
        }
        Ok(out)
    }

    fn serve_all(&self, ty: &str, ids: Vec<DocId>) -> Result<Vec<Served>, ReadError> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.read(ty, &id.to_string()) {
                Ok(s) => out.push(s),
                Err(ReadError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}
