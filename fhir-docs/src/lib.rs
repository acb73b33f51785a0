//! FHIR R4 resources as Automerge documents.
//!
//! Each FHIR resource instance is one Automerge document whose root map is the resource JSON. This
//! crate is pure: no IO, no async.
//!
//! # Layout
//!
//! - [`convert`]: lossless JSON ⇄ Automerge (exact decimal text, array order, Unicode byte for byte).
//! - [`diff`]: an update becomes the smallest set of Automerge edits, so concurrent updates of
//!   different fields merge.
//! - [`identifiers`]: multi-system identifiers and the keys the store indexes them under.
//! - [`limits`]: bounds on a document (bytes, operations, changes, depth), checked before it is
//!   loaded.
//! - [`references`]: literal references ⇄ logical `{type, identifier}` references.
//! - [`profile`]: the openIMIS resource set and validation with errors that name the field.
//! - [`resource`]: the write and read paths that tie these together (prepare for storage, render
//!   for a client), version ids and conflicts.
//! - [`openimis`]: the openIMIS roles and capability matrix, where a document is, and the
//!   synthetic data generator.
//!
//! Certificates, signed changes and the trust decision are in `fieldmesh-trust`, which takes the
//! [`openimis`] policy as a parameter.
#![forbid(unsafe_code)]

pub mod convert;
pub mod diff;
pub mod error;
pub mod identifiers;
pub mod limits;
pub mod openimis;
pub mod profile;
pub mod references;
pub mod resource;

pub use automerge;
pub use convert::{document_to_json, new_document};
pub use diff::apply_diff;
pub use error::{ConvertError, Invalid, ValidationError};
pub use identifiers::{IdentKey, IdentifierQuery, node_system, parse_identifier_query};
pub use limits::{DocLimits, TooLarge};
pub use references::{RefTarget, Resolver};
pub use resource::{
    Conflict, DocId, Prepared, actor_for_key, conflicts, prepare, render, version_id,
};
