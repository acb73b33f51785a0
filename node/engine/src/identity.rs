//! Who this node is, and its clock.

use std::time::{SystemTime, UNIX_EPOCH};

use automerge::ActorId;
use fieldmesh_fhir_docs::actor_for_key;
use fieldmesh_trust::ed25519_dalek::SigningKey;
use fieldmesh_trust::{PeerKey, PublicKey};

/// The system clock in Unix seconds (0 if the clock is before 1970).
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// Who this node is, as the engine needs it.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// Identifier system of resources created here.
    pub system: String,
    /// Automerge actor id (the node's public key).
    pub actor: ActorId,
    /// The node's signing key (its libp2p identity too).
    pub key: SigningKey,
    /// The deployment's root of trust: central's public key.
    pub root: PublicKey,
    /// A fixed time (Unix seconds) instead of the system clock, for simulations.
    pub clock: Option<i64>,
}

impl NodeIdentity {
    /// The identity of the node with secret key `secret`, in the deployment rooted at `root`.
    pub fn new(system: String, secret: &[u8; 32], root: PublicKey) -> Self {
        let key = SigningKey::from_bytes(secret);
        Self {
            system,
            actor: actor_for_key(&key.verifying_key().to_bytes()),
            key,
            root,
            clock: None,
        }
    }

    /// The time of this node's changes and certificate checks: its clock.
    pub fn time(&self) -> i64 {
        self.clock.unwrap_or_else(now)
    }

    /// The node's public key.
    pub fn public(&self) -> PublicKey {
        self.key.verifying_key().to_bytes()
    }

    /// The node's key as peers name it.
    pub fn peer(&self) -> PeerKey {
        PeerKey(self.public())
    }
}
