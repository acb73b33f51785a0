//! Enrolment on real engines: a policy priced by the rules as an officer writes it, what the
//! answer says it replaced, receipts unique per product, two officers paying for one family
//! apart and priced once by central after the merge, the Coverage and the coverage inquiry.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_engine::central::{Central, NumberConfig, STEP_ENTRIES};
use fieldmesh_engine::test_support::{certificate, certificate_doc, key, peer, public, sync_pair};
use fieldmesh_engine::{Engine, NodeIdentity, Source, WriteError, now};
use fieldmesh_fhir_docs::openimis::dates::Date;
use fieldmesh_fhir_docs::openimis::policy::{Money, PREMIUM_EXTENSION};
use fieldmesh_fhir_docs::openimis::{IG, LOCATION_EXTENSION};
use fieldmesh_storage::MemStore;
use fieldmesh_trust::Role;
use fieldmesh_trust::ed25519_dalek::SigningKey;
use serde_json::{Value, json};

const CENTRAL: &str = "urn:fieldmesh:node:central";

fn today() -> Date {
    Date::from_unix(now())
}

fn day(days_ago: i64) -> String {
    today().add_days(-days_ago).to_string()
}

/// 12 months, no cycles: adult 100.00, child 50.00, registration 10.00 per member.
fn product() -> Value {
    json!({"resourceType": "InsurancePlan", "identifier": [{"type": {"coding": [{"code": "Code"}]}, "value": "PRD01"}],
        "name": "Test product", "status": "active",
        "coverage": [{"benefit": [{"limit": [
            {"value": {"value": 12, "unit": "month"}, "code": {"coding": [{"code": "period"}]}},
            {"value": {"value": 6, "unit": "member"}, "code": {"coding": [{"code": "memberCount"}]}}]}]}],
        "plan": [{"generalCost": [
            {"type": {"coding": [{"code": "lumpsum"}]}, "cost": {"value": 0, "currency": "XOF"}},
            {"type": {"coding": [{"code": "premiumAdult"}]}, "cost": {"value": 100.0, "currency": "XOF"}},
            {"type": {"coding": [{"code": "premiumChild"}]}, "cost": {"value": 50.0, "currency": "XOF"}},
            {"type": {"coding": [{"code": "registrationFee"}]}, "cost": {"value": 10.0, "currency": "XOF"}}]}]})
}

fn address(village: &str) -> Value {
    json!([{"extension": [{"url": LOCATION_EXTENSION, "valueReference": {"reference": format!("Location/{village}")}}]}])
}

fn patient(given: &str, birth: &str, village: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": "Moussa", "given": [given]}],
        "birthDate": birth, "gender": "female", "address": address(village)})
}

fn group(members: &[&str], village: &str) -> Value {
    json!({"resourceType": "Group", "type": "person", "actual": "True", "name": "Moussa",
        "member": members.iter().map(|m| json!({"entity": {"reference": format!("Patient/{m}")}})).collect::<Vec<_>>(),
        "extension": [{"url": format!("{IG}/StructureDefinition/group-address"),
            "valueAddress": address(village)[0].clone()}]})
}

fn premium(amount: &str, date: &str, receipt: &str) -> Value {
    json!({"url": PREMIUM_EXTENSION, "extension": [
        {"url": "payer", "valueCodeableConcept": {"coding": [{"code": "beneficiary"}]}},
        {"url": "category", "valueCodeableConcept": {"coding": [{"code": "C"}]}},
        {"url": "amount", "valueMoney": {"value": serde_json::from_str::<Value>(amount).unwrap(), "currency": "XOF"}},
        {"url": "receipt", "valueString": receipt},
        {"url": "date", "valueDate": date},
        {"url": "type", "valueCodeableConcept": {"coding": [{"code": "C"}]}}]})
}

fn contract(
    family: &str,
    head: &str,
    product: &str,
    enrolled: &str,
    value: &str,
    premiums: Vec<Value>,
) -> Value {
    let mut c = json!({"resourceType": "Contract", "status": "Offered", "legalState": {"text": "Offered"},
        "subject": [{"reference": format!("Group/{family}")}],
        "term": [{"offer": {"party": [{"reference": [{"reference": format!("Patient/{head}")}],
            "role": {"coding": [{"code": "beneficiary"}]}}]},
            "asset": [{"extension": premiums,
                "period": [{"start": enrolled, "end": enrolled}], "usePeriod": [{"start": enrolled}],
                "valuedItem": [{"entityReference": {"reference": format!("InsurancePlan/{product}")},
                    "net": {"value": serde_json::from_str::<Value>(value).unwrap()}}]}]}]});
    if c["term"][0]["asset"][0]["extension"] == json!([]) {
        c["term"][0]["asset"][0]
            .as_object_mut()
            .unwrap()
            .remove("extension");
    }
    c
}

struct World {
    root: SigningKey,
    central: Engine,
    services: Central,
    a: Engine,
    b: Engine,
    product: String,
}

fn world() -> World {
    let root = key(1);
    let mut central = Engine::new(
        Box::new(MemStore::default()),
        NodeIdentity::new(CENTRAL.into(), &[1; 32], public(&root)),
        256,
    );
    let mut a = fieldmesh_engine::test_support::engine(&[2; 32], "officer-2", &public(&root));
    let mut b = fieldmesh_engine::test_support::engine(&[3; 32], "officer-3", &public(&root));
    let period = (now() - 3600, now() + 86_400);
    let certs: Vec<_> = [(2u8, "EO0001"), (3, "EO0002")]
        .iter()
        .map(|(n, user)| {
            certificate_doc(
                &root,
                &certificate(
                    &key(*n),
                    user,
                    &[Role::EnrolmentOfficer],
                    &["V1"],
                    &[],
                    period,
                ),
                now(),
            )
        })
        .collect();
    for e in [&mut central, &mut a, &mut b] {
        e.merge(certs.clone(), &Source::Local).unwrap();
        e.flush().unwrap();
    }
    let services = Central::open(&mut central, NumberConfig::default()).unwrap();
    let product = central
        .create(product(), None, false, &|_| None)
        .unwrap()
        .to_string();
    central.flush().unwrap();
    let mut w = World {
        root,
        central,
        services,
        a,
        b,
        product,
    };
    w.sync(2);
    w.sync(3);
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

    fn sync(&mut self, which: u8) {
        let (officer, k) = match which {
            2 => (&mut self.a, key(2)),
            _ => (&mut self.b, key(3)),
        };
        sync_pair(officer, &peer(&k), &mut self.central, &peer(&self.root)).unwrap();
    }
}

fn create(e: &mut Engine, r: Value) -> String {
    let id = e.create(r, None, false, &|_| None).unwrap().to_string();
    e.flush().unwrap();
    id
}

/// Registers a family of an adult head and a child in V1 on `e`: (group, head, child).
fn family(e: &mut Engine) -> (String, String, String) {
    let head = create(e, patient("Aïcha", "1980-04-02", "V1"));
    let child = create(e, patient("Issa", "2015-09-30", "V1"));
    let g = create(e, group(&[&head, &child], "V1"));
    (g, head, child)
}

fn read(e: &mut Engine, ty: &str, id: &str) -> Value {
    e.served(ty, id).unwrap().resource
}

/// A policy's value, as an amount (`170` and `170.00` are one value).
fn net(c: &Value) -> String {
    Money::parse(c.pointer("/term/0/asset/0/valuedItem/0/net/value").unwrap())
        .unwrap()
        .to_string()
}

#[test]
fn a_policy_is_priced_as_the_officer_writes_it_and_the_answer_says_what_changed() {
    let mut w = world();
    let (g, head, _) = family(&mut w.a);
    let enrolled = day(10);
    // The client's value (the legacy app's) is wrong, and it paid the rules' value in full.
    let id =
        w.a.create(
            contract(
                &g,
                &head,
                &w.product,
                &enrolled,
                "150",
                vec![premium("170.00", &enrolled, "RC-1")],
            ),
            None,
            false,
            &|_| None,
        )
        .unwrap();
    let notes = w.a.take_notes();
    w.a.flush().unwrap();
    let c = read(&mut w.a, "Contract", &id.to_string());
    // One adult and one child: 100 + 50, and 2 × 10 registration.
    assert_eq!(net(&c), "170.00");
    assert_eq!(c["status"], "Policy");
    let expiry = today().add_days(-10).add_years(1).add_days(-1).to_string();
    assert_eq!(
        c.pointer("/term/0/asset/0/period/0/end").unwrap(),
        &json!(expiry)
    );
    assert_eq!(
        c.pointer("/term/0/asset/0/usePeriod/0/start").unwrap(),
        &json!(enrolled)
    );
    let said: Vec<String> = notes
        .iter()
        .map(|n| n["diagnostics"].as_str().unwrap().to_string())
        .collect();
    assert!(
        said.iter()
            .any(|s| s
                .contains("net.value replaced: the client sent 150, openIMIS's rules give 170.00")),
        "{said:?}"
    );
    assert!(
        said.iter().any(|s| s.contains("Contract.status replaced")),
        "{said:?}"
    );
    // Every field the client sent is still there.
    assert_eq!(c["legalState"]["text"], "Offered");
    assert!(c.pointer("/term/0/offer/party/0/role").is_some());

    // The same receipt for the same product is refused, naming the policy that has it.
    let (g2, head2, _) = family(&mut w.a);
    let err =
        w.a.create(
            contract(
                &g2,
                &head2,
                &w.product,
                &enrolled,
                "170",
                vec![premium("170", &enrolled, "RC-1")],
            ),
            None,
            false,
            &|_| None,
        )
        .unwrap_err();
    assert!(matches!(err, WriteError::Invalid(_)), "{err}");
    assert!(
        err.to_string().contains("receipt RC-1 is already used"),
        "{err}"
    );

    // An enrolment date in the future is refused, as openIMIS refuses it.
    let err =
        w.a.create(
            contract(&g2, &head2, &w.product, &day(-3), "170", vec![]),
            None,
            false,
            &|_| None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("in the future"), "{err}");

    // A partial payment keeps it idle (status Offered), with the value computed.
    let idle = create(
        &mut w.a,
        contract(
            &g2,
            &head2,
            &w.product,
            &enrolled,
            "0",
            vec![premium("100", &enrolled, "RC-2")],
        ),
    );
    let c = read(&mut w.a, "Contract", &idle);
    assert_eq!(
        (c["status"].clone(), net(&c)),
        (json!("Offered"), "170.00".to_string())
    );

    // Its Coverage is derived read-only, and the coverage inquiry answers for the paid family.
    w.central.flush().unwrap();
    let reader = w.a.reader();
    let cov = reader.coverage(&id.to_string(), today()).unwrap().resource;
    assert_eq!(cov["status"], "active");
    assert_eq!(cov["class"][0]["value"], "PRD01");
    assert_eq!(cov.pointer("/period/end").unwrap(), &json!(expiry));
    let answer = reader
        .eligibility(&json!({"resourceType": "CoverageEligibilityRequest", "patient": {"reference": format!("Patient/{head}")}}), today(), "a")
        .unwrap();
    assert_eq!(answer["insurance"].as_array().unwrap().len(), 1, "{answer}");
    assert_eq!(
        answer["insurance"][0]["coverage"]["reference"],
        json!(format!("Coverage/{id}"))
    );
    let none = reader
        .eligibility(&json!({"resourceType": "CoverageEligibilityRequest", "patient": {"reference": format!("Patient/{head2}")}}), today(), "a")
        .unwrap();
    assert_eq!(
        none["insurance"],
        json!([]),
        "the idle policy is not in force"
    );
}

#[test]
fn a_policy_whose_product_the_device_does_not_hold_is_kept_as_sent_with_a_warning() {
    let mut w = world();
    let (g, head, _) = family(&mut w.a);
    let enrolled = day(5);
    let missing = "6a1f0b7e-0000-4000-8000-000000000001";
    let id =
        w.a.create(
            contract(&g, &head, missing, &enrolled, "99", vec![]),
            None,
            false,
            &|_| None,
        )
        .unwrap();
    let notes = w.a.take_notes();
    w.a.flush().unwrap();
    assert_eq!(net(&read(&mut w.a, "Contract", &id.to_string())), "99.00");
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0]["severity"], "warning");
    assert!(
        notes[0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("product is not held")
    );
}

#[test]
fn two_officers_paying_for_one_family_apart_are_priced_once_after_the_merge_and_keep_every_payment()
{
    let mut w = world();
    let (g, head, _) = family(&mut w.a);
    let enrolled = day(20);
    let id = create(
        &mut w.a,
        contract(&g, &head, &w.product, &enrolled, "170", vec![]),
    );
    // Both officers hold the family and the policy.
    w.sync(2);
    w.process();
    w.sync(2);
    w.sync(3);
    let on_b = read(&mut w.b, "Contract", &id);
    assert_eq!(net(&on_b), "170.00");

    // Apart: A registers a newborn in the family and prices the policy again (50 + 10 more);
    // B, who does not know of the baby, takes a payment of 120 for the old value.
    let baby = create(&mut w.a, patient("Zara", &day(30), "V1"));
    let mut fam = read(&mut w.a, "Group", &g);
    fam["member"]
        .as_array_mut()
        .unwrap()
        .push(json!({"entity": {"reference": format!("Patient/{baby}")}}));
    w.a.update("Group", &g, fam, None).unwrap();
    let c = read(&mut w.a, "Contract", &id);
    w.a.update("Contract", &id, c, None).unwrap();
    w.a.flush().unwrap();
    let mut c = read(&mut w.b, "Contract", &id);
    c["term"][0]["asset"][0]["extension"]
        .as_array_mut()
        .unwrap()
        .push(premium("120", &day(3), "RC-B"));
    w.b.update("Contract", &id, c, None).unwrap();
    w.b.flush().unwrap();
    // A takes the other 110 of the new value, not knowing of B's payment.
    let mut c = read(&mut w.a, "Contract", &id);
    assert_eq!(net(&c), "230.00");
    c["term"][0]["asset"][0]["extension"]
        .as_array_mut()
        .unwrap()
        .push(premium("110", &day(2), "RC-A"));
    w.a.update("Contract", &id, c, None).unwrap();
    w.a.flush().unwrap();
    assert_eq!(
        read(&mut w.a, "Contract", &id)["status"],
        "Offered",
        "110 of 230 leaves it idle"
    );

    // Both sync; central prices the merged policy once: three members, both payments.
    w.sync(2);
    w.sync(3);
    w.process();
    w.sync(2);
    w.sync(3);
    for e in [&mut w.central, &mut w.a, &mut w.b] {
        let c = read(e, "Contract", &id);
        assert_eq!(net(&c), "230.00", "{c}");
        assert_eq!(c["status"], "Policy", "120 + 110 pays the value in full");
        // Effective from the payment that paid the balance (A's, the later one).
        assert_eq!(
            c.pointer("/term/0/asset/0/usePeriod/0/start").unwrap(),
            &json!(day(2))
        );
        let receipts: Vec<&str> = c
            .pointer("/term/0/asset/0/extension")
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["url"] == PREMIUM_EXTENSION)
            .map(|e| {
                e["extension"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["url"] == "receipt")
                    .unwrap()["valueString"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        let mut sorted = receipts.clone();
        sorted.sort();
        assert_eq!(sorted, ["RC-A", "RC-B"], "every payment taken is kept");
    }
}

fn group_of(e: &mut Engine, patient: &str) -> Option<String> {
    read(e, "Patient", patient)["extension"]
        .as_array()?
        .iter()
        .find(|x| {
            x["url"]
                .as_str()
                .is_some_and(|u| u.ends_with("patient-group-reference"))
        })?["valueReference"]["reference"]
        .as_str()
        .map(String::from)
}

fn members_of(e: &mut Engine, group: &str) -> Vec<String> {
    let mut m: Vec<String> = read(e, "Group", group)["member"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|m| m["entity"]["reference"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    m.sort();
    m
}

#[test]
fn families_stay_consistent_when_members_are_added_or_moved_and_a_head_is_not_moved() {
    let mut w = world();
    let mut head = patient("Aïcha", "1980-04-02", "V1");
    head["extension"] =
        json!([{"url": format!("{IG}/StructureDefinition/patient-is-head"), "valueBoolean": true}]);
    let h = create(&mut w.a, head);
    let c = create(&mut w.a, patient("Issa", "2015-09-30", "V1"));
    // A family listing them: each insuree now names it (openIMIS keeps the family on the insuree).
    let g1 = create(&mut w.a, group(&[&h, &c], "V1"));
    assert_eq!(group_of(&mut w.a, &h), Some(format!("Group/{g1}")));
    assert_eq!(group_of(&mut w.a, &c), Some(format!("Group/{g1}")));
    // A second family; the child moves to it by naming it: it leaves the first.
    let h2 = create(&mut w.a, patient("Moussa", "1970-01-01", "V1"));
    let g2 = create(&mut w.a, group(&[&h2], "V1"));
    let mut child = read(&mut w.a, "Patient", &c);
    for x in child["extension"].as_array_mut().unwrap() {
        if x["url"]
            .as_str()
            .unwrap()
            .ends_with("patient-group-reference")
        {
            x["valueReference"] = json!({"reference": format!("Group/{g2}")});
        }
    }
    w.a.update("Patient", &c, child, None).unwrap();
    w.a.flush().unwrap();
    assert_eq!(members_of(&mut w.a, &g1), vec![format!("Patient/{h}")]);
    let mut both = vec![format!("Patient/{h2}"), format!("Patient/{c}")];
    both.sort();
    assert_eq!(members_of(&mut w.a, &g2), both);
    // A newborn registered naming the family is added to its members.
    let mut baby = patient("Zara", &day(30), "V1");
    baby["extension"] = json!([{"url": format!("{IG}/StructureDefinition/patient-group-reference"),
        "valueReference": {"reference": format!("Group/{g1}")}}]);
    let b = create(&mut w.a, baby);
    assert!(members_of(&mut w.a, &g1).contains(&format!("Patient/{b}")));
    // The head of the first family cannot be moved into the second.
    let mut fam = read(&mut w.a, "Group", &g2);
    fam["member"]
        .as_array_mut()
        .unwrap()
        .push(json!({"entity": {"reference": format!("Patient/{h}")}}));
    let err = w.a.update("Group", &g2, fam, None).unwrap_err();
    assert!(err.to_string().contains("is the head of family"), "{err}");
    assert_eq!(
        group_of(&mut w.a, &h),
        Some(format!("Group/{g1}")),
        "nothing of the refused write"
    );
}

#[test]
fn a_receipt_two_officers_used_offline_is_flagged_once_by_central_and_the_flag_reaches_the_officer()
{
    let mut w = world();
    let enrolled = day(4);
    let (ga, ha, _) = family(&mut w.a);
    let pa = create(
        &mut w.a,
        contract(
            &ga,
            &ha,
            &w.product,
            &enrolled,
            "170",
            vec![premium("170", &enrolled, "BOOK-7")],
        ),
    );
    let (gb, hb, _) = family(&mut w.b);
    let pb = create(
        &mut w.b,
        contract(
            &gb,
            &hb,
            &w.product,
            &enrolled,
            "170",
            vec![premium("170", &enrolled, "BOOK-7")],
        ),
    );
    w.sync(2);
    w.sync(3);
    w.process();
    w.sync(2);
    w.sync(3);
    let flagged = |e: &mut Engine, id: &str| {
        read(e, "Contract", id)["extension"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x.to_string().contains("receipt-taken")))
    };
    let on_central = (flagged(&mut w.central, &pa), flagged(&mut w.central, &pb));
    assert!(
        on_central == (true, false) || on_central == (false, true),
        "{on_central:?}"
    );
    assert_eq!(
        (flagged(&mut w.a, &pa), flagged(&mut w.b, &pb)),
        on_central,
        "the flag reached the officer"
    );
}
