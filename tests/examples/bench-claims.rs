//! Claims on a claim administrator's device through its API, with real processes: central
//! loads `--families` demo families with their claims (30,000 families make about 120,000
//! insurees and 10,000 claims) and adjudicates every claim; a claim administrator's device
//! certified for both facilities of the district and every village as catchment receives it all
//! (the insurees, their policies, the claims and central's verdicts); central stops, and on the
//! device, offline:
//!
//! - claims per second: `POST Claim` as the openIMIS claims app sends it (code references, one
//!   to three items and services, some without a price), each checked in full (dates, insuree
//!   and family, policies in force, price list, care type, patient category, frequency and
//!   limits against the insuree's earlier claims, product and waiting period) and answered with
//!   its ClaimResponse; latency p50 / p99;
//! - the device's resident memory.
//!
//! ```sh
//! cargo run --release -p fieldmesh-tests --example bench-claims -- [--families 30000] [--claims 2000]
//! ```

use std::io::{BufRead, Write as _};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use fieldmesh_fhir_docs::openimis::demo;
use fieldmesh_tests::bench::{arg, ms, percentile, receive_scope};
use fieldmesh_tests::deploy::{device, start};
use fieldmesh_tests::{init, run_ok};
use serde_json::{Value, json};

const IG: &str = "https://openimis.github.io/openimis_fhir_r4_ig";

fn code_ref(ty: &str, code: &str) -> Value {
    json!({"type": ty, "identifier": {"type": {"coding": [{"system": format!("{IG}/CodeSystem/openimis-identifiers"), "code": "Code"}]}, "value": code}})
}

fn main() -> Result<()> {
    let families = arg("--families", 30_000)?;
    let claims = arg("--claims", 2_000)?;
    let dir = tempfile::Builder::new()
        .prefix("fieldmesh-bench-claims")
        .tempdir()?;
    let d = dir.path();

    let ndjson = d.join("district.ndjson");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&ndjson)?);
    let resources = demo::generate(1, families, &mut w)?;
    w.flush()?;
    drop(w);
    let refdata = demo::reference_data(&mut demo::Rng::new(1));
    let (mut villages, mut chfids, mut prior) = (Vec::new(), Vec::new(), 0u64);
    for line in std::io::BufReader::new(std::fs::File::open(&ndjson)?).lines() {
        let line = line?;
        if line.starts_with("{\"resourceType\":\"Claim\"") {
            prior += 1;
        } else if line.starts_with("{\"resourceType\":\"Location\"")
            || line.starts_with("{\"resourceType\":\"Patient\"")
        {
            let v: Value = serde_json::from_str(&line)?;
            if v["resourceType"] == "Patient" {
                if let Some(c) = v.pointer("/identifier/0/value").and_then(Value::as_str) {
                    chfids.push(c.to_string());
                }
            } else if v.pointer("/physicalType/coding/0/code") == Some(&json!("V")) {
                villages.push(v["id"].as_str().unwrap_or_default().to_string());
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
        "central loaded {resources} resources ({} insurees, {prior} claims) in {:.1} s: {}",
        chfids.len(),
        t.elapsed().as_secs_f64(),
        out.lines().last().unwrap_or_default()
    );
    let central = start(&central_data, &[]);
    // Central's services give canonical ids, price every policy and adjudicate every claim.
    let t = Instant::now();
    loop {
        let st = central.get("/status")?.1;
        if st["central"]["awaiting_processing"].as_u64() == Some(0)
            && st["held"]["ClaimResponse"].as_u64() >= Some(prior)
        {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(3600),
            "central did not adjudicate the claims: {st}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "central processed every arrival and adjudicated {prior} claims in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The claim administrator's device: both facilities, every village as catchment.
    let mut grant = vec!["--role".to_string(), "claim-administrator".into()];
    for (id, code) in &refdata.facilities {
        grant.extend([
            "--facility".into(),
            id.clone(),
            "--facility".into(),
            code.clone(),
        ]);
    }
    for v in &villages {
        grant.extend(["--location".into(), v.clone()]);
    }
    let grant: Vec<&str> = grant.iter().map(String::as_str).collect();
    let t = Instant::now();
    let admin = device(d, "claims", &grant, &[&central.p2p]);
    receive_scope(
        &admin,
        &central,
        chfids.len() as u64,
        Duration::from_secs(3600),
    )?;
    central.terminate(30)?;
    let (_, admin_data) = admin.terminate(30)?;
    let o = start(&admin_data, &[]);
    let st = o.get("/status")?.1;
    println!(
        "the device holds {} documents ({} insurees, {} claims, {} verdicts), received in {:.1} s",
        st["documents"],
        st["held"]["Patient"],
        st["held"]["Claim"],
        st["held"]["ClaimResponse"],
        t.elapsed().as_secs_f64()
    );

    // Offline: claims, as the claims app posts them.
    let today = fieldmesh_fhir_docs::openimis::dates::Date::from_unix(fieldmesh_engine::now())
        .add_days(-1)
        .to_string();
    let mut rng = demo::Rng::new(11);
    let mut lat = Vec::new();
    let (mut checked, mut rejected, mut lines_total) = (0, 0, 0);
    let t = Instant::now();
    for n in 0..claims {
        let card = rng.pick(&chfids).clone();
        let (_, hf) = rng.pick(&refdata.facilities).clone();
        let mut lines = Vec::new();
        for seq in 1..=1 + rng.below(3) {
            let (kind, ty, list) = if rng.below(2) == 0 {
                ("item", "Medication", &refdata.items)
            } else {
                ("service", "ActivityDefinition", &refdata.services)
            };
            let (_, code, price) = rng.pick(list).clone();
            let mut l = json!({"sequence": seq, "category": {"text": kind}, "productOrService": {"text": code},
                "quantity": {"value": 1 + rng.below(3)},
                "extension": [{"url": ty, "valueReference": code_ref(ty, &code)}]});
            if rng.below(2) == 0 {
                l["unitPrice"] =
                    json!({"value": price.parse::<f64>().unwrap_or(0.0), "currency": "$"});
            }
            lines.push(l);
        }
        lines_total += lines.len();
        let claim = json!({"resourceType": "Claim", "status": "active", "use": "claim",
            "identifier": [{"type": {"coding": [{"system": format!("{IG}/CodeSystem/openimis-identifiers"), "code": "Code"}]}, "value": format!("B{n:07}")}],
            "type": {"coding": [{"system": format!("{IG}/CodeSystem-claim-visit-type.html"), "code": "O"}]},
            "patient": code_ref("Patient", &card), "provider": code_ref("Organization", &hf),
            "enterer": code_ref("Practitioner", "CA000"),
            "created": today, "billablePeriod": {"start": today, "end": today},
            "item": lines});
        let one = Instant::now();
        let (status, _, r) = o.post("/fhir/Claim", &claim)?;
        lat.push(one.elapsed());
        ensure!(
            status == 201 && r["resourceType"] == "ClaimResponse",
            "claim: {status} {r}"
        );
        if r["outcome"] == "complete" {
            rejected += 1;
        } else {
            checked += 1;
        }
    }
    let rate = claims as f64 / t.elapsed().as_secs_f64();
    lat.sort();
    let (rss, peak) = o.memory_mb()?;
    println!(
        "\n| figure (device offline: {} insurees, {} earlier claims with central's verdicts) | measured |",
        st["held"]["Patient"], st["held"]["Claim"]
    );
    println!("|---|---|");
    println!(
        "| POST Claim with every offline check, {claims} in a row ({lines_total} lines; {checked} checked, {rejected} rejected) | {rate:.0} claims/s; p50 {:.1} ms, p99 {:.1} ms |",
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99))
    );
    println!("| device RSS after the run | {rss:.0} MB (peak {peak:.0} MB) |");
    Ok(())
}
