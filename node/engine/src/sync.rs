//! Carrying out a sync session's steps against an engine, synchronously.
//!
//! The rules of a session live in [`fieldmesh_protocol::Driver`]; [`EngineHost`] is what the
//! simulation and the in-process tests give it to read and merge documents with an engine (see
//! [`fieldmesh_protocol::pair`]). The node carries out the same steps asynchronously on its engine
//! thread, overlapping merges with the network.

use fieldmesh_protocol::pair::{Host, HostError, Refused};
use fieldmesh_protocol::{Checkpoint, DocPayload, Heads};
use fieldmesh_trust::PeerKey;

use crate::Engine;
use crate::error::MergeError;
use crate::source::Source;

/// Something that sees (and may alter) a batch of documents before it is sent.
pub type Outgoing<'a> = &'a mut dyn FnMut(&mut Vec<DocPayload>);

/// An engine as one side of a session with `peer`.
pub struct EngineHost<'a> {
    /// The engine.
    pub engine: &'a mut Engine,
    /// The peer on the other side.
    pub peer: PeerKey,
    /// Sees (and may alter) every batch of documents before it is sent: the simulation's
    /// byzantine devices corrupt their signatures there.
    pub outgoing: Option<Outgoing<'a>>,
}

impl<'a> EngineHost<'a> {
    /// `engine` talking to `peer`.
    pub fn new(engine: &'a mut Engine, peer: PeerKey) -> Self {
        Self {
            engine,
            peer,
            outgoing: None,
        }
    }
}

impl Host for EngineHost<'_> {
    fn read(&mut self, wanted: &[([u8; 16], Heads)]) -> Result<Vec<DocPayload>, HostError> {
        let mut docs = self.engine.payloads(&self.peer, wanted)?;
        if let Some(f) = self.outgoing.as_mut() {
            f(&mut docs);
        }
        Ok(docs)
    }

    fn merge(&mut self, docs: Vec<DocPayload>) -> Result<usize, HostError> {
        let report = match self.engine.merge(docs, &Source::Peer(self.peer)) {
            Err(e @ MergeError::Uncertified { .. }) => {
                return Err(Box::new(Refused(e.to_string())));
            }
            r => r?,
        };
        self.engine.flush().map_err(MergeError::from)?;
        Ok(report.changed)
    }

    fn outside(
        &mut self,
        theirs: &[([u8; 16], Heads)],
    ) -> Result<Vec<([u8; 16], Heads, Heads)>, HostError> {
        Ok(self.engine.outside_check(&self.peer, theirs)?)
    }

    fn complete(&mut self, checkpoint: Option<Checkpoint>) -> Result<(), HostError> {
        if let Some(c) = checkpoint {
            self.engine.record_checkpoint(&self.peer, &c)?;
        }
        Ok(())
    }
}
