//! `deploy/`: every object parses into its Kubernetes type without losing a field, the
//! Deployment is hardened as documented, the endpoint configuration in the ConfigMap is valid,
//! and RBAC grants exactly the calls the code makes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use gangplank_endpoint::config::File;
use gangplank_registry::kube::ApiCall;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// Every YAML document under `deploy/`, with the file it came from, but the operator's
/// install manifest (`deploy/operator.yaml`, generated and checked by the operator's tests).
fn documents() -> Vec<(String, Value)> {
    let mut files = Vec::new();
    for dir in [deploy_dir(), deploy_dir().join("crds")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") && !p.ends_with("deploy/operator.yaml") {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in text.split("\n---") {
            let doc = doc.trim_start_matches("---");
            if doc
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
            {
                continue;
            }
            let v: Value = serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            out.push((f.display().to_string(), v));
        }
    }
    out
}

/// Parses `v` as `T` and checks that nothing was dropped (a misspelt field would be).
fn typed<T: DeserializeOwned + Serialize>(file: &str, v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{file}: {e}"));
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(
        strip_nulls(&back),
        strip_nulls(v),
        "{file}: fields lost parsing {}",
        v["kind"]
    );
    t
}

fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_nulls).collect()),
        // YAML integers that k8s-openapi keeps as integers; quantities stay strings.
        other => other.clone(),
    }
}

struct Objects {
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    configmaps: Vec<ConfigMap>,
    pdbs: Vec<PodDisruptionBudget>,
    cluster_roles: Vec<ClusterRole>,
    roles: Vec<Role>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    role_bindings: Vec<RoleBinding>,
    service_accounts: Vec<ServiceAccount>,
    crds: Vec<CustomResourceDefinition>,
}

fn objects() -> Objects {
    let mut o = Objects {
        deployments: vec![],
        services: vec![],
        configmaps: vec![],
        pdbs: vec![],
        cluster_roles: vec![],
        roles: vec![],
        cluster_role_bindings: vec![],
        role_bindings: vec![],
        service_accounts: vec![],
        crds: vec![],
    };
    for (file, v) in documents() {
        match v["kind"].as_str().unwrap_or_default() {
            "Namespace" => drop(typed::<Namespace>(&file, &v)),
            "Deployment" => o.deployments.push(typed(&file, &v)),
            "Service" => o.services.push(typed(&file, &v)),
            "ConfigMap" => o.configmaps.push(typed(&file, &v)),
            "PodDisruptionBudget" => o.pdbs.push(typed(&file, &v)),
            "ClusterRole" => o.cluster_roles.push(typed(&file, &v)),
            "Role" => o.roles.push(typed(&file, &v)),
            "ClusterRoleBinding" => o.cluster_role_bindings.push(typed(&file, &v)),
            "RoleBinding" => o.role_bindings.push(typed(&file, &v)),
            "ServiceAccount" => o.service_accounts.push(typed(&file, &v)),
            "CustomResourceDefinition" => o.crds.push(typed(&file, &v)),
            other => panic!("{file}: unexpected kind {other:?}"),
        }
    }
    o
}

#[test]
fn deployment_is_hardened_and_probed() {
    let o = objects();
    assert_eq!(o.deployments.len(), 1);
    let d = &o.deployments[0];
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("gangplank-endpoint"));
    assert_eq!(pod.security_context.as_ref().unwrap().run_as_non_root, Some(true));
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert!(
        c.resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .is_some_and(|r| r.contains_key("cpu") && r.contains_key("memory"))
    );
    let port = |name: &str| {
        c.ports
            .as_ref()
            .unwrap()
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .unwrap()
            .container_port
    };
    assert_eq!(port("grpc-onboard"), 15443);
    assert_eq!(port("http-monitoring"), 15014);
    for (probe, path) in [
        (c.readiness_probe.as_ref(), "/readyz"),
        (c.liveness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe.unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(serde_json::to_value(&get.port).unwrap(), "http-monitoring");
    }
    // TLS from a Secret (cert-manager's kubernetes.io/tls layout), config from the ConfigMap.
    let volumes = pod.volumes.as_ref().unwrap();
    let tls = volumes.iter().find(|v| v.name == "tls").unwrap();
    assert_eq!(
        tls.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("gangplank-endpoint-tls")
    );
    let config = volumes.iter().find(|v| v.name == "config").unwrap();
    let cm_name = config.config_map.as_ref().unwrap().name.clone();

    // The configuration is a valid Kubernetes-registry EndpointConfiguration whose files are
    // where the pod mounts them.
    let cm = o
        .configmaps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(cm_name.as_str()))
        .unwrap();
    let text = &cm.data.as_ref().unwrap()["endpoint.yaml"];
    let file: File = serde_saphyr::from_str(text).unwrap();
    let config = gangplank_endpoint::Config::validate(file).unwrap();
    assert!(config.file.registry.kubernetes.is_some());
    assert_eq!(config.file.listen.port(), 15443);
    assert_eq!(config.file.monitoring_listen.port(), 15014);
    let mounts = c.volume_mounts.as_ref().unwrap();
    let mount_of = |name: &str| mounts.iter().find(|m| m.name == name).unwrap().mount_path.clone();
    assert!(
        config
            .file
            .tls
            .cert_file
            .as_ref()
            .unwrap()
            .starts_with(mount_of("tls"))
    );
    assert!(config.file.state_dir.starts_with(mount_of("keys")));

    // Service on 15443 and a disruption budget, both selecting the pods.
    let labels = spec.template.metadata.as_ref().unwrap().labels.clone().unwrap();
    let svc = o.services[0].spec.as_ref().unwrap();
    assert_eq!(svc.ports.as_ref().unwrap()[0].port, 15443);
    assert!(
        svc.selector
            .as_ref()
            .unwrap()
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    );
    let pdb = o.pdbs[0].spec.as_ref().unwrap();
    assert!(
        pdb.selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    );
}

#[test]
fn shipped_crds_are_ours() {
    let o = objects();
    let names: BTreeSet<_> = o.crds.iter().filter_map(|c| c.metadata.name.clone()).collect();
    let mut ours: BTreeSet<_> = gangplank_registry::crds::all()
        .unwrap()
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    // The operator's, generated from its types (crates/operator/tests/crd.rs checks the file).
    ours.insert("onboardingplanes.onboarding.gangplank.dev".to_owned());
    assert_eq!(names, ours);
}

/// Every (group, resource, verb, name) a rule grants; `None` for any name.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String, Option<String>)> {
    let mut out = BTreeSet::new();
    for r in rules {
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    assert!(
                        g != "*" && res != "*" && v != "*",
                        "wildcards are not least privilege: {r:?}"
                    );
                    match &r.resource_names {
                        Some(names) => {
                            for n in names {
                                out.insert((g.clone(), res.clone(), v.clone(), Some(n.clone())));
                            }
                        }
                        None => {
                            out.insert((g.clone(), res.clone(), v.clone(), None));
                        }
                    }
                }
            }
        }
    }
    out
}

fn needed(calls: &[ApiCall]) -> BTreeSet<(String, String, String, Option<String>)> {
    let mut out = BTreeSet::new();
    for c in calls {
        if c.names.is_empty() {
            out.insert((c.group.into(), c.resource.into(), c.verb.into(), None));
        }
        for n in c.names {
            out.insert((
                c.group.into(),
                c.resource.into(),
                c.verb.into(),
                Some((*n).into()),
            ));
        }
    }
    out
}

#[test]
fn rbac_grants_exactly_the_calls_the_code_makes() {
    let o = objects();
    // Leases are granted in the endpoint's namespace only.
    for r in &o.cluster_roles {
        let rules = r.rules.as_deref().unwrap_or_default();
        assert!(
            rules
                .iter()
                .all(|p| !p.api_groups.iter().flatten().any(|g| g == "coordination.k8s.io"))
        );
    }
    let mut granted = BTreeSet::new();
    for r in &o.cluster_roles {
        granted.extend(grants(r.rules.as_deref().unwrap_or_default()));
    }
    for r in &o.roles {
        granted.extend(grants(r.rules.as_deref().unwrap_or_default()));
    }
    let mut calls = gangplank_registry::kube::API_CALLS.to_vec();
    calls.extend_from_slice(gangplank_endpoint::cluster::API_CALLS);
    calls.extend_from_slice(gangplank_endpoint::membership::API_CALLS);
    let needed = needed(&calls);
    let missing: Vec<_> = needed.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&needed).collect();
    assert!(missing.is_empty(), "RBAC lacks calls the code makes: {missing:?}");
    assert!(
        extra.is_empty(),
        "RBAC grants calls the code never makes: {extra:?}"
    );
    // The admin-only call (creating join tokens) is not granted to the endpoint.
    for c in gangplank_registry::kube::ADMIN_CALLS {
        assert!(!granted.contains(&(c.group.into(), c.resource.into(), c.verb.into(), None)));
    }

    // Every binding binds the endpoint's ServiceAccount to a role that exists.
    let sa = &o.service_accounts[0];
    let sa_name = sa.metadata.name.clone().unwrap();
    let sa_ns = sa.metadata.namespace.clone().unwrap();
    for (role_ref, subjects) in o
        .cluster_role_bindings
        .iter()
        .map(|b| (&b.role_ref, &b.subjects))
        .chain(o.role_bindings.iter().map(|b| (&b.role_ref, &b.subjects)))
    {
        let exists = match role_ref.kind.as_str() {
            "ClusterRole" => o
                .cluster_roles
                .iter()
                .any(|r| r.metadata.name.as_deref() == Some(role_ref.name.as_str())),
            "Role" => o
                .roles
                .iter()
                .any(|r| r.metadata.name.as_deref() == Some(role_ref.name.as_str())),
            other => panic!("unexpected roleRef kind {other}"),
        };
        assert!(exists, "binding to missing {} {}", role_ref.kind, role_ref.name);
        let s = &subjects.as_ref().unwrap()[0];
        assert_eq!(
            (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()),
            ("ServiceAccount", sa_name.as_str(), Some(sa_ns.as_str()))
        );
    }
}
