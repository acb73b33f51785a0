//! The command line: init, load (NDJSON, Bundles, bad input), check, demo setup and generate.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_tests::{run, run_ok};
use serde_json::{Value, json};

#[test]
fn generate_load_and_check() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let file = d.join("families.ndjson");
    let file2 = d.join("again.ndjson");
    run_ok(&[
        "demo",
        "generate",
        "--seed",
        "7",
        "--families",
        "40",
        "--out",
        file.to_str().unwrap(),
    ])?;
    run_ok(&[
        "demo",
        "generate",
        "--seed",
        "7",
        "--families",
        "40",
        "--out",
        file2.to_str().unwrap(),
    ])?;
    assert_eq!(
        std::fs::read(&file)?,
        std::fs::read(&file2)?,
        "same seed, same data"
    );
    let lines = std::fs::read_to_string(&file)?.lines().count();

    let data = d.join("n");
    fieldmesh_tests::init(data.as_ref(), "n", "device")?;
    let out = run_ok(&[
        "load",
        "--data",
        data.to_str().unwrap(),
        file.to_str().unwrap(),
    ])?;
    assert!(out.contains(&format!("loaded {lines} resources")), "{out}");
    assert!(out.contains("rejected 0"), "{out}");
    let out = run_ok(&["check", "--data", data.to_str().unwrap()])?;
    assert!(
        // The node's certificate is a document too.
        out.contains(&format!("{} documents", lines + 1)) && out.contains("consistent"),
        "{out}"
    );

    // A Bundle with urn:uuid references, and bad lines that are reported and skipped.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0b8d3c2e-3f5a-4c1e-9d7b-2a6f8e4c1b3d", "resource": {"resourceType": "Group", "type": "person", "actual": true,
            "member": [{"entity": {"reference": "urn:uuid:6f1e2d3c-4b5a-4968-8776-5a4b3c2d1e0f"}}]}},
        {"fullUrl": "urn:uuid:6f1e2d3c-4b5a-4968-8776-5a4b3c2d1e0f", "resource": {"resourceType": "Patient", "name": [{"family": "Diallo"}], "birthDate": "1980"}}]});
    let bfile = d.join("bundle.json");
    std::fs::write(&bfile, serde_json::to_vec(&bundle)?)?;
    let bad = d.join("bad.ndjson");
    std::fs::write(
        &bad,
        "{\"resourceType\":\"Patient\",\"name\":[{\"family\":\"Ok\"}],\"birthDate\":\"1999\"}\n{not json}\n{\"resourceType\":\"Patient\",\"gender\":\"M\"}\n",
    )?;
    let out = run_ok(&[
        "load",
        "--data",
        data.to_str().unwrap(),
        bfile.to_str().unwrap(),
        bad.to_str().unwrap(),
    ])?;
    assert!(
        out.contains("loaded 3 resources") && out.contains("rejected 2"),
        "{out}"
    );
    assert!(
        out.contains("bad.ndjson:2") && out.contains("not valid JSON"),
        "{out}"
    );
    assert!(
        out.contains("bad.ndjson:3")
            && out.contains("Patient.birthDate")
            && out.contains("Patient.gender"),
        "{out}"
    );
    let out = run_ok(&["check", "--data", data.to_str().unwrap()])?;
    assert!(out.contains(&format!("{} documents", lines + 4)), "{out}");

    // The store is locked while in use; the error says what to do.
    let missing = run(&[
        "load",
        "--data",
        d.join("nothing").to_str().unwrap(),
        file.to_str().unwrap(),
    ])?;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not a fieldmesh data directory"));
    Ok(())
}

#[test]
fn demo_setup_describes_the_deployment() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("demo");
    run_ok(&["demo", "setup", "--out", out.to_str().unwrap()])?;
    let dep: Value = serde_json::from_slice(&std::fs::read(out.join("deployment.json"))?)?;
    let nodes = dep["nodes"].as_array().unwrap();
    let names: Vec<&str> = nodes.iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["central", "hub", "officer-1", "officer-2", "claims-1"]
    );
    for n in nodes {
        assert!(
            std::path::Path::new(n["data_dir"].as_str().unwrap())
                .join("fieldmesh.toml")
                .exists()
        );
        assert_eq!(
            n["system"],
            format!("urn:fieldmesh:node:{}", n["name"].as_str().unwrap())
        );
        let id = run_ok(&["id", "--data", n["data_dir"].as_str().unwrap()])?;
        assert_eq!(id.trim(), n["peer_id"].as_str().unwrap());
    }
    assert_eq!(nodes[0]["role"], "central");
    assert_eq!(dep["root"], nodes[0]["peer_id"]);
    // The scopes: two officers of one team share a village and each have one of their own; the
    // claim administrator has a facility; each node holds the certificate central issued.
    let villages = |i: usize| -> Vec<String> {
        nodes[i]["scope"]["villages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["code"].as_str().unwrap().to_string())
            .collect()
    };
    let (v1, v2) = (villages(2), villages(3));
    assert_eq!((v1.len(), v2.len()), (2, 2));
    assert_eq!(
        v1.iter().filter(|v| v2.contains(v)).count(),
        1,
        "{v1:?} {v2:?}"
    );
    assert_eq!(nodes[2]["scope"]["roles"][0], "enrolment-officer");
    assert_eq!(nodes[4]["scope"]["roles"][0], "claim-administrator");
    assert_eq!(nodes[4]["scope"]["facilities"][0]["code"], "HF000");
    assert_eq!(nodes[1]["scope"]["roles"][0], "hub");
    for (i, n) in nodes.iter().enumerate() {
        let shown = run_ok(&[
            "cert",
            "show",
            "--data",
            n["data_dir"].as_str().unwrap(),
            "--all",
        ])?;
        if i == 0 {
            assert!(shown.contains("this node is central"), "{shown}");
        }
        assert!(
            shown.contains(n["scope"]["certificate"].as_str().unwrap()),
            "{shown}"
        );
        assert!(shown.contains("5 certificate(s)"), "{shown}");
    }
    let again = run(&["demo", "setup", "--out", out.to_str().unwrap()])?;
    assert!(
        !again.status.success(),
        "a second setup must not overwrite the first"
    );
    // Keys are readable by their owner only.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for file in ["node.key", "api.token"] {
            let path = std::path::Path::new(nodes[2]["data_dir"].as_str().unwrap()).join(file);
            assert_eq!(std::fs::metadata(path)?.permissions().mode() & 0o777, 0o600);
        }
    }
    Ok(())
}
