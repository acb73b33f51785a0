//! Two replicas sync through sessions, every message passing through the wire encoder and decoder.
//! Documents here are grow-only sets (a CRDT like Automerge documents: merging is union), so the
//! test is about the protocol: after one session both replicas hold the same documents, in a
//! bounded number of round trips, and unchanged stores exchange only a few bytes.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use std::collections::{BTreeMap, BTreeSet, HashMap};

use fieldmesh_protocol::pair::{self, Host, HostError};
use fieldmesh_protocol::{
    Action, Checkpoint, DocId, DocPayload, Driver, Local, Message, Role, Session, Start, decode,
    pack,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

/// A replica: documents (grow-only sets), a change log (the sequence of each document's last
/// change) and the checkpoints it recorded per peer.
#[derive(Debug, Clone)]
struct Replica {
    name: String,
    store: [u8; 16],
    docs: BTreeMap<DocId, BTreeSet<u64>>,
    seq_of: BTreeMap<DocId, u64>,
    next_seq: u64,
    checkpoints: HashMap<String, Checkpoint>,
}

impl Replica {
    fn new(name: &str, n: u8) -> Self {
        Self {
            name: name.into(),
            store: [n; 16],
            docs: BTreeMap::new(),
            seq_of: BTreeMap::new(),
            next_seq: 1,
            checkpoints: HashMap::new(),
        }
    }

    fn with_docs(
        name: &str,
        n: u8,
        docs: impl IntoIterator<Item = (DocId, BTreeSet<u64>)>,
    ) -> Self {
        let mut r = Self::new(name, n);
        for (d, set) in docs {
            for v in set {
                r.edit(d, v);
            }
        }
        r
    }

    /// A local change: adds `v` to document `d`.
    fn edit(&mut self, d: DocId, v: u64) {
        if self.docs.entry(d).or_default().insert(v) {
            self.seq_of.insert(d, self.next_seq);
            self.next_seq += 1;
        }
    }

    fn items(&self) -> Vec<(DocId, Vec<[u8; 32]>, u64)> {
        self.docs
            .iter()
            .map(|(d, s)| (*d, heads(s), self.seq_of[d]))
            .collect()
    }

    fn local(&self, peer: &str) -> Local {
        Local {
            node: self.name.clone(),
            store: self.store,
            seq: self.next_seq - 1,
            checkpoint: self.checkpoints.get(peer).copied(),
            outside: Vec::new(),
        }
    }
}

fn heads(set: &BTreeSet<u64>) -> Vec<[u8; 32]> {
    let mut h = Sha256::new();
    for v in set {
        h.update(v.to_be_bytes());
    }
    vec![h.finalize().into()]
}

fn payload(r: &Replica, id: &DocId) -> DocPayload {
    let data = r.docs[id].iter().flat_map(|v| v.to_be_bytes()).collect();
    DocPayload {
        id: *id,
        ty: "Patient".into(),
        data,
        envelopes: Vec::new(),
    }
}

fn apply(r: &mut Replica, docs: Vec<DocPayload>) {
    for d in docs {
        for chunk in d.data.chunks(8) {
            r.edit(d.id, u64::from_be_bytes(chunk.try_into().unwrap()));
        }
    }
}

#[derive(Debug, Default)]
struct Report {
    /// Times the conversation changed direction, halved: request/response pairs.
    round_trips: u32,
    /// Bytes of messages that are not documents (hellos, reconciliation, announcements, wants).
    metadata_bytes: usize,
    total_bytes: usize,
    fast: bool,
}

/// A replica as one side of a session with `peer`.
struct Side<'a> {
    me: &'a mut Replica,
    peer: String,
}

impl Host for Side<'_> {
    fn read(&mut self, wanted: &[(DocId, Vec<[u8; 32]>)]) -> Result<Vec<DocPayload>, HostError> {
        Ok(wanted.iter().map(|(id, _)| payload(self.me, id)).collect())
    }
    fn merge(&mut self, docs: Vec<DocPayload>) -> Result<usize, HostError> {
        let n = docs.len();
        apply(self.me, docs);
        Ok(n)
    }
    fn complete(&mut self, checkpoint: Option<Checkpoint>) -> Result<(), HostError> {
        if let Some(c) = checkpoint {
            self.me.checkpoints.insert(self.peer.clone(), c);
        }
        Ok(())
    }
}

/// Runs one session from `a` (initiator) to `b`, returning what it cost. Frames after the first
/// `cut` are lost (the link drops); a side that finishes records its checkpoint.
fn sync_cut(a: &mut Replica, b: &mut Replica, cut: usize) -> Report {
    let start = |r: &Replica, peer: &str| Start {
        local: r.local(peer),
        items: r.items(),
        restricted: false,
    };
    let mut da = Driver::new(Role::Initiator, start(a, &b.name)).unwrap();
    let mut db = Driver::new(Role::Responder, start(b, &a.name)).unwrap();
    let (na, nb) = (a.name.clone(), b.name.clone());
    let mut report = Report::default();
    let mut delivered = 0;
    let mut deliver = |_: pair::Side, frame: &[u8]| {
        if delivered >= cut {
            return false;
        }
        delivered += 1;
        if !matches!(decode(frame), Ok(Message::Docs(_))) {
            report.metadata_bytes += frame.len();
        }
        report.total_bytes += frame.len();
        true
    };
    let out = pair::run(
        &mut da,
        &mut Side { me: a, peer: nb },
        &mut db,
        &mut Side { me: b, peer: na },
        &mut deliver,
    )
    .unwrap();
    report.round_trips = out.flights.div_ceil(2);
    report.fast = da.totals().fast || db.totals().fast;
    report
}

/// A complete session.
fn sync(a: &mut Replica, b: &mut Replica) -> Report {
    let r = sync_cut(a, b, usize::MAX);
    assert!(
        a.checkpoints.contains_key(&b.name) && b.checkpoints.contains_key(&a.name),
        "the session did not finish"
    );
    r
}

/// The union of the replicas' documents.
fn union<'a>(rs: impl IntoIterator<Item = &'a Replica>) -> BTreeMap<DocId, BTreeSet<u64>> {
    let mut out: BTreeMap<DocId, BTreeSet<u64>> = BTreeMap::new();
    for r in rs {
        for (k, v) in &r.docs {
            out.entry(*k).or_default().extend(v.iter().copied());
        }
    }
    out
}

fn doc(n: u64) -> DocId {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&n.to_be_bytes());
    id
}

fn set(vals: &[u64]) -> BTreeSet<u64> {
    vals.iter().copied().collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn one_session_makes_replicas_equal_and_the_next_takes_the_fast_path(
        shared in prop::collection::btree_map(0u64..200, prop::collection::btree_set(0u64..50, 1..4), 0..60),
        only_a in prop::collection::btree_map(0u64..200, prop::collection::btree_set(50u64..100, 1..3), 0..20),
        only_b in prop::collection::btree_map(0u64..200, prop::collection::btree_set(100u64..150, 1..3), 0..20),
        later_a in prop::collection::btree_map(0u64..260, 150u64..200, 0..10),
        later_b in prop::collection::btree_map(0u64..260, 200u64..250, 0..10),
    ) {
        let shared: Vec<(DocId, BTreeSet<u64>)> = shared.iter().map(|(k, v)| (doc(*k), v.clone())).collect();
        let mut a = Replica::with_docs("a", 1, shared.clone());
        let mut b = Replica::with_docs("b", 2, shared);
        for (k, v) in only_a { for x in v { a.edit(doc(k), x); } }
        for (k, v) in only_b { for x in v { b.edit(doc(k), x); } }
        let expected = union([&a, &b]);
        let r = sync(&mut a, &mut b);
        prop_assert!(!r.fast);
        prop_assert_eq!(&a.docs, &expected);
        prop_assert_eq!(&b.docs, &expected);
        prop_assert!(r.round_trips <= 3, "{:?}", r);
        // The next session, with nothing changed, takes the fast path: one round trip, a few
        // bytes (echoes of what each received last time are announced once, 48 bytes each).
        let again = sync(&mut a, &mut b);
        prop_assert!(again.fast);
        prop_assert!(again.round_trips <= 2, "{:?}", again);
        let idle = sync(&mut a, &mut b);
        prop_assert!(idle.fast);
        prop_assert_eq!(idle.round_trips, 1, "{:?}", idle);
        prop_assert!(idle.total_bytes <= 200, "{:?}", idle);
        // Changes on both sides after that: the fast path carries them, in at most 2 round trips.
        for (k, v) in later_a { a.edit(doc(k), v); }
        for (k, v) in later_b { b.edit(doc(k), v); }
        let expected = union([&a, &b]);
        let r = sync(&mut a, &mut b);
        prop_assert!(r.fast);
        prop_assert!(r.round_trips <= 2, "{:?}", r);
        prop_assert_eq!(&a.docs, &expected);
        prop_assert_eq!(&b.docs, &expected);
    }

    /// Several replicas edit and sync in random pairs; sessions are cut at random points (a
    /// side may record its checkpoint while the other does not) and checkpoints are lost at
    /// random. After a final round of complete sessions along a line, every replica holds
    /// everything: the fast path never skips a change.
    #[test]
    fn checkpoints_never_lose_a_change(
        steps in prop::collection::vec((0usize..4, 0usize..4, 0u64..30, 0u64..1000, 0usize..20, 0u8..10), 1..40),
    ) {
        let mut rs: Vec<Replica> = (0..4).map(|i| Replica::new(&format!("r{i}"), i as u8 + 1)).collect();
        for (i, j, d, v, cut, lose) in steps {
            rs[i].edit(doc(d), v);
            if lose == 0 {
                rs[j].checkpoints.clear();
            }
            if i != j {
                let (x, y) = if i < j { (i, j) } else { (j, i) };
                let (left, right) = rs.split_at_mut(y);
                sync_cut(&mut left[x], &mut right[0], if cut < 15 { usize::MAX } else { cut });
            }
        }
        let expected = union(&rs);
        for _ in 0..2 {
            for k in 0..3 {
                let (left, right) = rs.split_at_mut(k + 1);
                sync(&mut left[k], &mut right[0]);
            }
        }
        for k in (0..3).rev() {
            let (left, right) = rs.split_at_mut(k + 1);
            sync(&mut left[k], &mut right[0]);
        }
        for r in &rs {
            prop_assert_eq!(&r.docs, &expected, "{}", r.name);
        }
    }
}

/// A checkpoint one side lost (or never recorded because the session broke before its end)
/// makes the next session fall back to range reconciliation, which still converges.
#[test]
fn a_lost_or_one_sided_checkpoint_falls_back() {
    let mut a = Replica::with_docs("a", 1, (0..50).map(|n| (doc(n), set(&[n]))));
    let mut b = Replica::with_docs("b", 2, (25..75).map(|n| (doc(n), set(&[n + 1000]))));
    sync(&mut a, &mut b);
    assert!(sync(&mut a, &mut b).fast);
    b.checkpoints.clear();
    a.edit(doc(3), 7);
    let r = sync(&mut a, &mut b);
    assert!(!r.fast);
    assert!(r.round_trips <= 4, "{r:?}");
    assert_eq!(a.docs, b.docs);
    // The responder finishes, the initiator never hears its final Done.
    b.edit(doc(4), 9);
    let mut cut = 1;
    loop {
        let before = (a.checkpoints.clone(), b.checkpoints.clone());
        sync_cut(&mut a, &mut b, cut);
        if b.checkpoints != before.1 && a.checkpoints == before.0 {
            break;
        }
        a.checkpoints = before.0;
        b.checkpoints = before.1;
        cut += 1;
        assert!(cut < 50, "no cut leaves only the responder finished");
    }
    let r = sync(&mut a, &mut b);
    assert!(
        !r.fast,
        "mismatched checkpoints must not take the fast path"
    );
    assert_eq!(a.docs, b.docs);
    assert!(sync(&mut a, &mut b).fast);
}

/// Figures for 10,000 documents differing by d: round trips and bytes (also printed), at first
/// contact and for peers that synced before.
#[test]
fn ten_thousand_documents() {
    let base: Vec<(DocId, BTreeSet<u64>)> = (0..10_000).map(|n| (doc(n), set(&[n]))).collect();
    for d in [0u64, 1, 10, 100, 1000] {
        for synced_before in [false, true] {
            let mut a = Replica::with_docs("a", 1, base.clone());
            let mut b = Replica::with_docs("b", 2, base.clone());
            if synced_before {
                sync(&mut a, &mut b);
                sync(&mut a, &mut b);
            }
            for n in 0..d {
                a.edit(doc(n * 7), 1_000_000 + n);
            }
            let r = sync(&mut a, &mut b);
            assert_eq!(a.docs, b.docs);
            assert_eq!(r.fast, synced_before);
            println!(
                "10k documents, d = {d:>4}, {}: {} round trips, {:>7} B metadata, {:>8} B in all",
                if synced_before {
                    "synced before"
                } else {
                    "first contact"
                },
                r.round_trips,
                r.metadata_bytes,
                r.total_bytes
            );
            assert!(r.round_trips <= 3, "d = {d}: {r:?}");
            if synced_before {
                assert!(r.metadata_bytes as u64 <= 1024 + 100 * d, "d = {d}: {r:?}");
                if d == 0 {
                    assert_eq!(r.round_trips, 1);
                    assert!(r.total_bytes <= 200, "{r:?}");
                }
            } else if d == 0 {
                assert!(r.metadata_bytes < 1024, "{r:?}");
            }
        }
    }
}

/// The messages a session's actions put on the wire (documents as `Docs` frames).
fn wire(actions: Vec<Action>, me: &Replica) -> Vec<Message> {
    let mut out = Vec::new();
    for act in actions {
        match act {
            Action::Send(m) => out.push(m),
            Action::SendDocs(ids) => {
                out.extend(pack(ids.iter().map(|(id, _)| payload(me, id)).collect()))
            }
            Action::Apply(_) | Action::Outside(_) | Action::Finished => {}
        }
    }
    out
}

/// A message captured from one session and replayed into another is refused by the state
/// machine: before a Hello, as a second Hello, or after the session ended. (On the network every
/// session also runs in its own Noise-encrypted stream, and replayed documents are idempotent
/// merges of signed changes; see the node's trust tests.)
#[test]
fn a_captured_message_replayed_into_another_session_is_refused() {
    let a = Replica::with_docs("a", 1, [(doc(1), set(&[1])), (doc(2), set(&[2]))]);
    let b = Replica::with_docs("b", 2, [(doc(3), set(&[3]))]);
    let mut sa = Session::new(Role::Initiator, a.local("b"), a.items()).unwrap();
    let mut sb = Session::new(Role::Responder, b.local("a"), b.items()).unwrap();
    let mut captured: Vec<Message> = Vec::new();
    let mut to_b = wire(sa.start().unwrap(), &a);
    let mut to_a: Vec<Message> = Vec::new();
    while !to_b.is_empty() || !to_a.is_empty() {
        for m in std::mem::take(&mut to_b) {
            captured.push(m.clone());
            to_a.extend(wire(sb.handle(m).unwrap(), &b));
        }
        for m in std::mem::take(&mut to_a) {
            captured.push(m.clone());
            to_b.extend(wire(sa.handle(m).unwrap(), &a));
        }
    }
    assert!(sa.checkpoint().is_some() && sb.checkpoint().is_some());
    assert!(captured.iter().any(|m| matches!(m, Message::Docs(_))));
    let fresh = || Session::new(Role::Responder, b.local("a"), b.items()).unwrap();
    for m in &captured {
        if matches!(m, Message::Hello { .. }) {
            // A replayed Hello opens nothing new inside a session that already has one.
            let mut s = fresh();
            s.handle(m.clone()).unwrap();
            assert!(s.handle(m.clone()).is_err());
        } else {
            assert!(
                fresh().handle(m.clone()).is_err(),
                "{m:?} accepted before a Hello"
            );
        }
        // The finished sessions take nothing more.
        assert!(sb.handle(m.clone()).is_err(), "{m:?} taken after the end");
        assert!(sa.handle(m.clone()).is_err(), "{m:?} taken after the end");
    }
}
