//! Central's services on newly arrived resources: canonical ids, business numbers (with the
//! uniqueness check), reference translation and the duplicate-person check, on a real store on
//! disk.
//!
//! For each size: an enrolment officer's engine writes synthetic openIMIS families (insurees,
//! families, policies, payments; 1% of the insurees registered a second time, same person and
//! card number); central receives all of them as from a peer (signed, checked, merged, committed);
//! then central's services process every arrival, committing as the node does. The figure is
//! that last part: resources per second, and the time of the duplicate check per resource,
//! which stays flat from 10k to 100k if detection is not quadratic.
//!
//! ```sh
//! cargo run --release -p fieldmesh-node --example bench-central -- [--sizes 10000,100000]
//! ```

use std::time::Instant;

use anyhow::{Context, Result};
use fieldmesh_engine::central::{Central, NumberConfig, STEP_ENTRIES};
use fieldmesh_engine::test_support::{certificate, certificate_doc, key, public};
use fieldmesh_engine::{Engine, NodeIdentity, Source, now};
use fieldmesh_fhir_docs::openimis::demo::{Rng, reference_data_for, write_families};
use fieldmesh_protocol::Heads;
use fieldmesh_storage::{MemStore, RedbStore, StoreOptions};
use fieldmesh_trust::{PeerKey, Role};
use serde_json::Value;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .unwrap_or_default()
        / 1024.0
}

/// Synthetic resources an officer writes: about `size`, 1% of the insurees twice.
fn resources(size: usize, seed: u64) -> (Vec<String>, Vec<String>) {
    let mut rng = Rng::new(seed);
    let refdata = reference_data_for(&mut rng, 4);
    let mut out: Vec<Value> = Vec::new();
    let mut insuree_no = 1;
    let mut day = 0;
    while out.len() < size {
        write_families(
            &refdata,
            &mut rng,
            50,
            &refdata.villages,
            &format!("d{day}"),
            insuree_no,
            &mut |v| {
                if v["resourceType"] != "Claim" {
                    out.push(v.clone());
                }
                Ok(())
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))
        .unwrap_or_default();
        insuree_no += 400;
        day += 1;
    }
    out.truncate(size);
    let mut copies = Vec::new();
    for (k, p) in out
        .iter()
        .filter(|r| r["resourceType"] == "Patient")
        .enumerate()
    {
        if k % 100 == 7 {
            let mut c = p.clone();
            c["id"] = Value::String(rng.uuid());
            copies.push(c);
        }
    }
    out.extend(copies);
    let villages = refdata.villages.iter().map(|v| v.0.clone()).collect();
    (out.iter().map(Value::to_string).collect(), villages)
}

fn run(size: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = key(1);
    let officer = key(2);
    let (lines, villages) = resources(size, size as u64);
    let vs: Vec<&str> = villages.iter().map(String::as_str).collect();
    let cert = certificate_doc(
        &root,
        &certificate(
            &officer,
            "EO0001",
            &[Role::EnrolmentOfficer],
            &vs,
            &[],
            (now() - 3600, now() + 86_400),
        ),
        now(),
    );
    // The officer's phone writes everything.
    let mut phone = Engine::new(
        Box::new(MemStore::new()),
        NodeIdentity::new(
            "urn:fieldmesh:node:officer-1".into(),
            &[2; 32],
            public(&root),
        ),
        64,
    );
    phone.merge(vec![cert.clone()], &Source::Local)?;
    phone.flush()?;
    phone.set_keep_flushed(false);
    for chunk in lines.chunks(2000) {
        for r in phone.create_lines(chunk, 2) {
            r.context("officer write")?;
        }
        phone.flush()?;
    }
    // Central receives it as from the officer.
    let store = RedbStore::open(dir.path().join("store.redb"), StoreOptions::default())?;
    let mut central = Engine::new(
        Box::new(store),
        NodeIdentity::new("urn:fieldmesh:node:central".into(), &[1; 32], public(&root)),
        256,
    );
    central.merge(vec![cert], &Source::Local)?;
    central.flush()?;
    central.set_keep_flushed(false);
    let items: Vec<([u8; 16], Heads)> = phone
        .items()?
        .into_iter()
        .map(|(id, _, _)| (id, Heads::new()))
        .collect();
    let from = PeerKey(public(&officer));
    let t = Instant::now();
    for chunk in items.chunks(1000) {
        let docs = phone.payloads(&PeerKey(public(&root)), chunk)?;
        let m = central.merge(docs, &Source::Peer(from))?;
        anyhow::ensure!(m.refused == 0, "central refused documents: {m:?}");
        central.flush()?;
    }
    let received = t.elapsed().as_secs_f64();
    drop(phone);
    central.set_keep_flushed(true);
    let arrived = items.len();

    // Central's services.
    let mut services = Central::open(&central, NumberConfig::niger())?;
    let t = Instant::now();
    let (mut edited, mut canonical, mut dup_nanos, mut steps) = (0, 0, 0u128, 0);
    loop {
        let r = services.step(&mut central, STEP_ENTRIES)?;
        // As the node does: the commit runs beside the next step, waited for before it.
        central.flush_behind()?;
        edited += r.edited;
        canonical += r.canonical;
        dup_nanos += r.duplicate_check_nanos;
        steps += 1;
        if !r.more && !services.has_work(&central) {
            break;
        }
    }
    central.flush()?;
    let secs = t.elapsed().as_secs_f64();
    let status = services.status(&central);
    let patients = lines
        .iter()
        .filter(|l| l.contains("\"resourceType\":\"Patient\""))
        .count();
    println!(
        "| {size:>7} | {arrived:>7} | {received:>6.1} s | {secs:>6.1} s | {:>7.0} | {canonical:>7} | {edited:>7} | {:>5} | {:>5} | {:>6.1} µs | {:>5.0} MiB | {steps} |",
        arrived as f64 / secs,
        status["duplicate_persons"]["linked"],
        status["flagged"]["number_taken"],
        dup_nanos as f64 / 1000.0 / patients.max(1) as f64,
        rss_mib(),
    );
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(std::io::stderr)
        .init();
    let sizes: Vec<usize> = arg("--sizes")
        .unwrap_or_else(|| "10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!("central's services on newly arrived resources (redb on disk, one thread)");
    println!(
        "| resources | arrived docs | receive (merge) | services | resources/s | canonical ids | edited | persons linked | numbers flagged | duplicate check / insuree | RSS | steps |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for size in sizes {
        run(size)?;
    }
    Ok(())
}
