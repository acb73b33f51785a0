//! The simulator in CI: small seeds keep every invariant, runs are deterministic, the canary
//! fails, and every kept regression case passes.
#![allow(clippy::unwrap_used)] // tests may panic on unexpected errors

use std::path::Path;

use fieldmesh_simulations::{Scenario, run};

fn scenario(name: &str) -> Scenario {
    Scenario::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scenarios")
            .join(name),
    )
    .unwrap()
}

#[test]
fn small_seeds_keep_every_invariant() {
    let sc = scenario("small.json");
    for seed in 1..=4 {
        let o = run(&sc, seed).unwrap();
        assert!(
            o.passed(),
            "seed {seed}: {:?}\nreplay: cargo run --release -p fieldmesh-simulations -- run simulations/scenarios/small.json --seed {seed}",
            o.violations
        );
        // The faults were really injected, and the attacks really refused.
        assert!(o.aborted > 0, "seed {seed}: no session was disturbed");
        assert!(o.quarantined > 0, "seed {seed}: nothing was quarantined");
        assert!(
            o.refused_local > 0,
            "seed {seed}: the wrong clock refused nothing"
        );
        assert!(o.acknowledged > 50 && !o.latency_central.is_empty());
        // Scope changes really happened, and data really left devices.
        assert!(
            o.rescoped > 0 && o.moved > 0,
            "seed {seed}: no scope change"
        );
        assert!(o.left_devices > 0, "seed {seed}: nothing was handed off");
    }
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let sc = scenario("small.json");
    let (a, b) = (run(&sc, 11).unwrap(), run(&sc, 11).unwrap());
    assert_eq!(a.trace, b.trace);
    assert_eq!(a.latency_central, b.latency_central);
    let c = run(&sc, 12).unwrap();
    assert_ne!(a.trace, c.trace, "different seeds, different runs");
}

/// A partition that never heals: if this passes, the simulator is not injecting faults or not
/// checking convergence.
#[test]
fn the_canary_fails() {
    let o = run(&scenario("canary-partition.json"), 1).unwrap();
    assert!(
        !o.passed(),
        "the canary passed: faults or invariants are broken"
    );
    assert!(
        o.violations
            .iter()
            .any(|v| v.contains("do not hold exactly their scope")),
        "{:?}",
        o.violations
    );
}

/// Devices that never hand data off: the privacy invariant (and holding exactly one's scope)
/// must catch them.
#[test]
fn the_privacy_canary_fails() {
    let o = run(&scenario("canary-hoarding.json"), 1).unwrap();
    assert!(o.rescoped > 0 && o.moved > 0, "nothing left any scope");
    assert!(
        o.violations
            .iter()
            .any(|v| v.contains("outside its scope for")),
        "{:?}",
        o.violations
    );
}

#[test]
fn kept_regression_cases_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let sc = Scenario::from_file(&path).unwrap();
            let o = run(&sc, sc.seed).unwrap();
            assert!(o.passed(), "{}: {:?}", path.display(), o.violations);
        }
    }
}
