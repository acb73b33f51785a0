//! The trust model with real processes on loopback: the API token, writes by a key without a
//! certificate, and an officer's forged reference data, relayed or not.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_tests::{Node, certify, init_uncertified, run_ok};
use serde_json::{Value, json};

const VILLAGE: &str = "R1D0W0V0";

fn patient(family: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family}], "birthDate": "1990-01-01",
        "address": [{"extension": [{"url": "https://openimis.github.io/openimis_fhir_r4_ig/StructureDefinition/address-location-reference",
            "valueReference": {"reference": format!("Location/{VILLAGE}")}}]}]})
}

fn quarantined(n: &Node) -> u64 {
    n.get("/status").unwrap().1["quarantined"]
        .as_u64()
        .unwrap_or(0)
}

fn has(n: &Node, path: &str) -> bool {
    n.get(path).unwrap().0 == 200
}

#[test]
fn the_api_needs_the_nodes_token_but_status_is_open() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), "a", "device")?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut r = agent
        .get(format!("{}/fhir/Patient?identifier=1", node.base))
        .call()?;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    let oo: Value = r.body_mut().read_json()?;
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("fieldmesh token --data"),
        "{oo}"
    );
    let r = agent
        .post(format!("{}/fhir/Patient", node.base))
        .header("Authorization", "Bearer not-the-token")
        .send_json(patient("X"))?;
    assert_eq!(r.status(), 401);
    assert_eq!(node.documents()?, 1, "nothing written without the token");
    // /status says whether the node may write, and as what.
    let (_, st) = node.get("/status")?;
    assert_eq!(st["trust"]["this_node"]["certified"], true, "{st}");
    assert_eq!(st["trust"]["this_node"]["roles"][0], "central", "{st}");
    // /status and the CapabilityStatement stay open, without resource content.
    assert_eq!(
        agent.get(format!("{}/status", node.base)).call()?.status(),
        200
    );
    assert_eq!(
        agent
            .get(format!("{}/fhir/metadata", node.base))
            .call()?
            .status(),
        200
    );
    // `fieldmesh token` prints what the API expects.
    let token = run_ok(&["token", "--data", node.data.to_str().unwrap()])?;
    let r = agent
        .get(format!("{}/fhir/Patient?identifier=1", node.base))
        .header("Authorization", &format!("Bearer {}", token.trim()))
        .call()?;
    assert_eq!(r.status(), 200);
    Ok(())
}

/// A node whose key has no certificate writes resources (it skips its own checks, as a modified
/// device would) and syncs with a certified node directly and with a hub; none of its writes
/// appears on any certified node: each refuses the session the moment it carries anything but
/// certificates, says why in `/status`, and keeps nothing of it (not even in quarantine).
#[test]
fn an_uncertified_nodes_writes_never_reach_certified_nodes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Node::start(dir.path(), "hub", "hub")?;
    let a = Node::start_with_peers(dir.path(), "a", "device", &[&hub.p2p])?;
    let (status, _, mine) = a.post("/fhir/Patient", &patient("Certified"))?;
    assert_eq!(status, 201);
    let u_data = dir.path().join("u");
    init_uncertified(&u_data, "u", "device")?;
    let u = Node::run_with(
        u_data,
        &["--byzantine", "--peer", &hub.p2p, "--peer", &a.p2p],
    )?;
    let (_, st) = u.get("/status")?;
    assert_eq!(st["trust"]["this_node"]["certified"], false, "{st}");
    assert!(
        st["trust"]["this_node"]["why"]
            .as_str()
            .unwrap()
            .contains("no certificate"),
        "{st}"
    );
    let mut ids = Vec::new();
    for i in 0..5 {
        let (status, _, created) = u.post("/fhir/Patient", &patient(&format!("Forged{i}")))?;
        assert_eq!(status, 201, "the byzantine node writes locally: {created}");
        ids.push(created["id"].as_str().unwrap().to_string());
    }
    let (status, _, loc) = u.post(
        "/fhir/Location",
        &json!({"resourceType": "Location", "name": "Nowhere"}),
    )?;
    assert_eq!(status, 201);
    ids.push(format!("Location/{}", loc["id"].as_str().unwrap()));
    // Both certified nodes refuse the uncertified node's sessions, and say why.
    let u_peer = st["peer_id"].as_str().unwrap().to_string();
    for n in [&hub, &a] {
        n.wait_for(60, "the uncertified sessions to be refused", |n| {
            let (_, st) = n.get("/status")?;
            Ok(st["known_peers"][&u_peer]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("may send only certificates")))
        })?;
    }
    // The certified node's own write still crosses the hub, and the uncertified one gets only
    // certificates (its own node holds its 6 writes, plus the certificates of a and hub).
    let mine_path = format!("/fhir/Patient/{}", mine["id"].as_str().unwrap());
    hub.wait_for(30, "a's Patient on the hub", |h| Ok(has(h, &mine_path)))?;
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(
        !has(&u, &mine_path),
        "an uncertified node was served a resource"
    );
    for n in [&hub, &a] {
        for id in &ids {
            let path = if id.contains('/') {
                format!("/fhir/{id}")
            } else {
                format!("/fhir/Patient/{id}")
            };
            assert!(!has(n, &path), "{path} reached a certified node");
        }
    }
    for n in [&hub, &a] {
        assert_eq!(
            quarantined(n),
            0,
            "a stranger's writes took space on {}",
            n.base
        );
    }
    Ok(())
}

/// An enrolment officer's device forges a Location (reference data, central's alone). The hub
/// quarantines it; it never reaches central or the other officer, while the officer's insuree
/// does.
#[test]
fn an_officers_forged_location_is_quarantined_on_the_hub() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Node::start(dir.path(), "hub", "hub")?;
    let central = Node::start_with_peers(dir.path(), "central", "central", &[&hub.p2p])?;
    let officer = |name: &str| -> anyhow::Result<std::path::PathBuf> {
        let data = dir.path().join(name);
        init_uncertified(&data, name, "device")?;
        certify(
            &data,
            &["--role", "enrolment-officer", "--location", VILLAGE],
        )?;
        Ok(data)
    };
    let (d1, d2) = (officer("officer-1")?, officer("officer-2")?);
    let o1 = Node::run_with(d1, &["--byzantine", "--peer", &hub.p2p])?;
    let o2 = Node::run_with(d2, &["--peer", &hub.p2p])?;
    let (status, _, loc) = o1.post(
        "/fhir/Location",
        &json!({"resourceType": "Location", "name": "A village of my own"}),
    )?;
    assert_eq!(status, 201, "the modified device writes it locally");
    let (status, _, p) = o1.post("/fhir/Patient", &patient("Maïga"))?;
    assert_eq!(status, 201);
    let (loc_path, p_path) = (
        format!("/fhir/Location/{}", loc["id"].as_str().unwrap()),
        format!("/fhir/Patient/{}", p["id"].as_str().unwrap()),
    );
    for n in [&o2, &central] {
        n.wait_for(60, "the officer's Patient", |n| Ok(has(n, &p_path)))?;
    }
    hub.wait_for(30, "the forged Location in quarantine", |h| {
        Ok(quarantined(h) >= 1)
    })?;
    std::thread::sleep(std::time::Duration::from_secs(2));
    for n in [&hub, &o2, &central] {
        assert!(!has(n, &loc_path), "the forged Location spread");
    }
    // The hub says why, while running (through its API).
    let listed = run_ok(&["quarantine", "--data", hub.data.to_str().unwrap()])?;
    assert!(
        listed.contains("Location") && listed.contains("may not author reference data"),
        "{listed}"
    );
    // The unmodified officer is refused at once, with a 403 naming the capability.
    let (status, _, oo) = o2.post(
        "/fhir/Location",
        &json!({"resourceType": "Location", "name": "Another"}),
    )?;
    assert_eq!(status, 403);
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("may not author reference data (Location)"),
        "{oo}"
    );
    let (status, _, oo) = o2.post(
        "/fhir/Patient",
        &json!({"resourceType": "Patient", "name": [{"family": "Elsewhere"}], "birthDate": "1990",
            "address": [{"extension": [{"url": "https://openimis.github.io/openimis_fhir_r4_ig/StructureDefinition/address-location-reference",
                "valueReference": {"reference": "Location/R1D1W1V2"}}]}]}),
    )?;
    assert_eq!(status, 403);
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("outside the author's scope"),
        "{oo}"
    );
    Ok(())
}
