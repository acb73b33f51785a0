//! The fieldmesh sync protocol, without IO.
//!
//! # Layout
//!
//! - [`wire`]: the versioned, size-capped frame format and its never-panicking decoder.
//! - [`session`]: a sync session as a state machine: hello, set reconciliation of
//!   `(document, heads)` items (negentropy, range-based), then documents batched across many
//!   documents in both directions.
//! - [`driver`]: one session from the host's side: frames in and out, documents to read from
//!   and merge into the store, the checkpoint once everything is durable, the totals.
//! - [`pair`]: two sides of a session in one process, frames carried in memory (tests,
//!   benchmarks, the simulation).
//! - [`schedule`]: when to sync: who opens a session with whom and when, one session per pair,
//!   nothing left behind, periodic resync, retries, redials, discovery, deadlines.
//!
//! No tokio, no libp2p, no clock: the node drives sessions over libp2p streams and its scheduler
//! with the system clock; the simulation drives the same code with simulated time and frames in
//! memory; tests with plain function calls.
#![forbid(unsafe_code)]

pub mod driver;
pub mod pair;
pub mod schedule;
pub mod session;
pub mod wire;

/// A document id (the 16 bytes of its UUID).
pub type DocId = [u8; 16];

pub use driver::{DriveError, Driver, Start, Step, Totals};
pub use schedule::{Admit, Command, Ended, Limits, Millis, Scheduler};
pub use session::{
    Action, Item, Local, Role, Session, SessionError, SessionStats, item_hash, pack,
};
pub use wire::{
    Checkpoint, DocPayload, Heads, MAX_FRAME, Message, PROTOCOL_ID, WIRE_VERSION, WireError,
    decode, encode,
};
