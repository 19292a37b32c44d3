//! Which registry an admin command works on: the folder a directory-mode endpoint uses, or
//! the Kubernetes API (like kubectl: `KUBECONFIG`, `~/.kube/config`, or in-cluster).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use gangplank_registry::Registry;

/// `--registry DIR` or `--kubernetes` (one is required; `--kubernetes` wins over
/// `GANGPLANK_REGISTRY`).
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = true)]
pub struct Args {
    /// The directory registry the endpoint uses.
    #[arg(long, env = "GANGPLANK_REGISTRY", value_name = "DIR")]
    registry: Option<PathBuf>,
    /// Work on the Kubernetes cluster instead, like kubectl (KUBECONFIG, ~/.kube/config or
    /// in-cluster); needs Istio's and Gangplank's CRDs.
    #[arg(long)]
    kubernetes: bool,
}

/// An opened registry and how to name it in messages.
pub struct Opened {
    /// The registry.
    pub registry: Arc<dyn Registry>,
    /// `registry /srv/mesh` or `the Kubernetes cluster`.
    pub place: String,
}

impl fmt::Debug for Opened {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opened")
            .field("place", &self.place)
            .finish_non_exhaustive()
    }
}

impl Args {
    /// Opens the registry these arguments name; `--kubernetes` wins over `GANGPLANK_REGISTRY`.
    pub async fn open(&self) -> anyhow::Result<Opened> {
        if self.kubernetes {
            let client = kube::Client::try_default().await.context(
                "--kubernetes: no kubeconfig (KUBECONFIG, ~/.kube/config) or in-cluster configuration found",
            )?;
            let registry = gangplank_registry::kube::Registry::connect(client)
                .await
                .context("--kubernetes: connecting to the cluster's registry")?;
            return Ok(Opened {
                registry: Arc::new(registry),
                place: "the Kubernetes cluster".into(),
            });
        }
        let Some(dir) = &self.registry else {
            bail!("say which registry: --registry DIR (or GANGPLANK_REGISTRY), or --kubernetes");
        };
        Ok(Opened {
            registry: Arc::new(open_dir(dir)?),
            place: format!("registry {}", dir.display()),
        })
    }
}

/// Opens an existing directory registry; never creates one from a typo.
pub fn open_dir(dir: &Path) -> anyhow::Result<gangplank_registry::dir::Registry> {
    if !dir.is_dir() {
        bail!(
            "registry folder {} does not exist: pass --registry DIR or set GANGPLANK_REGISTRY",
            dir.display()
        );
    }
    gangplank_registry::dir::Registry::open(dir)
        .with_context(|| format!("opening the registry in {}", dir.display()))
}
