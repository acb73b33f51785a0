//! The engine's event stream: what was stored, and where it came from.
//!
//! The engine records an event for every batch of documents it commits; its owner takes them
//! ([`crate::Engine::take_events`]) after each commit and hands them on: the node's network task
//! schedules sessions from them (a local write is pushed to every connected peer, documents from
//! one peer are passed on to the others), and central's services will act on them.

use fieldmesh_fhir_docs::DocId;

use crate::source::Source;

/// Documents that became durable in one commit, all from one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Where they came from.
    pub source: Source,
    /// The highest store log sequence among them: the store holds them from this sequence on.
    pub seq: u64,
    /// The documents and their resource types.
    pub docs: Vec<(DocId, String)>,
}
