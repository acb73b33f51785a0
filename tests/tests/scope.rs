//! Partial replication by scope, with real processes on loopback: central, a hub certified for
//! a district, two enrolment officers (one shared village and one of their own each) and a
//! claim administrator. Each device ends with exactly its scope, directly or through the hub;
//! an insuree who moves leaves the old village's devices once the hub holds every change of it;
//! an officer re-scoped by a new certificate ends with exactly its new villages without losing a
//! write made just before; a device that lies in its `Hello` gets nothing more.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_fhir_docs::openimis::LOCATION_EXTENSION;
use fieldmesh_tests::deploy::{WAIT, device, holds, location, post, start, wait_gone, wait_holds};
use fieldmesh_tests::peer::TestPeer;
use fieldmesh_tests::{Node, certified_key, init, run_ok};
use serde_json::{Value, json};

/// A district with three villages and two facilities, and a village of another district, as
/// central wrote them.
struct Places {
    district: String,
    shared: String,
    own_a: String,
    own_b: String,
    other: String,
    facility_1: String,
    facility_2: String,
}

fn reference_data(central: &Node) -> Places {
    let district = location(central, "D1", "D", None);
    let elsewhere = location(central, "D2", "D", None);
    let village = |code| location(central, code, "V", Some(&district));
    let (shared, own_a, own_b) = (village("VS"), village("VA"), village("VB"));
    let other = location(central, "VO", "V", Some(&elsewhere));
    let facility = |code: &str| {
        post(
            central,
            "Organization",
            json!({"resourceType": "Organization", "name": code,
                "identifier": [{"type": {"coding": [{"code": "Code"}]}, "value": code}],
                "address": [{"extension": [{"url": LOCATION_EXTENSION,
                    "valueReference": {"reference": format!("Location/{district}")}}]}]}),
        )
    };
    let (facility_1, facility_2) = (facility("HF1"), facility("HF2"));
    Places {
        district,
        shared,
        own_a,
        own_b,
        other,
        facility_1,
        facility_2,
    }
}

fn patient(family: &str, village: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family}], "birthDate": "1990-01-01",
        "address": [{"extension": [{"url": LOCATION_EXTENSION,
            "valueReference": {"reference": format!("Location/{village}")}}]}]})
}

fn claim(patient: &str, facility: &str) -> Value {
    json!({"resourceType": "Claim", "status": "active", "use": "claim", "created": "2026-11-20",
        "billablePeriod": {"start": "2026-11-20", "end": "2026-11-20"},
        "patient": {"reference": format!("Patient/{patient}")},
        "provider": {"reference": format!("Organization/{facility}")}})
}

fn status_scope(n: &Node) -> Value {
    n.get("/status").unwrap().1["scope"].clone()
}

#[test]
fn each_device_holds_its_scope_and_scope_changes_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let central = Node::start(d, "central", "central").unwrap();
    let p = reference_data(&central);
    // Central's insurees, one in each village, and a claim at each facility.
    let in_shared = post(&central, "Patient", patient("Shared", &p.shared));
    let in_a = post(&central, "Patient", patient("OwnA", &p.own_a));
    let in_b = post(&central, "Patient", patient("OwnB", &p.own_b));
    let in_other = post(&central, "Patient", patient("Other", &p.other));
    let claim_1 = post(&central, "Claim", claim(&in_shared, &p.facility_1));
    let claim_2 = post(&central, "Claim", claim(&in_other, &p.facility_2));

    let hub = device(
        d,
        "hub",
        &["--role", "hub", "--location", &p.district],
        &[&central.p2p],
    );
    let a = device(
        d,
        "officer-a",
        &[
            "--role",
            "enrolment-officer",
            "--location",
            &p.shared,
            "--location",
            &p.own_a,
        ],
        &[&hub.p2p],
    );
    // B meets A directly as well as through the hub.
    let b = device(
        d,
        "officer-b",
        &[
            "--role",
            "enrolment-officer",
            "--location",
            &p.shared,
            "--location",
            &p.own_b,
        ],
        &[&hub.p2p, &a.p2p],
    );
    let admin = device(
        d,
        "claims",
        &[
            "--role",
            "claim-administrator",
            "--facility",
            &p.facility_1,
            "--location",
            &p.shared,
        ],
        &[&hub.p2p],
    );

    // Each gets its own villages (or facility, and catchment) and the reference data.
    wait_holds(&a, "Patient", &in_a, "A's own village");
    wait_holds(&a, "Patient", &in_shared, "the shared village on A");
    wait_holds(&b, "Patient", &in_b, "B's own village");
    wait_holds(&b, "Patient", &in_shared, "the shared village on B");
    wait_holds(&admin, "Claim", &claim_1, "the facility's claim");
    wait_holds(&admin, "Patient", &in_shared, "the catchment's insuree");
    // Its villages' locations and those above them come too; not the other villages'.
    assert!(holds(&a, "Location", &p.own_a) && holds(&a, "Location", &p.district));
    assert!(
        !holds(&a, "Location", &p.own_b),
        "another officer's village"
    );
    // The officers write: A in its own village and the shared one, B in its own.
    let a_own = post(&a, "Patient", patient("WrittenByA", &p.own_a));
    let a_shared = post(&a, "Patient", patient("SharedByA", &p.shared));
    let b_own = post(&b, "Patient", patient("WrittenByB", &p.own_b));
    wait_holds(&b, "Patient", &a_shared, "A's shared-village write on B");
    for id in [&a_own, &a_shared, &b_own] {
        wait_holds(&central, "Patient", id, "the officers' writes on central");
        wait_holds(&hub, "Patient", id, "the officers' writes on the hub");
    }
    // Never the other officer's own village, another district's village, or another facility.
    std::thread::sleep(std::time::Duration::from_secs(3));
    for (n, ty, id, what) in [
        (&a, "Patient", &in_b, "B's village on A"),
        (&a, "Patient", &b_own, "B's write on A"),
        (&a, "Patient", &in_other, "another village on A"),
        (&a, "Claim", &claim_1, "a claim on an officer"),
        (&b, "Patient", &in_a, "A's village on B"),
        (&b, "Patient", &a_own, "A's write on B"),
        (&admin, "Claim", &claim_2, "another facility's claim"),
        (&admin, "Patient", &in_a, "a village outside the catchment"),
        (
            &hub,
            "Patient",
            &in_other,
            "a village outside the hub's district",
        ),
    ] {
        assert!(!holds(n, ty, id), "{what}: it should never be there");
    }
    let scope = status_scope(&a);
    let list = scope["holds"].to_string();
    assert!(
        list.contains(&p.shared) && list.contains(&p.own_a) && !list.contains(&p.own_b),
        "{scope}"
    );
    assert_eq!(scope["outside_scope_waiting"], 0, "{scope}");

    // An insuree of the shared village moves to A's own: it leaves B (once the hub holds every
    // change of it) and stays on A, the hub and central.
    let (_, mut moving) = a.get(&format!("/fhir/Patient/{in_shared}")).unwrap();
    let moved = moving.to_string().replace(&p.shared, &p.own_a);
    moving = serde_json::from_str(&moved).unwrap();
    let (status, _, r) = a
        .put(&format!("/fhir/Patient/{in_shared}"), &moving, &[])
        .unwrap();
    assert_eq!(status, 200, "{r}");
    wait_gone(&b, "Patient", &in_shared, "the moved insuree leaving B");
    for n in [&a, &hub, &central] {
        n.wait_for(WAIT, "the move everywhere it belongs", |n| {
            let (_, r) = n.get(&format!("/fhir/Patient/{in_shared}"))?;
            Ok(r.to_string().contains(&p.own_a))
        })
        .unwrap();
    }

    // A is re-scoped to a village of another district (it syncs with central from now on). A write it made just before stays: it reaches the
    // hub and central; then A holds exactly its new village.
    let just_before = post(&a, "Patient", patient("JustBefore", &p.own_a));
    let (_, a_data) = a.terminate(20).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let a_id = run_ok(&["id", "--data", a_data.to_str().unwrap()])
        .unwrap()
        .trim()
        .to_string();
    let (root, _) = fieldmesh_tests::test_root();
    let file = d.join("a-renewal.cert.json");
    run_ok(&[
        "cert",
        "issue",
        "--data",
        root.to_str().unwrap(),
        "--subject",
        &a_id,
        "--user",
        "EO-A",
        "--role",
        "enrolment-officer",
        "--location",
        &p.other,
        "--renewal",
        "--out",
        file.to_str().unwrap(),
    ])
    .unwrap();
    run_ok(&[
        "cert",
        "install",
        "--data",
        a_data.to_str().unwrap(),
        file.to_str().unwrap(),
    ])
    .unwrap();
    let a = start(&a_data, &[&hub.p2p, &central.p2p]);
    wait_holds(
        &central,
        "Patient",
        &just_before,
        "the write made just before, on central",
    );
    wait_holds(&a, "Patient", &in_other, "the new village on A");
    for (id, what) in [
        (&just_before, "the write made just before"),
        (&a_own, "A's old village"),
        (&in_a, "A's old village (central's insuree)"),
        (&a_shared, "the old shared village"),
        (&in_shared, "the moved insuree"),
    ] {
        wait_gone(&a, "Patient", id, what);
        assert!(holds(&hub, "Patient", id), "{what}: still on the hub");
    }
    // `/status` computes the scope report at most every few seconds.
    a.wait_for(WAIT, "the scope report", |n| {
        let scope = status_scope(n);
        Ok(scope["outside_scope_waiting"] == 0
            && scope["left_since_start"].as_u64().unwrap_or(0) >= 5)
    })
    .unwrap();
    // B keeps the shared village, including what A wrote there before it left.
    assert!(holds(&b, "Patient", &a_shared));
    // The CLI says the same of the stopped device.
    let (_, a_data) = a.terminate(20).unwrap();
    let out = run_ok(&["check", "--data", a_data.to_str().unwrap()]).unwrap();
    assert!(
        out.contains("scope: holds") && out.contains("0 document(s) outside it wait"),
        "{out}"
    );
}

/// A certified officer's phone that says in its `Hello` whatever it likes (that it is central,
/// that it holds nothing) is sent its own villages and reference data, nothing more.
#[test]
fn a_device_that_lies_in_its_hello_gets_only_its_scope() {
    let dir = tempfile::tempdir().unwrap();
    let central_data = dir.path().join("central");
    init(&central_data, "central", "central").unwrap();
    let secret = certified_key(
        dir.path(),
        "officer",
        &["--role", "enrolment-officer", "--location", "V1"],
    )
    .unwrap();
    run_ok(&[
        "cert",
        "install",
        "--data",
        central_data.to_str().unwrap(),
        dir.path().join("officer.cert.json").to_str().unwrap(),
    ])
    .unwrap();
    let central = Node::run(central_data).unwrap();
    let mine = post(&central, "Patient", patient("Mine", "V1"));
    let theirs = post(&central, "Patient", patient("Theirs", "V2"));
    let claim = post(&central, "Claim", claim(&theirs, "HF9"));
    let mut phone = TestPeer::connect(&central.p2p, Some(secret), false).unwrap();
    phone.name = "central".into();
    let pulled = phone.push(Vec::new(), 30).unwrap();
    assert!(pulled.ended.is_none(), "{pulled:?}");
    let got: Vec<String> = pulled
        .received
        .iter()
        .map(|p| uuid::Uuid::from_bytes(p.id).to_string())
        .collect();
    assert!(got.contains(&mine), "its own village: {got:?}");
    assert!(!got.contains(&theirs), "another village: {got:?}");
    assert!(!got.contains(&claim), "a claim: {got:?}");
    assert!(
        pulled.received.iter().all(|p| p.ty != "Claim"),
        "no claim at all"
    );
}
