//! Reads do not wait behind writes, and never show a write that is not yet durable: the engine
//! thread is held inside a commit (a store whose commits wait at a gate) while reads and searches
//! are answered from committed data.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fieldmesh_engine::test_support::{certificate, certificate_doc, key, public};
use fieldmesh_engine::{Engine, NodeIdentity, Outcome, ReadError, Source, now};
use fieldmesh_fhir_docs::IdentifierQuery;
use fieldmesh_node::engine_thread::{EngineHandle, HandleError, Services};
use fieldmesh_storage::{
    DocId, DocMeta, IndexDump, MemStore, Quarantined, Stats, Store, StoreError, Write,
};
use fieldmesh_trust::Role;
use serde_json::json;

/// A store whose commits wait while the gate is closed.
struct GatedStore {
    inner: MemStore,
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl Store for GatedStore {
    fn commit(&self, writes: Vec<Write>) -> Result<Vec<u64>, StoreError> {
        let (open, cv) = &*self.gate;
        let mut o = open.lock().unwrap();
        while !*o {
            o = cv.wait(o).unwrap();
        }
        drop(o);
        self.inner.commit(writes)
    }
    fn doc_meta(&self, id: &DocId) -> Result<Option<DocMeta>, StoreError> {
        self.inner.doc_meta(id)
    }
    fn doc_bytes(&self, id: &DocId) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.doc_bytes(id)
    }
    fn find(&self, ty: &str, system: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        self.inner.find(ty, system, value)
    }
    fn find_value(&self, ty: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        self.inner.find_value(ty, value)
    }
    fn of_type(&self, ty: &str) -> Result<Vec<DocId>, StoreError> {
        self.inner.of_type(ty)
    }
    fn referrers(&self, ty: &str, system: &str, value: &str) -> Result<Vec<DocId>, StoreError> {
        self.inner.referrers(ty, system, value)
    }
    fn changes_since(&self, after: u64, limit: usize) -> Result<Vec<(u64, DocId)>, StoreError> {
        self.inner.changes_since(after, limit)
    }
    fn envelopes(&self, id: &DocId) -> Result<Vec<u8>, StoreError> {
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

fn set_gate(gate: &(Mutex<bool>, Condvar), open: bool) {
    *gate.0.lock().unwrap() = open;
    gate.1.notify_all();
}

#[test]
fn reads_answer_while_a_write_waits_for_its_commit_and_never_show_it_early() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let gate = Arc::new((Mutex::new(true), Condvar::new()));
    let root = key(1);
    let mut engine = Engine::new(
        Box::new(GatedStore {
            inner: MemStore::new(),
            gate: Arc::clone(&gate),
        }),
        NodeIdentity::new("urn:fieldmesh:node:n2".into(), &[2; 32], public(&root)),
        16,
    );
    let cert = certificate(
        &key(2),
        "EO0001",
        &[Role::Central],
        &[],
        &[],
        (now() - 60, now() + 3600),
    );
    engine
        .merge(vec![certificate_doc(&root, &cert, now())], &Source::Local)
        .unwrap();
    engine.flush().unwrap();
    let (handle, thread) = EngineHandle::spawn(engine, Services::None).unwrap();
    let patient = |family: &str| {
        json!({"resourceType": "Patient", "name": [{"family": family}], "birthDate": "1990-01-01",
            "identifier": [{"system": "urn:test", "value": family}]})
    };
    rt.block_on(async {
        let first = handle
            .create("Patient".into(), patient("Durable"))
            .await
            .unwrap();
        // The engine thread is now held inside the commit of a second write.
        set_gate(&gate, false);
        let pending_id = "3f0c8a54-9a1e-4a8f-8f7e-5a1d2c3b4e5f".to_string();
        let writer = {
            let handle = handle.clone();
            let id = pending_id.clone();
            tokio::spawn(async move {
                handle
                    .update("Patient".into(), id, patient("Pending"), None)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!writer.is_finished(), "the write must wait for its commit");
        // Reads and searches answer meanwhile, from committed data.
        let read = tokio::time::timeout(
            Duration::from_secs(2),
            handle.read_resource("Patient".into(), first.id.clone()),
        )
        .await
        .expect("a read waited behind the write")
        .unwrap();
        assert_eq!(read.resource["name"][0]["family"], "Durable");
        let found = tokio::time::timeout(
            Duration::from_secs(2),
            handle.search(
                "Patient".into(),
                IdentifierQuery::Exact(fieldmesh_fhir_docs::IdentKey::new("urn:test", "Durable")),
            ),
        )
        .await
        .expect("a search waited behind the write")
        .unwrap();
        assert_eq!(found.len(), 1);
        // The write that is not durable yet is not visible, by id or by identifier.
        assert!(matches!(
            handle
                .read_resource("Patient".into(), pending_id.clone())
                .await,
            Err(HandleError::Engine(ReadError::NotFound { .. }))
        ));
        let hidden = handle
            .search(
                "Patient".into(),
                IdentifierQuery::Exact(fieldmesh_fhir_docs::IdentKey::new("urn:test", "Pending")),
            )
            .await
            .unwrap();
        assert!(hidden.is_empty());
        // Once committed, it is acknowledged and visible.
        set_gate(&gate, true);
        let (served, outcome) = writer.await.unwrap().unwrap();
        assert_eq!(outcome, Outcome::Created);
        assert_eq!(served.id, pending_id);
        let read = handle
            .read_resource("Patient".into(), pending_id.clone())
            .await
            .unwrap();
        assert_eq!(read.resource["name"][0]["family"], "Pending");
        handle.stop().await;
    });
    thread.join().unwrap();
}
