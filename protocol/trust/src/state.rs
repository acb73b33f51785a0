//! The trust state of a node: the root, every certificate and revocation it holds, and what a key
//! may do at a given time.

use std::collections::{BTreeMap, HashMap, HashSet};

use ed25519_zebra::VerificationKey;
use fieldmesh_fhir_docs::openimis::Role;

use crate::keys::short;
use crate::{
    Certificate, Envelope, PublicKey, Rejection, Revocation, TrustError, parse_key,
    verify_certificate, verify_revocation,
};

/// What a change's author may do, as its certificates say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority<'a> {
    /// Roles (union over the valid certificates that start latest: a renewal supersedes).
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
    /// Proven equivocations: per key and document, the lowest sequence number equivocated.
    equivocations: HashMap<(PublicKey, [u8; 16]), u64>,
    /// The changes of revoked keys central vouched for: per key, per document, the heads.
    vouched: HashMap<PublicKey, HashMap<[u8; 16], Vec<[u8; 32]>>>,
    /// Decompressed keys of the root and of every certified key (decompressing costs about a
    /// tenth of a signature check); a key [`crate::signature::key`] refuses is absent.
    keys: HashMap<PublicKey, VerificationKey>,
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
            vouched: HashMap::new(),
            equivocations: HashMap::new(),
            keys: crate::signature::key(&root)
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
        if token.starts_with("fme1.") {
            let e = crate::evidence::verify_evidence(token)?;
            let seq = self.equivocations.entry((e.key, e.doc)).or_insert(u64::MAX);
            let new = e.seq < *seq;
            *seq = (*seq).min(e.seq);
            return Ok(new);
        }
        if token.starts_with("fmr1.") {
            let rev = verify_revocation(&self.root, token)?;
            if self.revocations.contains_key(&rev.number) {
                return Ok(false);
            }
            let key = parse_key(&rev.subject)?;
            self.revoked_keys.entry(key).or_default().push(rev.number);
            let vouched = self.vouched.entry(key).or_default();
            for v in &rev.vouched {
                let doc = uuid_bytes(&v.doc);
                let head = hex::decode(&v.head)
                    .ok()
                    .and_then(|h| <[u8; 32]>::try_from(h).ok());
                if let (Some(doc), Some(head)) = (doc, head) {
                    vouched.entry(doc).or_default().push(head);
                }
            }
            self.revocations.insert(rev.number, rev);
            return Ok(true);
        }
        let cert = verify_certificate(&self.root, token)?;
        if !self.serials.insert(cert.serial.clone()) {
            return Ok(false);
        }
        let key = cert.subject_key()?;
        if let Some(k) = crate::signature::key(&key) {
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

    /// The lowest sequence number at which `key` is proven to have equivocated in document
    /// `doc`, if it is.
    pub fn equivocated(&self, key: &[u8], doc: &[u8; 16]) -> Option<u64> {
        let key = <[u8; 32]>::try_from(key).ok()?;
        self.equivocations.get(&(key, *doc)).copied()
    }

    /// Whether the node `me` serves `peer` at its time `now`: sends it documents, takes its
    /// documents, relays for it. The root always; a revoked key never; otherwise a key with a
    /// certificate valid now (one starting within a day is accepted: clocks drift). Decided by
    /// the node's own clock, with one exception: a node whose clock is outside its own
    /// certificate's validity does not trust its clock for this (it would cut itself off from
    /// every peer) and asks only for an unrevoked certificate. A peer not served gets only the
    /// certificates about itself (its renewal) and may send only certificates. Changes are
    /// decided on their own facts, alike everywhere, whoever serves whom.
    pub fn serves(&self, me: &PublicKey, peer: &PublicKey, now: i64) -> bool {
        /// How far ahead of the clock a certificate may start.
        const SKEW: i64 = 86_400;
        if *peer == self.root {
            return true;
        }
        if self.revocation_of(peer).is_some() {
            return false;
        }
        let clock_trusted = *me == self.root
            || self
                .certificates(me)
                .iter()
                .any(|c| c.not_before <= now && now < c.not_after);
        self.certificates(peer)
            .iter()
            .any(|c| !clock_trusted || (c.not_before - SKEW <= now && now < c.not_after))
    }

    /// The first revocation of `key` this node holds, whatever the key claims to have seen.
    pub fn revocation_of(&self, key: &[u8]) -> Option<&Revocation> {
        let key = <[u8; 32]>::try_from(key).ok()?;
        self.revoked_keys
            .get(&key)?
            .iter()
            .min()
            .and_then(|n| self.revocations.get(n))
    }

    /// The changes by the revoked key `author` in document `doc` that central vouched for:
    /// the vouched heads and their ancestors among `changes` (every change of the document, as
    /// `(hash, dependencies)`). Empty if central vouched for none.
    pub fn vouched_changes(
        &self,
        author: &[u8],
        doc: &[u8; 16],
        changes: &[([u8; 32], Vec<[u8; 32]>)],
    ) -> HashSet<[u8; 32]> {
        let mut out = HashSet::new();
        let Some(heads) = <[u8; 32]>::try_from(author)
            .ok()
            .and_then(|k| self.vouched.get(&k))
            .and_then(|docs| docs.get(doc))
        else {
            return out;
        };
        let deps: HashMap<[u8; 32], &Vec<[u8; 32]>> =
            changes.iter().map(|(h, d)| (*h, d)).collect();
        let mut todo: Vec<[u8; 32]> = heads
            .iter()
            .filter(|h| deps.contains_key(*h))
            .copied()
            .collect();
        while let Some(h) = todo.pop() {
            if out.insert(h)
                && let Some(d) = deps.get(&h)
            {
                todo.extend(d.iter().filter(|x| !out.contains(*x)));
            }
        }
        out
    }

    /// Whether `envelope` carries `author`'s signature of its change, made in document `doc` of
    /// type `ty`, under the rule of [`crate::signature`].
    pub fn verify_envelope(
        &self,
        envelope: &Envelope,
        author: &[u8],
        doc: &[u8; 16],
        ty: &str,
    ) -> bool {
        let Ok(key) = <[u8; 32]>::try_from(author) else {
            return false;
        };
        match self.keys.get(&key) {
            Some(k) => crate::signature::verify(
                k,
                &Envelope::message(doc, ty, &envelope.hash, envelope.revocations_seen),
                &envelope.signature,
            ),
            None => envelope.verify(author, doc, ty),
        }
    }

    /// Checks many envelopes at once: for each `(envelope, author, doc, type)`, whether
    /// [`Trust::verify_envelope`] holds, decided exactly as it decides (in batches, see
    /// [`crate::signature`]). A receiver checks a whole sync batch this way.
    pub fn verify_envelopes(&self, items: &[(&Envelope, &[u8], &[u8; 16], &str)]) -> Vec<bool> {
        let mut out = vec![false; items.len()];
        let mut signed = Vec::with_capacity(items.len());
        let mut at = Vec::with_capacity(items.len());
        for (i, (envelope, author, doc, ty)) in items.iter().enumerate() {
            let Ok(key) = <&[u8; 32]>::try_from(*author) else {
                continue;
            };
            signed.push(crate::signature::Signed {
                key,
                message: Envelope::message(doc, ty, &envelope.hash, envelope.revocations_seen),
                signature: envelope.signature,
            });
            at.push(i);
        }
        for (i, ok) in at.into_iter().zip(crate::signature::verify_all(&signed)) {
            out[i] = ok;
        }
        out
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
        // A renewal supersedes: of the certificates valid at `at`, those issued to start latest
        // decide (a device re-scoped to other villages writes in the new ones from the new
        // certificate's start; what it wrote before is judged by the certificate it had).
        let latest = valid.iter().map(|c| c.not_before).max().unwrap_or_default();
        let valid: Vec<&Certificate> = valid
            .into_iter()
            .filter(|c| c.not_before == latest)
            .collect();
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

/// The 16 bytes of a UUID written as text (hyphens optional).
fn uuid_bytes(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    <[u8; 16]>::try_from(hex::decode(hex).ok()?).ok()
}
