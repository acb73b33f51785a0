//! One session from the host's side: frames in and out, and what to ask of the store.
//!
//! A [`Driver`] wraps a [`Session`] and turns its actions into [`Step`]s a host carries out in
//! order: send a frame, read documents from the store (and hand them back with
//! [`Driver::docs_read`]), merge received documents (and report with [`Driver::merged`]), and at
//! the end record the checkpoint once every merge is durable. It also keeps the session's totals.
//! The node drives it over a libp2p stream with its engine thread; the simulation drives it with
//! the engine directly and frames in memory: both run the same code.

use crate::session::{Action, Item, Local, Role, Session, SessionError};
use crate::wire::{Checkpoint, DocPayload, Heads, WireError, decode, encode};
use crate::{DocId, pack};

/// Documents read from the store per [`Step::Read`]: small enough that a frame goes out while
/// the next batch is read, large enough to compress well together.
pub const READ_BATCH: usize = 512;

/// What a session starts from, taken from the store at one instant.
#[derive(Debug, Clone)]
pub struct Start {
    /// This node's store, log position and the checkpoint it holds for the peer.
    pub local: Local,
    /// The documents the peer may be offered.
    pub items: Vec<Item>,
    /// The peer has no valid certificate: it is offered only certificates and revocations, and
    /// no checkpoint is recorded for it.
    pub restricted: bool,
}

/// What the host must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send this frame.
    Send(Vec<u8>),
    /// Read these documents from the store, each after the heads the peer holds of it, and pass
    /// them to [`Driver::docs_read`] (whose frames go out before the steps after this one).
    Read(Vec<(DocId, Heads)>),
    /// Merge these received documents and report with [`Driver::merged`] once durable. The host
    /// may merge several at once and go on reading frames meanwhile.
    Merge(Vec<DocPayload>),
    /// The peer announced documents outside this node's scope, with its heads: tell
    /// [`Driver::outside_held`] which of them this node holds with other heads (their steps go
    /// out before the steps after this one). Those held with the same heads may be dropped if
    /// the peer is one that keeps them (central or a hub).
    Outside(Vec<(DocId, Heads)>),
    /// The session is complete and everything it brought is durable: record this checkpoint for
    /// the peer (if any); the totals are final.
    Complete(Option<Checkpoint>),
}

/// Why a session failed on this side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DriveError {
    /// A frame could not be decoded.
    #[error("the peer sent a malformed frame: {0}")]
    Wire(#[from] WireError),
    /// The peer broke the protocol.
    #[error("the peer broke the sync protocol: {0}")]
    Session(#[from] SessionError),
}

/// What a session moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Documents sent.
    pub docs_sent: u64,
    /// Documents received.
    pub docs_received: u64,
    /// Bytes of frames sent (with their 4-byte length prefix on a stream).
    pub bytes_sent: u64,
    /// Bytes of frames received (same).
    pub bytes_received: u64,
    /// Documents that changed here.
    pub changed: u64,
    /// Whether the checkpoint path was taken.
    pub fast: bool,
    /// The peer had no valid certificate.
    pub restricted: bool,
    /// The store sequence the session started from.
    pub seq: u64,
    /// Documents outside one side's scope whose changes were exchanged: if something changed
    /// here, one more session confirms the peer holds them all ([`Totals::again`]).
    pub outside_exchanged: u64,
    /// Documents the peer was found to hold outside its scope (a stale copy), new to this node:
    /// the next session tells it.
    pub stale_found: u64,
}

impl Totals {
    /// Whether one more session is due at once ([`crate::Scheduler::again`]): a hand-off
    /// exchange is confirmed by the next one, and a peer found holding a stale copy is told.
    /// (The host does not repeat an exchange with the same heads on both sides, so this does not
    /// loop.)
    pub fn again(&self) -> bool {
        self.stale_found > 0 || (self.outside_exchanged > 0 && self.changed > 0)
    }
}

/// Bytes a stream adds to each frame (its length).
pub const FRAME_PREFIX: u64 = 4;

/// One side of one session, from the host's side.
#[derive(Debug)]
pub struct Driver {
    session: Session,
    totals: Totals,
    merging: usize,
    finished: bool,
    completed: bool,
}

impl Driver {
    /// A driver for a session in `role` starting from `start`.
    pub fn new(role: Role, start: Start) -> Result<Self, DriveError> {
        let totals = Totals {
            restricted: start.restricted,
            seq: start.local.seq,
            ..Totals::default()
        };
        Ok(Self {
            session: Session::new(role, start.local, start.items)?,
            totals,
            merging: 0,
            finished: false,
            completed: false,
        })
    }

    /// The first steps (the initiator greets; the responder waits for the peer).
    pub fn start(&mut self) -> Result<Vec<Step>, DriveError> {
        let actions = self.session.start()?;
        Ok(self.steps(actions))
    }

    /// Handles a received frame.
    pub fn receive(&mut self, frame: &[u8]) -> Result<Vec<Step>, DriveError> {
        self.totals.bytes_received += frame.len() as u64 + FRAME_PREFIX;
        let actions = self.session.handle(decode(frame)?)?;
        Ok(self.steps(actions))
    }

    /// The documents a [`Step::Read`] asked for: the frames that carry them.
    pub fn docs_read(&mut self, docs: Vec<DocPayload>) -> Vec<Step> {
        self.totals.docs_sent += docs.len() as u64;
        pack(docs)
            .into_iter()
            .map(|m| self.send(encode(&m)))
            .collect()
    }

    /// What the host found of a [`Step::Outside`]: `(document, the peer's heads, this node's
    /// heads)` of those it holds with other heads.
    pub fn outside_held(&mut self, differ: Vec<(DocId, Heads, Heads)>) -> Vec<Step> {
        self.totals.outside_exchanged += differ.len() as u64;
        let actions = self.session.outside_held(differ);
        self.steps(actions)
    }

    /// The host found, merging, documents the peer holds outside its scope (a stale copy of one
    /// that moved away): one more session tells it (see [`Totals::again`]).
    pub fn outside_found(&mut self, n: u64) {
        self.totals.stale_found += n;
    }

    /// A [`Step::Merge`] is durable; `changed` documents changed here.
    pub fn merged(&mut self, changed: usize) -> Vec<Step> {
        self.merging = self.merging.saturating_sub(1);
        self.totals.changed += changed as u64;
        self.complete_if_done()
    }

    /// What the session moved so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Whether the session reached its end (both sides sent everything).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Whether [`Step::Complete`] was given.
    pub fn is_complete(&self) -> bool {
        self.completed
    }

    /// Merges not yet reported.
    pub fn merges_pending(&self) -> usize {
        self.merging
    }

    fn send(&mut self, frame: Vec<u8>) -> Step {
        self.totals.bytes_sent += frame.len() as u64 + FRAME_PREFIX;
        Step::Send(frame)
    }

    fn complete_if_done(&mut self) -> Vec<Step> {
        if self.finished && self.merging == 0 && !self.completed {
            self.completed = true;
            self.totals.fast = self.session.stats().fast;
            let checkpoint = if self.totals.restricted {
                None
            } else {
                self.session.checkpoint()
            };
            vec![Step::Complete(checkpoint)]
        } else {
            Vec::new()
        }
    }

    fn steps(&mut self, actions: Vec<Action>) -> Vec<Step> {
        let mut out = Vec::new();
        for action in actions {
            match action {
                Action::Send(m) => {
                    let frame = encode(&m);
                    out.push(self.send(frame));
                }
                Action::SendDocs(ids) => {
                    out.extend(ids.chunks(READ_BATCH).map(|c| Step::Read(c.to_vec())));
                }
                Action::Apply(docs) => {
                    self.totals.docs_received += docs.len() as u64;
                    self.merging += 1;
                    out.push(Step::Merge(docs));
                }
                Action::Outside(theirs) => out.push(Step::Outside(theirs)),
                Action::Finished => {
                    self.finished = true;
                    out.extend(self.complete_if_done());
                }
            }
        }
        out
    }
}
