//! Reads do not wait behind writes, and never show a write that is not yet durable: the engine
//! thread is held inside a commit (a store whose commits wait at a gate) while reads and searches
//! are answered from committed data. The engine thread goes on with other commands while a
//! commit runs, and answers a write only once its commit has ended, with the commit's failure if
//! it failed.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use fieldmesh_engine::test_support::{certificate, certificate_doc, key, public};
use fieldmesh_engine::{Engine, NodeIdentity, Outcome, ReadError, Source, WriteError, now};
use fieldmesh_fhir_docs::IdentifierQuery;
use fieldmesh_node::engine_thread::{EngineHandle, HandleError, Services};
use fieldmesh_storage::{
    DocId, DocMeta, IndexDump, MemStore, Quarantined, Stats, Store, StoreError, Write,
};
use fieldmesh_trust::Role;
use serde_json::json;

/// A store whose commits wait while the gate is closed, and fail (as on a full disk) while
/// `fail` is set.
struct GatedStore {
    inner: MemStore,
    gate: Arc<(Mutex<bool>, Condvar)>,
    fail: Arc<AtomicBool>,
}

impl Store for GatedStore {
    fn commit(&self, writes: Vec<Write>) -> Result<Vec<u64>, StoreError> {
        let (open, cv) = &*self.gate;
        let mut o = open.lock().unwrap();
        while !*o {
            o = cv.wait(o).unwrap();
        }
        drop(o);
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::DiskFull("the test's disk".into()));
        }
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

type Gate = Arc<(Mutex<bool>, Condvar)>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A certified node's engine thread over a [`GatedStore`], with its gate and failure switch.
fn gated_node(
    rt: &tokio::runtime::Runtime,
) -> (
    EngineHandle,
    std::thread::JoinHandle<()>,
    Gate,
    Arc<AtomicBool>,
) {
    let _guard = rt.enter();
    let gate = Arc::new((Mutex::new(true), Condvar::new()));
    let fail = Arc::new(AtomicBool::new(false));
    let root = key(1);
    let mut engine = Engine::new(
        Box::new(GatedStore {
            inner: MemStore::new(),
            gate: Arc::clone(&gate),
            fail: Arc::clone(&fail),
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
    (handle, thread, gate, fail)
}

fn patient(family: &str) -> serde_json::Value {
    json!({"resourceType": "Patient", "name": [{"family": family}], "birthDate": "1990-01-01",
        "identifier": [{"system": "urn:test", "value": family}]})
}

#[test]
fn the_engine_goes_on_while_a_commit_runs_and_a_failed_commit_answers_its_writes() {
    let rt = runtime();
    let (handle, thread, gate, fail) = gated_node(&rt);
    rt.block_on(async {
        // A write whose commit is held at the gate, and will fail.
        set_gate(&gate, false);
        fail.store(true, Ordering::SeqCst);
        let writer = {
            let handle = handle.clone();
            tokio::spawn(async move { handle.create("Patient".into(), patient("Lost")).await })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!writer.is_finished(), "the write must wait for its commit");
        // The engine thread is not held with it: a command that writes nothing is answered.
        tokio::time::timeout(Duration::from_secs(2), handle.local_status())
            .await
            .expect("the engine thread waited for the commit")
            .unwrap();
        assert!(!writer.is_finished());
        // The commit fails: the write is answered with that failure, and nothing of it shows.
        set_gate(&gate, true);
        let lost = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the failed write was never answered")
            .unwrap();
        match lost {
            Err(HandleError::Engine(WriteError::Commit(e))) => {
                assert!(e.to_string().contains("disk is full"), "{e}");
            }
            other => panic!("a failed commit must fail its write: {other:?}"),
        }
        let hidden = handle
            .search(
                "Patient".into(),
                IdentifierQuery::Exact(fieldmesh_fhir_docs::IdentKey::new("urn:test", "Lost")),
            )
            .await
            .unwrap();
        assert!(hidden.is_empty());
        // Once the disk takes writes again, the next write is committed and answered.
        fail.store(false, Ordering::SeqCst);
        let kept = handle
            .create("Patient".into(), patient("Kept"))
            .await
            .unwrap();
        let read = handle
            .read_resource("Patient".into(), kept.id.clone())
            .await
            .unwrap();
        assert_eq!(read.resource["name"][0]["family"], "Kept");
        handle.stop().await;
    });
    thread.join().unwrap();
}

/// A commit held longer than the engine's idle delay: the idle ticks that come meanwhile must not
/// leave the write unanswered once its commit ends (no other command comes to wake the thread).
#[test]
fn a_write_whose_commit_outlasts_the_idle_delay_is_answered_when_it_ends() {
    let rt = runtime();
    let (handle, thread, gate, _) = gated_node(&rt);
    rt.block_on(async {
        set_gate(&gate, false);
        let writer = {
            let handle = handle.clone();
            tokio::spawn(async move { handle.create("Patient".into(), patient("Slow")).await })
        };
        // Idle ticks come every second; the engine counts as idle after two.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        assert!(!writer.is_finished(), "the write must wait for its commit");
        set_gate(&gate, true);
        let served = tokio::time::timeout(Duration::from_secs(3), writer)
            .await
            .expect("the write was not answered once its commit ended")
            .unwrap()
            .unwrap();
        let read = handle
            .read_resource("Patient".into(), served.id.clone())
            .await
            .unwrap();
        assert_eq!(read.resource["name"][0]["family"], "Slow");
        handle.stop().await;
    });
    thread.join().unwrap();
}

#[test]
fn reads_answer_while_a_write_waits_for_its_commit_and_never_show_it_early() {
    let rt = runtime();
    let (handle, thread, gate, _) = gated_node(&rt);
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
