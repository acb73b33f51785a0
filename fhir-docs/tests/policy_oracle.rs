//! Policy values against openIMIS's own code: every case of
//! `fixtures/policy-values-openimis.ndjson` was priced by openIMIS's `policy/values.py` and its
//! product encoded by openIMIS's FHIR module (`tests/openimis/policy_oracle.py` made it); the
//! product is read back from that FHIR form and priced here.
#![allow(clippy::unwrap_used)]

use fieldmesh_fhir_docs::openimis::dates::Date;
use fieldmesh_fhir_docs::openimis::policy::{Money, Product, Stage, Terms, value};
use serde_json::Value;

fn date(v: &Value) -> Date {
    Date::parse(v.as_str().unwrap()).unwrap()
}

#[test]
fn every_case_priced_by_openimis_is_priced_alike() {
    let text = include_str!("fixtures/policy-values-openimis.ndjson");
    let mut cases = 0;
    let mut failures = Vec::new();
    for line in text.lines() {
        let case: Value = serde_json::from_str(line).unwrap();
        let product = Product::from_insurance_plan(case["product"].as_object().unwrap()).unwrap();
        let members: Vec<Date> = case["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(date)
            .collect();
        let terms = Terms {
            product: &product,
            stage: if case["stage"] == "R" {
                Stage::Renewal
            } else {
                Stage::New
            },
            enroll: date(&case["enroll"]),
            today: date(&case["today"]),
            members: &members,
            previous_expiry: case["previous_expiry"].as_str().and_then(Date::parse),
        };
        let v = value(&terms);
        let expected = (
            Money::parse(&case["value"]).unwrap(),
            date(&case["start"]),
            date(&case["expiry"]),
        );
        if (v.value, v.start, v.expiry) != expected {
            failures.push(format!(
                "case {cases}: openIMIS {} {} {}, here {} {} {}\n  {product:?}\n  {line}",
                expected.0, expected.1, expected.2, v.value, v.start, v.expiry
            ));
        }
        cases += 1;
    }
    assert!(cases >= 200, "{cases} cases");
    assert!(
        failures.is_empty(),
        "{} of {cases} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
