//! The libp2p swarm of a node: transports, protocols and their settings.
//!
//! TCP with Noise and Yamux, and QUIC; identify and ping (so any libp2p implementation can
//! connect, identify and ping the node); mDNS on the LAN (off with `--no-mdns`); a circuit relay
//! (v2) server on hubs and central; a relay client and DCUtR on every node (a device behind NAT
//! listens through a hub and upgrades to a direct connection when the NATs allow); and
//! `libp2p-stream` for the sync protocol.

use std::time::Duration;

use anyhow::Result;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    PeerId, StreamProtocol, connection_limits, dcutr, identify, mdns, noise, ping, relay, tcp,
    yamux,
};

use super::NetConfig;

/// A connection with no session, ping or relay on it for this long is closed.
const IDLE_CONNECTION: Duration = Duration::from_secs(600);
/// Streams one connection may hold open at once (a session, identify, ping, relay and DCUtR
/// need a handful; the yamux default of 512 let one peer open 512 sessions).
const STREAMS_PER_CONNECTION: usize = 16;
/// Connections being set up from outside at once.
const PENDING_INCOMING: u32 = 32;
/// Connections from outside at once (a district hub serves a few hundred devices).
const ESTABLISHED_INCOMING: u32 = 512;
/// Connections with one peer at once (TCP, QUIC, a relayed one while upgrading).
const PER_PEER: u32 = 4;

/// Whether a libp2p peer holds a valid certificate now, as the engine last said: the relay
/// serves only such peers.
pub type Certified = std::sync::Arc<dyn Fn(&PeerId) -> bool + Send + Sync>;

fn yamux_config() -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_num_streams(STREAMS_PER_CONNECTION);
    c
}

/// The sync protocol's libp2p id.
pub fn protocol() -> StreamProtocol {
    StreamProtocol::new(fieldmesh_protocol::PROTOCOL_ID)
}

/// Relay circuits of a hub: sync sessions are long, so circuits get more room than the libp2p
/// defaults (2 minutes, 128 KiB); and only certified peers may reserve a circuit or open one (an
/// open relay would carry anyone's traffic on the hub's link).
fn relay_config(certified: &Certified) -> relay::Config {
    let (reserve, open) = (certified.clone(), certified.clone());
    let mut c = relay::Config {
        max_circuit_duration: Duration::from_secs(3600),
        max_circuit_bytes: 1 << 30,
        ..relay::Config::default()
    };
    c.reservation_rate_limiters.push(Box::new(
        move |peer: PeerId, _: &libp2p::Multiaddr, _: std::time::Instant| reserve(&peer),
    ));
    c.circuit_src_rate_limiters.push(Box::new(
        move |peer: PeerId, _: &libp2p::Multiaddr, _: std::time::Instant| open(&peer),
    ));
    c
}

/// The protocols every node speaks.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    limits: connection_limits::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    /// LAN discovery.
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    relay: Toggle<relay::Behaviour>,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
    /// Streams of the sync protocol.
    pub stream: libp2p_stream::Behaviour,
}

/// Builds the swarm of a node with identity `keypair`.
pub fn build(
    keypair: libp2p::identity::Keypair,
    cfg: &NetConfig,
    certified: Certified,
) -> Result<libp2p::Swarm<Behaviour>> {
    let (mdns_on, relay_on) = (cfg.mdns, cfg.relay_server);
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux_config,
        )?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux_config)?
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
                limits: connection_limits::Behaviour::new(
                    connection_limits::ConnectionLimits::default()
                        .with_max_pending_incoming(Some(PENDING_INCOMING))
                        .with_max_established_incoming(Some(ESTABLISHED_INCOMING))
                        .with_max_established_per_peer(Some(PER_PEER)),
                ),
                identify: identify::Behaviour::new(identify::Config::new(
                    "/fieldmesh/1".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(ping::Config::new()),
                mdns: Toggle::from(mdns),
                relay: Toggle::from(relay_on.then(|| {
                    relay::Behaviour::new(key.public().to_peer_id(), relay_config(&certified))
                })),
                relay_client,
                dcutr: dcutr::Behaviour::new(key.public().to_peer_id()),
                stream: libp2p_stream::Behaviour::new(),
            })
        })?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION))
        .build();
    Ok(swarm)
}
