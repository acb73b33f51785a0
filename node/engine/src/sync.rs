//! Carrying out a sync session's steps against an engine, synchronously.
//!
//! The rules of a session live in [`fieldmesh_protocol::Driver`]; this is the executor the
//! simulation and the in-process tests use: reads and merges happen at once on the calling
//! thread. The node carries out the same steps asynchronously on its engine thread, overlapping
//! merges with the network.

use fieldmesh_protocol::{DocPayload, Driver, Step, Totals};
use fieldmesh_trust::PeerKey;

use crate::Engine;
use crate::error::{MergeError, SyncError};
use crate::source::Source;

/// Why carrying out a step failed on this side.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// Reading documents to send, or recording the checkpoint, failed.
    #[error(transparent)]
    Serve(#[from] SyncError),
    /// Merging received documents failed.
    #[error(transparent)]
    Merge(#[from] MergeError),
}

/// Carries out `steps` of `driver` (a session with `peer`) against `engine`, appending the
/// frames to send to `out` in order. Returns the totals once the session is complete and its
/// checkpoint recorded.
pub fn carry_out(
    engine: &mut Engine,
    peer: &PeerKey,
    driver: &mut Driver,
    steps: Vec<Step>,
    out: &mut Vec<Vec<u8>>,
) -> Result<Option<Totals>, StepError> {
    carry_out_with(engine, peer, driver, steps, out, &mut |_| {})
}

/// [`carry_out`], letting `outgoing` see (and alter) every batch of documents before it is sent:
/// the simulation's byzantine devices corrupt their signatures there.
pub fn carry_out_with(
    engine: &mut Engine,
    peer: &PeerKey,
    driver: &mut Driver,
    steps: Vec<Step>,
    out: &mut Vec<Vec<u8>>,
    outgoing: &mut dyn FnMut(&mut Vec<DocPayload>),
) -> Result<Option<Totals>, StepError> {
    let mut done = None;
    for step in steps {
        let more = match step {
            Step::Send(frame) => {
                out.push(frame);
                Vec::new()
            }
            Step::Read(ids) => {
                let mut payloads = engine.payloads(peer, &ids)?;
                outgoing(&mut payloads);
                driver.docs_read(payloads)
            }
            Step::Merge(docs) => {
                let report = engine.merge(docs, &Source::Peer(*peer))?;
                engine.flush().map_err(MergeError::from)?;
                driver.merged(report.changed)
            }
            Step::Complete(checkpoint) => {
                if let Some(c) = checkpoint {
                    engine.record_checkpoint(peer, &c)?;
                }
                done = Some(driver.totals());
                Vec::new()
            }
        };
        if let Some(t) = carry_out_with(engine, peer, driver, more, out, outgoing)? {
            done = Some(t);
        }
    }
    Ok(done)
}
