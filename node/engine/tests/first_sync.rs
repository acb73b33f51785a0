//! A first sync brings a hub its whole area in one session, whatever order central's log holds
//! the documents in.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_engine::Source;
use fieldmesh_engine::now;
use fieldmesh_engine::test_support::{
    certificate, certificate_doc, engine, key, peer, public, sync_pair,
};
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

/// A bulk load prepares policies on every core, after the rest of their batch, taking the
/// places of their families from what the load staged (or from the store): each declares the
/// places one create at a time gives it, whether its family is in its batch, in the batch being
/// committed, or committed, and wherever it lies in its batch.
#[test]
fn a_loaded_policy_declares_the_places_one_create_at_a_time_gives_it() {
    let root = key(1);
    let lines = demo_lines(7, 40);
    let contracts: Vec<String> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["resourceType"] == "Contract")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert!(contracts.len() >= 40);

    let mut one_at_a_time = engine(&[1; 32], "central", &public(&root));
    for line in &lines {
        let resource: Value = serde_json::from_str(line).unwrap();
        one_at_a_time
            .create(resource, None, true, &|_| None)
            .unwrap();
    }
    one_at_a_time.flush().unwrap();

    // Batches of 7 lines committed behind, as `fieldmesh load` does: families and their
    // policies fall across batches.
    let mut batched = engine(&[1; 32], "central", &public(&root));
    for batch in lines.chunks(7) {
        for r in batched.create_lines(batch, 2) {
            r.unwrap();
        }
        batched.flush_behind().unwrap();
    }
    batched.flush().unwrap();

    // One batch in reverse order: every policy comes before its family.
    let mut reversed = engine(&[1; 32], "central", &public(&root));
    let backwards: Vec<String> = lines.iter().rev().cloned().collect();
    for r in reversed.create_lines(&backwards, 2) {
        r.unwrap();
    }
    reversed.flush().unwrap();

    for id in &contracts {
        let expected = declared_places(&mut one_at_a_time, id);
        assert!(
            !expected.is_empty(),
            "policy {id} lies where its family does"
        );
        assert_eq!(declared_places(&mut batched, id), expected, "policy {id}");
        assert_eq!(declared_places(&mut reversed, id), expected, "policy {id}");
    }
}
