//! `fieldmesh`: one binary for every role (central, hub, device). This file is the command tree
//! and its dispatch; each command is a file under `cli/`.

mod cli;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use fieldmesh_node::config::Role;

/// mimalloc: Automerge and JSON handling allocate many small objects; glibc's allocator spent a
/// quarter of `fieldmesh load` in malloc/free and fragmented the heap. Version 3 (the default):
/// version 2 gave a hub's first sync of 100k resources a lower peak (124–131 MB against 144–162
/// MB: version 3 keeps freed pages for a second), but kept 171 MB after central's services had
/// worked through 158k loaded resources, where version 3 gave back all but 114 MB.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long mimalloc keeps freed pages before it gives them back to the system, in
/// milliseconds (its default: 1,000). A first sync frees and allocates fast on every core, and
/// with a second's delay the freed pages pile up: a hub's peak resident memory was 169 MB
/// receiving 10k resources and 162–172 MB receiving 100k; with 100 ms, 122–132 MB and 129–147 MB, for
/// about 5–10 % more CPU (ARCHITECTURE.md, "Sync"). `MIMALLOC_PURGE_DELAY` (or its older name
/// `MIMALLOC_RESET_DELAY`) in the environment overrides it.
const PURGE_DELAY_MS: std::ffi::c_long = 100;

/// Sets mimalloc's purge delay ([`PURGE_DELAY_MS`]) unless the environment gives one.
#[allow(unsafe_code)]
fn tune_allocator() {
    /// `mi_option_purge_delay` in mimalloc 3's `mi_option_t` (`libmimalloc-sys` names only some
    /// of the options).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // mimalloc also reads the option under its older name.
    if ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]
        .iter()
        .all(|name| std::env::var_os(name).is_none())
    {
        // SAFETY: `mi_option_set` only stores an integer option, but is not thread-safe: this
        // runs first in `main`, before this process starts any thread.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
}

/// Gives the memory mimalloc holds freed back to the system: the engine thread calls it once
/// it has folded the deferred writes while idle
/// ([`fieldmesh_node::engine_thread::set_release_memory`]).
#[allow(unsafe_code)]
fn release_freed_memory() {
    // SAFETY: `mi_collect` takes no pointer and frees only what mimalloc holds unused; it may
    // be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Turns transparent huge pages off for this process (Linux), unless `MIMALLOC_ALLOW_THP` in the
/// environment decides. mimalloc asks the kernel for huge pages on the memory it maps, and each
/// page it touches is then a whole 2 MiB zeroed page, given back and zeroed again as the heap
/// breathes: a hub receiving 100k resources peaked at 134 MB with them and 95–98 MB without,
/// and zeroing pages was 3.5 % of its CPU. Phones run with little memory.
#[allow(unsafe_code)]
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: `prctl(PR_SET_THP_DISABLE)` takes integers and sets a flag of this process;
        // a kernel without it answers an error, which changes nothing.
        let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

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
    /// Rebuild a damaged store from what can still be read (the node must not be running): every
    /// readable document is checked again and kept, the damaged file is set aside, and what was
    /// lost comes back from peers at the next sync.
    Salvage {
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
    /// Roles: central, hub (--location names its area: districts or wards), enrolment-officer
    /// (needs --location: its villages), claim-administrator (needs --facility; --location names
    /// the catchment villages whose insurees it checks coverage of). A device holds and is sent
    /// only the documents of those places (and everything below them) and reference data.
    /// Central must be stopped for its store to hold the certificate too; if it is running, the
    /// certificate still reaches it when the device syncs.
    ///
    /// A device's newest certificate supersedes its earlier ones: to move an officer to other
    /// villages, issue a new one with --renewal.
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
        role: Vec<fieldmesh_trust::Role>,
        /// A place: a village of an officer, the area (district, ward) of a hub, a catchment
        /// village of a claim administrator: Location code or UUID (repeatable).
        #[arg(long, value_name = "CODE-OR-UUID")]
        location: Vec<String>,
        /// The facility of a claim administrator: Organization code or UUID (repeatable).
        #[arg(long, value_name = "CODE-OR-UUID")]
        facility: Vec<String>,
        /// Days of validity.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// A renewal or re-scoping of a device that already holds a certificate: it counts from
        /// now (a first certificate counts from an hour ago, a margin for a slow clock), so that
        /// what the device wrote before stays judged by its earlier certificate, and what it
        /// writes from now on by this one. Data of places no longer in scope leave the device
        /// once a hub or central holds every change of them.
        #[arg(long)]
        renewal: bool,
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

fn parse_role(s: &str) -> Result<fieldmesh_trust::Role, String> {
    fieldmesh_trust::Role::parse(s)
        .ok_or_else(|| "roles are central, hub, enrolment-officer, claim-administrator".to_string())
}

#[derive(Subcommand)]
enum DemoCommand {
    /// Create a local deployment (central, hub, officer-1, officer-2, claims-1) and deployment.json.
    Setup {
        /// Directory to create it in.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// HTTP port of the first node (central); each node takes the next, its libp2p port
        /// 1000 above.
        #[arg(long, default_value_t = cli::demo::DEMO_FIRST_PORT)]
        port: u16,
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
    /// A day in the field: set up a deployment (central, hub, two enrolment officers, a claim
    /// administrator), load data, and run every node as a process of its own on loopback
    /// through the day, printing what happens at each step.
    Run {
        /// Directory of the deployment (created if missing).
        #[arg(long, value_name = "DIR", default_value = "fieldmesh-demo")]
        out: PathBuf,
        /// Families to generate for officer-1.
        #[arg(long, default_value_t = 200)]
        families: u64,
        /// Keep the nodes running afterwards so you can try the API yourself.
        #[arg(long)]
        serve: bool,
        /// HTTP port of the first node when the deployment is created (see `demo setup`).
        #[arg(long, default_value_t = cli::demo::DEMO_FIRST_PORT)]
        port: u16,
    },
}

fn main() {
    tune_allocator();
    no_huge_pages();
    fieldmesh_node::engine_thread::set_release_memory(release_freed_memory);
    // redb panics on a damaged page of the store; the store turns that into an error and logs
    // it (`storage/src/redb_store.rs`), so the default report with its backtrace would only
    // frighten the person reading the output.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.location().is_some_and(|l| l.file().contains("/redb-")) {
            default_hook(info);
        }
    }));
    let cli = Cli::parse();
    if let Err(e) = cli::logging(&cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    if let Err(e) = dispatch(cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Init {
            data,
            role,
            name,
            system,
            root,
        } => cli::init::run(&data, role, &name, system, root.as_deref()),
        Command::Token { data } => cli::keys::token(&data),
        Command::Id { data } => cli::keys::id(&data),
        Command::Quarantine { data, limit } => cli::quarantine::run(&data, limit),
        Command::Cert(c) => cli::cert::run(c),
        Command::Run {
            data,
            http,
            listen,
            peer,
            no_mdns,
            byzantine,
        } => cli::run::run(&data, http, listen, peer, no_mdns, byzantine),
        Command::Load {
            data,
            files,
            no_compact,
        } => cli::load::run(&data, &files, !no_compact),
        Command::Check { data } => cli::check::run(&data),
        Command::Compact { data } => cli::compact::run(&data),
        Command::Salvage { data } => cli::salvage::run(&data),
        Command::Demo(DemoCommand::Setup { out, port }) => cli::demo::setup_command(&out, port),
        Command::Demo(DemoCommand::Generate {
            seed,
            families,
            out,
            part,
            villages,
        }) => cli::demo::generate(seed, families, &out, &part, villages),
        Command::Demo(DemoCommand::Run {
            out,
            families,
            serve,
            port,
        }) => cli::demo::run(&out, families, serve, port),
    }
}
