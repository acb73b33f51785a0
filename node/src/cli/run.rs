//! `fieldmesh run`: serve the local FHIR API and sync with peers until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;
use fieldmesh_node::config::{DataDir, Role};
use fieldmesh_node::net::NetConfig;
use fieldmesh_node::node;
use libp2p::Multiaddr;

/// Runs the node in `data`.
pub fn run(
    data: &Path,
    http: Option<SocketAddr>,
    listen: Vec<Multiaddr>,
    peers: Vec<Multiaddr>,
    no_mdns: bool,
    byzantine: bool,
) -> Result<()> {
    let dir = DataDir::open(data)?;
    let listen = if listen.is_empty() {
        vec![
            "/ip4/0.0.0.0/tcp/0".parse()?,
            "/ip4/0.0.0.0/udp/0/quic-v1".parse()?,
        ]
    } else {
        listen
    };
    let net = NetConfig {
        listen,
        peers,
        mdns: !no_mdns,
        relay_server: matches!(dir.config.role, Role::Hub | Role::Central),
        limits: dir.config.sync.limits(),
        announce: true,
    };
    let options = node::RunOptions { byzantine };
    super::runtime()?.block_on(node::run_with(dir, http, net, options))
}
