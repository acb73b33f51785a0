//! A node's data directory: its config file, its key and its store.
//!
//! ```text
//! DIR/fieldmesh.toml   configuration (name, role, identifier system, HTTP address, cache sizes,
//!                      the rules of business numbers)
//! DIR/node.key         the node's ed25519 secret key (32 bytes, readable by its owner only)
//! DIR/api.token        the bearer token of the local FHIR API (readable by its owner only)
//! DIR/store.redb       the document store
//! DIR/api.addr         the address of the running node's API (written at start)
//! ```

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use libp2p::identity::{Keypair, PeerId};
use serde::{Deserialize, Serialize};

/// The config file's name inside a data directory.
pub const CONFIG_FILE: &str = "fieldmesh.toml";
/// The key file's name inside a data directory.
pub const KEY_FILE: &str = "node.key";
/// The API token file's name inside a data directory.
pub const TOKEN_FILE: &str = "api.token";
/// Where a running node records the address its API listens on.
pub const ADDR_FILE: &str = "api.addr";
/// The store file's name inside a data directory.
pub const STORE_FILE: &str = "store.redb";
/// Where the local FHIR API listens unless told otherwise.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8080";

/// What a node is for. The role decides what it may author (see the trust model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The authoritative server beside openIMIS.
    Central,
    /// A store-and-forward box at a health facility or district office.
    Hub,
    /// An enrolment officer's or claim administrator's phone or laptop.
    Device,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Central => "central",
            Role::Hub => "hub",
            Role::Device => "device",
        })
    }
}

/// The contents of `fieldmesh.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// The node's name (unique in a deployment), e.g. `officer-1`.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// The identifier system of resources this node creates.
    pub system: String,
    /// The local FHIR API.
    #[serde(default)]
    pub http: HttpConfig,
    /// Store tuning.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Sync deadlines and periods.
    #[serde(default)]
    pub sync: SyncConfig,
    /// The deployment's root of trust.
    pub trust: TrustConfig,
    /// The deployment's rules for business numbers (insurance numbers, claim codes) and the
    /// size of the blocks central leases to devices. The same on every node.
    #[serde(default)]
    pub numbers: fieldmesh_engine::central::NumberConfig,
}

/// `[trust]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrustConfig {
    /// Central's peer id: the key whose certificates this node accepts.
    pub root: String,
}

/// Reads a root of trust given as a peer id (`12D3KooW…`) or a hex ed25519 key.
pub fn parse_root(text: &str) -> Result<[u8; 32]> {
    fieldmesh_trust::PeerKey::parse(text)
        .map(|k| k.0)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{:?} is not central's peer id (print it with `fieldmesh id --data CENTRAL-DIR`)",
                text.trim()
            )
        })
}

/// `[http]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpConfig {
    /// Address the FHIR API listens on; keep it on loopback unless you know why not.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_HTTP.into(),
        }
    }
}

/// `[storage]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StorageConfig {
    /// Live Automerge documents kept in memory (each costs about 20 to 35 KiB).
    pub cache_documents: usize,
    /// MiB of page cache for the store file.
    pub cache_mib: usize,
    /// Index entries and document records written to the log (and held in memory, about 130
    /// bytes each) before the commits that follow fold them into their tables, a slice each.
    /// Fewer: less memory, more folds.
    #[serde(default = "default_index_fold_entries")]
    pub index_fold_entries: usize,
}

fn default_index_fold_entries() -> usize {
    fieldmesh_storage::StoreOptions::default().fold_index_after
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            cache_documents: 256,
            cache_mib: 16,
            index_fold_entries: default_index_fold_entries(),
        }
    }
}

/// `[sync]` section: deadlines and periods of sync sessions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SyncConfig {
    /// Seconds a session waits for the peer's next frame before it ends with an error.
    pub frame_timeout_secs: u64,
    /// Seconds a session may last in all.
    pub session_timeout_secs: u64,
    /// Seconds between sessions with a connected peer when nothing changed (the cheap checkpoint
    /// path: one round trip).
    pub resync_secs: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        let l = fieldmesh_protocol::Limits::default();
        Self {
            frame_timeout_secs: l.frame / 1000,
            session_timeout_secs: l.session / 1000,
            resync_secs: l.resync / 1000,
        }
    }
}

impl SyncConfig {
    /// The scheduler's limits these settings give.
    pub fn limits(&self) -> fieldmesh_protocol::Limits {
        fieldmesh_protocol::Limits {
            frame: self.frame_timeout_secs.max(1) * 1000,
            session: self.session_timeout_secs.max(1) * 1000,
            resync: self.resync_secs.max(1) * 1000,
            ..fieldmesh_protocol::Limits::default()
        }
    }
}

/// A node's data directory, opened.
#[derive(Debug)]
pub struct DataDir {
    /// The directory.
    pub path: PathBuf,
    /// Its configuration.
    pub config: Config,
    /// The node's key (also its libp2p identity).
    pub keypair: Keypair,
}

impl DataDir {
    /// Creates a new node in `path` (which must not hold one already).
    ///
    /// `root` is central's peer id; a central node is its own root and needs none.
    pub fn init(
        path: &Path,
        name: &str,
        role: Role,
        system: Option<String>,
        root: Option<&str>,
    ) -> Result<Self> {
        if let Some(r) = root {
            parse_root(r)?;
        } else if role != Role::Central {
            bail!(
                "a {role} needs the deployment's root of trust: --root CENTRAL-PEER-ID (print it with `fieldmesh id --data CENTRAL-DIR`)"
            );
        }
        if path.join(CONFIG_FILE).exists() {
            bail!(
                "{} already holds a node ({}); choose another directory or remove it first",
                path.display(),
                CONFIG_FILE
            );
        }
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            bail!("a node name may hold letters, digits, '-', '_' and '.' only (got {name:?})");
        }
        fs::create_dir_all(path).with_context(|| format!("cannot create {}", path.display()))?;
        owner_only(path, 0o700)?;
        let keypair = Keypair::generate_ed25519();
        let secret = keypair
            .clone()
            .try_into_ed25519()
            .context("generated key is not ed25519")?
            .secret();
        write_private(&path.join(KEY_FILE), secret.as_ref())?;
        // Two random UUIDs: 244 bits from the system's randomness.
        let token = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        write_private(&path.join(TOKEN_FILE), token.as_bytes())?;
        let root = match root {
            Some(r) => PeerId::from_public_key(
                &libp2p::identity::ed25519::PublicKey::try_from_bytes(&parse_root(r)?)
                    .context("the root is not an ed25519 key")?
                    .into(),
            )
            .to_string(),
            None => keypair.public().to_peer_id().to_string(),
        };
        let config = Config {
            trust: TrustConfig { root },
            name: name.into(),
            role,
            system: system.unwrap_or_else(|| fieldmesh_fhir_docs::node_system(name)),
            http: HttpConfig::default(),
            storage: StorageConfig::default(),
            sync: SyncConfig::default(),
            numbers: fieldmesh_engine::central::NumberConfig::default(),
        };
        let text = toml::to_string_pretty(&config).context("cannot write the config")?;
        fs::write(path.join(CONFIG_FILE), text)
            .with_context(|| format!("cannot write {}", path.join(CONFIG_FILE).display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            config,
            keypair,
        })
    }

    /// Opens an existing data directory.
    pub fn open(path: &Path) -> Result<Self> {
        let cfg_path = path.join(CONFIG_FILE);
        let text = fs::read_to_string(&cfg_path).with_context(|| {
            format!(
                "{} is not a fieldmesh data directory (no {CONFIG_FILE}); create one with `fieldmesh init --data {} --role ... --name ...`",
                path.display(),
                path.display()
            )
        })?;
        let config: Config = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid config file", cfg_path.display()))?;
        let mut secret = fs::read(path.join(KEY_FILE)).with_context(|| {
            format!("cannot read the node key {}", path.join(KEY_FILE).display())
        })?;
        let keypair = Keypair::ed25519_from_bytes(&mut secret).with_context(|| {
            format!(
                "{} is not an ed25519 secret key",
                path.join(KEY_FILE).display()
            )
        })?;
        // Data directories made before this rule (or by hand) are tightened: owner only.
        owner_only(path, 0o700)?;
        Ok(Self {
            path: path.to_path_buf(),
            config,
            keypair,
        })
    }

    /// The node's libp2p peer id.
    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// The node's ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.keypair
            .public()
            .try_into_ed25519()
            .map(|k| k.to_bytes())
            .unwrap_or_default()
    }

    /// The node's ed25519 secret key.
    pub fn secret(&self) -> [u8; 32] {
        self.keypair
            .clone()
            .try_into_ed25519()
            .map(|k| {
                let mut out = [0u8; 32];
                out.copy_from_slice(k.secret().as_ref());
                out
            })
            .unwrap_or_default()
    }

    /// Central's public key, the root of trust.
    pub fn root_key(&self) -> Result<[u8; 32]> {
        parse_root(&self.config.trust.root)
            .with_context(|| format!("trust.root in {}", self.path.join(CONFIG_FILE).display()))
    }

    /// The bearer token of the local API.
    pub fn token(&self) -> Result<String> {
        let path = self.path.join(TOKEN_FILE);
        let t = fs::read_to_string(&path)
            .with_context(|| format!("cannot read the API token {}", path.display()))?;
        Ok(t.trim().to_string())
    }

    /// The address of the API of the node running on this directory (recorded at its start),
    /// or the configured one.
    pub fn api_addr(&self) -> String {
        fs::read_to_string(self.path.join(ADDR_FILE))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| self.config.http.listen.clone())
    }

    /// The store file.
    pub fn store_path(&self) -> PathBuf {
        self.path.join(STORE_FILE)
    }
}

/// Makes `path` (the data directory, the store) accessible to its owner only (`mode`, on Unix),
/// if it is not already: it holds the personal data of insurees.
pub fn owner_only(path: &Path, mode: u32) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let current = fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .permissions()
            .mode();
        if current & 0o077 != 0 {
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .with_context(|| format!("cannot restrict {} to its owner", path.display()))?;
        }
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}
