//! The fieldmesh node: daemon, CLI commands and the local FHIR API.
//!
//! # Layout
//!
//! - [`config`]: the data directory (config file, node key, store) and `init`.
//! - [`engine`]: FHIR resources ⇄ Automerge documents in the store, with a bounded cache and
//!   group commit; synchronous.
//! - [`docs`]: the engine on a thread of its own behind a bounded channel, and its async handle.
//! - [`http`]: the local FHIR R4 REST API (axum).
//! - [`load`]: `fieldmesh load` of JSON, Bundles and NDJSON.
//! - [`demo`]: synthetic openIMIS data and demo deployments.
//! - [`node`]: starting a node (`fieldmesh run`).

pub mod config;
pub mod demo;
pub mod docs;
pub mod engine;
pub mod http;
pub mod load;
pub mod net;
pub mod node;

pub use config::{DataDir, Role};
pub use engine::{Engine, EngineError};
