//! Scope: what a node holds and serves.
//!
//! A document is held at the places [`fieldmesh_fhir_docs::openimis::holding_places`] names (the
//! same places the trust decision checks a scoped author against): the villages of an insuree or
//! a family, the facility of a claim, the places a policy, a payment or an adjudication declares
//! (copied from the family, insuree or claim when it was written, so every node decides alike
//! whether or not it holds that family), or everywhere for reference data and certificates. The
//! engine indexes those places with every document ([`crate::core::place_entries`]), so a
//! session lists a peer's share through the index without reading documents.
//!
//! A node's [`Reach`] comes from its certificate, never from what it says: central holds
//! everything; any other node the places its valid certificates name and every place below them
//! in the location tree (a hub certified for a district holds its wards, villages and
//! facilities). A peer is offered only documents within its reach; a node keeps only documents
//! within its own (or already held: see [`Engine::outside_check`]).
//!
//! Documents a node holds outside its reach (it was re-scoped, or an insuree moved away) leave it
//! only once a node that keeps them (central, or a hub) is known to hold every change of them:
//! that node announces them with its heads (`Outside`), and equal heads are the proof.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use automerge::ChangeHash;
use fieldmesh_fhir_docs::DocId;
use fieldmesh_fhir_docs::openimis::{
    AUTHOR_INDEX, EVERYWHERE, LEFT_INDEX, PLACE_INDEX, Role, parent_places, place_names,
};
use fieldmesh_protocol::{Heads, Item};
use fieldmesh_storage::{IndexEntries, StoreError, Write};
use fieldmesh_trust::PeerKey;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::Engine;
use crate::core::CERTIFICATE_TOKEN;
use crate::error::{ReadError, SyncError};

/// The places a node may hold documents of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Everything (central).
    All,
    /// The documents held at these places (and reference data, held everywhere).
    Places {
        /// The places named and every place below them, by every name they go by.
        places: BTreeSet<String>,
        /// The places above them: their locations are held (a village's ward, district,
        /// region), not what lies at them.
        above: BTreeSet<String>,
    },
}

impl Reach {
    /// No place: reference data held everywhere only.
    pub fn nothing() -> Self {
        Reach::Places {
            places: BTreeSet::new(),
            above: BTreeSet::new(),
        }
    }

    /// Whether a document with these index entries is within reach.
    pub fn holds(&self, entries: &IndexEntries) -> bool {
        match self {
            Reach::All => true,
            // The places above count for their locations only (kept on receipt whatever the
            // reach: see `Engine::keeps_new`), never for what lies at them.
            Reach::Places { places, .. } => entries.references.iter().any(|(t, _, p)| {
                t == PLACE_INDEX && (p == EVERYWHERE || places.contains(p.as_str()))
            }),
        }
    }

    /// A digest of the reach: a checkpoint recorded under one reach is not used under another
    /// (documents newly within reach would never be announced on the checkpoint path).
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"fieldmesh-reach-v1");
        match self {
            Reach::All => h.update(b"all"),
            Reach::Places { places, above } => {
                for p in places {
                    h.update((p.len() as u64).to_be_bytes());
                    h.update(p.as_bytes());
                }
                h.update(b"above");
                for p in above {
                    h.update((p.len() as u64).to_be_bytes());
                    h.update(p.as_bytes());
                }
            }
        }
        h.finalize().into()
    }

    /// The reach as `/status` shows it.
    pub fn describe(&self) -> Value {
        match self {
            Reach::All => json!("everything"),
            Reach::Places { places, .. } => json!(places),
        }
    }
}

/// The location tree: which places lie below which (from the `Location`s and `Organization`s
/// this node holds, all reference data authored by central).
#[derive(Debug, Default)]
pub(crate) struct Tree {
    /// The names of each location or facility.
    names: Vec<Vec<String>>,
    /// By name: the locations and facilities directly below it.
    children: HashMap<String, Vec<usize>>,
    /// By name: the location or facility going by it.
    by_name: HashMap<String, Vec<usize>>,
    /// The places each location or facility lies in.
    parents: Vec<Vec<String>>,
}

impl Tree {
    /// `named` and every place below one of them, by every name they go by.
    pub(crate) fn expand<'a>(&self, named: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = BTreeSet::new();
        let mut queue: VecDeque<usize> = VecDeque::new();
        let mut seen: HashSet<usize> = HashSet::new();
        for n in named {
            out.insert(n.to_string());
            queue.extend(self.by_name.get(n).into_iter().flatten());
        }
        while let Some(i) = queue.pop_front() {
            if !seen.insert(i) {
                continue;
            }
            for name in &self.names[i] {
                out.insert(name.clone());
                queue.extend(self.children.get(name).into_iter().flatten());
            }
        }
        out
    }

    /// The places above `named`, by every name they go by (a village's ward, district and
    /// region): a node holds the locations above its places, not what lies at them.
    pub(crate) fn ancestors<'a>(
        &self,
        named: impl IntoIterator<Item = &'a str>,
    ) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = BTreeSet::new();
        let mut queue: VecDeque<usize> = VecDeque::new();
        let mut seen: HashSet<usize> = HashSet::new();
        for n in named {
            queue.extend(self.by_name.get(n).into_iter().flatten());
        }
        while let Some(i) = queue.pop_front() {
            if !seen.insert(i) {
                continue;
            }
            for p in &self.parents[i] {
                out.insert(p.clone());
                for j in self.by_name.get(p).into_iter().flatten() {
                    out.extend(self.names[*j].iter().cloned());
                    queue.push_back(*j);
                }
            }
        }
        out
    }
}

/// What a session offers a peer: the documents within its reach, the documents outside it that
/// it may hold (with this node's heads), and the fingerprints of both reaches.
pub(crate) type Share = (Vec<Item>, Vec<(fieldmesh_protocol::DocId, Heads)>, [u8; 64]);

/// What `/status` and `fieldmesh status` say about scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeReport {
    /// This node's reach.
    pub reach: Reach,
    /// Documents held outside it, waiting until central or a hub is known to hold every change
    /// of them.
    pub waiting: Vec<(String, String)>,
    /// Documents that left this node since it started, once confirmed safe.
    pub left: u64,
}

impl ScopeReport {
    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "holds": self.reach.describe(),
            "outside_scope_waiting": self.waiting.len(),
            "outside_scope_documents": self.waiting.iter().take(20).map(|(ty, id)| format!("{ty}/{id}")).collect::<Vec<_>>(),
            "left_since_start": self.left,
            "why_waiting": if self.waiting.is_empty() { Value::Null } else {
                json!("these documents are outside this device's scope (re-scoped, or moved to another village); they leave once central or a hub is known to hold every change of them, at the next sync with one")
            },
        })
    }
}

/// A scope report as it was made.
#[derive(Debug)]
pub(crate) struct MadeReport {
    /// The log sequence, the scope's generation and the documents left, then.
    key: (u64, u64, u64),
    at: std::time::Instant,
    /// How long it took to make.
    cost: std::time::Duration,
    report: ScopeReport,
}

/// Scope state the engine keeps.
#[derive(Debug, Default)]
pub(crate) struct ScopeState {
    /// Bumped when the trust state or the location tree changes.
    pub generation: u64,
    pub tree: Option<Arc<Tree>>,
    /// Reaches computed, by key: `(generation, reach)`.
    pub reaches: HashMap<[u8; 32], (u64, Reach)>,
    /// The documents offered to each peer in its current session.
    pub offered: HashMap<PeerKey, HashSet<[u8; 16]>>,
    /// The documents announced to each peer as outside its scope in its current session.
    pub announced: HashMap<PeerKey, HashSet<[u8; 16]>>,
    /// The reach fingerprints (the peer's, this node's) each current session started under.
    pub fingerprints: HashMap<PeerKey, [u8; 64]>,
    /// Documents that left this node since it started.
    pub left: u64,
    /// By peer: documents it sent that lie outside its reach by this node's copy (it holds a
    /// stale copy of a document that moved away), announced to it in the next sessions.
    pub stale: HashMap<PeerKey, BTreeSet<[u8; 16]>>,
    /// By peer: stale documents found since [`Engine::take_stale_found`] last asked.
    pub stale_found: HashMap<PeerKey, usize>,
    /// Peers that sent changes by a key this node holds no certificate of, in the current
    /// session: no checkpoint is recorded for it.
    pub unchecked: HashSet<PeerKey>,
    /// Never hand documents off (the simulation's canary).
    pub hoard: bool,
    /// The last scope report.
    pub report: Option<MadeReport>,
    /// The places each certificate covers (by serial), as of a generation.
    pub cert_places: HashMap<String, (u64, Arc<BTreeSet<String>>)>,
    /// The documents of the merge in progress whose every change was accepted (only those can
    /// show that the sender holds a stale copy).
    pub accepted: Vec<[u8; 16]>,
}

/// Whether documents of type `ty` stay on a node once held, whatever its scope: certificates
/// (a device checks history with them), locations and facilities (it knows which places a peer's
/// certificate covers with them). None holds an insuree's data.
pub fn is_reference(ty: &str) -> bool {
    matches!(ty, "Basic" | "Location" | "Organization")
}

/// Documents announced as outside a peer's scope in one session, at most (an `Outside` frame
/// stays far below the frame limit; the rest go in the next sessions).
const OUTSIDE_PER_SESSION: usize = 20_000;

/// How long the scope report `/status` shows is kept before it is made again, at least.
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A report is kept this many times as long as it took to make, when that is longer than
/// [`REPORT_EVERY`]: it reads every document record, on the engine thread (0.1–0.23 s for
/// 100,000 documents), and a client polling `/status` during a sync would otherwise take a
/// few percent of that thread from the sync.
const REPORT_COST_RATIO: u32 = 50;

/// Stale documents remembered per peer, at most.
const STALE_PER_PEER: usize = 10_000;

impl Engine {
    /// The location tree, built from the committed locations and facilities.
    fn tree(&mut self) -> Result<Arc<Tree>, StoreError> {
        if let Some(t) = &self.scope.tree {
            return Ok(Arc::clone(t));
        }
        let mut tree = Tree::default();
        for ty in ["Location", "Organization"] {
            for id in self.store.of_type(ty)? {
                let Some(bytes) = self.store.doc_bytes(&id)? else {
                    continue;
                };
                let json = match crate::core::json_of_stored(&bytes) {
                    Ok(json) => json,
                    Err(e) => {
                        tracing::warn!(doc = %uuid::Uuid::from_bytes(id), error = %e, "a location cannot be read: left out of the location tree");
                        continue;
                    }
                };
                let i = tree.names.len();
                let names = place_names(&json);
                for n in &names {
                    tree.by_name.entry(n.clone()).or_default().push(i);
                }
                let parents = parent_places(ty, &json);
                for p in &parents {
                    tree.children.entry(p.clone()).or_default().push(i);
                }
                tree.names.push(names);
                tree.parents.push(parents);
            }
        }
        let tree = Arc::new(tree);
        self.scope.tree = Some(Arc::clone(&tree));
        Ok(tree)
    }

    /// The trust state or the location tree changed: reaches are computed again.
    pub(crate) fn scope_changed(&mut self, tree: bool) {
        self.scope.generation += 1;
        self.scope.reaches.clear();
        if tree {
            self.scope.tree = None;
        }
    }

    /// The reach of `key`, by its certificates as this node knows them: everything for central,
    /// else the places named by its latest certificate (the one issued to start latest: a
    /// renewal or a re-scoping supersedes) and every place below them. Validity in time does not
    /// matter here (a device whose certificate expired or whose clock is wrong keeps what it
    /// holds; peers serve it only certificates until it is renewed); a key without a
    /// certificate reaches nothing but reference data.
    pub fn reach_of(&mut self, key: &[u8; 32]) -> Result<Reach, StoreError> {
        if let Some((g, r)) = self.scope.reaches.get(key)
            && *g == self.scope.generation
        {
            return Ok(r.clone());
        }
        let reach = if *key == self.me.root {
            Reach::All
        } else {
            let certs = self.trust.certificates(key);
            let latest = certs.iter().map(|c| c.not_before).max();
            let current: Vec<&fieldmesh_trust::Certificate> = certs
                .iter()
                .filter(|c| Some(c.not_before) == latest)
                .collect();
            if current.iter().any(|c| c.roles.contains(&Role::Central)) {
                Reach::All
            } else {
                let named: Vec<String> = current.iter().flat_map(|c| c.scope()).collect();
                let tree = self.tree()?;
                Reach::Places {
                    places: tree.expand(named.iter().map(String::as_str)),
                    above: tree.ancestors(named.iter().map(String::as_str)),
                }
            }
        };
        self.scope
            .reaches
            .insert(*key, (self.scope.generation, reach.clone()));
        Ok(reach)
    }

    /// This node's own reach.
    pub fn my_reach(&mut self) -> Result<Reach, StoreError> {
        let me = self.me.public();
        self.reach_of(&me)
    }

    /// Every place `key` was ever certified for (any certificate, valid or not), and the places
    /// below them: a device may still hold what it held under an older certificate.
    fn history_places(&mut self, key: &[u8; 32]) -> Result<BTreeSet<String>, StoreError> {
        let named: Vec<String> = self
            .trust
            .certificates(key)
            .iter()
            .flat_map(|c| c.scope())
            .collect();
        let tree = self.tree()?;
        Ok(tree.expand(named.iter().map(String::as_str)))
    }

    /// The ids of the documents with an `index` entry (held at, or left) one of `places`.
    fn held_at<'a>(
        &self,
        index: &str,
        places: impl IntoIterator<Item = &'a str>,
    ) -> Result<HashSet<[u8; 16]>, StoreError> {
        let mut ids = HashSet::new();
        for p in places {
            ids.extend(self.store.referrers(index, "", p)?);
        }
        Ok(ids)
    }

    /// Whether `holder`, of `reach`, holds certificate `cert`: central holds every one; a
    /// device its own, central's, and those whose places (and the places below them) meet its
    /// reach: the officers of its villages, the hub of its district, a claim administrator of
    /// its facility; a hub those of its area. So a device checks the changes it holds and
    /// serves the peers it works with, and a country's certificates do not fill every phone.
    pub(crate) fn certificate_relevant(
        &mut self,
        cert: &fieldmesh_trust::Certificate,
        reach: &Reach,
        holder: &[u8; 32],
    ) -> Result<bool, StoreError> {
        let Reach::Places { places, .. } = reach else {
            return Ok(true);
        };
        // Its own, this node's (a peer needs it to serve this node), and central-role ones.
        if cert.subject == hex::encode(holder)
            || cert.subject == hex::encode(self.me.public())
            || cert.roles.contains(&Role::Central)
        {
            return Ok(true);
        }
        let covered = match self.scope.cert_places.get(&cert.serial) {
            Some((g, p)) if *g == self.scope.generation => Arc::clone(p),
            _ => {
                let named = cert.scope();
                let tree = self.tree()?;
                let p = Arc::new(tree.expand(named.iter().map(String::as_str)));
                self.scope
                    .cert_places
                    .insert(cert.serial.clone(), (self.scope.generation, Arc::clone(&p)));
                p
            }
        };
        // Iterate the smaller set.
        Ok(if covered.len() <= places.len() {
            covered.iter().any(|p| places.contains(p))
        } else {
            places.iter().any(|p| covered.contains(p))
        })
    }

    /// The certificate (and revocation) documents `holder`, of `reach`, holds: those relevant
    /// to it, and those of the authors of `docs` (what it holds), so that it can check them.
    fn certificates_within(
        &mut self,
        reach: &Reach,
        holder: &[u8; 32],
        docs: &HashSet<[u8; 16]>,
    ) -> Result<HashSet<[u8; 16]>, StoreError> {
        let certs: Vec<fieldmesh_trust::Certificate> =
            self.trust.all().0.into_iter().cloned().collect();
        let mut subjects = BTreeSet::new();
        for c in &certs {
            if subjects.contains(&c.subject) {
                continue;
            }
            let store = Arc::clone(&self.store);
            let authored = || -> Result<bool, StoreError> {
                Ok(store
                    .referrers(AUTHOR_INDEX, "", &c.subject)?
                    .iter()
                    .any(|id| docs.contains(id)))
            };
            if self.certificate_relevant(c, reach, holder)? || authored()? {
                subjects.insert(c.subject.clone());
            }
        }
        let mut ids = HashSet::new();
        for s in subjects {
            ids.extend(
                self.store
                    .find("Basic", fieldmesh_trust::SUBJECT_SYSTEM, &s)?,
            );
        }
        Ok(ids)
    }

    /// Whether this node keeps a document new to it, received from a peer: within its reach, or
    /// a certificate, a location or a facility.
    pub(crate) fn keeps_new(
        &mut self,
        reach: &Reach,
        d: &crate::core::PreparedDoc,
    ) -> Result<bool, StoreError> {
        // A certificate is kept whoever it is about: a peer sends those of the authors of what
        // it sends (and of the peers it works with), which this node needs to check them.
        if d.token
            .as_deref()
            .is_some_and(|t| t.starts_with(CERTIFICATE_TOKEN))
        {
            return Ok(true);
        }
        // Locations and facilities too: a hub learns the places below its district from them
        // (its reach grows as they arrive); peers send only those of its reach.
        if matches!(d.meta.ty.as_str(), "Location" | "Organization") {
            return Ok(true);
        }
        // A document refused here because this node's reach is still growing (its locations
        // come in this very session) comes again in the next session: no checkpoint is recorded
        // and one more session is asked for (see `receive`).
        Ok(reach.holds(&d.entries))
    }

    /// The documents `holder`, of `reach`, holds, as [`Engine::items`] lists them (in log
    /// order): those held at its places and everywhere, and its certificates.
    pub fn items_within(
        &mut self,
        reach: &Reach,
        holder: &[u8; 32],
    ) -> Result<Vec<Item>, StoreError> {
        self.items_of(reach, Some(holder))
    }

    /// [`Engine::items_within`] without certificates (cheaper: no certificate is looked at).
    pub fn placed_within(&mut self, reach: &Reach) -> Result<Vec<Item>, StoreError> {
        self.items_of(reach, None)
    }

    fn items_of(
        &mut self,
        reach: &Reach,
        holder: Option<&[u8; 32]>,
    ) -> Result<Vec<Item>, StoreError> {
        let Reach::Places { places, above } = reach else {
            return self.items();
        };
        let mut ids = self.held_at(
            PLACE_INDEX,
            places.iter().map(String::as_str).chain([EVERYWHERE]),
        )?;
        // Above its places: their locations only, not what lies there.
        for id in self.held_at(PLACE_INDEX, above.iter().map(String::as_str))? {
            if self
                .store
                .doc_meta(&id)?
                .is_some_and(|m| matches!(m.ty.as_str(), "Location" | "Organization"))
            {
                ids.insert(id);
            }
        }
        if let Some(holder) = holder {
            let certificates = self.certificates_within(reach, holder, &ids)?;
            ids.extend(certificates);
        }
        let ids: Vec<[u8; 16]> = ids
            .into_iter()
            .filter(|id| !self.unreadable.contains(id))
            .collect();
        let mut items = Vec::with_capacity(ids.len());
        for (id, meta) in ids.iter().zip(self.store.doc_metas(&ids)?) {
            match meta {
                Ok(Some(meta)) => items.push((*id, meta.heads, meta.seq)),
                Ok(None) => {}
                Err(e @ StoreError::Corrupt(_)) => {
                    tracing::error!(doc = %uuid::Uuid::from_bytes(*id), error = %e, "a document record cannot be read: skipped");
                }
                Err(e) => return Err(e),
            }
        }
        items.sort_by_key(|i| i.2);
        Ok(items)
    }

    /// Puts certificates and revocations, then locations and facilities, before everything else
    /// (each group in log order): a new device or hub is sent its documents in this order, and a
    /// receiver keeps a document only within its reach, which grows with the locations it
    /// holds. Sent in log order, a hub whose villages' locations had been edited late refused
    /// most of its first sync as outside its reach and asked for it all again.
    pub(crate) fn order_for_sending(&self, items: &mut [Item]) -> Result<(), StoreError> {
        let mut first: HashMap<[u8; 16], u8> = HashMap::new();
        for (rank, types) in [(0, &["Basic"][..]), (1, &["Location", "Organization"][..])] {
            for ty in types {
                for id in self.store.of_type(ty)? {
                    first.insert(id, rank);
                }
            }
        }
        items.sort_by_key(|i| (first.get(&i.0).copied().unwrap_or(2), i.2));
        Ok(())
    }

    /// What a session offers `peer`: the documents within its reach, and the documents outside
    /// it that it may hold (held at places it was ever certified for, or that moved away from
    /// its places), with their heads. Records what was offered, for [`Engine::payloads`], and
    /// the fingerprints of both reaches, for the checkpoint.
    pub(crate) fn share_with(&mut self, peer: &PeerKey) -> Result<Share, StoreError> {
        let reach = self.reach_of(&peer.0)?;
        let mine = self.my_reach()?;
        let mut fingerprints = [0u8; 64];
        fingerprints[..32].copy_from_slice(&reach.fingerprint());
        fingerprints[32..].copy_from_slice(&mine.fingerprint());
        let mut items = self.items_within(&reach, &peer.0)?;
        let mut outside = Vec::new();
        if let Reach::Places { places, .. } = &reach {
            let mut offered: HashSet<[u8; 16]> = items.iter().map(|i| i.0).collect();
            let mut ever = self.history_places(&peer.0)?;
            ever.extend(places.iter().cloned());
            let mut ids = self.held_at(PLACE_INDEX, ever.iter().map(String::as_str))?;
            ids.extend(self.held_at(LEFT_INDEX, ever.iter().map(String::as_str))?);
            if let Some(stale) = self.scope.stale.get_mut(peer) {
                // Forget those back within its reach.
                stale.retain(|id| !offered.contains(id));
                ids.extend(stale.iter().copied());
            }
            let mut ids: Vec<[u8; 16]> =
                ids.into_iter().filter(|id| !offered.contains(id)).collect();
            ids.sort();
            ids.truncate(OUTSIDE_PER_SESSION);
            for id in &ids {
                if let Ok(Some(meta)) = self.store.doc_meta(id) {
                    outside.push((*id, meta.heads));
                }
            }
            // The certificates of their authors go too: the peer checks the changes it is sent
            // of them.
            let outside_ids: HashSet<[u8; 16]> = ids.into_iter().collect();
            self.scope.announced.insert(*peer, outside_ids.clone());
            let mut more = Vec::new();
            for id in self.certificates_within(&Reach::nothing(), &[0; 32], &outside_ids)? {
                if offered.insert(id)
                    && let Some(meta) = self.store.doc_meta(&id)?
                {
                    more.push((id, meta.heads, meta.seq));
                }
            }
            // A node that keeps documents for others (a hub) is offered too what this node holds
            // outside its own reach, to hand it off: this node's location tree may be too
            // partial to see that the hub's area covers it (a device re-scoped before it ever
            // held its old villages' locations); the hub keeps what lies in its area.
            if self.keeps(peer) {
                for (id, heads, seq) in self.waiting()? {
                    if offered.insert(id) {
                        more.push((id, heads, seq));
                    }
                }
            }
            items.extend(more);
            self.scope.offered.insert(*peer, offered);
        } else {
            self.scope.offered.remove(peer);
            self.scope.announced.remove(peer);
        }
        // A new device or hub is sent what it holds in this order.
        self.order_for_sending(&mut items)?;
        self.scope.fingerprints.insert(*peer, fingerprints);
        Ok((items, outside, fingerprints))
    }

    /// How many documents `peer` was found to hold outside its scope since the last call (it is
    /// told in its next session: one more session is due).
    pub fn take_stale_found(&mut self, peer: &PeerKey) -> usize {
        self.scope.stale_found.remove(peer).unwrap_or(0)
    }

    /// Notes which of the documents `peer` just sent lie outside its reach by this node's copy;
    /// returns how many.
    pub(crate) fn note_stale(
        &mut self,
        peer: &PeerKey,
        ids: &[[u8; 16]],
    ) -> Result<usize, StoreError> {
        let reach = self.reach_of(&peer.0)?;
        if reach == Reach::All {
            return Ok(0);
        }
        let mut found = 0;
        for id in ids {
            let entries = match self.entries_of_doc(id) {
                Ok(e) => e,
                Err(SyncError::Store(e)) => return Err(e),
                Err(_) => continue,
            };
            let certificate = self
                .meta_of(&DocId(uuid::Uuid::from_bytes(*id)))?
                .is_some_and(|m| m.ty == "Basic");
            if certificate || entries.references.is_empty() || reach.holds(&entries) {
                continue;
            }
            let stale = self.scope.stale.entry(*peer).or_default();
            if stale.len() < STALE_PER_PEER && stale.insert(*id) {
                found += 1;
            }
        }
        if found > 0 {
            *self.scope.stale_found.entry(*peer).or_default() += found;
        }
        Ok(found)
    }

    /// Whether `peer` may be sent document `id` after `their_heads`: it is within the peer's
    /// share, or it was announced to the peer as outside its scope in this session and the
    /// peer proves it holds it (every head it names is a change this node holds: change hashes
    /// cannot be guessed), in which case only the changes after those heads go.
    pub(crate) fn may_send(
        &mut self,
        peer: &PeerKey,
        id: &[u8; 16],
        their_heads: &Heads,
    ) -> Result<bool, SyncError> {
        if !self.scope.offered.contains_key(peer) {
            // Outside a session (a bundle, provisioning): what a session would offer.
            let reach = self.reach_of(&peer.0)?;
            if reach == Reach::All {
                return Ok(true);
            }
            let offered = self
                .items_within(&reach, &peer.0)?
                .into_iter()
                .map(|i| i.0)
                .collect();
            self.scope.offered.insert(*peer, offered);
        }
        let offered = self.scope.offered.get(peer).is_some_and(|o| o.contains(id));
        if offered {
            return Ok(true);
        }
        // Outside the peer's share: only a document announced to it as outside its scope in this
        // session (held at a place it was certified for, left its places, or sent by it), and
        // only to a peer that proves it holds it.
        let announced = self
            .scope
            .announced
            .get(peer)
            .is_some_and(|a| a.contains(id));
        if !announced || their_heads.is_empty() {
            return Ok(false);
        }
        let doc_id = DocId(uuid::Uuid::from_bytes(*id));
        let Ok(Some(mut live)) = self.take(&doc_id) else {
            return Ok(false);
        };
        // Every head named must be held: then only the changes after them go (never the whole
        // document), and heads this node announced itself bring nothing new.
        let proven = live.doc.as_mut().is_some_and(|doc| {
            their_heads
                .iter()
                .all(|h| doc.get_change_by_hash(&ChangeHash(*h)).is_some())
        });
        let dirty = self.has_pending_write(&doc_id);
        self.put_back(doc_id, live, dirty);
        Ok(proven)
    }

    /// The index entries of a held document.
    fn entries_of_doc(&mut self, id: &[u8; 16]) -> Result<IndexEntries, SyncError> {
        let doc_id = DocId(uuid::Uuid::from_bytes(*id));
        // A document just received is staged with its entries (and often without its live
        // document): read them there, rather than committing the batch and loading it again.
        if let Some(l) = self
            .dirty
            .get(&doc_id)
            .or_else(|| self.in_flight.get(&doc_id))
        {
            return Ok(l.entries.clone());
        }
        match self.take(&doc_id) {
            Ok(Some(live)) => {
                let entries = live.entries.clone();
                let dirty = self.has_pending_write(&doc_id);
                self.put_back(doc_id, live, dirty);
                Ok(entries)
            }
            Ok(None) => Ok(IndexEntries::default()),
            Err(ReadError::Store(e)) => Err(e.into()),
            Err(ReadError::Commit(e)) => Err(e.into()),
            Err(_) => Ok(IndexEntries::default()),
        }
    }

    /// Whether `peer` keeps documents for others (central, or a hub): a document it is known to
    /// hold may leave a device.
    ///
    /// Decided like [`Engine::reach_of`], by the peer's latest certificate whatever the clock
    /// (a device whose clock is wrong still hands off to its hub), unless the key is revoked.
    fn keeps_for(&mut self, peer: &PeerKey, entries: &IndexEntries) -> Result<bool, StoreError> {
        if !self.keeps(peer) {
            return Ok(false);
        }
        let reach = self.reach_of(&peer.0)?;
        if reach.holds(entries) {
            return Ok(true);
        }
        // A hub whose area this node cannot see covers the document (its location tree lacks
        // the document's places: a device re-scoped before it held its old villages'
        // locations) is trusted with it; a hub whose area this node sees, and which does not
        // cover it, is not (two hubs must not hand a document off to each other).
        let tree = self.tree()?;
        Ok(!entries
            .references
            .iter()
            .any(|(t, _, p)| t == PLACE_INDEX && tree.by_name.contains_key(p.as_str())))
    }

    fn keeps(&mut self, peer: &PeerKey) -> bool {
        if peer.0 == self.me.root {
            return true;
        }
        let held = self.trust.revocations_held();
        if self.trust.revoked(&peer.0, held).is_some() {
            return false;
        }
        let certs = self.trust.certificates(&peer.0);
        let latest = certs.iter().map(|c| c.not_before).max();
        certs.iter().any(|c| {
            Some(c.not_before) == latest
                && c.roles
                    .iter()
                    .any(|r| matches!(r, Role::Central | Role::Hub))
        })
    }

    /// Documents `peer` announced as outside this node's scope, with its heads: those held here
    /// with other heads are returned as `(document, the peer's heads, this node's heads)` (the
    /// session exchanges their changes); those held with the same heads and outside this node's
    /// reach leave this node if the peer keeps documents for others (central, a hub): it holds
    /// every change of them.
    pub fn outside_check(
        &mut self,
        peer: &PeerKey,
        theirs: &[(fieldmesh_protocol::DocId, Heads)],
    ) -> Result<Vec<(fieldmesh_protocol::DocId, Heads, Heads)>, SyncError> {
        if !self.certified(&crate::source::Source::Peer(*peer)) {
            return Ok(Vec::new());
        }
        let keeps = self.keeps(peer);
        let mine = self.my_reach()?;
        let theirs = &theirs[..theirs.len().min(OUTSIDE_PER_SESSION)];
        let mut differ = Vec::new();
        for (id, their_heads) in theirs {
            let doc_id = DocId(uuid::Uuid::from_bytes(*id));
            let live = match self.take(&doc_id) {
                Ok(Some(live)) => live,
                Ok(None) => continue,
                Err(ReadError::Store(e)) => return Err(e.into()),
                Err(ReadError::Commit(e)) => return Err(e.into()),
                Err(_) => continue,
            };
            let mut a = live.meta.heads.clone();
            let mut b = their_heads.clone();
            a.sort();
            b.sort();
            if a != b {
                differ.push((*id, their_heads.clone(), live.meta.heads.clone()));
                let dirty = self.has_pending_write(&doc_id);
                self.put_back(doc_id, live, dirty);
                continue;
            }
            // Certificates, locations and facilities stay: they check history, they tell which
            // places a peer's certificate covers, and they hold no insuree's data.
            if !keeps
                || !self.keeps_for(peer, &live.entries)?
                || self.scope.hoard
                || is_reference(&live.meta.ty)
                || mine.holds(&live.entries)
                || self.has_pending_write(&doc_id)
            {
                let dirty = self.has_pending_write(&doc_id);
                self.put_back(doc_id, live, dirty);
                continue;
            }
            tracing::info!(peer = %peer, doc = %doc_id, ty = %live.meta.ty, "outside this node's scope and held by the peer with every change: leaves this node");
            self.push(
                Write::Remove {
                    id: *id,
                    entries: live.entries,
                    purge: vec![LEFT_INDEX.to_string(), AUTHOR_INDEX.to_string()],
                },
                None,
            );
            self.scope.left += 1;
        }
        self.flush()?;
        Ok(differ)
    }

    /// The documents this node holds outside its own reach, waiting to be handed off
    /// (certificates, locations and facilities aside: they stay).
    fn waiting(&mut self) -> Result<Vec<Item>, StoreError> {
        let reach = self.my_reach()?;
        let mut waiting = Vec::new();
        if let Reach::Places { .. } = &reach {
            let within: HashSet<[u8; 16]> = self
                .placed_within(&reach)?
                .into_iter()
                .map(|i| i.0)
                .collect();
            for item in self.items()? {
                if !within.contains(&item.0)
                    && let Some(meta) = self.store.doc_meta(&item.0)?
                    && !is_reference(&meta.ty)
                {
                    waiting.push(item);
                }
            }
        }
        Ok(waiting)
    }

    /// The documents this node holds outside its reach (waiting to leave), and how many left.
    /// Listing them reads every document record: the report is computed again only when the
    /// store or the scope changed, and at most every few seconds (`/status` may be polled).
    ///
    /// A report younger than that is answered as it is, without committing what is staged: a
    /// client polling `/status` during a sync would otherwise force a commit at each poll and
    /// break the pipelining of the sync's commits.
    pub fn scope_report(&mut self) -> Result<ScopeReport, SyncError> {
        if let Some(m) = &self.scope.report
            && m.at.elapsed() < REPORT_EVERY.max(m.cost.saturating_mul(REPORT_COST_RATIO))
        {
            return Ok(m.report.clone());
        }
        self.flush()?;
        let seq = self.store.stats()?.last_seq;
        let key = (seq, self.scope.generation, self.scope.left);
        if let Some(m) = &self.scope.report
            && m.key == key
        {
            return Ok(m.report.clone());
        }
        let started = std::time::Instant::now();
        let r = self.scope_report_now()?;
        let cost = started.elapsed();
        tracing::debug!(
            ms = cost.as_millis() as u64,
            waiting = r.waiting.len(),
            "made the scope report"
        );
        self.scope.report = Some(MadeReport {
            key,
            at: std::time::Instant::now(),
            cost,
            report: r.clone(),
        });
        Ok(r)
    }

    /// [`Engine::scope_report`] computed now, whatever was computed before (the simulation's
    /// invariants, which must not depend on the wall clock).
    pub fn scope_report_now(&mut self) -> Result<ScopeReport, SyncError> {
        let reach = self.my_reach()?;
        let mut waiting = Vec::new();
        for (id, _, _) in self.waiting()? {
            if let Some(meta) = self.store.doc_meta(&id)? {
                waiting.push((meta.ty, uuid::Uuid::from_bytes(id).to_string()));
            }
        }
        Ok(ScopeReport {
            reach,
            waiting,
            left: self.scope.left,
        })
    }
}
