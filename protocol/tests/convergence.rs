//! Two replicas sync through sessions, every message passing through the wire encoder and decoder.
//! Documents here are grow-only sets (a CRDT like Automerge documents: merging is union), so the
//! test is about the protocol: after one session both replicas hold the same documents, in a
//! bounded number of round trips, and unchanged stores exchange only a few bytes.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use fieldmesh_protocol::{Action, DocId, DocPayload, Message, Role, Session, decode, encode, pack};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

type Replica = BTreeMap<DocId, BTreeSet<u64>>;

fn heads(set: &BTreeSet<u64>) -> Vec<[u8; 32]> {
    let mut h = Sha256::new();
    for v in set {
        h.update(v.to_be_bytes());
    }
    vec![h.finalize().into()]
}

fn items(r: &Replica) -> Vec<(DocId, Vec<[u8; 32]>)> {
    r.iter().map(|(d, s)| (*d, heads(s))).collect()
}

fn payload(r: &Replica, id: &DocId) -> DocPayload {
    let data = r[id].iter().flat_map(|v| v.to_be_bytes()).collect();
    DocPayload {
        id: *id,
        ty: "Patient".into(),
        data,
    }
}

fn apply(r: &mut Replica, docs: Vec<DocPayload>) {
    for d in docs {
        let set = r.entry(d.id).or_default();
        for chunk in d.data.chunks(8) {
            set.insert(u64::from_be_bytes(chunk.try_into().unwrap()));
        }
    }
}

#[derive(Debug, Default)]
struct Report {
    /// Times the conversation changed direction, halved: request/response pairs.
    round_trips: u32,
    reconcile_bytes: usize,
    total_bytes: usize,
}

/// Runs one session from `a` (initiator) to `b`, returning what it cost.
fn sync(a: &mut Replica, b: &mut Replica) -> Report {
    let mut sa = Session::new(Role::Initiator, "a", items(a)).unwrap();
    let mut sb = Session::new(Role::Responder, "b", items(b)).unwrap();
    let mut to_b: VecDeque<Vec<u8>> = VecDeque::new();
    let mut to_a: VecDeque<Vec<u8>> = VecDeque::new();
    let mut report = Report::default();
    let mut flights = 0u32;
    let mut last_dir = 0u8;
    let run = |actions: Vec<Action>,
               me: &mut Replica,
               out: &mut VecDeque<Vec<u8>>,
               report: &mut Report| {
        for act in actions {
            let msgs = match act {
                Action::Send(m) => vec![m],
                Action::SendDocs(ids) => pack(ids.iter().map(|id| payload(me, id)).collect()),
                Action::Apply(docs) => {
                    apply(me, docs);
                    vec![]
                }
                Action::Finished => vec![],
            };
            for m in msgs {
                let f = encode(&m);
                if matches!(m, Message::Reconcile(_)) {
                    report.reconcile_bytes += f.len();
                }
                report.total_bytes += f.len();
                out.push_back(f);
            }
        }
    };
    let start = sa.start().unwrap();
    run(start, a, &mut to_b, &mut report);
    for _ in 0..10_000 {
        if let Some(f) = to_b.pop_front() {
            if last_dir != 1 {
                flights += 1;
                last_dir = 1;
            }
            let acts = sb.handle(decode(&f).unwrap()).unwrap();
            run(acts, b, &mut to_a, &mut report);
        } else if let Some(f) = to_a.pop_front() {
            if last_dir != 2 {
                flights += 1;
                last_dir = 2;
            }
            let acts = sa.handle(decode(&f).unwrap()).unwrap();
            run(acts, a, &mut to_b, &mut report);
        } else {
            break;
        }
    }
    assert!(
        sa.is_finished() && sb.is_finished(),
        "the session did not finish"
    );
    report.round_trips = flights.div_ceil(2);
    report
}

fn doc(n: u64) -> DocId {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&n.to_be_bytes());
    id
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn one_session_makes_replicas_equal(
        shared in prop::collection::btree_map(0u64..200, prop::collection::btree_set(0u64..50, 1..4), 0..60),
        only_a in prop::collection::btree_map(0u64..200, prop::collection::btree_set(50u64..100, 1..3), 0..20),
        only_b in prop::collection::btree_map(0u64..200, prop::collection::btree_set(100u64..150, 1..3), 0..20),
    ) {
        let mut a: Replica = shared.iter().map(|(k, v)| (doc(*k), v.clone())).collect();
        let mut b = a.clone();
        for (k, v) in only_a { a.entry(doc(k)).or_default().extend(v); }
        for (k, v) in only_b { b.entry(doc(k)).or_default().extend(v); }
        let mut expected = a.clone();
        for (k, v) in &b { expected.entry(*k).or_default().extend(v.iter().copied()); }
        let r = sync(&mut a, &mut b);
        prop_assert_eq!(&a, &expected);
        prop_assert_eq!(&b, &expected);
        prop_assert!(r.round_trips <= 3, "{:?}", r);
        // A second session finds nothing to do.
        let again = sync(&mut a, &mut b);
        prop_assert_eq!(again.total_bytes - again.reconcile_bytes, encode(&Message::Hello { node: "a".into(), documents: a.len() as u64 }).len()
            + encode(&Message::Hello { node: "b".into(), documents: b.len() as u64 }).len() + 2 * encode(&Message::Done).len());
    }
}

/// Figures for 10,000 documents differing by d: round trips and bytes (also printed).
#[test]
fn ten_thousand_documents() {
    let base: Replica = (0..10_000).map(|n| (doc(n), BTreeSet::from([n]))).collect();
    for d in [0u64, 1, 10, 100, 1000] {
        let mut a = base.clone();
        let mut b = base.clone();
        for n in 0..d {
            a.get_mut(&doc(n * 7)).unwrap().insert(1_000_000 + n);
        }
        let r = sync(&mut a, &mut b);
        assert_eq!(a, b);
        println!(
            "10k documents, d = {d:>4}: {} round trips, {:>7} B reconciliation, {:>8} B in all",
            r.round_trips, r.reconcile_bytes, r.total_bytes
        );
        assert!(r.round_trips <= 3, "d = {d}: {r:?}");
        if d == 0 {
            assert!(r.reconcile_bytes < 1024, "{r:?}");
        }
    }
}
