//! The libp2p side of a node: one task owns the `Swarm`; sync sessions run as tasks on streams.
//!
//! Transport: TCP with Noise and Yamux, and QUIC; identify and ping (so any libp2p implementation
//! can connect, identify and ping the node); mDNS discovery on the LAN (off with `--no-mdns`);
//! explicit peers dialled and re-dialled with backoff. Hubs and central run a circuit relay (v2)
//! server; every node is a relay client (it can listen through a hub with a `/p2p-circuit`
//! address and dial peers that do) and upgrades relayed connections to direct ones with DCUtR
//! when the NATs allow. Sync: a session of [`fieldmesh_protocol`] on a stream
//! of protocol [`PROTOCOL_ID`], frames prefixed by their length (checked against
//! [`fieldmesh_protocol::MAX_FRAME`] before anything is allocated).
//!
//! When to sync: on every new connection (the peer with the lower id initiates), after a local
//! write, and after a session brought documents in (towards every *other* connected peer, which
//! is how a hub passes a phone's change on to phones that never met it). At most one session per
//! peer runs at a time; a request during a session runs another one after it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use fieldmesh_protocol::{
    Action, Local, MAX_FRAME, PROTOCOL_ID, Role, Session, decode, encode, pack,
};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, dcutr, identify, mdns, noise, ping, relay, tcp, yamux,
};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::docs::DocsHandle;

/// Sync requests waiting for the network task, at most.
pub const CHANGE_QUEUE: usize = 64;
/// Documents fetched from the store per batch when sending.
const SEND_BATCH: usize = 256;

/// Network settings of `fieldmesh run`.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial and keep dialling.
    pub peers: Vec<Multiaddr>,
    /// LAN discovery.
    pub mdns: bool,
    /// Relay circuits for devices behind NAT (hubs and central).
    pub relay_server: bool,
}

/// Relay circuits of a hub: sync sessions are long, so circuits get more room than the libp2p
/// defaults (2 minutes, 128 KiB).
fn relay_config() -> relay::Config {
    relay::Config {
        max_circuit_duration: Duration::from_secs(3600),
        max_circuit_bytes: 1 << 30,
        ..relay::Config::default()
    }
}

/// What `/status` shows of one peer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerInfo {
    /// Whether a connection is open now.
    pub connected: bool,
    /// Unix time of the last completed session.
    pub last_sync: Option<i64>,
    /// Sessions completed.
    pub sessions: u64,
    /// Documents sent to the peer.
    pub docs_sent: u64,
    /// Documents received from it.
    pub docs_received: u64,
    /// Bytes sent on sync streams.
    pub bytes_sent: u64,
    /// Bytes received on sync streams.
    pub bytes_received: u64,
    /// How the last session found the differences: `checkpoint` (the fast path of peers that
    /// synced before) or `reconciliation` (first contact, or a checkpoint one side lost).
    pub last_path: Option<&'static str>,
    /// The last session error, if the last session failed.
    pub last_error: Option<String>,
}

/// Peers by peer id, shared with the HTTP API.
pub type PeerTable = Arc<Mutex<BTreeMap<String, PeerInfo>>>;

/// Why a sync is wanted: a local write (`None`) or documents that came from a peer.
pub type ChangeSender = mpsc::Sender<Option<PeerId>>;

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    relay: Toggle<relay::Behaviour>,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    stream: libp2p_stream::Behaviour,
}

struct Outcome {
    peer: PeerId,
    /// Whether the peer opened the session.
    inbound: bool,
    result: Result<SessionTotals>,
}

#[derive(Default)]
struct SessionTotals {
    docs_sent: u64,
    docs_received: u64,
    bytes_sent: u64,
    bytes_received: u64,
    changed: usize,
    fast: bool,
    /// The peer had no valid certificate when the session started: it was offered only
    /// certificates and revocations, and no checkpoint was recorded.
    restricted: bool,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn protocol() -> StreamProtocol {
    StreamProtocol::new(PROTOCOL_ID)
}

async fn write_frame(w: &mut (impl AsyncWriteExt + Unpin), frame: &[u8]) -> Result<u64> {
    let len = u32::try_from(frame.len()).context("frame too large")?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(frame).await?;
    Ok(frame.len() as u64 + 4)
}

async fn read_frame(r: &mut (impl AsyncReadExt + Unpin)) -> Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .await
        .context("the peer closed the stream")?;
    let len = u32::from_be_bytes(len) as usize;
    anyhow::ensure!(
        len <= MAX_FRAME,
        "the peer sent a {len}-byte frame (limit {MAX_FRAME})"
    );
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)
        .await
        .context("the peer closed the stream mid-frame")?;
    Ok(buf)
}

/// Received batches being merged at once, at most.
const MERGES_IN_FLIGHT: usize = 2;

/// Takes the result of one merge into the session's totals.
fn settle(
    joined: Result<Result<(usize, usize), crate::engine::EngineError>, tokio::task::JoinError>,
    totals: &mut SessionTotals,
) -> Result<()> {
    let (changed, refused) = joined.context("a merge task failed")??;
    totals.changed += changed;
    if refused > 0 {
        tracing::warn!(refused, "documents refused in a sync session");
    }
    Ok(())
}

/// Runs one session on `stream`.
async fn drive(
    stream: libp2p::Stream,
    peer: PeerId,
    role: Role,
    name: String,
    docs: DocsHandle,
) -> Result<SessionTotals> {
    let start = docs.sync_start(peer.to_string()).await?;
    let local = Local {
        node: name,
        store: start.store,
        seq: start.seq,
        checkpoint: start.checkpoint,
    };
    let mut session = Session::new(role, local, start.items)?;
    let (mut r, mut w) = stream.split();
    let mut totals = SessionTotals {
        restricted: start.restricted,
        ..SessionTotals::default()
    };
    // Received batches merge while the next ones are read and decoded; at most
    // `MERGES_IN_FLIGHT` wait, and all have finished (durably) before the session ends.
    let mut merging: std::collections::VecDeque<tokio::task::JoinHandle<_>> =
        std::collections::VecDeque::new();
    let mut actions = session.start()?;
    loop {
        for action in std::mem::take(&mut actions) {
            match action {
                Action::Send(m) => totals.bytes_sent += write_frame(&mut w, &encode(&m)).await?,
                Action::SendDocs(ids) => {
                    for chunk in ids.chunks(SEND_BATCH) {
                        let payloads = docs.payloads(peer.to_string(), chunk.to_vec()).await?;
                        totals.docs_sent += payloads.len() as u64;
                        for m in pack(payloads) {
                            totals.bytes_sent += write_frame(&mut w, &encode(&m)).await?;
                        }
                    }
                }
                Action::Apply(batch) => {
                    totals.docs_received += batch.len() as u64;
                    if merging.len() >= MERGES_IN_FLIGHT
                        && let Some(oldest) = merging.pop_front()
                    {
                        settle(oldest.await, &mut totals)?;
                    }
                    let docs = docs.clone();
                    let from = peer.to_string();
                    merging.push_back(tokio::spawn(async move { docs.merge(batch, from).await }));
                }
                Action::Finished => {
                    while let Some(next) = merging.pop_front() {
                        settle(next.await, &mut totals)?;
                    }
                    // Everything received is durable: from now on the peers can start from here.
                    if let Some(c) = session.checkpoint()
                        && !totals.restricted
                    {
                        docs.record_checkpoint(peer.to_string(), c).await?;
                    }
                    totals.fast = session.stats().fast;
                    w.flush().await?;
                    let _ = w.close().await;
                    return Ok(totals);
                }
            }
        }
        w.flush().await?;
        let frame = read_frame(&mut r).await?;
        totals.bytes_received += frame.len() as u64 + 4;
        actions = session.handle(decode(&frame)?)?;
    }
}

/// Runs the network until the process ends.
pub async fn run(
    keypair: libp2p::identity::Keypair,
    cfg: NetConfig,
    name: String,
    docs: DocsHandle,
    peers: PeerTable,
    changes_tx: ChangeSender,
    mut changes: mpsc::Receiver<Option<PeerId>>,
) -> Result<()> {
    let (mdns_on, relay_on) = (cfg.mdns, cfg.relay_server);
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)?
        .with_behaviour(|key, relay_client| {
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    key.public().to_peer_id(),
                )?)
            } else {
                None
            };
            Ok(Behaviour {
                identify: identify::Behaviour::new(identify::Config::new(
                    "/fieldmesh/1".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(ping::Config::new()),
                mdns: Toggle::from(mdns),
                relay: Toggle::from(
                    relay_on
                        .then(|| relay::Behaviour::new(key.public().to_peer_id(), relay_config())),
                ),
                relay_client,
                dcutr: dcutr::Behaviour::new(key.public().to_peer_id()),
                stream: libp2p_stream::Behaviour::new(),
            })
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
        .build();
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .with_context(|| format!("cannot listen on {addr}"))?;
    }
    let local = *swarm.local_peer_id();
    let mut control = swarm.behaviour().stream.new_control();
    let mut incoming = control
        .accept(protocol())
        .context("the sync protocol is registered twice")?;

    // Responder side: every inbound stream is a session, admitted by the loop below (at most
    // one session per pair of peers at a time).
    let (done_tx, mut done_rx) = mpsc::channel::<Outcome>(CHANGE_QUEUE);
    let (inbound_tx, mut inbound_rx) = mpsc::channel::<(PeerId, libp2p::Stream)>(CHANGE_QUEUE);
    tokio::spawn(async move {
        while let Some(s) = incoming.next().await {
            if inbound_tx.send(s).await.is_err() {
                break;
            }
        }
    });

    // Explicit peers: dial now and again with backoff while disconnected.
    let mut redial: Vec<(Multiaddr, tokio::time::Instant, Duration)> = cfg
        .peers
        .iter()
        .map(|a| {
            (
                a.clone(),
                tokio::time::Instant::now(),
                Duration::from_millis(500),
            )
        })
        .collect();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut connected: HashSet<PeerId> = HashSet::new();
    let mut running: HashSet<PeerId> = HashSet::new();
    let mut running_in: HashSet<PeerId> = HashSet::new();
    let mut again: HashSet<PeerId> = HashSet::new();
    let mut addr_peer: HashMap<Multiaddr, PeerId> = HashMap::new();

    let start_session = |peer: PeerId,
                         running: &mut HashSet<PeerId>,
                         running_in: &HashSet<PeerId>,
                         again: &mut HashSet<PeerId>| {
        if running_in.contains(&peer) || !running.insert(peer) {
            again.insert(peer);
            return;
        }
        let (mut control, docs, name, done_tx) =
            (control.clone(), docs.clone(), name.clone(), done_tx.clone());
        tokio::spawn(async move {
            let result = async {
                let stream = control
                    .open_stream(peer, protocol())
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                drive(stream, peer, Role::Initiator, name, docs).await
            }
            .await;
            let _ = done_tx
                .send(Outcome {
                    peer,
                    inbound: false,
                    result,
                })
                .await;
        });
    };

    loop {
        tokio::select! {
            biased;
            Some((peer, stream)) = inbound_rx.recv() => {
                if running.contains(&peer) && local < peer {
                    // Both sides opened a session at once: the lower peer id's goes on (it
                    // syncs both ways); the other is closed.
                    tracing::debug!(%peer, "closing a duplicate session");
                    drop(stream);
                    continue;
                }
                running_in.insert(peer);
                let (docs, name, done_tx) = (docs.clone(), name.clone(), done_tx.clone());
                tokio::spawn(async move {
                    let result = drive(stream, peer, Role::Responder, name, docs).await;
                    let _ = done_tx.send(Outcome { peer, inbound: true, result }).await;
                });
            }
            Some(outcome) = done_rx.recv() => {
                let peer = outcome.peer;
                if outcome.inbound {
                    running_in.remove(&peer);
                } else {
                    running.remove(&peer);
                }
                let mut table = peers.lock().unwrap_or_else(|p| p.into_inner());
                let info = table.entry(peer.to_string()).or_default();
                match outcome.result {
                    Ok(t) => {
                        info.last_sync = Some(now());
                        info.sessions += 1;
                        info.docs_sent += t.docs_sent;
                        info.docs_received += t.docs_received;
                        info.bytes_sent += t.bytes_sent;
                        info.bytes_received += t.bytes_received;
                        info.last_error = None;
                        info.last_path = Some(if t.fast { "checkpoint" } else { "reconciliation" });
                        tracing::info!(%peer, fast = t.fast, sent = t.docs_sent, received = t.docs_received, bytes_out = t.bytes_sent, bytes_in = t.bytes_received, "sync session done");
                        if t.changed > 0 {
                            let _ = changes_tx.try_send(Some(peer));
                            if t.restricted {
                                // Certificates came in: the peer may be entitled to more now.
                                again.insert(peer);
                            }
                        }
                    }
                    Err(e) if !outcome.inbound && running_in.contains(&peer) && local > peer => {
                        tracing::debug!(%peer, error = %format!("{e:#}"), "session superseded by the peer's");
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %format!("{e:#}"), "sync session failed");
                        info.last_error = Some(format!("{e:#}"));
                    }
                }
                drop(table);
                if !running.contains(&peer)
                    && !running_in.contains(&peer)
                    && again.remove(&peer)
                    && connected.contains(&peer)
                {
                    start_session(peer, &mut running, &running_in, &mut again);
                }
            }
            Some(source) = changes.recv() => {
                for peer in connected.iter().copied().filter(|p| Some(*p) != source).collect::<Vec<_>>() {
                    start_session(peer, &mut running, &running_in, &mut again);
                }
            }
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    if relay_on && !address.iter().any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit)) {
                        // A relay serves only on addresses it knows others can reach; a hub's
                        // own listening addresses are those.
                        swarm.add_external_address(address.clone());
                    }
                    if matches!(address.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
                        // Relay circuits already end with our id.
                        println!("listening on {address}");
                    } else {
                        println!("listening on {address}/p2p/{local}");
                    }
                    tracing::info!(%address, "listening");
                }
                SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                    addr_peer.insert(endpoint.get_remote_address().clone(), peer_id);
                    if connected.insert(peer_id) {
                        tracing::info!(peer = %peer_id, "connected");
                        peers.lock().unwrap_or_else(|p| p.into_inner()).entry(peer_id.to_string()).or_default().connected = true;
                        if local < peer_id {
                            start_session(peer_id, &mut running, &running_in, &mut again);
                        }
                    }
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                    connected.remove(&peer_id);
                    tracing::info!(peer = %peer_id, "disconnected");
                    peers.lock().unwrap_or_else(|p| p.into_inner()).entry(peer_id.to_string()).or_default().connected = false;
                }
                SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                    for (peer, addr) in found {
                        if peer != local && !connected.contains(&peer) {
                            let _ = swarm.dial(addr);
                        }
                    }
                }
                SwarmEvent::OutgoingConnectionError { error, .. } => {
                    tracing::debug!(%error, "dial failed");
                }
                _ => {}
            },
            _ = tick.tick() => {
                let now = tokio::time::Instant::now();
                for (addr, when, backoff) in redial.iter_mut() {
                    let up = addr_peer.get(addr).is_some_and(|p| connected.contains(p))
                        || addr.iter().any(|p| matches!(p, libp2p::multiaddr::Protocol::P2p(id) if connected.contains(&id)));
                    if up {
                        *backoff = Duration::from_millis(500);
                        continue;
                    }
                    if now >= *when {
                        let _ = swarm.dial(addr.clone());
                        *when = now + *backoff;
                        *backoff = (*backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
    }
}
