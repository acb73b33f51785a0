//! The local FHIR REST API of a real `fieldmesh run` process on loopback.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_tests::{Node, header};
use serde_json::{Value, json};

const IDS: &str = "https://openimis.github.io/openimis_fhir_r4_ig/CodeSystem/openimis-identifiers";

/// Built from text: a `json!` float literal would pass through f64 and lose `61.50`'s zero.
fn patient(chfid: &str) -> Value {
    let text = format!(
        r#"{{"resourceType": "Patient",
        "identifier": [{{"type": {{"coding": [{{"system": "{IDS}", "code": "Code"}}]}}, "value": "{chfid}"}}],
        "name": [{{"use": "usual", "family": "Maïga", "given": ["Aïssatou", "عائشة"]}}],
        "gender": "female", "birthDate": "1994-03-12",
        "extension": [{{"url": "https://openimis.github.io/openimis_fhir_r4_ig/StructureDefinition/patient-is-head", "valueBoolean": true}},
                      {{"url": "urn:test:weight", "valueDecimal": 61.50}}]}}"#
    );
    serde_json::from_str(&text).expect("the test resource is valid JSON")
}

#[test]
fn create_read_update_search_and_automerge() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), "officer-1", "device")?;

    let (status, headers, created) = node.post("/fhir/Patient", &patient("1234567890"))?;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let location = header(&headers, "location").unwrap();
    assert!(
        location.contains(&format!("/fhir/Patient/{id}/_history/")),
        "{location}"
    );
    assert!(
        header(&headers, "content-type")
            .unwrap()
            .starts_with("application/fhir+json")
    );
    let etag = header(&headers, "etag").unwrap().to_string();
    // The node's own identifier was added; decimals and Unicode are kept exactly.
    assert!(
        created["identifier"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["system"] == "urn:fieldmesh:node:officer-1" && i["value"] == id)
    );
    let text = serde_json::to_string(&created)?;
    assert!(text.contains("61.50"), "{text}");
    assert_eq!(created["name"][0]["given"][1], "عائشة");

    let (status, read) = node.get(&format!("/fhir/Patient/{id}"))?;
    assert_eq!(status, 200);
    assert_eq!(read, created);

    // Update: one field changes, the version moves, stale If-Match is refused.
    let mut changed = read.clone();
    changed["telecom"] = json!([{"system": "phone", "value": "+227 96 12 34 56"}]);
    let (status, headers, updated) = node.put(
        &format!("/fhir/Patient/{id}"),
        &changed,
        &[("If-Match", &etag)],
    )?;
    assert_eq!(status, 200, "{updated}");
    assert_ne!(header(&headers, "etag").unwrap(), etag);
    assert_eq!(updated["telecom"][0]["value"], "+227 96 12 34 56");
    let (status, _, oo) = node.put(
        &format!("/fhir/Patient/{id}"),
        &changed,
        &[("If-Match", &etag)],
    )?;
    assert_eq!(status, 412, "{oo}");
    assert_eq!(oo["resourceType"], "OperationOutcome");

    // Search by system|value, by value only, by openIMIS type.
    for q in [
        format!("identifier=urn:fieldmesh:node:officer-1|{id}"),
        "identifier=1234567890".to_string(),
        format!("identifier:of-type={IDS}|Code|1234567890"),
        format!("_id={id}"),
    ] {
        let (status, bundle) = node.get(&format!("/fhir/Patient?{}", q.replace('|', "%7C")))?;
        assert_eq!(status, 200, "{q}: {bundle}");
        assert_eq!(bundle["resourceType"], "Bundle");
        assert_eq!(bundle["type"], "searchset");
        assert_eq!(bundle["total"], 1, "{q}");
        assert_eq!(bundle["entry"][0]["resource"]["id"], id.as_str());
    }
    let (_, none) = node.get("/fhir/Patient?identifier=0000000000")?;
    assert_eq!(none["total"], 0);
    assert!(none.get("entry").is_none());

    // The Automerge document as saved: loadable, and its root is the stored resource.
    let (status, headers, bytes) = node.get_raw(&format!("/fhir/Patient/{id}/$automerge"))?;
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "content-type"),
        Some("application/octet-stream")
    );
    let doc = fieldmesh_fhir_docs::automerge::AutoCommit::load(&bytes)?;
    let root = fieldmesh_fhir_docs::document_to_json(&doc)?;
    assert_eq!(root["telecom"][0]["value"], "+227 96 12 34 56");
    assert_eq!(root["name"][0]["family"], "Maïga");
    assert!(
        root.get("id").is_none(),
        "the local id is not part of the document"
    );

    let (status, st) = node.get("/status")?;
    assert_eq!(status, 200);
    for field in [
        "name",
        "role",
        "system",
        "peer_id",
        "documents",
        "peers",
        "quarantined",
    ] {
        assert!(st.get(field).is_some(), "/status lacks {field}: {st}");
    }
    assert_eq!(st["documents"], 2, "the Patient and the node's certificate");
    assert_eq!(st["system"], "urn:fieldmesh:node:officer-1");
    assert!(st["peer_id"].as_str().unwrap().starts_with("12D3KooW"));
    let (status, cap) = node.get("/fhir/metadata")?;
    assert_eq!(
        (status, cap["resourceType"].as_str()),
        (200, Some("CapabilityStatement"))
    );
    Ok(())
}

#[test]
fn references_are_logical_and_render_local_ids() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), "claims-1", "device")?;
    let (_, _, hf) = node.post(
        "/fhir/Organization",
        &json!({"resourceType": "Organization", "name": "CSI Tounga",
        "identifier": [{"type": {"coding": [{"system": IDS, "code": "Code"}]}, "value": "HF001"}]}),
    )?;
    let (_, _, p) = node.post("/fhir/Patient", &patient("5555555555"))?;
    // The openIMIS claims app sends code references: Patient/<CHFID>, Organization/<HF code>.
    let claim = json!({"resourceType": "Claim", "status": "active", "use": "claim",
        "identifier": [{"type": {"coding": [{"system": IDS, "code": "MR"}]}, "value": "CLM-001"}],
        "patient": {"reference": "Patient/5555555555"}, "provider": {"reference": "Organization/HF001"},
        "enterer": {"reference": "Practitioner/CA0001"},
        "created": "2026-11-02", "billablePeriod": {"start": "2026-11-02"},
        "total": serde_json::from_str::<Value>(r#"{"value": 1500.00, "currency": "XOF"}"#)?});
    let (status, headers, answer) = node.post("/fhir/Claim", &claim)?;
    assert_eq!(status, 201, "{answer}");
    // As openIMIS answers a claim: with its ClaimResponse (nothing to check it against here,
    // no items); the Location names the Claim.
    assert_eq!(answer["resourceType"], "ClaimResponse");
    let claim_id = answer["request"]["reference"]
        .as_str()
        .unwrap()
        .trim_start_matches("Claim/")
        .to_string();
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "location" && v.contains(&format!("/Claim/{claim_id}/"))),
        "{headers:?}"
    );
    let (_, c) = node.get(&format!("/fhir/Claim/{claim_id}"))?;
    assert_eq!(
        c["patient"]["reference"],
        format!("Patient/{}", p["id"].as_str().unwrap())
    );
    assert_eq!(
        c["provider"]["reference"],
        format!("Organization/{}", hf["id"].as_str().unwrap())
    );
    // Not known here (yet): kept as a logical reference, without a literal one.
    assert!(c["enterer"].get("reference").is_none());
    assert_eq!(c["enterer"]["identifier"]["value"], "CA0001");
    assert!(serde_json::to_string(&c)?.contains("1500.00"));
    // The claim code sent with type MR is found as an openIMIS Code.
    let (_, b) = node.get(&format!(
        "/fhir/Claim?identifier:of-type={IDS}%7CCode%7CCLM-001"
    ))?;
    assert_eq!(b["total"], 1);

    // The practitioner arrives later: the reference now renders.
    let (_, _, ca) = node.post("/fhir/Practitioner", &json!({"resourceType": "Practitioner",
        "identifier": [{"type": {"coding": [{"system": IDS, "code": "Code"}]}, "value": "CA0001"}]}))?;
    let (_, again) = node.get(&format!("/fhir/Claim/{}", c["id"].as_str().unwrap()))?;
    assert_eq!(
        again["enterer"]["reference"],
        format!("Practitioner/{}", ca["id"].as_str().unwrap())
    );
    Ok(())
}

#[test]
fn errors_are_operation_outcomes_with_the_right_status() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), "n", "device")?;
    let check = |status: u16, body: &Value, want: u16, needle: &str| {
        assert_eq!(status, want, "{body}");
        assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
        let text = body.to_string();
        assert!(text.contains(needle), "{needle:?} not in {text}");
    };
    let (s, _, b) = node.post_raw(
        "/fhir/Patient",
        b"{\"resourceType\": \"Patient\", \"name\": [",
    )?;
    check(s, &b, 400, "not valid JSON");
    let (s, _, b) = node.post_raw("/fhir/Patient", b"")?;
    check(s, &b, 400, "no body");
    let (s, _, b) = node.post(
        "/fhir/Patient",
        &json!({"resourceType": "Patient", "name": [{"family": "A"}], "birthDate": "1990-02-31x"}),
    )?;
    check(s, &b, 422, "Patient.birthDate");
    assert_eq!(b["issue"][0]["expression"][0], "Patient.birthDate");
    let (s, _, b) = node.post("/fhir/Patient", &json!({"resourceType": "Claim"}))?;
    check(s, &b, 422, "the request is for \\\"Patient\\\"");
    let (s, _, b) = node.post("/fhir/Spaceship", &json!({"resourceType": "Spaceship"}))?;
    check(s, &b, 404, "does not hold Spaceship");
    let (s, b) = node.get("/fhir/Patient/2b0b6f0e-5d4c-4b7a-9a43-9f6f1e2d3c4b")?;
    check(s, &b, 404, "no Patient with id");
    let (s, b) = node.get("/fhir/Patient/not-a-uuid")?;
    check(s, &b, 404, "no Patient");
    let (s, b) = node.get("/fhir/Patient")?;
    check(s, &b, 400, "identifier");
    let (s, b) = node.get("/fhir/Patient?birthdate=1990")?;
    check(s, &b, 400, "not supported");
    let (s, b) = node.get("/nowhere")?;
    check(s, &b, 404, "/fhir/");
    let (s, _, b) = node.put("/fhir/Patient", &json!({}), &[])?;
    check(s, &b, 405, "not supported");
    // A Location created, then read as a Patient: 404, not the Location.
    let (_, _, loc) = node.post(
        "/fhir/Location",
        &json!({"resourceType": "Location", "name": "Tounga"}),
    )?;
    let (s, b) = node.get(&format!("/fhir/Patient/{}", loc["id"].as_str().unwrap()))?;
    check(s, &b, 404, "no Patient");
    let (s, _, b) = node.put(
        &format!("/fhir/Location/{}", loc["id"].as_str().unwrap()),
        &json!({"resourceType": "Location", "id": "other", "name": "x"}),
        &[],
    )?;
    check(s, &b, 422, "URL names");
    // The node kept running and kept its data.
    let (s, st) = node.get("/status")?;
    assert_eq!((s, st["documents"].as_u64()), (200, Some(2)));
    Ok(())
}

/// A client that PUTs a resource back as the node served it (a reference to a Location the node
/// does not hold comes back as a logical `{type, identifier}`) keeps the reference index whole:
/// index entries come from the whole resulting document, whatever form the client used.
#[test]
fn a_put_of_the_resource_as_served_keeps_the_indexes_consistent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), "officer-1", "device")?;
    let (status, _, created) = node.post(
        "/fhir/Patient",
        &json!({"resourceType": "Patient", "name": [{"family": "Hamani"}], "birthDate": "1970-07-07",
            "address": [{"extension": [{"url": "https://openimis.github.io/openimis_fhir_r4_ig/StructureDefinition/address-location-reference",
                "valueReference": {"reference": "Location/R1D0W0V0"}}]}]}),
    )?;
    assert_eq!(status, 201, "{created}");
    let path = format!("/fhir/Patient/{}", created["id"].as_str().unwrap());
    let (_, mut served) = node.get(&path)?;
    let reference = &served["address"][0]["extension"][0]["valueReference"];
    assert!(reference.get("reference").is_none(), "{reference}");
    assert_eq!(reference["identifier"]["value"], "R1D0W0V0");
    served["telecom"] = json!([{"system": "phone", "value": "+227 90 90 90 90"}]);
    let (status, _, _) = node.put(&path, &served, &[])?;
    assert_eq!(status, 200);
    let (_, data) = node.terminate(10)?;
    fieldmesh_tests::check(&data)
}

/// The `Location` of a write answers (vread), `_history` lists the versions, and resources are
/// found by reference (`Claim?patient=Patient/<id>`, from the reference index).
#[test]
fn location_history_and_reference_search() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), "claims-1", "device")?;
    let (_, headers, p) = node.post("/fhir/Patient", &patient("7777777777"))?;
    let id = p["id"].as_str().unwrap().to_string();
    let location = header(&headers, "location").unwrap().to_string();
    let path = location.split_once("/fhir").unwrap().1;
    let (status, v1) = node.get(&format!("/fhir{path}"))?;
    assert_eq!(status, 200, "{location}: {v1}");
    assert_eq!(v1["id"], id.as_str());
    let mut changed = v1.clone();
    changed["gender"] = json!("other");
    let (status, _, v2) = node.put(&format!("/fhir/Patient/{id}"), &changed, &[])?;
    assert_eq!(status, 200);
    // The first version is still there, as it was.
    let (status, again) = node.get(&format!("/fhir{path}"))?;
    assert_eq!(status, 200);
    assert_eq!(again["gender"], "female");
    let (status, history) = node.get(&format!("/fhir/Patient/{id}/_history"))?;
    assert_eq!((status, history["type"].as_str()), (200, Some("history")));
    assert_eq!(history["total"], 2);
    assert_eq!(
        history["entry"][0]["resource"]["meta"]["versionId"],
        v2["meta"]["versionId"]
    );
    let (status, oo) = node.get(&format!("/fhir/Patient/{id}/_history/0000000000000000"))?;
    assert_eq!(
        (status, oo["resourceType"].as_str()),
        (404, Some("OperationOutcome"))
    );
    // Two claims, one for this patient.
    for chfid in ["7777777777", "1111111111"] {
        let claim = json!({"resourceType": "Claim", "patient": {"reference": format!("Patient/{chfid}")},
            "created": "2026-11-02", "billablePeriod": {"start": "2026-11-02"}});
        assert_eq!(node.post("/fhir/Claim", &claim)?.0, 201);
    }
    let (status, found) = node.get(&format!("/fhir/Claim?patient=Patient/{id}"))?;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["total"], 1, "{found}");
    let (_, none) = node.get(&format!("/fhir/Claim?provider=Patient/{id}"))?;
    assert_eq!(none["total"], 0, "the element must match too");
    Ok(())
}
