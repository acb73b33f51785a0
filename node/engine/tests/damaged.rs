//! A store that cannot read one document (a damaged page under it): sessions with a peer that
//! asks for it must not fail for ever. The first may fail (the peer asked for a document this
//! node then cannot send, and the protocol has no "cannot send"); the next no longer offer it
//! and complete, and the peer gets everything else.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use std::sync::Mutex;

use fieldmesh_engine::test_support::{certificate, certificate_doc, forge, key, peer, public};
use fieldmesh_engine::{Engine, NodeIdentity, Source, now};
use fieldmesh_fhir_docs::DocId;
use fieldmesh_storage::{
    DocMeta, IndexDump, MemStore, Quarantined, Stats, Store, StoreError, Write,
};
use fieldmesh_trust::Role;
use serde_json::json;

/// A store whose data for one document cannot be read.
struct Damaged {
    inner: MemStore,
    bad: Mutex<Option<[u8; 16]>>,
}

impl Store for Damaged {
    fn commit(&self, writes: Vec<Write>) -> Result<Vec<u64>, StoreError> {
        self.inner.commit(writes)
    }
    fn doc_meta(&self, id: &[u8; 16]) -> Result<Option<DocMeta>, StoreError> {
        self.inner.doc_meta(id)
    }
    fn doc_bytes(&self, id: &[u8; 16]) -> Result<Option<Vec<u8>>, StoreError> {
        if *self.bad.lock().unwrap() == Some(*id) {
            return Err(StoreError::Corrupt(
                "a page could not be read (test)".into(),
            ));
        }
        self.inner.doc_bytes(id)
    }
    fn find(&self, ty: &str, system: &str, value: &str) -> Result<Vec<[u8; 16]>, StoreError> {
        self.inner.find(ty, system, value)
    }
    fn find_value(&self, ty: &str, value: &str) -> Result<Vec<[u8; 16]>, StoreError> {
        self.inner.find_value(ty, value)
    }
    fn of_type(&self, ty: &str) -> Result<Vec<[u8; 16]>, StoreError> {
        self.inner.of_type(ty)
    }
    fn referrers(&self, ty: &str, system: &str, value: &str) -> Result<Vec<[u8; 16]>, StoreError> {
        self.inner.referrers(ty, system, value)
    }
    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, [u8; 16])>, StoreError> {
        self.inner.changes_since(after, limit)
    }
    fn envelopes(&self, id: &[u8; 16]) -> Result<Vec<u8>, StoreError> {
        self.inner.envelopes(id)
    }
    fn checkpoint(&self, peer: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.checkpoint(peer)
    }
    fn store_id(&self) -> Result<[u8; 16], StoreError> {
        self.inner.store_id()
    }
    fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, StoreError> {
        self.inner.quarantined(limit)
    }
    fn quarantined_payload(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.quarantined_payload(hash)
    }
    fn stats(&self) -> Result<Stats, StoreError> {
        self.inner.stats()
    }
    fn verify(&self) -> Result<Vec<String>, StoreError> {
        self.inner.verify()
    }
    fn index_entries(&self) -> Result<IndexDump, StoreError> {
        self.inner.index_entries()
    }
}

fn patient(n: usize) -> serde_json::Value {
    json!({"resourceType": "Patient", "name": [{"family": format!("Damaged{n}")}], "birthDate": "1990-01-01"})
}

#[test]
fn a_document_the_store_cannot_read_fails_at_most_one_session() {
    let root = key(1);
    let (ka, kb) = (key(2), key(3));
    let store = std::sync::Arc::new(Damaged {
        inner: MemStore::new(),
        bad: Mutex::new(None),
    });
    // Few documents in memory, so that what is sent is read from the store.
    let mut a = Engine::new(
        Box::new(std::sync::Arc::clone(&store)),
        NodeIdentity::new("urn:fieldmesh:node:a".into(), &[2; 32], public(&root)),
        1,
    );
    let mut b = fieldmesh_engine::test_support::engine(&[3; 32], "b", &public(&root));
    let t = now();
    let cert = |k| {
        certificate_doc(
            &root,
            &certificate(k, "HUB", &[Role::Central], &[], &[], (t - 3600, t + 86_400)),
            t,
        )
    };
    let certs = vec![cert(&ka), cert(&kb)];
    for e in [&mut a, &mut b] {
        e.merge(certs.clone(), &Source::Local).unwrap();
    }
    // Both hold many documents, different ones: the session reconciles by ranges and b asks
    // for a's documents by id.
    let mine: Vec<_> = (0..40)
        .map(|n| forge(&root, &patient(n), DocId::new(), t))
        .collect();
    let bad = mine[7].id;
    a.merge(mine, &Source::Local).unwrap();
    a.flush().unwrap();
    let theirs: Vec<_> = (40..70)
        .map(|n| forge(&root, &patient(n), DocId::new(), t))
        .collect();
    b.merge(theirs, &Source::Local).unwrap();
    b.flush().unwrap();
    *store.bad.lock().unwrap() = Some(bad);

    let (pa, pb) = (peer(&ka), peer(&kb));
    let first = fieldmesh_engine::test_support::sync_pair(&mut b, &pb, &mut a, &pa);
    println!("first session: {first:?}");
    let second = fieldmesh_engine::test_support::sync_pair(&mut b, &pb, &mut a, &pa);
    assert!(second.is_ok(), "the second session failed too: {second:?}");
    let third = fieldmesh_engine::test_support::sync_pair(&mut b, &pb, &mut a, &pa);
    assert!(third.is_ok(), "{third:?}");
    // b holds everything of a's but the unreadable document.
    assert_eq!(
        b.store().stats().unwrap().documents,
        2 + 30 + 39,
        "b got every readable document"
    );
    assert!(b.store().doc_meta(&bad).unwrap().is_none());
}
