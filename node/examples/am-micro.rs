//! Microbenchmark of the Automerge steps of creating a document (for choosing what to store).
//! `cargo run --release -p fieldmesh-node --example am-micro`
use std::time::Instant;

use fieldmesh_fhir_docs::{actor_for_key, new_document};
use serde_json::Value;

fn main() -> anyhow::Result<()> {
    let mut nd = Vec::new();
    fieldmesh_fhir_docs::openimis::demo::generate(3, 2000, &mut nd)?;
    let docs: Vec<serde_json::Map<String, Value>> = String::from_utf8(nd)?
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).map(|v| v.as_object().cloned().unwrap_or_default())
        })
        .collect::<Result<_, _>>()?;
    let actor = actor_for_key(&[7; 32]);
    let n = docs.len() as f64;
    let t = Instant::now();
    let hyd: Vec<_> = docs
        .iter()
        .map(|d| fieldmesh_fhir_docs::convert::json_to_hydrate(&Value::Object(d.clone())))
        .collect();
    println!(
        "json_to_hydrate   {:6.1} µs",
        t.elapsed().as_secs_f64() * 1e6 / n
    );
    let t = Instant::now();
    let mut raw: Vec<automerge::AutoCommit> = Vec::new();
    for h in &hyd {
        use automerge::transaction::Transactable;
        let mut d = automerge::AutoCommit::new().with_actor(actor.clone());
        if let automerge::hydrate::Value::Map(m) = h {
            d.init_root_from_hydrate(m)?;
        }
        raw.push(d);
    }
    println!(
        "init_root         {:6.1} µs",
        t.elapsed().as_secs_f64() * 1e6 / n
    );
    let t = Instant::now();
    for d in raw.iter_mut() {
        d.commit();
    }
    println!(
        "commit            {:6.1} µs",
        t.elapsed().as_secs_f64() * 1e6 / n
    );
    let t = Instant::now();
    let mut built: Vec<_> = docs
        .iter()
        .map(|d| new_document(d, actor.clone(), 1))
        .collect::<Result<_, _>>()?;
    println!(
        "new_document      {:6.1} µs",
        t.elapsed().as_secs_f64() * 1e6 / n
    );
    let t = Instant::now();
    let saves: Vec<Vec<u8>> = built.iter_mut().map(|d| d.save_nocompress()).collect();
    println!(
        "save_nocompress   {:6.1} µs  {:5.0} B",
        t.elapsed().as_secs_f64() * 1e6 / n,
        saves.iter().map(Vec::len).sum::<usize>() as f64 / n
    );
    let t = Instant::now();
    let changes: Vec<Vec<u8>> = built
        .iter_mut()
        .map(|d| {
            d.get_last_local_change()
                .map(|c| c.raw_bytes().to_vec())
                .unwrap_or_default()
        })
        .collect();
    println!(
        "last change bytes {:6.1} µs  {:5.0} B",
        t.elapsed().as_secs_f64() * 1e6 / n,
        changes.iter().map(Vec::len).sum::<usize>() as f64 / n
    );
    let t = Instant::now();
    for c in &changes {
        let _ = automerge::AutoCommit::load(c)?;
    }
    println!(
        "load(change)      {:6.1} µs",
        t.elapsed().as_secs_f64() * 1e6 / n
    );
    let t = Instant::now();
    for s in &saves {
        let _ = automerge::AutoCommit::load(s)?;
    }
    println!(
        "load(save)        {:6.1} µs",
        t.elapsed().as_secs_f64() * 1e6 / n
    );
    let rss_before = resident_kib();
    let loaded: Vec<automerge::AutoCommit> = saves
        .iter()
        .map(|s| automerge::AutoCommit::load(s))
        .collect::<Result<_, _>>()?;
    println!(
        "loaded in memory   {:6.1} KiB each (resident growth over {} documents)",
        (resident_kib().saturating_sub(rss_before)) as f64 / n,
        loaded.len()
    );
    let t = Instant::now();
    let mut items = 0usize;
    for d in &loaded {
        use automerge::ReadDoc;
        items += d.iter().count();
    }
    println!(
        "doc.iter() walk   {:6.1} µs  {:5.0} items",
        t.elapsed().as_secs_f64() * 1e6 / n,
        items as f64 / n
    );
    let t = Instant::now();
    for d in &loaded {
        let _ = fieldmesh_fhir_docs::document_to_json(d)?;
    }
    println!(
        "document_to_json  {:6.1} µs",
        t.elapsed().as_secs_f64() * 1e6 / n
    );
    let t = Instant::now();
    for d in &loaded {
        let _ = automerge::ReadDoc::hydrate(d, automerge::ROOT, None);
    }
    println!(
        "hydrate           {:6.1} µs",
        t.elapsed().as_secs_f64() * 1e6 / n
    );
    let t = Instant::now();
    for d in built.iter_mut() {
        let _ = d.get_heads();
    }
    println!(
        "get_heads         {:6.1} µs",
        t.elapsed().as_secs_f64() * 1e6 / n
    );
    let t = Instant::now();
    for d in &docs {
        let _ = serde_json::to_string(d)?;
    }
    println!(
        "json serialise    {:6.1} µs",
        t.elapsed().as_secs_f64() * 1e6 / n
    );
    // Loading saved documents: with the head check (the default) and without it.
    let saved: Vec<Vec<u8>> = docs
        .iter()
        .map(|d| new_document(d, actor.clone(), 0).map(|mut x| x.save()))
        .collect::<Result<_, _>>()?;
    for (label, mode) in [
        ("load (check heads)", automerge::VerificationMode::Check),
        ("load (no check)   ", automerge::VerificationMode::DontCheck),
    ] {
        let t = Instant::now();
        for b in &saved {
            let opts = automerge::LoadOptions::new().verification_mode(mode);
            std::hint::black_box(automerge::AutoCommit::load_with_options(b, opts)?);
        }
        println!("{label} {:6.1} µs", t.elapsed().as_secs_f64() * 1e6 / n);
    }
    let t = Instant::now();
    for b in &saved {
        let d = automerge::AutoCommit::load(b)?;
        std::hint::black_box(fieldmesh_fhir_docs::document_to_json(&d)?);
    }
    println!(
        "load + to_json     {:6.1} µs",
        t.elapsed().as_secs_f64() * 1e6 / n
    );
    // Central's first edit of a loaded document: one identifier more.
    let mut loaded: Vec<automerge::AutoCommit> = saved
        .iter()
        .map(|b| automerge::AutoCommit::load(b))
        .collect::<Result<_, _>>()?;
    let (mut t_diff, mut t_commit, mut t_save, mut t_changes_after) = (0.0, 0.0, 0.0, 0.0);
    // The edited document as a peer receives it: its first save followed by the edit, or saved
    // whole again.
    let (mut in_two, mut whole, mut t_whole) = (Vec::new(), Vec::new(), 0.0);
    for ((d, json), first) in loaded.iter_mut().zip(&docs).zip(&saved) {
        d.set_actor(actor_for_key(&[9; 32]));
        let old: serde_json::Map<String, Value> = json
            .get("identifier")
            .map(|i| ("identifier".to_string(), i.clone()))
            .into_iter()
            .collect();
        let mut new = old.clone();
        let mut list = new
            .get("identifier")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        list.push(serde_json::json!({"system": "urn:fieldmesh:node:central", "value": "x"}));
        new.insert("identifier".into(), Value::Array(list));
        let before = d.get_heads();
        let t = Instant::now();
        fieldmesh_fhir_docs::apply_diff(d, &old, &new)?;
        t_diff += t.elapsed().as_secs_f64();
        let t = Instant::now();
        d.commit();
        t_commit += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let after = std::hint::black_box(d.save_after(&before));
        t_save += t.elapsed().as_secs_f64();
        in_two.push([first.as_slice(), &after].concat());
        let t = Instant::now();
        whole.push(std::hint::black_box(d.save_nocompress()));
        t_whole += t.elapsed().as_secs_f64();
        let t = Instant::now();
        std::hint::black_box(d.get_changes(&[]).len());
        t_changes_after += t.elapsed().as_secs_f64();
    }
    let mut fresh: Vec<automerge::AutoCommit> = saved
        .iter()
        .map(|b| automerge::AutoCommit::load(b))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    for d in fresh.iter_mut() {
        std::hint::black_box(d.get_changes(&[]).len());
    }
    println!(
        "get_changes(all): fresh load {:.1} µs, after a local edit {:.1} µs",
        t.elapsed().as_secs_f64() * 1e6 / n,
        t_changes_after * 1e6 / n
    );
    println!(
        "first edit after load: diff {:.1} µs, commit {:.1} µs, save_after {:.1} µs",
        t_diff * 1e6 / n,
        t_commit * 1e6 / n,
        t_save * 1e6 / n
    );
    println!("edited, saved whole {:6.1} µs", t_whole * 1e6 / n);
    for (label, stored) in [("two chunks", &in_two), ("whole     ", &whole)] {
        let t = Instant::now();
        for b in stored {
            std::hint::black_box(automerge::AutoCommit::load(b)?);
        }
        println!(
            "load edited, {label} {:6.1} µs  {:5.0} B",
            t.elapsed().as_secs_f64() * 1e6 / n,
            stored.iter().map(Vec::len).sum::<usize>() as f64 / n
        );
    }
    Ok(())
}

/// Resident memory of this process, in KiB (Linux).
fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}
