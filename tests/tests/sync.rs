//! Peer-to-peer sync between real `fieldmesh` processes over libp2p on loopback.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_tests::peer::TestPeer;
use fieldmesh_tests::{Node, run_ok};
use serde_json::{Value, json};

/// A node named `a` loaded with `families` synthetic families; returns it, its document count
/// and the data file.
fn loaded(
    dir: &std::path::Path,
    seed: &str,
    families: &str,
) -> anyhow::Result<(Node, u64, std::path::PathBuf)> {
    let file = dir.join("data.ndjson");
    run_ok(&[
        "demo",
        "generate",
        "--seed",
        seed,
        "--families",
        families,
        "--out",
        file.to_str().unwrap(),
    ])?;
    let data = dir.join("a");
    fieldmesh_tests::init(data.as_ref(), "a", "device")?;
    run_ok(&[
        "load",
        "--data",
        data.to_str().unwrap(),
        file.to_str().unwrap(),
    ])?;
    let node = Node::run(data)?;
    let total = node.documents()?;
    Ok((node, total, file))
}

/// A resource as both nodes should serve it (node-local metadata aside).
fn content(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("meta");
    v
}

#[test]
fn a_thousand_resources_reach_the_other_node() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, total, file) = loaded(dir.path(), "5", "160")?;
    assert!(total >= 1000, "{total}");
    let b = Node::start_with_peers(dir.path(), "b", "device", &[&a.p2p])?;
    // b also holds its own certificate.
    b.wait_for(
        60,
        "all documents on b",
        |n| Ok(n.documents()? == total + 1),
    )?;
    // Spot-check content: every 50th line of the file, by its id.
    for line in std::fs::read_to_string(&file)?.lines().step_by(50) {
        let v: Value = serde_json::from_str(line)?;
        let path = format!(
            "/fhir/{}/{}",
            v["resourceType"].as_str().unwrap(),
            v["id"].as_str().unwrap()
        );
        let (sa, ra) = a.get(&path)?;
        let (sb, rb) = b.get(&path)?;
        assert_eq!((sa, sb), (200, 200), "{path}");
        assert_eq!(content(ra), content(rb), "{path}");
    }
    let (_, st) = b.get("/status")?;
    assert_eq!(st["peers"], 1);
    assert!(st["connected_peers"][0]["docs_received"].as_u64().unwrap() >= total);
    for n in [a, b] {
        fieldmesh_tests::check(&n.terminate(10)?.1)?;
    }
    Ok(())
}

#[test]
fn a_change_crosses_a_hub_between_phones_that_never_meet() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Node::start(dir.path(), "hub", "hub")?;
    let a = Node::start_with_peers(dir.path(), "officer-1", "device", &[&hub.p2p])?;
    let b = Node::start_with_peers(dir.path(), "officer-2", "device", &[&hub.p2p])?;
    hub.wait_for(10, "both phones connected", |n| {
        Ok(n.get("/status")?.1["peers"] == 2)
    })?;
    let (status, _, p) = a.post(
        "/fhir/Patient",
        &json!({"resourceType": "Patient", "name": [{"family": "Issoufou"}], "birthDate": "1984"}),
    )?;
    assert_eq!(status, 201);
    let path = format!("/fhir/Patient/{}", p["id"].as_str().unwrap());
    b.wait_for(20, "the patient on officer-2", |n| {
        Ok(n.get(&path)?.0 == 200)
    })?;
    assert_eq!(content(b.get(&path)?.1), content(p));
    // officer-2 and officer-1 never connected to each other.
    let (_, st) = b.get("/status")?;
    let peers: Vec<&str> = st["connected_peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["peer_id"].as_str().unwrap())
        .collect();
    assert_eq!(peers.len(), 1);
    assert!(hub.p2p.ends_with(peers[0]));
    for n in [a, b, hub] {
        fieldmesh_tests::check(&n.terminate(10)?.1)?;
    }
    Ok(())
}

#[test]
fn concurrent_offline_edits_merge_alike_on_both_nodes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = Node::start(dir.path(), "a", "device")?;
    let (_, _, p) = a.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Sani", "given": ["Hadiza"]}], "birthDate": "1990-01-01"}))?;
    let id = p["id"].as_str().unwrap().to_string();
    let path = format!("/fhir/Patient/{id}");
    let b = Node::start_with_peers(dir.path(), "b", "device", &[&a.p2p])?;
    b.wait_for(10, "the patient on b", |n| Ok(n.get(&path)?.0 == 200))?;
    // Apart: each edits one field of its own, and both edit `gender`.
    let (a_data, b_data) = (a.kill9(), b.kill9());
    let a = Node::run(a_data)?;
    let b = Node::run(b_data.clone())?;
    let mut on_a = a.get(&path)?.1;
    on_a["telecom"] = json!([{"system": "phone", "value": "+227 90 11 22 33"}]);
    on_a["gender"] = json!("female");
    assert_eq!(a.put(&path, &on_a, &[])?.0, 200);
    let mut on_b = b.get(&path)?.1;
    on_b["birthDate"] = json!("1990-02-02");
    on_b["gender"] = json!("other");
    assert_eq!(b.put(&path, &on_b, &[])?.0, 200);
    // Together again.
    drop(b);
    let b = Node::run_with(b_data, &["--peer", &a.p2p])?;
    b.wait_for(20, "the merge on both nodes", |n| {
        let (x, y) = (content(a.get(&path)?.1), content(n.get(&path)?.1));
        Ok(x == y && x["birthDate"] == "1990-02-02" && x.get("telecom").is_some())
    })?;
    let merged = content(b.get(&path)?.1);
    assert_eq!(merged["telecom"][0]["value"], "+227 90 11 22 33");
    assert_eq!(merged["birthDate"], "1990-02-02");
    assert!(merged["gender"] == "female" || merged["gender"] == "other");
    assert_eq!(merged["name"][0]["family"], "Sani");
    Ok(())
}

#[test]
fn a_sync_killed_midway_resumes_and_loses_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Enough documents that the transfer takes a while even as fast as it has become: 3,300
    // documents once arrived whole before the kill, and of 6,400 the first look at the receiver
    // saw 3,600.
    let (a, total, _) = loaded(dir.path(), "9", "1500")?;
    let b = Node::start_with_peers(dir.path(), "b", "device", &[&a.p2p])?;
    b.wait_for(60, "the sync to start", |n| Ok(n.documents()? > 2))?;
    let b_data = b.kill9();
    // Documents arrive and are committed in frames of 512: the kill fell inside the transfer.
    let seen = {
        let out = run_ok(&["check", "--data", b_data.to_str().unwrap()])?;
        let line = out
            .lines()
            .find(|l| l.contains(" documents,"))
            .unwrap_or_default();
        line.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert!(
        seen > 2 && seen < total,
        "killed with {seen} of {total} documents"
    );
    let b = Node::run_with(b_data.clone(), &["--peer", &a.p2p])?;
    b.wait_for(90, "all documents after the restart", |n| {
        Ok(n.documents()? == total + 1)
    })?;
    drop(b);
    let out = run_ok(&["check", "--data", b_data.to_str().unwrap()])?;
    assert!(out.contains("consistent"), "{out}");
    Ok(())
}

/// Peers that synced before resume from their checkpoints: after a restart, the next session
/// takes the fast path and carries what changed meanwhile, including an edit of a document the
/// other side already had (sent as the changes after its heads).
#[test]
fn peers_that_synced_before_resume_from_their_checkpoints() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, total, file) = loaded(dir.path(), "9", "20")?;
    let b = Node::start_with_peers(dir.path(), "b", "device", &[&a.p2p])?;
    // b also holds its own certificate.
    b.wait_for(
        60,
        "all documents on b",
        |n| Ok(n.documents()? == total + 1),
    )?;
    let path = |n: &Node| -> anyhow::Result<Option<String>> {
        Ok(n.get("/status")?.1["connected_peers"][0]["last_path"]
            .as_str()
            .map(str::to_string))
    };
    b.wait_for(20, "the first session to end", |n| Ok(path(n)?.is_some()))?;
    assert_eq!(path(&b)?.as_deref(), Some("reconciliation"));
    let (_, data_b) = b.terminate(10)?;

    // While b is away, a gets a new Patient and edits an existing one.
    let (status, _, created) = a.post(
        "/fhir/Patient",
        &json!({"resourceType": "Patient", "name": [{"family": "Garba"}], "birthDate": "1988-02-02"}),
    )?;
    assert_eq!(status, 201, "{created}");
    let old_id = std::fs::read_to_string(&file)?
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["resourceType"] == "Patient")
        .and_then(|v| v["id"].as_str().map(str::to_string))
        .unwrap();
    let (_, mut old) = a.get(&format!("/fhir/Patient/{old_id}"))?;
    old["gender"] = json!("other");
    let (status, _, _) = a.put(&format!("/fhir/Patient/{old_id}"), &old, &[])?;
    assert_eq!(status, 200);

    let b = Node::run_with(data_b, &["--peer", &a.p2p])?;
    b.wait_for(30, "the new Patient on b", |n| {
        Ok(n.documents()? == total + 2
            && n.get(&format!("/fhir/Patient/{old_id}"))?.1["gender"] == "other")
    })?;
    b.wait_for(20, "the session to end", |n| {
        Ok(n.get("/status")?.1["connected_peers"][0]["sessions"].as_u64() >= Some(1))
    })?;
    assert_eq!(path(&b)?.as_deref(), Some("checkpoint"));
    let id = created["id"].as_str().unwrap();
    let (status, got) = b.get(&format!("/fhir/Patient/{id}"))?;
    assert_eq!(status, 200);
    assert_eq!(got["name"][0]["family"], "Garba");
    Ok(())
}

/// The sync runs over QUIC as well as TCP.
#[test]
fn sync_runs_over_quic() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a = Node::start(dir.path(), "a", "device")?;
    let a = {
        let data = a.terminate(10)?.1;
        Node::run_with(data, &["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"])?
    };
    let quic = a
        .addrs
        .iter()
        .find(|x| x.contains("/quic-v1/"))
        .cloned()
        .unwrap();
    let (status, _, created) = a.post(
        "/fhir/Patient",
        &json!({"resourceType": "Patient", "name": [{"family": "Moussa"}], "birthDate": "1979-09-09"}),
    )?;
    assert_eq!(status, 201, "{created}");
    let b = Node::start_with_peers(dir.path(), "b", "device", &[&quic])?;
    let id = created["id"].as_str().unwrap();
    b.wait_for(30, "the Patient on b over QUIC", |n| {
        Ok(n.get(&format!("/fhir/Patient/{id}"))?.0 == 200)
    })?;
    let (_, st) = b.get("/status")?;
    assert_eq!(
        st["connected_peers"][0]["peer_id"],
        quic.rsplit('/').next().unwrap()
    );
    Ok(())
}

/// A device that listens only through a hub's relay (as behind a NAT) is reachable: another
/// device dials its `/p2p-circuit` address and they sync with each other directly over it.
#[test]
fn a_device_behind_a_relay_is_reachable_through_the_hub() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let hub = Node::start(dir.path(), "hub", "hub")?;
    let circuit = format!("{}/p2p-circuit", hub.p2p);
    let behind = {
        let data = dir.path().join("behind");
        fieldmesh_tests::init(data.as_ref(), "behind", "device")?;
        Node::run_with(data, &["--listen", &circuit])?
    };
    let relayed = behind
        .addrs
        .iter()
        .find(|x| x.contains("p2p-circuit"))
        .cloned()
        .unwrap();
    let (status, _, created) = behind.post(
        "/fhir/Patient",
        &json!({"resourceType": "Patient", "name": [{"family": "Zara"}], "birthDate": "1995-05-05"}),
    )?;
    assert_eq!(status, 201, "{created}");
    let other = Node::start_with_peers(dir.path(), "other", "device", &[&relayed])?;
    let behind_id = relayed.rsplit('/').next().unwrap().to_string();
    other.wait_for(30, "a completed session with the relayed device", |n| {
        let (_, st) = n.get("/status")?;
        Ok(st["connected_peers"].as_array().is_some_and(|ps| {
            ps.iter()
                .any(|p| p["peer_id"] == behind_id.as_str() && p["sessions"].as_u64() >= Some(1))
        }))
    })?;
    // The first session may carry only certificates (each side learns the other's), the next
    // the data.
    let id = created["id"].as_str().unwrap();
    other.wait_for(30, "the Patient over the relayed connection", |n| {
        Ok(n.get(&format!("/fhir/Patient/{id}"))?.0 == 200)
    })?;
    Ok(())
}

/// A peer that opens a sync stream and goes silent, and one that accepts the node's streams and
/// never answers, each end in a clear error in `/status` at the frame deadline; meanwhile the
/// node keeps syncing with its other peers and answering its API.
#[test]
fn a_silent_peer_ends_in_a_clear_error_and_the_node_keeps_syncing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let a_data = dir.path().join("a");
    fieldmesh_tests::init(&a_data, "a", "device")?;
    fieldmesh_tests::set_sync(&a_data, 2, 3600)?;
    let a = Node::run(a_data)?;
    let b = Node::start_with_peers(dir.path(), "b", "device", &[&a.p2p])?;
    let mut silent = TestPeer::connect(&a.p2p, None, true)?;
    let _held = silent.open()?;
    let (status, _, p) = b.post(
        "/fhir/Patient",
        &json!({"resourceType": "Patient", "name": [{"family": "Souley"}], "birthDate": "1975"}),
    )?;
    assert_eq!(status, 201, "{p}");
    let path = format!("/fhir/Patient/{}", p["id"].as_str().unwrap());
    a.wait_for(20, "b's Patient on a", |n| Ok(n.get(&path)?.0 == 200))?;
    let silent_id = silent.id.to_string();
    a.wait_for(20, "the silent peer's error in /status", |n| {
        let (_, st) = n.get("/status")?;
        Ok(st["known_peers"][&silent_id]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("stopped answering")))
    })?;
    // Both directions: the peer's silent session, and the node's session it never answered.
    a.wait_for(20, "two failed sessions with the silent peer", |n| {
        let (_, st) = n.get("/status")?;
        Ok(st["known_peers"][&silent_id]["failures"].as_u64() >= Some(2))
    })?;
    // The node still syncs: another write crosses while the silent peer is connected.
    let (status, _, q) = b.post(
        "/fhir/Patient",
        &json!({"resourceType": "Patient", "name": [{"family": "Abdou"}], "birthDate": "1980"}),
    )?;
    assert_eq!(status, 201);
    let path = format!("/fhir/Patient/{}", q["id"].as_str().unwrap());
    a.wait_for(
        20,
        "the second Patient on a",
        |n| Ok(n.get(&path)?.0 == 200),
    )?;
    Ok(())
}

/// No write is left behind: two phones post insurees at the same moment through a hub, round
/// after round; every acknowledged write reaches central and the other phone promptly, without
/// help from the periodic resync (set to an hour here).
#[test]
fn no_write_is_left_behind_when_two_phones_write_at_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let start = |name: &str, role: &str, peers: &[&str]| -> anyhow::Result<Node> {
        let data = dir.path().join(name);
        fieldmesh_tests::init(&data, name, role)?;
        fieldmesh_tests::set_sync(&data, 30, 3600)?;
        let mut args = Vec::new();
        for p in peers {
            args.extend(["--peer", *p]);
        }
        Node::run_with(data, &args)
    };
    let hub = start("hub", "hub", &[])?;
    let central = start("central", "central", &[&hub.p2p])?;
    let phones = [
        start("officer-1", "device", &[&hub.p2p])?,
        start("officer-2", "device", &[&hub.p2p])?,
    ];
    hub.wait_for(20, "three peers on the hub", |n| {
        Ok(n.get("/status")?.1["peers"] == 3)
    })?;
    // Every node holds the four certificates once the first sessions are over.
    for n in [&hub, &central, &phones[0], &phones[1]] {
        n.wait_for(30, "the certificates everywhere", |n| {
            Ok(n.documents()? == 4)
        })?;
    }
    let mut expected = 4;
    for round in 0..6 {
        std::thread::scope(|s| {
            for (k, phone) in phones.iter().enumerate() {
                s.spawn(move || {
                    for i in 0..15 {
                        let (status, _, body) = phone
                            .post(
                                "/fhir/Patient",
                                &json!({"resourceType": "Patient",
                                    "name": [{"family": format!("Round{round}-{k}-{i}")}],
                                    "birthDate": "1999-09-09"}),
                            )
                            .unwrap();
                        assert_eq!(status, 201, "{body}");
                    }
                });
            }
        });
        expected += 30;
        for n in [&central, &phones[0], &phones[1]] {
            n.wait_for(
                20,
                &format!("round {round}: all {expected} documents"),
                |n| Ok(n.documents()? == expected),
            )?;
        }
    }
    let [p1, p2] = phones;
    for n in [hub, central, p1, p2] {
        fieldmesh_tests::check(&n.terminate(10)?.1)?;
    }
    Ok(())
}
