//! The error shape of the Admin API, shared by the state machine (which decides most of
//! them), the node (which renders them) and the client (which parses them).
//!
//! The codes and names are Kong's (`kong/db/errors.lua`), so that tooling written against
//! Kong's Admin API recognises them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Kong's error codes. Only the ones Tollgate produces are listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    SchemaViolation,
    PrimaryKeyViolation,
    ForeignKeyViolation,
    UniqueViolation,
    NotFound,
    InvalidOffset,
    InvalidSize,
    DeclarativeConfig,
    /// Tollgate's own: the cluster could not take the write (no leader, no quorum).
    Unavailable,
    /// Tollgate's own: the request itself is malformed (not JSON, too large).
    BadRequest,
    /// Tollgate's own: missing or wrong admin token.
    Unauthorized,
    /// Tollgate's own: an internal failure (storage, encoding).
    Internal,
    /// Tollgate's own: the path exists but not with this method.
    MethodNotAllowed,
    /// A list option that is not valid (`?tags=`). Last: variants are numbered in
    /// encoded Raft entries.
    InvalidOptions,
    /// Kong's `{"message": "Cannot parse JSON body"}` (400): the body is the message alone.
    CannotParseBody,
    /// Kong's 415 for a body that is not JSON, a form or YAML: the message alone.
    UnsupportedMediaType,
}

impl ErrorCode {
    /// Kong's numeric code, or Tollgate's own above 100.
    pub fn number(self) -> u32 {
        match self {
            ErrorCode::SchemaViolation => 2,
            ErrorCode::PrimaryKeyViolation => 3,
            ErrorCode::ForeignKeyViolation => 4,
            ErrorCode::UniqueViolation => 5,
            ErrorCode::NotFound => 6,
            ErrorCode::InvalidOffset => 7,
            ErrorCode::InvalidSize => 9,
            ErrorCode::DeclarativeConfig => 14,
            ErrorCode::BadRequest => 101,
            ErrorCode::Unavailable => 102,
            ErrorCode::Unauthorized => 103,
            ErrorCode::Internal => 104,
            ErrorCode::MethodNotAllowed => 105,
            ErrorCode::InvalidOptions => 11,
            ErrorCode::CannotParseBody => 106,
            ErrorCode::UnsupportedMediaType => 107,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::SchemaViolation => "schema violation",
            ErrorCode::PrimaryKeyViolation => "primary key violation",
            ErrorCode::ForeignKeyViolation => "foreign key violation",
            ErrorCode::UniqueViolation => "unique constraint violation",
            ErrorCode::NotFound => "not found",
            ErrorCode::InvalidOffset => "invalid offset",
            ErrorCode::InvalidSize => "invalid size",
            ErrorCode::DeclarativeConfig => "invalid declarative configuration",
            ErrorCode::BadRequest => "bad request",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Internal => "internal error",
            ErrorCode::MethodNotAllowed => "method not allowed",
            ErrorCode::InvalidOptions => "invalid options",
            ErrorCode::CannotParseBody => "cannot parse body",
            ErrorCode::UnsupportedMediaType => "unsupported media type",
        }
    }

    /// The HTTP status the Admin API answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::NotFound => 404,
            ErrorCode::PrimaryKeyViolation | ErrorCode::UniqueViolation => 409,
            ErrorCode::Unavailable => 503,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Internal => 500,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::UnsupportedMediaType => 415,
            _ => 400,
        }
    }
}

/// An Admin API error: `{code, name, message, fields}`.
///
/// `fields` maps a field name to what is wrong with it; nested objects (a plugin's
/// `config`, a declarative document's path) nest the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub fields: BTreeMap<String, String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into(), fields: BTreeMap::new() }
    }

    /// A schema violation naming the fields; the message lists them as Kong does.
    pub fn schema(fields: BTreeMap<String, String>) -> ApiError {
        debug_assert!(!fields.is_empty(), "a schema violation names at least one field");
        let listed: Vec<String> = fields.iter().map(|(name, why)| format!("{name}: {why}")).collect();
        let message = if listed.len() == 1 {
            format!("schema violation ({})", listed[0])
        } else {
            format!("{} schema violations ({})", listed.len(), listed.join("; "))
        };
        ApiError { code: ErrorCode::SchemaViolation, message, fields }
    }

    pub fn field(name: impl Into<String>, why: impl Into<String>) -> ApiError {
        let mut fields = BTreeMap::new();
        fields.insert(name.into(), why.into());
        ApiError::schema(fields)
    }

    /// Kong's `invalid option (field: why)`.
    pub fn invalid_option(name: &str, why: &str) -> ApiError {
        let mut error = ApiError::new(ErrorCode::InvalidOptions, format!("invalid option ({name}: {why})"));
        error.fields.insert(name.to_string(), why.to_string());
        error
    }

    pub fn not_found() -> ApiError {
        ApiError::new(ErrorCode::NotFound, "Not found")
    }

    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }

    /// The JSON body the Admin API sends.
    pub fn to_json(&self) -> serde_json::Value {
        if matches!(
            self.code,
            ErrorCode::CannotParseBody | ErrorCode::UnsupportedMediaType | ErrorCode::MethodNotAllowed
        ) {
            return serde_json::json!({ "message": self.message });
        }
        serde_json::json!({
            "code": self.code.number(),
            "name": self.code.name(),
            "message": self.message,
            "fields": self.fields,
        })
    }

    /// Parses an Admin API error body (the inverse of [`ApiError::to_json`]).
    pub fn from_json(body: &serde_json::Value) -> Option<ApiError> {
        let number = body.get("code")?.as_u64()?;
        let code = ALL_CODES.iter().copied().find(|c| u64::from(c.number()) == number)?;
        let message = body.get("message").and_then(|m| m.as_str()).unwrap_or_default().to_string();
        let fields = body
            .get("fields")
            .and_then(|f| f.as_object())
            .map(|f| {
                f.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Some(ApiError { code, message, fields })
    }
}

const ALL_CODES: [ErrorCode; 16] = [
    ErrorCode::SchemaViolation,
    ErrorCode::PrimaryKeyViolation,
    ErrorCode::ForeignKeyViolation,
    ErrorCode::UniqueViolation,
    ErrorCode::NotFound,
    ErrorCode::InvalidOffset,
    ErrorCode::InvalidSize,
    ErrorCode::DeclarativeConfig,
    ErrorCode::BadRequest,
    ErrorCode::Unavailable,
    ErrorCode::Unauthorized,
    ErrorCode::Internal,
    ErrorCode::MethodNotAllowed,
    ErrorCode::InvalidOptions,
    ErrorCode::CannotParseBody,
    ErrorCode::UnsupportedMediaType,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_round_trips() {
        let error = ApiError::field("host", "required field missing");
        let parsed = ApiError::from_json(&error.to_json()).expect("parses");
        assert_eq!(parsed, error);
        assert_eq!(error.to_json()["message"], "schema violation (host: required field missing)");
        assert_eq!(error.http_status(), 400);
    }
}
