//! A field deployment of real processes for integration tests: central's reference data
//! (locations, facilities), devices certified for their places, and waiting for what sync
//! delivers.

use std::path::Path;

use serde_json::{Value, json};

use crate::{Node, certify, init_uncertified};

/// Seconds to wait for sync to deliver (or take away) something.
pub const WAIT: u64 = 90;

/// Posts `body` as a `ty` to `n`; panics unless it is created. Returns its id.
pub fn post(n: &Node, ty: &str, body: Value) -> String {
    let (status, _, r) = n
        .post(&format!("/fhir/{ty}"), &body)
        .unwrap_or_else(|e| panic!("POST {ty}: {e}"));
    assert_eq!(status, 201, "{ty}: {r}");
    // A Claim is answered with its ClaimResponse, which names the claim.
    if ty == "Claim" {
        return r["request"]["reference"]
            .as_str()
            .and_then(|s| s.strip_prefix("Claim/"))
            .unwrap_or_default()
            .to_string();
    }
    r["id"].as_str().unwrap_or_default().to_string()
}

/// Posts an openIMIS location (`kind` R, D, W or V) with its code, under `part_of`.
pub fn location(n: &Node, code: &str, kind: &str, part_of: Option<&str>) -> String {
    let mut l = json!({"resourceType": "Location", "name": code, "status": "active", "mode": "instance",
        "identifier": [{"type": {"coding": [{"code": "Code"}]}, "value": code}],
        "physicalType": {"coding": [{"code": kind}]}});
    if let Some(p) = part_of {
        l["partOf"] = json!({"reference": format!("Location/{p}")});
    }
    post(n, "Location", l)
}

/// Whether `n` holds `ty/id`.
pub fn holds(n: &Node, ty: &str, id: &str) -> bool {
    n.get(&format!("/fhir/{ty}/{id}")).is_ok_and(|r| r.0 == 200)
}

/// Waits until `n` holds `ty/id`; panics after [`WAIT`] seconds.
pub fn wait_holds(n: &Node, ty: &str, id: &str, what: &str) {
    n.wait_for(WAIT, what, |n| Ok(holds(n, ty, id)))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Waits until `n` no longer holds `ty/id`; panics after [`WAIT`] seconds.
pub fn wait_gone(n: &Node, ty: &str, id: &str, what: &str) {
    n.wait_for(WAIT, what, |n| Ok(!holds(n, ty, id)))
        .unwrap_or_else(|e| panic!("{e}"));
}

/// A device certified with `grant` (the `cert issue` arguments after `--subject`), started
/// with `peers`.
pub fn device(dir: &Path, name: &str, grant: &[&str], peers: &[&str]) -> Node {
    let data = dir.join(name);
    init_uncertified(&data, name, "device").unwrap_or_else(|e| panic!("init {name}: {e}"));
    certify(&data, grant).unwrap_or_else(|e| panic!("certify {name}: {e}"));
    start(&data, peers)
}

/// Starts the node in `data` with `peers`.
pub fn start(data: &Path, peers: &[&str]) -> Node {
    let mut args = Vec::new();
    for p in peers {
        args.push("--peer");
        args.push(*p);
    }
    Node::run_with(data.to_path_buf(), &args).unwrap_or_else(|e| panic!("start: {e}"))
}
