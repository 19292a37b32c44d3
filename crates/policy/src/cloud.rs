//! Matchers for the cloud platform identities (AWS EC2, GCP GCE, Azure VMs).

use gangplank_api::policy::{AwsMatcher, WorkloadMatcher};
use gangplank_identity::{Facts, Identity};

const PARTITIONS: &[&str] = &["aws", "aws-cn", "aws-us-gov", "aws-iso", "aws-iso-b"];

/// Adds the problems of `m`'s cloud matcher (if it is one) to `problems`.
pub(crate) fn validate(m: &WorkloadMatcher, at: &str, problems: &mut Vec<String>) {
    if let Some(aws) = &m.aws {
        validate_aws(aws, &format!("{at}.aws"), problems);
    }
    if let Some(gcp) = &m.gcp {
        let at = format!("{at}.gcp");
        if gcp.projects.is_empty() {
            problems.push(format!(
                "{at}.projects is required: list the GCP project ids whose instances may join"
            ));
        }
        empties(&at, "projects", &gcp.projects, problems);
        empties(&at, "zones", &gcp.zones, problems);
        empties(&at, "serviceAccounts", &gcp.service_accounts, problems);
        empties(&at, "instanceNames", &gcp.instance_names, problems);
    }
    if let Some(azure) = &m.azure {
        let at = format!("{at}.azure");
        if azure.subscriptions.is_empty() {
            problems.push(format!(
                "{at}.subscriptions is required: list the Azure subscription ids whose VMs may join"
            ));
        }
        empties(&at, "subscriptions", &azure.subscriptions, problems);
        empties(&at, "vmIds", &azure.vm_ids, problems);
    }
}

fn validate_aws(aws: &AwsMatcher, at: &str, problems: &mut Vec<String>) {
    if aws.accounts.is_empty() {
        problems.push(format!(
            "{at}.accounts is required: list the 12-digit AWS account ids whose instances may join"
        ));
    }
    for (i, account) in aws.accounts.iter().enumerate() {
        if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            problems.push(format!(
                "{at}.accounts[{i}] {account:?} is not an AWS account id: use the 12 digits, with leading zeros"
            ));
        }
    }
    for (i, p) in aws.partitions.iter().enumerate() {
        if !PARTITIONS.contains(&p.as_str()) {
            problems.push(format!(
                "{at}.partitions[{i}] {p:?} is not an AWS partition: use one of {}",
                PARTITIONS.join(", ")
            ));
        }
    }
    empties(at, "regions", &aws.regions, problems);
    empties(at, "zones", &aws.zones, problems);
    empties(at, "instanceIds", &aws.instance_ids, problems);
    for (i, role) in aws.iam_roles.iter().enumerate() {
        if !gangplank_identity::aws::role::is_role_name(role) {
            problems.push(format!(
                "{at}.iamRoles[{i}] {role:?} is not an IAM role name: give the role's name (1-64 of A-Za-z0-9+=,.@_-), without its path or ARN"
            ));
        }
    }
}

fn empties(at: &str, field: &str, values: &[String], problems: &mut Vec<String>) {
    for (i, v) in values.iter().enumerate() {
        if v.trim().is_empty() {
            problems.push(format!("{at}.{field}[{i}] is empty: remove it or give a value"));
        }
    }
}

/// `Ok` if `value` is allowed by `allowed` (empty allows any), else the reason naming the fact.
fn one_of(fact: &str, value: &str, allowed: &[String]) -> Result<(), String> {
    if allowed.is_empty() || allowed.iter().any(|a| a == value) {
        Ok(())
    } else {
        Err(format!("{fact} {value} not in [{}]", allowed.join(", ")))
    }
}

/// Like [`one_of`] for a fact the identity may lack: a non-empty list never allows a
/// missing value.
fn one_of_verified(fact: &str, value: Option<&str>, allowed: &[String]) -> Result<(), String> {
    match value {
        Some(v) => one_of(fact, v, allowed),
        None if allowed.is_empty() => Ok(()),
        None => Err(format!("{fact} (none verified) not in [{}]", allowed.join(", "))),
    }
}

/// Whether a cloud matcher matches `identity`; the error names the unmatched facts.
pub(crate) fn matcher_result(m: &WorkloadMatcher, identity: &Identity, got: &str) -> Result<(), String> {
    match (&m.aws, &m.gcp, &m.azure, &identity.facts) {
        (Some(w), None, None, Facts::Aws(f)) => {
            let fails: Vec<String> = [
                one_of("aws account", &f.account, &w.accounts),
                one_of("aws partition", &f.partition, &w.partitions),
                one_of("aws region", &f.region, &w.regions),
                one_of("aws zone", &f.zone, &w.zones),
                one_of("aws instance id", &f.instance_id, &w.instance_ids),
                one_of_verified("aws iam role", f.iam_role.as_deref(), &w.iam_roles),
            ]
            .into_iter()
            .filter_map(Result::err)
            .collect();
            all(fails)
        }
        (None, Some(w), None, Facts::Gcp(f)) => all([
            one_of("gcp project", &f.project_id, &w.projects),
            one_of("gcp zone", &f.zone, &w.zones),
            one_of("gcp service account", &f.service_account, &w.service_accounts),
            one_of("gcp instance name", &f.instance_name, &w.instance_names),
        ]
        .into_iter()
        .filter_map(Result::err)
        .collect()),
        (None, None, Some(w), Facts::Azure(f)) => all([
            one_of("azure subscription", &f.subscription_id, &w.subscriptions),
            one_of("azure vm id", &f.vm_id, &w.vm_ids),
        ]
        .into_iter()
        .filter_map(Result::err)
        .collect()),
        (Some(w), None, None, _) => Err(format!(
            "wants an aws instance of account {} (got a {got})",
            w.accounts.join(", ")
        )),
        (None, Some(w), None, _) => Err(format!(
            "wants a gcp instance of project {} (got a {got})",
            w.projects.join(", ")
        )),
        (None, None, Some(w), _) => Err(format!(
            "wants an azure vm of subscription {} (got a {got})",
            w.subscriptions.join(", ")
        )),
        _ => Err("matcher must set exactly one of jwt, joinToken, aws, gcp or azure".into()),
    }
}

fn all(fails: Vec<String>) -> Result<(), String> {
    if fails.is_empty() {
        Ok(())
    } else {
        Err(fails.join(" and "))
    }
}

/// The identity's platform facts on one line, for `explain`.
pub(crate) fn facts_line(identity: &Identity) -> Option<String> {
    match &identity.facts {
        Facts::Aws(f) => Some(format!(
            "partition={} account={} region={} zone={} instanceId={} imageId={} instanceType={} privateIp={} iamRole={}",
            f.partition,
            f.account,
            f.region,
            f.zone,
            f.instance_id,
            f.image_id,
            f.instance_type,
            f.private_ip,
            f.iam_role.as_deref().unwrap_or("(none)")
        )),
        Facts::Gcp(f) => Some(format!(
            "project={} projectNumber={} zone={} instanceName={} instanceId={} serviceAccount={}",
            f.project_id, f.project_number, f.zone, f.instance_name, f.instance_id, f.service_account
        )),
        Facts::Azure(f) => Some(format!(
            "subscription={} vmId={} sku={}",
            f.subscription_id, f.vm_id, f.sku
        )),
        Facts::JoinToken(_) | Facts::Jwt(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gangplank_api::policy::{AzureMatcher, GcpMatcher};

    fn aws_identity(account: &str, zone: &str) -> Identity {
        Identity {
            facts: Facts::Aws(gangplank_identity::aws::Facts {
                partition: "aws".into(),
                account: account.into(),
                region: "us-east-1".into(),
                zone: zone.into(),
                instance_id: "i-0abc".into(),
                image_id: "ami-1".into(),
                instance_type: "t3.micro".into(),
                private_ip: "10.0.0.7".parse().unwrap(),
                pending_time: "2026-01-01T00:00:00Z".into(),
                agent_public_key: String::new(),
                iam_role: Some("ratings".into()),
            }),
            address: None,
        }
    }

    fn aws(accounts: &[&str], zones: &[&str]) -> WorkloadMatcher {
        WorkloadMatcher {
            aws: Some(AwsMatcher {
                accounts: accounts.iter().map(|s| s.to_string()).collect(),
                zones: zones.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn aws_matches_listed_facts_and_names_the_unmatched_ones() {
        let id = aws_identity("123456789012", "us-east-1a");
        assert_eq!(
            matcher_result(&aws(&["123456789012"], &[]), &id, "VM on AWS EC2"),
            Ok(())
        );
        let err = matcher_result(&aws(&["111122223333"], &["us-east-1b"]), &id, "VM on AWS EC2").unwrap_err();
        assert_eq!(
            err,
            "aws account 123456789012 not in [111122223333] and aws zone us-east-1a not in [us-east-1b]"
        );
    }

    fn with_roles(mut m: WorkloadMatcher, roles: &[&str]) -> WorkloadMatcher {
        if let Some(aws) = m.aws.as_mut() {
            aws.iam_roles = roles.iter().map(|s| s.to_string()).collect();
        }
        m
    }

    #[test]
    fn aws_iam_roles_match_only_a_verified_role() {
        let id = aws_identity("123456789012", "us-east-1a");
        let m = with_roles(aws(&["123456789012"], &[]), &["reviews", "ratings"]);
        assert_eq!(matcher_result(&m, &id, "VM on AWS EC2"), Ok(()));
        let other = with_roles(aws(&["123456789012"], &[]), &["reviews"]);
        assert_eq!(
            matcher_result(&other, &id, "VM on AWS EC2"),
            Err("aws iam role ratings not in [reviews]".into())
        );

        // Without a verified role (no instance profile, or roles not verified), a matcher
        // listing roles never matches, and one listing none still does.
        let mut no_role = id.clone();
        if let Facts::Aws(f) = &mut no_role.facts {
            f.iam_role = None;
        }
        assert_eq!(
            matcher_result(&m, &no_role, "VM on AWS EC2"),
            Err("aws iam role (none verified) not in [reviews, ratings]".into())
        );
        assert_eq!(
            matcher_result(&aws(&["123456789012"], &[]), &no_role, "VM on AWS EC2"),
            Ok(())
        );
    }

    #[test]
    fn aws_iam_roles_are_role_names() {
        let mut problems = Vec::new();
        let m = with_roles(
            aws(&["123456789012"], &[]),
            &[
                "ratings",
                "arn:aws:iam::123456789012:role/ratings",
                "team/ratings",
                "",
            ],
        );
        validate(&m, "w", &mut problems);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("w.aws.iamRoles[1]"), "{problems:?}");
        assert!(problems[1].starts_with("w.aws.iamRoles[2]"), "{problems:?}");
        assert!(problems[2].contains("without its path or ARN"), "{problems:?}");
    }

    #[test]
    fn aws_accounts_are_required_and_twelve_digits() {
        let mut problems = Vec::new();
        validate(&aws(&[], &[]), "w", &mut problems);
        validate(&aws(&["12345"], &[]), "w", &mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("w.aws.accounts is required"));
        assert!(problems[1].contains("not an AWS account id"));
    }

    #[test]
    fn gcp_and_azure_require_their_scope() {
        let mut problems = Vec::new();
        let gcp = WorkloadMatcher {
            gcp: Some(GcpMatcher::default()),
            ..Default::default()
        };
        let azure = WorkloadMatcher {
            azure: Some(AzureMatcher::default()),
            ..Default::default()
        };
        validate(&gcp, "w", &mut problems);
        validate(&azure, "w", &mut problems);
        assert!(problems[0].contains("gcp.projects is required"), "{problems:?}");
        assert!(
            problems[1].contains("azure.subscriptions is required"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_cloud_matcher_refuses_other_kinds() {
        let id = aws_identity("123456789012", "us-east-1a");
        let gcp = WorkloadMatcher {
            gcp: Some(GcpMatcher {
                projects: vec!["p".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            matcher_result(&gcp, &id, "VM on AWS EC2"),
            Err("wants a gcp instance of project p (got a VM on AWS EC2)".into())
        );
    }
}
