//! Hostile peers against a real `fieldmesh` hub on loopback: each test performs one attack of
//! the audit with a test peer that speaks the sync protocol (the protocol crate's own driver,
//! fed crafted documents), then checks the hub refused it, stayed up, kept its memory and went
//! on serving honest peers. The attacker is a stolen phone (an enrolment officer's key with a
//! certificate the hub holds, every change properly signed), so the crafted documents get past
//! the sender check and reach the document checks; a stranger (no certificate) is refused
//! before that. Figures (time, memory) are printed for the closing note.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use std::time::{Duration, Instant};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{AutoCommit, ObjType, ROOT};
use fieldmesh_engine::test_support::signed_payload;
use fieldmesh_fhir_docs::openimis::LOCATION_EXTENSION;
use fieldmesh_fhir_docs::{DocId, actor_for_key, new_document};
use fieldmesh_protocol::DocPayload;
use fieldmesh_tests::peer::{Pushed, TestPeer, try_reserve};
use fieldmesh_tests::{Node, certified_key, init, run_ok};
use fieldmesh_trust::Envelope;
use fieldmesh_trust::ed25519_dalek::SigningKey;
use serde_json::json;

/// The hub still works: it answers, takes a write and reads it back.
fn still_serves(hub: &mut Node) {
    assert!(hub.alive(), "the hub process died");
    let (status, _, p) = hub
        .post(
            "/fhir/Patient",
            &json!({"resourceType": "Patient", "name": [{"family": "Honest"}], "birthDate": "1980-01-01"}),
        )
        .unwrap();
    assert_eq!(status, 201, "{p}");
    let path = format!("/fhir/Patient/{}", p["id"].as_str().unwrap());
    assert_eq!(hub.get(&path).unwrap().0, 200);
}

/// Quarantine records and the bytes they keep, as `/status` and `/quarantine` say.
fn quarantined(n: &Node) -> (u64, u64) {
    let (_, st) = n.get("/status").unwrap();
    let records = st["quarantined"].as_u64().unwrap_or_default();
    let (_, q) = n.get("/quarantine").unwrap();
    let bytes = q["records"]
        .as_array()
        .map(|r| r.iter().filter_map(|x| x["bytes"].as_u64()).sum())
        .unwrap_or_default();
    (records, bytes)
}

/// The reasons of the quarantine records.
fn reasons(n: &Node) -> String {
    let (_, q) = n.get("/quarantine").unwrap();
    q["records"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|x| x["reason"].as_str())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

/// The hub's log (what a person installing it reads), once it says `what`: a refusal is logged
/// with its reason, not kept (keeping it would be the amplification the quarantine budget
/// prevents).
fn logged(dir: &std::path::Path, what: &str) -> String {
    let path = dir.join("hub.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        if log.contains(what) || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the hub's quarantine holds `records` records (the sending peer's session ends
/// before the hub has committed what it refused), then a little longer for any more.
fn quarantine_settles(hub: &Node, records: u64) -> (u64, u64) {
    hub.wait_for(10, "the quarantine records", |n| {
        Ok(quarantined(n).0 >= records)
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    quarantined(hub)
}

/// A running hub that holds the certificate of an enrolment officer of village V1, and that
/// officer's secret key (the stolen phone).
fn hub_and_stolen_phone(dir: &std::path::Path) -> (Node, [u8; 32]) {
    let hub_data = dir.join("hub");
    init(&hub_data, "hub", "hub").unwrap();
    let secret = certified_key(
        dir,
        "officer",
        &["--role", "enrolment-officer", "--location", "V1"],
    )
    .unwrap();
    let cert = dir.join("officer.cert.json");
    run_ok(&[
        "cert",
        "install",
        "--data",
        hub_data.to_str().unwrap(),
        cert.to_str().unwrap(),
    ])
    .unwrap();
    let mut hub = Node::start(dir, "hub", "hub").unwrap();
    still_serves(&mut hub);
    (hub, secret)
}

/// A Patient of village V1 (in the officer's scope), as a document authored by `key`.
fn patient(key: &SigningKey) -> AutoCommit {
    let p = json!({"resourceType": "Patient", "name": [{"family": "Maïga"}], "birthDate": "1990-01-01",
        "address": [{"extension": [{"url": LOCATION_EXTENSION, "valueReference": {"reference": "Location/V1"}}]}]});
    let map = p.as_object().cloned().unwrap();
    new_document(&map, actor_for_key(&key.verifying_key().to_bytes()), now()).unwrap()
}

/// Commits the pending operations as a change dated now (the author's certificate must be valid
/// at the change's date).
fn commit(doc: &mut AutoCommit) {
    doc.commit_with(CommitOptions::default().with_time(now()));
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The attack reached the document checks: the hub asked for the document.
fn delivered(p: &Pushed) {
    assert!(p.asked >= 1, "the hub never asked for the document: {p:?}");
}

#[test]
fn a_document_nested_100k_deep_is_refused_and_the_hub_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let (mut hub, secret) = hub_and_stolen_phone(dir.path());
    let key = SigningKey::from_bytes(&secret);
    let before = hub.documents().unwrap();
    let mut doc = patient(&key);
    let mut obj = doc.put_object(ROOT, "contact", ObjType::Map).unwrap();
    for _ in 0..100_000 {
        obj = doc.put_object(&obj, "a", ObjType::Map).unwrap();
    }
    commit(&mut doc);
    let p = signed_payload(&mut doc, DocId::new(), "Patient", &[&key]);
    let mut attacker = TestPeer::connect(&hub.p2p, Some(secret), false).unwrap();
    let t = Instant::now();
    let pushed = attacker.push(vec![p.clone()], 30).unwrap();
    println!(
        "nested 100,000 deep: {} bytes refused in {:.2} s ({pushed:?}); hub memory (now, peak) {:?} MiB",
        p.data.len(),
        t.elapsed().as_secs_f64(),
        hub.memory_mb().unwrap()
    );
    delivered(&pushed);
    still_serves(&mut hub);
    assert_eq!(
        hub.documents().unwrap(),
        before + 1,
        "only the honest write"
    );
    // Refused before it is loaded (100,000 objects would take ~100 MiB once loaded).
    let log = logged(dir.path(), "20000 objects");
    assert!(
        log.contains("refused a document") && log.contains("makes more than 20000 objects"),
        "{log}"
    );
    let (_, peak) = hub.memory_mb().unwrap();
    assert!(peak < 100.0, "the hub peaked at {peak} MiB");
    assert_eq!(quarantined(&hub).0, 0, "nothing of it kept");
}

/// Automerge panicked on load of a document in which one author has two concurrent changes
/// (numbered 2 and 3, both on 1); the engine thread died and the hub answered 500 to everything.
#[test]
fn a_document_that_makes_automerge_panic_is_refused_and_the_hub_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let (mut hub, secret) = hub_and_stolen_phone(dir.path());
    let key = SigningKey::from_bytes(&secret);
    let mut doc = patient(&key);
    doc.put(ROOT, "gender", "female").unwrap();
    commit(&mut doc);
    let changes = doc.get_changes(&[]);
    let (first, second) = (changes[0].clone(), changes[1].clone());
    let mut third = second.decode();
    third.seq = 3;
    third.time += 1;
    let third = automerge::Change::from(third);
    let id = DocId::new();
    let mut data = Vec::new();
    let mut envelopes = Vec::new();
    for c in [&first, &second, &third] {
        data.extend_from_slice(c.raw_bytes());
        envelopes.push(Envelope::sign(
            &key,
            id.as_bytes(),
            "Patient",
            c.hash().0,
            0,
        ));
    }
    let p = DocPayload {
        id: *id.as_bytes(),
        ty: "Patient".into(),
        data,
        envelopes: Envelope::encode_wire(&envelopes),
    };
    let mut attacker = TestPeer::connect(&hub.p2p, Some(secret), false).unwrap();
    let pushed = attacker.push(vec![p.clone()], 30).unwrap();
    println!("two changes numbered 2 and 3 on 1: {pushed:?}");
    delivered(&pushed);
    still_serves(&mut hub);
    // And again: the node did not become a zombie the first time.
    delivered(&attacker.push(vec![p], 30).unwrap());
    still_serves(&mut hub);
    assert!(
        hub.get(&format!("/fhir/Patient/{id}")).unwrap().0 != 200,
        "the document was not taken"
    );
    let log = logged(dir.path(), "the Automerge library failed");
    assert!(log.contains("contained a panic on one document"), "{log}");
}

/// Nested 60 deep, a few objects: loaded, and refused when read as FHIR (deeper than 48).
#[test]
fn a_document_nested_past_fhir_depth_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut hub, secret) = hub_and_stolen_phone(dir.path());
    let key = SigningKey::from_bytes(&secret);
    let mut doc = patient(&key);
    let mut obj = doc.put_object(ROOT, "contact", ObjType::Map).unwrap();
    for _ in 0..60 {
        obj = doc.put_object(&obj, "a", ObjType::Map).unwrap();
    }
    commit(&mut doc);
    let id = DocId::new();
    let p = signed_payload(&mut doc, id, "Patient", &[&key]);
    let mut attacker = TestPeer::connect(&hub.p2p, Some(secret), false).unwrap();
    delivered(&attacker.push(vec![p], 30).unwrap());
    let log = logged(dir.path(), "48 levels deep");
    assert!(
        log.contains("nests objects more than 48 levels deep"),
        "{log}"
    );
    assert_ne!(hub.get(&format!("/fhir/Patient/{id}")).unwrap().0, 200);
    still_serves(&mut hub);
}

#[test]
fn a_small_payload_that_expands_to_millions_of_operations_is_refused_before_it_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let (mut hub, secret) = hub_and_stolen_phone(dir.path());
    let key = SigningKey::from_bytes(&secret);
    let mut doc = patient(&key);
    let text = doc.put_object(ROOT, "text", ObjType::Text).unwrap();
    doc.splice_text(&text, 0, 0, &"a".repeat(3_000_000))
        .unwrap();
    commit(&mut doc);
    let id = DocId::new();
    let mut p = signed_payload(&mut doc, id, "Patient", &[&key]);
    p.data = doc.save();
    assert!(p.data.len() < 64 * 1024, "{} bytes", p.data.len());
    let (_, peak_before) = hub.memory_mb().unwrap();
    let mut attacker = TestPeer::connect(&hub.p2p, Some(secret), false).unwrap();
    let t = Instant::now();
    for _ in 0..3 {
        delivered(&attacker.push(vec![p.clone()], 30).unwrap());
    }
    let (_, peak_after) = hub.memory_mb().unwrap();
    println!(
        "memory bomb: {} bytes (3 million operations) sent 3 times, refused in {:.2} s; hub peak {peak_before:.0} → {peak_after:.0} MiB",
        p.data.len(),
        t.elapsed().as_secs_f64()
    );
    assert!(
        peak_after - peak_before < 64.0,
        "the hub grew from {peak_before} to {peak_after} MiB"
    );
    let log = logged(dir.path(), "250000 operations");
    assert!(
        log.contains("the document holds more than 250000 operations"),
        "{log}"
    );
    assert_eq!(quarantined(&hub).0, 0, "nothing of it kept");
    assert_ne!(hub.get(&format!("/fhir/Patient/{id}")).unwrap().0, 200);
    still_serves(&mut hub);
}

/// A Patient document of `n` changes by `key`, each signed (or, with `sign` false, with a
/// signature that does not verify); in village V1 if `in_scope`.
fn many_changes(key: &SigningKey, n: usize, sign: bool, in_scope: bool) -> DocPayload {
    let mut doc = if in_scope {
        patient(key)
    } else {
        let mut d = AutoCommit::new().with_actor(actor_for_key(&key.verifying_key().to_bytes()));
        d.put(ROOT, "resourceType", "Patient").unwrap();
        d.put(ROOT, "birthDate", "1990-01-01").unwrap();
        d
    };
    for i in 0..n {
        doc.put(ROOT, "gender", if i % 2 == 0 { "male" } else { "female" })
            .unwrap();
        commit(&mut doc);
    }
    let mut p = signed_payload(&mut doc, DocId::new(), "Patient", &[key]);
    if !sign {
        // Wire form: hash prefix (8 bytes), revocations seen (4), signature (64).
        for e in p.envelopes.chunks_exact_mut(Envelope::WIRE_LEN) {
            e[12 + 7] ^= 1;
        }
    }
    p
}

/// 500 unsigned changes became 501 quarantine records of the whole payload, again after every
/// restart; and a stranger's documents were quarantined at all.
#[test]
fn refused_changes_cost_one_bounded_record_and_a_stranger_costs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, secret) = hub_and_stolen_phone(dir.path());
    let key = SigningKey::from_bytes(&secret);
    let unsigned = {
        let mut p = many_changes(&key, 500, true, true);
        p.envelopes.clear();
        p
    };
    println!(
        "unsigned payload: 500 changes, {} bytes",
        unsigned.data.len()
    );
    let mut officer = TestPeer::connect(&hub.p2p, Some(secret), false).unwrap();
    delivered(&officer.push(vec![unsigned.clone()], 30).unwrap());
    let (records, bytes) = quarantine_settles(&hub, 1);
    assert_eq!(records, 1, "one record for the payload: {}", reasons(&hub));
    assert!(reasons(&hub).contains("without its author's signature"));
    assert!(
        bytes <= unsigned.data.len() as u64 + 1024,
        "{bytes} bytes kept"
    );
    // Again, and after a restart: nothing more.
    delivered(&officer.push(vec![unsigned.clone()], 30).unwrap());
    assert_eq!(quarantine_settles(&hub, records), (records, bytes));
    drop(officer);
    let (_, data) = hub.terminate(10).unwrap();
    let mut hub = Node::run(data).unwrap();
    assert_eq!(quarantined(&hub), (records, bytes), "after a restart");
    let mut officer = TestPeer::connect(&hub.p2p, Some(secret), false).unwrap();
    delivered(&officer.push(vec![unsigned.clone()], 30).unwrap());
    assert_eq!(quarantine_settles(&hub, records), (records, bytes));
    // A peer without a certificate: the session ends at its first document, nothing is kept.
    let mut stranger = TestPeer::connect(&hub.p2p, None, false).unwrap();
    let pushed = stranger.push(vec![unsigned], 30).unwrap();
    println!("stranger's session: {pushed:?}");
    let stranger_id = stranger.id.to_string();
    hub.wait_for(10, "the refusal in /status", |n| {
        let (_, st) = n.get("/status")?;
        Ok(st["known_peers"][&stranger_id]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("may send only certificates")))
    })
    .unwrap();
    assert_eq!(quarantine_settles(&hub, records), (records, bytes));
    still_serves(&mut hub);
}

/// 2,000 changes with bad signatures took 12 s of checks that read the document before any
/// signature was verified.
#[test]
fn two_thousand_forged_changes_are_refused_on_their_signatures_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (mut hub, secret) = hub_and_stolen_phone(dir.path());
    let key = SigningKey::from_bytes(&secret);
    let forged = many_changes(&key, 2000, false, true);
    let mut officer = TestPeer::connect(&hub.p2p, Some(secret), false).unwrap();
    let t = Instant::now();
    delivered(&officer.push(vec![forged], 60).unwrap());
    let forged_secs = t.elapsed().as_secs_f64();
    let outside = many_changes(&key, 2000, true, false);
    let t = Instant::now();
    delivered(&officer.push(vec![outside], 60).unwrap());
    let outside_secs = t.elapsed().as_secs_f64();
    let inside = many_changes(&key, 2000, true, true);
    let id = DocId(uuid::Uuid::from_bytes(inside.id));
    let t = Instant::now();
    delivered(&officer.push(vec![inside], 60).unwrap());
    let inside_secs = t.elapsed().as_secs_f64();
    println!(
        "2,000 changes in one document: forged refused in {forged_secs:.2} s, signed but out of scope refused in {outside_secs:.2} s, signed in scope taken in {inside_secs:.2} s"
    );
    assert!(forged_secs < 8.0, "{forged_secs} s");
    assert!(outside_secs < 8.0, "{outside_secs} s");
    assert!(inside_secs < 8.0, "{inside_secs} s");
    let (records, _) = quarantine_settles(&hub, 2);
    assert_eq!(records, 2, "{}", reasons(&hub));
    hub.wait_for(10, "the signed Patient in scope", |n| {
        Ok(n.get(&format!("/fhir/Patient/{id}"))?.0 == 200)
    })
    .unwrap();
    still_serves(&mut hub);
}

/// One uncertified connection opened 512 sessions at once and stalled the API.
#[test]
fn a_flood_of_sessions_gets_one_and_the_api_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let (mut hub, _) = hub_and_stolen_phone(dir.path());
    let mut attacker = TestPeer::connect(&hub.p2p, None, false).unwrap();
    let mut held = Vec::new();
    let mut refused = 0;
    let mut slowest = Duration::ZERO;
    for _ in 0..64 {
        match attacker.open() {
            Ok(s) => held.push(s),
            Err(_) => refused += 1,
        }
        let t = Instant::now();
        assert_eq!(hub.get("/status").unwrap().0, 200);
        slowest = slowest.max(t.elapsed());
    }
    // The node keeps at most one session with the peer: the others are closed at once.
    let mut open = 0;
    for s in &mut held {
        if !attacker.closed_within(s, 1) {
            open += 1;
        }
    }
    println!(
        "flood: 64 streams asked, {refused} refused by the connection, {open} left open; slowest /status {:.0} ms",
        slowest.as_secs_f64() * 1000.0
    );
    assert!(open <= 1, "{open} sessions open");
    assert!(!held.is_empty(), "the connection took no session at all");
    assert!(slowest < Duration::from_secs(2), "{slowest:?}");
    still_serves(&mut hub);
}

#[test]
fn the_relay_serves_certified_devices_only() {
    let dir = tempfile::tempdir().unwrap();
    let (hub, secret) = hub_and_stolen_phone(dir.path());
    assert!(
        try_reserve(&hub.p2p, Some(secret), 15).unwrap(),
        "a certified device gets a reservation"
    );
    assert!(
        !try_reserve(&hub.p2p, None, 15).unwrap(),
        "a stranger gets none"
    );
}
