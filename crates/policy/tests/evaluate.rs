//! OnboardingPolicy evaluation, table-driven: which identities may join which groups, and
//! what the denial says.

use gangplank_api::istio::WorkloadGroup;
use gangplank_api::policy::OnboardingPolicy;
use gangplank_identity::{Facts, Identity, jwt, token};
use gangplank_policy::{Decision, Verdict, evaluate, explain, validate};
use pretty_assertions::assert_eq;
use serde_json::json;

const IDP: &str = "https://idp.example";

fn policy(yaml: &str) -> OnboardingPolicy {
    serde_saphyr::from_str(yaml).expect("test policy parses")
}

fn group(ns: &str, name: &str, labels: &[(&str, &str)]) -> WorkloadGroup {
    let mut g = WorkloadGroup::default();
    g.metadata.namespace = Some(ns.into());
    g.metadata.name = Some(name.into());
    g.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    g
}

fn jwt_identity(sub: &str, claims: serde_json::Value) -> Identity {
    let mut all = json!({"iss": IDP, "sub": sub});
    if let (Some(all), Some(extra)) = (all.as_object_mut(), claims.as_object()) {
        all.extend(extra.clone());
    }
    Identity {
        facts: Facts::Jwt(jwt::Facts {
            issuer: IDP.into(),
            subject: sub.into(),
            claims: all,
        }),
        address: None,
    }
}

fn token_identity(id: &str, ns: &str, group: &str) -> Identity {
    Identity {
        facts: Facts::JoinToken(token::Facts {
            id: id.into(),
            namespace: ns.into(),
            workload_group: group.into(),
            key: String::new(),
        }),
        address: None,
    }
}

const ALLOW_PROD: &str = r#"
apiVersion: onboarding.gangplank.dev/v1alpha1
kind: OnboardingPolicy
metadata: {name: allow-prod, namespace: bookinfo}
spec:
  allow:
  - workloads:
    - jwt:
        issuer: https://idp.example
        subjects: [vm-1, vm-2]
    onboardTo:
    - workloadGroupSelector: {matchLabels: {app: ratings}}
"#;

const ALLOW_CLAIMS: &str = r#"
metadata: {name: allow-claims, namespace: bookinfo}
spec:
  allow:
  - workloads:
    - jwt:
        issuer: https://idp.example
        claims:
        - {name: google.project_id, values: [prod-1]}
        - {name: groups, values: [vm-admins]}
        - {name: tier, values: ["3"]}
        - {name: trusted, values: ["true"]}
    onboardTo:
    - workloadGroupSelector:
        matchExpressions:
        - {key: app, operator: In, values: [ratings, reviews]}
        - {key: legacy, operator: DoesNotExist}
"#;

const ALLOW_TOKENS: &str = r#"
metadata: {name: allow-tokens, namespace: bookinfo}
spec:
  allow:
  - workloads: [{joinToken: {}}]
    onboardTo: [{workloadGroupSelector: {}}]
"#;

const ALLOW_LISTED_TOKEN: &str = r#"
metadata: {name: listed-token, namespace: bookinfo}
spec:
  allow:
  - workloads: [{joinToken: {ids: [abcdefghij]}}]
    onboardTo: [{workloadGroupSelector: {}}]
"#;

const OTHER_NS_ALLOW_ALL: &str = r#"
metadata: {name: sneaky, namespace: other}
spec:
  allow:
  - workloads: [{joinToken: {}}, {jwt: {issuer: https://idp.example}}]
    onboardTo: [{workloadGroupSelector: {}}]
"#;

const INVALID_ALLOW_ALL: &str = r#"
metadata: {name: broken, namespace: bookinfo}
spec:
  allow:
  - workloads: [{jwt: {issuer: https://idp.example}, joinToken: {}}]
    onboardTo: [{workloadGroupSelector: {}}]
"#;

fn full_claims() -> serde_json::Value {
    json!({"google": {"project_id": "prod-1"}, "groups": ["devs", "vm-admins"], "tier": 3, "trusted": true})
}

#[test]
fn decisions() {
    let ratings = group("bookinfo", "ratings", &[("app", "ratings")]);
    let reviews = group("bookinfo", "reviews", &[("app", "reviews")]);
    let legacy = group("bookinfo", "legacy", &[("app", "ratings"), ("legacy", "yes")]);
    let other_ns = group("other", "ratings", &[("app", "ratings")]);

    struct Case {
        name: &'static str,
        policies: Vec<&'static str>,
        group: WorkloadGroup,
        identity: Identity,
        allowed_by: Option<(&'static str, usize)>,
    }
    let cases = vec![
        Case {
            name: "listed subject joins a selected group",
            policies: vec![ALLOW_PROD],
            group: ratings.clone(),
            identity: jwt_identity("vm-1", json!({})),
            allowed_by: Some(("allow-prod", 1)),
        },
        Case {
            name: "unlisted subject is denied",
            policies: vec![ALLOW_PROD],
            group: ratings.clone(),
            identity: jwt_identity("vm-7", json!({})),
            allowed_by: None,
        },
        Case {
            name: "group not selected by the rule",
            policies: vec![ALLOW_PROD],
            group: reviews.clone(),
            identity: jwt_identity("vm-1", json!({})),
            allowed_by: None,
        },
        Case {
            name: "claims: nested path, array contains, number and bool as text",
            policies: vec![ALLOW_CLAIMS],
            group: reviews.clone(),
            identity: jwt_identity("anyone", full_claims()),
            allowed_by: Some(("allow-claims", 1)),
        },
        Case {
            name: "claims: one value wrong",
            policies: vec![ALLOW_CLAIMS],
            group: reviews.clone(),
            identity: jwt_identity(
                "anyone",
                json!({"google": {"project_id": "dev-1"}, "groups": ["vm-admins"], "tier": 3, "trusted": true}),
            ),
            allowed_by: None,
        },
        Case {
            name: "claims: array without the value",
            policies: vec![ALLOW_CLAIMS],
            group: reviews.clone(),
            identity: jwt_identity(
                "anyone",
                json!({"google": {"project_id": "prod-1"}, "groups": ["devs"], "tier": 3, "trusted": true}),
            ),
            allowed_by: None,
        },
        Case {
            name: "matchExpressions: DoesNotExist excludes labelled group",
            policies: vec![ALLOW_CLAIMS],
            group: legacy.clone(),
            identity: jwt_identity("anyone", full_claims()),
            allowed_by: None,
        },
        Case {
            name: "empty selector selects every group; any join token",
            policies: vec![ALLOW_TOKENS],
            group: legacy.clone(),
            identity: token_identity("zzzzzzzzzz", "bookinfo", "legacy"),
            allowed_by: Some(("allow-tokens", 1)),
        },
        Case {
            name: "join token for another group never matches",
            policies: vec![ALLOW_TOKENS],
            group: ratings.clone(),
            identity: token_identity("zzzzzzzzzz", "bookinfo", "legacy"),
            allowed_by: None,
        },
        Case {
            name: "listed token id",
            policies: vec![ALLOW_LISTED_TOKEN],
            group: ratings.clone(),
            identity: token_identity("abcdefghij", "bookinfo", "ratings"),
            allowed_by: Some(("listed-token", 1)),
        },
        Case {
            name: "unlisted token id",
            policies: vec![ALLOW_LISTED_TOKEN],
            group: ratings.clone(),
            identity: token_identity("zzzzzzzzzz", "bookinfo", "ratings"),
            allowed_by: None,
        },
        Case {
            name: "jwt matcher does not match a join token",
            policies: vec![ALLOW_PROD],
            group: ratings.clone(),
            identity: token_identity("abcdefghij", "bookinfo", "ratings"),
            allowed_by: None,
        },
        Case {
            name: "policy in another namespace is ignored",
            policies: vec![OTHER_NS_ALLOW_ALL],
            group: ratings.clone(),
            identity: jwt_identity("vm-1", json!({})),
            allowed_by: None,
        },
        Case {
            name: "policy authorises only its own namespace's groups",
            policies: vec![ALLOW_PROD, ALLOW_TOKENS],
            group: other_ns.clone(),
            identity: token_identity("abcdefghij", "other", "ratings"),
            allowed_by: None,
        },
        Case {
            name: "invalid policy never allows",
            policies: vec![INVALID_ALLOW_ALL],
            group: ratings.clone(),
            identity: jwt_identity("vm-1", json!({})),
            allowed_by: None,
        },
        Case {
            name: "second policy allows when the first does not",
            policies: vec![ALLOW_PROD, ALLOW_TOKENS],
            group: ratings.clone(),
            identity: token_identity("abcdefghij", "bookinfo", "ratings"),
            allowed_by: Some(("allow-tokens", 1)),
        },
        Case {
            name: "no policies: deny by default",
            policies: vec![],
            group: ratings.clone(),
            identity: jwt_identity("vm-1", json!({})),
            allowed_by: None,
        },
    ];
    for case in cases {
        let policies: Vec<_> = case.policies.iter().map(|y| policy(y)).collect();
        let decision = evaluate(&policies, &case.group, &case.identity);
        let got = match &decision {
            Decision::Allowed { policy, rule } => Some((policy.as_str(), *rule)),
            Decision::Denied { .. } => None,
        };
        assert_eq!(got, case.allowed_by, "{}: {decision}", case.name);
    }
}

#[test]
fn denial_is_one_line_naming_group_identity_and_reasons() {
    let policies = vec![
        policy(ALLOW_PROD),
        policy(ALLOW_CLAIMS),
        policy(OTHER_NS_ALLOW_ALL),
    ];
    let g = group("bookinfo", "ratings", &[("app", "ratings")]);
    let decision = evaluate(&policies, &g, &jwt_identity("vm-7", json!({"groups": ["devs"]})));
    assert_eq!(
        decision.to_string(),
        "no OnboardingPolicy in namespace bookinfo allows jwt subject \"vm-7\" (issuer https://idp.example) \
         to join WorkloadGroup ratings; 2 policies checked: allow-prod rule 1: subject \"vm-7\" not in [vm-1, vm-2]; \
         allow-claims rule 1: claim \"google.project_id\" is missing"
    );
    assert!(!decision.to_string().contains('\n'));
    let Decision::Denied { outcomes, .. } = decision else {
        panic!("expected a denial");
    };
    assert_eq!(
        outcomes[2].verdict,
        Verdict::OtherNamespace {
            namespace: "other".into()
        }
    );
}

#[test]
fn denial_without_policies_says_to_create_one() {
    let g = group("bookinfo", "ratings", &[]);
    let decision = evaluate(
        &[policy(OTHER_NS_ALLOW_ALL)],
        &g,
        &token_identity("abcdefghij", "bookinfo", "ratings"),
    );
    assert_eq!(
        decision.to_string(),
        "no OnboardingPolicy in namespace bookinfo allows join token \"abcdefghij\" (for WorkloadGroup bookinfo/ratings) \
         to join WorkloadGroup ratings; there is no OnboardingPolicy in namespace bookinfo: create one that allows it"
    );
}

#[test]
fn explain_lists_every_policy_and_rule() {
    let policies = vec![
        policy(ALLOW_PROD),
        policy(ALLOW_TOKENS),
        policy(OTHER_NS_ALLOW_ALL),
        policy(INVALID_ALLOW_ALL),
    ];
    let g = group("bookinfo", "ratings", &[("app", "ratings")]);
    let text = explain(
        &policies,
        &g,
        &token_identity("abcdefghij", "bookinfo", "ratings"),
    );
    for line in [
        "WorkloadGroup bookinfo/ratings (labels: app=ratings)",
        "identity: join token \"abcdefghij\" (for WorkloadGroup bookinfo/ratings)",
        "policy bookinfo/allow-prod:\n  rule 1: no match: wants a jwt from https://idp.example (got a join token)",
        "policy bookinfo/allow-tokens:\n  rule 1: matched",
        "policy other/sneaky: ignored: policy in namespace other cannot authorise groups in bookinfo",
        "policy bookinfo/broken: invalid, allows nothing:\n  - spec.allow[0].workloads[0]: set exactly one of jwt, joinToken, aws, gcp or azure",
        "ALLOWED: allowed by OnboardingPolicy allow-tokens rule 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn explain_names_unselected_groups() {
    let g = group("bookinfo", "reviews", &[("app", "reviews")]);
    let text = explain(&[policy(ALLOW_PROD)], &g, &jwt_identity("vm-1", json!({})));
    assert!(
        text.contains("rule 1: no match: onboardTo does not select WorkloadGroup reviews (labels: app=reviews; selectors: app=ratings)"),
        "{text}"
    );
    assert!(text.contains("DENIED: no OnboardingPolicy"), "{text}");
}

#[test]
fn validation_table() {
    let cases: &[(&str, &[&str])] = &[
        (ALLOW_PROD, &[]),
        (ALLOW_CLAIMS, &[]),
        (
            INVALID_ALLOW_ALL,
            &["spec.allow[0].workloads[0]: set exactly one of jwt, joinToken, aws, gcp or azure"],
        ),
        (
            "metadata: {name: x}\nspec: {allow: [{workloads: [{}], onboardTo: []}]}",
            &[
                "spec.allow[0].onboardTo is empty: list at least one workloadGroupSelector ({} selects every group)",
                "spec.allow[0].workloads[0]: set exactly one of jwt, joinToken, aws, gcp or azure",
            ],
        ),
        (
            "metadata: {name: x}\nspec: {allow: [{workloads: [], onboardTo: [{}]}]}",
            &["spec.allow[0].workloads is empty: list at least one workload matcher"],
        ),
        (
            "metadata: {name: x}\nspec: {allow: [{workloads: [{jwt: {issuer: '', claims: [{name: g, values: []}]}}], onboardTo: [{}]}]}",
            &[
                "spec.allow[0].workloads[0].jwt.issuer is required: set it to the issuer (iss) of the tokens",
                "spec.allow[0].workloads[0].jwt.claims[0] (g): values is empty: list the accepted values",
            ],
        ),
        (
            "metadata: {name: x}\nspec: {allow: [{workloads: [{joinToken: {}}], onboardTo: [{workloadGroupSelector: {matchExpressions: [{key: a, operator: In}]}}]}]}",
            &[
                "spec.allow[0].onboardTo[0].workloadGroupSelector: matchExpressions key \"a\": operator In needs values",
            ],
        ),
        (
            "metadata: {name: x}\nspec: {allow: []}",
            &["spec.allow is empty: the policy allows nothing; add a rule"],
        ),
    ];
    for (yaml, want) in cases {
        let got = validate(&policy(yaml)).err().unwrap_or_default();
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(got, want, "{yaml}");
    }
}
