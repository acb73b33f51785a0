//! `fieldmesh demo`: a demo deployment on this machine, synthetic openIMIS data, and a walk-through.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use fieldmesh_fhir_docs::openimis::demo;
use fieldmesh_node::config::{CONFIG_FILE, DataDir, Role};
use fieldmesh_node::net::NetConfig;
use fieldmesh_node::{certs, load, node};
use serde_json::{Value, json};

/// `fieldmesh demo setup`: creates the deployment and says where it is.
pub fn setup_command(out: &Path) -> Result<()> {
    setup(out)?;
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
const DEMO_FIRST_PORT: u16 = 8180;
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
fn setup(out: &Path) -> Result<Value> {
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
        let http = format!("127.0.0.1:{}", DEMO_FIRST_PORT + i as u16);
        dir.config.http.listen = http.clone();
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
pub fn run(out: &Path, families: u64, serve: bool) -> Result<()> {
    let deployment: Value = if out.join("deployment.json").exists() {
        serde_json::from_slice(&std::fs::read(out.join("deployment.json"))?)?
    } else {
        println!("setting up a demo deployment in {}", out.display());
        setup(out)?
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
    let tokens = (officer1.token()?, officer2.token()?);
    let addr1: SocketAddr = officer1.config.http.listen.parse()?;
    let addr2: SocketAddr = officer2.config.http.listen.parse()?;
    let hub_p2p: libp2p::Multiaddr =
        format!("/ip4/127.0.0.1/tcp/{}", DEMO_FIRST_PORT + 1000).parse()?;
    let shared_village = refdata.villages[0].clone();
    let other_village = refdata.villages[5].clone();
    let log_file = out.join("fieldmesh.log");
    let rt = super::runtime()?;
    rt.block_on(async move {
        // The demo stays on this machine: loopback only, no LAN discovery. Central and the two
        // officers know only the hub; the officers never connect to each other.
        let net = |listen: &libp2p::Multiaddr, peers: Vec<libp2p::Multiaddr>| NetConfig {
            listen: vec![listen.clone()],
            relay_server: peers.is_empty(), // the hub
            peers,
            mdns: false,
            limits: fieldmesh_protocol::Limits::default(),
            announce: false,
        };
        let any: libp2p::Multiaddr = "/ip4/127.0.0.1/tcp/0".parse()?;
        let hub_http: SocketAddr = hub.config.http.listen.parse()?;
        let central_http: SocketAddr = central.config.http.listen.parse()?;
        let nodes = vec![
            tokio::spawn(node::run(hub, Some(hub_http), net(&hub_p2p, vec![]))),
            tokio::spawn(node::run(central, Some(central_http), net(&any, vec![hub_p2p.clone()]))),
            tokio::spawn(node::run(officer1, Some(addr1), net(&any, vec![hub_p2p.clone()]))),
            tokio::spawn(node::run(officer2, Some(addr2), net(&any, vec![hub_p2p.clone()]))),
        ];
        println!("\nfour nodes run on this machine (loopback only); their logs go to {}:", log_file.display());
        println!("  {:<10} {:<22} role", "node", "FHIR API");
        for (name, addr, role) in [
            ("hub", hub_http, "hub: relays and stores, authors nothing"),
            ("central", central_http, "central: root of trust, reference data"),
            ("officer-1", addr1, "enrolment officer (dials the hub)"),
            ("officer-2", addr2, "enrolment officer (dials the hub)"),
        ] {
            println!("  {name:<10} http://{:<15} {role}", addr.to_string());
        }
        let (b1, b2) = (format!("http://{addr1}"), format!("http://{addr2}"));
        let walk = tokio::task::spawn_blocking(move || {
            walkthrough(&b1, &b2, &tokens, &shared_village, &other_village)
        })
        .await?;
        if let Err(e) = walk {
            eprintln!("demo walk-through failed: {e:#}");
        }
        if serve {
            println!("\ncentral, hub, officer-1 (http://{addr1}/fhir/) and officer-2 (http://{addr2}/fhir/) keep running — press Ctrl-C to stop.");
            println!("the API needs a token: curl -H \"Authorization: Bearer $(fieldmesh token --data {})\" http://{addr1}/fhir/Patient?identifier=...", out.join("officer-1").display());
            for n in nodes {
                n.await??;
            }
        } else {
            println!("\n(run `fieldmesh demo run --out {} --serve` to keep the nodes running and try the API yourself)", out.display());
            for n in nodes {
                n.abort();
            }
        }
        Ok(())
    })
}

type Village = (String, String, String, String, String, String);

fn walkthrough(
    base: &str,
    other: &str,
    tokens: &(String, String),
    village: &Village,
    elsewhere: &Village,
) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let (auth1, auth2) = (
        format!("Bearer {}", tokens.0),
        format!("Bearer {}", tokens.1),
    );
    // The server may take a moment to bind.
    let mut status = None;
    for _ in 0..50 {
        if let Ok(mut r) = agent.get(format!("{base}/status")).call() {
            status = Some(r.body_mut().read_json::<Value>()?);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status = status.context("officer-1 did not start")?;
    println!(
        "\n1. GET /status → {} ({}), {} documents, peer {}",
        text(&status["name"]),
        text(&status["role"]),
        status["documents"],
        text(&status["peer_id"])
    );
    let r = agent
        .get(format!("{base}/fhir/Patient?identifier=1"))
        .call()?;
    println!(
        "   GET /fhir/Patient without the API token → {} (apps of the device's user send `Authorization: Bearer <token>`)",
        r.status()
    );

    let ig = fieldmesh_fhir_docs::openimis::IG;
    let patient_in = |v: &Village, chfid: &str| {
        json!({"resourceType": "Patient",
        "identifier": [{"type": {"coding": [{"system": format!("{ig}/CodeSystem/openimis-identifiers"), "code": "Code"}]}, "value": chfid}],
        "name": [{"use": "usual", "family": "Maïga", "given": ["Aïssatou", "عائشة"]}],
        "gender": "female", "birthDate": "1994-03-12",
        "address": [{"use": "home", "city": v.2, "extension": [{"url": format!("{ig}/StructureDefinition/address-location-reference"), "valueReference": {"reference": format!("Location/{}", v.0)}}]}],
        "extension": [{"url": format!("{ig}/StructureDefinition/patient-is-head"), "valueBoolean": true}],
        "generalPractitioner": [{"reference": "Organization/HF000"}]})
    };
    let mut r = agent
        .post(format!("{base}/fhir/Patient"))
        .header("Authorization", &auth1)
        .header("Content-Type", "application/fhir+json")
        .send_json(patient_in(village, "9876543210"))?;
    let location = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let created: Value = r.body_mut().read_json()?;
    let id = created["id"].as_str().unwrap_or_default().to_string();
    println!(
        "2. POST /fhir/Patient in {} (a village of officer-1's team) → {} Location: {location}",
        village.2,
        r.status()
    );
    println!("   its identifiers: {}", created["identifier"]);
    println!(
        "   `Organization/HF000` (an openIMIS code reference) was stored as a logical reference: {}",
        created["generalPractitioner"][0]
    );

    let mut r = agent
        .get(format!("{base}/fhir/Patient?identifier=9876543210"))
        .header("Authorization", &auth1)
        .call()?;
    let bundle: Value = r.body_mut().read_json()?;
    println!(
        "3. GET /fhir/Patient?identifier=9876543210 → a {} Bundle with {} match",
        text(&bundle["type"]),
        bundle["total"]
    );

    let mut updated = created.clone();
    updated["telecom"] = json!([{"system": "phone", "value": "+227 96 12 34 56"}]);
    let mut r = agent
        .put(format!("{base}/fhir/Patient/{id}"))
        .header("Authorization", &auth1)
        .send_json(&updated)?;
    let etag = r
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let after: Value = r.body_mut().read_json()?;
    println!(
        "4. PUT adds a phone number → {} version {} → {} (ETag {etag}); only the changed field became an Automerge edit, signed by officer-1's key",
        r.status(),
        text(&created["meta"]["versionId"]),
        text(&after["meta"]["versionId"])
    );

    let mut r = agent
        .post(format!("{base}/fhir/Patient"))
        .header("Authorization", &auth1)
        .send_json(json!({"resourceType": "Patient", "name": [{"family": "X"}], "birthDate": "1990-13-40"}))?;
    let oo: Value = r.body_mut().read_json()?;
    println!(
        "5. POST of an invalid Patient → {}: {}",
        r.status(),
        text(&oo["issue"][0]["diagnostics"])
    );
    let mut r = agent
        .post(format!("{base}/fhir/Patient"))
        .header("Authorization", &auth1)
        .send_json(patient_in(elsewhere, "1234567896"))?;
    let oo: Value = r.body_mut().read_json()?;
    println!(
        "6. POST of a Patient in {}, outside officer-1's villages → {}: {}",
        elsewhere.2,
        r.status(),
        text(&oo["issue"][0]["diagnostics"])
    );
    let mut r = agent
        .post(format!("{base}/fhir/Location"))
        .header("Authorization", &auth1)
        .send_json(json!({"resourceType": "Location", "name": "A village of my own"}))?;
    let oo: Value = r.body_mut().read_json()?;
    println!(
        "7. POST of a Location (reference data, central's alone) → {}: {}",
        r.status(),
        text(&oo["issue"][0]["diagnostics"])
    );
    let t = std::time::Instant::now();
    let mut arrived = false;
    while t.elapsed() < std::time::Duration::from_secs(60) {
        if agent
            .get(format!("{other}/fhir/Patient/{id}"))
            .header("Authorization", &auth2)
            .call()?
            .status()
            == 200
        {
            arrived = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let st: Value = agent
        .get(format!("{other}/status"))
        .call()?
        .body_mut()
        .read_json()?;
    if arrived {
        println!(
            "8. officer-2, which never connected to officer-1, serves the Patient after {:.1} s: it came through the hub, which checked officer-1's signature and certificate ({} documents on officer-2 now: the families of the shared village and central's reference data; those of officer-1's own village never reach it, being outside its scope)",
            t.elapsed().as_secs_f64(),
            st["documents"]
        );
    } else {
        println!("8. officer-2 did not receive the Patient within 60 s (status: {st})");
    }
    println!(
        "\nTry it yourself with curl, e.g. curl -s -H \"Authorization: Bearer {}\" http://{}/fhir/Patient/{id}",
        tokens.1,
        other.trim_start_matches("http://")
    );
    Ok(())
}

/// A JSON value as a person reads it: strings without their quotes.
fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}
