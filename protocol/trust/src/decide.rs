//! The decision on one change: the facts it reads, the deployment's policy it is given, and the
//! rules in their order (see the crate docs).

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
        let Some(places) = policy.places(ty, state) else {
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
    /// existed) and `after`, under `policy`.
    pub fn permits(
        &self,
        policy: &dyn Policy,
        ty: &str,
        before: Option<&Map<String, Value>>,
        after: &Map<String, Value>,
    ) -> Result<(), Rejection> {
        if !self.grants(policy, ty)? {
            return Ok(());
        }
        for state in before.into_iter().chain([after]) {
            self.in_scope(policy, ty, state)?;
        }
        Ok(())
    }
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
    pub fn decide_author(
        &self,
        policy: &dyn Policy,
        ty: &str,
        change: &ChangeFacts,
        envelope: Option<&Envelope>,
        rejected: &dyn Fn(&[u8; 32]) -> bool,
    ) -> Result<Option<Authority<'_>>, Rejection> {
        let envelope = envelope.ok_or(Rejection::Unsigned)?;
        if envelope.hash != change.hash || !self.verify_envelope(envelope, &change.actor) {
            return Err(Rejection::BadSignature);
        }
        if let Some(dep) = change.deps.iter().find(|d| rejected(d)) {
            return Err(Rejection::DependsOnRejected { dep: short(dep) });
        }
        let authority = self.authority(&change.actor, change.time, envelope.revocations_seen)?;
        Ok(authority.grants(policy, ty)?.then_some(authority))
    }

    /// Decides on one received change of a `ty` document. `before` is the document as of the
    /// change's dependencies (`None` when the change creates it), `after` as of the change
    /// itself; `rejected` says whether a dependency was rejected. See the crate docs.
    #[allow(clippy::too_many_arguments)]
    pub fn decide(
        &self,
        policy: &dyn Policy,
        ty: &str,
        change: &ChangeFacts,
        envelope: Option<&Envelope>,
        rejected: &dyn Fn(&[u8; 32]) -> bool,
        before: Option<&Map<String, Value>>,
        after: &Map<String, Value>,
    ) -> Result<(), Rejection> {
        let Some(authority) = self.decide_author(policy, ty, change, envelope, rejected)? else {
            return Ok(());
        };
        for state in before.into_iter().chain([after]) {
            authority.in_scope(policy, ty, state)?;
        }
        Ok(())
    }
}
