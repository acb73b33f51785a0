//! Acknowledged writes survive `kill -9` of a real node process.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_tests::Node;
use serde_json::json;

#[test]
fn acknowledged_writes_survive_kill_9() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), "officer-1", "device")?;
    // Concurrent clients, so that writes share commits.
    let base = node.base.clone();
    let ids: Vec<(String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let node = &node;
                s.spawn(move || {
                    (0..25)
                        .map(|i| {
                            let family = format!("Famille-{t}-{i}");
                            let (status, _, body) = node
                                .post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": family}], "birthDate": "2001-01-01"}))
                                .unwrap();
                            assert_eq!(status, 201, "{body}");
                            (body["id"].as_str().unwrap().to_string(), family)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(ids.len(), 100);
    let data = node.kill9();
    let node = Node::run(data)?;
    assert_ne!(node.base, base.as_str().to_owned() + "x");
    for (id, family) in &ids {
        let (status, p) = node.get(&format!("/fhir/Patient/{id}"))?;
        assert_eq!(status, 200, "{id} lost after kill -9");
        assert_eq!(p["name"][0]["family"], family.as_str());
    }
    let (_, st) = node.get("/status")?;
    // And the node's certificate.
    assert_eq!(st["documents"], 101);
    let (_, data) = node.terminate(10)?;
    fieldmesh_tests::check(&data)
}

#[test]
fn a_running_node_locks_its_store_and_says_so() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), "hub", "hub")?;
    let (status, _, _) = node.post(
        "/fhir/Location",
        &json!({"resourceType": "Location", "name": "Madaoua"}),
    )?;
    assert_eq!(status, 201);
    let file = dir.path().join("one.ndjson");
    std::fs::write(
        &file,
        "{\"resourceType\":\"Location\",\"name\":\"Tounga\"}\n",
    )?;
    let out = fieldmesh_tests::run(&[
        "load",
        "--data",
        node.data.to_str().unwrap(),
        file.to_str().unwrap(),
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in use") && err.contains("stop it first"),
        "{err}"
    );
    // The node is unaffected.
    let (status, st) = node.get("/status")?;
    assert_eq!((status, st["documents"].as_u64()), (200, Some(2)));
    Ok(())
}

/// SIGTERM stops a node that has a peer connected and an HTTP client holding a keep-alive
/// connection, promptly and cleanly, and what it acknowledged is there after a restart.
#[test]
fn sigterm_stops_a_connected_node_and_keeps_its_writes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Node::start(dir.path(), "hub", "hub")?;
    let officer = Node::start_with_peers(dir.path(), "officer", "device", &[&hub.p2p])?;
    officer.wait_for(20, "the hub to connect", |n| {
        Ok(n.get("/status")?.1["connected_peers"]
            .as_array()
            .is_some_and(|p| !p.is_empty()))
    })?;
    let (status, _, body) = officer.post(
        "/fhir/Patient",
        &json!({"resourceType": "Patient", "name": [{"family": "Issa"}], "birthDate": "1990-04-02"}),
    )?;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let (exit, data) = officer.terminate(10)?;
    assert!(exit.success(), "the node exited with {exit}");
    let officer = Node::run(data)?;
    let (status, got) = officer.get(&format!("/fhir/Patient/{id}"))?;
    assert_eq!(status, 200);
    assert_eq!(got["name"][0]["family"], "Issa");
    Ok(())
}

/// A running node has transparent huge pages off: mimalloc asked for them, and a hub's peak
/// memory in a first sync of 100k resources was a third higher with them (134 MB against 103).
#[test]
fn a_running_node_has_transparent_huge_pages_off() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let node = Node::start(dir.path(), "officer-1", "device")?;
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid()))?;
    match status.lines().find(|l| l.starts_with("THP_enabled:")) {
        Some(line) => assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}"),
        // Kernels before 6.x do not show it.
        None => eprintln!("this kernel does not show THP_enabled"),
    }
    Ok(())
}
