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
}
