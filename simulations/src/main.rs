//! `fieldmesh-sim`: run a scenario with a seed, or many seeds.
//!
//! ```text
//! fieldmesh-sim run simulations/scenarios/small.json [--seed N] [--report DIR]
//! fieldmesh-sim seeds simulations/scenarios/small.json --from 1 --count 1000
//! ```
//!
//! A failing run prints the command that replays it; `seeds` also keeps each failing seed as a
//! regression case in `simulations/regressions/` (run by the tests until it passes).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fieldmesh_simulations::{Scenario, report, run};

fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn replay(path: &Path, seed: u64) -> String {
    format!(
        "cargo run --release -p fieldmesh-simulations -- run {} --seed {seed}",
        path.display()
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: fieldmesh-sim run SCENARIO.json [--seed N] [--report DIR]\n       fieldmesh-sim seeds SCENARIO.json [--from N] [--count N]";
    let (Some(cmd), Some(file)) = (args.get(1), args.get(2)) else {
        bail!("{usage}");
    };
    let path = PathBuf::from(file);
    let sc = Scenario::from_file(&path)?;
    match cmd.as_str() {
        "run" => {
            let seed = flag(&args, "--seed").unwrap_or(sc.seed);
            let o = run(&sc, seed)?;
            let dir: PathBuf = flag(&args, "--report")
                .unwrap_or_else(|| PathBuf::from(format!("sim-report-{}-{seed}", sc.name)));
            report::write(&dir, &sc, &o)?;
            println!(
                "{} seed {seed}: {} in {:.1} s; {} writes, {} sessions ({} abandoned), {}, {} quarantined; trace {}",
                sc.name,
                if o.passed() { "passed" } else { "FAILED" },
                o.seconds,
                o.acknowledged,
                o.sessions,
                o.aborted,
                o.converged_after
                    .map_or("never converged".to_string(), |r| format!(
                        "converged after {r} heal round(s)"
                    )),
                o.quarantined,
                &o.trace[..16]
            );
            println!("report: {}", dir.join("report.md").display());
            if !o.passed() {
                for v in &o.violations {
                    println!("  violated: {v}");
                }
                println!("replay: {}", replay(&path, seed));
                std::process::exit(1);
            }
            Ok(())
        }
        "seeds" => {
            let from: u64 = flag(&args, "--from").unwrap_or(1);
            let count: u64 = flag(&args, "--count").unwrap_or(100);
            let mut failed = Vec::new();
            for seed in from..from + count {
                let o = run(&sc, seed)?;
                if !o.passed() {
                    println!("seed {seed} FAILED: {}", o.violations.join("; "));
                    println!("  replay: {}", replay(&path, seed));
                    let mut kept = sc.clone();
                    kept.seed = seed;
                    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions");
                    std::fs::create_dir_all(&dir)?;
                    let f = dir.join(format!("{}-{seed}.json", sc.name));
                    std::fs::write(&f, serde_json::to_string_pretty(&kept)?)
                        .with_context(|| format!("cannot keep {}", f.display()))?;
                    println!("  kept as {}", f.display());
                    failed.push(seed);
                }
            }
            println!(
                "{count} seeds from {from}: {} failed {:?}",
                failed.len(),
                failed
            );
            if !failed.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        _ => bail!("{usage}"),
    }
}
