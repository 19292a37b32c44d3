//! The `istio-proxy` Docker container: how it is run ([`run_args`], the one recipe the
//! agent's docker launcher and the SSH push share) and `sidecar.env`, its environment as
//! Tetrate's `sidecar-bootstrap` wrote it (`reference/istio-vm.md` §5.3): a
//! `docker run --env-file` file, one raw `KEY=VALUE` per line, no shell quoting, no trailing
//! newline.

/// Where the container finds its certificates (`PROV_CERT` and `OUTPUT_CERTS`).
pub const CERTS_DIR: &str = "/var/run/secrets/istio";
/// The annotation choosing the sidecar's interception mode.
pub const INTERCEPTION_MODE_ANNOTATION: &str = "sidecar.istio.io/interceptionMode";
/// The container's name (Tetrate's, and the agent's default).
pub const CONTAINER: &str = "istio-proxy";
/// Where the container sees the root certificate (the proxy's default CA root path).
pub const CONTAINER_ROOT_CERT: &str = "/var/run/secrets/istio/root-cert.pem";
/// Where the container sees the token's directory (the proxy reads `istio-token` there).
pub const CONTAINER_TOKEN_DIR: &str = "/var/run/secrets/tokens";
/// Where the container sees the mesh config.
pub const CONTAINER_MESH: &str = "/etc/istio/config/mesh";

/// How the container gets the sidecar's environment.
#[derive(Debug, Clone, Copy)]
pub enum Env<'a> {
    /// `--env-file PATH`: a raw `KEY=VALUE` file on the docker host (`sidecar.env`, which
    /// the SSH push writes in exactly that format).
    File(&'a str),
    /// `--env KEY` for each key, the values taken from the docker client's own environment
    /// (the agent's way for `cluster.env`, whose shell quoting an env-file would keep, and
    /// whose values on the command line would show in `ps`).
    Inherit(&'a [String]),
}

/// What one `docker run` of the proxy is made of; paths are on the docker host.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    /// The container's name.
    pub name: &'a str,
    /// The proxy image (`…/proxyv2:<Istio version>`).
    pub image: &'a str,
    /// The root certificate file.
    pub root_cert: &'a str,
    /// The directory holding `istio-token`.
    pub token_dir: &'a str,
    /// The mesh config file, when the proxy gets one (the push passes it in `PROXY_CONFIG`).
    pub mesh: Option<&'a str>,
    /// The environment.
    pub env: Env<'a>,
}

/// The arguments of `docker run` (after the program) for the proxy: detached, restarted
/// unless stopped, on the host network, the boot files mounted read-only, then
/// `<image> proxy sidecar`.
///
/// The token's *directory* is mounted, not the file: a renewed token (the agent's renewal,
/// or the push run again without restarting the container) replaces `istio-token` by
/// rename, and a bind mount of a single file keeps showing the old inode, so the running
/// proxy would keep an expiring token; a directory mount shows the new file. Everything is
/// read-only, so the proxy cannot change the host's copies (the mounted directory may hold
/// other boot files too).
pub fn run_args(run: &Run<'_>) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--name",
        run.name,
        "--restart",
        "unless-stopped",
        "--network",
        "host",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mounts = [
        Some((run.root_cert, CONTAINER_ROOT_CERT)),
        Some((run.token_dir, CONTAINER_TOKEN_DIR)),
        run.mesh.map(|m| (m, CONTAINER_MESH)),
    ];
    for (host, container) in mounts.into_iter().flatten() {
        args.push("-v".to_owned());
        args.push(format!("{host}:{container}:ro"));
    }
    match run.env {
        Env::File(path) => args.extend(["--env-file".to_owned(), path.to_owned()]),
        Env::Inherit(keys) => {
            for key in keys {
                args.extend(["--env".to_owned(), key.clone()]);
            }
        }
    }
    args.extend([run.image.to_owned(), "proxy".to_owned(), "sidecar".to_owned()]);
    args
}

/// The arguments of `docker rm` (after the program) that remove the container `name`,
/// running or not.
pub fn remove_args(name: &str) -> Vec<String> {
    ["rm", "--force", name].map(str::to_owned).to_vec()
}

#[cfg(feature = "render")]
mod env;
#[cfg(feature = "render")]
pub use env::*;
