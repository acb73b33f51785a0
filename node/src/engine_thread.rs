//! The engine on a thread of its own, behind a bounded channel, and reads beside it.
//!
//! HTTP handlers and sync sessions hold a cloneable [`EngineHandle`]. Writes (creates, updates,
//! merges of received documents) and the sync bookkeeping are commands to the engine thread, each
//! with a `oneshot` reply: the thread takes every command waiting (up to [`MAX_BATCH`]), runs them
//! in order, commits all their writes in one durable transaction, and only then replies (group
//! commit). The commit runs on a thread of its own ([`Engine::flush_behind`]) while this one goes
//! on with the next commands (a sync session's next batch is prepared while the last is
//! written); each reply waits for the commit of its writes ([`Engine::commit_ticket`]), and a
//! failed commit is the answer of every command whose writes it held. Reads and searches do not queue behind writes: they run on the runtime's blocking
//! pool against committed data ([`fieldmesh_engine::Reader`]), so they never wait for a batch and
//! never show a write that is not yet durable.
//!
//! After each commit the thread publishes what was stored ([`fieldmesh_engine::Stored`]) on a
//! broadcast channel (the network task schedules sessions from it), the store's last sequence and
//! this node's trust standing (for `/status`).

use std::thread;

use fieldmesh_engine::central::{Central, CentralError, NumberConfig, STEP_ENTRIES};
use fieldmesh_engine::{
    Engine, MergeError, MergeReport, Outcome, ReadError, Reader, Served, Source, Stored, SyncError,
    WriteError,
};
use fieldmesh_fhir_docs::IdentifierQuery;
use fieldmesh_fhir_docs::openimis::numbers::NumberKind;
use fieldmesh_protocol::{Checkpoint, DocPayload, Heads, Start};
use fieldmesh_storage::{Quarantined, Stats};
use fieldmesh_trust::PeerKey;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// Commands waiting for the engine thread, at most.
pub const COMMAND_QUEUE: usize = 1024;
/// Commands run between two commits, at most.
pub const MAX_BATCH: usize = 512;

/// How often the engine thread is woken to see whether it is idle.
const IDLE_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// After this long without a command (or work of central's services), the engine thread folds
/// the store's deferred index writes ([`Engine::fold_index`]), if there are at least
/// [`IDLE_FOLD_AT_LEAST`]: they wait in memory for the next fold otherwise, up to
/// `storage.index_fold_entries` of them.
const IDLE_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Deferred index writes an idle node folds, at least.
const IDLE_FOLD_AT_LEAST: usize = 4096;
/// Commits whose events a slow subscriber may lag behind before it is told it lagged.
pub const EVENT_QUEUE: usize = 256;

type Reply<T, E> = oneshot::Sender<Result<T, E>>;

enum Command {
    /// The idle tick ([`IDLE_TICK`]).
    Idle,
    Create {
        ty: String,
        body: Value,
        reply: Reply<Served, WriteError>,
    },
    Update {
        ty: String,
        id: String,
        body: Value,
        if_match: Option<String>,
        reply: Reply<(Served, Outcome), WriteError>,
    },
    SyncStart {
        peer: PeerKey,
        node: String,
        reply: Reply<Start, SyncError>,
    },
    RecordCheckpoint {
        peer: PeerKey,
        checkpoint: Checkpoint,
        reply: Reply<(), SyncError>,
    },
    Payloads {
        peer: PeerKey,
        ids: Vec<([u8; 16], Heads)>,
        reply: Reply<Vec<DocPayload>, SyncError>,
    },
    Merge {
        docs: Vec<DocPayload>,
        from: PeerKey,
        reply: Reply<MergeReport, MergeError>,
    },
    Outside {
        peer: PeerKey,
        theirs: Vec<([u8; 16], Heads)>,
        reply: Reply<Vec<([u8; 16], Heads, Heads)>, SyncError>,
    },
    Scope {
        reply: Reply<Value, SyncError>,
    },
    Local {
        reply: Reply<Value, CentralError>,
    },
    Reserve {
        kind: NumberKind,
        reply: Reply<Option<String>, ReadError>,
    },
    /// Commit what is waiting, reply, and end the thread.
    Stop,
}

/// The engine thread stopped (the node is shutting down or the thread failed).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the document engine has stopped")]
pub struct Stopped;

/// An operation through the handle failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError<E> {
    /// The engine refused or failed.
    #[error(transparent)]
    Engine(E),
    /// The engine thread is gone.
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

/// A handle on the engine thread, and reads beside it.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    reader: Reader,
    events: broadcast::Sender<Stored>,
    seq: watch::Receiver<u64>,
    trust: watch::Receiver<Value>,
    trust_state: watch::Receiver<std::sync::Arc<fieldmesh_trust::Trust>>,
    me: fieldmesh_trust::PublicKey,
}

impl EngineHandle {
    /// Starts the engine thread; on central, with central's services (`central`), which it
    /// runs whenever the store holds arrivals they have not processed and no command waits.
    pub fn spawn(
        engine: Engine,
        central: Services,
    ) -> std::io::Result<(Self, thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let (events, _) = broadcast::channel(EVENT_QUEUE);
        let last = engine.stats().map(|s| s.last_seq).unwrap_or_default();
        let (seq_tx, seq) = watch::channel(last);
        let (trust_tx, trust) = watch::channel(engine.trust_summary());
        let (state_tx, trust_state) = watch::channel(std::sync::Arc::new(engine.trust().clone()));
        let me = engine.identity().public();
        let reader = engine.reader();
        let publish = Publish {
            events: events.clone(),
            seq: seq_tx,
            trust: trust_tx,
            trust_state: state_tx,
        };
        let join = thread::Builder::new()
            .name("fieldmesh-engine".into())
            .spawn(move || run(engine, rx, publish, central))?;
        // The idle tick holds no sender between ticks: the queue still closes when every
        // handle is dropped, and the tick then ends.
        let weak = tx.downgrade();
        thread::Builder::new()
            .name("fieldmesh-idle".into())
            .spawn(move || {
                loop {
                    thread::sleep(IDLE_TICK);
                    match weak.upgrade() {
                        Some(tx) => {
                            // A full queue is a busy engine: nothing to tell it.
                            let _ = tx.try_send(Command::Idle);
                        }
                        None => break,
                    }
                }
            })?;
        Ok((
            Self {
                tx,
                reader,
                events,
                seq,
                trust,
                trust_state,
                me,
            },
            join,
        ))
    }

    async fn call<T, E>(
        &self,
        make: impl FnOnce(Reply<T, E>) -> Command,
    ) -> Result<T, HandleError<E>> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)?.map_err(HandleError::Engine)
    }

    /// Runs a read on the blocking pool.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Reader) -> Result<T, ReadError> + Send + 'static,
    ) -> Result<T, HandleError<ReadError>> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || f(&reader))
            .await
            .map_err(|_| Stopped)?
            .map_err(HandleError::Engine)
    }

    /// Creates a resource; answers once it is durable.
    pub async fn create(&self, ty: String, body: Value) -> Result<Served, HandleError<WriteError>> {
        self.call(|reply| Command::Create { ty, body, reply }).await
    }

    /// Updates a resource; answers once it is durable.
    pub async fn update(
        &self,
        ty: String,
        id: String,
        body: Value,
        if_match: Option<String>,
    ) -> Result<(Served, Outcome), HandleError<WriteError>> {
        self.call(|reply| Command::Update {
            ty,
            id,
            body,
            if_match,
            reply,
        })
        .await
    }

    /// Reads a resource (committed data).
    pub async fn read_resource(
        &self,
        ty: String,
        id: String,
    ) -> Result<Served, HandleError<ReadError>> {
        self.read(move |r| r.read(&ty, &id)).await
    }

    /// The versions of a resource, newest first.
    pub async fn history(
        &self,
        ty: String,
        id: String,
        limit: usize,
    ) -> Result<Vec<Served>, HandleError<ReadError>> {
        self.read(move |r| r.history(&ty, &id, limit)).await
    }

    /// One version of a resource.
    pub async fn version(
        &self,
        ty: String,
        id: String,
        vid: String,
    ) -> Result<Served, HandleError<ReadError>> {
        self.read(move |r| r.version(&ty, &id, &vid)).await
    }

    /// The saved Automerge document of a resource.
    pub async fn automerge(
        &self,
        ty: String,
        id: String,
    ) -> Result<Vec<u8>, HandleError<ReadError>> {
        self.read(move |r| r.automerge_bytes(&ty, &id)).await
    }

    /// Searches by identifier.
    pub async fn search(
        &self,
        ty: String,
        query: IdentifierQuery,
    ) -> Result<Vec<Served>, HandleError<ReadError>> {
        self.read(move |r| r.search_identifier(&ty, &query)).await
    }

    /// Searches by reference: resources of `ty` whose `param` points at `target_ty/target_id`.
    pub async fn search_reference(
        &self,
        ty: String,
        param: String,
        target_ty: String,
        target_id: String,
    ) -> Result<Vec<Served>, HandleError<ReadError>> {
        self.read(move |r| r.search_reference(&ty, &param, &target_ty, &target_id))
            .await
    }

    /// Store counters (committed state).
    pub async fn stats(&self) -> Result<Stats, HandleError<ReadError>> {
        self.read(|r| Ok(r.stats()?)).await
    }

    /// Up to `limit` quarantined changes, oldest first.
    pub async fn quarantined(
        &self,
        limit: usize,
    ) -> Result<Vec<Quarantined>, HandleError<ReadError>> {
        self.read(move |r| Ok(r.quarantined(limit)?)).await
    }

    /// What this node's certificates say about it (for `/status`), as of the last commit.
    pub fn trust_summary(&self) -> Value {
        self.trust.borrow().clone()
    }

    /// Whether this node serves `peer` now (see [`fieldmesh_trust::Trust::serves`]), as of the
    /// last commit, by the system clock: what the relay asks before carrying a peer's traffic.
    pub fn serves(&self, peer: &fieldmesh_trust::PublicKey) -> bool {
        self.trust_state
            .borrow()
            .serves(&self.me, peer, fieldmesh_engine::now())
    }

    /// The store's last durable log sequence.
    pub fn last_seq(&self) -> u64 {
        *self.seq.borrow()
    }

    /// What is stored from now on, by source, once durable.
    pub fn subscribe(&self) -> broadcast::Receiver<Stored> {
        self.events.subscribe()
    }

    /// What a session with `peer` starts from.
    pub async fn sync_start(
        &self,
        peer: PeerKey,
        node: String,
    ) -> Result<Start, HandleError<SyncError>> {
        self.call(|reply| Command::SyncStart { peer, node, reply })
            .await
    }

    /// Records the checkpoint of a completed session (after every merge before it is durable).
    pub async fn record_checkpoint(
        &self,
        peer: PeerKey,
        checkpoint: Checkpoint,
    ) -> Result<(), HandleError<SyncError>> {
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
        peer: PeerKey,
        ids: Vec<([u8; 16], Heads)>,
    ) -> Result<Vec<DocPayload>, HandleError<SyncError>> {
        self.call(|reply| Command::Payloads { peer, ids, reply })
            .await
    }

    /// Of documents `peer` announced as outside this node's scope, those held here with other
    /// heads; drops those held with the same heads when the peer keeps them (central, a hub).
    pub async fn outside(
        &self,
        peer: PeerKey,
        theirs: Vec<([u8; 16], Heads)>,
    ) -> Result<Vec<([u8; 16], Heads, Heads)>, HandleError<SyncError>> {
        self.call(|reply| Command::Outside {
            peer,
            theirs,
            reply,
        })
        .await
    }

    /// What this node holds by its scope, and what waits outside it (for `/status`).
    pub async fn scope(&self) -> Result<Value, HandleError<SyncError>> {
        self.call(|reply| Command::Scope { reply }).await
    }

    /// This node's own figures for `/status`: its flagged resources, the numbers left in its
    /// leases and, on central, what central's services did.
    pub async fn local_status(&self) -> Result<Value, HandleError<CentralError>> {
        self.call(|reply| Command::Local { reply }).await
    }

    /// Takes the next number of `kind` from this device's leases; answers once it is durably
    /// marked used (`None`: no lease holds one left).
    pub async fn reserve(
        &self,
        kind: NumberKind,
    ) -> Result<Option<String>, HandleError<ReadError>> {
        self.call(|reply| Command::Reserve { kind, reply }).await
    }

    /// Queues a merge of documents from a peer now, in the order of the calls, and returns
    /// what waits for its answer (once durable). A session's frames are merged in the order they
    /// came: a batch carrying locations before one carrying what lies there.
    pub async fn queue_merge(
        &self,
        docs: Vec<DocPayload>,
        from: PeerKey,
    ) -> Result<
        impl std::future::Future<Output = Result<MergeReport, HandleError<MergeError>>> + Send + 'static,
        HandleError<MergeError>,
    > {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Merge { docs, from, reply })
            .await
            .map_err(|_| Stopped)?;
        Ok(async move { rx.await.map_err(|_| Stopped)?.map_err(HandleError::Engine) })
    }

    /// Asks the engine thread to commit what is waiting and end; commands sent after this fail.
    pub async fn stop(&self) {
        let _ = self.tx.send(Command::Stop).await;
    }
}

/// What the engine thread publishes after each commit.
struct Publish {
    events: broadcast::Sender<Stored>,
    seq: watch::Sender<u64>,
    trust: watch::Sender<Value>,
    trust_state: watch::Sender<std::sync::Arc<fieldmesh_trust::Trust>>,
}

/// A reply to send after the commit: sent as is if the commit succeeded, as the commit's
/// failure otherwise.
enum Deferred {
    Served(Reply<Served, WriteError>, Result<Served, WriteError>),
    Updated(
        Reply<(Served, Outcome), WriteError>,
        Result<(Served, Outcome), WriteError>,
    ),
    Merged(
        Reply<MergeReport, MergeError>,
        Result<MergeReport, MergeError>,
    ),
    Reserved(
        Reply<Option<String>, ReadError>,
        Result<Option<String>, ReadError>,
    ),
}

impl Deferred {
    /// Sends the reply, now that `committed` tells how the commit of its writes ended.
    fn answer(self, committed: &Result<(), fieldmesh_engine::CommitError>) {
        match self {
            Deferred::Served(reply, r) => send_after(reply, r, committed, WriteError::Commit),
            Deferred::Updated(reply, r) => send_after(reply, r, committed, WriteError::Commit),
            Deferred::Merged(reply, r) => send_after(reply, r, committed, MergeError::Commit),
            Deferred::Reserved(reply, r) => send_after(reply, r, committed, ReadError::Commit),
        }
    }
}

/// Sends `r`, or the commit's failure (as `failed` makes it) when `r` succeeded but its writes
/// were not committed.
fn send_after<T, E>(
    reply: Reply<T, E>,
    r: Result<T, E>,
    committed: &Result<(), fieldmesh_engine::CommitError>,
    failed: fn(fieldmesh_engine::CommitError) -> E,
) {
    let r = match committed {
        Ok(()) => r,
        Err(e) => r.and(Err(failed(e.clone()))),
    };
    let _ = reply.send(r);
}

/// Replies waiting for the commit that makes their writes durable, oldest first, each with the
/// number of that commit ([`Engine::commit_ticket`]).
type Awaiting = std::collections::VecDeque<(u64, Deferred)>;

/// Sends every waiting reply whose commit has ended, then publishes what was stored.
fn answer_settled(engine: &mut Engine, awaiting: &mut Awaiting, publish: &Publish) {
    let mut failed = None;
    while let Some((ticket, _)) = awaiting.front() {
        let ticket = *ticket;
        let Some(outcome) = engine.commit_outcome(ticket) else {
            break;
        };
        if let Err(e) = &outcome
            && failed != Some(ticket)
        {
            tracing::error!(error = %e, "a commit failed; its writes were not acknowledged");
            failed = Some(ticket);
        }
        if let Some((_, d)) = awaiting.pop_front() {
            d.answer(&outcome);
        }
    }
    publish_after_commit(engine, publish);
}

/// How long the engine thread sleeps between two looks at a background commit that has not
/// ended, when no command waits.
const COMMIT_POLL: std::time::Duration = std::time::Duration::from_micros(200);

/// Central's services as the engine thread holds them.
pub enum Services {
    /// Not central: no services.
    None,
    /// Central's services, running.
    Running(Box<Central>),
    /// A node configured as central that does not hold its central certificate (a store
    /// salvaged afresh): the services start once the certificate comes back from a peer.
    Waiting(NumberConfig),
}

fn run(mut engine: Engine, mut rx: mpsc::Receiver<Command>, publish: Publish, services: Services) {
    let (mut central, mut waiting) = match services {
        Services::None => (None, None),
        Services::Running(c) => (Some(*c), None),
        Services::Waiting(config) => (None, Some(config)),
    };
    let mut stop = false;
    // Central's services wait for the next command after a failed step (no hot loop).
    let mut central_failed = false;
    let mut busy = std::time::Instant::now();
    let mut awaiting = Awaiting::new();
    while !stop {
        let work = !central_failed && central.as_ref().is_some_and(|c| c.has_work(&engine));
        if work {
            busy = std::time::Instant::now();
        }
        let first = if engine.committing_behind() && !work {
            // A commit runs behind: take the next command as soon as it comes, and answer what
            // waits for the commit as soon as it ends.
            match rx.try_recv() {
                Ok(cmd) => Some(cmd),
                Err(mpsc::error::TryRecvError::Empty) => {
                    if engine.behind_ended() {
                        // Its failure, if any, goes to the replies that wait for it.
                        let _ = engine.settle_behind();
                        answer_settled(&mut engine, &mut awaiting, &publish);
                    } else {
                        thread::sleep(COMMIT_POLL);
                    }
                    continue;
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        } else if work {
            match rx.try_recv() {
                Ok(cmd) => Some(cmd),
                Err(mpsc::error::TryRecvError::Empty) => None,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        } else {
            match rx.blocking_recv() {
                Some(cmd) => Some(cmd),
                None => break,
            }
        };
        if let Some(Command::Idle) = first {
            // Not while a commit runs: the fold would wait for it, and the replies waiting for
            // that commit are answered by the loop above.
            if !work && !engine.committing_behind() && rx.is_empty() && busy.elapsed() >= IDLE_AFTER
            {
                fold_when_idle(&mut engine, &publish);
                answer_settled(&mut engine, &mut awaiting, &publish);
            }
            continue;
        }
        if let Some(first) = first {
            busy = std::time::Instant::now();
            central_failed = false;
            stop = run_batch(
                &mut engine,
                &mut rx,
                &publish,
                first,
                central.as_ref(),
                &mut awaiting,
            );
            if let Some(config) = waiting.take() {
                central = start_services(&mut engine, config, &mut waiting);
            }
        }
        if !stop && let Some(c) = central.as_mut() {
            central_failed = !central_step(&mut engine, c, &publish);
            answer_settled(&mut engine, &mut awaiting, &publish);
        }
    }
    if let Err(e) = engine.flush() {
        tracing::error!(error = %e, "final commit failed");
    }
    answer_settled(&mut engine, &mut awaiting, &publish);
}

/// Folds the store's deferred index writes while nothing else is asked of the engine.
fn fold_when_idle(engine: &mut Engine, publish: &Publish) {
    let started = std::time::Instant::now();
    match engine.fold_index(IDLE_FOLD_AT_LEAST) {
        Ok(0) => {}
        Ok(entries) => {
            release_freed_memory();
            tracing::debug!(
                entries,
                ms = started.elapsed().as_millis() as u64,
                "folded the deferred index writes while idle"
            );
        }
        Err(e) => tracing::warn!(error = %e, "could not fold the deferred index writes while idle"),
    }
    publish_after_commit(engine, publish);
}

/// What gives the memory freed so far back to the system ([`set_release_memory`]).
static RELEASE_MEMORY: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets what gives freed memory back to the system once the node is idle: the binary's
/// allocator knows how (mimalloc gives freed pages back only as it allocates and frees again,
/// which an idle node does not; after the idle fold freed the deferred writes held in memory,
/// tens of MB after a load or a sync, the node kept them resident until its next burst of
/// work). Set once; later calls change nothing.
pub fn set_release_memory(release: fn()) {
    let _ = RELEASE_MEMORY.set(release);
}

fn release_freed_memory() {
    if let Some(release) = RELEASE_MEMORY.get() {
        release();
    }
}

/// Opens central's services once this node holds its central certificate again; until then
/// puts `config` back in `waiting`.
fn start_services(
    engine: &mut Engine,
    config: NumberConfig,
    waiting: &mut Option<NumberConfig>,
) -> Option<Central> {
    match Central::open(engine, config.clone()) {
        Ok(c) => {
            tracing::info!(
                "this node holds its central certificate again: central's services start"
            );
            Some(c)
        }
        Err(CentralError::NotCentral) => {
            *waiting = Some(config);
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "central's services could not start");
            None
        }
    }
}

/// One step of central's services, committed and published; false if it failed.
fn central_step(engine: &mut Engine, central: &mut Central, publish: &Publish) -> bool {
    let report = central.step(engine, STEP_ENTRIES);
    // While the log holds more, the commit runs beside the next step (which waits for it
    // before its own); the last one is committed at once, so that its edits sync now.
    let more = report.as_ref().is_ok_and(|r| r.more);
    let committed = if more {
        engine.flush_behind().map(|()| 0)
    } else {
        engine.flush()
    };
    publish_after_commit(engine, publish);
    match (report, committed) {
        (Ok(r), Ok(_)) => {
            if r.edited > 0 || r.leases > 0 {
                tracing::info!(
                    read = r.read,
                    edited = r.edited,
                    canonical = r.canonical,
                    leases = r.leases,
                    "central's services"
                );
            }
            true
        }
        (Err(e), _) => {
            tracing::error!(error = %e, "central's services failed; they try again after the next command");
            false
        }
        (_, Err(e)) => {
            tracing::error!(error = %e, "central's services could not commit; they try again after the next command");
            false
        }
    }
}

/// Runs `first` and every command waiting behind it (up to [`MAX_BATCH`]), then starts
/// committing their writes in one transaction behind the engine's back ([`Engine::flush_behind`]).
/// A reply is sent once the commit of its writes has ended, here or later ([`answer_settled`]):
/// the thread meanwhile goes on with the next commands, so that a sync session's next batch is
/// prepared while the last one is written. Returns whether a stop was asked.
fn run_batch(
    engine: &mut Engine,
    rx: &mut mpsc::Receiver<Command>,
    publish: &Publish,
    first: Command,
    central: Option<&Central>,
    awaiting: &mut Awaiting,
) -> bool {
    let mut stop = false;
    let mut deferred = Vec::new();
    let mut next = Some(first);
    let mut taken = 0;
    while let Some(cmd) = next.take() {
        if matches!(cmd, Command::Stop) {
            stop = true;
            break;
        }
        execute(engine, cmd, &mut deferred, central);
        // Its writes are durable once the commit that takes what is staged now has ended (a
        // merge starts its own commit; earlier ones have then ended).
        let ticket = engine.commit_ticket();
        awaiting.extend(deferred.drain(..).map(|d| (ticket, d)));
        answer_settled(engine, awaiting, publish);
        taken += 1;
        if taken < MAX_BATCH {
            next = rx.try_recv().ok();
        }
    }
    let written = engine.pending();
    let committed = if stop {
        engine.flush().map(|_| ())
    } else {
        engine.flush_behind()
    };
    if written > 0 {
        tracing::debug!(
            writes = written,
            commands = taken,
            ok = committed.is_ok(),
            "committing"
        );
    }
    if committed.is_err() && engine.pending() > 0 {
        // The commit behind failed before this one could start: commit what is staged now.
        let _ = engine.flush();
    }
    answer_settled(engine, awaiting, publish);
    stop
}

fn publish_after_commit(engine: &mut Engine, publish: &Publish) {
    let events = engine.take_events();
    if events.is_empty() {
        return;
    }
    if let Some(max) = events.iter().map(|e| e.seq).max() {
        publish.seq.send_if_modified(|s| {
            let newer = max > *s;
            *s = (*s).max(max);
            newer
        });
    }
    if events.iter().any(|e| {
        e.docs
            .iter()
            .any(|(_, ty)| ty == "Basic" || ty == "AuditEvent")
    }) {
        let _ = publish.trust.send(engine.trust_summary());
        let _ = publish
            .trust_state
            .send(std::sync::Arc::new(engine.trust().clone()));
    }
    for e in events {
        // No subscriber is not an error: nothing is listening yet.
        let _ = publish.events.send(e);
    }
}

fn execute(
    engine: &mut Engine,
    cmd: Command,
    deferred: &mut Vec<Deferred>,
    central: Option<&Central>,
) {
    match cmd {
        Command::Idle => {}
        Command::Create { ty, body, reply } => {
            let r = engine
                .create(body, Some(&ty), false, &|_| None)
                .and_then(|id| served(engine, &ty, &id.to_string()))
                .map(|mut s| {
                    // A claim is answered with its ClaimResponse, as openIMIS answers it.
                    if let Some(answer) = engine.take_claim_answer() {
                        s.resource = answer;
                    }
                    s
                });
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
                .and_then(|(doc, outcome)| Ok((served(engine, &ty, &doc.to_string())?, outcome)));
            deferred.push(Deferred::Updated(reply, r));
        }
        Command::SyncStart { peer, node, reply } => {
            let _ = reply.send(engine.sync_start(&peer, &node));
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
        Command::Outside {
            peer,
            theirs,
            reply,
        } => {
            let _ = reply.send(engine.outside_check(&peer, &theirs));
        }
        Command::Scope { reply } => {
            let _ = reply.send(engine.scope_report().map(|r| r.to_json()));
        }
        Command::Local { reply } => {
            let _ = reply.send(local_status(engine, central));
        }
        Command::Reserve { kind, reply } => {
            deferred.push(Deferred::Reserved(reply, engine.take_leased_number(kind)));
        }
        Command::Merge { docs, from, reply } => {
            deferred.push(Deferred::Merged(
                reply,
                engine.merge(docs, &Source::Peer(from)),
            ));
        }
        Command::Stop => {}
    }
}

/// This node's flagged resources, the numbers left in its leases and, on central, the figures
/// of central's services.
fn local_status(engine: &mut Engine, central: Option<&Central>) -> Result<Value, CentralError> {
    let mut out = serde_json::json!({
        "flagged": engine.flagged()?,
        "leased_numbers_left": engine.leased_numbers_left()?,
    });
    if let Some(c) = central {
        out["central"] = c.status(engine);
    }
    Ok(out)
}

/// The resource as written, for the reply.
/// The answer to a write: the resource as stored, with what the write should tell its client.
fn served(engine: &mut Engine, ty: &str, id: &str) -> Result<Served, WriteError> {
    let mut s = engine.served(ty, id)?;
    s.notes = engine.take_notes();
    Ok(s)
}
