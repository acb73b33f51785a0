//! A first sync brings a hub its whole area in one session, whatever order central's log holds
//! the documents in.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_engine::now;
use fieldmesh_engine::test_support::{
    certificate, certificate_doc, engine, key, peer, public, sync_pair,
};
use fieldmesh_engine::{Source, WriteError};
use fieldmesh_trust::Role;
use serde_json::Value;

/// The demo deployment's resources, one NDJSON line each.
fn demo_lines(seed: u64, families: u64) -> Vec<String> {
    let mut data = Vec::new();
    fieldmesh_fhir_docs::openimis::demo::generate(seed, families, &mut data).unwrap();
    String::from_utf8(data)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn a_new_hub_receives_its_area_in_one_session_when_locations_were_edited_last() {
    let root = key(1);
    let mut central = engine(&[1; 32], "central", &public(&root));
    let mut hub = engine(&[5; 32], "hub", &public(&root));
    let cert = certificate_doc(
        &root,
        &certificate(
            &key(5),
            "hub",
            &[Role::Hub],
            &["R1"],
            &[],
            (now() - 3600, now() + 86_400),
        ),
        now(),
    );
    for e in [&mut central, &mut hub] {
        e.merge(vec![cert.clone()], &Source::Local).unwrap();
        e.flush().unwrap();
    }
    // More documents than one frame carries (`READ_BATCH`).
    let lines = demo_lines(3, 120);
    for r in central.create_lines(&lines, 2) {
        r.unwrap();
    }
    central.flush().unwrap();
    // Every location is edited after the families: in log order they come last, after the
    // insurees that lie in them.
    let mut locations = 0;
    for line in &lines {
        let mut r: Value = serde_json::from_str(line).unwrap();
        if r["resourceType"] != "Location" {
            continue;
        }
        r["description"] = "checked by the district".into();
        let id = r["id"].as_str().unwrap().to_string();
        central.update("Location", &id, r, None).unwrap();
        locations += 1;
    }
    central.flush().unwrap();
    assert!(locations > 10);
    let held = central.stats().unwrap().documents;
    assert!(held > fieldmesh_protocol::driver::READ_BATCH as u64);

    let (at_hub, _) = sync_pair(&mut hub, &peer(&key(5)), &mut central, &peer(&key(1))).unwrap();
    // Sent before the locations, the insurees were refused as outside the hub's area (it did not
    // know its villages yet) and came again in a second session.
    assert_eq!(hub.stats().unwrap().documents, held);
    assert!(at_hub.docs_received <= held, "nothing came twice");
}

/// A bulk load stages a family and its policy in one batch: the policy reads the family's
/// places from the bytes staged for it, without committing the batch first (a load used to
/// commit, with an fsync, once per policy).
#[test]
fn a_loaded_policy_finds_its_family_in_the_same_batch_without_a_commit() {
    let root = key(1);
    let mut central = engine(&[1; 32], "central", &public(&root));
    let lines = demo_lines(5, 6);
    let contracts: Vec<String> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["resourceType"] == "Contract")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!contracts.is_empty());
    for r in central.create_lines(&lines, 2) {
        r.unwrap();
    }
    assert_eq!(
        central.stats().unwrap().documents,
        0,
        "nothing committed yet"
    );
    assert_eq!(central.pending(), lines.len());
    central.flush().unwrap();
    for id in contracts {
        let served = central.served("Contract", &id).unwrap().resource;
        let places: Vec<&Value> = served["extension"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["url"] == "urn:fieldmesh:StructureDefinition/place")
            .collect();
        assert!(!places.is_empty(), "policy {id} lies where its family does");
    }
}

/// `/status` may be polled while a sync runs: a scope report younger than a few seconds is
/// answered as it is, without committing what is staged (each poll used to force a commit, and
/// broke the pipelining of the sync's commits).
#[test]
fn a_recent_scope_report_is_answered_without_committing_what_is_staged() {
    let root = key(1);
    let mut central = engine(&[1; 32], "central", &public(&root));
    let first = central.scope_report().unwrap().to_json();
    let lines = demo_lines(5, 2);
    for r in central.create_lines(&lines, 2) {
        r.unwrap();
    }
    assert_eq!(central.pending(), lines.len());
    let again = central.scope_report().unwrap().to_json();
    assert_eq!(again, first);
    assert_eq!(central.pending(), lines.len(), "the report committed them");
    assert_eq!(central.stats().unwrap().documents, 0);
    central.flush().unwrap();
    assert_eq!(central.stats().unwrap().documents, lines.len() as u64);
}

/// The places a policy declares (its place extensions' references), as served.
fn declared_places(e: &mut fieldmesh_engine::Engine, id: &str) -> Vec<String> {
    let served = e.served("Contract", id).unwrap().resource;
    let mut places: Vec<String> = served["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["url"] == "urn:fieldmesh:StructureDefinition/place")
        .map(|e| e["valueReference"].to_string())
        .collect();
    places.sort();
    places
}

/// The demo deployment's resources with each insuree moved to a village of its own (families
/// then lie in several places, so a policy declares many), one NDJSON line each.
fn scattered_lines(seed: u64, families: u64) -> Vec<String> {
    let lines = demo_lines(seed, families);
    let locations: Vec<String> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["resourceType"] == "Location")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let mut insurees = 0;
    lines
        .into_iter()
        .map(|l| {
            let mut r: Value = serde_json::from_str(&l).unwrap();
            if r["resourceType"] != "Patient" {
                return l;
            }
            insurees += 1;
            let place = &locations[insurees % locations.len()];
            for e in r["address"][0]["extension"].as_array_mut().unwrap() {
                if e.get("valueReference").is_some() {
                    e["valueReference"]["reference"] = format!("Location/{place}").into();
                }
            }
            r.to_string()
        })
        .collect()
}

/// Loads `lines` one create at a time.
fn one_at_a_time(lines: &[String]) -> fieldmesh_engine::Engine {
    let mut e = engine(&[1; 32], "central", &public(&key(1)));
    for line in lines {
        let resource: Value = serde_json::from_str(line).unwrap();
        e.create(resource, None, true, &|_| None).unwrap();
    }
    e.flush().unwrap();
    e
}

/// Loads `lines` as `fieldmesh load` does, in batches of `batch` committed behind.
fn bulk(lines: &[String], batch: usize) -> fieldmesh_engine::Engine {
    let mut e = engine(&[1; 32], "central", &public(&key(1)));
    for lines in lines.chunks(batch) {
        for r in e.create_lines(lines, 2) {
            r.unwrap();
        }
        e.flush_behind().unwrap();
    }
    e.flush().unwrap();
    e
}

/// A bulk load prepares policies on every core, after the rest of their batch, taking the
/// places of their families from what the load staged or from the store: each declares the
/// places one create at a time gives it, whether its family is in its batch, in the batch being
/// committed, or committed, and wherever it lies in its batch.
#[test]
fn a_loaded_policy_declares_the_places_one_create_at_a_time_gives_it() {
    let lines = scattered_lines(7, 40);
    let is_policy = |l: &String| l.starts_with("{\"resourceType\":\"Contract\"");
    let contracts: Vec<String> = lines
        .iter()
        .filter(|l| is_policy(l))
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(contracts.len() >= 40);
    let mut expected = one_at_a_time(&lines);
    // Families and their policies across batches, or in one.
    let mut in_sevens = bulk(&lines, 7);
    let mut at_once = bulk(&lines, lines.len());
    // Every family committed before its policy is prepared: its places come from the store.
    let (policies, rest): (Vec<String>, Vec<String>) = lines.iter().cloned().partition(is_policy);
    let mut committed = bulk(&rest, rest.len());
    for r in committed.create_lines(&policies, 2) {
        r.unwrap();
    }
    committed.flush().unwrap();
    for id in &contracts {
        let places = declared_places(&mut expected, id);
        assert!(
            places.len() >= 2,
            "policy {id} lies where each member does: {places:?}"
        );
        assert_eq!(declared_places(&mut in_sevens, id), places, "policy {id}");
        assert_eq!(declared_places(&mut at_once, id), places, "policy {id}");
        assert_eq!(declared_places(&mut committed, id), places, "policy {id}");
    }

    // In reverse, every policy comes before its family: one create at a time finds none of it,
    // and neither does a batch holding both.
    let backwards: Vec<String> = lines.iter().rev().cloned().collect();
    let mut expected = one_at_a_time(&backwards);
    let mut at_once = bulk(&backwards, backwards.len());
    for id in &contracts {
        assert_eq!(declared_places(&mut expected, id), Vec::<String>::new());
        assert_eq!(
            declared_places(&mut at_once, id),
            Vec::<String>::new(),
            "policy {id}"
        );
    }
}

/// A policy line asking for an id that a later line of its batch asks for too keeps it, as one
/// create at a time gives it (the policy is prepared after the rest of its batch).
#[test]
fn a_loaded_policy_keeps_the_id_it_asks_for_before_a_later_line_asking_for_it() {
    let lines = demo_lines(9, 2);
    let policy = lines
        .iter()
        .position(|l| l.starts_with("{\"resourceType\":\"Contract\""))
        .unwrap();
    let asked = serde_json::from_str::<Value>(&lines[policy]).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // A copy of the policy's id on a later insuree.
    let mut lines = lines;
    let insuree = policy
        + 1
        + lines[policy + 1..]
            .iter()
            .position(|l| l.starts_with("{\"resourceType\":\"Patient\""))
            .unwrap();
    let mut r: Value = serde_json::from_str(&lines[insuree]).unwrap();
    r["id"] = asked.clone().into();
    lines[insuree] = r.to_string();
    let mut e = engine(&[1; 32], "central", &public(&key(1)));
    let ids: Vec<String> = e
        .create_lines(&lines, 2)
        .into_iter()
        .map(|r| r.unwrap().to_string())
        .collect();
    e.flush().unwrap();
    assert_eq!(ids[policy], asked);
    assert_ne!(ids[insuree], asked);
    assert!(e.served("Contract", &asked).is_ok());
    assert!(e.served("Patient", &ids[insuree]).is_ok());
}

/// A bulk load checks insurance numbers against the deployment's rule (length, check digit) as
/// one create at a time does: a number openIMIS would refuse is refused with its line, and the
/// rest load.
#[test]
fn a_loaded_insuree_whose_number_breaks_the_rule_is_refused_as_one_create_at_a_time() {
    use fieldmesh_engine::central::NumberConfig;
    let mut lines = demo_lines(11, 3);
    let insurees: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("{\"resourceType\":\"Patient\""))
        .collect();
    assert!(insurees.len() >= 2);
    // Niger's rule: 10 digits, the last a check digit (modulo 7).
    for (n, &i) in insurees.iter().enumerate() {
        let mut r: Value = serde_json::from_str(&lines[i]).unwrap();
        let number = if n == 0 { "2000000005" } else { "2000000015" };
        for ident in r["identifier"].as_array_mut().unwrap() {
            if ident["type"]["coding"][0]["code"] == "Code" {
                ident["value"] = number.into();
            }
        }
        lines[i] = r.to_string();
    }
    let mut one = engine(&[1; 32], "central", &public(&key(1)));
    one.set_number_rules(NumberConfig::niger());
    let expected: Vec<bool> = lines
        .iter()
        .map(|l| {
            one.create(serde_json::from_str(l).unwrap(), None, true, &|_| None)
                .is_ok()
        })
        .collect();
    let mut bulk = engine(&[1; 32], "central", &public(&key(1)));
    bulk.set_number_rules(NumberConfig::niger());
    let got = bulk.create_lines(&lines, 2);
    let refused = &got[insurees[0]];
    assert!(
        matches!(refused, Err(WriteError::Invalid(e)) if e.to_string().contains("openIMIS error")),
        "{refused:?}"
    );
    assert!(got[insurees[1]].is_ok(), "{:?}", got[insurees[1]]);
    let got: Vec<bool> = got.iter().map(Result::is_ok).collect();
    assert_eq!(got, expected);
}
