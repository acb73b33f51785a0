//! A node's data directory: its config file, its key and its store.
//!
//! ```text
//! DIR/fieldmesh.toml   configuration (name, role, identifier system, HTTP address, cache sizes)
//! DIR/node.key         the node's ed25519 secret key (32 bytes, readable by its owner only)
//! DIR/store.redb       the document store
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
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            cache_documents: 256,
            cache_mib: 16,
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
    pub fn init(path: &Path, name: &str, role: Role, system: Option<String>) -> Result<Self> {
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
        let keypair = Keypair::generate_ed25519();
        let secret = keypair
            .clone()
            .try_into_ed25519()
            .context("generated key is not ed25519")?
            .secret();
        write_private(&path.join(KEY_FILE), secret.as_ref())?;
        let config = Config {
            name: name.into(),
            role,
            system: system.unwrap_or_else(|| fieldmesh_fhir_docs::node_system(name)),
            http: HttpConfig::default(),
            storage: StorageConfig::default(),
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

    /// The store file.
    pub fn store_path(&self) -> PathBuf {
        self.path.join(STORE_FILE)
    }
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
