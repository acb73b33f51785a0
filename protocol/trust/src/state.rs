//! The trust state of a node: the root, every certificate and revocation it holds, and what a key
//! may do at a given time.

use std::collections::{BTreeMap, HashMap, HashSet};

use ed25519_dalek::{Signature, VerifyingKey};
use fieldmesh_fhir_docs::openimis::Role;

use crate::keys::short;
use crate::{
    Certificate, Envelope, PublicKey, Rejection, Revocation, TrustError, parse_key,
    verify_certificate, verify_revocation,
};

/// What a change's author may do, as its certificates say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority<'a> {
    /// Roles (union over valid certificates).
    pub roles: Vec<Role>,
    /// Scope (union); ignored for central.
    pub scope: Vec<&'a str>,
}

/// What a node knows of its deployment's trust: the root, every certificate and revocation.
#[derive(Debug, Clone)]
pub struct Trust {
    root: PublicKey,
    certs: HashMap<PublicKey, Vec<Certificate>>,
    serials: HashSet<String>,
    revocations: BTreeMap<u32, Revocation>,
    /// Revocation numbers by revoked key.
    revoked_keys: HashMap<PublicKey, Vec<u32>>,
    /// Decompressed keys of the root and of every certified key (decompressing costs about a
    /// tenth of a signature check).
    keys: HashMap<PublicKey, VerifyingKey>,
}

impl Trust {
    /// A trust state knowing only the root.
    pub fn new(root: PublicKey) -> Self {
        Self {
            root,
            certs: HashMap::new(),
            serials: HashSet::new(),
            revocations: BTreeMap::new(),
            revoked_keys: HashMap::new(),
            keys: VerifyingKey::from_bytes(&root)
                .map(|k| HashMap::from([(root, k)]))
                .unwrap_or_default(),
        }
    }

    /// The root key.
    pub fn root(&self) -> &PublicKey {
        &self.root
    }

    /// Adds a certificate or revocation token; returns whether it was new. A token not signed by
    /// the root is refused.
    pub fn add_token(&mut self, token: &str) -> Result<bool, TrustError> {
        if token.starts_with("fmr1.") {
            let rev = verify_revocation(&self.root, token)?;
            if self.revocations.contains_key(&rev.number) {
                return Ok(false);
            }
            let key = parse_key(&rev.subject)?;
            self.revoked_keys.entry(key).or_default().push(rev.number);
            self.revocations.insert(rev.number, rev);
            return Ok(true);
        }
        let cert = verify_certificate(&self.root, token)?;
        if !self.serials.insert(cert.serial.clone()) {
            return Ok(false);
        }
        let key = cert.subject_key()?;
        if let Ok(k) = VerifyingKey::from_bytes(&key) {
            self.keys.insert(key, k);
        }
        self.certs.entry(key).or_default().push(cert);
        Ok(true)
    }

    /// How many revocations this node holds without a gap (1..=n).
    pub fn revocations_held(&self) -> u32 {
        let mut n = 0;
        while self.revocations.contains_key(&(n + 1)) {
            n += 1;
        }
        n
    }

    /// The certificates of `key`.
    pub fn certificates(&self, key: &PublicKey) -> &[Certificate] {
        self.certs.get(key).map_or(&[], Vec::as_slice)
    }

    /// Every certificate and revocation, for `fieldmesh cert show`.
    pub fn all(&self) -> (Vec<&Certificate>, Vec<&Revocation>) {
        let mut certs: Vec<&Certificate> = self.certs.values().flatten().collect();
        certs.sort_by(|a, b| a.user.cmp(&b.user).then(a.serial.cmp(&b.serial)));
        (certs, self.revocations.values().collect())
    }

    /// The revocation of `key` among the first `seen`, if any.
    pub fn revoked(&self, key: &PublicKey, seen: u32) -> Option<&Revocation> {
        self.revoked_keys
            .get(key)?
            .iter()
            .filter(|n| **n <= seen)
            .min()
            .and_then(|n| self.revocations.get(n))
    }

    /// Whether `envelope` carries `author`'s signature of its change (strictly).
    pub fn verify_envelope(&self, envelope: &Envelope, author: &[u8]) -> bool {
        let Ok(key) = <[u8; 32]>::try_from(author) else {
            return false;
        };
        match self.keys.get(&key) {
            Some(k) => k
                .verify_strict(
                    &Envelope::message(&envelope.hash, envelope.revocations_seen),
                    &Signature::from_bytes(&envelope.signature),
                )
                .is_ok(),
            None => envelope.verify(author),
        }
    }

    /// What `key` may do at time `at`, given that it had seen `seen` revocations.
    pub fn authority(&self, key: &[u8], at: i64, seen: u32) -> Result<Authority<'_>, Rejection> {
        let Ok(key) = <[u8; 32]>::try_from(key) else {
            return Err(Rejection::UnknownKey { author: short(key) });
        };
        if key == self.root {
            return Ok(Authority {
                roles: vec![Role::Central],
                scope: Vec::new(),
            });
        }
        let held = self.revocations_held();
        if seen > held {
            return Err(Rejection::MissingRevocations { seen, held });
        }
        if let Some(r) = self.revoked(&key, seen) {
            return Err(Rejection::Revoked {
                number: r.number,
                reason: r.reason.clone(),
            });
        }
        let certs = self.certificates(&key);
        if certs.is_empty() {
            return Err(Rejection::UnknownKey {
                author: short(&key),
            });
        }
        let valid: Vec<&Certificate> = certs
            .iter()
            .filter(|c| c.not_before <= at && at < c.not_after)
            .collect();
        if valid.is_empty() {
            let latest = certs.iter().map(|c| c.not_after).max().unwrap_or_default();
            if at >= latest {
                return Err(Rejection::Expired { at, until: latest });
            }
            let from = certs.iter().map(|c| c.not_before).min().unwrap_or_default();
            return Err(Rejection::NotYetValid { at, from });
        }
        let mut roles: Vec<Role> = valid.iter().flat_map(|c| c.roles.iter().copied()).collect();
        roles.sort();
        roles.dedup();
        let mut scope: Vec<&str> = valid
            .iter()
            .flat_map(|c| c.locations.iter().chain(&c.facilities))
            .map(String::as_str)
            .collect();
        scope.sort();
        scope.dedup();
        Ok(Authority { roles, scope })
    }
}
