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
        /// Central's peer id, the deployment's root of trust (required for hubs and devices; a
        /// central node is its own root). Print it with `fieldmesh id --data CENTRAL-DIR`.
        #[arg(long, value_name = "PEER-ID")]
        root: Option<String>,
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
        /// Test hook: skip the check of local writes against this node's own certificate, to
        /// play a modified (byzantine) device. Its peers still refuse what it may not write.
        #[arg(long, hide = true)]
        byzantine: bool,
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
    /// Print the bearer token of the node's local API (apps send `Authorization: Bearer <token>`).
    Token {
        /// The node's data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
    },
    /// List the changes this node refused (kept, never applied, never forwarded), with why.
    Quarantine {
        /// The node's data directory (the node may be running: then its API is asked).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Certificates: who may write what, where.
    ///
    /// The flow: central issues a certificate for a device's key (`cert issue` on central, with
    /// the device's peer id from `fieldmesh id`), the certificate file is carried to the device
    /// and installed there (`cert install`); from then on it syncs to every node like any
    /// document. A lost or stolen device is revoked on central (`cert revoke`); the revocation
    /// syncs too, and changes the device makes after it has seen it are refused everywhere.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Demo deployments and synthetic data.
    #[command(subcommand)]
    Demo(DemoCommand),
}

#[derive(Subcommand)]
enum CertCommand {
    /// On central: sign a certificate for a device and write it to a file to install there.
    ///
    /// Roles: central, hub, enrolment-officer (needs --location), claim-administrator (needs
    /// --facility). Central must be stopped for its store to hold the certificate too; if it is
    /// running, the certificate still reaches it when the device syncs.
    Issue {
        /// Central's data directory (its key signs).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The device's peer id (`fieldmesh id --data DEVICE-DIR`).
        #[arg(long, value_name = "PEER-ID")]
        subject: String,
        /// The user it is for (Practitioner code, e.g. EO0001).
        #[arg(long)]
        user: String,
        /// Role (repeatable).
        #[arg(long, required = true, value_parser = parse_role)]
        role: Vec<fieldmesh_fhir_docs::trust::Role>,
        /// A village the officer works in: Location code or UUID (repeatable).
        #[arg(long, value_name = "CODE-OR-UUID")]
        location: Vec<String>,
        /// The facility of a claim administrator: Organization code or UUID (repeatable).
        #[arg(long, value_name = "CODE-OR-UUID")]
        facility: Vec<String>,
        /// Days of validity.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Certificate file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// On a device: install its certificate file (the node must be stopped).
    Install {
        /// The device's data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The file from `cert issue`.
        file: PathBuf,
    },
    /// On central: revoke every certificate of a device (the node must be stopped).
    Revoke {
        /// Central's data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The device's peer id.
        #[arg(long, value_name = "PEER-ID")]
        subject: String,
        /// Why, in words (shown wherever its changes are refused).
        #[arg(long, default_value = "revoked by central")]
        reason: String,
    },
    /// Show this node's certificate, or every certificate and revocation it knows (the node must
    /// be stopped).
    Show {
        /// The node's data directory.
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// Every certificate and revocation, not only this node's.
        #[arg(long)]
        all: bool,
    },
}

fn parse_role(s: &str) -> Result<fieldmesh_fhir_docs::trust::Role, String> {
    fieldmesh_fhir_docs::trust::Role::parse(s)
        .ok_or_else(|| "roles are central, hub, enrolment-officer, claim-administrator".to_string())
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
        /// What to write: all, reference (central's data), enrolment (families, insurees,
        /// policies: an officer's) or claims (a claim administrator's).
        #[arg(long, default_value = "all", value_parser = ["all", "reference", "enrolment", "claims"])]
        part: String,
        /// Place families only in these villages (codes such as R1D0W0V0, comma-separated).
        #[arg(long, value_delimiter = ',')]
        villages: Vec<String>,
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
            root,
        } => {
            let dir = DataDir::init(&data, &name, role, system, root.as_deref())?;
            println!("created {} node {:?} in {}", role, name, data.display());
            println!("peer id: {}", dir.peer_id());
            println!("identifier system: {}", dir.config.system);
            if role == Role::Central {
                println!(
                    "this node is the root of trust; give hubs and devices --root {}",
                    dir.peer_id()
                );
            } else {
                println!(
                    "it can write and sync once it holds a certificate: on central, `fieldmesh cert issue --subject {} ...`, then `fieldmesh cert install --data {} FILE`",
                    dir.peer_id(),
                    data.display()
                );
            }
            println!("API token: fieldmesh token --data {}", data.display());
            println!("start it with: fieldmesh run --data {}", data.display());
            Ok(())
        }
        Command::Token { data } => {
            println!("{}", DataDir::open(&data)?.token()?);
            Ok(())
        }
        Command::Quarantine { data, limit } => cmd_quarantine(&data, limit),
        Command::Cert(c) => cmd_cert(c),
        Command::Run {
            data,
            http,
            listen,
            peer,
            no_mdns,
            byzantine,
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
            let options = node::RunOptions { byzantine };
            runtime()?.block_on(node::run_with(dir, http, net, options))
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
            part,
            villages,
        }) => {
            let f = std::fs::File::create(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
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
        Command::Demo(DemoCommand::Run {
            out,
            families,
            serve,
        }) => demo_run(&out, families, serve),
    }
}

fn cmd_quarantine(data: &Path, limit: usize) -> Result<()> {
    let dir = DataDir::open(data)?;
    let items: Vec<(String, String)> =
        match RedbStore::open(dir.store_path(), StoreOptions::default()) {
            Ok(store) => {
                use fieldmesh_storage::Store as _;
                store
                    .quarantined(limit)?
                    .into_iter()
                    .map(|q| (q.reason, q.from))
                    .collect()
            }
            Err(fieldmesh_storage::StoreError::InUse(_)) => {
                // The node is running: ask its API.
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into();
                let mut r = agent
                    .get(format!("http://{}/quarantine", dir.api_addr()))
                    .header("Authorization", format!("Bearer {}", dir.token()?))
                    .call()
                    .context("the node is running but its API does not answer")?;
                let v: Value = r.body_mut().read_json()?;
                v["changes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .take(limit)
                    .map(|c| {
                        (
                            c["reason"].as_str().unwrap_or_default().to_string(),
                            c["from"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            }
            Err(e) => return Err(e.into()),
        };
    if items.is_empty() {
        println!("{}: nothing in quarantine", dir.config.name);
    } else {
        println!(
            "{}: {} refused change(s), kept but never applied or forwarded:",
            dir.config.name,
            items.len()
        );
        for (reason, from) in items {
            println!("  {reason}\n      from {from}");
        }
    }
    Ok(())
}

fn cmd_cert(cmd: CertCommand) -> Result<()> {
    use fieldmesh_node::certs;
    match cmd {
        CertCommand::Issue {
            data,
            subject,
            user,
            role,
            location,
            facility,
            days,
            out,
        } => {
            let central = DataDir::open(&data)?;
            let file = certs::issue(
                &central,
                &certs::IssueRequest {
                    subject,
                    user,
                    roles: role,
                    locations: location,
                    facilities: facility,
                    days,
                },
            )?;
            std::fs::write(&out, serde_json::to_vec_pretty(&file)?)
                .with_context(|| format!("cannot write {}", out.display()))?;
            println!("issued: {}", certs::describe(&file.certificate));
            match node::open_engine(&central) {
                Ok(mut engine) => {
                    certs::install(&mut engine, &file, "cert issue")?;
                    println!("central holds it and will sync it to every node");
                }
                Err(e)
                    if matches!(
                        e.downcast_ref::<fieldmesh_storage::StoreError>(),
                        Some(fieldmesh_storage::StoreError::InUse(_))
                    ) =>
                {
                    println!(
                        "central is running; it receives the certificate when the device syncs"
                    )
                }
                Err(e) => {
                    return Err(e.context(
                        "the certificate file is written, but central's store could not take it",
                    ));
                }
            }
            println!(
                "install it on the device: fieldmesh cert install --data DEVICE-DIR {}",
                out.display()
            );
            Ok(())
        }
        CertCommand::Install { data, file } => {
            let dir = DataDir::open(&data)?;
            let cert_file = certs::read_file(&file)?;
            let mut engine = node::open_engine(&dir)?;
            let cert = certs::install(
                &mut engine,
                &cert_file,
                &format!("certificate file {}", file.display()),
            )?;
            println!("installed: {}", certs::describe(&cert));
            if cert.subject != hex::encode(dir.public_key()) {
                println!(
                    "note: this certificate is for another device ({}); this node keeps it and passes it on",
                    certs::short_peer(&cert.subject)
                );
            }
            Ok(())
        }
        CertCommand::Revoke {
            data,
            subject,
            reason,
        } => {
            let central = DataDir::open(&data)?;
            if central.root_key()? != central.public_key() {
                bail!("revocations are issued on central, the root of trust");
            }
            let mut engine = node::open_engine(&central)?;
            let rev = certs::revoke(&mut engine, &central, &subject, &reason)?;
            println!(
                "revocation #{} of {subject} recorded; it reaches every node with the next syncs",
                rev.number
            );
            Ok(())
        }
        CertCommand::Show { data, all } => {
            let dir = DataDir::open(&data)?;
            let engine = node::open_engine(&dir)?;
            let trust = engine.trust();
            println!("root of trust (central): {}", dir.config.trust.root);
            let me = dir.public_key();
            if *trust.root() == me {
                println!("this node is central, the root of trust");
            }
            let mine = trust.certificates(&me);
            if mine.is_empty() && *trust.root() != me {
                println!(
                    "this node ({}) has no certificate: it can neither write nor be served",
                    dir.peer_id()
                );
            }
            for c in mine {
                println!("this node: {}", certs::describe(c));
            }
            if let Some(r) = trust.revoked(&me, u32::MAX) {
                println!("REVOKED (#{}): {}", r.number, r.reason);
            }
            if all {
                let (certs_all, revs) = trust.all();
                println!("{} certificate(s):", certs_all.len());
                for c in certs_all {
                    println!("  {}", certs::describe(c));
                }
                println!("{} revocation(s):", revs.len());
                for r in revs {
                    println!(
                        "  #{} {}: {}",
                        r.number,
                        certs::short_peer(&r.subject),
                        r.reason
                    );
                }
            }
            Ok(())
        }
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
/// The demo data's seed: the villages in the officers' certificates are those of this seed.
const DEMO_SEED: u64 = 1;

/// The certificate of each demo node: roles, villages (indexes into the demo villages),
/// facilities (indexes into the demo facilities).
fn demo_grant(
    name: &str,
) -> (
    Vec<fieldmesh_fhir_docs::trust::Role>,
    Vec<usize>,
    Vec<usize>,
) {
    use fieldmesh_fhir_docs::trust::Role as R;
    match name {
        "central" => (vec![R::Central], vec![], vec![]),
        "hub" => (vec![R::Hub], vec![], vec![]),
        // One team: a shared village and one of their own each.
        "officer-1" => (vec![R::EnrolmentOfficer], vec![0, 1], vec![]),
        "officer-2" => (vec![R::EnrolmentOfficer], vec![0, 2], vec![]),
        _ => (vec![R::ClaimAdministrator], vec![], vec![0]),
    }
}

/// Creates the demo deployment in `out` and writes `deployment.json`: central (the root of
/// trust), a hub, two enrolment officers of one team and a claim administrator, each with the
/// certificate central issued for it. Every node holds every certificate, as if provisioned at
/// central.
fn setup(out: &Path) -> Result<Value> {
    use fieldmesh_node::certs;
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
    let rt = runtime()?;
    rt.block_on(async move {
        // The demo stays on this machine: loopback only, no LAN discovery. Central and the two
        // officers know only the hub; the officers never connect to each other.
        let net = |listen: &libp2p::Multiaddr, peers: Vec<libp2p::Multiaddr>| fieldmesh_node::net::NetConfig {
            listen: vec![listen.clone()],
            relay_server: peers.is_empty(), // the hub
            peers,
            mdns: false,
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
        status["name"], status["role"], status["documents"], status["peer_id"]
    );
    let r = agent
        .get(format!("{base}/fhir/Patient?identifier=1"))
        .call()?;
    println!(
        "   GET /fhir/Patient without the API token → {} (apps of the device's user send `Authorization: Bearer <token>`)",
        r.status()
    );

    let ig = "https://openimis.github.io/openimis_fhir_r4_ig";
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
        "3. GET /fhir/Patient?identifier=9876543210 → {} with {} match",
        bundle["type"], bundle["total"]
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
        created["meta"]["versionId"],
        after["meta"]["versionId"]
    );

    let mut r = agent
        .post(format!("{base}/fhir/Patient"))
        .header("Authorization", &auth1)
        .send_json(json!({"resourceType": "Patient", "name": [{"family": "X"}], "birthDate": "1990-13-40"}))?;
    let oo: Value = r.body_mut().read_json()?;
    println!(
        "5. POST of an invalid Patient → {}: {}",
        r.status(),
        oo["issue"][0]["diagnostics"]
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
        oo["issue"][0]["diagnostics"]
    );
    let mut r = agent
        .post(format!("{base}/fhir/Location"))
        .header("Authorization", &auth1)
        .send_json(json!({"resourceType": "Location", "name": "A village of my own"}))?;
    let oo: Value = r.body_mut().read_json()?;
    println!(
        "7. POST of a Location (reference data, central's alone) → {}: {}",
        r.status(),
        oo["issue"][0]["diagnostics"]
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
            "8. officer-2, which never connected to officer-1, serves the Patient after {:.1} s: it came through the hub, which checked officer-1's signature and certificate ({} documents on officer-2 now, with central's reference data)",
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
