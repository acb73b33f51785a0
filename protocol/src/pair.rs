//! Two sides of a session in one process, frames carried in memory: the one loop that tests,
//! benchmarks and the simulation use to run sessions without a network.
//!
//! Each side is a [`Driver`] and a [`Host`] that reads and merges documents. Frames travel in
//! *flights* (everything one side sends before it hears back), alternately; `deliver` sees every
//! frame before it arrives and may cut the link there (the simulation's faults, a test's lost
//! connection). A side that completes before the cut records its checkpoint, as on a real link.

use crate::DocId;
use crate::driver::{Driver, Step, Totals};
use crate::wire::{Checkpoint, DocPayload, Heads};

/// Why a host could not read, merge or record.
pub type HostError = Box<dyn std::error::Error + Send + Sync>;

/// A host's refusal of what the peer sent (not a failure of the host): the session stops there,
/// as the node ends a session whose peer sent what it may not.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// What a side's store does for a session.
pub trait Host {
    /// The documents asked for, each after the heads the peer holds of it.
    fn read(&mut self, wanted: &[(DocId, Heads)]) -> Result<Vec<DocPayload>, HostError>;
    /// Merges received documents durably; returns how many changed.
    fn merge(&mut self, docs: Vec<DocPayload>) -> Result<usize, HostError>;
    /// Of documents the peer announced as outside this side's scope (with its heads), those this
    /// side holds with other heads, as `(document, the peer's heads, this side's heads)`; may
    /// drop those it holds with the same heads (see [`Step::Outside`]). Holds none by default.
    fn outside(
        &mut self,
        theirs: &[(DocId, Heads)],
    ) -> Result<Vec<(DocId, Heads, Heads)>, HostError> {
        let _ = theirs;
        Ok(Vec::new())
    }
    /// The session completed on this side: record the checkpoint (if any).
    fn complete(&mut self, checkpoint: Option<Checkpoint>) -> Result<(), HostError>;
}

/// Which side a frame goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The initiator.
    A,
    /// The responder.
    B,
}

/// How a session between two in-memory sides went.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Flights of frames (half the round trips, rounded up).
    pub flights: u32,
    /// Frames delivered.
    pub frames: usize,
    /// The initiator's totals, if it completed.
    pub a: Option<Totals>,
    /// The responder's totals, if it completed.
    pub b: Option<Totals>,
    /// Why the session stopped early: the link was cut, or a side refused what it received.
    pub stopped: Option<String>,
}

impl Outcome {
    /// Whether both sides completed.
    pub fn complete(&self) -> bool {
        self.a.is_some() && self.b.is_some() && self.stopped.is_none()
    }
}

/// Carries out `steps` of `driver` with `host`, appending frames to send to `out`; returns the
/// totals when the session completes on this side.
pub fn carry(
    driver: &mut Driver,
    host: &mut dyn Host,
    steps: Vec<Step>,
    out: &mut Vec<Vec<u8>>,
) -> Result<Option<Totals>, HostError> {
    let mut done = None;
    for step in steps {
        let more = match step {
            Step::Send(frame) => {
                out.push(frame);
                Vec::new()
            }
            Step::Read(ids) => {
                let docs = host.read(&ids)?;
                driver.docs_read(docs)
            }
            Step::Merge(docs) => {
                let changed = host.merge(docs)?;
                driver.merged(changed)
            }
            Step::Outside(theirs) => {
                let differ = host.outside(&theirs)?;
                driver.outside_held(differ)
            }
            Step::Complete(checkpoint) => {
                host.complete(checkpoint)?;
                done = Some(driver.totals());
                Vec::new()
            }
        };
        if let Some(t) = carry(driver, host, more, out)? {
            done = Some(t);
        }
    }
    Ok(done)
}

/// Runs a session between `a` (initiator, started here) and `b` until no frame is in flight.
/// `deliver` sees each frame before it reaches its side and returns `false` to cut the link
/// there. Host failures are errors; protocol failures stop the session (see
/// [`Outcome::stopped`]).
pub fn run<'h>(
    a: &mut Driver,
    ha: &mut (dyn Host + 'h),
    b: &mut Driver,
    hb: &mut (dyn Host + 'h),
    deliver: &mut dyn FnMut(Side, &[u8]) -> bool,
) -> Result<Outcome, HostError> {
    let mut out = Outcome::default();
    let mut to_b = Vec::new();
    let steps = a.start()?;
    if let Some(t) = carry(a, ha, steps, &mut to_b)? {
        out.a = Some(t);
    }
    let mut to_a: Vec<Vec<u8>> = Vec::new();
    while !to_b.is_empty() || !to_a.is_empty() {
        for side in [Side::B, Side::A] {
            let (flight, driver, host, back) = match side {
                Side::B => (std::mem::take(&mut to_b), &mut *b, &mut *hb, &mut to_a),
                Side::A => (std::mem::take(&mut to_a), &mut *a, &mut *ha, &mut to_b),
            };
            if flight.is_empty() {
                continue;
            }
            out.flights += 1;
            for frame in flight {
                if !deliver(side, &frame) {
                    out.stopped = Some("the link was cut".into());
                    return Ok(out);
                }
                out.frames += 1;
                let steps = match driver.receive(&frame) {
                    Ok(s) => s,
                    Err(e) => {
                        out.stopped = Some(e.to_string());
                        return Ok(out);
                    }
                };
                match carry(driver, host, steps, back) {
                    Ok(Some(t)) => match side {
                        Side::A => out.a = Some(t),
                        Side::B => out.b = Some(t),
                    },
                    Ok(None) => {}
                    Err(e) => match e.downcast::<Refused>() {
                        Ok(refused) => {
                            out.stopped = Some(refused.0);
                            return Ok(out);
                        }
                        Err(e) => return Err(e),
                    },
                }
            }
        }
    }
    Ok(out)
}
