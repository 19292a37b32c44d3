//! The objects a plane is reconciled into, rendered from its validated spec.
//!
//! The endpoint's pod template, Service, disruption budget, configuration and RBAC rules start
//! from `deploy/endpoint.yaml` and `deploy/rbac.yaml` (compiled in), so the operator's
//! endpoint is hardened and authorised exactly as the hand-applied one, and
//! `crates/endpoint/tests/deploy.rs` checks both; only names, labels, replicas, image,
//! resources, Secrets and the configuration's plane-specific values are the plane's.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::plane::{GROUP, OnboardingPlane, Valid};

const ENDPOINT_YAML: &str = include_str!("../../../deploy/endpoint.yaml");
const RBAC_YAML: &str = include_str!("../../../deploy/rbac.yaml");

/// The key of the endpoint's configuration in its ConfigMap.
pub const CONFIG_KEY: &str = "endpoint.yaml";
/// The pod template annotation whose change rolls the endpoint's pods.
pub const CONFIG_HASH: &str = "onboarding.gangplank.dev/config-hash";
/// Label: the plane's namespace, on cluster-scoped children (which cannot be owned by it).
pub const PLANE_NAMESPACE: &str = "onboarding.gangplank.dev/plane-namespace";
/// Label: the plane's name, on every child.
pub const PLANE_NAME: &str = "onboarding.gangplank.dev/plane";
/// `app.kubernetes.io/managed-by` on every child; the operator watches only these.
pub const MANAGED_BY: &str = "gangplank-operator";
/// The onboarding port.
pub const PORT: u16 = 15443;

/// Why the compiled-in manifests cannot be used (a bug in `deploy/`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A manifest is missing or does not decode.
    #[error("deploy/ manifests: {0}")]
    Manifest(String),
    /// A rendered object does not decode as its Kubernetes type.
    #[error("rendering the {kind}: {source}")]
    Encode {
        /// The kind.
        kind: &'static str,
        /// What failed.
        #[source]
        source: serde_json::Error,
    },
}

/// Every object of a plane, ready for server-side apply.
#[derive(Debug, Clone)]
pub struct Children {
    /// The endpoint's ServiceAccount.
    pub service_account: ServiceAccount,
    /// Leases in the plane's namespace.
    pub role: Role,
    /// Binds [`Children::role`].
    pub role_binding: RoleBinding,
    /// The endpoint's cluster-wide reads and writes.
    pub cluster_role: ClusterRole,
    /// Binds [`Children::cluster_role`].
    pub cluster_role_binding: ClusterRoleBinding,
    /// The endpoint's `EndpointConfiguration`.
    pub config_map: ConfigMap,
    /// The endpoint.
    pub deployment: Deployment,
    /// `:15443` and the monitoring port.
    pub service: Service,
    /// Keeps one endpoint up through voluntary disruptions.
    pub pdb: PodDisruptionBudget,
}

/// The names of a plane's children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// ServiceAccount, ConfigMap, Deployment, Service and PodDisruptionBudget.
    pub endpoint: String,
    /// Role and RoleBinding (Leases).
    pub leases: String,
    /// ClusterRole and ClusterRoleBinding: cluster-wide, so the namespace is in the name.
    pub cluster: String,
    /// The Secret holding the endpoint's signing and nonce keys.
    pub keys: String,
}

impl Names {
    /// The names for plane `name` in `namespace`.
    pub fn of(namespace: &str, name: &str) -> Self {
        Self {
            endpoint: format!("{name}-endpoint"),
            leases: format!("{name}-endpoint-leases"),
            cluster: format!("gangplank-endpoint.{namespace}.{name}"),
            keys: format!("{name}-endpoint-keys"),
        }
    }
}

fn manifests(text: &str) -> Result<Vec<Value>, Error> {
    text.split("\n---")
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|d| serde_saphyr::from_str(d).map_err(|e| Error::Manifest(e.to_string())))
        .collect()
}

fn base(text: &str, kind: &str) -> Result<Value, Error> {
    manifests(text)?
        .into_iter()
        .find(|m| m["kind"] == kind)
        .ok_or_else(|| Error::Manifest(format!("no {kind}")))
}

fn decode<T: serde::de::DeserializeOwned>(kind: &'static str, v: Value) -> Result<T, Error> {
    serde_json::from_value(v).map_err(|source| Error::Encode { kind, source })
}

/// The endpoint's rules, from `deploy/rbac.yaml`: its ClusterRole's and its (Leases) Role's.
pub fn endpoint_rules() -> Result<(Vec<Value>, Vec<Value>), Error> {
    let rules = |kind: &str| -> Result<Vec<Value>, Error> {
        base(RBAC_YAML, kind)?["rules"]
            .as_array()
            .cloned()
            .ok_or_else(|| Error::Manifest(format!("{kind} without rules")))
    };
    Ok((rules("ClusterRole")?, rules("Role")?))
}

/// The labels selecting a plane's endpoint pods.
pub fn selector(plane: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "gangplank-endpoint".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), plane.to_owned()),
    ])
}

/// The labels on every child of a plane.
pub fn labels(namespace: &str, plane: &str) -> Value {
    let mut l = selector(plane);
    l.insert("app.kubernetes.io/part-of".into(), "gangplank".into());
    l.insert("app.kubernetes.io/managed-by".into(), MANAGED_BY.into());
    l.insert(PLANE_NAME.into(), plane.into());
    l.insert(PLANE_NAMESPACE.into(), namespace.into());
    json!(l)
}

/// The owner reference every namespaced child carries (`controller: true`, so deleting the
/// plane deletes it, and `owns()` maps its events back to the plane).
pub fn owner(plane: &OnboardingPlane) -> OwnerReference {
    OwnerReference {
        api_version: format!("{GROUP}/v1alpha1"),
        kind: "OnboardingPlane".into(),
        name: plane.metadata.name.clone().unwrap_or_default(),
        uid: plane.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The endpoint's configuration, as YAML: `deploy/endpoint.yaml`'s, with the plane's values.
pub fn endpoint_config(name: &str, valid: &Valid) -> Result<String, Error> {
    let cm = base(ENDPOINT_YAML, "ConfigMap")?;
    let text = cm["data"][CONFIG_KEY]
        .as_str()
        .ok_or_else(|| Error::Manifest(format!("ConfigMap without {CONFIG_KEY}")))?;
    let mut c: Value = serde_saphyr::from_str(text).map_err(|e| Error::Manifest(e.to_string()))?;
    let s = &valid.spec;
    c["planeId"] = json!(s.plane_id.clone().unwrap_or_else(|| name.to_owned()));
    c["mesh"] = json!({"istioNamespace": s.mesh.istio_namespace, "revision": s.mesh.revision});
    c["sidecarToken"] = json!({
        "lifetime": s.sidecar_token.lifetime,
        "issuer": format!("https://{}:{PORT}", s.hosts[0]),
    });
    let issuers: Vec<Value> = s
        .identities
        .jwt
        .issuers
        .iter()
        .map(|i| serde_json::to_value(i).unwrap_or_default())
        .collect();
    let ids = &s.identities;
    c["identities"] = json!({"joinTokens": ids.join_tokens, "jwt": {"issuers": issuers}});
    if let Some(aws) = &ids.aws_ec2 {
        c["identities"]["awsEc2"] = serde_json::to_value(aws).unwrap_or_default();
    }
    if let Some(gcp) = &ids.gcp_gce {
        c["identities"]["gcpGce"] = serde_json::to_value(gcp).unwrap_or_default();
    }
    if let Some(azure) = &ids.azure_vm {
        c["identities"]["azureVm"] = serde_json::to_value(azure).unwrap_or_default();
    }
    c["workloads"]["gracePeriod"] = json!(s.workloads.grace_period);
    c["workloads"]["propagationDelay"] = json!(s.workloads.propagation_delay);
    c["workloads"]["healthChecks"] = json!(s.workloads.health_checks);
    serde_saphyr::to_string(&c).map_err(|e| Error::Manifest(e.to_string()))
}

/// What rolls the pods when it changes: the configuration, the TLS Secret's name and the
/// digest of its certificate (the endpoint also reloads a renewed certificate, but a roll
/// makes every replica serve it at a known time, visible in `kubectl rollout status`), and the
/// keys Secret's uid (keys are read at start, so a recreated Secret must restart every
/// replica, or they would disagree on sessions).
pub fn config_hash(config: &str, tls_secret: &str, cert_digest: &str, keys_uid: &str) -> String {
    let mut h = Sha256::new();
    for part in [config, tls_secret, cert_digest, keys_uid] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// Renders every child of `plane` from its validated spec; `keys_uid` is the uid of its keys
/// Secret ([`keys_secret`], created first).
pub fn children(
    plane: &OnboardingPlane,
    valid: &Valid,
    keys_uid: &str,
    serving: &crate::tls::Serving,
) -> Result<Children, Error> {
    let name = plane.metadata.name.clone().unwrap_or_default();
    let ns = plane.metadata.namespace.clone().unwrap_or_default();
    let names = Names::of(&ns, &name);
    let owners = json!([owner(plane)]);
    let meta = |n: &str| json!({"name": n, "namespace": ns, "labels": labels(&ns, &name), "ownerReferences": owners});
    let cluster_meta = |n: &str| json!({"name": n, "labels": labels(&ns, &name)});
    let subject = json!([{"kind": "ServiceAccount", "name": names.endpoint, "namespace": ns}]);

    let service_account = decode(
        "ServiceAccount",
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(&names.endpoint),
               "automountServiceAccountToken": true}),
    )?;
    let role = decode(
        "Role",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(&names.leases),
               "rules": base(RBAC_YAML, "Role")?["rules"]}),
    )?;
    let role_binding = decode(
        "RoleBinding",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(&names.leases),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.leases},
               "subjects": subject}),
    )?;
    let cluster_role = decode(
        "ClusterRole",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": cluster_meta(&names.cluster),
               "rules": base(RBAC_YAML, "ClusterRole")?["rules"]}),
    )?;
    let cluster_role_binding = decode(
        "ClusterRoleBinding",
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": cluster_meta(&names.cluster),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": names.cluster},
               "subjects": subject}),
    )?;

    let config = endpoint_config(&name, valid)?;
    let config_map = decode(
        "ConfigMap",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(&names.endpoint),
               "data": {CONFIG_KEY: config}}),
    )?;

    let s = &valid.spec;
    let mut dep = base(ENDPOINT_YAML, "Deployment")?;
    dep["metadata"] = meta(&names.endpoint);
    dep["spec"]["replicas"] = json!(s.replicas);
    dep["spec"]["selector"] = json!({"matchLabels": selector(&name)});
    let pod = &mut dep["spec"]["template"];
    pod["metadata"] = json!({
        "labels": labels(&ns, &name),
        "annotations": {CONFIG_HASH: config_hash(
            &config,
            &serving.secret_name,
            serving.cert_digest.as_deref().unwrap_or_default(),
            keys_uid,
        )},
    });
    pod["spec"]["serviceAccountName"] = json!(names.endpoint);
    if let Some(t) = pod["spec"]["topologySpreadConstraints"].as_array_mut() {
        for c in t {
            c["labelSelector"] = json!({"matchLabels": selector(&name)});
        }
    }
    let container = &mut pod["spec"]["containers"][0];
    container["image"] = json!(valid.image);
    if let Some(r) = &s.resources {
        container["resources"] = serde_json::to_value(r).unwrap_or_default();
    }
    if let Some(vols) = pod["spec"]["volumes"].as_array_mut() {
        for v in vols {
            match v["name"].as_str() {
                Some("config") => v["configMap"]["name"] = json!(names.endpoint),
                Some("tls") => v["secret"]["secretName"] = json!(serving.secret_name),
                Some("keys") => v["secret"]["secretName"] = json!(names.keys),
                _ => {}
            }
        }
    }
    let deployment = decode("Deployment", dep)?;

    let mut svc = base(ENDPOINT_YAML, "Service")?;
    svc["metadata"] = meta(&names.endpoint);
    svc["spec"]["selector"] = json!(selector(&name));
    if let Some(ports) = svc["spec"]["ports"].as_array_mut() {
        ports.push(
            json!({"name": "http-monitoring", "port": 15014, "targetPort": "http-monitoring",
                          "protocol": "TCP", "appProtocol": "http"}),
        );
    }
    let service = decode("Service", svc)?;

    let mut pdb = base(ENDPOINT_YAML, "PodDisruptionBudget")?;
    pdb["metadata"] = meta(&names.endpoint);
    pdb["spec"]["selector"] = json!({"matchLabels": selector(&name)});
    let pdb = decode("PodDisruptionBudget", pdb)?;

    Ok(Children {
        service_account,
        role,
        role_binding,
        cluster_role,
        cluster_role_binding,
        config_map,
        deployment,
        service,
        pdb,
    })
}

/// The endpoint's keys Secret (`signing-key.pem`, an ECDSA P-256 PKCS#8 key, and
/// `nonce-key`, 32 random bytes), shared by the replicas; created once, never rewritten, so
/// sessions survive reconciles and rollouts.
pub fn keys_secret(plane: &OnboardingPlane) -> Result<Secret, Error> {
    use rand::RngCore;
    let name = plane.metadata.name.clone().unwrap_or_default();
    let ns = plane.metadata.namespace.clone().unwrap_or_default();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Error::Manifest(format!("generating the signing key: {e}")))?;
    let mut nonce = [0u8; 32];
    rand::rng().fill_bytes(&mut nonce);
    let b64 = |b: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(b)
    };
    decode(
        "Secret",
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": Names::of(&ns, &name).keys, "namespace": ns, "labels": labels(&ns, &name),
                         "ownerReferences": [owner(plane)]},
            "type": "Opaque",
            "data": {"signing-key.pem": b64(key.serialize_pem().as_bytes()), "nonce-key": b64(&nonce)},
        }),
    )
}
