//! How untrusted values appear in messages and labels. A leaf: it uses nothing else in the
//! crate (label rules are gangplank-api's).

use std::collections::BTreeMap;

/// A short, quoted, printable form of an untrusted value for an error message.
pub(crate) fn shown(s: &str) -> String {
    const MAX: usize = 80;
    let mut out: String = s.chars().take(MAX).collect();
    if s.chars().count() > MAX {
        out.push('…');
    }
    format!("{out:?}")
}

/// `onboarding.gangplank.dev/<name>` labels for the values that are valid label values.
pub(crate) fn short_labels<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a String)>,
) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .filter(|(_, v)| is_label_value(v))
        .map(|(k, v)| (format!("onboarding.gangplank.dev/{k}"), v.clone()))
        .collect()
}

/// A valid, non-empty Kubernetes label value: at most 63 of `[A-Za-z0-9._-]`, alphanumeric
/// at both ends.
pub(crate) fn is_label_value(v: &str) -> bool {
    !v.is_empty() && gangplank_api::meta::label_value_problem(v).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values() {
        assert!(is_label_value("us-east-1a"));
        assert!(!is_label_value("a/b"));
        assert!(!is_label_value(&"x".repeat(64)));
        assert!(!is_label_value("-x"));
    }
}
