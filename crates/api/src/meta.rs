//! What every resource has: names, and (with the `resources` feature) Kubernetes object
//! metadata, label selectors and references.

use std::fmt;

#[cfg(feature = "resources")]
mod object;
#[cfg(feature = "resources")]
pub use object::*;

/// A `namespace/name` pair, as written on the command line and in configs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct NamespacedName {
    /// The namespace.
    pub namespace: String,
    /// The name within the namespace.
    pub name: String,
}

impl NamespacedName {
    /// Builds a pair.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl std::str::FromStr for NamespacedName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Self::new(ns, name))
            }
            _ => Err(format!("expected NAMESPACE/NAME, got {s:?}")),
        }
    }
}
/// Whether `s` is a DNS-1123 label (at most 63 characters of `[a-z0-9-]`, alphanumeric ends).
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is a DNS-1123 subdomain as Kubernetes checks object names: at most 253
/// characters of dot-separated `[a-z0-9-]` runs with alphanumeric ends (no per-part limit).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !p.starts_with('-')
                && !p.ends_with('-')
        })
}

/// Why `key` is not a Kubernetes label key (a qualified name), if it is not: an optional
/// DNS-subdomain prefix of at most 253 characters and `/`, then a name of at most 63
/// characters of `[A-Za-z0-9._-]` with alphanumeric ends (`IsQualifiedName`).
pub fn label_key_problem(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && (p.is_empty() || !is_dns1123_subdomain(p))
    {
        return Some(
            "the prefix before '/' must be a DNS subdomain of at most 253 characters (lowercase letters, digits, '-' and '.')"
                .to_owned(),
        );
    }
    if name.is_empty() {
        return Some("the name part is empty".to_owned());
    }
    if name.contains('/') {
        return Some("at most one '/' (between the prefix and the name) is allowed".to_owned());
    }
    label_value_problem(name)
}

/// Why `value` is not a Kubernetes label value, if it is not: empty, or at most 63
/// characters of `[A-Za-z0-9._-]` with alphanumeric ends (`IsValidLabelValue`).
pub fn label_value_problem(value: &str) -> Option<String> {
    if value.is_empty() {
        return None;
    }
    if value.len() > 63 {
        return Some(format!(
            "is {} characters; at most 63 are allowed",
            value.chars().count()
        ));
    }
    if !value
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Some("only letters, digits, '-', '_' and '.' are allowed".to_owned());
    }
    let alnum = |c: char| c.is_ascii_alphanumeric();
    if !value.starts_with(alnum) || !value.ends_with(alnum) {
        return Some("must start and end with a letter or digit".to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn namespaced_name_parses() {
        assert_eq!(
            "bookinfo/ratings".parse::<NamespacedName>().unwrap(),
            NamespacedName::new("bookinfo", "ratings")
        );
        assert!("ratings".parse::<NamespacedName>().is_err());
        assert!("a/b/c".parse::<NamespacedName>().is_err());
        assert!("/b".parse::<NamespacedName>().is_err());
    }

    #[test]
    fn dns_names() {
        assert!(is_dns1123_label("ratings-jwt-vm-7"));
        assert!(!is_dns1123_label("Ratings"));
        assert!(!is_dns1123_label("-a"));
        assert!(!is_dns1123_label(&"a".repeat(64)));
        assert!(is_dns1123_subdomain("a.b-c.d"));
    }

    #[test]
    fn label_keys_and_values_are_checked_as_kubernetes_does() {
        for ok in ["app", "example.com/tier", "A.b_c-9", &"x".repeat(63)] {
            assert_eq!(label_key_problem(ok), None, "{ok}");
        }
        let long_prefix = format!("{}/x", "a".repeat(254));
        for bad in [
            "",
            "/x",
            "a/",
            "a/b/c",
            "Bad Key",
            "-x",
            "x-",
            "UPPER.example/x",
            &long_prefix,
            &"x".repeat(64),
        ] {
            assert!(label_key_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(label_value_problem(""), None);
        assert_eq!(label_value_problem("v1.2_b-3"), None);
        for bad in ["has space", "-x", "x.", "a/b", "line\n", &"x".repeat(64)] {
            assert!(label_value_problem(bad).is_some(), "{bad:?}");
        }
    }
}
