//! API errors, answered as Kubernetes `Status` objects.

use std::fmt;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An API error as the stand-in returns it (a `Status` object).
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`, ...
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// The object an `Invalid` error is about (`details.group`, `kind` and `name`); boxed to
    /// keep errors small.
    pub subject: Option<Box<Subject>>,
    /// The causes of an `Invalid` error (`details.causes`).
    pub causes: Vec<Cause>,
}

/// Which object an error is about, as `Status.details` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    /// The API group, empty for the core group.
    pub group: String,
    /// The kind, e.g. `Namespace`.
    pub kind: String,
    /// The object's name (empty when it had none).
    pub name: String,
}

/// One cause of an `Invalid` error, as in `Status.details.causes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, ...
    pub reason: &'static str,
    /// The field, e.g. `metadata.name`.
    pub field: String,
    /// What is wrong, e.g. `Invalid value: "x": must be no more than 63 characters`.
    pub message: String,
}

/// A field error as apimachinery's `field.Error` words it.
#[derive(Debug, Clone)]
pub(super) enum FieldError {
    /// `field.Invalid`: `value` as Go's `%v` prints it (strings quoted).
    Invalid {
        field: String,
        value: String,
        detail: String,
    },
    /// `field.Required`.
    Required { field: String, detail: String },
}

impl FieldError {
    pub(super) fn invalid_string(field: &str, value: &str, detail: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.to_owned(),
            value: format!("{value:?}"),
            detail: detail.into(),
        }
    }

    fn field(&self) -> &str {
        match self {
            Self::Invalid { field, .. } | Self::Required { field, .. } => field,
        }
    }

    /// `ErrorBody()`: the message without the field.
    fn body(&self) -> String {
        match self {
            Self::Invalid { value, detail, .. } => format!("Invalid value: {value}: {detail}"),
            Self::Required { detail, .. } => format!("Required value: {detail}"),
        }
    }

    fn reason(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "FieldValueInvalid",
            Self::Required { .. } => "FieldValueRequired",
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl ApiError {
    pub(super) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            subject: None,
            causes: Vec::new(),
        }
    }
    pub(super) fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "NotFound", message)
    }
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    /// 422 `Invalid` for `errors` of object `name` of `kind` in `group`, worded as
    /// apimachinery's `errors.NewInvalid`: `<Kind>[.<group>] "<name>" is invalid: <errors>`,
    /// one cause per error.
    pub(super) fn invalid(group: &str, kind: &str, name: &str, errors: &[FieldError]) -> Self {
        let qualified = if group.is_empty() {
            kind.to_owned()
        } else {
            format!("{kind}.{group}")
        };
        // As an aggregate prints: one error alone, several in brackets, duplicates once.
        let mut all: Vec<String> = Vec::new();
        for e in errors {
            let line = format!("{}: {}", e.field(), e.body());
            if !all.contains(&line) {
                all.push(line);
            }
        }
        let message = match all.as_slice() {
            [] => format!("{qualified} {name:?} is invalid"),
            [one] => format!("{qualified} {name:?} is invalid: {one}"),
            many => format!("{qualified} {name:?} is invalid: [{}]", many.join(", ")),
        };
        let mut e = Self::new(422, "Invalid", message);
        e.subject = Some(Box::new(Subject {
            group: group.to_owned(),
            kind: kind.to_owned(),
            name: name.to_owned(),
        }));
        e.causes = errors
            .iter()
            .map(|f| Cause {
                reason: f.reason(),
                field: f.field().to_owned(),
                message: f.body(),
            })
            .collect();
        e
    }
    pub(super) fn status(&self) -> Value {
        let causes: Vec<Value> = self
            .causes
            .iter()
            .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
            .collect();
        let mut details = json!({"causes": causes});
        if let Some(s) = &self.subject {
            details["name"] = json!(s.name);
            if !s.group.is_empty() {
                details["group"] = json!(s.group);
            }
            details["kind"] = json!(s.kind);
        }
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
            "details": details,
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (code, axum::Json(self.status())).into_response()
    }
}

pub(super) type ApiResult<T> = Result<T, ApiError>;
