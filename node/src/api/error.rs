//! Errors of the API: an OperationOutcome with the HTTP status that says what went wrong.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fieldmesh_engine::{ReadError, WriteError};
use fieldmesh_storage::StoreError;
use serde_json::{Value, json};

use super::FHIR_JSON;
use crate::engine_thread::HandleError;

/// An error response: an OperationOutcome with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    outcome: Value,
}

impl ApiError {
    /// An error with one issue.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            outcome: json!({
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": code, "diagnostics": message.into()}],
            }),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    fn internal(message: String) -> Self {
        tracing::error!(error = %message, "request failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "exception", message)
    }

    fn store(e: &StoreError, message: String) -> Self {
        match e {
            StoreError::DiskFull(_) => {
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "exception", message)
            }
            StoreError::Reopening => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "transient", message)
            }
            _ => Self::internal(message),
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

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        let message = e.to_string();
        match e {
            WriteError::Invalid(v) => {
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
            WriteError::NotFound { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "not-found", message)
            }
            WriteError::Unsupported(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not-supported", message)
            }
            WriteError::TypeMismatch { .. } => {
                ApiError::new(StatusCode::CONFLICT, "conflict", message)
            }
            WriteError::VersionConflict { .. } => {
                ApiError::new(StatusCode::PRECONDITION_FAILED, "conflict", message)
            }
            WriteError::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", message),
            WriteError::TooLarge(_) => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too-long", message)
            }
            WriteError::Store(s) => Self::store(&s, message),
            WriteError::Commit(c) => match c.store() {
                Some(s) => Self::store(s, message),
                None => Self::internal(message),
            },
            _ => Self::internal(message),
        }
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        let message = e.to_string();
        match e {
            ReadError::NotFound { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "not-found", message)
            }
            ReadError::Unsupported(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not-supported", message)
            }
            ReadError::Store(s) => Self::store(&s, message),
            _ => Self::internal(message),
        }
    }
}

impl From<fieldmesh_engine::central::CentralError> for ApiError {
    fn from(e: fieldmesh_engine::central::CentralError) -> Self {
        Self::internal(e.to_string())
    }
}

impl<E> From<HandleError<E>> for ApiError
where
    ApiError: From<E>,
{
    fn from(e: HandleError<E>) -> Self {
        match e {
            HandleError::Engine(e) => e.into(),
            HandleError::Stopped(s) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "transient", s.to_string())
            }
        }
    }
}
