//! Sync benchmarks.
//!
//! 1. Cold sync between two real `fieldmesh` processes over libp2p TCP on loopback: one node
//!    loaded with synthetic openIMIS data, an empty one dialling it. Time until the empty node holds
//!    everything, bytes on the wire per resource, peak RSS of the receiver.
//! 2. Warm resync of two 100,000-document stores differing by d documents, at the protocol level
//!    (the same `Session` code the node runs): round trips and reconciliation bytes.
//!
//! ```sh
//! cargo build --release -p fieldmesh-node
//! cargo run --release -p fieldmesh-node --example bench-sync -- [--families 1600]
//! ```

use std::collections::VecDeque;
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fieldmesh_protocol::{Action, Message, Role, Session, decode, encode};

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

struct Running {
    child: std::process::Child,
    http: String,
    p2p: String,
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
        .stderr(Stdio::null())
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

/// Reconciliation of two item sets through real sessions: (round trips, reconciliation bytes).
fn reconcile(
    a: &[([u8; 16], Vec<[u8; 32]>)],
    b: &[([u8; 16], Vec<[u8; 32]>)],
) -> Result<(u32, usize)> {
    let mut sa = Session::new(Role::Initiator, "a", a.iter().cloned())?;
    let mut sb = Session::new(Role::Responder, "b", b.iter().cloned())?;
    let (mut to_b, mut to_a) = (VecDeque::new(), VecDeque::new());
    let mut bytes = 0;
    let mut flights = 0;
    let mut dir = 0;
    let emit = |acts: Vec<Action>, q: &mut VecDeque<Vec<u8>>, bytes: &mut usize| {
        for a in acts {
            if let Action::Send(m) = a {
                let f = encode(&m);
                if matches!(m, Message::Reconcile(_) | Message::Want(_)) {
                    *bytes += f.len();
                }
                q.push_back(f);
            }
        }
    };
    emit(sa.start()?, &mut to_b, &mut bytes);
    loop {
        if let Some(f) = to_b.pop_front() {
            if dir != 1 {
                flights += 1;
                dir = 1;
            }
            let acts = sb.handle(decode(&f)?)?;
            emit(acts, &mut to_a, &mut bytes);
        } else if let Some(f) = to_a.pop_front() {
            if dir != 2 {
                flights += 1;
                dir = 2;
            }
            let acts = sa.handle(decode(&f)?)?;
            emit(acts, &mut to_b, &mut bytes);
        } else {
            break;
        }
    }
    Ok((u32::div_ceil(flights, 2), bytes))
}

fn main() -> Result<()> {
    let families: u64 = arg("--families")
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(1600);
    let bin = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("fieldmesh"))
        .context("cannot locate target/release")?;
    if !bin.exists() {
        bail!("build the binary first: cargo build --release -p fieldmesh-node");
    }
    let dir = std::path::PathBuf::from("/tmp/fieldmesh-bench-sync");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("data.ndjson");
    let mut w = std::io::BufWriter::new(std::fs::File::create(&file)?);
    let resources = fieldmesh_node::demo::generate(11, families, &mut w)?;
    drop(w);
    for (name, load) in [("a", true), ("b", false)] {
        let d = dir.join(name);
        let ok = Command::new(&bin)
            .args([
                "init",
                "--data",
                d.to_str().unwrap_or_default(),
                "--role",
                "device",
                "--name",
                name,
            ])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(ok.success());
        if load {
            let ok = Command::new(&bin)
                .args([
                    "load",
                    "--data",
                    d.to_str().unwrap_or_default(),
                    file.to_str().unwrap_or_default(),
                ])
                .stdout(Stdio::null())
                .status()?;
            anyhow::ensure!(ok.success());
        }
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut a = start(&bin, &dir.join("a"), &[])?;
    let t = Instant::now();
    let mut b = start(&bin, &dir.join("b"), &["--peer", &a.p2p.clone()])?;
    let mut peak = 0;
    loop {
        peak = peak.max(rss_kib(b.child.id()).unwrap_or(0));
        let st = status(&agent, &b.http)?;
        if st["documents"].as_u64() == Some(resources) {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("cold sync did not finish");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let secs = t.elapsed().as_secs_f64();
    let st = status(&agent, &b.http)?;
    let received = st["connected_peers"][0]["bytes_received"]
        .as_u64()
        .unwrap_or(0);
    let sent = st["connected_peers"][0]["bytes_sent"].as_u64().unwrap_or(0);
    println!(
        "| cold sync of {resources} resources over libp2p TCP, loopback | {secs:.2} s | 10k < 1 s, 100k < 10 s |"
    );
    println!(
        "| bytes on the wire per resource (both directions, sync streams) | {:.0} B | ≤ 288 B |",
        (received + sent) as f64 / resources as f64
    );
    println!(
        "| peak RSS of the receiver | {:.0} MB | < 150 MB |",
        peak as f64 / 1024.0
    );
    let _ = a.child.kill();
    let _ = b.child.kill();
    let _ = (a.child.wait(), b.child.wait());

    // Warm resync at 100k documents, first contact (no checkpoint yet).
    let base: Vec<([u8; 16], Vec<[u8; 32]>)> = (0..100_000u64)
        .map(|n| {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&n.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes());
            let mut head = [0u8; 32];
            head[..8].copy_from_slice(&n.to_be_bytes());
            (id, vec![head])
        })
        .collect();
    for d in [0usize, 1, 10, 100, 1000] {
        let mut other = base.clone();
        for item in other.iter_mut().step_by(97).take(d) {
            item.1[0][31] ^= 1;
        }
        let (rt, bytes) = reconcile(&base, &other)?;
        println!(
            "| warm resync, 100k documents, d = {d}, first contact | {rt} round trips, {bytes} B of reconciliation | ≤ 3 round trips; negentropy's figures |"
        );
    }
    Ok(())
}
