//! The local FHIR R4 REST API.
//!
//! Routes (base `http://<addr>/fhir`):
//! - `POST /<Type>` → 201 with `Location: …/<Type>/<id>/_history/<version>` and an `ETag`;
//! - `GET /<Type>/<id>`; `PUT /<Type>/<id>` (update, update-as-create for an unused UUID,
//!   `If-Match` honoured);
//! - `GET /<Type>/<id>/_history` (a history Bundle) and `GET /<Type>/<id>/_history/<version>`;
//! - `GET /<Type>?identifier=…`, `?_id=…`, and by reference `?<element>=<Type>/<id>` (searchset
//!   Bundles);
//! - `GET /<Type>/<id>/$automerge` (the saved Automerge document); `GET /metadata`
//!   (CapabilityStatement).
//!
//! Besides, `GET /status` reports the node and its peers (on central, what central's services
//! did; on a device, which of its resources central flagged and the numbers left in its leases),
//! `GET /quarantine` the refused changes, `GET /flags` the flagged resources with their
//! reasons, and `POST /numbers/chfid` (or `/numbers/claim-code`) hands out the next number of
//! the device's leases.
//!
//! The API is for the apps of the device's own user: every route but `/status` and
//! `/fhir/metadata` (which carry no resource content) needs `Authorization: Bearer <token>`, the
//! token made at `init` (`fieldmesh token --data DIR`); without it the answer is 401. A write the
//! node's certificate does not allow is refused with 403, naming the missing capability or scope.
//! Every error is an OperationOutcome with the matching HTTP status ([`error`]); every resource
//! is served as `application/fhir+json` with an ETag from the document's heads.
//!
//! - [`fhir`]: the resource routes; [`status`]: `/status` and `/quarantine`; [`bundle`]:
//!   searchset and history Bundles; [`error`]: errors as OperationOutcomes.

pub mod bundle;
pub mod error;
pub mod fhir;
pub mod status;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

pub use error::ApiError;

use crate::engine_thread::EngineHandle;
use crate::net::PeerTable;

/// Largest request body accepted.
pub const MAX_BODY: usize = 8 * 1024 * 1024;
/// The content type of every FHIR answer.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

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
pub(crate) struct AppState {
    pub engine: EngineHandle,
    pub info: Arc<NodeInfo>,
    pub peers: PeerTable,
    token: Arc<str>,
}

/// The API's router. Every request but to the open routes must carry `token`.
pub fn router(engine: EngineHandle, info: NodeInfo, peers: PeerTable, token: String) -> Router {
    let state = AppState {
        engine,
        info: Arc::new(info),
        peers,
        token: Arc::from(token),
    };
    Router::new()
        .route("/status", get(status::status))
        .route("/quarantine", get(status::quarantine))
        .route("/flags", get(status::flags))
        .route(
            "/numbers/{kind}",
            axum::routing::post(status::reserve_number),
        )
        .route("/fhir/metadata", get(fhir::metadata))
        .route("/fhir/{ty}", get(fhir::search).post(fhir::create))
        .route("/fhir/{ty}/{id}", get(fhir::read).put(fhir::update))
        .route("/fhir/{ty}/{id}/{op}", get(fhir::operation))
        .route("/fhir/{ty}/{id}/_history/{vid}", get(fhir::vread))
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
