//! Properties of the agent's config parsers: whatever text or YAML value a file holds, they
//! answer with a config or an error naming the file, never a panic; and a printed
//! `AgentConfiguration` (`config print`) parses back to the same config.
//!
//! Cases: proptest's default (256), or `PROPTEST_CASES`. No regression files are written.

use std::path::Path;

use gangplank_agent::config::{Agent, Onboarding};
use proptest::prelude::*;

const ONBOARDING: &str = "/etc/gangplank/onboarding.yaml";
const AGENT: &str = "/etc/gangplank/agent.yaml";

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any YAML value: scalars of every kind, and nested sequences and mappings.
fn yaml_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,24}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Mapping keys: the real fields of both files (so values reach the validators), and others.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "apiVersion",
            "kind",
            "onboardingEndpoint",
            "host",
            "port",
            "transportSecurity",
            "tls",
            "caBundle",
            "sni",
            "insecureSkipVerify",
            "workloadGroup",
            "namespace",
            "name",
            "workload",
            "labels",
            "settings",
            "connectedOver",
            "identity",
            "joinToken",
            "jwt",
            "file",
            "command",
            "platform",
            "sidecar",
            "launcher",
            "process",
            "files",
            "root",
            "retry",
            "initial",
            "max",
            "heartbeat",
            "tokenRenewal",
        ])
        .prop_map(str::to_owned),
        "[a-zA-Z.]{1,12}",
    ]
}

/// A document of `kind` whose other fields are `value`'s (when it is a mapping).
fn document(kind: &str, value: serde_json::Value) -> String {
    let mut doc = serde_json::json!({
        "apiVersion": "onboarding.gangplank.dev/v1alpha1",
        "kind": kind,
    });
    if let (Some(doc), serde_json::Value::Object(more)) = (doc.as_object_mut(), value) {
        doc.extend(more);
    }
    serde_saphyr::to_string(&doc).expect("a JSON value prints as YAML")
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_text_is_a_config_or_an_error_naming_the_file(text in "(?s).{0,400}") {
        if let Err(e) = Onboarding::parse(Path::new(ONBOARDING), &text) {
            prop_assert!(e.to_string().starts_with(ONBOARDING), "{e}");
        }
        if let Err(e) = Agent::parse(Path::new(AGENT), &text) {
            prop_assert!(e.to_string().starts_with(AGENT), "{e}");
        }
    }

    #[test]
    fn any_yaml_value_is_a_config_or_an_error(value in yaml_value()) {
        let _ = Onboarding::parse(Path::new(ONBOARDING), &document("OnboardingConfiguration", value.clone()));
        let _ = Agent::parse(Path::new(AGENT), &document("AgentConfiguration", value.clone()));
        // And the value as the whole file, whatever it is.
        let whole = serde_saphyr::to_string(&value).expect("prints");
        let _ = Onboarding::parse(Path::new(ONBOARDING), &whole);
        let _ = Agent::parse(Path::new(AGENT), &whole);
    }

    #[test]
    fn printed_agent_configs_parse_back_to_the_same(
        identity in prop_oneof![
            Just("  joinToken: {file: /etc/gangplank/join-token}\n".to_owned()),
            "/[a-z]{1,8}/[a-z]{1,8}".prop_map(|p| format!("  jwt: {{file: {p}}}\n")),
            prop::collection::vec("[a-z]{1,8}", 1..4)
                .prop_map(|argv| format!("  jwt: {{command: [{}]}}\n", argv.join(", "))),
        ],
        heartbeat in 1u32..600,
        initial_ms in 1u32..5000,
        extra_ms in 0u32..60_000,
        renewal in 1u32..=99,
        root in "/[a-z]{1,8}",
    ) {
        let text = format!(
            "identity:\n{identity}files:\n  root: {root}\nsettings:\n  heartbeat: {heartbeat}s\n  tokenRenewal: 0.{renewal:02}\n  retry:\n    initial: {initial_ms}ms\n    max: {}ms\n",
            initial_ms + extra_ms
        );
        let agent = Agent::parse(Path::new(AGENT), &text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let printed = agent.to_yaml();
        let again = Agent::parse(Path::new(AGENT), &printed).map_err(|e| TestCaseError::fail(format!("{e}\n{printed}")))?;
        prop_assert_eq!(again, agent);
    }
}
