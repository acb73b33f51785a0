//! Errors, one enum per operation, one variant per reason.

use fieldmesh_fhir_docs::{ConvertError, TooLarge, ValidationError};
use fieldmesh_storage::StoreError;
use fieldmesh_trust::{CheckError, Rejection};

/// A stored or received document that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DocError {
    /// Automerge cannot load or edit it.
    #[error("automerge: {0}")]
    Automerge(Box<automerge::AutomergeError>),
    /// It holds values FHIR JSON cannot express.
    #[error("{0}")]
    Convert(#[from] ConvertError),
    /// The store names the document but holds no data for it.
    #[error("document {0} has no data in the store")]
    Missing(String),
    /// Its changes could not be checked.
    #[error("{0}")]
    Check(Box<CheckError>),
    /// It could not be encoded for the store.
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl From<automerge::AutomergeError> for DocError {
    fn from(e: automerge::AutomergeError) -> Self {
        DocError::Automerge(Box::new(e))
    }
}

impl From<CheckError> for DocError {
    fn from(e: CheckError) -> Self {
        DocError::Check(Box::new(e))
    }
}

/// A commit of staged writes failed: nothing of the batch was written.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// The store refused the batch.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The background commit thread could not start or died.
    #[error("the commit thread failed: {0}")]
    Thread(String),
}

impl CommitError {
    /// The store error behind this failure, if it is one.
    pub fn store(&self) -> Option<&StoreError> {
        match self {
            CommitError::Store(e) => Some(e),
            CommitError::Thread(_) => None,
        }
    }
}

/// A local write (create or update) was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
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
    /// This node's certificate does not allow the write.
    #[error("this device may not make this write: {0}")]
    Forbidden(Rejection),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored document cannot be read or edited.
    #[error("the stored document cannot be used: {0}")]
    Document(#[from] DocError),
    /// Committing the write failed.
    #[error("the write was not saved: {0}")]
    Commit(#[from] CommitError),
    /// A thread preparing a batch of writes died.
    #[error("a thread preparing the batch failed; nothing of it was written")]
    Thread,
    /// The resource exceeds the bounds on a document.
    #[error("the resource is too large: {0}")]
    TooLarge(#[from] TooLarge),
}

impl From<ConvertError> for WriteError {
    fn from(e: ConvertError) -> Self {
        WriteError::Document(e.into())
    }
}

impl From<automerge::AutomergeError> for WriteError {
    fn from(e: automerge::AutomergeError) -> Self {
        WriteError::Document(e.into())
    }
}

/// A read or search could not be answered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// No resource of that type with that id.
    #[error("there is no {ty} with id {id} on this node")]
    NotFound {
        /// Resource type asked for.
        ty: String,
        /// Id asked for.
        id: String,
    },
    /// The resource type is not one this node holds.
    #[error("this node does not hold {0} resources")]
    Unsupported(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored document cannot be read.
    #[error("a stored document cannot be read: {0}")]
    Document(#[from] DocError),
    /// Reading the stored document made the Automerge library panic (a damaged document); the
    /// panic was contained to this read.
    #[error("a stored document cannot be read (the Automerge library failed on it: {0})")]
    Damaged(String),
    /// Committing what was staged before reading it failed.
    #[error(transparent)]
    Commit(#[from] CommitError),
}

impl From<ReadError> for WriteError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::NotFound { ty, id } => WriteError::NotFound { ty, id },
            ReadError::Unsupported(t) => WriteError::Unsupported(t),
            ReadError::Store(s) => WriteError::Store(s),
            ReadError::Document(d) => WriteError::Document(d),
            ReadError::Damaged(p) => {
                WriteError::Document(DocError::Missing(format!("a damaged copy ({p})")))
            }
            ReadError::Commit(c) => WriteError::Commit(c),
        }
    }
}

impl From<ConvertError> for ReadError {
    fn from(e: ConvertError) -> Self {
        ReadError::Document(e.into())
    }
}

impl From<automerge::AutomergeError> for ReadError {
    fn from(e: automerge::AutomergeError) -> Self {
        ReadError::Document(e.into())
    }
}

/// Merging received documents failed as a whole (a document that is refused is not an error: it
/// is counted and, where it carried changes, quarantined).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Committing failed.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// A thread preparing received documents died.
    #[error("a thread preparing received documents failed")]
    Thread,
    /// Writing the evidence of an equivocation failed.
    #[error("writing the evidence of an equivocation failed: {0}")]
    Evidence(#[source] Box<WriteError>),
    /// Taking a revoked key's changes out of the documents failed.
    #[error("taking a revoked key's changes out failed: {0}")]
    Retract(#[source] Box<ReadError>),
    /// A peer without a valid certificate sent documents other than certificates and
    /// revocations: nothing of them is kept, and the session ends.
    #[error("peer {peer} has no valid certificate and may send only certificates and revocations")]
    Uncertified {
        /// The peer.
        peer: String,
    },
}

/// Serving a sync session (what it starts from, documents to send, its checkpoint) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Committing what was staged first failed.
    #[error(transparent)]
    Commit(#[from] CommitError),
}

/// Why one received document was refused as a whole (nothing of it applied).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Its bytes are not a loadable Automerge document, or it cannot be checked.
    #[error("{0}")]
    Unreadable(#[from] DocError),
    /// This node's copy of the document cannot be read (its store is damaged).
    #[error("this node's copy cannot be read ({0}); `fieldmesh salvage` rebuilds the store")]
    Damaged(String),
    /// It is not a resource of the type it claims, or not one this node holds.
    #[error("the document is not a {0} this node holds")]
    WrongType(String),
    /// Merged into the copy held here, it would change its resourceType.
    #[error("merged into the copy held here it would change its resourceType ({held} → {sent})")]
    TypeChanged {
        /// Type held here.
        held: String,
        /// Type the payload claims.
        sent: String,
    },
    /// It exceeds the bounds on a document, before or once merged with the copy held here.
    #[error("{0}")]
    TooLarge(#[from] TooLarge),
    /// Reading it made the Automerge library panic (a malformed document it does not refuse
    /// cleanly); the panic was contained to this document.
    #[error("the document could not be read (the Automerge library failed on it: {0})")]
    Panicked(String),
}

impl From<automerge::AutomergeError> for Refusal {
    fn from(e: automerge::AutomergeError) -> Self {
        Refusal::Unreadable(e.into())
    }
}

impl From<ConvertError> for Refusal {
    fn from(e: ConvertError) -> Self {
        Refusal::Unreadable(e.into())
    }
}

impl From<CheckError> for Refusal {
    fn from(e: CheckError) -> Self {
        Refusal::Unreadable(e.into())
    }
}

/// Runs `f`, turning a panic inside it into `Err(on_panic(message))`: a seat belt around the
/// Automerge library on documents from outside (a malformed document should be refused by the
/// checks before; a panic that slips through is contained to that one document).
pub(crate) fn contain<T, E>(
    f: impl FnOnce() -> Result<T, E>,
    on_panic: impl FnOnce(String) -> E,
) -> Result<T, E> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_string());
        tracing::error!(error = %message, "contained a panic on one document");
        Err(on_panic(message))
    })
}
