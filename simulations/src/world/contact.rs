//! Nodes meeting: while two nodes are in contact they run the sessions their schedulers ask for,
//! each a pair of real [`Driver`]s whose frames are carried in memory, with faults.

use fieldmesh_engine::EngineHost;
use fieldmesh_fhir_docs::openimis::demo::Rng;
use fieldmesh_protocol::pair::{self, Side};
use fieldmesh_protocol::{Admit, Command, DocPayload, Driver, Ended, Role};
use fieldmesh_storage::Store as _;

use super::{Node, World, fail, limits};
use crate::SimError;
use crate::scenario::Faults;

/// Frames a session may exchange before it is abandoned (a guard: sessions are finite).
const SESSION_FRAME_LIMIT: usize = 100_000;

/// A node's documents with their heads, sorted.
pub(crate) type Items = Vec<([u8; 16], Vec<[u8; 32]>)>;

/// Sessions one contact may run, at most (a guard against a scheduler that never rests).
const CONTACT_SESSIONS: usize = 64;
/// How long a contact lasts (seconds of simulated time).
const CONTACT_SECS: i64 = 600;

impl World {
    pub(crate) fn contacts(&mut self, day: u32) -> Result<(), SimError> {
        let officers = self.officers();
        // Officers of one hub meet.
        for (x, &a) in officers.iter().enumerate() {
            for &b in &officers[x + 1..] {
                if self.nodes[a].hub == self.nodes[b].hub && self.chance(self.sc.meet_probability) {
                    self.now += 300;
                    self.contact(a, b, true)?;
                }
            }
        }
        // Officers pass by their hub, or hand it a bundle.
        for &o in &officers {
            if self.chance(self.sc.hub_visit_probability) {
                self.now += 300;
                let hub = self.nodes[o].hub;
                self.contact(o, hub, true)?;
                *self.hub_contacts.entry(o).or_default() += 1;
            } else if self.chance(self.sc.bundle_probability) {
                self.now += 300;
                let hub = self.nodes[o].hub;
                self.bundle(o, hub)?;
            }
        }
        // A facility's claim administrator is at the facility, beside its hub, every day.
        for c in self.claim_admins() {
            self.now += 120;
            let hub = self.nodes[c].hub;
            self.contact(c, hub, true)?;
        }
        // Hubs reach central on their schedule, unless cut off.
        for h in self.hubs() {
            let every = self.sc.hub_central_every_days
                [(h - 1) % self.sc.hub_central_every_days.len().max(1)]
            .max(1);
            if (day + h as u32).is_multiple_of(every) && !self.partitioned(h, day, false) {
                self.now += 600;
                self.contact(h, 0, true)?;
            }
        }
        Ok(())
    }

    /// `a` and `b` are connected for a while: they run the sessions their schedulers ask for
    /// (the first at once, again while either is owed changes, retries after failures), then
    /// part.
    pub(crate) fn contact(&mut self, a: usize, b: usize, faulty: bool) -> Result<(), SimError> {
        let (ka, kb) = (self.nodes[a].key, self.nodes[b].key);
        let end = self.now + CONTACT_SECS;
        let t = self.ms();
        self.nodes[a].sched.connected(kb, None, t);
        self.nodes[b].sched.connected(ka, None, t);
        for _ in 0..CONTACT_SESSIONS {
            let t = self.ms();
            let open_a = self.nodes[a].sched.poll(t).contains(&Command::Open(kb));
            let open_b = self.nodes[b].sched.poll(t).contains(&Command::Open(ka));
            let (initiator, responder, admitted) = match (open_a, open_b) {
                (false, false) => {
                    if self.nodes[a].sched.idle(&kb) && self.nodes[b].sched.idle(&ka) {
                        break;
                    }
                    // Something is due later (a retry after a failure, the other side's turn).
                    let next = [
                        self.nodes[a].sched.next_wakeup(t),
                        self.nodes[b].sched.next_wakeup(t),
                    ]
                    .into_iter()
                    .flatten()
                    .min();
                    match next {
                        Some(w) if w > t && super::T0 + (w / 1000) as i64 + 1 < end => {
                            self.now = super::T0 + w.div_ceil(1000) as i64;
                            continue;
                        }
                        _ => break,
                    }
                }
                (true, false) => (a, b, false),
                (false, true) => (b, a, false),
                (true, true) => {
                    // Both opened at once: the lower id's session goes on, the other is refused
                    // (its side knows it lost the tie: not a failure).
                    let (winner, loser) = if ka < kb { (a, b) } else { (b, a) };
                    let (kw, kl) = (self.nodes[winner].key, self.nodes[loser].key);
                    let admitted = self.nodes[loser].sched.inbound(&kw, t) == Admit::Accept;
                    let refused = self.nodes[winner].sched.inbound(&kl, t);
                    debug_assert_eq!(refused, Admit::Refuse);
                    self.nodes[loser].sched.ended(&kw, true, Ended::Failed, t);
                    if !admitted {
                        continue;
                    }
                    (winner, loser, true)
                }
            };
            let ki = self.nodes[initiator].key;
            let t = self.ms();
            if !admitted && self.nodes[responder].sched.inbound(&ki, t) == Admit::Refuse {
                let kr = self.nodes[responder].key;
                let t = self.ms();
                self.nodes[initiator]
                    .sched
                    .ended(&kr, true, Ended::Failed, t);
                continue;
            }
            self.session(initiator, responder, faulty)?;
            if self.now >= end {
                break;
            }
        }
        let t = self.ms();
        self.nodes[a].sched.disconnected(&kb, t);
        self.nodes[b].sched.disconnected(&ka, t);
        Ok(())
    }

    /// One sync session between `a` (initiator) and `b`, with faults when `faulty`; tells both
    /// schedulers how it ended. Returns whether it completed.
    pub(crate) fn session(&mut self, a: usize, b: usize, faulty: bool) -> Result<bool, SimError> {
        self.out.sessions += 1;
        self.clock(a);
        self.clock(b);
        let (ka, kb) = (self.nodes[a].key, self.nodes[b].key);
        let (na, nb) = (self.nodes[a].name.clone(), self.nodes[b].name.clone());
        let start_a = self.nodes[a]
            .engine()
            .sync_start(&kb, &na)
            .map_err(|e| fail(&na, e))?;
        let start_b = self.nodes[b]
            .engine()
            .sync_start(&ka, &nb)
            .map_err(|e| fail(&nb, e))?;
        self.nodes[a].sched.started(&kb, true, start_a.local.seq);
        self.nodes[b].sched.started(&ka, false, start_b.local.seq);
        let mut da = Driver::new(Role::Initiator, start_a).map_err(|e| fail("session", e))?;
        let mut db = Driver::new(Role::Responder, start_b).map_err(|e| fail("session", e))?;
        let World { nodes, rng, sc, .. } = self;
        let (node_a, node_b) = pair_mut(nodes, a, b);
        let (mut sent_a, mut sent_b, mut frames) = (0u64, 0u64, 0usize);
        let faults = sc.faults.clone();
        let mut deliver = |to: Side, frame: &[u8]| {
            match to {
                Side::B => sent_a += frame.len() as u64,
                Side::A => sent_b += frame.len() as u64,
            }
            frames += 1;
            frames <= SESSION_FRAME_LIMIT && !(faulty && cut(rng, &faults))
        };
        let mut corrupt_a = byzantine_filter(node_a.byzantine);
        let mut corrupt_b = byzantine_filter(node_b.byzantine);
        let mut host_a = EngineHost {
            engine: node_a.engine(),
            peer: kb,
            outgoing: Some(&mut corrupt_a),
        };
        let mut host_b = EngineHost {
            engine: node_b.engine(),
            peer: ka,
            outgoing: Some(&mut corrupt_b),
        };
        let out = pair::run(&mut da, &mut host_a, &mut db, &mut host_b, &mut deliver)
            .map_err(|e| fail("session", e))?;
        self.nodes[a].bytes_today += sent_a;
        self.nodes[b].bytes_today += sent_b;
        let complete = out.complete();
        // A stalled session ends at the frame deadline; a complete one takes a moment.
        self.now += if complete {
            1
        } else {
            (limits().frame / 1000) as i64
        };
        let t = self.ms();
        let how = |done: bool| if done { Ended::Complete } else { Ended::Failed };
        self.nodes[a]
            .sched
            .ended(&kb, true, how(out.a.is_some()), t);
        self.nodes[b]
            .sched
            .ended(&ka, false, how(out.b.is_some()), t);
        if out.a.is_some_and(|t| t.again()) || self.nodes[a].engine().take_stale_found(&kb) > 0 {
            self.nodes[a].sched.again(&kb);
        }
        if out.b.is_some_and(|t| t.again()) || self.nodes[b].engine().take_stale_found(&ka) > 0 {
            self.nodes[b].sched.again(&ka);
        }
        if !complete {
            self.out.aborted += 1;
        }
        if a == 0 || b == 0 {
            self.run_central()?;
        }
        let got_a = self.drain_events(a).len();
        let got_b = self.drain_events(b).len();
        let line = format!(
            "t={} {}↔{} frames={} stored={got_a}/{got_b} complete={complete}",
            self.now, self.nodes[a].name, self.nodes[b].name, out.frames
        );
        self.record(line);
        Ok(complete)
    }

    /// A bundle by hand: every document of `from` goes to `to`, checked like any change.
    pub(crate) fn bundle(&mut self, from: usize, to: usize) -> Result<(), SimError> {
        self.clock(from);
        self.clock(to);
        let to_key = self.nodes[to].key;
        let from_key = self.nodes[from].key;
        let name = self.nodes[from].name.clone();
        let start = self.nodes[from]
            .engine()
            .sync_start(&to_key, &name)
            .map_err(|e| fail("bundle", e))?;
        let wanted: Vec<([u8; 16], Vec<[u8; 32]>)> = start
            .items
            .iter()
            .map(|(id, _, _)| (*id, Vec::new()))
            .collect();
        let payloads = self.nodes[from]
            .engine()
            .payloads(&to_key, &wanted)
            .map_err(|e| fail("bundle", e))?;
        let bytes: u64 = payloads
            .iter()
            .map(|p| (p.data.len() + p.envelopes.len()) as u64)
            .sum();
        self.nodes[from].bytes_today += bytes;
        let n = payloads.len();
        let e = self.nodes[to].engine();
        let report = e
            .merge(payloads, &fieldmesh_engine::Source::Peer(from_key))
            .map_err(|er| fail("bundle", er))?;
        e.flush().map_err(|er| fail("bundle", er))?;
        self.drain_events(to);
        let line = format!(
            "bundle {}→{} {n} docs, {} changed",
            self.nodes[from].name, self.nodes[to].name, report.changed
        );
        self.record(line);
        Ok(())
    }

    /// Connectivity returns: rounds of every officer with its hub and every hub with central,
    /// without faults, until honest nodes hold the same documents.
    pub(crate) fn heal(&mut self) -> Result<(), SimError> {
        let last_day = self.sc.days;
        for round in 1..=self.sc.heal_rounds {
            self.now = super::T0 + i64::from(last_day) * super::DAY + i64::from(round) * 3600;
            for o in self.officers().into_iter().chain(self.claim_admins()) {
                let hub = self.nodes[o].hub;
                self.contact(o, hub, false)?;
            }
            for h in self.hubs() {
                if !self.partitioned(h, last_day, true) {
                    self.contact(h, 0, false)?;
                }
            }
            for o in self.officers().into_iter().chain(self.claim_admins()) {
                let hub = self.nodes[o].hub;
                self.contact(o, hub, false)?;
            }
            if self.converged()? {
                self.out.converged_after = Some(round);
                return Ok(());
            }
        }
        Ok(())
    }

    /// The documents of node `i` with their heads, sorted.
    pub(crate) fn items(&mut self, i: usize) -> Result<Items, SimError> {
        let mut items: Items = self.nodes[i]
            .engine()
            .items()
            .map_err(|e| fail("digest", e))?
            .into_iter()
            .map(|(id, h, _)| (id, h))
            .collect();
        items.sort();
        Ok(items)
    }

    /// Documents held by node `i`.
    pub(crate) fn documents(&self, i: usize) -> u64 {
        self.nodes[i]
            .store
            .stats()
            .map(|s| s.documents)
            .unwrap_or(0)
    }
}

/// Two distinct nodes, mutably.
fn pair_mut(nodes: &mut [Node], a: usize, b: usize) -> (&mut Node, &mut Node) {
    assert_ne!(a, b, "a node does not sync with itself");
    if a < b {
        let (x, y) = nodes.split_at_mut(b);
        (&mut x[a], &mut y[0])
    } else {
        let (x, y) = nodes.split_at_mut(a);
        (&mut y[0], &mut x[b])
    }
}

/// Whether the connection is lost before the next frame arrives, as the scenario's faults say.
/// The transport is an ordered, authenticated stream (Yamux over Noise): a frame lost,
/// duplicated, reordered or replayed by the network, or one that arrives after the receiver's
/// frame deadline, all end the same way: the connection (and with it the session) goes, at that
/// frame. Each side keeps what it completed before.
fn cut(rng: &mut Rng, f: &Faults) -> bool {
    [f.drop, f.duplicate, f.reorder, f.delay, f.replay]
        .into_iter()
        .any(|p| p > 0.0 && (rng.next_u64() as f64 / u64::MAX as f64) < p)
}

/// What a device does to the documents it sends: a byzantine one corrupts their signatures.
fn byzantine_filter(byzantine: bool) -> impl FnMut(&mut Vec<DocPayload>) {
    move |payloads: &mut Vec<DocPayload>| {
        if byzantine {
            for p in payloads {
                if let Some(b) = p.envelopes.get_mut(40) {
                    *b ^= 0x55;
                }
            }
        }
    }
}
