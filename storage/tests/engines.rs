//! Both engines behave alike: writes with index maintenance, queries, atomic failure, verify.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use std::collections::HashMap;

use fieldmesh_storage::{
    DocData, DocId, DocMeta, DocWrite, IndexEntries, MemStore, Quarantine, QuarantineBudget,
    RedbStore, Store, StoreOptions, Write,
};
use proptest::prelude::*;

fn id(n: u8) -> [u8; 16] {
    [n; 16]
}

fn doc(n: u8, data: DocData, idents: &[(&str, &str)], refs: &[(&str, &str, &str)]) -> Write {
    doc_after(n, data, idents, refs, IndexEntries::default())
}

fn entries(idents: &[(&str, &str)], refs: &[(&str, &str, &str)]) -> IndexEntries {
    IndexEntries {
        identifiers: idents
            .iter()
            .map(|(s, v)| (s.to_string(), v.to_string()))
            .collect(),
        references: refs
            .iter()
            .map(|(t, s, v)| (t.to_string(), s.to_string(), v.to_string()))
            .collect(),
    }
}

fn doc_after(
    n: u8,
    data: DocData,
    idents: &[(&str, &str)],
    refs: &[(&str, &str, &str)],
    previous: IndexEntries,
) -> Write {
    Write::Doc(DocWrite {
        previous,
        envelopes: vec![n],
        id: id(n),
        ty: "Patient".into(),
        origin: "urn:fieldmesh:node:a".into(),
        data,
        heads: vec![[n; 32]],
        updated: 0,
        identifiers: idents
            .iter()
            .map(|(s, v)| (s.to_string(), v.to_string()))
            .collect(),
        references: refs
            .iter()
            .map(|(t, s, v)| (t.to_string(), s.to_string(), v.to_string()))
            .collect(),
    })
}

fn exercise(store: &mut dyn Store) {
    let seqs = store
        .commit(vec![
            doc(
                1,
                DocData::Full(b"one".to_vec()),
                &[("sys", "1"), ("chfid", "C1")],
                &[("Group", "sys", "g")],
            ),
            doc(
                2,
                DocData::Full(b"two".to_vec()),
                &[("sys", "2")],
                &[("Group", "sys", "g")],
            ),
        ])
        .unwrap();
    assert_eq!(seqs, vec![1, 2]);
    assert_eq!(store.find("Patient", "chfid", "C1").unwrap(), vec![id(1)]);
    assert_eq!(store.find_value("Patient", "C1").unwrap(), vec![id(1)]);
    assert!(store.find("Group", "chfid", "C1").unwrap().is_empty());
    assert_eq!(
        store.referrers("Group", "sys", "g").unwrap(),
        vec![id(1), id(2)]
    );

    // An update appends a chunk, moves the document to the end of the log and re-indexes it.
    let before = entries(&[("sys", "1"), ("chfid", "C1")], &[("Group", "sys", "g")]);
    store
        .commit(vec![doc_after(
            1,
            DocData::Append(b"+1".to_vec()),
            &[("sys", "1"), ("chfid", "C9")],
            &[],
            before,
        )])
        .unwrap();
    assert_eq!(store.doc_bytes(&id(1)).unwrap().unwrap(), b"one+1");
    // Envelopes are appended per write, across compactions too.
    assert_eq!(store.envelopes(&id(1)).unwrap(), vec![1, 1]);
    assert_eq!(store.envelopes(&id(2)).unwrap(), vec![2]);
    assert!(store.envelopes(&id(99)).unwrap().is_empty());
    assert_eq!(store.of_type("Patient").unwrap(), vec![id(1), id(2)]);
    assert!(store.of_type("Group").unwrap().is_empty());
    assert!(store.find("Patient", "chfid", "C1").unwrap().is_empty());
    assert_eq!(store.find("Patient", "chfid", "C9").unwrap(), vec![id(1)]);
    assert_eq!(store.referrers("Group", "sys", "g").unwrap(), vec![id(2)]);
    assert_eq!(
        store.changes_since(0, 10).unwrap(),
        vec![(2, id(2)), (3, id(1))]
    );
    assert_eq!(store.changes_since(2, 10).unwrap(), vec![(3, id(1))]);

    // Compaction: a full save replaces every chunk.
    let before = entries(&[("sys", "1"), ("chfid", "C9")], &[]);
    store
        .commit(vec![doc_after(
            1,
            DocData::Full(b"ONE".to_vec()),
            &[("sys", "1")],
            &[],
            before,
        )])
        .unwrap();
    assert!(store.find_value("Patient", "C9").unwrap().is_empty());
    let dump = store.index_entries().unwrap();
    assert_eq!(dump.identifiers.len(), 2);
    assert_eq!(dump.references.len(), 1);
    assert_eq!(store.doc_bytes(&id(1)).unwrap().unwrap(), b"ONE");
    assert_eq!(store.doc_meta(&id(1)).unwrap().unwrap().chunks, 1);

    // A failing batch leaves nothing behind.
    let before = store.stats().unwrap();
    let err = store
        .commit(vec![
            doc(3, DocData::Full(b"three".to_vec()), &[("sys", "3")], &[]),
            doc(9, DocData::Append(b"x".to_vec()), &[], &[]),
        ])
        .unwrap_err();
    assert!(err.to_string().contains("not in the store"), "{err}");
    assert_eq!(store.stats().unwrap(), before);
    assert!(store.doc_meta(&id(3)).unwrap().is_none());
    assert!(store.find("Patient", "sys", "3").unwrap().is_empty());

    store
        .commit(vec![Write::Checkpoint {
            peer: "p".into(),
            value: vec![3, 4],
        }])
        .unwrap();
    assert_eq!(store.checkpoint("p").unwrap(), Some(vec![3, 4]));
    assert_eq!(store.checkpoint("q").unwrap(), None);
    // A store has a random id once it has committed anything; it does not change.
    let sid = store.store_id().unwrap();
    assert_ne!(sid, [0; 16]);
    store.commit(Vec::new()).unwrap();
    assert_eq!(store.store_id().unwrap(), sid);
    let refused = Quarantine {
        reason: "bad signature".into(),
        from: "peer".into(),
        doc: [9; 16],
        ty: "Patient".into(),
        changes: 3,
        data: vec![1, 2, 3],
    };
    store
        .commit(vec![Write::Quarantine(refused.clone())])
        .unwrap();
    // The same payload again is kept once.
    store.commit(vec![Write::Quarantine(refused)]).unwrap();
    let stats = store.stats().unwrap();
    assert_eq!((stats.documents, stats.quarantined), (2, 1));
    assert_eq!(stats.quarantine_bytes, 3);
    let listed = store.quarantined(10).unwrap();
    assert_eq!(listed[0].reason, "bad signature");
    assert_eq!((listed[0].changes, listed[0].bytes), (3, 3));
    assert_eq!(
        store.quarantined_payload(&listed[0].payload).unwrap(),
        Some(vec![1, 2, 3])
    );
    assert_eq!(store.verify().unwrap(), Vec::<String>::new());
}

/// The quarantine stays within its budget per source and in all, evicting the oldest records.
#[test]
fn the_quarantine_keeps_to_its_budget() {
    let store = MemStore::with_budget(QuarantineBudget {
        total_bytes: 10_000,
        per_source_bytes: 3_000,
        records: 100,
    });
    let q = |from: &str, n: u8| Quarantine {
        reason: format!("refused {n}"),
        from: from.into(),
        doc: [n; 16],
        ty: "Patient".into(),
        changes: 1,
        data: vec![n; 1_000],
    };
    // One source sends ten payloads: it keeps its last three.
    for n in 0..10 {
        store
            .commit(vec![Write::Quarantine(q("flood", n))])
            .unwrap();
    }
    let kept: Vec<String> = store
        .quarantined(100)
        .unwrap()
        .into_iter()
        .map(|r| r.reason)
        .collect();
    assert_eq!(kept, ["refused 7", "refused 8", "refused 9"]);
    // Others still get their own budget, up to the total.
    for (k, from) in ["a", "b", "c", "d"].iter().enumerate() {
        for n in 0..3 {
            store
                .commit(vec![Write::Quarantine(q(from, 20 + 3 * k as u8 + n))])
                .unwrap();
        }
    }
    let stats = store.stats().unwrap();
    assert!(stats.quarantine_bytes <= 10_000, "{stats:?}");
    assert!(stats.quarantine_evicted >= 7, "{stats:?}");
    // A payload larger than a source's budget is recorded without its bytes.
    let big = Quarantine {
        data: vec![0; 5_000],
        ..q("e", 99)
    };
    store.commit(vec![Write::Quarantine(big)]).unwrap();
    let last = store.quarantined(1000).unwrap().pop().unwrap();
    assert_eq!((last.bytes, last.payload), (5_000, [0; 32]));
}

/// Documents are counted by type as they are written and removed, without a scan.
fn counts(store: &dyn Store) {
    store
        .commit(vec![
            doc(1, DocData::Full(b"one".to_vec()), &[("sys", "1")], &[]),
            doc(2, DocData::Full(b"two".to_vec()), &[("sys", "2")], &[]),
        ])
        .unwrap();
    // Written again: still two.
    store
        .commit(vec![doc_after(
            2,
            DocData::Append(b"2".to_vec()),
            &[("sys", "2")],
            &[],
            entries(&[("sys", "2")], &[]),
        )])
        .unwrap();
    assert_eq!(store.count_of_type("Patient").unwrap(), 2);
    store
        .commit(vec![Write::Remove {
            id: id(1),
            entries: entries(&[("sys", "1")], &[]),
            purge: Vec::new(),
        }])
        .unwrap();
    assert_eq!(store.count_of_type("Patient").unwrap(), 1);
    assert_eq!(store.count_of_type("Group").unwrap(), 0);
}

#[test]
fn documents_are_counted_by_type() {
    counts(&MemStore::new());
    let dir = tempfile::tempdir().unwrap();
    counts(&RedbStore::open(dir.path().join("s.redb"), StoreOptions::default()).unwrap());
}

#[test]
fn mem_store_behaves() {
    exercise(&mut MemStore::new());
}

#[test]
fn redb_store_behaves_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    {
        let mut s = RedbStore::open(&path, StoreOptions::default()).unwrap();
        exercise(&mut s);
        // A second open of the same file is refused with a clear error.
        let err = RedbStore::open(&path, StoreOptions::default()).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
    }
    let s = RedbStore::open(&path, StoreOptions::default()).unwrap();
    assert_eq!(s.doc_bytes(&id(1)).unwrap().unwrap(), b"ONE");
    assert_eq!(s.stats().unwrap().documents, 2);
    assert!(s.verify().unwrap().is_empty());
}

#[derive(Debug, Clone)]
enum Op {
    Full(u8, u8),
    Append(u8, u8),
}

fn ops() -> impl Strategy<Value = Vec<Vec<Op>>> {
    let op = prop_oneof![
        (0u8..12, 0u8..4).prop_map(|(d, v)| Op::Full(d, v)),
        (0u8..12, 0u8..4).prop_map(|(d, v)| Op::Append(d, v)),
    ];
    prop::collection::vec(prop::collection::vec(op, 1..6), 1..12)
}

/// The write for `op`, given each document's index entries (as a writer knows them from the
/// document it changes). Also returns the entries the document has afterwards.
fn to_write(op: &Op, current: &HashMap<u8, IndexEntries>) -> (Write, u8, IndexEntries) {
    let (n, v, data) = match op {
        Op::Full(n, v) => (*n, *v, DocData::Full(vec![*v; 3])),
        Op::Append(n, v) => (*n, *v, DocData::Append(vec![*v; 2])),
    };
    let value = format!("v{v}");
    let target = format!("t{}", v % 2);
    let sys = format!("{n}");
    let idents = [("sys", sys.as_str()), ("code", value.as_str())];
    let refs = [("Group", "sys", target.as_str())];
    let previous = current.get(&n).cloned().unwrap_or_default();
    (
        doc_after(n, data, &idents, &refs, previous),
        n,
        entries(&idents, &refs),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    /// Random batches (some failing) leave both engines in the same, consistent state.
    /// The on-disk store defers its index writes and folds them every `fold` entries: with a
    /// fold size of 1 to 40 some batches fold and some only append to the log; between some
    /// batches the writes held are folded at once, as an idle node does ([`Store::fold_index`]).
    #[test]
    fn engines_agree(
        batches in ops(),
        fold in prop_oneof![Just(usize::MAX), 1usize..40],
        idle in proptest::collection::vec(any::<bool>(), 0..24),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions { fold_index_after: fold, ..StoreOptions::default() };
        let mut disk = RedbStore::open(dir.path().join("s.redb"), options).unwrap();
        let mem = MemStore::new();
        let mut current: HashMap<u8, IndexEntries> = HashMap::new();
        for (i, batch) in batches.iter().enumerate() {
            if idle.get(i).copied().unwrap_or(false) {
                disk.fold_index(1).unwrap();
                // Nothing is left to fold: a second call folds nothing.
                prop_assert_eq!(disk.fold_index(1).unwrap(), 0);
                prop_assert_eq!(mem.fold_index(1).unwrap(), 0);
            }
            let mut staged = current.clone();
            let mut writes = Vec::new();
            for op in batch {
                let (w, n, after) = to_write(op, &staged);
                staged.insert(n, after);
                writes.push(w);
            }
            let a = disk.commit(writes.clone()).map_err(|e| e.to_string());
            let b = mem.commit(writes).map_err(|e| e.to_string());
            if a.is_ok() {
                current = staged;
            }
            prop_assert_eq!(a, b);
            if batch.len() == 1 {
                // Reopened: the log of pending index writes is read back.
                drop(disk);
                disk = RedbStore::open(dir.path().join("s.redb"), options).unwrap();
            }
        }
        prop_assert_eq!(disk.stats().unwrap(), mem.stats().unwrap());
        prop_assert_eq!(disk.changes_since(0, 1000).unwrap(), mem.changes_since(0, 1000).unwrap());
        // Read together, in an order that is not the key order, with ids never written.
        let ids: Vec<DocId> = (0u8..12).rev().chain([3, 40]).map(id).collect();
        let metas = |s: &dyn Store| -> Vec<Option<DocMeta>> {
            let together = s.doc_metas(&ids).unwrap();
            assert_eq!(together.len(), ids.len());
            together.into_iter().zip(&ids).map(|(m, i)| {
                let m = m.unwrap();
                assert_eq!(m, s.doc_meta(i).unwrap(), "read together, not as alone");
                m
            }).collect()
        };
        prop_assert_eq!(metas(&disk), metas(&mem));
        for n in 0u8..12 {
            prop_assert_eq!(disk.doc_bytes(&id(n)).unwrap(), mem.doc_bytes(&id(n)).unwrap());
            for v in 0..4 {
                let value = format!("v{v}");
                prop_assert_eq!(disk.find("Patient", "code", &value).unwrap(), mem.find("Patient", "code", &value).unwrap());
            }
        }
        prop_assert_eq!(disk.referrers("Group", "sys", "t0").unwrap(), mem.referrers("Group", "sys", "t0").unwrap());
        prop_assert_eq!(disk.count_of_type("Patient").unwrap(), current.len());
        prop_assert_eq!(mem.count_of_type("Patient").unwrap(), current.len());
        prop_assert_eq!(disk.index_entries().unwrap(), mem.index_entries().unwrap());
        // The index holds exactly what the documents carry now.
        let expected: usize = current.values().map(|e| e.identifiers.len()).sum();
        prop_assert_eq!(disk.index_entries().unwrap().identifiers.len(), expected);
        prop_assert!(disk.verify().unwrap().is_empty());
        prop_assert!(mem.verify().unwrap().is_empty());
    }
}
