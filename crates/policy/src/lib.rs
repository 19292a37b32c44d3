//! OnboardingPolicy evaluation: which verified identities may join which WorkloadGroups.
//!
//! Deny by default: an identity may join a group only if an `OnboardingPolicy` *in the
//! group's namespace* has an allow rule with a workload matcher that matches the identity
//! and an `onboardTo` selector that selects the group. Policies from other namespaces never
//! count, and an invalid policy never allows anything.
//!
//! [`evaluate`] gives the [`Decision`]; a denial's `Display` is the one line the agent and
//! the endpoint log. [`explain`] gives the same answer with every policy's and rule's reason,
//! for `gangplank policy explain`.

use std::collections::BTreeMap;
use std::fmt;

use gangplank_api::istio::WorkloadGroup;
use gangplank_api::meta::{LabelSelector, selector_problem, selects};
use gangplank_api::policy::{ClaimMatcher, JwtMatcher, OnboardingPolicy, WorkloadMatcher};
use gangplank_identity::{Facts, Identity};
use serde_json::Value;

mod cloud;

/// Checks that a policy is well-formed; lists every problem with its field path.
pub fn validate(policy: &OnboardingPolicy) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    if policy.spec.allow.is_empty() {
        problems.push("spec.allow is empty: the policy allows nothing; add a rule".into());
    }
    for (r, rule) in policy.spec.allow.iter().enumerate() {
        let at = format!("spec.allow[{r}]");
        if rule.workloads.is_empty() {
            problems.push(format!(
                "{at}.workloads is empty: list at least one workload matcher"
            ));
        }
        if rule.onboard_to.is_empty() {
            problems.push(format!(
                "{at}.onboardTo is empty: list at least one workloadGroupSelector ({{}} selects every group)"
            ));
        }
        for (w, matcher) in rule.workloads.iter().enumerate() {
            let at = format!("{at}.workloads[{w}]");
            let set = [
                matcher.jwt.is_some(),
                matcher.join_token.is_some(),
                matcher.aws.is_some(),
                matcher.gcp.is_some(),
                matcher.azure.is_some(),
            ];
            if set.iter().filter(|s| **s).count() != 1 {
                problems.push(format!(
                    "{at}: set exactly one of jwt, joinToken, aws, gcp or azure"
                ));
                continue;
            }
            if let Some(jwt) = &matcher.jwt {
                validate_jwt(jwt, &at, &mut problems);
            }
            cloud::validate(matcher, &at, &mut problems);
        }
        for (o, to) in rule.onboard_to.iter().enumerate() {
            if let Some(p) = selector_problem(&to.workload_group_selector) {
                problems.push(format!("{at}.onboardTo[{o}].workloadGroupSelector: {p}"));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn validate_jwt(jwt: &JwtMatcher, at: &str, problems: &mut Vec<String>) {
    if jwt.issuer.trim().is_empty() {
        problems.push(format!(
            "{at}.jwt.issuer is required: set it to the issuer (iss) of the tokens"
        ));
    }
    for (c, claim) in jwt.claims.iter().enumerate() {
        if claim.name.trim().is_empty() {
            problems.push(format!("{at}.jwt.claims[{c}].name is required"));
        }
        if claim.values.is_empty() {
            problems.push(format!(
                "{at}.jwt.claims[{c}] ({}): values is empty: list the accepted values",
                claim.name
            ));
        }
    }
}

/// What one rule said about the request: `Ok` if it allows it, else why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleOutcome {
    /// 1-based rule number, as people count rules in `spec.allow`.
    pub rule: usize,
    /// `Ok(())` if the rule allows the request, otherwise the reason it does not.
    pub result: Result<(), String>,
}

/// What one policy said about the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The policy is in another namespace and cannot authorise this group.
    OtherNamespace {
        /// The policy's namespace.
        namespace: String,
    },
    /// The policy is invalid and allows nothing.
    Invalid(Vec<String>),
    /// Each rule's outcome.
    Rules(Vec<RuleOutcome>),
}

/// One policy's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyOutcome {
    /// The policy's name.
    pub policy: String,
    /// What it said.
    pub verdict: Verdict,
}

/// Whether an identity may join a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A rule allows it.
    Allowed {
        /// The allowing policy's name.
        policy: String,
        /// Its 1-based rule number.
        rule: usize,
    },
    /// No rule allows it.
    Denied {
        /// The group's namespace.
        namespace: String,
        /// The group's name.
        group: String,
        /// The identity, as a person reads it.
        identity: String,
        /// Every policy's outcome (including ignored ones).
        outcomes: Vec<PolicyOutcome>,
    },
}

impl Decision {
    /// Whether the identity may join.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed { .. })
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Allowed { policy, rule } => {
                write!(f, "allowed by OnboardingPolicy {policy} rule {rule}")
            }
            Decision::Denied {
                namespace,
                group,
                identity,
                outcomes,
            } => {
                write!(
                    f,
                    "no OnboardingPolicy in namespace {namespace} allows {identity} to join WorkloadGroup {group}"
                )?;
                let counted: Vec<&PolicyOutcome> = outcomes
                    .iter()
                    .filter(|o| !matches!(o.verdict, Verdict::OtherNamespace { .. }))
                    .collect();
                if counted.is_empty() {
                    return write!(
                        f,
                        "; there is no OnboardingPolicy in namespace {namespace}: create one that allows it"
                    );
                }
                let plural = if counted.len() == 1 { "policy" } else { "policies" };
                write!(f, "; {} {plural} checked", counted.len())?;
                let mut sep = ": ";
                for o in counted {
                    match &o.verdict {
                        Verdict::Invalid(problems) => {
                            write!(f, "{sep}{} is invalid ({})", o.policy, problems.join(", "))?;
                            sep = "; ";
                        }
                        Verdict::Rules(rules) => {
                            for r in rules {
                                if let Err(why) = &r.result {
                                    write!(f, "{sep}{} rule {}: {why}", o.policy, r.rule)?;
                                    sep = "; ";
                                }
                            }
                        }
                        Verdict::OtherNamespace { .. } => {}
                    }
                }
                Ok(())
            }
        }
    }
}

/// Decides whether `identity` may join `group` under `policies`. Only policies in the
/// group's namespace count; invalid policies never allow.
pub fn evaluate(policies: &[OnboardingPolicy], group: &WorkloadGroup, identity: &Identity) -> Decision {
    let outcomes = assess(policies, group, identity);
    for o in &outcomes {
        if let Verdict::Rules(rules) = &o.verdict
            && let Some(r) = rules.iter().find(|r| r.result.is_ok())
        {
            return Decision::Allowed {
                policy: o.policy.clone(),
                rule: r.rule,
            };
        }
    }
    Decision::Denied {
        namespace: namespace_of(group).to_string(),
        group: group.metadata.name.clone().unwrap_or_default(),
        identity: identity.to_string(),
        outcomes,
    }
}

/// A multi-line explanation: the group, the identity, each policy and rule (matched or why
/// not), and the decision.
pub fn explain(policies: &[OnboardingPolicy], group: &WorkloadGroup, identity: &Identity) -> String {
    use std::fmt::Write;
    let ns = namespace_of(group);
    let name = group.metadata.name.as_deref().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "WorkloadGroup {ns}/{name} (labels: {})",
        show_labels(group_labels(group))
    );
    let _ = writeln!(out, "identity: {identity}");
    if let Facts::Jwt(jwt) = &identity.facts
        && let Some(claims) = jwt.claims.as_object()
    {
        let names: Vec<&str> = claims.keys().map(String::as_str).collect();
        let _ = writeln!(out, "  claims: {}", names.join(", "));
    }
    if let Some(facts) = cloud::facts_line(identity) {
        let _ = writeln!(out, "  facts: {facts}");
    }
    let outcomes = assess(policies, group, identity);
    if outcomes.is_empty() {
        let _ = writeln!(out, "no OnboardingPolicy given");
    }
    for o in &outcomes {
        match &o.verdict {
            Verdict::OtherNamespace { namespace } => {
                let _ = writeln!(
                    out,
                    "policy {namespace}/{}: ignored: policy in namespace {namespace} cannot authorise groups in {ns}",
                    o.policy
                );
            }
            Verdict::Invalid(problems) => {
                let _ = writeln!(out, "policy {ns}/{}: invalid, allows nothing:", o.policy);
                for p in problems {
                    let _ = writeln!(out, "  - {p}");
                }
            }
            Verdict::Rules(rules) => {
                let _ = writeln!(out, "policy {ns}/{}:", o.policy);
                for r in rules {
                    match &r.result {
                        Ok(()) => {
                            let _ = writeln!(out, "  rule {}: matched", r.rule);
                        }
                        Err(why) => {
                            let _ = writeln!(out, "  rule {}: no match: {why}", r.rule);
                        }
                    }
                }
            }
        }
    }
    let decision = evaluate(policies, group, identity);
    let verdict = if decision.is_allowed() {
        "ALLOWED"
    } else {
        "DENIED"
    };
    let _ = writeln!(out, "{verdict}: {decision}");
    out
}

fn namespace_of(group: &WorkloadGroup) -> &str {
    group.metadata.namespace.as_deref().unwrap_or_default()
}

fn group_labels(group: &WorkloadGroup) -> &BTreeMap<String, String> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    group.metadata.labels.as_ref().unwrap_or(&EMPTY)
}

fn show_labels(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "none".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn assess(policies: &[OnboardingPolicy], group: &WorkloadGroup, identity: &Identity) -> Vec<PolicyOutcome> {
    let ns = namespace_of(group);
    policies
        .iter()
        .map(|p| {
            let policy = p.metadata.name.clone().unwrap_or_default();
            let pns = p.metadata.namespace.as_deref().unwrap_or_default();
            let verdict = if pns != ns {
                Verdict::OtherNamespace {
                    namespace: pns.to_string(),
                }
            } else if let Err(problems) = validate(p) {
                Verdict::Invalid(problems)
            } else {
                Verdict::Rules(
                    p.spec
                        .allow
                        .iter()
                        .enumerate()
                        .map(|(i, rule)| RuleOutcome {
                            rule: i + 1,
                            result: rule_result(&rule.workloads, &rule.onboard_to, group, identity),
                        })
                        .collect(),
                )
            };
            PolicyOutcome { policy, verdict }
        })
        .collect()
}

fn rule_result(
    workloads: &[WorkloadMatcher],
    onboard_to: &[gangplank_api::policy::OnboardTo],
    group: &WorkloadGroup,
    identity: &Identity,
) -> Result<(), String> {
    let labels = group_labels(group);
    let selected = onboard_to
        .iter()
        .any(|o| selects(&o.workload_group_selector, labels));
    let reasons: Vec<String> = workloads
        .iter()
        .map(|m| matcher_result(m, group, identity))
        .filter_map(Result::err)
        .collect();
    let identity_matched = reasons.len() < workloads.len();
    match (identity_matched, selected) {
        (true, true) => Ok(()),
        (true, false) => Err(format!(
            "onboardTo does not select WorkloadGroup {} (labels: {}; selectors: {})",
            group.metadata.name.as_deref().unwrap_or_default(),
            show_labels(labels),
            onboard_to
                .iter()
                .map(|o| show_selector(&o.workload_group_selector))
                .collect::<Vec<_>>()
                .join(" | ")
        )),
        (false, _) => Err(reasons.join(", or ")),
    }
}

fn show_selector(s: &LabelSelector) -> String {
    let mut parts: Vec<String> = s
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in s.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default().join(", ");
        parts.push(match e.operator.as_str() {
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            op => format!("{} {op} ({values})", e.key),
        });
    }
    if parts.is_empty() {
        "{} (all)".into()
    } else {
        parts.join(",")
    }
}

fn matcher_result(m: &WorkloadMatcher, group: &WorkloadGroup, identity: &Identity) -> Result<(), String> {
    if m.aws.is_some() || m.gcp.is_some() || m.azure.is_some() {
        return cloud::matcher_result(m, identity, identity.name_kind_long());
    }
    match (&m.jwt, &m.join_token, &identity.facts) {
        (Some(jwt), None, Facts::Jwt(facts)) => {
            if facts.issuer != jwt.issuer {
                return Err(format!("issuer {} is not {}", facts.issuer, jwt.issuer));
            }
            if !jwt.subjects.is_empty() && !jwt.subjects.contains(&facts.subject) {
                return Err(format!(
                    "subject {:?} not in [{}]",
                    facts.subject,
                    jwt.subjects.join(", ")
                ));
            }
            jwt.claims.iter().try_for_each(|c| claim_result(c, &facts.claims))
        }
        (Some(jwt), None, _) => Err(format!(
            "wants a jwt from {} (got a {})",
            jwt.issuer,
            identity.name_kind_long()
        )),
        (None, Some(tm), Facts::JoinToken(t)) => {
            let ns = namespace_of(group);
            let name = group.metadata.name.as_deref().unwrap_or_default();
            if t.namespace != ns || t.workload_group != name {
                return Err(format!(
                    "join token {:?} was created for WorkloadGroup {}/{}, not {ns}/{name}",
                    t.id, t.namespace, t.workload_group
                ));
            }
            if !tm.ids.is_empty() && !tm.ids.contains(&t.id) {
                return Err(format!("join token {:?} not in [{}]", t.id, tm.ids.join(", ")));
            }
            Ok(())
        }
        (None, Some(_), _) => Err(format!(
            "wants a join token (got a {})",
            identity.name_kind_long()
        )),
        _ => Err("matcher must set exactly one of jwt or joinToken".into()),
    }
}

trait KindName {
    fn name_kind_long(&self) -> &'static str;
}

impl KindName for Identity {
    fn name_kind_long(&self) -> &'static str {
        match self.facts {
            Facts::JoinToken(_) => "join token",
            Facts::Jwt(_) => "jwt",
            Facts::Aws(_) => "VM on AWS EC2",
            Facts::Gcp(_) => "VM on GCP GCE",
            Facts::Azure(_) => "VM on Azure",
        }
    }
}

/// Looks up a claim: the literal name first (claims such as `https://x/groups` have dots),
/// then a dotted path into nested objects.
fn lookup<'a>(claims: &'a Value, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    name.split('.').try_fold(claims, |v, part| v.get(part))
}

fn claim_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(_) | Value::Bool(_) => Some(v.to_string()),
        _ => None,
    }
}

fn claim_result(c: &ClaimMatcher, claims: &Value) -> Result<(), String> {
    let accepted = || c.values.join(", ");
    let Some(value) = lookup(claims, &c.name) else {
        return Err(format!("claim {:?} is missing", c.name));
    };
    let ok = match value {
        Value::Array(items) => items.iter().filter_map(claim_text).any(|t| c.values.contains(&t)),
        other => claim_text(other).is_some_and(|t| c.values.contains(&t)),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "claim {:?} = {} not in [{}]",
            c.name,
            short_json(value),
            accepted()
        ))
    }
}

fn short_json(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}…", s.chars().take(80).collect::<String>())
    } else {
        s
    }
}
