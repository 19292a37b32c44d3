//! Config files' YAML: one parser for every Gangplank config (the agent's and the
//! endpoint's), so every syntax error names the line, the column and the field.

use std::fmt;

/// Why a YAML document does not parse into the expected type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// 1-based line, 0 when unknown.
    pub line: u64,
    /// 1-based column, 0 when unknown.
    pub column: u64,
    /// The field path, e.g. `onboardingEndpoint.port` (`.` for the whole document).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.line, self.column, self.field, self.message
        )
    }
}

impl std::error::Error for Error {}

/// Parses `text` as a `T`, tracking the path of the field being read, so an unknown field
/// or a wrong type is reported where it is.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Error> {
    let mut field = String::new();
    serde_saphyr::with_deserializer_from_str(text, |d| {
        serde_path_to_error::deserialize(d).map_err(|e| {
            field = e.path().to_string();
            e.into_inner()
        })
    })
    .map_err(|e| {
        let inner = e.without_snippet();
        let (line, column) = inner.location().map(|l| (l.line(), l.column())).unwrap_or((0, 0));
        let mut message = inner.to_string();
        let suffix = format!(" at line {line}, column {column}");
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_owned();
        }
        if field.is_empty() || field == "?" {
            field = ".".to_owned();
        }
        Error {
            line,
            column,
            field,
            message,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        outer: Outer,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        port: u16,
    }

    #[test]
    fn errors_name_line_column_and_field() {
        let err = parse::<Doc>("outer:\n  port: many\n").unwrap_err();
        assert_eq!((err.line, err.field.as_str()), (2, "outer.port"), "{err}");
        assert!(err.column > 0, "{err}");
        assert!(!err.message.contains(" at line "), "{err}");

        let err = parse::<Doc>("outer:\n  port: 1\n  prot: 2\n").unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert!(err.message.contains("prot"), "{err}");

        let err = parse::<Doc>("- 1\n").unwrap_err();
        assert_eq!(err.field, ".", "{err}");
    }
}
