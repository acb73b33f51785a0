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
