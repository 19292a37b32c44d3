//! `gangplank workload`: drop-ins for `istioctl x workload entry configure` and
//! `istioctl x workload group create`.
//!
//! `entry configure -f GROUP.yaml` renders the five sidecar files with the same renderer the
//! endpoint uses (`gangplank-bootstrap`), so the output is byte-for-byte what istioctl writes.
//! istioctl reads the mesh config, root certificate and token from the cluster; here they come
//! from files (`--mesh-config`, `--root-cert`, `--token`), because reading them from
//! Kubernetes arrives with the Kubernetes registry.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::ArgAction;
use gangplank_bootstrap::{self as bootstrap, Inputs, InstanceIp, MeshConfig, istiod_host};
use serde_json::{Map, Value, json};

/// Arguments of `gangplank workload`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Commands dealing with WorkloadEntry resources.
    Entry(EntryArgs),
    /// Commands dealing with WorkloadGroup resources.
    Group(GroupArgs),
}

#[derive(Debug, clap::Args)]
struct EntryArgs {
    #[command(subcommand)]
    command: EntryCommand,
}

#[derive(Debug, clap::Subcommand)]
enum EntryCommand {
    /// Generate the configuration files for a workload instance on a VM (like
    /// `istioctl x workload entry configure`).
    #[command(long_about = CONFIGURE_ABOUT)]
    Configure(ConfigureArgs),
}

const CONFIGURE_ABOUT: &str = "\
Generate the configuration files for a workload instance on a VM or non-Kubernetes host from a
WorkloadGroup, exactly as `istioctl x workload entry configure` does: cluster.env, mesh.yaml,
root-cert.pem, istio-token and hosts, written into the --output directory.

Where each input comes from:
  WorkloadGroup   -f FILE (istioctl's -f path: missing spec.metadata/spec.template are filled in,
                  an empty serviceAccount becomes `default`). Reading it from the cluster with
                  --name/-n needs the Kubernetes registry, which is not built yet.
  mesh config     --mesh-config FILE: the `mesh` key of ConfigMap istio[-<revision>] in the istio
                  namespace (a ConfigMap YAML is accepted too); empty when not given.
  root cert       --root-cert FILE (required): key `root-cert.pem` of ConfigMap
                  istio-ca-root-cert in the WorkloadGroup's namespace.
  token           --token FILE: a token for the group's service account with audience istio-ca,
                  e.g. `kubectl create token SA -n NS --audience istio-ca --duration 3600s`.
                  Without it istio-token is empty (a warning says what to put there).
  cluster ID      --clusterID (required without a cluster: istioctl reads it from ConfigMap
                  istio-sidecar-injector[-<revision>]); --clusterID '' is accepted.
  gateway address --ingressIP: the east-west gateway IP for the hosts file; without it hosts is
                  empty (istioctl would look up --ingressService in the cluster).

Files are written with mode 0644, except istio-token (0600); istioctl writes 0744 for all.

Examples:
  gangplank workload entry configure -f workloadgroup.yaml --mesh-config mesh.yaml \\
    --root-cert root-cert.pem --token token.jwt --clusterID Kubernetes \\
    --internalIP 10.0.0.5 --ingressIP 203.0.113.10 -o config";

#[derive(Debug, clap::Args)]
struct ConfigureArgs {
    /// The WorkloadGroup YAML file.
    #[arg(short = 'f', long = "file", value_name = "FILE", conflicts_with = "name")]
    file: Option<PathBuf>,
    /// Name of a WorkloadGroup in the cluster (needs the Kubernetes registry; not built yet).
    #[arg(long)]
    name: Option<String>,
    /// Namespace of the WorkloadGroup (with -f: used only when the file names none).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// Output directory for the generated files (created if missing).
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    output: PathBuf,
    /// The ID istiod knows its cluster by (ISTIO_META_CLUSTER_ID).
    #[arg(long = "clusterID", value_name = "ID")]
    cluster_id: Option<String>,
    /// IP address of the gateway the VM reaches istiod through (written to hosts).
    #[arg(long = "ingressIP", value_name = "IP")]
    ingress_ip: Option<IpAddr>,
    /// Internal IP address of the workload (ISTIO_SVC_IP).
    #[arg(long = "internalIP", value_name = "IP", conflicts_with = "external_ip")]
    internal_ip: Option<IpAddr>,
    /// External IP address of the workload (ISTIO_SVC_IP, and probes rewritten to it).
    #[arg(long = "externalIP", value_name = "IP")]
    external_ip: Option<IpAddr>,
    /// Control plane revision ("" or "default": none).
    #[arg(short = 'r', long, default_value = "")]
    revision: String,
    /// The namespace istiod runs in.
    #[arg(short = 'i', long = "istioNamespace", default_value = bootstrap::DEFAULT_ISTIO_NAMESPACE)]
    istio_namespace: String,
    /// Token lifetime in seconds, used in the hint for --token (istioctl: the TokenRequest).
    #[arg(long = "tokenDuration", default_value_t = 3600, value_name = "SECONDS")]
    token_duration: i64,
    /// Have istiod create the WorkloadEntry when the sidecar connects.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value_t = false, default_missing_value = "true", value_name = "BOOL")]
    autoregister: bool,
    /// Capture the workload's DNS queries in the sidecar (`--capture-dns=false` to turn off).
    #[arg(long = "capture-dns", action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value_t = true, default_missing_value = "true", value_name = "BOOL")]
    capture_dns: bool,
    /// Gateway Service (`svc` or `svc.ns`) istioctl would look up when --ingressIP is not
    /// given; without a cluster, hosts stays empty.
    #[arg(long = "ingressService", default_value = "istio-eastwestgateway")]
    ingress_service: String,
    /// The mesh config YAML (ConfigMap istio[-<revision>], key `mesh`), or the whole ConfigMap.
    #[arg(long = "mesh-config", value_name = "FILE")]
    mesh_config: Option<PathBuf>,
    /// The mesh root certificate (ConfigMap istio-ca-root-cert, key root-cert.pem). Required.
    #[arg(long = "root-cert", value_name = "FILE")]
    root_cert: Option<PathBuf>,
    /// A token for the group's service account with audience istio-ca.
    #[arg(long = "token", value_name = "FILE")]
    token: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct GroupArgs {
    #[command(subcommand)]
    command: GroupCommand,
}

#[derive(Debug, clap::Subcommand)]
enum GroupCommand {
    /// Print a WorkloadGroup YAML (like `istioctl x workload group create`), ready for
    /// `kubectl apply -f -`.
    Create(CreateArgs),
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// The name of the workload group.
    #[arg(long)]
    name: String,
    /// The namespace the workload instances belong to.
    #[arg(short = 'n', long)]
    namespace: String,
    /// Labels for the workload instances, e.g. -l env=prod,vers=2.
    #[arg(short = 'l', long, value_delimiter = ',', value_name = "K=V")]
    labels: Vec<String>,
    /// Annotations for the workload instances.
    #[arg(short = 'a', long, value_delimiter = ',', value_name = "K=V")]
    annotations: Vec<String>,
    /// Ports the workload listens on, e.g. -p http=8080,grpc=3550.
    #[arg(short = 'p', long, value_delimiter = ',', value_name = "NAME=PORT")]
    ports: Vec<String>,
    /// The service account the workload instances run as.
    #[arg(short = 's', long = "serviceAccount", default_value = "default")]
    service_account: String,
    /// The network the workload instances are in.
    #[arg(long, default_value = "")]
    network: String,
    /// region/zone/subzone of the workload instances.
    #[arg(long, default_value = "")]
    locality: String,
    /// Load-balancing weight of each instance.
    #[arg(short = 'w', long, default_value_t = 0)]
    weight: u32,
}

/// Runs `gangplank workload ...`.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Entry(EntryArgs {
            command: EntryCommand::Configure(args),
        }) => configure(args),
        Command::Group(GroupArgs {
            command: GroupCommand::Create(args),
        }) => {
            gangplank_stdout::print(group_yaml(&args)?)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn configure(args: ConfigureArgs) -> anyhow::Result<ExitCode> {
    // Everything is read and rendered before the output directory is touched, so a mistake
    // writes nothing.
    let Some(file) = &args.file else {
        if args.name.is_some() && args.namespace.is_some() {
            bail!(
                "reading the WorkloadGroup from the cluster (--name/-n) needs the Kubernetes registry, which is not built yet: \
                 export it (`kubectl get workloadgroup NAME -n NS -o yaml > wg.yaml`) and pass -f wg.yaml with --mesh-config and --root-cert"
            );
        }
        bail!(
            "expecting a WorkloadGroup artifact file (-f) or the name and namespace of an existing WorkloadGroup (--name and -n)"
        );
    };
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the WorkloadGroup file {}", file.display()))?;
    let mut group = bootstrap::group_from_yaml(&text, &file.display().to_string())?;
    match (&group.metadata.namespace, &args.namespace) {
        (Some(in_file), Some(flag)) if !in_file.is_empty() && in_file != flag => bail!(
            "{} is in namespace {in_file:?} but -n says {flag:?}: drop -n or fix the file",
            file.display()
        ),
        (None, Some(flag)) => group.metadata.namespace = Some(flag.clone()),
        (Some(in_file), Some(flag)) if in_file.is_empty() => group.metadata.namespace = Some(flag.clone()),
        _ => {}
    }

    let Some(cluster_id) = args.cluster_id.clone() else {
        bail!(
            "failed to automatically determine the --clusterID: reading ConfigMap istio-sidecar-injector needs the Kubernetes registry, \
             which is not built yet; pass --clusterID (the cluster ID istiod runs with, e.g. Kubernetes)"
        );
    };
    let Some(root_cert_path) = &args.root_cert else {
        bail!(
            "--root-cert FILE is required with -f: the mesh's root certificate, e.g. \
             `kubectl get configmap istio-ca-root-cert -n NAMESPACE -o jsonpath='{{.data.root-cert\\.pem}}' > root-cert.pem`"
        );
    };
    let root_cert = std::fs::read(root_cert_path)
        .with_context(|| format!("reading the root certificate {}", root_cert_path.display()))?;
    let mesh_config = match &args.mesh_config {
        Some(path) => read_mesh_config(path)?,
        None => MeshConfig::default(),
    };
    let token = match &args.token {
        Some(path) => {
            let mut token =
                std::fs::read(path).with_context(|| format!("reading the token file {}", path.display()))?;
            // `kubectl create token > file` ends the file with a newline; istioctl writes the bare JWT.
            while token.last().is_some_and(|b| b.is_ascii_whitespace()) {
                token.pop();
            }
            token
        }
        None => Vec::new(),
    };

    let mut inputs = Inputs::new(group);
    inputs.mesh_config = mesh_config;
    inputs.root_cert = root_cert;
    inputs.token = token;
    inputs.cluster_id = cluster_id;
    inputs.revision = args.revision.clone();
    inputs.istio_namespace = args.istio_namespace.clone();
    inputs.ingress_ip = args.ingress_ip;
    inputs.instance_ip = match (args.internal_ip, args.external_ip) {
        (Some(ip), _) => Some(InstanceIp::Internal(ip)),
        (None, Some(ip)) => Some(InstanceIp::External(ip)),
        (None, None) => None,
    };
    inputs.capture_dns = args.capture_dns;
    inputs.autoregister = args.autoregister;
    let files = bootstrap::render(&inputs)?;

    for warning in &files.warnings {
        eprintln!("Warning: {warning}");
    }
    write_files(&args.output, &files)?;

    let namespace = inputs.group.metadata.namespace.as_deref().unwrap_or_default();
    let service_account = inputs.group.service_account();
    let token_path = args.output.join("istio-token");
    if inputs.token.is_empty() {
        eprintln!(
            "Warning: no --token given, so {} is empty: put a token for service account {service_account:?} in namespace {namespace:?} there \
             (`kubectl create token {service_account} -n {namespace} --audience istio-ca --duration {}s`)",
            token_path.display(),
            args.token_duration
        );
    } else {
        eprintln!(
            "Warning: a security token for namespace {namespace:?} and service account {service_account:?} has been stored at {:?}",
            token_path.display().to_string()
        );
    }
    if inputs.ingress_ip.is_none() {
        eprintln!(
            "Warning: Could not auto-detect IP for {}/{}. Use --ingressIP to manually specify the Gateway address to reach istiod from the VM \
             (looking up Service {} needs the Kubernetes registry, which is not built yet).",
            istiod_host(&inputs.istio_namespace, &inputs.revision),
            inputs.istio_namespace,
            args.ingress_service
        );
    }
    gangplank_stdout::println(format_args!(
        "Configuration generation into directory {} was successful",
        args.output.display()
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// Reads the mesh config: the `mesh` YAML itself, or a ConfigMap holding it under `data.mesh`.
fn read_mesh_config(path: &Path) -> anyhow::Result<MeshConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the mesh config {}", path.display()))?;
    let mesh = MeshConfig::from_yaml(&text).with_context(|| format!("in {}", path.display()))?;
    if mesh.as_map().get("kind").and_then(Value::as_str) != Some("ConfigMap") {
        return Ok(mesh);
    }
    let Some(inner) = mesh
        .as_map()
        .get("data")
        .and_then(|d| d.get("mesh"))
        .and_then(Value::as_str)
    else {
        bail!(
            "{} is a ConfigMap without a `mesh` key in data: pass ConfigMap istio[-<revision>] from the istio namespace",
            path.display()
        );
    };
    MeshConfig::from_yaml(inner).with_context(|| format!("in data.mesh of {}", path.display()))
}

/// Creates `dir` if needed and replaces every file atomically ([`gangplank_fs::write`]), with
/// its exact mode set before it becomes visible.
fn write_files(dir: &Path, files: &bootstrap::Files) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the output directory {}", dir.display()))?;
    for file in files.entries() {
        let path = dir.join(file.name);
        gangplank_fs::write(&path, &file.content, file.mode)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The WorkloadGroup YAML `istioctl x workload group create` prints for these flags.
fn group_yaml(args: &CreateArgs) -> anyhow::Result<String> {
    if args.name.is_empty() {
        bail!("expecting a workload name");
    }
    if args.namespace.is_empty() {
        bail!("expecting a workload namespace");
    }
    let pairs = |items: &[String]| -> Map<String, Value> {
        items
            .iter()
            .map(|item| {
                let (k, v) = item.split_once('=').unwrap_or((item, ""));
                (k.to_string(), Value::String(v.to_string()))
            })
            .collect()
    };
    let mut ports = BTreeMap::new();
    for item in &args.ports {
        let (name, port) = item.split_once('=').unwrap_or((item, ""));
        let port: u32 = port
            .parse()
            .with_context(|| format!("--ports {item:?}: expected NAME=PORT with a port number"))?;
        ports.insert(name.to_string(), port);
    }
    let mut metadata = Map::new();
    let (labels, annotations) = (pairs(&args.labels), pairs(&args.annotations));
    if !annotations.is_empty() {
        metadata.insert("annotations".into(), Value::Object(annotations));
    }
    if !labels.is_empty() {
        metadata.insert("labels".into(), Value::Object(labels));
    }
    let mut template = Map::new();
    if !ports.is_empty() {
        template.insert("ports".into(), json!(ports));
    }
    for (key, value) in [
        ("serviceAccount", &args.service_account),
        ("network", &args.network),
        ("locality", &args.locality),
    ] {
        if !value.is_empty() {
            template.insert(key.into(), Value::String(value.clone()));
        }
    }
    if args.weight != 0 {
        template.insert("weight".into(), json!(args.weight));
    }
    let group = json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadGroup",
        "metadata": {"name": args.name, "namespace": args.namespace},
        "spec": {"metadata": metadata, "template": template},
    });
    Ok(bootstrap::goyaml::marshal(&group))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn create(argv: &str) -> anyhow::Result<String> {
        let cli = Cli::try_parse_from(std::iter::once("workload").chain(argv.split_whitespace()))?;
        match cli.args.command {
            Command::Group(GroupArgs {
                command: GroupCommand::Create(args),
            }) => group_yaml(&args),
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn group_create_matches_istioctl() {
        assert_eq!(
            create("group create --name foo --namespace bar").unwrap(),
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata:\n  name: foo\n  namespace: bar\nspec:\n  metadata: {}\n  template:\n    serviceAccount: default\n"
        );
        let full = "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata:\n  name: foo\n  namespace: bar\nspec:\n  metadata:\n    annotations:\n      annotation: foobar\n    labels:\n      app: foo\n      bar: baz\n  template:\n    ports:\n      grpc: 3550\n      http: 8080\n    serviceAccount: test\n    weight: 100\n";
        assert_eq!(
            create(
                "group create --name foo --namespace bar --labels app=foo,bar=baz --annotations annotation=foobar --ports grpc=3550,http=8080 --serviceAccount test --weight 100"
            )
            .unwrap(),
            full
        );
        assert_eq!(
            create("group create --name foo -n bar -l app=foo,bar=baz -p grpc=3550,http=8080 -a annotation=foobar --serviceAccount test --weight 100")
                .unwrap(),
            full
        );
        assert!(create("group create -n bar").is_err());
        assert!(create("group create --name foo -n bar -p http=eighty").is_err());
    }

    #[test]
    fn capture_dns_takes_an_optional_value() {
        let parse = |extra: &str| {
            let argv = format!("entry configure -f wg.yaml -o out {extra}");
            let cli =
                Cli::try_parse_from(std::iter::once("workload").chain(argv.split_whitespace())).unwrap();
            match cli.args.command {
                Command::Entry(EntryArgs {
                    command: EntryCommand::Configure(a),
                }) => (a.capture_dns, a.autoregister),
                other => panic!("parsed {other:?}"),
            }
        };
        assert_eq!(parse(""), (true, false));
        assert_eq!(parse("--capture-dns=false --autoregister"), (false, true));
        assert_eq!(parse("--capture-dns --autoregister=false"), (true, false));
    }
}
