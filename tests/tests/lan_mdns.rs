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
#[ignore = "flaky in CI: discovery sometimes misses the 30 s window (libp2p mDNS queries once at start, then every 5 min); run with `cargo test -p fieldmesh-tests --test lan_mdns -- --ignored`"]
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
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
    };
    let mut node_a = start(&na, &a, "10.231.0.1")?;
    let mut node_b = start(&nb, &b, "10.231.0.2")?;
    // b logs each completed session; wait for one that brought a document.
    let stderr = node_b.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel(64);
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("sync session done") && line.contains("received") {
                let _ = tx.send(line);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut synced = false;
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200))
            && !line.contains("received\u{1b}[0m\u{1b}[2m=\u{1b}[0m0 ")
            && !line.contains("received=0 ")
        {
            synced = true;
            break;
        }
    }
    for child in [&mut node_a, &mut node_b] {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
    }
    let _ = (node_a.wait(), node_b.wait());
    assert!(
        synced,
        "the nodes did not find each other and sync within 30 s"
    );
    let check = run_ok(&["check", "--data", b.to_str().unwrap()])?;
    assert!(
        check.contains("b: 3 documents"),
        "the Patient and both certificates: {check}"
    );
    Ok(())
}
