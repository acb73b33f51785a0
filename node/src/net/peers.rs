//! What the node knows of its peers, for `/status`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fieldmesh_protocol::Totals;
use serde::Serialize;

/// What `/status` shows of one peer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PeerInfo {
    /// Whether a connection is open now.
    pub connected: bool,
    /// Unix time of the last completed session.
    pub last_sync: Option<i64>,
    /// Sessions completed.
    pub sessions: u64,
    /// Sessions that failed.
    pub failures: u64,
    /// Documents sent to the peer.
    pub docs_sent: u64,
    /// Documents received from it.
    pub docs_received: u64,
    /// Bytes sent on sync streams.
    pub bytes_sent: u64,
    /// Bytes received on sync streams.
    pub bytes_received: u64,
    /// How the last session found the differences: `checkpoint` (the fast path of peers that
    /// synced before) or `reconciliation` (first contact, or a checkpoint one side lost).
    pub last_path: Option<&'static str>,
    /// The last session error, if the last session failed.
    pub last_error: Option<String>,
}

impl PeerInfo {
    /// Counts a completed session.
    pub fn completed(&mut self, t: &Totals, now: i64) {
        self.last_sync = Some(now);
        self.sessions += 1;
        self.docs_sent += t.docs_sent;
        self.docs_received += t.docs_received;
        self.bytes_sent += t.bytes_sent;
        self.bytes_received += t.bytes_received;
        self.last_error = None;
        self.last_path = Some(if t.fast {
            "checkpoint"
        } else {
            "reconciliation"
        });
    }

    /// Counts a failed session.
    pub fn failed(&mut self, error: String) {
        self.failures += 1;
        self.last_error = Some(error);
    }
}

/// Peers by peer id, shared with the HTTP API.
pub type PeerTable = Arc<Mutex<BTreeMap<String, PeerInfo>>>;
