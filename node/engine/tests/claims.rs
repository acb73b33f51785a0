//! Claims on real engines: a claim administrator's device checks each claim as openIMIS does
//! (FHIR-MAPPING §4: the order and the rejection codes) from what it holds and answers with a
//! ClaimResponse; central adjudicates with everything and its verdict syncs back.
//!
//! Every case is built from §4's rule, not from what the code answers: the reference data
//! below is a small district whose dispensary (HF1, out-patient only) has a price list, a
//! product covering some items and services with limits, and insurees in every state a rule
//! looks at.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_engine::central::{Central, NumberConfig, STEP_ENTRIES};
use fieldmesh_engine::claims::response_id;
use fieldmesh_engine::test_support::{certificate, certificate_doc, key, peer, public, sync_pair};
use fieldmesh_engine::{Engine, NodeIdentity, Source, WriteError, now};
use fieldmesh_fhir_docs::DocId;
use fieldmesh_fhir_docs::openimis::dates::Date;
use fieldmesh_fhir_docs::openimis::policy::PREMIUM_EXTENSION;
use fieldmesh_fhir_docs::openimis::{IG, LOCATION_EXTENSION};
use fieldmesh_fhir_docs::profile::{PRICE_LIST_PROFILE, PRICE_OVERRIDE_EXTENSION};
use fieldmesh_storage::MemStore;
use fieldmesh_trust::Role;
use fieldmesh_trust::ed25519_dalek::SigningKey;
use serde_json::{Value, json};

const CENTRAL: &str = "urn:fieldmesh:node:central";
const IDS: &str = "https://openimis.github.io/openimis_fhir_r4_ig/CodeSystem/openimis-identifiers";

fn today() -> Date {
    Date::from_unix(now())
}

fn day(days_ago: i64) -> String {
    today().add_days(-days_ago).to_string()
}

fn code(value: &str) -> Value {
    json!([{"type": {"coding": [{"system": IDS, "code": "Code"}]}, "value": value}])
}

fn by_code(ty: &str, value: &str) -> Value {
    json!({"type": ty, "identifier": {"type": {"coding": [{"system": IDS, "code": "Code"}]}, "value": value}})
}

fn money(v: f64) -> Value {
    json!({"value": v, "currency": "XOF"})
}

fn usage(kind: &str, codes: &[&str]) -> Value {
    let system = match kind {
        "gender" => "http://hl7.org/fhir/administrative-gender".to_string(),
        "age" => format!("{IG}/CodeSystem/usage-context-age-type"),
        "venue" => "http://terminology.hl7.org/CodeSystem/v3-ActCode".to_string(),
        _ => format!("{IG}/CodeSystem/activity-definition-usage-context-workflow-type"),
    };
    json!({"code": {"system": "http://terminology.hl7.org/CodeSystem/usage-context-type", "code": kind},
        "valueCodeableConcept": {"coding": codes.iter().map(|c| json!({"system": system, "code": c})).collect::<Vec<_>>()}})
}

/// An item (Medication) as openIMIS's FHIR module writes it: price, usage context (gender,
/// age, care type) in its extension, frequency in days.
fn item(code_: &str, price: f64, status: &str, genders: &[&str], frequency: Option<u32>) -> Value {
    let mut ext =
        vec![json!({"url": format!("{IG}/CodeSystem/unit-price"), "valueMoney": money(price)})];
    if !genders.is_empty() {
        ext.push(json!({"url": format!("{IG}/StructureDefinition/medication-usage-context", ), "extension": [
            {"url": "Gender", "valueUsageContext": usage("gender", genders)},
            {"url": "Age", "valueUsageContext": usage("age", &["adult", "child"])}]}));
    }
    if let Some(days) = frequency {
        ext.push(
            json!({"url": format!("{IG}/StructureDefinition/medication-frequency"),
            "valueTiming": {"repeat": {"frequency": 1, "period": days, "periodUnit": "d"}}}),
        );
    }
    json!({"resourceType": "Medication", "identifier": code(code_), "code": {"text": code_},
        "status": status, "extension": ext})
}

/// A service (ActivityDefinition): price, venue (`AMB` out-patient, `IMP` in-patient) and
/// category (`workflow`: C consultation, D delivery …).
fn service(code_: &str, price: f64, venues: &[&str], category: &str) -> Value {
    json!({"resourceType": "ActivityDefinition", "identifier": code(code_), "name": code_, "title": code_,
        "status": "active",
        "extension": [{"url": format!("{IG}/StructureDefinition/unit-price"), "valueMoney": money(price)}],
        "useContext": [usage("venue", venues), usage("workflow", &[category])]})
}

fn limit(code_: &str, value: f64) -> Value {
    json!({"value": {"value": value}, "code": {"coding": [{"code": code_}]}})
}

/// 12 months; adult 100, child 50, registration 10. Covers I1 (3 per period), I2, I3, I4, I5,
/// S1 (at most 2 consultation claims per period), S2 (6 months' waiting), S3; not I6.
fn product() -> Value {
    json!({"resourceType": "InsurancePlan", "identifier": code("PRD01"),
        "name": "Test product", "status": "active",
        "coverage": [
            {"benefit": [{"limit": [
                {"value": {"value": 12, "unit": "month"}, "code": {"coding": [{"code": "period"}]}},
                {"value": {"value": 6, "unit": "member"}, "code": {"coding": [{"code": "memberCount"}]}},
                limit("maxNoConsultation", 2.0)]}]},
            {"type": {"coding": [{"system": "urn:fieldmesh:CodeSystem/product-cover", "code": "item"}]}, "benefit": [
                {"type": {"coding": [{"code": "I1"}]}, "limit": [limit("limitNoAdult", 3.0), limit("limitNoChild", 3.0)]},
                {"type": {"coding": [{"code": "I2"}]}}, {"type": {"coding": [{"code": "I3"}]}},
                {"type": {"coding": [{"code": "I4"}]}}, {"type": {"coding": [{"code": "I5"}]}}]},
            {"type": {"coding": [{"system": "urn:fieldmesh:CodeSystem/product-cover", "code": "service"}]}, "benefit": [
                {"type": {"coding": [{"code": "S1"}]}},
                {"type": {"coding": [{"code": "S2"}]}, "limit": [limit("waitingPeriodAdult", 6.0), limit("waitingPeriodChild", 6.0)]},
                {"type": {"coding": [{"code": "S3"}]}}]}],
        "plan": [{"generalCost": [
            {"type": {"coding": [{"code": "lumpsum"}]}, "cost": money(0.0)},
            {"type": {"coding": [{"code": "premiumAdult"}]}, "cost": money(100.0)},
            {"type": {"coding": [{"code": "premiumChild"}]}, "cost": money(50.0)},
            {"type": {"coding": [{"code": "registrationFee"}]}, "cost": money(10.0)}]}]})
}

fn address(village: &str) -> Value {
    json!([{"extension": [{"url": LOCATION_EXTENSION, "valueReference": {"reference": format!("Location/{village}")}}]}])
}

fn patient(number: &str, given: &str, gender: &str, birth: &str, village: &str) -> Value {
    json!({"resourceType": "Patient", "identifier": code(number), "name": [{"family": "Moussa", "given": [given]}],
        "birthDate": birth, "gender": gender, "address": address(village)})
}

fn group(members: &[&str], village: &str) -> Value {
    json!({"resourceType": "Group", "type": "person", "actual": true, "name": "Moussa",
        "member": members.iter().map(|m| json!({"entity": {"reference": format!("Patient/{m}")}})).collect::<Vec<_>>(),
        "extension": [{"url": format!("{IG}/StructureDefinition/group-address"), "valueAddress": address(village)[0].clone()}]})
}

/// A policy of `family` enrolled `enrolled`, paid in full (so active from that day).
fn contract(family: &str, head: &str, product: &str, enrolled: &str) -> Value {
    json!({"resourceType": "Contract", "status": "Offered", "legalState": {"text": "Offered"},
        "subject": [{"reference": format!("Group/{family}")}],
        "term": [{"offer": {"party": [{"reference": [{"reference": format!("Patient/{head}")}], "role": {"coding": [{"code": "beneficiary"}]}}]},
            "asset": [{"extension": [{"url": PREMIUM_EXTENSION, "extension": [
                    {"url": "payer", "valueCodeableConcept": {"coding": [{"code": "beneficiary"}]}},
                    {"url": "category", "valueCodeableConcept": {"coding": [{"code": "C"}]}},
                    {"url": "amount", "valueMoney": money(1000.0)},
                    {"url": "receipt", "valueString": format!("RC-{family}")},
                    {"url": "date", "valueDate": enrolled},
                    {"url": "type", "valueCodeableConcept": {"coding": [{"code": "C"}]}}]}],
                "period": [{"start": enrolled}], "usePeriod": [{"start": enrolled}],
                "valuedItem": [{"entityReference": {"reference": format!("InsurancePlan/{product}")}}]}]}]})
}

/// A line: `(kind, code, quantity, unit price asked)`.
type LineSpec<'a> = (&'a str, &'a str, f64, Option<f64>);

/// A claim as the openIMIS claims app posts it: code references only (patient by insurance
/// number, facility by code, the claim administrator by code, items and services by code in
/// the first extension), `total` the sum of unit prices (its quirk), currency `$`.
fn claim(
    number: &str,
    chfid: &str,
    hf: &str,
    from: &str,
    to: &str,
    lines: &[LineSpec<'_>],
) -> Value {
    let items: Vec<Value> = lines
        .iter()
        .enumerate()
        .map(|(i, (kind, c, qty, price))| {
            let ty = if *kind == "item" { "Medication" } else { "ActivityDefinition" };
            let mut l = json!({"sequence": i + 1, "category": {"text": kind}, "productOrService": {"text": c},
                "quantity": {"value": qty},
                "extension": [{"url": ty, "valueReference": {"type": ty, "identifier":
                    {"type": {"coding": [{"system": IDS, "code": "code"}]}, "value": c}}}]});
            if let Some(p) = price {
                l["unitPrice"] = json!({"value": p, "currency": "$"});
            }
            l
        })
        .collect();
    let total: f64 = lines.iter().filter_map(|l| l.3).sum();
    json!({"resourceType": "Claim", "identifier": code(number), "status": "active", "use": "claim",
        "type": {"coding": [{"system": format!("{IG}/CodeSystem-claim-visit-type.html"), "code": "O", "display": "Other"}]},
        "patient": by_code("Patient", chfid), "provider": by_code("Organization", hf),
        "enterer": by_code("Practitioner", "CA0001"),
        "created": to, "billablePeriod": {"start": from, "end": to},
        "diagnosis": [{"sequence": 1, "diagnosisCodeableConcept": {"coding": [{"system": format!("{IG}/CodeSystem/diagnosis-ICD10-level1"), "code": "B54"}]}}],
        "item": items, "total": {"value": total, "currency": "$"}})
}

struct World {
    root: SigningKey,
    central: Engine,
    services: Central,
    ca: Engine,
}

fn create(e: &mut Engine, r: Value) -> String {
    let id = e.create(r, None, false, &|_| None).unwrap().to_string();
    e.flush().unwrap();
    id
}

fn world() -> World {
    let root = key(1);
    let mut central = Engine::new(
        Box::new(MemStore::default()),
        NodeIdentity::new(CENTRAL.into(), &[1; 32], public(&root)),
        256,
    );
    let mut ca = fieldmesh_engine::test_support::engine(&[5; 32], "claims-5", &public(&root));
    let cert = certificate_doc(
        &root,
        &certificate(
            &key(5),
            "CA0001",
            &[Role::ClaimAdministrator],
            &["V1"],
            &["HF1"],
            (now() - 3600, now() + 86_400),
        ),
        now(),
    );
    for e in [&mut central, &mut ca] {
        e.merge(vec![cert.clone()], &Source::Local).unwrap();
        e.flush().unwrap();
    }
    let services = Central::open(&mut central, NumberConfig::default()).unwrap();
    let c = &mut central;
    let district = create(
        c,
        json!({"resourceType": "Location", "identifier": code("D1"), "name": "District",
        "physicalType": {"coding": [{"code": "D"}]}}),
    );
    for v in ["V1", "V2"] {
        create(
            c,
            json!({"resourceType": "Location", "id": v, "identifier": code(v), "name": v,
            "physicalType": {"coding": [{"code": "V"}]}, "partOf": {"reference": format!("Location/{district}")}}),
        );
    }
    for (hf, care) in [("HF1", "O"), ("HF2", "B")] {
        create(
            c,
            json!({"resourceType": "Organization", "identifier": code(hf), "name": hf,
            "type": [{"coding": [{"code": "prov"}]}],
            "address": [{"extension": [{"url": LOCATION_EXTENSION, "valueReference": {"reference": format!("Location/{district}")}}]}],
            "extension": [{"url": format!("{IG}/StructureDefinition/organization-hf-care-type"),
                "valueCodeableConcept": {"coding": [{"code": care}]}}]}),
        );
    }
    let mut defs = Vec::new();
    for r in [
        item("I1", 150.0, "active", &[], None),
        item("I2", 80.0, "active", &["male"], None),
        item("I3", 60.0, "inactive", &[], None),
        item("I4", 90.0, "active", &[], None),
        item("I5", 1200.0, "active", &[], Some(7)),
        item("I6", 30.0, "active", &[], None),
        service("S1", 500.0, &["AMB"], "C"),
        service("S2", 5000.0, &["AMB"], "D"),
        service("S3", 2000.0, &["IMP"], "H"),
    ] {
        defs.push((
            r["resourceType"].as_str().unwrap().to_string(),
            create(c, r),
        ));
    }
    // HF1's price list: everything but I4; its own price for S1.
    let hf1 = c
        .reader()
        .find_ids(
            "Organization",
            &fieldmesh_fhir_docs::IdentifierQuery::ValueOnly("HF1".into()),
        )
        .unwrap()[0];
    let entries: Vec<Value> = defs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(i, (ty, id))| {
            let mut e = json!({"item": {"reference": format!("{ty}/{id}")}});
            if i == 6 {
                e["extension"] =
                    json!([{"url": PRICE_OVERRIDE_EXTENSION, "valueMoney": money(600.0)}]);
            }
            e
        })
        .collect();
    create(
        c,
        json!({"resourceType": "List", "status": "current", "mode": "working", "title": "HF1",
        "meta": {"profile": [PRICE_LIST_PROFILE]}, "subject": {"reference": format!("Organization/{hf1}")},
        "entry": entries}),
    );
    let product = create(c, product());
    // Family A in V1: an adult woman, a boy, an adult woman no longer valid; insured 60 days.
    let aicha = create(
        c,
        patient("100000001", "Aïcha", "female", "1980-04-02", "V1"),
    );
    let issa = create(c, patient("100000002", "Issa", "male", "2015-09-30", "V1"));
    let mut m = patient("100000003", "Mariam", "female", "1990-01-01", "V1");
    m["active"] = json!(false);
    let mariam = create(c, m);
    let a = create(c, group(&[&aicha, &issa, &mariam], "V1"));
    create(c, contract(&a, &aicha, &product, &day(60)));
    // Family B in V1: no policy.
    let zoe = create(c, patient("100000004", "Zoé", "female", "1985-05-05", "V1"));
    create(c, group(&[&zoe], "V1"));
    // Family C in V2 (outside the claim administrator's catchment): insured.
    let ousmane = create(
        c,
        patient("100000005", "Ousmane", "male", "1970-07-07", "V2"),
    );
    let cc = create(c, group(&[&ousmane], "V2"));
    create(c, contract(&cc, &ousmane, &product, &day(60)));
    let mut w = World {
        root,
        central,
        services,
        ca,
    };
    w.process();
    w.sync();
    w
}

impl World {
    fn process(&mut self) {
        loop {
            let r = self.services.step(&mut self.central, STEP_ENTRIES).unwrap();
            self.central.flush().unwrap();
            if !r.more && !self.services.has_work(&self.central) {
                return;
            }
        }
    }

    fn sync(&mut self) {
        sync_pair(
            &mut self.ca,
            &peer(&key(5)),
            &mut self.central,
            &peer(&self.root),
        )
        .unwrap();
    }

    /// Posts a claim on the device: its id and the ClaimResponse it was answered with.
    fn post(&mut self, c: Value) -> (String, Value) {
        let id = self.ca.create(c, Some("Claim"), false, &|_| None).unwrap();
        let answer = self.ca.take_claim_answer().unwrap();
        self.ca.flush().unwrap();
        (id.to_string(), answer)
    }
}

/// Per line, its rejection reason (0 accepted).
fn reasons(r: &Value) -> Vec<u64> {
    r["item"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let adj = i["adjudication"].as_array().unwrap();
            adj.last().unwrap()["reason"]["coding"][0]["code"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

/// The claim-level reasons (`error`).
fn errors(r: &Value) -> Vec<u64> {
    r["error"]
        .as_array()
        .map(|e| {
            e.iter()
                .map(|e| {
                    e["code"]["coding"][0]["code"]
                        .as_str()
                        .unwrap()
                        .parse()
                        .unwrap()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn provisional(r: &Value) -> Vec<String> {
    r["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["url"] == "urn:fieldmesh:StructureDefinition/claim-provisional")
        .flat_map(|e| e["extension"].as_array().unwrap().iter())
        .map(|c| c["valueCode"].as_str().unwrap().to_string())
        .collect()
}

/// The checked (approved) quantity of line `i`.
fn approved(r: &Value, i: usize) -> f64 {
    let adj = r["item"][i]["adjudication"].as_array().unwrap();
    assert_eq!(adj.last().unwrap()["category"]["coding"][0]["code"], "4");
    adj.last().unwrap()["value"].as_f64().unwrap()
}

#[test]
fn a_valid_claim_is_checked_and_the_price_list_price_is_approved() {
    let mut w = world();
    // S1 asked at 550 (its base price is 500, HF1 charges 600): the list's 600 is approved.
    // I1 without a price takes the list's (the base price, 150).
    let (id, r) = w.post(claim(
        "C-OK",
        "100000001",
        "HF1",
        &day(3),
        &day(3),
        &[
            ("service", "S1", 1.0, Some(550.0)),
            ("item", "I1", 2.0, None),
        ],
    ));
    assert_eq!(r["resourceType"], "ClaimResponse");
    assert_eq!(
        r["outcome"], "partial",
        "checked (openIMIS status 4): {r:#}"
    );
    assert_eq!(reasons(&r), vec![0, 0]);
    assert!(errors(&r).is_empty());
    let checked = r["total"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["category"]["coding"][0]["code"] == "4")
        .unwrap();
    assert_eq!(
        checked["amount"]["value"].as_f64().unwrap(),
        600.0 + 2.0 * 150.0
    );
    let entered = r["total"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["category"]["coding"][0]["code"] == "2")
        .unwrap();
    assert_eq!(
        entered["amount"]["value"].as_f64().unwrap(),
        550.0 + 2.0 * 150.0
    );
    assert!(
        r["processNote"][0]["text"]
            .as_str()
            .unwrap()
            .contains("price list"),
        "{r:#}"
    );
    // The insuree's claims elsewhere are not on this device: that part is provisional.
    assert_eq!(provisional(&r), vec!["history"]);
    // The claim keeps what the client sent, and I1 got the list's price.
    let stored = w.ca.served("Claim", &id).unwrap().resource;
    assert_eq!(
        stored["item"][0]["unitPrice"]["value"].as_f64(),
        Some(550.0)
    );
    assert_eq!(
        stored["item"][1]["unitPrice"]["value"].as_f64(),
        Some(150.0)
    );
    assert_eq!(stored["total"]["value"].as_f64(), Some(550.0));
    assert_eq!(stored["patient"]["identifier"]["value"], "100000001");
}

#[test]
fn dates_a_claim_entered_before_the_visit_is_rejected_9() {
    let mut w = world();
    let mut c = claim(
        "C-9",
        "100000001",
        "HF1",
        &day(3),
        &day(3),
        &[("item", "I1", 1.0, Some(150.0))],
    );
    c["created"] = json!(day(5));
    let (_, r) = w.post(c);
    assert_eq!(r["outcome"], "complete");
    assert_eq!(errors(&r), vec![9]);
    assert_eq!(reasons(&r), vec![9]);
    // No start at all: the same (openIMIS's check); a period without a start is already
    // refused by the profile (422, nothing stored).
    let mut c = claim(
        "C-9b",
        "100000001",
        "HF1",
        &day(3),
        &day(3),
        &[("item", "I1", 1.0, Some(150.0))],
    );
    c["billablePeriod"] = json!({"end": day(3)});
    let (_, r) = w.post(c);
    assert_eq!(errors(&r), vec![9]);
}

#[test]
fn insuree_no_longer_valid_7_and_without_a_policy_in_force_21() {
    let mut w = world();
    let (_, r) = w.post(claim(
        "C-7",
        "100000003",
        "HF1",
        &day(3),
        &day(3),
        &[("item", "I1", 1.0, Some(150.0))],
    ));
    assert_eq!(r["outcome"], "complete");
    assert_eq!(errors(&r), vec![7]);
    assert_eq!(
        reasons(&r),
        vec![7],
        "openIMIS's Claim.reject gives every line 7"
    );
    let (_, r) = w.post(claim(
        "C-21",
        "100000004",
        "HF1",
        &day(3),
        &day(3),
        &[("item", "I1", 1.0, Some(150.0))],
    ));
    assert_eq!(errors(&r), vec![21]);
    // Before the policy took effect (enrolled 60 days ago): no coverage on that day either.
    let (_, r) = w.post(claim(
        "C-21b",
        "100000001",
        "HF1",
        &day(90),
        &day(90),
        &[("item", "I1", 1.0, Some(150.0))],
    ));
    assert_eq!(errors(&r), vec![21]);
}

#[test]
fn each_line_stops_at_its_first_failure_in_openimis_order() {
    let mut w = world();
    let (_, r) = w.post(claim(
        "C-L",
        "100000001",
        "HF1",
        &day(3),
        &day(3),
        &[
            ("item", "I3", 1.0, Some(60.0)),  // no longer valid: 1
            ("item", "I4", 1.0, Some(90.0)),  // not in HF1's price list: 2
            ("service", "S3", 1.0, None),     // in-patient only, HF1 out-patient only: 10
            ("item", "I2", 1.0, None),        // men only, Aïcha is a woman: 4
            ("item", "I6", 1.0, None),        // no product of hers covers it: 3
            ("service", "S2", 1.0, None),     // 6 months' waiting, insured 60 days: 17
            ("item", "I1", 1.0, None),        // fine
            ("item", "NOPE", 1.0, Some(1.0)), // unknown: 1
        ],
    ));
    assert_eq!(reasons(&r), vec![1, 2, 10, 4, 3, 17, 0, 1], "{r:#}");
    assert_eq!(r["outcome"], "partial");
    // A stay (end after start) at an out-patient facility: care type for every line.
    let (_, r) = w.post(claim(
        "C-10",
        "100000001",
        "HF1",
        &day(4),
        &day(2),
        &[("item", "I1", 1.0, None)],
    ));
    assert_eq!(reasons(&r), vec![10]);
    // Every line rejected: the claim is, with 1.
    assert_eq!(r["outcome"], "complete");
    assert_eq!(errors(&r), vec![1]);
}

#[test]
fn frequency_5_limits_16_and_category_maxima_13_count_earlier_claims() {
    let mut w = world();
    // I5 may be given once a week.
    let (_, r) = w.post(claim(
        "F-1",
        "100000001",
        "HF1",
        &day(10),
        &day(10),
        &[("item", "I5", 1.0, None)],
    ));
    assert_eq!(reasons(&r), vec![0]);
    let (_, r) = w.post(claim(
        "F-2",
        "100000001",
        "HF1",
        &day(5),
        &day(5),
        &[("item", "I5", 1.0, None)],
    ));
    assert_eq!(reasons(&r), vec![5], "5 days after: too soon");
    let (_, r) = w.post(claim(
        "F-3",
        "100000001",
        "HF1",
        &day(2),
        &day(2),
        &[("item", "I5", 1.0, None)],
    ));
    assert_eq!(reasons(&r), vec![0], "8 days after the one that passed");
    // I1: 3 per policy period. 2, then 2 asked (1 left: reduced), then 1 (nothing left: 16).
    let (_, r) = w.post(claim(
        "Q-1",
        "100000002",
        "HF1",
        &day(9),
        &day(9),
        &[("item", "I1", 2.0, None)],
    ));
    assert_eq!(approved(&r, 0), 2.0);
    let (_, r) = w.post(claim(
        "Q-2",
        "100000002",
        "HF1",
        &day(8),
        &day(8),
        &[("item", "I1", 2.0, None)],
    ));
    assert_eq!(reasons(&r), vec![0]);
    assert_eq!(approved(&r, 0), 1.0, "reduced to what is left: {r:#}");
    let (_, r) = w.post(claim(
        "Q-3",
        "100000002",
        "HF1",
        &day(7),
        &day(7),
        &[("item", "I1", 1.0, None)],
    ));
    assert_eq!(reasons(&r), vec![16]);
    // At most 2 consultation claims per period (S1 is a consultation).
    for (i, d) in [20, 19].into_iter().enumerate() {
        let (_, r) = w.post(claim(
            &format!("M-{i}"),
            "100000001",
            "HF1",
            &day(d),
            &day(d),
            &[("service", "S1", 1.0, None)],
        ));
        assert_eq!(reasons(&r), vec![0]);
    }
    let (_, r) = w.post(claim(
        "M-2",
        "100000001",
        "HF1",
        &day(18),
        &day(18),
        &[("service", "S1", 1.0, None), ("item", "I1", 1.0, None)],
    ));
    assert_eq!(errors(&r), vec![13], "{r:#}");
    assert_eq!(reasons(&r), vec![13, 13]);
}

#[test]
fn a_claim_code_is_unique_and_the_facility_must_be_the_administrators() {
    let mut w = world();
    w.post(claim(
        "DUP",
        "100000001",
        "HF1",
        &day(3),
        &day(3),
        &[("item", "I1", 1.0, None)],
    ));
    let again = w.ca.create(
        claim(
            "DUP",
            "100000001",
            "HF1",
            &day(2),
            &day(2),
            &[("item", "I1", 1.0, None)],
        ),
        Some("Claim"),
        false,
        &|_| None,
    );
    assert!(
        matches!(&again, Err(WriteError::Invalid(e)) if e.to_string().contains("already used")),
        "{again:?}"
    );
    let other = w.ca.create(
        claim(
            "HF2-1",
            "100000001",
            "HF2",
            &day(3),
            &day(3),
            &[("item", "I1", 1.0, None)],
        ),
        Some("Claim"),
        false,
        &|_| None,
    );
    assert!(matches!(other, Err(WriteError::Forbidden(_))), "{other:?}");
    // A line the claim cannot be read for: 422, nothing stored.
    let mut bad = claim(
        "BAD",
        "100000001",
        "HF1",
        &day(3),
        &day(3),
        &[("item", "I1", 1.0, None)],
    );
    bad["item"][0]["quantity"]["value"] = json!(-2);
    let r = w.ca.create(bad, Some("Claim"), false, &|_| None);
    assert!(
        matches!(&r, Err(WriteError::Invalid(e)) if e.to_string().contains("quantity")),
        "{r:?}"
    );
}

#[test]
fn an_insuree_the_device_does_not_hold_is_checked_provisionally_then_central_adjudicates() {
    let mut w = world();
    // Ousmane lives in V2: this device does not hold him, his policy, or his claims.
    assert!(
        w.ca.reader()
            .find_ids(
                "Patient",
                &fieldmesh_fhir_docs::IdentifierQuery::ValueOnly("100000005".into())
            )
            .unwrap()
            .is_empty()
    );
    let (id, r) = w.post(claim(
        "P-1",
        "100000005",
        "HF1",
        &day(3),
        &day(3),
        &[
            ("item", "I1", 1.0, None),
            ("item", "I6", 1.0, None),
            ("item", "I4", 1.0, None),
        ],
    ));
    // What it can check it does (I4 is not in the price list); I6's product is central's to say.
    assert_eq!(reasons(&r), vec![0, 0, 2]);
    assert_eq!(
        provisional(&r),
        vec!["history", "insuree", "coverage", "patient-category"]
    );
    assert!(r["disposition"].as_str().unwrap().contains("provisionally"));
    // Central adjudicates with everything: I6 is not covered by his product (3).
    w.sync();
    w.process();
    let rid = response_id(&DocId::parse(&id).unwrap()).to_string();
    let central_says = w.central.served("ClaimResponse", &rid).unwrap().resource;
    assert_eq!(reasons(&central_says), vec![0, 3, 2], "{central_says:#}");
    assert!(provisional(&central_says).is_empty());
    // Its verdict syncs back to the facility as the claim's ClaimResponse.
    w.sync();
    let on_device = w.ca.served("ClaimResponse", &rid).unwrap().resource;
    assert_eq!(reasons(&on_device), vec![0, 3, 2]);
    assert_eq!(on_device["disposition"], "checked by central");
}

#[test]
fn central_counts_claims_it_adjudicated_and_its_verdict_is_authoritative_for_later_ones() {
    let mut w = world();
    // Two claims for I5 a few days apart, entered on the device before either reached central:
    // the device gave both its verdict (the first passed, the second too soon). Central
    // adjudicates them in the order they arrive, with the same answer.
    let (a, _) = w.post(claim(
        "K-1",
        "100000001",
        "HF1",
        &day(10),
        &day(10),
        &[("item", "I5", 1.0, None)],
    ));
    let (b, rb) = w.post(claim(
        "K-2",
        "100000001",
        "HF1",
        &day(6),
        &day(6),
        &[("item", "I5", 1.0, None)],
    ));
    assert_eq!(reasons(&rb), vec![5]);
    w.sync();
    w.process();
    let verdict = |w: &mut World, id: &str| {
        let rid = response_id(&DocId::parse(id).unwrap()).to_string();
        reasons(&w.central.served("ClaimResponse", &rid).unwrap().resource)
    };
    assert_eq!(verdict(&mut w, &a), vec![0]);
    assert_eq!(verdict(&mut w, &b), vec![5]);
    // The ClaimResponses lie at the facility: the device holds them, nothing else moved.
    w.sync();
    let rid = response_id(&DocId::parse(&b).unwrap()).to_string();
    assert_eq!(
        reasons(&w.ca.served("ClaimResponse", &rid).unwrap().resource),
        vec![5]
    );
}

#[test]
fn a_claim_with_contained_resources_as_openimis_tests_send_it() {
    let mut w = world();
    // openIMIS's own test payload (`test_claim_contained.json`): the insuree, its family, the
    // facility, the administrator, the item and the service sent `contained`, referenced as
    // `#<Type>/<uuid>`. Here the insuree is one this facility knows (by its number), the
    // facility is HF1 and the lines name codes of its price list.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fhir-docs/tests/fixtures/openimis-module/claim_contained.json"
    );
    let mut c: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    c["identifier"][0]["value"] = json!("T-CONTAINED");
    c["patient"]["identifier"] = by_code("Patient", "100000001")["identifier"].clone();
    c["provider"] = by_code("Organization", "HF1");
    c["billablePeriod"] = json!({"start": day(3), "end": day(3)});
    c["created"] = json!(day(3));
    c["item"][0]["productOrService"]["text"] = json!("I1");
    c["item"][1]["productOrService"]["text"] = json!("S1");
    let contained = c["contained"].clone();
    let (id, r) = w.post(c);
    // I1: 10 asked, the product allows 3 in the period: reduced. S1: a consultation.
    assert_eq!(reasons(&r), vec![0, 0], "{r:#}");
    assert_eq!(approved(&r, 0), 3.0);
    assert_eq!(
        provisional(&r),
        vec!["history"],
        "the insuree is held: {r:#}"
    );
    // Every contained resource is kept (its references stored as every reference is).
    let stored = w.ca.served("Claim", &id).unwrap().resource;
    let names = |v: &Value| -> Vec<(String, String)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| (r["resourceType"].to_string(), r["id"].to_string()))
            .collect()
    };
    assert_eq!(names(&stored["contained"]), names(&contained));
    assert_eq!(
        stored["contained"][0]["birthDate"],
        contained[0]["birthDate"]
    );
    // Central adjudicates it too (its `#Patient` reference is in no reference index).
    w.sync();
    w.process();
    let rid = response_id(&DocId::parse(&id).unwrap()).to_string();
    let central_says = w.central.served("ClaimResponse", &rid).unwrap().resource;
    assert_eq!(reasons(&central_says), vec![0, 0], "{central_says:#}");
}

#[test]
fn two_claims_in_one_commit_see_each_other() {
    let mut w = world();
    // The engine thread commits several API writes at once: the second claim of the insuree,
    // in the same commit as the first, still counts it (I5: once a week).
    w.ca.create(
        claim(
            "G-1",
            "100000001",
            "HF1",
            &day(10),
            &day(10),
            &[("item", "I5", 1.0, None)],
        ),
        Some("Claim"),
        false,
        &|_| None,
    )
    .unwrap();
    let _ = w.ca.take_claim_answer();
    w.ca.create(
        claim(
            "G-2",
            "100000001",
            "HF1",
            &day(6),
            &day(6),
            &[("item", "I5", 1.0, None)],
        ),
        Some("Claim"),
        false,
        &|_| None,
    )
    .unwrap();
    let r = w.ca.take_claim_answer().unwrap();
    w.ca.flush().unwrap();
    assert_eq!(reasons(&r), vec![5], "{r:#}");
}

#[test]
fn central_adjudicates_again_when_the_policy_or_the_insuree_arrives_after_the_claim() {
    let mut w = world();
    // Zoé has no policy yet: the device and central say 21.
    let (id, r) = w.post(claim(
        "Z-1",
        "100000004",
        "HF1",
        &day(3),
        &day(3),
        &[("item", "I1", 1.0, None)],
    ));
    assert_eq!(errors(&r), vec![21]);
    w.sync();
    w.process();
    let rid = response_id(&DocId::parse(&id).unwrap()).to_string();
    let first = w.central.served("ClaimResponse", &rid).unwrap().resource;
    assert_eq!(errors(&first), vec![21]);
    // Her family's policy (enrolled and paid before the visit) reaches central afterwards.
    let product = w
        .central
        .reader()
        .find_ids(
            "InsurancePlan",
            &fieldmesh_fhir_docs::IdentifierQuery::ValueOnly("PRD01".into()),
        )
        .unwrap()[0]
        .to_string();
    let zoe = w
        .central
        .reader()
        .find_ids(
            "Patient",
            &fieldmesh_fhir_docs::IdentifierQuery::ValueOnly("100000004".into()),
        )
        .unwrap()[0]
        .to_string();
    let family = w
        .central
        .reader()
        .search_reference("Group", "member", "Patient", &zoe)
        .unwrap();
    let family = family[0].id.clone();
    create(&mut w.central, contract(&family, &zoe, &product, &day(30)));
    w.process();
    let again = w.central.served("ClaimResponse", &rid).unwrap().resource;
    assert_eq!(reasons(&again), vec![0], "{again:#}");
    assert_eq!(again["created"], first["created"], "first given on its day");
    // A claim for a card central has never seen: no such insuree (7) until the insuree
    // arrives, then adjudicated again.
    let (id, _) = w.post(claim(
        "U-1",
        "100000009",
        "HF1",
        &day(3),
        &day(3),
        &[("item", "I1", 1.0, None)],
    ));
    w.sync();
    w.process();
    let rid = response_id(&DocId::parse(&id).unwrap()).to_string();
    assert_eq!(
        errors(&w.central.served("ClaimResponse", &rid).unwrap().resource),
        vec![7]
    );
    let late = create(
        &mut w.central,
        patient("100000009", "Fatouma", "female", "1992-02-02", "V1"),
    );
    let g = create(&mut w.central, group(&[&late], "V1"));
    create(&mut w.central, contract(&g, &late, &product, &day(30)));
    w.process();
    let now = w.central.served("ClaimResponse", &rid).unwrap().resource;
    assert_eq!(reasons(&now), vec![0], "{now:#}");
}
