//! Central's services on newly arrived resources: canonical ids, business numbers (with the
//! uniqueness check), reference translation and the duplicate-person check, on a real store on
//! disk.
//!
//! For each size: an enrolment officer's engine writes synthetic openIMIS families (insurees,
//! families, policies, payments; 1% of the insurees registered a second time, same person and
//! card number); central receives all of them as from a peer (signed, checked, merged, committed);
//! then central's services process every arrival, committing as the node does. Central gives an
//! arrival its canonical id in the pass that checks it, so the figure of central processing is
//! the services' time plus what receiving costs more on central than on a node without them
//! (both measured here): resources per second. And the time of the duplicate check per insuree,
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

/// CPU seconds this process used so far (user and system, every thread).
fn cpu_secs() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or_default()
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

/// Synthetic resources an officer writes: about `size`, 1% of the insurees twice; the village
/// ids; the product their policies name (central holds it: it authors reference data).
fn resources(size: usize, seed: u64) -> (Vec<String>, Vec<String>, Value) {
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
    let product = refdata
        .resources
        .iter()
        .find(|r| r["resourceType"] == "InsurancePlan")
        .cloned()
        .unwrap_or_default();
    (
        out.iter().map(Value::to_string).collect(),
        villages,
        product,
    )
}

/// A central node on a redb store in `path` receives `items` from `phone` as from the
/// officer, in sessions of 1,000 documents, with central's services open from the start or not.
/// Returns the engine, the seconds receiving took, and the services.
fn receive(
    phone: &mut Engine,
    items: &[([u8; 16], Heads)],
    cert: &fieldmesh_protocol::DocPayload,
    product: &Value,
    path: &std::path::Path,
    services: bool,
) -> Result<(Engine, f64, Option<Central>)> {
    let root = key(1);
    std::fs::create_dir_all(path)?;
    let store = RedbStore::open(path.join("store.redb"), StoreOptions::default())?;
    let mut central = Engine::new(
        Box::new(store),
        NodeIdentity::new("urn:fieldmesh:node:central".into(), &[1; 32], public(&root)),
        256,
    );
    central.merge(vec![cert.clone()], &Source::Local)?;
    central.create(product.clone(), None, true, &|_| None)?;
    central.flush()?;
    let services = if services {
        Some(Central::open(&mut central, NumberConfig::niger())?)
    } else {
        None
    };
    central.set_keep_flushed(false);
    let from = PeerKey(public(&key(2)));
    let t = Instant::now();
    for chunk in items.chunks(1000) {
        let docs = phone.payloads(&PeerKey(public(&root)), chunk)?;
        let m = central.merge(docs, &Source::Peer(from))?;
        anyhow::ensure!(m.refused == 0, "central refused documents: {m:?}");
        central.flush()?;
    }
    Ok((central, t.elapsed().as_secs_f64(), services))
}

fn run(size: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = key(1);
    let officer = key(2);
    let (lines, villages, product) = resources(size, size as u64);
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
    let items: Vec<([u8; 16], Heads)> = phone
        .items()?
        .into_iter()
        .map(|(id, _, _)| (id, Heads::new()))
        .collect();
    let arrived = items.len();
    let items_all = items.clone();
    // Central receives it as from the officer: once without its services (the cost of
    // receiving alone), once with them on from the start, as the node runs them (it then gives
    // each arrival its canonical id in the pass that checks it).
    let (mut central, received, services) = receive(
        &mut phone,
        &items,
        &cert,
        &product,
        &dir.path().join("central"),
        true,
    )?;
    let (plain, received_plain, _) = receive(
        &mut phone,
        &items,
        &cert,
        &product,
        &dir.path().join("plain"),
        false,
    )?;
    drop(plain);
    let mut services = services.context("services")?;
    drop(phone);
    central.set_keep_flushed(true);

    // Central's services on what arrived.
    let rss_before = rss_mib();
    let cpu = cpu_secs();
    let t = Instant::now();
    let (mut edited, mut canonical, mut dup_nanos, mut steps) = (0, 0, 0u128, 0);
    let (mut priced, mut pricing_nanos) = (0, 0u128);
    loop {
        let r = services.step(&mut central, STEP_ENTRIES)?;
        // As the node does: the commit runs beside the next step, waited for before it.
        central.flush_behind()?;
        edited += r.edited;
        priced += r.priced;
        pricing_nanos += r.pricing_nanos;
        canonical += r.canonical;
        dup_nanos += r.duplicate_check_nanos;
        steps += 1;
        if !r.more && !services.has_work(&central) {
            break;
        }
    }
    central.flush()?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu;
    let status = services.status(&central);
    // Every resource that arrived has central's identifier (the certificate aside).
    let dump = central.store().index_entries()?;
    let with: std::collections::HashSet<_> = dump
        .identifiers
        .iter()
        .filter(|(_, s, _, _)| s == "urn:fieldmesh:node:central")
        .map(|(_, _, _, d)| *d)
        .collect();
    let mut missing = 0;
    for (id, _) in &items_all {
        let ty = central.store().doc_meta(id)?.map(|m| m.ty);
        if !with.contains(id) && ty.as_deref() != Some("Basic") {
            missing += 1;
        }
    }
    anyhow::ensure!(missing == 0, "{missing} arrivals have no canonical id");
    let patients = lines
        .iter()
        .filter(|l| l.contains("\"resourceType\":\"Patient\""))
        .count();
    println!(
        "| {size:>7} | {arrived:>7} | {received_plain:>6.1} s | {received:>6.1} s | {secs:>6.1} s | {:>7.0} | {:>5.0} µs | {canonical:>7} | {edited:>7} | {priced:>6} ({:.0} µs each) | {:>5} | {:>5} | {:>6.1} µs | {rss_before:>5.0} → {:>5.0} MiB | {steps} |",
        arrived as f64 / (secs + (received - received_plain).max(0.0)),
        cpu * 1e6 / arrived as f64,
        pricing_nanos as f64 / 1000.0 / priced.max(1) as f64,
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
        "| resources | arrived docs | receive, plain | receive, central | services | central processing, resources/s | services CPU / resource | canonical ids | edited | policies priced (time each) | persons linked | numbers flagged | number and duplicate checks / insuree | RSS before → after services | steps |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for size in sizes {
        run(size)?;
    }
    Ok(())
}
