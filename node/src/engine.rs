//! The document engine: FHIR resources in, Automerge documents in the store, FHIR resources out.
//!
//! The engine owns the store and a bounded cache of live Automerge documents (a live document costs
//! about 20× its saved size, so only hot ones stay in memory). Writes are *staged*: a create or an
//! update edits the document in memory and queues a store write; [`Engine::flush`] commits every
//! queued write in one durable transaction. Callers acknowledge a write only after the flush that
//! carried it succeeded, so one `fsync` serves many writes (group commit).
//!
//! The engine is synchronous; the node runs it on a thread of its own ([`crate::docs`]).

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use automerge::{ActorId, AutoCommit, ChangeHash};
use fieldmesh_fhir_docs::Prepared;
use fieldmesh_fhir_docs::resource::format_instant;
use fieldmesh_fhir_docs::trust::{Envelope, PublicKey, Rejection, Trust, token_of};
use fieldmesh_fhir_docs::{
    DocId, IdentKey, IdentifierQuery, Resolver, ValidationError, apply_diff, document_to_json,
    new_document, prepare, profile, render, version_id,
};
use fieldmesh_storage::{
    DocData, DocMeta, DocWrite, IndexEntries, Stats, Store, StoreError, Write,
};
use lru::LruCache;
use serde_json::{Map, Value};

/// Incremental chunks a document may collect before it is saved whole again.
const COMPACT_AFTER_CHUNKS: u32 = 16;

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The resource is not acceptable FHIR.
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    /// No resource of that type with that id.
    #[error("there is no {ty} with id {id} on this node")]
    NotFound {
        /// Resource type asked for.
        ty: String,
        /// Id asked for.
        id: String,
    },
    /// The id names a resource of another type.
    #[error("{id} is a {actual}, not a {asked}; resourceType never changes")]
    TypeMismatch {
        /// Id.
        id: String,
        /// Type of the stored resource.
        actual: String,
        /// Type asked for.
        asked: String,
    },
    /// The resource type is not one this node holds.
    #[error("this node does not hold {0} resources")]
    Unsupported(String),
    /// `If-Match` named another version.
    #[error("the resource is at version {current}, not {expected}; read it again and retry")]
    VersionConflict {
        /// Version the client expected.
        expected: String,
        /// Current version.
        current: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored document could not be read.
    #[error("a stored document could not be read: {0}")]
    Document(String),
    /// This node's certificate does not allow the write.
    #[error("this device may not make this write: {0}")]
    Forbidden(Rejection),
}

impl From<fieldmesh_fhir_docs::ConvertError> for EngineError {
    fn from(e: fieldmesh_fhir_docs::ConvertError) -> Self {
        EngineError::Document(e.to_string())
    }
}

impl From<automerge::AutomergeError> for EngineError {
    fn from(e: automerge::AutomergeError) -> Self {
        EngineError::Document(e.to_string())
    }
}

/// Who this node is, as the engine needs it.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// Identifier system of resources created here.
    pub system: String,
    /// Automerge actor id (the node's public key).
    pub actor: ActorId,
    /// The node's signing key (its libp2p identity too).
    pub key: fieldmesh_fhir_docs::ed25519_dalek::SigningKey,
    /// The deployment's root of trust: central's public key.
    pub root: PublicKey,
    /// A fixed time (Unix seconds) instead of the system clock, for simulations.
    pub clock: Option<i64>,
}

impl NodeIdentity {
    /// The identity of the node with secret key `secret`, in the deployment rooted at `root`.
    pub fn new(system: String, secret: &[u8; 32], root: PublicKey) -> Self {
        let key = fieldmesh_fhir_docs::ed25519_dalek::SigningKey::from_bytes(secret);
        Self {
            system,
            actor: fieldmesh_fhir_docs::actor_for_key(&key.verifying_key().to_bytes()),
            key,
            root,
            clock: None,
        }
    }

    /// The time of this node's changes and certificate checks: its clock.
    pub fn time(&self) -> i64 {
        self.clock.unwrap_or_else(now)
    }

    /// The node's public key.
    pub fn public(&self) -> PublicKey {
        self.key.verifying_key().to_bytes()
    }
}

/// The ed25519 key behind a libp2p peer id, if it is one.
pub fn peer_key(peer: &str) -> Option<PublicKey> {
    let id: libp2p::PeerId = peer.parse().ok()?;
    let key = libp2p::identity::PublicKey::try_decode_protobuf(id.as_ref().digest()).ok()?;
    Some(key.try_into_ed25519().ok()?.to_bytes())
}

/// A live document with what the store knows about it.
struct Live {
    /// The document; `None` for a staged bulk-loaded document whose memory was given back (it
    /// is read from the store again once committed).
    doc: Option<AutoCommit>,
    meta: DocMeta,
    /// Its current index entries (searches see staged documents before they are committed).
    entries: IndexEntries,
}

impl Live {
    fn doc(&mut self, id: &DocId) -> Result<&mut AutoCommit, EngineError> {
        self.doc
            .as_mut()
            .ok_or_else(|| EngineError::Document(format!("document {id} is not in memory")))
    }
}

fn entries_of(p: &Prepared) -> IndexEntries {
    IndexEntries {
        identifiers: p
            .identifiers
            .iter()
            .map(|k| (k.system.clone(), k.value.clone()))
            .collect(),
        references: p
            .references
            .iter()
            .map(|r| (r.ty.clone(), r.key.system.clone(), r.key.value.clone()))
            .collect(),
    }
}

/// The index entries a stored resource carries (its identities and the targets it points at).
pub fn entries_of_json(json: &Map<String, Value>) -> IndexEntries {
    IndexEntries {
        identifiers: fieldmesh_fhir_docs::identifiers::identifier_keys(json)
            .into_iter()
            .map(|k| (k.system, k.value))
            .collect(),
        references: fieldmesh_fhir_docs::references::targets(&Value::Object(json.clone()))
            .into_iter()
            .map(|r| (r.ty, r.key.system, r.key.value))
            .collect(),
    }
}

/// A resource as served to a client.
#[derive(Debug, Clone)]
pub struct Served {
    /// Local id.
    pub id: String,
    /// `meta.versionId`, also the ETag.
    pub version: String,
    /// The rendered resource.
    pub resource: Value,
}

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

/// The engine. See the module docs.
pub struct Engine {
    store: Arc<dyn Store>,
    /// Documents of the batch being committed in the background (bulk loads only).
    in_flight: HashMap<DocId, Live>,
    /// That commit.
    behind: Option<std::thread::JoinHandle<Result<Vec<u64>, StoreError>>>,
    me: NodeIdentity,
    cache: LruCache<DocId, Live>,
    /// Documents changed since the last flush (never evicted before it).
    dirty: HashMap<DocId, Live>,
    pending: Vec<Write>,
    /// Whether written documents stay in memory (false for bulk loads).
    keep_flushed: bool,
    /// Threads that prepare received documents.
    threads: usize,
    /// Certificates and revocations known here.
    trust: Trust,
    /// Changes quarantined since start (so that a peer offering them again adds nothing).
    quarantined: HashSet<[u8; 32]>,
    /// Whether local writes are checked against this node's certificate (always, except to
    /// play a modified, byzantine device in tests: its peers still check everything).
    check_local: bool,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Whether `me`'s certificate allows writing a `ty` that reads `before` and then `after`.
fn authorize(
    trust: &Trust,
    me: &NodeIdentity,
    ty: &str,
    before: Option<&Map<String, Value>>,
    after: &Map<String, Value>,
) -> Result<(), EngineError> {
    trust
        .authority(&me.public(), me.time(), trust.revocations_held())
        .and_then(|a| a.permits(ty, before, after))
        .map_err(EngineError::Forbidden)
}

/// Signs the change a local commit just made (the document's single head).
fn sign_heads(me: &NodeIdentity, trust: &Trust, doc: &mut AutoCommit) -> Vec<u8> {
    let seen = trust.revocations_held();
    let mut out = Vec::new();
    for h in doc.get_heads() {
        Envelope::sign(&me.key, h.0, seen).encode_into(&mut out);
    }
    out
}

fn heads_bytes(heads: &[ChangeHash]) -> Vec<[u8; 32]> {
    heads.iter().map(|h| h.0).collect()
}

impl Engine {
    /// An engine over `store` keeping up to `cache_documents` live documents.
    pub fn new(store: Box<dyn Store>, me: NodeIdentity, cache_documents: usize) -> Self {
        let trust = Trust::new(me.root);
        let mut engine = Self {
            trust,
            quarantined: HashSet::new(),
            check_local: true,
            store: Arc::from(store),
            in_flight: HashMap::new(),
            behind: None,
            me,
            cache: LruCache::new(NonZeroUsize::new(cache_documents).unwrap_or(NonZeroUsize::MIN)),
            dirty: HashMap::new(),
            pending: Vec::new(),
            keep_flushed: true,
            threads: std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
        };
        if let Err(e) = engine.load_trust() {
            tracing::error!(error = %e, "cannot read the certificates in the store");
        }
        engine
    }

    /// Reads every certificate and revocation document of the store into the trust state.
    fn load_trust(&mut self) -> Result<(), EngineError> {
        for id in self.store.of_type("Basic")? {
            let Some(bytes) = self.store.doc_bytes(&id)? else {
                continue;
            };
            let json = document_to_json(&AutoCommit::load(&bytes)?)?;
            if let Some(token) = token_of(&json)
                && let Err(e) = self.trust.add_token(token)
            {
                tracing::warn!(doc = %uuid::Uuid::from_bytes(id), error = %e, "ignored a trust document");
            }
        }
        Ok(())
    }

    /// Sets this node's clock (simulations): its changes are dated `t` and its certificate is
    /// checked at `t`.
    pub fn set_clock(&mut self, t: i64) {
        self.me.clock = Some(t);
    }

    /// Ends the engine as a crash would: writes staged but not yet committed are lost (what was
    /// acknowledged is already in the store).
    pub fn crash(mut self) {
        let _ = self.wait_behind();
        self.pending.clear();
        self.dirty.clear();
    }

    /// Stops checking local writes against this node's certificate: the node then behaves like
    /// a modified device that writes what it likes (its peers still refuse it). For tests only.
    pub fn play_byzantine(&mut self) {
        self.check_local = false;
    }

    /// The trust state (certificates and revocations known here).
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// This node's standing, for `/status`: the root, whether it may write (and as what, where),
    /// and how many certificates and revocations it knows.
    pub fn trust_summary(&self) -> Value {
        let held = self.trust.revocations_held();
        let me = self.me.public();
        let (certs, revs) = self.trust.all();
        let standing = match self.trust.authority(&me, self.me.time(), held) {
            Ok(a) => serde_json::json!({
                "certified": true,
                "roles": a.roles.iter().map(|r| r.name()).collect::<Vec<_>>(),
                "scope": a.scope,
            }),
            Err(why) => serde_json::json!({"certified": false, "why": why.to_string()}),
        };
        serde_json::json!({
            "root": hex::encode(self.trust.root()),
            "this_node": standing,
            "certificates": certs.len(),
            "revocations": revs.len(),
        })
    }

    /// Whether `peer` (a libp2p peer id) holds a certificate that no known revocation revokes.
    ///
    /// This decides only whom to serve and whose sessions to take documents from; it does not
    /// read this node's clock (a device whose clock is wrong would otherwise cut itself off).
    /// Every change is still checked against its author's certificate at the change's time.
    pub fn peer_certified(&self, peer: &str) -> bool {
        peer_key(peer).is_some_and(|k| {
            k == *self.trust.root()
                || (!self.trust.certificates(&k).is_empty()
                    && self.trust.revoked(&k, u32::MAX).is_none())
        })
    }

    /// Refuses a local write this node's own certificate does not allow.
    fn authorize_local(
        &self,
        ty: &str,
        before: Option<&Map<String, Value>>,
        after: &Map<String, Value>,
    ) -> Result<(), EngineError> {
        if !self.check_local {
            return Ok(());
        }
        authorize(&self.trust, &self.me, ty, before, after)
    }

    /// The envelope of this node's latest change to `doc` (the document's single head after a
    /// local commit).
    fn sign_head(&self, doc: &mut AutoCommit) -> Vec<u8> {
        sign_heads(&self.me, &self.trust, doc)
    }

    /// Adds the token a trust document carries; forgets every checkpoint when it is new, so that
    /// changes refused before are offered again and decided anew.
    fn learn(&mut self, json: &Map<String, Value>) {
        if let Some(token) = token_of(json) {
            self.learn_token(token);
        }
    }

    fn learn_token(&mut self, token: &str) {
        match self.trust.add_token(token) {
            Ok(true) => {
                tracing::info!("learned a new certificate or revocation");
                self.pending.push(Write::ForgetCheckpoints);
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "a trust document carries an invalid token"),
        }
    }

    /// Whether written documents stay in memory (turn off for bulk loads).
    pub fn set_keep_flushed(&mut self, keep: bool) {
        self.keep_flushed = keep;
    }

    /// The store's counters (committed state).
    pub fn stats(&self) -> Result<Stats, EngineError> {
        Ok(self.store.stats()?)
    }

    /// The store (for checks and tools).
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Number of staged writes.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Commits every staged write durably. On failure nothing staged is kept: the affected
    /// documents are dropped from memory and read again from disk when next needed.
    pub fn flush(&mut self) -> Result<usize, EngineError> {
        self.wait_behind()?;
        if self.pending.is_empty() {
            return Ok(0);
        }
        let writes = std::mem::take(&mut self.pending);
        let n = writes.len();
        match self.store.commit(writes) {
            Ok(seqs) => {
                let last = seqs.iter().copied().max().unwrap_or_default();
                for (id, mut live) in self.dirty.drain() {
                    live.meta.seq = last;
                    if self.keep_flushed && live.doc.is_some() {
                        self.cache.put(id, live);
                    }
                }
                Ok(n)
            }
            Err(e) => {
                self.dirty.clear();
                Err(e.into())
            }
        }
    }

    /// Starts committing every staged write on a thread of its own and returns at once, so the
    /// next batch can be prepared meanwhile (bulk loads). At most one batch is in flight; nothing
    /// is acknowledged until [`Engine::flush`] (or the next call) has waited for it.
    pub fn flush_behind(&mut self) -> Result<(), EngineError> {
        self.wait_behind()?;
        if self.pending.is_empty() {
            return Ok(());
        }
        let writes = std::mem::take(&mut self.pending);
        self.in_flight = std::mem::take(&mut self.dirty);
        let store = Arc::clone(&self.store);
        let handle = std::thread::Builder::new()
            .name("fieldmesh-commit".into())
            .spawn(move || store.commit(writes))
            .map_err(|e| EngineError::Document(format!("cannot start a commit thread: {e}")))?;
        self.behind = Some(handle);
        Ok(())
    }

    /// Waits for the background commit, if any.
    fn wait_behind(&mut self) -> Result<(), EngineError> {
        let Some(handle) = self.behind.take() else {
            return Ok(());
        };
        let result = handle
            .join()
            .map_err(|_| EngineError::Document("the commit thread failed".into()))?;
        let in_flight = std::mem::take(&mut self.in_flight);
        result?;
        if self.keep_flushed {
            for (id, live) in in_flight {
                if live.doc.is_some() {
                    self.cache.put(id, live);
                }
            }
        }
        Ok(())
    }

    fn meta_of(&self, id: &DocId) -> Result<Option<DocMeta>, EngineError> {
        if let Some(l) = self
            .dirty
            .get(id)
            .or_else(|| self.in_flight.get(id))
            .or_else(|| self.cache.peek(id))
        {
            return Ok(Some(l.meta.clone()));
        }
        Ok(self.store.doc_meta(id.as_bytes())?)
    }

    /// Takes a document out of memory or the store, for editing or reading.
    fn take(&mut self, id: &DocId) -> Result<Option<Live>, EngineError> {
        if self.in_flight.contains_key(id) {
            self.wait_behind()?;
        }
        if self.dirty.get(id).is_some_and(|l| l.doc.is_none()) {
            // A bulk-loaded document no longer in memory: commit it, then read it back.
            self.flush()?;
        }
        if let Some(l) = self.dirty.remove(id) {
            return Ok(Some(l));
        }
        if let Some(l) = self.cache.pop(id) {
            return Ok(Some(l));
        }
        let Some(meta) = self.store.doc_meta(id.as_bytes())? else {
            return Ok(None);
        };
        let bytes = self
            .store
            .doc_bytes(id.as_bytes())?
            .ok_or_else(|| EngineError::Document(format!("document {id} has no data")))?;
        let doc = AutoCommit::load(&bytes)?.with_actor(self.me.actor.clone());
        let entries = entries_of_json(&document_to_json(&doc)?);
        Ok(Some(Live {
            doc: Some(doc),
            meta,
            entries,
        }))
    }

    /// Puts a document back after using it.
    fn put_back(&mut self, id: DocId, live: Live, dirty: bool) {
        if dirty {
            self.dirty.insert(id, live);
        } else {
            self.cache.put(id, live);
        }
    }

    /// Runs `f` on the live document `id` of type `ty`, then puts it back where it was.
    fn with_doc<T>(
        &mut self,
        ty: &str,
        id: &str,
        f: impl FnOnce(&Self, &DocId, &mut Live) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let not_found = || EngineError::NotFound {
            ty: ty.into(),
            id: id.into(),
        };
        if !profile::is_supported(ty) {
            return Err(EngineError::Unsupported(ty.into()));
        }
        let doc_id = DocId::parse(id).ok_or_else(not_found)?;
        let mut live = self.take(&doc_id)?.ok_or_else(not_found)?;
        let was_dirty = self.has_pending_write(&doc_id);
        let result = if live.meta.ty == ty {
            f(self, &doc_id, &mut live)
        } else {
            Err(not_found())
        };
        self.put_back(doc_id, live, was_dirty);
        result
    }

    /// Queues the store write of a document's current state.
    fn stage(
        &mut self,
        id: &DocId,
        meta: &DocMeta,
        entries: &IndexEntries,
        data: DocData,
        previous: IndexEntries,
        envelopes: Vec<u8>,
    ) {
        self.pending.push(Write::Doc(DocWrite {
            envelopes,
            id: *id.as_bytes(),
            ty: meta.ty.clone(),
            origin: meta.origin.clone(),
            data,
            heads: meta.heads.clone(),
            updated: meta.updated,
            identifiers: entries.identifiers.clone(),
            references: entries.references.clone(),
            previous,
        }));
    }

    /// Whether a taken document still has a write waiting for the next flush.
    fn has_pending_write(&self, id: &DocId) -> bool {
        self.pending
            .iter()
            .any(|w| matches!(w, Write::Doc(d) if d.id == *id.as_bytes()))
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
    ) -> Result<DocId, EngineError> {
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
    ) -> Result<DocId, EngineError> {
        let prepared = prepare(
            resource,
            expected_type,
            &self.me.system,
            &id,
            &*self,
            bundle_ids,
        )?;
        self.authorize_local(&prepared.ty, None, &prepared.json)?;
        let doc = new_document(&prepared.json, self.me.actor.clone(), self.me.time())?;
        let ty = prepared.ty.clone();
        let origin = self.me.system.clone();
        if ty == "Basic" {
            self.learn(&prepared.json);
        }
        self.stage_new(id, ty, origin, doc, entries_of(&prepared));
        Ok(id)
    }

    /// Stages a document that is new here (created locally or received) and keeps it staged.
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
        let envelopes = self.sign_head(&mut doc);
        self.stage(
            &id,
            &meta,
            &entries,
            DocData::Full(doc.save_nocompress()),
            IndexEntries::default(),
            envelopes,
        );
        // Bulk loads give the live document's memory back at once.
        let doc = self.keep_flushed.then_some(doc);
        self.dirty.insert(id, Live { doc, meta, entries });
    }

    /// Updates (or, for an unused UUID, creates) the resource `ty/id` to read as `resource`,
    /// editing only what differs. `if_match` is the version the client last saw, if it says.
    pub fn update(
        &mut self,
        ty: &str,
        id: &str,
        resource: Value,
        if_match: Option<&str>,
    ) -> Result<(DocId, Outcome), EngineError> {
        if !profile::is_supported(ty) {
            return Err(EngineError::Unsupported(ty.into()));
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
        let not_found = || EngineError::NotFound {
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
    ) -> Result<Outcome, EngineError> {
        if live.meta.ty != ty {
            return Err(EngineError::TypeMismatch {
                id: doc_id.to_string(),
                actual: live.meta.ty.clone(),
                asked: ty.into(),
            });
        }
        if let Some(expected) = if_match {
            let current = version_id(&live.doc(doc_id)?.get_heads());
            if expected != current {
                return Err(EngineError::VersionConflict {
                    expected: expected.into(),
                    current,
                });
            }
        }
        let prepared = prepare(
            resource,
            Some(ty),
            &live.meta.origin,
            doc_id,
            &*self,
            &|_| None,
        )?;
        let chunks = live.meta.chunks;
        let doc = live
            .doc
            .as_mut()
            .ok_or_else(|| EngineError::Document(format!("document {doc_id} is not in memory")))?;
        let old = document_to_json(doc)?;
        if old == prepared.json {
            return Ok(Outcome::Unchanged);
        }
        if self.check_local {
            authorize(&self.trust, &self.me, ty, Some(&old), &prepared.json)?;
        }
        let heads_before = doc.get_heads();
        if apply_diff(doc, &old, &prepared.json)? == 0 {
            return Ok(Outcome::Unchanged);
        }
        doc.commit_with(automerge::transaction::CommitOptions::default().with_time(self.me.time()));
        let envelopes = sign_heads(&self.me, &self.trust, doc);
        let (data, chunks) = if chunks >= COMPACT_AFTER_CHUNKS {
            (DocData::Full(doc.save_nocompress()), 1)
        } else {
            (DocData::Append(doc.save_after(&heads_before)), chunks + 1)
        };
        let heads = heads_bytes(&doc.get_heads());
        live.meta.chunks = chunks;
        live.meta.heads = heads;
        live.meta.updated = self.me.time();
        let previous = std::mem::replace(&mut live.entries, entries_of(&prepared));
        self.stage(doc_id, &live.meta, &live.entries, data, previous, envelopes);
        Ok(Outcome::Updated)
    }

    /// Reads `ty/id` as served to a client.
    pub fn read(&mut self, ty: &str, id: &str) -> Result<Served, EngineError> {
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
            })
        })
    }

    /// The document of `ty/id` as saved by Automerge (loadable by any implementation).
    pub fn automerge_bytes(&mut self, ty: &str, id: &str) -> Result<Vec<u8>, EngineError> {
        self.with_doc(ty, id, |_, doc_id, live| Ok(live.doc(doc_id)?.save()))
    }

    /// Conflicts currently visible in `ty/id`.
    pub fn conflicts(
        &mut self,
        ty: &str,
        id: &str,
    ) -> Result<Vec<fieldmesh_fhir_docs::Conflict>, EngineError> {
        self.with_doc(ty, id, |_, doc_id, live| {
            Ok(fieldmesh_fhir_docs::conflicts(live.doc(doc_id)?))
        })
    }

    /// Resources of type `ty` matching an identifier query, as served.
    pub fn search_identifier(
        &mut self,
        ty: &str,
        query: &IdentifierQuery,
    ) -> Result<Vec<Served>, EngineError> {
        if !profile::is_supported(ty) {
            return Err(EngineError::Unsupported(ty.into()));
        }
        let ids = self.find_ids(ty, query)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.read(ty, &id.to_string()) {
                Ok(s) => out.push(s),
                Err(EngineError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Document ids of type `ty` matching an identifier query (committed and staged).
    pub fn find_ids(&self, ty: &str, query: &IdentifierQuery) -> Result<Vec<DocId>, EngineError> {
        let mut ids: Vec<DocId> = match query {
            IdentifierQuery::Exact(k) => self.store.find(ty, &k.system, &k.value)?,
            IdentifierQuery::ValueOnly(v) => self.store.find_value(ty, v)?,
        }
        .into_iter()
        .map(|b| DocId(uuid::Uuid::from_bytes(b)))
        .collect();
        for (id, live) in &self.dirty {
            let hit = live.meta.ty == ty
                && live.entries.identifiers.iter().any(|(s, v)| match query {
                    IdentifierQuery::Exact(k) => *s == k.system && *v == k.value,
                    IdentifierQuery::ValueOnly(val) => v == val,
                });
            if hit && !ids.contains(id) {
                ids.push(*id);
            }
        }
        Ok(ids)
    }

    /// Checks every document against the indexes: each document's identities and targets must be
    /// exactly the index entries naming it. Returns the disagreements, with the store's own check.
    pub fn verify(&mut self) -> Result<Vec<String>, EngineError> {
        self.flush()?;
        let mut problems = self.store.verify()?;
        let dump = self.store.index_entries()?;
        let mut expected = fieldmesh_storage::IndexDump::default();
        let mut after = 0u64;
        loop {
            let batch = self.store.changes_since(after, 1024)?;
            let Some((last, _)) = batch.last() else { break };
            after = *last;
            for (_, id) in batch {
                let Some(meta) = self.store.doc_meta(&id)? else {
                    continue;
                };
                let bytes = self.store.doc_bytes(&id)?.unwrap_or_default();
                let json = match AutoCommit::load(&bytes)
                    .map_err(EngineError::from)
                    .and_then(|d| Ok(document_to_json(&d)?))
                {
                    Ok(j) => j,
                    Err(e) => {
                        problems.push(format!("document {}: {e}", uuid::Uuid::from_bytes(id)));
                        continue;
                    }
                };
                let entries = entries_of_json(&json);
                for (s, v) in entries.identifiers {
                    expected.identifiers.insert((meta.ty.clone(), s, v, id));
                }
                for (t, s, v) in entries.references {
                    expected.references.insert((t, s, v, id));
                }
            }
        }
        if expected.identifiers != dump.identifiers {
            problems.push(format!(
                "identifier index: {} entries, the documents carry {}",
                dump.identifiers.len(),
                expected.identifiers.len()
            ));
        }
        if expected.references != dump.references {
            problems.push(format!(
                "reference index: {} entries, the documents point {} times",
                dump.references.len(),
                expected.references.len()
            ));
        }
        Ok(problems)
    }

    /// The FHIR instant of now, for `Bundle.meta.lastUpdated`.
    pub fn now_instant() -> String {
        format_instant(now())
    }
}

/// `(document, heads)` pairs: what set reconciliation compares.
pub type SyncItems = Vec<fieldmesh_protocol::Item>;

/// What a sync session starts from: this store's id and log position, the checkpoint recorded
/// for the peer, and every document as `(id, heads, log sequence)`, all taken at one instant.
#[derive(Debug, Clone)]
pub struct SyncStart {
    /// The store id.
    pub store: [u8; 16],
    /// The last log sequence.
    pub seq: u64,
    /// The checkpoint recorded for the peer (unreadable ones are ignored).
    pub checkpoint: Option<fieldmesh_protocol::Checkpoint>,
    /// The documents.
    pub items: SyncItems,
    /// The peer has no valid certificate: `items` holds only certificates and revocations.
    pub restricted: bool,
}

/// A document prepared off the engine, ready to be staged.
pub struct PreparedDoc {
    id: DocId,
    meta: DocMeta,
    entries: IndexEntries,
    bytes: Vec<u8>,
    /// Signed envelopes of its changes.
    envelopes: Vec<u8>,
    /// The certificate or revocation token it carries, if it is a trust document.
    token: Option<String>,
}

/// Refused changes: hash and reason.
pub type Refused = Vec<([u8; 32], Rejection)>;

/// A received document new to this node, checked: what to stage (if any change was accepted)
/// and what to quarantine.
pub struct Received {
    doc: Option<PreparedDoc>,
    rejected: Refused,
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
        let mut ids = self.store.find(ty, &key.system, &key.value).ok()?;
        if ids.is_empty() && uuid::Uuid::parse_str(&key.value).is_ok() {
            ids = self.store.find_value(ty, &key.value).ok()?;
        }
        ids.into_iter()
            .min()
            .map(|b| uuid::Uuid::from_bytes(b).to_string())
    }
}

/// Prepares one NDJSON line as a new document (validation, reference translation, Automerge).
/// Maps `f` over `items` on `threads` threads and returns the results in order, or `None` if a
/// thread panicked. Work is taken in small slices from a shared counter, so that a thread that
/// drew heavy items (Contracts) does not leave the others idle.
pub fn par_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Option<Vec<R>> {
    const SLICE: usize = 16;
    let threads = threads.clamp(1, 16).min(items.len().div_ceil(SLICE).max(1));
    if threads == 1 {
        return Some(items.iter().map(f).collect());
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut slices: Vec<(usize, Vec<R>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (next, f) = (&next, &f);
                scope.spawn(move || {
                    let mut done = Vec::new();
                    loop {
                        let start = next.fetch_add(SLICE, std::sync::atomic::Ordering::Relaxed);
                        if start >= items.len() {
                            break done;
                        }
                        let end = (start + SLICE).min(items.len());
                        done.push((start, items[start..end].iter().map(f).collect()));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    slices.sort_by_key(|(start, _)| *start);
    let out: Vec<R> = slices.into_iter().flat_map(|(_, r)| r).collect();
    (out.len() == items.len()).then_some(out)
}

/// Prepares a document received from a peer that this node does not hold yet: loads it (which
/// checks its change hashes), checks every change's signature and authority, reads it, checks its
/// type and computes its index entries.
fn prepare_received(
    p: &fieldmesh_protocol::DocPayload,
    trust: &Trust,
    uncertified: Option<&str>,
) -> Result<Received, EngineError> {
    let id = DocId(uuid::Uuid::from_bytes(p.id));
    let doc = AutoCommit::load(&p.data)?;
    let json = document_to_json(&doc)?;
    if json.get("resourceType").and_then(Value::as_str) != Some(p.ty.as_str())
        || !profile::is_supported(&p.ty)
    {
        return Err(EngineError::Document(format!(
            "the document is not a {} this node holds",
            p.ty
        )));
    }
    let mut checked =
        crate::verify::check(trust, &p.ty, doc, json, None, &p.envelopes, uncertified)?;
    if checked.accepted == 0 {
        return Ok(Received {
            doc: None,
            rejected: checked.rejected,
        });
    }
    let bytes = if checked.rejected.is_empty() {
        fieldmesh_storage::codec::encode(&p.data)?
    } else {
        fieldmesh_storage::codec::encode(&checked.doc.save_nocompress())?
    };
    let json = checked.json;
    let entries = entries_of_json(&json);
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
                heads: heads_bytes(&checked.doc.get_heads()),
                updated: now(),
            },
            entries,
            bytes,
            envelopes: checked.envelopes,
            token: token_of(&json).map(String::from),
        }),
        rejected: checked.rejected,
    })
}

fn prepare_line(
    view: &View<'_>,
    me: &NodeIdentity,
    trust: &Trust,
    check_local: bool,
    line: &str,
) -> Result<PreparedDoc, EngineError> {
    let resource = parse_json(line.as_bytes())?;
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
    if check_local {
        authorize(trust, me, &prepared.ty, None, &prepared.json)?;
    }
    let mut doc = new_document(&prepared.json, me.actor.clone(), me.time())?;
    let envelopes = sign_heads(me, trust, &mut doc);
    Ok(PreparedDoc {
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
        entries: entries_of(&prepared),
        bytes: fieldmesh_storage::codec::encode(&doc.save_nocompress())?,
    })
}

impl Engine {
    /// Creates one resource per NDJSON line, preparing them on `threads` threads at once, and
    /// stages them in order (bulk loads: the documents do not stay in memory). Returns one result
    /// per line.
    pub fn create_lines(
        &mut self,
        lines: &[String],
        threads: usize,
    ) -> Vec<Result<DocId, EngineError>> {
        let prepared: Vec<Result<PreparedDoc, EngineError>> = {
            let view = View {
                store: self.store.as_ref(),
                staged: &self.dirty,
                in_flight: &self.in_flight,
            };
            let (me, trust, check) = (&self.me, &self.trust, self.check_local);
            match par_map(lines, threads, |l| prepare_line(&view, me, trust, check, l)) {
                Some(out) => out,
                None => {
                    return lines
                        .iter()
                        .map(|_| Err(EngineError::Document("a preparation thread failed".into())))
                        .collect();
                }
            }
        };
        prepared
            .into_iter()
            .zip(lines)
            .map(|(p, line)| match p {
                // Two lines of one batch claimed the same id: prepare the later one again.
                Ok(p) if self.dirty.contains_key(&p.id) || self.in_flight.contains_key(&p.id) => {
                    let resource = parse_json(line.as_bytes())?;
                    self.create(resource, None, false, &|_| None)
                }
                Ok(p) => {
                    let id = p.id;
                    self.stage_received(p);
                    Ok(id)
                }
                Err(e) => Err(e),
            })
            .collect()
    }
}

impl Engine {
    /// What a session with `peer` starts from (commits first; see [`SyncStart`]).
    ///
    /// A peer without a valid certificate is served nothing: its session starts from an empty
    /// set of documents.
    pub fn sync_start(&mut self, peer: &str) -> Result<SyncStart, EngineError> {
        self.flush()?;
        let restricted = peer_key(peer).is_some() && !self.peer_certified(peer);
        if restricted {
            tracing::warn!(peer = %peer, "the peer has no valid certificate: offering it only certificates");
        }
        let mut items = Vec::new();
        let mut after = 0;
        loop {
            let page = self.store.changes_since(after, 4096)?;
            let Some((last, _)) = page.last() else { break };
            after = *last;
            for (seq, id) in page {
                if let Some(meta) = self.store.doc_meta(&id)?
                    && (!restricted || meta.ty == "Basic")
                {
                    items.push((id, meta.heads, seq));
                }
            }
        }
        Ok(SyncStart {
            store: self.store.store_id()?,
            seq: self.store.stats()?.last_seq,
            checkpoint: if restricted {
                None
            } else {
                self.store
                    .checkpoint(peer)?
                    .and_then(|b| fieldmesh_protocol::Checkpoint::from_bytes(&b))
            },
            items,
            restricted,
        })
    }

    /// Records the checkpoint of a completed session with `peer`, after every merge it brought
    /// is durable.
    pub fn record_checkpoint(
        &mut self,
        peer: &str,
        checkpoint: &fieldmesh_protocol::Checkpoint,
    ) -> Result<(), EngineError> {
        self.flush()?;
        self.store.commit(vec![Write::Checkpoint {
            peer: peer.to_string(),
            value: checkpoint.to_bytes(),
        }])?;
        Ok(())
    }

    /// The documents `ids` as sent to `peer`: type, Automerge bytes (whole, or the changes
    /// after the peer's heads) and the envelopes of the changes sent. Nothing for a peer without
    /// a valid certificate.
    pub fn payloads(
        &mut self,
        peer: &str,
        wanted: &[(fieldmesh_storage::DocId, fieldmesh_protocol::Heads)],
    ) -> Result<Vec<fieldmesh_protocol::DocPayload>, EngineError> {
        self.flush()?;
        let restricted = peer_key(peer).is_some() && !self.peer_certified(peer);
        let mut out = Vec::with_capacity(wanted.len());
        for (id, their_heads) in wanted {
            let Some(meta) = self.store.doc_meta(id)? else {
                continue;
            };
            if restricted && meta.ty != "Basic" {
                continue;
            }
            if !their_heads.is_empty() {
                // The peer holds the document: send only the changes after its heads, if ours
                // contains them all.
                let doc_id = DocId(uuid::Uuid::from_bytes(*id));
                if let Some(mut live) = self.take(&doc_id)? {
                    let since = live.doc(&doc_id).map(|doc| {
                        let heads: Vec<ChangeHash> =
                            their_heads.iter().map(|h| ChangeHash(*h)).collect();
                        heads
                            .iter()
                            .all(|h| doc.get_change_by_hash(h).is_some())
                            .then(|| doc.save_after(&heads))
                    });
                    let hashes: Option<HashSet<[u8; 32]>> = live.doc.as_mut().map(|doc| {
                        let heads: Vec<ChangeHash> =
                            their_heads.iter().map(|h| ChangeHash(*h)).collect();
                        doc.get_changes_meta(&heads)
                            .into_iter()
                            .map(|m| m.hash.0)
                            .collect()
                    });
                    self.put_back(doc_id, live, false);
                    if let (Some(data), Some(hashes)) = (since?, hashes) {
                        let envelopes = Envelope::stored_to_wire(&self.store.envelopes(id)?, |h| {
                            hashes.contains(h)
                        });
                        out.push(fieldmesh_protocol::DocPayload {
                            id: *id,
                            ty: meta.ty,
                            data,
                            envelopes,
                        });
                        continue;
                    }
                }
            }
            if let Some(data) = self.store.doc_bytes(id)? {
                out.push(fieldmesh_protocol::DocPayload {
                    id: *id,
                    ty: meta.ty,
                    data,
                    envelopes: Envelope::stored_to_wire(&self.store.envelopes(id)?, |_| true),
                });
            }
        }
        Ok(out)
    }

    /// Merges documents received from `from` (a peer id, or a file) and starts committing them
    /// in the background (the next [`Engine::flush`] waits for it); returns how many documents
    /// changed here and how many were refused or quarantined.
    ///
    /// Every new change is checked first (signature, certificate, capability, scope; see
    /// [`fieldmesh_fhir_docs::trust`]): refused changes go to quarantine and are never applied.
    /// Certificates and revocations in the batch are taken in before anything else, so that a
    /// batch carrying a new device's certificate and its writes is decided as if they had come
    /// in order. A payload that is not a loadable document of the type it claims is refused and
    /// nothing of it is applied.
    pub fn merge(
        &mut self,
        docs: Vec<fieldmesh_protocol::DocPayload>,
        from: &str,
    ) -> Result<(usize, usize), EngineError> {
        let (trust_docs, docs): (Vec<_>, Vec<_>) = docs.into_iter().partition(|p| p.ty == "Basic");
        let (mut changed, mut refused) = (0, 0);
        for (is_trust, batch) in [(true, trust_docs), (false, docs)] {
            // Certificates and revocations are central's changes, checked as such whoever relays
            // them: a new device brings its own certificate. Everything else from a peer is
            // decided after them, and quarantined whole if the peer has no valid certificate.
            let uncertified = (!is_trust && peer_key(from).is_some() && !self.peer_certified(from))
                .then(|| from.to_string());
            let (c, r) = self.merge_batch(batch, from, uncertified.as_deref())?;
            changed += c;
            refused += r;
        }
        // The commit overlaps the next batch; the engine thread waits for it before replying.
        self.flush_behind()?;
        Ok((changed, refused))
    }

    fn merge_batch(
        &mut self,
        docs: Vec<fieldmesh_protocol::DocPayload>,
        from: &str,
        uncertified: Option<&str>,
    ) -> Result<(usize, usize), EngineError> {
        // Documents new to this node (most of a first sync) are prepared on every core; the
        // received bytes are stored as they came, without a second save.
        let mut fresh = Vec::new();
        let mut known = Vec::new();
        let mut seen = HashSet::new();
        for p in docs {
            let id = DocId(uuid::Uuid::from_bytes(p.id));
            if seen.insert(id) && self.meta_of(&id)?.is_none() {
                fresh.push(p);
            } else {
                known.push(p);
            }
        }
        let trust = &self.trust;
        let prepared = par_map(&fresh, self.threads, |p| {
            prepare_received(p, trust, uncertified)
        })
        .ok_or_else(|| EngineError::Document("a preparation thread failed".into()))?;
        let (mut changed, mut refused) = (0, 0);
        for (p, prepared) in fresh.iter().zip(prepared) {
            match prepared {
                Ok(r) => {
                    if !r.rejected.is_empty() {
                        refused += 1;
                        self.quarantine(p, from, r.rejected);
                    }
                    if let Some(d) = r.doc {
                        self.stage_received(d);
                        changed += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(doc = %uuid::Uuid::from_bytes(p.id), error = %e, "refused a document from a peer");
                    refused += 1;
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
            match self.merge_one(id, &p, uncertified) {
                Ok((doc_changed, rejected)) => {
                    changed += usize::from(doc_changed);
                    if !rejected.is_empty() {
                        refused += 1;
                        self.quarantine(&p, from, rejected);
                    }
                }
                Err(EngineError::Store(e)) => return Err(EngineError::Store(e)),
                Err(e) => {
                    tracing::warn!(doc = %id, error = %e, "refused a document from a peer");
                    refused += 1;
                }
            }
        }
        Ok((changed, refused))
    }

    /// Keeps refused changes of a payload in quarantine (once per change per run).
    fn quarantine(
        &mut self,
        p: &fieldmesh_protocol::DocPayload,
        from: &str,
        rejected: Vec<([u8; 32], Rejection)>,
    ) {
        let doc = uuid::Uuid::from_bytes(p.id);
        for (hash, why) in rejected {
            let key = if hash == [0; 32] {
                let mut k = [0u8; 32];
                k[..16].copy_from_slice(&p.id);
                k
            } else {
                hash
            };
            if !self.quarantined.insert(key) {
                continue;
            }
            let change = hex::encode(&hash[..6]);
            tracing::warn!(peer = %from, doc = %doc, ty = %p.ty, change = %change, reason = %why, "quarantined a change");
            let mut data = p.data.clone();
            data.extend_from_slice(&p.envelopes);
            self.pending
                .push(Write::Quarantine(fieldmesh_storage::Quarantined {
                    reason: format!("{} {doc}, change {change}: {why}", p.ty),
                    from: from.to_string(),
                    data,
                }));
        }
    }

    /// Merges a payload into a document this node holds; returns whether it changed and the
    /// changes refused.
    fn merge_one(
        &mut self,
        id: DocId,
        p: &fieldmesh_protocol::DocPayload,
        uncertified: Option<&str>,
    ) -> Result<(bool, Refused), EngineError> {
        if let Some(mut live) = self.take(&id)? {
            let was_dirty = self.has_pending_write(&id);
            let result = (|| {
                if live.meta.ty != p.ty {
                    return Err(EngineError::TypeMismatch {
                        id: id.to_string(),
                        actual: live.meta.ty.clone(),
                        asked: p.ty.clone(),
                    });
                }
                let chunks = live.meta.chunks;
                let doc = live.doc(&id)?;
                let before = doc.get_heads();
                let mut probe = doc.fork();
                if let Err(e) = probe.load_incremental(&p.data) {
                    if let automerge::AutomergeError::DuplicateSeqNumber(seq, _) = e {
                        // The author signed two different changes with one sequence number.
                        return Ok((false, vec![([0; 32], Rejection::Equivocation { seq })]));
                    }
                    return Err(e.into());
                }
                if probe.get_heads() == before {
                    return Ok((false, Vec::new()));
                }
                let json = document_to_json(&probe)?;
                if json.get("resourceType").and_then(Value::as_str) != Some(p.ty.as_str()) {
                    return Err(EngineError::Document(
                        "the merged document changes its resourceType".into(),
                    ));
                }
                let old_json = document_to_json(doc)?;
                let checked = crate::verify::check(
                    &self.trust,
                    &p.ty,
                    probe,
                    json,
                    Some((doc, &old_json)),
                    &p.envelopes,
                    uncertified,
                )?;
                if checked.accepted == 0 {
                    return Ok((false, checked.rejected));
                }
                *doc = checked.doc;
                // A fork gets a random actor; this node's own later edits must name its key.
                doc.set_actor(self.me.actor.clone());
                let (data, chunks) = if chunks >= COMPACT_AFTER_CHUNKS {
                    (DocData::Full(doc.save_nocompress()), 1)
                } else {
                    (DocData::Append(doc.save_after(&before)), chunks + 1)
                };
                let heads = heads_bytes(&doc.get_heads());
                live.meta.chunks = chunks;
                live.meta.heads = heads;
                live.meta.updated = self.me.time();
                let previous = std::mem::replace(&mut live.entries, entries_of_json(&checked.json));
                if p.ty == "Basic" {
                    self.learn(&checked.json);
                }
                self.stage(
                    &id,
                    &live.meta,
                    &live.entries,
                    data,
                    previous,
                    checked.envelopes,
                );
                Ok((true, checked.rejected))
            })();
            let dirty = was_dirty || matches!(result, Ok((true, _)));
            self.put_back(id, live, dirty);
            return result;
        }
        let r = prepare_received(p, &self.trust, uncertified)?;
        let changed = r.doc.is_some();
        if let Some(d) = r.doc {
            self.stage_received(d);
        }
        Ok((changed, r.rejected))
    }

    /// Stages a document new to this node, prepared by [`prepare_received`] or [`prepare_line`].
    fn stage_received(&mut self, d: PreparedDoc) {
        if let Some(token) = &d.token {
            self.learn_token(token);
        }
        self.stage(
            &d.id,
            &d.meta,
            &d.entries,
            DocData::FullEncoded(d.bytes),
            IndexEntries::default(),
            d.envelopes,
        );
        self.dirty.insert(
            d.id,
            Live {
                doc: None,
                meta: d.meta,
                entries: d.entries,
            },
        );
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.wait_behind() {
            tracing::error!(error = %e, "a background commit failed while the engine closed");
        }
    }
}

impl Resolver for Engine {
    fn local(&self, ty: &str, id: &str) -> Option<IdentKey> {
        let doc_id = DocId::parse(id)?;
        let meta = self.meta_of(&doc_id).ok()??;
        (meta.ty == ty).then(|| IdentKey::new(meta.origin, id))
    }

    fn find(&self, ty: &str, key: &IdentKey) -> Option<String> {
        let mut ids = self
            .find_ids(ty, &IdentifierQuery::Exact(key.clone()))
            .ok()?;
        if ids.is_empty() && uuid::Uuid::parse_str(&key.value).is_ok() {
            // A reference made by id before its target arrived names the referring node's
            // system; the id is a UUID, unique whatever system created it.
            ids = self
                .find_ids(ty, &IdentifierQuery::ValueOnly(key.value.clone()))
                .ok()?;
        }
        // A duplicate registration shows its first (oldest id) copy; both stay readable by id.
        ids.into_iter().min().map(|id| id.to_string())
    }
}

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

/// Builds a searchset Bundle.
pub fn searchset(base: &str, found: Vec<Served>) -> Value {
    let entries: Vec<Value> = found
        .into_iter()
        .map(|s| {
            let ty = s
                .resource
                .get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let mut e = Map::new();
            e.insert(
                "fullUrl".into(),
                Value::String(format!("{base}/{ty}/{}", s.id)),
            );
            e.insert("resource".into(), s.resource);
            e.insert("search".into(), serde_json::json!({"mode": "match"}));
            Value::Object(e)
        })
        .collect();
    let mut bundle = serde_json::json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "meta": {"lastUpdated": Engine::now_instant()},
        "total": entries.len(),
    });
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    bundle
}
