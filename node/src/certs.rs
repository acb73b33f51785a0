//! Certificates and revocations as files and documents (`fieldmesh cert …`).
//!
//! Central signs a [`Certificate`] with its key and wraps the token in a `Basic` document that
//! central authors and signs like any other change. `fieldmesh cert issue` writes that document to
//! a certificate file (JSON) for the device; `fieldmesh cert install` merges it into the device's
//! store, checked like a change from a peer. From there it syncs to every node, which is how hubs
//! and other devices learn that the device may write.

use std::path::Path;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use fieldmesh_engine::{Engine, Source, now};
use fieldmesh_fhir_docs::{DocId, new_document};
use fieldmesh_trust::ed25519_dalek::SigningKey;
use fieldmesh_trust::{
    Certificate, Envelope, PeerKey, Revocation, Role, certificate_resource, issue_certificate,
    issue_revocation, revocation_resource, verify_certificate,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::DataDir;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A certificate as handed to a device: the token and the signed document that carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertFile {
    /// What this file is.
    pub kind: String,
    /// The certificate token (`fmc1.…`).
    pub token: String,
    /// The certificate, readable.
    pub certificate: Certificate,
    /// Id of the document carrying it.
    pub document: String,
    /// The Automerge document (base64).
    pub automerge: String,
    /// The signed envelopes of its change (base64).
    pub envelopes: String,
}

/// What `cert issue` is asked for.
#[derive(Debug, Clone)]
pub struct IssueRequest {
    /// The device's peer id.
    pub subject: String,
    /// The user (Practitioner code).
    pub user: String,
    /// Roles.
    pub roles: Vec<Role>,
    /// Villages (Location UUIDs or codes).
    pub locations: Vec<String>,
    /// Facilities (Organization UUIDs or codes).
    pub facilities: Vec<String>,
    /// Days of validity from now.
    pub days: u32,
    /// A renewal or re-scoping: counts from now, not from an hour ago.
    pub renewal: bool,
}

/// A document authored and signed by `central` holding `resource`.
fn signed_document(central: &DataDir, resource: &Value) -> Result<(DocId, Vec<u8>, Vec<u8>)> {
    let key = SigningKey::from_bytes(&central.secret());
    let json = resource
        .as_object()
        .context("a trust resource is an object")?;
    let mut doc = new_document(
        json,
        fieldmesh_fhir_docs::actor_for_key(&key.verifying_key().to_bytes()),
        now(),
    )?;
    let id = DocId::new();
    let ty = json
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("Basic");
    let mut envelopes = Vec::new();
    for h in doc.get_heads() {
        Envelope::sign(&key, id.as_bytes(), ty, h.0, 0).encode_into(&mut envelopes);
    }
    Ok((id, doc.save_nocompress(), envelopes))
}

/// Issues a certificate with central's key (the data directory of the root of trust).
pub fn issue(central: &DataDir, req: &IssueRequest) -> Result<CertFile> {
    if central.root_key()? != central.public_key() {
        bail!(
            "{} is not the root of trust of its deployment: certificates are issued on central",
            central.path.display()
        );
    }
    let subject = PeerKey::from_peer_id(&req.subject)
        .map(|k| k.0)
        .with_context(|| {
            format!(
                "{:?} is not a peer id (print a device's with `fieldmesh id --data DIR`)",
                req.subject
            )
        })?;
    if req.roles.is_empty() {
        bail!("a certificate needs at least one --role");
    }
    if req.roles.contains(&Role::EnrolmentOfficer) && req.locations.is_empty() {
        bail!(
            "an enrolment officer needs the villages they work in: --location CODE-OR-UUID (repeatable)"
        );
    }
    if req.roles.contains(&Role::ClaimAdministrator) && req.facilities.is_empty() {
        bail!("a claim administrator needs their facility: --facility CODE-OR-UUID");
    }
    let start = if req.renewal { now() } else { now() - 3600 };
    let cert = Certificate {
        serial: uuid::Uuid::new_v4().to_string(),
        subject: hex::encode(subject),
        user: req.user.clone(),
        roles: req.roles.clone(),
        locations: req.locations.clone(),
        facilities: req.facilities.clone(),
        not_before: start,
        not_after: start + i64::from(req.days) * 86_400,
    };
    let key = SigningKey::from_bytes(&central.secret());
    let token = issue_certificate(&key, &cert);
    let (id, bytes, envelopes) = signed_document(central, &certificate_resource(&token, &cert))?;
    Ok(CertFile {
        kind: "fieldmesh certificate".into(),
        token,
        certificate: cert,
        document: id.to_string(),
        automerge: B64.encode(bytes),
        envelopes: B64.encode(envelopes),
    })
}

/// Reads a certificate file.
pub fn read_file(path: &Path) -> Result<CertFile> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{} is not a fieldmesh certificate file (made by `fieldmesh cert issue`)",
            path.display()
        )
    })
}

/// Merges a certificate file into a node's store, checked like a change from a peer; returns the
/// certificate. `from` names the file for the quarantine and the logs.
pub fn install(engine: &mut Engine, file: &CertFile, from: &str) -> Result<Certificate> {
    let cert = verify_certificate(engine.trust().root(), &file.token)
        .context("this certificate was not issued by this node's central (check --root at init)")?;
    let id = DocId::parse(&file.document).context("the certificate file names no document")?;
    let payload = fieldmesh_protocol::DocPayload {
        id: *id.as_bytes(),
        ty: "Basic".into(),
        data: B64
            .decode(&file.automerge)
            .context("the certificate document is damaged")?,
        envelopes: Envelope::stored_to_wire(
            &B64.decode(&file.envelopes)
                .context("the certificate signatures are damaged")?,
            |_| true,
        ),
    };
    let report = engine.merge(vec![payload], &Source::File(from.to_string()))?;
    engine.flush()?;
    if report.refused > 0 {
        bail!("the certificate document was refused (see `fieldmesh quarantine`)");
    }
    Ok(cert)
}

/// Revokes every certificate of `subject` (a peer id) on central; returns the revocation.
pub fn revoke(
    engine: &mut Engine,
    central: &DataDir,
    subject: &str,
    reason: &str,
) -> Result<Revocation> {
    let key = PeerKey::from_peer_id(subject)
        .map(|k| k.0)
        .with_context(|| format!("{subject:?} is not a peer id"))?;
    let (_, revs) = engine.trust().all();
    let number = revs.iter().map(|r| r.number).max().unwrap_or(0) + 1;
    // Central vouches for the key's changes it holds now; every other change by the key will be
    // refused by every node that holds the revocation.
    let vouched = engine.authored_heads(&key)?;
    let rev = Revocation {
        vouched,
        number,
        subject: hex::encode(key),
        reason: reason.into(),
        issued: now(),
    };
    let root = SigningKey::from_bytes(&central.secret());
    let token = issue_revocation(&root, &rev);
    engine.create(
        revocation_resource(&token, &rev),
        Some("Basic"),
        false,
        &|_| None,
    )?;
    engine.flush()?;
    Ok(rev)
}

/// One line about a certificate.
pub fn describe(c: &Certificate) -> String {
    let roles: Vec<&str> = c.roles.iter().map(|r| r.name()).collect();
    let mut scope = Vec::new();
    if !c.locations.is_empty() {
        scope.push(format!("villages {}", c.locations.join(", ")));
    }
    if !c.facilities.is_empty() {
        scope.push(format!("facilities {}", c.facilities.join(", ")));
    }
    format!(
        "{} for user {} ({}){}; valid {} to {}; serial {}",
        roles.join(" and "),
        c.user,
        short_peer(&c.subject),
        if scope.is_empty() {
            String::new()
        } else {
            format!(", {}", scope.join("; "))
        },
        fieldmesh_fhir_docs::resource::format_instant(c.not_before),
        fieldmesh_fhir_docs::resource::format_instant(c.not_after),
        c.serial
    )
}

/// The peer id of a hex key, or the hex itself.
pub fn short_peer(hex_key: &str) -> String {
    PeerKey::parse(hex_key).map_or_else(|| hex_key.to_string(), |k| k.peer_id())
}
