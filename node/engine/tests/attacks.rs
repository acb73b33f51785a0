//! Certified but malicious (or stolen) devices: each test performs one attack from the audit of
//! the trust rules with real Automerge changes, real signatures and real engines, and checks that
//! an honest node refuses it (and still takes the honest writes around it).
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{AutoCommit, ObjType, ROOT, ReadDoc};
use fieldmesh_engine::test_support::{
    certificate, certificate_doc, forge, key, peer, public, signed_payload,
};
use fieldmesh_engine::{Engine, MergeReport, Source, WriteError, now};
use fieldmesh_fhir_docs::identifiers::OPENIMIS_IDENTIFIER_TYPES;
use fieldmesh_fhir_docs::openimis::{LOCATION_EXTENSION, PLACE_EXTENSION};
use fieldmesh_fhir_docs::{DocId, actor_for_key, new_document};
use fieldmesh_protocol::DocPayload;
use fieldmesh_trust::Role;
use fieldmesh_trust::ed25519_dalek::SigningKey;
use serde_json::{Value, json};

const A: &str = "village-a";
const B: &str = "village-b";

fn engine(n: u8, root: &SigningKey) -> Engine {
    fieldmesh_engine::test_support::engine(&[n; 32], &format!("n{n}"), &public(root))
}

fn cert_doc(root: &SigningKey, subject: &SigningKey, villages: &[&str]) -> DocPayload {
    let cert = certificate(
        subject,
        "EO",
        &[Role::EnrolmentOfficer],
        villages,
        &[],
        (now() - 3600, now() + 86_400),
    );
    certificate_doc(root, &cert, now())
}

fn place(village: &str) -> Value {
    json!({"url": LOCATION_EXTENSION, "valueReference": {"reference": format!("Location/{village}")}})
}

fn patient_in(villages: &[&str], chfid: &str) -> Value {
    let addresses: Vec<Value> = villages
        .iter()
        .map(|v| json!({"extension": [place(v)]}))
        .collect();
    json!({"resourceType": "Patient", "name": [{"family": "Maïga"}], "birthDate": "1990-01-01",
        "identifier": [{"type": {"coding": [{"system": OPENIMIS_IDENTIFIER_TYPES, "code": "Code"}]}, "value": chfid}],
        "address": addresses})
}

fn reasons(e: &Engine) -> String {
    e.store()
        .quarantined(100)
        .unwrap()
        .into_iter()
        .map(|q| q.reason)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Central (root), officer A (village-a), officer B (village-b), and an honest receiver holding
/// both certificates.
struct World {
    root: SigningKey,
    a: SigningKey,
    b: SigningKey,
    a_node: Engine,
    b_node: Engine,
    receiver: Engine,
}

fn world() -> World {
    let root = key(1);
    let (a, b) = (key(2), key(3));
    let certs = vec![cert_doc(&root, &a, &[A]), cert_doc(&root, &b, &[B])];
    let mut nodes: Vec<Engine> = (2..=4).map(|n| engine(n, &root)).collect();
    for n in &mut nodes {
        n.merge(certs.clone(), &Source::Local).unwrap();
        n.flush().unwrap();
    }
    let receiver = nodes.pop().unwrap();
    let b_node = nodes.pop().unwrap();
    let a_node = nodes.pop().unwrap();
    World {
        root,
        a,
        b,
        a_node,
        b_node,
        receiver,
    }
}

/// What `e` sends for its document `id` (asked as by central, which every node serves).
fn sent(e: &mut Engine, id: DocId) -> DocPayload {
    e.payloads(&peer(&key(1)), &[(*id.as_bytes(), vec![])])
        .unwrap()
        .remove(0)
}

fn merge(e: &mut Engine, p: DocPayload, k: &SigningKey) -> MergeReport {
    let r = e.merge(vec![p], &Source::Peer(peer(k))).unwrap();
    e.flush().unwrap();
    r
}

fn accepted() -> MergeReport {
    MergeReport {
        changed: 1,
        refused: 0,
        outside: 0,
        stale: 0,
    }
}

fn refused() -> MergeReport {
    MergeReport {
        changed: 0,
        refused: 1,
        outside: 0,
        stale: 0,
    }
}

#[test]
fn every_place_a_document_names_must_be_in_scope() {
    let mut w = world();
    // One address in the officer's village and one outside.
    let both = forge(&w.b, &patient_in(&[B, A], "1"), DocId::new(), now());
    assert_eq!(merge(&mut w.receiver, both, &w.b), refused());
    // A reference whose URL merely ends in the officer's own village code.
    let mut url = patient_in(&[B], "2");
    url["address"][0]["extension"][0]["valueReference"]["reference"] =
        json!(format!("https://elsewhere.example/fhir/Location/{B}"));
    assert_eq!(
        merge(
            &mut w.receiver,
            forge(&w.b, &url, DocId::new(), now()),
            &w.b
        ),
        refused()
    );
    // A place extension that names nothing.
    let mut nothing = patient_in(&[B], "3");
    nothing["address"][0]["extension"]
        .as_array_mut()
        .unwrap()
        .push(json!({"url": LOCATION_EXTENSION, "valueString": B}));
    assert_eq!(
        merge(
            &mut w.receiver,
            forge(&w.b, &nothing, DocId::new(), now()),
            &w.b
        ),
        refused()
    );
    let r = reasons(&w.receiver);
    assert!(r.contains("village-a, village-b is outside"), "{r}");
    assert!(r.contains("https://elsewhere.example"), "{r}");
    assert!(r.contains("unresolvable reference"), "{r}");
    // The honest case still passes.
    let fine = forge(&w.b, &patient_in(&[B], "4"), DocId::new(), now());
    assert_eq!(merge(&mut w.receiver, fine, &w.b), accepted());
}

#[test]
fn policies_and_payments_lie_where_their_family_lives() {
    let mut w = world();
    // Officer A enrols a family in village-a and writes its policy on its own phone: the
    // policy carries the family's village, read from the family.
    let head = w
        .a_node
        .create(patient_in(&[A], "100"), None, false, &|_| None)
        .unwrap();
    let family = w
        .a_node
        .create(
            json!({"resourceType": "Group", "type": "person", "actual": true,
                "member": [{"entity": {"reference": format!("Patient/{head}")}}],
                "address": [{"extension": [place(A)]}]}),
            None,
            false,
            &|_| None,
        )
        .unwrap();
    let contract = json!({"resourceType": "Contract", "status": "offered",
        "subject": [{"reference": format!("Group/{family}")}],
        "term": [{"asset": [{"period": [{"start": "2026-01-10"}],
            "valuedItem": [{"entityReference": {"reference": "InsurancePlan/6a1f0b7e-0000-4000-8000-000000000001"}}]}]}]});
    let policy = w
        .a_node
        .create(contract.clone(), None, false, &|_| None)
        .unwrap();
    w.a_node.flush().unwrap();
    let served = w.a_node.served("Contract", &policy.to_string()).unwrap();
    let ext = served.resource["extension"].to_string();
    assert!(ext.contains(PLACE_EXTENSION) && ext.contains(A), "{ext}");
    for id in [head, family, policy] {
        let p = sent(&mut w.a_node, id);
        assert_eq!(merge(&mut w.receiver, p, &w.a), accepted());
    }

    // Officer B forges a policy, a coverage, a payment for A's family: whether it declares
    // A's village, nothing, or its own village alongside, the receiver refuses.
    let declared = |ty: &str, villages: &[&str]| {
        let ext: Vec<Value> = villages
            .iter()
            .map(|v| json!({"url": PLACE_EXTENSION, "valueReference": {"type": "Location", "identifier": {"value": v}}}))
            .collect();
        let mut r = json!({"resourceType": ty, "extension": ext});
        match ty {
            "Contract" => {
                r["subject"] =
                    json!([{"type": "Group", "identifier": {"value": family.to_string()}}])
            }
            "PaymentNotice" => {
                r["amount"] = json!({"value": 999_999, "currency": "XOF"});
                r["status"] = json!("active");
            }
            _ => r["beneficiary"] = json!({"type": "Patient", "identifier": {"value": "100"}}),
        }
        forge(&w.b, &r, DocId::new(), now())
    };
    for (ty, villages) in [
        ("Contract", vec![A]),
        ("Contract", vec![]),
        ("Coverage", vec![A, B]),
        ("PaymentNotice", vec![A]),
        ("Invoice", vec![]),
    ] {
        assert_eq!(
            merge(&mut w.receiver, declared(ty, &villages), &w.b),
            refused(),
            "{ty} {villages:?}"
        );
    }
    // B terminates A's policy: the policy lies in village-a, outside B's scope.
    let mut doc = AutoCommit::load(&sent(&mut w.a_node, policy).data)
        .unwrap()
        .with_actor(actor_for_key(&public(&w.b)));
    doc.put(ROOT, "status", "terminated").unwrap();
    doc.commit_with(CommitOptions::default().with_time(now()));
    let p = signed_payload(&mut doc, policy, "Contract", &[&w.a, &w.b]);
    // Refused: not a stale copy to tell B about either (only accepted merges count).
    assert_eq!(merge(&mut w.receiver, p, &w.b), refused());
    let r = reasons(&w.receiver);
    assert!(r.contains("Contract at village-a is outside"), "{r}");
    assert!(r.contains("Contract at no place"), "{r}");
    let held = w
        .receiver
        .reader()
        .read("Contract", &policy.to_string())
        .unwrap();
    assert_eq!(held.resource["status"], "offered");

    // An honest officer B cannot even write it: it does not hold the family it would concern.
    let err = w
        .b_node
        .create(contract, None, false, &|_| None)
        .unwrap_err();
    assert!(
        matches!(err, WriteError::Invalid(_)) && err.to_string().contains("names no insuree"),
        "{err}"
    );
}

/// The place reference of a Patient written as Automerge text (which fieldmesh never writes,
/// but a peer can): two officers' concurrent edits of its characters, each in scope alone,
/// merge into a village neither holds. An officer scoped only for that village may not then
/// edit the Patient: the merge lies where its branches lie.
#[test]
fn a_merge_never_moves_a_document_out_of_its_authors_scope() {
    let root = key(1);
    let (o1, o2, o3) = (key(5), key(6), key(7));
    let certs = vec![
        cert_doc(&root, &o1, &["A1", "B1"]),
        cert_doc(&root, &o2, &["A1", "A2"]),
        cert_doc(&root, &o3, &["B2"]),
    ];
    let mut receiver = engine(8, &root);
    receiver.merge(certs, &Source::Local).unwrap();
    receiver.flush().unwrap();

    // Central creates the Patient in A1, its village code as text.
    let id = DocId::new();
    let mut json = patient_in(&["A1"], "200");
    json["address"][0]["extension"][0]["valueReference"] =
        json!({"type": "Location", "identifier": {"value": "A1"}});
    let mut doc = new_document(
        json.as_object().unwrap(),
        actor_for_key(&public(&root)),
        now(),
    )
    .unwrap();
    let (_, address) = doc.get(ROOT, "address").unwrap().unwrap();
    let (_, first) = doc.get(&address, 0).unwrap().unwrap();
    let (_, ext) = doc.get(&first, "extension").unwrap().unwrap();
    let (_, loc) = doc.get(&ext, 0).unwrap().unwrap();
    let (_, reference) = doc.get(&loc, "valueReference").unwrap().unwrap();
    let (_, ident) = doc.get(&reference, "identifier").unwrap().unwrap();
    let text = doc.put_object(&ident, "value", ObjType::Text).unwrap();
    doc.splice_text(&text, 0, 0, "A1").unwrap();
    doc.commit_with(CommitOptions::default().with_time(now()));
    // O1 makes it B1; O2, concurrently, A2.
    let mut one = doc.fork().with_actor(actor_for_key(&public(&o1)));
    one.splice_text(&text, 0, 1, "B").unwrap();
    one.commit_with(CommitOptions::default().with_time(now()));
    let mut two = doc.fork().with_actor(actor_for_key(&public(&o2)));
    two.splice_text(&text, 1, 1, "2").unwrap();
    two.commit_with(CommitOptions::default().with_time(now()));
    let mut merged = one.fork().with_actor(actor_for_key(&public(&o3)));
    merged.merge(&mut two).unwrap();
    assert_eq!(merged.text(&text).unwrap(), "B2");
    // O3, scoped for B2 only, edits the merged Patient.
    merged.put(&first, "text", "moved").unwrap();
    merged.commit_with(CommitOptions::default().with_time(now()));
    let p = signed_payload(&mut merged, id, "Patient", &[&root, &o1, &o2, &o3]);
    let r = receiver.merge(vec![p], &Source::Local).unwrap();
    receiver.flush().unwrap();
    assert_eq!(
        r,
        MergeReport {
            changed: 1,
            refused: 1,
            outside: 0,
            stale: 0,
        }
    );
    let why = reasons(&receiver);
    assert!(why.contains("Patient at A2, B1 is outside"), "{why}");
    let held = receiver.reader().read("Patient", &id.to_string()).unwrap();
    assert!(held.resource["address"][0].get("text").is_none());
}

#[test]
fn a_node_identifier_names_only_its_own_document_and_duplicates_never_redirect() {
    let mut w = world();
    let head = w
        .a_node
        .create(patient_in(&[A], "300"), None, false, &|_| None)
        .unwrap();
    w.a_node.flush().unwrap();
    let p = sent(&mut w.a_node, head);
    assert_eq!(merge(&mut w.receiver, p, &w.a), accepted());
    // B's impostor: the lowest possible id, A's node identifier for A's insuree, A's CHFID.
    let impostor_id = DocId(uuid::Uuid::nil());
    let mut impostor = patient_in(&[B], "300");
    impostor["identifier"]
        .as_array_mut()
        .unwrap()
        .push(json!({"system": "urn:fieldmesh:node:n2", "value": head.to_string()}));
    let forged = forge(&w.b, &impostor, impostor_id, now());
    assert_eq!(merge(&mut w.receiver, forged, &w.b), refused());
    assert!(
        reasons(&w.receiver).contains("claims the identifier urn:fieldmesh:node:n2"),
        "{}",
        reasons(&w.receiver)
    );
    // Without the stolen node identifier, B's duplicate registration is its own insuree in its
    // own village and is kept; but the CHFID it shares with A's insuree now names no one: a
    // claim that names the CHFID resolves to neither, and references by id are untouched.
    let twin = forge(&w.b, &patient_in(&[B], "300"), impostor_id, now());
    assert_eq!(merge(&mut w.receiver, twin, &w.b), accepted());
    let claim = json!({"resourceType": "Claim", "status": "active", "use": "claim",
        "created": "2026-01-01", "billablePeriod": {"start": "2026-01-01"},
        "patient": {"type": "Patient", "identifier": {"type": {"coding": [{"system": OPENIMIS_IDENTIFIER_TYPES, "code": "Code"}]}, "value": "300"}},
        "provider": {"type": "Organization", "identifier": {"value": "HF1"}}});
    let claim_id = DocId::new();
    assert_eq!(
        merge(
            &mut w.receiver,
            forge(&w.root, &claim, claim_id, now()),
            &w.root
        ),
        accepted()
    );
    let read = w
        .receiver
        .reader()
        .read("Claim", &claim_id.to_string())
        .unwrap();
    assert!(
        read.resource["patient"].get("reference").is_none(),
        "an ambiguous CHFID resolved to {}",
        read.resource["patient"]
    );
    let family = json!({"resourceType": "Group", "type": "person", "actual": true,
        "member": [{"entity": {"type": "Patient", "identifier": {"system": "urn:fieldmesh:node:n2", "value": head.to_string()}}}],
        "address": [{"extension": [place(A)]}]});
    let family_id = DocId::new();
    assert_eq!(
        merge(
            &mut w.receiver,
            forge(&w.a, &family, family_id, now()),
            &w.a
        ),
        accepted()
    );
    let read = w
        .receiver
        .reader()
        .read("Group", &family_id.to_string())
        .unwrap();
    assert_eq!(
        read.resource["member"][0]["entity"]["reference"],
        format!("Patient/{head}")
    );
}

#[test]
fn a_change_signed_for_one_document_is_refused_in_another() {
    let mut w = world();
    // A certificate document central signed, replayed under a new document id.
    let mut replay = cert_doc(&w.root, &key(9), &[B]);
    replay.id = *DocId::new().as_bytes();
    assert_eq!(merge(&mut w.receiver, replay, &w.b), refused());
    // An officer's insuree replayed as another insuree.
    let id = w
        .a_node
        .create(patient_in(&[A], "400"), None, false, &|_| None)
        .unwrap();
    w.a_node.flush().unwrap();
    let mut p = sent(&mut w.a_node, id);
    p.id = *DocId::new().as_bytes();
    assert_eq!(merge(&mut w.receiver, p, &w.a), refused());
    let r = reasons(&w.receiver);
    assert_eq!(r.matches("signature does not match").count(), 2, "{r}");
}

/// A stolen phone keeps its key: the thief writes new insurees and edits old ones, claiming a
/// clock inside the certificate's validity and no revocation seen. Once central revokes the key
/// (vouching for the changes it held), every honest node ends with the same thing: what central
/// vouched for. A node that accepted the thief's changes before the revocation reached it takes
/// them out; a node that learns the revocation first refuses them; neither serves the phone.
#[test]
fn a_stolen_phone_cannot_write_past_its_revocation() {
    use fieldmesh_engine::test_support::revocation_doc;
    use fieldmesh_trust::Revocation;
    let mut w = world();
    let mut central = engine(1, &w.root);
    let mut late = engine(5, &w.root);
    for n in [&mut central, &mut late] {
        n.merge(
            vec![cert_doc(&w.root, &w.a, &[A]), cert_doc(&w.root, &w.b, &[B])],
            &Source::Local,
        )
        .unwrap();
        n.flush().unwrap();
    }
    // While the officer holds it, the phone enrols an insuree; it reaches central.
    let p1 = w
        .a_node
        .create(patient_in(&[A], "500"), None, false, &|_| None)
        .unwrap();
    w.a_node.flush().unwrap();
    let first = sent(&mut w.a_node, p1);
    assert_eq!(merge(&mut central, first.clone(), &w.a), accepted());
    assert_eq!(merge(&mut w.receiver, first, &w.a), accepted());
    // Stolen: a new insuree, and an edit of the first, synced to the receiver at once.
    let p2 = w
        .a_node
        .create(patient_in(&[A], "501"), None, false, &|_| None)
        .unwrap();
    let mut edited = patient_in(&[A], "500");
    edited["name"] = json!([{"family": "Thief"}]);
    w.a_node
        .update("Patient", &p1.to_string(), edited, None)
        .unwrap();
    w.a_node.flush().unwrap();
    let (p2_sent, p1_sent) = (sent(&mut w.a_node, p2), sent(&mut w.a_node, p1));
    assert_eq!(merge(&mut w.receiver, p2_sent.clone(), &w.a), accepted());
    assert_eq!(merge(&mut w.receiver, p1_sent.clone(), &w.a), accepted());
    // Central revokes the key, vouching for what it holds.
    let vouched = central.authored_heads(&public(&w.a)).unwrap();
    assert_eq!(vouched.len(), 1);
    let rev = revocation_doc(
        &w.root,
        &Revocation {
            vouched,
            number: 1,
            subject: hex::encode(public(&w.a)),
            reason: "phone stolen".into(),
            issued: now(),
        },
        now(),
    );
    // The receiver learns of it and takes the thief's changes out.
    merge(&mut w.receiver, rev.clone(), &w.root);
    let reader = w.receiver.reader();
    assert!(reader.read("Patient", &p2.to_string()).is_err());
    let p1_read = reader.read("Patient", &p1.to_string()).unwrap();
    assert_eq!(p1_read.resource["name"][0]["family"], "Maïga");
    assert!(reasons(&w.receiver).contains("revoked key"));
    // A node that learns the revocation first refuses the same changes, whatever they claim.
    merge(&mut late, rev, &w.root);
    let r = late
        .merge(vec![p2_sent, p1_sent], &Source::Peer(peer(&w.b)))
        .unwrap();
    late.flush().unwrap();
    assert_eq!(
        r,
        MergeReport {
            changed: 1,
            refused: 2,
            outside: 0,
            stale: 1,
        }
    );
    let why = reasons(&late);
    assert!(
        why.contains("central did not hold this change when it revoked it"),
        "{why}"
    );
    let late_p1 = late.reader().read("Patient", &p1.to_string()).unwrap();
    assert_eq!(
        late_p1.version, p1_read.version,
        "both hold what central vouched for"
    );
    assert!(late.reader().read("Patient", &p2.to_string()).is_err());
    // Neither serves the phone any more, nor takes anything but certificates from it.
    assert!(!w.receiver.certified(&Source::Peer(peer(&w.a))));
    let start = w.receiver.sync_start(&peer(&w.a), "receiver").unwrap();
    assert!(start.restricted);
    assert!(
        start.items.len() <= 2,
        "only its own certificate and revocation"
    );
}

/// A key signs two different changes under one sequence number and sends one to each of two
/// honest hubs. The hub that meets the second writes the evidence; once it reaches the other,
/// both hold the same document (neither branch), and a branch sent later is refused.
#[test]
fn an_equivocation_ends_with_the_same_document_on_every_honest_node() {
    let mut w = world();
    let (h1, h2) = (key(11), key(12));
    let hub_cert = |k: &SigningKey| {
        certificate_doc(
            &w.root,
            &certificate(
                k,
                "HUB",
                &[Role::Hub],
                &[A],
                &[],
                (now() - 3600, now() + 86_400),
            ),
            now(),
        )
    };
    let certs = vec![cert_doc(&w.root, &w.a, &[A]), hub_cert(&h1), hub_cert(&h2)];
    let mut hubs: Vec<Engine> = [11u8, 12].iter().map(|n| engine(*n, &w.root)).collect();
    for h in &mut hubs {
        h.merge(certs.clone(), &Source::Local).unwrap();
        h.flush().unwrap();
    }
    let id = w
        .a_node
        .create(patient_in(&[A], "600"), None, false, &|_| None)
        .unwrap();
    w.a_node.flush().unwrap();
    let base = sent(&mut w.a_node, id);
    for h in &mut hubs {
        assert_eq!(merge(h, base.clone(), &w.a), accepted());
    }
    // Two different changes, both numbered 2, both signed by the officer's key.
    let branch = |family: &str| {
        let mut doc = AutoCommit::load(&base.data)
            .unwrap()
            .with_actor(actor_for_key(&public(&w.a)));
        let (_, names) = doc.get(ROOT, "name").unwrap().unwrap();
        let (_, first) = doc.get(&names, 0).unwrap().unwrap();
        doc.put(&first, "family", family).unwrap();
        doc.commit_with(CommitOptions::default().with_time(now()));
        signed_payload(&mut doc, id, "Patient", &[&w.a])
    };
    let (left, right) = (branch("Left"), branch("Right"));
    assert_eq!(merge(&mut hubs[0], left.clone(), &w.a), accepted());
    assert_eq!(merge(&mut hubs[1], right.clone(), &w.a), accepted());
    // Hub 1 meets the other branch: evidence, and its own branch taken out.
    let r = merge(&mut hubs[0], right, &h2);
    assert_eq!(r.refused, 1);
    let evidence_ids = hubs[0].store().of_type("AuditEvent").unwrap();
    assert_eq!(evidence_ids.len(), 1, "one AuditEvent of evidence");
    let evidence_id = DocId(uuid::Uuid::from_bytes(evidence_ids[0]));
    let evidence = sent(&mut hubs[0], evidence_id);
    // The evidence reaches hub 2, which takes its branch out too.
    assert_eq!(merge(&mut hubs[1], evidence, &h1), accepted());
    let versions: Vec<(String, Value)> = hubs
        .iter()
        .map(|h| {
            let s = h.reader().read("Patient", &id.to_string()).unwrap();
            (s.version, s.resource["name"][0]["family"].clone())
        })
        .collect();
    assert_eq!(versions[0], versions[1], "both hubs hold the same document");
    assert_eq!(versions[0].1, "Maïga", "neither branch survives");
    // A branch sent later is refused with the reason.
    let r = merge(&mut hubs[1], left, &w.a);
    assert_eq!(r.changed, 0);
    assert!(
        reasons(&hubs[1]).contains("equivocation"),
        "{}",
        reasons(&hubs[1])
    );
}

/// A device whose certificate expired is shown only its own certificates (which is how it gets
/// its renewal) and the serving node's, never anyone's data, nor other devices' certificates.
#[test]
fn an_expired_device_is_served_only_its_own_certificates() {
    let root = key(1);
    let (officer, hub) = (key(2), key(3));
    let expired = certificate_doc(
        &root,
        &certificate(
            &officer,
            "EO",
            &[Role::EnrolmentOfficer],
            &[A],
            &[],
            (now() - 10 * 86_400, now() - 86_400),
        ),
        now(),
    );
    let hub_cert = certificate_doc(
        &root,
        &certificate(
            &hub,
            "HUB",
            &[Role::Hub],
            &[],
            &[],
            (now() - 3600, now() + 86_400),
        ),
        now(),
    );
    let other = cert_doc(&root, &key(4), &[B]);
    let (expired_id, hub_cert_id) = (expired.id, hub_cert.id);
    let mut node = engine(3, &root);
    node.merge(vec![expired, hub_cert, other], &Source::Local)
        .unwrap();
    let data = forge(&root, &patient_in(&[A], "700"), DocId::new(), now());
    node.merge(vec![data.clone()], &Source::Local).unwrap();
    node.flush().unwrap();
    assert!(!node.certified(&Source::Peer(peer(&officer))));
    let start = node.sync_start(&peer(&officer), "hub").unwrap();
    assert!(start.restricted);
    let mut offered: Vec<_> = start.items.iter().map(|i| i.0).collect();
    offered.sort();
    let mut expected = vec![expired_id, hub_cert_id];
    expected.sort();
    assert_eq!(
        offered, expected,
        "its own certificate and the hub's, nobody else's"
    );
    assert!(
        node.payloads(&peer(&officer), &[(data.id, vec![])])
            .unwrap()
            .is_empty()
    );
    // Central renews it: the renewal reaches the device, which is then served again.
    node.merge(vec![cert_doc(&root, &officer, &[A])], &Source::Local)
        .unwrap();
    node.flush().unwrap();
    assert!(node.certified(&Source::Peer(peer(&officer))));
    assert!(!node.sync_start(&peer(&officer), "hub").unwrap().restricted);
}
