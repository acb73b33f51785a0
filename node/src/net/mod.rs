//! The libp2p side of a node: one task owns the `Swarm` and runs the sync [`Scheduler`]; sync
//! sessions run as tasks on streams.
//!
//! The task feeds the scheduler what happens (connections, the engine's events, sessions that
//! end, sessions peers open, network changes) and does what it asks: open a session, dial an
//! explicit peer again, ask the LAN for peers. The rules themselves (who opens, one session per
//! pair, nothing left behind, periodic resync, retries, deadlines) are in
//! [`fieldmesh_protocol::schedule`], shared with the simulation.
//!
//! - `behaviour`: transports and protocols; [`session`]: one session on a stream, with its
//!   deadlines; [`discovery`]: mDNS queries on demand; [`peers`]: what `/status` shows of peers.

mod behaviour;
pub mod discovery;
pub mod peers;
pub mod session;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use fieldmesh_protocol::{Admit, Command, Ended, Limits, Millis, Role, Scheduler, Totals};
use fieldmesh_trust::PeerKey;
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, mdns};
use tokio::sync::{broadcast, mpsc};

pub use peers::{PeerInfo, PeerTable};

use crate::engine_thread::EngineHandle;
use behaviour::{BehaviourEvent, protocol};
use discovery::Discovery;

/// Sessions peers opened that wait for the network task to admit them, at most.
const INBOUND_QUEUE: usize = 64;
/// Ended sessions waiting for the network task, at most.
const DONE_QUEUE: usize = 64;
/// Longest sleep of the network task without a reason to wake.
const MAX_SLEEP: Duration = Duration::from_secs(1);

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
    /// Deadlines and periods of sync.
    pub limits: Limits,
    /// Print each address the node listens on to stdout (`fieldmesh run` does; the demo, which
    /// runs several nodes in one process, does not).
    pub announce: bool,
}

/// The ed25519 key behind a libp2p peer id, if it is one.
pub fn peer_key(peer: &PeerId) -> Option<PeerKey> {
    let key = libp2p::identity::PublicKey::try_decode_protobuf(peer.as_ref().digest()).ok()?;
    Some(PeerKey(key.try_into_ed25519().ok()?.to_bytes()))
}

/// The libp2p peer id of a key.
pub fn peer_id(key: &PeerKey) -> Option<PeerId> {
    libp2p::identity::ed25519::PublicKey::try_from_bytes(&key.0)
        .ok()
        .map(|k| PeerId::from_public_key(&k.into()))
}

struct Outcome {
    peer: PeerId,
    /// Whether we opened the session.
    outbound: bool,
    result: Result<Totals>,
}

/// Whether explicit peer address `dialled` names the connection to `peer` at `remote`.
fn same_peer(dialled: &Multiaddr, remote: &Multiaddr, peer: &PeerId) -> bool {
    let without_id = |a: &Multiaddr| {
        a.iter()
            .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
            .collect::<Multiaddr>()
    };
    // The peer an address names is its last `/p2p/` part: in a relay circuit
    // (`…/p2p/HUB/p2p-circuit/p2p/DEVICE`) the hub is only the way there.
    let target = dialled.iter().fold(None, |last, p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => last,
    });
    match target {
        Some(id) => id == *peer,
        None => without_id(dialled) == without_id(remote),
    }
}

fn unix_now() -> i64 {
    fieldmesh_engine::now()
}

/// How long a refused or lost relay reservation waits before it is asked for again.
const RELISTEN: Duration = Duration::from_secs(3);

/// Whether `addr` listens through a relay.
fn is_circuit(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit))
}

/// Runs the network until the process ends.
pub async fn run(
    keypair: libp2p::identity::Keypair,
    cfg: NetConfig,
    name: String,
    engine: EngineHandle,
    peers: PeerTable,
) -> Result<()> {
    let relay_engine = engine.clone();
    let certified: behaviour::Certified = std::sync::Arc::new(move |peer: &PeerId| {
        peer_key(peer).is_some_and(|k| relay_engine.serves(&k.0))
    });
    let mut swarm = behaviour::build(keypair, &cfg, certified)?;
    // Listeners on relay circuits, and those to open again: a hub reserves a circuit only for
    // a device whose certificate it holds, which it learns in the first session with it, and a
    // reservation ends when the hub restarts.
    let mut circuits: HashMap<libp2p::core::transport::ListenerId, Multiaddr> = HashMap::new();
    let mut relisten: Vec<(Multiaddr, tokio::time::Instant)> = Vec::new();
    for addr in &cfg.listen {
        let id = swarm
            .listen_on(addr.clone())
            .with_context(|| format!("cannot listen on {addr}"))?;
        if is_circuit(addr) {
            circuits.insert(id, addr.clone());
        }
    }
    let local = *swarm.local_peer_id();
    let started = tokio::time::Instant::now();
    let now = || started.elapsed().as_millis() as Millis;
    let limits = cfg.limits;
    let mut sched = Scheduler::new(local, limits, cfg.peers.len(), engine.last_seq(), cfg.mdns);
    let mut events = engine.subscribe();
    let mut discovery = Discovery::default();
    let mut control = swarm.behaviour().stream.new_control();
    let mut incoming = control
        .accept(protocol())
        .context("the sync protocol is registered twice")?;

    // Sessions peers open wait here until the loop below admits or refuses them.
    let (done_tx, mut done_rx) = mpsc::channel::<Outcome>(DONE_QUEUE);
    let (inbound_tx, mut inbound_rx) = mpsc::channel::<(PeerId, libp2p::Stream)>(INBOUND_QUEUE);
    tokio::spawn(async move {
        while let Some(s) = incoming.next().await {
            if inbound_tx.send(s).await.is_err() {
                break;
            }
        }
    });
    let mut connected: HashSet<PeerId> = HashSet::new();

    let spawn_session = |peer: PeerId, outbound: bool, stream: Option<libp2p::Stream>| {
        let (mut control, engine, name, done_tx) = (
            control.clone(),
            engine.clone(),
            name.clone(),
            done_tx.clone(),
        );
        tokio::spawn(async move {
            let result = async {
                let key = peer_key(&peer).context(
                    "the peer's key is not an ed25519 key; it cannot hold a certificate",
                )?;
                let (stream, role) = match stream {
                    Some(s) => (s, Role::Responder),
                    None => {
                        let opening = control.open_stream(peer, protocol());
                        let wait = Duration::from_millis(limits.frame);
                        let stream = tokio::time::timeout(wait, opening)
                            .await
                            .map_err(|_| {
                                anyhow::anyhow!(
                                    "the peer did not accept a sync stream within {} s",
                                    wait.as_secs()
                                )
                            })?
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                        (stream, Role::Initiator)
                    }
                };
                session::drive(stream, key, role, name, engine, limits).await
            }
            .await;
            let _ = done_tx
                .send(Outcome {
                    peer,
                    outbound,
                    result,
                })
                .await;
        });
    };

    loop {
        let t = now();
        for cmd in sched.poll(t) {
            match cmd {
                Command::Open(peer) => spawn_session(peer, true, None),
                Command::Dial(n) => {
                    if let Some(addr) = cfg.peers.get(n)
                        && let Err(e) = swarm.dial(addr.clone())
                    {
                        tracing::debug!(%addr, error = %e, "dial failed");
                        sched.dial_failed(n, t);
                    }
                }
                Command::Discover => {
                    discovery.query().await;
                    // Peers heard on the LAN before but not connected (a dial that failed):
                    // dial them again while the LAN still lists them.
                    let heard: Vec<PeerId> = swarm
                        .behaviour()
                        .mdns
                        .as_ref()
                        .map(|m| m.discovered_nodes().copied().collect())
                        .unwrap_or_default();
                    for peer in heard.into_iter().filter(|p| !connected.contains(p)) {
                        tracing::debug!(%peer, "dialling a peer heard on the LAN");
                        let _ = swarm.dial(peer);
                    }
                }
            }
        }
        let due = tokio::time::Instant::now();
        let ready: Vec<(Multiaddr, tokio::time::Instant)> =
            relisten.extract_if(.., |(_, at)| *at <= due).collect();
        for (addr, _) in ready {
            match swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    circuits.insert(id, addr);
                }
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "cannot listen on the relay circuit");
                    relisten.push((addr, due + RELISTEN));
                }
            }
        }
        let sleep = sched
            .next_wakeup(t)
            .map_or(MAX_SLEEP, |w| Duration::from_millis(w.saturating_sub(t)))
            .clamp(Duration::from_millis(5), MAX_SLEEP);
        tokio::select! {
            biased;
            Some((peer, stream)) = inbound_rx.recv() => {
                match sched.inbound(&peer, now()) {
                    Admit::Accept => spawn_session(peer, false, Some(stream)),
                    Admit::Refuse => {
                        tracing::debug!(%peer, "refused a sync session: one with this peer is running");
                        drop(stream);
                    }
                }
            }
            Some(outcome) = done_rx.recv() => {
                let peer = outcome.peer;
                let t = now();
                let mut table = peers.lock().unwrap_or_else(|p| p.into_inner());
                let info = table.entry(peer.to_string()).or_default();
                match outcome.result {
                    Ok(totals) => {
                        sched.started(&peer, outcome.outbound, totals.seq);
                        sched.ended(&peer, outcome.outbound, Ended::Complete, t);
                        if totals.again() {
                            sched.again(&peer);
                        }
                        info.completed(&totals, unix_now());
                        tracing::info!(%peer, fast = totals.fast, sent = totals.docs_sent, received = totals.docs_received, bytes_out = totals.bytes_sent, bytes_in = totals.bytes_received, "sync session done");
                    }
                    Err(e) => {
                        let message = format!("{e:#}");
                        if sched.ended(&peer, outcome.outbound, Ended::Failed, t) {
                            tracing::warn!(%peer, error = %message, "sync session failed");
                            info.failed(message);
                        } else {
                            tracing::debug!(%peer, error = %message, "session superseded by the peer's");
                        }
                    }
                }
            }
            event = events.recv() => match event {
                Ok(stored) => {
                    let from = stored.source.peer().and_then(peer_id);
                    sched.changed(stored.seq, from.as_ref());
                    if stored.docs.iter().any(|(_, ty)| ty == "Basic") {
                        // A certificate or revocation: what was refused, or not offered, before
                        // may pass now.
                        sched.trust_changed();
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Events were missed: treat what the store holds now as new to everyone.
                    sched.changed(engine.last_seq(), None);
                }
                Err(broadcast::error::RecvError::Closed) => {
                    anyhow::bail!("the engine stopped");
                }
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    if cfg.relay_server && !address.iter().any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit)) {
                        // A relay serves only on addresses it knows others can reach; a hub's
                        // own listening addresses are those.
                        swarm.add_external_address(address.clone());
                    }
                    if cfg.announce {
                        if matches!(address.iter().last(), Some(libp2p::multiaddr::Protocol::P2p(_))) {
                            // Relay circuits already end with our id.
                            println!("listening on {address}");
                        } else {
                            println!("listening on {address}/p2p/{local}");
                        }
                    }
                    tracing::info!(%address, "listening");
                    discovery.listening(&address);
                    sched.network_changed(now());
                }
                SwarmEvent::ListenerClosed { listener_id, reason, .. } => {
                    if let Some(addr) = circuits.remove(&listener_id) {
                        match reason {
                            Err(e) => tracing::warn!(%addr, error = %e, "the relay refused or ended the reservation; trying again shortly"),
                            Ok(()) => tracing::info!(%addr, "the relay circuit closed; opening it again shortly"),
                        }
                        relisten.push((addr, tokio::time::Instant::now() + RELISTEN));
                    }
                }
                SwarmEvent::ExpiredListenAddr { address, .. } => {
                    discovery.expired(&address);
                    sched.network_changed(now());
                }
                SwarmEvent::ConnectionEstablished { peer_id, endpoint, .. } => {
                    let remote = endpoint.get_remote_address();
                    let dial = cfg.peers.iter().position(|a| same_peer(a, remote, &peer_id));
                    if connected.insert(peer_id) {
                        tracing::info!(peer = %peer_id, "connected");
                        peers.lock().unwrap_or_else(|p| p.into_inner()).entry(peer_id.to_string()).or_default().connected = true;
                    }
                    sched.connected(peer_id, dial, now());
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                    connected.remove(&peer_id);
                    tracing::info!(peer = %peer_id, "disconnected");
                    peers.lock().unwrap_or_else(|p| p.into_inner()).entry(peer_id.to_string()).or_default().connected = false;
                    sched.disconnected(&peer_id, now());
                }
                SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                    for (peer, addr) in found {
                        if peer != local && !connected.contains(&peer) {
                            tracing::info!(%peer, %addr, "found a peer on the LAN");
                            let _ = swarm.dial(addr);
                        }
                    }
                }
                SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                    let peer = peer_id.map_or_else(|| "unknown".to_string(), |p| p.to_string());
                    tracing::debug!(%peer, %error, "dial failed");
                }
                _ => {}
            },
            () = tokio::time::sleep(sleep) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_address_names_the_device_not_the_hub() {
        let (hub, device) = (PeerId::random(), PeerId::random());
        let circuit: Multiaddr =
            format!("/ip4/10.0.0.1/tcp/4001/p2p/{hub}/p2p-circuit/p2p/{device}")
                .parse()
                .expect("address");
        let to_hub: Multiaddr = "/ip4/10.0.0.1/tcp/4001".parse().expect("address");
        assert!(!same_peer(&circuit, &to_hub, &hub));
        assert!(same_peer(&circuit, &circuit, &device));
        let plain: Multiaddr = "/ip4/10.0.0.2/tcp/4001".parse().expect("address");
        assert!(same_peer(&plain, &plain, &device));
        assert!(!same_peer(&plain, &to_hub, &device));
    }
}
