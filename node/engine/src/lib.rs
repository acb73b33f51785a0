//! The fieldmesh document engine: FHIR resources in, signed Automerge documents in the store,
//! FHIR resources out. Synchronous: no async runtime, no network, no HTTP; the node runs it on a
//! thread of its own, the simulation calls it directly.
//!
//! # Layout
//!
//! - [`core`]: the [`Engine`] itself: the store, a bounded cache of live documents (a live
//!   Automerge document costs ~20× its saved size), staging and group commit
//!   ([`Engine::flush`], [`Engine::flush_behind`]).
//! - [`write`]: local creates and updates: validated, references translated, checked against this
//!   node's own certificate, signed.
//! - [`load`]: bulk loads, prepared on every core ([`par`]: work on every core).
//! - [`receive`]: documents from peers and files: every new change checked before it is applied,
//!   refused changes quarantined.
//! - [`retract`]: revoked keys: the changes central vouches for, and taking out of the documents
//!   the changes a node accepted from a key before it learnt of its revocation.
//! - [`salvage`]: the readable documents of a damaged store, taken into a fresh one.
//! - [`scope`]: what a node holds and serves: the [`Reach`] of a certificate (places and the
//!   location tree below them), a peer's share, documents outside scope and when they leave.
//! - [`serve`]: what a sync session starts from, the documents it sends, its checkpoint.
//! - [`sync`]: an engine as one side of an in-process session ([`EngineHost`]).
//! - [`read`]: [`Reader`], reads and searches of committed data, off the write path.
//! - [`central`]: central's services: canonical ids, business numbers and their leases,
//!   duplicate persons, flags; driven by the store's change log.
//! - [`check`]: the index check of `fieldmesh check`.
//! - [`events`]: what was stored, by source, once durable.
//! - [`source`]: [`Source`], where a change comes from; [`identity`]: who this node is and its
//!   clock; [`error`]: one error enum per operation.
//!
//! The feature `test-support` adds [`test_support`]: certificate builders, forged documents and
//! in-memory sessions between engines, for tests, benchmarks and the simulation.
#![forbid(unsafe_code)]

pub mod central;
pub mod check;
pub mod claims;
pub mod core;
pub mod enrolment;
pub mod error;
pub mod events;
pub mod identity;
pub mod load;
pub mod par;
pub mod read;
pub mod receive;
pub mod retract;
pub mod salvage;
pub mod scope;
pub mod serve;
pub mod source;
pub mod sync;
#[cfg(feature = "test-support")]
pub mod test_support;
pub mod write;

pub use crate::core::{Engine, entries_of_json};
pub use error::{CommitError, DocError, MergeError, ReadError, Refusal, SyncError, WriteError};
pub use events::Stored;
pub use identity::{NodeIdentity, now};
pub use load::parse_json;
pub use par::par_map;
pub use read::{Reader, Served};
pub use receive::MergeReport;
pub use salvage::SalvageReport;
pub use scope::{Reach, ScopeReport};
pub use source::Source;
pub use sync::EngineHost;
pub use write::Outcome;
