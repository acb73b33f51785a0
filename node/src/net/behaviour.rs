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
use libp2p::{StreamProtocol, dcutr, identify, mdns, noise, ping, relay, tcp, yamux};

use super::NetConfig;

/// A connection with no session, ping or relay on it for this long is closed.
const IDLE_CONNECTION: Duration = Duration::from_secs(600);

/// The sync protocol's libp2p id.
pub fn protocol() -> StreamProtocol {
    StreamProtocol::new(fieldmesh_protocol::PROTOCOL_ID)
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

/// The protocols every node speaks.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
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
) -> Result<libp2p::Swarm<Behaviour>> {
    let (mdns_on, relay_on) = (cfg.mdns, cfg.relay_server);
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
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
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION))
        .build();
    Ok(swarm)
}
