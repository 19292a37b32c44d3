//! Where a WorkloadEntry's VM is and how to reach it: the `sidecar-bootstrap.istio.io/*`
//! annotations (Tetrate's names and defaults), overridden by command-line flags.

use std::fmt;
use std::net::IpAddr;

use gangplank_api::NamespacedName;
use gangplank_api::istio::WorkloadEntry;

/// The annotations read from a WorkloadEntry (Tetrate's `sidecar-bootstrap` names), and
/// [`ALL`](annotation::ALL), their one description (`--help` prints it).
pub mod annotation {
    /// Where to SSH (default: `spec.address`).
    pub const SSH_HOST: &str = "sidecar-bootstrap.istio.io/ssh-host";
    /// The SSH user (default: `--ssh-user`, else the SSH client's own default).
    pub const SSH_USER: &str = "sidecar-bootstrap.istio.io/ssh-user";
    /// The SSH port (default: `--ssh-port`, else the SSH client's own default, 22).
    pub const SSH_PORT: &str = "sidecar-bootstrap.istio.io/ssh-port";
    /// The `scp` binary on the VM; when set, files are copied with it (SCP protocol).
    pub const SCP_PATH: &str = "sidecar-bootstrap.istio.io/scp-path";
    /// The remote directory for the Docker bundle (default [`super::DEFAULT_CONFIG_DIR`]).
    pub const PROXY_CONFIG_DIR: &str = "sidecar-bootstrap.istio.io/proxy-config-dir";
    /// The registry the `proxyv2` image comes from (`<hub>/proxyv2:<tag>`).
    pub const PROXY_IMAGE_HUB: &str = "sidecar-bootstrap.istio.io/proxy-image-hub";
    /// The name of the proxy's container (default `istio-proxy`).
    pub const PROXY_CONTAINER_NAME: &str = "sidecar-bootstrap.istio.io/proxy-container-name";
    /// The IP the proxy binds its inbound listeners to (default: `spec.address`).
    pub const PROXY_INSTANCE_IP: &str = "sidecar-bootstrap.istio.io/proxy-instance-ip";
    /// On the Istio namespace: a ConfigMap whose `PROXY_CONFIG` key (ProxyConfig YAML) is
    /// applied over the mesh's `defaultConfig` for every VM (cluster mode).
    pub const MESH_EXPANSION_CONFIGMAP: &str = "sidecar-bootstrap.istio.io/mesh-expansion-configmap";
    /// A full proxy image, overriding hub and tag (standard Istio annotation).
    pub const PROXY_IMAGE: &str = "sidecar.istio.io/proxyImage";
    /// ProxyConfig overrides for this VM (standard Istio annotation).
    pub const PROXY_CONFIG: &str = "proxy.istio.io/config";

    /// One annotation as `--help` describes it.
    #[derive(Debug, Clone, Copy)]
    pub struct Doc {
        /// The annotation.
        pub name: &'static str,
        /// What it does.
        pub meaning: &'static str,
        /// What applies when it is absent.
        pub default: &'static str,
    }

    /// Every annotation `sidecar-bootstrap` reads, in the order `--help` lists them.
    pub const ALL: &[Doc] = &[
        Doc {
            name: SSH_HOST,
            meaning: "host name or IP to SSH to (e.g. the VM's public IP when spec.address is its private one)",
            default: "spec.address",
        },
        Doc {
            name: SSH_PORT,
            meaning: "SSH port (--ssh-port overrides)",
            default: "the ssh config's Port, else 22",
        },
        Doc {
            name: SSH_USER,
            meaning: "SSH user; it must be able to write the files and run docker/systemctl (--ssh-user overrides)",
            default: "the ssh config's User, else the local user",
        },
        Doc {
            name: SCP_PATH,
            meaning: "scp binary on the VM: files are copied with it (SCP protocol) instead of inside the step script",
            default: "none: files travel inside the step script (sh, base64 and mktemp on the VM)",
        },
        Doc {
            name: PROXY_CONFIG_DIR,
            meaning: "docker runtime: directory for sidecar.env, istio-ca.pem and istio-token (--proxy-config-dir overrides)",
            default: super::DEFAULT_CONFIG_DIR,
        },
        Doc {
            name: PROXY_IMAGE_HUB,
            meaning: "docker runtime: registry of the image, <hub>/proxyv2:<--proxy-tag> (--proxy-image-hub overrides)",
            default: "--proxy-image-hub",
        },
        Doc {
            name: PROXY_CONTAINER_NAME,
            meaning: "docker runtime: name of the proxy container (unique per proxy when a VM runs several)",
            default: super::DEFAULT_CONTAINER,
        },
        Doc {
            name: PROXY_INSTANCE_IP,
            meaning: "IP the proxy binds inbound listeners to (INSTANCE_IP / ISTIO_SVC_IP), e.g. the private IP on EC2",
            default: "spec.address, when it is an IP",
        },
        Doc {
            name: PROXY_IMAGE,
            meaning: "docker runtime: the full proxy image, instead of hub and tag",
            default: "<hub>/proxyv2:<--proxy-tag>",
        },
        Doc {
            name: PROXY_CONFIG,
            meaning: "ProxyConfig YAML applied over the mesh's defaultConfig for this VM",
            default: "the mesh's defaultConfig",
        },
        Doc {
            name: MESH_EXPANSION_CONFIGMAP,
            meaning: "on the Istio namespace (cluster mode): ConfigMap whose PROXY_CONFIG key is applied over defaultConfig for every VM, before proxy.istio.io/config",
            default: "none",
        },
    ];
}

/// The remote directory for the Docker bundle when neither flag nor annotation names one
/// (the directory the TSB guide creates).
pub const DEFAULT_CONFIG_DIR: &str = "/etc/istio-proxy";

/// The proxy container's name when the annotation names none (Tetrate's).
pub const DEFAULT_CONTAINER: &str = gangplank_bootstrap::docker::CONTAINER;

/// Why a WorkloadEntry does not say enough to reach its VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No SSH host: neither the annotation nor `spec.address`.
    #[error(
        "workload entry {entry} has no address to SSH to: set spec.address or the annotation {}",
        annotation::SSH_HOST
    )]
    MissingHost {
        /// `namespace/name`.
        entry: String,
    },
    /// A `unix://` address cannot be reached over SSH.
    #[error(
        "workload entry {entry} has address {address:?}, which is not reachable over SSH: set the annotation {}",
        annotation::SSH_HOST
    )]
    UnreachableAddress {
        /// `namespace/name`.
        entry: String,
        /// The address.
        address: String,
    },
    /// The port annotation is not a port number.
    #[error(
        "workload entry {entry}: annotation {} is {value:?}, not a port number (1-65535): fix it, or pass --ssh-port",
        annotation::SSH_PORT
    )]
    BadPort {
        /// `namespace/name`.
        entry: String,
        /// The annotation's value.
        value: String,
    },
    /// The instance IP is not an IP address.
    #[error(
        "workload entry {entry}: {what} is {value:?}, not an IP address: set the annotation {} to the IP the proxy should bind to",
        annotation::PROXY_INSTANCE_IP
    )]
    BadInstanceIp {
        /// `namespace/name`.
        entry: String,
        /// Which field was read.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// The remote directory is not a plain absolute path.
    #[error(
        "workload entry {entry}: proxy config dir {value:?} must be an absolute path of letters, digits and ._-/ : fix the annotation {} or --proxy-config-dir",
        annotation::PROXY_CONFIG_DIR
    )]
    BadConfigDir {
        /// `namespace/name`.
        entry: String,
        /// The value.
        value: String,
    },
    /// A container name docker would refuse (or the shell would read).
    #[error(
        "workload entry {entry}: proxy container name {value:?} is not a valid container name (a letter or digit, then letters, digits and _.-): fix the annotation {}",
        annotation::PROXY_CONTAINER_NAME
    )]
    BadContainerName {
        /// `namespace/name`.
        entry: String,
        /// The value.
        value: String,
    },
    /// The scp path is not a plain absolute path.
    #[error(
        "workload entry {entry}: scp path {value:?} must be an absolute path of letters, digits and ._-/ : fix the annotation {}",
        annotation::SCP_PATH
    )]
    BadScpPath {
        /// `namespace/name`.
        entry: String,
        /// The value.
        value: String,
    },
    /// A value would be read by ssh as an option or is empty.
    #[error("workload entry {entry}: {what} {value:?} is not a valid SSH {what}: fix the annotation or flag")]
    BadSshValue {
        /// `namespace/name`.
        entry: String,
        /// `host` or `user`.
        what: &'static str,
        /// The value.
        value: String,
    },
}

/// Flag values that override the annotations.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--ssh-user`.
    pub ssh_user: Option<String>,
    /// `--ssh-port`.
    pub ssh_port: Option<u16>,
    /// `--proxy-config-dir`.
    pub proxy_config_dir: Option<String>,
    /// `--proxy-image-hub`.
    pub proxy_image_hub: Option<String>,
}

/// A VM to push to, resolved from one WorkloadEntry.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// The WorkloadEntry.
    pub entry: NamespacedName,
    /// Host name or IP to SSH to.
    pub host: String,
    /// SSH user; `None` leaves it to the SSH client (`~/.ssh/config`, else the local user).
    pub user: Option<String>,
    /// SSH port; `None` leaves it to the SSH client (`~/.ssh/config`, else 22).
    pub port: Option<u16>,
    /// Remote directory of the Docker bundle.
    pub config_dir: String,
    /// Image registry of `proxyv2`, if known.
    pub image_hub: Option<String>,
    /// A full image from `sidecar.istio.io/proxyImage`, if set.
    pub image: Option<String>,
    /// The proxy container's name (docker runtime).
    pub container: String,
    /// The `scp` binary on the VM, when files are to be copied with it.
    pub scp_path: Option<String>,
    /// The IP the proxy binds to, if the entry gives one.
    pub instance_ip: Option<IpAddr>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Target({} -> {})", self.entry, self.destination())
    }
}

impl Target {
    /// Reads where `entry`'s VM is; `overrides` win over annotations.
    pub fn resolve(entry: &WorkloadEntry, overrides: &Overrides) -> Result<Self, Error> {
        let key = NamespacedName::new(
            entry.metadata.namespace.clone().unwrap_or_default(),
            entry.metadata.name.clone().unwrap_or_default(),
        );
        let id = key.to_string();
        let empty = Default::default();
        let annotations = entry.metadata.annotations.as_ref().unwrap_or(&empty);
        let get = |name: &str| {
            annotations
                .get(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };

        let address = entry.spec.address.trim();
        let host = match get(annotation::SSH_HOST) {
            Some(h) => h,
            None if address.starts_with("unix://") => {
                return Err(Error::UnreachableAddress {
                    entry: id,
                    address: address.to_string(),
                });
            }
            None if !address.is_empty() => address.to_string(),
            None => return Err(Error::MissingHost { entry: id }),
        };
        check_ssh_word(&id, "host", &host)?;

        let user = overrides.ssh_user.clone().or_else(|| get(annotation::SSH_USER));
        if let Some(u) = &user {
            check_ssh_word(&id, "user", u)?;
        }
        let port = match overrides.ssh_port {
            Some(p) => Some(p),
            None => match get(annotation::SSH_PORT) {
                Some(v) => Some(v.parse::<u16>().ok().filter(|p| *p != 0).ok_or(Error::BadPort {
                    entry: id.clone(),
                    value: v,
                })?),
                None => None,
            },
        };
        let config_dir = overrides
            .proxy_config_dir
            .clone()
            .or_else(|| get(annotation::PROXY_CONFIG_DIR))
            .unwrap_or_else(|| DEFAULT_CONFIG_DIR.to_string());
        if !is_plain_abs_path(&config_dir) {
            return Err(Error::BadConfigDir {
                entry: id,
                value: config_dir,
            });
        }
        let instance_ip = match get(annotation::PROXY_INSTANCE_IP) {
            Some(v) => Some(v.parse().map_err(|_| Error::BadInstanceIp {
                entry: id.clone(),
                what: "annotation proxy-instance-ip",
                value: v,
            })?),
            None => address.parse().ok(),
        };
        let container =
            get(annotation::PROXY_CONTAINER_NAME).unwrap_or_else(|| DEFAULT_CONTAINER.to_string());
        let container_ok = container.starts_with(|c: char| c.is_ascii_alphanumeric())
            && container
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !container_ok {
            return Err(Error::BadContainerName {
                entry: id,
                value: container,
            });
        }
        let scp_path = get(annotation::SCP_PATH);
        if let Some(p) = &scp_path
            && !is_plain_abs_path(p)
        {
            return Err(Error::BadScpPath {
                entry: id,
                value: p.clone(),
            });
        }
        Ok(Self {
            entry: key,
            host,
            user,
            port,
            config_dir: config_dir.trim_end_matches('/').to_string(),
            image_hub: overrides
                .proxy_image_hub
                .clone()
                .or_else(|| get(annotation::PROXY_IMAGE_HUB)),
            image: get(annotation::PROXY_IMAGE),
            container,
            scp_path,
            instance_ip,
        })
    }

    /// `[user@]host[:port]` as the seed prints it.
    pub fn destination(&self) -> String {
        let mut s = String::new();
        if let Some(u) = &self.user {
            s.push_str(u);
            s.push('@');
        }
        if self.host.contains(':') {
            s.push_str(&format!("[{}]", self.host));
        } else {
            s.push_str(&self.host);
        }
        if let Some(p) = self.port {
            s.push_str(&format!(":{p}"));
        }
        s
    }
}

fn check_ssh_word(entry: &str, what: &'static str, value: &str) -> Result<(), Error> {
    let ok = !value.starts_with('-')
        && !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-:%[]".contains(c) || (what == "user" && c == '@'));
    if ok {
        Ok(())
    } else {
        Err(Error::BadSshValue {
            entry: entry.to_string(),
            what,
            value: value.to_string(),
        })
    }
}

/// Absolute, no `..`, only characters that need no shell quoting.
pub(crate) fn is_plain_abs_path(p: &str) -> bool {
    p.starts_with('/')
        && !p.split('/').any(|c| c == "..")
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/+@".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gangplank_api::istio::WorkloadEntrySpec;
    use gangplank_api::meta::ObjectMeta;
    use std::collections::BTreeMap;

    fn entry(address: &str, ann: &[(&str, &str)]) -> WorkloadEntry {
        WorkloadEntry::new(
            ObjectMeta {
                name: Some("ratings-vm".into()),
                namespace: Some("bookinfo".into()),
                annotations: Some(
                    ann.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<BTreeMap<_, _>>(),
                ),
                ..Default::default()
            },
            WorkloadEntrySpec {
                address: address.into(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn annotations_then_flags() {
        let e = entry(
            "10.128.0.2",
            &[
                (annotation::SSH_HOST, "35.194.38.142"),
                (annotation::SSH_USER, "istio-proxy"),
                (annotation::SSH_PORT, "2222"),
                (annotation::PROXY_IMAGE_HUB, "docker.io/tetrate"),
            ],
        );
        let t = Target::resolve(&e, &Overrides::default()).expect("resolve");
        assert_eq!(t.destination(), "istio-proxy@35.194.38.142:2222");
        assert_eq!(t.config_dir, DEFAULT_CONFIG_DIR);
        assert_eq!(t.instance_ip, Some("10.128.0.2".parse().expect("ip")));
        let t = Target::resolve(
            &e,
            &Overrides {
                ssh_user: Some("ops".into()),
                ssh_port: Some(22),
                proxy_config_dir: Some("/opt/istio/".into()),
                proxy_image_hub: None,
            },
        )
        .expect("resolve");
        assert_eq!(t.destination(), "ops@35.194.38.142:22");
        assert_eq!(t.config_dir, "/opt/istio");
        assert_eq!(t.image_hub.as_deref(), Some("docker.io/tetrate"));
    }

    #[test]
    fn missing_or_bad_values_are_reported_not_guessed() {
        let err = Target::resolve(&entry("", &[]), &Overrides::default()).expect_err("no host");
        assert!(err.to_string().contains(annotation::SSH_HOST), "{err}");
        let err = Target::resolve(
            &entry("vm.example", &[(annotation::SSH_PORT, "ssh")]),
            &Overrides::default(),
        )
        .expect_err("bad port");
        assert!(err.to_string().contains("\"ssh\""), "{err}");
        let err = Target::resolve(
            &entry("vm.example", &[(annotation::PROXY_INSTANCE_IP, "eth0")]),
            &Overrides::default(),
        )
        .expect_err("bad ip");
        assert!(err.to_string().contains("eth0"), "{err}");
        let err = Target::resolve(
            &entry("vm.example", &[(annotation::PROXY_CONFIG_DIR, "/etc/$(reboot)")]),
            &Overrides::default(),
        )
        .expect_err("bad dir");
        assert!(matches!(err, Error::BadConfigDir { .. }));
        let err = Target::resolve(&entry("-oProxyCommand=x", &[]), &Overrides::default())
            .expect_err("option injection");
        assert!(matches!(err, Error::BadSshValue { .. }));
        let err =
            Target::resolve(&entry("unix:///run/vm.sock", &[]), &Overrides::default()).expect_err("unix");
        assert!(matches!(err, Error::UnreachableAddress { .. }));
        for bad in ["-rm", "istio proxy", "a;reboot", "_x"] {
            let err = Target::resolve(
                &entry("vm.example", &[(annotation::PROXY_CONTAINER_NAME, bad)]),
                &Overrides::default(),
            )
            .expect_err("bad container name");
            assert!(matches!(err, Error::BadContainerName { .. }), "{bad}: {err}");
        }
        let err = Target::resolve(
            &entry("vm.example", &[(annotation::SCP_PATH, "scp; reboot")]),
            &Overrides::default(),
        )
        .expect_err("bad scp path");
        assert!(err.to_string().contains(annotation::SCP_PATH), "{err}");
        let t = Target::resolve(&entry("vm.example", &[]), &Overrides::default()).expect("defaults");
        assert_eq!((t.container.as_str(), t.scp_path), (DEFAULT_CONTAINER, None));
    }
}
