//! A sync session between two nodes, as a state machine without IO.
//!
//! The host feeds it received [`Message`]s and carries out the [`Action`]s it returns: send a
//! message, send documents (read from the host's store), apply received documents. Time and IO stay
//! with the host; the node wraps a session in a libp2p stream, the simulation in a scheduler.
//!
//! ```text
//! initiator                                  responder
//!   Hello, Reconcile(q0)          ─────▶
//!                                 ◀─────     Hello, Reconcile(r0)
//!   Reconcile(q1) …               ─────▶     (negentropy rounds until the initiator knows
//!                                 ◀─────      which items differ)
//!   Docs(what it has and the other lacks), Want(hashes it lacks), Done ─────▶
//!                                 ◀─────     Docs(wanted), Done
//! ```
//!
//! The reconciled set holds one item per document: a hash of the document id and its sorted
//! heads. Equal stores agree in one negentropy exchange whatever their size; a document whose
//! heads differ shows up on both sides, and each sends its copy (Automerge merges them).

use std::collections::HashMap;

use negentropy::{Id, Negentropy, NegentropyStorageVector};
use sha2::{Digest, Sha256};

use crate::DocId;
use crate::wire::{DocPayload, MAX_FRAME, Message};

/// Largest negentropy message (leaves room in a frame for its header).
pub const RECONCILE_FRAME_LIMIT: u64 = 512 * 1024;

/// The hash under which a `(document, heads)` pair is reconciled.
pub fn item_hash(doc: &DocId, heads: &[[u8; 32]]) -> [u8; 32] {
    let mut sorted: Vec<&[u8; 32]> = heads.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    h.update(b"fieldmesh-item-v1");
    h.update(doc);
    for head in sorted {
        h.update(head);
    }
    h.finalize().into()
}

/// Who opened the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Dialled the peer and drives reconciliation.
    Initiator,
    /// Answers.
    Responder,
}

/// What the host must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this message.
    Send(Message),
    /// Read these documents from the store and send them (see [`pack`]).
    SendDocs(Vec<DocId>),
    /// Merge these received documents into the store.
    Apply(Vec<DocPayload>),
    /// The session is over; both sides have what the other had.
    Finished,
}

/// A session error: the peer broke the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// Set reconciliation failed (malformed or unexpected reconciliation message).
    #[error("set reconciliation failed: {0}")]
    Reconcile(String),
    /// A message arrived that this side does not expect now.
    #[error("unexpected {0} message")]
    Unexpected(&'static str),
}

/// Counters of a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Negentropy messages this side received.
    pub reconcile_rounds: u32,
    /// Documents this side asked the host to send.
    pub docs_to_send: usize,
    /// Documents received.
    pub docs_received: usize,
}

/// One side of a sync session.
pub struct Session {
    role: Role,
    node: String,
    documents: u64,
    neg: Negentropy<'static, NegentropyStorageVector>,
    by_hash: HashMap<[u8; 32], DocId>,
    finished: bool,
    stats: SessionStats,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("node", &self.node)
            .field("documents", &self.documents)
            .field("finished", &self.finished)
            .finish()
    }
}

fn neg_err(e: negentropy::Error) -> SessionError {
    SessionError::Reconcile(e.to_string())
}

impl Session {
    /// A session over the `(document, heads)` items this node may share with the peer.
    pub fn new(
        role: Role,
        node: impl Into<String>,
        items: impl IntoIterator<Item = (DocId, Vec<[u8; 32]>)>,
    ) -> Result<Self, SessionError> {
        let mut storage = NegentropyStorageVector::new();
        let mut by_hash = HashMap::new();
        for (doc, heads) in items {
            let h = item_hash(&doc, &heads);
            storage.insert(0, Id::from_byte_array(h)).map_err(neg_err)?;
            by_hash.insert(h, doc);
        }
        storage.seal().map_err(neg_err)?;
        // `initiate()` makes the initiator; marking it before would make initiate refuse.
        let neg = Negentropy::owned(storage, RECONCILE_FRAME_LIMIT).map_err(neg_err)?;
        Ok(Self {
            role,
            node: node.into(),
            documents: by_hash.len() as u64,
            neg,
            by_hash,
            finished: false,
            stats: SessionStats::default(),
        })
    }

    /// The first actions: the initiator greets and opens reconciliation; the responder waits.
    pub fn start(&mut self) -> Result<Vec<Action>, SessionError> {
        match self.role {
            Role::Initiator => Ok(vec![
                Action::Send(Message::Hello {
                    node: self.node.clone(),
                    documents: self.documents,
                }),
                Action::Send(Message::Reconcile(self.neg.initiate().map_err(neg_err)?)),
            ]),
            Role::Responder => Ok(Vec::new()),
        }
    }

    /// Whether the session is over.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The session's counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Handles one received message.
    pub fn handle(&mut self, m: Message) -> Result<Vec<Action>, SessionError> {
        if self.finished {
            return Err(SessionError::Unexpected("post-session"));
        }
        match (self.role, m) {
            (Role::Responder, Message::Hello { .. }) => Ok(vec![Action::Send(Message::Hello {
                node: self.node.clone(),
                documents: self.documents,
            })]),
            (Role::Initiator, Message::Hello { .. }) => Ok(Vec::new()),
            (Role::Responder, Message::Reconcile(q)) => {
                self.stats.reconcile_rounds += 1;
                let r = self.neg.reconcile(&q).map_err(neg_err)?;
                Ok(vec![Action::Send(Message::Reconcile(r))])
            }
            (Role::Initiator, Message::Reconcile(r)) => {
                self.stats.reconcile_rounds += 1;
                let (mut have, mut need) = (Vec::new(), Vec::new());
                let next = self
                    .neg
                    .reconcile_with_ids(&r, &mut have, &mut need)
                    .map_err(neg_err)?;
                let mut actions = Vec::new();
                let docs: Vec<DocId> = have
                    .iter()
                    .filter_map(|id| self.by_hash.get(id.as_bytes()).copied())
                    .collect();
                if !docs.is_empty() {
                    self.stats.docs_to_send += docs.len();
                    actions.push(Action::SendDocs(docs));
                }
                if !need.is_empty() {
                    actions.push(Action::Send(Message::Want(
                        need.iter().map(|id| *id.as_bytes()).collect(),
                    )));
                }
                actions.push(Action::Send(match next {
                    Some(q) => Message::Reconcile(q),
                    None => Message::Done,
                }));
                Ok(actions)
            }
            (Role::Responder, Message::Want(hashes)) => {
                let docs: Vec<DocId> = hashes
                    .iter()
                    .filter_map(|h| self.by_hash.get(h).copied())
                    .collect();
                self.stats.docs_to_send += docs.len();
                Ok(if docs.is_empty() {
                    Vec::new()
                } else {
                    vec![Action::SendDocs(docs)]
                })
            }
            (_, Message::Docs(docs)) => {
                self.stats.docs_received += docs.len();
                Ok(vec![Action::Apply(docs)])
            }
            (Role::Responder, Message::Done) => {
                self.finished = true;
                Ok(vec![Action::Send(Message::Done), Action::Finished])
            }
            (Role::Initiator, Message::Done) => {
                self.finished = true;
                Ok(vec![Action::Finished])
            }
            (Role::Initiator, Message::Want(_)) => Err(SessionError::Unexpected("Want")),
        }
    }
}

/// Packs documents into as few `Docs` messages as fit in frames (batched across documents).
pub fn pack(docs: Vec<DocPayload>) -> Vec<Message> {
    let budget = MAX_FRAME - 64;
    let mut out = Vec::new();
    let mut batch = Vec::new();
    let mut size = 0;
    for d in docs {
        let len = 16 + 8 + d.ty.len() + d.data.len();
        if !batch.is_empty() && size + len > budget {
            out.push(Message::Docs(std::mem::take(&mut batch)));
            size = 0;
        }
        size += len;
        batch.push(d);
    }
    if !batch.is_empty() {
        out.push(Message::Docs(batch));
    }
    out
}
