//! Sync benchmarks.
//!
//! 1. Cold sync between two real `fieldmesh` processes over libp2p TCP on loopback: one node
//!    loaded with synthetic openIMIS data, an empty one dialling it. Time until the empty node holds
//!    everything, bytes on the wire per resource, peak RSS of the receiver.
//! 2. First sync of one enrolment officer's scope (two villages) from that hub, which now holds
//!    everything: time, bytes and documents received, beside the cold sync of everything above.
//! 3. Warm resync of two 100,000-document stores differing by d documents, at the protocol level
//!    (the same `Session` code the node runs): round trips and reconciliation bytes.
//!
//! ```sh
//! cargo build --release -p fieldmesh-node
//! cargo run --release -p fieldmesh-node --example bench-sync -- [--families 1600]
//! ```

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use automerge::AutoCommit;
use fieldmesh_protocol::pair::{self, HostError};
use fieldmesh_protocol::{DocPayload, Driver, Heads, Local, Message, Role, Start, decode};

/// A `/proc/<pid>/status` field in KiB (`VmRSS:` now, `VmHWM:` the peak).
fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
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

struct Running {
    child: std::process::Child,
    http: String,
    p2p: String,
}

/// A benchmark's node is stopped with it, whatever happens.
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bin: &Path, data: &Path, extra: &[&str]) -> Result<Running> {
    let mut child = Command::new(bin)
        .args([
            "run",
            "--data",
            data.to_str().unwrap_or_default(),
            "--http",
            "127.0.0.1:0",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        // BENCH_LOG=1 keeps each node's log beside its data directory (`<data>.log`).
        .stderr(match std::env::var_os("BENCH_LOG") {
            Some(_) => Stdio::from(std::fs::File::create(data.with_extension("log"))?),
            None => Stdio::null(),
        })
        .spawn()?;
    let mut reader = std::io::BufReader::new(child.stdout.take().context("stdout")?);
    let (mut http, mut p2p) = (None, None);
    while http.is_none() || p2p.is_none() {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("node exited");
        }
        if let Some(u) = line.split_whitespace().find(|w| w.starts_with("http://")) {
            http = Some(u.trim_end_matches("/fhir/").to_string());
        }
        if let Some(a) = line.strip_prefix("listening on ") {
            p2p = Some(a.trim().to_string());
        }
    }
    std::thread::spawn(move || {
        let mut s = String::new();
        while reader.read_line(&mut s).map(|n| n > 0).unwrap_or(false) {
            s.clear();
        }
    });
    Ok(Running {
        child,
        http: http.context("http")?,
        p2p: p2p.context("p2p")?,
    })
}

fn status(agent: &ureq::Agent, base: &str) -> Result<serde_json::Value> {
    Ok(agent
        .get(format!("{base}/status"))
        .call()?
        .body_mut()
        .read_json()?)
}

/// One side of the warm-resync benchmark: items `(doc, heads, seq)`, a checkpoint, payloads.
struct Side {
    local: Local,
    items: Vec<([u8; 16], Vec<[u8; 32]>, u64)>,
}

/// What one session cost.
#[derive(Default)]
struct Cost {
    round_trips: u32,
    metadata: usize,
    total: usize,
    fast: bool,
    secs: f64,
}

/// Runs a session between two sides through the real `Session` code and wire encoding;
/// A real signed envelope (signatures do not compress), keyed to the document.
fn envelope_for(id: &[u8; 16]) -> Vec<u8> {
    use fieldmesh_trust::Envelope;
    let key = fieldmesh_trust::ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let mut hash = [0u8; 32];
    hash[..16].copy_from_slice(id);
    Envelope::encode_wire(&[Envelope::sign(&key, id, "Patient", hash, 0)])
}

/// documents asked for are sent as `payload(doc)` (real Automerge saves), in compressed batches.
fn session(a: &Side, b: &Side, payload: &dyn Fn(&[u8; 16], bool) -> Vec<u8>) -> Result<Cost> {
    /// A side that serves `payload` for whatever it is asked and keeps nothing it receives.
    struct Host<'a>(&'a dyn Fn(&[u8; 16], bool) -> Vec<u8>);
    impl pair::Host for Host<'_> {
        fn read(&mut self, wanted: &[([u8; 16], Heads)]) -> Result<Vec<DocPayload>, HostError> {
            Ok(wanted
                .iter()
                .map(|(id, heads)| DocPayload {
                    id: *id,
                    ty: "Patient".into(),
                    data: (self.0)(id, !heads.is_empty()),
                    // One signed change per document, as the node sends it.
                    envelopes: envelope_for(id),
                })
                .collect())
        }
        fn merge(&mut self, docs: Vec<DocPayload>) -> Result<usize, HostError> {
            Ok(docs.len())
        }
        fn complete(&mut self, _: Option<fieldmesh_protocol::Checkpoint>) -> Result<(), HostError> {
            Ok(())
        }
    }
    let t = Instant::now();
    let start = |s: &Side| Start {
        local: s.local.clone(),
        items: s.items.clone(),
        restricted: false,
    };
    let mut da = Driver::new(Role::Initiator, start(a))?;
    let mut db = Driver::new(Role::Responder, start(b))?;
    let mut cost = Cost::default();
    let mut deliver = |_: pair::Side, frame: &[u8]| {
        if !matches!(decode(frame), Ok(Message::Docs(_))) {
            cost.metadata += frame.len();
        }
        cost.total += frame.len();
        true
    };
    let out = pair::run(
        &mut da,
        &mut Host(payload),
        &mut db,
        &mut Host(payload),
        &mut deliver,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(out.complete(), "session unfinished: {:?}", out.stopped);
    cost.round_trips = out.flights.div_ceil(2);
    cost.fast = da.totals().fast;
    cost.secs = t.elapsed().as_secs_f64();
    Ok(cost)
}

/// Per-document Automerge sync (the `automerge::sync` protocol, one state per document) between
/// two copies of `pairs`: (round trips until quiet, messages, bytes).
fn per_doc_sync(pairs: &mut [(AutoCommit, AutoCommit)]) -> (u32, usize, usize) {
    use automerge::sync::{State, SyncDoc};
    let (mut rounds, mut messages, mut bytes) = (0u32, 0usize, 0usize);
    for (a, b) in pairs.iter_mut() {
        let (mut sa, mut sb) = (State::new(), State::new());
        let mut r = 0;
        loop {
            let mut quiet = true;
            if let Some(m) = a.sync().generate_sync_message(&mut sa) {
                quiet = false;
                messages += 1;
                let enc = m.encode();
                bytes += enc.len();
                if let Ok(m) = automerge::sync::Message::decode(&enc) {
                    let _ = b.sync().receive_sync_message(&mut sb, m);
                }
            }
            if let Some(m) = b.sync().generate_sync_message(&mut sb) {
                quiet = false;
                messages += 1;
                let enc = m.encode();
                bytes += enc.len();
                if let Ok(m) = automerge::sync::Message::decode(&enc) {
                    let _ = a.sync().receive_sync_message(&mut sa, m);
                }
            }
            if quiet {
                break;
            }
            r += 1;
        }
        rounds = rounds.max(r);
    }
    (rounds, messages, bytes)
}

fn main() -> Result<()> {
    let bin = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("fieldmesh"))
        .context("cannot locate target/release")?;
    if !bin.exists() {
        bail!("build the binary first: cargo build --release -p fieldmesh-node");
    }
    if std::env::args().any(|a| a == "--vs-pouchdb") {
        return vs_pouchdb(&bin);
    }
    let families: u64 = arg("--families")
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(1600);
    let dir = std::path::PathBuf::from("/tmp/fieldmesh-bench-sync");
    let agent = agent();
    let cold = cold_sync(&bin, &dir, families, &agent)?;
    let resources = cold.resources;
    println!(
        "| cold sync of {resources} resources over libp2p TCP, loopback | {:.2} s | 10k < 1 s, 100k < 10 s |",
        cold.secs
    );
    println!(
        "| bytes on the wire per resource (both directions, sync streams) | {:.0} B | ≤ 288 B |",
        cold.bytes as f64 / resources as f64
    );
    println!(
        "| peak RSS of the receiver | {:.0} MB | < 150 MB |",
        cold.peak_kib as f64 / 1024.0
    );
    let run_ok = |args: &[&str]| run_ok(&bin, args);
    let mut b = cold.receiver;
    officer_first_sync(
        &bin,
        &dir,
        &run_ok,
        dir.join("a").to_str().unwrap_or_default(),
        &agent,
        &b,
        resources,
        cold.secs,
        cold.bytes,
    )?;
    let _ = b.child.kill();
    let _ = b.child.wait();

    warm()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// Runs the `fieldmesh` binary to completion; its standard output, trimmed.
fn run_ok(bin: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// What a cold sync measured; the receiver still runs.
struct Cold {
    /// The resources synced: those loaded, and central's verdicts on the claims.
    resources: u64,
    /// From starting the receiver's process to it holding everything.
    secs: f64,
    /// Both directions, sync streams, as the receiver counted them.
    bytes: u64,
    /// The receiver's peak resident memory (the kernel's high-water mark).
    peak_kib: u64,
    receiver: Running,
    /// What central held, as NDJSON.
    file: std::path::PathBuf,
}

/// Generates `families` demo families into `dir/data.ndjson`, loads them into a central node
/// `a`, then starts an empty hub `b` of the whole region dialling `a` and waits until it holds
/// everything. `a` is stopped at the end.
fn cold_sync(bin: &Path, dir: &Path, families: u64, agent: &ureq::Agent) -> Result<Cold> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let file = dir.join("data.ndjson");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&file)?);
    fieldmesh_fhir_docs::openimis::demo::generate(11, families, &mut w)?;
    drop(w);
    // a is central (it may author everything); b is a hub with a certificate from a.
    let run_ok = |args: &[&str]| run_ok(bin, args);
    let (da, db) = (dir.join("a"), dir.join("b"));
    let (da_s, db_s) = (
        da.to_str().unwrap_or_default(),
        db.to_str().unwrap_or_default(),
    );
    run_ok(&["init", "--data", da_s, "--role", "central", "--name", "a"])?;
    let root = run_ok(&["id", "--data", da_s])?;
    run_ok(&[
        "init", "--data", db_s, "--role", "hub", "--name", "b", "--root", &root,
    ])?;
    let b_id = run_ok(&["id", "--data", db_s])?;
    let cert = dir.join("b.cert");
    let cert_s = cert.to_str().unwrap_or_default();
    run_ok(&[
        "cert",
        "issue",
        "--data",
        da_s,
        "--subject",
        &b_id,
        "--user",
        "bench",
        "--role",
        "hub",
        // Its area is the whole region: it holds everything.
        "--location",
        "R1",
        "--out",
        cert_s,
    ])?;
    run_ok(&["cert", "install", "--data", db_s, cert_s])?;
    let ok = Command::new(bin)
        .args(["load", "--data", da_s, file.to_str().unwrap_or_default()])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(ok.success());
    let mut a = start(bin, &da, &[])?;
    // Central first processes what was loaded (canonical ids, claims adjudicated): the hub syncs
    // what central holds after that, not while central writes.
    let t = Instant::now();
    let held = loop {
        let st = status(agent, &a.http)?;
        if st["central"]["awaiting_processing"].as_u64() == Some(0) {
            break st["documents"].as_u64().unwrap_or(0);
        }
        if t.elapsed() > Duration::from_secs(900) {
            bail!("central did not process what was loaded");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // What central added (its verdict on each claim) goes into the file the peer system loads:
    // both sync the same resources (all but b's certificate, which central holds too).
    let all = dir.join("all.ndjson");
    let token = run_ok(&["token", "--data", da_s])?;
    let mut out = std::io::BufWriter::new(std::fs::File::create(&all)?);
    let mut lines = 0;
    for line in std::io::BufReader::new(std::fs::File::open(&file)?).lines() {
        use std::io::Write;
        let line = line?;
        writeln!(out, "{line}")?;
        lines += 1;
        let r: serde_json::Value = serde_json::from_str(&line)?;
        if r["resourceType"] != "Claim" {
            continue;
        }
        let found: serde_json::Value = agent
            .get(format!(
                "{}/fhir/ClaimResponse?request=Claim/{}",
                a.http,
                r["id"].as_str().unwrap_or_default()
            ))
            .header("Authorization", format!("Bearer {token}"))
            .call()?
            .body_mut()
            .read_json()?;
        for e in found["entry"].as_array().into_iter().flatten() {
            writeln!(out, "{}", e["resource"])?;
            lines += 1;
        }
    }
    drop(out);
    anyhow::ensure!(
        lines + 1 == held,
        "central holds {held} documents: {lines} loaded or its verdicts, and a certificate?"
    );
    let t = Instant::now();
    let b = start(bin, &db, &["--peer", &a.p2p.clone()])?;
    loop {
        let st = status(agent, &b.http)?;
        if st["documents"].as_u64() == Some(held)
            && st["connected_peers"][0]["sessions"].as_u64() >= Some(1)
        {
            break;
        }
        if t.elapsed() > Duration::from_secs(900) {
            bail!("cold sync did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = t.elapsed().as_secs_f64();
    let st = status(agent, &b.http)?;
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        println!("{st:#}");
    }
    let received = st["connected_peers"][0]["bytes_received"]
        .as_u64()
        .unwrap_or(0);
    let sent = st["connected_peers"][0]["bytes_sent"].as_u64().unwrap_or(0);
    let peak_kib = proc_kib(b.child.id(), "VmHWM:").unwrap_or(0);
    let _ = a.child.kill();
    let _ = a.child.wait();
    Ok(Cold {
        resources: lines,
        secs,
        bytes: received + sent,
        peak_kib,
        receiver: b,
        file: all,
    })
}

/// A child process stopped with its holder, whatever happens.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// PouchDB's figures for one size.
struct Pouch {
    secs: f64,
    bytes: u64,
    peak_kib: u64,
}

/// CouchDB/PouchDB replication as a CHT phone does its first sync: a PouchDB server
/// (`tests/pouchdb/server.js`: express-pouchdb on LevelDB, gzip on) loaded with the same
/// resources, and a PouchDB client in Node.js (`client.js`) pulling everything into LevelDB.
fn pouchdb(file: &Path, dir: &Path, resources: u64) -> Result<Pouch> {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/pouchdb");
    if !js.join("node_modules").exists() {
        bail!("PouchDB is not installed: npm ci --prefix {}", js.display());
    }
    let (sd, cd) = (dir.join("pouchdb-server"), dir.join("pouchdb-client"));
    let _ = std::fs::remove_dir_all(&sd);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let server = Command::new("node")
        .current_dir(&js)
        .args(["server.js", "--port", &port.to_string()])
        .arg("--dir")
        .arg(&sd)
        .arg("--load")
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("node (Node.js) is needed for the PouchDB side")?;
    let mut server = Stopped(server);
    let mut reader = std::io::BufReader::new(server.0.stdout.take().context("stdout")?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let held: u64 = line
        .strip_prefix("ready ")
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("the PouchDB server did not start: {line}"))?;
    anyhow::ensure!(
        held == resources,
        "the PouchDB server holds {held} of {resources}"
    );
    // LevelDB compacts in the background after the load: let it settle, as central's services
    // settled before fieldmesh's sync.
    std::thread::sleep(Duration::from_secs(5));
    let out = Command::new("node")
        .current_dir(&js)
        .args([
            "client.js",
            "--url",
            &format!("http://127.0.0.1:{port}/fhir"),
        ])
        .arg("--dir")
        .arg(&cd)
        .stderr(Stdio::inherit())
        .output()?;
    anyhow::ensure!(out.status.success(), "the PouchDB client failed");
    let got: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    anyhow::ensure!(
        got["held"].as_u64() == Some(resources),
        "the PouchDB client holds {} of {resources}",
        got["held"]
    );
    let bytes: serde_json::Value = agent()
        .get(format!("http://127.0.0.1:{port}/_bench/bytes"))
        .call()?
        .body_mut()
        .read_json()?;
    drop(server);
    Ok(Pouch {
        secs: got["ms"].as_f64().unwrap_or(0.0) / 1e3,
        bytes: bytes["read"].as_u64().unwrap_or(0) + bytes["written"].as_u64().unwrap_or(0),
        peak_kib: got["maxrss_kib"].as_u64().unwrap_or(0),
    })
}

/// fieldmesh's cold sync and CouchDB/PouchDB replication of the same resources, side by side, at
/// about 10k and 100k resources (`--families 1600,16000`).
fn vs_pouchdb(bin: &Path) -> Result<()> {
    let list = arg("--families").unwrap_or_else(|| "1600,16000".into());
    let agent = agent();
    let mut rows = Vec::new();
    for families in list.split(',') {
        let families: u64 = families.trim().parse()?;
        let dir = std::path::PathBuf::from("/tmp/fieldmesh-bench-sync");
        let cold = cold_sync(bin, &dir, families, &agent)?;
        let mut b = cold.receiver;
        let _ = b.child.kill();
        let _ = b.child.wait();
        let n = cold.resources;
        eprintln!("fieldmesh: {n} resources in {:.2} s", cold.secs);
        let pouch = pouchdb(&cold.file, &dir, n)?;
        eprintln!("PouchDB: {n} resources in {:.2} s", pouch.secs);
        rows.push((n, cold.secs, cold.bytes, cold.peak_kib, pouch));
    }
    println!(
        "| resources | fieldmesh | PouchDB | faster | bytes/resource fieldmesh | PouchDB | receiver peak RSS fieldmesh | PouchDB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (n, secs, bytes, peak, p) in rows {
        println!(
            "| {n} | {secs:.2} s | {:.2} s | {:.2}× | {:.0} B | {:.0} B | {:.0} MB | {:.0} MB |",
            p.secs,
            p.secs / secs,
            bytes as f64 / n as f64,
            p.bytes as f64 / n as f64,
            peak as f64 / 1024.0,
            p.peak_kib as f64 / 1024.0
        );
    }
    Ok(())
}

/// A new enrolment officer's phone (two villages) syncs from the hub that holds everything.
#[allow(clippy::too_many_arguments)]
fn officer_first_sync(
    bin: &Path,
    dir: &Path,
    run_ok: &dyn Fn(&[&str]) -> Result<String>,
    central: &str,
    agent: &ureq::Agent,
    hub: &Running,
    resources: u64,
    all_secs: f64,
    all_bytes: u64,
) -> Result<()> {
    let dc = dir.join("c");
    let dc_s = dc.to_str().unwrap_or_default();
    let root = run_ok(&["id", "--data", central])?;
    run_ok(&[
        "init", "--data", dc_s, "--role", "device", "--name", "c", "--root", &root,
    ])?;
    let c_id = run_ok(&["id", "--data", dc_s])?;
    let cert = dir.join("c.cert");
    let cert_s = cert.to_str().unwrap_or_default();
    run_ok(&[
        "cert",
        "issue",
        "--data",
        central,
        "--subject",
        &c_id,
        "--user",
        "EO0001",
        "--role",
        "enrolment-officer",
        "--location",
        "R1D0W0V0",
        "--location",
        "R1D0W0V1",
        "--out",
        cert_s,
    ])?;
    run_ok(&["cert", "install", "--data", dc_s, cert_s])?;
    let t = Instant::now();
    let mut c = start(bin, &dc, &["--peer", &hub.p2p.clone()])?;
    let mut peak = 0;
    // Done once a session completed and the count stayed put for a second (the first sessions
    // bring the certificate and locations, then the villages).
    let (mut last, mut since) = (0u64, Instant::now());
    let secs = loop {
        peak = peak.max(proc_kib(c.child.id(), "VmRSS:").unwrap_or(0));
        let st = status(agent, &c.http)?;
        let docs = st["documents"].as_u64().unwrap_or(0);
        if docs != last {
            (last, since) = (docs, Instant::now());
        }
        let sessions = st["connected_peers"][0]["sessions"].as_u64().unwrap_or(0);
        if sessions >= 2 && docs > 100 && since.elapsed() > Duration::from_secs(3) {
            break since.duration_since(t).as_secs_f64();
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the officer's first sync did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let st = status(agent, &c.http)?;
    let received = st["connected_peers"][0]["bytes_received"]
        .as_u64()
        .unwrap_or(0);
    let sent = st["connected_peers"][0]["bytes_sent"].as_u64().unwrap_or(0);
    println!();
    println!(
        "| first sync from a hub holding {resources} resources | documents received | time | bytes (both ways) | peak RSS |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| everything (a hub of the whole region, above) | {resources} | {all_secs:.2} s | {:.1} MB | |",
        all_bytes as f64 / 1e6
    );
    println!(
        "| an enrolment officer's scope: two villages | {last} | {secs:.2} s | {:.2} MB | {:.0} MB |",
        (received + sent) as f64 / 1e6,
        peak as f64 / 1024.0
    );
    if std::env::var_os("BENCH_VERBOSE").is_some() {
        println!("{:#}", st["scope"]);
    }
    let _ = c.child.kill();
    let _ = c.child.wait();
    Ok(())
}

/// Warm resync of two 100,000-document stores differing by d documents, through the protocol
/// state machines, for first contact and for peers that synced before; per-document Automerge
/// sync of the same d beside it.
fn warm() -> Result<()> {
    const N: u64 = 100_000;
    // Real documents for what is transferred: d edited Patients as Automerge saves.
    let mut nd = Vec::new();
    fieldmesh_fhir_docs::openimis::demo::generate(5, 300, &mut nd)?;
    let patients: Vec<serde_json::Map<String, serde_json::Value>> = String::from_utf8(nd)?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["resourceType"] == "Patient")
        .filter_map(|v| v.as_object().cloned())
        .take(1000)
        .collect();
    let actor = fieldmesh_fhir_docs::actor_for_key(&[1; 32]);
    let mut originals = Vec::new();
    let mut edited = Vec::new();
    for p in &patients {
        let doc = fieldmesh_fhir_docs::new_document(p, actor.clone(), 1)?;
        let mut changed = doc.clone();
        changed.set_actor(fieldmesh_fhir_docs::actor_for_key(&[2; 32]));
        automerge::transaction::Transactable::put(
            &mut changed,
            automerge::ROOT,
            "gender",
            "female",
        )?;
        changed.commit();
        originals.push(doc);
        edited.push(changed);
    }
    let payloads: Vec<Vec<u8>> = edited.iter_mut().map(|d| d.save()).collect();
    // What a node sends when the peer told it its heads: the changes after them.
    let increments: Vec<Vec<u8>> = edited
        .iter_mut()
        .zip(originals.iter_mut())
        .map(|(e, o)| e.save_after(&o.get_heads()))
        .collect();
    let id_of = |n: u64| {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
        id
    };
    let base: Vec<([u8; 16], Vec<[u8; 32]>, u64)> = (0..N)
        .map(|n| {
            let mut head = [0u8; 32];
            head[..8].copy_from_slice(&n.to_be_bytes());
            (id_of(n), vec![head], n + 1)
        })
        .collect();
    let (store_a, store_b) = ([1u8; 16], [2u8; 16]);
    println!();
    println!(
        "| warm resync, 100k documents | path | round trips | metadata | total | time | per-document Automerge sync, same d |"
    );
    println!("|---|---|---|---|---|---|---|");
    for d in [0usize, 1, 10, 100, 1000] {
        // Side a changed d documents after the last sync (new heads, later log sequences).
        let mut items_a = base.clone();
        let changed: std::collections::HashMap<[u8; 16], usize> = items_a
            .iter_mut()
            .step_by(97)
            .take(d)
            .enumerate()
            .map(|(k, item)| {
                item.1[0][31] ^= 1;
                item.2 = N + 1 + k as u64;
                (item.0, k)
            })
            .collect();
        let payload = |id: &[u8; 16], since: bool| {
            changed
                .get(id)
                .map(|k| {
                    if since {
                        increments[*k].clone()
                    } else {
                        payloads[*k].clone()
                    }
                })
                .unwrap_or_default()
        };
        let seq_a = N + d as u64;
        for synced_before in [false, true] {
            let cp = |store, theirs, mine| {
                synced_before.then_some(fieldmesh_protocol::Checkpoint {
                    store,
                    theirs,
                    mine,
                })
            };
            let a = Side {
                local: Local {
                    node: "a".into(),
                    store: store_a,
                    seq: seq_a,
                    checkpoint: cp(store_b, N, N),
                    outside: Vec::new(),
                },
                items: items_a.clone(),
            };
            let b = Side {
                local: Local {
                    node: "b".into(),
                    store: store_b,
                    seq: N,
                    checkpoint: cp(store_a, N, N),
                    outside: Vec::new(),
                },
                items: base.clone(),
            };
            let c = session(&a, &b, &payload)?;
            anyhow::ensure!(c.fast == synced_before);
            let per_doc = if synced_before {
                // Per-document sync has no memory across documents: every document is synced,
                // changed or not. Measured on 2,000 unchanged pairs (scaled to the rest) plus the
                // d changed ones.
                let sample = 2000.min(N as usize);
                let mut same: Vec<(AutoCommit, AutoCommit)> = originals
                    .iter()
                    .cycle()
                    .take(sample)
                    .map(|d| (d.clone(), d.clone()))
                    .collect();
                let (r0, m0, b0) = per_doc_sync(&mut same);
                let mut diff: Vec<(AutoCommit, AutoCommit)> = (0..d)
                    .map(|k| (edited[k].clone(), originals[k].clone()))
                    .collect();
                let (r1, m1, b1) = per_doc_sync(&mut diff);
                let scale = (N as usize - d) as f64 / sample as f64;
                format!(
                    "{} round trips, {:.0} messages, {:.1} MB",
                    r0.max(r1),
                    m0 as f64 * scale + m1 as f64,
                    (b0 as f64 * scale + b1 as f64) / 1e6
                )
            } else {
                String::from("")
            };
            println!(
                "| d = {d} | {} | {} | {} B | {} B | {:.0} ms | {per_doc} |",
                if synced_before {
                    "synced before (checkpoint)"
                } else {
                    "first contact (negentropy)"
                },
                c.round_trips,
                c.metadata,
                c.total,
                c.secs * 1e3,
            );
        }
    }
    println!();
    println!(
        "targets: d = 0 in 1 round trip and ≤ 200 B; ≤ 3 round trips for any d; metadata ≤ 1 KB + 100 B·d for peers that synced before; total at d = 1,000 < 388 KB"
    );
    Ok(())
}
