//! Why the endpoint cannot start. Every message names the setting to change.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why the endpoint cannot start or build its plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file is not usable.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// A file a setting names cannot be read.
    #[error("{setting}: cannot read {}: {source}", path.display())]
    Read {
        /// The setting, e.g. `mesh.rootCertFile`.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file under a setting's folder cannot be written.
    #[error("{setting}: cannot write {}: {source}", path.display())]
    Write {
        /// The setting, e.g. `stateDir`.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A setting's value, or the file it names, is not acceptable.
    #[error("{setting}: {message}")]
    Invalid {
        /// The setting.
        setting: &'static str,
        /// What is wrong and what to change.
        message: String,
    },
    /// A listen address cannot be bound.
    #[error("{setting}: cannot bind {addr}: {source}")]
    Bind {
        /// `listen` or `monitoringListen`.
        setting: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The serving certificate cannot be loaded or generated.
    #[error("tls: {0}")]
    Tls(#[from] gangplank_tls::Error),
    /// The state dir's keys cannot be loaded or created.
    #[error("stateDir: {0}")]
    Keys(#[from] crate::keys::Error),
    /// The registry cannot be opened.
    #[error("{setting}: {source}")]
    Registry {
        /// `registry.directory` or `registry.kubernetes`.
        setting: &'static str,
        /// Why.
        #[source]
        source: gangplank_registry::Error,
    },
    /// A credential verifier cannot be built from its settings.
    #[error("identities.{kind}: {message}")]
    Identity {
        /// The setting under `identities`, e.g. `jwt` or `awsEc2`.
        kind: &'static str,
        /// Why.
        message: String,
    },
    /// The Kubernetes API client cannot be configured.
    #[error("registry.kubernetes{setting}: {message}")]
    Kubernetes {
        /// The sub-setting (e.g. `.kubeconfig /path`), or empty.
        setting: String,
        /// Why, and what to change.
        message: String,
    },
    /// The packages of `install.directory` cannot be served.
    #[error("install.directory: {0}")]
    Install(#[from] crate::install::Error),
    /// The process cannot install its signal handlers.
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

impl Error {
    /// Whether the configuration (or a file it names) is what to fix: such errors exit 2.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Error::Config(_)
                | Error::Read { .. }
                | Error::Invalid { .. }
                | Error::Identity { .. }
                | Error::Install(_)
        )
    }
}

/// A result of the endpoint library.
pub type Result<T, E = Error> = std::result::Result<T, E>;
