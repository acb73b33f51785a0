//! Enrolment offline with real processes on loopback: central authors a product (in the form
//! openIMIS's FHIR module serves it), an enrolment officer receives it through the hub, then
//! offline registers a family, enrols it (the node prices the policy and says what it
//! replaced), takes the contribution (the policy turns active), answers a coverage inquiry, and
//! syncs through the hub: central holds the policy with the same value, dates and status.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_fhir_docs::openimis::LOCATION_EXTENSION;
use fieldmesh_fhir_docs::openimis::dates::Date;
use fieldmesh_fhir_docs::openimis::policy::{Money, PREMIUM_EXTENSION};
use fieldmesh_tests::deploy::{WAIT, device, location, post, start};
use fieldmesh_tests::{Node, header, init};
use serde_json::{Value, json};

const IG: &str = "https://openimis.github.io/openimis_fhir_r4_ig";

/// A product as openIMIS's FHIR module serves it: lump sum 1000 for up to 3 members (its
/// `groupSize`), adults above it 300, children 150, registration 50 per member, 12 months,
/// the three period extensions under one URL (administration, enrolment grace, renewal
/// grace), both discounts under another.
fn product() -> Value {
    let cost = |code: &str, value: f64| {
        json!({"type": {"coding": [{"system": format!("{IG}/CodeSystem/insurance-plan-general-cost-type"), "code": code}]},
        "cost": {"value": value, "currency": "XOF"}})
    };
    let period = |months: u32| json!({"url": format!("{IG}/StructureDefinition/insurance-plan-period"), "valueQuantity": {"value": months as f64, "unit": "months"}});
    let mut lump = cost("lumpsum", 1000.0);
    lump["groupSize"] = json!(3);
    json!({"resourceType": "InsurancePlan", "name": "Mutuelle Tillabéri", "status": "active",
        "identifier": [{"type": {"coding": [{"system": format!("{IG}/CodeSystem/openimis-identifiers"), "code": "Code"}]}, "value": "TIL01"}],
        "period": {"start": "2020-01-01T00:00:00", "end": "2035-12-31T00:00:00"},
        "coverage": [{"type": {"coding": [{"code": "medical"}]}, "benefit": [{"type": {"coding": [{"code": "medical"}]}, "limit": [
            {"value": {"value": 12.0, "unit": "month"}, "code": {"coding": [{"system": format!("{IG}/CodeSystem/insurance-plan-coverage-benefit-limit"), "code": "period"}]}},
            {"value": {"value": 8.0, "unit": "member"}, "code": {"coding": [{"system": format!("{IG}/CodeSystem/insurance-plan-coverage-benefit-limit"), "code": "memberCount"}]}}]}]}],
        "plan": [{"generalCost": [lump, cost("premiumAdult", 300.0), cost("premiumChild", 150.0), cost("registrationFee", 50.0)]}],
        "extension": [period(0), period(0), period(1),
            {"url": format!("{IG}/StructureDefinition/insurance-plan-discount"), "extension": [
                {"url": "Percentage", "valueDecimal": 0}, {"url": "Period", "valueQuantity": {"value": 0, "unit": "months"}}]},
            {"url": format!("{IG}/StructureDefinition/insurance-plan-discount"), "extension": [
                {"url": "Percentage", "valueDecimal": 0}, {"url": "Period", "valueQuantity": {"value": 0, "unit": "months"}}]}]})
}

fn address(village: &str) -> Value {
    json!({"use": "home", "extension": [{"url": LOCATION_EXTENSION,
        "valueReference": {"reference": format!("Location/{village}")}}]})
}

fn patient(given: &str, birth: &str, village: &str, chfid: Option<&str>, head: bool) -> Value {
    let mut p = json!({"resourceType": "Patient", "name": [{"use": "usual", "family": "Hamani", "given": [given]}],
        "birthDate": birth, "gender": "female", "address": [address(village)],
        "extension": [{"url": format!("{IG}/StructureDefinition/patient-is-head"), "valueBoolean": head}]});
    if let Some(n) = chfid {
        p["identifier"] = json!([{"type": {"coding": [{"system": format!("{IG}/CodeSystem/openimis-identifiers"), "code": "Code"}]}, "value": n}]);
    }
    p
}

fn read(n: &Node, ty: &str, id: &str) -> Value {
    let (status, r) = n.get(&format!("/fhir/{ty}/{id}")).unwrap();
    assert_eq!(status, 200, "{ty}/{id}: {r}");
    r
}

fn priced(c: &Value) -> (String, Value, Value, Value, Value) {
    let value = Money::parse(c.pointer("/term/0/asset/0/valuedItem/0/net/value").unwrap()).unwrap();
    (
        value.to_string(),
        c["status"].clone(),
        c.pointer("/term/0/asset/0/period/0").unwrap().clone(),
        c.pointer("/term/0/asset/0/usePeriod/0/start")
            .unwrap()
            .clone(),
        c.pointer("/term/0/asset/0/extension").unwrap().clone(),
    )
}

#[test]
fn an_officer_enrols_and_is_paid_offline_and_central_holds_the_same_policy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let central_data = d.join("central");
    init(&central_data, "central", "central").unwrap();
    let central = start(&central_data, &[]);
    let district = location(&central, "D1", "D", None);
    let village = location(&central, "V1", "V", Some(&district));
    let product = post(&central, "InsurancePlan", product());
    let hub = device(
        d,
        "hub",
        &["--role", "hub", "--location", &district],
        &[&central.p2p],
    );
    let grant = [
        "--role",
        "enrolment-officer",
        "--location",
        village.as_str(),
    ];
    let officer = device(d, "officer", &grant, &[&hub.p2p]);
    officer
        .wait_for(WAIT, "the product on the officer's phone", |n| {
            Ok(n.get(&format!("/fhir/InsurancePlan/{product}"))?.0 == 200)
        })
        .unwrap();
    let (_, officer_data) = officer.terminate(20).unwrap();

    // Offline: a family of five, the head an adult, two adults and two children.
    let o = start(&officer_data, &[]);
    let head = post(
        &o,
        "Patient",
        patient("Mariama", "1975-02-11", &village, Some("100200300"), true),
    );
    let mut members = vec![head.clone()];
    for (given, birth) in [
        ("Abdou", "1990-06-01"),
        ("Salamatou", "1998-12-24"),
        ("Zeinabou", "2014-03-03"),
        ("Issoufou", "2019-07-15"),
    ] {
        members.push(post(
            &o,
            "Patient",
            patient(given, birth, &village, None, false),
        ));
    }
    let family = post(
        &o,
        "Group",
        json!({"resourceType": "Group", "type": "person", "actual": "True", "name": "Hamani",
        "member": members.iter().map(|m| json!({"entity": {"reference": format!("Patient/{m}")}})).collect::<Vec<_>>(),
        "extension": [{"url": format!("{IG}/StructureDefinition/group-address"), "valueAddress": address(&village)}]}),
    );
    // A village outside the officer's certificate is refused, naming the scope.
    let (status, _, oo) = o
        .post(
            "/fhir/Patient",
            &patient("X", "2000-01-01", &district, None, true),
        )
        .unwrap();
    assert_eq!(status, 403, "{oo}");

    // The app sends the legacy calculator's value; the node prices it by the server's rules:
    // 3 adults, 2 children, threshold 3: 1000 + 2 children above it × 150 + 5 × 50 = 1550.
    let enrolled = Date::from_unix(fieldmesh_engine::now())
        .add_days(-7)
        .to_string();
    let contract = json!({"resourceType": "Contract", "status": "Offered", "legalState": {"text": "Offered"},
        "subject": [{"reference": format!("Group/{family}")}],
        "scope": {"coding": [{"system": format!("{IG}/CodeSystem/contract-scope"), "code": "informal"}]},
        "term": [{"offer": {"party": [{"reference": [{"reference": format!("Patient/{head}")}],
                "role": {"coding": [{"code": "beneficiary"}]}}]},
            "asset": [{"period": [{"start": enrolled}], "usePeriod": [{"start": enrolled}],
                "valuedItem": [{"entityReference": {"reference": format!("InsurancePlan/{product}")}, "net": {"value": 1900.0}}]}]}]});
    let (status, headers, c) = o.post("/fhir/Contract", &contract).unwrap();
    assert_eq!(status, 201, "{c}");
    let policy = c["id"].as_str().unwrap().to_string();
    let outcome = header(&headers, "x-fieldmesh-outcome").unwrap();
    assert!(
        outcome
            .contains("net.value replaced: the client sent 1900.0, openIMIS's rules give 1550.00"),
        "{outcome}"
    );
    let (value, status, period, _, _) = priced(&c);
    assert_eq!((value.as_str(), status), ("1550.00", json!("Offered")));
    let expiry = Date::parse(&enrolled)
        .unwrap()
        .add_years(1)
        .add_days(-1)
        .to_string();
    assert_eq!(period, json!({"start": enrolled, "end": expiry}));

    // Partly paid: idle. Paid in full: active from the start date (paid after it began).
    let mut c = c;
    let pay = |amount: f64, receipt: &str| {
        json!({"url": PREMIUM_EXTENSION, "extension": [
        {"url": "payer", "valueCodeableConcept": {"coding": [{"code": "beneficiary"}]}},
        {"url": "category", "valueCodeableConcept": {"coding": [{"code": "C"}]}},
        {"url": "amount", "valueMoney": {"value": amount, "currency": "XOF"}},
        {"url": "receipt", "valueString": receipt},
        {"url": "date", "valueDate": enrolled},
        {"url": "type", "valueCodeableConcept": {"coding": [{"code": "C"}]}}]})
    };
    c["term"][0]["asset"][0]["extension"]
        .as_array_mut()
        .unwrap()
        .push(pay(1000.0, "TIL-0001"));
    let (status, _, c) = o.put(&format!("/fhir/Contract/{policy}"), &c, &[]).unwrap();
    assert_eq!(
        (status, c["status"].clone()),
        (200, json!("Offered")),
        "{c}"
    );
    let mut c = c;
    c["term"][0]["asset"][0]["extension"]
        .as_array_mut()
        .unwrap()
        .push(pay(550.0, "TIL-0002"));
    let (status, _, oo) = o
        .put(
            &format!("/fhir/Contract/{policy}"),
            &c,
            &[("Prefer", "return=OperationOutcome")],
        )
        .unwrap();
    assert_eq!(status, 200, "{oo}");
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert!(
        oo.to_string().contains(
            "Contract.status replaced: the client sent Offered, openIMIS's rules give Policy"
        ),
        "{oo}"
    );
    let on_phone = priced(&read(&o, "Contract", &policy));
    assert_eq!(on_phone.1, json!("Policy"));
    assert_eq!(on_phone.3, json!(enrolled));

    // Coverage, derived and read-only; the coverage inquiry for the head's insurance number.
    let cov = read(&o, "Coverage", &policy);
    assert_eq!(
        (cov["status"].clone(), cov["class"][0]["value"].clone()),
        (json!("active"), json!("TIL01"))
    );
    let (status, _, _) = o.post("/fhir/Coverage", &cov).unwrap();
    assert_eq!(status, 405);
    let (status, _, answer) = o
        .post("/fhir/CoverageEligibilityRequest", &json!({"resourceType": "CoverageEligibilityRequest",
            "patient": {"reference": "Patient/100200300"}, "purpose": ["benefits"], "status": "active"}))
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["insurance"][0]["coverage"]["reference"],
        json!(format!("Coverage/{policy}")),
        "{answer}"
    );
    assert_eq!(
        answer["insurance"][0]["benefitPeriod"]["end"],
        json!(expiry)
    );
    let (status, _, _) = o
        .post(
            "/fhir/CoverageEligibilityRequest",
            &json!({"resourceType": "CoverageEligibilityRequest",
            "patient": {"reference": "Patient/999999999"}}),
        )
        .unwrap();
    assert_eq!(status, 404);

    // Back online through the hub: central holds the same policy, priced alike.
    let (_, officer_data) = o.terminate(20).unwrap();
    let o = start(&officer_data, &[&hub.p2p]);
    central
        .wait_for(WAIT, "the paid policy on central", |n| {
            let (s, c) = n.get(&format!("/fhir/Contract/{policy}"))?;
            Ok(s == 200
                && c["status"] == "Policy"
                && n.get("/status")?.1["central"]["awaiting_processing"] == 0)
        })
        .unwrap();
    assert_eq!(priced(&read(&central, "Contract", &policy)), on_phone);
    let cov_central = read(&central, "Coverage", &policy);
    assert_eq!(cov_central["period"], cov["period"]);
    drop(o);
}
