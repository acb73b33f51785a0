//! Helpers for tests, benchmarks and simulations (feature `test-support`): keys, certificates,
//! documents signed by any key, and complete sessions between two engines in memory.

use fieldmesh_fhir_docs::{DocId, actor_for_key, new_document};
use fieldmesh_protocol::{DocPayload, Driver, Role, Totals, pair};
use fieldmesh_storage::MemStore;
use fieldmesh_trust::ed25519_dalek::SigningKey;
use fieldmesh_trust::{
    Certificate, Envelope, PeerKey, PublicKey, Revocation, certificate_resource, issue_certificate,
    issue_revocation, revocation_resource,
};
use serde_json::Value;

use crate::{Engine, EngineHost, NodeIdentity};

/// A deterministic key from a byte.
pub fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// The public key of `k`.
pub fn public(k: &SigningKey) -> PublicKey {
    k.verifying_key().to_bytes()
}

/// The peer key of `k`.
pub fn peer(k: &SigningKey) -> PeerKey {
    PeerKey(public(k))
}

/// An engine over an empty in-memory store for the node with key `secret`, in the deployment
/// rooted at `root`.
pub fn engine(secret: &[u8; 32], name: &str, root: &PublicKey) -> Engine {
    Engine::new(
        Box::new(MemStore::new()),
        NodeIdentity::new(format!("urn:fieldmesh:node:{name}"), secret, *root),
        64,
    )
}

/// A certificate for `subject` valid from `from` to `until` (Unix seconds).
pub fn certificate(
    subject: &SigningKey,
    user: &str,
    roles: &[fieldmesh_trust::Role],
    locations: &[&str],
    facilities: &[&str],
    (from, until): (i64, i64),
) -> Certificate {
    Certificate {
        serial: uuid::Uuid::new_v4().to_string(),
        subject: hex::encode(public(subject)),
        user: user.into(),
        roles: roles.to_vec(),
        locations: locations.iter().map(|s| s.to_string()).collect(),
        facilities: facilities.iter().map(|s| s.to_string()).collect(),
        not_before: from,
        not_after: until,
    }
}

/// A document created by `author` at `time` holding `json`, signed by `author` whatever it may
/// write (what a modified device could send), with the envelopes in wire form.
pub fn forge(author: &SigningKey, json: &Value, id: DocId, time: i64) -> DocPayload {
    let map = json.as_object().cloned().unwrap_or_default();
    let mut doc = match new_document(&map, actor_for_key(&public(author)), time) {
        Ok(d) => d,
        Err(e) => panic!("test document: {e}"),
    };
    let envelopes: Vec<Envelope> = doc
        .get_heads()
        .iter()
        .map(|h| {
            Envelope::sign(
                author,
                id.as_bytes(),
                json["resourceType"].as_str().unwrap_or_default(),
                h.0,
                0,
            )
        })
        .collect();
    DocPayload {
        id: *id.as_bytes(),
        ty: json["resourceType"].as_str().unwrap_or_default().into(),
        data: doc.save_nocompress(),
        envelopes: Envelope::encode_wire(&envelopes),
    }
}

/// The payload of document `id` (type `ty`) as `doc` holds it, every change signed by the key
/// among `keys` that authored it (changes by other actors go unsigned), envelopes in wire form:
/// what a peer sends for a document several nodes edited.
pub fn signed_payload(
    doc: &mut automerge::AutoCommit,
    id: DocId,
    ty: &str,
    keys: &[&SigningKey],
) -> DocPayload {
    let mut envelopes = Vec::new();
    for c in doc.get_changes(&[]) {
        let actor = c.actor_id().to_bytes().to_vec();
        if let Some(k) = keys.iter().find(|k| public(k)[..] == actor[..]) {
            envelopes.push(Envelope::sign(k, id.as_bytes(), ty, c.hash().0, 0));
        }
    }
    DocPayload {
        id: *id.as_bytes(),
        ty: ty.into(),
        data: doc.save_nocompress(),
        envelopes: Envelope::encode_wire(&envelopes),
    }
}

/// The certificate document central (`root`) authors for `cert`, as it syncs.
pub fn certificate_doc(root: &SigningKey, cert: &Certificate, time: i64) -> DocPayload {
    forge(
        root,
        &certificate_resource(&issue_certificate(root, cert), cert),
        DocId::new(),
        time,
    )
}

/// The revocation document central (`root`) authors for `rev`, as it syncs.
pub fn revocation_doc(root: &SigningKey, rev: &Revocation, time: i64) -> DocPayload {
    forge(
        root,
        &revocation_resource(&issue_revocation(root, rev), rev),
        DocId::new(),
        time,
    )
}

/// One complete session between `a` (initiator, key `ka`) and `b` (key `kb`), frames passed in
/// memory without faults. Returns both sides' totals.
pub fn sync_pair(
    a: &mut Engine,
    ka: &PeerKey,
    b: &mut Engine,
    kb: &PeerKey,
) -> Result<(Totals, Totals), String> {
    let start_a = a.sync_start(kb, "a").map_err(|e| e.to_string())?;
    let start_b = b.sync_start(ka, "b").map_err(|e| e.to_string())?;
    let mut da = Driver::new(Role::Initiator, start_a).map_err(|e| e.to_string())?;
    let mut db = Driver::new(Role::Responder, start_b).map_err(|e| e.to_string())?;
    let out = pair::run(
        &mut da,
        &mut EngineHost::new(a, *kb),
        &mut db,
        &mut EngineHost::new(b, *ka),
        &mut |_, _| true,
    )
    .map_err(|e| e.to_string())?;
    match (out.a, out.b, out.stopped) {
        (Some(ta), Some(tb), None) => Ok((ta, tb)),
        (_, _, Some(why)) => Err(why),
        _ => Err("the session stopped before it was complete".into()),
    }
}
