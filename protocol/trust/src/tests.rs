//! One case per reason a change is refused, each a distinct [`Rejection`] variant, decided on real
//! Automerge changes signed with real keys.

use std::collections::HashSet;

use base64::Engine as _;

use super::*;
use crate::token::B64;
use ed25519_dalek::SigningKey;
use fieldmesh_fhir_docs::openimis::{LOCATION_EXTENSION, OpenImis};
use fieldmesh_fhir_docs::{actor_for_key, new_document};
use serde_json::{Map, Value, json};

const VILLAGE_A: &str = "village-a";
const VILLAGE_B: &str = "village-b";
const FACILITY: &str = "HF001";
const DAY: i64 = 86_400;
const DOC: fieldmesh_fhir_docs::DocId = fieldmesh_fhir_docs::DocId(uuid::Uuid::from_u128(
    0x7f3c_2a9e_0000_4000_8000_0000_0000_0001,
));
const T0: i64 = 1_790_000_000;

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn public(k: &SigningKey) -> PublicKey {
    k.verifying_key().to_bytes()
}

fn cert(
    subject: &SigningKey,
    roles: &[Role],
    locations: &[&str],
    facilities: &[&str],
) -> Certificate {
    Certificate {
        serial: format!("serial-{}", hex::encode(&public(subject)[..4])),
        subject: hex::encode(public(subject)),
        user: "EO0001".into(),
        roles: roles.to_vec(),
        locations: locations.iter().map(|s| s.to_string()).collect(),
        facilities: facilities.iter().map(|s| s.to_string()).collect(),
        not_before: T0,
        not_after: T0 + 365 * DAY,
    }
}

fn patient(village: &str) -> Map<String, Value> {
    json!({"resourceType": "Patient", "name": [{"family": "Maïga"}], "birthDate": "1990-01-01",
        "address": [{"extension": [{"url": LOCATION_EXTENSION,
            "valueReference": {"type": "Location", "identifier": {"system": "urn:fieldmesh:node:central", "value": village}}}]}]})
    .as_object()
    .cloned()
    .unwrap_or_default()
}

fn claim(facility: &str) -> Map<String, Value> {
    json!({"resourceType": "Claim", "patient": {"identifier": {"value": "1"}}, "created": "2026-01-01",
        "billablePeriod": {"start": "2026-01-01"}, "provider": {"type": "Organization", "identifier": {"value": facility}}})
    .as_object()
    .cloned()
    .unwrap_or_default()
}

fn location() -> Map<String, Value> {
    json!({"resourceType": "Location", "name": "Forged village"})
        .as_object()
        .cloned()
        .unwrap_or_default()
}

/// A real change creating `json`, authored by `author` at `time`.
fn change(author: &SigningKey, json: &Map<String, Value>, time: i64) -> ChangeFacts {
    let mut doc = new_document(json, actor_for_key(&public(author)), time).expect("document");
    let meta = doc.get_changes_meta(&[]).pop().expect("one change");
    ChangeFacts {
        hash: meta.hash.0,
        actor: meta.actor.to_bytes().to_vec(),
        seq: meta.seq,
        time: meta.timestamp,
        deps: meta.deps.iter().map(|d| d.0).collect(),
    }
}

struct World {
    root: SigningKey,
    trust: Trust,
    officer: SigningKey,
    claims: SigningKey,
    hub: SigningKey,
}

fn world() -> World {
    let root = key(1);
    let (officer, claims, hub) = (key(2), key(3), key(4));
    let mut trust = Trust::new(public(&root));
    for c in [
        cert(&officer, &[Role::EnrolmentOfficer], &[VILLAGE_A], &[]),
        cert(&claims, &[Role::ClaimAdministrator], &[], &[FACILITY]),
        cert(&hub, &[Role::Hub], &[], &[]),
    ] {
        assert!(
            trust
                .add_token(&issue_certificate(&root, &c))
                .expect("valid")
        );
    }
    World {
        root,
        trust,
        officer,
        claims,
        hub,
    }
}

fn decide_signed(
    w: &World,
    author: &SigningKey,
    signer: &SigningKey,
    json: &Map<String, Value>,
    time: i64,
    seen: u32,
) -> Result<(), Rejection> {
    let c = change(author, json, time);
    let ty = json["resourceType"].as_str().unwrap_or_default();
    let env = Envelope::sign(signer, DOC.as_bytes(), ty, c.hash, seen);
    w.trust
        .decide(&OpenImis, &DOC, ty, &c, Some(&env), &|_| false, None, json)
}

fn variant(r: &Result<(), Rejection>) -> String {
    match r {
        Ok(()) => "accepted".into(),
        Err(e) => format!("{e:?}")
            .split([' ', '{', '('])
            .next()
            .unwrap_or("")
            .to_string(),
    }
}

#[test]
fn each_rejection_reason_is_its_own_variant() {
    let mut w = world();
    let now = T0 + DAY;
    let stranger = key(9);
    let cases: Vec<(&str, Result<(), Rejection>, &str)> = vec![
        (
            "an officer enrols an insuree in their own village",
            decide_signed(&w, &w.officer, &w.officer, &patient(VILLAGE_A), now, 0),
            "accepted",
        ),
        (
            "a claim administrator enters a claim at their facility",
            decide_signed(&w, &w.claims, &w.claims, &claim(FACILITY), now, 0),
            "accepted",
        ),
        (
            "central authors a Location",
            decide_signed(&w, &w.root, &w.root, &location(), now, 0),
            "accepted",
        ),
        (
            "a signature by another key",
            decide_signed(&w, &w.officer, &stranger, &patient(VILLAGE_A), now, 0),
            "BadSignature",
        ),
        (
            "a key without a certificate",
            decide_signed(&w, &stranger, &stranger, &patient(VILLAGE_A), now, 0),
            "UnknownKey",
        ),
        (
            "an officer creates a Claim",
            decide_signed(&w, &w.officer, &w.officer, &claim(FACILITY), now, 0),
            "NotPermitted",
        ),
        (
            "an officer creates a Location",
            decide_signed(&w, &w.officer, &w.officer, &location(), now, 0),
            "NotPermitted",
        ),
        (
            "a hub authors anything",
            decide_signed(&w, &w.hub, &w.hub, &patient(VILLAGE_A), now, 0),
            "NotPermitted",
        ),
        (
            "an officer enrols an insuree in another village",
            decide_signed(&w, &w.officer, &w.officer, &patient(VILLAGE_B), now, 0),
            "OutOfScope",
        ),
        (
            "a claim at another facility",
            decide_signed(&w, &w.claims, &w.claims, &claim("HF999"), now, 0),
            "OutOfScope",
        ),
        (
            "a change dated after the certificate expired",
            decide_signed(
                &w,
                &w.officer,
                &w.officer,
                &patient(VILLAGE_A),
                T0 + 400 * DAY,
                0,
            ),
            "Expired",
        ),
        (
            "a change dated before the certificate starts",
            decide_signed(&w, &w.officer, &w.officer, &patient(VILLAGE_A), T0 - DAY, 0),
            "NotYetValid",
        ),
        (
            "the author had seen a revocation this node lacks",
            decide_signed(&w, &w.officer, &w.officer, &patient(VILLAGE_A), now, 1),
            "MissingRevocations",
        ),
    ];
    // Revocation of the officer, #1.
    let rev = Revocation {
        vouched: Vec::new(),
        number: 1,
        subject: hex::encode(public(&w.officer)),
        reason: "phone lost".into(),
        issued: now,
    };
    w.trust
        .add_token(&issue_revocation(&w.root, &rev))
        .expect("valid revocation");
    let mut cases = cases;
    cases.push((
        "a change made after its author had seen its own revocation",
        decide_signed(&w, &w.officer, &w.officer, &patient(VILLAGE_A), now, 1),
        "Revoked",
    ));
    cases.push((
        "a change that claims to predate the revocation but that central did not vouch for",
        decide_signed(&w, &w.officer, &w.officer, &patient(VILLAGE_A), now, 0),
        "RevokedUnvouched",
    ));
    // The same change, had central held it when it revoked the key, is accepted.
    let c = change(&w.officer, &patient(VILLAGE_A), now);
    let env = Envelope::sign(&w.officer, DOC.as_bytes(), "Patient", c.hash, 0);
    cases.push((
        "a change central vouched for in the revocation",
        w.trust
            .decide_author(
                &OpenImis,
                &DOC,
                "Patient",
                &c,
                Some(&env),
                &|_| false,
                &|h| *h == c.hash,
            )
            .map(|_| ()),
        "accepted",
    ));
    // A change without an envelope, and one building on a rejected change.
    let c = change(&w.claims, &claim(FACILITY), now);
    cases.push((
        "a change without an envelope",
        w.trust.decide(
            &OpenImis,
            &DOC,
            "Claim",
            &c,
            None,
            &|_| false,
            None,
            &claim(FACILITY),
        ),
        "Unsigned",
    ));
    let mut dependent = c.clone();
    dependent.deps = vec![[7; 32]];
    let env = Envelope::sign(&w.claims, DOC.as_bytes(), "Claim", dependent.hash, 0);
    cases.push((
        "a change depending on a rejected change",
        w.trust.decide(
            &OpenImis,
            &DOC,
            "Claim",
            &dependent,
            Some(&env),
            &|d| *d == [7; 32],
            None,
            &claim(FACILITY),
        ),
        "DependsOnRejected",
    ));
    // An edit that moves an insuree out of the officer's villages is out of scope even if the
    // insuree was in scope before.
    let officer2 = key(5);
    w.trust
        .add_token(&issue_certificate(
            &w.root,
            &cert(&officer2, &[Role::EnrolmentOfficer], &[VILLAGE_A], &[]),
        ))
        .expect("valid");
    let c = change(&officer2, &patient(VILLAGE_B), now);
    let env = Envelope::sign(&officer2, DOC.as_bytes(), "Patient", c.hash, 1);
    cases.push((
        "an edit moving an insuree to another village",
        w.trust.decide(
            &OpenImis,
            &DOC,
            "Patient",
            &c,
            Some(&env),
            &|_| false,
            Some(&patient(VILLAGE_A)),
            &patient(VILLAGE_B),
        ),
        "OutOfScope",
    ));
    // An insuree claiming another node's identifier for another document.
    let mut impostor = patient(VILLAGE_A);
    impostor.insert(
        "identifier".into(),
        json!([{"system": "urn:fieldmesh:node:other", "value": "0d5e6f70-0000-4000-8000-000000000002"}]),
    );
    let c = change(&officer2, &impostor, now);
    let env = Envelope::sign(&officer2, DOC.as_bytes(), "Patient", c.hash, 1);
    cases.push((
        "an insuree claiming another document's node identifier",
        w.trust.decide(
            &OpenImis,
            &DOC,
            "Patient",
            &c,
            Some(&env),
            &|_| false,
            None,
            &impostor,
        ),
        "ForeignIdentifier",
    ));

    let mut failures = Vec::new();
    for (what, got, want) in &cases {
        if variant(got) != *want {
            failures.push(format!("{what}: expected {want}, got {got:?}"));
        }
        if let Err(e) = got {
            assert!(!e.to_string().is_empty());
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // Every variant is exercised.
    let seen: HashSet<String> = cases.iter().map(|(_, g, _)| variant(g)).collect();
    for v in [
        "Unsigned",
        "BadSignature",
        "UnknownKey",
        "NotYetValid",
        "Expired",
        "Revoked",
        "MissingRevocations",
        "NotPermitted",
        "OutOfScope",
        "DependsOnRejected",
        "RevokedUnvouched",
        "ForeignIdentifier",
    ] {
        assert!(seen.contains(v), "{v} not exercised");
    }
}

#[test]
fn messages_name_the_missing_capability_and_scope() {
    let w = world();
    let e = decide_signed(&w, &w.officer, &w.officer, &location(), T0 + DAY, 0).unwrap_err();
    assert_eq!(
        e.to_string(),
        "an enrolment-officer may not author reference data (Location)"
    );
    let e =
        decide_signed(&w, &w.officer, &w.officer, &patient(VILLAGE_B), T0 + DAY, 0).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Patient at village-b is outside the author's scope (village-a)"
    );
}

#[test]
fn decisions_do_not_depend_on_the_order_certificates_arrive_in() {
    let w = world();
    let root = &w.root;
    let tokens = [
        issue_certificate(
            root,
            &cert(&w.officer, &[Role::EnrolmentOfficer], &[VILLAGE_A], &[]),
        ),
        issue_certificate(
            root,
            &cert(&w.claims, &[Role::ClaimAdministrator], &[], &[FACILITY]),
        ),
        issue_revocation(
            root,
            &Revocation {
                vouched: Vec::new(),
                number: 1,
                subject: hex::encode(public(&w.claims)),
                reason: "left".into(),
                issued: T0,
            },
        ),
        issue_revocation(
            root,
            &Revocation {
                vouched: Vec::new(),
                number: 2,
                subject: hex::encode(public(&key(8))),
                reason: "lost".into(),
                issued: T0,
            },
        ),
    ];
    let probes: Vec<(SigningKey, Map<String, Value>, u32)> = vec![
        (key(2), patient(VILLAGE_A), 2),
        (key(3), claim(FACILITY), 0),
        (key(3), claim(FACILITY), 1),
        (key(2), patient(VILLAGE_B), 0),
    ];
    let decide_all = |order: &[usize]| -> Vec<String> {
        let mut t = Trust::new(public(root));
        for &i in order {
            t.add_token(&tokens[i]).expect("valid");
        }
        probes
            .iter()
            .map(|(k, json, seen)| {
                let c = change(k, json, T0 + DAY);
                let ty = json["resourceType"].as_str().unwrap_or_default();
                let env = Envelope::sign(k, DOC.as_bytes(), ty, c.hash, *seen);
                variant(&t.decide(&OpenImis, &DOC, ty, &c, Some(&env), &|_| false, None, json))
            })
            .collect()
    };
    let first = decide_all(&[0, 1, 2, 3]);
    assert_eq!(
        first,
        vec!["accepted", "RevokedUnvouched", "Revoked", "OutOfScope"]
    );
    for order in [[3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]] {
        assert_eq!(decide_all(&order), first);
    }
}

#[test]
fn tokens_not_signed_by_the_root_are_refused() {
    let w = world();
    let forged = issue_certificate(&key(9), &cert(&key(9), &[Role::Central], &[], &[]));
    let mut t = Trust::new(public(&w.root));
    assert_eq!(
        t.add_token(&forged),
        Err(TrustError::NotSignedByRoot("certificate"))
    );
    assert_eq!(
        t.add_token("fmc1.bm9wZQ"),
        Err(TrustError::Malformed("certificate"))
    );
    // A tampered payload.
    let good = issue_certificate(&w.root, &cert(&w.officer, &[Role::Hub], &[], &[]));
    let mut parts: Vec<String> = good.split('.').map(String::from).collect();
    let payload = String::from_utf8(B64.decode(&parts[1]).expect("b64")).expect("utf8");
    parts[1] = B64.encode(payload.replace("hub", "central"));
    assert_eq!(
        t.add_token(&parts.join(".")),
        Err(TrustError::NotSignedByRoot("certificate"))
    );
}

#[test]
fn envelopes_round_trip_and_truncation_is_an_error() {
    let k = key(2);
    let envs: Vec<Envelope> = (0..3u8)
        .map(|i| Envelope::sign(&k, DOC.as_bytes(), "Patient", [i; 32], u32::from(i)))
        .collect();
    let bytes = Envelope::encode_all(&envs);
    assert_eq!(bytes.len(), 3 * Envelope::LEN);
    let back = Envelope::decode_all(&bytes).expect("whole");
    for e in &envs {
        assert_eq!(back.get(&e.hash), Some(e));
        assert!(e.verify(&public(&k), DOC.as_bytes(), "Patient"));
        assert!(!e.verify(&public(&key(3)), DOC.as_bytes(), "Patient"));
        // The signature binds the document and its type: replayed elsewhere, it fails.
        assert!(!e.verify(&public(&k), &[0; 16], "Patient"));
        assert!(!e.verify(&public(&k), DOC.as_bytes(), "Contract"));
    }
    assert_eq!(
        Envelope::decode_all(&bytes[..150]),
        Err(TrustError::TruncatedEnvelopes(150))
    );
    // A flipped bit in the revocation count breaks the signature.
    let mut e = envs[0];
    e.revocations_seen += 1;
    assert!(!e.verify(&public(&k), DOC.as_bytes(), "Patient"));
}

mod arbitrary_input {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Decoders of envelopes and tokens take any bytes without panicking, and nothing but
        /// the root's own tokens is accepted.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), text in ".{0,300}") {
            let _ = Envelope::decode_all(&bytes);
            let root = public(&key(1));
            for t in [text.clone(), format!("fmc1.{text}"), format!("fmr1.{text}.{text}"),
                      format!("fmc1.{}.{}", B64.encode(&bytes), B64.encode(&bytes))] {
                prop_assert!(verify_certificate(&root, &t).is_err());
                prop_assert!(verify_revocation(&root, &t).is_err());
                prop_assert!(Trust::new(root).add_token(&t).is_err());
            }
            let e = Envelope::decode_all(&bytes);
            if let Ok(map) = e {
                for env in map.values() {
                    prop_assert!(!env.verify(&root, DOC.as_bytes(), "Patient"));
                }
            }
        }
    }
}

#[test]
fn wire_envelopes_find_their_changes_by_prefix_even_when_prefixes_collide() {
    let k = key(2);
    let author = public(&k);
    let a = Envelope::sign(&k, DOC.as_bytes(), "Patient", [1; 32], 0);
    let mut colliding = [1; 32];
    colliding[31] = 9; // same 8-byte prefix, another change
    let b = Envelope::sign(&k, DOC.as_bytes(), "Patient", colliding, 3);
    let wire = Envelope::encode_wire(&[b, a]);
    assert_eq!(wire.len(), 2 * Envelope::WIRE_LEN);
    let found = Envelope::match_wire(
        &wire,
        &[([1; 32], &author[..]), (colliding, &author[..])],
        DOC.as_bytes(),
        "Patient",
    )
    .expect("whole");
    assert_eq!(found.get(&[1; 32]), Some(&a));
    assert_eq!(found.get(&colliding), Some(&b));
    // A change without an envelope is absent (and then refused as unsigned).
    let none = Envelope::match_wire(&wire, &[([2; 32], &author[..])], DOC.as_bytes(), "Patient")
        .expect("whole");
    assert!(none.is_empty());
    assert_eq!(
        Envelope::match_wire(&wire[..100], &[], DOC.as_bytes(), "Patient"),
        Err(TrustError::TruncatedEnvelopes(100))
    );
    // Stored envelopes convert to the wire form, filtered.
    let stored = Envelope::encode_all(&[a, b]);
    assert_eq!(
        Envelope::stored_to_wire(&stored, |h| *h == [1; 32]),
        Envelope::encode_wire(&[a])
    );
}
