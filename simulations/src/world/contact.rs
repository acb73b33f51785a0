//! Nodes meeting: while two nodes are in contact they run the sessions their schedulers ask for,
//! each a pair of real [`Driver`]s whose frames are carried in memory, with faults.

use std::collections::VecDeque;

use fieldmesh_engine::carry_out_with;
use fieldmesh_protocol::{Admit, Command, Driver, Ended, Role};
use fieldmesh_storage::Store as _;

use super::{World, fail, limits};
use crate::SimError;

/// A node's documents with their heads, sorted.
pub(crate) type Items = Vec<([u8; 16], Vec<[u8; 32]>)>;

/// Frames a session may exchange before it is abandoned.
const SESSION_FRAME_LIMIT: usize = 10_000;
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
        let (seq_a, seq_b) = (start_a.local.seq, start_b.local.seq);
        let mut da = Driver::new(Role::Initiator, start_a).map_err(|e| fail("session", e))?;
        let mut db = Driver::new(Role::Responder, start_b).map_err(|e| fail("session", e))?;
        self.nodes[a].sched.started(&kb, true, seq_a);
        self.nodes[b].sched.started(&ka, false, seq_b);
        let mut to_b: VecDeque<Vec<u8>> = VecDeque::new();
        let mut to_a: VecDeque<Vec<u8>> = VecDeque::new();
        let (mut frames, mut aborted) = (0usize, false);
        let (mut done_a, mut done_b) = (false, false);
        let steps = da.start().map_err(|e| fail("session", e))?;
        let mut sent = Vec::new();
        done_a |= self.carry(a, &kb, &mut da, steps, &mut sent)?;
        to_b.extend(sent);
        'run: while !to_b.is_empty() || !to_a.is_empty() {
            for side in [0, 1] {
                let queue = if side == 0 { &mut to_b } else { &mut to_a };
                let mut flight: VecDeque<Vec<u8>> = std::mem::take(queue);
                while let Some(frame) = flight.pop_front() {
                    frames += 1;
                    if frames > SESSION_FRAME_LIMIT {
                        aborted = true;
                        break 'run;
                    }
                    if faulty && self.cut() {
                        // The connection is lost here: nothing more of this session arrives.
                        aborted = true;
                        break 'run;
                    }
                    let (me, peer, driver) = if side == 0 {
                        (b, ka, &mut db)
                    } else {
                        (a, kb, &mut da)
                    };
                    let Ok(steps) = driver.receive(&frame) else {
                        aborted = true;
                        break 'run;
                    };
                    let mut out = Vec::new();
                    let finished = self.carry(me, &peer, driver, steps, &mut out)?;
                    if side == 0 {
                        done_b |= finished;
                        to_a.extend(out);
                    } else {
                        done_a |= finished;
                        to_b.extend(out);
                    }
                }
            }
        }
        let complete = !aborted && done_a && done_b;
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
            .ended(&kb, true, how(done_a && !aborted), t);
        self.nodes[b]
            .sched
            .ended(&ka, false, how(done_b && !aborted), t);
        if !complete {
            self.out.aborted += 1;
        }
        let got_a = self.drain_events(a).len();
        let got_b = self.drain_events(b).len();
        let line = format!(
            "t={} {}↔{} frames={frames} stored={got_a}/{got_b} complete={complete}",
            self.now, self.nodes[a].name, self.nodes[b].name
        );
        self.record(line);
        Ok(complete)
    }

    /// Whether the connection is lost before the next frame arrives, as the scenario's faults
    /// say. The transport is an ordered, authenticated stream (Yamux over Noise): a frame lost,
    /// duplicated, reordered or replayed by the network, or one that arrives after the peer's
    /// frame deadline, all end the same way: the connection (and with it the session) goes, at
    /// that frame. Each side keeps what it completed before.
    fn cut(&mut self) -> bool {
        let f = self.sc.faults.clone();
        [f.drop, f.duplicate, f.reorder, f.delay, f.replay]
            .into_iter()
            .any(|p| self.chance(p))
    }

    /// Carries out a driver's steps against node `me`'s engine (a byzantine device corrupts the
    /// signatures of what it sends); returns whether the session completed on this side.
    fn carry(
        &mut self,
        me: usize,
        peer: &fieldmesh_trust::PeerKey,
        driver: &mut Driver,
        steps: Vec<fieldmesh_protocol::Step>,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<bool, SimError> {
        let byzantine = self.nodes[me].byzantine;
        let name = self.nodes[me].name.clone();
        let mut corrupt = |payloads: &mut Vec<fieldmesh_protocol::DocPayload>| {
            if byzantine {
                for p in payloads {
                    if let Some(b) = p.envelopes.get_mut(40) {
                        *b ^= 0x55;
                    }
                }
            }
        };
        let done = carry_out_with(
            self.nodes[me].engine(),
            peer,
            driver,
            steps,
            out,
            &mut corrupt,
        )
        .map_err(|e| fail(&name, e))?;
        self.nodes[me].bytes_today += out.iter().map(|f| f.len() as u64).sum::<u64>();
        Ok(done.is_some())
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
            for o in self.officers() {
                let hub = self.nodes[o].hub;
                self.contact(o, hub, false)?;
            }
            for h in self.hubs() {
                if !self.partitioned(h, last_day, true) {
                    self.contact(h, 0, false)?;
                }
            }
            for o in self.officers() {
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
