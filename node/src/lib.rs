//! The fieldmesh node: the daemon around the engine, its local FHIR API and its network.
//!
//! # Layout
//!
//! - [`node`]: starting a node (`fieldmesh run`): engine thread, API, network.
//! - [`engine_thread`]: the engine ([`fieldmesh_engine`]) on a thread of its own behind a
//!   bounded channel, reads beside it, and its event stream.
//! - [`api`]: the local FHIR R4 REST API (axum).
//! - [`net`]: libp2p transports, discovery, relays, the sync scheduler and sessions.
//! - [`config`]: the data directory (config file, node key, API token, store) and `init`.
//! - [`certs`]: certificate files, installing them, revocations (`fieldmesh cert`).
//! - [`load`]: `fieldmesh load` of JSON, Bundles and NDJSON.
//!
//! The commands of the `fieldmesh` binary are in `src/cli/`, one file each.
#![forbid(unsafe_code)]

pub mod api;
pub mod certs;
pub mod config;
pub mod engine_thread;
pub mod load;
pub mod net;
pub mod node;

pub use config::{DataDir, Role};
