//! The local FHIR R4 REST API.
//!
//! Routes (base `http://<addr>/fhir`): `POST /<Type>` (201 with `Location`), `GET /<Type>/<id>`,
//! `PUT /<Type>/<id>` (update; update-as-create for an unused UUID; `If-Match` honoured),
//! `GET /<Type>?identifier=…` and `?_id=…` (searchset Bundles), `GET /<Type>/<id>/$automerge` (the
//! saved Automerge document), `GET /metadata` (CapabilityStatement). `GET /status` reports the node
//! and `GET /quarantine` lists refused changes.
//!
//! The API is for the apps of the device's own user: every route but `/status` and
//! `/fhir/metadata` (which carry no resource content) needs `Authorization: Bearer <token>`, the
//! token made at `init` (`fieldmesh token --data DIR`); without it the answer is 401. A write the
//! node's certificate does not allow is refused with 403, naming the missing capability or scope.
//! Every error is an OperationOutcome with the matching HTTP status; every resource is served as
//! `application/fhir+json` with an ETag from the document's heads.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fieldmesh_fhir_docs::identifiers::IdentKey;
use fieldmesh_fhir_docs::{IdentifierQuery, parse_identifier_query, profile};
use serde_json::{Value, json};

use crate::docs::DocsHandle;
use crate::engine::{EngineError, Outcome, Served, parse_json, searchset};
use crate::net::{ChangeSender, PeerTable};

/// Largest request body accepted.
pub const MAX_BODY: usize = 8 * 1024 * 1024;
const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// What `/status` reports about the node besides store counters.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Role.
    pub role: String,
    /// Identifier system.
    pub system: String,
    /// libp2p peer id.
    pub peer_id: String,
}

#[derive(Clone)]
struct AppState {
    docs: DocsHandle,
    info: Arc<NodeInfo>,
    peers: PeerTable,
    changes: ChangeSender,
    token: Arc<str>,
}

/// The API's router. Successful writes are announced on `changes`, which makes the node sync them
/// to its connected peers.
/// Every request but to the open routes must carry `token`.
pub fn router(
    docs: DocsHandle,
    info: NodeInfo,
    peers: PeerTable,
    changes: ChangeSender,
    token: String,
) -> Router {
    let state = AppState {
        docs,
        info: Arc::new(info),
        peers,
        changes,
        token: Arc::from(token),
    };
    Router::new()
        .route("/status", get(status))
        .route("/quarantine", get(quarantine))
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/{ty}", get(search).post(create))
        .route("/fhir/{ty}/{id}", get(read).put(update))
        .route("/fhir/{ty}/{id}/{op}", get(operation))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        .with_state(state)
}

/// Compares in time independent of where the strings differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/status" || path == "/fhir/metadata" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(t) if same_secret(t.as_bytes(), st.token.as_bytes()) => next.run(req).await,
        _ => {
            let why = if given.is_some() {
                "the bearer token is not this node's"
            } else {
                "this API needs the node's bearer token: send `Authorization: Bearer <token>`; print the token with `fieldmesh token --data DIR`"
            };
            let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "login", why).into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

/// An error response: an OperationOutcome with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    outcome: Value,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            outcome: json!({
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": code, "diagnostics": message.into()}],
            }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.outcome)).into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        r
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        use fieldmesh_storage::StoreError;
        match &e {
            EngineError::Invalid(v) => {
                let issues: Vec<Value> =
                    v.0.iter()
                        .map(|i| {
                            json!({"severity": "error", "code": "invalid",
                            "diagnostics": i.to_string(), "expression": [i.path]})
                        })
                        .collect();
                ApiError {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    outcome: json!({"resourceType": "OperationOutcome", "issue": issues}),
                }
            }
            EngineError::NotFound { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "not-found", e.to_string())
            }
            EngineError::Unsupported(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not-supported", e.to_string())
            }
            EngineError::TypeMismatch { .. } => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            EngineError::VersionConflict { .. } => {
                ApiError::new(StatusCode::PRECONDITION_FAILED, "conflict", e.to_string())
            }
            EngineError::Forbidden(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
            EngineError::Store(StoreError::DiskFull(_)) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "exception", e.to_string())
            }
            _ => {
                tracing::error!(error = %e, "request failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "exception",
                    e.to_string(),
                )
            }
        }
    }
}

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

fn served(status: StatusCode, s: &Served, location: Option<String>) -> Response {
    let mut headers = vec![(header::ETAG, format!("W/\"{}\"", s.version))];
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
    fhir(status, &s.resource, &headers)
}

fn check_type(ty: &str) -> Result<(), ApiError> {
    if profile::is_supported(ty) {
        Ok(())
    } else {
        Err(EngineError::Unsupported(ty.into()).into())
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

async fn create(
    State(st): State<AppState>,
    Path(ty): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_type(&ty)?;
    let json = body_json(body)?;
    let s = st.docs.create(ty.clone(), json).await?;
    // A full queue means a sync is already pending; it will carry this write too.
    let _ = st.changes.try_send(None);
    let location = format!(
        "{}/{ty}/{}/_history/{}",
        base_url(&headers),
        s.id,
        s.version
    );
    Ok(served(StatusCode::CREATED, &s, Some(location)))
}

async fn read(
    State(st): State<AppState>,
    Path((ty, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_type(&ty)?;
    let s = st.docs.read(ty, id).await?;
    Ok(served(StatusCode::OK, &s, None))
}

async fn update(
    State(st): State<AppState>,
    Path((ty, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_type(&ty)?;
    let json = body_json(body)?;
    let if_match = headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_start_matches("W/").trim_matches('"').to_string());
    let (s, outcome) = st.docs.update(ty.clone(), id, json, if_match).await?;
    if outcome != Outcome::Unchanged {
        let _ = st.changes.try_send(None);
    }
    Ok(match outcome {
        Outcome::Created => {
            let location = format!(
                "{}/{ty}/{}/_history/{}",
                base_url(&headers),
                s.id,
                s.version
            );
            served(StatusCode::CREATED, &s, Some(location))
        }
        Outcome::Updated | Outcome::Unchanged => served(StatusCode::OK, &s, None),
    })
}

async fn operation(
    State(st): State<AppState>,
    Path((ty, id, op)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    check_type(&ty)?;
    if op != "$automerge" {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not-supported",
            format!("unknown operation {op:?}; this node offers $automerge"),
        ));
    }
    let bytes = st.docs.automerge(ty, id).await?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        bytes,
    )
        .into_response())
}

async fn search(
    State(st): State<AppState>,
    Path(ty): Path<String>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    check_type(&ty)?;
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
                st.docs.search(ty.clone(), query).await?
            }
            "_id" => match st.docs.read(ty.clone(), value.clone()).await {
                Ok(s) => vec![s],
                Err(EngineError::NotFound { .. }) => vec![],
                Err(e) => return Err(e.into()),
            },
            "_format" | "_count" | "_summary" => continue,
            other => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "not-supported",
                    format!("search parameter {other:?} is not supported; use identifier or _id"),
                ));
            }
        };
        found = Some(match found {
            None => hits,
            Some(prev) => prev
                .into_iter()
                .filter(|p| hits.iter().any(|h| h.id == p.id))
                .collect(),
        });
    }
    let Some(found) = found else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "required",
            format!("search {ty} by identifier (?identifier=system|value) or by _id"),
        ));
    };
    Ok(fhir(
        StatusCode::OK,
        &searchset(&base_url(&headers), found),
        &[],
    ))
}

async fn status(State(st): State<AppState>) -> Result<Response, ApiError> {
    let stats = st.docs.stats().await?;
    let trust = st.docs.trust_summary().await?;
    let i = &st.info;
    let peers = st.peers.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let connected: Vec<Value> = peers
        .iter()
        .filter(|(_, p)| p.connected)
        .map(|(id, p)| {
            let mut v = serde_json::to_value(p).unwrap_or(Value::Null);
            v["peer_id"] = Value::String(id.clone());
            v
        })
        .collect();
    Ok(Json(json!({
        "name": i.name,
        "role": i.role,
        "system": i.system,
        "peer_id": i.peer_id,
        "documents": stats.documents,
        "peers": connected.len(),
        "connected_peers": connected,
        "known_peers": peers,
        "quarantined": stats.quarantined,
        "trust": trust,
        "last_seq": stats.last_seq,
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response())
}

async fn quarantine(State(st): State<AppState>) -> Result<Response, ApiError> {
    let items = st.docs.quarantined(1000).await?;
    let list: Vec<Value> = items
        .iter()
        .map(|q| json!({"reason": q.reason, "from": q.from, "bytes": q.data.len()}))
        .collect();
    Ok(Json(json!({"quarantined": list.len(), "changes": list})).into_response())
}

async fn metadata() -> Response {
    let resources: Vec<Value> = profile::RESOURCE_TYPES
        .iter()
        .map(|(ty, _)| {
            json!({
                "type": ty,
                "interaction": [{"code": "read"}, {"code": "create"}, {"code": "update"}, {"code": "search-type"}],
                "updateCreate": true,
                "versioning": "versioned",
                "searchParam": [
                    {"name": "identifier", "type": "token"},
                    {"name": "_id", "type": "token"}
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
            "date": crate::engine::Engine::now_instant(),
            "kind": "instance",
            "software": {"name": "fieldmesh", "version": env!("CARGO_PKG_VERSION")},
            "fhirVersion": "4.0.1",
            "format": ["application/fhir+json"],
            "rest": [{"mode": "server", "resource": resources}],
        }),
        &[],
    )
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "no such endpoint; the FHIR API is under /fhir/ (try /fhir/metadata) and the node status at /status",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "not-supported",
        "this method is not supported here: use GET and POST on /fhir/<Type>, GET and PUT on /fhir/<Type>/<id>",
    )
}

/// An identifier query for an openIMIS business code (exposed for tools and tests).
pub fn code_query(code: &str) -> IdentifierQuery {
    IdentifierQuery::Exact(IdentKey::openimis_code(code))
}
