//! `sidecar.env` for the `istio-proxy` container (Tetrate's push format).

use std::collections::BTreeMap;
use std::net::IpAddr;

use gangplank_api::istio::WorkloadEntry;
use serde_json::{Map, Value};

use super::*;
use crate::render::{
    MeshConfig, canonical_service, drop_nulls, drop_proto_zero_values, istiod_addr, parse_yaml, str_field,
    string_map,
};
use crate::{Error, PROXY_CONFIG_ANNOTATION, gojson};

/// Everything `sidecar.env` is made from.
#[derive(Debug, Clone, Copy)]
pub struct DockerInputs<'a> {
    /// The WorkloadEntry of the VM (name and namespace required).
    pub entry: &'a WorkloadEntry,
    /// The mesh config (`istio` ConfigMap, key `mesh`).
    pub mesh_config: &'a MeshConfig,
    /// `ISTIO_META_CLUSTER_ID`; empty means `Kubernetes`, Istio's default.
    pub cluster_id: &'a str,
    /// The namespace istiod runs in.
    pub istio_namespace: &'a str,
    /// The control plane revision; `""` and `"default"` mean none.
    pub revision: &'a str,
    /// The IP the proxy binds inbound listeners to (`INSTANCE_IP`); `None` uses the entry's
    /// address.
    pub instance_ip: Option<IpAddr>,
}

/// Renders `sidecar.env`. Values must fit on one line (an env-file has no quoting), so a
/// value with a newline is an [`Error::EnvFileValue`].
pub fn render_docker_env(inputs: &DockerInputs<'_>) -> Result<String, Error> {
    let entry = inputs.entry;
    let name = entry
        .metadata
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingMeta { field: "name" })?;
    let namespace = entry
        .metadata
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingMeta { field: "namespace" })?;
    let entry_key = format!("{namespace}/{name}");
    let annotations = entry.metadata.annotations.clone().unwrap_or_default();
    let service_account = match entry.spec.service_account.as_str() {
        "" => "default",
        sa => sa,
    };

    let mut proxy_config = inputs.mesh_config.default_config().cloned().unwrap_or_default();
    drop_nulls(&mut proxy_config);
    let mut proxy_metadata = string_map(proxy_config.remove("proxyMetadata"), |field, expected| {
        crate::render::mesh_field(&format!("defaultConfig.proxyMetadata{field}"), expected)
    })?;
    if let Some(text) = annotations.get(PROXY_CONFIG_ANNOTATION) {
        let bad = |field: String, expected| Error::AnnotationField {
            place: "metadata.annotations",
            group: format!("(workload entry) {entry_key}"),
            field,
            expected,
        };
        let overlay = parse_yaml(text).map_err(|source| Error::AnnotationYaml {
            place: "metadata.annotations",
            group: format!("(workload entry) {entry_key}"),
            source: Box::new(source),
        })?;
        match overlay {
            Value::Null => {}
            Value::Object(m) => {
                for (key, value) in m {
                    if value.is_null() {
                        continue;
                    }
                    if key == "proxyMetadata" {
                        proxy_metadata.extend(string_map(Some(value), |f, e| {
                            bad(format!("proxyMetadata{f}"), e)
                        })?);
                    } else {
                        proxy_config.insert(key, value);
                    }
                }
            }
            _ => return Err(bad("(top level)".into(), "a mapping of ProxyConfig fields")),
        }
    }

    let mut labels = entry.spec.labels.clone();
    labels.extend(entry.metadata.labels.clone().unwrap_or_default());
    let workload_name = labels
        .get("app")
        .cloned()
        .unwrap_or_else(|| service_account.to_string());
    let (canonical_name, canonical_revision) = canonical_service(&labels, &workload_name);

    proxy_config.insert(
        "serviceCluster".into(),
        Value::String(format!("{workload_name}.{namespace}")),
    );
    proxy_config.remove("concurrency");
    drop_proto_zero_values(&mut proxy_config);
    let discovery = match str_field(&proxy_config, "discoveryAddress") {
        "" => istiod_addr(inputs.istio_namespace, inputs.revision),
        d => d.to_string(),
    };
    let mesh_id = match str_field(&proxy_config, "meshId") {
        "" => inputs.mesh_config.trust_domain().to_string(),
        m => m.to_string(),
    };
    let instance_ip = inputs
        .instance_ip
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| entry.spec.address.clone());
    let istio_annotations: BTreeMap<String, String> = annotations
        .iter()
        .filter(|(k, _)| k.contains("istio.io/") && !k.contains("istioctl.istio.io/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let cluster_id = match inputs.cluster_id {
        "" => "Kubernetes",
        c => c,
    };
    let interception = annotations
        .get(INTERCEPTION_MODE_ANNOTATION)
        .map(String::as_str)
        .unwrap_or("NONE");

    let mut lines: Vec<(String, String)> = proxy_metadata.into_iter().collect();
    let fixed: [(&str, String); 20] = [
        ("JWT_POLICY", "third-party-jwt".into()),
        ("PROV_CERT", CERTS_DIR.into()),
        ("OUTPUT_CERTS", CERTS_DIR.into()),
        ("PILOT_CERT_PROVIDER", "istiod".into()),
        ("CA_ADDR", discovery),
        ("POD_NAME", name.into()),
        ("POD_NAMESPACE", namespace.into()),
        ("INSTANCE_IP", instance_ip),
        ("SERVICE_ACCOUNT", service_account.into()),
        ("HOST_IP", entry.spec.address.clone()),
        ("CANONICAL_SERVICE", canonical_name),
        ("CANONICAL_REVISION", canonical_revision),
        (
            "PROXY_CONFIG",
            Value::Object(Map::from_iter(proxy_config)).to_string(),
        ),
        ("ISTIO_META_CLUSTER_ID", cluster_id.into()),
        ("ISTIO_META_INTERCEPTION_MODE", interception.into()),
        ("ISTIO_META_NETWORK", entry.spec.network.clone()),
        ("ISTIO_METAJSON_LABELS", gojson::string_map(&labels)),
        (
            "ISTIO_METAJSON_ISTIO_ANNOTATIONS",
            gojson::string_map(&istio_annotations),
        ),
        ("ISTIO_META_WORKLOAD_NAME", workload_name.clone()),
        (
            "ISTIO_META_OWNER",
            format!("kubernetes://apis/networking.istio.io/v1/namespaces/{namespace}/workloadentries/{name}"),
        ),
    ];
    lines.extend(fixed.into_iter().map(|(k, v)| (k.to_string(), v)));
    lines.push(("ISTIO_META_MESH_ID".into(), mesh_id));

    let mut out = Vec::with_capacity(lines.len());
    for (key, value) in lines {
        if !crate::cluster_env::is_name(&key) {
            return Err(Error::BadEnvKey { key });
        }
        if value.contains(['\n', '\r', '\0']) {
            return Err(Error::EnvFileValue { key });
        }
        out.push(format!("{key}={value}"));
    }
    Ok(out.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gangplank_api::istio::WorkloadEntrySpec;
    use gangplank_api::meta::ObjectMeta;

    fn entry() -> WorkloadEntry {
        WorkloadEntry::new(
            ObjectMeta {
                name: Some("ratings-vm".into()),
                namespace: Some("bookinfo".into()),
                annotations: Some(BTreeMap::from([
                    (
                        "sidecar-bootstrap.istio.io/ssh-host".to_string(),
                        "35.194.38.142".to_string(),
                    ),
                    (
                        PROXY_CONFIG_ANNOTATION.to_string(),
                        "proxyMetadata: {EXTRA: x}".to_string(),
                    ),
                ])),
                ..Default::default()
            },
            WorkloadEntrySpec {
                address: "35.194.38.142".into(),
                labels: BTreeMap::from([
                    ("app".to_string(), "ratings".to_string()),
                    ("version".to_string(), "v3".to_string()),
                ]),
                service_account: "bookinfo-ratings".into(),
                network: "vm-net".into(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn env_file_in_tetrates_order() {
        let mesh = MeshConfig::from_yaml(
            "trustDomain: cluster.local\ndefaultConfig:\n  proxyMetadata: {A_FIRST: one}\n  concurrency: 2\n",
        )
        .expect("mesh");
        let e = entry();
        let env = render_docker_env(&DockerInputs {
            entry: &e,
            mesh_config: &mesh,
            cluster_id: "",
            istio_namespace: "istio-system",
            revision: "",
            instance_ip: Some("10.128.0.2".parse().expect("ip")),
        })
        .expect("render");
        let keys: Vec<&str> = env.lines().map(|l| l.split('=').next().unwrap_or("")).collect();
        assert_eq!(
            keys,
            [
                "A_FIRST",
                "EXTRA",
                "JWT_POLICY",
                "PROV_CERT",
                "OUTPUT_CERTS",
                "PILOT_CERT_PROVIDER",
                "CA_ADDR",
                "POD_NAME",
                "POD_NAMESPACE",
                "INSTANCE_IP",
                "SERVICE_ACCOUNT",
                "HOST_IP",
                "CANONICAL_SERVICE",
                "CANONICAL_REVISION",
                "PROXY_CONFIG",
                "ISTIO_META_CLUSTER_ID",
                "ISTIO_META_INTERCEPTION_MODE",
                "ISTIO_META_NETWORK",
                "ISTIO_METAJSON_LABELS",
                "ISTIO_METAJSON_ISTIO_ANNOTATIONS",
                "ISTIO_META_WORKLOAD_NAME",
                "ISTIO_META_OWNER",
                "ISTIO_META_MESH_ID",
            ]
        );
        assert!(!env.ends_with('\n'));
        assert!(env.contains("\nCA_ADDR=istiod.istio-system.svc:15012\n"));
        assert!(env.contains("\nINSTANCE_IP=10.128.0.2\n"));
        assert!(env.contains("\nHOST_IP=35.194.38.142\n"));
        assert!(env.contains("\nPROXY_CONFIG={\"serviceCluster\":\"ratings.bookinfo\"}\n"));
        assert!(env.contains("\nISTIO_META_CLUSTER_ID=Kubernetes\n"));
        assert!(env.contains("\nISTIO_META_INTERCEPTION_MODE=NONE\n"));
        assert!(env.contains("\nISTIO_METAJSON_LABELS={\"app\":\"ratings\",\"version\":\"v3\"}\n"));
        assert!(env.contains(
            "\nISTIO_METAJSON_ISTIO_ANNOTATIONS={\"proxy.istio.io/config\":\"proxyMetadata: {EXTRA: x}\",\"sidecar-bootstrap.istio.io/ssh-host\":\"35.194.38.142\"}\n"
        ));
        assert!(env.ends_with("\nISTIO_META_MESH_ID=cluster.local"));
    }

    #[test]
    fn one_recipe_with_either_environment() {
        let keys = ["ISTIO_META_NETWORK".to_owned(), "PROXY_CONFIG".to_owned()];
        let agent = run_args(&Run {
            name: "istio-proxy",
            image: "docker.io/istio/proxyv2:1.27.1",
            root_cert: "/vm/etc/certs/root-cert.pem",
            token_dir: "/vm/var/run/secrets/tokens",
            mesh: Some("/vm/etc/istio/config/mesh"),
            env: Env::Inherit(&keys),
        });
        assert_eq!(
            agent.join(" "),
            "run -d --name istio-proxy --restart unless-stopped --network host \
             -v /vm/etc/certs/root-cert.pem:/var/run/secrets/istio/root-cert.pem:ro \
             -v /vm/var/run/secrets/tokens:/var/run/secrets/tokens:ro \
             -v /vm/etc/istio/config/mesh:/etc/istio/config/mesh:ro \
             --env ISTIO_META_NETWORK --env PROXY_CONFIG \
             docker.io/istio/proxyv2:1.27.1 proxy sidecar"
        );
        let push = run_args(&Run {
            name: CONTAINER,
            image: "img",
            root_cert: "/etc/istio-proxy/istio-ca.pem",
            token_dir: "/etc/istio-proxy",
            mesh: None,
            env: Env::File("/etc/istio-proxy/sidecar.env"),
        });
        assert_eq!(
            push.join(" "),
            "run -d --name istio-proxy --restart unless-stopped --network host \
             -v /etc/istio-proxy/istio-ca.pem:/var/run/secrets/istio/root-cert.pem:ro \
             -v /etc/istio-proxy:/var/run/secrets/tokens:ro \
             --env-file /etc/istio-proxy/sidecar.env img proxy sidecar"
        );
        assert_eq!(remove_args("c").join(" "), "rm --force c");
    }

    #[test]
    fn multi_line_value_is_refused() {
        let mut e = entry();
        e.spec.network = "a\nINJECTED=1".into();
        let err = render_docker_env(&DockerInputs {
            entry: &e,
            mesh_config: &MeshConfig::default(),
            cluster_id: "",
            istio_namespace: "istio-system",
            revision: "",
            instance_ip: None,
        })
        .expect_err("newline");
        assert!(err.to_string().contains("ISTIO_META_NETWORK"), "{err}");
    }
}
