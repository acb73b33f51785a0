//! A libp2p peer the tests control frame by frame: it connects to a node like any peer (TCP,
//! Noise, Yamux), then opens sync streams and sends what a test wants (nothing, garbage, a
//! flood), or accepts the node's streams and never answers. It plays the attacker or the broken
//! peer against a real `fieldmesh` process.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use fieldmesh_protocol::DocPayload;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, identify, noise, ping, tcp, yamux};

/// The sync protocol.
pub const SYNC: &str = fieldmesh_protocol::PROTOCOL_ID;

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    stream: libp2p_stream::Behaviour,
}

/// The peer's key: the ed25519 `secret` (a device's `node.key`), or a fresh one.
fn keypair(secret: Option<[u8; 32]>) -> Result<libp2p::identity::Keypair> {
    Ok(match secret {
        Some(mut s) => libp2p::identity::Keypair::ed25519_from_bytes(&mut s)?,
        None => libp2p::identity::Keypair::generate_ed25519(),
    })
}

/// A small runtime of the test peer's own.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

/// A test peer connected to one node.
pub struct TestPeer {
    rt: tokio::runtime::Runtime,
    control: libp2p_stream::Control,
    /// The node's peer id.
    pub node: PeerId,
    /// This peer's id.
    pub id: PeerId,
    /// The node name it gives in its `Hello` (whatever it likes: a node must not care).
    pub name: String,
}

/// A sync stream opened by the test peer.
pub struct SyncStream {
    stream: libp2p::Stream,
}

impl TestPeer {
    /// Connects to the node at `addr` (ending in `/p2p/<id>`) with the ed25519 key `secret`
    /// (a fresh key when `None`). With `stall`, every sync stream the node opens is accepted and
    /// never answered.
    pub fn connect(addr: &str, secret: Option<[u8; 32]>, stall: bool) -> Result<Self> {
        let rt = runtime()?;
        let addr: Multiaddr = addr.parse()?;
        let node = match addr.iter().last() {
            Some(libp2p::multiaddr::Protocol::P2p(id)) => id,
            _ => return Err(anyhow!("{addr} does not end in /p2p/<peer id>")),
        };
        let keypair = keypair(secret)?;
        let (connected_tx, connected_rx) = std::sync::mpsc::sync_channel(1);
        let (control, id) = rt.block_on(async {
            let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
                .with_tokio()
                .with_tcp(
                    tcp::Config::default().nodelay(true),
                    noise::Config::new,
                    yamux::Config::default,
                )?
                .with_behaviour(|key| Behaviour {
                    identify: identify::Behaviour::new(identify::Config::new(
                        "/fieldmesh/1".into(),
                        key.public(),
                    )),
                    ping: ping::Behaviour::new(ping::Config::new()),
                    stream: libp2p_stream::Behaviour::new(),
                })?
                .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
                .build();
            let id = *swarm.local_peer_id();
            let mut control = swarm.behaviour().stream.new_control();
            if stall {
                let mut incoming = control
                    .accept(StreamProtocol::new(SYNC))
                    .map_err(|e| anyhow!("{e}"))?;
                tokio::spawn(async move {
                    let mut held = Vec::new();
                    while let Some((_, s)) = incoming.next().await {
                        // Held open, never read, never written.
                        held.push(s);
                    }
                });
            }
            swarm.dial(addr.clone())?;
            tokio::spawn(async move {
                let mut told = false;
                loop {
                    if let SwarmEvent::ConnectionEstablished { .. } = swarm.select_next_some().await
                        && !told
                    {
                        told = true;
                        let _ = connected_tx.send(());
                    }
                }
            });
            Ok::<_, anyhow::Error>((control, id))
        })?;
        connected_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the test peer could not connect to the node")?;
        Ok(Self {
            rt,
            control,
            node,
            id,
            name: "attacker".into(),
        })
    }

    /// Opens a sync stream to the node.
    pub fn open(&mut self) -> Result<SyncStream> {
        let node = self.node;
        let mut control = self.control.clone();
        let stream = self.rt.block_on(async move {
            tokio::time::timeout(
                Duration::from_secs(10),
                control.open_stream(node, StreamProtocol::new(SYNC)),
            )
            .await
            .map_err(|_| anyhow!("the node did not accept a sync stream"))?
            .map_err(|e| anyhow!("{e}"))
        })?;
        Ok(SyncStream { stream })
    }

    /// Writes raw bytes on a stream.
    pub fn write(&self, s: &mut SyncStream, bytes: &[u8]) -> Result<()> {
        self.rt.block_on(async {
            s.stream.write_all(bytes).await?;
            s.stream.flush().await?;
            Ok(())
        })
    }

    /// Writes one length-prefixed frame.
    pub fn send_frame(&self, s: &mut SyncStream, frame: &[u8]) -> Result<()> {
        let mut bytes = (frame.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(frame);
        self.write(s, &bytes)
    }

    /// Reads one length-prefixed frame, waiting up to `secs`.
    pub fn read_frame(&self, s: &mut SyncStream, secs: u64) -> Result<Vec<u8>> {
        self.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(secs), async {
                let mut len = [0u8; 4];
                s.stream.read_exact(&mut len).await?;
                let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
                s.stream.read_exact(&mut buf).await?;
                Ok::<_, anyhow::Error>(buf)
            })
            .await
            .map_err(|_| anyhow!("no frame within {secs} s"))?
        })
    }

    /// Whether the node has closed the stream (a read returns end of stream or an error within
    /// `secs`).
    pub fn closed_within(&self, s: &mut SyncStream, secs: u64) -> bool {
        self.rt.block_on(async {
            let mut buf = [0u8; 1024];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
            loop {
                match tokio::time::timeout_at(deadline, s.stream.read(&mut buf)).await {
                    Err(_) => return false,
                    Ok(Ok(0)) | Ok(Err(_)) => return true,
                    Ok(Ok(_)) => continue,
                }
            }
        })
    }

    /// Runs a whole sync session with the node as initiator, with the protocol's own driver,
    /// offering `docs` and sending them as they are (however crafted) when the node asks. Returns
    /// how it went: how many documents the node asked for (so a test knows its attack was
    /// delivered) and, if the node ended the session before it completed (the expected end for
    /// refused input), why (including a stream the node would not open).
    ///
    /// A node refuses a session while its own with this peer runs (the one it opens when the
    /// peer connects, which fails at once: the test peer does not answer it); a session the node
    /// closed before its first frame is tried again, a few times within `secs`.
    pub fn push(&mut self, docs: Vec<DocPayload>, secs: u64) -> Result<Pushed> {
        let until = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let (mut asked, mut frames, mut received) = (0, 0, Vec::new());
            let ended = self
                .push_inner(docs.clone(), secs, &mut asked, &mut frames, &mut received)
                .err()
                .map(|e| format!("{e:#}"));
            if ended.is_none() || frames > 0 || std::time::Instant::now() >= until {
                return Ok(Pushed {
                    asked,
                    ended,
                    received,
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn push_inner(
        &mut self,
        docs: Vec<DocPayload>,
        secs: u64,
        asked: &mut usize,
        frames: &mut usize,
        received: &mut Vec<DocPayload>,
    ) -> Result<()> {
        use fieldmesh_protocol::{Driver, Local, Role, Start, Step};
        let start = Start {
            local: Local {
                node: self.name.clone(),
                store: *uuid_bytes(&self.id),
                seq: docs.len() as u64,
                checkpoint: None,
                outside: Vec::new(),
            },
            items: docs
                .iter()
                .enumerate()
                .map(|(i, d)| (d.id, Vec::new(), i as u64 + 1))
                .collect(),
            restricted: false,
        };
        let mut driver = Driver::new(Role::Initiator, start)?;
        let mut s = self.open()?;
        let mut todo: std::collections::VecDeque<Step> = driver.start()?.into();
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            while let Some(step) = todo.pop_front() {
                match step {
                    Step::Send(frame) => self.send_frame(&mut s, &frame)?,
                    Step::Read(ids) => {
                        *asked += ids.len();
                        let out: Vec<DocPayload> = docs
                            .iter()
                            .filter(|d| ids.iter().any(|(id, _)| *id == d.id))
                            .cloned()
                            .collect();
                        for step in driver.docs_read(out).into_iter().rev() {
                            todo.push_front(step);
                        }
                    }
                    // What the node sends is kept for the test to look at, not merged.
                    Step::Merge(docs) => {
                        received.extend(docs);
                        todo.extend(driver.merged(0));
                    }
                    Step::Outside(_) => todo.extend(driver.outside_held(Vec::new())),
                    Step::Complete(_) => return Ok(()),
                }
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(anyhow!("the session did not end within {secs} s"));
            }
            let frame = self
                .read_frame(&mut s, left.as_secs().max(1))
                .with_context(|| {
                    format!(
                        "the node ended the session after asking for {} document(s)",
                        *asked
                    )
                })?;
            *frames += 1;
            todo.extend(driver.receive(&frame)?);
        }
    }
}

/// How a [`TestPeer::push`] went.
#[derive(Debug)]
pub struct Pushed {
    /// Documents the node asked for.
    pub asked: usize,
    /// Why the session ended early, if it did (`None`: it completed).
    pub ended: Option<String>,
    /// The documents the node sent.
    pub received: Vec<DocPayload>,
}

/// Sixteen bytes naming this peer's (pretend) store.
fn uuid_bytes(id: &PeerId) -> Box<[u8; 16]> {
    let digest = id.to_bytes();
    let mut out = [0u8; 16];
    for (i, b) in digest.iter().rev().take(16).enumerate() {
        out[i] = *b;
    }
    Box::new(out)
}

#[derive(NetworkBehaviour)]
struct RelayProbe {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    relay: libp2p::relay::client::Behaviour,
}

/// Asks the node at `addr` (ending in `/p2p/<id>`) for a relay reservation with the key `secret`
/// (a fresh one when `None`): whether the node accepted it within `secs`.
pub fn try_reserve(addr: &str, secret: Option<[u8; 32]>, secs: u64) -> Result<bool> {
    let rt = runtime()?;
    let keypair = keypair(secret)?;
    let circuit: Multiaddr = format!("{addr}/p2p-circuit").parse()?;
    rt.block_on(async {
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )?
            .with_relay_client(noise::Config::new, yamux::Config::default)?
            .with_behaviour(|key, relay| RelayProbe {
                identify: identify::Behaviour::new(identify::Config::new(
                    "/fieldmesh/1".into(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(ping::Config::new()),
                relay,
            })?
            .build();
        swarm.listen_on(circuit)?;
        let wait = async {
            loop {
                match swarm.select_next_some().await {
                    SwarmEvent::Behaviour(RelayProbeEvent::Relay(
                        libp2p::relay::client::Event::ReservationReqAccepted { .. },
                    )) => return true,
                    SwarmEvent::ListenerClosed { .. } | SwarmEvent::ListenerError { .. } => {
                        return false;
                    }
                    _ => {}
                }
            }
        };
        Ok(tokio::time::timeout(Duration::from_secs(secs), wait)
            .await
            .unwrap_or(false))
    })
}
