//! The trust model inside one node: what a node does with changes that fail authorization, with
//! replays and equivocations, and with local writes its certificate does not allow. Real engines
//! over in-memory stores, real Automerge changes, real signatures.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_engine::test_support::{certificate, certificate_doc, forge, key, peer, public};
use fieldmesh_engine::{Engine, MergeError, MergeReport, Source, WriteError, now};
use fieldmesh_fhir_docs::openimis::LOCATION_EXTENSION;
use fieldmesh_fhir_docs::{DocId, actor_for_key};
use fieldmesh_protocol::DocPayload;
use fieldmesh_trust::ed25519_dalek::SigningKey;
use fieldmesh_trust::{Envelope, Revocation, Role, issue_revocation, revocation_resource};
use serde_json::{Value, json};

const VILLAGE: &str = "village-a";

/// An engine for the node with secret `[n; 32]`, in the deployment rooted at `root`.
fn engine(n: u8, root: &SigningKey) -> Engine {
    fieldmesh_engine::test_support::engine(&[n; 32], &format!("n{n}"), &public(root))
}

fn cert_doc(
    root: &SigningKey,
    subject: &SigningKey,
    roles: &[Role],
    villages: &[&str],
) -> DocPayload {
    let cert = certificate(
        subject,
        "EO0001",
        roles,
        villages,
        &[],
        (now() - 3600, now() + 86_400),
    );
    certificate_doc(root, &cert, now())
}

fn patient(village: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": "Maïga"}], "birthDate": "1990-01-01",
        "address": [{"extension": [{"url": LOCATION_EXTENSION,
            "valueReference": {"reference": format!("Location/{village}")}}]}]})
}

fn reasons(e: &Engine) -> Vec<String> {
    e.store()
        .quarantined(100)
        .unwrap()
        .into_iter()
        .map(|q| q.reason)
        .collect()
}

fn report(changed: usize, refused: usize) -> MergeReport {
    MergeReport {
        changed,
        refused,
        outside: 0,
        stale: 0,
    }
}

/// A peer source for a key.
fn from(k: &SigningKey) -> Source {
    Source::Peer(peer(k))
}

/// A deployment: central (root), an officer certified for `VILLAGE`, and a receiving node, all
/// holding the officer's certificate.
struct Setup {
    root: SigningKey,
    officer: SigningKey,
    officer_engine: Engine,
    receiver: Engine,
}

fn setup() -> Setup {
    let root = key(1);
    let officer = key(2);
    let cert = cert_doc(&root, &officer, &[Role::EnrolmentOfficer], &[VILLAGE]);
    let mut officer_engine = engine(2, &root);
    let mut receiver = engine(3, &root);
    for e in [&mut officer_engine, &mut receiver] {
        assert_eq!(
            e.merge(vec![cert.clone()], &Source::Local).unwrap(),
            report(1, 0)
        );
        e.flush().unwrap();
    }
    Setup {
        root,
        officer,
        officer_engine,
        receiver,
    }
}

/// What the officer's node would send for its document `id` to a peer holding `heads`.
/// (Asked as by central, which every node serves.)
fn sent(e: &mut Engine, id: DocId, heads: Vec<[u8; 32]>) -> DocPayload {
    e.payloads(&peer(&key(1)), &[(*id.as_bytes(), heads)])
        .unwrap()
        .remove(0)
}

#[test]
fn signed_writes_in_scope_are_applied_and_replays_are_harmless() {
    let mut s = setup();
    let id = s
        .officer_engine
        .create(patient(VILLAGE), None, false, &|_| None)
        .unwrap();
    s.officer_engine.flush().unwrap();
    let p = sent(&mut s.officer_engine, id, vec![]);
    assert_eq!(p.envelopes.len(), Envelope::WIRE_LEN, "one signed change");
    assert_eq!(
        s.receiver
            .merge(vec![p.clone()], &from(&s.officer))
            .unwrap(),
        report(1, 0)
    );
    s.receiver.flush().unwrap();
    // The same message again (a replay of an old valid change) changes nothing.
    assert_eq!(
        s.receiver
            .merge(vec![p.clone()], &from(&s.officer))
            .unwrap(),
        report(0, 0)
    );
    s.receiver.flush().unwrap();
    assert!(reasons(&s.receiver).is_empty());
    // The receiver passes the document on with its signature.
    let relayed = sent(&mut s.receiver, id, vec![]);
    assert_eq!(relayed.envelopes, p.envelopes);
}

#[test]
fn refused_changes_are_quarantined_never_applied_never_forwarded() {
    let mut s = setup();
    let before = s.receiver.stats().unwrap().documents;
    // A forged signature, a key without a certificate, a Location from an officer, a Patient
    // in another village.
    let mut forged = forge(&s.officer, &patient(VILLAGE), DocId::new(), now());
    forged.envelopes[40] ^= 1;
    let stranger = forge(&key(9), &patient(VILLAGE), DocId::new(), now());
    let location = forge(
        &s.officer,
        &json!({"resourceType": "Location", "name": "Forged"}),
        DocId::new(),
        now(),
    );
    let elsewhere = forge(&s.officer, &patient("village-b"), DocId::new(), now());
    let ids: Vec<[u8; 16]> = [&forged, &stranger, &location, &elsewhere]
        .iter()
        .map(|p| p.id)
        .collect();
    let MergeReport {
        changed, refused, ..
    } = s
        .receiver
        .merge(
            vec![forged, stranger, location, elsewhere],
            &from(&s.officer),
        )
        .unwrap();
    s.receiver.flush().unwrap();
    assert_eq!((changed, refused), (0, 4));
    assert_eq!(s.receiver.stats().unwrap().documents, before);
    assert_eq!(s.receiver.stats().unwrap().quarantined, 4);
    let r = reasons(&s.receiver).join("\n");
    for expected in [
        "signature does not match",
        "has no certificate from central",
        "may not author reference data (Location)",
        "is outside the author's scope",
    ] {
        assert!(r.contains(expected), "{expected:?} not in\n{r}");
    }
    // Nothing of them is served to anyone.
    let wanted: Vec<([u8; 16], Vec<[u8; 32]>)> = ids.iter().map(|i| (*i, vec![])).collect();
    assert!(
        s.receiver
            .payloads(&peer(&key(1)), &wanted)
            .unwrap()
            .is_empty()
    );
    // Offered again, they are not quarantined twice.
    let again = forge(
        &key(9),
        &patient(VILLAGE),
        DocId(uuid::Uuid::from_bytes(ids[1])),
        now(),
    );
    s.receiver.merge(vec![again], &from(&s.officer)).unwrap();
    s.receiver.flush().unwrap();
    assert_eq!(s.receiver.stats().unwrap().quarantined, 4);
}

/// A receiver checks the signatures of a whole batch at once (`fieldmesh_trust::signature`):
/// forged signatures among hundreds of good ones, in several groups of the batch, refuse those
/// documents alone, and the good ones beside them are applied.
#[test]
fn forged_signatures_in_a_large_batch_refuse_those_documents_alone() {
    let mut s = setup();
    let before = s.receiver.stats().unwrap().documents;
    let mut batch: Vec<DocPayload> = (0..600)
        .map(|_| forge(&s.officer, &patient(VILLAGE), DocId::new(), now()))
        .collect();
    // A flipped bit, a signature made for another document (the signature binds the document),
    // and an `s` not below the group order.
    batch[0].envelopes[40] ^= 1;
    let other = batch[2].envelopes[12..].to_vec();
    batch[300].envelopes[12..].copy_from_slice(&other);
    let last = batch[599].envelopes.len() - 1;
    batch[599].envelopes[last] |= 0xf0;
    let bad: Vec<[u8; 16]> = [0, 300, 599].iter().map(|i| batch[*i].id).collect();
    let good: Vec<[u8; 16]> = batch
        .iter()
        .map(|p| p.id)
        .filter(|id| !bad.contains(id))
        .collect();
    let MergeReport {
        changed, refused, ..
    } = s.receiver.merge(batch, &from(&s.officer)).unwrap();
    s.receiver.flush().unwrap();
    assert_eq!((changed, refused), (597, 3));
    assert_eq!(s.receiver.stats().unwrap().documents, before + 597);
    assert_eq!(s.receiver.stats().unwrap().quarantined, 3);
    let r = reasons(&s.receiver);
    assert_eq!(r.len(), 3);
    assert!(
        r.iter().all(|r| r.contains("signature does not match")),
        "{r:?}"
    );
    let mut served = |ids: &[[u8; 16]]| {
        let wanted: Vec<([u8; 16], Vec<[u8; 32]>)> = ids.iter().map(|i| (*i, vec![])).collect();
        s.receiver.payloads(&peer(&key(1)), &wanted).unwrap().len()
    };
    assert_eq!(served(&bad), 0);
    assert_eq!(served(&good), 597);
}

#[test]
fn a_change_built_on_a_refused_change_is_refused_and_the_rest_applies() {
    let mut s = setup();
    // The officer creates a Patient (valid); a stranger edits it; the officer edits on top.
    let id = s
        .officer_engine
        .create(patient(VILLAGE), None, false, &|_| None)
        .unwrap();
    s.officer_engine.flush().unwrap();
    let base = sent(&mut s.officer_engine, id, vec![]);
    let mut doc = automerge::AutoCommit::load(&base.data).unwrap();
    let mut envelopes = base.envelopes.clone();
    let stranger = key(9);
    for (author, family) in [(&stranger, "Forged"), (&s.officer, "Maïga-Diallo")] {
        doc.set_actor(actor_for_key(&public(author)));
        let names = match automerge::ReadDoc::get(&doc, automerge::ROOT, "name").unwrap() {
            Some((_, obj)) => obj,
            None => panic!("no name"),
        };
        let first = match automerge::ReadDoc::get(&doc, &names, 0usize).unwrap() {
            Some((_, obj)) => obj,
            None => panic!("no name[0]"),
        };
        automerge::transaction::Transactable::put(&mut doc, &first, "family", family).unwrap();
        doc.commit_with(automerge::transaction::CommitOptions::default().with_time(now()));
        let head = doc.get_heads()[0].0;
        Envelope::sign(author, id.as_bytes(), "Patient", head, 0).encode_wire_into(&mut envelopes);
    }
    let p = DocPayload {
        data: doc.save_nocompress(),
        envelopes,
        ..base
    };
    let MergeReport {
        changed, refused, ..
    } = s.receiver.merge(vec![p], &from(&s.officer)).unwrap();
    s.receiver.flush().unwrap();
    assert_eq!((changed, refused), (1, 1));
    let r = reasons(&s.receiver).join("\n");
    assert!(r.contains("has no certificate"), "{r}");
    assert!(r.contains("builds on change"), "{r}");
    // Only the officer's creation is applied.
    let served = s
        .receiver
        .reader()
        .read("Patient", &id.to_string())
        .unwrap();
    assert_eq!(served.resource["name"][0]["family"], "Maïga");
}

#[test]
fn equivocation_is_quarantined() {
    let mut s = setup();
    let id = DocId::new();
    let p = forge(&s.officer, &patient(VILLAGE), id, now());
    s.receiver
        .merge(vec![p.clone()], &from(&s.officer))
        .unwrap();
    s.receiver.flush().unwrap();
    // The same author, the same sequence number (1), different content.
    let mut other = patient(VILLAGE);
    other["birthDate"] = json!("1991-01-01");
    let twin = forge(&s.officer, &other, id, now());
    let MergeReport {
        changed, refused, ..
    } = s.receiver.merge(vec![twin], &from(&s.officer)).unwrap();
    s.receiver.flush().unwrap();
    assert_eq!((changed, refused), (0, 1));
    assert!(
        reasons(&s.receiver).join("\n").contains("equivocation"),
        "{:?}",
        reasons(&s.receiver)
    );
    let served = s
        .receiver
        .reader()
        .read("Patient", &id.to_string())
        .unwrap();
    assert_eq!(served.resource["birthDate"], "1990-01-01");
}

#[test]
fn revocations_refuse_what_the_author_made_after_seeing_them() {
    let mut s = setup();
    let rev = Revocation {
        vouched: Vec::new(),
        number: 1,
        subject: hex::encode(public(&s.officer)),
        reason: "phone reported stolen".into(),
        issued: now(),
    };
    let rev_doc = forge(
        &s.root,
        &revocation_resource(&issue_revocation(&s.root, &rev), &rev),
        DocId::new(),
        now(),
    );
    // The officer's node learns of its own revocation, then writes anyway (byzantine).
    s.officer_engine
        .merge(vec![rev_doc.clone()], &Source::Local)
        .unwrap();
    s.officer_engine.flush().unwrap();
    assert!(matches!(
        s.officer_engine
            .create(patient(VILLAGE), None, false, &|_| None),
        Err(WriteError::Forbidden(_))
    ));
    s.officer_engine.play_byzantine();
    let id = s
        .officer_engine
        .create(patient(VILLAGE), None, false, &|_| None)
        .unwrap();
    s.officer_engine.flush().unwrap();
    let p = sent(&mut s.officer_engine, id, vec![]);
    // Without the revocation the receiver cannot decide yet; with it, it refuses.
    let MergeReport { refused, .. } = s
        .receiver
        .merge(vec![p.clone()], &from(&s.officer))
        .unwrap();
    s.receiver.flush().unwrap();
    assert_eq!(refused, 1);
    assert!(reasons(&s.receiver)[0].contains("revocations up to #1"));
    let mut fresh = setup().receiver;
    fresh.merge(vec![rev_doc, p], &from(&s.root)).unwrap();
    fresh.flush().unwrap();
    let r = reasons(&fresh).join("\n");
    assert!(
        r.contains("revoked (revocation #1: phone reported stolen)"),
        "{r}"
    );
}

#[test]
fn local_writes_outside_the_certificate_are_refused_at_once() {
    let mut s = setup();
    for (resource, expected) in [
        (
            json!({"resourceType": "Location", "name": "Mine"}),
            "may not author reference data (Location)",
        ),
        (patient("village-b"), "outside the author's scope"),
        (
            json!({"resourceType": "Claim", "patient": {"reference": "Patient/1"}, "created": "2026-01-01",
                   "billablePeriod": {"start": "2026-01-01"}, "provider": {"reference": "Organization/HF000"}}),
            "may not write claims (Claim)",
        ),
    ] {
        match s.officer_engine.create(resource, None, false, &|_| None) {
            Err(WriteError::Forbidden(r)) => {
                assert!(r.to_string().contains(expected), "{r}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    // Moving an insuree out of the officer's villages is refused too.
    let id = s
        .officer_engine
        .create(patient(VILLAGE), None, false, &|_| None)
        .unwrap();
    let moved = patient("village-b");
    assert!(matches!(
        s.officer_engine
            .update("Patient", &id.to_string(), moved, None),
        Err(WriteError::Forbidden(_))
    ));
    // A node without any certificate may write nothing.
    let mut nobody = engine(7, &s.root);
    assert!(matches!(
        nobody.create(patient(VILLAGE), None, false, &|_| None),
        Err(WriteError::Forbidden(_))
    ));
}

#[test]
fn an_uncertified_peer_is_served_only_certificates_and_may_send_only_certificates() {
    let mut s = setup();
    let id = s
        .officer_engine
        .create(patient(VILLAGE), None, false, &|_| None)
        .unwrap();
    s.officer_engine.flush().unwrap();
    // A key without a certificate.
    let stranger = key(9);
    let pk = peer(&stranger);
    let start = s.officer_engine.sync_start(&pk, "officer").unwrap();
    assert!(start.restricted);
    assert!(start.items.iter().all(|(i, _, _)| *i != *id.as_bytes()));
    assert!(
        s.officer_engine
            .payloads(&pk, &[(*id.as_bytes(), vec![])])
            .unwrap()
            .is_empty()
    );
    // Even a valid change relayed by the uncertified peer is refused whole, and nothing of it is
    // kept (not even in quarantine: a stranger must not be able to fill this node's disk).
    let p = sent(&mut s.officer_engine, id, vec![]);
    let before = s.receiver.store().stats().unwrap();
    assert!(matches!(
        s.receiver.merge(vec![p], &Source::Peer(pk)),
        Err(MergeError::Uncertified { .. })
    ));
    s.receiver.flush().unwrap();
    let after = s.receiver.store().stats().unwrap();
    assert_eq!(
        (after.documents, after.quarantined, after.last_seq),
        (before.documents, before.quarantined, before.last_seq)
    );
    // The officer itself is certified.
    let officer_peer = peer(&s.officer);
    assert!(
        !s.receiver
            .sync_start(&officer_peer, "receiver")
            .unwrap()
            .restricted
    );
}

/// Regression (found by the simulation): a document merged from a peer was kept as an Automerge
/// fork, whose actor is random, so this node's next edit of it was authored by a random actor and
/// every peer refused its signature.
#[test]
fn an_edit_after_a_merge_is_authored_and_signed_by_this_node() {
    let mut s = setup();
    let officer2 = key(4);
    let cert = cert_doc(&s.root, &officer2, &[Role::EnrolmentOfficer], &[VILLAGE]);
    let mut b = engine(4, &s.root);
    let officer_cert = cert_doc(&s.root, &s.officer, &[Role::EnrolmentOfficer], &[VILLAGE]);
    b.merge(vec![cert.clone(), officer_cert], &Source::Local)
        .unwrap();
    s.officer_engine.merge(vec![cert], &Source::Local).unwrap();
    let id = s
        .officer_engine
        .create(patient(VILLAGE), None, false, &|_| None)
        .unwrap();
    s.officer_engine.flush().unwrap();
    b.merge(
        vec![sent(&mut s.officer_engine, id, vec![])],
        &from(&s.officer),
    )
    .unwrap();
    b.flush().unwrap();
    // A edits; B merges the edit into the document it holds, then edits it itself.
    let sid = id.to_string();
    let mut r = s
        .officer_engine
        .reader()
        .read("Patient", &sid)
        .unwrap()
        .resource;
    r["gender"] = json!("female");
    s.officer_engine.update("Patient", &sid, r, None).unwrap();
    s.officer_engine.flush().unwrap();
    b.merge(
        vec![sent(&mut s.officer_engine, id, vec![])],
        &from(&s.officer),
    )
    .unwrap();
    b.flush().unwrap();
    let mut r = b.reader().read("Patient", &sid).unwrap().resource;
    r["telecom"] = json!([{"system": "phone", "value": "+227 90 00 00 00"}]);
    b.update("Patient", &sid, r, None).unwrap();
    b.flush().unwrap();
    let MergeReport {
        changed, refused, ..
    } = s
        .officer_engine
        .merge(vec![sent(&mut b, id, vec![])], &from(&s.officer))
        .unwrap();
    s.officer_engine.flush().unwrap();
    assert_eq!(
        (changed, refused),
        (1, 0),
        "{:?}",
        reasons(&s.officer_engine)
    );
    let merged = s
        .officer_engine
        .reader()
        .read("Patient", &sid)
        .unwrap()
        .resource;
    assert_eq!(merged["telecom"][0]["value"], "+227 90 00 00 00");
}
