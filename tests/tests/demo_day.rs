//! The README's first command, `fieldmesh demo run`: a day in the field with five processes on
//! loopback (central, a hub, two enrolment officers, a claim administrator). The test runs it
//! as a person would and checks the final state of every node: what each holds (and does not),
//! the families registered offline, the claim answered offline and adjudicated by central, and
//! every store whole (`fieldmesh check`).
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use fieldmesh_tests::{run, run_ok};
use serde_json::Value;

fn held(day: &Value, node: &str, ty: &str) -> u64 {
    day["nodes"][node]["held"][ty].as_u64().unwrap_or(0)
}

fn holders(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect()
}

fn reasons(r: &Value) -> Vec<String> {
    r["item"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let adj = i["adjudication"].as_array().unwrap();
            adj.last().unwrap()["reason"]["coding"][0]["code"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn a_day_in_the_field() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("demo");
    let o = out.to_str().unwrap();
    // Ports of their own, away from a demo a person may be running (8180…).
    let printed = run(&[
        "demo",
        "run",
        "--out",
        o,
        "--families",
        "30",
        "--port",
        "18380",
    ])?;
    let stdout = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.status.success(),
        "demo run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    for step in [
        "1. Morning",
        "2. In the villages",
        "3. The officers meet",
        "4. Officer-2 reaches the hub",
        "5. At the health facility",
        "6. The link is back",
        "7. Evening",
    ] {
        assert!(stdout.contains(step), "no step {step:?} in:\n{stdout}");
    }
    let day: Value = serde_json::from_slice(&std::fs::read(out.join("day.json"))?)?;
    let nodes = ["central", "hub", "officer-1", "officer-2", "claims-1"];

    // The families registered offline: each officer's, priced and paid on the phone; officer-1's
    // (the shared village) reached every node, officer-2's (its own village) every node but
    // officer-1.
    let (f1, f2) = (&day["families"][0], &day["families"][1]);
    for f in [f1, f2] {
        assert_eq!(f["status"], "Policy", "{f}");
        assert!(
            f["chfid"].as_str().unwrap().len() >= 9,
            "a number from the lease: {f}"
        );
    }
    assert_eq!(f1["members"], 2);
    assert_eq!(holders(&f1["held_by"]), nodes);
    assert_eq!(
        holders(&f2["held_by"]),
        ["central", "hub", "officer-2", "claims-1"]
    );

    // The claim: answered on the device (provisional only for the insuree's claims elsewhere),
    // adjudicated by central with the same verdict; held where the facility is.
    let claim = &day["claim"];
    assert_eq!(claim["provisional"], serde_json::json!(["history"]));
    assert_eq!(
        claim["device"][2], "rejected 17 waiting period fail",
        "{claim}"
    );
    assert_eq!(reasons(&claim["central"]), ["0", "0", "17"]);
    assert_eq!(claim["central"]["disposition"], "checked by central");
    assert_eq!(holders(&claim["held_by"]), ["central", "hub", "claims-1"]);

    // What every node holds at the end of the day.
    let patients = held(&day, "central", "Patient");
    assert!(patients > 30, "{patients}");
    // Every family of the demo lives in the hub's district, in the facility's catchment.
    for n in ["hub", "claims-1"] {
        assert_eq!(held(&day, n, "Patient"), patients, "{n}");
        assert_eq!(held(&day, n, "Claim"), 1, "{n}");
        assert_eq!(held(&day, n, "ClaimResponse"), 1, "{n}");
        assert_eq!(
            held(&day, n, "List"),
            1,
            "{n}: the facility's price list only"
        );
    }
    assert_eq!(
        held(&day, "central", "List"),
        2,
        "every facility's price list"
    );
    for n in ["officer-1", "officer-2"] {
        assert!(
            held(&day, n, "Patient") < patients,
            "{n} holds only its villages"
        );
        for ty in ["Claim", "ClaimResponse", "List"] {
            assert_eq!(held(&day, n, ty), 0, "{n} holds no {ty}");
        }
        assert_eq!(held(&day, n, "InsurancePlan"), 1, "{n} holds the product");
    }
    for n in nodes {
        assert_eq!(day["nodes"][n]["quarantined"], 0, "{n} refused nothing");
        // Every node stopped cleanly and its store is whole.
        let data = out.join(n);
        run_ok(&["check", "--data", data.to_str().unwrap()])?;
    }
    // The next day on the same deployment: new families, receipts and claim, nothing refused.
    run_ok(&[
        "demo",
        "run",
        "--out",
        o,
        "--families",
        "30",
        "--port",
        "18380",
    ])?;
    let next: Value = serde_json::from_slice(&std::fs::read(out.join("day.json"))?)?;
    assert_ne!(next["claim"]["id"], day["claim"]["id"]);
    assert_eq!(next["nodes"]["central"]["held"]["Claim"], 2);
    assert_eq!(next["nodes"]["claims-1"]["held"]["ClaimResponse"], 2);
    Ok(())
}
