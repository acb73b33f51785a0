//! The engine's core: the store, the bounded cache of live documents, staging and group commit.
//!
//! Writes are *staged*: a create, an update or a merge edits the document in memory and queues a
//! store write; [`Engine::flush`] commits every queued write in one durable transaction, and only
//! then may the caller acknowledge them. [`Engine::flush_behind`] commits on a thread of its own
//! while the caller prepares the next batch (bulk loads, received batches).

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::Arc;

use automerge::{AutoCommit, ChangeHash};
use fieldmesh_fhir_docs::DocLimits;
use fieldmesh_fhir_docs::openimis::claims::{PRICE_LIST_INDEX, price_list_keys};
use fieldmesh_fhir_docs::openimis::flags::flag_entries;
use fieldmesh_fhir_docs::openimis::persons::{PERSON_KEY_INDEX, blocking_keys};
use fieldmesh_fhir_docs::openimis::policy::{RECEIPT_INDEX, receipt_keys};
use fieldmesh_fhir_docs::openimis::{
    AUTHOR_INDEX, LEFT_INDEX, OpenImis, PLACE_INDEX, holding_places,
};
use fieldmesh_fhir_docs::references::pick_target;
use fieldmesh_fhir_docs::{DocId, IdentKey, IdentifierQuery, Resolver, document_to_json, profile};
use fieldmesh_storage::{
    DocData, DocMeta, DocWrite, IndexEntries, Stats, Store, StoreError, Write,
};
use fieldmesh_trust::{Policy, Trust, token_of};
use lru::LruCache;
use serde_json::{Map, Value};

use crate::error::{CommitError, DocError, ReadError, contain};
use crate::events::Stored;
use crate::identity::NodeIdentity;
use crate::read::Reader;
use crate::retract::Retraction;
use crate::source::Source;

/// Refused payloads remembered (by hash) to refuse them again without work.
const REFUSED_MEMORY: usize = 4096;

/// Incremental chunks a large document may collect before it is saved whole again.
const COMPACT_AFTER_CHUNKS: u32 = 16;

/// Documents of at most this many operations are saved whole at every write. A document stored
/// as one chunk loads in one step, for this node and for every peer it is sent to: a demo
/// resource edited once loads in 70–86 µs saved whole, in 135–155 µs as its first save followed
/// by the edit, and saving it whole costs about 12 µs (`examples/am-micro.rs`, "load edited").
/// Larger documents get incremental chunks, up to [`COMPACT_AFTER_CHUNKS`].
const SAVE_WHOLE_UP_TO_OPS: u64 = 10_000;

/// Whether `doc` is small enough to be saved whole at every write ([`SAVE_WHOLE_UP_TO_OPS`]).
pub(crate) fn saves_whole(doc: &AutoCommit) -> bool {
    use automerge::ReadDoc;
    doc.stats().num_ops <= SAVE_WHOLE_UP_TO_OPS
}

/// How an edited document is stored: `doc` as it is now, `before` its heads when it was last
/// stored in `chunks` chunks. Returns the data to write and the chunks it is then stored in.
pub(crate) fn saved_after_edit(
    doc: &mut AutoCommit,
    before: &[ChangeHash],
    chunks: u32,
) -> (DocData, u32) {
    if chunks >= COMPACT_AFTER_CHUNKS || saves_whole(doc) {
        (DocData::Full(doc.save_nocompress()), 1)
    } else {
        (DocData::Append(doc.save_after(before)), chunks + 1)
    }
}

/// A document read ahead by [`Engine::preload`]: its type, its JSON (only some root fields when
/// `partial`), and the live document to edit.
pub(crate) struct Loaded {
    pub ty: String,
    pub json: Map<String, Value>,
    pub partial: bool,
    pub live: Live,
}

/// A live document with what the store knows about it.
pub(crate) struct Live {
    /// The document; `None` for a staged bulk-loaded or received document whose memory was
    /// given back (it is read from the store again once committed).
    /// Boxed: an `AutoCommit` is over 4 KB inline, and the maps of staged documents hold
    /// hundreds of `Live`s, most of them without their document.
    pub doc: Option<Box<AutoCommit>>,
    pub meta: DocMeta,
    /// Its current index entries (writes see staged documents before they are committed).
    pub entries: IndexEntries,
}

impl Live {
    pub fn doc(&mut self, id: &DocId) -> Result<&mut AutoCommit, DocError> {
        self.doc
            .as_deref_mut()
            .ok_or_else(|| DocError::Missing(format!("{id} (not in memory)")))
    }
}

/// The index entries a stored resource carries (its identities, the targets it points at and
/// the places it is held at), taken from the whole document.
pub fn entries_of_json(json: &Map<String, Value>) -> IndexEntries {
    let ty = json
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut references: Vec<(String, String, String)> =
        fieldmesh_fhir_docs::references::targets_in(json)
            .into_iter()
            .map(|r| (r.ty, r.key.system, r.key.value))
            .collect();
    references.extend(derived_entries(ty, json));
    IndexEntries {
        identifiers: fieldmesh_fhir_docs::identifiers::identifier_keys(json)
            .into_iter()
            .map(|k| (k.system, k.value))
            .collect(),
        references,
    }
}

/// The index entries a `ty` reading `json` carries besides its identifiers and references: its
/// places ([`place_entries`]), a Patient's blocking keys for duplicate detection
/// ([`PERSON_KEY_INDEX`]), the flags central put on it ([`FLAG_INDEX`]), a policy's receipts
/// ([`RECEIPT_INDEX`]) and the facility of a price list ([`PRICE_LIST_INDEX`]).
pub(crate) fn derived_entries(
    ty: &str,
    json: &Map<String, Value>,
) -> Vec<(String, String, String)> {
    let mut out = place_entries(ty, json);
    out.extend(
        blocking_keys(ty, json)
            .into_iter()
            .map(|k| (PERSON_KEY_INDEX.to_string(), String::new(), k)),
    );
    out.extend(flag_entries(json));
    if ty == "Contract" {
        out.extend(
            receipt_keys(json)
                .into_iter()
                .map(|k| (RECEIPT_INDEX.to_string(), String::new(), k)),
        );
    }
    if ty == "ClaimResponse" {
        out.extend(
            crate::claims::claimed_keys(json)
                .into_iter()
                .map(|k| (crate::claims::CLAIMED_INDEX.to_string(), String::new(), k)),
        );
    }
    if ty == "List" {
        out.extend(
            price_list_keys(json)
                .into_iter()
                .map(|k| (PRICE_LIST_INDEX.to_string(), String::new(), k)),
        );
    }
    out
}

/// The index entries naming the places a `ty` reading `json` is held at
/// ([`fieldmesh_fhir_docs::openimis::holding_places`]), under the pseudo type
/// [`PLACE_INDEX`]: what a session lists to serve a peer its scope, without reading documents.
///
/// A certificate has none: who holds it depends on the places of the certificate and of the
/// holder through the location tree (see [`crate::scope`]), not on one place.
pub(crate) fn place_entries(ty: &str, json: &Map<String, Value>) -> Vec<(String, String, String)> {
    if ty == "Basic" && token_of(json).is_some_and(|t| t.starts_with(CERTIFICATE_TOKEN)) {
        return Vec::new();
    }
    holding_places(ty, json)
        .into_iter()
        .map(|p| (PLACE_INDEX.to_string(), String::new(), p))
        .collect()
}

/// The index entry naming `key` as an author of a document ([`AUTHOR_INDEX`]). Entries are
/// only ever added: the authors of a document only grow.
pub(crate) fn author_entry(key: &[u8]) -> (String, String, String) {
    (AUTHOR_INDEX.to_string(), String::new(), hex::encode(key))
}

/// The author entries of `keys` (change actors; those that are not ed25519 keys are left out).
pub(crate) fn author_entries(keys: &[Vec<u8>]) -> Vec<(String, String, String)> {
    keys.iter()
        .filter(|k| k.len() == 32)
        .map(|k| author_entry(k))
        .collect()
}

/// The JSON of a document as the store holds it (the Automerge load checks every change hash),
/// a panic in the Automerge library contained as [`ReadError::Damaged`].
pub(crate) fn json_of_stored(bytes: &[u8]) -> Result<Map<String, Value>, ReadError> {
    contain(
        || -> Result<_, ReadError> { Ok(document_to_json(&AutoCommit::load(bytes)?)?) },
        ReadError::Damaged,
    )
}

/// The prefix of certificate tokens.
pub(crate) const CERTIFICATE_TOKEN: &str = "fmc1.";

/// `entries` of a document's new state, with the places it was held at before and is no longer
/// (from `previous`, its entries before) kept as [`LEFT_INDEX`] entries: the devices of those
/// places may still hold it and are told it left. Returning to a place clears its entry. Its
/// authors ([`AUTHOR_INDEX`]) are kept too.
pub(crate) fn with_left(mut entries: IndexEntries, previous: &IndexEntries) -> IndexEntries {
    let now: HashSet<&str> = entries
        .references
        .iter()
        .filter(|(t, _, _)| t == PLACE_INDEX)
        .map(|(_, _, p)| p.as_str())
        .collect();
    let mut left: Vec<String> = previous
        .references
        .iter()
        .filter(|(t, _, _)| t == PLACE_INDEX || t == LEFT_INDEX)
        .map(|(_, _, p)| p.clone())
        .filter(|p| !now.contains(p.as_str()))
        .collect();
    left.sort();
    left.dedup();
    entries.references.extend(
        left.into_iter()
            .map(|p| (LEFT_INDEX.to_string(), String::new(), p)),
    );
    // The authors only grow.
    entries.references.extend(
        previous
            .references
            .iter()
            .filter(|(t, _, _)| t == AUTHOR_INDEX)
            .cloned(),
    );
    entries.references.sort();
    entries.references.dedup();
    entries
}

pub(crate) fn heads_bytes(heads: &[ChangeHash]) -> Vec<[u8; 32]> {
    heads.iter().map(|h| h.0).collect()
}

/// What a staged document write was, for the event stream.
pub(crate) struct StagedDoc {
    pub id: DocId,
    pub ty: String,
    pub source: Source,
}

/// A commit running on a thread of its own, and what its document writes were.
type Behind = (
    std::thread::JoinHandle<Result<Vec<u64>, StoreError>>,
    Vec<Option<StagedDoc>>,
    u64,
);

/// Failed commits remembered for [`Engine::commit_outcome`] (an answer waits for its commit
/// once, right after it ends).
const FAILED_COMMITS_KEPT: usize = 64;

/// Commits numbered in the order they start, and how the last ones ended.
#[derive(Default)]
struct Commits {
    /// The number of the last commit started (0: none yet).
    started: u64,
    /// Every commit up to this number has ended.
    ended: u64,
    /// The last of those that failed, oldest first.
    failed: std::collections::VecDeque<(u64, CommitError)>,
}

impl Commits {
    fn begin(&mut self) -> u64 {
        self.started += 1;
        self.started
    }

    fn end(&mut self, number: u64, failed: Option<&CommitError>) {
        self.ended = self.ended.max(number);
        if let Some(e) = failed {
            if self.failed.len() == FAILED_COMMITS_KEPT {
                self.failed.pop_front();
            }
            self.failed.push_back((number, e.clone()));
        }
    }
}

/// A document prepared off the engine, ready to be staged.
pub(crate) struct PreparedDoc {
    pub id: DocId,
    pub meta: DocMeta,
    pub entries: IndexEntries,
    pub bytes: Vec<u8>,
    /// Signed envelopes of its changes.
    pub envelopes: Vec<u8>,
    /// The certificate or revocation token it carries, if it is a trust document.
    pub token: Option<String>,
}

/// The engine. See the crate docs.
pub struct Engine {
    pub(crate) store: Arc<dyn Store>,
    /// Documents of the batch being committed in the background.
    pub(crate) in_flight: HashMap<DocId, Live>,
    /// That commit, what its document writes were, and its number.
    behind: Option<Behind>,
    /// Commits started and ended (for answers sent once their writes are durable).
    commits: Commits,
    pub(crate) me: NodeIdentity,
    pub(crate) policy: Box<dyn Policy + Send>,
    cache: LruCache<DocId, Live>,
    /// Documents changed since the last flush (never evicted before it).
    pub(crate) dirty: HashMap<DocId, Live>,
    pending: Vec<Write>,
    /// For each pending write, the document write it is (for events).
    pending_docs: Vec<Option<StagedDoc>>,
    /// Whether written documents stay in memory (false for bulk loads).
    pub(crate) keep_flushed: bool,
    /// Threads that prepare received or loaded documents.
    pub(crate) threads: usize,
    /// Certificates and revocations known here.
    pub(crate) trust: Trust,
    /// Payloads refused lately, by hash: the same bytes offered again are refused at once.
    pub(crate) refused: LruCache<[u8; 32], ()>,
    /// Certificates and revocations staged: taken into the trust state once durable, so that the
    /// trust state never runs ahead of the disk.
    pending_tokens: Vec<String>,
    /// Keys newly revoked whose unvouched changes are still to be taken out of the documents.
    pub(crate) retractions: Vec<crate::retract::Retraction>,
    /// Equivocations met while merging, whose evidence is still to be written.
    pub(crate) equivocations: Vec<(String, fieldmesh_trust::Equivocation)>,
    /// Those of the background commit.
    behind_tokens: Vec<String>,
    /// Whether local writes are checked against this node's certificate (always, except to
    /// play a modified, byzantine device in tests: its peers still check everything).
    pub(crate) check_local: bool,
    /// Documents stored since the last [`Engine::take_events`].
    events: Vec<Stored>,
    reader: Reader,
    /// Bounds on every document this engine loads, from a peer, a file or a client.
    pub(crate) limits: DocLimits,
    /// Documents this node found it cannot read (a damaged store): no longer offered to peers,
    /// so that a peer asking for them does not fail every session until `fieldmesh salvage`.
    pub(crate) unreadable: HashSet<fieldmesh_storage::DocId>,
    /// A certificate or revocation could not be read at start: this node cannot know whom to
    /// trust (a revocation may be among them), so it serves no peer beyond certificates until
    /// the store is salvaged.
    pub(crate) trust_damaged: bool,
    /// Reaches, the location tree, what each session offers its peer.
    pub(crate) scope: crate::scope::ScopeState,
    /// Numbers used from each lease central gave this device (also in the store, under
    /// `local:lease:<lease doc>`).
    pub(crate) lease_used: HashMap<DocId, u64>,
    /// What [`Engine::flagged`] last listed of each flagged document, by the sequence of the
    /// document's last write.
    pub(crate) flags_listed: HashMap<DocId, (u64, Vec<Value>)>,
    /// The deployment's rules for business numbers, checked on local writes (none: any).
    pub(crate) numbers: Option<crate::central::NumberConfig>,
    /// Central: documents from elsewhere get their canonical id as they are received (set by
    /// [`crate::central::Central::open`]).
    pub(crate) canonical_at_receipt: bool,
    /// Documents given their canonical id at receipt whose processing by central's services
    /// is still to come, with what the services need of them.
    pub(crate) canonical_given: HashMap<DocId, crate::central::Facts>,
    /// What the last local write replaced or should tell its client (OperationOutcome
    /// issues), taken by whoever answers it ([`Engine::take_notes`]).
    pub(crate) notes: Vec<Value>,
    /// A bulk load is running ([`Engine::create_lines`]): policies are kept as given (an export
    /// of openIMIS, priced by its server; central prices them again as its services read them).
    pub(crate) bulk_load: bool,
    /// During a bulk load, the places (`valueReference`s) of the insurees, families and claims
    /// the load staged, as their staged state reads: a policy in the next lines declares them
    /// without reading its family again. Only staged documents are here (any other write of
    /// one removes it); a committed one is read from the store.
    pub(crate) bulk_places: HashMap<DocId, Vec<Value>>,
    /// The ClaimResponse the last Claim written here got ([`Engine::take_claim_answer`]).
    pub(crate) claim_answer: Option<Value>,
    /// The verdicts of the claims written here lately, by claim: the store has them once their
    /// commit is durable, a later claim of the same insuree may come before.
    pub(crate) recent_verdicts: crate::claims::RecentVerdicts,
}

impl Engine {
    /// An engine over `store` keeping up to `cache_documents` live documents.
    pub fn new(store: Box<dyn Store>, me: NodeIdentity, cache_documents: usize) -> Self {
        let store: Arc<dyn Store> = Arc::from(store);
        let trust = Trust::new(me.root);
        let mut engine = Self {
            trust,
            refused: LruCache::new(NonZeroUsize::new(REFUSED_MEMORY).unwrap_or(NonZeroUsize::MIN)),
            pending_tokens: Vec::new(),
            retractions: Vec::new(),
            equivocations: Vec::new(),
            behind_tokens: Vec::new(),
            check_local: true,
            notes: Vec::new(),
            bulk_load: false,
            bulk_places: HashMap::new(),
            claim_answer: None,
            recent_verdicts: Default::default(),
            reader: Reader::new(Arc::clone(&store), cache_documents),
            store,
            in_flight: HashMap::new(),
            behind: None,
            commits: Commits::default(),
            me,
            policy: Box::new(OpenImis),
            cache: LruCache::new(NonZeroUsize::new(cache_documents).unwrap_or(NonZeroUsize::MIN)),
            dirty: HashMap::new(),
            pending: Vec::new(),
            pending_docs: Vec::new(),
            keep_flushed: true,
            threads: std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
            events: Vec::new(),
            limits: DocLimits::default(),
            unreadable: HashSet::new(),
            trust_damaged: false,
            scope: crate::scope::ScopeState::default(),
            lease_used: HashMap::new(),
            flags_listed: HashMap::new(),
            numbers: None,
            canonical_at_receipt: false,
            canonical_given: HashMap::new(),
        };
        if let Err(e) = engine.load_trust() {
            tracing::error!(error = %e, "cannot read the certificates in the store");
        }
        engine
    }

    /// Reads every certificate and revocation document of the store into the trust state.
    fn load_trust(&mut self) -> Result<(), ReadError> {
        let mut ids = self.store.of_type("Basic")?;
        ids.extend(self.store.of_type("AuditEvent")?);
        for id in ids {
            // One damaged trust document costs that document (its certificate comes back from
            // peers after `fieldmesh salvage`), not every other certificate.
            let read = self
                .store
                .doc_bytes(&id)
                .map_err(ReadError::from)
                .and_then(|bytes| {
                    let Some(bytes) = bytes else { return Ok(None) };
                    contain(
                        || -> Result<_, ReadError> {
                            Ok(document_to_json(&AutoCommit::load(&bytes)?)?)
                        },
                        ReadError::Damaged,
                    )
                    .map(Some)
                });
            let json = match read {
                Ok(Some(json)) => json,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(doc = %uuid::Uuid::from_bytes(id), error = %e, "a certificate or revocation cannot be read: serving no peer but certificates until `fieldmesh salvage`");
                    self.trust_damaged = true;
                    continue;
                }
            };
            if let Some(token) = token_of(&json)
                && let Err(e) = self.trust.add_token(token)
            {
                tracing::warn!(doc = %uuid::Uuid::from_bytes(id), error = %e, "ignored a trust document");
            }
        }
        Ok(())
    }

    /// A handle for reads and searches of committed (durable) data, usable from other threads
    /// while this engine writes.
    pub fn reader(&self) -> Reader {
        self.reader.clone()
    }

    /// Sets the bounds on documents (tests; the defaults are far above any real resource).
    pub fn set_limits(&mut self, limits: DocLimits) {
        self.limits = limits;
    }

    /// Sets the deployment's rules for business numbers: local writes of a number that breaks
    /// them are refused (as openIMIS refuses them).
    pub fn set_number_rules(&mut self, numbers: crate::central::NumberConfig) {
        self.numbers = Some(numbers);
    }

    /// Sets this node's clock (simulations): its changes are dated `t` and its certificate is
    /// checked at `t`.
    pub fn set_clock(&mut self, t: i64) {
        self.me.clock = Some(t);
    }

    /// This node's identity.
    pub fn identity(&self) -> &NodeIdentity {
        &self.me
    }

    /// Ends the engine as a crash would: writes staged but not yet committed are lost (what was
    /// acknowledged is already in the store).
    pub fn crash(mut self) {
        let _ = self.wait_behind();
        self.pending.clear();
        self.pending_docs.clear();
        self.pending_tokens.clear();
        self.dirty.clear();
    }

    /// Stops checking local writes against this node's certificate: the node then behaves like
    /// a modified device that writes what it likes (its peers still refuse it). For tests only.
    pub fn play_byzantine(&mut self) {
        self.check_local = false;
    }

    /// Keeps every document it ever held, whatever its scope: a device that never hands data
    /// off. For the simulation's canary only (its privacy invariant must catch it).
    pub fn play_hoarder(&mut self) {
        self.scope.hoard = true;
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

    /// Whether `source` may hand in more than certificates: it is this node or a file, or a
    /// peer holding a certificate that no known revocation revokes.
    ///
    /// This decides only whom to serve and whose documents to take: see [`Trust::serves`].
    pub fn certified(&self, source: &Source) -> bool {
        match source {
            Source::Peer(k) => {
                !self.trust_damaged && self.trust.serves(&self.me.public(), &k.0, self.me.time())
            }
            Source::Local | Source::File(_) => true,
        }
    }

    /// Stages the token a trust document carries: it is learnt once the document is durable.
    pub(crate) fn learn(&mut self, json: &Map<String, Value>) {
        if let Some(token) = token_of(json) {
            self.learn_token(token);
        }
    }

    pub(crate) fn learn_token(&mut self, token: &str) {
        self.pending_tokens.push(token.to_string());
    }

    /// Whether certificates or revocations wait for their commit to be learnt.
    pub(crate) fn tokens_pending(&self) -> bool {
        !self.pending_tokens.is_empty()
    }

    /// Takes committed tokens into the trust state; forgets every checkpoint when one is new, so
    /// that changes refused before are offered again and decided anew (in the next commit).
    fn learn_committed(&mut self, tokens: Vec<String>) {
        let mut new = false;
        for token in tokens {
            match self.trust.add_token(&token) {
                Ok(true) => {
                    new = true;
                    if let Ok(r) = fieldmesh_trust::verify_revocation(self.trust.root(), &token)
                        && let Ok(key) = fieldmesh_trust::parse_key(&r.subject)
                    {
                        self.retractions.push(Retraction::Revoked(key));
                    }
                    if let Ok(e) = fieldmesh_trust::verify_evidence(&token) {
                        tracing::warn!(key = %hex::encode(&e.key[..8]), doc = %uuid::Uuid::from_bytes(e.doc), seq = e.seq, "learned that a key equivocated");
                        self.retractions.push(Retraction::Equivocated {
                            key: e.key,
                            doc: e.doc,
                            seq: e.seq,
                        });
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "a trust document carries an invalid token"),
            }
        }
        if new {
            self.scope_changed(false);
            tracing::info!("learned a new certificate or revocation");
            self.push(Write::ForgetCheckpoints, None);
        }
    }

    /// Whether written documents stay in memory (turn off for bulk loads).
    pub fn set_keep_flushed(&mut self, keep: bool) {
        self.keep_flushed = keep;
    }

    /// The store's counters (committed state).
    pub fn stats(&self) -> Result<Stats, StoreError> {
        self.store.stats()
    }

    /// The store (for checks and tools).
    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Commits what is staged, then folds the store's deferred index writes into its index
    /// tables if there are at least `at_least` of them ([`Store::fold_index`]); returns how many
    /// were folded. For an idle node: the writes waiting for a fold stay in memory until then.
    pub fn fold_index(&mut self, at_least: usize) -> Result<usize, CommitError> {
        self.flush()?;
        Ok(self.store.fold_index(at_least)?)
    }

    /// Number of staged writes.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// What was stored since the last call, by source, once durable.
    pub fn take_events(&mut self) -> Vec<Stored> {
        std::mem::take(&mut self.events)
    }

    pub(crate) fn push(&mut self, write: Write, doc: Option<StagedDoc>) {
        self.pending.push(write);
        self.pending_docs.push(doc);
    }

    fn note_stored(&mut self, seqs: &[u64], docs: Vec<Option<StagedDoc>>) {
        for (seq, d) in seqs.iter().zip(docs) {
            let Some(d) = d else { continue };
            if matches!(d.ty.as_str(), "Location" | "Organization") {
                self.scope_changed(true);
            }
            match self.events.last_mut() {
                Some(e) if e.source == d.source => {
                    e.seq = e.seq.max(*seq);
                    e.docs.push((d.id, d.ty));
                }
                _ => self.events.push(Stored {
                    source: d.source,
                    seq: *seq,
                    docs: vec![(d.id, d.ty)],
                }),
            }
        }
    }

    /// Commits every staged write durably. On failure nothing staged is kept: the affected
    /// documents are dropped from memory and read again from disk when next needed.
    pub fn flush(&mut self) -> Result<usize, CommitError> {
        self.wait_behind()?;
        if self.pending.is_empty() {
            return Ok(0);
        }
        let writes = std::mem::take(&mut self.pending);
        let docs = std::mem::take(&mut self.pending_docs);
        let tokens = std::mem::take(&mut self.pending_tokens);
        let n = writes.len();
        let number = self.commits.begin();
        match self.store.commit(writes) {
            Ok(seqs) => {
                self.commits.end(number, None);
                let last = seqs.iter().copied().max().unwrap_or_default();
                for (id, mut live) in self.dirty.drain() {
                    live.meta.seq = last;
                    if self.keep_flushed && live.doc.is_some() {
                        self.cache.put(id, live);
                    }
                }
                self.note_stored(&seqs, docs);
                self.learn_committed(tokens);
                Ok(n)
            }
            Err(e) => {
                // Nothing of the batch is on disk: neither its documents in memory nor its
                // certificates in the trust state.
                self.dirty.clear();
                let e = CommitError::from(e);
                self.commits.end(number, Some(&e));
                Err(e)
            }
        }
    }

    /// Starts committing every staged write on a thread of its own and returns at once, so the
    /// next batch can be prepared meanwhile. At most one batch is in flight; nothing is
    /// acknowledged until [`Engine::flush`] (or the next call) has waited for it.
    pub fn flush_behind(&mut self) -> Result<(), CommitError> {
        self.wait_behind()?;
        if self.pending.is_empty() {
            return Ok(());
        }
        let writes = std::mem::take(&mut self.pending);
        let docs = std::mem::take(&mut self.pending_docs);
        self.behind_tokens = std::mem::take(&mut self.pending_tokens);
        self.in_flight = std::mem::take(&mut self.dirty);
        let store = Arc::clone(&self.store);
        let number = self.commits.begin();
        let handle = match std::thread::Builder::new()
            .name("fieldmesh-commit".into())
            .spawn(move || store.commit(writes))
        {
            Ok(handle) => handle,
            Err(e) => {
                // The writes went with the closure: nothing of them is kept, as when a commit
                // fails.
                self.in_flight.clear();
                self.behind_tokens.clear();
                let e = CommitError::Thread(format!("cannot start a commit thread: {e}"));
                self.commits.end(number, Some(&e));
                return Err(e);
            }
        };
        self.behind = Some((handle, docs, number));
        Ok(())
    }

    /// The number of the commit that makes durable everything staged or being committed now:
    /// [`Engine::commit_outcome`] tells once it has ended. An answer to a write is sent then,
    /// while the engine goes on with the next command.
    pub fn commit_ticket(&self) -> u64 {
        self.commits.started + u64::from(!self.pending.is_empty())
    }

    /// How commit `ticket` ([`Engine::commit_ticket`]) ended: `None` while it has not (its
    /// writes are staged or being committed in the background).
    pub fn commit_outcome(&self, ticket: u64) -> Option<Result<(), CommitError>> {
        if ticket > self.commits.ended {
            return None;
        }
        if let Some((_, e)) = self.commits.failed.iter().find(|(n, _)| *n == ticket) {
            return Some(Err(e.clone()));
        }
        // Older than the failures remembered: whether it failed is forgotten, so it is not
        // reported as durable.
        if self.commits.failed.len() == FAILED_COMMITS_KEPT
            && self
                .commits
                .failed
                .front()
                .is_some_and(|(n, _)| ticket < *n)
        {
            return Some(Err(CommitError::Thread(format!(
                "the outcome of commit {ticket} is no longer known"
            ))));
        }
        Some(Ok(()))
    }

    /// Whether a commit runs in the background ([`Engine::flush_behind`]).
    pub fn committing_behind(&self) -> bool {
        self.behind.is_some()
    }

    /// Whether the background commit, if any, has ended: [`Engine::settle_behind`] then returns
    /// at once.
    pub fn behind_ended(&self) -> bool {
        self.behind
            .as_ref()
            .is_none_or(|(handle, _, _)| handle.is_finished())
    }

    /// Waits for the background commit, if any, and takes in its outcome.
    pub fn settle_behind(&mut self) -> Result<(), CommitError> {
        self.wait_behind()
    }

    /// Waits for the background commit, if any.
    pub(crate) fn wait_behind(&mut self) -> Result<(), CommitError> {
        let Some((handle, docs, number)) = self.behind.take() else {
            return Ok(());
        };
        let in_flight = std::mem::take(&mut self.in_flight);
        let tokens = std::mem::take(&mut self.behind_tokens);
        let seqs = match handle.join() {
            Ok(Ok(seqs)) => seqs,
            Ok(Err(e)) => {
                let e = CommitError::from(e);
                self.commits.end(number, Some(&e));
                return Err(e);
            }
            Err(_) => {
                let e = CommitError::Thread("the commit thread panicked".into());
                self.commits.end(number, Some(&e));
                return Err(e);
            }
        };
        self.commits.end(number, None);
        self.note_stored(&seqs, docs);
        self.learn_committed(tokens);
        if self.keep_flushed {
            for (id, live) in in_flight {
                if live.doc.is_some() {
                    self.cache.put(id, live);
                }
            }
        }
        Ok(())
    }

    pub(crate) fn meta_of(&self, id: &DocId) -> Result<Option<DocMeta>, StoreError> {
        match self.meta_in_memory(id) {
            Some(meta) => Ok(Some(meta)),
            None => self.store.doc_meta(id.as_bytes()),
        }
    }

    /// The record of a document staged, being committed or cached, if it is one of those.
    fn meta_in_memory(&self, id: &DocId) -> Option<DocMeta> {
        self.dirty
            .get(id)
            .or_else(|| self.in_flight.get(id))
            .or_else(|| self.cache.peek(id))
            .map(|l| l.meta.clone())
    }

    /// [`Engine::meta_of`] of each of `ids`, the store read once for those not in memory
    /// ([`fieldmesh_storage::Store::doc_metas`]).
    #[allow(clippy::type_complexity)]
    pub(crate) fn metas_of(
        &self,
        ids: &[DocId],
    ) -> Result<Vec<Result<Option<DocMeta>, StoreError>>, StoreError> {
        let mut out: Vec<Option<Result<Option<DocMeta>, StoreError>>> = ids
            .iter()
            .map(|id| self.meta_in_memory(id).map(|m| Ok(Some(m))))
            .collect();
        let stored: Vec<[u8; 16]> = ids
            .iter()
            .zip(&out)
            .filter(|(_, m)| m.is_none())
            .map(|(id, _)| *id.as_bytes())
            .collect();
        let mut read = self.store.doc_metas(&stored)?.into_iter();
        Ok(out
            .iter_mut()
            .map(|m| m.take().or_else(|| read.next()).unwrap_or(Ok(None)))
            .collect())
    }

    /// Takes a document out of memory or the store, for editing or reading.
    pub(crate) fn take(&mut self, id: &DocId) -> Result<Option<Live>, ReadError> {
        if self.in_flight.contains_key(id) {
            self.wait_behind()?;
        }
        if self.dirty.get(id).is_some_and(|l| l.doc.is_none()) {
            // A bulk-loaded or received document no longer in memory: read from the bytes staged
            // for it (a load's policy reading its family's places, say), else commit it and
            // read it back.
            match self.load_staged_bytes(id)? {
                Some(doc) => {
                    if let Some(mut l) = self.dirty.remove(id) {
                        l.doc = Some(Box::new(doc));
                        return Ok(Some(l));
                    }
                }
                None => {
                    self.flush()?;
                }
            }
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
            .ok_or_else(|| DocError::Missing(id.to_string()))?;
        let (doc, entries) = contain(
            || -> Result<_, ReadError> {
                let doc = AutoCommit::load(&bytes)?.with_actor(self.me.actor.clone());
                let entries = entries_of_json(&document_to_json(&doc)?);
                Ok((doc, entries))
            },
            ReadError::Damaged,
        )?;
        Ok(Some(Live {
            doc: Some(Box::new(doc)),
            meta,
            entries,
        }))
    }

    /// The document `id` loaded from the whole save staged for it, if that is its last staged
    /// write (a bulk-loaded or received document is staged encoded, and not kept in memory).
    fn load_staged_bytes(&self, id: &DocId) -> Result<Option<AutoCommit>, ReadError> {
        let last = self.pending.iter().rev().find_map(|w| match w {
            Write::Doc(d) if d.id == *id.as_bytes() => Some(&d.data),
            _ => None,
        });
        let Some(DocData::FullEncoded(stored)) = last else {
            return Ok(None);
        };
        contain(
            || -> Result<_, ReadError> {
                let mut bytes = Vec::new();
                fieldmesh_storage::codec::decode_into(stored, &mut bytes)?;
                Ok(Some(
                    AutoCommit::load(&bytes)?.with_actor(self.me.actor.clone()),
                ))
            },
            ReadError::Damaged,
        )
    }

    /// Loads the documents of `ids` that are not in memory, on every core, and reads the
    /// root fields `fields(type)` of each (all of them for `None`): work spread over the cores
    /// before a caller that edits them one by one ([`Engine::edit_loaded`]). A document that
    /// cannot be read here is left out (whoever needs it reads it again, and meets the error
    /// then).
    pub(crate) fn preload(
        &mut self,
        ids: &[DocId],
        fields: &(dyn Fn(&str) -> Option<&'static [&'static str]> + Sync),
    ) -> HashMap<DocId, Loaded> {
        let mut missing: Vec<DocId> = ids
            .iter()
            .filter(|id| {
                !self.dirty.contains_key(id)
                    && !self.in_flight.contains_key(id)
                    && !self.cache.contains(id)
            })
            .copied()
            .collect();
        missing.sort();
        missing.dedup();
        let store = Arc::clone(&self.store);
        let actor = self.me.actor.clone();
        let loaded = crate::par::par_map(&missing, self.threads, |id| {
            let meta = store.doc_meta(id.as_bytes()).ok()??;
            let bytes = store.doc_bytes(id.as_bytes()).ok()??;
            contain(
                || -> Result<_, ReadError> {
                    let doc = AutoCommit::load(&bytes)?.with_actor(actor.clone());
                    let (json, partial) = match fields(&meta.ty) {
                        Some(keys) => (
                            fieldmesh_fhir_docs::convert::document_fields(&doc, keys)?,
                            true,
                        ),
                        None => (document_to_json(&doc)?, false),
                    };
                    Ok(Loaded {
                        ty: meta.ty.clone(),
                        json,
                        partial,
                        live: Live {
                            doc: Some(Box::new(doc)),
                            meta,
                            entries: IndexEntries::default(),
                        },
                    })
                },
                ReadError::Damaged,
            )
            .ok()
        })
        .unwrap_or_default();
        missing
            .into_iter()
            .zip(loaded)
            .filter_map(|(id, l)| Some((id, l?)))
            .collect()
    }

    /// Puts a document back after using it.
    pub(crate) fn put_back(&mut self, id: DocId, live: Live, dirty: bool) {
        if dirty {
            self.dirty.insert(id, live);
        } else {
            self.cache.put(id, live);
        }
    }

    /// Runs `f` on the live document `id` of type `ty`, then puts it back where it was.
    pub(crate) fn with_doc<T>(
        &mut self,
        ty: &str,
        id: &str,
        f: impl FnOnce(&Self, &DocId, &mut Live) -> Result<T, ReadError>,
    ) -> Result<T, ReadError> {
        let not_found = || ReadError::NotFound {
            ty: ty.into(),
            id: id.into(),
        };
        if !profile::is_supported(ty) {
            return Err(ReadError::Unsupported(ty.into()));
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
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn stage(
        &mut self,
        id: &DocId,
        meta: &DocMeta,
        entries: &IndexEntries,
        data: fieldmesh_storage::DocData,
        previous: IndexEntries,
        envelopes: Vec<u8>,
        source: Source,
    ) {
        let staged = StagedDoc {
            id: *id,
            ty: meta.ty.clone(),
            source,
        };
        self.bulk_places.remove(id);
        self.push(
            Write::Doc(DocWrite {
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
            }),
            Some(staged),
        );
    }

    /// Stages a document new to this node, prepared off the engine thread
    /// (received from a peer, or bulk-loaded).
    pub(crate) fn stage_received(&mut self, d: PreparedDoc, source: Source) {
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
            source,
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

    /// Whether a taken document still has a write waiting for the next flush.
    pub(crate) fn has_pending_write(&self, id: &DocId) -> bool {
        self.pending
            .iter()
            .any(|w| matches!(w, Write::Doc(d) if d.id == *id.as_bytes()))
    }

    /// Document ids of type `ty` matching an identifier query, committed and staged (what a
    /// write resolves references against).
    pub(crate) fn find_ids(
        &self,
        ty: &str,
        query: &IdentifierQuery,
    ) -> Result<Vec<DocId>, StoreError> {
        let mut ids: Vec<DocId> = match query {
            IdentifierQuery::Exact(k) => self.store.find(ty, &k.system, &k.value)?,
            IdentifierQuery::ValueOnly(v) => self.store.find_value(ty, v)?,
        }
        .into_iter()
        .map(|b| DocId(uuid::Uuid::from_bytes(b)))
        .collect();
        for (id, live) in self.dirty.iter().chain(&self.in_flight) {
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
}

impl Engine {
    /// The heads of document `id` as staged here, if a write of it is pending.
    pub(crate) fn staged_heads(&self, id: &DocId) -> Option<Vec<[u8; 32]>> {
        self.dirty
            .get(id)
            .or_else(|| self.in_flight.get(id))
            .map(|l| l.meta.heads.clone())
    }

    /// Documents whose reference-index entries name `(ty, system, value)`, committed and
    /// staged (what a write checks against).
    pub(crate) fn referrers(
        &self,
        ty: &str,
        system: &str,
        value: &str,
    ) -> Result<Vec<DocId>, StoreError> {
        let mut ids: Vec<DocId> = self
            .store
            .referrers(ty, system, value)?
            .into_iter()
            .map(|b| DocId(uuid::Uuid::from_bytes(b)))
            .collect();
        for (id, live) in self.dirty.iter().chain(&self.in_flight) {
            let hit = live
                .entries
                .references
                .iter()
                .any(|(t, s, v)| t == ty && s == system && v == value);
            if hit && !ids.contains(id) {
                ids.push(*id);
            }
        }
        Ok(ids)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.wait_behind() {
            tracing::error!(error = %e, "a background commit failed while the engine closed");
        }
    }
}

/// References a write makes resolve against what this node holds, staged documents included.
impl Resolver for Engine {
    fn local(&self, ty: &str, id: &str) -> Option<IdentKey> {
        let doc_id = DocId::parse(id)?;
        let meta = self.meta_of(&doc_id).ok()??;
        (meta.ty == ty).then(|| IdentKey::new(meta.origin, id))
    }

    fn find(&self, ty: &str, key: &IdentKey) -> Option<String> {
        let ids = self
            .find_ids(ty, &IdentifierQuery::Exact(key.clone()))
            .ok()?;
        resolve_identifier(ids, ty, key, |id| Some(self.meta_of(id).ok()??.ty))
    }
}

/// The local id a reference by identifier `key` to a `ty` resolves to, given the documents of
/// that type carrying it (`ids`) and the type of a document by id (`type_of`): the target
/// [`pick_target`] chooses among them; with none, a reference made by id before its target
/// arrived (it names the referring node's system), which means the document with that id and
/// no other carrying the value. One rule for writes, bulk loads and reads.
pub(crate) fn resolve_identifier(
    ids: Vec<DocId>,
    ty: &str,
    key: &IdentKey,
    type_of: impl FnOnce(&DocId) -> Option<String>,
) -> Option<String> {
    if !ids.is_empty() {
        return pick_target(&ids, &key.value).map(|id| id.to_string());
    }
    let id = DocId::parse(&key.value)?;
    (type_of(&id)? == ty).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use automerge::transaction::Transactable;
    use fieldmesh_fhir_docs::limits::chunks;

    use super::*;

    /// A document with `n` root keys, one change.
    fn doc_of(n: usize) -> AutoCommit {
        let mut d = AutoCommit::new();
        for i in 0..n {
            d.put(automerge::ROOT, format!("k{i}"), i as i64).unwrap();
        }
        d.commit();
        d
    }

    fn edit(d: &mut AutoCommit, chunks: u32) -> (DocData, u32) {
        let before = d.get_heads();
        d.put(automerge::ROOT, "edited", chunks as i64).unwrap();
        d.commit();
        saved_after_edit(d, &before, chunks)
    }

    #[test]
    fn small_documents_are_saved_whole_and_large_ones_in_chunks_until_compacted() {
        // Small: whole at every edit, one chunk that loads as the document.
        let mut small = doc_of(50);
        let (data, n) = edit(&mut small, 1);
        let DocData::Full(bytes) = data else {
            panic!("a small document is saved whole")
        };
        assert_eq!((n, chunks(&bytes).len()), (1, 1));
        assert_eq!(
            AutoCommit::load(&bytes).unwrap().get_heads(),
            small.get_heads()
        );

        // Large: an incremental chunk per edit ...
        let mut large = doc_of(SAVE_WHOLE_UP_TO_OPS as usize + 1);
        let mut stored = large.save_nocompress();
        let mut n = 1;
        while n < COMPACT_AFTER_CHUNKS {
            let (data, next) = edit(&mut large, n);
            let DocData::Append(more) = data else {
                panic!("a large document gets an incremental chunk")
            };
            assert_eq!(next, n + 1);
            stored.extend_from_slice(&more);
            n = next;
        }
        assert_eq!(chunks(&stored).len(), COMPACT_AFTER_CHUNKS as usize);
        assert_eq!(
            AutoCommit::load(&stored).unwrap().get_heads(),
            large.get_heads()
        );
        // ... and saved whole again once it holds COMPACT_AFTER_CHUNKS.
        let (data, n) = edit(&mut large, n);
        assert!(matches!(data, DocData::Full(_)), "compacted");
        assert_eq!(n, 1);
    }
}
