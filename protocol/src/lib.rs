//! The fieldmesh sync protocol, without IO.
//!
//! # Layout
//!
//! - [`wire`]: the versioned, size-capped frame format and its never-panicking decoder.
//! - [`session`]: a sync session as a state machine: hello, set reconciliation of
//!   `(document, heads)` items (negentropy, range-based), then documents batched across many
//!   documents in both directions.
//!
//! No tokio, no libp2p: the node drives sessions over libp2p streams, the simulation over a
//! seeded scheduler, tests over plain function calls.

pub mod session;
pub mod wire;

/// A document id (the 16 bytes of its UUID).
pub type DocId = [u8; 16];

pub use session::{
    Action, Item, Local, Role, Session, SessionError, SessionStats, item_hash, pack,
};
pub use wire::{
    Checkpoint, DocPayload, Heads, MAX_FRAME, Message, PROTOCOL_ID, WIRE_VERSION, WireError,
    decode, encode,
};
