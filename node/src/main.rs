//! `fieldmesh`: one binary for every role (central, hub, device).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use fieldmesh_node::config::{CONFIG_FILE, DataDir, Role};
use fieldmesh_node::{demo, load, node};
use fieldmesh_storage::{RedbStore, StoreOptions};
use serde_json::{Value, json};

/// mimalloc: Automerge and JSON handling allocate many small objects; glibc's allocator spent a
/// quarter of `fieldmesh load` in malloc/free and fragmented the heap.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// fieldmesh keeps openIMIS working where the network does not: every device holds FHIR resources
/// as Automerge documents and syncs them peer to peer.
#[derive(Parser)]
#[command(name = "fieldmesh", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a node: a data directory with its key, config and empty store.
    Init {
        /// Data directory to create.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// What the node is for.
        #[arg(long)]
        role: Role,
        /// The node's name, unique in the deployment (letters, digits, '-', '_', '.').
        #[arg(long)]
        name: String,
        /// Identifier system for resources this node creates [default: urn:fieldmesh:node:<name>].
        #[arg(long)]
        system: Option<String>,
    },
    /// Run a node: serve the local FHIR API until Ctrl-C.
    Run {
        /// The node's data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Address of the FHIR API [default: http.listen from the config, 127.0.0.1:8080].
        #[arg(long, value_name = "ADDR")]
        http: Option<SocketAddr>,
        /// libp2p address to listen on (repeatable) [default: /ip4/0.0.0.0/tcp/0 and
        /// /ip4/0.0.0.0/udp/0/quic-v1]. A device behind NAT can also listen through a hub
        /// that relays: /ip4/HUB-IP/tcp/PORT/p2p/HUB-ID/p2p-circuit.
        #[arg(long, value_name = "MULTIADDR")]
        listen: Vec<libp2p::Multiaddr>,
        /// A peer to connect to and keep reconnecting to (repeatable), e.g.
        /// /ip4/10.0.0.2/tcp/4040/p2p/12D3KooW...
        #[arg(long, value_name = "MULTIADDR")]
        peer: Vec<libp2p::Multiaddr>,
        /// Do not discover peers on the LAN with mDNS.
        #[arg(long)]
        no_mdns: bool,
    },
    /// Load FHIR JSON, Bundles or NDJSON files as local writes (the node must not be running).
    Load {
        /// The node's data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Files to load: .json (a resource or a Bundle) or .ndjson (one resource per line).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Do not compact the store file afterwards.
        #[arg(long)]
        no_compact: bool,
    },
    /// Print the node's peer id.
    Id {
        /// The node's data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
    },
    /// Print a stopped node's counters and check its store (indexes against documents).
    Check {
        /// The node's data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
    },
    /// Rewrite the store file without free space (the node must not be running).
    Compact {
        /// The node's data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
    },
    /// Demo deployments and synthetic data.
    #[command(subcommand)]
    Demo(DemoCommand),
}

#[derive(Subcommand)]
enum DemoCommand {
    /// Create a local deployment (central, hub, officer-1, officer-2, claims-1) and deployment.json.
    Setup {
        /// Directory to create it in.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Write synthetic openIMIS data (families, insurees, policies, claims) as NDJSON.
    Generate {
        /// Random seed: the same seed gives the same file.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Number of families (about 4 insurees each, a policy each, a claim for every third).
        #[arg(long, default_value_t = 100)]
        families: u64,
        /// Output file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Set up a deployment, load data into officer-1 and walk through the FHIR API.
    Run {
        /// Directory of the deployment (created if missing).
        #[arg(long, value_name = "DIR", default_value = "fieldmesh-demo")]
        out: PathBuf,
        /// Families to generate for officer-1.
        #[arg(long, default_value_t = 200)]
        families: u64,
        /// Keep officer-1 running afterwards so you can try the API yourself.
        #[arg(long)]
        serve: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Run { .. } | Command::Demo(DemoCommand::Run { .. }) => "info",
        _ => "warn",
    };
    // Automerge opens a tracing span per load; formatting them costs more than the load.
    let default_level = format!("{default_level},automerge=warn");
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = dispatch(cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn dispatch(cmd: Command) -> Result<()> {
    match cmd {
        Command::Init {
            data,
            role,
            name,
            system,
        } => {
            let dir = DataDir::init(&data, &name, role, system)?;
            println!("created {} node {:?} in {}", role, name, data.display());
            println!("peer id: {}", dir.peer_id());
            println!("identifier system: {}", dir.config.system);
            println!("start it with: fieldmesh run --data {}", data.display());
            Ok(())
        }
        Command::Run {
            data,
            http,
            listen,
            peer,
            no_mdns,
        } => {
            let dir = DataDir::open(&data)?;
            let listen = if listen.is_empty() {
                vec![
                    "/ip4/0.0.0.0/tcp/0".parse()?,
                    "/ip4/0.0.0.0/udp/0/quic-v1".parse()?,
                ]
            } else {
                listen
            };
            let net = fieldmesh_node::net::NetConfig {
                listen,
                peers: peer,
                mdns: !no_mdns,
                relay_server: matches!(dir.config.role, Role::Hub | Role::Central),
            };
            runtime()?.block_on(node::run(dir, http, net))
        }
        Command::Load {
            data,
            files,
            no_compact,
        } => cmd_load(&data, &files, !no_compact),
        Command::Id { data } => {
            println!("{}", DataDir::open(&data)?.peer_id());
            Ok(())
        }
        Command::Check { data } => {
            let dir = DataDir::open(&data)?;
            let mut engine = node::open_engine(&dir)?;
            let stats = engine.stats()?;
            let problems = engine.verify()?;
            drop(engine);
            let store = RedbStore::open(dir.store_path(), StoreOptions::default())?;
            println!(
                "{:<12} {:>9} {:>12} {:>12} {:>12}",
                "table", "entries", "stored B", "metadata B", "fragment B"
            );
            for (name, s) in store.table_sizes()? {
                println!(
                    "{name:<12} {:>9} {:>12} {:>12} {:>12}",
                    s.entries, s.stored, s.metadata, s.fragmented
                );
            }
            println!(
                "{}: {} documents, {} quarantined, last sequence {}",
                dir.config.name, stats.documents, stats.quarantined, stats.last_seq
            );
            if problems.is_empty() {
                println!("store is consistent");
                Ok(())
            } else {
                bail!("store problems: {}", problems.join("; "))
            }
        }
        Command::Compact { data } => {
            let dir = DataDir::open(&data)?;
            compact(&dir)
        }
        Command::Demo(DemoCommand::Setup { out }) => {
            setup(&out)?;
            println!(
                "deployment written to {}",
                out.join("deployment.json").display()
            );
            Ok(())
        }
        Command::Demo(DemoCommand::Generate {
            seed,
            families,
            out,
        }) => {
            let f = std::fs::File::create(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            let mut w = std::io::BufWriter::new(f);
            let n = demo::generate(seed, families, &mut w)?;
            w.flush()?;
            println!(
                "wrote {n} resources ({families} families, seed {seed}) to {}",
                out.display()
            );
            Ok(())
        }
        Command::Demo(DemoCommand::Run {
            out,
            families,
            serve,
        }) => demo_run(&out, families, serve),
    }
}

fn compact(dir: &DataDir) -> Result<()> {
    let path = dir.store_path();
    let before = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let mut store = RedbStore::open(&path, StoreOptions::default())?;
    while store.compact()? {}
    drop(store);
    let after = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!(
        "store compacted: {:.1} MB → {:.1} MB",
        before as f64 / 1e6,
        after as f64 / 1e6
    );
    Ok(())
}

fn cmd_load(data: &Path, files: &[PathBuf], compact_after: bool) -> Result<()> {
    let dir = DataDir::open(data)?;
    let mut engine = node::open_engine(&dir)?;
    let summary = load::load_files(&mut engine, files, true)?;
    let stats = engine.stats()?;
    drop(engine);
    println!(
        "loaded {} resources in {:.1} s ({:.0}/s, {:.1} s of it waiting for commits); rejected {}; the store now holds {} documents",
        summary.loaded,
        summary.seconds,
        summary.loaded as f64 / summary.seconds.max(1e-9),
        summary.commit_seconds,
        summary.rejected.len(),
        stats.documents
    );
    for (at, why) in summary.rejected.iter().take(20) {
        println!("  rejected {at}: {why}");
    }
    if summary.rejected.len() > 20 {
        println!("  … and {} more", summary.rejected.len() - 20);
    }
    if compact_after && summary.loaded > 0 {
        compact(&dir)?;
    }
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

/// Creates the demo deployment in `out` and writes `deployment.json`.
fn setup(out: &Path) -> Result<Value> {
    if out.join("deployment.json").exists() {
        bail!(
            "{} already holds a deployment; remove it or choose another directory",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut nodes = Vec::new();
    for (i, (name, role)) in DEMO_NODES.iter().enumerate() {
        let data = out.join(name);
        let mut dir = DataDir::init(&data, name, *role, None)?;
        let http = format!("127.0.0.1:{}", DEMO_FIRST_PORT + i as u16);
        dir.config.http.listen = http.clone();
        std::fs::write(data.join(CONFIG_FILE), toml::to_string_pretty(&dir.config)?)?;
        nodes.push(json!({
            "name": name,
            "role": role.to_string(),
            "data_dir": std::fs::canonicalize(&data)?.display().to_string(),
            "system": dir.config.system,
            "peer_id": dir.peer_id().to_string(),
            "http": http,
            "scope": {},
        }));
    }
    let deployment = json!({"nodes": nodes});
    std::fs::write(
        out.join("deployment.json"),
        serde_json::to_string_pretty(&deployment)?,
    )?;
    Ok(deployment)
}

fn demo_run(out: &Path, families: u64, serve: bool) -> Result<()> {
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
    let (hub, officer1, officer2) = (
        node_dir("hub")?,
        node_dir("officer-1")?,
        node_dir("officer-2")?,
    );
    {
        let mut engine = node::open_engine(&officer1)?;
        if engine.stats()?.documents == 0 {
            let file = out.join("officer-1-families.ndjson");
            let mut w = std::io::BufWriter::new(std::fs::File::create(&file)?);
            let n = demo::generate(1, families, &mut w)?;
            w.flush()?;
            drop(w);
            let s = load::load_files(&mut engine, &[&file], true)?;
            println!(
                "officer-1: generated {n} resources ({families} families) and loaded {} in {:.1} s",
                s.loaded, s.seconds
            );
        }
    }
    let addr1: SocketAddr = officer1.config.http.listen.parse()?;
    let addr2: SocketAddr = officer2.config.http.listen.parse()?;
    let hub_p2p: libp2p::Multiaddr =
        format!("/ip4/127.0.0.1/tcp/{}", DEMO_FIRST_PORT + 1000).parse()?;
    let rt = runtime()?;
    rt.block_on(async move {
        // The demo stays on this machine: loopback only, no LAN discovery. The two officers
        // know only the hub; neither ever connects to the other.
        let net = |listen: &libp2p::Multiaddr, peers: Vec<libp2p::Multiaddr>| fieldmesh_node::net::NetConfig {
            listen: vec![listen.clone()],
            relay_server: peers.is_empty(), // the hub
            peers,
            mdns: false,
        };
        let any: libp2p::Multiaddr = "/ip4/127.0.0.1/tcp/0".parse()?;
        let hub_http: SocketAddr = hub.config.http.listen.parse()?;
        let nodes = vec![
            tokio::spawn(node::run(hub, Some(hub_http), net(&hub_p2p, vec![]))),
            tokio::spawn(node::run(officer1, Some(addr1), net(&any, vec![hub_p2p.clone()]))),
            tokio::spawn(node::run(officer2, Some(addr2), net(&any, vec![hub_p2p.clone()]))),
        ];
        let (b1, b2) = (format!("http://{addr1}"), format!("http://{addr2}"));
        let walk = tokio::task::spawn_blocking(move || walkthrough(&b1, &b2)).await?;
        if let Err(e) = walk {
            eprintln!("demo walk-through failed: {e:#}");
        }
        if serve {
            println!("\nhub, officer-1 (http://{addr1}/fhir/) and officer-2 (http://{addr2}/fhir/) keep running — press Ctrl-C to stop.");
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

fn walkthrough(base: &str, other: &str) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
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
        status["name"], status["role"], status["documents"], status["peer_id"]
    );

    let patient = json!({"resourceType": "Patient",
        "identifier": [{"type": {"coding": [{"system": "https://openimis.github.io/openimis_fhir_r4_ig/CodeSystem/openimis-identifiers", "code": "Code"}]}, "value": "9876543210"}],
        "name": [{"use": "usual", "family": "Maïga", "given": ["Aïssatou", "عائشة"]}],
        "gender": "female", "birthDate": "1994-03-12",
        "extension": [{"url": "https://openimis.github.io/openimis_fhir_r4_ig/StructureDefinition/patient-is-head", "valueBoolean": true}],
        "generalPractitioner": [{"reference": "Organization/HF000"}]});
    let mut r = agent
        .post(format!("{base}/fhir/Patient"))
        .header("Content-Type", "application/fhir+json")
        .send_json(&patient)?;
    let location = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let created: Value = r.body_mut().read_json()?;
    let id = created["id"].as_str().unwrap_or_default().to_string();
    println!(
        "2. POST /fhir/Patient → {} Location: {location}",
        r.status()
    );
    println!("   its identifiers: {}", created["identifier"]);
    println!(
        "   `Organization/HF000` (an openIMIS code reference) was stored as a logical reference and is served as {}",
        created["generalPractitioner"][0]["reference"]
    );

    let mut r = agent
        .get(format!("{base}/fhir/Patient?identifier=9876543210"))
        .call()?;
    let bundle: Value = r.body_mut().read_json()?;
    println!(
        "3. GET /fhir/Patient?identifier=9876543210 → {} with {} match",
        bundle["type"], bundle["total"]
    );

    let mut updated = created.clone();
    updated["telecom"] = json!([{"system": "phone", "value": "+227 96 12 34 56"}]);
    let mut r = agent
        .put(format!("{base}/fhir/Patient/{id}"))
        .send_json(&updated)?;
    let etag = r
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let after: Value = r.body_mut().read_json()?;
    println!(
        "4. PUT adds a phone number → {} version {} → {} (ETag {etag}); only the changed field became an Automerge edit",
        r.status(),
        created["meta"]["versionId"],
        after["meta"]["versionId"]
    );

    let mut r = agent
        .get(format!("{base}/fhir/Patient/{id}/$automerge"))
        .call()?;
    let bytes = r.body_mut().read_to_vec()?;
    println!(
        "5. GET /fhir/Patient/{id}/$automerge → {} bytes of Automerge document",
        bytes.len()
    );

    let mut r = agent.post(format!("{base}/fhir/Patient")).send_json(
        json!({"resourceType": "Patient", "name": [{"family": "X"}], "birthDate": "1990-13-40"}),
    )?;
    let oo: Value = r.body_mut().read_json()?;
    println!(
        "6. POST of an invalid Patient → {}: {}",
        r.status(),
        oo["issue"][0]["diagnostics"]
    );
    let t = std::time::Instant::now();
    let mut arrived = false;
    while t.elapsed() < std::time::Duration::from_secs(60) {
        if agent
            .get(format!("{other}/fhir/Patient/{id}"))
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
            "7. officer-2, which never connected to officer-1, serves the Patient after {:.1} s: it came through the hub ({} documents there now)",
            t.elapsed().as_secs_f64(),
            st["documents"]
        );
    } else {
        println!("7. officer-2 did not receive the Patient within 60 s (status: {st})");
    }
    println!(
        "\nTry it yourself with curl, e.g. curl -s http://{}/fhir/Patient/{id}",
        other.trim_start_matches("http://")
    );
    Ok(())
}
