//! The sidecar as the `istio-proxy` container on the host network, run with the recipe the
//! SSH push uses too ([`gangplank_bootstrap::docker::run_args`]).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use gangplank_bootstrap::docker;

use super::{Env, Error, Launcher, Result, read_env, record, run_command};
use crate::config;
use crate::health::Health;

/// The sidecar as a docker container on the host network.
#[derive(Debug)]
pub struct Docker {
    command: String,
    image: String,
    name: String,
    cluster_env: PathBuf,
    root_cert: PathBuf,
    token: PathBuf,
    mesh: PathBuf,
    health: Health,
}

impl Docker {
    /// A container named `docker.name` from `docker.image`, with the boot files in `files`.
    pub fn new(docker: &config::Docker, files: &config::Files) -> Self {
        Docker {
            command: docker.command.clone(),
            image: docker.image.clone(),
            name: docker.name.clone(),
            cluster_env: files.cluster_env.clone(),
            root_cert: files.root_cert.clone(),
            token: files.token.clone(),
            mesh: files.mesh.clone(),
            health: Health::Stopped,
        }
    }

    /// The `docker run` arguments and the environment the docker client needs.
    ///
    /// The variables of `cluster.env` are passed as `--env KEY` with the values in the
    /// docker client's own environment ([`docker::Env::Inherit`]): `--env-file` would keep
    /// the shell quotes `cluster.env` uses, and values on the command line would show in
    /// `ps`. The token's directory is mounted (see [`docker::run_args`]).
    pub fn run_args(&self) -> Result<(Vec<String>, Env)> {
        let env = read_env(&self.cluster_env)?;
        if let Some((key, _)) = env.iter().find(|(k, _)| k.starts_with("DOCKER_")) {
            return Err(Error::DockerVariable {
                path: self.cluster_env.clone(),
                key: key.clone(),
            });
        }
        let keys: Vec<String> = env.iter().map(|(k, _)| k.clone()).collect();
        let root_cert = self.root_cert.display().to_string();
        let token_dir = self
            .token
            .parent()
            .unwrap_or(Path::new("/"))
            .display()
            .to_string();
        let mesh = self.mesh.display().to_string();
        let args = docker::run_args(&docker::Run {
            name: &self.name,
            image: &self.image,
            root_cert: &root_cert,
            token_dir: &token_dir,
            mesh: Some(&mesh),
            env: docker::Env::Inherit(&keys),
        });
        Ok((args, env))
    }

    async fn remove(&self) -> Result<()> {
        run_command(&self.command, &docker::remove_args(&self.name), &[]).await
    }

    async fn replace(&mut self) -> Result<()> {
        let result = async {
            let (args, env) = self.run_args()?;
            // The container may not exist yet; only a missing docker is worth reporting.
            match self.remove().await {
                Err(e @ (Error::Spawn { .. } | Error::Timeout(_))) => return Err(e),
                Err(e) => tracing::debug!(error = %e, "no container to remove"),
                Ok(()) => {}
            }
            run_command(&self.command, &args, &env).await
        }
        .await;
        record(&mut self.health, &result, Health::Running);
        result
    }
}

#[async_trait]
impl Launcher for Docker {
    async fn start(&mut self) -> Result<()> {
        self.replace().await
    }

    async fn restart(&mut self) -> Result<()> {
        self.replace().await
    }

    async fn stop(&mut self) -> Result<()> {
        let result = self.remove().await;
        record(&mut self.health, &result, Health::Stopped);
        result
    }

    fn health(&self) -> Health {
        self.health.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launcher::tests::{calls, recorder};

    fn files_in(root: &Path) -> config::Files {
        let text = format!("files:\n  root: {}\n", root.display());
        config::Agent::parse(Path::new("agent.yaml"), &text)
            .expect("agent config")
            .files
    }

    #[tokio::test]
    async fn docker_replaces_the_container_with_mounts_and_env() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (script, log) = recorder(dir.path(), "docker", 0, &["ISTIO_META_NETWORK", "PROXY_CONFIG"]);
        let files = files_in(&dir.path().join("vm"));
        std::fs::create_dir_all(files.cluster_env.parent().expect("parent")).expect("mkdir");
        std::fs::write(
            &files.cluster_env,
            "ISTIO_META_NETWORK='net 1'\nPROXY_CONFIG='{\"a\":\"it'\"'\"'s\"}'\n",
        )
        .expect("env");
        let docker = config::Docker {
            command: script.display().to_string(),
            image: "docker.io/istio/proxyv2:1.27.1".into(),
            name: "istio-proxy".into(),
        };
        let mut l = Docker::new(&docker, &files);
        l.start().await.expect("start");
        assert_eq!(l.health(), Health::Running);
        l.stop().await.expect("stop");
        assert_eq!(l.health(), Health::Stopped);

        let root = dir.path().join("vm");
        let c = calls(&log);
        assert_eq!(c.len(), 3, "{c:?}");
        assert_eq!(c[0][..3], ["rm", "--force", "istio-proxy"]);
        let run: Vec<String> = c[1].iter().filter(|l| !l.contains('=')).cloned().collect();
        let expected: Vec<String> = [
            "run".to_owned(),
            "-d".into(),
            "--name".into(),
            "istio-proxy".into(),
            "--restart".into(),
            "unless-stopped".into(),
            "--network".into(),
            "host".into(),
            "-v".into(),
            format!(
                "{}/etc/certs/root-cert.pem:/var/run/secrets/istio/root-cert.pem:ro",
                root.display()
            ),
            "-v".into(),
            format!(
                "{}/var/run/secrets/tokens:/var/run/secrets/tokens:ro",
                root.display()
            ),
            "-v".into(),
            format!(
                "{}/etc/istio/config/mesh:/etc/istio/config/mesh:ro",
                root.display()
            ),
            "--env".into(),
            "ISTIO_META_NETWORK".into(),
            "--env".into(),
            "PROXY_CONFIG".into(),
            "docker.io/istio/proxyv2:1.27.1".into(),
            "proxy".into(),
            "sidecar".into(),
        ]
        .to_vec();
        assert_eq!(run, expected);
        // The values reach the docker client unquoted.
        assert!(c[1].contains(&"ISTIO_META_NETWORK=net 1".to_owned()), "{c:?}");
        assert!(
            c[1].contains(&"PROXY_CONFIG={\"a\":\"it's\"}".to_owned()),
            "{c:?}"
        );
        assert_eq!(c[2][..3], ["rm", "--force", "istio-proxy"]);
    }

    #[tokio::test]
    async fn docker_refuses_variables_that_configure_the_client() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (script, log) = recorder(dir.path(), "docker", 0, &[]);
        let files = files_in(&dir.path().join("vm"));
        std::fs::create_dir_all(files.cluster_env.parent().expect("parent")).expect("mkdir");
        std::fs::write(&files.cluster_env, "DOCKER_HOST=tcp://evil:2375\n").expect("env");
        let docker = config::Docker {
            command: script.display().to_string(),
            image: "img".into(),
            name: "istio-proxy".into(),
        };
        let mut l = Docker::new(&docker, &files);
        let e = l.start().await.unwrap_err();
        assert!(matches!(e, Error::DockerVariable { .. }), "{e}");
        assert!(calls(&log).is_empty(), "docker must not run at all");
    }
}
