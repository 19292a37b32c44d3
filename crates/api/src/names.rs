//! Deterministic WorkloadEntry names and the annotations Gangplank records on entries.
//!
//! The name is derived from the group and the *verified* identity only, so a retry or a
//! re-onboarding of the same VM updates the same object instead of creating a second.

use sha2::{Digest, Sha256};

/// The domain of Gangplank's own labels and annotations (`onboarding.gangplank.dev/…`). An
/// agent may not set labels under it (nor under any other `gangplank.dev` name): they record
/// what the endpoint verified.
pub const DOMAIN: &str = "onboarding.gangplank.dev";

/// Annotations Gangplank writes on every WorkloadEntry it registers, and the ones it reads
/// from a WorkloadGroup.
pub mod annotation {
    /// On a WorkloadGroup, set by its admin: a comma list of the address classes its VMs may
    /// register at that are refused by default, `loopback` and `link-local` (e.g.
    /// `loopback` for VMs on one machine, as the quickstart and the tests run them).
    pub const ALLOWED_ADDRESSES: &str = "onboarding.gangplank.dev/allowed-addresses";
    /// The verified identity, e.g. `jwt:https://idp.example/vm-7`.
    pub const IDENTITY: &str = "onboarding.gangplank.dev/identity";
    /// The credential kind that proved the identity.
    pub const CREDENTIAL_KIND: &str = "onboarding.gangplank.dev/credential-kind";
    /// The agent's version.
    pub const AGENT_VERSION: &str = "onboarding.gangplank.dev/agent-version";
    /// The host name the agent reported (a claim, not verified).
    pub const HOSTNAME: &str = "onboarding.gangplank.dev/hostname";
    /// When the agent's stream connected (RFC 3339).
    pub const CONNECTED_AT: &str = "onboarding.gangplank.dev/connected-at";
    /// When the agent's stream was lost (RFC 3339); absent while connected.
    pub const DISCONNECTED_AT: &str = "onboarding.gangplank.dev/disconnected-at";
    /// The current session id (the `jti` of the agent's session token); older sessions are refused.
    pub const SESSION: &str = "onboarding.gangplank.dev/session";
    /// The endpoint replica that holds the agent's stream.
    pub const ENDPOINT_REPLICA: &str = "onboarding.gangplank.dev/endpoint-replica";
    /// Istio's marker for a health-checked WorkloadEntry: istiod leaves the entry out of
    /// service endpoints unless its `Healthy` condition is `True`.
    pub const HEALTH_CHECKS_ENABLED: &str = "proxy.istio.io/health-checks-enabled";
}

/// Labels Gangplank sets on every WorkloadEntry it registers.
pub mod label {
    /// Marks entries managed by Gangplank (so a sweep never touches anything else).
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    /// The value of [`MANAGED_BY`].
    pub const MANAGED_BY_VALUE: &str = "gangplank";
    /// The WorkloadGroup the entry belongs to.
    pub const WORKLOAD_GROUP: &str = "onboarding.gangplank.dev/workload-group";
    /// The credential kind.
    pub const CREDENTIAL_KIND: &str = "onboarding.gangplank.dev/credential-kind";
}

/// Label prefixes a VM may not set on its entry: Istio's and Kubernetes' (they steer the mesh:
/// `security.istio.io/tlsMode`, `topology.istio.io/network`, `service.istio.io/canonical-name`,
/// …) and Gangplank's own ([`DOMAIN`]), which record what the endpoint verified. A domain
/// covers its subdomains.
const RESERVED_LABEL_DOMAINS: [(&str, &str); 4] = [
    ("istio.io", "Istio"),
    ("kubernetes.io", "Kubernetes"),
    ("k8s.io", "Kubernetes"),
    ("gangplank.dev", "Gangplank"),
];

/// The prefix of `key` and who reserves it, when `key` is a label a VM may not set
/// (`security.istio.io/tlsMode` → `("security.istio.io", "Istio")`).
pub fn reserved_label(key: &str) -> Option<(&str, &'static str)> {
    let (prefix, _) = key.split_once('/')?;
    let lower = prefix.to_ascii_lowercase();
    RESERVED_LABEL_DOMAINS.iter().find_map(|(domain, owner)| {
        let under = lower == *domain || lower.strip_suffix(domain).is_some_and(|head| head.ends_with('.'));
        under.then_some((prefix, *owner))
    })
}

/// The WorkloadEntry name for `group` and an identity made of `kind` and `parts`, e.g.
/// `ratings-jwt-vm-7-3f1a9c2e`.
///
/// Always a valid DNS-1123 subdomain of at most 253 characters. A short hash of the exact
/// identity is appended whenever the readable part lost information (case, characters,
/// length), so two identities never share a name.
pub fn entry_name(group: &str, kind: &str, parts: &[&str]) -> String {
    let exact = format!("{group}\u{0}{kind}\u{0}{}", parts.join("\u{0}"));
    let readable = std::iter::once(group)
        .chain(std::iter::once(kind))
        .chain(parts.iter().copied());
    let slug = readable
        .map(slug)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    let lossless = parts.iter().chain([&group, &kind]).all(|p| slug_is_lossless(p));
    const MAX: usize = 253;
    if lossless && slug.len() <= MAX {
        return slug;
    }
    let digest = Sha256::digest(exact.as_bytes());
    let hash: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let keep = MAX - hash.len() - 1;
    let head = slug[..slug.len().min(keep)].trim_end_matches(['-', '.']);
    format!("{head}-{hash}")
}

fn slug(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

fn slug_is_lossless(s: &str) -> bool {
    !s.is_empty() && slug(s) == s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::is_dns1123_subdomain;

    #[test]
    fn istio_kubernetes_and_gangplank_labels_are_reserved() {
        assert_eq!(
            reserved_label("security.istio.io/tlsMode"),
            Some(("security.istio.io", "Istio"))
        );
        assert_eq!(reserved_label("istio.io/rev").map(|r| r.1), Some("Istio"));
        assert_eq!(
            reserved_label("app.kubernetes.io/name").map(|r| r.1),
            Some("Kubernetes")
        );
        assert_eq!(reserved_label("node.k8s.io/x").map(|r| r.1), Some("Kubernetes"));
        assert_eq!(
            reserved_label(label::WORKLOAD_GROUP).map(|r| r.1),
            Some("Gangplank")
        );
        for free in [
            "app",
            "example.com/tier",
            "notistio.io/x",
            "istio.io.example/x",
            "istio",
        ] {
            assert_eq!(reserved_label(free), None, "{free}");
        }
    }

    #[test]
    fn readable_identities_keep_their_name() {
        assert_eq!(
            entry_name("ratings", "token", &["abc123"]),
            "ratings-token-abc123"
        );
    }

    #[test]
    fn lossy_identities_get_a_stable_hash() {
        let a = entry_name("ratings", "jwt", &["https://idp.example", "VM-7"]);
        let b = entry_name("ratings", "jwt", &["https://idp.example", "vm-7"]);
        assert!(a.starts_with("ratings-jwt-https-idp-example-vm-7-"), "{a}");
        assert_ne!(a, b, "case must not collide");
        assert_eq!(a, entry_name("ratings", "jwt", &["https://idp.example", "VM-7"]));
    }

    #[test]
    fn long_identities_fit() {
        let long = "x".repeat(400);
        let n = entry_name("ratings", "jwt", &[&long]);
        assert!(n.len() <= 253 && is_dns1123_subdomain(&n), "{n}");
    }

    #[test]
    fn names_are_always_valid() {
        for parts in [vec!["--"], vec!["é"], vec!["a.b"], vec![""], vec!["UPPER", "_x_"]] {
            let n = entry_name("g", "k", &parts);
            assert!(is_dns1123_subdomain(&n), "{parts:?} -> {n}");
        }
    }
}
