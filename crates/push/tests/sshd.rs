//! The push against real OpenSSH `sshd`s on loopback (testkit::sshd): exact files, modes
//! and commands on each VM; host keys; one failing host never stops the others.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gangplank_api::istio::{WorkloadEntry, WorkloadEntrySpec};
use gangplank_api::meta::ObjectMeta;
use gangplank_bootstrap::MeshConfig;
use gangplank_push::fleet::{self, Observer, Outcome};
use gangplank_push::plan::{Material, Runtime, Token};
use gangplank_push::target::{Overrides, annotation};
use gangplank_push::{jobs, ssh};
use gangplank_testkit::sshd::{Fleet, HungHost, Vm};

const TOKEN: &[u8] = b"eyJhbGciOiJSUzI1NiJ9.secret-token.sig";
const ROOT_CERT: &[u8] = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn entry(vm: &Vm, name: &str) -> WorkloadEntry {
    WorkloadEntry::new(
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("bookinfo".into()),
            annotations: Some(BTreeMap::from([
                (annotation::SSH_HOST.to_string(), vm.addr.to_string()),
                (annotation::SSH_PORT.to_string(), vm.port.to_string()),
                (
                    annotation::PROXY_CONFIG_DIR.to_string(),
                    vm.root.join("etc/istio-proxy").display().to_string(),
                ),
                (
                    annotation::PROXY_IMAGE_HUB.to_string(),
                    "docker.io/tetrate".to_string(),
                ),
                (
                    annotation::PROXY_INSTANCE_IP.to_string(),
                    "10.128.0.2".to_string(),
                ),
            ])),
            ..Default::default()
        },
        WorkloadEntrySpec {
            address: "35.194.38.142".into(),
            labels: BTreeMap::from([("app".to_string(), "ratings".to_string())]),
            service_account: "bookinfo-ratings".into(),
            ..Default::default()
        },
    )
}

fn material(runtime: Runtime, remote_root: &str) -> Material {
    Material {
        mesh_config: MeshConfig::from_yaml("trustDomain: cluster.local\n").expect("mesh"),
        root_cert: ROOT_CERT.to_vec(),
        cluster_id: String::new(),
        istio_namespace: "istio-system".into(),
        revision: String::new(),
        proxy_tag: Some("1.27.1".into()),
        remote_root: remote_root.into(),
        runtime,
        start: true,
        ingress_ip: None,
    }
}

#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Observer for Recorder {
    fn line(&self, entry: &str, line: &str) {
        if let Ok(mut l) = self.0.lock() {
            l.push(format!("{entry}: {line}"));
        }
    }
    fn finished(&self, _: &Outcome) {}
}

fn options(fleet: &Fleet) -> fleet::Options {
    fleet::Options {
        concurrency: 4,
        timeout: Duration::from_secs(30),
        ssh: ssh::Options {
            key: None,
            config_file: Some(fleet.ssh_config()),
            ignore_host_keys: false,
            connect_timeout: Some(Duration::from_secs(10)),
        },
    }
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o7777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_bundle_and_commands_arrive_on_every_vm() {
    let fleet = Fleet::start(3).expect("fleet");
    let entries: Vec<WorkloadEntry> = fleet
        .vms
        .iter()
        .enumerate()
        .map(|(i, vm)| entry(vm, &format!("vm-{i}")))
        .collect();
    let jobs = jobs(
        &entries,
        &Overrides::default(),
        &material(Runtime::Docker, "/"),
        &|_| Ok(Token::new(TOKEN.to_vec())),
    );
    let recorder = Arc::new(Recorder::default());
    let outcomes = fleet::run(jobs, &options(&fleet), recorder.clone()).await;
    for o in &outcomes {
        assert!(o.ok, "{o:?}");
    }
    for vm in &fleet.vms {
        let dir = vm.root.join("etc/istio-proxy");
        let env = std::fs::read_to_string(dir.join("sidecar.env")).expect("sidecar.env");
        assert!(env.starts_with("JWT_POLICY=third-party-jwt\n"), "{env}");
        assert!(env.contains("\nINSTANCE_IP=10.128.0.2\n"), "{env}");
        assert_eq!(std::fs::read(dir.join("istio-ca.pem")).expect("ca"), ROOT_CERT);
        assert_eq!(std::fs::read(dir.join("istio-token")).expect("token"), TOKEN);
        assert_eq!(mode(&dir.join("istio-token")), 0o600);
        assert_eq!(mode(&dir.join("sidecar.env")), 0o644);
        assert_eq!(mode(&dir.join("istio-ca.pem")), 0o644);
        // Nothing but the three files: no temporaries left behind.
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["istio-ca.pem", "istio-token", "sidecar.env"]);
        let d = dir.display().to_string();
        let run = format!(
            "docker run -d --name istio-proxy --restart unless-stopped --network host \
             -v {d}/istio-ca.pem:/var/run/secrets/istio/root-cert.pem:ro \
             -v {d}:/var/run/secrets/tokens:ro \
             --env-file {d}/sidecar.env docker.io/tetrate/proxyv2:1.27.1 proxy sidecar"
        );
        assert_eq!(
            vm.commands(),
            vec![argv("docker rm --force istio-proxy"), argv(&run)]
        );
        assert_eq!(vm.logins(), 1, "one SSH connection per host:\n{}", vm.log());
    }
    let lines = recorder.0.lock().expect("lines").clone();
    let vm0: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("bookinfo/vm-0: "))
        .collect();
    assert_eq!(
        vm0.first().map(|s| s.as_str()),
        Some(
            format!(
                "bookinfo/vm-0: [SSH client] connecting to {}",
                fleet.vms[0].endpoint()
            )
            .as_str()
        )
    );
    assert!(
        vm0.iter().any(|l| l.ends_with("istio-proxy")),
        "docker rm output is shown: {vm0:?}"
    );
    assert_eq!(
        vm0.last().map(|s| s.as_str()),
        Some("bookinfo/vm-0: [SSH client] closing connection")
    );
    assert!(
        !lines.iter().any(|l| l.contains("secret-token")),
        "token never printed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_native_layout() {
    let fleet = Fleet::start(1).expect("fleet");
    let vm = &fleet.vms[0];
    let root = vm.root.join("root");
    let jobs = jobs(
        &[entry(vm, "ratings-vm")],
        &Overrides::default(),
        &material(Runtime::Systemd, &root.display().to_string()),
        &|_| Ok(Token::new(TOKEN.to_vec())),
    );
    let outcomes = fleet::run(jobs, &options(&fleet), Arc::new(Recorder::default())).await;
    assert!(outcomes[0].ok, "{outcomes:?}");
    let env = std::fs::read_to_string(root.join("var/lib/istio/envoy/cluster.env")).expect("env");
    assert!(env.contains("\nISTIO_SVC_IP='10.128.0.2'\n"), "{env}");
    assert!(
        env.contains("\nISTIO_META_WORKLOAD_ENTRY='ratings-vm'\n"),
        "{env}"
    );
    assert!(env.contains("\nSERVICE_ACCOUNT='bookinfo-ratings'\n"), "{env}");
    let mesh = std::fs::read_to_string(root.join("etc/istio/config/mesh")).expect("mesh");
    assert!(mesh.starts_with("defaultConfig:\n"), "{mesh}");
    assert_eq!(
        std::fs::read(root.join("etc/certs/root-cert.pem")).expect("cert"),
        ROOT_CERT
    );
    let token = root.join("var/run/secrets/tokens/istio-token");
    assert_eq!(std::fs::read(&token).expect("token"), TOKEN);
    assert_eq!(mode(&token), 0o600);
    assert_eq!(vm.commands(), vec![argv("systemctl restart istio")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_host_key_is_refused_and_nothing_is_written() {
    let fleet = Fleet::start(2).expect("fleet");
    fleet.forge_host_key(1).expect("forge");
    let entries = vec![entry(&fleet.vms[0], "good"), entry(&fleet.vms[1], "mitm")];
    let jobs = jobs(
        &entries,
        &Overrides::default(),
        &material(Runtime::Docker, "/"),
        &|_| Ok(Token::new(TOKEN.to_vec())),
    );
    let outcomes = fleet::run(jobs, &options(&fleet), Arc::new(Recorder::default())).await;
    assert!(outcomes[0].ok, "{outcomes:?}");
    assert!(!outcomes[1].ok);
    let err = outcomes[1].error.clone().unwrap_or_default();
    assert!(err.contains("host key"), "{err}");
    assert!(
        !fleet.vms[1].root.join("etc/istio-proxy").exists(),
        "nothing written to the forged host"
    );
    assert_eq!(fleet.vms[1].logins(), 0);
    assert!(fleet.vms[1].commands().is_empty());

    // The same host with --ignore-host-keys is accepted (explicitly unsafe).
    let mut opts = options(&fleet);
    opts.ssh.ignore_host_keys = true;
    let jobs = jobs_for(&[entry(&fleet.vms[1], "mitm")]);
    let outcomes = fleet::run(jobs, &opts, Arc::new(Recorder::default())).await;
    assert!(outcomes[0].ok, "{outcomes:?}");
}

fn jobs_for(entries: &[WorkloadEntry]) -> Vec<fleet::Job> {
    jobs(
        entries,
        &Overrides::default(),
        &material(Runtime::Docker, "/"),
        &|_| Ok(Token::new(TOKEN.to_vec())),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_command_fails_only_its_host() {
    let fleet = Fleet::start(2).expect("fleet");
    fleet.vms[0].break_tool("docker").expect("break");
    let outcomes = fleet::run(
        jobs_for(&[entry(&fleet.vms[0], "broken"), entry(&fleet.vms[1], "fine")]),
        &options(&fleet),
        Arc::new(Recorder::default()),
    )
    .await;
    assert!(!outcomes[0].ok);
    let err = outcomes[0].error.clone().unwrap_or_default();
    assert!(
        err.contains("docker run -d --name istio-proxy") && err.contains("simulated failure"),
        "{err}"
    );
    assert!(outcomes[1].ok, "{outcomes:?}");
    assert_eq!(fleet.vms[1].commands().len(), 2);
}

fn argv(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_string).collect()
}

fn hung_entry(vm: &Vm, name: &str, port: u16) -> WorkloadEntry {
    let mut e = entry(vm, name);
    let annotations = e.metadata.annotations.as_mut().expect("annotations");
    annotations.insert(annotation::SSH_HOST.to_string(), "127.0.0.1".to_string());
    annotations.insert(annotation::SSH_PORT.to_string(), port.to_string());
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_hosts_fail_within_the_connect_timeout_while_the_others_finish() {
    let fleet = Fleet::start(2).expect("fleet");
    let silent = HungHost::start(false);
    let stalled = HungHost::start(true);
    let entries = vec![
        entry(&fleet.vms[0], "a-good"),
        hung_entry(&fleet.vms[1], "b-silent", silent.port),
        hung_entry(&fleet.vms[1], "c-stalled-after-banner", stalled.port),
        entry(&fleet.vms[1], "d-good"),
    ];
    let mut opts = options(&fleet);
    opts.timeout = Duration::from_secs(60);
    opts.ssh.connect_timeout = Some(Duration::from_secs(2));
    let started = std::time::Instant::now();
    let outcomes = fleet::run(jobs_for(&entries), &opts, Arc::new(Recorder::default())).await;
    assert!(outcomes[0].ok, "{outcomes:?}");
    assert!(outcomes[3].ok, "{outcomes:?}");
    for hung in &outcomes[1..3] {
        assert!(!hung.ok);
        let err = hung.error.clone().unwrap_or_default();
        assert!(
            err.contains("no SSH session within 2s") && err.contains("--connect-timeout"),
            "{err}"
        );
        assert!(
            hung.duration < Duration::from_secs(6),
            "{} took {:?}, the connect timeout is 2 s",
            hung.entry,
            hung.duration
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

/// Makes `id` on `vm` answer for `istio-proxy` with uid and gid 4242 (Istio's package would
/// have created the user); any other question goes to the real `id`.
fn fake_proxy_user(vm: &Vm) {
    let id = vm.root.join("bin/id");
    std::fs::write(
        &id,
        "#!/bin/sh\nif [ \"$2\" = istio-proxy ]; then echo 4242; exit 0; fi\nexec /usr/bin/id \"$@\"\n",
    )
    .expect("id");
    std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn owner(path: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).expect("stat");
    (m.uid(), m.gid())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_files_belong_to_istio_proxy_and_hosts_keeps_one_block() {
    if !nix_is_root() {
        eprintln!("skipped: chown to another user needs root");
        return;
    }
    let fleet = Fleet::start(1).expect("fleet");
    let vm = &fleet.vms[0];
    fake_proxy_user(vm);
    let root = vm.root.join("root");
    std::fs::create_dir_all(root.join("etc")).expect("etc");
    let hosts = root.join("etc/hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n::1 localhost\n").expect("hosts");
    std::fs::set_permissions(&hosts, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let push = |ip: &str| {
        let mut m = material(Runtime::Systemd, &root.display().to_string());
        m.ingress_ip = Some(ip.parse().expect("ip"));
        let jobs = jobs(&[entry(vm, "ratings-vm")], &Overrides::default(), &m, &|_| {
            Ok(Token::new(TOKEN.to_vec()))
        });
        let opts = options(&fleet);
        async move { fleet::run(jobs, &opts, Arc::new(Recorder::default())).await }
    };
    let block = |ip: &str| {
        format!(
            "127.0.0.1 localhost\n::1 localhost\n# BEGIN gangplank sidecar-bootstrap\n{ip} istiod.istio-system.svc\n# END gangplank sidecar-bootstrap\n"
        )
    };
    for _ in 0..2 {
        let outcomes = push("203.0.113.10").await;
        assert!(outcomes[0].ok, "{outcomes:?}");
        assert_eq!(
            std::fs::read_to_string(&hosts).expect("hosts"),
            block("203.0.113.10"),
            "appended once, whatever the number of pushes"
        );
    }
    assert_eq!(mode(&hosts), 0o644, "the hosts file keeps its mode");
    assert_eq!(owner(&hosts), (0, 0), "and its owner");
    let outcomes = push("203.0.113.77").await;
    assert!(outcomes[0].ok, "{outcomes:?}");
    assert_eq!(
        std::fs::read_to_string(&hosts).expect("hosts"),
        block("203.0.113.77"),
        "a new gateway replaces the old entry"
    );

    for file in [
        "var/lib/istio/envoy/cluster.env",
        "etc/istio/config/mesh",
        "etc/certs/root-cert.pem",
        "var/run/secrets/tokens/istio-token",
    ] {
        let path = root.join(file);
        assert_eq!(owner(&path), (4242, 4242), "{file}");
        assert_eq!(
            owner(path.parent().expect("dir")),
            (4242, 4242),
            "{file}'s folder"
        );
    }
    assert_eq!(mode(&root.join("var/run/secrets/tokens/istio-token")), 0o600);
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_files_stay_with_the_ssh_user_without_istio_proxy() {
    let fleet = Fleet::start(1).expect("fleet");
    let vm = &fleet.vms[0];
    let root = vm.root.join("root");
    let jobs = jobs(
        &[entry(vm, "ratings-vm")],
        &Overrides::default(),
        &material(Runtime::Systemd, &root.display().to_string()),
        &|_| Ok(Token::new(TOKEN.to_vec())),
    );
    let outcomes = fleet::run(jobs, &options(&fleet), Arc::new(Recorder::default())).await;
    assert!(outcomes[0].ok, "{outcomes:?}");
    let me = owner(fleet.dir());
    assert_eq!(owner(&root.join("var/run/secrets/tokens/istio-token")), me);
    assert!(
        !root.join("etc/hosts").exists(),
        "no --ingress-ip: the hosts file is left alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_container_name_annotation_names_the_container() {
    let fleet = Fleet::start(1).expect("fleet");
    let vm = &fleet.vms[0];
    let mut e = entry(vm, "second-proxy");
    e.metadata.annotations.as_mut().expect("annotations").insert(
        annotation::PROXY_CONTAINER_NAME.to_string(),
        "istio-proxy-payments".to_string(),
    );
    let outcomes = fleet::run(jobs_for(&[e]), &options(&fleet), Arc::new(Recorder::default())).await;
    assert!(outcomes[0].ok, "{outcomes:?}");
    let cmds = vm.commands();
    assert_eq!(cmds[0], argv("docker rm --force istio-proxy-payments"));
    assert_eq!(&cmds[1][..4], &argv("docker run -d --name")[..]);
    assert_eq!(cmds[1][4], "istio-proxy-payments");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scp_path_annotation_copies_the_files_with_that_scp() {
    let fleet = Fleet::start(2).expect("fleet");
    let mut entries = Vec::new();
    for (i, vm) in fleet.vms.iter().enumerate() {
        // A recording scp at a path of the VM's own (`/usr/bin/scp` is what it runs).
        let scp = vm.root.join("bin/my-scp");
        std::fs::write(
            &scp,
            format!(
                "#!/bin/sh\necho \"$@\" >> '{}/scp.log'\nexec /usr/bin/scp \"$@\"\n",
                vm.root.display()
            ),
        )
        .expect("scp");
        std::fs::set_permissions(&scp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut e = entry(vm, &format!("vm-{i}"));
        let path = if i == 0 {
            scp.display().to_string()
        } else {
            "/nonexistent/scp".to_string()
        };
        e.metadata
            .annotations
            .as_mut()
            .expect("annotations")
            .insert(annotation::SCP_PATH.to_string(), path);
        entries.push(e);
    }
    let recorder = Arc::new(Recorder::default());
    let outcomes = fleet::run(jobs_for(&entries), &options(&fleet), recorder.clone()).await;
    assert!(outcomes[0].ok, "{outcomes:?}");
    let vm = &fleet.vms[0];
    let dir = vm.root.join("etc/istio-proxy");
    assert_eq!(std::fs::read(dir.join("istio-token")).expect("token"), TOKEN);
    assert_eq!(mode(&dir.join("istio-token")), 0o600);
    assert_eq!(mode(&dir.join("sidecar.env")), 0o644);
    assert_eq!(std::fs::read(dir.join("istio-ca.pem")).expect("ca"), ROOT_CERT);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["istio-ca.pem", "istio-token", "sidecar.env"],
        "no temporaries"
    );
    let log = std::fs::read_to_string(vm.root.join("scp.log")).expect("scp was used");
    assert_eq!(log.lines().count(), 3, "one scp per file:\n{log}");
    assert!(
        log.lines().all(|l| l == format!("-qt {}", dir.display())),
        "{log}"
    );
    assert_eq!(vm.commands().len(), 2, "then docker rm and run");
    assert_eq!(vm.logins(), 1, "still one SSH connection");
    let lines = recorder.0.lock().expect("lines").clone();
    let copies = lines
        .iter()
        .filter(|l| l.starts_with("bookinfo/vm-0: ") && l.contains("copying into a remote file"))
        .count();
    assert_eq!(copies, 3, "each copy announced once: {lines:?}");

    assert!(!outcomes[1].ok);
    let err = outcomes[1].error.clone().unwrap_or_default();
    assert!(
        err.contains("/nonexistent/scp") && err.contains("sidecar.env"),
        "the scp and the file are named: {err}"
    );
    assert!(
        fleet.vms[1].commands().is_empty(),
        "nothing run after a failed copy"
    );
}
