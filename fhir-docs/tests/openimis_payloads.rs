//! Payloads shaped like the real openIMIS FHIR module's (its test fixtures and the mobile claims
//! app): every quirk listed in FHIR-MAPPING.md is accepted, kept as sent, and its identifiers and
//! code references are understood.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_fhir_docs::identifiers::{IdentKey, identifier_keys};
use fieldmesh_fhir_docs::profile::validate;
use fieldmesh_fhir_docs::{DocId, Resolver, document_to_json, new_document, prepare};
use serde_json::{Value, json};

const IG: &str = "https://openimis.github.io/openimis_fhir_r4_ig";

struct NoneLocal;
impl Resolver for NoneLocal {
    fn local(&self, _: &str, _: &str) -> Option<IdentKey> {
        None
    }
    fn find(&self, _: &str, _: &IdentKey) -> Option<String> {
        None
    }
}

/// As the openIMIS claims app posts it: code references only, identifier type `Code`, visit-type
/// system ending in `.html`, no `insurance`, `total` not multiplied by quantity, currency `$`.
fn mobile_claim() -> Value {
    serde_json::from_str(&format!(r#"{{
      "resourceType": "Claim",
      "identifier": [{{"type": {{"coding": [{{"system": "{IG}/CodeSystem/openimis-identifiers", "code": "Code"}}]}}, "value": "CLM-2024-0001"}}],
      "billablePeriod": {{"start": "2024-10-01", "end": "2024-10-01"}},
      "created": "2024-10-02",
      "type": {{"coding": [{{"system": "{IG}/CodeSystem-claim-visit-type.html", "code": "O", "display": "Other"}}]}},
      "patient": {{"reference": "Patient/070707081", "type": "Patient",
                  "identifier": {{"type": {{"coding": [{{"system": "{IG}/CodeSystem/openimis-identifiers", "code": "Code"}}]}}, "value": "070707081"}}}},
      "provider": {{"reference": "Organization/HFA1"}},
      "enterer": {{"reference": "Practitioner/CA001"}},
      "diagnosis": [{{"sequence": 1, "diagnosisCodeableConcept": {{"coding": [{{"system": "{IG}/CodeSystem/diagnosis-ICD10-level1", "code": "A02"}}]}}}}],
      "total": {{"value": 400.00, "currency": "$"}},
      "item": [{{"sequence": 1, "category": {{"text": "item"}}, "productOrService": {{"text": "0004"}},
                "quantity": {{"value": 2}}, "unitPrice": {{"value": 200.00, "currency": "$"}},
                "extension": [{{"url": "Medication", "valueReference": {{"reference": "Medication/0004"}}}}]}}]
    }}"#)).unwrap()
}

#[test]
fn the_mobile_claim_is_accepted_and_its_code_references_understood() {
    let claim = mobile_claim();
    validate(&claim, Some("Claim")).unwrap();
    let id = DocId::new();
    let p = prepare(
        claim.clone(),
        Some("Claim"),
        "urn:fieldmesh:node:claims-1",
        &id,
        &NoneLocal,
        &|_| None,
    )
    .unwrap();
    assert!(
        p.identifiers
            .contains(&IdentKey::openimis_code("CLM-2024-0001"))
    );
    let targets: Vec<(String, IdentKey)> = p
        .references
        .iter()
        .map(|r| (r.ty.clone(), r.key.clone()))
        .collect();
    for (ty, code) in [
        ("Patient", "070707081"),
        ("Organization", "HFA1"),
        ("Practitioner", "CA001"),
        ("Medication", "0004"),
    ] {
        assert!(
            targets.contains(&(ty.to_string(), IdentKey::openimis_code(code))),
            "{ty}/{code} in {targets:?}"
        );
    }
    // Everything else is kept as sent, byte for byte in its values.
    let mut doc = new_document(&p.json, fieldmesh_fhir_docs::actor_for_key(&[1; 32]), 0).unwrap();
    let back = document_to_json(&automerge::AutoCommit::load(&doc.save()).unwrap()).unwrap();
    assert_eq!(back["type"], claim["type"]);
    assert_eq!(back["total"], claim["total"]);
    assert!(
        serde_json::to_string(&back["item"])
            .unwrap()
            .contains("200.00")
    );
    assert!(back.get("insurance").is_none());
}

#[test]
fn module_quirks_are_accepted() {
    let quirky = [
        // Doubled slashes in extension URLs (coverage-date, organization-hf-level), datetimes without a timezone.
        json!({"resourceType": "Coverage", "status": "active",
            "beneficiary": {"reference": "Patient/070707081"}, "payor": [{"reference": "Patient/070707081"}],
            "period": {"start": "2024-01-01T00:00:00", "end": "2024-12-31T00:00:00"},
            "extension": [{"url": format!("{IG}//StructureDefinition/coverage-date"), "valueDate": "2024-01-01"}]}),
        json!({"resourceType": "Organization", "name": "Rachla Dispensary",
            "identifier": [{"type": {"coding": [{"system": format!("{IG}/CodeSystem/openimis-identifiers"), "code": "Code"}]}, "value": "HFA1"}],
            "extension": [{"url": format!("{IG}//StructureDefinition/organization-hf-level"), "valueCodeableConcept": {"coding": [{"code": "D"}]}}]}),
        // The IG's older hyphenated spellings, identifier type SB for a CHFID.
        json!({"resourceType": "Patient", "birthDate": "1995-09-07", "gender": "female",
            "name": [{"use": "usual", "family": "Ouédraogo", "given": ["Aïcha"]}],
            "identifier": [{"type": {"coding": [{"system": format!("{IG}/CodeSystem-openimis-identifiers"), "code": "SB"}]}, "value": "070707081"}],
            "extension": [{"url": format!("{IG}/StructureDefinition-patient-is-head"), "valueBoolean": true}]}),
        json!({"resourceType": "ActivityDefinition", "status": "active", "date": "2017-01-01T00:00:00", "name": "A1", "title": "General Consultation"}),
        json!({"resourceType": "PaymentNotice", "status": "active", "created": "2021-08-17T00:00:00",
            "amount": {"value": 5000, "currency": "USD"}, "request": {"reference": "Invoice/8e33033a-9f60-43ad-be3e-3bfeb992aae5"}}),
    ];
    for r in quirky {
        validate(&r, None).unwrap_or_else(|e| panic!("{e}: {r}"));
    }
    let patient = json!({"identifier": [{"type": {"coding": [{"system": format!("{IG}/CodeSystem-openimis-identifiers"), "code": "SB"}]}, "value": "070707081"}]});
    assert!(
        identifier_keys(patient.as_object().unwrap())
            .contains(&IdentKey::openimis_code("070707081"))
    );
}

/// A resolver under which every reference resolves to the id it was sent with: a read then
/// shows every reference exactly as posted.
struct EchoLocal;
impl Resolver for EchoLocal {
    fn local(&self, _: &str, _: &str) -> Option<IdentKey> {
        None
    }
    fn find(&self, _: &str, key: &IdentKey) -> Option<String> {
        Some(key.value.clone())
    }
}

/// Whether `sent` is found whole in `back`: every field with the same value; arrays at least as
/// long with each sent element found in the element at its place (a node appends its own
/// identifier to `identifier[]`). Returns the path of the first field lost.
fn lost(sent: &Value, back: &Value, path: &str) -> Option<String> {
    match (sent, back) {
        (Value::Object(s), Value::Object(b)) => s.iter().find_map(|(k, v)| match b.get(k) {
            Some(bv) => lost(v, bv, &format!("{path}.{k}")),
            None => Some(format!("{path}.{k}")),
        }),
        (Value::Array(s), Value::Array(b)) if b.len() >= s.len() => s
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (sv, bv))| lost(sv, bv, &format!("{path}[{i}]"))),
        (s, b) if s == b => None,
        _ => Some(format!("{path}: sent {sent}, read back {back}")),
    }
}

/// Every payload of openIMIS's FHIR module tests (fixtures/openimis-module) posted and read
/// back keeps every field it was sent with: references that carry an identifier keep its
/// `type` (openIMIS resolves by it), `display`, everything.
#[test]
fn the_module_payloads_keep_every_field_through_a_write_and_a_read() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openimis-module");
    let mut checked = 0;
    let mut with_typed_references = 0;
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    for path in paths {
        let sent: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let ty = sent["resourceType"].as_str().unwrap().to_string();
        if !fieldmesh_fhir_docs::profile::is_supported(&ty) {
            continue;
        }
        if serde_json::to_string(&sent)
            .unwrap()
            .contains("\"identifier\":{\"type\"")
        {
            with_typed_references += 1;
        }
        let id = DocId::new();
        let p = prepare(
            sent.clone(),
            Some(&ty),
            "urn:fieldmesh:node:officer-1",
            &id,
            &EchoLocal,
            &|_| None,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Stored as an Automerge document and read back as a client reads it.
        let doc = new_document(&p.json, fieldmesh_fhir_docs::actor_for_key(&[1; 32]), 0).unwrap();
        let stored = document_to_json(&doc).unwrap();
        let back = fieldmesh_fhir_docs::render(stored, &id.to_string(), "v1", None, &EchoLocal);
        let mut sent_fields = sent.clone();
        // `"actual": "True"` is stored as the boolean it means (valid FHIR).
        fieldmesh_fhir_docs::resource::normalise_quirks(&mut sent_fields);
        let sent_obj = sent_fields.as_object_mut().unwrap();
        sent_obj.remove("id");
        if let Some(Value::Object(meta)) = sent_obj.get_mut("meta") {
            meta.remove("versionId");
            meta.remove("lastUpdated");
        }
        if let Some(path_lost) = lost(&sent_fields, &back, &ty) {
            panic!("{} loses {path_lost}", path.display());
        }
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} payloads checked");
    assert!(with_typed_references >= 7, "{with_typed_references}");
}
