//! The simulator: nodes, days, contacts, faults, and the invariants.
//!
//! Every node is a real [`Engine`] over a [`MemStore`] and a real sync [`Scheduler`]; two nodes in
//! contact run the real [`fieldmesh_protocol::Driver`] sessions the scheduler asks for, frames
//! carried in memory (with faults) instead of sockets.
//!
//! - `work`: what officers do each day (enrol, edit, crash; forge, for byzantine ones).
//! - `contact`: nodes meeting, sessions with faults, bundles by hand, the heal phase.
//! - `invariants`: arrivals, convergence and the checks at the end.
//! - `scope`: re-scoping officers, insurees who move, what each node must hold, privacy.

mod claims;
mod contact;
mod invariants;
mod scope;
mod work;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use fieldmesh_engine::central::{Central, NumberConfig, STEP_ENTRIES};
use fieldmesh_engine::{Engine, NodeIdentity};
use fieldmesh_fhir_docs::openimis::demo::{Reference, Rng, reference_data_for};
use fieldmesh_protocol::{Limits, Millis, Scheduler};
use fieldmesh_storage::MemStore;
use fieldmesh_trust::ed25519_dalek::SigningKey;
use fieldmesh_trust::{
    Certificate, PeerKey, Role as TrustRole, certificate_resource, issue_certificate,
};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::{Scenario, SimError};

/// Simulated time of day 0, 00:00 (2026-11-01, UTC).
pub const T0: i64 = 1_793_491_200;
pub(crate) const DAY: i64 = 86_400;
/// Villages of each district of the reference data.
pub(crate) const VILLAGES_PER_DISTRICT: usize = 6;

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
    /// Bytes sent per hub per day (one value per hub-day).
    pub bytes_per_hub_day: Vec<u64>,
    /// Officers re-scoped to other villages, and insurees moved to another village.
    pub rescoped: usize,
    /// Insurees moved to another village.
    pub moved: usize,
    /// Documents that left a device once central or a hub held every change of them.
    pub left_devices: u64,
    /// Documents with concurrent values of one field on central at the end.
    pub conflicts: usize,
    /// Changes quarantined, summed over honest nodes.
    pub quarantined: u64,
    /// Local writes refused by the device itself (wrong clock, …).
    pub refused_local: u64,
    /// Phone crashes.
    pub crashes: usize,
    /// Edits and leases central's services made.
    pub central_edits: u64,
    /// Insurees registered twice.
    pub duplicates: usize,
    /// Claims entered and acknowledged by claim administrators.
    pub claims: usize,
    /// Of them, for insurees of another district.
    pub foreign_claims: usize,
    /// Claims rejected (all lines), provisionally by the device, and by central at the end.
    pub claims_rejected: (usize, usize),
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
pub(crate) enum Kind {
    Central,
    Hub,
    Officer,
    /// A health facility's claim administrator.
    ClaimAdmin,
}

pub(crate) struct Node {
    pub name: String,
    pub kind: Kind,
    pub store: Arc<MemStore>,
    pub engine: Option<Engine>,
    pub secret: [u8; 32],
    pub key: PeerKey,
    pub sched: Scheduler<PeerKey>,
    /// Officers: their hub; hubs: themselves.
    pub hub: usize,
    pub villages: Vec<usize>,
    /// Villages of a new certificate central issued, taken up once the device holds it.
    pub next_villages: Option<Vec<usize>>,
    pub byzantine: bool,
    pub skew: i64,
    pub fam_rng: Rng,
    pub bytes_today: u64,
}

impl Node {
    pub fn engine(&mut self) -> &mut Engine {
        self.engine
            .as_mut()
            .expect("a node always has an engine between steps")
    }
}

pub(crate) struct Tracked {
    pub created: i64,
    pub author: usize,
    pub village: Option<usize>,
}

pub(crate) struct World {
    pub sc: Scenario,
    pub rng: Rng,
    pub nodes: Vec<Node>,
    pub refdata: Reference,
    pub root: [u8; 32],
    pub now: i64,
    pub trace: Sha256,
    pub out: Outcome,
    /// Acknowledged writes of honest nodes.
    pub tracked: HashMap<[u8; 16], Tracked>,
    /// (document, node) → arrival time, for central and village peers.
    pub arrived: HashMap<([u8; 16], usize), i64>,
    /// Documents only byzantine or refused writes produced: no honest node may hold them.
    pub bad_docs: HashSet<[u8; 16]>,
    /// Documents edited (conflict candidates).
    pub edited: HashSet<[u8; 16]>,
    pub insuree_no: u64,
    /// Documents an officer held outside its scope, since when, and how many times it had met
    /// its hub by then (the privacy invariant).
    pub outside_since: HashMap<(usize, String), (i64, u32)>,
    /// Times each node met its hub (officers), counted by contact.
    pub hub_contacts: HashMap<usize, u32>,
    /// Central's services, when the scenario runs them.
    pub services: Option<Central>,
    /// Insurees registered twice: (the registration copied, the copy).
    pub duplicates: Vec<([u8; 16], [u8; 16])>,
    /// Claims acknowledged: (claim, its administrator, the insuree, foreign).
    pub claims: Vec<([u8; 16], usize, [u8; 16], bool)>,
}

pub(crate) fn fail(node: &str, e: impl std::fmt::Display) -> SimError {
    SimError::Engine {
        node: node.into(),
        error: e.to_string(),
    }
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

/// The scheduler's limits in the simulation: the node's defaults.
pub(crate) fn limits() -> Limits {
    Limits::default()
}

impl World {
    fn new(sc: Scenario, seed: u64) -> Result<Self, SimError> {
        // The world's draws must not repeat the reference data's (same generator).
        let mut rng = Rng::new(seed ^ 0x005E_ED0F_A11F_1E1D);
        // One district per hub (at least two), six villages each.
        let refdata = reference_data_for(&mut Rng::new(seed), sc.hubs.max(2));
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
            let key = PeerKey(SigningKey::from_bytes(&s).verifying_key().to_bytes());
            let fam_rng = Rng::new(rng.next_u64());
            nodes.push(Node {
                name,
                kind,
                store: Arc::new(MemStore::new()),
                engine: None,
                secret: s,
                key,
                sched: Scheduler::new(key, limits(), 0, 0, false),
                hub,
                villages,
                next_villages: None,
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
        for h in 0..sc.hubs {
            for o in 0..sc.officers_per_hub {
                let s = secret(&mut rng);
                // Officers of one hub work in the hub's district, in pairs: each pair shares a
                // village, and each officer has another.
                let base = h * VILLAGES_PER_DISTRICT + (o / 2) % VILLAGES_PER_DISTRICT;
                let own = h * VILLAGES_PER_DISTRICT + (o / 2 + 1 + o % 2) % VILLAGES_PER_DISTRICT;
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
        if sc.claims_per_admin_day > 0.0 {
            for h in 0..sc.hubs {
                let s = secret(&mut rng);
                // At the district's facility; its catchment, the district's villages.
                add(
                    format!("claims-{h}"),
                    Kind::ClaimAdmin,
                    1 + h,
                    (h * VILLAGES_PER_DISTRICT..(h + 1) * VILLAGES_PER_DISTRICT).collect(),
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
            // The last officers (claim administrators come after them).
            let last = first_officer + sc.officers() - 1 - i;
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
            bad_docs: HashSet::new(),
            edited: HashSet::new(),
            insuree_no: seed % 1_000_000,
            outside_since: HashMap::new(),
            hub_contacts: HashMap::new(),
            services: None,
            duplicates: Vec::new(),
            claims: Vec::new(),
        };
        for i in 0..w.nodes.len() {
            w.start_engine(i);
        }
        w.provision()?;
        if w.sc.central_services {
            let s = Central::open(w.nodes[0].engine(), NumberConfig::niger())
                .map_err(|e| fail("central", e))?;
            w.services = Some(s);
            w.run_central()?;
        }
        Ok(w)
    }

    pub(crate) fn start_engine(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let mut e = Engine::new(
            Box::new(Arc::clone(&n.store)),
            NodeIdentity::new(
                format!("urn:fieldmesh:node:{}", n.name),
                &n.secret,
                self.root,
            ),
            // A phone keeps few live documents (each costs ~20× its saved size); a thousand
            // engines in one process keep the run within memory.
            8,
        );
        e.set_clock(self.now + n.skew);
        e.set_number_rules(NumberConfig::niger());
        if n.byzantine {
            e.play_byzantine();
        }
        if self.sc.canary_hoarding_devices && n.kind == Kind::Officer {
            e.play_hoarder();
        }
        n.engine = Some(e);
    }

    /// Runs central's services until every arrival is processed (as the central node does
    /// between commands), and hands their edits to central's scheduler.
    pub(crate) fn run_central(&mut self) -> Result<(), SimError> {
        let Some(mut services) = self.services.take() else {
            return Ok(());
        };
        self.clock(0);
        let e = self.nodes[0].engine();
        let mut edited = 0;
        loop {
            let r = services
                .step(e, STEP_ENTRIES)
                .map_err(|er| fail("central's services", er))?;
            e.flush().map_err(|er| fail("central's services", er))?;
            edited += r.edited + r.leases;
            if !r.more && !services.has_work(e) {
                break;
            }
        }
        self.services = Some(services);
        self.out.central_edits += edited as u64;
        if edited > 0 {
            self.record(format!("central's services edited {edited}"));
        }
        self.drain_events(0);
        Ok(())
    }

    /// Simulated milliseconds, the schedulers' clock.
    pub(crate) fn ms(&self) -> Millis {
        ((self.now - T0).max(0) as Millis) * 1000
    }

    pub(crate) fn clock(&mut self, i: usize) {
        let t = self.now + self.nodes[i].skew;
        self.nodes[i].engine().set_clock(t);
    }

    pub(crate) fn record(&mut self, line: String) {
        if std::env::var_os("FIELDMESH_SIM_TRACE").is_some() {
            eprintln!("{line}");
        }
        self.trace.update(line.as_bytes());
        self.trace.update(b"\n");
    }

    /// Hands what node `i`'s engine stored since the last call to its scheduler (the node does
    /// the same with the engine's event stream) and notes arrivals; returns the documents.
    pub(crate) fn drain_events(&mut self, i: usize) -> Vec<[u8; 16]> {
        let events = self.nodes[i].engine().take_events();
        let mut docs = Vec::new();
        for e in events {
            self.nodes[i].sched.changed(e.seq, e.source.peer());
            if e.docs.iter().any(|(_, ty)| ty == "Basic") {
                self.nodes[i].sched.trust_changed();
            }
            docs.extend(e.docs.iter().map(|(id, _)| *id.as_bytes()));
        }
        self.arrivals(i, &docs);
        docs
    }

    /// Central authors the reference data and every node's certificate; every node is
    /// provisioned with all certificates (as if set up at central).
    fn provision(&mut self) -> Result<(), SimError> {
        self.clock(0);
        let central_key = SigningKey::from_bytes(&self.nodes[0].secret);
        let mut cert_ids = Vec::new();
        let mut certs = Vec::new();
        for n in &self.nodes[1..] {
            let villages = || -> Vec<String> {
                n.villages
                    .iter()
                    .flat_map(|v| {
                        let v = &self.refdata.villages[*v];
                        [v.0.clone(), v.1.clone()]
                    })
                    .collect()
            };
            let facilities = if n.kind == Kind::ClaimAdmin {
                let (id, code) = &self.refdata.facilities[n.hub - 1];
                vec![id.clone(), code.clone()]
            } else {
                Vec::new()
            };
            let (roles, locations) = match n.kind {
                // A hub holds its district: every place below it.
                Kind::Hub => (
                    vec![TrustRole::Hub],
                    vec![self.refdata.districts[n.hub - 1].0.clone()],
                ),
                Kind::ClaimAdmin => (vec![TrustRole::ClaimAdministrator], villages()),
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
            certs.push(Certificate {
                serial: format!("{}-cert", n.name),
                subject: hex::encode(n.key.0),
                user: n.name.clone(),
                roles,
                locations,
                facilities,
                not_before: T0 - DAY,
                not_after: T0 + 365 * DAY,
            });
        }
        let mut rng = Rng::new(self.out.seed ^ 0xCE27);
        for cert in &certs {
            let mut res = certificate_resource(&issue_certificate(&central_key, cert), cert);
            res["id"] = json!(rng.uuid());
            let doc = self.nodes[0]
                .engine()
                .create(res, None, true, &|_| None)
                .map_err(|e| fail("central", e))?;
            cert_ids.push(*doc.as_bytes());
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
        self.drain_events(0);
        // Each node is given the certificates it holds by its scope (its own, its hub's, its
        // village colleagues').
        let certificates: std::collections::HashSet<[u8; 16]> = cert_ids.iter().copied().collect();
        for i in 1..self.nodes.len() {
            let key = self.nodes[i].key;
            let e = self.nodes[0].engine();
            let reach = e.reach_of(&key.0).map_err(|er| fail("central", er))?;
            let mine: Vec<([u8; 16], Vec<[u8; 32]>)> = e
                .items_within(&reach, &key.0)
                .map_err(|er| fail("central", er))?
                .into_iter()
                .filter(|(id, _, _)| certificates.contains(id))
                .map(|(id, _, _)| (id, Vec::new()))
                .collect();
            let payloads = e.payloads(&key, &mine).map_err(|er| fail("central", er))?;
            self.clock(i);
            let e = self.nodes[i].engine();
            e.merge(payloads.clone(), &fieldmesh_engine::Source::Local)
                .map_err(|er| fail("node", er))?;
            e.flush().map_err(|er| fail("node", er))?;
            self.drain_events(i);
        }
        Ok(())
    }

    pub(crate) fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.rng.next_u64() as f64 / u64::MAX as f64) < p
    }

    pub(crate) fn officers(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].kind == Kind::Officer)
            .collect()
    }

    pub(crate) fn claim_admins(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].kind == Kind::ClaimAdmin)
            .collect()
    }

    pub(crate) fn hubs(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].kind == Kind::Hub)
            .collect()
    }

    pub(crate) fn partitioned(&self, hub: usize, day: u32, healing: bool) -> bool {
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
        if self.sc.rescope.as_ref().is_some_and(|r| r.day == day) {
            self.rescope()?;
        }
        for i in self.officers() {
            self.work(i, day)?;
            self.now += 60;
        }
        for i in self.claim_admins() {
            self.enter_claims(i)?;
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
        for i in self.hubs() {
            let b = self.nodes[i].bytes_today;
            self.out.bytes_per_hub_day.push(b);
            self.nodes[i].bytes_today = 0;
        }
        if day % 5 == 4 {
            self.privacy()?;
        }
        Ok(())
    }
}

/// A summary of an outcome as `(figure, value)` rows, in a stable order.
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
        "central's services: edits and leases",
        o.central_edits.to_string(),
    );
    m.insert("insurees registered twice", o.duplicates.to_string());
    m.insert(
        "claims (for insurees of another district)",
        format!("{} ({})", o.claims, o.foreign_claims),
    );
    m.insert(
        "claims rejected: by the device / by central",
        format!("{} / {}", o.claims_rejected.0, o.claims_rejected.1),
    );
    m.insert(
        "documents with conflicts on central",
        o.conflicts.to_string(),
    );
    m.insert("documents on central", o.central_documents.to_string());
    m.insert("officers re-scoped", o.rescoped.to_string());
    m.insert("insurees moved to another village", o.moved.to_string());
    m.insert(
        "documents that left a device (safe hand-off)",
        o.left_devices.to_string(),
    );
    m
}
