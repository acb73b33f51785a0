//! The simulator: nodes, days, contacts, faults, and the invariants.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use fieldmesh_fhir_docs::ed25519_dalek::SigningKey;
use fieldmesh_fhir_docs::trust::{
    Certificate, Role as TrustRole, certificate_resource, issue_certificate,
};
use fieldmesh_node::demo::{Reference, Rng, Village, reference_data, write_families};
use fieldmesh_node::engine::{Engine, NodeIdentity};
use fieldmesh_protocol::{Action, Local, Role, Session, decode, encode, pack};
use fieldmesh_storage::{MemStore, Store};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{Scenario, SimError};

/// A node's documents with their heads, sorted.
type Items = Vec<([u8; 16], Vec<[u8; 32]>)>;

/// Simulated time of day 0, 00:00 (2026-11-01, UTC).
pub const T0: i64 = 1_793_491_200;
const DAY: i64 = 86_400;
/// Frames a session may exchange before it is abandoned.
const SESSION_FRAME_LIMIT: usize = 10_000;

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Seed of the run.
    pub seed: u64,
    /// Invariant violations (empty: the run passed).
    pub violations: Vec<String>,
    /// SHA-256 of the trace (every write and session, in order): equal for equal seeds.
    pub trace: String,
    /// Documents written and acknowledged by honest nodes.
    pub acknowledged: usize,
    /// Sessions run, and how many were abandoned (faults).
    pub sessions: usize,
    /// Abandoned sessions.
    pub aborted: usize,
    /// Heal rounds until honest nodes converged (`None`: they did not).
    pub converged_after: Option<u32>,
    /// Seconds from a write to its arrival at central.
    pub latency_central: Vec<f64>,
    /// Seconds from a write to its arrival at the other officers of its village.
    pub latency_village: Vec<f64>,
    /// Bytes sent per device per day (one value per officer-day).
    pub bytes_per_device_day: Vec<u64>,
    /// Documents with concurrent values of one field on central at the end.
    pub conflicts: usize,
    /// Changes quarantined, summed over honest nodes.
    pub quarantined: u64,
    /// Local writes refused by the device itself (wrong clock, …).
    pub refused_local: u64,
    /// Phone crashes.
    pub crashes: usize,
    /// Documents on central at the end.
    pub central_documents: u64,
    /// Wall-clock seconds the run took.
    pub seconds: f64,
}

impl Outcome {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Central,
    Hub,
    Officer,
}

struct Node {
    name: String,
    kind: Kind,
    store: Arc<MemStore>,
    engine: Option<Engine>,
    secret: [u8; 32],
    peer: String,
    /// Officers: their hub; hubs: themselves.
    hub: usize,
    villages: Vec<usize>,
    byzantine: bool,
    skew: i64,
    fam_rng: Rng,
    bytes_today: u64,
}

impl Node {
    fn engine(&mut self) -> &mut Engine {
        self.engine
            .as_mut()
            .expect("a node always has an engine between steps")
    }
}

struct Tracked {
    created: i64,
    author: usize,
    village: Option<usize>,
}

struct World {
    sc: Scenario,
    rng: Rng,
    nodes: Vec<Node>,
    refdata: Reference,
    root: [u8; 32],
    now: i64,
    trace: Sha256,
    out: Outcome,
    /// Acknowledged writes of honest nodes.
    tracked: HashMap<[u8; 16], Tracked>,
    /// (document, node) → arrival time, for central and village peers.
    arrived: HashMap<([u8; 16], usize), i64>,
    /// Documents only byzantine or refused writes produced: no honest node may hold them.
    bad_docs: Vec<[u8; 16]>,
    /// Documents edited (conflict candidates).
    edited: HashSet<[u8; 16]>,
    /// Frames seen, for replays.
    captured: VecDeque<Vec<u8>>,
    insuree_no: u64,
}

fn fail(node: &str, e: impl std::fmt::Display) -> SimError {
    SimError::Engine {
        node: node.into(),
        error: e.to_string(),
    }
}

fn uuid_from(rng: &mut Rng) -> String {
    rng.uuid()
}

fn peer_id(key: &[u8; 32]) -> String {
    fieldmesh_node::certs::short_peer(&hex::encode(key))
}

/// Runs `sc` with `seed`; the outcome lists every invariant violation.
pub fn run(sc: &Scenario, seed: u64) -> Result<Outcome, SimError> {
    let started = std::time::Instant::now();
    let mut w = World::new(sc.clone(), seed)?;
    for day in 0..sc.days {
        w.day(day)?;
    }
    w.heal()?;
    w.finish()?;
    w.out.seconds = started.elapsed().as_secs_f64();
    Ok(w.out)
}

impl World {
    fn new(sc: Scenario, seed: u64) -> Result<Self, SimError> {
        // The world's draws must not repeat the reference data's (same generator).
        let mut rng = Rng::new(seed ^ 0x005E_ED0F_A11F_1E1D);
        let refdata = reference_data(&mut Rng::new(seed));
        let mut nodes = Vec::new();
        let secret = |rng: &mut Rng| {
            let mut s = [0u8; 32];
            for c in s.chunks_mut(8) {
                c.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            s
        };
        let central_secret = secret(&mut rng);
        let root = SigningKey::from_bytes(&central_secret)
            .verifying_key()
            .to_bytes();
        let mut add = |name: String,
                       kind: Kind,
                       hub: usize,
                       villages: Vec<usize>,
                       rng: &mut Rng,
                       s: [u8; 32]| {
            let pk = SigningKey::from_bytes(&s).verifying_key().to_bytes();
            let fam_rng = Rng::new(rng.next_u64());
            nodes.push(Node {
                name,
                kind,
                store: Arc::new(MemStore::new()),
                engine: None,
                secret: s,
                peer: peer_id(&pk),
                hub,
                villages,
                byzantine: false,
                skew: 0,
                fam_rng,
                bytes_today: 0,
            });
        };
        add(
            "central".into(),
            Kind::Central,
            0,
            vec![],
            &mut rng,
            central_secret,
        );
        for h in 0..sc.hubs {
            let s = secret(&mut rng);
            add(format!("hub-{h}"), Kind::Hub, 1 + h, vec![], &mut rng, s);
        }
        let villages = refdata.villages.len();
        for h in 0..sc.hubs {
            for o in 0..sc.officers_per_hub {
                let s = secret(&mut rng);
                // Officers of one hub work in pairs: each pair shares a village, and each
                // officer has one of their own.
                let base = (h * 5 + o / 2 * 3) % villages;
                let own = (base + 1 + o % 2) % villages;
                add(
                    format!("officer-{h}-{o}"),
                    Kind::Officer,
                    1 + h,
                    vec![base, own],
                    &mut rng,
                    s,
                );
            }
        }
        let first_officer = 1 + sc.hubs;
        for i in 0..sc.byzantine_officers.min(sc.officers()) {
            nodes[first_officer + i].byzantine = true;
        }
        for i in 0..sc.wrong_clock_officers.min(sc.officers()) {
            let last = nodes.len() - 1 - i;
            let n = &mut nodes[last];
            n.skew = if i == 0 { -3 * DAY } else { 2 * 365 * DAY };
        }
        let mut w = Self {
            sc,
            rng,
            nodes,
            refdata,
            root,
            now: T0,
            trace: Sha256::new(),
            out: Outcome {
                seed,
                ..Outcome::default()
            },
            tracked: HashMap::new(),
            arrived: HashMap::new(),
            bad_docs: Vec::new(),
            edited: HashSet::new(),
            captured: VecDeque::new(),
            insuree_no: seed % 1_000_000,
        };
        for i in 0..w.nodes.len() {
            w.start_engine(i);
        }
        w.provision()?;
        Ok(w)
    }

    fn start_engine(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let mut e = Engine::new(
            Box::new(Arc::clone(&n.store)),
            NodeIdentity::new(
                format!("urn:fieldmesh:node:{}", n.name),
                &n.secret,
                self.root,
            ),
            32,
        );
        e.set_clock(self.now + n.skew);
        if n.byzantine {
            e.play_byzantine();
        }
        n.engine = Some(e);
    }

    fn clock(&mut self, i: usize) {
        let t = self.now + self.nodes[i].skew;
        self.nodes[i].engine().set_clock(t);
    }

    fn record(&mut self, line: String) {
        if std::env::var_os("FIELDMESH_SIM_TRACE").is_some() {
            eprintln!("{line}");
        }
        self.trace.update(line.as_bytes());
        self.trace.update(b"\n");
    }

    /// Central authors the reference data and every node's certificate; every node is
    /// provisioned with all certificates (as if set up at central).
    fn provision(&mut self) -> Result<(), SimError> {
        self.clock(0);
        let central_key = SigningKey::from_bytes(&self.nodes[0].secret);
        let mut cert_ids = Vec::new();
        let mut certs = Vec::new();
        for n in &self.nodes[1..] {
            let (roles, locations) = match n.kind {
                Kind::Hub => (vec![TrustRole::Hub], vec![]),
                _ => (
                    vec![TrustRole::EnrolmentOfficer],
                    n.villages
                        .iter()
                        .flat_map(|v| {
                            let v = &self.refdata.villages[*v];
                            [v.0.clone(), v.1.clone()]
                        })
                        .collect(),
                ),
            };
            let cert = Certificate {
                serial: format!("{}-cert", n.name),
                subject: hex::encode(SigningKey::from_bytes(&n.secret).verifying_key().to_bytes()),
                user: n.name.clone(),
                roles,
                locations,
                facilities: vec![],
                not_before: T0 - DAY,
                not_after: T0 + 365 * DAY,
            };
            certs.push(cert);
        }
        let mut rng = Rng::new(self.out.seed ^ 0xCE27);
        for cert in &certs {
            let mut res = certificate_resource(&issue_certificate(&central_key, cert), cert);
            let id = uuid_from(&mut rng);
            res["id"] = json!(id);
            let doc = self.nodes[0]
                .engine()
                .create(res, None, true, &|_| None)
                .map_err(|e| fail("central", e))?;
            cert_ids.push((*doc.as_bytes(), Vec::new()));
        }
        for r in self.refdata.resources.clone() {
            self.nodes[0]
                .engine()
                .create(r, None, true, &|_| None)
                .map_err(|e| fail("central", e))?;
        }
        self.nodes[0]
            .engine()
            .flush()
            .map_err(|e| fail("central", e))?;
        let payloads = self.nodes[0]
            .engine()
            .payloads("", &cert_ids)
            .map_err(|e| fail("central", e))?;
        for i in 1..self.nodes.len() {
            self.clock(i);
            let e = self.nodes[i].engine();
            e.merge(payloads.clone(), "provisioning")
                .map_err(|er| fail("node", er))?;
            e.flush().map_err(|er| fail("node", er))?;
        }
        Ok(())
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.rng.next_u64() as f64 / u64::MAX as f64) < p
    }

    fn officers(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].kind == Kind::Officer)
            .collect()
    }

    fn hubs(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].kind == Kind::Hub)
            .collect()
    }

    fn partitioned(&self, hub: usize, day: u32, healing: bool) -> bool {
        let Some(p) = &self.sc.partition else {
            return false;
        };
        let h = hub - 1;
        if !p.hubs.contains(&h) || day < p.from_day {
            return false;
        }
        match p.to_day {
            None => true,
            Some(to) => !healing && day < to,
        }
    }

    fn day(&mut self, day: u32) -> Result<(), SimError> {
        self.now = T0 + i64::from(day) * DAY + 8 * 3600;
        for i in self.officers() {
            self.nodes[i].bytes_today = 0;
        }
        // Work.
        for i in self.officers() {
            self.work(i, day)?;
            self.now += 60;
        }
        if self.chance(self.sc.no_link_day_probability) {
            self.record(format!("day {day}: no link"));
        } else {
            self.contacts(day)?;
        }
        for i in self.officers() {
            let b = self.nodes[i].bytes_today;
            self.out.bytes_per_device_day.push(b);
        }
        Ok(())
    }

    /// An officer's day of work: enrol families (each resource acknowledged once flushed),
    /// maybe edit an insuree, maybe crash; a byzantine officer also forges.
    fn work(&mut self, i: usize, day: u32) -> Result<(), SimError> {
        self.clock(i);
        let rate = self.sc.families_per_officer_day;
        let mut families = rate.floor() as u64;
        if self.chance(rate - rate.floor()) {
            families += 1;
        }
        let villages: Vec<Village> = self.nodes[i]
            .villages
            .iter()
            .map(|v| self.refdata.villages[*v].clone())
            .collect();
        let mut resources: Vec<Value> = Vec::new();
        let tag = format!("{}-{day}", self.nodes[i].name);
        let start = self.insuree_no;
        self.insuree_no += families * 8;
        write_families(
            &self.refdata,
            &mut self.nodes[i].fam_rng,
            families,
            &villages,
            &tag,
            start,
            &mut |v| {
                if v["resourceType"] != "Claim" {
                    resources.push(v.clone());
                }
                Ok(())
            },
        )
        .map_err(|e| fail(&tag, e))?;
        let crash_at = if self.chance(self.sc.crash_probability) && !resources.is_empty() {
            Some(self.rng.below(resources.len() as u64) as usize)
        } else {
            None
        };
        for (k, r) in resources.into_iter().enumerate() {
            let village = village_of(&r, &self.refdata);
            let name = self.nodes[i].name.clone();
            if crash_at == Some(k) {
                // Staged, not flushed: the phone dies before acknowledging it. After the
                // restart the officer enters it again (it was never confirmed).
                let _ = self.nodes[i]
                    .engine()
                    .create(r.clone(), None, true, &|_| None);
                let engine = self.nodes[i].engine.take().expect("engine");
                engine.crash();
                self.start_engine(i);
                self.out.crashes += 1;
                self.record(format!("{name} crashed"));
            }
            let result = self.nodes[i].engine().create(r, None, true, &|_| None);
            let id = match result {
                Ok(id) => id,
                Err(fieldmesh_node::engine::EngineError::Forbidden(_)) => {
                    self.out.refused_local += 1;
                    continue;
                }
                Err(e) => return Err(fail(&name, e)),
            };
            self.nodes[i].engine().flush().map_err(|e| fail(&name, e))?;
            if !self.nodes[i].byzantine {
                self.tracked.insert(
                    *id.as_bytes(),
                    Tracked {
                        created: self.now,
                        author: i,
                        village,
                    },
                );
                self.out.acknowledged += 1;
            }
            self.record(format!("{name} wrote {id}"));
        }
        if self.chance(self.sc.edit_probability) {
            self.edit(i)?;
        }
        if self.nodes[i].byzantine {
            self.forge(i, day)?;
        }
        Ok(())
    }

    /// Edits an insuree of the officer's villages that it holds (officers sharing a village
    /// edit the same people: concurrent edits).
    fn edit(&mut self, i: usize) -> Result<(), SimError> {
        let candidates: Vec<[u8; 16]> = {
            let mut c: Vec<[u8; 16]> = self
                .tracked
                .iter()
                .filter(|(_, t)| {
                    t.village
                        .is_some_and(|v| self.nodes[i].villages.contains(&v))
                })
                .map(|(id, _)| *id)
                .collect();
            c.sort_unstable();
            c
        };
        if candidates.is_empty() {
            return Ok(());
        }
        let id = candidates[self.rng.below(candidates.len() as u64) as usize];
        let sid = uuid::Uuid::from_bytes(id).to_string();
        let phone = format!("+227 9{}", self.rng.below(10_000_000));
        let name = self.nodes[i].name.clone();
        let e = self.nodes[i].engine();
        let Ok(served) = e.read("Patient", &sid) else {
            return Ok(());
        };
        let mut r = served.resource;
        r["telecom"] = json!([{"system": "phone", "value": phone}]);
        match e.update("Patient", &sid, r, None) {
            Ok(_) => {
                e.flush().map_err(|er| fail(&name, er))?;
                self.edited.insert(id);
                self.record(format!("{name} edited {sid}"));
            }
            Err(fieldmesh_node::engine::EngineError::Forbidden(_)) => self.out.refused_local += 1,
            Err(er) => return Err(fail(&name, er)),
        }
        Ok(())
    }

    /// A byzantine officer writes a Location (central's alone) and an insuree outside its
    /// villages; neither may reach an honest node.
    fn forge(&mut self, i: usize, day: u32) -> Result<(), SimError> {
        let loc_id = self.rng.uuid();
        let outside = (self.nodes[i].villages[0] + 6) % self.refdata.villages.len();
        let village = self.refdata.villages[outside].0.clone();
        let pid = self.rng.uuid();
        let name = self.nodes[i].name.clone();
        let e = self.nodes[i].engine();
        for r in [
            json!({"resourceType": "Location", "id": loc_id, "name": format!("Forged {day}")}),
            json!({"resourceType": "Patient", "id": pid, "name": [{"family": "Forged"}], "birthDate": "1990",
                "address": [{"extension": [{"url": fieldmesh_fhir_docs::trust::LOCATION_EXTENSION,
                    "valueReference": {"reference": format!("Location/{village}")}}]}]}),
        ] {
            let id = e
                .create(r, None, true, &|_| None)
                .map_err(|er| fail(&name, er))?;
            self.bad_docs.push(*id.as_bytes());
        }
        e.flush().map_err(|er| fail(&name, er))?;
        Ok(())
    }

    fn contacts(&mut self, day: u32) -> Result<(), SimError> {
        let officers = self.officers();
        // Officers of one hub meet.
        for (x, &a) in officers.iter().enumerate() {
            for &b in &officers[x + 1..] {
                if self.nodes[a].hub == self.nodes[b].hub && self.chance(self.sc.meet_probability) {
                    self.now += 300;
                    self.session(a, b, true)?;
                }
            }
        }
        // Officers pass by their hub, or hand it a bundle.
        for &o in &officers {
            if self.chance(self.sc.hub_visit_probability) {
                self.now += 300;
                let hub = self.nodes[o].hub;
                self.session(o, hub, true)?;
            } else if self.chance(self.sc.bundle_probability) {
                self.now += 300;
                let hub = self.nodes[o].hub;
                self.bundle(o, hub)?;
            }
        }
        // Hubs reach central on their schedule, unless cut off.
        for h in self.hubs() {
            let every = self.sc.hub_central_every_days
                [(h - 1) % self.sc.hub_central_every_days.len().max(1)]
            .max(1);
            if (day + h as u32).is_multiple_of(every) && !self.partitioned(h, day, false) {
                self.now += 600;
                self.session(h, 0, true)?;
            }
        }
        Ok(())
    }

    /// A bundle by hand: every document of `from` goes to `to`, checked like any change.
    fn bundle(&mut self, from: usize, to: usize) -> Result<(), SimError> {
        self.clock(from);
        self.clock(to);
        let to_peer = self.nodes[to].peer.clone();
        let from_peer = self.nodes[from].peer.clone();
        let start = self.nodes[from]
            .engine()
            .sync_start(&to_peer)
            .map_err(|e| fail("bundle", e))?;
        let wanted: Vec<([u8; 16], Vec<[u8; 32]>)> = start
            .items
            .iter()
            .map(|(id, _, _)| (*id, Vec::new()))
            .collect();
        let payloads = self.nodes[from]
            .engine()
            .payloads(&to_peer, &wanted)
            .map_err(|e| fail("bundle", e))?;
        let bytes: u64 = payloads
            .iter()
            .map(|p| (p.data.len() + p.envelopes.len()) as u64)
            .sum();
        self.nodes[from].bytes_today += bytes;
        let ids: Vec<[u8; 16]> = payloads.iter().map(|p| p.id).collect();
        let e = self.nodes[to].engine();
        let (changed, _) = e
            .merge(payloads, &from_peer)
            .map_err(|er| fail("bundle", er))?;
        e.flush().map_err(|er| fail("bundle", er))?;
        self.arrivals(to, &ids);
        let line = format!(
            "bundle {}→{} {} docs, {changed} changed",
            self.nodes[from].name,
            self.nodes[to].name,
            ids.len()
        );
        self.record(line);
        Ok(())
    }

    /// Notes when tracked documents reach central or their village's other officers, and
    /// checks that no honest node holds a forged document.
    fn arrivals(&mut self, node: usize, ids: &[[u8; 16]]) {
        let interesting = node == 0 || self.nodes[node].kind == Kind::Officer;
        if interesting {
            for id in ids {
                let Some(t) = self.tracked.get(id) else {
                    continue;
                };
                if t.author == node || self.arrived.contains_key(&(*id, node)) {
                    continue;
                }
                let village_peer = t.village.is_some_and(|v| {
                    self.nodes[node].kind == Kind::Officer && self.nodes[node].villages.contains(&v)
                });
                if (node == 0 || village_peer)
                    && self.nodes[node].store.doc_meta(id).ok().flatten().is_some()
                {
                    let secs = (self.now - t.created) as f64;
                    self.arrived.insert((*id, node), self.now);
                    if node == 0 {
                        self.out.latency_central.push(secs);
                    } else {
                        self.out.latency_village.push(secs);
                    }
                }
            }
        }
        if !self.nodes[node].byzantine {
            for bad in &self.bad_docs {
                if ids.contains(bad)
                    && self.nodes[node]
                        .store
                        .doc_meta(bad)
                        .ok()
                        .flatten()
                        .is_some()
                {
                    let v = format!(
                        "honest {} applied forged document {} at {}",
                        self.nodes[node].name,
                        uuid::Uuid::from_bytes(*bad),
                        self.now
                    );
                    self.out.violations.push(v);
                }
            }
        }
    }

    /// One sync session between `a` (initiator) and `b`, with faults when `faulty`.
    fn session(&mut self, a: usize, b: usize, faulty: bool) -> Result<bool, SimError> {
        self.out.sessions += 1;
        self.clock(a);
        self.clock(b);
        let (pa, pb) = (self.nodes[a].peer.clone(), self.nodes[b].peer.clone());
        let sa_start = self.nodes[a]
            .engine()
            .sync_start(&pb)
            .map_err(|e| fail("sync", e))?;
        let sb_start = self.nodes[b]
            .engine()
            .sync_start(&pa)
            .map_err(|e| fail("sync", e))?;
        let local = |n: &Node, s: &fieldmesh_node::engine::SyncStart| Local {
            node: n.name.clone(),
            store: s.store,
            seq: s.seq,
            checkpoint: s.checkpoint,
        };
        let mut sa = Session::new(
            Role::Initiator,
            local(&self.nodes[a], &sa_start),
            sa_start.items.clone(),
        )
        .map_err(|e| fail("session", e))?;
        let mut sb = Session::new(
            Role::Responder,
            local(&self.nodes[b], &sb_start),
            sb_start.items.clone(),
        )
        .map_err(|e| fail("session", e))?;
        let mut to_b: VecDeque<Vec<u8>> = VecDeque::new();
        let mut to_a: VecDeque<Vec<u8>> = VecDeque::new();
        let mut received: Vec<[u8; 16]> = Vec::new();
        let (mut changed, mut frames, mut aborted) = (0usize, 0usize, false);
        let acts = sa.start().map_err(|e| fail("session", e))?;
        self.act(a, &pb, acts, &mut to_b, &mut received, &mut changed)?;
        let mut pending_received_b: Vec<[u8; 16]> = Vec::new();
        'run: while !to_b.is_empty() || !to_a.is_empty() {
            for side in [0, 1] {
                let (queue, me, peer_name) = if side == 0 {
                    (&mut to_b, b, pa.clone())
                } else {
                    (&mut to_a, a, pb.clone())
                };
                let mut flight: VecDeque<Vec<u8>> = std::mem::take(queue);
                let mut later: Vec<Vec<u8>> = Vec::new();
                while let Some(mut frame) = flight.pop_front() {
                    frames += 1;
                    if frames > SESSION_FRAME_LIMIT {
                        aborted = true;
                        break 'run;
                    }
                    if faulty {
                        let f = self.sc.faults.clone();
                        if self.chance(f.drop) {
                            // Lost: the session stalls and is abandoned.
                            aborted = true;
                            break 'run;
                        }
                        if self.chance(f.duplicate) {
                            flight.push_front(frame.clone());
                        }
                        if self.chance(f.reorder)
                            && let Some(next) = flight.pop_front()
                        {
                            flight.push_front(frame);
                            frame = next;
                        }
                        if self.chance(f.delay) {
                            later.push(frame);
                            continue;
                        }
                        if self.chance(f.replay) && !self.captured.is_empty() {
                            let k = self.rng.below(self.captured.len() as u64) as usize;
                            flight.push_front(frame);
                            frame = self.captured[k].clone();
                        }
                    }
                    if self.captured.len() >= 64 {
                        self.captured.pop_front();
                    }
                    self.captured.push_back(frame.clone());
                    let handled = decode(&frame).map_err(|e| e.to_string()).and_then(|m| {
                        if side == 0 {
                            sb.handle(m).map_err(|e| e.to_string())
                        } else {
                            sa.handle(m).map_err(|e| e.to_string())
                        }
                    });
                    let acts = match handled {
                        Ok(acts) => acts,
                        Err(_) => {
                            aborted = true;
                            break 'run;
                        }
                    };
                    let out_queue = if side == 0 { &mut to_a } else { &mut to_b };
                    let mut got = Vec::new();
                    let mut ch = 0;
                    self.act(me, &peer_name, acts, out_queue, &mut got, &mut ch)?;
                    if side == 0 {
                        pending_received_b.extend(got);
                    } else {
                        received.extend(got);
                    }
                    changed += ch;
                }
                // Delayed frames arrive after the other side's next flight.
                let queue = if side == 0 { &mut to_b } else { &mut to_a };
                queue.extend(later);
            }
        }
        let finished = !aborted && sa.is_finished() && sb.is_finished();
        if finished {
            if let Some(c) = sa.checkpoint()
                && !sa_start.restricted
            {
                self.nodes[a]
                    .engine()
                    .record_checkpoint(&pb, &c)
                    .map_err(|e| fail("checkpoint", e))?;
            }
            if let Some(c) = sb.checkpoint()
                && !sb_start.restricted
            {
                self.nodes[b]
                    .engine()
                    .record_checkpoint(&pa, &c)
                    .map_err(|e| fail("checkpoint", e))?;
            }
        } else {
            self.out.aborted += 1;
        }
        self.arrivals(a, &received);
        self.arrivals(b, &pending_received_b);
        let line = format!(
            "t={} {}↔{} frames={frames} changed={changed} aborted={aborted}",
            self.now, self.nodes[a].name, self.nodes[b].name
        );
        self.record(line);
        // A session that brought certificates to a restricted side runs again at once.
        if finished && (sa_start.restricted || sb_start.restricted) && changed > 0 {
            return self.session(a, b, faulty);
        }
        Ok(finished)
    }

    /// Carries out a session's actions for node `me` talking to `peer`.
    fn act(
        &mut self,
        me: usize,
        peer: &str,
        acts: Vec<Action>,
        out: &mut VecDeque<Vec<u8>>,
        received: &mut Vec<[u8; 16]>,
        changed: &mut usize,
    ) -> Result<(), SimError> {
        let name = self.nodes[me].name.clone();
        for act in acts {
            let msgs = match act {
                Action::Send(m) => vec![m],
                Action::SendDocs(ids) => {
                    let mut payloads = self.nodes[me]
                        .engine()
                        .payloads(peer, &ids)
                        .map_err(|e| fail(&name, e))?;
                    if self.nodes[me].byzantine {
                        // Corrupt signatures on the way out.
                        for p in &mut payloads {
                            if let Some(b) = p.envelopes.get_mut(40) {
                                *b ^= 0x55;
                            }
                        }
                    }
                    pack(payloads)
                }
                Action::Apply(docs) => {
                    received.extend(docs.iter().map(|d| d.id));
                    let e = self.nodes[me].engine();
                    let (c, _) = e.merge(docs, peer).map_err(|er| fail(&name, er))?;
                    e.flush().map_err(|er| fail(&name, er))?;
                    *changed += c;
                    vec![]
                }
                Action::Finished => vec![],
            };
            for m in msgs {
                let f = encode(&m);
                self.nodes[me].bytes_today += f.len() as u64;
                out.push_back(f);
            }
        }
        Ok(())
    }

    /// Connectivity returns: rounds of every officer with its hub and every hub with central,
    /// without faults, until honest nodes hold the same documents.
    fn heal(&mut self) -> Result<(), SimError> {
        let last_day = self.sc.days;
        for round in 1..=self.sc.heal_rounds {
            self.now = T0 + i64::from(last_day) * DAY + i64::from(round) * 3600;
            for o in self.officers() {
                let hub = self.nodes[o].hub;
                self.session(o, hub, false)?;
            }
            for h in self.hubs() {
                if !self.partitioned(h, last_day, true) {
                    self.session(h, 0, false)?;
                }
            }
            for o in self.officers() {
                let hub = self.nodes[o].hub;
                self.session(o, hub, false)?;
            }
            if self.converged()? {
                self.out.converged_after = Some(round);
                return Ok(());
            }
        }
        Ok(())
    }

    fn items(&mut self, i: usize) -> Result<Items, SimError> {
        let start = self.nodes[i]
            .engine()
            .sync_start("")
            .map_err(|e| fail("digest", e))?;
        let mut items: Vec<([u8; 16], Vec<[u8; 32]>)> =
            start.items.into_iter().map(|(id, h, _)| (id, h)).collect();
        items.sort();
        Ok(items)
    }

    fn digest(&mut self, i: usize) -> Result<[u8; 32], SimError> {
        let items = self.items(i)?;
        let mut h = Sha256::new();
        for (id, heads) in items {
            h.update(id);
            for x in heads {
                h.update(x);
            }
        }
        Ok(h.finalize().into())
    }

    fn honest(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| !self.nodes[*i].byzantine)
            .collect()
    }

    fn converged(&mut self) -> Result<bool, SimError> {
        let mut first = None;
        for i in self.honest() {
            let d = self.digest(i)?;
            match first {
                None => first = Some(d),
                Some(f) if f != d => return Ok(false),
                Some(_) => {}
            }
        }
        Ok(true)
    }

    /// The invariants at the end.
    fn finish(&mut self) -> Result<(), SimError> {
        if self.out.converged_after.is_none() {
            let central = self.digest(0)?;
            let mut differ = Vec::new();
            for i in self.honest() {
                if self.digest(i)? != central {
                    let docs = self.nodes[i]
                        .store
                        .stats()
                        .map(|s| s.documents)
                        .unwrap_or(0);
                    let theirs: HashMap<[u8; 16], Vec<[u8; 32]>> =
                        self.items(i)?.into_iter().collect();
                    let example = self
                        .items(0)?
                        .into_iter()
                        .find(|(id, h)| theirs.get(id) != Some(h))
                        .map(|(id, h)| {
                            format!(
                                "; e.g. {} has {} heads on central, {} there",
                                uuid::Uuid::from_bytes(id),
                                h.len(),
                                theirs.get(&id).map_or(0, Vec::len)
                            )
                        })
                        .unwrap_or_default();
                    differ.push(format!(
                        "{} ({docs} documents{example})",
                        self.nodes[i].name
                    ));
                }
            }
            let central_docs = self.nodes[0]
                .store
                .stats()
                .map(|s| s.documents)
                .unwrap_or(0);
            let v = format!(
                "honest nodes did not converge within {} rounds of full connectivity: central holds {central_docs} documents; {} differ: {}",
                self.sc.heal_rounds,
                differ.len(),
                differ.join(", ")
            );
            self.out.violations.push(v);
        }
        // Nothing acknowledged is lost: every acknowledged write is on its author and on central.
        let mut lost = Vec::new();
        let mut ids: Vec<&[u8; 16]> = self.tracked.keys().collect();
        ids.sort();
        for id in ids {
            let t = &self.tracked[id];
            for node in [t.author, 0] {
                if self.nodes[node].store.doc_meta(id).ok().flatten().is_none()
                    && (node != 0 || self.out.converged_after.is_some())
                {
                    lost.push(format!(
                        "{} lost on {}",
                        uuid::Uuid::from_bytes(*id),
                        self.nodes[node].name
                    ));
                }
            }
        }
        if !lost.is_empty() {
            self.out.violations.push(format!(
                "{} acknowledged writes missing, e.g. {}",
                lost.len(),
                lost[0]
            ));
        }
        // No honest node holds a forged document.
        for i in self.honest() {
            for bad in &self.bad_docs {
                if self.nodes[i].store.doc_meta(bad).ok().flatten().is_some() {
                    let v = format!(
                        "honest {} holds forged {}",
                        self.nodes[i].name,
                        uuid::Uuid::from_bytes(*bad)
                    );
                    self.out.violations.push(v);
                }
            }
            self.out.quarantined += self.nodes[i]
                .store
                .stats()
                .map(|s| s.quarantined)
                .unwrap_or(0);
            if std::env::var_os("FIELDMESH_SIM_TRACE").is_some() {
                for q in self.nodes[i].store.quarantined(10_000).unwrap_or_default() {
                    eprintln!(
                        "quarantine {}: {} (from {})",
                        self.nodes[i].name, q.reason, q.from
                    );
                }
            }
        }
        // Every reference on central resolves.
        let dump = self.nodes[0]
            .store
            .index_entries()
            .map_err(|e| fail("central", e))?;
        let mut unresolved = Vec::new();
        for (ty, system, value, src) in &dump.references {
            let store = &self.nodes[0].store;
            let found = !store.find(ty, system, value).unwrap_or_default().is_empty()
                || (uuid::Uuid::parse_str(value).is_ok()
                    && !store.find_value(ty, value).unwrap_or_default().is_empty());
            if !found {
                unresolved.push(format!(
                    "{ty} {system}|{value} from {}",
                    uuid::Uuid::from_bytes(*src)
                ));
            }
        }
        if !unresolved.is_empty() && self.out.converged_after.is_some() {
            self.out.violations.push(format!(
                "{} references on central do not resolve, e.g. {}",
                unresolved.len(),
                unresolved[0]
            ));
        }
        // Conflicts on central among edited documents.
        let mut edited: Vec<[u8; 16]> = self.edited.iter().copied().collect();
        edited.sort();
        for id in edited {
            let sid = uuid::Uuid::from_bytes(id).to_string();
            if let Ok(c) = self.nodes[0].engine().conflicts("Patient", &sid)
                && !c.is_empty()
            {
                self.out.conflicts += 1;
            }
        }
        self.out.central_documents = self.nodes[0]
            .store
            .stats()
            .map(|s| s.documents)
            .unwrap_or(0);
        let line = format!(
            "end: central {} docs, quarantined {}, converged {:?}",
            self.out.central_documents, self.out.quarantined, self.out.converged_after
        );
        self.record(line);
        self.out.trace = hex::encode(self.trace.clone().finalize());
        Ok(())
    }
}

/// The demo village a generated resource lives in (its address's Location).
fn village_of(r: &Value, refdata: &Reference) -> Option<usize> {
    let text = r.to_string();
    refdata
        .villages
        .iter()
        .position(|v| text.contains(&format!("Location/{}", v.0)))
}

/// Bytes of the trace lines are small; a [`BTreeMap`] keeps summaries in a stable order.
pub fn summary(o: &Outcome) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    m.insert("seed", o.seed.to_string());
    m.insert("acknowledged writes", o.acknowledged.to_string());
    m.insert(
        "sessions",
        format!("{} ({} abandoned by faults)", o.sessions, o.aborted),
    );
    m.insert(
        "converged after heal rounds",
        o.converged_after.map_or("never".into(), |r| r.to_string()),
    );
    m.insert(
        "quarantined changes (honest nodes)",
        o.quarantined.to_string(),
    );
    m.insert("local writes refused", o.refused_local.to_string());
    m.insert("crashes", o.crashes.to_string());
    m.insert(
        "documents with conflicts on central",
        o.conflicts.to_string(),
    );
    m.insert("documents on central", o.central_documents.to_string());
    m
}
