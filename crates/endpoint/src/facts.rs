//! Host facts: what an agent claims about its VM (host name, addresses, labels, version).
//!
//! They are claims, and they land in a WorkloadEntry that istiod reads: with a directory
//! registry one invalid file makes istiod reject a whole `fs://` reload, and a label such as
//! `security.istio.io/tlsMode` changes how the mesh talks to the VM. So every fact is checked
//! here as Kubernetes and Istio would check it, and refused with the field it names, before
//! anything is written or a credential is spent.
//!
//! [`check`] is syntactic and runs before the credential is verified; [`Allowed`] depends on
//! the WorkloadGroup (which address classes its admin opted into) and runs once it is read;
//! [`check_entry`] bounds the entry that is finally written.

use std::net::IpAddr;

use gangplank_api::connected_over;
use gangplank_api::istio::{WorkloadEntry, WorkloadGroup};
use gangplank_api::meta::Resource;
use gangplank_api::meta::{label_key_problem, label_value_problem};
use gangplank_api::names::{annotation, reserved_label};
use gangplank_api::{NamespacedName, proto};
use tonic::Status;

/// Most labels a host may add (Kubernetes sets no count, but each one is in every entry istiod
/// pushes to every proxy that selects the VM's services).
pub const MAX_LABELS: usize = 32;
/// Most addresses a host may report (a host with many bridges has a few dozen at most).
pub const MAX_ADDRESSES: usize = 64;
/// Longest agent version (`0.1.0`, `1.2.3-rc.1+abcdef`).
pub const MAX_AGENT_VERSION: usize = 64;
/// Most bytes a host contributes in all: host name, addresses, version and labels (keys and
/// values). Each fact is bounded on its own; this bounds their sum, so no host makes an
/// entry much larger than its neighbours.
pub const MAX_HOST_BYTES: usize = 8 * 1024;
/// Largest WorkloadEntry written, serialized as JSON. An entry is a few KiB; this leaves room
/// for a large WorkloadGroup template while keeping a file istiod reloads small.
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;

/// Where an agent's labels come from, for messages that say what to change.
const LABELS_SETTING: &str = "workload.labels in the agent's onboarding config";

/// Why host facts (or the entry built from them) are refused. Messages name the field and
/// say what to change; untrusted values are shown truncated and escaped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A fact is malformed or not allowed.
    #[error("{field}: {problem}")]
    Invalid {
        /// The field, e.g. `host.labels["Bad Key"]`.
        field: String,
        /// What is wrong and what to change.
        problem: String,
    },
    /// The host sent more than is accepted.
    #[error("{field}: {actual} {what}, more than the {max} accepted: {fix}")]
    TooLarge {
        /// The field, e.g. `host.labels`.
        field: &'static str,
        /// What was counted (`labels`, `bytes`).
        what: &'static str,
        /// How many were sent.
        actual: usize,
        /// How many are accepted.
        max: usize,
        /// What to change.
        fix: &'static str,
    },
    /// The WorkloadGroup's address opt-in is not understood: the group's admin must fix it.
    #[error(
        "WorkloadGroup {group}: annotation {} {value}: {problem}: fix the annotation (a comma list of loopback, link-local)",
        annotation::ALLOWED_ADDRESSES
    )]
    Group {
        /// The group.
        group: NamespacedName,
        /// The annotation's value, shown.
        value: String,
        /// What is wrong.
        problem: String,
    },
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Group { .. } => Status::failed_precondition(err.to_string()),
            Error::Invalid { .. } | Error::TooLarge { .. } => Status::invalid_argument(err.to_string()),
        }
    }
}

/// A short, quoted, escaped form of an untrusted value for a message (a 200 KB label value
/// or a newline must not reach a log line as is).
fn shown(s: &str) -> String {
    const MAX: usize = 64;
    let mut out: String = s.chars().take(MAX).collect();
    if s.chars().count() > MAX {
        out.push('…');
    }
    format!("{out:?}")
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Checks what can be checked of `host` without the WorkloadGroup: every label, the host
/// name, the agent version, `connected_over`, that every address is an IP that can name a
/// host at all, and the counts and total size.
pub fn check(host: &proto::HostFacts) -> Result<(), Error> {
    if host.labels.len() > MAX_LABELS {
        return Err(Error::TooLarge {
            field: "host.labels",
            what: "labels",
            actual: host.labels.len(),
            max: MAX_LABELS,
            fix: "set fewer workload.labels in the agent's onboarding config (the WorkloadGroup's template can carry the rest)",
        });
    }
    if host.addresses.len() > MAX_ADDRESSES {
        return Err(Error::TooLarge {
            field: "host.addresses",
            what: "addresses",
            actual: host.addresses.len(),
            max: MAX_ADDRESSES,
            fix: "the agent reports the host's interface addresses; report fewer",
        });
    }
    // Sorted, so the first bad label named is the same on every try.
    let mut labels: Vec<_> = host.labels.iter().collect();
    labels.sort();
    for (key, value) in labels {
        let field = format!("host.labels[{}]", shown(key));
        if let Some(problem) = label_key_problem(key) {
            return Err(invalid(
                field,
                format!("is not a Kubernetes label key: {problem}; fix or remove it in {LABELS_SETTING}"),
            ));
        }
        if let Some((prefix, owner)) = reserved_label(key) {
            return Err(invalid(
                field,
                format!(
                    "the prefix {prefix}/ is reserved for {owner}: a VM may not set it; remove it from {LABELS_SETTING} (a WorkloadGroup's template may set such labels)"
                ),
            ));
        }
        if let Some(problem) = label_value_problem(value) {
            return Err(invalid(
                field,
                format!(
                    "value {} is not a Kubernetes label value: {problem}; fix it in {LABELS_SETTING}",
                    shown(value)
                ),
            ));
        }
    }
    if let Some(problem) = hostname_problem(&host.hostname) {
        return Err(invalid(
            "host.hostname",
            format!(
                "{} {problem}: give the VM a valid host name (hostnamectl set-hostname), or report none",
                shown(&host.hostname)
            ),
        ));
    }
    if host.agent_version.len() > MAX_AGENT_VERSION
        || !host.agent_version.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        return Err(invalid(
            "host.agent_version",
            format!(
                "{} is not a version: at most {MAX_AGENT_VERSION} printable ASCII characters; run a released gangplank-agent",
                shown(&host.agent_version)
            ),
        ));
    }
    if !matches!(
        host.connected_over.as_str(),
        "" | connected_over::VPC | connected_over::INTERNET
    ) {
        return Err(invalid(
            "host.connected_over",
            format!(
                "{} is not {} or {}: fix settings.connectedOver in the agent's config",
                shown(&host.connected_over),
                connected_over::VPC,
                connected_over::INTERNET
            ),
        ));
    }
    for (i, text) in host.addresses.iter().enumerate() {
        let field = format!("host.addresses[{i}]");
        let ip: IpAddr = text.parse().map_err(|_| {
            invalid(
                &field,
                format!(
                    "{} is not an IP address: report addresses such as 10.0.0.7 or fd00::7",
                    shown(text)
                ),
            )
        })?;
        if let Some(class) = Class::of(ip).filter(|c| !c.may_be_allowed()) {
            return Err(invalid(
                field,
                format!("{ip} is {class}, which cannot address a VM: report the VM's unicast addresses"),
            ));
        }
    }
    let total = host.hostname.len()
        + host.agent_version.len()
        + host.connected_over.len()
        + host.addresses.iter().map(String::len).sum::<usize>()
        + host.labels.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    if total > MAX_HOST_BYTES {
        return Err(Error::TooLarge {
            field: "host",
            what: "bytes of host name, addresses, version and labels",
            actual: total,
            max: MAX_HOST_BYTES,
            fix: "set fewer or shorter workload.labels in the agent's onboarding config",
        });
    }
    Ok(())
}

/// Why `name` is not an RFC 1123 host name, if it is not (empty is allowed: no name).
fn hostname_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return None;
    }
    if name.len() > 253 {
        return Some("is longer than 253 characters");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !name.split('.').all(label_ok) {
        return Some(
            "is not a DNS name (RFC 1123: dot-separated labels of letters, digits and '-', each at most 63 characters, no '-' at either end)",
        );
    }
    None
}

/// An address class that cannot, or by default may not, be a VM's registered address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `0.0.0.0/8`, `::`.
    Unspecified,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// `169.254.0.0/16` (the cloud metadata services' `169.254.169.254` among them), `fe80::/10`.
    LinkLocal,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
}

impl Class {
    /// The class of `ip` (IPv4-mapped IPv6 addresses as their IPv4 address), `None` for an
    /// ordinary unicast address.
    pub fn of(ip: IpAddr) -> Option<Self> {
        match ip.to_canonical() {
            IpAddr::V4(v4) if v4.octets()[0] == 0 => Some(Class::Unspecified),
            IpAddr::V4(v4) if v4.is_broadcast() => Some(Class::Broadcast),
            IpAddr::V4(v4) if v4.is_multicast() => Some(Class::Multicast),
            IpAddr::V4(v4) if v4.is_link_local() => Some(Class::LinkLocal),
            IpAddr::V4(v4) if v4.is_loopback() => Some(Class::Loopback),
            IpAddr::V6(v6) if v6.is_unspecified() => Some(Class::Unspecified),
            IpAddr::V6(v6) if v6.is_multicast() => Some(Class::Multicast),
            IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => Some(Class::LinkLocal),
            IpAddr::V6(v6) if v6.is_loopback() => Some(Class::Loopback),
            _ => None,
        }
    }

    /// Whether a WorkloadGroup may opt into it (a VM on one machine, a link-local network).
    fn may_be_allowed(self) -> bool {
        matches!(self, Class::LinkLocal | Class::Loopback)
    }

    /// Its name in the [`annotation::ALLOWED_ADDRESSES`] annotation.
    fn name(self) -> &'static str {
        match self {
            Class::Unspecified => "unspecified",
            Class::Multicast => "multicast",
            Class::Broadcast => "broadcast",
            Class::LinkLocal => "link-local",
            Class::Loopback => "loopback",
        }
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Class::Unspecified => "an unspecified address",
            Class::Multicast => "a multicast address",
            Class::Broadcast => "the broadcast address",
            Class::LinkLocal => "a link-local address",
            Class::Loopback => "a loopback address",
        })
    }
}

/// The address classes a WorkloadGroup's VMs may register at beyond ordinary unicast ones:
/// its [`annotation::ALLOWED_ADDRESSES`] opt-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    group: NamespacedName,
    classes: Vec<Class>,
}

impl Allowed {
    /// What `group` allows; a value that names no known class is the group admin's to fix.
    pub fn of(group: &WorkloadGroup) -> Result<Self, Error> {
        let key = group.key();
        let value = group
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(annotation::ALLOWED_ADDRESSES))
            .map(String::as_str)
            .unwrap_or_default();
        let mut classes = Vec::new();
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let class = [Class::Loopback, Class::LinkLocal]
                .into_iter()
                .find(|c| c.name() == part)
                .ok_or_else(|| Error::Group {
                    group: key.clone(),
                    value: shown(value),
                    problem: format!("{} is not an address class that may be allowed", shown(part)),
                })?;
            classes.push(class);
        }
        Ok(Self { group: key, classes })
    }

    /// Checks every address `host` reports, and the one its verified identity vouches for:
    /// loopback and link-local ones only where the group allows them.
    pub fn check(&self, host: &proto::HostFacts, verified: Option<IpAddr>) -> Result<(), Error> {
        let reported = host
            .addresses
            .iter()
            .enumerate()
            .filter_map(|(i, a)| Some((format!("host.addresses[{i}]"), a.parse::<IpAddr>().ok()?)));
        let verified = verified.map(|ip| ("the address the VM's verified identity names".to_string(), ip));
        for (field, ip) in reported.chain(verified) {
            let Some(class) = Class::of(ip) else { continue };
            if self.classes.contains(&class) {
                continue;
            }
            let problem = if class.may_be_allowed() {
                format!(
                    "{ip} is {class}, which WorkloadGroup {group} does not allow: register the VM at a routable address, or have the group's admin allow it with annotation {} listing {}",
                    annotation::ALLOWED_ADDRESSES,
                    class.name(),
                    group = self.group,
                )
            } else {
                format!("{ip} is {class}, which cannot address a VM")
            };
            return Err(invalid(field, problem));
        }
        Ok(())
    }
}

/// Bounds the entry that would be written, serialized (the group's template included).
pub fn check_entry(entry: &WorkloadEntry) -> Result<(), Error> {
    let size = serde_json::to_vec(entry).map(|b| b.len()).unwrap_or(usize::MAX);
    if size > MAX_ENTRY_BYTES {
        return Err(Error::TooLarge {
            field: "WorkloadEntry",
            what: "bytes",
            actual: size,
            max: MAX_ENTRY_BYTES,
            fix: "set fewer or shorter workload.labels on the VM, or shrink the WorkloadGroup's template and annotations",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> proto::HostFacts {
        proto::HostFacts {
            hostname: "vm-7.example.internal".into(),
            addresses: vec!["10.0.0.7".into(), "fd00::7".into()],
            connected_over: "VPC".into(),
            agent_version: "0.1.0".into(),
            labels: [
                ("version".to_string(), "v2".to_string()),
                ("example.com/tier".into(), "db".into()),
            ]
            .into(),
        }
    }

    fn refused(mutate: impl FnOnce(&mut proto::HostFacts)) -> String {
        let mut h = host();
        mutate(&mut h);
        match check(&h) {
            Ok(()) => panic!("accepted: {h:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn ordinary_facts_pass() {
        check(&host()).unwrap();
        check(&proto::HostFacts::default()).unwrap();
    }

    #[test]
    fn each_bad_fact_is_named() {
        let label = |k: &str, v: &str| {
            let (k, v) = (k.to_string(), v.to_string());
            refused(move |h| {
                h.labels.insert(k, v);
            })
        };
        assert!(label("Bad Key", "x").starts_with("host.labels[\"Bad Key\"]: is not a Kubernetes label key"));
        assert!(label("ok", &"v".repeat(200 * 1024)).contains("at most 63"));
        assert!(label("security.istio.io/tlsMode", "disabled").contains("reserved for Istio"));
        assert!(label("istio.io/rev", "x").contains("reserved for Istio"));
        assert!(label("topology.kubernetes.io/zone", "x").contains("reserved for Kubernetes"));
        assert!(label("node.k8s.io/x", "x").contains("reserved for Kubernetes"));
        assert!(label("onboarding.gangplank.dev/workload-group", "x").contains("reserved for Gangplank"));
        assert!(refused(|h| h.hostname = "vm\nevil".into()).starts_with("host.hostname: \"vm\\nevil\""));
        assert!(refused(|h| h.hostname = "a".repeat(254)).contains("253"));
        assert!(refused(|h| h.agent_version = "1\u{7}".into()).starts_with("host.agent_version"));
        assert!(refused(|h| h.connected_over = "vpc".into()).starts_with("host.connected_over"));
        assert!(refused(|h| h.addresses = vec!["10.0.0.999".into()]).starts_with("host.addresses[0]"));
        for never in [
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "::ffff:0.0.0.0",
        ] {
            assert!(
                refused(|h| h.addresses = vec![never.into()]).contains("cannot address a VM"),
                "{never}"
            );
        }
        assert!(
            refused(|h| h.labels = (0..=MAX_LABELS).map(|i| (format!("l{i}"), "v".into())).collect())
                .contains("labels")
        );
        let long_prefix = "p".repeat(240);
        assert!(
            refused(|h| h.labels = (0..MAX_LABELS)
                .map(|i| (format!("{long_prefix}.x{i}/name"), "v".repeat(63)))
                .collect())
            .starts_with("host: ")
        );
    }

    fn group(allowed: Option<&str>) -> WorkloadGroup {
        let mut g = WorkloadGroup::default();
        g.metadata.name = Some("ratings".into());
        g.metadata.namespace = Some("bookinfo".into());
        if let Some(a) = allowed {
            g.metadata.annotations =
                Some([(annotation::ALLOWED_ADDRESSES.to_string(), a.to_string())].into());
        }
        g
    }

    #[test]
    fn loopback_and_link_local_need_the_groups_opt_in() {
        let at = |a: &str| proto::HostFacts {
            addresses: vec![a.into()],
            ..Default::default()
        };
        let none = Allowed::of(&group(None)).unwrap();
        for a in [
            "127.0.0.1",
            "::1",
            "169.254.169.254",
            "fe80::1",
            "::ffff:127.0.0.2",
        ] {
            let e = none.check(&at(a), None).unwrap_err().to_string();
            assert!(
                e.contains("does not allow") && e.contains(annotation::ALLOWED_ADDRESSES),
                "{e}"
            );
        }
        none.check(&at("10.0.0.7"), None).unwrap();
        let e = none
            .check(&at("10.0.0.7"), Some("169.254.169.254".parse().unwrap()))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the address the VM's verified identity names"),
            "{e}"
        );
        let loopback = Allowed::of(&group(Some("loopback"))).unwrap();
        loopback.check(&at("127.0.0.9"), None).unwrap();
        assert!(loopback.check(&at("169.254.1.1"), None).is_err());
        let both = Allowed::of(&group(Some(" loopback , link-local "))).unwrap();
        both.check(&at("fe80::1"), Some("127.0.0.1".parse().unwrap()))
            .unwrap();
        let bad = Allowed::of(&group(Some("loopback,multicast"))).unwrap_err();
        assert!(matches!(bad, Error::Group { .. }), "{bad}");
        assert_eq!(Status::from(bad).code(), tonic::Code::FailedPrecondition);
    }
}
