//! Where a change comes from.

use fieldmesh_trust::PeerKey;

/// The origin of documents handed to the engine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// This node: its API, `fieldmesh load`, a certificate installed or issued here, a
    /// deployment provisioned by its operator. Trusted to hand in what it hands in; every change
    /// is still checked against its author's certificate.
    Local,
    /// A peer, named by its authenticated key. A peer without a valid certificate may hand in
    /// only certificates and revocations.
    Peer(PeerKey),
    /// A file (a certificate file, a bundle), named for the quarantine and the logs.
    File(String),
}

impl Source {
    /// The peer, if the source is one.
    pub fn peer(&self) -> Option<&PeerKey> {
        match self {
            Source::Peer(k) => Some(k),
            _ => None,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Local => f.write_str("this node"),
            Source::Peer(k) => write!(f, "peer {k}"),
            Source::File(name) => write!(f, "file {name}"),
        }
    }
}
