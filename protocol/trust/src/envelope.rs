//! Signed change envelopes, as stored and on the wire.

use std::collections::HashMap;

use ed25519_dalek::{Signer as _, SigningKey};

use crate::TrustError;

/// Domain separator of change envelope signatures.
pub const CHANGE_DOMAIN: &[u8] = b"fieldmesh/change-envelope/v2\0";

/// The signature of one change by its author. It binds the change to the document it was made
/// in (id and resource type): a change signed for one document cannot be replayed as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    /// The Automerge change hash.
    pub hash: [u8; 32],
    /// How many revocations (1..=n, contiguous) the author held when it made the change.
    pub revocations_seen: u32,
    /// ed25519 signature over [`CHANGE_DOMAIN`] ‖ document id (16 bytes) ‖ resource type length
    /// (u8) ‖ resource type ‖ hash ‖ revocations_seen (u32 BE).
    pub signature: [u8; 64],
}

impl Envelope {
    /// Encoded size.
    pub const LEN: usize = 100;

    pub(crate) fn message(doc: &[u8; 16], ty: &str, hash: &[u8; 32], seen: u32) -> Vec<u8> {
        let ty = &ty.as_bytes()[..ty.len().min(255)];
        let mut m = Vec::with_capacity(CHANGE_DOMAIN.len() + 53 + ty.len());
        m.extend_from_slice(CHANGE_DOMAIN);
        m.extend_from_slice(doc);
        m.push(ty.len() as u8);
        m.extend_from_slice(ty);
        m.extend_from_slice(hash);
        m.extend_from_slice(&seen.to_be_bytes());
        m
    }

    /// Signs a change made in document `doc` of type `ty`.
    pub fn sign(
        key: &SigningKey,
        doc: &[u8; 16],
        ty: &str,
        hash: [u8; 32],
        revocations_seen: u32,
    ) -> Self {
        let signature = key
            .sign(&Self::message(doc, ty, &hash, revocations_seen))
            .to_bytes();
        Self {
            hash,
            revocations_seen,
            signature,
        }
    }

    /// Whether the signature is `author`'s for a change of document `doc` of type `ty`, under
    /// the rule of [`crate::signature`].
    pub fn verify(&self, author: &[u8], doc: &[u8; 16], ty: &str) -> bool {
        let Ok(key) = <[u8; 32]>::try_from(author) else {
            return false;
        };
        crate::signature::key(&key).is_some_and(|key| {
            crate::signature::verify(
                &key,
                &Self::message(doc, ty, &self.hash, self.revocations_seen),
                &self.signature,
            )
        })
    }

    /// Appends the encoded envelope to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hash);
        out.extend_from_slice(&self.revocations_seen.to_be_bytes());
        out.extend_from_slice(&self.signature);
    }

    /// Size on the wire: the receiver holds the change and so its full hash; an 8-byte prefix
    /// of it finds the change, then the count and the signature.
    pub const WIRE_LEN: usize = 76;

    /// Appends the wire form of the envelope to `out`.
    pub fn encode_wire_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hash[..8]);
        out.extend_from_slice(&self.revocations_seen.to_be_bytes());
        out.extend_from_slice(&self.signature);
    }

    /// The wire form of envelopes.
    pub fn encode_wire(envelopes: &[Envelope]) -> Vec<u8> {
        let mut out = Vec::with_capacity(envelopes.len() * Self::WIRE_LEN);
        for e in envelopes {
            e.encode_wire_into(&mut out);
        }
        out
    }

    /// The wire form of stored envelopes (as [`Envelope::encode_all`] wrote them), keeping those
    /// whose hash `keep` accepts. Unreadable trailing bytes are dropped.
    pub fn stored_to_wire(stored: &[u8], keep: impl Fn(&[u8; 32]) -> bool) -> Vec<u8> {
        let mut out = Vec::new();
        if let Ok(all) = Self::decode_all(&stored[..stored.len() - stored.len() % Self::LEN]) {
            let mut envs: Vec<&Envelope> = all.values().filter(|e| keep(&e.hash)).collect();
            envs.sort_by_key(|e| e.hash);
            for e in envs {
                e.encode_wire_into(&mut out);
            }
        }
        out
    }

    /// Matches envelopes in wire form to `changes` (hash, author): each change gets the envelope
    /// whose prefix is its hash's; if a crafted collision gives several, the one whose signature
    /// verifies for document `doc` of type `ty`. Changes without one are absent from the result.
    pub fn match_wire(
        wire: &[u8],
        changes: &[([u8; 32], &[u8])],
        doc: &[u8; 16],
        ty: &str,
    ) -> Result<HashMap<[u8; 32], Envelope>, TrustError> {
        if !wire.len().is_multiple_of(Self::WIRE_LEN) {
            return Err(TrustError::TruncatedEnvelopes(wire.len()));
        }
        let mut by_prefix: HashMap<[u8; 8], Vec<(u32, [u8; 64])>> = HashMap::new();
        for c in wire.chunks_exact(Self::WIRE_LEN) {
            let mut prefix = [0u8; 8];
            prefix.copy_from_slice(&c[..8]);
            let seen = u32::from_be_bytes([c[8], c[9], c[10], c[11]]);
            let mut signature = [0u8; 64];
            signature.copy_from_slice(&c[12..]);
            by_prefix.entry(prefix).or_default().push((seen, signature));
        }
        let mut out = HashMap::new();
        for (hash, author) in changes {
            let mut prefix = [0u8; 8];
            prefix.copy_from_slice(&hash[..8]);
            let Some(candidates) = by_prefix.get(&prefix) else {
                continue;
            };
            let envs: Vec<Envelope> = candidates
                .iter()
                .map(|(seen, signature)| Envelope {
                    hash: *hash,
                    revocations_seen: *seen,
                    signature: *signature,
                })
                .collect();
            let chosen = if envs.len() == 1 {
                envs[0]
            } else {
                envs.iter()
                    .find(|e| e.verify(author, doc, ty))
                    .copied()
                    .unwrap_or(envs[0])
            };
            out.insert(*hash, chosen);
        }
        Ok(out)
    }

    /// Encodes envelopes back to back.
    pub fn encode_all(envelopes: &[Envelope]) -> Vec<u8> {
        let mut out = Vec::with_capacity(envelopes.len() * Self::LEN);
        for e in envelopes {
            e.encode_into(&mut out);
        }
        out
    }

    /// Decodes envelopes encoded back to back, keyed by change hash.
    pub fn decode_all(bytes: &[u8]) -> Result<HashMap<[u8; 32], Envelope>, TrustError> {
        if !bytes.len().is_multiple_of(Self::LEN) {
            return Err(TrustError::TruncatedEnvelopes(bytes.len()));
        }
        Ok(bytes
            .chunks_exact(Self::LEN)
            .map(|c| {
                let mut hash = [0u8; 32];
                hash.copy_from_slice(&c[..32]);
                let seen = u32::from_be_bytes([c[32], c[33], c[34], c[35]]);
                let mut signature = [0u8; 64];
                signature.copy_from_slice(&c[36..]);
                (
                    hash,
                    Envelope {
                        hash,
                        revocations_seen: seen,
                        signature,
                    },
                )
            })
            .collect())
    }
}
