//! The decision on one change: the facts it reads, the deployment's policy it is given, and the
//! rules in their order (see the crate docs).

use fieldmesh_fhir_docs::DocId;
use fieldmesh_fhir_docs::openimis::{Capability, OpenImis, Role};
use serde_json::{Map, Value};

use crate::keys::short;
use crate::{Authority, Envelope, Rejection, Trust};

/// What the decision needs to know of the deployment's data model: the capability writing a
/// resource type needs, what each role grants, and where a document is. The decision itself
/// (signatures, certificates, revocations, causality) knows nothing of openIMIS; [`OpenImis`]
/// is the policy every node runs.
pub trait Policy: Sync {
    /// The capability writing a `ty` needs.
    fn capability(&self, ty: &str) -> Capability;
    /// The capabilities a role grants.
    fn grants(&self, role: Role) -> &'static [Capability];
    /// Whether a role's writes are limited to the scope of its certificate.
    fn scoped(&self, role: Role) -> bool;
    /// The places (village or facility identifiers) a document of type `ty` lies in; `None` for
    /// types that name no place (checked by type only).
    fn places(&self, ty: &str, doc: &Map<String, Value>) -> Option<Vec<String>>;
}

impl Policy for OpenImis {
    fn capability(&self, ty: &str) -> Capability {
        Capability::for_type(ty)
    }
    fn grants(&self, role: Role) -> &'static [Capability] {
        role.grants()
    }
    fn scoped(&self, role: Role) -> bool {
        role.scoped()
    }
    fn places(&self, ty: &str, doc: &Map<String, Value>) -> Option<Vec<String>> {
        fieldmesh_fhir_docs::openimis::places(ty, doc)
    }
}

impl Authority<'_> {
    fn roles_text(&self) -> String {
        if self.roles.is_empty() {
            return "a key without roles".into();
        }
        let names: Vec<&str> = self.roles.iter().map(|r| r.name()).collect();
        let article = if names[0].starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!("{article} {}", names.join(" and "))
    }

    /// Checks that a role of the authority grants what writing a `ty` needs; returns whether
    /// the write must also lie in the authority's scope (every role granting it is scoped).
    pub fn grants(&self, policy: &dyn Policy, ty: &str) -> Result<bool, Rejection> {
        let capability = policy.capability(ty);
        let granting: Vec<Role> = self
            .roles
            .iter()
            .copied()
            .filter(|r| policy.grants(*r).contains(&capability))
            .collect();
        if granting.is_empty() {
            return Err(Rejection::NotPermitted {
                roles: self.roles_text(),
                capability,
                ty: ty.into(),
            });
        }
        Ok(granting.iter().all(|r| policy.scoped(*r)))
    }

    /// Checks that a `ty` reading `state` lies in the authority's scope: it names at least one
    /// place, and every place it names is in scope (a document with one address inside and one
    /// outside is outside).
    pub fn in_scope(
        &self,
        policy: &dyn Policy,
        ty: &str,
        state: &Map<String, Value>,
    ) -> Result<(), Rejection> {
        self.places_in_scope(ty, policy.places(ty, state).as_deref())
    }

    /// Checks that `places` (of a `ty`; `None` for a type that names no place) lie in the
    /// authority's scope; see [`Authority::in_scope`].
    pub fn places_in_scope(&self, ty: &str, places: Option<&[String]>) -> Result<(), Rejection> {
        let Some(places) = places else {
            return Ok(());
        };
        let inside = !places.is_empty() && places.iter().all(|p| self.scope.contains(&p.as_str()));
        if inside {
            return Ok(());
        }
        Err(Rejection::OutOfScope {
            ty: ty.into(),
            place: if places.is_empty() {
                "no place".into()
            } else {
                places.join(", ")
            },
            scope: if self.scope.is_empty() {
                "nothing".into()
            } else {
                self.scope.join(", ")
            },
        })
    }

    /// Checks that the authority may write a `ty` whose places are `before` (if the document
    /// existed; see [`crate::check::places_at`]) and whose state is `after`, under `policy`.
    pub fn permits(
        &self,
        policy: &dyn Policy,
        ty: &str,
        before: Option<Option<&[String]>>,
        after: &Map<String, Value>,
    ) -> Result<(), Rejection> {
        if !self.grants(policy, ty)? {
            return Ok(());
        }
        if let Some(before) = before {
            self.places_in_scope(ty, before)?;
        }
        self.in_scope(policy, ty, after)
    }
}

/// The prefix of the identifier systems nodes mint for the documents they create
/// (`urn:fieldmesh:node:<name>`, and any other `urn:fieldmesh:` system).
pub const NODE_SYSTEM_PREFIX: &str = "urn:fieldmesh:";

/// The node-minted identifiers of a document: `(system, value)` with a [`NODE_SYSTEM_PREFIX`]
/// system.
fn minted(state: &Map<String, Value>) -> Vec<(&str, &str)> {
    state
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| {
            let system = i.get("system")?.as_str()?;
            let value = i.get("value").and_then(Value::as_str).unwrap_or_default();
            system
                .starts_with(NODE_SYSTEM_PREFIX)
                .then_some((system, value))
        })
        .collect()
}

/// A node's identifier names the document the node created under that id, and nothing else: a
/// scoped author may not give document `doc` an identifier of a node's system whose value is
/// not `doc` itself (which would make references to another node's document find this one).
/// Only identifiers new since `before` are checked.
pub fn claimed_identity(
    doc: &DocId,
    before: Option<&Map<String, Value>>,
    after: &Map<String, Value>,
) -> Result<(), Rejection> {
    let doc = doc.to_string();
    let held = before.map(minted).unwrap_or_default();
    for (system, value) in minted(after) {
        if value != doc && !held.contains(&(system, value)) {
            return Err(Rejection::ForeignIdentifier {
                system: system.into(),
                value: value.into(),
            });
        }
    }
    Ok(())
}

/// The facts of one change that the decision reads.
#[derive(Debug, Clone)]
pub struct ChangeFacts {
    /// Change hash.
    pub hash: [u8; 32],
    /// Author (Automerge actor id bytes).
    pub actor: Vec<u8>,
    /// Sequence number of the author's changes in the document.
    pub seq: u64,
    /// The author's time (Unix seconds).
    pub time: i64,
    /// Dependencies.
    pub deps: Vec<[u8; 32]>,
}

impl Trust {
    /// The part of the decision that reads no document state: the signature, the dependencies,
    /// the author's certificate and revocations, the capability. Cheap, and done first for every
    /// change. Returns the author's authority when the change must also lie in its scope (see
    /// [`Authority::in_scope`]), `None` when it is accepted.
    #[allow(clippy::too_many_arguments)]
    pub fn decide_author(
        &self,
        policy: &dyn Policy,
        doc: &DocId,
        ty: &str,
        change: &ChangeFacts,
        envelope: Option<&Envelope>,
        rejected: &dyn Fn(&[u8; 32]) -> bool,
        vouched: &dyn Fn(&[u8; 32]) -> bool,
    ) -> Result<Option<Authority<'_>>, Rejection> {
        let holds = |e: &Envelope| self.verify_envelope(e, &change.actor, doc.as_bytes(), ty);
        self.decide_signed(policy, doc, ty, change, envelope, &holds, rejected, vouched)
    }

    /// [`Trust::decide_author`], with the signature checked already: `holds` says whether the
    /// change's envelope carries its author's signature ([`Trust::verify_envelope`], or a batch
    /// of them checked at once, [`Trust::verify_envelopes`]).
    #[allow(clippy::too_many_arguments)]
    pub fn decide_signed(
        &self,
        policy: &dyn Policy,
        doc: &DocId,
        ty: &str,
        change: &ChangeFacts,
        envelope: Option<&Envelope>,
        holds: &dyn Fn(&Envelope) -> bool,
        rejected: &dyn Fn(&[u8; 32]) -> bool,
        vouched: &dyn Fn(&[u8; 32]) -> bool,
    ) -> Result<Option<Authority<'_>>, Rejection> {
        let envelope = envelope.ok_or(Rejection::Unsigned)?;
        if envelope.hash != change.hash || !holds(envelope) {
            return Err(Rejection::BadSignature);
        }
        if let Some(dep) = change.deps.iter().find(|d| rejected(d)) {
            return Err(Rejection::DependsOnRejected { dep: short(dep) });
        }
        if let Some(seq) = self.equivocated(&change.actor, doc.as_bytes())
            && change.seq >= seq
        {
            return Err(Rejection::Equivocation { seq });
        }
        let authority = self.authority(&change.actor, change.time, envelope.revocations_seen)?;
        // A revoked key's word (its clock, the revocations it claims to have seen) decides
        // nothing: only central's list of the key's changes it held does.
        if let Some(r) = self.revocation_of(&change.actor)
            && !vouched(&change.hash)
        {
            return Err(Rejection::RevokedUnvouched {
                number: r.number,
                reason: r.reason.clone(),
            });
        }
        Ok(authority.grants(policy, ty)?.then_some(authority))
    }

    /// Decides on one received change of document `doc` (its id), of type `ty`. `before` is the
    /// document as of the change's dependencies (`None` when the change creates it), `after` as
    /// of the change itself; `rejected` says whether a dependency was rejected. See the crate
    /// docs. ([`crate::check()`] takes the same decision on every change of a document, with the
    /// places of a state that merges branches read as [`crate::check::places_at`] says.)
    #[allow(clippy::too_many_arguments)]
    pub fn decide(
        &self,
        policy: &dyn Policy,
        doc: &DocId,
        ty: &str,
        change: &ChangeFacts,
        envelope: Option<&Envelope>,
        rejected: &dyn Fn(&[u8; 32]) -> bool,
        before: Option<&Map<String, Value>>,
        after: &Map<String, Value>,
    ) -> Result<(), Rejection> {
        let Some(authority) =
            self.decide_author(policy, doc, ty, change, envelope, rejected, &|_| false)?
        else {
            return Ok(());
        };
        for state in before.into_iter().chain([after]) {
            authority.in_scope(policy, ty, state)?;
        }
        claimed_identity(doc, before, after)
    }
}
