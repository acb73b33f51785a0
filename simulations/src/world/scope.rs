//! Scope in the world: officers re-scoped to other villages, insurees who move, what each node
//! must hold, and the privacy invariant.

use fieldmesh_fhir_docs::openimis::demo::Rng;
use fieldmesh_storage::Store as _;
use fieldmesh_trust::ed25519_dalek::SigningKey;
use fieldmesh_trust::{Certificate, Role as TrustRole, certificate_resource, issue_certificate};
use serde_json::json;

use super::contact::Items;
use super::{DAY, Kind, T0, VILLAGES_PER_DISTRICT, World, fail};
use crate::SimError;

/// How long an honest officer may hold a document outside its scope (re-scoped, or the insuree
/// moved away) before the privacy invariant fails: the safe hand-off waits for central or a hub
/// to hold every change of it, and officers pass by their hub every few days.
pub(crate) const HAND_OFF_WINDOW: i64 = 15 * DAY;

/// Meetings with its hub an officer needs after a document left its scope before holding it
/// longer than [`HAND_OFF_WINDOW`] is a violation: one to learn the document left (and bring the
/// hub's changes), one to find the hub holding every change and let it go, one to spare for a
/// session cut by a fault.
pub(crate) const MEETINGS_TO_HAND_OFF: u32 = 3;

impl World {
    /// Central issues new certificates to some officers, naming two other villages of their
    /// district: the first honest officers of each hub in turn.
    pub(crate) fn rescope(&mut self) -> Result<(), SimError> {
        let Some(r) = self.sc.rescope.clone() else {
            return Ok(());
        };
        let per_hub = self.sc.officers_per_hub.max(1);
        let mut chosen = Vec::new();
        'pick: for k in 0..self.sc.officers() {
            let (hub, o) = (k % self.sc.hubs.max(1), k / self.sc.hubs.max(1));
            let i = 1 + self.sc.hubs + hub * per_hub + o;
            if i < self.nodes.len() && !self.nodes[i].byzantine && self.nodes[i].skew == 0 {
                chosen.push(i);
            }
            if chosen.len() >= r.officers {
                break 'pick;
            }
        }
        self.clock(0);
        let central_key = SigningKey::from_bytes(&self.nodes[0].secret);
        let mut rng = Rng::new(self.out.seed ^ 0x5C0E);
        for i in chosen {
            let district = (self.nodes[i].hub - 1) * VILLAGES_PER_DISTRICT;
            let old = self.nodes[i].villages.clone();
            let new: Vec<usize> = (0..VILLAGES_PER_DISTRICT)
                .map(|v| district + (old[0] - district + 3 + v) % VILLAGES_PER_DISTRICT)
                .filter(|v| !old.contains(v))
                .take(2)
                .collect();
            let cert = Certificate {
                serial: format!("{}-cert-2", self.nodes[i].name),
                subject: hex::encode(self.nodes[i].key.0),
                user: self.nodes[i].name.clone(),
                roles: vec![TrustRole::EnrolmentOfficer],
                locations: new
                    .iter()
                    .flat_map(|v| {
                        let v = &self.refdata.villages[*v];
                        [v.0.clone(), v.1.clone()]
                    })
                    .collect(),
                facilities: vec![],
                not_before: self.now,
                not_after: T0 + 365 * DAY,
            };
            let mut res = certificate_resource(&issue_certificate(&central_key, &cert), &cert);
            res["id"] = json!(rng.uuid());
            self.nodes[0]
                .engine()
                .create(res, None, true, &|_| None)
                .map_err(|e| fail("central", e))?;
            let name = self.nodes[i].name.clone();
            self.record(format!("{name} re-scoped from {old:?} to {new:?}"));
            self.nodes[i].next_villages = Some(new);
            self.out.rescoped += 1;
        }
        self.nodes[0]
            .engine()
            .flush()
            .map_err(|e| fail("central", e))?;
        self.drain_events(0);
        Ok(())
    }

    /// Officer `i` takes up the villages of its new certificate once its device holds it.
    pub(crate) fn take_up_scope(&mut self, i: usize) -> Result<(), SimError> {
        let Some(next) = self.nodes[i].next_villages.clone() else {
            return Ok(());
        };
        let village = self.refdata.villages[next[0]].0.clone();
        let name = self.nodes[i].name.clone();
        let reach = self.nodes[i]
            .engine()
            .my_reach()
            .map_err(|e| fail(&name, e))?;
        if let fieldmesh_engine::Reach::Places { places: p, .. } = reach
            && p.contains(&village)
        {
            self.nodes[i].villages = next;
            self.nodes[i].next_villages = None;
            self.record(format!("{name} works in its new villages"));
        }
        Ok(())
    }

    /// Officer `i` moves an insuree of one of its villages to its other village.
    pub(crate) fn move_insuree(&mut self, i: usize) -> Result<(), SimError> {
        if self.nodes[i].villages.len() < 2 {
            return Ok(());
        }
        let candidates = self.tracked_in_villages(i, true);
        if candidates.is_empty() {
            return Ok(());
        }
        let id = candidates[self.rng.below(candidates.len() as u64) as usize];
        let Some(from) = self.tracked[&id].village else {
            return Ok(());
        };
        let Some(&to) = self.nodes[i].villages.iter().find(|v| **v != from) else {
            return Ok(());
        };
        let (old, new) = (
            self.refdata.villages[from].0.clone(),
            self.refdata.villages[to].0.clone(),
        );
        let sid = uuid::Uuid::from_bytes(id).to_string();
        let name = self.nodes[i].name.clone();
        let e = self.nodes[i].engine();
        let Ok(served) = e.reader().read("Patient", &sid) else {
            return Ok(());
        };
        let text = serde_json::to_string(&served.resource)
            .map_err(|er| fail(&name, er))?
            .replace(&old, &new);
        let moved: serde_json::Value = serde_json::from_str(&text).map_err(|er| fail(&name, er))?;
        match e.update("Patient", &sid, moved, None) {
            Ok(_) => {
                e.flush().map_err(|er| fail(&name, er))?;
                self.drain_events(i);
                if let Some(t) = self.tracked.get_mut(&id) {
                    t.village = Some(to);
                }
                self.out.moved += 1;
                self.record(format!("{name} moved {sid} from village {from} to {to}"));
            }
            Err(fieldmesh_engine::WriteError::Forbidden(_)) => self.out.refused_local += 1,
            Err(er) => return Err(fail(&name, er)),
        }
        Ok(())
    }

    /// What node `i` must hold: central's documents within `i`'s scope as central decides it
    /// (from `i`'s certificate), with central's heads. Certificates, locations and facilities
    /// are left out: a device keeps those it once needed (they hold no insuree's data).
    pub(crate) fn expected(&mut self, i: usize) -> Result<Items, SimError> {
        let key = self.nodes[i].key.0;
        let store = std::sync::Arc::clone(&self.nodes[0].store);
        let reach = self.nodes[0]
            .engine()
            .reach_of(&key)
            .map_err(|er| fail("central", er))?;
        let mut items: Items = self.nodes[0]
            .engine()
            .placed_within(&reach)
            .map_err(|er| fail("central", er))?
            .into_iter()
            .filter(|(id, _, _)| !is_certificate(store.as_ref(), id))
            .map(|(id, h, _)| (id, h))
            .collect();
        items.sort();
        Ok(items)
    }

    /// Node `i`'s documents with their heads, certificates left out, sorted.
    pub(crate) fn held(&mut self, i: usize) -> Result<Items, SimError> {
        let store = std::sync::Arc::clone(&self.nodes[i].store);
        Ok(self
            .items(i)?
            .into_iter()
            .filter(|(id, _)| !is_certificate(store.as_ref(), id))
            .collect())
    }

    /// The privacy invariant: no honest officer holds a document outside its scope for longer
    /// than the hand-off window once it met its hub enough times to hand it off.
    pub(crate) fn privacy(&mut self) -> Result<(), SimError> {
        for i in self.officers() {
            if self.nodes[i].byzantine || self.nodes[i].kind != Kind::Officer {
                continue;
            }
            let name = self.nodes[i].name.clone();
            let report = self.nodes[i]
                .engine()
                .scope_report_now()
                .map_err(|e| fail(&name, e))?;
            let now = self.now;
            let waiting: std::collections::HashSet<String> =
                report.waiting.iter().map(|(_, id)| id.clone()).collect();
            self.outside_since
                .retain(|(n, id), _| *n != i || waiting.contains(id));
            let met = self.hub_contacts.get(&i).copied().unwrap_or(0);
            for (ty, id) in report.waiting {
                let (since, met_then) = *self
                    .outside_since
                    .entry((i, id.clone()))
                    .or_insert((now, met));
                // The hand-off needs a hub (or central) that holds every change: an officer who
                // has not met its hub since cannot hand anything off, and rightly keeps it.
                if now - since > HAND_OFF_WINDOW && met - met_then >= MEETINGS_TO_HAND_OFF {
                    let v = format!(
                        "honest {name} held {ty}/{id} outside its scope for {} days, meeting its hub {} times",
                        (now - since) / DAY,
                        met - met_then
                    );
                    if !self.out.violations.contains(&v) {
                        self.out.violations.push(v);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Whether a stored document is one a node keeps once held whatever its scope (a certificate, a
/// location, a facility: see `fieldmesh_engine::scope::is_reference`).
fn is_certificate(store: &fieldmesh_storage::MemStore, id: &[u8; 16]) -> bool {
    store
        .doc_meta(id)
        .ok()
        .flatten()
        .is_some_and(|m| fieldmesh_engine::scope::is_reference(&m.ty))
}
