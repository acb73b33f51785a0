//! Foundation benchmarks: `fieldmesh load` speed and memory, store size, idle memory, opening a
//! store and the first search, and identifier-search latency. Prints its figures beside the targets.
//!
//! ```sh
//! cargo build --release -p fieldmesh-node
//! cargo run --release -p fieldmesh-node --example bench-foundation -- [--families 25000] [--dir /tmp/fm-bench]
//! ```
//!
//! 25,000 families make about 158,000 resources, 100,000 of them insurees (Patients).

use std::io::{BufRead, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fieldmesh_fhir_docs::IdentifierQuery;
use fieldmesh_fhir_docs::identifiers::IdentKey;
use fieldmesh_fhir_docs::openimis::demo;
use fieldmesh_node::config::DataDir;
use fieldmesh_node::node;

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> Result<()> {
    let families: u64 = arg("--families")
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(25_000);
    let dir = PathBuf::from(arg("--dir").unwrap_or_else(|| "/tmp/fieldmesh-bench".into()));
    let bin = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("fieldmesh"))
        .context("cannot locate target/release")?;
    if !bin.exists() {
        bail!(
            "build the binary first: cargo build --release -p fieldmesh-node ({} is missing)",
            bin.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    // 1. Data.
    let ndjson = dir.join("families.ndjson");
    let t = Instant::now();
    let mut w = std::io::BufWriter::new(std::fs::File::create(&ndjson)?);
    let resources = demo::generate(1, families, &mut w)?;
    w.flush()?;
    drop(w);
    let ndjson_bytes = std::fs::metadata(&ndjson)?.len();
    let mut chfids = Vec::new();
    let mut patients = 0u64;
    for line in std::io::BufReader::new(std::fs::File::open(&ndjson)?).lines() {
        let line = line?;
        if line.starts_with("{\"resourceType\":\"Patient\"") {
            patients += 1;
            if patients.is_multiple_of(10) {
                let v: serde_json::Value = serde_json::from_str(&line)?;
                if let Some(c) = v["identifier"][0]["value"].as_str() {
                    chfids.push(c.to_string());
                }
            }
        }
    }
    println!(
        "data: {resources} resources ({patients} insurees, {families} families), {:.1} MB NDJSON, generated in {:.1} s",
        ndjson_bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    // 2. `fieldmesh load` as a real process, sampling its resident memory.
    let data = dir.join("node");
    let st = Command::new(&bin)
        .args([
            "init",
            "--data",
            data.to_str().unwrap_or_default(),
            "--role",
            "central",
            "--name",
            "bench",
        ])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "init failed");
    let t = Instant::now();
    let mut child = Command::new(&bin)
        .args([
            "load",
            "--no-compact",
            "--data",
            data.to_str().unwrap_or_default(),
            ndjson.to_str().unwrap_or_default(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut peak = 0;
    while child.try_wait()?.is_none() {
        peak = peak.max(rss_kib(child.id()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(20));
    }
    let load_s = t.elapsed().as_secs_f64();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().context("stdout")?, &mut out)?;
    anyhow::ensure!(out.contains("rejected 0"), "load rejected resources: {out}");
    let before_compact = std::fs::metadata(data.join("store.redb"))?.len();
    let t = Instant::now();
    let st = Command::new(&bin)
        .args(["compact", "--data", data.to_str().unwrap_or_default()])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "compact failed");
    let compact_s = t.elapsed().as_secs_f64();
    let store_bytes = std::fs::metadata(data.join("store.redb"))?.len();

    // 3. Idle memory of a running node holding the store.
    let mut run = Command::new(&bin)
        .args([
            "run",
            "--data",
            data.to_str().unwrap_or_default(),
            "--http",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut first = String::new();
    let mut out = std::io::BufReader::new(run.stdout.take().context("stdout")?);
    out.read_line(&mut first)?;
    // Keep reading what the node prints, or its next line would find the pipe closed.
    std::thread::spawn(move || {
        let mut line = String::new();
        while out.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            line.clear();
        }
    });
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .context("no address")?
        .trim_end_matches("/fhir/")
        .to_string();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let token = DataDir::open(&data)?.token()?;
    // Idle means idle: central first processes what was loaded (canonical ids, claims
    // adjudicated), which holds its own memory while it runs.
    let waiting = Instant::now();
    loop {
        let st: serde_json::Value = agent
            .get(format!("{base}/status"))
            .call()?
            .body_mut()
            .read_json()?;
        if st["central"]["awaiting_processing"].as_u64() == Some(0) {
            break;
        }
        anyhow::ensure!(
            waiting.elapsed() < Duration::from_secs(900),
            "central did not process what was loaded"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for c in chfids.iter().take(200) {
        let r = agent
            .get(format!("{base}/fhir/Patient?identifier={c}"))
            .header("Authorization", format!("Bearer {token}"))
            .call()?;
        anyhow::ensure!(r.status() == 200, "a search answered {}", r.status());
    }
    std::thread::sleep(Duration::from_secs(2));
    let idle = rss_kib(run.id()).unwrap_or(0);
    // Stop it as an operator would (SIGTERM): the store closes cleanly.
    Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()?;
    let _ = run.wait();

    // 4. Open the store and answer the first identifier search, in this process (cold page cache
    //    when we may drop it).
    let dropped = std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    let t = Instant::now();
    let dir_ = DataDir::open(&data)?;
    let engine = node::open_engine(&dir_)?;
    let reader = engine.reader();
    let q = IdentifierQuery::Exact(IdentKey::openimis_code(chfids[chfids.len() / 2].clone()));
    let found = reader.search_identifier("Patient", &q)?;
    let open_first = t.elapsed();
    anyhow::ensure!(found.len() == 1, "the first search found {}", found.len());

    // 5. Identifier search latency: index lookup alone, and the full search (read, render).
    let mut lookups = Vec::with_capacity(chfids.len());
    let mut searches = Vec::with_capacity(chfids.len());
    let mut rng = demo::Rng::new(42);
    for _ in 0..10_000 {
        let c = rng.pick(&chfids).clone();
        let q = IdentifierQuery::Exact(IdentKey::openimis_code(c));
        let t = Instant::now();
        let ids = reader.find_ids("Patient", &q)?;
        lookups.push(t.elapsed());
        anyhow::ensure!(ids.len() == 1);
        let t = Instant::now();
        let r = reader.search_identifier("Patient", &q)?;
        searches.push(t.elapsed());
        anyhow::ensure!(r.len() == 1);
    }
    lookups.sort();
    searches.sort();

    let rate = resources as f64 / load_s;
    let ratio = store_bytes as f64 / ndjson_bytes as f64;
    println!("\n| figure | measured | target |");
    println!("|---|---|---|");
    println!(
        "| `fieldmesh load` of {resources} resources | {load_s:.1} s, {rate:.0} resources/s | ≥ 5,000/s |"
    );
    println!(
        "| peak RSS during load | {:.0} MB | < 150 MB |",
        peak as f64 / 1024.0
    );
    println!(
        "| RSS of the running node, idle after 200 searches (central's services done) | {:.0} MB | < 100 MB |",
        idle as f64 / 1024.0
    );
    println!(
        "| store size after compaction ({:.0} s) | {:.1} MB = {ratio:.2}× the NDJSON ({:.1} MB before) | ≤ 1.5× |",
        compact_s,
        store_bytes as f64 / 1e6,
        before_compact as f64 / 1e6
    );
    println!(
        "| open store + first identifier search{} | {:.1} ms | < 1 s |",
        if dropped { " (page cache dropped)" } else { "" },
        open_first.as_secs_f64() * 1e3
    );
    println!(
        "| identifier index lookup, 10,000 random CHFIDs | p50 {:.0} µs, p99 {:.0} µs | p99 < 2 ms |",
        percentile(&lookups, 0.5).as_secs_f64() * 1e6,
        percentile(&lookups, 0.99).as_secs_f64() * 1e6
    );
    println!(
        "| full search (lookup, load document, render Bundle entry) | p50 {:.0} µs, p99 {:.0} µs | p99 < 2 ms |",
        percentile(&searches, 0.5).as_secs_f64() * 1e6,
        percentile(&searches, 0.99).as_secs_f64() * 1e6
    );
    Ok(())
}
