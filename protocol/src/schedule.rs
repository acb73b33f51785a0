//! When to sync: the rules of one node towards its peers, as a state machine without IO.
//!
//! The host tells the [`Scheduler`] what happens (a peer connected or left, the store advanced, a
//! session started or ended, a peer opened a session) and asks it, with the current time, what to
//! do now ([`Scheduler::poll`]): open a session with a peer, dial an explicit peer again, ask the
//! LAN who is there. The node runs it inside its network task; the simulation runs the same code
//! with simulated time, so the rules that run in the field are the rules that are simulated.
//!
//! # The rules
//!
//! - **One session per pair at a time.** A peer may have one session it opened and none of ours,
//!   or the other way round. When both open at once, the session of the peer with the lower id
//!   goes on (a session syncs both ways) and the other is refused; the refused side does not
//!   count it as a failure.
//! - **Who opens.** On a new connection, the peer with the lower id.
//! - **Nothing left behind.** Each peer is *owed* every store change that did not come from it
//!   (local writes, and documents received from other peers: that is how a hub passes a phone's
//!   change on to phones that never met it). A session that completes covers what the store held
//!   when the session started, whichever side opened it. While a connected peer is owed a change
//!   that no completed session covered, a session is opened again: a session that failed, that
//!   was refused in favour of the peer's, or that started before a write was durable never loses
//!   the push.
//! - **A cheap periodic session** (the checkpoint path: one round trip, ~150 bytes) runs with
//!   each connected peer after [`Limits::resync`] without one (the lower id first, the other as a
//!   fallback), which bounds how stale two connected nodes can be whatever else went wrong.
//! - **Failures back off**: a failed session is retried after 1 s, 2 s, 4 s… up to
//!   [`Limits::max_backoff`]; the host shows the error.
//! - **Deadlines**: every session has [`Limits::frame`] to receive each frame and
//!   [`Limits::session`] in all; the host ends a session that misses either and reports it as a
//!   failure, so a silent or stalled peer never holds a session.
//! - **Explicit peers** are dialled and re-dialled with the same backoff while not connected.
//! - **Discovery**: while no peer is connected, ask the LAN often ([`Limits::discover`] at
//!   first, slower after a minute alone), and at once when the network changes.

use std::collections::BTreeMap;

/// Time in milliseconds on the host's clock (monotonic; the origin does not matter).
pub type Millis = u64;

/// The deadlines and periods of the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest wait for the next frame of a session.
    pub frame: Millis,
    /// Longest session.
    pub session: Millis,
    /// A session with each connected peer at least this often.
    pub resync: Millis,
    /// Longest wait before retrying a failed session or dial.
    pub max_backoff: Millis,
    /// How often to ask the LAN for peers while none is connected (the first minute).
    pub discover: Millis,
    /// On a new connection, how long the peer with the higher id leaves the other to open the
    /// first session before it opens one itself.
    pub defer: Millis,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            frame: 30_000,
            session: 30 * 60_000,
            resync: 30_000,
            max_backoff: 30_000,
            discover: 5_000,
            defer: 3_000,
        }
    }
}

/// What the scheduler asks the host to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<P> {
    /// Open a session with this connected peer.
    Open(P),
    /// Dial explicit peer number `n` (as given to [`Scheduler::new`]).
    Dial(usize),
    /// Ask the LAN which peers are there (mDNS query).
    Discover,
}

/// Whether a session a peer opened may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Run it.
    Accept,
    /// Refuse it: a session with this peer is already running (one of ours, which wins the
    /// tie, or another of the peer's own).
    Refuse,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Complete: both sides hold what the other held when it started.
    Complete,
    /// Refused by the peer because its own session with us was running (not a failure).
    Superseded,
    /// Failed (the peer broke the protocol, went silent, disconnected, or a deadline passed).
    Failed,
}

#[derive(Debug, Clone, Default)]
struct PeerState {
    connected: bool,
    /// When the current connection came up.
    connected_at: Millis,
    /// No session completed on the current connection yet.
    fresh: bool,
    /// Highest store sequence of a change that did not come from this peer.
    owed: u64,
    /// Store sequence covered by the last complete session.
    synced: u64,
    /// A session we opened is running (with the store sequence it started from, once known).
    outbound: Option<Option<u64>>,
    /// A session the peer opened is running (same).
    inbound: Option<Option<u64>>,
    /// Our outbound session will be refused: the peer's inbound one won the tie.
    superseded: bool,
    /// When the last complete session ended.
    last_complete: Option<Millis>,
    /// Consecutive failures, and when to try again.
    failures: u32,
    retry_at: Millis,
}

impl PeerState {
    fn running(&self) -> bool {
        self.outbound.is_some() || self.inbound.is_some()
    }
}

#[derive(Debug, Clone)]
struct DialState<P> {
    peer: Option<P>,
    failures: u32,
    at: Millis,
}

/// One node's sync scheduling. `P` names peers; its order decides who opens and who wins ties
/// (the lower id).
#[derive(Debug, Clone)]
pub struct Scheduler<P: Ord + Clone> {
    me: P,
    limits: Limits,
    peers: BTreeMap<P, PeerState>,
    dials: Vec<DialState<P>>,
    /// The store's latest durable sequence.
    seq: u64,
    discover: bool,
    alone_since: Option<Millis>,
    next_discovery: Millis,
}

fn backoff(limits: &Limits, failures: u32) -> Millis {
    let exp = 1_000u64.saturating_mul(1 << failures.saturating_sub(1).min(16));
    exp.min(limits.max_backoff)
}

impl<P: Ord + Clone> Scheduler<P> {
    /// The scheduler of node `me` with `dials` explicit peers to keep connected, whose store is
    /// at sequence `seq`. `discover`: whether to ask the LAN for peers.
    pub fn new(me: P, limits: Limits, dials: usize, seq: u64, discover: bool) -> Self {
        Self {
            me,
            limits,
            peers: BTreeMap::new(),
            dials: (0..dials)
                .map(|_| DialState {
                    peer: None,
                    failures: 0,
                    at: 0,
                })
                .collect(),
            seq,
            discover,
            alone_since: Some(0),
            next_discovery: 0,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A peer connected (explicit peer number `dial`, if it was one we dialled).
    pub fn connected(&mut self, peer: P, dial: Option<usize>, now: Millis) {
        if let Some(d) = dial.and_then(|d| self.dials.get_mut(d)) {
            d.peer = Some(peer.clone());
            d.failures = 0;
        }
        let seq = self.seq;
        let p = self.peers.entry(peer).or_insert_with(|| PeerState {
            // Everything we hold may be new to a peer we meet for the first time.
            owed: seq,
            ..PeerState::default()
        });
        if !p.connected {
            p.connected = true;
            p.connected_at = now;
            p.fresh = true;
            p.retry_at = now;
        }
        self.alone_since = None;
    }

    /// A peer's last connection closed. Its running sessions are ended by the host, which
    /// reports them with [`Scheduler::ended`].
    pub fn disconnected(&mut self, peer: &P, now: Millis) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.connected = false;
        }
        for d in &mut self.dials {
            if d.peer.as_ref() == Some(peer) {
                d.peer = None;
                d.at = now;
            }
        }
        if !self.peers.values().any(|p| p.connected) {
            self.alone_since = Some(now);
            self.next_discovery = now;
        }
    }

    /// A dial of explicit peer number `n` failed.
    pub fn dial_failed(&mut self, n: usize, now: Millis) {
        let limits = self.limits;
        if let Some(d) = self.dials.get_mut(n) {
            d.failures = d.failures.saturating_add(1);
            d.at = now + backoff(&limits, d.failures);
        }
    }

    /// The network changed (an interface or address came or went): look for peers again.
    pub fn network_changed(&mut self, now: Millis) {
        self.next_discovery = now;
        for d in &mut self.dials {
            if d.peer.is_none() {
                d.at = now;
                d.failures = 0;
            }
        }
    }

    /// The store advanced to `seq` (durably), by a local write (`from` = `None`) or by documents
    /// received from `from`.
    pub fn changed(&mut self, seq: u64, from: Option<&P>) {
        self.seq = self.seq.max(seq);
        for (peer, p) in &mut self.peers {
            if Some(peer) != from {
                p.owed = p.owed.max(seq);
            }
        }
    }

    /// This node learnt a certificate or revocation: changes it or its peers refused before may
    /// be accepted now, and a peer served only certificates may be entitled to more. Every peer
    /// gets a session that starts from now.
    pub fn trust_changed(&mut self) {
        let seq = self.seq;
        for p in self.peers.values_mut() {
            p.owed = p.owed.max(seq);
            p.synced = p.synced.min(seq.saturating_sub(1));
        }
    }

    /// A session with `peer` exchanged changes of documents outside one side's scope: one more
    /// session confirms the peer holds every change of them (so that they may leave a device).
    pub fn again(&mut self, peer: &P) {
        let seq = self.seq;
        if let Some(p) = self.peers.get_mut(peer) {
            p.owed = p.owed.max(seq);
            p.synced = p.synced.min(seq.saturating_sub(1));
        }
    }

    /// A peer opened a session with us: whether it may run.
    pub fn inbound(&mut self, peer: &P, now: Millis) -> Admit {
        let me_lower = self.me < *peer;
        let seq = self.seq;
        let p = self.peers.entry(peer.clone()).or_insert_with(|| PeerState {
            connected: true,
            owed: seq,
            retry_at: now,
            ..PeerState::default()
        });
        if p.inbound.is_some() || (p.outbound.is_some() && me_lower) {
            return Admit::Refuse;
        }
        if p.outbound.is_some() {
            // Both opened at once and the peer's id is lower: its session goes on, ours will be
            // refused by it.
            p.superseded = true;
        }
        p.inbound = Some(None);
        Admit::Accept
    }

    /// A session (ours if `outbound`) took its snapshot of the store at sequence `seq`.
    pub fn started(&mut self, peer: &P, outbound: bool, seq: u64) {
        if let Some(p) = self.peers.get_mut(peer) {
            let slot = if outbound {
                &mut p.outbound
            } else {
                &mut p.inbound
            };
            if slot.is_some() {
                *slot = Some(Some(seq));
            }
        }
    }

    /// A session (ours if `outbound`) ended. Returns whether a failure counts as one: a
    /// session of ours that the peer refused because its own won the tie does not.
    pub fn ended(&mut self, peer: &P, outbound: bool, how: Ended, now: Millis) -> bool {
        let limits = self.limits;
        let Some(p) = self.peers.get_mut(peer) else {
            return how == Ended::Failed;
        };
        let slot = if outbound {
            p.outbound.take()
        } else {
            p.inbound.take()
        };
        let superseded = outbound && std::mem::take(&mut p.superseded);
        match how {
            Ended::Complete => {
                if let Some(Some(seq)) = slot {
                    p.synced = p.synced.max(seq);
                }
                p.last_complete = Some(now);
                p.fresh = false;
                p.failures = 0;
                p.retry_at = now;
            }
            Ended::Superseded => {}
            Ended::Failed if superseded => {}
            Ended::Failed => {
                p.failures = p.failures.saturating_add(1);
                p.retry_at = now + backoff(&limits, p.failures);
                return true;
            }
        }
        false
    }

    /// Whether `peer` is owed a change no complete session covered.
    pub fn owed(&self, peer: &P) -> bool {
        self.peers.get(peer).is_some_and(|p| p.owed > p.synced)
    }

    /// Whether nothing is due with the connected `peer` but the periodic resync: no session
    /// running, the first session of the connection complete, nothing owed.
    pub fn idle(&self, peer: &P) -> bool {
        self.peers
            .get(peer)
            .is_none_or(|p| !p.running() && !p.fresh && p.owed <= p.synced)
    }

    /// Whether a session with `peer` is running.
    pub fn running(&self, peer: &P) -> bool {
        self.peers.get(peer).is_some_and(PeerState::running)
    }

    /// What to do now; marks the sessions it asks for as running.
    pub fn poll(&mut self, now: Millis) -> Vec<Command<P>> {
        let mut out = Vec::new();
        let limits = self.limits;
        for (peer, p) in &mut self.peers {
            if !p.connected || p.running() || now < p.retry_at {
                continue;
            }
            if Self::due(&self.me, peer, p, &limits) <= now {
                p.outbound = Some(None);
                out.push(Command::Open(peer.clone()));
            }
        }
        for (n, d) in self.dials.iter_mut().enumerate() {
            let up = d
                .peer
                .as_ref()
                .is_some_and(|peer| self.peers.get(peer).is_some_and(|p| p.connected));
            if !up && now >= d.at {
                d.failures = d.failures.saturating_add(1);
                d.at = now + backoff(&limits, d.failures);
                out.push(Command::Dial(n));
            }
        }
        if self.discover
            && let Some(since) = self.alone_since
            && now >= self.next_discovery
        {
            out.push(Command::Discover);
            let every = if now.saturating_sub(since) < 60_000 {
                limits.discover
            } else {
                limits.discover * 6
            };
            self.next_discovery = now + every;
        }
        out
    }

    /// When a session with the connected, idle `peer` is due: at once on a new connection if we
    /// have the lower id (else after [`Limits::defer`], if the peer is owed changes), as soon as
    /// the peer is owed a change, and after [`Limits::resync`] without a session (half as long
    /// again for the peer with the higher id); never before a failure's backoff is over.
    fn due(me: &P, peer: &P, p: &PeerState, limits: &Limits) -> Millis {
        let me_lower = *me < *peer;
        let owed = p.owed > p.synced;
        let base = p
            .last_complete
            .unwrap_or(p.connected_at)
            .max(p.connected_at);
        let mut due = base
            + if me_lower {
                limits.resync
            } else {
                limits.resync + limits.resync / 2
            };
        if p.fresh && me_lower {
            due = p.connected_at;
        } else if owed {
            due = if p.fresh {
                p.connected_at + limits.defer
            } else {
                0
            };
        }
        due.max(p.retry_at)
    }

    /// The latest time by which [`Scheduler::poll`] has something new to say, if nothing else
    /// happens before (the host may poll earlier).
    pub fn next_wakeup(&self, now: Millis) -> Option<Millis> {
        let mut next: Option<Millis> = None;
        let mut at = |t: Millis| next = Some(next.map_or(t, |n| n.min(t)).max(now));
        for (peer, p) in &self.peers {
            if p.connected && !p.running() {
                at(Self::due(&self.me, peer, p, &self.limits));
            }
        }
        for d in &self.dials {
            if d.peer.is_none() {
                at(d.at);
            }
        }
        if self.discover && self.alone_since.is_some() {
            at(self.next_discovery);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn the_lower_id_opens_on_connect_and_the_other_waits() {
        let mut a = Scheduler::new(1u8, limits(), 0, 0, false);
        let mut b = Scheduler::new(2u8, limits(), 0, 0, false);
        a.connected(2, None, 0);
        b.connected(1, None, 0);
        assert_eq!(a.poll(0), vec![Command::Open(2)]);
        assert_eq!(b.poll(0), vec![]);
        // Nothing more while it runs.
        assert_eq!(a.poll(10), vec![]);
    }

    #[test]
    fn a_write_during_a_session_is_pushed_by_another_one() {
        let mut a = Scheduler::new(1u8, limits(), 0, 5, false);
        a.connected(2, None, 0);
        assert_eq!(a.poll(0), vec![Command::Open(2)]);
        a.started(&2, true, 5);
        // A write lands after the session took its snapshot.
        a.changed(6, None);
        a.ended(&2, true, Ended::Complete, 100);
        assert!(a.owed(&2));
        assert_eq!(a.poll(100), vec![Command::Open(2)]);
        a.started(&2, true, 6);
        a.ended(&2, true, Ended::Complete, 200);
        assert!(!a.owed(&2));
        assert_eq!(a.poll(200), vec![]);
    }

    #[test]
    fn changes_from_a_peer_are_passed_on_to_the_others_only() {
        let mut hub = Scheduler::new(5u8, limits(), 0, 0, false);
        for p in [1, 9] {
            hub.connected(p, None, 0);
            hub.inbound(&p, 0);
            hub.started(&p, false, 0);
            hub.ended(&p, false, Ended::Complete, 0);
        }
        hub.changed(3, Some(&1));
        assert!(!hub.owed(&1));
        assert!(hub.owed(&9));
        assert_eq!(hub.poll(1), vec![Command::Open(9)]);
    }

    #[test]
    fn a_failed_session_is_retried_with_backoff() {
        let mut a = Scheduler::new(1u8, limits(), 0, 3, false);
        a.connected(2, None, 0);
        assert_eq!(a.poll(0), vec![Command::Open(2)]);
        a.started(&2, true, 3);
        a.ended(&2, true, Ended::Failed, 10);
        assert_eq!(a.poll(500), vec![]);
        assert_eq!(a.poll(1_010), vec![Command::Open(2)]);
        a.ended(&2, true, Ended::Failed, 1_020);
        assert_eq!(a.poll(2_000), vec![]);
        assert_eq!(a.poll(3_020), vec![Command::Open(2)]);
    }

    #[test]
    fn when_both_open_at_once_the_lower_id_wins_and_nothing_is_lost() {
        let mut a = Scheduler::new(1u8, limits(), 0, 0, false);
        let mut b = Scheduler::new(2u8, limits(), 0, 0, false);
        a.connected(2, None, 0);
        b.connected(1, None, 0);
        a.poll(0);
        a.started(&2, true, 0);
        a.ended(&2, true, Ended::Complete, 1);
        b.inbound(&1, 0);
        b.started(&1, false, 0);
        b.ended(&1, false, Ended::Complete, 1);
        // Both write at once and both open.
        a.changed(1, None);
        b.changed(1, None);
        assert_eq!(a.poll(2), vec![Command::Open(2)]);
        assert_eq!(b.poll(2), vec![Command::Open(1)]);
        // a refuses b's session (a's id is lower); b accepts a's.
        assert_eq!(a.inbound(&2, 2), Admit::Refuse);
        assert_eq!(b.inbound(&1, 2), Admit::Accept);
        b.started(&1, false, 1);
        a.started(&2, true, 1);
        // b's own session fails (refused): no backoff, and a's session covered b's write.
        assert!(!b.ended(&1, true, Ended::Failed, 3));
        a.ended(&2, true, Ended::Complete, 4);
        b.ended(&1, false, Ended::Complete, 4);
        assert!(!a.owed(&2));
        assert!(!b.owed(&1));
    }

    #[test]
    fn a_second_session_from_the_same_peer_is_refused() {
        let mut a = Scheduler::new(1u8, limits(), 0, 0, false);
        a.connected(2, None, 0);
        assert_eq!(a.inbound(&2, 0), Admit::Accept);
        assert_eq!(a.inbound(&2, 0), Admit::Refuse);
    }

    #[test]
    fn connected_peers_resync_periodically() {
        let mut a = Scheduler::new(1u8, limits(), 0, 0, false);
        a.connected(2, None, 0);
        a.poll(0);
        a.started(&2, true, 0);
        a.ended(&2, true, Ended::Complete, 0);
        assert_eq!(a.poll(29_000), vec![]);
        assert_eq!(a.next_wakeup(29_000), Some(30_000));
        assert_eq!(a.poll(30_000), vec![Command::Open(2)]);
    }

    #[test]
    fn explicit_peers_are_redialled_and_discovery_runs_while_alone() {
        let mut a = Scheduler::new(1u8, limits(), 1, 0, true);
        assert_eq!(a.poll(0), vec![Command::Dial(0), Command::Discover]);
        a.dial_failed(0, 10);
        assert_eq!(a.poll(500), vec![]);
        assert_eq!(a.poll(5_000), vec![Command::Dial(0), Command::Discover]);
        a.connected(2, Some(0), 5_100);
        // Connected: no more dialling or discovery; the first session opens.
        assert_eq!(a.poll(20_000), vec![Command::Open(2)]);
        a.disconnected(&2, 30_000);
        assert_eq!(a.poll(30_000), vec![Command::Dial(0), Command::Discover]);
    }
}
