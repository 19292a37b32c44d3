//! `gangplank quickstart`: the whole pull flow on this machine, with nothing to set up.
//!
//! Creates a state folder with a dev CA, a sample WorkloadGroup `bookinfo/ratings`, a policy
//! and a join token; starts an endpoint on loopback and an agent whose sidecar is a stand-in
//! process; shows the WorkloadEntry and the boot files; on Ctrl-C or SIGTERM the agent
//! leaves the mesh (its entry is removed) and everything stops.
//!
//! One quickstart at a time uses a folder: it holds an advisory lock (`flock`) on a file in
//! it while it runs, which the kernel releases however the quickstart ends, so a crashed one
//! leaves no stale lock.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use gangplank_api::istio::{
    GroupMetadata, WorkloadEntry, WorkloadEntrySpec, WorkloadGroup, WorkloadGroupSpec,
};
use gangplank_api::meta::{LabelSelector, ObjectMeta};
use gangplank_api::policy::{
    AllowRule, JoinTokenMatcher, OnboardTo, OnboardingPolicy, OnboardingPolicySpec, WorkloadMatcher,
};
use gangplank_api::{NamespacedName, Resource};
use gangplank_bootstrap::layout;
use gangplank_registry::dir;
use nix::fcntl::{Flock, FlockArg};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// Marks a folder the quickstart created, so a re-run may clear it and nothing else.
const MARKER: &str = ".gangplank-quickstart";
/// Locked by the quickstart using the folder, and holding its pid; kept when the folder is
/// cleared, so that every quickstart locks the same file.
const LOCK: &str = ".gangplank-quickstart.lock";

/// Arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The state folder (created; cleared first if an earlier quickstart made it; one
    /// quickstart at a time uses it).
    #[arg(long, default_value = "gangplank-quickstart")]
    dir: PathBuf,
    /// The endpoint's port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 15443)]
    port: u16,
}

/// Runs the command.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    init_logs();
    // From here on Ctrl-C and SIGTERM are ours: they end the quickstart in order.
    let mut stop = Stop::listen()?;
    let (dir, _lock) = match prepare(&args.dir) {
        Ok(prepared) => prepared,
        Err(Refused::Busy(message)) => {
            eprintln!("error: {message}");
            return Ok(ExitCode::from(2));
        }
        Err(Refused::Other(err)) => return Err(err),
    };
    say(&format!("gangplank quickstart: state in {}", dir.display()));

    // 1. The mesh's resources, as an admin would create them.
    let registry = dir::Registry::open(dir.join("registry"))?;
    let group_key = NamespacedName::new("bookinfo", "ratings");
    registry.put(&sample_group()).await?;
    registry.put(&sample_policy()).await?;
    let (token, secret) = gangplank_identity::token::create(
        &group_key,
        Duration::from_secs(3600),
        1,
        time::OffsetDateTime::now_utc(),
    );
    registry.put(&token).await?;
    gangplank_agent::files::write_atomic(
        &dir.join("vm/etc/join-token"),
        secret.expose().as_bytes(),
        0o600,
        None,
    )?;
    say(
        "  created WorkloadGroup bookinfo/ratings, OnboardingPolicy bookinfo/allow-ratings and a single-use join token",
    );

    // 2. A stand-in for the mesh's root certificate (istio-ca-root-cert).
    let mesh_root =
        gangplank_tls::dev::Ca::generate("quickstart mesh root (stand-in for istio-ca-root-cert)")?;
    write(&dir.join("mesh/root-cert.pem"), mesh_root.cert_pem().as_bytes())?;
    write(&dir.join("mesh/mesh.yaml"), b"trustDomain: cluster.local\n")?;

    // 3. The endpoint, on loopback with a dev certificate.
    let endpoint_config = dir.join("endpoint.yaml");
    write(&endpoint_config, endpoint_yaml(&dir, args.port).as_bytes())?;
    let config = gangplank_endpoint::Config::load(&endpoint_config)?;
    let endpoint = gangplank_endpoint::start(gangplank_endpoint::build(config).await?)
        .await
        .with_context(|| format!("starting the endpoint (is port {} free? try --port 0)", args.port))?;
    let port = endpoint.addr.port();
    say(&format!(
        "  endpoint listening on https://127.0.0.1:{port} (dev TLS; CA {})",
        dir.join("endpoint/dev-tls/ca.crt").display()
    ));

    // 4. The agent, with the seed's configuration and a stand-in sidecar.
    let onboarding = dir.join("vm/etc/onboarding.yaml");
    write(&onboarding, onboarding_yaml(&dir, port).as_bytes())?;
    let agent_config = dir.join("vm/etc/agent.yaml");
    write(&agent_config, agent_yaml(&dir)?.as_bytes())?;
    say(&format!(
        "  agent config {} (the seed's OnboardingConfiguration)",
        onboarding.display()
    ));
    say("  the sidecar is a STAND-IN process (no Envoy here): on a VM it is Istio's istio-sidecar package");

    let agent_cfg = gangplank_agent::config::Config::load(&onboarding, &agent_config, false)?;
    let agent = gangplank_agent::Agent::new(&agent_cfg)?;
    let status = agent.status();
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(async move {
        let shutdown = async move {
            let _ = agent_stopped.await;
        };
        agent.run(shutdown).await.map_err(anyhow::Error::from)
    });

    // 5. Wait until the agent is registered, has written the boot files and holds its stream.
    let key = tokio::select! {
        key = wait_until_connected(status, &agent) => key?,
        signal = stop.recv() => {
            say(&format!("\n{signal} received before the agent onboarded; stopping..."));
            let _ = stop_agent.send(());
            let result = agent.await.context("the agent task failed")?;
            endpoint.shutdown().await;
            if let Err(err) = result {
                bail!("the agent did not stop cleanly: {err:#}");
            }
            // Stopped with its Onboard call in flight, the agent cannot know what the
            // endpoint registered; this registry is the quickstart's alone, so clean it here.
            for entry in registry.list::<WorkloadEntry>(None).await? {
                let key = entry.key();
                registry.delete::<WorkloadEntry>(&key).await?;
                say(&format!("WorkloadEntry {key}, registered as the agent stopped, removed."));
            }
            say("The agent, the stand-in sidecar and the endpoint stopped. Bye.");
            return Ok(ExitCode::SUCCESS);
        }
    };
    let _entry = registry
        .get::<WorkloadEntry>(&key)
        .await?
        .with_context(|| format!("the agent reports WorkloadEntry {key}, but the registry has none"))?;
    let file = registry.path_of::<WorkloadEntry>(&key)?;
    say(&format!(
        "\nOnboarded. WorkloadEntry {key} ({}):\n",
        file.display()
    ));
    say(&indent(&std::fs::read_to_string(&file)?));
    say("Boot files written for the sidecar:");
    let fs = dir.join("vm/fs");
    for (what, on_vm) in layout::FILES {
        let path = layout::under(&fs, on_vm);
        let mode = std::fs::metadata(&path)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
        let mode = mode
            .map(|m| format!("{m:04o}"))
            .unwrap_or_else(|_| "missing".into());
        say(&format!("  {what:<14} {mode}  {}", path.display()));
    }
    say(&format!(
        "\nTry: cat {}   |   curl -sk https://127.0.0.1:{port}/openid/v1/jwks   |   curl -s http://{}/metrics",
        layout::under(&fs, layout::CLUSTER_ENV).display(),
        endpoint.monitoring_addr
    ));
    say("Press Ctrl-C to leave the mesh (the WorkloadEntry is removed) and stop.");

    // 6. Ctrl-C or SIGTERM: the agent leaves, then everything stops.
    let signal = stop.recv().await;
    say(&format!("\n{signal} received; leaving the mesh..."));
    let _ = stop_agent.send(());
    let result = agent.await.context("the agent task failed")?;
    endpoint.shutdown().await;
    if let Err(err) = result {
        bail!("the agent did not leave cleanly: {err:#}");
    }
    if registry.get::<WorkloadEntry>(&key).await?.is_some() {
        bail!("WorkloadEntry {key} is still registered");
    }
    say(&format!(
        "WorkloadEntry {key} removed; the stand-in sidecar and the endpoint stopped. Bye."
    ));
    Ok(ExitCode::SUCCESS)
}

/// `gangplank quickstart-sidecar`: the stand-in sidecar the quickstart's agent starts. It
/// shows what it was given and waits to be stopped, as pilot-agent would.
pub async fn standin() -> anyhow::Result<ExitCode> {
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("ISTIO_") || k == "POD_NAMESPACE" || k == "SERVICE_ACCOUNT")
        .collect();
    eprintln!(
        "[stand-in sidecar] started (pid {}) with {} Istio variables from cluster.env, e.g. ISTIO_META_WORKLOAD_NAME={}, ISTIO_SVC_IP={}",
        std::process::id(),
        env.len(),
        env.get("ISTIO_META_WORKLOAD_NAME").map_or("?", String::as_str),
        env.get("ISTIO_SVC_IP").map_or("?", String::as_str),
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("[stand-in sidecar] stopping");
    Ok(ExitCode::SUCCESS)
}

/// Prints a line of the quickstart's story. When stdout is gone (`| head -1`) it says so once
/// on stderr and carries on: the quickstart still has a mesh entry to remove on Ctrl-C.
fn say(line: &str) {
    static SILENT: AtomicBool = AtomicBool::new(false);
    if !SILENT.load(Ordering::Relaxed)
        && let Err(e) = gangplank_stdout::println(line)
        && !SILENT.swap(true, Ordering::Relaxed)
    {
        eprintln!("gangplank quickstart: {e}; still running: press Ctrl-C to leave the mesh and stop");
    }
}

/// Ctrl-C (SIGINT) and SIGTERM, which both end the quickstart the same way.
struct Stop {
    int: Signal,
    term: Signal,
}

impl Stop {
    fn listen() -> anyhow::Result<Self> {
        let listen = |kind| signal(kind).context("listening for Ctrl-C and SIGTERM");
        Ok(Stop {
            int: listen(SignalKind::interrupt())?,
            term: listen(SignalKind::terminate())?,
        })
    }

    /// Waits for the first of them; names it.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "Ctrl-C",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// Why the folder cannot be used.
enum Refused {
    /// Another quickstart holds its lock (exit 2, nothing changed).
    Busy(String),
    /// Anything else.
    Other(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Refused {
    fn from(err: E) -> Self {
        Refused::Other(err.into())
    }
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Creates the folder and locks it, clearing it only if an earlier quickstart made it.
/// Another quickstart using it is refused before anything in it changes.
fn prepare(dir: &Path) -> Result<(PathBuf, Flock<File>), Refused> {
    let lock_path = dir.join(LOCK);
    // A folder with our lock file is ours; otherwise only an empty one or one with our marker.
    if dir.exists() && !lock_path.exists() {
        let empty = std::fs::read_dir(dir)?.next().is_none();
        if !empty && !dir.join(MARKER).exists() {
            return Err(Refused::Other(anyhow::anyhow!(
                "{} exists and was not made by gangplank quickstart: choose another --dir",
                dir.display()
            )));
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let pid = std::fs::read_to_string(&lock_path)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
                .map_or_else(|| "pid unknown".to_owned(), |p| format!("pid {p}"));
            return Err(Refused::Busy(format!(
                "another gangplank quickstart is using {} ({pid}); stop it or pick another --dir",
                dir.display()
            )));
        }
        Err((_, errno)) => {
            return Err(Refused::Other(
                anyhow::Error::from(errno).context(format!("locking {}", lock_path.display())),
            ));
        }
    };
    clear(dir).with_context(|| format!("clearing {}", dir.display()))?;
    std::fs::write(dir.join(MARKER), "made by gangplank quickstart; safe to delete\n")?;
    lock.set_len(0)?;
    writeln!(lock, "{}", std::process::id())?;
    Ok((std::fs::canonicalize(dir)?, lock))
}

/// Removes everything in `dir` but the lock file.
fn clear(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() == LOCK {
            continue;
        }
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn sample_group() -> WorkloadGroup {
    let labels: BTreeMap<String, String> = [("app", "ratings"), ("version", "v1")]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    WorkloadGroup {
        api_version: WorkloadGroup::API_VERSION.into(),
        kind: WorkloadGroup::KIND.into(),
        metadata: ObjectMeta {
            name: Some("ratings".into()),
            namespace: Some("bookinfo".into()),
            labels: Some(labels.clone()),
            // The quickstart's VM is this machine, reached on loopback: an address the
            // endpoint refuses unless the group allows it.
            annotations: Some(
                [(
                    gangplank_api::names::annotation::ALLOWED_ADDRESSES.to_string(),
                    "loopback".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        spec: WorkloadGroupSpec {
            metadata: Some(GroupMetadata {
                labels,
                annotations: Default::default(),
            }),
            template: Some(WorkloadEntrySpec {
                ports: [("http".to_string(), 9080)].into(),
                service_account: "bookinfo-ratings".into(),
                ..Default::default()
            }),
            probe: Some(serde_json::json!({ "httpGet": { "path": "/health", "port": 9080 } })),
        },
    }
}

fn sample_policy() -> OnboardingPolicy {
    OnboardingPolicy {
        api_version: OnboardingPolicy::API_VERSION.into(),
        kind: OnboardingPolicy::KIND.into(),
        metadata: ObjectMeta {
            name: Some("allow-ratings".into()),
            namespace: Some("bookinfo".into()),
            ..Default::default()
        },
        spec: OnboardingPolicySpec {
            allow: vec![AllowRule {
                workloads: vec![WorkloadMatcher {
                    join_token: Some(JoinTokenMatcher::default()),
                    ..Default::default()
                }],
                onboard_to: vec![OnboardTo {
                    workload_group_selector: LabelSelector {
                        match_labels: Some([("app".to_string(), "ratings".to_string())].into()),
                        ..Default::default()
                    },
                }],
            }],
        },
    }
}

fn endpoint_yaml(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: EndpointConfiguration
planeId: quickstart
listen: 127.0.0.1:{port}
monitoringListen: 127.0.0.1:0
replica: quickstart-endpoint
tls:
  dev: true
registry:
  directory: {d}/registry
stateDir: {d}/endpoint
mesh:
  meshConfigFile: {d}/mesh/mesh.yaml
  rootCertFile: {d}/mesh/root-cert.pem
  istiodIp: 127.0.0.1
identities:
  joinTokens: true
workloads:
  propagationDelay: 1s
"
    )
}

fn onboarding_yaml(dir: &Path, port: u16) -> String {
    format!(
        "apiVersion: config.agent.onboarding.tetrate.io/v1alpha1
kind: OnboardingConfiguration
onboardingEndpoint:                            # connect to
  host: 127.0.0.1
  port: {port}
  transportSecurity:
    tls:
      caBundle: {}
workloadGroup:                                 # join to
  namespace: bookinfo
  name: ratings
",
        dir.join("endpoint/dev-tls/ca.crt").display()
    )
}

fn agent_yaml(dir: &Path) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("locating the gangplank binary for the stand-in sidecar")?;
    Ok(format!(
        "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: AgentConfiguration
identity:
  joinToken:
    file: {d}/vm/etc/join-token
sidecar:
  launcher: process
  process:
    command: [{exe:?}, quickstart-sidecar]
files:
  root: {d}/vm/fs
",
        d = dir.display(),
        exe = exe.display().to_string(),
    ))
}

async fn wait_until_connected(
    mut status: tokio::sync::watch::Receiver<gangplank_agent::Status>,
    agent: &tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<NamespacedName> {
    use gangplank_agent::Status;
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        let s = status
            .wait_for(|s| matches!(s, Status::Registered { connected: true, .. }))
            .await;
        s.map(|s| match &*s {
            Status::Registered { entry, .. } => Some(entry.clone()),
            _ => None,
        })
    })
    .await;
    match waited {
        Ok(Ok(Some(entry))) => Ok(entry),
        Ok(Ok(None)) | Ok(Err(_)) => {
            bail!("the agent stopped before onboarding; run with RUST_LOG=info to see why")
        }
        Err(_) => {
            let why = match &*status.borrow() {
                Status::Onboarding { last_error: Some(e) } => format!(": {e}"),
                _ => String::new(),
            };
            if agent.is_finished() {
                bail!("the agent stopped before onboarding{why}");
            }
            bail!("not onboarded after 60s{why}")
        }
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
