//! Trains the zstd dictionary the store compresses documents with (`storage/src/zstd-dict-v1.bin`).
//!
//! Samples are the uncompressed Automerge saves of synthetic openIMIS resources (seed 999, a seed
//! the benchmarks do not use), prepared exactly as a node stores them. Run:
//! `cargo run --release -p fieldmesh-node --example train-dict -- storage/src/zstd-dict-v1.bin`

use anyhow::{Context, Result};
use fieldmesh_fhir_docs::{DocId, IdentKey, Resolver, actor_for_key, new_document, prepare};
use serde_json::Value;

/// Nothing is local while training: every reference stays logical.
struct NoLocal;
impl Resolver for NoLocal {
    fn local(&self, _: &str, _: &str) -> Option<IdentKey> {
        None
    }
    fn find(&self, _: &str, _: &IdentKey) -> Option<String> {
        None
    }
}

fn main() -> Result<()> {
    let out = std::env::args()
        .nth(1)
        .context("usage: train-dict OUT_FILE")?;
    let mut ndjson = Vec::new();
    fieldmesh_fhir_docs::openimis::demo::generate(999, 3000, &mut ndjson)?;
    let mut samples = Vec::new();
    for (i, line) in String::from_utf8(ndjson)?.lines().enumerate() {
        let v: Value = serde_json::from_str(line)?;
        let id = DocId::new();
        let p = prepare(
            v,
            None,
            "urn:fieldmesh:node:trainer",
            &id,
            &NoLocal,
            &|_| None,
        )?;
        let actor = actor_for_key(&[(i % 251) as u8; 32]);
        let mut doc = new_document(&p.json, actor, 1_795_000_000)?;
        samples.push(doc.save_nocompress());
    }
    let dict = zstd::dict::from_samples(&samples, 48 * 1024)?;
    std::fs::write(&out, &dict)?;
    let total: usize = samples.iter().map(Vec::len).sum();
    println!(
        "trained a {} byte dictionary on {} samples ({} bytes) into {out}",
        dict.len(),
        samples.len(),
        total
    );
    Ok(())
}
