//! `deploy/operator.yaml`: everything `kubectl apply -f` needs to run the operator — its
//! namespace, every Gangplank CRD, its ServiceAccount and RBAC, and its Deployment (two
//! replicas, one leading). `gangplank install operator` and `gangplank-operator manifest`
//! print it; a test keeps the checked-in file equal to [`yaml`] with the defaults.

use serde_json::{Value, json};

/// The operator's monitoring port (`/metrics`, `/healthz`, `/readyz`).
pub const MONITORING_PORT: u16 = 9090;

/// What the manifest is rendered for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The operator's namespace (its Lease; usually the planes' too).
    pub namespace: String,
    /// The operator's image.
    pub image: String,
    /// Operator replicas (one leads, the others stand by).
    pub replicas: i32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: "gangplank-system".into(),
            image: default_image(),
            replicas: 2,
        }
    }
}

/// `gangplank-operator:<this crate's version>`, as `packaging/operator-image` tags it.
pub fn default_image() -> String {
    format!("gangplank-operator:{}", env!("CARGO_PKG_VERSION"))
}

fn labels() -> Value {
    json!({"app.kubernetes.io/name": "gangplank-operator", "app.kubernetes.io/part-of": "gangplank"})
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

/// The operator's cluster-wide rules: the calls it makes, and what the endpoint's Role and
/// ClusterRole grant (the API server lets it write a role only with every permission in it;
/// holding them is narrower than `escalate`, which would let it grant anything).
pub fn cluster_rules() -> Result<Vec<Value>, crate::render::Error> {
    let crud = ["get", "list", "watch", "create", "patch", "update", "delete"];
    let mut rules = vec![
        // The planes: watched, their finalizer added and removed (patch), their status written.
        rule(
            &["onboarding.gangplank.dev"],
            &["onboardingplanes"],
            &["get", "list", "watch", "patch", "update"],
        ),
        rule(
            &["onboarding.gangplank.dev"],
            &["onboardingplanes/status"],
            &["get", "patch", "update"],
        ),
        // Children carry a blocking owner reference to their plane.
        rule(
            &["onboarding.gangplank.dev"],
            &["onboardingplanes/finalizers"],
            &["update"],
        ),
        // Its CRDs, installed and upgraded at start-up (server-side apply), waited for; and
        // whether cert-manager's is installed.
        rule(
            &["apiextensions.k8s.io"],
            &["customresourcedefinitions"],
            &["get", "list", "watch", "create", "patch"],
        ),
        // A plane's children, applied (patch creates), watched, removed with the plane.
        rule(
            &[""],
            &["serviceaccounts", "configmaps", "secrets", "services"],
            &crud,
        ),
        rule(&["apps"], &["deployments"], &crud),
        rule(&["policy"], &["poddisruptionbudgets"], &crud),
        rule(
            &["rbac.authorization.k8s.io"],
            &["roles", "rolebindings", "clusterroles", "clusterrolebindings"],
            &crud,
        ),
        // spec.tls.certManager: a cert-manager Certificate per plane.
        rule(&["cert-manager.io"], &["certificates"], &crud),
    ];
    let (cluster, role) = crate::render::endpoint_rules()?;
    rules.extend(cluster);
    rules.extend(role);
    Ok(rules)
}

/// The manifest's objects, in apply order.
pub fn objects(settings: &Settings) -> Result<Vec<Value>, crate::crds::Error> {
    let rules = cluster_rules().map_err(|e| crate::crds::Error::Render(e.to_string()))?;
    let ns = &settings.namespace;
    let mut out = vec![json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": ns, "labels": {"app.kubernetes.io/part-of": "gangplank"}},
    })];
    for crd in crate::crds::all()? {
        out.push(serde_json::to_value(crd).map_err(|e| crate::crds::Error::Render(e.to_string()))?);
    }
    let meta = |name: &str| json!({"name": name, "namespace": ns, "labels": labels()});
    out.push(json!({
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("gangplank-operator"),
        "automountServiceAccountToken": true,
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "gangplank-operator", "labels": labels()},
        "rules": rules,
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "gangplank-operator", "labels": labels()},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "gangplank-operator"},
        "subjects": [{"kind": "ServiceAccount", "name": "gangplank-operator", "namespace": ns}],
    }));
    // Leader election, in its own namespace only.
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta("gangplank-operator-leader"),
        "rules": [rule(&["coordination.k8s.io"], &["leases"], &["get", "create", "update"])],
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta("gangplank-operator-leader"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "gangplank-operator-leader"},
        "subjects": [{"kind": "ServiceAccount", "name": "gangplank-operator", "namespace": ns}],
    }));
    let field = |path: &str| json!({"valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut pod_name = field("metadata.name");
    pod_name["name"] = json!("POD_NAME");
    let mut pod_ns = field("metadata.namespace");
    pod_ns["name"] = json!("POD_NAMESPACE");
    out.push(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("gangplank-operator"),
        "spec": {
            "replicas": settings.replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": "gangplank-operator"}},
            "template": {
                "metadata": {"labels": labels()},
                "spec": {
                    "serviceAccountName": "gangplank-operator",
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{
                        "name": "operator",
                        "image": settings.image,
                        "imagePullPolicy": "IfNotPresent",
                        "args": ["run"],
                        "env": [pod_name, pod_ns, {"name": "RUST_LOG", "value": "info"}],
                        "ports": [{"name": "http-monitoring", "containerPort": MONITORING_PORT, "protocol": "TCP"}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http-monitoring"}, "periodSeconds": 5},
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http-monitoring"},
                                          "initialDelaySeconds": 5, "periodSeconds": 10},
                        "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                            "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}},
                    }],
                },
            },
        },
    }));
    Ok(out)
}

/// [`objects`] as one multi-document YAML stream, with a header saying what it is.
pub fn yaml(settings: &Settings) -> Result<String, crate::crds::Error> {
    let mut out = String::from(
        "# gangplank-operator: CRDs, RBAC and the operator's Deployment.\n\
         # Generated by `gangplank install operator` (crates/operator/src/manifest.rs); do not edit.\n\
         # kubectl apply -f deploy/operator.yaml\n",
    );
    for (i, o) in objects(settings)?.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        out.push_str(&serde_saphyr::to_string(o).map_err(|e| crate::crds::Error::Render(e.to_string()))?);
    }
    Ok(out)
}
