//! The engine on a thread of its own, behind a bounded channel.
//!
//! HTTP handlers and other tasks hold a cloneable [`DocsHandle`]; each call sends a command with a
//! `oneshot` reply sender. The thread takes every command waiting (up to [`MAX_BATCH`]), runs them
//! in order, commits all their writes in one durable transaction, and only then replies. Under load,
//! many writes share one `fsync`; when idle, a lone write is committed at once.

use std::thread;

use fieldmesh_fhir_docs::IdentifierQuery;
use fieldmesh_storage::Stats;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::engine::{Engine, EngineError, Outcome, Served, SyncStart};

/// Commands waiting for the engine thread, at most.
pub const COMMAND_QUEUE: usize = 1024;
/// Commands run between two commits, at most.
pub const MAX_BATCH: usize = 512;

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

enum Command {
    Create {
        ty: String,
        body: Value,
        reply: Reply<Served>,
    },
    Update {
        ty: String,
        id: String,
        body: Value,
        if_match: Option<String>,
        reply: Reply<(Served, Outcome)>,
    },
    Read {
        ty: String,
        id: String,
        reply: Reply<Served>,
    },
    Automerge {
        ty: String,
        id: String,
        reply: Reply<Vec<u8>>,
    },
    Search {
        ty: String,
        query: IdentifierQuery,
        reply: Reply<Vec<Served>>,
    },
    Stats {
        reply: Reply<Stats>,
    },
    TrustSummary {
        reply: Reply<Value>,
    },
    SyncStart {
        peer: String,
        reply: Reply<SyncStart>,
    },
    RecordCheckpoint {
        peer: String,
        checkpoint: fieldmesh_protocol::Checkpoint,
        reply: Reply<()>,
    },
    Payloads {
        peer: String,
        ids: Vec<([u8; 16], fieldmesh_protocol::Heads)>,
        reply: Reply<Vec<fieldmesh_protocol::DocPayload>>,
    },
    Quarantined {
        limit: usize,
        reply: Reply<Vec<fieldmesh_storage::Quarantined>>,
    },
    Merge {
        docs: Vec<fieldmesh_protocol::DocPayload>,
        from: String,
        reply: Reply<(usize, usize)>,
    },
    /// Commit what is waiting, reply, and end the thread.
    Stop,
}

/// A handle on the engine thread.
#[derive(Clone)]
pub struct DocsHandle {
    tx: mpsc::Sender<Command>,
}

/// The engine thread stopped (the node is shutting down or the thread failed).
fn gone() -> EngineError {
    EngineError::Document("the document engine has stopped".into())
}

impl DocsHandle {
    /// Starts the engine thread.
    pub fn spawn(engine: Engine) -> std::io::Result<(Self, thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let join = thread::Builder::new()
            .name("fieldmesh-docs".into())
            .spawn(move || run(engine, rx))?;
        Ok((Self { tx }, join))
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Creates a resource; answers once it is durable.
    pub async fn create(&self, ty: String, body: Value) -> Result<Served, EngineError> {
        self.call(|reply| Command::Create { ty, body, reply }).await
    }
    /// Updates a resource; answers once it is durable.
    pub async fn update(
        &self,
        ty: String,
        id: String,
        body: Value,
        if_match: Option<String>,
    ) -> Result<(Served, Outcome), EngineError> {
        self.call(|reply| Command::Update {
            ty,
            id,
            body,
            if_match,
            reply,
        })
        .await
    }
    /// Reads a resource.
    pub async fn read(&self, ty: String, id: String) -> Result<Served, EngineError> {
        self.call(|reply| Command::Read { ty, id, reply }).await
    }
    /// The saved Automerge document of a resource.
    pub async fn automerge(&self, ty: String, id: String) -> Result<Vec<u8>, EngineError> {
        self.call(|reply| Command::Automerge { ty, id, reply })
            .await
    }
    /// Searches by identifier.
    pub async fn search(
        &self,
        ty: String,
        query: IdentifierQuery,
    ) -> Result<Vec<Served>, EngineError> {
        self.call(|reply| Command::Search { ty, query, reply })
            .await
    }
    /// Store counters.
    pub async fn stats(&self) -> Result<Stats, EngineError> {
        self.call(|reply| Command::Stats { reply }).await
    }
    /// What this node's certificates say about it (for `/status`).
    pub async fn trust_summary(&self) -> Result<Value, EngineError> {
        self.call(|reply| Command::TrustSummary { reply }).await
    }
    /// What a session with `peer` starts from: store id, log position, checkpoint, documents.
    pub async fn sync_start(&self, peer: String) -> Result<SyncStart, EngineError> {
        self.call(|reply| Command::SyncStart { peer, reply }).await
    }
    /// Records the checkpoint of a completed session (after every merge before it is durable).
    pub async fn record_checkpoint(
        &self,
        peer: String,
        checkpoint: fieldmesh_protocol::Checkpoint,
    ) -> Result<(), EngineError> {
        self.call(|reply| Command::RecordCheckpoint {
            peer,
            checkpoint,
            reply,
        })
        .await
    }
    /// Documents to send to a peer, each after the heads the peer holds (whole if none).
    pub async fn payloads(
        &self,
        peer: String,
        ids: Vec<([u8; 16], fieldmesh_protocol::Heads)>,
    ) -> Result<Vec<fieldmesh_protocol::DocPayload>, EngineError> {
        self.call(|reply| Command::Payloads { peer, ids, reply })
            .await
    }
    /// Up to `limit` quarantined changes, oldest first.
    pub async fn quarantined(
        &self,
        limit: usize,
    ) -> Result<Vec<fieldmesh_storage::Quarantined>, EngineError> {
        self.call(|reply| Command::Quarantined { limit, reply })
            .await
    }
    /// Asks the engine thread to commit what is waiting and end; commands sent after this fail.
    pub async fn stop(&self) {
        let _ = self.tx.send(Command::Stop).await;
    }
    /// Merges documents from a peer (durable when this returns): (changed, refused).
    pub async fn merge(
        &self,
        docs: Vec<fieldmesh_protocol::DocPayload>,
        from: String,
    ) -> Result<(usize, usize), EngineError> {
        self.call(|reply| Command::Merge { docs, from, reply })
            .await
    }
}

/// A reply to send after the commit, and whether it waits for the commit to succeed.
enum Deferred {
    Served(Reply<Served>, Result<Served, EngineError>),
    Updated(
        Reply<(Served, Outcome)>,
        Result<(Served, Outcome), EngineError>,
    ),
    Merged(Reply<(usize, usize)>, Result<(usize, usize), EngineError>),
}

fn run(mut engine: Engine, mut rx: mpsc::Receiver<Command>) {
    let mut stop = false;
    while !stop {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        let mut deferred = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(cmd) = next.take() {
            if matches!(cmd, Command::Stop) {
                stop = true;
                break;
            }
            execute(&mut engine, cmd, &mut deferred);
            taken += 1;
            if taken < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        let written = engine.pending();
        let committed = engine.flush();
        if written > 0 {
            tracing::debug!(
                writes = written,
                commands = taken,
                ok = committed.is_ok(),
                "committed"
            );
        }
        let failure = committed.err().map(|e| e.to_string());
        let not_saved =
            |msg: &String| EngineError::Document(format!("the write was not saved: {msg}"));
        for d in deferred {
            match (d, &failure) {
                (Deferred::Served(reply, r), None) => {
                    let _ = reply.send(r);
                }
                (Deferred::Served(reply, r), Some(msg)) => {
                    let _ = reply.send(r.and(Err(not_saved(msg))));
                }
                (Deferred::Updated(reply, r), None) => {
                    let _ = reply.send(r);
                }
                (Deferred::Updated(reply, r), Some(msg)) => {
                    let _ = reply.send(r.and(Err(not_saved(msg))));
                }
                (Deferred::Merged(reply, r), None) => {
                    let _ = reply.send(r);
                }
                (Deferred::Merged(reply, r), Some(msg)) => {
                    let _ = reply.send(r.and(Err(not_saved(msg))));
                }
            }
        }
        if let Some(msg) = failure {
            tracing::error!(error = %msg, "a commit failed; its writes were not acknowledged");
        }
    }
    if let Err(e) = engine.flush() {
        tracing::error!(error = %e, "final commit failed");
    }
}

fn execute(engine: &mut Engine, cmd: Command, deferred: &mut Vec<Deferred>) {
    match cmd {
        Command::Create { ty, body, reply } => {
            let r = engine
                .create(body, Some(&ty), false, &|_| None)
                .and_then(|id| engine.read(&ty, &id.to_string()));
            deferred.push(Deferred::Served(reply, r));
        }
        Command::Update {
            ty,
            id,
            body,
            if_match,
            reply,
        } => {
            let r = engine
                .update(&ty, &id, body, if_match.as_deref())
                .and_then(|(doc, outcome)| Ok((engine.read(&ty, &doc.to_string())?, outcome)));
            deferred.push(Deferred::Updated(reply, r));
        }
        Command::Read { ty, id, reply } => {
            let _ = reply.send(engine.read(&ty, &id));
        }
        Command::Automerge { ty, id, reply } => {
            let _ = reply.send(engine.automerge_bytes(&ty, &id));
        }
        Command::Search { ty, query, reply } => {
            let _ = reply.send(engine.search_identifier(&ty, &query));
        }
        Command::Stats { reply } => {
            let _ = reply.send(engine.stats());
        }
        Command::TrustSummary { reply } => {
            let _ = reply.send(Ok(engine.trust_summary()));
        }
        Command::SyncStart { peer, reply } => {
            let _ = reply.send(engine.sync_start(&peer));
        }
        Command::RecordCheckpoint {
            peer,
            checkpoint,
            reply,
        } => {
            let _ = reply.send(engine.record_checkpoint(&peer, &checkpoint));
        }
        Command::Payloads { peer, ids, reply } => {
            let _ = reply.send(engine.payloads(&peer, &ids));
        }
        Command::Quarantined { limit, reply } => {
            let _ = reply.send(engine.store().quarantined(limit).map_err(EngineError::from));
        }
        Command::Merge { docs, from, reply } => {
            deferred.push(Deferred::Merged(reply, engine.merge(docs, &from)));
        }
        Command::Stop => {}
    }
}
