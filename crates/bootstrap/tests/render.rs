//! What `render` writes for the inputs istioctl's goldens do not cover.

use std::collections::BTreeMap;

use gangplank_bootstrap::{
    Error, FILE_MODE, Inputs, InstanceIp, MeshConfig, TOKEN_MODE, fill_file_defaults, group_from_yaml, render,
};
use pretty_assertions::assert_eq;

fn group(yaml: &str) -> gangplank_api::istio::WorkloadGroup {
    group_from_yaml(yaml, "test group").unwrap()
}

const RATINGS: &str = "
kind: WorkloadGroup
metadata: {name: ratings, namespace: bookinfo}
spec:
  metadata:
    labels: {app: ratings, version: v2}
  template:
    ports: {http: 9080, grpc: 3550, admin: 15000}
    serviceAccount: bookinfo-ratings
    network: vm-net
";

fn env_line<'a>(env: &'a str, key: &str) -> Option<&'a str> {
    env.lines().find_map(|l| l.strip_prefix(&format!("{key}=")))
}

#[test]
fn ports_labels_and_network() {
    let mut inputs = Inputs::new(group(RATINGS));
    inputs.instance_ip = Some(InstanceIp::Internal("10.0.0.5".parse().unwrap()));
    let files = render(&inputs).unwrap();
    let pod_ports = r#"[{"name":"admin","containerPort":15000,"protocol":""},{"name":"grpc","containerPort":3550,"protocol":""},{"name":"http","containerPort":9080,"protocol":""}]"#;
    let labels = r#"{"app":"ratings","service.istio.io/canonical-name":"ratings","service.istio.io/canonical-revision":"v2","version":"v2"}"#;
    assert_eq!(
        files.cluster_env,
        format!(
            "CANONICAL_REVISION='v2'
CANONICAL_SERVICE='ratings'
ISTIO_INBOUND_PORTS='15000,3550,9080'
ISTIO_LOCAL_EXCLUDE_PORTS='22,15090,15021,15020'
ISTIO_METAJSON_LABELS='{labels}'
ISTIO_META_CLUSTER_ID=''
ISTIO_META_DNS_CAPTURE='true'
ISTIO_META_MESH_ID=''
ISTIO_META_NETWORK='vm-net'
ISTIO_META_POD_PORTS='{pod_ports}'
ISTIO_META_WORKLOAD_NAME='ratings'
ISTIO_NAMESPACE='bookinfo'
ISTIO_SERVICE='ratings.bookinfo'
ISTIO_SERVICE_CIDR='*'
ISTIO_SVC_IP='10.0.0.5'
POD_NAMESPACE='bookinfo'
SERVICE_ACCOUNT='bookinfo-ratings'
TRUST_DOMAIN=''
"
        )
    );
    assert_eq!(
        files.mesh_yaml,
        format!(
            "defaultConfig:
  proxyMetadata:
    CANONICAL_REVISION: v2
    CANONICAL_SERVICE: ratings
    ISTIO_META_CLUSTER_ID: \"\"
    ISTIO_META_DNS_CAPTURE: \"true\"
    ISTIO_META_MESH_ID: \"\"
    ISTIO_META_NETWORK: vm-net
    ISTIO_META_POD_PORTS: '{pod_ports}'
    ISTIO_META_WORKLOAD_NAME: ratings
    ISTIO_METAJSON_LABELS: '{labels}'
    POD_NAMESPACE: bookinfo
    SERVICE_ACCOUNT: bookinfo-ratings
    TRUST_DOMAIN: \"\"
"
        )
    );
    assert_eq!(files.hosts, "", "no gateway address: empty hosts file");
}

#[test]
fn external_ip_autoregister_no_dns_capture_status_port_and_unknown_fields() {
    let mut inputs = Inputs::new(group(RATINGS));
    inputs.mesh_config = MeshConfig::from_yaml(
        "
trustDomain: cluster.local
defaultConfig:
  statusPort: 15030
  meshId: mesh1
  discoveryAddress: istiod.example:15012
  proxyMetadata:
    ISTIO_META_DNS_CAPTURE: \"false\"
  tracing:
    zipkin:
      address: zipkin.istio-system:9411
  unknownFutureField: {b: 1, a: [x, \"y\"]}
  concurrency: 2
  serviceCluster: \"\"
  nothing: null
",
    )
    .unwrap();
    inputs.revision = "canary".into();
    inputs.capture_dns = false;
    inputs.autoregister = true;
    inputs.instance_ip = Some(InstanceIp::External("203.0.113.7".parse().unwrap()));
    inputs.ingress_ip = Some("fd00::2".parse().unwrap());
    inputs.workload_entry = Some("ratings-vm-1".into());
    let files = render(&inputs).unwrap();
    let env = &files.cluster_env;
    assert_eq!(env_line(env, "ISTIO_SVC_IP"), Some("'203.0.113.7'"));
    assert_eq!(
        env_line(env, "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION"),
        Some("'true'")
    );
    assert_eq!(
        env_line(env, "ISTIO_META_DNS_CAPTURE"),
        Some("'false'"),
        "mesh value survives"
    );
    assert_eq!(env_line(env, "ISTIO_META_AUTO_REGISTER_GROUP"), Some("'ratings'"));
    assert_eq!(env_line(env, "ISTIO_META_WORKLOAD_ENTRY"), Some("'ratings-vm-1'"));
    assert_eq!(
        env_line(env, "ISTIO_LOCAL_EXCLUDE_PORTS"),
        Some("'22,15090,15021,15030'")
    );
    assert_eq!(
        env_line(env, "CA_ADDR"),
        Some("'istiod-canary.istio-system.svc:15012'")
    );
    assert_eq!(env_line(env, "TRUST_DOMAIN"), Some("'cluster.local'"));
    assert_eq!(env_line(env, "ISTIO_META_MESH_ID"), Some("'mesh1'"));
    assert_eq!(files.hosts, "fd00::2 istiod-canary.istio-system.svc\n");
    let yaml = &files.mesh_yaml;
    assert!(
        yaml.starts_with(
            "defaultConfig:\n  concurrency: 2\n  discoveryAddress: istiod.example:15012\n  meshId: mesh1\n  proxyMetadata:\n"
        ),
        "{yaml}"
    );
    assert!(
        yaml.ends_with(
            "  statusPort: 15030\n  tracing:\n    zipkin:\n      address: zipkin.istio-system:9411\n  unknownFutureField:\n    a:\n    - x\n    - \"y\"\n    b: 1\n"
        ),
        "{yaml}"
    );
    assert!(
        !yaml.contains("serviceCluster") && !yaml.contains("nothing"),
        "{yaml}"
    );
    assert!(
        yaml.contains("    ISTIO_META_WORKLOAD_ENTRY: ratings-vm-1\n"),
        "{yaml}"
    );
}

#[test]
fn status_port_rules() {
    for (port, expected) in [
        ("0", "'22,15090,15021,15020'"),
        ("15021", "'22,15090,15021'"),
        ("15090", "'22,15090,15021'"),
        ("\"15031\"", "'22,15090,15021,15031'"),
    ] {
        let mut inputs = Inputs::new(group(RATINGS));
        inputs.mesh_config =
            MeshConfig::from_yaml(&format!("defaultConfig: {{statusPort: {port}}}")).unwrap();
        let files = render(&inputs).unwrap();
        assert_eq!(
            env_line(&files.cluster_env, "ISTIO_LOCAL_EXCLUDE_PORTS"),
            Some(expected),
            "{port}"
        );
    }
    let mut inputs = Inputs::new(group(RATINGS));
    inputs.mesh_config = MeshConfig::from_yaml("defaultConfig: {statusPort: many}").unwrap();
    assert!(matches!(render(&inputs), Err(Error::MeshConfigField { .. })));
}

#[test]
fn annotations_apply_group_then_spec_and_merge_proxy_metadata() {
    let yaml = r#"
kind: WorkloadGroup
metadata:
  name: foo
  namespace: bar
  annotations:
    proxy.istio.io/config: |
      discoveryAddress: from-group:15012
      meshId: m1
      proxyMetadata: {A: group, B: group}
spec:
  metadata:
    annotations:
      proxy.istio.io/config: |
        meshId: m2
        proxyMetadata: {B: spec}
  template: {serviceAccount: sa}
"#;
    let mut inputs = Inputs::new(group(yaml));
    inputs.mesh_config = MeshConfig::from_yaml("defaultConfig: {proxyMetadata: {A: mesh, C: mesh}}").unwrap();
    inputs.revision = "rev-1".into();
    let files = render(&inputs).unwrap();
    let env = &files.cluster_env;
    assert_eq!(env_line(env, "A"), Some("'group'"));
    assert_eq!(env_line(env, "B"), Some("'spec'"));
    assert_eq!(env_line(env, "C"), Some("'mesh'"));
    assert_eq!(env_line(env, "ISTIO_META_MESH_ID"), Some("'m2'"));
    assert!(
        files.mesh_yaml.contains("  discoveryAddress: from-group:15012\n"),
        "{}",
        files.mesh_yaml
    );
    assert!(files.mesh_yaml.contains("  meshId: m2\n"));
}

#[test]
fn template_labels_override_with_a_warning_and_extra_labels_only_add() {
    let yaml = "
kind: WorkloadGroup
metadata: {name: foo, namespace: bar}
spec:
  metadata: {labels: {app: a, team: x}}
  template: {labels: {app: b}, serviceAccount: sa}
";
    let mut inputs = Inputs::new(group(yaml));
    inputs.extra_labels = BTreeMap::from([
        ("app".to_string(), "c".to_string()),
        ("zone".to_string(), "z<1>".to_string()),
    ]);
    let files = render(&inputs).unwrap();
    assert_eq!(env_line(&files.cluster_env, "CANONICAL_SERVICE"), Some("'b'"));
    assert_eq!(
        env_line(&files.cluster_env, "ISTIO_METAJSON_LABELS"),
        Some(
            r#"'{"app":"b","service.istio.io/canonical-name":"b","service.istio.io/canonical-revision":"latest","team":"x","zone":"z\u003c1\u003e"}'"#
        )
    );
    assert_eq!(
        files.warnings,
        vec!["Labels should be set in the metadata. The following WorkloadEntry labels will override metadata labels: map[app:b]".to_string()]
    );
}

#[test]
fn group_without_spec_metadata() {
    let yaml = "kind: WorkloadGroup\nmetadata: {name: foo, namespace: bar}\nspec: {template: {serviceAccount: sa}}\n";
    // As read from a cluster (no -f defaults): spec.metadata absent is treated as empty.
    let raw: gangplank_api::istio::WorkloadGroup = serde_saphyr::from_str(yaml).unwrap();
    assert!(raw.spec.metadata.is_none());
    let from_cluster = render(&Inputs::new(raw.clone())).unwrap();
    let mut filled = raw;
    fill_file_defaults(&mut filled);
    assert!(filled.spec.metadata.is_some());
    assert_eq!(render(&Inputs::new(filled)).unwrap(), from_cluster);
    assert_eq!(
        env_line(&from_cluster.cluster_env, "CANONICAL_SERVICE"),
        Some("'foo'")
    );
}

#[test]
fn file_defaults_fill_template_and_service_account() {
    let g = group("kind: WorkloadGroup\nmetadata: {name: foo, namespace: bar}\n");
    assert_eq!(
        g.spec.template.as_ref().map(|t| t.service_account.as_str()),
        Some("default")
    );
    let files = render(&Inputs::new(g)).unwrap();
    assert_eq!(env_line(&files.cluster_env, "SERVICE_ACCOUNT"), Some("'default'"));
}

#[test]
fn bad_inputs_are_refused() {
    let no_template: gangplank_api::istio::WorkloadGroup =
        serde_saphyr::from_str("metadata: {name: foo, namespace: bar}\n").unwrap();
    let err = render(&Inputs::new(no_template)).unwrap_err();
    assert!(matches!(err, Error::MissingTemplate { .. }));
    assert!(err.to_string().contains("bar/foo"), "{err}");

    let no_ns = group("metadata: {name: foo}\n");
    assert!(matches!(
        render(&Inputs::new(no_ns)),
        Err(Error::MissingMeta { field: "namespace" })
    ));

    let mut inputs = Inputs::new(group(RATINGS));
    inputs.mesh_config = MeshConfig::from_yaml("defaultConfig: {proxyMetadata: {\"$(reboot)\": x}}").unwrap();
    let err = render(&inputs).unwrap_err();
    assert!(matches!(err, Error::BadEnvKey { .. }), "{err}");

    inputs.mesh_config = MeshConfig::from_yaml("defaultConfig: {proxyMetadata: {A: [1]}}").unwrap();
    assert!(matches!(render(&inputs), Err(Error::MeshConfigField { .. })));

    let bad_annotation = "
metadata: {name: foo, namespace: bar, annotations: {proxy.istio.io/config: 'a: [unclosed'}}
spec: {template: {serviceAccount: sa}}
";
    let err = render(&Inputs::new(group(bad_annotation))).unwrap_err();
    assert!(matches!(err, Error::AnnotationYaml { .. }), "{err}");

    assert!(matches!(
        group_from_yaml("kind: WorkloadEntry\nmetadata: {name: x}\n", "we.yaml"),
        Err(Error::NotAGroup { .. })
    ));
    assert!(matches!(
        group_from_yaml("metadata: [", "bad.yaml"),
        Err(Error::GroupYaml { .. })
    ));
}

#[test]
fn readiness_probe_drops_zero_values_and_values_with_quotes_are_escaped() {
    let yaml = "
kind: WorkloadGroup
metadata: {name: foo, namespace: bar}
spec:
  template: {serviceAccount: sa}
  probe: {httpGet: {path: '', port: 8080, host: null}, periodSeconds: 0, failureThreshold: 3}
";
    let mut inputs = Inputs::new(group(yaml));
    inputs.mesh_config = MeshConfig::from_yaml(
        "defaultConfig: {readinessProbe: {exec: {command: [x]}}, proxyMetadata: {Q: \"it's\"}}",
    )
    .unwrap();
    let files = render(&inputs).unwrap();
    assert!(
        files
            .mesh_yaml
            .ends_with("  readinessProbe:\n    failureThreshold: 3\n    httpGet:\n      port: 8080\n"),
        "{}",
        files.mesh_yaml
    );
    assert_eq!(env_line(&files.cluster_env, "Q"), Some("'it'\"'\"'s'"));
}

#[test]
fn files_have_istioctl_names_and_safe_modes() {
    let mut inputs = Inputs::new(group(RATINGS));
    inputs.token = b"header.payload.sig".to_vec();
    inputs.root_cert = b"-----BEGIN CERTIFICATE-----\n".to_vec();
    inputs.istio_namespace = "mesh-system".into();
    inputs.ingress_ip = Some("192.0.2.1".parse().unwrap());
    let files = render(&inputs).unwrap();
    let entries = files.entries();
    let names: Vec<_> = entries.iter().map(|f| (f.name, f.mode)).collect();
    assert_eq!(
        names,
        vec![
            ("mesh.yaml", FILE_MODE),
            ("cluster.env", FILE_MODE),
            ("root-cert.pem", FILE_MODE),
            ("istio-token", TOKEN_MODE),
            ("hosts", FILE_MODE)
        ]
    );
    assert_eq!(TOKEN_MODE, 0o600);
    assert_eq!(entries[3].content, b"header.payload.sig");
    assert_eq!(entries[2].content, b"-----BEGIN CERTIFICATE-----\n");
    assert_eq!(files.hosts, "192.0.2.1 istiod.mesh-system.svc\n");
}
