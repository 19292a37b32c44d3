//! The renderer: Istio's boot files from a WorkloadGroup, the mesh config and the control
//! plane's facts, exactly as `istioctl x workload entry configure` writes them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use gangplank_api::istio::{WorkloadEntrySpec, WorkloadGroup};
use serde_json::{Map, Value};

use crate::{
    DEFAULT_ISTIO_NAMESPACE, Error, FILE_MODE, ISTIOD_PORT, PROXY_CONFIG_ANNOTATION, TOKEN_MODE, cluster_env,
    gojson, goyaml,
};

/// The mesh config: the YAML of the `mesh` key of ConfigMap `istio[-<revision>]`. Every field
/// is kept, including ones this version does not know.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshConfig {
    raw: Map<String, Value>,
}

impl MeshConfig {
    /// Parses the mesh config YAML. Empty text is an empty mesh config.
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        Self::from_value(parse_yaml(text).map_err(|source| Error::MeshConfigYaml {
            source: Box::new(source),
        })?)
    }

    /// Builds a mesh config from an already-parsed value (an object, or null for empty).
    pub fn from_value(value: Value) -> Result<Self, Error> {
        let raw = match value {
            Value::Null => Map::new(),
            Value::Object(m) => m,
            _ => return Err(mesh_field("(top level)", "a mapping")),
        };
        match raw.get("defaultConfig") {
            None | Some(Value::Null | Value::Object(_)) => {}
            Some(_) => return Err(mesh_field("defaultConfig", "a mapping")),
        }
        match raw.get("trustDomain") {
            None | Some(Value::Null | Value::String(_)) => {}
            Some(_) => return Err(mesh_field("trustDomain", "a string")),
        }
        Ok(Self { raw })
    }

    /// The whole mesh config.
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.raw
    }

    /// `defaultConfig` (a ProxyConfig), if set.
    pub fn default_config(&self) -> Option<&Map<String, Value>> {
        self.raw.get("defaultConfig").and_then(Value::as_object)
    }

    /// `trustDomain`, empty when unset (istioctl writes it as is, even empty).
    pub fn trust_domain(&self) -> &str {
        self.raw.get("trustDomain").and_then(Value::as_str).unwrap_or("")
    }
}

pub(crate) fn mesh_field(field: &str, expected: &'static str) -> Error {
    Error::MeshConfigField {
        field: field.to_string(),
        expected,
    }
}

/// The address the workload is reached on, as given to istioctl's `--internalIP` or
/// `--externalIP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceIp {
    /// `ISTIO_SVC_IP=<ip>`.
    Internal(IpAddr),
    /// `ISTIO_SVC_IP=<ip>` and `REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION=true`.
    External(IpAddr),
}

/// Everything the sidecar files are made from.
#[derive(Clone)]
pub struct Inputs {
    /// The workload group the VM belongs to.
    pub group: WorkloadGroup,
    /// The mesh config (`istio[-<revision>]` ConfigMap, key `mesh`).
    pub mesh_config: MeshConfig,
    /// The mesh's root certificate (`istio-ca-root-cert` ConfigMap, key `root-cert.pem`).
    pub root_cert: Vec<u8>,
    /// The raw service-account JWT (audience `istio-ca`); may be empty.
    pub token: Vec<u8>,
    /// The cluster ID istiod knows its cluster by (`ISTIO_META_CLUSTER_ID`); may be empty.
    pub cluster_id: String,
    /// The control plane revision; `""` and `"default"` mean none.
    pub revision: String,
    /// The namespace istiod runs in.
    pub istio_namespace: String,
    /// The gateway address the VM reaches istiod through (`hosts`); `None` writes an empty file.
    pub ingress_ip: Option<IpAddr>,
    /// The workload's own address.
    pub instance_ip: Option<InstanceIp>,
    /// Whether the sidecar captures DNS (`ISTIO_META_DNS_CAPTURE=true`).
    pub capture_dns: bool,
    /// Whether istiod registers the WorkloadEntry itself (`ISTIO_META_AUTO_REGISTER_GROUP`).
    pub autoregister: bool,
    /// Pull mode: the name of the WorkloadEntry Gangplank registered
    /// (`ISTIO_META_WORKLOAD_ENTRY`, so istiod 1.19+ reports health on it).
    pub workload_entry: Option<String>,
    /// Pull mode: the entry's labels beyond the group's; they are added to
    /// `ISTIO_METAJSON_LABELS` but never override the group's.
    pub extra_labels: BTreeMap<String, String>,
}

impl Inputs {
    /// Inputs for `group` with istioctl's defaults: empty mesh config, certificate and token,
    /// no revision, `istio-system`, DNS capture on.
    pub fn new(group: WorkloadGroup) -> Self {
        Self {
            group,
            mesh_config: MeshConfig::default(),
            root_cert: Vec::new(),
            token: Vec::new(),
            cluster_id: String::new(),
            revision: String::new(),
            istio_namespace: DEFAULT_ISTIO_NAMESPACE.to_string(),
            ingress_ip: None,
            instance_ip: None,
            capture_dns: true,
            autoregister: false,
            workload_entry: None,
            extra_labels: BTreeMap::new(),
        }
    }
}

impl Default for Inputs {
    fn default() -> Self {
        Self::new(WorkloadGroup::default())
    }
}

impl fmt::Debug for Inputs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inputs")
            .field("group", &self.group)
            .field("mesh_config", &self.mesh_config)
            .field("root_cert", &format_args!("<{} bytes>", self.root_cert.len()))
            .field("token", &format_args!("<redacted, {} bytes>", self.token.len()))
            .field("cluster_id", &self.cluster_id)
            .field("revision", &self.revision)
            .field("istio_namespace", &self.istio_namespace)
            .field("ingress_ip", &self.ingress_ip)
            .field("instance_ip", &self.instance_ip)
            .field("capture_dns", &self.capture_dns)
            .field("autoregister", &self.autoregister)
            .field("workload_entry", &self.workload_entry)
            .field("extra_labels", &self.extra_labels)
            .finish()
    }
}

/// The rendered sidecar files.
#[derive(Clone, PartialEq)]
pub struct Files {
    /// `cluster.env`: environment for the sidecar, sourced by `istio-start.sh`.
    pub cluster_env: String,
    /// `mesh.yaml`: `{defaultConfig: <ProxyConfig>}`, installed as `/etc/istio/config/mesh`.
    pub mesh_yaml: String,
    /// `root-cert.pem`: the mesh's root certificate.
    pub root_cert: Vec<u8>,
    /// `istio-token`: the service-account JWT (secret).
    pub istio_token: Vec<u8>,
    /// `hosts`: the line to append to `/etc/hosts` for istiod, or empty.
    pub hosts: String,
    /// Things the user should know (istioctl prints them while rendering).
    pub warnings: Vec<String>,
}

impl fmt::Debug for Files {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Files")
            .field("cluster_env", &self.cluster_env)
            .field("mesh_yaml", &self.mesh_yaml)
            .field("root_cert", &format_args!("<{} bytes>", self.root_cert.len()))
            .field(
                "istio_token",
                &format_args!("<redacted, {} bytes>", self.istio_token.len()),
            )
            .field("hosts", &self.hosts)
            .field("warnings", &self.warnings)
            .finish()
    }
}

/// One file to write.
#[derive(Clone, PartialEq, Eq)]
pub struct File {
    /// File name, as istioctl names it.
    pub name: &'static str,
    /// Content.
    pub content: Vec<u8>,
    /// Unix permission bits.
    pub mode: u32,
}

impl fmt::Debug for File {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("File");
        d.field("name", &self.name)
            .field("mode", &format_args!("{:o}", self.mode));
        if self.mode == TOKEN_MODE {
            d.field(
                "content",
                &format_args!("<redacted, {} bytes>", self.content.len()),
            );
        } else {
            d.field("content", &String::from_utf8_lossy(&self.content));
        }
        d.finish()
    }
}

impl Files {
    /// The five files with their names and modes, in istioctl's order of writing.
    pub fn entries(&self) -> Vec<File> {
        vec![
            File {
                name: "mesh.yaml",
                content: self.mesh_yaml.clone().into_bytes(),
                mode: FILE_MODE,
            },
            File {
                name: "cluster.env",
                content: self.cluster_env.clone().into_bytes(),
                mode: FILE_MODE,
            },
            File {
                name: "root-cert.pem",
                content: self.root_cert.clone(),
                mode: FILE_MODE,
            },
            File {
                name: "istio-token",
                content: self.istio_token.clone(),
                mode: TOKEN_MODE,
            },
            File {
                name: "hosts",
                content: self.hosts.clone().into_bytes(),
                mode: FILE_MODE,
            },
        ]
    }
}

/// Whether `revision` names a revision (istioctl: neither empty nor `default`).
pub fn is_revisioned(revision: &str) -> bool {
    !revision.is_empty() && revision != "default"
}

/// `istiod[-<revision>].<namespace>.svc`.
pub fn istiod_host(istio_namespace: &str, revision: &str) -> String {
    if is_revisioned(revision) {
        format!("istiod-{revision}.{istio_namespace}.svc")
    } else {
        format!("istiod.{istio_namespace}.svc")
    }
}

/// `istiod[-<revision>].<namespace>.svc:15012`.
pub fn istiod_addr(istio_namespace: &str, revision: &str) -> String {
    format!("{}:{ISTIOD_PORT}", istiod_host(istio_namespace, revision))
}

/// What `istioctl x workload entry configure -f FILE` does to a group read from a file:
/// fill in a missing `spec.metadata` and `spec.template`, and default an empty
/// `spec.template.serviceAccount` to `default`.
pub fn fill_file_defaults(group: &mut WorkloadGroup) {
    group.spec.metadata.get_or_insert_with(Default::default);
    let template = group.spec.template.get_or_insert_with(WorkloadEntrySpec::default);
    if template.service_account.is_empty() {
        template.service_account = "default".to_string();
    }
}

/// Reads a WorkloadGroup from YAML the way `istioctl x workload entry configure -f` does,
/// including [`fill_file_defaults`]. `what` names the source in errors.
pub fn group_from_yaml(text: &str, what: &str) -> Result<WorkloadGroup, Error> {
    let mut group: WorkloadGroup = serde_saphyr::from_str(text).map_err(|source| Error::GroupYaml {
        what: what.to_string(),
        source: Box::new(source),
    })?;
    if !group.kind.is_empty() && group.kind != "WorkloadGroup" {
        return Err(Error::NotAGroup {
            what: what.to_string(),
            kind: group.kind,
        });
    }
    fill_file_defaults(&mut group);
    Ok(group)
}

/// Renders the five sidecar files like `istioctl x workload entry configure`.
///
/// Differences from istioctl, all where istioctl would crash or write a broken file:
/// - a group without name, namespace or `spec.template` is an error (a missing
///   `spec.metadata` is treated as empty; an empty service account as `default`);
/// - a `proxyMetadata` key that is not an environment variable name is an error, because
///   `cluster.env` is sourced by bash as root on the VM;
/// - values of the mesh config and annotations that are not of the right type are errors.
///
/// Fields of the mesh `defaultConfig` are kept as written (istioctl round-trips them through
/// the ProxyConfig proto, which drops unknown fields, nulls and zero values); we drop nulls,
/// empty strings and zero ports at the top level, which covers what the proto would drop in
/// practice, and keep unknown fields so newer proxies get them.
/// `ISTIO_INBOUND_PORTS` lists ports in port-name order (istioctl: Go map order, random).
pub fn render(inputs: &Inputs) -> Result<Files, Error> {
    let group = &inputs.group;
    let name = group
        .metadata
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingMeta { field: "name" })?;
    let namespace = group
        .metadata
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingMeta { field: "namespace" })?;
    let group_key = format!("{namespace}/{name}");
    let template = group
        .spec
        .template
        .as_ref()
        .ok_or_else(|| Error::MissingTemplate {
            group: group_key.clone(),
        })?;
    let service_account = group.service_account();
    let mut warnings = Vec::new();

    // defaultConfig from the mesh, then the revision's discovery address.
    let mut proxy_config = inputs.mesh_config.default_config().cloned().unwrap_or_default();
    drop_nulls(&mut proxy_config);
    let mut proxy_metadata = string_map(proxy_config.remove("proxyMetadata"), |field, expected| {
        mesh_field(&format!("defaultConfig.proxyMetadata{field}"), expected)
    })?;
    if is_revisioned(&inputs.revision) && str_field(&proxy_config, "discoveryAddress").is_empty() {
        proxy_config.insert(
            "discoveryAddress".into(),
            Value::String(istiod_addr(&inputs.istio_namespace, &inputs.revision)),
        );
    }

    // proxy.istio.io/config from the group's annotations, then from spec.metadata's: each
    // top-level field replaces the mesh's, proxyMetadata entries are merged.
    let sources = [
        ("metadata.annotations", group.metadata.annotations.as_ref()),
        (
            "spec.metadata.annotations",
            group.spec.metadata.as_ref().map(|m| &m.annotations),
        ),
    ];
    for (place, annotations) in sources {
        let Some(text) = annotations.and_then(|a| a.get(PROXY_CONFIG_ANNOTATION)) else {
            continue;
        };
        let bad = |field: String, expected| Error::AnnotationField {
            place,
            group: group_key.clone(),
            field,
            expected,
        };
        let overlay = match parse_yaml(text).map_err(|source| Error::AnnotationYaml {
            place,
            group: group_key.clone(),
            source: Box::new(source),
        })? {
            Value::Null => continue,
            Value::Object(m) => m,
            _ => return Err(bad("(top level)".into(), "a mapping of ProxyConfig fields")),
        };
        for (key, value) in overlay {
            if value.is_null() {
                continue;
            }
            if key == "proxyMetadata" {
                let extra = string_map(Some(value), |field, expected| {
                    bad(format!("proxyMetadata{field}"), expected)
                })?;
                proxy_metadata.extend(extra);
            } else {
                let mut value = value;
                if let Value::Object(m) = &mut value {
                    drop_nulls(m);
                }
                proxy_config.insert(key, value);
            }
        }
    }
    drop_proto_zero_values(&mut proxy_config);

    // The readiness probe is always the group's (even when absent).
    match &group.spec.probe {
        Some(probe) if !probe.is_null() => {
            let mut probe = probe.clone();
            drop_zero_values(&mut probe);
            proxy_config.insert("readinessProbe".into(), probe);
        }
        _ => {
            proxy_config.remove("readinessProbe");
        }
    }

    // Labels: spec.metadata.labels overlaid by the template's (istioctl warns), then the
    // entry's own extra labels where the group says nothing.
    let mut labels: BTreeMap<String, String> = group
        .spec
        .metadata
        .as_ref()
        .map(|m| m.labels.clone())
        .unwrap_or_default();
    if !template.labels.is_empty() {
        warnings.push(format!(
            "Labels should be set in the metadata. The following WorkloadEntry labels will override metadata labels: {}",
            go_map_display(&template.labels)
        ));
        labels.extend(template.labels.clone());
    }
    for (k, v) in &inputs.extra_labels {
        labels.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let (canonical_name, canonical_revision) = canonical_service(&labels, name);

    let md = &mut proxy_metadata;
    md.insert("CANONICAL_SERVICE".into(), canonical_name.clone());
    md.insert("CANONICAL_REVISION".into(), canonical_revision.clone());
    md.insert("POD_NAMESPACE".into(), namespace.to_string());
    md.insert("SERVICE_ACCOUNT".into(), service_account.to_string());
    md.insert(
        "TRUST_DOMAIN".into(),
        inputs.mesh_config.trust_domain().to_string(),
    );
    md.insert("ISTIO_META_CLUSTER_ID".into(), inputs.cluster_id.clone());
    md.insert(
        "ISTIO_META_MESH_ID".into(),
        str_field(&proxy_config, "meshId").to_string(),
    );
    md.insert("ISTIO_META_NETWORK".into(), template.network.clone());
    if let Some(ports) = gojson::pod_ports(&template.ports) {
        md.insert("ISTIO_META_POD_PORTS".into(), ports);
    }
    md.insert("ISTIO_META_WORKLOAD_NAME".into(), name.to_string());
    labels.insert("service.istio.io/canonical-name".into(), canonical_name);
    labels.insert("service.istio.io/canonical-revision".into(), canonical_revision);
    md.insert("ISTIO_METAJSON_LABELS".into(), gojson::string_map(&labels));
    if inputs.capture_dns {
        md.insert("ISTIO_META_DNS_CAPTURE".into(), "true".into());
    }
    if inputs.autoregister {
        md.insert("ISTIO_META_AUTO_REGISTER_GROUP".into(), name.to_string());
    }
    if let Some(entry) = &inputs.workload_entry {
        md.insert("ISTIO_META_WORKLOAD_ENTRY".into(), entry.clone());
    }

    let status_port = status_port(&proxy_config)?;
    proxy_config.insert(
        "proxyMetadata".into(),
        Value::Object(
            proxy_metadata
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        ),
    );
    let mut root = Map::new();
    root.insert("defaultConfig".into(), Value::Object(proxy_config));
    let mesh_yaml = goyaml::marshal(&Value::Object(root));

    let cluster_env = render_cluster_env(
        proxy_metadata,
        inputs,
        template,
        name,
        namespace,
        service_account,
        status_port,
    )?;

    let hosts = match inputs.ingress_ip {
        Some(ip) => format!(
            "{ip} {}\n",
            istiod_host(&inputs.istio_namespace, &inputs.revision)
        ),
        None => String::new(),
    };

    Ok(Files {
        cluster_env,
        mesh_yaml,
        root_cert: inputs.root_cert.clone(),
        istio_token: inputs.token.clone(),
        hosts,
        warnings,
    })
}

fn render_cluster_env(
    mut env: BTreeMap<String, String>,
    inputs: &Inputs,
    template: &WorkloadEntrySpec,
    name: &str,
    namespace: &str,
    service_account: &str,
    status_port: i64,
) -> Result<String, Error> {
    let inbound = if template.ports.is_empty() {
        "*".to_string()
    } else {
        let ports: Vec<String> = template.ports.values().map(u32::to_string).collect();
        ports.join(",")
    };
    // 22: ssh; 15090: prometheus; 15021/15020: the agent.
    let mut exclude = "22,15090,15021".to_string();
    if status_port != 15090 && status_port != 15021 {
        if status_port != 0 {
            exclude.push_str(&format!(",{status_port}"));
        } else {
            exclude.push_str(",15020");
        }
    }
    env.insert("ISTIO_INBOUND_PORTS".into(), inbound);
    env.insert("ISTIO_NAMESPACE".into(), namespace.to_string());
    env.insert("ISTIO_SERVICE".into(), format!("{name}.{namespace}"));
    env.insert("ISTIO_SERVICE_CIDR".into(), "*".into());
    env.insert("ISTIO_LOCAL_EXCLUDE_PORTS".into(), exclude);
    env.insert("SERVICE_ACCOUNT".into(), service_account.to_string());
    if is_revisioned(&inputs.revision) {
        env.insert(
            "CA_ADDR".into(),
            istiod_addr(&inputs.istio_namespace, &inputs.revision),
        );
    }
    match inputs.instance_ip {
        Some(InstanceIp::Internal(ip)) => {
            env.insert("ISTIO_SVC_IP".into(), ip.to_string());
        }
        Some(InstanceIp::External(ip)) => {
            env.insert("ISTIO_SVC_IP".into(), ip.to_string());
            env.insert("REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION".into(), "true".into());
        }
        None => {}
    }
    cluster_env::render(&env)
}

/// Istio's canonical service name and revision (`pkg/kube/labels`).
pub(crate) fn canonical_service(labels: &BTreeMap<String, String>, workload: &str) -> (String, String) {
    let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
    let name = first(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
        .unwrap_or_else(|| workload.to_string());
    let revision = first(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".to_string());
    (name, revision)
}

/// Go's `%s` of a `map[string]string`: `map[k:v k2:v2]`.
fn go_map_display(map: &BTreeMap<String, String>) -> String {
    let items: Vec<String> = map.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    format!("map[{}]", items.join(" "))
}

pub(crate) fn str_field<'a>(map: &'a Map<String, Value>, key: &str) -> &'a str {
    map.get(key).and_then(Value::as_str).unwrap_or("")
}

/// `statusPort` as istioctl reads it (an int32; protobuf JSON also accepts a quoted number).
fn status_port(proxy_config: &Map<String, Value>) -> Result<i64, Error> {
    let bad = || mesh_field("defaultConfig.statusPort", "a port number");
    match proxy_config.get("statusPort") {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Number(n)) => n.as_i64().filter(|p| (0..=65535).contains(p)).ok_or_else(bad),
        Some(Value::String(s)) => s
            .parse::<i64>()
            .ok()
            .filter(|p| (0..=65535).contains(p))
            .ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

/// Reads a `map<string,string>` (proxyMetadata). Nulls are skipped; other non-strings are
/// reported through `bad(field, expected)`.
pub(crate) fn string_map(
    value: Option<Value>,
    bad: impl Fn(String, &'static str) -> Error,
) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    match value {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                match v {
                    Value::String(s) => {
                        out.insert(k, s);
                    }
                    Value::Null => {}
                    _ => return Err(bad(format!(".{k}"), "a string (quote it)")),
                }
            }
        }
        Some(_) => return Err(bad(String::new(), "a mapping of strings")),
    }
    Ok(out)
}

/// Protobuf JSON treats `null` as "not set".
pub(crate) fn drop_nulls(map: &mut Map<String, Value>) {
    map.retain(|_, v| !v.is_null());
    for v in map.values_mut() {
        if let Value::Object(m) = v {
            drop_nulls(m);
        }
    }
}

/// What the ProxyConfig proto drops on its way back to JSON at the top level: empty strings
/// (every top-level string field is a plain proto3 string) and zero plain int32 ports.
pub(crate) fn drop_proto_zero_values(map: &mut Map<String, Value>) {
    map.retain(|k, v| match v {
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => {
            !(matches!(k.as_str(), "statusPort" | "proxyAdminPort" | "statNameLength")
                && n.as_f64() == Some(0.0))
        }
        _ => true,
    });
}

/// The readiness probe is all proto3 scalars and lists: zero values are not printed.
fn drop_zero_values(value: &mut Value) {
    match value {
        Value::Object(m) => {
            m.retain(|_, v| match v {
                Value::Null | Value::Bool(false) => false,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::Array(a) => !a.is_empty(),
                Value::Object(_) | Value::Bool(true) => true,
            });
            m.values_mut().for_each(drop_zero_values);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_zero_values),
        _ => {}
    }
}

/// Parses YAML into a JSON value; empty (or comment-only) text is null.
pub(crate) fn parse_yaml(text: &str) -> Result<Value, serde_saphyr::Error> {
    let blank = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    if blank {
        return Ok(Value::Null);
    }
    serde_saphyr::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_service_fallbacks() {
        let l = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(canonical_service(&l(&[]), "wg"), ("wg".into(), "latest".into()));
        assert_eq!(
            canonical_service(&l(&[("app", "a"), ("version", "v1")]), "wg"),
            ("a".into(), "v1".into())
        );
        assert_eq!(
            canonical_service(
                &l(&[
                    ("app", "a"),
                    ("app.kubernetes.io/name", "b"),
                    ("app.kubernetes.io/version", "")
                ]),
                "wg"
            ),
            ("b".into(), "".into())
        );
    }

    #[test]
    fn debug_never_shows_the_token() {
        let inputs = Inputs {
            token: b"eyJsecret".to_vec(),
            ..Inputs::default()
        };
        assert!(!format!("{inputs:?}").contains("eyJsecret"));
        let files = Files {
            cluster_env: String::new(),
            mesh_yaml: String::new(),
            root_cert: Vec::new(),
            istio_token: b"eyJsecret".to_vec(),
            hosts: String::new(),
            warnings: Vec::new(),
        };
        assert!(!format!("{files:?}").contains("eyJsecret"));
        assert!(!format!("{:?}", files.entries()).contains("eyJsecret"));
    }

    #[test]
    fn mesh_config_shape_is_checked() {
        assert!(MeshConfig::from_yaml("").unwrap().as_map().is_empty());
        assert!(
            MeshConfig::from_yaml("# only a comment\n")
                .unwrap()
                .as_map()
                .is_empty()
        );
        assert!(matches!(
            MeshConfig::from_yaml("defaultConfig: 3"),
            Err(Error::MeshConfigField { .. })
        ));
        assert!(matches!(
            MeshConfig::from_yaml("[1]"),
            Err(Error::MeshConfigField { .. })
        ));
        assert!(matches!(
            MeshConfig::from_yaml("a: [unclosed"),
            Err(Error::MeshConfigYaml { .. })
        ));
        let m = MeshConfig::from_yaml("trustDomain: td\nunknownField: {x: 1}\n").unwrap();
        assert_eq!(m.trust_domain(), "td");
        assert!(m.as_map().contains_key("unknownField"));
    }
}
