//! Central's services: canonical ids, business numbers, duplicate persons, number leases.
//!
//! Central is the authoritative peer. Every resource created elsewhere gets, on its first
//! processing here, central's identifier: central's identifier system (its node system) with
//! the *canonical id*, the id openIMIS will know it by: the creator's UUID (the document id), or
//! the openIMIS UUID it already carries, unless another resource of its type already has that
//! canonical id, in which case a new UUID. Then:
//!
//! - **Business numbers** (a Patient's insurance number, a Claim's code: identifiers typed
//!   `Code`): a missing one is assigned from central's counter; one that fails the deployment's
//!   [`NumberRule`] is flagged `number-invalid`; one held by an earlier registration is flagged
//!   `number-taken` on the later one (and `number-reused` on the earlier), visibly, with a
//!   reason the app shows after the next sync (see [`fieldmesh_fhir_docs::openimis::flags`]).
//!   "Earlier" is central's order of processing, a fact no device can forge: a resource that has
//!   central's identifier and is not flagged `number-taken` owns its number.
//! - **Duplicate persons**: a Patient that shares a blocking key
//!   ([`fieldmesh_fhir_docs::openimis::persons`]) with an earlier Patient (same identity
//!   document, or same normalised name, birth date and village) is linked `replaced-by` to it,
//!   and the earlier one `replaces` it (`Patient.link`); nothing is deleted, every reference
//!   still resolves. Candidates come from the index of blocking keys: a few lookups per arrival.
//! - **Leases**: every certified enrolment officer holds a block of insurance numbers, every
//!   claim administrator a block of claim codes, so that they assign valid, unique numbers
//!   offline. A new block is leased when half of the last is used. A lease is a `Basic`
//!   document ([`Lease`]) at the device's places; the counter it came from has moved past it in
//!   the same commit, so a lease is never handed out twice, across restarts too.
//!
//! Every edit is an ordinary change signed by central's key, which syncs back like any other.
//!
//! # At receipt
//!
//! Most arrivals need nothing but their canonical id. Central gives it in the pass that checks a
//! received document, on the worker thread that loaded it ([`canonical_at_receipt`], called by
//! the engine's merge once [`Central::open`] turned it on): the change is signed by central and
//! stored with the document in the same commit, and what the services need of the document
//! (its business number, blocking keys, whether it carries flags or links) is kept for the step,
//! which then decides from the indexes alone whether anything more is to be done and reads the
//! document only if so. Whatever the receipt pass declines (a document carrying an openIMIS UUID,
//! an id some other resource holds, a change refused in part) and whatever a restart forgot is
//! decided by the step, from the document itself.
//!
//! # Driven by what the engine commits
//!
//! [`Central::step`] reads the store's change log from a cursor and processes what was
//! committed since; the cursor and the services' counters are a record of the store
//! ([`STATE_KEY`]) written in the same commit as the edits they led to. A crash loses no
//! arrival: the next step starts where the last committed one ended. Central's own edits come
//! back through the log and are recognised by their heads (processing is idempotent anyway);
//! an edit made for another document's sake is processed in its turn.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use fieldmesh_fhir_docs::identifiers::{OPENIMIS_IDENTIFIER_TYPES, openimis_type_code};
use fieldmesh_fhir_docs::openimis::Role;
use fieldmesh_fhir_docs::openimis::dates::Date;
use fieldmesh_fhir_docs::openimis::flags::{FLAG_INDEX, Flag, FlagCode, flags_of, set_flags};
use fieldmesh_fhir_docs::openimis::numbers::{LEASE_HOLDER_SYSTEM, Lease, NumberKind, NumberRule};
use fieldmesh_fhir_docs::openimis::persons::{PERSON_KEY_INDEX, blocking_keys};
use fieldmesh_fhir_docs::openimis::policy::{RECEIPT_INDEX, price_contract, receipt_keys};
use fieldmesh_fhir_docs::{DocId, IdentKey, IdentifierQuery};
use fieldmesh_storage::{LOCAL_CHECKPOINT_PREFIX, StoreError, Write};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::Engine;
use crate::core::Loaded;
use crate::error::{ReadError, WriteError};

/// The store record of central's services' state.
pub const STATE_KEY: &str = "local:central";

/// Log entries one step processes at most: read together on every core, and kept in the
/// engine's cache of live documents (256 by default) until edited.
pub const STEP_ENTRIES: usize = 200;

/// Leases one step issues at most.
const LEASES_PER_STEP: usize = 200;

/// Flagged resources `/status` lists at most.
const FLAGGED_LISTED: usize = 100;

/// What central's services do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumberConfig {
    /// The rule of insurance numbers (openIMIS `insuree_number_*` settings).
    #[serde(default)]
    pub chfid: NumberRule,
    /// The rule of claim codes.
    #[serde(default)]
    pub claim_code: NumberRule,
    /// Numbers in one lease.
    #[serde(default = "default_lease_size")]
    pub lease_size: u64,
}

fn default_lease_size() -> u64 {
    200
}

impl Default for NumberConfig {
    /// As openIMIS's default settings: any non-empty number is valid (set the deployment's
    /// rule, e.g. Niger's 10 digits with a check digit modulo 7, in `[numbers.chfid]`); leases
    /// of 200.
    fn default() -> Self {
        Self {
            chfid: NumberRule::default(),
            claim_code: NumberRule::default(),
            lease_size: default_lease_size(),
        }
    }
}

impl NumberConfig {
    /// The rule of a kind of number.
    pub fn rule(&self, kind: NumberKind) -> NumberRule {
        match kind {
            NumberKind::Chfid => self.chfid,
            NumberKind::ClaimCode => self.claim_code,
        }
    }

    /// The rule numbers central makes of `kind` follow: the deployment's, of the length it
    /// sets, else of 9 digits for insurance numbers and 8 for claim codes (openIMIS's claim
    /// code column holds 8 characters).
    pub fn making_rule(&self, kind: NumberKind) -> NumberRule {
        let mut rule = self.rule(kind);
        if rule.min_length.is_none() && rule.max_length.is_none() {
            let length = match kind {
                NumberKind::Chfid => 9,
                NumberKind::ClaimCode => 8,
            };
            rule.max_length = Some(length);
        }
        rule
    }

    /// Niger's rule for insurance numbers (10 digits, the last the first nine modulo 7), as
    /// the demo deployment and its synthetic data use.
    pub fn niger() -> Self {
        Self {
            chfid: NumberRule::fixed(10, Some(7)),
            ..Self::default()
        }
    }
}

/// A lease central handed out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct LeaseRecord {
    kind: NumberKind,
    holder: String,
    first: u64,
    count: u64,
    /// Numbers of it central has seen used.
    used: u64,
}

/// The services' durable state ([`STATE_KEY`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    /// The last store log sequence processed.
    cursor: u64,
    /// The next counter of each kind of number.
    next: BTreeMap<NumberKind, u64>,
    /// Canonical ids given.
    canonical: u64,
    /// Of which new UUIDs because the creator's collided.
    collisions: u64,
    /// Numbers central assigned itself (resources that came without one).
    assigned: BTreeMap<NumberKind, u64>,
    /// Leases handed out.
    leases: Vec<LeaseRecord>,
    /// Registrations flagged for a number held by an earlier one.
    numbers_taken: u64,
    /// Registrations flagged for a number that breaks the rule.
    numbers_invalid: u64,
    /// Duplicate persons found and linked.
    persons_linked: u64,
    /// Claims adjudicated (a ClaimResponse written or changed).
    #[serde(default)]
    claims_adjudicated: u64,
    /// Claims whose insuree central did not hold when it adjudicated them: adjudicated again
    /// when insurees arrive.
    #[serde(default)]
    claims_without_insuree: BTreeSet<String>,
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Log entries read.
    pub read: usize,
    /// Documents edited.
    pub edited: usize,
    /// Canonical ids given.
    pub canonical: usize,
    /// Leases issued.
    pub leases: usize,
    /// Whether the log holds more to process.
    pub more: bool,
    /// Time spent on insurees' numbers and finding duplicate persons (index lookups, and
    /// reading the candidates when there are some).
    pub duplicate_check_nanos: u128,
    /// Policies whose value, dates or status central changed after a merge.
    pub priced: usize,
    /// Claims adjudicated (a ClaimResponse written or changed).
    pub adjudicated: usize,
    /// Time spent pricing policies.
    pub pricing_nanos: u128,
}

/// Central's services failed; nothing of the step was staged past the failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CentralError {
    /// The store could not be read.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A document could not be read.
    #[error("{0}")]
    Read(Box<ReadError>),
    /// An edit could not be made.
    #[error("{0}")]
    Write(Box<WriteError>),
    /// The services' state record is unreadable.
    #[error("the record of central's services is damaged: {0}")]
    State(String),
    /// This node is not central: its key is neither the root of trust nor certified with the
    /// central role.
    #[error(
        "central's services run only on central: this node's key is neither the root of trust nor certified with the central role"
    )]
    NotCentral,
}

impl From<ReadError> for CentralError {
    fn from(e: ReadError) -> Self {
        CentralError::Read(Box::new(e))
    }
}

impl From<WriteError> for CentralError {
    fn from(e: WriteError) -> Self {
        CentralError::Write(Box::new(e))
    }
}

/// Central's services over an engine. See the module docs.
pub struct Central {
    config: NumberConfig,
    state: State,
    /// Whether the state changed since it was last staged.
    dirty: bool,
    /// Documents this step edited for another's sake: what was read of them ahead is stale.
    touched: HashSet<DocId>,
    /// Claims of this step to adjudicate once its documents are processed.
    claims_due: Vec<DocId>,
    /// Insurees of this step whose claims are adjudicated again (their registration, family
    /// or policy changed).
    insurees_due: Vec<DocId>,
    /// The store's last sequence when a step last found the log read to its end (writes that
    /// take a sequence but leave no log entry, quarantine records, are not work).
    read_to: u64,
    /// What pricing a policy reads of the insurees and families that arrived lately (birth
    /// dates, members), as taken when central received them; kept until the log is drained.
    families: HashMap<DocId, Map<String, Value>>,
    /// Documents central edited in their own turn, with the heads its edit left: when the log
    /// brings them back unchanged since, there is nothing to do again.
    own_edits: HashMap<DocId, Vec<[u8; 32]>>,
}

impl Central {
    /// Central's services over `engine`, resuming from their record in its store.
    pub fn open(engine: &mut Engine, config: NumberConfig) -> Result<Self, CentralError> {
        let me = engine.identity();
        let certified_central = engine
            .trust()
            .authority(&me.public(), me.time(), engine.trust().revocations_held())
            .is_ok_and(|a| a.roles.contains(&Role::Central));
        if me.public() != me.root && !certified_central {
            return Err(CentralError::NotCentral);
        }
        let state = match engine.store().checkpoint(STATE_KEY)? {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| CentralError::State(e.to_string()))?
            }
            None => State::default(),
        };
        engine.canonical_at_receipt = true;
        Ok(Self {
            config,
            state,
            dirty: false,
            touched: HashSet::new(),
            claims_due: Vec::new(),
            insurees_due: Vec::new(),
            read_to: 0,
            families: HashMap::new(),
            own_edits: HashMap::new(),
        })
    }

    /// Whether the store's log holds arrivals not processed yet.
    pub fn has_work(&self, engine: &Engine) -> bool {
        engine
            .store()
            .stats()
            .is_ok_and(|s| s.last_seq > self.state.cursor.max(self.read_to))
    }

    /// Processes up to `max` log entries committed since the last step, then issues the leases
    /// due. Stages every edit and the new state; the caller commits ([`Engine::flush`]).
    pub fn step(&mut self, engine: &mut Engine, max: usize) -> Result<StepReport, CentralError> {
        let mut report = StepReport::default();
        let last = engine.store().stats()?.last_seq;
        let entries = engine.store().changes_since(self.state.cursor, max)?;
        report.read = entries.len();
        report.more = entries.len() == max;
        if !report.more {
            self.read_to = last;
        }
        // What pricing the step's policies reads of the insurees and families that arrived with
        // them, as taken when central received them.
        // Kept across steps until the log is drained: a session's documents reach the log in
        // an order of their own, a family and its policy often in different steps.
        let mut families = std::mem::take(&mut self.families);
        for (_, raw) in &entries {
            let id = DocId(uuid::Uuid::from_bytes(*raw));
            if let Some(p) = engine
                .canonical_given
                .get(&id)
                .and_then(|f| f.pricing.as_ref())
            {
                families.insert(id, p.clone());
            }
        }
        // Read the batch's documents on every core first (reading is most of the work).
        // Not central's own edits coming back, nor what the services leave alone.
        let mut ids: Vec<DocId> = Vec::with_capacity(entries.len());
        let mut patients_arrived = false;
        for (_, raw) in &entries {
            let id = DocId(uuid::Uuid::from_bytes(*raw));
            let Some(meta) = engine.meta_of(&id)? else {
                continue;
            };
            patients_arrived |= meta.ty == "Patient";
            // Central's own edit of a document it processed, coming back through the log as
            // central left it: done.
            if self
                .own_edits
                .remove(&id)
                .is_some_and(|heads| heads == meta.heads)
            {
                continue;
            }
            if served_type(&meta.ty) {
                // A resource without a business number that got its canonical id as central
                // received it has nothing more to be done: not read at all.
                let settled = NumberKind::of_type(&meta.ty).is_none()
                    && meta.ty != "Patient"
                    && engine
                        .find_ids(
                            &meta.ty,
                            &IdentifierQuery::Exact(IdentKey::new(
                                engine.identity().system.clone(),
                                id.to_string(),
                            )),
                        )?
                        .contains(&id);
                let t = std::time::Instant::now();
                // A policy is always priced again (its family may have changed with it), a
                // claim always adjudicated.
                let clean = !matches!(meta.ty.as_str(), "Contract" | "Claim")
                    && (settled || self.nothing_to_do(engine, &id, &meta.ty)?);
                if meta.ty == "Patient" {
                    report.duplicate_check_nanos += t.elapsed().as_nanos();
                }
                if !clean {
                    ids.push(id);
                } else if let Some(facts) = engine.canonical_given.remove(&id) {
                    self.state.canonical += 1;
                    report.canonical += 1;
                    self.dirty = true;
                    if let (Some(kind), Some(n)) = (NumberKind::of_type(&meta.ty), &facts.number) {
                        self.count_lease_use(kind, n);
                    }
                }
            }
        }
        self.touched.clear();
        let mut loaded = engine.preload(&ids, &fields_for);
        for (id, l) in &loaded {
            if let Some(p) = pricing_fields(&l.ty, &l.json) {
                families.entry(*id).or_insert(p);
            }
        }
        // Insurees arrived: the claims that named one central did not hold are tried again.
        if patients_arrived && !self.state.claims_without_insuree.is_empty() {
            self.claims_due.extend(
                self.state
                    .claims_without_insuree
                    .iter()
                    .filter_map(|c| DocId::parse(c)),
            );
        }
        let mut seen = HashSet::new();
        let wanted: HashSet<DocId> = ids.iter().copied().collect();
        for (seq, raw) in entries {
            let id = DocId(uuid::Uuid::from_bytes(raw));
            if wanted.contains(&id) && seen.insert(id) {
                // Unless an earlier document of the batch changed it since.
                let json = loaded
                    .remove(&id)
                    .filter(|_| !engine.has_pending_write(&id) && !self.touched.contains(&id));
                self.process(engine, &id, json, &families, &mut report)?;
            }
            self.state.cursor = seq;
            self.dirty = true;
        }
        if report.more {
            self.families = families;
        }
        self.adjudicate_due(engine, &mut report)?;
        report.leases = self.issue_leases(engine)?;
        if self.dirty {
            let value =
                serde_json::to_vec(&self.state).map_err(|e| CentralError::State(e.to_string()))?;
            engine.push(
                Write::Checkpoint {
                    peer: STATE_KEY.into(),
                    value,
                },
                None,
            );
            self.dirty = false;
        }
        Ok(report)
    }

    /// Whether a document given its canonical id as central received it needs nothing more,
    /// judged from what was taken of it then ([`Facts`]) and the indexes, without reading it: it
    /// has a valid business number no other resource holds (if its type has one), shares no
    /// blocking key with another insuree, and carries no flag or link to reconsider.
    fn nothing_to_do(&self, engine: &Engine, id: &DocId, ty: &str) -> Result<bool, CentralError> {
        let Some(facts) = engine.canonical_given.get(id) else {
            return Ok(false);
        };
        if facts.flagged || facts.linked {
            return Ok(false);
        }
        if let Some(kind) = NumberKind::of_type(ty) {
            let Some(number) = &facts.number else {
                return Ok(false);
            };
            if self.config.rule(kind).check(kind, number).is_err() {
                return Ok(false);
            }
            let holders = engine.find_ids(
                ty,
                &IdentifierQuery::Exact(IdentKey::openimis_code(number.clone())),
            )?;
            if holders.iter().any(|d| d != id) {
                return Ok(false);
            }
        }
        for key in &facts.keys {
            if engine
                .store()
                .referrers(PERSON_KEY_INDEX, "", key)?
                .iter()
                .any(|d| d != id.as_bytes())
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Processes one document that changed.
    fn process(
        &mut self,
        engine: &mut Engine,
        id: &DocId,
        loaded: Option<Loaded>,
        families: &HashMap<DocId, Map<String, Value>>,
        report: &mut StepReport,
    ) -> Result<(), CentralError> {
        let Some(meta) = engine.meta_of(id)? else {
            return Ok(());
        };
        if !served_type(&meta.ty) {
            return Ok(());
        }
        let (ty, old, preloaded) = match loaded {
            Some(l) => (l.ty, l.json, Some((l.live, l.partial))),
            None => match engine.stored_json(id)? {
                Some((ty, json)) => (ty, json, None),
                None => return Ok(()),
            },
        };
        let mut new = old.clone();
        let me = engine.identity().system.clone();
        // First seen here: without central's identifier, or given it as central received it.
        let given_at_receipt = engine.canonical_given.remove(id).is_some();
        let first_time = central_id(&new, &me).is_none() || given_at_receipt;
        if central_id(&new, &me).is_none() {
            self.give_canonical_id(engine, id, &ty, &mut new)?;
        } else if given_at_receipt {
            self.state.canonical += 1;
        }
        if first_time {
            report.canonical += 1;
        }
        let mut related = Vec::new();
        if let Some(kind) = NumberKind::of_type(&ty) {
            if business_number(&new).is_none() {
                self.assign_number(engine, kind, &mut new)?;
            } else if first_time {
                self.count_lease_use(kind, business_number(&new).unwrap_or_default());
            }
            related.extend(self.number_flags(engine, id, kind, &mut new)?);
        }
        if ty == "Patient" {
            let t = std::time::Instant::now();
            related.extend(self.link_duplicate(engine, id, &mut new)?);
            report.duplicate_check_nanos += t.elapsed().as_nanos();
        }
        if ty == "Contract" {
            let t = std::time::Instant::now();
            if reprice(engine, id, &mut new, families) {
                report.priced += 1;
            }
            report.pricing_nanos += t.elapsed().as_nanos();
            self.receipt_flags(engine, id, &mut new)?;
        }
        if new != old {
            match preloaded {
                Some((live, partial)) => {
                    engine.edit_loaded(id, live, partial, &old, &new)?;
                }
                None => self.edit(engine, id, &old, &new)?,
            }
            report.edited += 1;
            // Only an edit in the document's own turn: one edited for another's sake (a flag
            // set because of another registration) is still to be processed when the log brings it.
            if let Some(heads) = engine.staged_heads(id) {
                self.own_edits.insert(*id, heads);
            }
        } else if let Some((live, false)) = preloaded {
            engine.put_back(*id, live, false);
        }
        if ty == "Claim" {
            self.claims_due.push(*id);
        } else if matches!(ty.as_str(), "Patient" | "Group" | "Contract") {
            let concerned = engine.insurees_with_claims(id, &ty, &new)?;
            self.insurees_due.extend(concerned);
        }
        // The registrations this one shares a number or a person with may change too.
        for (other, change) in related {
            if other == *id {
                continue;
            }
            let Some((_, o_old)) = engine.stored_json(&other)? else {
                continue;
            };
            let mut o_new = o_old.clone();
            match change {
                Related::Number(kind) => {
                    self.number_flags(engine, &other, kind, &mut o_new)?;
                }
                Related::Replaces(link) => add_link(&mut o_new, link, "replaces"),
            }
            if o_new != o_old {
                self.edit(engine, &other, &o_old, &o_new)?;
                self.touched.insert(other);
                report.edited += 1;
            }
        }
        Ok(())
    }

    /// Adjudicates the step's claims once its documents are processed (a claim's insuree and
    /// policy often arrive with it): the claims that changed and every claim of the insurees
    /// whose claims, registration, family or policy changed, in the order claims are checked
    /// (`claims::order_key`), so that central's verdicts depend on what it holds, not on the
    /// order it arrived in.
    fn adjudicate_due(
        &mut self,
        engine: &mut Engine,
        report: &mut StepReport,
    ) -> Result<(), CentralError> {
        let claims = std::mem::take(&mut self.claims_due);
        let insurees = std::mem::take(&mut self.insurees_due);
        if claims.is_empty() && insurees.is_empty() {
            return Ok(());
        }
        let (ordered, unresolved) = engine.claims_to_adjudicate(claims.clone(), insurees)?;
        let before = self.state.claims_without_insuree.len();
        let mut changed = false;
        for c in &claims {
            changed |= self.state.claims_without_insuree.remove(&c.to_string());
        }
        for c in unresolved {
            changed |= self.state.claims_without_insuree.insert(c.to_string());
        }
        if changed || before != self.state.claims_without_insuree.len() {
            self.dirty = true;
        }
        for id in ordered {
            self.adjudicate(engine, &id, report)?;
        }
        Ok(())
    }

    /// Adjudicates claim `id` with everything central holds: its verdict is the claim's
    /// ClaimResponse, created or brought up to date.
    fn adjudicate(
        &mut self,
        engine: &mut Engine,
        id: &DocId,
        report: &mut StepReport,
    ) -> Result<(), CentralError> {
        let Some(mut response) = engine.adjudicate(id)? else {
            return Ok(());
        };
        let rid = crate::claims::response_id(id);
        // A verdict given again keeps the day it was first given: the same verdict is no change.
        if let Some((_, before)) = engine.stored_json(&rid)?
            && let Some(created) = before.get("created")
        {
            response["created"] = created.clone();
        }
        let rid = rid.to_string();
        match engine.update("ClaimResponse", &rid, response, None) {
            Ok((_, crate::write::Outcome::Unchanged)) => {}
            Ok(_) => {
                report.adjudicated += 1;
                self.state.claims_adjudicated += 1;
                self.dirty = true;
            }
            Err(e) => tracing::warn!(doc = %id, error = %e, "a claim central cannot adjudicate"),
        }
        Ok(())
    }

    fn edit(
        &mut self,
        engine: &mut Engine,
        id: &DocId,
        old: &Map<String, Value>,
        new: &Map<String, Value>,
    ) -> Result<(), CentralError> {
        engine.edit_stored(id, old, new)?;
        Ok(())
    }

    /// Adds central's identifier with the canonical id: the openIMIS UUID the resource carries,
    /// else its document id, unless another resource of its type has it already.
    fn give_canonical_id(
        &mut self,
        engine: &Engine,
        id: &DocId,
        ty: &str,
        json: &mut Map<String, Value>,
    ) -> Result<(), CentralError> {
        let me = engine.identity().system.clone();
        let candidate = openimis_uuid(json).unwrap_or_else(|| id.to_string());
        let taken = |system: &str| -> Result<bool, StoreError> {
            Ok(engine
                .find_ids(
                    ty,
                    &IdentifierQuery::Exact(IdentKey::new(system, candidate.clone())),
                )?
                .iter()
                .any(|d| d != id))
        };
        let collides = taken(&me)? || taken("openimis-type:UUID")?;
        let value = if collides {
            self.state.collisions += 1;
            // A new UUID, derived from the document's own id: every run decides alike.
            let fresh = derived_uuid(&["canonical", &id.to_string()]).to_string();
            tracing::warn!(doc = %id, ty, taken = %candidate, canonical = %fresh, "canonical id collides: a new UUID");
            fresh
        } else {
            candidate
        };
        push_identifier(json, canonical_identifier(&me, &value));
        self.state.canonical += 1;
        Ok(())
    }

    /// Assigns a resource that came without a business number one from central's counter.
    fn assign_number(
        &mut self,
        engine: &Engine,
        kind: NumberKind,
        json: &mut Map<String, Value>,
    ) -> Result<(), CentralError> {
        let Some(number) = self.next_free(engine, kind)? else {
            tracing::error!(kind = kind.name(), "no numbers left under the rule");
            return Ok(());
        };
        push_identifier(
            json,
            json!({"type": {"coding": [{"system": OPENIMIS_IDENTIFIER_TYPES, "code": "Code"}]},
                "value": number}),
        );
        *self.state.assigned.entry(kind).or_default() += 1;
        Ok(())
    }

    /// The next number of central's counter no resource holds yet.
    fn next_free(
        &mut self,
        engine: &Engine,
        kind: NumberKind,
    ) -> Result<Option<String>, CentralError> {
        let rule = self.config.making_rule(kind);
        loop {
            let n = self.counter(kind);
            if n >= rule.capacity() {
                return Ok(None);
            }
            *self.state.next.entry(kind).or_default() = n + 1;
            self.dirty = true;
            let Some(number) = rule.make(n) else { continue };
            if engine
                .find_ids(
                    kind.resource_type(),
                    &IdentifierQuery::Exact(IdentKey::openimis_code(number.clone())),
                )?
                .is_empty()
            {
                return Ok(Some(number));
            }
        }
    }

    /// The next counter of `kind`. Central's numbers start in the middle of the range the rule
    /// allows (`5000000004` for 10 digits), leaving the lower half to numbers printed on cards
    /// before the deployment; a number some resource holds already is never made again.
    fn counter(&self, kind: NumberKind) -> u64 {
        self.state
            .next
            .get(&kind)
            .copied()
            .unwrap_or_else(|| self.config.making_rule(kind).capacity() / 2)
    }

    fn count_lease_use(&mut self, kind: NumberKind, number: &str) {
        for l in &mut self.state.leases {
            if l.kind == kind {
                let lease = Lease {
                    kind,
                    holder: String::new(),
                    first: l.first,
                    count: l.count,
                    rule: self.config.making_rule(kind),
                };
                if lease.contains(number) {
                    l.used += 1;
                    self.dirty = true;
                    return;
                }
            }
        }
    }

    /// Flags policy `id` (reading `json`) whose contribution carries a receipt another policy
    /// of the product carried first (processed by central before it, and not flagged for it
    /// itself): two officers who used one receipt book offline. The flag syncs back to the
    /// officer, whose contribution needs its own receipt.
    fn receipt_flags(
        &mut self,
        engine: &mut Engine,
        id: &DocId,
        json: &mut Map<String, Value>,
    ) -> Result<(), CentralError> {
        let me = engine.identity().system.clone();
        let mut flags: Vec<Flag> = flags_of(json)
            .into_iter()
            .filter(|f| f.code != FlagCode::ReceiptTaken)
            .collect();
        for key in receipt_keys(json) {
            let receipt = key
                .split_once('|')
                .map_or(key.as_str(), |(_, r)| r)
                .to_string();
            for other in engine.referrers(RECEIPT_INDEX, "", &key)? {
                if other == *id {
                    continue;
                }
                let Some((_, o)) = engine.stored_json(&other)? else {
                    continue;
                };
                let Some(canonical) = central_id(&o, &me) else {
                    continue;
                };
                let flagged_there = flags_of(&o).iter().any(|f| {
                    f.code == FlagCode::ReceiptTaken && f.value.as_deref() == Some(&receipt)
                });
                if flagged_there {
                    continue;
                }
                if !had_flag(json, FlagCode::ReceiptTaken) {
                    tracing::info!(doc = %id, receipt, "a receipt used before for the product: flagged");
                }
                flags.push(Flag {
                    code: FlagCode::ReceiptTaken,
                    reason: format!(
                        "receipt {receipt} was used before for another policy of this product \
                         (openIMIS: a receipt is unique within a product); this contribution \
                         needs its own receipt"
                    ),
                    other: Some(
                        json!({"type": "Contract", "identifier": {"system": me, "value": canonical}}),
                    ),
                    value: Some(receipt.clone()),
                });
                break;
            }
        }
        set_flags(json, flags);
        Ok(())
    }

    /// Sets the number flags of document `id` (reading `json`) from what the store holds now;
    /// returns the other registrations of its number, whose flags may change with it.
    fn number_flags(
        &mut self,
        engine: &mut Engine,
        id: &DocId,
        kind: NumberKind,
        json: &mut Map<String, Value>,
    ) -> Result<Vec<(DocId, Related)>, CentralError> {
        let me = engine.identity().system.clone();
        let mut flags: Vec<Flag> = flags_of(json)
            .into_iter()
            .filter(|f| {
                !matches!(
                    f.code,
                    FlagCode::NumberTaken | FlagCode::NumberReused | FlagCode::NumberInvalid
                )
            })
            .collect();
        let mut related: Vec<(DocId, Related)> = flags_of(json)
            .iter()
            .filter(|f| matches!(f.code, FlagCode::NumberTaken | FlagCode::NumberReused))
            .filter_map(|f| f.other.as_ref().and_then(|o| other_doc(engine, kind, o)))
            .map(|d| (d, Related::Number(kind)))
            .collect();
        let Some(number) = business_number(json).map(String::from) else {
            set_flags(json, flags);
            return Ok(related);
        };
        if let Err(e) = self.config.rule(kind).check(kind, &number) {
            if !had_flag(json, FlagCode::NumberInvalid) {
                self.state.numbers_invalid += 1;
                self.dirty = true;
            }
            flags.push(Flag {
                code: FlagCode::NumberInvalid,
                reason: format!("{e}; openIMIS will refuse it (error {})", e.code()),
                other: None,
                value: Some(number.clone()),
            });
        }
        let ty = kind.resource_type();
        let others = engine.find_ids(
            ty,
            &IdentifierQuery::Exact(IdentKey::openimis_code(number.clone())),
        )?;
        let mut owner = None;
        let mut taker = None;
        for other in others.iter().filter(|o| *o != id) {
            related.push((*other, Related::Number(kind)));
            let Some((_, o)) = engine.stored_json(other)? else {
                continue;
            };
            let Some(canonical) = central_id(&o, &me) else {
                continue; // not processed yet: it will be flagged when it is
            };
            let taken_there = flags_of(&o)
                .iter()
                .any(|f| f.code == FlagCode::NumberTaken && f.value.as_deref() == Some(&number));
            let reference = json!({"type": ty, "identifier": {"system": me, "value": canonical}});
            if taken_there {
                taker.get_or_insert(reference);
            } else {
                owner.get_or_insert(reference);
            }
        }
        if let Some(owner) = owner {
            if !had_flag(json, FlagCode::NumberTaken) {
                self.state.numbers_taken += 1;
                self.dirty = true;
                tracing::info!(doc = %id, kind = kind.name(), number, "a number registered earlier for another resource: flagged");
            }
            flags.push(Flag {
                code: FlagCode::NumberTaken,
                reason: format!(
                    "{} {number} was registered earlier for another {}; this one needs a new {}",
                    kind.label(),
                    ty,
                    kind.label()
                ),
                other: Some(owner),
                value: Some(number.clone()),
            });
        } else if let Some(taker) = taker {
            flags.push(Flag {
                code: FlagCode::NumberReused,
                reason: format!(
                    "{} {number} was entered again for another {} registered later, which \
                     was flagged; this registration keeps it",
                    kind.label(),
                    ty
                ),
                other: Some(taker),
                value: Some(number.clone()),
            });
        }
        set_flags(json, flags);
        related.sort_by_key(|(d, _)| *d);
        related.dedup_by_key(|(d, _)| *d);
        Ok(related)
    }

    /// Links Patient `id` (reading `json`) `replaced-by` an earlier registration of the same
    /// person, if there is one; returns the earlier registration, to link back.
    fn link_duplicate(
        &mut self,
        engine: &mut Engine,
        id: &DocId,
        json: &mut Map<String, Value>,
    ) -> Result<Vec<(DocId, Related)>, CentralError> {
        let me = engine.identity().system.clone();
        if has_link(json, "replaced-by") {
            return Ok(Vec::new());
        }
        let mut candidates = Vec::new();
        for key in blocking_keys("Patient", json) {
            for raw in engine.store().referrers(PERSON_KEY_INDEX, "", &key)? {
                let other = DocId(uuid::Uuid::from_bytes(raw));
                if other != *id && !candidates.contains(&other) {
                    candidates.push(other);
                }
            }
        }
        candidates.sort();
        for other in candidates {
            let Some((ty, o)) = engine.stored_json(&other)? else {
                continue;
            };
            if ty != "Patient" || has_link(&o, "replaced-by") {
                continue;
            }
            let Some(canonical) = central_id(&o, &me) else {
                continue; // not processed yet: it will find this one when it is
            };
            let Some(mine) = central_id(json, &me).map(String::from) else {
                continue;
            };
            let earlier =
                json!({"type": "Patient", "identifier": {"system": me, "value": canonical}});
            let later = json!({"type": "Patient", "identifier": {"system": me, "value": mine}});
            add_link(json, earlier.clone(), "replaced-by");
            let mut flags = flags_of(json);
            flags.push(Flag {
                code: FlagCode::DuplicatePerson,
                reason: "this person was registered earlier (same identity document, or same \
                         name, birth date and village): this registration is replaced by the \
                         earlier one; nothing was deleted"
                    .into(),
                other: Some(earlier),
                value: None,
            });
            set_flags(json, flags);
            self.state.persons_linked += 1;
            self.dirty = true;
            tracing::info!(doc = %id, earlier = %other, "duplicate person linked");
            return Ok(vec![(other, Related::Replaces(later))]);
        }
        Ok(Vec::new())
    }

    /// Leases a block of numbers to every certified enrolment officer (insurance numbers) and
    /// claim administrator (claim codes) without one, or with half of its last one used.
    fn issue_leases(&mut self, engine: &mut Engine) -> Result<usize, CentralError> {
        let now = engine.identity().time();
        let mut due: Vec<(NumberKind, String, Vec<String>)> = Vec::new();
        {
            let trust = engine.trust();
            let held = trust.revocations_held();
            let (certs, _) = trust.all();
            for c in certs {
                let Ok(key) = c.subject_key() else { continue };
                if trust.authority(&key, now, held).is_err() {
                    continue;
                }
                for role in &c.roles {
                    let kind = match role {
                        Role::EnrolmentOfficer => NumberKind::Chfid,
                        Role::ClaimAdministrator => NumberKind::ClaimCode,
                        _ => continue,
                    };
                    let mine = self
                        .state
                        .leases
                        .iter()
                        .filter(|l| l.kind == kind && l.holder == c.subject);
                    let (total, last) = mine.fold((0, None), |(t, _), l| (t + l.count, Some(l)));
                    let needs = match last {
                        None => total == 0,
                        Some(l) => l.used * 2 >= l.count,
                    };
                    if needs && !due.iter().any(|(k, h, _)| *k == kind && *h == c.subject) {
                        due.push((kind, c.subject.clone(), c.scope()));
                    }
                }
            }
        }
        let mut issued = 0;
        for (kind, holder, places) in due.into_iter().take(LEASES_PER_STEP) {
            let rule = self.config.making_rule(kind);
            let first = self.counter(kind);
            let count = self.config.lease_size;
            if first.saturating_add(count) > rule.capacity() {
                tracing::error!(
                    kind = kind.name(),
                    "no numbers left to lease under the rule"
                );
                break;
            }
            *self.state.next.entry(kind).or_default() = first + count;
            let lease = Lease {
                kind,
                holder: holder.clone(),
                first,
                count,
                rule,
            };
            let at: Vec<Value> = places
                .iter()
                .map(|p| json!({"type": "Location", "identifier": {"value": p}}))
                .collect();
            let mut doc = lease.to_json(&at);
            // One document per block: its id follows from the block.
            let id = derived_uuid(&["lease", kind.name(), &first.to_string()]);
            doc.insert("id".into(), Value::String(id.to_string()));
            engine.create(Value::Object(doc), Some("Basic"), true, &|_| None)?;
            self.state.leases.push(LeaseRecord {
                kind,
                holder,
                first,
                count,
                used: 0,
            });
            self.dirty = true;
            issued += 1;
        }
        Ok(issued)
    }

    /// The services' figures for `/status`.
    pub fn status(&self, engine: &Engine) -> Value {
        let awaiting = engine
            .store()
            .changes_since(self.state.cursor, 1_000_000)
            .map(|v| v.len())
            .unwrap_or_default();
        let mut numbers = Map::new();
        for kind in NumberKind::ALL {
            let leases: Vec<&LeaseRecord> = self
                .state
                .leases
                .iter()
                .filter(|l| l.kind == kind)
                .collect();
            numbers.insert(
                kind.name().into(),
                json!({
                    "rule": self.config.rule(kind),
                    "leases": leases.len(),
                    "leased": leases.iter().map(|l| l.count).sum::<u64>(),
                    "used_from_leases": leases.iter().map(|l| l.used).sum::<u64>(),
                    "assigned_by_central": self.state.assigned.get(&kind).copied().unwrap_or_default(),
                    "next_counter": self.counter(kind),
                }),
            );
        }
        json!({
            "awaiting_processing": awaiting,
            "claims_adjudicated": self.state.claims_adjudicated,
            "processed_up_to_seq": self.state.cursor,
            "canonical_ids": {"assigned": self.state.canonical, "new_uuid_on_collision": self.state.collisions},
            "numbers": numbers,
            "flagged": {"number_taken": self.state.numbers_taken, "number_invalid": self.state.numbers_invalid},
            "duplicate_persons": {"found": self.state.persons_linked, "linked": self.state.persons_linked},
        })
    }
}

/// A UUID (v8, RFC 9562) derived from `parts`: the same parts give the same UUID.
pub(crate) fn derived_uuid(parts: &[&str]) -> uuid::Uuid {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// A change to make to another registration after processing one.
enum Related {
    /// Its number flags may change.
    Number(NumberKind),
    /// It gets a `replaces` link to this (logical reference).
    Replaces(Value),
}

/// Gives a document central receives from elsewhere its canonical id in the pass that checks
/// it, on the worker thread that loaded it: one load and one store write instead of two, on
/// every core. Declines (leaving it to [`Central::step`], which decides every case) when the
/// document already has central's identifier, carries an openIMIS UUID (which may be its
/// canonical id), or when another resource of its type holds its id as central's or openIMIS's
/// UUID; and on any error. When it adds the identifier, `json`, `doc` and `envelopes` hold the
/// new state and its signed change, and it returns what the services need of the document and
/// the change's bytes (stored after the received bytes: no second save of the document).
pub(crate) fn canonical_at_receipt(
    c: &crate::receive::AtReceipt<'_>,
    id: &DocId,
    ty: &str,
    doc: &mut automerge::AutoCommit,
    json: &mut Map<String, Value>,
    envelopes: &mut Vec<u8>,
) -> Option<(Facts, Vec<u8>)> {
    if !served_type(ty) || central_id(json, &c.me.system).is_some() || openimis_uuid(json).is_some()
    {
        return None;
    }
    let value = id.to_string();
    for system in [c.me.system.as_str(), "openimis-type:UUID"] {
        match c.store.find(ty, system, &value) {
            Ok(held) if held.iter().all(|d| d == id.as_bytes()) => {}
            _ => return None,
        }
    }
    let old: Map<String, Value> = json
        .get("identifier")
        .map(|i| ("identifier".to_string(), i.clone()))
        .into_iter()
        .collect();
    let mut new = old.clone();
    push_identifier(&mut new, canonical_identifier(&c.me.system, &value));
    doc.set_actor(c.me.actor.clone());
    let before = doc.get_heads();
    if fieldmesh_fhir_docs::apply_diff(doc, &old, &new).is_err() {
        return None;
    }
    doc.commit_with(automerge::transaction::CommitOptions::default().with_time(c.me.time()));
    for h in doc.get_heads() {
        fieldmesh_trust::Envelope::sign(&c.me.key, id.as_bytes(), ty, h.0, c.seen)
            .encode_into(envelopes);
    }
    json.extend(new);
    let facts = Facts {
        number: business_number(json).map(String::from),
        keys: Vec::new(),
        flagged: !flags_of(json).is_empty(),
        linked: json.contains_key("link"),
        pricing: pricing_fields(ty, json),
    };
    Some((facts, doc.save_after(&before)))
}

/// What central's services need to know of a document it gave its canonical id as it received
/// it, taken in that pass: most arrivals then need no second reading at all.
#[derive(Debug, Clone, Default)]
pub(crate) struct Facts {
    number: Option<String>,
    /// Its blocking keys (filled from its index entries).
    pub keys: Vec<String>,
    flagged: bool,
    linked: bool,
    /// What pricing a policy reads of it: an insuree's birth date, a family's members.
    pricing: Option<Map<String, Value>>,
}

/// The fields pricing a policy reads of an insuree (birth date) or a family (members).
fn pricing_fields(ty: &str, json: &Map<String, Value>) -> Option<Map<String, Value>> {
    let keys: &[&str] = match ty {
        "Patient" => &["resourceType", "birthDate"],
        "Group" => &["resourceType", "member"],
        _ => return None,
    };
    Some(
        keys.iter()
            .filter_map(|k| json.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect(),
    )
}

/// Prices policy `id` (reading `json`) again from what central holds after a merge: the value
/// the rules give from the merged state, whoever wrote what ([`price_contract`]). True if it
/// changed.
fn reprice(
    engine: &Engine,
    id: &DocId,
    json: &mut Map<String, Value>,
    families: &HashMap<DocId, Map<String, Value>>,
) -> bool {
    let before = json.clone();
    let today = Date::from_unix(engine.identity().time());
    let reader = engine.reader();
    let priced = price_contract(
        json,
        &id.to_string(),
        today,
        &mut crate::enrolment::Prefetched {
            docs: families,
            reader: &reader,
        },
    );
    match priced {
        Ok(p) => {
            for w in &p.warnings {
                tracing::debug!(doc = %id, warning = %w, "policy priced by central");
            }
        }
        Err(e) => {
            tracing::warn!(doc = %id, error = %e, "a policy central cannot price");
            *json = before;
            return false;
        }
    }
    *json != before
}

/// Central's identifier with a canonical id.
fn canonical_identifier(system: &str, value: &str) -> Value {
    json!({"system": system,
        "type": {"coding": [{"system": OPENIMIS_IDENTIFIER_TYPES, "code": "UUID"}]},
        "value": value})
}

/// The root fields central's services read of a document of type `ty`: its identifiers,
/// flags (extensions) and, for an insuree, what finds the same person again; for a claim, its
/// facility (its place).
fn fields_for(ty: &str) -> Option<&'static [&'static str]> {
    Some(match ty {
        "Patient" => &[
            "resourceType",
            "identifier",
            "extension",
            "link",
            "name",
            "birthDate",
            "address",
        ],
        // Its members, for pricing the policy that arrives with it.
        "Group" => &["resourceType", "identifier", "extension", "member"],
        // A claim is adjudicated from the whole of it.
        "Claim" => return None,
        "CoverageEligibilityRequest" => &[
            "resourceType",
            "identifier",
            "extension",
            "provider",
            "facility",
        ],
        // A policy is priced again from the whole of it.
        "Contract" => return None,
        _ => &["resourceType", "identifier", "extension"],
    })
}

/// Whether central's services process documents of this type (not certificates, revocations,
/// evidence or central's own reference data).
fn served_type(ty: &str) -> bool {
    !matches!(ty, "Basic" | "AuditEvent" | "ClaimResponse")
}

/// The value of central's identifier (`system`) on a resource.
fn central_id<'a>(json: &'a Map<String, Value>, system: &str) -> Option<&'a str> {
    identifiers(json).find_map(|i| {
        (i.get("system").and_then(Value::as_str) == Some(system))
            .then(|| i.get("value").and_then(Value::as_str))
            .flatten()
    })
}

/// The openIMIS UUID a resource carries (an identifier typed `UUID`), if it is one.
fn openimis_uuid(json: &Map<String, Value>) -> Option<String> {
    identifiers(json).find_map(|i| {
        let map = i.as_object()?;
        (openimis_type_code(map) == Some("UUID") && map.get("system").is_none())
            .then(|| map.get("value").and_then(Value::as_str))
            .flatten()
            .filter(|v| uuid::Uuid::parse_str(v).is_ok())
            .map(String::from)
    })
}

/// A resource's business number: its first identifier typed `Code` (or `MR`, `SB`).
pub fn business_number(json: &Map<String, Value>) -> Option<&str> {
    identifiers(json).find_map(|i| {
        let map = i.as_object()?;
        (openimis_type_code(map) == Some("Code"))
            .then(|| map.get("value").and_then(Value::as_str))
            .flatten()
            .filter(|v| !v.is_empty())
    })
}

fn identifiers(json: &Map<String, Value>) -> impl Iterator<Item = &Value> {
    json.get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

fn push_identifier(json: &mut Map<String, Value>, identifier: Value) {
    match json.get_mut("identifier") {
        Some(Value::Array(list)) => list.push(identifier),
        _ => {
            json.insert("identifier".into(), Value::Array(vec![identifier]));
        }
    }
}

fn had_flag(json: &Map<String, Value>, code: FlagCode) -> bool {
    flags_of(json).iter().any(|f| f.code == code)
}

fn has_link(json: &Map<String, Value>, kind: &str) -> bool {
    json.get("link")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|l| l.get("type").and_then(Value::as_str) == Some(kind))
}

fn add_link(json: &mut Map<String, Value>, other: Value, kind: &str) {
    let link = json!({"other": other, "type": kind});
    match json.get_mut("link") {
        Some(Value::Array(list)) => {
            if !list.contains(&link) {
                list.push(link);
            }
        }
        _ => {
            json.insert("link".into(), Value::Array(vec![link]));
        }
    }
}

/// The document a flag's `other` reference names (central's identifier), if held here.
fn other_doc(engine: &Engine, kind: NumberKind, other: &Value) -> Option<DocId> {
    let system = other.pointer("/identifier/system")?.as_str()?;
    let value = other.pointer("/identifier/value")?.as_str()?;
    engine
        .find_ids(
            kind.resource_type(),
            &IdentifierQuery::Exact(IdentKey::new(system, value)),
        )
        .ok()?
        .into_iter()
        .next()
}

impl Engine {
    /// The resources central flagged that this node holds (at most 100): type, id, code,
    /// reason. What an officer's app shows after a sync; `/status` lists them.
    ///
    /// `/status` asks for this at each call: a document listed before and not written since
    /// (the same sequence in its record) is listed as it was read then, not loaded again.
    pub fn flagged(&mut self) -> Result<Vec<Value>, CentralError> {
        let mut out = Vec::new();
        let mut ids: Vec<[u8; 16]> = Vec::new();
        let mut seen: HashSet<[u8; 16]> = HashSet::new();
        for code in FlagCode::ALL {
            for id in self.store.referrers(FLAG_INDEX, "", code.name())? {
                if seen.insert(id) {
                    ids.push(id);
                }
            }
        }
        let mut listed = HashMap::new();
        for raw in ids.into_iter().take(FLAGGED_LISTED) {
            let id = DocId(uuid::Uuid::from_bytes(raw));
            let Some(seq) = self.store.doc_meta(&raw)?.map(|m| m.seq) else {
                continue;
            };
            let entries = match self.flags_listed.remove(&id) {
                Some((at, entries)) if at == seq && !self.has_pending_write(&id) => entries,
                _ => {
                    let Some((ty, json)) = self.stored_json(&id)? else {
                        continue;
                    };
                    flags_of(&json)
                        .into_iter()
                        .map(|f| {
                            json!({
                                "resourceType": ty,
                                "id": id.to_string(),
                                "code": f.code.name(),
                                "number": f.value,
                                "reason": f.reason,
                            })
                        })
                        .collect()
                }
            };
            out.extend(entries.iter().cloned());
            listed.insert(id, (seq, entries));
        }
        self.flags_listed = listed;
        Ok(out)
    }

    /// The leases central gave this device, by first counter, with how many of each it used.
    fn my_leases(&mut self) -> Result<Vec<(DocId, Lease, u64)>, ReadError> {
        let me = hex::encode(self.me.public());
        let ids = self.find_ids(
            "Basic",
            &IdentifierQuery::Exact(IdentKey::new(LEASE_HOLDER_SYSTEM, me.clone())),
        )?;
        let mut leases = Vec::new();
        for id in ids {
            if let Some((_, json)) = self.stored_json(&id)?
                && let Some(lease) = Lease::from_json(&json)
                && lease.holder == me
            {
                let used = match self.lease_used.get(&id) {
                    Some(u) => *u,
                    None => self
                        .store
                        .checkpoint(&lease_key(&id))?
                        .and_then(|b| String::from_utf8(b).ok())
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0),
                };
                leases.push((id, lease, used));
            }
        }
        leases.sort_by_key(|(_, l, _)| (l.kind, l.first));
        Ok(leases)
    }

    /// The next number of kind `kind` from the leases central gave this device, marked used
    /// (durably with the next commit, in the same commit as the resource that takes it when
    /// called from a write): `None` when no lease holds one left. A number some resource here
    /// already holds is skipped.
    pub fn take_leased_number(&mut self, kind: NumberKind) -> Result<Option<String>, ReadError> {
        for (id, lease, mut used) in self.my_leases()? {
            if lease.kind != kind {
                continue;
            }
            while used < lease.count {
                let number = lease.number(used);
                used += 1;
                self.lease_used.insert(id, used);
                self.push(
                    Write::Checkpoint {
                        peer: lease_key(&id),
                        value: used.to_string().into_bytes(),
                    },
                    None,
                );
                let Some(number) = number else { continue };
                let held = self.find_ids(
                    kind.resource_type(),
                    &IdentifierQuery::Exact(IdentKey::openimis_code(number.clone())),
                )?;
                if held.is_empty() {
                    return Ok(Some(number));
                }
            }
        }
        Ok(None)
    }

    /// The numbers left in this device's leases, by kind.
    pub fn leased_numbers_left(&mut self) -> Result<Value, ReadError> {
        let mut left: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (_, lease, used) in self.my_leases()? {
            *left.entry(lease.kind.name()).or_default() += lease.count.saturating_sub(used);
        }
        Ok(json!(left))
    }
}

/// The store record of how many numbers of lease `id` this device used.
fn lease_key(id: &DocId) -> String {
    format!("{LOCAL_CHECKPOINT_PREFIX}lease:{id}")
}
