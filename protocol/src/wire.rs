//! The wire format: one frame per message, versioned twice (the libp2p protocol id
//! [`PROTOCOL_ID`] and a leading version byte), every frame size-capped before anything is
//! allocated, and decoding that returns an error, never panics, on any input.
//!
//! ```text
//! frame   = version:u8  kind:u8  body
//! string  = len:u32be bytes          (UTF-8)
//! bytes   = len:u32be bytes
//! list<T> = count:u32be T*           (count checked against the bytes left before allocating)
//! ```

use crate::DocId;

/// libp2p protocol id of this version of the protocol.
pub const PROTOCOL_ID: &str = "/fieldmesh/sync/5";
/// First byte of every frame.
pub const WIRE_VERSION: u8 = 4;
/// Largest frame accepted or produced (8 MiB).
pub const MAX_FRAME: usize = 8 * 1024 * 1024;

/// A document as transferred: its id, resource type and Automerge bytes (a whole save or
/// changes; the receiver merges either).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocPayload {
    /// Document id.
    pub id: DocId,
    /// Resource type.
    pub ty: String,
    /// Automerge bytes.
    pub data: Vec<u8>,
    /// The signed envelopes of the changes in `data` (100 bytes each; see the trust model).
    pub envelopes: Vec<u8>,
}

/// What a node recorded about a peer at the end of their last complete session: the peer's
/// store (sequence numbers mean nothing across stores), the peer's log position it had then
/// received everything up to (`theirs`), and its own log position the peer had then received
/// everything up to (`mine`). Two peers whose records mirror each other need only exchange
/// what changed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The peer's store id.
    pub store: [u8; 16],
    /// The peer's log sequence, all of which this node has.
    pub theirs: u64,
    /// This node's log sequence, all of which the peer has.
    pub mine: u64,
}

impl Checkpoint {
    /// The checkpoint as stored.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(33);
        out.push(1);
        out.extend_from_slice(&self.store);
        out.extend_from_slice(&self.theirs.to_be_bytes());
        out.extend_from_slice(&self.mine.to_be_bytes());
        out
    }

    /// Reads a stored checkpoint; `None` if it is not one (it is then ignored).
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        let mut r = Reader(b);
        if r.u8().ok()? != 1 {
            return None;
        }
        let c = Self {
            store: r.array().ok()?,
            theirs: r.u64().ok()?,
            mine: r.u64().ok()?,
        };
        r.0.is_empty().then_some(c)
    }

    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.store);
        out.extend_from_slice(&self.theirs.to_be_bytes());
        out.extend_from_slice(&self.mine.to_be_bytes());
    }
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Opens a session: who is speaking and what it holds.
    Hello {
        /// The sender's node name.
        node: String,
        /// Number of documents the sender will reconcile.
        documents: u64,
        /// The sender's store id (see [`Checkpoint`]).
        store: [u8; 16],
        /// The last sequence number of the sender's change log as of this session.
        seq: u64,
        /// From the initiator: the checkpoint it holds for the responder, proposing the fast
        /// path. From the responder: the checkpoint it holds for the initiator, if it matched
        /// and the fast path is on.
        checkpoint: Option<Checkpoint>,
    },
    /// Documents the sender changed since the checkpoint, with their heads (fast path). The
    /// receiver asks for those whose heads differ from its own.
    Have(Vec<(DocId, Heads)>),
    /// Documents the sender wants, with the heads it holds of each (none if it lacks the
    /// document), so that only the changes it lacks are sent (fast path).
    Need(Vec<(DocId, Heads)>),
    /// A set-reconciliation message (negentropy).
    Reconcile(Vec<u8>),
    /// Item hashes whose documents the sender wants (it cannot name the documents: it lacks them).
    Want(Vec<[u8; 32]>),
    /// Documents outside the receiver's scope that it may hold (they left its villages, or it
    /// left theirs), with the sender's heads. A receiver holding one with other heads sends its
    /// copy and asks for the sender's changes (`Need`); one holding the same heads knows the
    /// sender holds every change of it.
    Outside(Vec<(DocId, Heads)>),
    /// Documents, batched across many documents.
    Docs(Vec<DocPayload>),
    /// The sender has nothing more to send in this session.
    Done,
}

const HELLO: u8 = 1;
const RECONCILE: u8 = 2;
const WANT: u8 = 3;
const DOCS: u8 = 4;
const DONE: u8 = 5;
/// `Docs`, with the body after the kind byte compressed with zstd.
const DOCS_ZSTD: u8 = 6;
const HAVE: u8 = 7;
const NEED: u8 = 8;
const OUTSIDE: u8 = 9;

/// The heads of a document (Automerge change hashes). At most 255 travel with an item; a
/// document with more concurrent heads is announced with the first 255, which only costs a
/// redundant transfer.
pub type Heads = Vec<[u8; 32]>;

fn put_heads_list(out: &mut Vec<u8>, kind: u8, items: &[(DocId, Heads)]) {
    out.push(kind);
    put_count(out, items.len());
    for (doc, heads) in items {
        out.extend_from_slice(doc);
        let n = heads.len().min(255);
        out.push(n as u8);
        for h in &heads[..n] {
            out.extend_from_slice(h);
        }
    }
}

fn read_heads_list(r: &mut Reader<'_>) -> Result<Vec<(DocId, Heads)>, WireError> {
    let n = r.count(17)?;
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        let doc = r.array::<16>()?;
        let k = r.u8()? as usize;
        if k * 32 > r.0.len() {
            return Err(WireError::Truncated);
        }
        let mut heads = Vec::with_capacity(k);
        for _ in 0..k {
            heads.push(r.array::<32>()?);
        }
        items.push((doc, heads));
    }
    Ok(items)
}
/// zstd level for document batches: documents share field names and URLs, which a batch
/// compresses away.
const ZSTD_LEVEL: i32 = 3;

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// Empty frame.
    #[error("empty frame")]
    Empty,
    /// Another protocol version.
    #[error("protocol version {0} is not supported (this node speaks {WIRE_VERSION})")]
    Version(u8),
    /// Unknown message kind.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// The frame ends before its contents do.
    #[error("frame truncated")]
    Truncated,
    /// Bytes left over after the message.
    #[error("{0} unexpected bytes after the message")]
    Trailing(usize),
    /// A string that is not UTF-8.
    #[error("text that is not UTF-8")]
    Utf8,
    /// A field with a value it cannot have.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A compressed body that does not decompress within [`MAX_FRAME`] bytes.
    #[error("a compressed batch is corrupt or larger than {MAX_FRAME} bytes")]
    Compression,
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.take(8)?;
        let mut a = [0; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, WireError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| WireError::Utf8)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    /// A count of items each at least `min` bytes long, checked against what is left.
    fn count(&mut self, min: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min.max(1)) > self.0.len() {
            return Err(WireError::Truncated);
        }
        Ok(n)
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_count(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

/// Encodes a message as one frame.
pub fn encode(m: &Message) -> Vec<u8> {
    let mut out = vec![WIRE_VERSION];
    match m {
        Message::Hello {
            node,
            documents,
            store,
            seq,
            checkpoint,
        } => {
            out.push(HELLO);
            put_bytes(&mut out, node.as_bytes());
            out.extend_from_slice(&documents.to_be_bytes());
            out.extend_from_slice(store);
            out.extend_from_slice(&seq.to_be_bytes());
            match checkpoint {
                None => out.push(0),
                Some(c) => {
                    out.push(1);
                    c.put(&mut out);
                }
            }
        }
        Message::Have(items) => put_heads_list(&mut out, HAVE, items),
        Message::Need(items) => put_heads_list(&mut out, NEED, items),
        Message::Outside(items) => put_heads_list(&mut out, OUTSIDE, items),
        Message::Reconcile(p) => {
            out.push(RECONCILE);
            put_bytes(&mut out, p);
        }
        Message::Want(hashes) => {
            out.push(WANT);
            put_count(&mut out, hashes.len());
            for h in hashes {
                out.extend_from_slice(h);
            }
        }
        Message::Docs(docs) => {
            let mut body = Vec::new();
            put_count(&mut body, docs.len());
            for d in docs {
                body.extend_from_slice(&d.id);
                put_bytes(&mut body, d.ty.as_bytes());
                put_bytes(&mut body, &d.data);
            }
            // Signatures do not compress: kept apart, they do not break up the documents, which
            // compress well together.
            for d in docs {
                put_bytes(&mut body, &d.envelopes);
            }
            match zstd::bulk::compress(&body, ZSTD_LEVEL) {
                Ok(packed) if packed.len() < body.len() => {
                    out.push(DOCS_ZSTD);
                    out.extend_from_slice(&packed);
                }
                _ => {
                    out.push(DOCS);
                    out.extend_from_slice(&body);
                }
            }
        }
        Message::Done => out.push(DONE),
    }
    out
}

fn decode_docs(r: &mut Reader<'_>) -> Result<Vec<DocPayload>, WireError> {
    let n = r.count(16 + 4 + 4 + 4)?;
    let mut docs = Vec::with_capacity(n);
    for _ in 0..n {
        docs.push(DocPayload {
            id: r.array::<16>()?,
            ty: r.string()?,
            data: r.bytes()?.to_vec(),
            envelopes: Vec::new(),
        });
    }
    for d in &mut docs {
        d.envelopes = r.bytes()?.to_vec();
    }
    Ok(docs)
}

/// Decodes one frame. Never panics; refuses frames over [`MAX_FRAME`] before reading them.
pub fn decode(frame: &[u8]) -> Result<Message, WireError> {
    if frame.len() > MAX_FRAME {
        return Err(WireError::TooLarge(frame.len()));
    }
    let mut r = Reader(frame);
    let version = r.u8().map_err(|_| WireError::Empty)?;
    if version != WIRE_VERSION {
        return Err(WireError::Version(version));
    }
    let m = match r.u8()? {
        HELLO => Message::Hello {
            node: r.string()?,
            documents: r.u64()?,
            store: r.array()?,
            seq: r.u64()?,
            checkpoint: match r.u8()? {
                0 => None,
                1 => Some(Checkpoint {
                    store: r.array()?,
                    theirs: r.u64()?,
                    mine: r.u64()?,
                }),
                _ => return Err(WireError::Malformed("checkpoint flag")),
            },
        },
        HAVE => Message::Have(read_heads_list(&mut r)?),
        NEED => Message::Need(read_heads_list(&mut r)?),
        OUTSIDE => Message::Outside(read_heads_list(&mut r)?),
        RECONCILE => Message::Reconcile(r.bytes()?.to_vec()),
        WANT => {
            let n = r.count(32)?;
            let mut hashes = Vec::with_capacity(n);
            for _ in 0..n {
                hashes.push(r.array::<32>()?);
            }
            Message::Want(hashes)
        }
        DOCS => {
            let docs = decode_docs(&mut r)?;
            Message::Docs(docs)
        }
        DOCS_ZSTD => {
            // Refuse bombs: the decompressed body may not exceed a frame either.
            let body =
                zstd::bulk::decompress(r.0, MAX_FRAME).map_err(|_| WireError::Compression)?;
            r.0 = &[];
            let mut inner = Reader(&body);
            let docs = decode_docs(&mut inner)?;
            if !inner.0.is_empty() {
                return Err(WireError::Trailing(inner.0.len()));
            }
            Message::Docs(docs)
        }
        DONE => Message::Done,
        other => return Err(WireError::Kind(other)),
    };
    if !r.0.is_empty() {
        return Err(WireError::Trailing(r.0.len()));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                "\\PC{0,20}",
                any::<u64>(),
                any::<[u8; 16]>(),
                any::<u64>(),
                prop::option::of((any::<[u8; 16]>(), any::<u64>(), any::<u64>()))
            )
                .prop_map(|(node, documents, store, seq, c)| Message::Hello {
                    node,
                    documents,
                    store,
                    seq,
                    checkpoint: c.map(|(store, theirs, mine)| Checkpoint {
                        store,
                        theirs,
                        mine
                    }),
                }),
            prop::collection::vec(
                (
                    any::<[u8; 16]>(),
                    prop::collection::vec(any::<[u8; 32]>(), 0..3)
                ),
                0..20
            )
            .prop_map(Message::Have),
            prop::collection::vec(
                (
                    any::<[u8; 16]>(),
                    prop::collection::vec(any::<[u8; 32]>(), 0..3)
                ),
                0..20
            )
            .prop_map(Message::Need),
            prop::collection::vec(
                (
                    any::<[u8; 16]>(),
                    prop::collection::vec(any::<[u8; 32]>(), 0..3)
                ),
                0..20
            )
            .prop_map(Message::Outside),
            prop::collection::vec(any::<u8>(), 0..200).prop_map(Message::Reconcile),
            prop::collection::vec(any::<[u8; 32]>(), 0..20).prop_map(Message::Want),
            prop::collection::vec(
                (
                    any::<[u8; 16]>(),
                    "[A-Za-z]{1,12}",
                    prop::collection::vec(any::<u8>(), 0..100)
                )
                    .prop_map(|(id, ty, data)| DocPayload {
                        envelopes: data.iter().rev().copied().collect(),
                        id,
                        ty,
                        data
                    }),
                0..10
            )
            .prop_map(Message::Docs),
            Just(Message::Done),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(m in message()) {
            prop_assert_eq!(decode(&encode(&m)), Ok(m));
        }

        #[test]
        fn any_bytes_decode_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn truncated_frames_are_refused(m in message(), cut in 1usize..40) {
            let f = encode(&m);
            if cut < f.len() {
                prop_assert!(decode(&f[..f.len() - cut]).is_err());
            }
        }
    }

    #[test]
    fn hostile_counts_do_not_allocate() {
        // A Want claiming 4 billion hashes in a 10-byte frame is refused before allocation.
        let f = [WIRE_VERSION, WANT, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        assert_eq!(decode(&f), Err(WireError::Truncated));
        assert_eq!(decode(&[1, DONE]), Err(WireError::Version(1)));
        assert_eq!(decode(&[]), Err(WireError::Empty));
        assert_eq!(
            decode(&vec![WIRE_VERSION; MAX_FRAME + 1]),
            Err(WireError::TooLarge(MAX_FRAME + 1))
        );
        let mut f = encode(&Message::Done);
        f.push(0);
        assert_eq!(decode(&f), Err(WireError::Trailing(1)));
        // A compressed body that would expand past the frame limit is refused.
        let bomb = zstd::bulk::compress(&vec![0u8; MAX_FRAME + 10], 3).unwrap();
        let mut f = vec![WIRE_VERSION, DOCS_ZSTD];
        f.extend_from_slice(&bomb);
        assert_eq!(decode(&f), Err(WireError::Compression));
    }

    #[test]
    fn checkpoints_round_trip_and_refuse_garbage() {
        let c = Checkpoint {
            store: [7; 16],
            theirs: 12,
            mine: 40,
        };
        assert_eq!(Checkpoint::from_bytes(&c.to_bytes()), Some(c));
        assert_eq!(Checkpoint::from_bytes(&[]), None);
        assert_eq!(Checkpoint::from_bytes(&c.to_bytes()[..20]), None);
        let mut longer = c.to_bytes();
        longer.push(0);
        assert_eq!(Checkpoint::from_bytes(&longer), None);
    }

    #[test]
    fn batches_of_similar_documents_compress() {
        let docs: Vec<DocPayload> = (0..100u8)
            .map(|i| DocPayload { id: [i; 16], ty: "Patient".into(), envelopes: vec![i; 100], data: format!("{{\"resourceType\":\"Patient\",\"identifier\":[{{\"system\":\"https://openimis.github.io/openimis_fhir_r4_ig/CodeSystem/openimis-identifiers\",\"value\":\"{i}\"}}]}}").into_bytes() })
            .collect();
        let raw: usize = docs.iter().map(|d| d.data.len() + 24).sum();
        let f = encode(&Message::Docs(docs.clone()));
        assert_eq!(f[1], DOCS_ZSTD);
        assert!(f.len() * 4 < raw, "{} vs {raw}", f.len());
        assert_eq!(decode(&f), Ok(Message::Docs(docs)));
    }
}
