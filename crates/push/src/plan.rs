//! What is done on one VM, step by step: the files (rendered by `gangplank-bootstrap`, the
//! one renderer) and the commands, for the `docker` and `systemd` runtimes. A plan is data:
//! `--dry-run` prints it, [`crate::ssh`] executes it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use gangplank_api::istio::{GroupMetadata, WorkloadEntry, WorkloadGroup, WorkloadGroupSpec};
use gangplank_api::meta::ObjectMeta;
use gangplank_bootstrap::docker;
use gangplank_bootstrap::{DockerInputs, Inputs, InstanceIp, MeshConfig, TOKEN_MODE, layout};

use crate::target::{Target, annotation, is_plain_abs_path};

/// Mode of every file but the token.
pub const FILE_MODE: u32 = 0o644;

/// The user the systemd runtime's files belong to, when the VM has it (Istio's package
/// creates it and runs the proxy as it; the token is 0600, so it must own it).
pub const PROXY_USER: &str = "istio-proxy";

/// First line of the push's block in the VM's hosts file (systemd runtime).
pub const HOSTS_BEGIN: &str = "# BEGIN gangplank sidecar-bootstrap";
/// Last line of the push's block in the VM's hosts file.
pub const HOSTS_END: &str = "# END gangplank sidecar-bootstrap";

/// How the sidecar runs on the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Runtime {
    /// The `istio-proxy` container, host network (Tetrate's flow).
    #[default]
    Docker,
    /// Istio's `.deb`/`.rpm` package and its `istio` systemd unit (native VM layout).
    Systemd,
}

/// Why a plan could not be made for a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The renderer refused the inputs.
    #[error("rendering the sidecar files for {entry}: {source}")]
    Render {
        /// `namespace/name`.
        entry: String,
        /// The renderer's error.
        source: Box<gangplank_bootstrap::Error>,
    },
    /// No image can be named for `docker run`.
    #[error(
        "workload entry {entry} has no proxy image: set the annotation {} (or {}), or pass --proxy-image-hub",
        annotation::PROXY_IMAGE_HUB,
        annotation::PROXY_IMAGE
    )]
    MissingImageHub {
        /// `namespace/name`.
        entry: String,
    },
    /// The image tag is unknown.
    #[error("no proxy image tag for {entry}: pass --proxy-tag (the Istio version of the mesh, e.g. 1.27.1)")]
    MissingTag {
        /// `namespace/name`.
        entry: String,
    },
    /// An image reference that would need shell quoting.
    #[error("workload entry {entry}: proxy image {image:?} is not a valid image reference")]
    BadImage {
        /// `namespace/name`.
        entry: String,
        /// The image.
        image: String,
    },
    /// The remote root is not a plain absolute path.
    #[error("--remote-root {0:?} must be an absolute path of letters, digits and ._-/")]
    BadRemoteRoot(String),
}

/// What every plan shares: the mesh's material and the command's choices.
#[derive(Clone)]
pub struct Material {
    /// The mesh config.
    pub mesh_config: MeshConfig,
    /// The mesh root certificate(s), PEM.
    pub root_cert: Vec<u8>,
    /// `ISTIO_META_CLUSTER_ID` (empty: `Kubernetes`).
    pub cluster_id: String,
    /// The namespace istiod runs in.
    pub istio_namespace: String,
    /// Control plane revision (empty: none).
    pub revision: String,
    /// Tag of the `proxyv2` image.
    pub proxy_tag: Option<String>,
    /// Prefix of Istio's native layout on the VM (systemd runtime); `/` normally.
    pub remote_root: String,
    /// How the sidecar runs.
    pub runtime: Runtime,
    /// Whether to (re)start the sidecar after copying.
    pub start: bool,
    /// The gateway address the VMs reach istiod through (systemd runtime: the `hosts`
    /// entries); `None` leaves the hosts file alone.
    pub ingress_ip: Option<IpAddr>,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("root_cert", &format_args!("<{} bytes>", self.root_cert.len()))
            .field("istio_namespace", &self.istio_namespace)
            .field("runtime", &self.runtime)
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

/// A service-account token (secret: never printed, never in Debug).
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl Token {
    /// Wraps the token bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The token bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token(<redacted, {} bytes>)", self.0.len())
    }
}

/// One step on the VM.
#[derive(Clone, PartialEq, Eq)]
pub enum Step {
    /// Run a shell command.
    Exec {
        /// The command line (interpreted by the remote login shell).
        command: String,
        /// Whether a non-zero exit is tolerated (`docker rm --force` of a missing container).
        ignore_failure: bool,
    },
    /// Write a file atomically (temp name in the same directory, chmod, chown, rename).
    Copy {
        /// Absolute remote path.
        path: String,
        /// Content.
        content: Vec<u8>,
        /// Unix mode.
        mode: u32,
        /// Whether the content is a secret (redacted when printed).
        secret: bool,
        /// A user to give the file to, when the VM has that user (its primary group too).
        owner: Option<String>,
    },
    /// Make `entries` the push's marked block in a hosts file: the old block is taken out
    /// and the new one appended, so pushing again changes nothing; the file's other lines,
    /// owner and mode stay.
    Hosts {
        /// Absolute remote path of the hosts file.
        path: String,
        /// The lines, each `IP NAME...`.
        entries: String,
    },
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Exec { command, .. } => write!(f, "Exec({command})"),
            Step::Copy {
                path, mode, content, ..
            } => {
                write!(f, "Copy({path}, {mode:o}, {} bytes)", content.len())
            }
            Step::Hosts { path, entries } => write!(f, "Hosts({path}, {entries:?})"),
        }
    }
}

/// Tense of the printed steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tense {
    /// `--dry-run`: "going to ...".
    Future,
    /// A real run: "connecting to ...".
    Present,
}

impl Step {
    /// The seed's line for this step (without content).
    pub fn headline(&self, tense: Tense) -> String {
        match (self, tense) {
            (Step::Exec { command, .. }, Tense::Future) => {
                format!("[SSH client] going to execute a command remotely: {command}")
            }
            (Step::Exec { command, .. }, Tense::Present) => {
                format!("[SSH client] executing a command remotely: {command}")
            }
            (Step::Copy { path, .. }, Tense::Future) => {
                format!(
                    "[SSH client] going to copy into a remote file: {path} ({})",
                    self.attributes()
                )
            }
            (Step::Copy { path, .. }, Tense::Present) => {
                format!(
                    "[SSH client] copying into a remote file: {path} ({})",
                    self.attributes()
                )
            }
            (Step::Hosts { path, .. }, Tense::Future) => {
                format!("[SSH client] going to update the {HOSTS_BEGIN:?} block of a remote file: {path}")
            }
            (Step::Hosts { path, .. }, Tense::Present) => {
                format!("[SSH client] updating the {HOSTS_BEGIN:?} block of a remote file: {path}")
            }
        }
    }

    /// A copy's mode and owner as printed (`mode 0600, owner istio-proxy if that user
    /// exists`); empty for other steps.
    fn attributes(&self) -> String {
        match self {
            Step::Copy {
                mode, owner: None, ..
            } => format!("mode {mode:04o}"),
            Step::Copy {
                mode,
                owner: Some(user),
                ..
            } => format!("mode {mode:04o}, owner {user} if that user exists"),
            _ => String::new(),
        }
    }
}

/// Everything to do on one VM.
#[derive(Clone)]
pub struct Plan {
    /// Where.
    pub target: Target,
    /// What, in order.
    pub steps: Vec<Step>,
}

impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plan")
            .field("target", &self.target)
            .field("steps", &self.steps)
            .finish()
    }
}

/// The line printed when connecting.
pub fn connect_line(target: &Target, tense: Tense) -> String {
    match tense {
        Tense::Future => format!("[SSH client] going to connect to {}", target.destination()),
        Tense::Present => format!("[SSH client] connecting to {}", target.destination()),
    }
}

/// The line printed when closing.
pub fn close_line(tense: Tense) -> String {
    match tense {
        Tense::Future => "[SSH client] going to close connection".into(),
        Tense::Present => "[SSH client] closing connection".into(),
    }
}

impl Plan {
    /// Builds the plan for `entry` at `target`.
    pub fn build(
        entry: &WorkloadEntry,
        target: Target,
        material: &Material,
        token: &Token,
    ) -> Result<Self, Error> {
        let steps = match material.runtime {
            Runtime::Docker => docker_steps(entry, &target, material, token)?,
            Runtime::Systemd => systemd_steps(entry, &target, material, token)?,
        };
        Ok(Self { target, steps })
    }

    /// The whole plan as `--dry-run` prints it (or the real run, in the present tense),
    /// the token redacted unless `show_secrets`.
    pub fn describe(&self, tense: Tense, show_secrets: bool) -> String {
        let mut out = format!("\n{}\n", connect_line(&self.target, tense));
        for step in &self.steps {
            out.push('\n');
            out.push_str(&step.headline(tense));
            out.push('\n');
            match step {
                Step::Copy { content, secret, .. } => {
                    if *secret && !show_secrets {
                        out.push_str(&format!(
                            "<redacted: {} bytes; pass --show-secrets to print>\n",
                            content.len()
                        ));
                    } else {
                        let text = String::from_utf8_lossy(content);
                        out.push_str(&text);
                        if !text.ends_with('\n') {
                            out.push('\n');
                        }
                    }
                }
                Step::Hosts { entries, .. } => {
                    out.push_str(&format!("{HOSTS_BEGIN}\n{entries}"));
                    if !entries.ends_with('\n') {
                        out.push('\n');
                    }
                    out.push_str(&format!("{HOSTS_END}\n"));
                }
                Step::Exec { .. } => {}
            }
        }
        out.push('\n');
        out.push_str(&close_line(tense));
        out.push('\n');
        out
    }
}

fn entry_id(entry: &WorkloadEntry) -> String {
    format!(
        "{}/{}",
        entry.metadata.namespace.as_deref().unwrap_or(""),
        entry.metadata.name.as_deref().unwrap_or("")
    )
}

fn docker_steps(
    entry: &WorkloadEntry,
    target: &Target,
    material: &Material,
    token: &Token,
) -> Result<Vec<Step>, Error> {
    let id = entry_id(entry);
    let env = gangplank_bootstrap::render_docker_env(&DockerInputs {
        entry,
        mesh_config: &material.mesh_config,
        cluster_id: &material.cluster_id,
        istio_namespace: &material.istio_namespace,
        revision: &material.revision,
        instance_ip: target.instance_ip,
    })
    .map_err(|source| Error::Render {
        entry: id.clone(),
        source: Box::new(source),
    })?;
    let dir = &target.config_dir;
    let mut steps = vec![
        Step::Exec {
            command: format!("mkdir -p {dir}"),
            ignore_failure: false,
        },
        Step::Copy {
            path: format!("{dir}/sidecar.env"),
            content: env.into_bytes(),
            mode: FILE_MODE,
            secret: false,
            owner: None,
        },
        Step::Copy {
            path: format!("{dir}/istio-ca.pem"),
            content: material.root_cert.clone(),
            mode: FILE_MODE,
            secret: false,
            owner: None,
        },
        Step::Copy {
            path: format!("{dir}/istio-token"),
            content: token.expose().to_vec(),
            mode: TOKEN_MODE,
            secret: true,
            owner: None,
        },
    ];
    if material.start {
        let image = match (&target.image, &target.image_hub) {
            (Some(image), _) => image.clone(),
            (None, Some(hub)) => {
                let tag = material
                    .proxy_tag
                    .as_deref()
                    .ok_or_else(|| Error::MissingTag { entry: id.clone() })?;
                format!("{}/proxyv2:{tag}", hub.trim_end_matches('/'))
            }
            (None, None) => return Err(Error::MissingImageHub { entry: id }),
        };
        let image_ok = !image.starts_with('-')
            && image
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c));
        if !image_ok {
            return Err(Error::BadImage { entry: id, image });
        }
        steps.push(Step::Exec {
            command: format!("docker {}", docker::remove_args(&target.container).join(" ")),
            ignore_failure: true,
        });
        // The agent's recipe: the token's directory (this bundle's) is mounted, so a token
        // pushed again without restarting the container reaches the running proxy. Every
        // part is a plain path or a checked image reference: no shell quoting needed.
        let run = docker::run_args(&docker::Run {
            name: &target.container,
            image: &image,
            root_cert: &format!("{dir}/istio-ca.pem"),
            token_dir: dir,
            mesh: None,
            env: docker::Env::File(&format!("{dir}/sidecar.env")),
        });
        steps.push(Step::Exec {
            command: format!("docker {}", run.join(" ")),
            ignore_failure: false,
        });
    }
    Ok(steps)
}

fn systemd_steps(
    entry: &WorkloadEntry,
    target: &Target,
    material: &Material,
    token: &Token,
) -> Result<Vec<Step>, Error> {
    let id = entry_id(entry);
    let root = material.remote_root.trim_end_matches('/');
    if !(material.remote_root == "/" || is_plain_abs_path(root)) {
        return Err(Error::BadRemoteRoot(material.remote_root.clone()));
    }
    // The renderer works on a WorkloadGroup: this entry is a group of one.
    let mut labels: BTreeMap<String, String> = entry.spec.labels.clone();
    labels.extend(entry.metadata.labels.clone().unwrap_or_default());
    let mut template = entry.spec.clone();
    template.address.clear();
    template.labels.clear();
    let group = WorkloadGroup {
        api_version: "networking.istio.io/v1".into(),
        kind: "WorkloadGroup".into(),
        metadata: ObjectMeta {
            name: entry.metadata.name.clone(),
            namespace: entry.metadata.namespace.clone(),
            annotations: entry.metadata.annotations.clone(),
            ..Default::default()
        },
        spec: WorkloadGroupSpec {
            metadata: Some(GroupMetadata {
                labels,
                annotations: BTreeMap::new(),
            }),
            template: Some(template),
            probe: None,
        },
    };
    let mut inputs = Inputs::new(group);
    inputs.mesh_config = material.mesh_config.clone();
    inputs.root_cert = material.root_cert.clone();
    inputs.token = token.expose().to_vec();
    inputs.cluster_id = material.cluster_id.clone();
    inputs.revision = material.revision.clone();
    inputs.istio_namespace = material.istio_namespace.clone();
    inputs.instance_ip = target.instance_ip.map(InstanceIp::Internal);
    inputs.ingress_ip = material.ingress_ip;
    inputs.workload_entry = entry.metadata.name.clone();
    let files = gangplank_bootstrap::render(&inputs).map_err(|source| Error::Render {
        entry: id,
        source: Box::new(source),
    })?;
    // Istio's package layout under the remote root (`root` has no trailing `/`).
    let path = |abs: &str| format!("{root}{abs}");
    let dirs: Vec<String> = [
        layout::CLUSTER_ENV,
        layout::MESH,
        layout::ROOT_CERT,
        layout::TOKEN,
    ]
    .iter()
    .map(|p| path(p.rsplit_once('/').map_or("", |(d, _)| d)))
    .collect();
    let owner = Some(PROXY_USER.to_string());
    let copy = |abs: &str, content: Vec<u8>, mode: u32, secret: bool| Step::Copy {
        path: path(abs),
        content,
        mode,
        secret,
        owner: owner.clone(),
    };
    let mut steps = vec![
        Step::Exec {
            command: format!("mkdir -p {}", dirs.join(" ")),
            ignore_failure: false,
        },
        // Istio's guide gives these folders to the proxy's user too (it writes its
        // certificates into /etc/certs); numeric ids, so a user without a group of its own
        // name works.
        Step::Exec {
            command: format!(
                "if o=$(id -u {PROXY_USER} 2>/dev/null):$(id -g {PROXY_USER} 2>/dev/null); then chown \"$o\" {}; fi",
                dirs.join(" ")
            ),
            ignore_failure: false,
        },
        copy(
            layout::CLUSTER_ENV,
            files.cluster_env.into_bytes(),
            FILE_MODE,
            false,
        ),
        copy(layout::MESH, files.mesh_yaml.into_bytes(), FILE_MODE, false),
        copy(layout::ROOT_CERT, files.root_cert, FILE_MODE, false),
        copy(layout::TOKEN, files.istio_token, TOKEN_MODE, true),
    ];
    if !files.hosts.trim().is_empty() {
        steps.push(Step::Hosts {
            path: path(layout::HOSTS),
            entries: files.hosts,
        });
    }
    if material.start {
        steps.push(Step::Exec {
            command: "systemctl restart istio".into(),
            ignore_failure: false,
        });
    }
    Ok(steps)
}
