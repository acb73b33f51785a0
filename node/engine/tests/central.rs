//! Central's services over real engines and in-memory sessions: canonical ids, business
//! numbers used twice, duplicate persons, leases, and their state across a restart.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_engine::central::{Central, NumberConfig, STEP_ENTRIES};
use fieldmesh_engine::test_support::{certificate, certificate_doc, key, peer, public, sync_pair};
use fieldmesh_engine::{Engine, NodeIdentity, Source, WriteError, now};
use fieldmesh_fhir_docs::identifiers::OPENIMIS_IDENTIFIER_TYPES;
use fieldmesh_fhir_docs::openimis::LOCATION_EXTENSION;
use fieldmesh_fhir_docs::openimis::flags::{FlagCode, flags_of};
use fieldmesh_fhir_docs::openimis::numbers::NumberKind;
use fieldmesh_fhir_docs::{DocId, IdentKey, IdentifierQuery};
use fieldmesh_storage::{MemStore, Store};
use fieldmesh_trust::Role;
use fieldmesh_trust::ed25519_dalek::SigningKey;
use serde_json::{Map, Value, json};
use unicode_normalization::UnicodeNormalization;

const CENTRAL: &str = "urn:fieldmesh:node:central";

fn code(value: &str) -> Value {
    json!({"type": {"coding": [{"system": OPENIMIS_IDENTIFIER_TYPES, "code": "Code"}]}, "value": value})
}

fn patient(family: &str, given: &str, birth: &str, village: &str, chfid: Option<&str>) -> Value {
    let mut p = json!({"resourceType": "Patient", "name": [{"family": family, "given": [given]}],
        "birthDate": birth, "gender": "female",
        "address": [{"extension": [{"url": LOCATION_EXTENSION,
            "valueReference": {"reference": format!("Location/{village}")}}]}]});
    if let Some(n) = chfid {
        p["identifier"] = json!([code(n)]);
    }
    p
}

struct World {
    root: SigningKey,
    central: Engine,
    services: Central,
    a: Engine,
    b: Engine,
}

fn officer_engine(n: u8, root: &SigningKey) -> Engine {
    let mut e =
        fieldmesh_engine::test_support::engine(&[n; 32], &format!("officer-{n}"), &public(root));
    e.set_number_rules(NumberConfig::niger());
    e
}

fn world(central_store: Box<dyn Store>) -> World {
    let root = key(1);
    let mut central = Engine::new(
        central_store,
        NodeIdentity::new(CENTRAL.into(), &[1; 32], public(&root)),
        256,
    );
    let mut a = officer_engine(2, &root);
    let mut b = officer_engine(3, &root);
    let period = (now() - 3600, now() + 86_400);
    let certs = vec![
        certificate_doc(
            &root,
            &certificate(
                &key(2),
                "EO0001",
                &[Role::EnrolmentOfficer],
                &["V1", "V2"],
                &[],
                period,
            ),
            now(),
        ),
        certificate_doc(
            &root,
            &certificate(
                &key(3),
                "EO0002",
                &[Role::EnrolmentOfficer],
                &["V2", "V3"],
                &[],
                period,
            ),
            now(),
        ),
    ];
    for e in [&mut central, &mut a, &mut b] {
        e.merge(certs.clone(), &Source::Local).unwrap();
        e.flush().unwrap();
    }
    let services = Central::open(&mut central, NumberConfig::niger()).unwrap();
    World {
        root,
        central,
        services,
        a,
        b,
    }
}

impl World {
    /// Runs central's services until the log is processed, committing each step.
    fn process(&mut self) -> usize {
        self.process_by(STEP_ENTRIES)
    }

    /// [`World::process`] with steps of `max` log entries.
    fn process_by(&mut self, max: usize) -> usize {
        let mut edited = 0;
        loop {
            let r = self.services.step(&mut self.central, max).unwrap();
            self.central.flush().unwrap();
            edited += r.edited;
            if !r.more && !self.services.has_work(&self.central) {
                return edited;
            }
        }
    }

    fn sync(&mut self, which: u8) {
        let (officer, k) = match which {
            2 => (&mut self.a, key(2)),
            _ => (&mut self.b, key(3)),
        };
        sync_pair(officer, &peer(&k), &mut self.central, &peer(&self.root)).unwrap();
    }
}

fn find(e: &Engine, ty: &str, system: &str, value: &str) -> Vec<String> {
    e.reader()
        .search_identifier(ty, &IdentifierQuery::Exact(IdentKey::new(system, value)))
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect()
}

fn json_of(e: &mut Engine, ty: &str, id: &str) -> Map<String, Value> {
    e.served(ty, id)
        .unwrap()
        .resource
        .as_object()
        .cloned()
        .unwrap()
}

fn canonical(json: &Map<String, Value>) -> Option<String> {
    json["identifier"]
        .as_array()?
        .iter()
        .find(|i| i["system"] == CENTRAL)
        .and_then(|i| i["value"].as_str())
        .map(String::from)
}

fn flag_codes(json: &Map<String, Value>) -> Vec<FlagCode> {
    flags_of(json).into_iter().map(|f| f.code).collect()
}

#[test]
fn central_gives_canonical_ids_flags_a_number_used_twice_and_links_a_duplicate_person() {
    let store = std::sync::Arc::new(MemStore::new());
    let mut w = world(Box::new(store.clone()));
    // Central leases numbers to both officers before anything else.
    w.process();
    w.sync(2);
    w.sync(3);
    let left = w.a.leased_numbers_left().unwrap();
    assert_eq!(left["chfid"], 200, "{left}");

    // Officer A: a new insuree whose number comes from the lease, one whose card number is
    // also typed by officer B for someone else, and a woman of village V2.
    let leased =
        w.a.create(
            patient("Maïga", "Hawa", "1985-02-01", "V1", None),
            None,
            false,
            &|_| None,
        )
        .unwrap();
    let card = "2000000004";
    assert!(
        NumberConfig::niger()
            .chfid
            .check(NumberKind::Chfid, card)
            .is_ok()
    );
    let a_card =
        w.a.create(
            patient("Souley", "Ali", "1970-05-05", "V1", Some(card)),
            None,
            false,
            &|_| None,
        )
        .unwrap();
    let nfc =
        w.a.create(
            patient("Ouédraogo", "Aïcha", "1990-03-24", "V2", Some("2000000015")),
            None,
            false,
            &|_| None,
        )
        .unwrap();
    w.a.flush().unwrap();
    // A number that fails the check digit is refused on the device, as openIMIS refuses it.
    let bad = w.a.create(
        patient("X", "Y", "2000-01-01", "V1", Some("2000000005")),
        None,
        false,
        &|_| None,
    );
    assert!(matches!(bad, Err(WriteError::Invalid(_))), "{bad:?}");

    // Officer B, later: the same card number for another person, and the same woman of V2,
    // her name typed without accents, in capitals, decomposed (NFD).
    let b_card =
        w.b.create(
            patient("Garba", "Issa", "1980-01-01", "V3", Some(card)),
            None,
            false,
            &|_| None,
        )
        .unwrap();
    let nfd_name: String = "OUÉDRAOGO".nfd().collect();
    let nfd =
        w.b.create(
            patient(&nfd_name, "Aicha", "1990-03-24", "V2", None),
            None,
            false,
            &|_| None,
        )
        .unwrap();
    w.b.flush().unwrap();

    w.sync(2);
    w.process();
    w.sync(3);
    w.process();

    // Every resource created elsewhere has central's identifier; its canonical id is the
    // creator's UUID (no collision here).
    for id in [leased, a_card, nfc, b_card, nfd] {
        let j = json_of(&mut w.central, "Patient", &id.to_string());
        assert_eq!(canonical(&j), Some(id.to_string()), "{j:?}");
        // Central stores what it edited whole: every peer it serves loads one chunk.
        let bytes = w.central.store().doc_bytes(id.as_bytes()).unwrap().unwrap();
        assert_eq!(
            fieldmesh_fhir_docs::limits::chunks(&bytes).len(),
            1,
            "{id} stored in one chunk"
        );
    }
    // The leased number is one of A's lease, valid under the rule.
    let j = json_of(&mut w.central, "Patient", &leased.to_string());
    let number = j["identifier"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"]["coding"][0]["code"] == "Code")
        .unwrap()["value"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        NumberConfig::niger()
            .chfid
            .check(NumberKind::Chfid, &number)
            .is_ok()
    );
    // B's registration of the card number came later: flagged taken; A's keeps it.
    let jb = json_of(&mut w.central, "Patient", &b_card.to_string());
    assert_eq!(flag_codes(&jb), vec![FlagCode::NumberTaken], "{jb:?}");
    let ja = json_of(&mut w.central, "Patient", &a_card.to_string());
    assert_eq!(flag_codes(&ja), vec![FlagCode::NumberReused]);
    // B's woman without a number got one from B's lease; she is A's woman: linked.
    let later = json_of(&mut w.central, "Patient", &nfd.to_string());
    assert_eq!(later["link"][0]["type"], "replaced-by");
    assert_eq!(
        later["link"][0]["other"]["reference"],
        format!("Patient/{nfc}")
    );
    assert!(flag_codes(&later).contains(&FlagCode::DuplicatePerson));
    let earlier = json_of(&mut w.central, "Patient", &nfc.to_string());
    assert_eq!(earlier["link"][0]["type"], "replaces");
    assert_eq!(
        earlier["link"][0]["other"]["reference"],
        format!("Patient/{nfd}")
    );
    let status = w.services.status(&w.central);
    assert_eq!(status["duplicate_persons"]["linked"], 1, "{status}");
    assert_eq!(status["flagged"]["number_taken"], 1, "{status}");
    assert_eq!(status["awaiting_processing"], 0, "{status}");
    assert_eq!(
        status["numbers"]["chfid"]["used_from_leases"], 2,
        "{status}"
    );

    // After the next sync, each phone finds its resources by central's system and shows its
    // flag; A, which holds V2, holds both registrations of the woman, linked both ways.
    w.sync(2);
    w.sync(3);
    assert_eq!(
        find(&w.a, "Patient", CENTRAL, &a_card.to_string()),
        vec![a_card.to_string()]
    );
    assert_eq!(
        find(
            &w.central,
            "Patient",
            "urn:fieldmesh:node:officer-3",
            &b_card.to_string()
        ),
        vec![b_card.to_string()]
    );
    let flagged_a = w.a.flagged().unwrap();
    assert!(
        flagged_a
            .iter()
            .any(|f| f["code"] == "number-reused" && f["number"] == card),
        "{flagged_a:?}"
    );
    let flagged_b = w.b.flagged().unwrap();
    assert!(
        flagged_b
            .iter()
            .any(|f| f["code"] == "number-taken" && f["id"] == b_card.to_string()),
        "{flagged_b:?}"
    );
    // The list is read again where a listed resource was written since it was last listed.
    let mut noted = json_of(&mut w.b, "Patient", &b_card.to_string());
    for e in noted["extension"].as_array_mut().unwrap() {
        for sub in e["extension"].as_array_mut().into_iter().flatten() {
            if sub["url"] == "reason" {
                sub["valueString"] = json!("seen by the officer");
            }
        }
    }
    w.b.update("Patient", &b_card.to_string(), Value::Object(noted), None)
        .unwrap();
    w.b.flush().unwrap();
    let flagged_b = w.b.flagged().unwrap();
    assert!(
        flagged_b
            .iter()
            .any(|f| f["id"] == b_card.to_string() && f["reason"] == "seen by the officer"),
        "{flagged_b:?}"
    );
    let on_a = json_of(&mut w.a, "Patient", &nfd.to_string());
    assert_eq!(
        on_a["link"][0]["other"]["reference"],
        format!("Patient/{nfc}")
    );

    // Officer B gives the person a new number: the flags go on both sides.
    let mut fixed = json_of(&mut w.b, "Patient", &b_card.to_string());
    let new_number = w.b.take_leased_number(NumberKind::Chfid).unwrap().unwrap();
    for i in fixed["identifier"].as_array_mut().unwrap() {
        if i["value"] == card {
            i["value"] = json!(new_number);
        }
    }
    w.b.update("Patient", &b_card.to_string(), Value::Object(fixed), None)
        .unwrap();
    w.b.flush().unwrap();
    w.sync(3);
    // Central restarts before processing it: the document is read ahead, only the fields the
    // services look at, and its flag is taken out of those (and out of the index).
    w.central = Engine::new(
        Box::new(store.clone()),
        NodeIdentity::new(CENTRAL.into(), &[1; 32], public(&w.root)),
        256,
    );
    w.services = Central::open(&mut w.central, NumberConfig::niger()).unwrap();
    w.process();
    assert!(flag_codes(&json_of(&mut w.central, "Patient", &b_card.to_string())).is_empty());
    assert!(flag_codes(&json_of(&mut w.central, "Patient", &a_card.to_string())).is_empty());
    // Central edited only some fields of each document: its indexes still match them whole,
    // and so do the officers'.
    for e in [&mut w.central, &mut w.a, &mut w.b] {
        assert_eq!(e.check_indexes().unwrap(), Vec::<String>::new());
    }
}

#[test]
fn the_services_resume_after_a_restart_and_never_lease_a_number_twice() {
    let store: std::sync::Arc<MemStore> = std::sync::Arc::new(MemStore::new());
    let mut w = world(Box::new(store.clone()));
    w.process();
    let first = w.services.status(&w.central);
    assert_eq!(first["numbers"]["chfid"]["leases"], 2, "{first}");
    w.sync(2);
    let p =
        w.a.create(
            patient("Issa", "Mariam", "2001-01-01", "V1", None),
            None,
            false,
            &|_| None,
        )
        .unwrap();
    w.a.flush().unwrap();
    w.sync(2);
    // Central stops (its state was committed with its last step) and starts again.
    drop(w.services);
    drop(w.central);
    let mut central = Engine::new(
        Box::new(store.clone()),
        NodeIdentity::new(CENTRAL.into(), &[1; 32], public(&w.root)),
        256,
    );
    let mut services = Central::open(&mut central, NumberConfig::niger()).unwrap();
    let after = services.status(&central);
    assert_eq!(after["numbers"], first["numbers"]);
    assert!(after["awaiting_processing"].as_u64().unwrap() > 0);
    loop {
        let r = services.step(&mut central, 100).unwrap();
        central.flush().unwrap();
        if !r.more && !services.has_work(&central) {
            break;
        }
    }
    let j = json_of(&mut central, "Patient", &p.to_string());
    assert_eq!(canonical(&j), Some(p.to_string()));
    // No new lease: the counter moved past both, and neither is half used.
    let status = services.status(&central);
    assert_eq!(status["numbers"]["chfid"]["leases"], 2, "{status}");
    assert_eq!(
        status["numbers"]["chfid"]["next_counter"],
        first["numbers"]["chfid"]["next_counter"]
    );
}

#[test]
fn a_canonical_id_that_collides_gets_a_new_uuid_and_a_missing_number_is_assigned() {
    let mut w = world(Box::new(MemStore::new()));
    w.process();
    // A resource central holds, imported from openIMIS with its UUID...
    let imported = DocId::new();
    let openimis_uuid = uuid::Uuid::new_v4().to_string();
    let mut r = patient("Abdou", "Moussa", "1960-01-01", "V1", Some("3000000006"));
    r["id"] = json!(imported.to_string());
    r["identifier"].as_array_mut().unwrap().push(
        json!({"type": {"coding": [{"system": OPENIMIS_IDENTIFIER_TYPES, "code": "UUID"}]}, "value": openimis_uuid}),
    );
    w.central.create(r, None, true, &|_| None).unwrap();
    w.central.flush().unwrap();
    w.process();
    let j = json_of(&mut w.central, "Patient", &imported.to_string());
    // Created on central: its own identifier is central's already.
    assert_eq!(canonical(&j), Some(imported.to_string()));
    // ...and a device's resource created under that same UUID (a client that PUT it): its
    // canonical id cannot be that UUID.
    let mut clash = patient("Other", "Person", "1999-09-09", "V1", None);
    clash["identifier"] = json!([{"type": {"coding": [{"system": OPENIMIS_IDENTIFIER_TYPES, "code": "UUID"}]}, "value": imported.to_string()}]);
    let id = DocId::new();
    let clash_id = {
        let mut c = clash.clone();
        c["id"] = json!(id.to_string());
        // Not from a lease: the officer has none yet, so central assigns the number.
        w.a.create(c, None, true, &|_| None).unwrap()
    };
    w.a.flush().unwrap();
    w.sync(2);
    w.process();
    let j = json_of(&mut w.central, "Patient", &clash_id.to_string());
    let c = canonical(&j).unwrap();
    assert_ne!(c, imported.to_string(), "collided");
    assert!(uuid::Uuid::parse_str(&c).is_ok());
    assert_eq!(
        w.services.status(&w.central)["canonical_ids"]["new_uuid_on_collision"],
        1
    );
    let number = j["identifier"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"]["coding"][0]["code"] == "Code")
        .map(|i| i["value"].as_str().unwrap().to_string());
    let number = number.expect("central assigned a number");
    assert!(
        NumberConfig::niger()
            .chfid
            .check(NumberKind::Chfid, &number)
            .is_ok()
    );
    assert_eq!(
        w.services.status(&w.central)["numbers"]["chfid"]["assigned_by_central"],
        1
    );
}

/// Two registrations of one number arriving together: the second is flagged while the first
/// is processed, before its own turn; it is still processed (its canonical id) when its turn
/// comes, and exactly one of them keeps the number.
#[test]
fn a_registration_flagged_before_its_turn_is_still_processed() {
    let mut w = world(Box::new(MemStore::new()));
    let card = "2000000004";
    let first =
        w.a.create(
            patient("Abdou", "Ali", "1970-01-01", "V1", Some(card)),
            None,
            false,
            &|_| None,
        )
        .unwrap();
    let second =
        w.a.create(
            patient("Garba", "Sani", "1980-01-01", "V1", Some(card)),
            None,
            false,
            &|_| None,
        )
        .unwrap();
    w.a.flush().unwrap();
    w.sync(2);
    // One entry per step: the second's own entry comes after the step that flagged it.
    w.process_by(1);
    let (j1, j2) = (
        json_of(&mut w.central, "Patient", &first.to_string()),
        json_of(&mut w.central, "Patient", &second.to_string()),
    );
    assert!(
        canonical(&j1).is_some() && canonical(&j2).is_some(),
        "{j1:?} {j2:?}"
    );
    let taken = [&j1, &j2]
        .iter()
        .filter(|j| flag_codes(j).contains(&FlagCode::NumberTaken))
        .count();
    assert_eq!(taken, 1, "{j1:?} {j2:?}");
}

/// Claim codes: one used twice at a facility is flagged on the later claim; a claim that came
/// without one gets one from central (8 characters, openIMIS's column).
#[test]
fn claim_codes_are_unique_and_assigned() {
    let mut w = world(Box::new(MemStore::new()));
    let period = (now() - 3600, now() + 86_400);
    let admin_key = key(4);
    let cert = certificate_doc(
        &w.root,
        &certificate(
            &admin_key,
            "CA0001",
            &[Role::ClaimAdministrator],
            &[],
            &["HF1"],
            period,
        ),
        now(),
    );
    // A second administrator of the same facility, on a device of its own.
    let other_key = key(6);
    let other_cert = certificate_doc(
        &w.root,
        &certificate(
            &other_key,
            "CA0002",
            &[Role::ClaimAdministrator],
            &[],
            &["HF1"],
            period,
        ),
        now(),
    );
    let mut admin = officer_engine(4, &w.root);
    let mut other = officer_engine(6, &w.root);
    for e in [&mut admin, &mut other, &mut w.central] {
        e.merge(vec![cert.clone(), other_cert.clone()], &Source::Local)
            .unwrap();
        e.flush().unwrap();
    }
    let claim = |number: Option<&str>| {
        let mut c = json!({"resourceType": "Claim", "status": "active", "use": "claim",
            "created": "2026-11-20", "billablePeriod": {"start": "2026-11-20", "end": "2026-11-20"},
            "patient": {"reference": "Patient/2000000004"},
            "provider": {"reference": "Organization/HF1"}});
        if let Some(n) = number {
            c["identifier"] = json!([code(n)]);
        }
        c
    };
    // Entered before the administrator's device holds a lease of claim codes.
    let first = admin
        .create(claim(Some("CLM-0001")), None, false, &|_| None)
        .unwrap();
    // The same code again on this device is refused at once; on the other device, which
    // cannot know, it is written, and central flags the later of the two.
    assert!(
        admin
            .create(claim(Some("CLM-0001")), None, false, &|_| None)
            .is_err()
    );
    let second = other
        .create(claim(Some("CLM-0001")), None, false, &|_| None)
        .unwrap();
    other.flush().unwrap();
    let bare = admin.create(claim(None), None, false, &|_| None).unwrap();
    admin.flush().unwrap();
    sync_pair(
        &mut other,
        &peer(&other_key),
        &mut w.central,
        &peer(&w.root),
    )
    .unwrap();
    sync_pair(
        &mut admin,
        &peer(&admin_key),
        &mut w.central,
        &peer(&w.root),
    )
    .unwrap();
    w.process();
    let taken: Vec<bool> = [first, second]
        .iter()
        .map(|id| {
            flag_codes(&json_of(&mut w.central, "Claim", &id.to_string()))
                .contains(&FlagCode::NumberTaken)
        })
        .collect();
    assert_eq!(taken.iter().filter(|t| **t).count(), 1, "{taken:?}");
    let j = json_of(&mut w.central, "Claim", &bare.to_string());
    let code = j["identifier"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"]["coding"][0]["code"] == "Code")
        .and_then(|i| i["value"].as_str())
        .expect("central assigned a claim code")
        .to_string();
    assert_eq!(code.len(), 8, "{code}");
    // The administrator now holds a lease of claim codes and takes the next offline.
    sync_pair(
        &mut admin,
        &peer(&admin_key),
        &mut w.central,
        &peer(&w.root),
    )
    .unwrap();
    let next = admin.take_leased_number(NumberKind::ClaimCode).unwrap();
    assert!(next.is_some_and(|n| n.len() == 8 && n != code));
}
