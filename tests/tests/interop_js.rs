//! Interoperability: js-libp2p (another libp2p implementation) connects to a real `fieldmesh`
//! node over TCP with Noise and Yamux, identifies it and pings it. Needs Node.js and npm (the
//! CI script installs them); the js-libp2p packages come from `tests/interop/package-lock.json`.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use std::path::Path;
use std::process::Command;

use fieldmesh_tests::Node;
use serde_json::Value;

fn npm_ci(dir: &Path) {
    if dir.join("node_modules").exists() {
        return;
    }
    let ok = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .status()
        .expect("npm is needed for this test (apt install nodejs npm)");
    assert!(ok.success(), "npm ci failed in {}", dir.display());
}

#[test]
fn js_libp2p_connects_identifies_and_pings_a_node() -> anyhow::Result<()> {
    let interop = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop");
    npm_ci(&interop);
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), "officer", "device")?;
    let out = Command::new("node")
        .arg(interop.join("identify-ping.mjs"))
        .arg(&node.p2p)
        .output()
        .expect("Node.js is needed for this test (apt install nodejs)");
    assert!(
        out.status.success(),
        "js-libp2p failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout)?;
    let peer = node.p2p.rsplit('/').next().unwrap();
    assert_eq!(got["remotePeer"], peer);
    assert_eq!(got["encryption"], "/noise");
    assert_eq!(got["multiplexer"], "/yamux/1.0.0");
    assert_eq!(got["protocolVersion"], "/fieldmesh/1");
    let protocols: Vec<&str> = got["protocols"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for p in [
        fieldmesh_protocol::PROTOCOL_ID,
        "/ipfs/ping/1.0.0",
        "/ipfs/id/1.0.0",
    ] {
        assert!(protocols.contains(&p), "{p} missing from {protocols:?}");
    }
    assert_eq!(got["rtts"].as_array().unwrap().len(), 3);
    Ok(())
}
