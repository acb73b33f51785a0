//! `fieldmesh demo`: a demo deployment on this machine, synthetic openIMIS data, and a walk-through.

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result, bail};
use fieldmesh_fhir_docs::openimis::demo;
use fieldmesh_node::config::{CONFIG_FILE, DataDir, Role};
use fieldmesh_node::{certs, load, node};
use serde_json::{Value, json};

/// `fieldmesh demo setup`: creates the deployment and says where it is.
pub fn setup_command(out: &Path, first_port: u16) -> Result<()> {
    setup(out, first_port)?;
    println!(
        "deployment written to {}",
        out.join("deployment.json").display()
    );
    Ok(())
}

/// `fieldmesh demo generate`: synthetic openIMIS data as NDJSON.
pub fn generate(
    seed: u64,
    families: u64,
    out: &Path,
    part: &str,
    villages: Vec<String>,
) -> Result<()> {
    let f =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = std::io::BufWriter::new(f);
    let all = part == "all";
    let opts = demo::GenerateOptions {
        reference: all || part == "reference",
        enrolment: all || part == "enrolment",
        claims: all || part == "claims",
        villages,
    };
    let n = demo::generate_with(seed, families, &opts, &mut w)?;
    w.flush()?;
    println!(
        "wrote {n} resources ({families} families, seed {seed}) to {}",
        out.display()
    );
    Ok(())
}

const DEMO_NODES: &[(&str, Role)] = &[
    ("central", Role::Central),
    ("hub", Role::Hub),
    ("officer-1", Role::Device),
    ("officer-2", Role::Device),
    ("claims-1", Role::Device),
];
/// The first demo node's HTTP port (each node the next; libp2p ports 1000 above).
pub const DEMO_FIRST_PORT: u16 = 8180;
/// The demo data's seed: the villages in the officers' certificates are those of this seed.
const DEMO_SEED: u64 = 1;

/// The certificate of each demo node: roles, villages (indexes into the demo villages),
/// facilities (indexes into the demo facilities).
fn demo_grant(name: &str) -> (Vec<fieldmesh_trust::Role>, Vec<usize>, Vec<usize>) {
    use fieldmesh_trust::Role as R;
    match name {
        "central" => (vec![R::Central], vec![], vec![]),
        // The hub's area is the first district (added below): the team's villages and the
        // facility lie in it.
        "hub" => (vec![R::Hub], vec![], vec![]),
        // One team: a shared village and one of their own each.
        "officer-1" => (vec![R::EnrolmentOfficer], vec![0, 1], vec![]),
        "officer-2" => (vec![R::EnrolmentOfficer], vec![0, 2], vec![]),
        // The facility, and the team's villages as its catchment (coverage checks offline).
        _ => (vec![R::ClaimAdministrator], vec![0, 1, 2], vec![0]),
    }
}

/// Creates the demo deployment in `out` and writes `deployment.json`: central (the root of
/// trust), a hub, two enrolment officers of one team and a claim administrator, each with the
/// certificate central issued for it. Every node holds every certificate, as if provisioned at
/// central.
fn setup(out: &Path, first_port: u16) -> Result<Value> {
    if out.join("deployment.json").exists() {
        bail!(
            "{} already holds a deployment; remove it or choose another directory",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let refdata = demo::reference_data(&mut demo::Rng::new(DEMO_SEED));
    let mut nodes = Vec::new();
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut root: Option<String> = None;
    for (i, (name, role)) in DEMO_NODES.iter().enumerate() {
        let data = out.join(name);
        let mut dir = DataDir::init(&data, name, *role, None, root.as_deref())?;
        if root.is_none() {
            root = Some(dir.peer_id().to_string());
        }
        let http = format!("127.0.0.1:{}", first_port + i as u16);
        dir.config.http.listen = http.clone();
        // Connected peers check for news every few seconds (30 s by default): the demo's day
        // runs in minutes.
        dir.config.sync.resync_secs = 3;
        std::fs::write(data.join(CONFIG_FILE), toml::to_string_pretty(&dir.config)?)?;
        let (roles, villages, facilities) = demo_grant(name);
        let villages: Vec<&(String, String, String, String, String, String)> =
            villages.iter().map(|&v| &refdata.villages[v]).collect();
        let facilities: Vec<&(String, String)> =
            facilities.iter().map(|&f| &refdata.facilities[f]).collect();
        let mut locations = Vec::new();
        for v in &villages {
            locations.push(v.0.clone());
            locations.push(v.1.clone());
        }
        if *name == "hub" {
            let district = &refdata.districts[0];
            locations.push(district.0.clone());
            locations.push(district.1.clone());
        }
        let mut hfs = Vec::new();
        for f in &facilities {
            hfs.push(f.0.clone());
            hfs.push(f.1.clone());
        }
        let central = match dirs.first() {
            Some(c) => c,
            None => &dir,
        };
        let file = certs::issue(
            central,
            &certs::IssueRequest {
                subject: dir.peer_id().to_string(),
                user: name.to_string(),
                roles: roles.clone(),
                locations,
                facilities: hfs,
                days: 3650,
                renewal: false,
            },
        )?;
        nodes.push(json!({
            "name": name,
            "role": role.to_string(),
            "data_dir": std::fs::canonicalize(&data)?.display().to_string(),
            "system": dir.config.system,
            "peer_id": dir.peer_id().to_string(),
            "http": http,
            "scope": {
                "roles": roles.iter().map(|r| r.name()).collect::<Vec<_>>(),
                "villages": villages.iter().map(|v| json!({"code": v.1, "id": v.0, "name": v.2})).collect::<Vec<_>>(),
                "facilities": facilities.iter().map(|f| json!({"code": f.1, "id": f.0})).collect::<Vec<_>>(),
                "certificate": file.certificate.serial,
            },
        }));
        files.push(file);
        dirs.push(dir);
    }
    for dir in &dirs {
        let mut engine = node::open_engine(dir)?;
        for f in &files {
            certs::install(&mut engine, f, "demo setup")?;
        }
    }
    let deployment = json!({"root": root, "nodes": nodes});
    std::fs::write(
        out.join("deployment.json"),
        serde_json::to_string_pretty(&deployment)?,
    )?;
    Ok(deployment)
}

/// `fieldmesh demo run`: set up (or reuse) the deployment in `out`, load data, run the nodes
/// and walk through the API.
pub fn run(out: &Path, families: u64, serve: bool, first_port: u16) -> Result<()> {
    let deployment: Value = if out.join("deployment.json").exists() {
        serde_json::from_slice(&std::fs::read(out.join("deployment.json"))?)?
    } else {
        println!("setting up a demo deployment in {}", out.display());
        setup(out, first_port)?
    };
    let node_dir = |name: &str| -> Result<DataDir> {
        let n = deployment["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|n| n["name"] == name))
            .with_context(|| format!("deployment.json has no {name}"))?;
        DataDir::open(Path::new(n["data_dir"].as_str().unwrap_or_default()))
    };
    let (central, hub, officer1, officer2) = (
        node_dir("central")?,
        node_dir("hub")?,
        node_dir("officer-1")?,
        node_dir("officer-2")?,
    );
    let refdata = demo::reference_data(&mut demo::Rng::new(DEMO_SEED));
    // Central authors the reference data; officer-1 enrols families in its own villages.
    for (dir, what, opts) in [
        (
            &central,
            "reference data",
            demo::GenerateOptions {
                enrolment: false,
                claims: false,
                ..Default::default()
            },
        ),
        (
            &officer1,
            "families",
            demo::GenerateOptions {
                reference: false,
                claims: false,
                villages: demo_grant("officer-1")
                    .1
                    .iter()
                    .map(|&v| refdata.villages[v].1.clone())
                    .collect(),
                ..Default::default()
            },
        ),
    ] {
        let mut engine = node::open_engine(dir)?;
        if engine.stats()?.documents > DEMO_NODES.len() as u64 {
            continue;
        }
        let file = out.join(format!(
            "{}-{}.ndjson",
            dir.config.name,
            what.replace(' ', "-")
        ));
        let mut w = std::io::BufWriter::new(std::fs::File::create(&file)?);
        let n = demo::generate_with(
            DEMO_SEED,
            if opts.enrolment { families } else { 0 },
            &opts,
            &mut w,
        )?;
        w.flush()?;
        drop(w);
        let s = load::load_files(&mut engine, &[&file], true)?;
        println!(
            "{}: generated {n} resources ({what}) and loaded {} in {:.1} s{}",
            dir.config.name,
            s.loaded,
            s.seconds,
            if s.rejected.is_empty() {
                String::new()
            } else {
                format!(", {} refused", s.rejected.len())
            }
        );
    }
    drop((central, hub, officer1, officer2));
    let mut field = super::day::Field::new(&deployment, out)?;
    super::day::run_day(&mut field, &refdata, out, serve)
}
