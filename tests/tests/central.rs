//! Central's authority with real processes on loopback: two enrolment officers register and
//! enrol families offline, each syncs through the hub to central, and after the next sync every
//! node holds central's identifiers, finds each resource by any identifier system, resolves
//! every reference between the resources it holds, shows the insurance number both officers
//! used flagged on both phones and the person both registered linked; nothing is lost.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_fhir_docs::openimis::LOCATION_EXTENSION;
use fieldmesh_fhir_docs::openimis::flags::FLAG_EXTENSION;
use fieldmesh_tests::deploy::{WAIT, location, post, start};
use fieldmesh_tests::{Node, certify, init, init_uncertified, set_chfid_rule};
use serde_json::{Value, json};
use unicode_normalization::UnicodeNormalization;

const IG: &str = "https://openimis.github.io/openimis_fhir_r4_ig";

/// An insurance number typed from a pre-printed card: valid under the default rule (10
/// digits, the last the first nine modulo 7: 200000000 mod 7 = 4), outside every lease.
const CARD: &str = "2000000004";

fn address(village: &str) -> Value {
    json!({"use": "home", "extension": [{"url": LOCATION_EXTENSION,
        "valueReference": {"reference": format!("Location/{village}")}}]})
}

fn patient(family: &str, given: &str, birth: &str, village: &str, chfid: Option<&str>) -> Value {
    let mut p = json!({"resourceType": "Patient", "name": [{"use": "usual", "family": family, "given": [given]}],
        "birthDate": birth, "gender": "female", "address": [address(village)],
        "extension": [{"url": format!("{IG}/StructureDefinition/patient-is-head"), "valueBoolean": true}]});
    if let Some(n) = chfid {
        p["identifier"] = json!([{"type": {"coding": [{"system": format!("{IG}/CodeSystem/openimis-identifiers"), "code": "Code"}]}, "value": n}]);
    }
    p
}

/// A family of two in `village` enrolled into `product` by `officer`, written offline:
/// returns the ids of the head, the member, the family and the policy.
fn enrol(
    n: &Node,
    village: &str,
    head_number: Option<&str>,
    product: &str,
    officer: &str,
) -> [String; 4] {
    let head = post(
        n,
        "Patient",
        patient("Souley", "Ali", "1970-05-05", village, head_number),
    );
    let member = post(
        n,
        "Patient",
        patient("Souley", "Fati", "2015-01-01", village, None),
    );
    let family = post(
        n,
        "Group",
        json!({"resourceType": "Group", "type": "person", "actual": "True", "name": "Souley",
            "member": [{"entity": {"reference": format!("Patient/{head}")}},
                       {"entity": {"reference": format!("Patient/{member}")}}],
            "extension": [{"url": format!("{IG}/StructureDefinition/group-address"), "valueAddress": address(village)}]}),
    );
    let policy = post(
        n,
        "Contract",
        json!({"resourceType": "Contract", "status": "offered",
            "subject": [{"reference": format!("Group/{family}")}],
            "author": {"reference": format!("Practitioner/{officer}")},
            "legalState": {"text": "Offered"},
            "term": [{"asset": [{
                "typeReference": [{"reference": format!("Patient/{head}")}, {"reference": format!("Patient/{member}")}],
                "period": [{"start": "2026-11-29", "end": "2027-11-28"}],
                "valuedItem": [{"entityReference": {"reference": format!("InsurancePlan/{product}")},
                                "net": {"value": 10000, "currency": "XOF"}}]}]}]}),
    );
    [head, member, family, policy]
}

/// Every logical reference in `v` (an object with a resource `type` and an `identifier`) that
/// does not resolve on the node it was read from, except flags' mentions of registrations
/// elsewhere.
fn dangling(v: &Value, path: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if m.get("url").and_then(Value::as_str) == Some(FLAG_EXTENSION) {
                return;
            }
            let is_ref = m.get("type").is_some_and(Value::is_string)
                && m.get("identifier").is_some_and(Value::is_object);
            if is_ref && !m.contains_key("reference") {
                out.push(format!("{path}: {v}"));
            }
            for (k, x) in m {
                dangling(x, &format!("{path}.{k}"), out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dangling(x, path, out)),
        _ => {}
    }
}

/// A node of the deployment, certified with `grant`, under Niger's insurance-number rule.
fn device(dir: &std::path::Path, name: &str, grant: &[&str], peers: &[&str]) -> Node {
    let data = dir.join(name);
    init_uncertified(&data, name, "device").unwrap();
    certify(&data, grant).unwrap();
    set_chfid_rule(&data, 10, 7).unwrap();
    start(&data, peers)
}

/// A resource a node should hold: type, id, the system of the node that created it.
type Held<'a> = (&'a str, &'a str, &'a str);

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn read(n: &Node, ty: &str, id: &str) -> Value {
    let (status, r) = n.get(&format!("/fhir/{ty}/{id}")).unwrap();
    assert_eq!(status, 200, "{ty}/{id}: {r}");
    r
}

fn identifier_value(r: &Value, system: &str) -> Option<String> {
    r["identifier"]
        .as_array()?
        .iter()
        .find(|i| i["system"] == system)
        .and_then(|i| i["value"].as_str())
        .map(String::from)
}

fn search_ids(n: &Node, ty: &str, system: &str, value: &str) -> Vec<String> {
    let (status, b) = n
        .get(&format!("/fhir/{ty}?identifier={system}|{value}"))
        .unwrap();
    assert_eq!(status, 200, "{b}");
    b["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .map(|x| x["resource"]["id"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn flags(n: &Node) -> Vec<Value> {
    let (status, f) = n.get("/flags").unwrap();
    assert_eq!(status, 200, "{f}");
    f["resources"].as_array().cloned().unwrap_or_default()
}

fn flagged(n: &Node, id: &str, code: &str) -> bool {
    flags(n).iter().any(|f| f["id"] == id && f["code"] == code)
}

#[test]
fn officers_offline_then_through_the_hub_get_central_ids_flags_and_links() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let central_data = d.join("central");
    init(&central_data, "central", "central").unwrap();
    set_chfid_rule(&central_data, 10, 7).unwrap();
    let central = start(&central_data, &[]);
    let district = location(&central, "D1", "D", None);
    let shared = location(&central, "VS", "V", Some(&district));
    let own_a = location(&central, "VA", "V", Some(&district));
    let own_b = location(&central, "VB", "V", Some(&district));
    let product = post(
        &central,
        "InsurancePlan",
        json!({"resourceType": "InsurancePlan", "name": "Basic cover", "status": "active",
            "identifier": [{"type": {"coding": [{"code": "Code"}]}, "value": "PRD01"}]}),
    );
    let practitioner = |code: &str| {
        post(
            &central,
            "Practitioner",
            json!({"resourceType": "Practitioner", "name": [{"family": code}],
                "identifier": [{"type": {"coding": [{"code": "Code"}]}, "value": code}]}),
        )
    };
    let (eo_a, eo_b) = (practitioner("EO0001"), practitioner("EO0002"));

    let hub = device(
        d,
        "hub",
        &["--role", "hub", "--location", &district],
        &[&central.p2p],
    );
    let grant = |v: &str| {
        vec![
            "--role".to_string(),
            "enrolment-officer".into(),
            "--location".into(),
            shared.clone(),
            "--location".into(),
            v.to_string(),
        ]
    };
    let (grant_a, grant_b) = (grant(&own_a), grant(&own_b));
    // Online once: each officer receives the reference data and a lease of numbers.
    let a = device(d, "officer-a", &refs(&grant_a), &[&hub.p2p]);
    let b = device(d, "officer-b", &refs(&grant_b), &[&hub.p2p]);
    for (n, what) in [(&a, "A's lease"), (&b, "B's lease")] {
        n.wait_for(WAIT, what, |n| {
            Ok(n.get("/status")?.1["leased_numbers_left"]["chfid"].as_u64() > Some(0))
        })
        .unwrap();
        n.wait_for(WAIT, "the product", |n| {
            Ok(n.get(&format!("/fhir/InsurancePlan/{product}"))?.0 == 200)
        })
        .unwrap();
    }
    // A leased number for a card, from the officer's app.
    let (status, _, reserved) = a.post("/numbers/chfid", &json!({})).unwrap();
    assert_eq!(status, 201, "{reserved}");
    let (_, a_data) = a.terminate(20).unwrap();
    let (_, b_data) = b.terminate(20).unwrap();

    // Offline, each officer registers and enrols a family. Both type the same card number for
    // their heads of family, and both register the same woman of the shared village.
    let a = start(&a_data, &[]);
    let fam_a = enrol(&a, &own_a, Some(CARD), &product, &eo_a);
    let woman_a = post(
        &a,
        "Patient",
        patient(
            "Ouédraogo",
            "Aïcha",
            "1990-03-24",
            &shared,
            reserved["number"].as_str(),
        ),
    );
    let b = start(&b_data, &[]);
    let fam_b = enrol(&b, &own_b, Some(CARD), &product, &eo_b);
    let nfd: String = "OUÉDRAOGO".nfd().collect();
    let woman_b = post(
        &b,
        "Patient",
        patient(&nfd, "AICHA", "1990-03-24", &shared, None),
    );
    // A number whose check digit is wrong is refused at once, as openIMIS refuses it.
    let (status, _, oo) = b
        .post(
            "/fhir/Patient",
            &patient("X", "Y", "2000-01-01", &own_b, Some("2000000005")),
        )
        .unwrap();
    assert_eq!(status, 422, "{oo}");
    assert!(oo.to_string().contains("check digit"), "{oo}");

    // A syncs first through the hub, then B.
    let (_, a_data) = a.terminate(20).unwrap();
    let (_, b_data) = b.terminate(20).unwrap();
    let a = start(&a_data, &[&hub.p2p]);
    central
        .wait_for(WAIT, "A's family processed on central", |n| {
            Ok(n.get(&format!("/fhir/Patient/{}", fam_a[0]))?.0 == 200
                && n.get(&format!("/fhir/Patient/{woman_a}"))?.0 == 200
                && n.get("/status")?.1["central"]["awaiting_processing"] == 0)
        })
        .unwrap();
    let b = start(&b_data, &[&hub.p2p]);

    // B's later registration of the card number is flagged on B's phone, A's keeps it (and is
    // told); B's registration of the woman is linked to A's on every node of the village.
    b.wait_for(WAIT, "the number flagged on B", |n| {
        Ok(flagged(n, &fam_b[0], "number-taken"))
    })
    .unwrap();
    a.wait_for(WAIT, "the number flagged on A", |n| {
        Ok(flagged(n, &fam_a[0], "number-reused"))
    })
    .unwrap();
    let reasons = flags(&b);
    assert!(
        reasons
            .iter()
            .any(|f| f["reason"].as_str().unwrap_or_default().contains(CARD)),
        "{reasons:?}"
    );
    for n in [&a, &b, &hub, &central] {
        n.wait_for(WAIT, "the duplicate person linked", |n| {
            let r = n.get(&format!("/fhir/Patient/{woman_b}"))?.1;
            Ok(r["link"][0]["other"]["reference"] == format!("Patient/{woman_a}"))
        })
        .unwrap();
        n.wait_for(WAIT, "the link back", |n| {
            let r = n.get(&format!("/fhir/Patient/{woman_a}"))?.1;
            Ok(
                r["link"][0]["other"]["reference"] == format!("Patient/{woman_b}")
                    && r["link"][0]["type"] == "replaces",
            )
        })
        .unwrap();
    }
    // Central's /status shows what its services did; a phone's, what is flagged there.
    let st = central.get("/status").unwrap().1;
    let c = &st["central"];
    assert_eq!(c["duplicate_persons"]["linked"], 1, "{st}");
    assert_eq!(c["flagged"]["number_taken"], 1, "{st}");
    assert!(c["numbers"]["chfid"]["leases"].as_u64() >= Some(2), "{st}");
    assert!(
        c["numbers"]["chfid"]["used_from_leases"].as_u64() >= Some(3),
        "{st}"
    );
    let st_b = b.get("/status").unwrap().1;
    assert!(
        st_b["flagged"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["code"] == "number-taken"),
        "{st_b}"
    );
    assert!(
        st_b["flagged"].to_string().find(CARD).is_none(),
        "open /status shows no numbers"
    );

    // On every node: central's identifier on everything created offline, found by it and by
    // the creator's system alike, every reference between held resources resolved.
    let central_system = central.get("/status").unwrap().1["system"]
        .as_str()
        .unwrap()
        .to_string();
    let a_system = a.get("/status").unwrap().1["system"]
        .as_str()
        .unwrap()
        .to_string();
    let b_system = b.get("/status").unwrap().1["system"]
        .as_str()
        .unwrap()
        .to_string();
    let types = ["Patient", "Patient", "Group", "Contract"];
    let mut held: Vec<(&Node, Vec<Held<'_>>)> = Vec::new();
    let everything: Vec<(&str, &str, &str)> = types
        .iter()
        .zip(&fam_a)
        .map(|(t, id)| (*t, id.as_str(), a_system.as_str()))
        .chain(
            types
                .iter()
                .zip(&fam_b)
                .map(|(t, id)| (*t, id.as_str(), b_system.as_str())),
        )
        .chain([
            ("Patient", woman_a.as_str(), a_system.as_str()),
            ("Patient", woman_b.as_str(), b_system.as_str()),
        ])
        .collect();
    let mine_a: Vec<_> = everything
        .iter()
        .filter(|(_, id, _)| !fam_b.iter().any(|x| x == id))
        .copied()
        .collect();
    let mine_b: Vec<_> = everything
        .iter()
        .filter(|(_, id, _)| !fam_a.iter().any(|x| x == id))
        .copied()
        .collect();
    held.push((&central, everything.clone()));
    held.push((&hub, everything.clone()));
    held.push((&a, mine_a));
    held.push((&b, mine_b));
    for (n, list) in held {
        for (ty, id, creator) in list {
            n.wait_for(WAIT, "central's identifier", |n| {
                let (s, r) = n.get(&format!("/fhir/{ty}/{id}"))?;
                Ok(s == 200 && identifier_value(&r, &central_system).is_some())
            })
            .unwrap();
            let r = read(n, ty, id);
            let canonical = identifier_value(&r, &central_system).unwrap();
            assert_eq!(
                canonical, id,
                "no collision: the creator's UUID is canonical"
            );
            assert_eq!(
                search_ids(n, ty, &central_system, &canonical),
                vec![id.to_string()]
            );
            assert_eq!(search_ids(n, ty, creator, id), vec![id.to_string()]);
            let mut out = Vec::new();
            dangling(&r, ty, &mut out);
            assert!(out.is_empty(), "{} {ty}/{id}: dangling {out:?}", n.base);
        }
    }
    // B's phone does not hold A's family (another village), nor A's B's.
    assert_eq!(
        b.get(&format!("/fhir/Patient/{}", fam_a[0])).unwrap().0,
        404
    );
    assert_eq!(
        a.get(&format!("/fhir/Patient/{}", fam_b[0])).unwrap().0,
        404
    );
    // Every head got an insurance number: typed, or from the officer's lease.
    let member = read(&a, "Patient", &fam_a[1]);
    assert!(member.to_string().contains("\"code\":\"Code\""), "{member}");
}
