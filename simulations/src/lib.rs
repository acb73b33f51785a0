//! A seeded, deterministic simulation of a fieldmesh field deployment.
//!
//! The simulator runs the real node engine ([`fieldmesh_node::engine::Engine`]: Automerge
//! documents, signatures, certificates, quarantine) over in-memory stores, and connects nodes
//! through the real sans-IO sync [`fieldmesh_protocol::Session`], shuttling encoded frames between
//! them instead of sockets. The world: enrolment officers' phones that enrol families from the
//! demo generator every day, meet each other at random and pass by their health-facility hub;
//! hubs that reach central daily or weekly; days without any link; bundles handed over by hand;
//! message faults, partitions, crashes, wrong clocks and byzantine devices, all drawn from one
//! seed. Invariants are checked as it runs and at the end ([`world::Outcome`]).
//!
//! - [`scenario`]: the data files.
//! - [`world`]: the simulator and its invariants.
//! - [`report`]: the Markdown report with SVG plots.

pub mod report;
pub mod scenario;
pub mod world;

pub use scenario::Scenario;
pub use world::{Outcome, run};

/// Errors of the simulator itself (not invariant violations, which are results).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The scenario cannot be read.
    #[error("scenario: {0}")]
    Scenario(String),
    /// A node's engine failed.
    #[error("engine of {node}: {error}")]
    Engine {
        /// Node name.
        node: String,
        /// What failed.
        error: String,
    },
    /// Writing the report failed.
    #[error("report: {0}")]
    Report(String),
}
