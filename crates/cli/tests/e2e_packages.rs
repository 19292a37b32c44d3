//! The agent's .deb on a real systemd "VM": a Debian 12 container (rootfs from
//! `debootstrap`, `docker import`, systemd as PID 1, `packaging/vm-image`) with no Gangplank
//! in it runs the script `gangplank agent install-script` printed, which downloads the
//! package from the endpoint's `/install/`, verifies it and installs it with `dpkg -i`;
//! systemd starts the hardened unit, and the agent onboards against that endpoint, a real
//! one in another container (the endpoint's own image, `packaging/endpoint-image`, run
//! non-root on a read-only root) on a Docker network this test creates. A `systemctl
//! restart`, a container restart (a reboot: systemd stops every unit) and a package upgrade
//! each keep the same WorkloadEntry; `gangplank-agent status` shows it; removing the package
//! deregisters.
//!
//! Needs root, Docker, the image and the packages, so it is `#[ignore]`d; `.ci/run` runs it:
//!
//! ```sh
//! bash packaging/build --arch x86_64 && bash packaging/build --arch x86_64 --release 2
//! bash packaging/vm-image && bash packaging/endpoint-image
//! GANGPLANK_TEST_PACKAGES=target/packages cargo nextest run -p gangplank \
//!     --test e2e_packages --run-ignored only
//! ```

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gangplank_testkit::docker::{docker, docker_ok};
use std::time::Duration;

use gangplank_api::NamespacedName;
use gangplank_api::istio::WorkloadEntry;
use gangplank_api::token::JoinToken;
use gangplank_registry::dir;
use gangplank_testkit::process::until;
use support::*;

/// How long a VM boot, an onboarding or a removal may take.
const BOOT: Duration = Duration::from_secs(90);
const IMAGE_DEFAULT: &str = "gangplank-vm:bookworm";
/// The endpoint's image (`packaging/endpoint-image`).
fn endpoint_image() -> String {
    std::env::var("GANGPLANK_TEST_ENDPOINT_IMAGE")
        .unwrap_or_else(|_| format!("gangplank-endpoint:{}", env!("CARGO_PKG_VERSION")))
}

/// The idle window over which the agent's CPU is read (it heartbeats, nothing else).
const IDLE: Duration = Duration::from_secs(20);

/// Containers and the network of one test, removed when it ends (also on failure).
struct Lab {
    network: String,
    containers: Vec<String>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        let _ = docker(&["network", "rm", &self.network]);
    }
}

/// A systemd VM container.
struct Vm {
    name: String,
}

impl Vm {
    /// Runs `sh -c script` in the VM; its output, whatever the exit status.
    fn sh(&self, script: &str) -> Output {
        docker(&["exec", &self.name, "sh", "-c", script])
    }

    /// Runs `sh -c script` in the VM, which must succeed; its stdout.
    fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the VM, {script:?} failed ({:?}):\n{}{}\nagent's journal:\n{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr),
            self.journal()
        );
        text(&out.stdout)
    }

    fn journal(&self) -> String {
        let out = self.sh("journalctl -u gangplank-agent --no-pager -o cat 2>&1 | tail -n 60");
        text(&out.stdout)
    }

    /// Waits (bounded) until systemd finished booting.
    fn wait_booted(&self) {
        let booted = until(BOOT, || {
            let state = text(&self.sh("systemctl is-system-running").stdout);
            matches!(state.trim(), "running" | "degraded").then_some(())
        });
        assert!(
            booted.is_some(),
            "the VM's systemd did not finish booting: {}",
            text(
                &self
                    .sh("systemctl --failed --no-pager; systemctl list-jobs --no-pager")
                    .stdout
            )
        );
    }

    fn copy_in(&self, from: &Path, to: &str) {
        docker_ok(&["cp", &from.display().to_string(), &format!("{}:{to}", self.name)]);
    }

    /// The agent's main pid (0 when it does not run).
    fn agent_pid(&self) -> u32 {
        self.ok("systemctl show -p MainPID --value gangplank-agent")
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// Lines of the agent's journal containing `pattern`.
    fn journal_count(&self, pattern: &str) -> usize {
        let out = self.sh("journalctl -u gangplank-agent --no-pager -o cat");
        text(&out.stdout).lines().filter(|l| l.contains(pattern)).count()
    }

    /// Waits (bounded) until the agent's journal has more than `n` lines with `pattern`.
    fn wait_journal(&self, pattern: &str, n: usize) {
        let seen = until(BOOT, || (self.journal_count(pattern) > n).then_some(()));
        assert!(
            seen.is_some(),
            "no new {pattern:?} in the agent's journal:\n{}",
            self.journal()
        );
    }
}

/// The one package in `dir` whose name ends with `suffix`.
fn package(dir: &Path, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (build the packages: bash packaging/build)",
                dir.display()
            )
        })
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "want one *{suffix} in {}, found {found:?} (bash packaging/build --arch x86_64, then again with --release 2)",
        dir.display()
    );
    found.into_iter().next().unwrap()
}

async fn entries(registry: &dir::Registry) -> Vec<WorkloadEntry> {
    registry.list::<WorkloadEntry>(None).await.unwrap()
}

/// Waits (bounded) until the registry holds exactly one entry; returns it.
async fn one_entry(registry: &dir::Registry, vm: &Vm) -> WorkloadEntry {
    for _ in 0..BOOT.as_secs() {
        let mut found = entries(registry).await;
        if found.len() == 1 {
            return found.remove(0);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!(
        "no single WorkloadEntry: {:#?}\nagent's journal:\n{}",
        entries(registry).await,
        vm.journal()
    );
}

async fn token_used(registry: &dir::Registry, token: &str) -> u32 {
    let id = token.split('.').next().unwrap();
    registry
        .get::<JoinToken>(&NamespacedName::new("bookinfo", id))
        .await
        .unwrap()
        .expect("the token exists")
        .status
        .used
}

/// Something done to the VM that stops its agent and starts a new one, and its name.
type Step<'a> = (&'a str, &'a dyn Fn(&Vm));

/// What [`world`] set up.
struct World {
    _dir: tempfile::TempDir,
    /// Where the packages are.
    packages: PathBuf,
    registry: dir::Registry,
    /// The join token.
    secret: String,
    lab: Lab,
    vm: Vm,
    /// What `gangplank agent install-script` printed.
    install_script: PathBuf,
    ca_bundle: PathBuf,
}

impl World {
    fn endpoint_log(&self) -> String {
        text(&docker(&["logs", &self.lab.containers[0]]).stderr)
    }

    /// Runs each step (each stops the agent and starts a new one) and checks that the new
    /// agent rejoined with the VM's bound key into `entry`, unchanged, spending nothing.
    async fn keeps_entry(&self, entry: &WorkloadEntry, steps: &[Step<'_>]) {
        let vm = &self.vm;
        let name = entry.metadata.name.clone().unwrap();
        for (what, step) in steps {
            eprintln!("--- {what}");
            let pid = vm.agent_pid();
            let rejoins = vm.journal_count("rejoining with this VM's bound key");
            step(vm);
            vm.wait_journal("rejoining with this VM's bound key", rejoins);
            assert_ne!(vm.agent_pid(), pid, "{what}: a new agent runs");
            let now = one_entry(&self.registry, vm).await;
            assert_eq!(now.metadata.name.as_deref(), Some(name.as_str()), "{what}");
            assert_eq!(
                now.metadata.uid, entry.metadata.uid,
                "{what}: the same entry object"
            );
            assert_eq!(now.spec, entry.spec, "{what}");
            let endpoint_log = self.endpoint_log();
            assert!(
                !endpoint_log.contains("agent left"),
                "{what} must not deregister:\n{endpoint_log}"
            );
            assert_eq!(
                token_used(&self.registry, &self.secret).await,
                1,
                "{what}: no new token use"
            );
            eprintln!("{what}: agent pid {pid} -> {}, entry {name} kept", vm.agent_pid());
        }
    }

    /// Checks the agent onboarded and started the sidecar; returns its entry.
    async fn onboarded(&self) -> WorkloadEntry {
        let vm = &self.vm;
        let entry = one_entry(&self.registry, vm).await;
        vm.wait_journal("sidecar started", 0);
        assert_eq!(
            vm.ok("systemctl is-active istio").trim(),
            "active",
            "the sandboxed agent started Istio's unit"
        );
        for file in [
            "/var/lib/istio/envoy/cluster.env",
            "/etc/istio/config/mesh",
            "/etc/certs/root-cert.pem",
            "/var/run/secrets/tokens/istio-token",
        ] {
            vm.ok(&format!("test -s {file}"));
        }
        assert!(
            vm.ok("cat /etc/hosts").contains("istiod"),
            "the hosts block was written in place"
        );
        assert_eq!(token_used(&self.registry, &self.secret).await, 1);
        entry
    }

    /// Checks that removing the package (`remove`, run in the VM) deregistered the VM.
    async fn removal_deregisters(&self, remove: &str) {
        self.vm.ok(remove);
        assert!(
            entries(&self.registry).await.is_empty(),
            "removing the package deregisters: {:#?}",
            entries(&self.registry).await
        );
        let endpoint_log = self.endpoint_log();
        assert!(
            endpoint_log.contains("agent left; entry removed"),
            "{endpoint_log}"
        );
        self.vm.ok("test ! -e /usr/bin/gangplank-agent && test ! -e /usr/lib/systemd/system/gangplank-agent.service && test ! -e /lib/systemd/system/gangplank-agent.service");
    }
}

/// The endpoint's side (registry, token, TLS, packages for `/install/`, the install script) in
/// a folder on the host, an endpoint container serving it, and a booted VM container, on a
/// network of their own. `format` names the lab (`deb`, `rpm`).
async fn world(format: &str) -> World {
    // A relative path is the repository's (tests run in their crate's folder).
    let packages = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(
        std::env::var("GANGPLANK_TEST_PACKAGES")
            .expect("set GANGPLANK_TEST_PACKAGES to the folder packaging/build wrote (target/packages)"),
    );
    let image = std::env::var("GANGPLANK_TEST_VM_IMAGE").unwrap_or_else(|_| IMAGE_DEFAULT.to_owned());

    // The endpoint's side, on the host's disk, mounted into its container at /cfg.
    let dir = tempfile::Builder::new()
        .prefix("gangplank-e2e-packages")
        .tempdir_in("/var/tmp")
        .unwrap();
    let root_buf = dir.path().to_path_buf();
    let root = root_buf.as_path();
    let registry = dir::Registry::open(root.join("registry")).unwrap();
    registry
        .put(&group("bookinfo", "ratings", &[("app", "ratings")]))
        .await
        .unwrap();
    registry
        .put(&policy(
            "bookinfo",
            "allow-ratings",
            vec![join_tokens()],
            &[("app", "ratings")],
        ))
        .await
        .unwrap();
    let key = NamespacedName::new("bookinfo", "ratings");
    let (token, secret) = gangplank_identity::token::create(
        &key,
        Duration::from_secs(3600),
        1,
        time::OffsetDateTime::now_utc(),
    );
    registry.put(&token).await.unwrap();
    let secret = secret.expose().to_string();
    let ca_bundle = write_dev_tls(root, &["gp-endpoint"]);
    write(
        &root.join("mesh/root-cert.pem"),
        "-----BEGIN CERTIFICATE-----\nZmFrZS1tZXNoLXJvb3Q=\n-----END CERTIFICATE-----\n",
    );
    write(&root.join("mesh/mesh.yaml"), "trustDomain: cluster.local\n");
    write(
        &root.join("endpoint.yaml"),
        &format!(
            "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: EndpointConfiguration
planeId: {PLANE_ID}
listen: 0.0.0.0:15443
monitoringListen: 0.0.0.0:15014
replica: endpoint-0
tls:
  certFile: /cfg/tls/tls.crt
  keyFile: /cfg/tls/tls.key
registry:
  directory: /cfg/registry
stateDir: /cfg/state
mesh:
  meshConfigFile: /cfg/mesh/mesh.yaml
  rootCertFile: /cfg/mesh/root-cert.pem
  istiodIp: 10.10.10.11
identities:
  joinTokens: true
workloads:
  propagationDelay: 1s
install:
  directory: /cfg/packages
"
        ),
    );

    // What the endpoint serves at /install/: the first build of each package.
    std::fs::create_dir_all(root.join("packages")).unwrap();
    for suffix in ["-1_amd64.deb", "-1_arm64.deb", "-1.x86_64.rpm", "-1.aarch64.rpm"] {
        let from = package(&packages, suffix);
        std::fs::copy(&from, root.join("packages").join(from.file_name().unwrap())).unwrap();
    }
    write(&root.join("join-token"), &secret);
    let script = gangplank(&[
        "agent",
        "install-script",
        "--endpoint",
        "gp-endpoint",
        "--workload-group",
        "bookinfo/ratings",
        "--ca-bundle",
        &ca_bundle.display().to_string(),
        "--join-token-file",
        &root.join("join-token").display().to_string(),
    ]);
    assert!(script.status.success(), "{}", text(&script.stderr));
    std::fs::write(root.join("install.sh"), &script.stdout).unwrap();

    // One lab per test process: tests run in parallel, each with its own network.
    let tag = format!("{}-{format}", std::process::id());
    let lab = Lab {
        network: format!("gp-packages-{tag}"),
        containers: vec![format!("gp-endpoint-{tag}"), format!("gp-vm-{tag}")],
    };
    docker_ok(&["network", "create", &lab.network]);
    // The endpoint's own image, run as Kubernetes runs it (deploy/endpoint.yaml): as its
    // non-root user, read-only root, no capabilities. Its files are that user's.
    let owned = Command::new("chown")
        .args(["-R", "65532:65532"])
        .arg(root)
        .status()
        .unwrap();
    assert!(owned.success());
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &lab.containers[0],
        "--network",
        &lab.network,
        "--network-alias",
        "gp-endpoint",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "-v",
        &format!("{}:/cfg", root.display()),
        "-e",
        "RUST_LOG=info",
        &endpoint_image(),
        "--config",
        "/cfg/endpoint.yaml",
    ]);
    let listening = until(BOOT, || {
        let logs = docker(&["logs", &lab.containers[0]]);
        text(&logs.stderr).contains("endpoint listening").then_some(())
    });
    assert!(
        listening.is_some(),
        "the endpoint container did not start: {}",
        text(&docker(&["logs", &lab.containers[0]]).stderr)
    );
    let ip = docker_ok(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &lab.containers[0],
    ]);
    let ready = reqwest::get(format!("http://{}:15014/readyz", ip.trim()))
        .await
        .expect("the endpoint container answers on its monitoring port");
    assert!(ready.status().is_success(), "/readyz: {}", ready.status());

    // The VM: systemd as PID 1.
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &lab.containers[1],
        "--hostname",
        "vm-a",
        "--network",
        &lab.network,
        // What systemd needs to sandbox its units (mount namespaces), and no more: this
        // Docker Engine may itself lack capabilities that --privileged would ask for.
        "--cap-add",
        "SYS_ADMIN",
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
        // systemd's own shutdown signal: `docker restart` is then a clean reboot.
        "--stop-signal",
        "SIGRTMIN+3",
        "--tmpfs",
        "/run",
        "--tmpfs",
        "/run/lock",
        "-v",
        "/sys/fs/cgroup:/sys/fs/cgroup:ro",
        &image,
    ]);
    let vm = Vm {
        name: lab.containers[1].clone(),
    };
    vm.wait_booted();
    // Istio's sidecar package stands in as its `istio` unit: the agent must be able to start
    // it from inside its sandbox.
    vm.ok(
        "printf '[Unit]\\nDescription=stand-in for the istio sidecar package\\n[Service]\\nExecStart=/bin/sleep infinity\\n' >/etc/systemd/system/istio.service && systemctl daemon-reload",
    );
    World {
        _dir: dir,
        packages,
        registry,
        secret,
        lab,
        vm,
        install_script: root.join("install.sh"),
        ca_bundle,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, Docker, packaging/vm-image and the packages (GANGPLANK_TEST_PACKAGES); .ci/run runs it"]
async fn the_deb_onboards_a_systemd_vm_keeps_its_entry_through_restart_reboot_and_upgrade_and_removal_deregisters()
 {
    let world = world("deb").await;
    let vm = &world.vm;
    let secret = world.secret.as_str();
    // Install from the endpoint, as a VM without internet does (curl, the embedded CA).
    vm.ok("test ! -e /usr/bin/gangplank-agent");
    vm.copy_in(&world.install_script, "/root/install.sh");
    let installed = vm.sh("sh /root/install.sh");
    assert!(
        installed.status.success(),
        "the install script failed:\n{}{}\nagent's journal:\n{}",
        text(&installed.stdout),
        text(&installed.stderr),
        vm.journal()
    );
    assert!(
        !text(&installed.stdout).contains(secret) && !text(&installed.stderr).contains(secret),
        "the install script printed the token"
    );
    assert_eq!(vm.ok("systemctl is-enabled gangplank-agent").trim(), "enabled");
    assert_eq!(
        vm.ok("stat -c '%a %U' /etc/gangplank/join-token /etc/gangplank/ca.pem /usr/bin/gangplank-agent"),
        "600 root\n644 root\n755 root\n"
    );
    let version = vm.ok("/usr/bin/gangplank-agent --version");
    assert!(version.starts_with("gangplank-agent "), "{version}");
    let entry = world.onboarded().await;
    let name = entry.metadata.name.clone().unwrap();
    // The status file is written at most once a second: wait (bounded) for "connected".
    let read_status = || -> serde_json::Value {
        let out = vm.ok("gangplank-agent status -o json");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let connected = until(BOOT, || {
        let s = read_status();
        (s["phase"] == "connected").then_some(s)
    });
    let status = connected.unwrap_or_else(|| panic!("never connected: {:#}", read_status()));
    assert_eq!(status["running"], true, "{status:#}");
    assert_eq!(status["entry"], format!("bookinfo/{name}"), "{status:#}");
    assert!(
        !status.to_string().contains(secret),
        "the status file holds no token"
    );
    let described = vm.ok("gangplank-agent status");
    assert!(described.contains(&name), "{described}");

    // What the agent costs at rest: its resident memory and CPU over an idle window.
    let pid = vm.agent_pid();
    let ticks = |vm: &Vm| -> u64 {
        let stat = vm.ok(&format!("cat /proc/{pid}/stat"));
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let before = ticks(vm);
    tokio::time::sleep(IDLE).await;
    let used = ticks(vm) - before;
    let rss = vm.ok(&format!("grep VmRSS /proc/{pid}/status"));
    eprintln!(
        "agent at rest: {} ; CPU {used} ticks (1/100 s) in {IDLE:?} = {:.2} % of a core",
        rss.trim(),
        used as f64 / IDLE.as_secs_f64()
    );

    // Each of these stops the agent and starts a new one, which rejoins with the VM's bound
    // key into the same entry.
    let second_deb = package(&world.packages, "-2_amd64.deb");
    world
        .keeps_entry(
            &entry,
            &[
                ("systemctl restart", &|vm: &Vm| {
                    vm.ok("systemctl restart gangplank-agent");
                }),
                ("a reboot", &|vm: &Vm| {
                    docker_ok(&["restart", "-t", "60", &vm.name]);
                    vm.wait_booted();
                }),
                ("a package upgrade", &|vm: &Vm| {
                    vm.copy_in(&second_deb, "/tmp/agent-2.deb");
                    vm.ok("dpkg -i /tmp/agent-2.deb");
                }),
            ],
        )
        .await;
    assert!(
        vm.ok("dpkg-query -W -f '${Version}' gangplank-agent")
            .ends_with("-2"),
        "upgraded"
    );
    assert!(
        vm.ok("cat /etc/gangplank/onboarding.yaml")
            .contains("host: \"gp-endpoint\""),
        "the upgrade kept the configuration"
    );

    // Removal: the agent stops and deregisters; the configuration stays until a purge.
    world
        .removal_deregisters("apt-get remove -y gangplank-agent")
        .await;
    vm.ok("test -f /etc/gangplank/onboarding.yaml && test -d /var/lib/gangplank");
    vm.ok("dpkg --purge gangplank-agent");
    vm.ok("test ! -e /var/lib/gangplank && test ! -e /etc/gangplank/onboarding.yaml");
}

/// The .rpm's scriptlets on the same systemd VM (Debian's `rpm` keeps its own database, so
/// `/bin/sh`, which dpkg provides there, is not known to it: hence `--nodeps`): the install
/// enables the unit, an upgrade restarts the agent into the same entry, and the removal
/// deregisters and keeps the edited configuration as `.rpmsave`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, Docker, packaging/vm-image and the packages (GANGPLANK_TEST_PACKAGES); .ci/run runs it"]
async fn the_rpm_onboards_a_systemd_vm_keeps_its_entry_through_restart_and_upgrade_and_removal_deregisters() {
    let world = world("rpm").await;
    let vm = &world.vm;
    let first = package(&world.packages, "-1.x86_64.rpm");
    let second = package(&world.packages, "-2.x86_64.rpm");
    vm.copy_in(&first, "/tmp/agent-1.rpm");
    vm.ok("rpm -Uvh --nodeps /tmp/agent-1.rpm");
    assert_eq!(vm.ok("systemctl is-enabled gangplank-agent").trim(), "enabled");
    assert_ne!(
        vm.sh("systemctl is-active gangplank-agent").status.code(),
        Some(0),
        "not configured yet: not started"
    );

    // What the install script writes, then a restart.
    vm.copy_in(&world.ca_bundle, "/etc/gangplank/ca.pem");
    vm.ok(&format!(
        "cat >/etc/gangplank/onboarding.yaml <<'EOF'
apiVersion: config.agent.onboarding.tetrate.io/v1alpha1
kind: OnboardingConfiguration
onboardingEndpoint:
  host: gp-endpoint
  transportSecurity:
    tls:
      caBundle: /etc/gangplank/ca.pem
workloadGroup:
  namespace: bookinfo
  name: ratings
EOF
(umask 077; printf '%s' '{}' >/etc/gangplank/join-token)
systemctl restart gangplank-agent",
        world.secret
    ));
    let entry = world.onboarded().await;
    world
        .keeps_entry(
            &entry,
            &[
                ("systemctl restart", &|vm: &Vm| {
                    vm.ok("systemctl restart gangplank-agent");
                }),
                ("an rpm upgrade", &|vm: &Vm| {
                    vm.copy_in(&second, "/tmp/agent-2.rpm");
                    vm.ok("rpm -Uvh --nodeps /tmp/agent-2.rpm");
                }),
            ],
        )
        .await;
    assert_eq!(
        vm.ok("rpm -q --qf '%{RELEASE}' gangplank-agent").trim(),
        "2",
        "upgraded"
    );
    assert!(
        vm.ok("cat /etc/gangplank/onboarding.yaml")
            .contains("host: gp-endpoint"),
        "the upgrade kept the configuration"
    );
    world.removal_deregisters("rpm -e --nodeps gangplank-agent").await;
    vm.ok("test -f /etc/gangplank/onboarding.yaml.rpmsave");
}

/// The endpoint's image as `packaging/endpoint-image` builds it: non-root, an entrypoint,
/// OCI labels, small; nothing in it but the binary, its libraries, CA certificates and the
/// user's passwd entry.
#[test]
#[ignore = "needs Docker and packaging/endpoint-image; .ci/run runs it"]
fn the_endpoint_image_is_non_root_labelled_and_small() {
    let image = endpoint_image();
    let inspect = docker_ok(&["image", "inspect", &image]);
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let config = &inspect[0]["Config"];
    assert_eq!(config["User"], "65532:65532", "{config:#}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/bin/gangplank-endpoint"])
    );
    let labels = &config["Labels"];
    for label in [
        "org.opencontainers.image.title",
        "org.opencontainers.image.version",
        "org.opencontainers.image.revision",
        "org.opencontainers.image.licenses",
        "org.opencontainers.image.source",
    ] {
        assert!(
            labels[label].as_str().is_some_and(|v| !v.is_empty()),
            "{label}: {labels:#}"
        );
    }
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    let size = inspect[0]["Size"].as_u64().unwrap();
    eprintln!("{image}: {size} bytes");
    assert!(
        size < 64 * 1024 * 1024,
        "{image} is {size} bytes: it should hold only the endpoint"
    );

    // What is in it: the binary, the loader and libraries, CA certificates, passwd/group.
    let name = format!("gp-image-{}", std::process::id());
    docker_ok(&["create", "--name", &name, &image]);
    let listing = Command::new("sh")
        .arg("-c")
        .arg(format!("docker export {name} | tar -t"))
        .output()
        .unwrap();
    let _ = docker(&["rm", "-f", &name]);
    let listing = text(&listing.stdout);
    let files: Vec<&str> = listing.lines().filter(|l| !l.ends_with('/')).collect();
    for want in [
        "usr/bin/gangplank-endpoint",
        "etc/passwd",
        "etc/ssl/certs/ca-certificates.crt",
    ] {
        assert!(
            files.iter().any(|f| f.trim_start_matches("./") == want),
            "{want} missing: {files:#?}"
        );
    }
    assert!(
        files.iter().any(|f| f.contains("libssl.so.3")),
        "OpenSSL (PKCS#7) is in it: {files:#?}"
    );
    let unexpected: Vec<&&str> = files
        .iter()
        .filter(|f| {
            let f = f.trim_start_matches("./");
            !(f.starts_with("usr/bin/gangplank-endpoint")
                || f.starts_with("lib")
                || f.starts_with("usr/lib")
                || f.starts_with("etc/")
                // What Docker adds to every container it creates.
                || f == ".dockerenv"
                || f.starts_with("dev/"))
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "unexpected files in the image: {unexpected:#?}"
    );
}
