//! A sync session between two nodes, as a state machine without IO.
//!
//! The host feeds it received [`Message`]s and carries out the [`Action`]s it returns: send a
//! message, send documents (read from the host's store), apply received documents. Time and IO stay
//! with the host; the node wraps a session in a libp2p stream, the simulation in a scheduler.
//!
//! Each document is one item: a hash of its id and sorted heads. Two paths:
//!
//! **Fast path, for peers that synced before.** At the end of every complete session each side
//! records a [`Checkpoint`]: the peer's store, how far of the peer's change log it has, and how far
//! of its own the peer has. When the initiator's record mirrors the responder's, each side only
//! announces the documents its log shows changed since, with their heads (49 bytes each), and
//! asks for what differs with its own heads, so that only missing changes travel:
//!
//! ```text
//! initiator                                        responder
//!   Hello(checkpoint), Have(changed since)  ─────▶  (checks the checkpoint mirrors its own)
//!                                           ◀─────  Hello(checkpoint), Docs(its copies of what
//!                                                   differs), Need(what differs), Have(its changes)
//!                                                   — or just Hello, Done when nothing does
//!   Docs(wanted, and its copies), Need, Done ─────▶
//!                                           ◀─────  Docs(wanted), Done
//! ```
//!
//! Equal stores finish in one round trip; any difference takes two.
//!
//! **Range reconciliation, for first contact or a lost checkpoint** (negentropy):
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
//! Equal stores agree in one negentropy exchange whatever their size; a document whose heads
//! differ shows up on both sides, and each sends its copy (Automerge merges them). A proposed
//! checkpoint that the responder does not hold (it was lost, or the last session did not complete
//! on its side) costs one more round trip before reconciliation starts. An initiator that holds
//! nothing (a new device) skips reconciliation: the responder answers its first message with
//! every document.

use std::collections::{HashMap, HashSet};

use negentropy::{Id, Negentropy, NegentropyStorageVector};
use sha2::{Digest, Sha256};

use crate::DocId;
use crate::wire::{Checkpoint, DocPayload, Heads, MAX_FRAME, Message};

/// Largest negentropy message (leaves room in a frame for its header).
pub const RECONCILE_FRAME_LIMIT: u64 = 4 * 1024 * 1024;

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
    /// Read these documents from the store and send them (see [`pack`]). Each comes with the
    /// heads the peer holds of it: if the host's copy contains them all, the changes after them
    /// suffice; otherwise (or with no heads) the whole document goes.
    SendDocs(Vec<(DocId, Heads)>),
    /// Merge these received documents into the store.
    Apply(Vec<DocPayload>),
    /// The peer announced documents outside this node's scope that this node may hold, with
    /// its heads: the host tells [`Session::outside_held`] which of them it holds with other
    /// heads (and may drop those it holds with the same heads, once the peer is one that keeps
    /// them).
    Outside(Vec<(DocId, Heads)>),
    /// The session is over; both sides have what the other had. Once every received document is
    /// durably merged, the host records [`Session::checkpoint`] for the peer.
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
    /// The peer ended the session without sending documents this side asked for: nothing is
    /// recorded, the next session asks again.
    #[error("the peer ended the session without {0} document(s) it was asked for")]
    Incomplete(usize),
}

/// Counters of a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Whether the checkpoint fast path was taken.
    pub fast: bool,
    /// Negentropy messages this side received.
    pub reconcile_rounds: u32,
    /// Items announced by this side on the fast path.
    pub announced: usize,
    /// Documents this side asked the host to send.
    pub docs_to_send: usize,
    /// Documents received.
    pub docs_received: usize,
}

/// What this node brings to a session besides its items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Local {
    /// Node name (for logs).
    pub node: String,
    /// The store id.
    pub store: [u8; 16],
    /// The last log sequence covered by the items.
    pub seq: u64,
    /// The checkpoint recorded for this peer, if any.
    pub checkpoint: Option<Checkpoint>,
    /// Documents outside the peer's scope that it may hold, with this node's heads (announced
    /// in an `Outside` message; the peer may ask for their changes after heads it proves to
    /// hold).
    pub outside: Vec<(DocId, Heads)>,
}

/// Documents to ask for, in document order: the same inputs give the same frames (simulations
/// replay runs by seed).
fn sorted(mut docs: Vec<(DocId, Heads)>) -> Vec<(DocId, Heads)> {
    docs.sort_unstable_by_key(|d| d.0);
    docs
}

/// An initiator holding at most this many documents and no checkpoint is treated as a new
/// device: it sends them unasked and is sent everything, without reconciliation.
pub const DUMP_BELOW: usize = 16;

/// Documents, each with the heads one side holds of it.
type DocsAt = Vec<(DocId, Heads)>;

/// One document as a session sees it: id, heads, and the log sequence of its last change.
pub type Item = (DocId, Vec<[u8; 32]>, u64);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the Hellos are exchanged.
    Opening,
    /// Checkpoint fast path.
    Fast,
    /// Range reconciliation.
    Ranges,
    /// The initiator holds nothing: the responder sends everything, without reconciliation.
    Dump,
}

/// One side of a sync session.
pub struct Session {
    role: Role,
    local: Local,
    /// `(document, item hash, log sequence)`.
    items: Vec<(DocId, [u8; 32], u64)>,
    heads: HashMap<DocId, Heads>,
    by_hash: HashMap<[u8; 32], DocId>,
    /// Item hash and position in `items` (the order the host wants documents sent in).
    by_doc: HashMap<DocId, ([u8; 32], u32)>,
    neg: Option<Negentropy<'static, NegentropyStorageVector>>,
    mode: Mode,
    /// The peer's store and log sequence, from its Hello.
    peer: Option<([u8; 16], u64)>,
    finished: bool,
    stats: SessionStats,
    /// Documents this side asked for by id (fast path) and has not received yet.
    expected: HashSet<DocId>,
    /// Documents this side asked for by item hash (reconciliation) and has not received yet.
    expected_count: usize,
    /// The documents this side announced as outside the peer's scope.
    outside: HashSet<DocId>,
    /// Documents outside this side's scope whose changes it asked for: the responder does not
    /// end the session before the peer had the chance to answer (but a missing answer is no
    /// error).
    awaiting_outside: HashSet<DocId>,
    /// This side is a new device that sent its few documents unasked: the responder sends it
    /// everything, and nothing is exchanged about documents outside its scope.
    new_device: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .field("node", &self.local.node)
            .field("documents", &self.items.len())
            .field("mode", &self.mode)
            .field("finished", &self.finished)
            .finish()
    }
}

fn neg_err(e: negentropy::Error) -> SessionError {
    SessionError::Reconcile(e.to_string())
}

impl Session {
    /// A session over the items this node may share with the peer.
    pub fn new(
        role: Role,
        local: Local,
        items: impl IntoIterator<Item = Item>,
    ) -> Result<Self, SessionError> {
        let mut all_heads = HashMap::new();
        let items: Vec<(DocId, [u8; 32], u64)> = items
            .into_iter()
            .map(|(doc, heads, seq)| {
                let h = item_hash(&doc, &heads);
                all_heads.insert(doc, heads);
                (doc, h, seq)
            })
            .collect();
        let by_hash = items.iter().map(|(d, h, _)| (*h, *d)).collect();
        let by_doc = items
            .iter()
            .enumerate()
            .map(|(i, (d, h, _))| (*d, (*h, i as u32)))
            .collect();
        let outside = local.outside.iter().map(|(d, _)| *d).collect();
        Ok(Self {
            role,
            local,
            items,
            heads: all_heads,
            by_hash,
            by_doc,
            neg: None,
            mode: Mode::Opening,
            peer: None,
            finished: false,
            stats: SessionStats::default(),
            expected: HashSet::new(),
            expected_count: 0,
            outside,
            awaiting_outside: HashSet::new(),
            new_device: false,
        })
    }

    /// The negentropy state, built on first use (the fast path never needs it).
    fn neg(&mut self) -> Result<&mut Negentropy<'static, NegentropyStorageVector>, SessionError> {
        if self.neg.is_none() {
            let mut storage = NegentropyStorageVector::new();
            for (_, h, _) in &self.items {
                storage
                    .insert(0, Id::from_byte_array(*h))
                    .map_err(neg_err)?;
            }
            storage.seal().map_err(neg_err)?;
            // `initiate()` makes the initiator; marking it before would make initiate refuse.
            self.neg = Some(Negentropy::owned(storage, RECONCILE_FRAME_LIMIT).map_err(neg_err)?);
        }
        self.neg
            .as_mut()
            .ok_or(SessionError::Reconcile("no reconciliation state".into()))
    }

    fn hello(&self, checkpoint: Option<Checkpoint>) -> Message {
        Message::Hello {
            node: self.local.node.clone(),
            documents: self.items.len() as u64,
            store: self.local.store,
            seq: self.local.seq,
            checkpoint,
        }
    }

    /// `(document, heads)` of the items changed after log sequence `after`, except `skip`.
    fn changed_since(&self, after: u64, skip: &HashSet<DocId>) -> Vec<(DocId, Heads)> {
        self.items
            .iter()
            .filter(|(d, _, seq)| *seq > after && !skip.contains(d))
            .map(|(d, _, _)| (*d, self.heads.get(d).cloned().unwrap_or_default()))
            .collect()
    }

    /// Sends `docs` in the order of the items the host gave (certificates and the places a
    /// receiver's reach grows with come first); documents not among them last, by id. The same
    /// inputs give the same frames (simulations replay runs by seed).
    fn send_docs(&self, mut docs: Vec<(DocId, Heads)>) -> Action {
        docs.sort_unstable_by_key(|(d, _)| (self.by_doc.get(d).map_or(u32::MAX, |(_, i)| *i), *d));
        Action::SendDocs(docs)
    }

    /// For documents the peer announced: ours that differ (to send, after the peer's heads) and
    /// theirs to ask for (with our heads).
    fn compare(&mut self, theirs: &[(DocId, Heads)]) -> (DocsAt, DocsAt) {
        let (mut send, mut need) = (Vec::new(), Vec::new());
        for (doc, their_heads) in theirs {
            match self.by_doc.get(doc) {
                Some((mine, _)) if *mine == item_hash(doc, their_heads) => {}
                Some(_) => {
                    send.push((*doc, their_heads.clone()));
                    need.push((*doc, self.heads.get(doc).cloned().unwrap_or_default()));
                }
                None => need.push((*doc, Vec::new())),
            }
        }
        self.stats.docs_to_send += send.len();
        (send, need)
    }

    /// The `Outside` announcement, if this side has documents outside the peer's scope that the
    /// peer may hold.
    fn announce_outside(&self) -> Option<Action> {
        (!self.local.outside.is_empty())
            .then(|| Action::Send(Message::Outside(sorted(self.local.outside.clone()))))
    }

    /// What the host found of an [`Action::Outside`]: the documents it holds with heads other
    /// than the peer's, as `(document, the peer's heads, this node's heads)`. This side sends
    /// its changes after the peer's heads and asks for the peer's after its own (which arrive
    /// before the peer's `Done`, if the peer holds every head named).
    pub fn outside_held(&mut self, differ: Vec<(DocId, Heads, Heads)>) -> Vec<Action> {
        if differ.is_empty() || self.finished {
            return Vec::new();
        }
        let send: Vec<(DocId, Heads)> = differ
            .iter()
            .map(|(d, theirs, _)| (*d, theirs.clone()))
            .collect();
        let need: Vec<(DocId, Heads)> = differ.into_iter().map(|(d, _, mine)| (d, mine)).collect();
        // Not counted as expected: the peer sends its changes only after heads it holds all of
        // (it may have refused one of this side's), and a hand-off not confirmed now is
        // confirmed in a later session.
        self.stats.docs_to_send += send.len();
        self.awaiting_outside.extend(need.iter().map(|(d, _)| *d));
        vec![
            self.send_docs(send),
            Action::Send(Message::Need(sorted(need))),
        ]
    }

    /// The first actions: the initiator greets and opens the fast path (if it holds a checkpoint
    /// for the peer) or reconciliation; the responder waits.
    pub fn start(&mut self) -> Result<Vec<Action>, SessionError> {
        match (self.role, self.local.checkpoint) {
            (Role::Responder, _) => Ok(Vec::new()),
            (Role::Initiator, Some(c)) => {
                let have = self.changed_since(c.mine, &HashSet::new());
                self.stats.announced = have.len();
                let mut actions = vec![Action::Send(self.hello(Some(c)))];
                actions.extend(self.announce_outside());
                actions.push(Action::Send(Message::Have(have)));
                Ok(actions)
            }
            (Role::Initiator, None) => {
                self.mode = Mode::Ranges;
                let q = self.neg()?.initiate().map_err(neg_err)?;
                let mut actions = vec![Action::Send(self.hello(None))];
                if self.items.len() <= DUMP_BELOW && !self.items.is_empty() {
                    // A (nearly) new device: the responder will send it everything without
                    // reconciliation, so it sends its few documents (its certificate…) at once.
                    let mine: Vec<(DocId, Heads)> = self
                        .items
                        .iter()
                        .map(|(d, _, _)| (*d, Vec::new()))
                        .collect();
                    self.stats.docs_to_send += mine.len();
                    actions.push(self.send_docs(mine));
                    self.new_device = true;
                } else {
                    actions.extend(self.announce_outside());
                }
                actions.push(Action::Send(Message::Reconcile(q)));
                Ok(actions)
            }
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

    /// What to record for the peer once the session has finished: from now on this node has the
    /// peer's log up to the sequence the peer announced, and the peer has this node's log up to
    /// the sequence this node announced. `None` before the session finished.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        let (store, theirs) = self.peer?;
        self.finished.then_some(Checkpoint {
            store,
            theirs,
            mine: self.local.seq,
        })
    }

    /// Whether `theirs` (the peer's record of us) mirrors our record of the peer.
    fn mirrors(&self, theirs: &Checkpoint) -> bool {
        match (self.local.checkpoint, self.peer) {
            (Some(ours), Some((peer_store, _))) => {
                theirs.store == self.local.store
                    && ours.store == peer_store
                    && theirs.theirs == ours.mine
                    && theirs.mine == ours.theirs
            }
            _ => false,
        }
    }

    /// Documents this side asked for and has not received.
    fn missing(&self) -> usize {
        self.expected.len() + self.expected_count
    }

    fn finish(&mut self) -> Action {
        self.finished = true;
        Action::Finished
    }

    /// Handles one received message.
    pub fn handle(&mut self, m: Message) -> Result<Vec<Action>, SessionError> {
        if self.finished {
            return Err(SessionError::Unexpected("post-session"));
        }
        match (self.role, self.mode, m) {
            (
                _,
                Mode::Opening | Mode::Ranges,
                Message::Hello {
                    store,
                    seq,
                    checkpoint,
                    documents,
                    ..
                },
            ) if self.peer.is_none() => {
                self.peer = Some((store, seq));
                match self.role {
                    Role::Responder => {
                        let accept = checkpoint.is_some_and(|c| self.mirrors(&c));
                        if accept {
                            self.mode = Mode::Fast;
                            self.stats.fast = true;
                            let mut actions = vec![Action::Send(self.hello(self.local.checkpoint))];
                            actions.extend(self.announce_outside());
                            Ok(actions)
                        } else if documents <= DUMP_BELOW as u64 && checkpoint.is_none() {
                            // A new device (nothing, or only its certificate and a few writes,
                            // which it sends unasked): everything goes, no reconciliation
                            // needed. Its first Reconcile is answered with the documents.
                            self.mode = Mode::Dump;
                            Ok(vec![Action::Send(self.hello(None))])
                        } else {
                            self.mode = Mode::Ranges;
                            let mut actions = vec![Action::Send(self.hello(None))];
                            actions.extend(self.announce_outside());
                            Ok(actions)
                        }
                    }
                    Role::Initiator => {
                        if self.mode == Mode::Ranges {
                            // We opened with reconciliation already.
                            return Ok(Vec::new());
                        }
                        if checkpoint.is_some_and(|c| self.mirrors(&c)) {
                            self.mode = Mode::Fast;
                            self.stats.fast = true;
                            Ok(Vec::new())
                        } else {
                            // The responder does not hold our checkpoint: reconcile ranges.
                            self.mode = Mode::Ranges;
                            let q = self.neg()?.initiate().map_err(neg_err)?;
                            Ok(vec![Action::Send(Message::Reconcile(q))])
                        }
                    }
                }
            }
            (_, _, Message::Hello { .. }) => Err(SessionError::Unexpected("second Hello")),
            (_, Mode::Opening, _) => Err(SessionError::Unexpected("message before Hello")),
            (_, Mode::Dump, Message::Outside(_)) => Ok(Vec::new()),
            (_, _, Message::Outside(_)) if self.new_device => Ok(Vec::new()),
            (_, _, Message::Outside(theirs)) => Ok(if theirs.is_empty() {
                Vec::new()
            } else {
                vec![Action::Outside(theirs)]
            }),
            (_, _, Message::Docs(docs)) => {
                self.stats.docs_received += docs.len();
                for d in &docs {
                    self.expected.remove(&d.id);
                    self.awaiting_outside.remove(&d.id);
                }
                self.expected_count = self.expected_count.saturating_sub(docs.len());
                Ok(vec![Action::Apply(docs)])
            }

            // Fast path.
            (Role::Responder, Mode::Fast, Message::Have(theirs)) => {
                let skip: HashSet<DocId> = theirs.iter().map(|(d, _)| *d).collect();
                let (send, want) = self.compare(&theirs);
                let after = self.local.checkpoint.map_or(0, |c| c.mine);
                let mine = self.changed_since(after, &skip);
                self.stats.announced = mine.len();
                let mut actions = Vec::new();
                if !send.is_empty() {
                    actions.push(self.send_docs(send));
                }
                if want.is_empty()
                    && mine.is_empty()
                    && self.local.outside.is_empty()
                    && self.missing() == 0
                    && self.awaiting_outside.is_empty()
                {
                    actions.push(Action::Send(Message::Done));
                    actions.push(self.finish());
                    return Ok(actions);
                }
                if !want.is_empty() {
                    self.expected.extend(want.iter().map(|(d, _)| *d));
                    actions.push(Action::Send(Message::Need(sorted(want))));
                }
                actions.push(Action::Send(Message::Have(mine)));
                Ok(actions)
            }
            (Role::Initiator, Mode::Fast, Message::Have(theirs)) => {
                let (send, want) = self.compare(&theirs);
                let mut actions = Vec::new();
                if !send.is_empty() {
                    actions.push(self.send_docs(send));
                }
                if !want.is_empty() {
                    self.expected.extend(want.iter().map(|(d, _)| *d));
                    actions.push(Action::Send(Message::Need(sorted(want))));
                }
                actions.push(Action::Send(Message::Done));
                Ok(actions)
            }
            (_, Mode::Fast | Mode::Ranges, Message::Need(wanted)) => {
                // In reconciliation, only documents announced as outside the peer's scope are
                // asked for by id.
                let ranges = self.mode == Mode::Ranges;
                let docs: Vec<(DocId, Heads)> = wanted
                    .into_iter()
                    .filter(|(d, _)| {
                        self.outside.contains(d) || (!ranges && self.by_doc.contains_key(d))
                    })
                    .collect();
                self.stats.docs_to_send += docs.len();
                Ok(if docs.is_empty() {
                    Vec::new()
                } else {
                    vec![self.send_docs(docs)]
                })
            }
            (_, Mode::Fast, Message::Want(_)) => Err(SessionError::Unexpected("Want")),
            (_, Mode::Fast | Mode::Ranges, Message::Done) if self.missing() > 0 => {
                Err(SessionError::Incomplete(self.missing()))
            }
            (Role::Initiator, Mode::Fast, Message::Done) => Ok(vec![self.finish()]),
            (Role::Responder, Mode::Fast, Message::Done) => {
                Ok(vec![Action::Send(Message::Done), self.finish()])
            }
            (_, Mode::Fast, Message::Reconcile(_)) => Err(SessionError::Unexpected("Reconcile")),

            // A new device pulls everything.
            (Role::Responder, Mode::Dump, Message::Reconcile(_)) => {
                let docs: Vec<(DocId, Heads)> = self
                    .items
                    .iter()
                    .map(|(d, _, _)| (*d, Vec::new()))
                    .collect();
                self.stats.docs_to_send += docs.len();
                let mut actions = Vec::new();
                if !docs.is_empty() {
                    actions.push(self.send_docs(docs));
                }
                actions.push(Action::Send(Message::Done));
                actions.push(self.finish());
                Ok(actions)
            }
            (Role::Responder, Mode::Dump, Message::Have(_)) => Ok(Vec::new()),
            (_, Mode::Dump, _) => Err(SessionError::Unexpected("message to a new device")),

            // Range reconciliation.
            (Role::Responder, Mode::Ranges, Message::Have(_)) => {
                // Sent before the initiator learnt we do not hold its checkpoint.
                Ok(Vec::new())
            }
            (Role::Initiator, Mode::Ranges, Message::Have(_)) => {
                Err(SessionError::Unexpected("Have"))
            }
            (Role::Responder, Mode::Ranges, Message::Reconcile(q)) => {
                self.stats.reconcile_rounds += 1;
                let r = self.neg()?.reconcile(&q).map_err(neg_err)?;
                Ok(vec![Action::Send(Message::Reconcile(r))])
            }
            (Role::Initiator, Mode::Ranges, Message::Reconcile(r)) => {
                self.stats.reconcile_rounds += 1;
                let (mut have, mut need) = (Vec::new(), Vec::new());
                let next = self
                    .neg()?
                    .reconcile_with_ids(&r, &mut have, &mut need)
                    .map_err(neg_err)?;
                let mut actions = Vec::new();
                let docs: Vec<(DocId, Heads)> = have
                    .iter()
                    .filter_map(|id| self.by_hash.get(id.as_bytes()).map(|d| (*d, Vec::new())))
                    .collect();
                if !docs.is_empty() {
                    self.stats.docs_to_send += docs.len();
                    actions.push(self.send_docs(docs));
                }
                if !need.is_empty() {
                    self.expected_count += need.len();
                    actions.push(Action::Send(Message::Want(
                        need.iter().map(|id| *id.as_bytes()).collect(),
                    )));
                }
                match next {
                    Some(q) => actions.push(Action::Send(Message::Reconcile(q))),
                    None => {
                        actions.push(Action::Send(Message::Done));
                    }
                }
                Ok(actions)
            }
            (Role::Responder, Mode::Ranges, Message::Want(hashes)) => {
                let docs: Vec<(DocId, Heads)> = hashes
                    .iter()
                    .filter_map(|h| self.by_hash.get(h).map(|d| (*d, Vec::new())))
                    .collect();
                self.stats.docs_to_send += docs.len();
                Ok(if docs.is_empty() {
                    Vec::new()
                } else {
                    vec![self.send_docs(docs)]
                })
            }
            (Role::Initiator, Mode::Ranges, Message::Want(_)) => {
                Err(SessionError::Unexpected("Want"))
            }
            (Role::Responder, Mode::Ranges, Message::Done) => {
                Ok(vec![Action::Send(Message::Done), self.finish()])
            }
            (Role::Initiator, Mode::Ranges, Message::Done) => Ok(vec![self.finish()]),
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
