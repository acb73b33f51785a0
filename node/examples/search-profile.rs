//! Profiles identifier searches on an existing data directory (for `perf record`).
//! `cargo run --release -p fieldmesh-node --example search-profile -- DIR CHFID...`

use anyhow::{Context, Result};
use fieldmesh_fhir_docs::IdentifierQuery;
use fieldmesh_fhir_docs::identifiers::IdentKey;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().context("usage: search-profile DIR CHFID...")?;
    let codes: Vec<String> = args.collect();
    let data = fieldmesh_node::config::DataDir::open(std::path::Path::new(&dir))?;
    let engine = fieldmesh_node::node::open_engine(&data)?;
    let reader = engine.reader();
    let t = std::time::Instant::now();
    let mut n = 0;
    for _ in 0..200 {
        for c in &codes {
            let q = IdentifierQuery::Exact(IdentKey::openimis_code(c.clone()));
            n += reader.search_identifier("Patient", &q)?.len();
        }
    }
    println!(
        "{n} results, {:.0} µs per search",
        t.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64
    );
    Ok(())
}
