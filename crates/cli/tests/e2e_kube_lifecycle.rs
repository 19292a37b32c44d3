//! A VM's life on the Kubernetes registry, with real endpoint and agent processes: a first
//! join binds its key (a `WorkloadBinding`), crashes rejoin with it (no new token use), an
//! entry an admin deletes is told to the agent and comes back, a refused onboarding makes no
//! TokenRequest, and a release ends it all.
//!
//! Runs against the Kubernetes API stand-in, and unchanged (`#[ignore]`d) against a real
//! cluster with Istio's CRDs when `GANGPLANK_TEST_KUBECONFIG` names its kubeconfig: it works
//! in a throw-away namespace `gangplank-lifecycle-<pid>` (Istio's own namespace untouched:
//! the endpoint reads its mesh config from the test namespace), which it deletes afterwards.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use gangplank_api::NamespacedName;
use gangplank_testkit::kube_api::Server;
use gangplank_testkit::process::{Proc, alive, until};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use support::*;

const ROOT_CERT: &str = "-----BEGIN CERTIFICATE-----\nY2x1c3Rlci1yb290\n-----END CERTIFICATE-----\n";

struct Cluster {
    client: kube::Client,
    kubeconfig: PathBuf,
    ns: String,
    stand_in: Option<Server>,
}

impl Cluster {
    async fn stand_in(root: &Path) -> Self {
        let server = Server::start().await.unwrap();
        server.install_istio_crds(&["v1"]).unwrap();
        let kubeconfig = server.write_kubeconfig(root).unwrap();
        let client = kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
        let cluster = Self {
            client,
            kubeconfig,
            ns: "bookinfo".into(),
            stand_in: Some(server),
        };
        cluster.install_crds().await;
        cluster
    }

    async fn real(kubeconfig: &str) -> Self {
        let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("reading GANGPLANK_TEST_KUBECONFIG");
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("loading GANGPLANK_TEST_KUBECONFIG");
        let client = kube::Client::try_from(config).unwrap();
        let ns = format!("gangplank-lifecycle-{}", std::process::id());
        let cluster = Self {
            client,
            kubeconfig: PathBuf::from(kubeconfig),
            ns: ns.clone(),
            stand_in: None,
        };
        cluster
            .apply("v1", "Namespace", "namespaces", json!({"metadata": {"name": ns}}))
            .await;
        cluster.install_crds().await;
        cluster
    }

    async fn install_crds(&self) {
        for crd in gangplank_registry::crds::all().unwrap() {
            self.apply(
                "apiextensions.k8s.io/v1",
                "CustomResourceDefinition",
                "customresourcedefinitions",
                serde_json::to_value(crd).unwrap(),
            )
            .await;
        }
        // Established before the endpoint's caches list them.
        for plural in ["onboardingpolicies", "jointokens", "workloadbindings"] {
            let api = self.api("onboarding.gangplank.dev/v1alpha1", "x", plural, true);
            gangplank_testkit::process::eventually(
                "Gangplank's CRDs are served",
                WAIT,
                Duration::from_millis(100),
                || {
                    let api = api.clone();
                    async move { api.list(&Default::default()).await.is_ok() }
                },
            )
            .await;
        }
    }

    fn api(&self, api_version: &str, kind: &str, plural: &str, namespaced: bool) -> Api<DynamicObject> {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        if namespaced {
            Api::namespaced_with(self.client.clone(), &self.ns, &ar)
        } else {
            Api::all_with(self.client.clone(), &ar)
        }
    }

    /// Server-side applies `body` (apiVersion, kind and, for namespaced kinds, the namespace
    /// are filled in).
    async fn apply(&self, api_version: &str, kind: &str, plural: &str, mut body: Value) {
        let namespaced = !matches!(kind, "Namespace" | "CustomResourceDefinition");
        body["apiVersion"] = json!(api_version);
        body["kind"] = json!(kind);
        if namespaced {
            body["metadata"]["namespace"] = json!(self.ns);
        }
        let name = body["metadata"]["name"].as_str().unwrap().to_owned();
        self.api(api_version, kind, plural, namespaced)
            .patch(
                &name,
                &PatchParams::apply("gangplank-test").force(),
                &Patch::Apply(&body),
            )
            .await
            .unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
    }

    async fn get(&self, api_version: &str, kind: &str, plural: &str, name: &str) -> Option<Value> {
        self.api(api_version, kind, plural, true)
            .get_opt(name)
            .await
            .unwrap()
            .map(|o| serde_json::to_value(o).unwrap())
    }

    async fn entry(&self, name: &str) -> Option<Value> {
        self.get("networking.istio.io/v1", "WorkloadEntry", "workloadentries", name)
            .await
    }

    async fn binding(&self, name: &str) -> Option<Value> {
        self.get(
            "onboarding.gangplank.dev/v1alpha1",
            "WorkloadBinding",
            "workloadbindings",
            name,
        )
        .await
    }

    async fn token_used(&self, id: &str) -> u64 {
        let token = self
            .get("onboarding.gangplank.dev/v1alpha1", "JoinToken", "jointokens", id)
            .await
            .expect("the token exists");
        token["status"]["used"].as_u64().unwrap_or(0)
    }

    /// TokenRequests made so far, when the stand-in can count them.
    fn token_requests(&self) -> Option<usize> {
        self.stand_in.as_ref().map(|s| {
            s.writes()
                .iter()
                .filter(|w| w.resource == "serviceaccounts" && w.subresource.as_deref() == Some("token"))
                .count()
        })
    }

    async fn cleanup(&self) {
        if self.stand_in.is_none() {
            let _ = self
                .api("v1", "Namespace", "namespaces", false)
                .delete(&self.ns, &DeleteParams::background())
                .await;
        }
    }

    /// A join token for WorkloadGroup `ratings`; returns its id and the secret to hand out.
    async fn join_token(&self) -> (String, String) {
        let (token, secret) = gangplank_identity::token::create(
            &NamespacedName::new(&self.ns, "ratings"),
            Duration::from_secs(3600),
            1,
            time::OffsetDateTime::now_utc(),
        );
        let id = token.metadata.name.clone().unwrap();
        let mut body = serde_json::to_value(&token).unwrap();
        body.as_object_mut().unwrap().remove("status");
        self.apply(
            "onboarding.gangplank.dev/v1alpha1",
            "JoinToken",
            "jointokens",
            body,
        )
        .await;
        (id, secret.expose().to_owned())
    }
}

fn spawn_endpoint(root: &Path, cluster: &Cluster) -> (Proc, std::net::SocketAddr) {
    write_dev_tls(root, &["localhost"]);
    let config = root.join("endpoint.yaml");
    write(
        &config,
        &format!(
            "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: EndpointConfiguration
planeId: {PLANE_ID}
listen: 127.0.0.1:0
monitoringListen: 127.0.0.1:0
replica: endpoint-lifecycle
tls:
  certFile: {root}/tls/tls.crt
  keyFile: {root}/tls/tls.key
registry:
  kubernetes:
    kubeconfig: {kubeconfig}
    namespace: {ns}
    leaseDuration: 3s
stateDir: {root}/state
mesh:
  istiodIp: 10.10.10.11
  istioNamespace: {ns}
  clusterId: Kubernetes
identities:
  joinTokens: true
workloads:
  gracePeriod: 5m
  heartbeat: 500ms
  propagationDelay: 1s
",
            root = root.display(),
            kubeconfig = cluster.kubeconfig.display(),
            ns = cluster.ns,
        ),
    );
    run_endpoint("endpoint", &config)
}

fn sidecar_pid(vm: &Vm, not: Option<u32>) -> Option<u32> {
    until(WAIT, || {
        let pid: u32 = vm.read("sidecar.pid")?.trim().parse().ok()?;
        (Some(pid) != not && alive(pid)).then_some(pid)
    })
}

async fn lifecycle(cluster: &Cluster, root: &Path) {
    let ns = cluster.ns.clone();
    let mut group = serde_json::to_value(support::group(&ns, "ratings", &[("app", "ratings")])).unwrap();
    group.as_object_mut().unwrap().remove("status");
    cluster
        .apply("networking.istio.io/v1", "WorkloadGroup", "workloadgroups", group)
        .await;
    let policy = serde_json::to_value(support::policy(
        &ns,
        "allow-ratings",
        vec![join_tokens()],
        &[("app", "ratings")],
    ))
    .unwrap();
    cluster
        .apply(
            "onboarding.gangplank.dev/v1alpha1",
            "OnboardingPolicy",
            "onboardingpolicies",
            policy,
        )
        .await;
    cluster
        .apply(
            "v1",
            "ServiceAccount",
            "serviceaccounts",
            json!({"metadata": {"name": "ratings-sa"}}),
        )
        .await;
    cluster
        .apply(
            "v1",
            "ConfigMap",
            "configmaps",
            json!({"metadata": {"name": "istio-ca-root-cert"}, "data": {"root-cert.pem": ROOT_CERT}}),
        )
        .await;
    cluster
        .apply(
            "v1",
            "ConfigMap",
            "configmaps",
            json!({"metadata": {"name": "istio"}, "data": {"mesh": "trustDomain: cluster.local\n"}}),
        )
        .await;
    let (id, secret) = cluster.join_token().await;
    let (mut endpoint, addr) = spawn_endpoint(root, cluster);
    let ca = root.join("tls/ca.pem");

    // First join: an entry, and a binding of the VM's key.
    let mut vm = Vm::start_in(root, "a", addr, &ca, Credential::JoinToken(secret.clone()), &ns);
    let mut pid = sidecar_pid(&vm, None).unwrap_or_else(|| {
        panic!(
            "never onboarded; agent:\n{}\nendpoint:\n{}",
            vm.agent.output(),
            endpoint.output()
        )
    });
    let name = vm.registered_entry().expect("registration saved");
    assert!(name.starts_with(&format!("ratings-token-{id}-")), "{name}");
    assert!(cluster.entry(&name).await.is_some());
    let binding = cluster.binding(&name).await.expect("the key is bound");
    assert_eq!(binding["spec"]["credentialKind"], "join-token");
    assert_eq!(binding["metadata"]["ownerReferences"][0]["kind"], "WorkloadGroup");
    assert_eq!(cluster.token_used(&id).await, 1);

    // Two crashes: the same entry each time, no new token use.
    for round in 1..=2 {
        vm.kill_agent();
        assert!(
            until(WAIT, || (!alive(pid)).then_some(())).is_some(),
            "round {round}"
        );
        vm.restart_agent();
        pid = sidecar_pid(&vm, Some(pid)).unwrap_or_else(|| {
            panic!(
                "round {round}: not back; agent:\n{}\nendpoint:\n{}",
                vm.agent.output(),
                endpoint.output()
            )
        });
        vm.agent.wait_for("rejoining with this VM's bound key", WAIT);
        assert!(cluster.entry(&name).await.is_some(), "round {round}");
    }
    assert_eq!(cluster.token_used(&id).await, 1);

    // A VM with the spent token is refused before any TokenRequest.
    let requests = cluster.token_requests();
    let mut late = Vm::start_in(
        root,
        "late",
        addr,
        &ca,
        Credential::JoinToken(secret.clone()),
        &ns,
    );
    late.agent.wait_for("join token not accepted", WAIT);
    late.kill_agent();
    assert_eq!(
        cluster.token_requests(),
        requests,
        "a refused onboarding made a TokenRequest"
    );

    // An admin deletes the entry: the agent is told at once and comes back.
    cluster
        .api("networking.istio.io/v1", "WorkloadEntry", "workloadentries", true)
        .delete(&name, &DeleteParams::background())
        .await
        .unwrap();
    vm.agent.wait_for("was deleted|no longer exists", WAIT);
    let back = gangplank_testkit::process::eventually(
        "the entry is back",
        WAIT,
        Duration::from_millis(100),
        || async { cluster.entry(&name).await.is_some() },
    );
    back.await;
    assert!(alive(pid));

    // Released: binding and entry go, the agent cannot rejoin and stops its sidecar.
    let out = gangplank_command(&["instance", "release", &format!("{ns}/{name}"), "--kubernetes"])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    vm.agent
        .wait_for("stopping the sidecar: its WorkloadEntry was deleted", WAIT);
    assert!(
        until(WAIT, || (!alive(pid)).then_some(())).is_some(),
        "the sidecar keeps running"
    );
    assert!(cluster.binding(&name).await.is_none());
    vm.agent.wait_for("join token not accepted", WAIT);
    assert!(cluster.entry(&name).await.is_none(), "a released VM came back");

    vm.kill_agent();
    endpoint.signal("TERM");
    endpoint.wait_exit(WAIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stand_in_a_vm_rejoins_with_its_bound_key_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::stand_in(dir.path()).await;
    lifecycle(&cluster, dir.path()).await;
}

/// Needs a real cluster, so it is ignored (reported as skipped, never as passed) unless run
/// with `--run-ignored` and `GANGPLANK_TEST_KUBECONFIG` set (see the README).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real cluster: GANGPLANK_TEST_KUBECONFIG=<kubeconfig> and --ignored (README)"]
async fn real_cluster_a_vm_rejoins_with_its_bound_key_until_released() {
    let Some(kubeconfig) = std::env::var_os("GANGPLANK_TEST_KUBECONFIG") else {
        panic!("set GANGPLANK_TEST_KUBECONFIG to the kubeconfig of a cluster with Istio's CRDs");
    };
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::real(&kubeconfig.to_string_lossy()).await;
    lifecycle(&cluster, dir.path()).await;
    cluster.cleanup().await;
}
