//! The fieldmesh node: daemon, CLI commands and the local FHIR API.
//!
//! # Layout
//!
//! - [`certs`]: certificate files, installing them, revocations (`fieldmesh cert`).
//! - [`config`]: the data directory (config file, node key, store) and `init`.
//! - [`engine`]: FHIR resources ⇄ Automerge documents in the store, with a bounded cache and
//!   group commit; synchronous.
//! - [`docs`]: the engine on a thread of its own behind a bounded channel, and its async handle.
//! - [`http`]: the local FHIR R4 REST API (axum).
//! - [`load`]: `fieldmesh load` of JSON, Bundles and NDJSON.
//! - [`demo`]: synthetic openIMIS data and demo deployments.
//! - [`node`]: starting a node (`fieldmesh run`).
//! - [`verify`]: checking received changes against certificates before applying them.
//! - [`net`]: libp2p transports, discovery, relays and sync sessions.

pub mod certs;
pub mod config;
pub mod demo;
pub mod docs;
pub mod engine;
pub mod http;
pub mod load;
pub mod net;
pub mod node;
pub mod verify;

pub use config::{DataDir, Role};
pub use engine::{Engine, EngineError};
