//! The durable store of a fieldmesh node.
//!
//! A store holds Automerge documents (a compacted save plus incremental changes), an identifier
//! index (`type, system, value → document`), a reference index (who points at an identity), a
//! change log with a monotonically increasing sequence (the latest change of each document), per-peer
//! sync checkpoints, quarantined changes and counters. It knows nothing of FHIR or Automerge: the
//! node hands it bytes and index entries.
//!
//! The API is blocking. A node runs its store on a thread of its own behind a bounded channel; the
//! simulations use [`MemStore`] directly.
//!
//! # Layout
//!
//! - [`kv`]: the table layout and the byte-level key/value seam.
//! - [`ops`]: the store logic over that seam, written once for every engine: writes with index
//!   maintenance, queries, and the integrity check [`Store::verify`].
//! - [`redb_store`]: [`RedbStore`], the on-disk engine (redb, durable two-phase commits).
//! - [`mem`]: [`MemStore`], the in-memory engine for simulations and tests.
//!
//! # Durability
//!
//! [`Store::commit`] returns only once its whole batch is durable on disk (an `fsync`ed redb
//! commit). Callers acknowledge a write to a user or a peer only after that; they group many writes
//! into one commit so that flushing does not cap throughput.
#![forbid(unsafe_code)]

pub mod codec;
mod deferred;
pub mod kv;
pub mod mem;
pub mod ops;
pub mod redb_store;

pub use mem::MemStore;
pub use redb_store::{RedbStore, StoreOptions};

/// A document id: the 16 bytes of its UUID.
pub type DocId = [u8; 16];

/// Errors of the store.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process (usually a running node) has the store open.
    #[error(
        "the store at {0} is in use by another process (is a node running on this data directory? stop it first)"
    )]
    InUse(String),
    /// The disk is full; nothing of the failed batch was written.
    #[error("the disk is full: nothing of this write was saved ({0})")]
    DiskFull(String),
    /// Reading or writing the store's files failed.
    #[error("storage I/O failed: {0}")]
    Io(String),
    /// The store holds data this build cannot read.
    #[error("the store is damaged: {0}")]
    Corrupt(String),
    /// A write named a document that is not in the store.
    #[error("{0}")]
    NotFound(String),
    /// The storage engine reported an error.
    #[error("storage engine: {0}")]
    Engine(String),
    /// An earlier write failed on the disk (a full disk): the store reopens itself and the
    /// operation can be tried again.
    #[error("an earlier write failed on the disk; the store is being reopened")]
    Reopening,
}

/// How a document's bytes are written.
#[derive(Debug, Clone)]
pub enum DocData {
    /// A full save; replaces every earlier chunk (creation, or compaction).
    Full(Vec<u8>),
    /// An incremental save appended after the existing chunks.
    Append(Vec<u8>),
    /// A full save already encoded with [`codec::encode`] (lets bulk loads compress on many
    /// threads instead of inside the commit).
    FullEncoded(Vec<u8>),
}

/// One document write with the complete current index entries of the document.
#[derive(Debug, Clone)]
pub struct DocWrite {
    /// Document id.
    pub id: DocId,
    /// Resource type (never changes after creation).
    pub ty: String,
    /// Identifier system of the node that created the document.
    pub origin: String,
    /// The bytes to store.
    pub data: DocData,
    /// The document's heads after this write.
    pub heads: Vec<[u8; 32]>,
    /// When the document last changed (Unix seconds), for `meta.lastUpdated`.
    pub updated: i64,
    /// Every `(system, value)` identity of the document now.
    pub identifiers: Vec<(String, String)>,
    /// Every `(type, system, value)` the document points at now.
    pub references: Vec<(String, String, String)>,
    /// The identities and targets the document had before this write (empty for a new
    /// document). The writer knows them from the document it changed; the store removes the index
    /// entries that are no longer true and adds the new ones.
    pub previous: IndexEntries,
    /// Signed envelopes of the changes this write adds, appended to the document's envelopes
    /// (opaque to the store; empty when there are none).
    pub envelopes: Vec<u8>,
}

/// A document's index entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexEntries {
    /// `(system, value)` identities.
    pub identifiers: Vec<(String, String)>,
    /// `(type, system, value)` targets.
    pub references: Vec<(String, String, String)>,
}

/// Refused changes of one document as one source sent them, to be kept but never applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    /// Why, in words a person understands (every refused change and its reason).
    pub reason: String,
    /// Where it came from (peer id, file, …); the quarantine's budget is per source.
    pub from: String,
    /// The document.
    pub doc: DocId,
    /// Its resource type.
    pub ty: String,
    /// How many changes were refused.
    pub changes: u32,
    /// The refused bytes, as received (kept once: the same bytes sent again add nothing).
    pub data: Vec<u8>,
}

/// A quarantine record as listed (without its payload, which [`Store::quarantined_payload`]
/// reads).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Its sequence number.
    pub seq: u64,
    /// Why it was refused.
    pub reason: String,
    /// Where it came from.
    pub from: String,
    /// The document, if the record names it.
    pub doc: Option<DocId>,
    /// Its resource type (empty if unknown).
    pub ty: String,
    /// How many changes were refused.
    pub changes: u32,
    /// Bytes of the payload.
    pub bytes: u64,
    /// The payload's hash (all zeros for records without a kept payload).
    pub payload: [u8; 32],
}

/// Bounds of the quarantine: what refused data may cost the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuarantineBudget {
    /// Bytes of payloads in all.
    pub total_bytes: u64,
    /// Bytes of payloads from one source.
    pub per_source_bytes: u64,
    /// Records in all.
    pub records: u64,
}

impl Default for QuarantineBudget {
    fn default() -> Self {
        Self {
            total_bytes: 64 << 20,
            per_source_bytes: 8 << 20,
            records: 20_000,
        }
    }
}

/// Prefix of checkpoint records that hold this node's own state rather than what a peer had
/// (central's services' cursor, the numbers used from a lease): kept when checkpoints are
/// forgotten.
pub const LOCAL_CHECKPOINT_PREFIX: &str = "local:";

/// One write in a commit batch.
#[derive(Debug, Clone)]
pub enum Write {
    /// Create or change a document.
    Doc(DocWrite),
    /// Record what a peer and this node had of each other after their last complete sync
    /// (opaque to the store; the sync protocol defines it).
    Checkpoint {
        /// Peer id.
        peer: String,
        /// The encoded checkpoint.
        value: Vec<u8>,
    },
    /// Keep refused changes (within the budget: the oldest records of the source, then the oldest
    /// of all, make room; the same payload is kept once).
    Quarantine(Quarantine),
    /// Forget every per-peer checkpoint, so that the next session with each peer reconciles
    /// everything (after the trust state changed, changes refused before may now be accepted).
    /// Records under [`LOCAL_CHECKPOINT_PREFIX`] are this node's own state and stay.
    ForgetCheckpoints,
    /// Remove a document whose every change was taken out (by a revoked key that central did not
    /// vouch for): its record, data, signatures and index entries. The changes themselves are
    /// in quarantine.
    Remove {
        /// The document.
        id: DocId,
        /// Its index entries, to remove.
        entries: IndexEntries,
        /// Reference-index types whose every entry for this document goes too, found by
        /// scanning them (entries only ever added, which the caller may not know all of).
        purge: Vec<String>,
    },
}

/// The stored record of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocMeta {
    /// Resource type.
    pub ty: String,
    /// Identifier system of the node that created it.
    pub origin: String,
    /// Number of stored chunks (1 after a full save).
    pub chunks: u32,
    /// Sequence number of its latest change in this store's log.
    pub seq: u64,
    /// Heads after its latest change.
    pub heads: Vec<[u8; 32]>,
    /// When it last changed (Unix seconds).
    pub updated: i64,
}

/// Counters of a store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Number of documents.
    pub documents: u64,
    /// The last sequence number given out.
    pub last_seq: u64,
    /// Number of quarantine records.
    pub quarantined: u64,
    /// Bytes of quarantined payloads.
    pub quarantine_bytes: u64,
    /// Quarantine records evicted to stay within the budget.
    pub quarantine_evicted: u64,
}

/// All identifier and reference index entries of a store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexDump {
    /// `(type, system, value, doc)`.
    pub identifiers: std::collections::BTreeSet<(String, String, String, DocId)>,
    /// `(target type, system, value, source doc)`.
    pub references: std::collections::BTreeSet<(String, String, String, DocId)>,
}

/// The narrow interface both engines implement.
pub trait Store: Send + Sync {
    /// Applies a batch atomically and durably; returns a sequence number per write (0 for
    /// checkpoints). When this returns `Ok`, every write of the batch survives a crash.
    /// Commits may come from any thread; they are serialised.
    fn commit(&self, writes: Vec<Write>) -> Result<Vec<u64>, StoreError>;
    /// Folds the index writes not folded yet into the index tables now, in a commit of their
    /// own, if there are at least `at_least` of them; returns how many were folded (0: none).
    /// A node calls it when idle, so that what waits for the next fold does not stay in memory
    /// (stores that defer no index writes fold nothing).
    fn fold_index(&self, at_least: usize) -> Result<usize, StoreError> {
        let _ = at_least;
        Ok(0)
    }
    /// The record of a document.
    fn doc_meta(&self, id: &DocId) -> Result<Option<DocMeta>, StoreError>;
    /// [`Store::doc_meta`] of each of `ids`, in as few reads as the store allows (listing the
    /// documents a peer is offered reads a hundred thousand records). A record that cannot be
    /// read is an error of its own, in its place.
    #[allow(clippy::type_complexity)]
    fn doc_metas(
        &self,
        ids: &[DocId],
    ) -> Result<Vec<Result<Option<DocMeta>, StoreError>>, StoreError> {
        Ok(ids.iter().map(|id| self.doc_meta(id)).collect())
    }
    /// The document's bytes (its chunks concatenated; loadable as one Automerge document).
    fn doc_bytes(&self, id: &DocId) -> Result<Option<Vec<u8>>, StoreError>;
    /// Documents of type `ty` carrying the identifier `system|value`.
    fn find(&self, ty: &str, system: &str, value: &str) -> Result<Vec<DocId>, StoreError>;
    /// Documents of type `ty` carrying an identifier with this value, in any system.
    fn find_value(&self, ty: &str, value: &str) -> Result<Vec<DocId>, StoreError>;
    /// Documents of type `ty` that carry at least one identifier (every document a node writes
    /// does); a full scan of that type's index, for small types such as certificates.
    fn of_type(&self, ty: &str) -> Result<Vec<DocId>, StoreError>;
    /// How many documents of type `ty` the store holds: a counter, not a scan (stores that keep
    /// none count [`Store::of_type`]).
    fn count_of_type(&self, ty: &str) -> Result<usize, StoreError> {
        Ok(self.of_type(ty)?.len())
    }
    /// Documents that point at the identity `ty, system|value`.
    fn referrers(&self, ty: &str, system: &str, value: &str) -> Result<Vec<DocId>, StoreError>;
    /// Up to `limit` log entries after sequence `after`, in order.
    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, DocId)>, StoreError>;
    /// The signed envelopes of a document's changes, as appended by its writes (empty if none).
    fn envelopes(&self, id: &DocId) -> Result<Vec<u8>, StoreError>;
    /// The checkpoint recorded for a peer, if any.
    fn checkpoint(&self, peer: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// A random id given to the store when it was created (all zeros before its first commit):
    /// sequence numbers are only comparable within one store, so peers key checkpoints by it.
    fn store_id(&self) -> Result<[u8; 16], StoreError>;
    /// Up to `limit` quarantine records, oldest first, without their payloads.
    fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, StoreError>;
    /// The payload of a quarantine record, by its hash.
    fn quarantined_payload(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError>;
    /// The store's counters.
    fn stats(&self) -> Result<Stats, StoreError>;
    /// Checks that every index entry, log entry and chunk belongs to a stored document of the
    /// right type, that every document's data is complete and readable, and that the counters
    /// agree; returns the disagreements (empty when consistent). Whether the index holds exactly
    /// the identities inside each document is checked one level up, where documents are understood.
    fn verify(&self) -> Result<Vec<String>, StoreError>;
    /// Every index entry of the store: `(type, system, value, doc)` identities and
    /// `(target type, system, value, source doc)` references, for consistency checks.
    fn index_entries(&self) -> Result<IndexDump, StoreError>;
    /// Every document id the store can still find, however damaged it is, with what could not
    /// be read on the way (empty when nothing was damaged). A listing that never fails, for
    /// serving what is readable, for `check` and for salvage; whether each document itself can
    /// be read is for [`Store::doc_meta`] and [`Store::doc_bytes`] to say.
    fn doc_ids_tolerant(&self) -> (Vec<DocId>, Vec<String>) {
        let mut ids = Vec::new();
        let mut after = 0;
        loop {
            match self.changes_since(after, 4096) {
                Ok(page) if page.is_empty() => return (ids, Vec::new()),
                Ok(page) => {
                    after = page.last().map_or(after, |l| l.0);
                    ids.extend(page.into_iter().map(|(_, id)| id));
                }
                Err(e) => return (ids, vec![format!("the log: {e}")]),
            }
        }
    }
}

/// A shared store is a store: a simulation keeps its node's store while the node's engine
/// "crashes" and restarts.
impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn commit(&self, writes: Vec<Write>) -> Result<Vec<u64>, StoreError> {
        (**self).commit(writes)
    }
    fn fold_index(&self, at_least: usize) -> Result<usize, StoreError> {
        (**self).fold_index(at_least)
    }
    fn doc_meta(&self, id: &DocId) -> Result<Option<DocMeta>, StoreError> {
        (**self).doc_meta(id)
    }
    fn doc_metas(
        &self,
        ids: &[DocId],
    ) -> Result<Vec<Result<Option<DocMeta>, StoreError>>, StoreError> {
        (**self).doc_metas(ids)
    }
    fn doc_bytes(&self, id: &DocId) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).doc_bytes(id)
    }
    fn find(&self, ty: &str, system: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        (**self).find(ty, system, value)
    }
    fn find_value(&self, ty: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        (**self).find_value(ty, value)
    }
    fn of_type(&self, ty: &str) -> Result<Vec<DocId>, StoreError> {
        (**self).of_type(ty)
    }
    fn count_of_type(&self, ty: &str) -> Result<usize, StoreError> {
        (**self).count_of_type(ty)
    }
    fn referrers(&self, ty: &str, system: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        (**self).referrers(ty, system, value)
    }
    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, DocId)>, StoreError> {
        (**self).changes_since(after, limit)
    }
    fn envelopes(&self, id: &DocId) -> Result<Vec<u8>, StoreError> {
        (**self).envelopes(id)
    }
    fn checkpoint(&self, peer: &str) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).checkpoint(peer)
    }
    fn store_id(&self) -> Result<[u8; 16], StoreError> {
        (**self).store_id()
    }
    fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
        (**self).quarantined(limit)
    }
    fn quarantined_payload(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).quarantined_payload(hash)
    }
    fn stats(&self) -> Result<Stats, StoreError> {
        (**self).stats()
    }
    fn verify(&self) -> Result<Vec<String>, StoreError> {
        (**self).verify()
    }
    fn index_entries(&self) -> Result<IndexDump, StoreError> {
        (**self).index_entries()
    }
    fn doc_ids_tolerant(&self) -> (Vec<DocId>, Vec<String>) {
        (**self).doc_ids_tolerant()
    }
}
