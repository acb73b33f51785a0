//! Keys: ed25519 public keys, and the peer key newtype that names a node on the network.

use ed25519_dalek::VerifyingKey;

use crate::TrustError;

/// An ed25519 public key.
pub type PublicKey = [u8; 32];

/// The ed25519 key of a peer: its libp2p identity (Noise authenticates it on every connection),
/// its Automerge actor id and the subject of its certificate.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerKey(pub PublicKey);

/// The prefix of a libp2p peer id of an ed25519 key: an identity multihash (`0x00`, length 36)
/// of the protobuf-encoded public key (`KeyType = Ed25519`, then the 32 key bytes).
const PEER_ID_PREFIX: [u8; 6] = [0x00, 0x24, 0x08, 0x01, 0x12, 0x20];

impl PeerKey {
    /// Reads a libp2p peer id (`12D3KooW…`) of an ed25519 key; `None` for anything else.
    pub fn from_peer_id(text: &str) -> Option<Self> {
        let bytes = bs58::decode(text.trim()).into_vec().ok()?;
        let key = bytes.strip_prefix(&PEER_ID_PREFIX[..])?;
        let key: PublicKey = key.try_into().ok()?;
        VerifyingKey::from_bytes(&key).ok()?;
        Some(Self(key))
    }

    /// Reads a peer id or a hex-encoded key.
    pub fn parse(text: &str) -> Option<Self> {
        Self::from_peer_id(text).or_else(|| parse_key(text.trim()).ok().map(Self))
    }

    /// The libp2p peer id of this key (`12D3KooW…`), as `fieldmesh id` prints it.
    pub fn peer_id(&self) -> String {
        let mut bytes = Vec::with_capacity(38);
        bytes.extend_from_slice(&PEER_ID_PREFIX);
        bytes.extend_from_slice(&self.0);
        bs58::encode(bytes).into_string()
    }

    /// The key bytes.
    pub fn bytes(&self) -> &PublicKey {
        &self.0
    }
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.peer_id())
    }
}

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerKey({})", self.peer_id())
    }
}

/// Parses a hex public key.
pub fn parse_key(hex_key: &str) -> Result<PublicKey, TrustError> {
    let bytes = hex::decode(hex_key).map_err(|_| TrustError::BadKey(hex_key.into()))?;
    let key =
        <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| TrustError::BadKey(hex_key.into()))?;
    VerifyingKey::from_bytes(&key).map_err(|_| TrustError::BadKey(hex_key.into()))?;
    Ok(key)
}

/// The first 8 bytes of a key or hash in hex, for messages.
pub(crate) fn short(bytes: &[u8]) -> String {
    hex::encode(&bytes[..bytes.len().min(8)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_ids_round_trip_and_refuse_other_text() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32])
            .verifying_key()
            .to_bytes();
        let id = PeerKey(key).peer_id();
        assert!(id.starts_with("12D3KooW"), "{id}");
        assert_eq!(PeerKey::from_peer_id(&id), Some(PeerKey(key)));
        assert_eq!(PeerKey::parse(&hex::encode(key)), Some(PeerKey(key)));
        assert_eq!(PeerKey::from_peer_id("setup"), None);
        assert_eq!(PeerKey::from_peer_id(""), None);
        assert_eq!(PeerKey::from_peer_id(&id[..id.len() - 1]), None);
    }
}
