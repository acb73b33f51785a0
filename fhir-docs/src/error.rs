//! Errors of the fhir-docs crate.

/// Converting between JSON and an Automerge document failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// The Automerge library refused an operation or could not read the document.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// A number that JSON cannot represent (NaN or infinity) was found in the document.
    #[error("the document holds a number that JSON cannot represent (NaN or infinity)")]
    NonFiniteNumber,
    /// A decimal scalar whose bytes are not a JSON number.
    #[error("the document holds a decimal whose text is not a number")]
    BadDecimal,
    /// A scalar type FHIR JSON has no use for (bytes, or an unknown type code).
    #[error("the document holds a value FHIR JSON cannot express: {0}")]
    UnsupportedScalar(String),
    /// The document root is not a map.
    #[error("the document root is not a map")]
    RootNotMap,
    /// Objects nest deeper than a FHIR resource ever does.
    #[error("the document nests objects more than {0} levels deep")]
    TooDeep(usize),
}

/// One reason a payload is not acceptable FHIR; names the field (a FHIRPath-like location) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct Invalid {
    /// Where the problem is, for example `Patient.name[0].family`.
    pub path: String,
    /// What is wrong, in words a person understands.
    pub reason: String,
}

/// A resource was refused by validation. Holds every problem found, in document order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct ValidationError(pub Vec<Invalid>);

impl ValidationError {
    /// A validation error with a single problem.
    pub fn one(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self(vec![Invalid {
            path: path.into(),
            reason: reason.into(),
        }])
    }
}
