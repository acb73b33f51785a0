//! Enrolment on one device through its API, with real processes: central loads a district of
//! `--families` demo families (25,000 make about 100,000 insurees), an enrolment officer's device
//! certified for the district receives them, central stops, and on the device, offline:
//!
//! - enrolments per second: a family of 5 (5 `POST Patient`, `POST Group`), its policy (`POST
//!   Contract`, priced by the node) and its payment (`PUT Contract`, the policy turns active);
//! - coverage inquiries (`POST CoverageEligibilityRequest` for a random insurance number):
//!   latency p50 / p99;
//! - the device's resident memory.
//!
//! ```sh
//! cargo run --release -p fieldmesh-tests --example bench-enrolment -- [--families 25000] [--enrolments 300] [--inquiries 2000]
//! ```

use std::io::{BufRead, Write as _};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fieldmesh_fhir_docs::openimis::demo;
use fieldmesh_tests::bench::{arg, ms, percentile, receive_scope};
use fieldmesh_tests::deploy::{device, start};
use fieldmesh_tests::{Node, init, run_ok};
use serde_json::{Value, json};

const IG: &str = "https://openimis.github.io/openimis_fhir_r4_ig";

fn patient(given: &str, birth: &str, village: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"use": "usual", "family": "Bench", "given": [given]}],
        "birthDate": birth, "gender": "female",
        "address": [{"use": "home", "extension": [{"url": format!("{IG}/StructureDefinition/address-location-reference"),
            "valueReference": {"reference": format!("Location/{village}")}}]}]})
}

fn post(n: &Node, ty: &str, body: &Value) -> Result<Value> {
    let (status, _, r) = n.post(&format!("/fhir/{ty}"), body)?;
    ensure!(status == 201, "POST {ty}: {status} {r}");
    Ok(r)
}

fn main() -> Result<()> {
    let families = arg("--families", 25_000)?;
    let enrolments = arg("--enrolments", 300)?;
    let inquiries = arg("--inquiries", 2_000)?;
    let dir = tempfile::Builder::new()
        .prefix("fieldmesh-bench-enrolment")
        .tempdir()?;
    let d = dir.path();

    // Central with the demo district.
    let ndjson = d.join("families.ndjson");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&ndjson)?);
    let resources = demo::generate(1, families, &mut w)?;
    w.flush()?;
    drop(w);
    let (mut districts, mut villages, mut chfids) = (Vec::<String>::new(), Vec::new(), Vec::new());
    for line in std::io::BufReader::new(std::fs::File::open(&ndjson)?).lines() {
        let line = line?;
        if line.starts_with("{\"resourceType\":\"Location\"")
            || line.starts_with("{\"resourceType\":\"Patient\"")
        {
            let v: Value = serde_json::from_str(&line)?;
            match (
                v["resourceType"].as_str(),
                v.pointer("/physicalType/coding/0/code")
                    .and_then(Value::as_str),
            ) {
                (Some("Location"), Some("D")) => {
                    districts.push(v["id"].as_str().unwrap_or_default().to_string())
                }
                (Some("Location"), Some("V")) => {
                    villages.push(v["id"].as_str().unwrap_or_default().to_string())
                }
                (Some("Patient"), _) => {
                    if let Some(c) = v.pointer("/identifier/0/value").and_then(Value::as_str) {
                        chfids.push(c.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let central_data = d.join("central");
    init(&central_data, "central", "central")?;
    let t = Instant::now();
    let out = run_ok(&[
        "load",
        "--data",
        central_data.to_str().unwrap_or_default(),
        ndjson.to_str().unwrap_or_default(),
    ])?;
    println!(
        "central loaded {resources} resources ({} insurees) in {:.1} s: {}",
        chfids.len(),
        t.elapsed().as_secs_f64(),
        out.lines().last().unwrap_or_default()
    );
    let central = start(&central_data, &[]);

    // The officer's device, certified for every village (a certificate naming a district
    // brings its villages' data, but writes are checked against the villages it names), pulls
    // its scope.
    let mut grant = vec!["--role".to_string(), "enrolment-officer".into()];
    for v in &villages {
        grant.push("--location".into());
        grant.push(v.clone());
    }
    let grant: Vec<&str> = grant.iter().map(String::as_str).collect();
    let t = Instant::now();
    let officer = device(d, "officer", &grant, &[&central.p2p]);
    let held = receive_scope(
        &officer,
        &central,
        chfids.len() as u64,
        Duration::from_secs(1800),
    )?;
    println!(
        "the device ({} villages of {} districts) holds {} of central's {} documents after {:.1} s",
        villages.len(),
        districts.len(),
        held,
        central.documents()?,
        t.elapsed().as_secs_f64()
    );
    central.terminate(30)?;
    let (_, officer_data) = officer.terminate(30)?;
    let o = start(&officer_data, &[]);

    // Offline: enrolments.
    let product = o.get("/fhir/InsurancePlan?identifier=PRD01")?.1["entry"][0]["resource"]["id"]
        .as_str()
        .context("the product on the device")?
        .to_string();
    let enrolled = fieldmesh_fhir_docs::openimis::dates::Date::from_unix(fieldmesh_engine::now())
        .add_days(-3)
        .to_string();
    let mut lat = Vec::new();
    let t = Instant::now();
    for i in 0..enrolments {
        let one = Instant::now();
        let village = &villages[i as usize % villages.len()];
        let mut members = Vec::new();
        for (k, birth) in [
            "1979-03-01",
            "1983-07-12",
            "2008-01-30",
            "2012-05-05",
            "2019-11-11",
        ]
        .iter()
        .enumerate()
        {
            members.push(
                post(
                    &o,
                    "Patient",
                    &patient(&format!("M{i}-{k}"), birth, village),
                )?["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        let group = post(
            &o,
            "Group",
            &json!({"resourceType": "Group", "type": "person", "actual": true, "name": "Bench",
            "member": members.iter().map(|m| json!({"entity": {"reference": format!("Patient/{m}")}})).collect::<Vec<_>>(),
            "extension": [{"url": format!("{IG}/StructureDefinition/group-address"), "valueAddress": patient("x", "2000-01-01", village)["address"][0]}]}),
        )?;
        let mut c = post(
            &o,
            "Contract",
            &json!({"resourceType": "Contract", "status": "Offered", "legalState": {"text": "Offered"},
            "subject": [{"reference": format!("Group/{}", group["id"].as_str().unwrap_or_default())}],
            "term": [{"asset": [{"period": [{"start": enrolled}],
                "valuedItem": [{"entityReference": {"reference": format!("InsurancePlan/{product}")}, "net": {"value": 0}}]}]}]}),
        )?;
        let value = c
            .pointer("/term/0/asset/0/valuedItem/0/net/value")
            .cloned()
            .context("a value")?;
        let id = c["id"].as_str().unwrap_or_default().to_string();
        c["term"][0]["asset"][0]["extension"]
            .as_array_mut()
            .context("extensions")?
            .push(json!({
            "url": format!("{IG}/StructureDefinition/contract-premium"), "extension": [
                {"url": "amount", "valueMoney": {"value": value, "currency": "XOF"}},
                {"url": "receipt", "valueString": format!("BENCH-{i}")},
                {"url": "date", "valueDate": enrolled},
                {"url": "type", "valueCodeableConcept": {"coding": [{"code": "C"}]}}]}));
        let (status, _, paid) = o.put(&format!("/fhir/Contract/{id}"), &c, &[])?;
        ensure!(
            status == 200 && paid["status"] == "Policy",
            "payment: {status} {paid}"
        );
        lat.push(one.elapsed());
    }
    let rate = enrolments as f64 / t.elapsed().as_secs_f64();
    lat.sort();

    // Offline: coverage inquiries.
    let mut rng = demo::Rng::new(7);
    let mut inq = Vec::new();
    let mut in_force = 0;
    for _ in 0..inquiries {
        let c = rng.pick(&chfids).clone();
        let one = Instant::now();
        let (status, _, r) = o.post(
            "/fhir/CoverageEligibilityRequest",
            &json!({"resourceType": "CoverageEligibilityRequest",
            "patient": {"reference": format!("Patient/{c}")}, "purpose": ["benefits"]}),
        )?;
        inq.push(one.elapsed());
        ensure!(status == 200, "inquiry: {status} {r}");
        if r["insurance"].as_array().is_some_and(|a| !a.is_empty()) {
            in_force += 1;
        }
    }
    inq.sort();
    let (rss, peak) = o.memory_mb()?;
    println!(
        "\n| figure (device offline, {} insurees held) | measured |",
        chfids.len()
    );
    println!("|---|---|");
    println!(
        "| enrolments (5 × POST Patient, POST Group, POST Contract priced, PUT Contract paid), {enrolments} in a row | {rate:.1} enrolments/s; one enrolment p50 {:.0} ms, p99 {:.0} ms |",
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99))
    );
    println!(
        "| coverage inquiry (POST CoverageEligibilityRequest, random insurance number), {inquiries} | p50 {:.1} ms, p99 {:.1} ms ({in_force} answered with a policy in force) |",
        ms(percentile(&inq, 0.5)),
        ms(percentile(&inq, 0.99))
    );
    println!("| device RSS after the run | {rss:.0} MB (peak {peak:.0} MB) |");
    Ok(())
}
