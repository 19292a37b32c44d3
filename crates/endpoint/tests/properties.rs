//! Properties of what the endpoint reads from outside: its config file (any text or YAML
//! value is a config or an error, never a panic; a printed file parses back the same), and
//! an agent's host facts (generated valid facts pass; each kind of bad fact is refused,
//! naming its field).
//!
//! Cases: proptest's default (256), or `PROPTEST_CASES`. No regression files are written.

use gangplank_api::istio::WorkloadGroup;
use gangplank_api::proto::HostFacts;
use gangplank_endpoint::config::{Config, File};
use gangplank_endpoint::facts::{self, Allowed};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Parses and validates an endpoint config file's text, as `Config::load` does.
fn load(text: &str) -> Result<Config, String> {
    let file: File = gangplank_api::yaml::parse(text).map_err(|e| e.to_string())?;
    Config::validate(file).map_err(|e| e.to_string())
}

fn yaml_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        ".{0,24}".prop_map(serde_json::Value::from),
        // Values the settings take: durations, addresses, paths.
        prop::sample::select(vec![
            "5m",
            "0s",
            "1h",
            "127.0.0.1:0",
            "[::1]:15443",
            "/tmp/x",
            "true"
        ])
        .prop_map(serde_json::Value::from),
    ];
    let key = prop_oneof![
        prop::sample::select(vec![
            "planeId",
            "listen",
            "monitoringListen",
            "replica",
            "tls",
            "certFile",
            "keyFile",
            "dev",
            "devNames",
            "registry",
            "directory",
            "kubernetes",
            "kubeconfig",
            "stateDir",
            "mesh",
            "meshConfigFile",
            "rootCertFile",
            "istiodIp",
            "clusterId",
            "sidecarToken",
            "lifetime",
            "issuer",
            "identities",
            "joinTokens",
            "jwt",
            "issuers",
            "jwksUri",
            "awsEc2",
            "gcpGce",
            "azureVm",
            "workloads",
            "gracePeriod",
            "heartbeat",
            "propagationDelay",
            "bindingRetention",
        ])
        .prop_map(str::to_owned),
        "[a-zA-Z]{1,12}",
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid endpoint config from a few knobs.
fn valid_config() -> impl Strategy<Value = String> {
    (
        "[a-z][a-z0-9-]{0,20}",
        1u64..3600,
        1u64..600,
        10u64..86_400,
        any::<bool>(),
        prop::option::of("[a-z]{1,10}"),
    )
        .prop_map(|(plane, grace, heartbeat, lifetime, jwt, replica)| {
            let grace = grace + heartbeat;
            let jwt = if jwt {
                "  jwt:\n    issuers:\n    - issuer: https://idp.example\n      jwksUri: https://idp.example/jwks\n"
            } else {
                ""
            };
            let replica = replica.map(|r| format!("replica: {r}\n")).unwrap_or_default();
            format!(
                "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: EndpointConfiguration
planeId: {plane}
{replica}tls:
  certFile: /etc/tls/tls.crt
  keyFile: /etc/tls/tls.key
registry:
  directory: /var/lib/registry
stateDir: /var/lib/state
sidecarToken:
  lifetime: {lifetime}s
identities:
  joinTokens: true
{jwt}workloads:
  gracePeriod: {grace}s
  heartbeat: {heartbeat}s
"
            )
        })
}

/// Label keys and values Kubernetes accepts, under no reserved prefix.
fn label() -> impl Strategy<Value = (String, String)> {
    let name = "[A-Za-z0-9]([-A-Za-z0-9_.]{0,30}[A-Za-z0-9])?";
    let key = prop_oneof![
        name.prop_map(|n| n.to_owned()),
        (
            "[a-z0-9]{1,10}(\\.[a-z0-9]{1,10}){0,2}\\.(com|example|corp)",
            name
        )
            .prop_map(|(p, n)| format!("{p}/{n}")),
    ];
    (
        key,
        prop_oneof![Just(String::new()), name.prop_map(|v| v.to_owned())],
    )
}

/// Ordinary unicast addresses (private, documentation and global ranges).
fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        (1u8..=223, any::<u8>(), any::<u8>(), 1u8..=254)
            .prop_filter("unicast", |(a, b, ..)| *a != 127 && !(*a == 169 && *b == 254))
            .prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        (any::<u16>(), any::<u16>()).prop_map(|(a, b)| format!("2001:db8::{a:x}:{b:x}")),
        any::<u16>().prop_map(|a| format!("fd00::{a:x}")),
    ]
}

fn valid_facts() -> impl Strategy<Value = HostFacts> {
    (
        prop_oneof![
            Just(String::new()),
            "[A-Za-z0-9]([A-Za-z0-9-]{0,20}[A-Za-z0-9])?(\\.[a-z0-9]{1,12}){0,3}"
        ],
        prop::collection::vec(address(), 1..8),
        prop::sample::select(vec!["", "VPC", "INTERNET"]),
        "[ -~]{0,64}",
        prop::collection::btree_map(label().prop_map(|(k, _)| k), label().prop_map(|(_, v)| v), 0..12),
    )
        .prop_map(
            |(hostname, addresses, connected_over, agent_version, labels)| HostFacts {
                hostname,
                addresses,
                connected_over: connected_over.into(),
                agent_version,
                labels: labels.into_iter().collect(),
            },
        )
}

/// A kind of bad fact: how to make it, and the field its refusal must name.
#[derive(Debug, Clone)]
enum Mutation {
    LabelKey(String),
    LabelValue(String),
    ReservedLabel(String),
    TooManyLabels,
    Hostname(String),
    AgentVersion(String),
    ConnectedOver(String),
    Unparsable(String),
    NeverAnAddress(String),
    TooManyAddresses,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        // A key with a character Kubernetes refuses, or too long a name.
        ("[a-z]{1,5}", "[ !@#$%^&*()=+:;,<>?\\\\\n\t]", "[a-z]{0,5}")
            .prop_map(|(a, bad, b)| Mutation::LabelKey(format!("{a}{bad}{b}"))),
        "[a-z]{64,80}".prop_map(Mutation::LabelKey),
        ("[a-z]{1,5}", "[ /!@#:\n\"']", "[a-z]{1,5}")
            .prop_map(|(a, bad, b)| Mutation::LabelValue(format!("{a}{bad}{b}"))),
        "[a-z]{64,300}".prop_map(Mutation::LabelValue),
        (
            prop::sample::select(vec![
                "istio.io",
                "security.istio.io",
                "topology.istio.io",
                "kubernetes.io",
                "app.kubernetes.io",
                "k8s.io",
                "node.k8s.io",
                "onboarding.gangplank.dev",
                "gangplank.dev"
            ]),
            "[a-z]{1,10}",
        )
            .prop_map(|(p, n)| Mutation::ReservedLabel(format!("{p}/{n}"))),
        Just(Mutation::TooManyLabels),
        ("[a-z]{1,5}", "[ _\n\t\u{0}\u{1b}/:]", "[a-z]{1,5}")
            .prop_map(|(a, bad, b)| Mutation::Hostname(format!("{a}{bad}{b}"))),
        "[a-z]{64,70}".prop_map(|l| Mutation::Hostname(format!("{l}.example"))),
        Just(Mutation::Hostname("-vm".into())),
        "[a-z]{65,80}".prop_map(Mutation::AgentVersion),
        ("[0-9.]{1,5}", "[\n\t\u{0}\u{7f}é]")
            .prop_map(|(a, bad)| Mutation::AgentVersion(format!("{a}{bad}"))),
        "[a-zA-Z]{1,10}"
            .prop_filter("not an accepted value", |s| s != "VPC" && s != "INTERNET")
            .prop_map(Mutation::ConnectedOver),
        "[a-z .:-]{1,20}"
            .prop_filter("not an IP", |s| s.parse::<std::net::IpAddr>().is_err())
            .prop_map(Mutation::Unparsable),
        prop::sample::select(vec![
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "224.0.0.1",
            "239.255.255.250",
            "ff02::1",
            "255.255.255.255",
            "::ffff:224.0.0.1"
        ])
        .prop_map(|a| Mutation::NeverAnAddress(a.into())),
        Just(Mutation::TooManyAddresses),
    ]
}

impl Mutation {
    /// Applies the mutation; returns the field prefix the refusal must start with.
    fn apply(&self, h: &mut HostFacts) -> &'static str {
        match self {
            Mutation::LabelKey(k) | Mutation::ReservedLabel(k) => {
                h.labels.insert(k.clone(), "v".into());
                "host.labels["
            }
            Mutation::LabelValue(v) => {
                h.labels.insert("tier".into(), v.clone());
                "host.labels[\"tier\"]"
            }
            Mutation::TooManyLabels => {
                h.labels = (0..=facts::MAX_LABELS)
                    .map(|i| (format!("l{i}"), "v".into()))
                    .collect();
                "host.labels:"
            }
            Mutation::Hostname(n) => {
                h.hostname = n.clone();
                "host.hostname:"
            }
            Mutation::AgentVersion(v) => {
                h.agent_version = v.clone();
                "host.agent_version:"
            }
            Mutation::ConnectedOver(c) => {
                h.connected_over = c.clone();
                "host.connected_over:"
            }
            Mutation::Unparsable(a) | Mutation::NeverAnAddress(a) => {
                h.addresses.insert(0, a.clone());
                "host.addresses[0]:"
            }
            Mutation::TooManyAddresses => {
                h.addresses = (0..=facts::MAX_ADDRESSES)
                    .map(|i| format!("10.0.{}.{}", i / 200, i % 200 + 1))
                    .collect();
                "host.addresses:"
            }
        }
    }
}

fn group(allowed: Option<&str>) -> WorkloadGroup {
    let mut g = WorkloadGroup::default();
    g.metadata.name = Some("ratings".into());
    g.metadata.namespace = Some("bookinfo".into());
    if let Some(a) = allowed {
        g.metadata.annotations = Some(
            [(
                gangplank_api::names::annotation::ALLOWED_ADDRESSES.to_string(),
                a.to_string(),
            )]
            .into(),
        );
    }
    g
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_config_text_is_a_config_or_an_error(text in "(?s).{0,400}") {
        let _ = load(&text);
    }

    #[test]
    fn any_config_value_is_a_config_or_an_error(value in yaml_value()) {
        let mut doc = serde_json::json!({
            "apiVersion": "onboarding.gangplank.dev/v1alpha1",
            "kind": "EndpointConfiguration",
        });
        if let (Some(doc), serde_json::Value::Object(more)) = (doc.as_object_mut(), value.clone()) {
            doc.extend(more);
        }
        let _ = load(&serde_saphyr::to_string(&doc).expect("prints"));
        let _ = load(&serde_saphyr::to_string(&value).expect("prints"));
    }

    #[test]
    fn a_printed_config_parses_back_the_same(text in valid_config()) {
        let file: File = gangplank_api::yaml::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        Config::validate(file.clone()).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let printed = serde_saphyr::to_string(&file).expect("prints");
        let again: File = gangplank_api::yaml::parse(&printed).map_err(|e| TestCaseError::fail(format!("{e}\n{printed}")))?;
        prop_assert_eq!(serde_saphyr::to_string(&again).expect("prints"), printed);
        prop_assert!(Config::validate(again).is_ok());
    }

    #[test]
    fn valid_host_facts_pass(h in valid_facts()) {
        facts::check(&h).map_err(|e| TestCaseError::fail(format!("{e}: {h:?}")))?;
        Allowed::of(&group(None)).unwrap().check(&h, None).map_err(|e| TestCaseError::fail(format!("{e}: {h:?}")))?;
    }

    #[test]
    fn each_kind_of_bad_fact_is_refused_naming_its_field(h in valid_facts(), m in mutation()) {
        let mut h = h;
        let field = m.apply(&mut h);
        match facts::check(&h) {
            Ok(()) => prop_assert!(false, "{m:?} accepted: {h:?}"),
            Err(e) => prop_assert!(e.to_string().starts_with(field), "{m:?}: {e}"),
        }
    }

    #[test]
    fn loopback_and_link_local_pass_only_where_the_group_allows(
        h in valid_facts(),
        (bad, class) in prop_oneof![
            (1u8..=254).prop_map(|d| (format!("127.0.0.{d}"), "loopback")),
            Just(("::1".to_owned(), "loopback")),
            (any::<u8>(), 1u8..=254).prop_map(|(c, d)| (format!("169.254.{c}.{d}"), "link-local")),
            any::<u16>().prop_map(|a| (format!("fe80::{a:x}"), "link-local")),
        ],
        at in 0usize..8,
    ) {
        let mut h = h;
        let at = at.min(h.addresses.len());
        h.addresses.insert(at, bad.clone());
        facts::check(&h).map_err(|e| TestCaseError::fail(format!("{e}: {h:?}")))?;
        let refused = Allowed::of(&group(None)).unwrap().check(&h, None).unwrap_err().to_string();
        prop_assert!(refused.starts_with(&format!("host.addresses[{at}]: ")), "{refused}");
        prop_assert!(Allowed::of(&group(Some(class))).unwrap().check(&h, None).is_ok());
        // A verified address is held to the same rule.
        let plain = HostFacts { addresses: vec!["10.0.0.7".into()], ..Default::default() };
        prop_assert!(Allowed::of(&group(None)).unwrap().check(&plain, bad.parse().ok()).is_err());
    }
}
