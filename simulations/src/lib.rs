//! A seeded, deterministic simulation of a fieldmesh field deployment.
//!
//! The simulator runs the real engine ([`fieldmesh_engine::Engine`]: Automerge documents,
//! signatures, certificates, quarantine) over in-memory stores, and the real sync rules of the
//! node: each node's [`fieldmesh_protocol::Scheduler`] decides when to sync and with whom, and
//! sessions run the real [`fieldmesh_protocol::Driver`], encoded frames carried between nodes
//! instead of sockets. Only time, randomness and the wire are simulated. The world: enrolment officers' phones that enrol families from the
//! demo generator every day, meet each other at random and pass by their health-facility hub;
//! hubs that reach central daily or weekly; days without any link; bundles handed over by hand;
//! message faults, partitions, crashes, wrong clocks and byzantine devices, all drawn from one
//! seed. Invariants are checked as it runs and at the end ([`world::Outcome`]).
//!
//! - [`scenario`]: the data files.
//! - [`world`]: the simulator and its invariants.
//! - [`report`]: the Markdown report with SVG plots.
#![forbid(unsafe_code)]

pub mod report;
pub mod scenario;
pub mod world;

pub use scenario::Scenario;
pub use world::{Outcome, run, summary};

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
