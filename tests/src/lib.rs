//! Helpers for integration tests that run real `fieldmesh` processes on loopback.
//!
//! [`fieldmesh`] builds the binary once (with the same profile as the tests) and returns its path;
//! [`Node`] initialises a data directory, starts `fieldmesh run` on a free loopback port and kills
//! the process when dropped; [`peer::TestPeer`] is a libp2p peer the tests drive frame by frame
//! (a silent peer, an attacker); [`deploy`] sets up a field deployment of them.
#![forbid(unsafe_code)]

pub mod bench;
pub mod deploy;
pub mod peer;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The `fieldmesh` binary, built on first use.
pub fn fieldmesh() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("FIELDMESH_BIN") {
            return PathBuf::from(p);
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let release = !cfg!(debug_assertions);
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&root)
            .args(["build", "-q", "-p", "fieldmesh-node", "--bin", "fieldmesh"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build of fieldmesh failed");
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| root.join("target"));
        target
            .join(if release { "release" } else { "debug" })
            .join("fieldmesh")
    })
}

/// Runs `fieldmesh ARGS` to completion.
pub fn run(args: &[&str]) -> Result<Output> {
    let out = Command::new(fieldmesh())
        .args(args)
        .output()
        .context("running fieldmesh")?;
    Ok(out)
}

/// Runs `fieldmesh ARGS`, failing with its output if it fails; returns stdout.
pub fn run_ok(args: &[&str]) -> Result<String> {
    let out = run(args)?;
    if !out.status.success() {
        bail!(
            "fieldmesh {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The central node every test node of this test binary trusts: its data directory and peer id.
/// It is never started; it only issues certificates.
pub fn test_root() -> &'static (PathBuf, String) {
    static ROOT: OnceLock<(PathBuf, String)> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("fieldmesh-test-root")
            .tempdir()
            .expect("temp dir")
            .keep();
        let data = dir.join("central");
        run_ok(&[
            "init",
            "--data",
            data.to_str().unwrap_or_default(),
            "--role",
            "central",
            "--name",
            "test-central",
        ])
        .expect("init of the test root");
        let id = run_ok(&["id", "--data", data.to_str().unwrap_or_default()])
            .expect("id of the test root")
            .trim()
            .to_string();
        (data, id)
    })
}

/// Issues, with the test root, a certificate for the node in `data` and installs it there.
/// `grant` is the `cert issue` arguments after `--subject` (e.g. `["--role", "central"]`).
pub fn certify(data: &Path, grant: &[&str]) -> Result<()> {
    static ISSUING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let (root, _) = test_root();
    let d = data.to_str().unwrap_or_default();
    let id = run_ok(&["id", "--data", d])?.trim().to_string();
    let file = data.with_extension("cert.json");
    let f = file.to_str().unwrap_or_default();
    {
        let _one_at_a_time = ISSUING.lock().unwrap_or_else(|p| p.into_inner());
        let mut args = vec![
            "cert",
            "issue",
            "--data",
            root.to_str().unwrap_or_default(),
            "--subject",
            &id,
            "--user",
            "tester",
            "--out",
            f,
        ];
        args.extend_from_slice(grant);
        run_ok(&args)?;
    }
    run_ok(&["cert", "install", "--data", d, f])?;
    Ok(())
}

/// Initialises a node in `data` that trusts the test root and holds a certificate with full
/// authority (role `central`), whatever its configured `role` (tests of the trust model issue
/// narrower certificates themselves). Returns what `init` printed.
pub fn init(data: &Path, name: &str, role: &str) -> Result<String> {
    let out = init_uncertified(data, name, role)?;
    certify(data, &["--role", "central"])?;
    Ok(out)
}

/// The secret key of a device that holds a certificate from the test root with `grant` (the
/// `cert issue` arguments after `--subject`), made in `dir/name`: what a test peer uses to play
/// a certified (and malicious, or stolen) device.
pub fn certified_key(dir: &Path, name: &str, grant: &[&str]) -> Result<[u8; 32]> {
    let data = dir.join(name);
    init_uncertified(&data, name, "device")?;
    certify(&data, grant)?;
    let key = std::fs::read(data.join("node.key"))?;
    key.try_into()
        .map_err(|_| anyhow::anyhow!("node.key is not 32 bytes"))
}

/// Initialises a node in `data` that trusts the test root but holds no certificate.
pub fn init_uncertified(data: &Path, name: &str, role: &str) -> Result<String> {
    let (_, root) = test_root();
    run_ok(&[
        "init",
        "--data",
        data.to_str().unwrap_or_default(),
        "--role",
        role,
        "--name",
        name,
        "--root",
        root,
    ])
}

/// Sets the `[sync]` settings of the node in `data` (seconds): the frame deadline and the period
/// of resync with connected peers.
pub fn set_sync(data: &Path, frame_timeout: u64, resync: u64) -> Result<()> {
    let path = data.join("fieldmesh.toml");
    let text = std::fs::read_to_string(&path)?;
    let mut out = String::new();
    for line in text.lines() {
        let line = if line.starts_with("frame_timeout_secs") {
            format!("frame_timeout_secs = {frame_timeout}")
        } else if line.starts_with("resync_secs") {
            format!("resync_secs = {resync}")
        } else {
            line.to_string()
        };
        out.push_str(&line);
        out.push('\n');
    }
    anyhow::ensure!(
        out.contains("frame_timeout_secs"),
        "no [sync] section in {}",
        path.display()
    );
    std::fs::write(&path, out)?;
    Ok(())
}

/// Sets the insurance-number rule of the node in `data` (`[numbers.chfid]`): `length` digits,
/// the last the rest modulo `modulo`.
pub fn set_chfid_rule(data: &Path, length: usize, modulo: u32) -> Result<()> {
    let path = data.join("fieldmesh.toml");
    let text = std::fs::read_to_string(&path)?;
    let mut out = String::new();
    let mut in_section = false;
    for line in text.lines() {
        if line.starts_with('[') {
            in_section = line.trim() == "[numbers.chfid]";
            out.push_str(line);
            out.push('\n');
            if in_section {
                out.push_str(&format!(
                    "min_length = {length}\nmax_length = {length}\nmodulo_root = {modulo}\n"
                ));
            }
            continue;
        }
        if !in_section {
            out.push_str(line);
            out.push('\n');
        }
    }
    anyhow::ensure!(
        out.contains("modulo_root"),
        "no [numbers.chfid] section in {}",
        path.display()
    );
    std::fs::write(&path, out)?;
    Ok(())
}

/// Runs `fieldmesh check` on a stopped node and fails unless its store is consistent.
pub fn check(data: &Path) -> Result<()> {
    let out = run_ok(&["check", "--data", data.to_str().unwrap_or_default()])?;
    anyhow::ensure!(out.contains("store is consistent"), "{out}");
    Ok(())
}

/// The bearer token of the node in `data`.
pub fn token(data: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(data.join("api.token"))?
        .trim()
        .to_string())
}

/// Response headers as `(name, value)` pairs.
pub type Headers = Vec<(String, String)>;

/// A running node.
pub struct Node {
    /// Its data directory.
    pub data: PathBuf,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its libp2p TCP address, `/ip4/127.0.0.1/tcp/PORT/p2p/PEER`.
    pub p2p: String,
    /// Every address it listens on (TCP, QUIC, relay circuits), each ending in `/p2p/PEER`.
    pub addrs: Vec<String>,
    /// `Bearer <token>` of its API.
    pub auth: String,
    child: Child,
    agent: ureq::Agent,
}

impl Node {
    /// Initialises a node in `dir/name` (if needed) and starts it.
    pub fn start(dir: &Path, name: &str, role: &str) -> Result<Self> {
        Self::start_with_peers(dir, name, role, &[])
    }

    /// Starts `fieldmesh run` on an existing data directory (loopback only, no mDNS).
    pub fn run(data: PathBuf) -> Result<Self> {
        Self::run_with(data, &[])
    }

    /// Like [`Node::start`], with `--peer` addresses.
    pub fn start_with_peers(dir: &Path, name: &str, role: &str, peers: &[&str]) -> Result<Self> {
        let data = dir.join(name);
        if !data.join("fieldmesh.toml").exists() {
            init(&data, name, role)?;
        }
        let mut args = Vec::new();
        for p in peers {
            args.push("--peer");
            args.push(*p);
        }
        Self::run_with(data, &args)
    }

    /// Starts `fieldmesh run` with extra arguments.
    pub fn run_with(data: PathBuf, extra: &[&str]) -> Result<Self> {
        let mut child = Command::new(fieldmesh())
            .args([
                "run",
                "--data",
                data.to_str().unwrap_or_default(),
                "--http",
                "127.0.0.1:0",
            ])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
            .args(extra)
            .stdout(Stdio::piped())
            // The node's log, beside its data directory, for a person reading a failure.
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(data.with_extension("log"))?,
            ))
            .spawn()?;
        let stdout = child.stdout.take().context("no stdout")?;
        let listens = 1 + extra.iter().filter(|a| **a == "--listen").count();
        // Lines are read on a thread of their own so that a node that never becomes ready
        // fails the test after a minute instead of hanging it.
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(64);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(n) if n > 0 => {
                        if tx.send(line).is_err() {
                            // Nobody listens any more: keep draining so the node never
                            // blocks on a full pipe.
                            let mut sink = String::new();
                            while reader.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                                sink.clear();
                            }
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });
        let ready_by = Instant::now() + Duration::from_secs(60);
        let (mut base, mut addrs) = (None, Vec::new());
        while base.is_none() || addrs.len() < listens {
            let left = ready_by.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    bail!("the node was not ready within 60 s (listening on {addrs:?})");
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the node exited before it was ready");
                }
            };
            if let Some(u) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                base = Some(u.trim_end_matches("/fhir/").to_string());
            }
            if let Some(a) = line.strip_prefix("listening on ") {
                addrs.push(a.trim().to_string());
            }
        }
        drop(rx);
        let p2p = addrs
            .iter()
            .find(|a| a.contains("/tcp/") && !a.contains("p2p-circuit"))
            .cloned();
        let base = base.context("no HTTP address")?;
        let p2p = p2p.context("no libp2p TCP address")?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let node = Self {
            auth: format!("Bearer {}", token(&data)?),
            data,
            base,
            p2p,
            addrs,
            child,
            agent,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while node.get("/status").is_err() {
            if Instant::now() > deadline {
                bail!("the node did not answer /status");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(node)
    }

    /// `GET path` → (status, headers as (name, value), body bytes).
    pub fn get_raw(&self, path: &str) -> Result<(u16, Headers, Vec<u8>)> {
        let mut r = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", &self.auth)
            .call()?;
        split(&mut r)
    }

    /// `GET path` → (status, JSON).
    pub fn get(&self, path: &str) -> Result<(u16, Value)> {
        let (s, _, b) = self.get_raw(path)?;
        Ok((s, serde_json::from_slice(&b).unwrap_or(Value::Null)))
    }

    /// `POST path` with a raw body → (status, headers, JSON).
    pub fn post_raw(&self, path: &str, body: &[u8]) -> Result<(u16, Headers, Value)> {
        let mut r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/fhir+json")
            .header("Authorization", &self.auth)
            .send(body)?;
        let (s, h, b) = split(&mut r)?;
        Ok((s, h, serde_json::from_slice(&b).unwrap_or(Value::Null)))
    }

    /// `POST path` with JSON → (status, headers, JSON).
    pub fn post(&self, path: &str, body: &Value) -> Result<(u16, Headers, Value)> {
        self.post_raw(path, &serde_json::to_vec(body)?)
    }

    /// `PUT path` with JSON and optional headers → (status, headers, JSON).
    pub fn put(
        &self,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Result<(u16, Headers, Value)> {
        let mut req = self
            .agent
            .put(format!("{}{path}", self.base))
            .header("Content-Type", "application/fhir+json")
            .header("Authorization", &self.auth);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut r = req.send(&serde_json::to_vec(body)?)?;
        let (s, h, b) = split(&mut r)?;
        Ok((s, h, serde_json::from_slice(&b).unwrap_or(Value::Null)))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now and at its peak, in MiB (`VmRSS`, `VmHWM`).
    pub fn memory_mb(&self) -> Result<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| -> f64 {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `GET /status` → the number of documents.
    pub fn documents(&self) -> Result<u64> {
        let (_, st) = self.get("/status")?;
        st["documents"].as_u64().context("no document count")
    }

    /// Waits until `cond` holds (polling every 50 ms), up to `secs` seconds.
    pub fn wait_for(
        &self,
        secs: u64,
        what: &str,
        mut cond: impl FnMut(&Self) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if cond(self)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out after {secs} s waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the process with SIGTERM (as systemd or Ctrl-C would) and waits up to `secs`
    /// seconds for it to exit; returns its exit status, or an error if it did not stop.
    pub fn terminate(mut self, secs: u64) -> Result<(std::process::ExitStatus, PathBuf)> {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status()?;
        anyhow::ensure!(sent.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, self.data.clone()));
            }
            if Instant::now() > deadline {
                bail!("the node did not stop within {secs} s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process with SIGKILL.
    pub fn kill9(mut self) -> PathBuf {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.data.clone()
    }
}

fn split(r: &mut ureq::http::Response<ureq::Body>) -> Result<(u16, Headers, Vec<u8>)> {
    let status = r.status().as_u16();
    let headers = r
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                v.to_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let body = r.body_mut().read_to_vec()?;
    Ok((status, headers, body))
}

/// The value of header `name` (case-insensitive).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
