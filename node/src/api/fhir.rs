//! The FHIR resource routes: create, read, update, vread, history, search, `$automerge`, and the
//! CapabilityStatement.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fieldmesh_engine::{Outcome, ReadError, Served, WriteError, parse_json};
use fieldmesh_fhir_docs::resource::format_instant;
use fieldmesh_fhir_docs::{parse_identifier_query, profile};
use serde_json::{Value, json};

use super::{ApiError, AppState, FHIR_JSON, bundle};
use crate::engine_thread::HandleError;

/// Versions a history Bundle lists, at most.
const HISTORY_LIMIT: usize = 100;

fn fhir(status: StatusCode, body: &Value, headers: &[(header::HeaderName, String)]) -> Response {
    let mut r = (status, Json(body)).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name.clone(), v);
        }
    }
    r
}

/// The answer to a read or a write. A write whose values the rules replaced (a policy's value,
/// dates, status) or that the writer should know about carries its OperationOutcome in the
/// `X-Fieldmesh-Outcome` header; with `Prefer: return=OperationOutcome` it is the body.
fn served(status: StatusCode, s: &Served, location: Option<String>) -> Response {
    served_as(status, s, location, false)
}

/// The OperationOutcome of a write: its notes, or that it was stored.
fn write_outcome(s: &Served) -> Value {
    let issues = if s.notes.is_empty() {
        vec![json!({"severity": "information", "code": "informational",
            "diagnostics": format!("stored as version {}", s.version)})]
    } else {
        s.notes.clone()
    };
    json!({"resourceType": "OperationOutcome", "issue": issues})
}

/// Whether the client asked for an OperationOutcome in answer to a write.
fn wants_outcome(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split([',', ';'])
                .any(|p| p.trim() == "return=OperationOutcome")
        })
}

fn served_as(status: StatusCode, s: &Served, location: Option<String>, outcome: bool) -> Response {
    let mut headers = vec![(header::ETAG, format!("W/\"{}\"", s.version))];
    if !s.notes.is_empty() {
        headers.push((
            header::HeaderName::from_static("x-fieldmesh-outcome"),
            write_outcome(s).to_string(),
        ));
    }
    if let Some(l) = location {
        headers.push((header::LOCATION, l));
    }
    if let Some(t) = s
        .resource
        .pointer("/meta/lastUpdated")
        .and_then(Value::as_str)
    {
        headers.push((header::LAST_MODIFIED, t.to_string()));
    }
    if outcome {
        return fhir(status, &write_outcome(s), &headers);
    }
    fhir(status, &s.resource, &headers)
}

/// Coverage is derived from the policy: clients write the Contract.
fn derived_only(ty: &str) -> Result<(), ApiError> {
    if ty == "Coverage" {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
            "Coverage is derived from the policy and served read-only, as openIMIS serves it: \
             write the Contract (POST /fhir/Contract) instead",
        ));
    }
    Ok(())
}

fn today() -> fieldmesh_fhir_docs::openimis::dates::Date {
    fieldmesh_fhir_docs::openimis::dates::Date::from_unix(fieldmesh_engine::now())
}

fn check_type(ty: &str) -> Result<(), ApiError> {
    if profile::is_supported(ty) {
        Ok(())
    } else {
        Err(WriteError::Unsupported(ty.into()).into())
    }
}

fn body_json(body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|e| ApiError::new(e.status(), "too-long", e.body_text()))?;
    if bytes.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "required",
            "the request has no body; send a FHIR resource as JSON",
        ));
    }
    parse_json(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "structure", e.to_string()))
}

fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("http://{host}/fhir")
}

/// `…/<Type>/<id>/_history/<version>`: the version just written ([`vread`] answers it).
fn location(headers: &HeaderMap, ty: &str, s: &Served) -> String {
    format!("{}/{ty}/{}/_history/{}", base_url(headers), s.id, s.version)
}

pub(super) async fn create(
    State(st): State<AppState>,
    Path(ty): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_type(&ty)?;
    derived_only(&ty)?;
    let json = body_json(body)?;
    if ty == "CoverageEligibilityRequest" {
        return eligibility(&st, json).await;
    }
    let s = st.engine.create(ty.clone(), json).await?;
    Ok(served_as(
        StatusCode::CREATED,
        &s,
        Some(location(&headers, &ty, &s)),
        wants_outcome(&headers),
    ))
}

/// `POST /fhir/CoverageEligibilityRequest`: the coverage inquiry, answered from what this node
/// holds (nothing is stored).
async fn eligibility(st: &AppState, request: Value) -> Result<Response, ApiError> {
    use fieldmesh_engine::enrolment::EligibilityError;
    if request.get("resourceType").and_then(Value::as_str) != Some("CoverageEligibilityRequest") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "structure",
            "the body is not a CoverageEligibilityRequest",
        ));
    }
    let node = st.info.name.clone();
    let answer = st
        .engine
        .read(move |r| {
            Ok(r.eligibility(&request, today(), &node)
                .map_err(|e| match e {
                    EligibilityError::Read(e) => Err(e),
                    other => Ok(other),
                }))
        })
        .await?;
    match answer {
        Ok(response) => Ok(fhir(StatusCode::OK, &response, &[])),
        Err(Err(e)) => Err(e.into()),
        Err(Ok(e @ EligibilityError::UnknownPatient(_))) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            e.to_string(),
        )),
        Err(Ok(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "required",
            e.to_string(),
        )),
    }
}

pub(super) async fn read(
    State(st): State<AppState>,
    Path((ty, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_type(&ty)?;
    if ty == "Coverage" {
        let s = st.engine.read(move |r| r.coverage(&id, today())).await?;
        return Ok(served(StatusCode::OK, &s, None));
    }
    let s = st.engine.read_resource(ty, id).await?;
    Ok(served(StatusCode::OK, &s, None))
}

pub(super) async fn vread(
    State(st): State<AppState>,
    Path((ty, id, vid)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    check_type(&ty)?;
    let s = st.engine.version(ty, id, vid).await?;
    Ok(served(StatusCode::OK, &s, None))
}

pub(super) async fn update(
    State(st): State<AppState>,
    Path((ty, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_type(&ty)?;
    derived_only(&ty)?;
    let json = body_json(body)?;
    let if_match = headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_start_matches("W/").trim_matches('"').to_string());
    let (s, outcome) = st.engine.update(ty.clone(), id, json, if_match).await?;
    let prefer = wants_outcome(&headers);
    Ok(match outcome {
        Outcome::Created => served_as(
            StatusCode::CREATED,
            &s,
            Some(location(&headers, &ty, &s)),
            prefer,
        ),
        Outcome::Updated | Outcome::Unchanged => served_as(StatusCode::OK, &s, None, prefer),
    })
}

pub(super) async fn operation(
    State(st): State<AppState>,
    Path((ty, id, op)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&ty)?;
    match op.as_str() {
        "$automerge" => {
            let bytes = st.engine.automerge(ty, id).await?;
            Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/octet-stream")],
                bytes,
            )
                .into_response())
        }
        "_history" => {
            let versions = st.engine.history(ty, id, HISTORY_LIMIT).await?;
            Ok(fhir(
                StatusCode::OK,
                &bundle::history(&base_url(&headers), versions),
                &[],
            ))
        }
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-supported",
            format!("unknown operation {op:?}; this node offers _history and $automerge"),
        )),
    }
}

/// A reference search value `Type/id` (a resource this node holds).
fn reference_value(value: &str) -> Option<(&str, &str)> {
    let (ty, id) = value.split_once('/')?;
    (profile::is_resource_type(ty) && !id.is_empty() && !id.contains('/')).then_some((ty, id))
}

pub(super) async fn search(
    State(st): State<AppState>,
    Path(ty): Path<String>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    check_type(&ty)?;
    if ty == "Coverage" {
        return search_coverage(&st, &headers, &params).await;
    }
    let mut found: Option<Vec<Served>> = None;
    for (name, value) in &params {
        let hits = match name.as_str() {
            "identifier" | "identifier:of-type" => {
                let query = parse_identifier_query(value, name == "identifier:of-type").ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "value",
                        format!("{name}={value:?} is not a valid identifier search (use system|value, |value or value)"),
                    )
                })?;
                st.engine.search(ty.clone(), query).await?
            }
            "_id" => match st.engine.read_resource(ty.clone(), value.clone()).await {
                Ok(s) => vec![s],
                Err(HandleError::Engine(ReadError::NotFound { .. })) => vec![],
                Err(e) => return Err(e.into()),
            },
            "_format" | "_count" | "_summary" => continue,
            other => match reference_value(value) {
                Some((target_ty, target_id)) if !other.starts_with('_') => {
                    st.engine
                        .search_reference(
                            ty.clone(),
                            other.to_string(),
                            target_ty.to_string(),
                            target_id.to_string(),
                        )
                        .await?
                }
                _ => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "not-supported",
                        format!(
                            "search parameter {other}={value:?} is not supported; use identifier, _id, or a reference element with Type/id (e.g. patient=Patient/<id>)"
                        ),
                    ));
                }
            },
        };
        found = Some(match found {
            None => hits,
            Some(prev) => prev
                .into_iter()
                .filter(|p| hits.iter().any(|h| h.id == p.id))
                .collect(),
        });
    }
    // A claim's answer before central's verdict arrives: the device's provisional one.
    if ty == "ClaimResponse"
        && found.as_ref().is_some_and(Vec::is_empty)
        && let Some(claim) = params
            .iter()
            .find(|(n, _)| n == "request")
            .and_then(|(_, v)| reference_value(v))
            .filter(|(t, _)| *t == "Claim")
            .map(|(_, id)| id.to_string())
    {
        let by = st.info.system.clone();
        if let Some(p) = st
            .engine
            .read(move |r| r.provisional_claim_response(&claim, today(), &by))
            .await?
        {
            found = Some(vec![p]);
        }
    }
    let Some(found) = found else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "required",
            format!(
                "search {ty} by identifier (?identifier=system|value), by _id, or by reference (?patient=Patient/<id>)"
            ),
        ));
    };
    Ok(fhir(
        StatusCode::OK,
        &bundle::searchset(&base_url(&headers), found),
        &[],
    ))
}

/// `GET /fhir/Coverage?beneficiary=Patient/<id>` (also `patient`, `policy-holder`, `payor`):
/// the Coverages of the policies covering an insuree, derived from them.
async fn search_coverage(
    st: &AppState,
    headers: &HeaderMap,
    params: &[(String, String)],
) -> Result<Response, ApiError> {
    let patient = params.iter().find_map(|(name, value)| {
        matches!(
            name.as_str(),
            "beneficiary" | "patient" | "policy-holder" | "payor"
        )
        .then(|| value.strip_prefix("Patient/"))
        .flatten()
        .map(String::from)
    });
    let Some(patient) = patient else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "required",
            "search Coverage by the insuree it covers: ?beneficiary=Patient/<id>",
        ));
    };
    let found = st
        .engine
        .read(move |r| r.coverages_of(&patient, today()))
        .await?;
    Ok(fhir(
        StatusCode::OK,
        &bundle::searchset(&base_url(headers), found),
        &[],
    ))
}

pub(super) async fn metadata() -> Response {
    let resources: Vec<Value> = profile::RESOURCE_TYPES
        .iter()
        .map(|(ty, _)| {
            json!({
                "type": ty,
                "interaction": [{"code": "read"}, {"code": "vread"}, {"code": "create"}, {"code": "update"},
                    {"code": "history-instance"}, {"code": "search-type"}],
                "updateCreate": true,
                "versioning": "versioned",
                "searchParam": [
                    {"name": "identifier", "type": "token"},
                    {"name": "_id", "type": "token"},
                    {"name": "(any reference element)", "type": "reference",
                        "documentation": "<element>=<Type>/<id>, e.g. Claim?patient=Patient/<id>"}
                ],
                "operation": [{"name": "automerge", "definition": "urn:fieldmesh:OperationDefinition/automerge"}]
            })
        })
        .collect();
    fhir(
        StatusCode::OK,
        &json!({
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": format_instant(fieldmesh_engine::now()),
            "kind": "instance",
            "software": {"name": "fieldmesh", "version": env!("CARGO_PKG_VERSION")},
            "fhirVersion": "4.0.1",
            "format": ["application/fhir+json"],
            "rest": [{"mode": "server", "resource": resources}],
        }),
        &[],
    )
}
