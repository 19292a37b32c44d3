//! Object names as the API server validates them (`ValidateObjectMeta` with each kind's name
//! rule), worded as apimachinery's `util/validation` words them, and `generateName`.

use serde_json::{Map, Value};

use super::kinds::Kind;
use super::status::FieldError;

/// How a kind's `metadata.name` is validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// A DNS-1123 label (at most 63 characters): Namespaces.
    Label,
    /// A DNS-1035 label (starts with a letter, at most 63): Services.
    Label1035,
    /// A DNS-1123 subdomain (at most 253): everything else (ConfigMaps, Secrets,
    /// ServiceAccounts, Leases, CRDs, custom resources).
    Subdomain,
}

fn rule(kind: &Kind) -> Rule {
    match (kind.group.as_str(), kind.plural.as_str()) {
        ("", "namespaces") => Rule::Label,
        ("", "services") => Rule::Label1035,
        _ => Rule::Subdomain,
    }
}

const LABEL_FMT: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";
const LABEL_1035_FMT: &str = "[a-z]([-a-z0-9]*[a-z0-9])?";
const SUBDOMAIN_FMT: &str = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";

fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn is_subdomain(s: &str) -> bool {
    s.split('.').all(is_label)
}

fn max_len(n: usize) -> String {
    format!("must be no more than {n} characters")
}

/// `RegexError`: the message, its examples and the regex.
fn regex_error(msg: &str, fmt: &str, examples: &[&str]) -> String {
    let mut out = format!("{msg} (e.g. ");
    for (i, e) in examples.iter().enumerate() {
        if i > 0 {
            out.push_str(" or ");
        }
        out.push_str(&format!("'{e}', "));
    }
    out.push_str(&format!("regex used for validation is '{fmt}')"));
    out
}

/// `IsDNS1123Label`.
fn label_errors(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > 63 {
        errs.push(max_len(63));
    }
    if !is_label(s) {
        if is_subdomain(s) {
            errs.push("must not contain dots".to_owned());
        } else {
            errs.push(regex_error(
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
                LABEL_FMT,
                &["my-name", "123-abc"],
            ));
        }
    }
    errs
}

/// `IsDNS1035Label`.
fn label_1035_errors(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > 63 {
        errs.push(max_len(63));
    }
    if !is_label(s) || !s.as_bytes()[0].is_ascii_lowercase() {
        errs.push(regex_error(
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character",
            LABEL_1035_FMT,
            &["my-name", "abc-123"],
        ));
    }
    errs
}

/// `IsDNS1123Subdomain`.
fn subdomain_errors(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > 253 {
        errs.push(max_len(253));
    }
    if !is_subdomain(s) {
        errs.push(regex_error(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
            SUBDOMAIN_FMT,
            &["example.com"],
        ));
    }
    errs
}

/// The name rule applied to a `generateName` prefix: a trailing dash is masked first, as
/// apimachinery's `maskTrailingDash` does (it drops the last two characters and appends an
/// `a`, quirk included).
fn mask_trailing_dash(s: &str) -> String {
    if s.len() > 1 && s.ends_with('-') {
        format!("{}a", &s[..s.len() - 2])
    } else {
        s.to_owned()
    }
}

fn errors_for(rule: Rule, s: &str) -> Vec<String> {
    match rule {
        Rule::Label => label_errors(s),
        Rule::Label1035 => label_1035_errors(s),
        Rule::Subdomain => subdomain_errors(s),
    }
}

/// What `ValidateObjectMeta` finds wrong with `meta` (name, generateName, and for namespaced
/// kinds the namespace) for an object of `kind`.
pub(super) fn validate(kind: &Kind, meta: &Map<String, Value>) -> Vec<FieldError> {
    let rule = rule(kind);
    let text = |f: &str| meta.get(f).and_then(Value::as_str).unwrap_or_default();
    let mut out = Vec::new();
    let generate = text("generateName");
    if !generate.is_empty() {
        for msg in errors_for(rule, &mask_trailing_dash(generate)) {
            out.push(FieldError::invalid_string("metadata.generateName", generate, msg));
        }
    }
    let name = text("name");
    if name.is_empty() {
        out.push(FieldError::Required {
            field: "metadata.name".into(),
            detail: "name or generateName is required".into(),
        });
    } else {
        for msg in errors_for(rule, name) {
            out.push(FieldError::invalid_string("metadata.name", name, msg));
        }
    }
    if kind.namespaced {
        let ns = text("namespace");
        for msg in label_errors(ns) {
            out.push(FieldError::invalid_string("metadata.namespace", ns, msg));
        }
    }
    out
}

/// How many characters of `generateName` a generated name keeps (63 minus the suffix).
const GENERATED_PREFIX: usize = 58;
/// The characters of a generated suffix (apimachinery's `utilrand`: no vowels, no 0, 1 or 3).
const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// A name made from `prefix` as the API server's `SimpleNameGenerator` makes it: the prefix cut
/// to 58 characters and 5 random characters.
pub(super) fn generate(prefix: &str) -> String {
    let mut cut = prefix.len().min(GENERATED_PREFIX);
    while !prefix.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut random = [0u8; 5];
    // The system RNG does not fail on Linux; a fixed suffix would only make collisions (409)
    // likelier, not wrong.
    let _ = aws_lc_rs::rand::fill(&mut random);
    let suffix: String = random
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect();
    format!("{}{suffix}", &prefix[..cut])
}
