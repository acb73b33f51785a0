//! Asking the LAN who is there, as often as the scheduler wants.
//!
//! libp2p's mDNS behaviour answers queries and learns from every answer it hears, but asks on
//! its own only at start (probing) and then every five minutes: two phones on one Wi-Fi that miss
//! each other's first query stay unaware of each other for minutes. When the scheduler asks to
//! discover, this sends the same mDNS query libp2p sends (a PTR question for `_p2p._udp.local`)
//! from each of the node's IPv4 addresses to the mDNS group; every libp2p node on the segment
//! answers to the group, and the node's mDNS behaviour hears the answers and reports the peers.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use libp2p::Multiaddr;
use libp2p::multiaddr::Protocol;

const MDNS_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
const MDNS_PORT: u16 = 5353;

/// The mDNS question libp2p asks: "which peers offer `_p2p._udp.local`?".
fn query() -> Vec<u8> {
    let mut out = Vec::with_capacity(33);
    // Transaction id (unused), flags: a standard query, one question, no records.
    out.extend_from_slice(&rand_id().to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["_p2p", "_udp", "local"] {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    // Type PTR (12), class IN (1).
    out.extend_from_slice(&[0, 12, 0, 1]);
    out
}

fn rand_id() -> u16 {
    let b = uuid::Uuid::new_v4().into_bytes();
    u16::from_be_bytes([b[0], b[1]])
}

/// The node's own IPv4 addresses, learnt from the addresses it listens on.
#[derive(Debug, Default)]
pub struct Discovery {
    addresses: BTreeSet<Ipv4Addr>,
}

impl Discovery {
    /// The node listens on `addr` now.
    pub fn listening(&mut self, addr: &Multiaddr) {
        if let Some(Protocol::Ip4(ip)) = addr.iter().next()
            && !ip.is_loopback()
            && !ip.is_unspecified()
        {
            self.addresses.insert(ip);
        }
    }

    /// The node no longer listens on `addr`.
    pub fn expired(&mut self, addr: &Multiaddr) {
        if let Some(Protocol::Ip4(ip)) = addr.iter().next() {
            self.addresses.remove(&ip);
        }
    }

    /// Sends the query from each address (each reaches the segment of its interface).
    pub async fn query(&self) {
        let packet = query();
        for ip in &self.addresses {
            let socket = match tokio::net::UdpSocket::bind(SocketAddr::V4(SocketAddrV4::new(
                *ip, 0,
            )))
            .await
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%ip, error = %e, "cannot ask the LAN for peers from this address");
                    continue;
                }
            };
            let _ = socket.set_multicast_ttl_v4(255);
            let to = SocketAddr::V4(SocketAddrV4::new(MDNS_GROUP, MDNS_PORT));
            match socket.send_to(&packet, to).await {
                Ok(_) => tracing::debug!(%ip, "asked the LAN for peers"),
                Err(e) => tracing::debug!(%ip, error = %e, "mDNS query failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_the_one_libp2p_asks() {
        let q = query();
        assert_eq!(q.len(), 33);
        assert_eq!(&q[2..12], &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&q[12..29], b"\x04_p2p\x04_udp\x05local\x00");
        assert_eq!(&q[29..], &[0, 12, 0, 1]);
    }
}
