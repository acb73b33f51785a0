//! LAN discovery with mDNS: two nodes in separate network namespaces joined by a veth pair (two
//! phones on one Wi-Fi network) find each other with no `--peer` at all, and sync.
//!
//! Creating network namespaces needs root and iproute2 (`ip netns`); where they are missing the
//! test says so and passes without running (CI runs it as root).
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fieldmesh_tests::{fieldmesh, run_ok};

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `line` without its terminal colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Deletes the namespaces (and with them the veth pair) however the test ends.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            ip(&["netns", "del", ns]);
        }
    }
}

#[test]
fn nodes_on_one_lan_find_each_other_with_mdns() -> anyhow::Result<()> {
    let tag = format!("fm{}", std::process::id() % 100_000);
    let (na, nb) = (format!("{tag}a"), format!("{tag}b"));
    if !ip(&["netns", "add", &na]) {
        eprintln!("skipped: cannot create network namespaces here (needs root and iproute2)");
        return Ok(());
    }
    let _cleanup = Namespaces(vec![na.clone(), nb.clone()]);
    let (va, vb) = (format!("{tag}va"), format!("{tag}vb"));
    for args in [
        vec!["netns", "add", &nb],
        vec!["link", "add", &va, "type", "veth", "peer", "name", &vb],
        vec!["link", "set", &va, "netns", &na],
        vec!["link", "set", &vb, "netns", &nb],
        vec!["-n", &na, "addr", "add", "10.231.0.1/24", "dev", &va],
        vec!["-n", &nb, "addr", "add", "10.231.0.2/24", "dev", &vb],
        vec!["-n", &na, "link", "set", "lo", "up"],
        vec!["-n", &nb, "link", "set", "lo", "up"],
        vec!["-n", &na, "link", "set", &va, "up"],
        vec!["-n", &nb, "link", "set", &vb, "up"],
        vec!["-n", &na, "route", "add", "224.0.0.0/4", "dev", &va],
        vec!["-n", &nb, "route", "add", "224.0.0.0/4", "dev", &vb],
    ] {
        assert!(ip(&args), "ip {}", args.join(" "));
    }

    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for (d, name) in [(&a, "a"), (&b, "b")] {
        fieldmesh_tests::init(d.as_ref(), name, "device")?;
    }
    let patient = dir.path().join("patient.json");
    std::fs::write(
        &patient,
        r#"{"resourceType":"Patient","name":[{"family":"Mahamadou"}],"birthDate":"1990-01-01"}"#,
    )?;
    run_ok(&[
        "load",
        "--data",
        a.to_str().unwrap(),
        patient.to_str().unwrap(),
    ])?;

    let start = |ns: &str, data: &std::path::Path, addr: &str| {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(fieldmesh())
            .args([
                "run",
                "--data",
                data.to_str().unwrap(),
                "--http",
                "127.0.0.1:0",
            ])
            .args(["--listen", &format!("/ip4/{addr}/tcp/0")])
            .env(
                "RUST_LOG",
                "info,fieldmesh_node::net=debug,libp2p_mdns=debug",
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
    };
    let mut node_a = start(&na, &a, "10.231.0.1")?;
    let mut node_b = start(&nb, &b, "10.231.0.2")?;
    // b logs each completed session; wait until they brought both a's certificate and its
    // Patient (the first session between two nodes that do not know each other's certificates
    // exchanges only those; the next brings the rest).
    let stderr = node_b.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel(256);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(strip_ansi(&line)).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let deadline = started + Duration::from_secs(30);
    let (mut received, mut log) = (0u64, Vec::new());
    while Instant::now() < deadline && received < 2 {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if line.contains("sync session done") {
                received += line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("received="))
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            log.push(line);
        }
    }
    eprintln!(
        "found each other and synced in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for child in [&mut node_a, &mut node_b] {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
    }
    let _ = (node_a.wait(), node_b.wait());
    assert!(
        received >= 2,
        "the nodes did not find each other and sync within 30 s; b's log:\n{}",
        log.join("\n")
    );
    let check = run_ok(&["check", "--data", b.to_str().unwrap()])?;
    assert!(
        check.contains("b: 3 documents"),
        "the Patient and both certificates: {check}"
    );
    Ok(())
}
