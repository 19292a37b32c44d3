//! The operator's reconciler, end to end: a real `Controller` against the Kubernetes API
//! stand-in (`gangplank_testkit::kube_api`), and, unchanged, against a real cluster when
//! `GANGPLANK_TEST_KUBECONFIG` names a kubeconfig (the suite installs the OnboardingPlane CRD
//! and works in fresh namespaces `gangplank-operator-*`, deleted afterwards). A real API server
//! without kubelet stores Deployments but runs no pod: there a plane is judged from its
//! objects and stays `Progressing`; the stand-in also plays the Deployment controller (it
//! writes the Deployment's status) to show `Ready`.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use gangplank_operator::controller;
use gangplank_operator::plane::{Condition, OnboardingPlane};
use gangplank_operator::render::{CONFIG_HASH, CONFIG_KEY};
use gangplank_testkit::kube_api::Server;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use pretty_assertions::assert_eq;
use serde_json::{Value, json};

/// How long the controller (or a real garbage collector) may take to catch up.
const CATCH_UP: Duration = Duration::from_secs(30);
const PLANE: &str = "mesh";

struct Env {
    client: kube::Client,
    ns: String,
    stand_in: Option<Server>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    controller: Option<tokio::task::JoinHandle<()>>,
}

impl Env {
    async fn stand_in() -> Self {
        Self::stand_in_with(true).await
    }

    /// Without the Env's controller, for scenarios that run whole operators.
    async fn stand_in_bare() -> Self {
        Self::stand_in_with(false).await
    }

    async fn stand_in_with(controller: bool) -> Self {
        let server = Server::start().await.expect("stand-in");
        let client =
            kube::Client::try_from(kube::Config::new(server.url().parse().expect("url"))).expect("client");
        Self::start(client, "gangplank-system".into(), Some(server), controller).await
    }

    async fn cluster(kubeconfig: &str, scenario: &str, controller: bool) -> Self {
        let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("reading GANGPLANK_TEST_KUBECONFIG");
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("loading GANGPLANK_TEST_KUBECONFIG");
        let client = kube::Client::try_from(config).expect("client");
        let ns = format!("gangplank-operator-{scenario}-{}", std::process::id());
        Api::<Namespace>::all(client.clone())
            .patch(
                &ns,
                &PatchParams::apply("gangplank-conformance"),
                &Patch::Apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})),
            )
            .await
            .expect("creating the test namespace");
        Self::start(client, ns, None, controller).await
    }

    /// Installs the CRD, a TLS Secret, and starts the controller on the namespace.
    async fn start(client: kube::Client, ns: String, stand_in: Option<Server>, controller: bool) -> Self {
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.patch(
            "onboardingplanes.onboarding.gangplank.dev",
            &PatchParams::apply("gangplank-conformance").force(),
            &Patch::Apply(gangplank_operator::crd()),
        )
        .await
        .expect("installing the OnboardingPlane CRD");
        established(&crds, "onboardingplanes.onboarding.gangplank.dev").await;
        Api::<Secret>::namespaced(client.clone(), &ns)
            .patch(
                "mesh-tls",
                &PatchParams::apply("gangplank-conformance").force(),
                &Patch::Apply(json!({
                    "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                    "metadata": {"name": "mesh-tls", "namespace": ns},
                    "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5"},
                })),
            )
            .await
            .expect("creating the TLS Secret");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let c = client.clone();
        let n = ns.clone();
        let controller = controller.then(|| {
            tokio::spawn(async move {
                let metrics = std::sync::Arc::new(gangplank_operator::metrics::Metrics::default());
                controller::run(c, Some(&n), metrics, async {
                    let _ = stopped.await;
                })
                .await;
            })
        });
        Self {
            client,
            ns,
            stand_in,
            stop: Some(stop),
            controller,
        }
    }

    async fn stop(mut self) {
        if self.stand_in.is_none() {
            // While the controller still runs, so the finalizer removes the cluster-scoped RBAC
            // (and does not hold the namespace's deletion up forever).
            let planes = self.planes();
            let _ = planes.delete(PLANE, &DeleteParams::default()).await;
            eventually("the plane deleted", || async {
                planes.get_opt(PLANE).await.ok()?.is_none().then_some(())
            })
            .await;
        }
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(c) = self.controller.take() {
            let _ = tokio::time::timeout(CATCH_UP, c).await;
        }
        if self.stand_in.is_none() {
            let _ = Api::<Namespace>::all(self.client.clone())
                .delete(&self.ns, &DeleteParams::background())
                .await;
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn planes(&self) -> Api<OnboardingPlane> {
        self.api()
    }

    async fn create_plane(&self, spec: Value) -> Result<OnboardingPlane, kube::Error> {
        let plane: OnboardingPlane = serde_json::from_value(json!({
            "apiVersion": "onboarding.gangplank.dev/v1alpha1", "kind": "OnboardingPlane",
            "metadata": {"name": PLANE, "namespace": self.ns},
            "spec": spec,
        }))
        .expect("a plane");
        self.planes().create(&PostParams::default(), &plane).await
    }

    async fn patch_spec(&self, spec: Value) {
        self.planes()
            .patch(
                PLANE,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": spec})),
            )
            .await
            .expect("patching the plane");
    }

    /// Waits for the plane's condition `type_` to have `status`, and returns it.
    async fn condition(&self, type_: &str, status: &str) -> Condition {
        let planes = self.planes();
        eventually(&format!("{type_}={status}"), || async {
            let p = planes.get(PLANE).await.ok()?;
            let s = p.status?;
            (s.observed_generation == p.metadata.generation).then_some(())?;
            s.conditions
                .into_iter()
                .find(|c| c.type_ == type_ && c.status == status)
        })
        .await
    }

    /// Waits for the plane's condition `type_` to have `reason`, and returns it.
    async fn condition_because(&self, type_: &str, reason: &str) -> Condition {
        let planes = self.planes();
        eventually(&format!("{type_} because {reason}"), || async {
            let s = planes.get(PLANE).await.ok()?.status?;
            s.conditions
                .into_iter()
                .find(|c| c.type_ == type_ && c.reason == reason)
        })
        .await
    }

    async fn deployment(&self) -> Deployment {
        let api = self.api::<Deployment>();
        eventually("the Deployment", || async {
            api.get_opt("mesh-endpoint").await.ok()?
        })
        .await
    }

    /// Plays the Deployment controller of an API server without kubelet... with pods.
    async fn pods_ready(&self, n: i32) {
        let d = self.deployment().await;
        self.api::<Deployment>()
            .patch_status(
                "mesh-endpoint",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "observedGeneration": d.metadata.generation, "replicas": n,
                    "updatedReplicas": n, "readyReplicas": n, "availableReplicas": n,
                }})),
            )
            .await
            .expect("writing the Deployment's status");
    }
}

/// Waits until the CRD `name` is established.
async fn established(crds: &Api<CustomResourceDefinition>, name: &str) {
    eventually(&format!("CRD {name} established"), || async {
        let crd = crds.get(name).await.ok()?;
        crd.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await;
}

/// Polls `f` until it returns `Some`, for at most [`CATCH_UP`].
async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn spec() -> Value {
    json!({
        "hosts": ["onboarding.example.com"],
        "identities": {"joinTokens": true},
        "tls": {"secretName": "mesh-tls"},
    })
}

/// The manifests in `deploy/<file>`, by kind.
fn deployed(file: &str, kind: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("deploy/ manifest");
    text.split("\n---")
        .filter_map(|d| serde_saphyr::from_str::<Value>(d).ok())
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {}", path.display()))
}

/// `want` is in `got`: every field `want` has, `got` has with the same value (a real API
/// server adds defaults: probe timeouts, `fieldRef.apiVersion`, a subject's `apiGroup`);
/// lists match element by element and have the same length.
fn assert_subset(want: &Value, got: &Value, at: &str) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, v) in w {
                assert_subset(v, g.get(k).unwrap_or(&Value::Null), &format!("{at}.{k}"));
            }
        }
        (Value::Array(w), Value::Array(g)) => {
            assert_eq!(w.len(), g.len(), "{at}: {got} is not {want}");
            for (i, (w, g)) in w.iter().zip(g).enumerate() {
                assert_subset(w, g, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(want, got, "{at}"),
    }
}

fn to_value<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).expect("serialise")
}

/// The endpoint's own loader accepts the rendered configuration; returns it.
fn endpoint_config(cm: &ConfigMap) -> gangplank_endpoint::Config {
    let text = &cm.data.as_ref().expect("data")[CONFIG_KEY];
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(CONFIG_KEY);
    std::fs::write(&path, text).expect("write");
    gangplank_endpoint::Config::load(&path)
        .unwrap_or_else(|e| panic!("the endpoint refuses its config: {e}\n{text}"))
}

fn hash(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .expect("spec")
        .template
        .metadata
        .as_ref()
        .expect("meta")
        .annotations
        .as_ref()
        .expect("annotations")[CONFIG_HASH]
        .clone()
}

async fn ready_with_every_child(env: &Env) {
    let plane = env.create_plane(spec()).await.expect("creating the plane");
    let uid = plane.metadata.uid.clone().expect("uid");
    let c = env.condition("Progressing", "True").await;
    assert_eq!(c.reason, "RollingOut");
    let d = env.deployment().await;
    let owner = &d.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("OnboardingPlane", uid.as_str(), Some(true))
    );
    let spec = d.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(2));
    let pod = to_value(spec.template.spec.as_ref().expect("pod spec"));
    let want = deployed("endpoint.yaml", "Deployment")["spec"]["template"]["spec"].clone();
    // Hardened exactly as deploy/endpoint.yaml's endpoint.
    assert_subset(
        &want["securityContext"],
        &pod["securityContext"],
        "pod securityContext",
    );
    let (got_c, want_c) = (&pod["containers"][0], &want["containers"][0]);
    for field in [
        "securityContext",
        "readinessProbe",
        "livenessProbe",
        "ports",
        "args",
        "env",
        "volumeMounts",
        "resources",
    ] {
        assert_subset(&want_c[field], &got_c[field], field);
    }
    assert_eq!(
        got_c["image"],
        json!(format!("gangplank-endpoint:{}", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(pod["serviceAccountName"], "mesh-endpoint");
    let volumes: Vec<(String, Value)> = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .map(|v| (v["name"].as_str().unwrap_or_default().to_owned(), v.clone()))
        .collect();
    let volume = |n: &str| {
        volumes
            .iter()
            .find(|(name, _)| name == n)
            .map(|(_, v)| v.clone())
            .expect(n)
    };
    assert_eq!(volume("tls")["secret"]["secretName"], "mesh-tls");
    assert_eq!(volume("keys")["secret"]["secretName"], "mesh-endpoint-keys");
    assert_eq!(volume("keys")["secret"]["defaultMode"], 256);
    assert_eq!(volume("config")["configMap"]["name"], "mesh-endpoint");

    // The configuration is one the endpoint accepts, with the plane's values.
    let cm = env
        .api::<ConfigMap>()
        .get("mesh-endpoint")
        .await
        .expect("ConfigMap");
    let config = endpoint_config(&cm);
    assert_eq!(config.file.plane_id, PLANE);
    assert_eq!(config.token_issuer, "https://onboarding.example.com:15443");
    assert_eq!(config.file.sidecar_token.lifetime, Duration::from_secs(3600));
    assert!(config.file.identities.join_tokens);
    assert!(config.health_checks());
    assert_eq!(config.file.mesh.istio_namespace, "istio-system");

    // RBAC: exactly deploy/rbac.yaml's rules, bound to the plane's ServiceAccount.
    env.api::<ServiceAccount>()
        .get("mesh-endpoint")
        .await
        .expect("ServiceAccount");
    let cluster = format!("gangplank-endpoint.{}.{PLANE}", env.ns);
    let cr = Api::<ClusterRole>::all(env.client.clone())
        .get(&cluster)
        .await
        .expect("ClusterRole");
    assert_eq!(to_value(&cr.rules), deployed("rbac.yaml", "ClusterRole")["rules"]);
    let crb = Api::<ClusterRoleBinding>::all(env.client.clone())
        .get(&cluster)
        .await
        .expect("ClusterRoleBinding");
    assert_eq!(crb.role_ref.name, cluster);
    let subject = json!([{"kind": "ServiceAccount", "name": "mesh-endpoint", "namespace": env.ns}]);
    assert_subset(&subject, &to_value(&crb.subjects), "ClusterRoleBinding subjects");
    let role = env.api::<Role>().get("mesh-endpoint-leases").await.expect("Role");
    assert_eq!(to_value(&role.rules), deployed("rbac.yaml", "Role")["rules"]);
    let rb = env
        .api::<RoleBinding>()
        .get("mesh-endpoint-leases")
        .await
        .expect("RoleBinding");
    assert_subset(&subject, &to_value(&rb.subjects), "RoleBinding subjects");

    let svc = env.api::<Service>().get("mesh-endpoint").await.expect("Service");
    let ports: Vec<(Option<String>, i32)> = svc
        .spec
        .as_ref()
        .expect("spec")
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone(), p.port))
        .collect();
    assert_eq!(
        ports,
        [
            (Some("grpc-onboard".into()), 15443),
            (Some("http-monitoring".into()), 15014)
        ]
    );
    let pdb = env
        .api::<PodDisruptionBudget>()
        .get("mesh-endpoint")
        .await
        .expect("PodDisruptionBudget");
    assert_eq!(
        to_value(&pdb.spec.as_ref().expect("spec").min_available),
        json!(1)
    );
    let keys = env
        .api::<Secret>()
        .get("mesh-endpoint-keys")
        .await
        .expect("keys Secret");
    let data = keys.data.expect("data");
    assert!(String::from_utf8_lossy(&data["signing-key.pem"].0).starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(data["nonce-key"].0.len(), 32);

    let status = env
        .planes()
        .get(PLANE)
        .await
        .expect("plane")
        .status
        .expect("status");
    assert_eq!(
        status.address.as_deref(),
        Some(format!("mesh-endpoint.{}.svc:15443", env.ns).as_str())
    );
    assert_eq!(status.ready_replicas, 0);
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded");
    assert_eq!(degraded.status, "False");

    if let Some(server) = &env.stand_in {
        env.pods_ready(2).await;
        let ready = env.condition("Ready", "True").await;
        assert_eq!(ready.reason, "Available");
        env.condition("Progressing", "False").await;
        assert_eq!(
            env.planes()
                .get(PLANE)
                .await
                .expect("plane")
                .status
                .expect("status")
                .ready_replicas,
            2
        );
        // A steady plane costs no writes: applies that change nothing and an unchanged status
        // are not written (or do not wake the controller into a loop).
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.reset_writes();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let writes = server.writes();
        assert!(writes.is_empty(), "writes while nothing changed: {writes:?}");
    }
}

async fn spec_change_updates_children(env: &Env) {
    env.create_plane(spec()).await.expect("creating the plane");
    env.condition("Progressing", "True").await;
    let before = hash(&env.deployment().await);

    // Replicas: the Deployment scales, the pods do not roll.
    env.patch_spec(json!({"replicas": 3})).await;
    let api = env.api::<Deployment>();
    let d = eventually("3 replicas", || async {
        let d = api.get("mesh-endpoint").await.ok()?;
        (d.spec.as_ref()?.replicas == Some(3)).then_some(d)
    })
    .await;
    assert_eq!(hash(&d), before, "a scale must not roll the pods");

    // The sidecar token lifetime: the configuration changes and the pods roll.
    env.patch_spec(json!({"sidecarToken": {"lifetime": "2h"}})).await;
    let d = eventually("a new config hash", || async {
        let d = api.get("mesh-endpoint").await.ok()?;
        (hash(&d) != before).then_some(d)
    })
    .await;
    let cm = env
        .api::<ConfigMap>()
        .get("mesh-endpoint")
        .await
        .expect("ConfigMap");
    assert_eq!(
        endpoint_config(&cm).file.sidecar_token.lifetime,
        Duration::from_secs(7200)
    );

    // The image.
    env.patch_spec(json!({"image": "registry.example/gangplank-endpoint:9.9.9"}))
        .await;
    eventually("the new image", || async {
        let d = api.get("mesh-endpoint").await.ok()?;
        let image = d.spec?.template.spec?.containers.first()?.image.clone()?;
        (image == "registry.example/gangplank-endpoint:9.9.9").then_some(())
    })
    .await;
    let _ = d;
    env.condition("Degraded", "False").await;
    let plane = env.planes().get(PLANE).await.expect("plane");
    assert_eq!(
        plane.status.and_then(|s| s.observed_generation),
        plane.metadata.generation
    );
}

async fn deleted_child_is_recreated(env: &Env) {
    env.create_plane(spec()).await.expect("creating the plane");
    let old = env.deployment().await.metadata.uid.expect("uid");
    let cm_api = env.api::<ConfigMap>();
    eventually("the ConfigMap", || async {
        cm_api.get_opt("mesh-endpoint").await.ok()?
    })
    .await;
    let deleted = tokio::time::Instant::now();
    env.api::<Deployment>()
        .delete("mesh-endpoint", &DeleteParams::default())
        .await
        .expect("delete");
    cm_api
        .delete("mesh-endpoint", &DeleteParams::default())
        .await
        .expect("delete");
    let api = env.api::<Deployment>();
    eventually("a new Deployment", || async {
        let d = api.get_opt("mesh-endpoint").await.ok()??;
        (d.metadata.uid.as_deref() != Some(old.as_str()) && d.metadata.deletion_timestamp.is_none())
            .then_some(())
    })
    .await;
    eventually("a new ConfigMap", || async {
        cm_api.get_opt("mesh-endpoint").await.ok()?
    })
    .await;
    // Through the watch on owned objects, not the periodic requeue (30s while rolling out).
    assert!(
        deleted.elapsed() < Duration::from_secs(10),
        "recreated after {:?}",
        deleted.elapsed()
    );
    // A recreated keys Secret holds new keys, which the replicas read at start: they roll.
    let before = hash(&env.deployment().await);
    let secrets = env.api::<Secret>();
    let old_keys = secrets
        .get("mesh-endpoint-keys")
        .await
        .expect("keys")
        .metadata
        .uid;
    secrets
        .delete("mesh-endpoint-keys", &DeleteParams::default())
        .await
        .expect("delete");
    let new_keys = eventually("new keys", || async {
        let s = secrets.get_opt("mesh-endpoint-keys").await.ok()??;
        (s.metadata.uid != old_keys).then_some(s)
    })
    .await;
    assert!(new_keys.data.expect("data").contains_key("signing-key.pem"));
    eventually("a new config hash", || async {
        let d = api.get("mesh-endpoint").await.ok()?;
        (hash(&d) != before).then_some(())
    })
    .await;

    // An edit by someone else is put back.
    let crb = Api::<ClusterRole>::all(env.client.clone());
    let name = format!("gangplank-endpoint.{}.{PLANE}", env.ns);
    crb.patch(&name, &PatchParams::apply("someone-else").force(), &Patch::Apply(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name}, "rules": [],
    })))
    .await
    .expect("editing the ClusterRole");
    let want = deployed("rbac.yaml", "ClusterRole")["rules"].clone();
    eventually("the ClusterRole's rules back", || async {
        let cr = crb.get(&name).await.ok()?;
        (to_value(&cr.rules) == want).then_some(())
    })
    .await;
}

async fn bad_spec_is_degraded_and_creates_nothing(env: &Env) {
    // The schema refuses what it can at apply time.
    for (bad, field) in [
        (json!({"hosts": [], "tls": {"secretName": "mesh-tls"}}), "hosts"),
        (
            json!({"hosts": ["a.example"], "replicas": 0, "tls": {"secretName": "mesh-tls"}}),
            "replicas",
        ),
        (
            json!({"hosts": ["a.example"], "sidecarToken": {"lifetime": "an hour"}, "tls": {"secretName": "mesh-tls"}}),
            "lifetime",
        ),
    ] {
        let err = env.create_plane(bad).await.expect_err("the schema refuses it");
        match err {
            kube::Error::Api(s) => {
                assert_eq!(s.code, 422, "{s:?}");
                assert!(s.message.contains(field), "{field}: {}", s.message);
            }
            other => panic!("{other}"),
        }
    }
    // What the schema cannot see, the reconciler reports, creating nothing.
    let mut bad = spec();
    bad["sidecarToken"] = json!({"lifetime": "5m"});
    env.create_plane(bad).await.expect("the schema lets it through");
    let c = env.condition("Degraded", "True").await;
    assert_eq!(c.reason, "InvalidSpec");
    assert!(
        c.message.contains("spec.sidecarToken.lifetime") && c.message.contains("set at least 10m"),
        "{}",
        c.message
    );
    assert_eq!(env.condition("Ready", "False").await.reason, "InvalidSpec");
    assert!(
        env.api::<Deployment>()
            .get_opt("mesh-endpoint")
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        env.api::<ConfigMap>()
            .get_opt("mesh-endpoint")
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        env.api::<ServiceAccount>()
            .get_opt("mesh-endpoint")
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        env.api::<Secret>()
            .get_opt("mesh-endpoint-keys")
            .await
            .expect("get")
            .is_none()
    );
    let cluster = format!("gangplank-endpoint.{}.{PLANE}", env.ns);
    assert!(
        Api::<ClusterRole>::all(env.client.clone())
            .get_opt(&cluster)
            .await
            .expect("get")
            .is_none()
    );

    // Fixed, it reconciles.
    env.patch_spec(json!({"sidecarToken": {"lifetime": "10m"}})).await;
    env.condition("Degraded", "False").await;
    env.deployment().await;
}

async fn a_missing_tls_secret_is_degraded_until_created(env: &Env) {
    let mut s = spec();
    s["tls"]["secretName"] = json!("later-tls");
    env.create_plane(s).await.expect("creating the plane");
    let c = env.condition("Degraded", "True").await;
    assert_eq!(c.reason, "TLSSecretMissing");
    assert!(
        c.message.contains("later-tls") && c.message.contains("create it"),
        "{}",
        c.message
    );
    // Not a spec problem: the children are there, the pods wait for the Secret.
    env.deployment().await;
    let created = tokio::time::Instant::now();
    env.api::<Secret>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "later-tls"}, "type": "kubernetes.io/tls",
                "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5"},
            }))
            .expect("secret"),
        )
        .await
        .expect("creating the TLS Secret");
    assert_eq!(env.condition("Degraded", "False").await.reason, "Reconciled");
    // Through the watch on Secrets, not the periodic requeue (30s).
    assert!(
        created.elapsed() < Duration::from_secs(10),
        "noticed after {:?}",
        created.elapsed()
    );
}

async fn deleting_the_plane_removes_its_children(env: &Env) {
    env.create_plane(spec()).await.expect("creating the plane");
    env.condition("Progressing", "True").await;
    let cluster = format!("gangplank-endpoint.{}.{PLANE}", env.ns);
    let crs = Api::<ClusterRole>::all(env.client.clone());
    let crbs = Api::<ClusterRoleBinding>::all(env.client.clone());
    assert!(crs.get_opt(&cluster).await.expect("get").is_some());
    // Background (kubectl's default): foreground deletion waits for a garbage collector, which
    // a bare API server does not have; the operator's finalizer removes the children itself.
    env.planes()
        .delete(PLANE, &DeleteParams::default())
        .await
        .expect("deleting the plane");
    let planes = env.planes();
    eventually("the plane gone", || async {
        planes.get_opt(PLANE).await.ok()?.is_none().then_some(())
    })
    .await;
    let deployments = env.api::<Deployment>();
    let cms = env.api::<ConfigMap>();
    let sas = env.api::<ServiceAccount>();
    let secrets = env.api::<Secret>();
    let services = env.api::<Service>();
    let pdbs = env.api::<PodDisruptionBudget>();
    let roles = env.api::<Role>();
    eventually("every child gone", || async {
        let gone = deployments.get_opt("mesh-endpoint").await.ok()?.is_none()
            && cms.get_opt("mesh-endpoint").await.ok()?.is_none()
            && sas.get_opt("mesh-endpoint").await.ok()?.is_none()
            && secrets.get_opt("mesh-endpoint-keys").await.ok()?.is_none()
            && services.get_opt("mesh-endpoint").await.ok()?.is_none()
            && pdbs.get_opt("mesh-endpoint").await.ok()?.is_none()
            && roles.get_opt("mesh-endpoint-leases").await.ok()?.is_none()
            && crs.get_opt(&cluster).await.ok()?.is_none()
            && crbs.get_opt(&cluster).await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    // The user's TLS Secret is not the plane's.
    assert!(secrets.get_opt("mesh-tls").await.expect("get").is_some());
}

/// Whether `cert_pem` (a chain) is valid for `host` and signed by `ca_pem`.
fn verifies(cert_pem: &[u8], ca_pem: &[u8], host: &str) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(std::sync::Arc::new(roots), provider)
            .build()
            .map_err(|e| e.to_string())?;
    let chain: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let (leaf, rest) = chain.split_first().ok_or("no certificate")?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    verifier
        .verify_server_cert(leaf, rest, &name, &[], UnixTime::now())
        .map(drop)
        .map_err(|e| e.to_string())
}

fn secret_data(s: &Secret, key: &str) -> Vec<u8> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| v.0.clone())
        .unwrap_or_default()
}

async fn issued_certificate_is_served_and_renewed(env: &Env) {
    env.create_plane(spec_without_tls())
        .await
        .expect("creating the plane");
    env.condition("Progressing", "True").await;
    assert_eq!(env.condition("Degraded", "False").await.reason, "Reconciled");
    let secrets = env.api::<Secret>();
    let cms = env.api::<ConfigMap>();
    let tls = eventually("the serving Secret", || async {
        secrets.get_opt("mesh-endpoint-tls").await.ok()?
    })
    .await;
    let ca_cm = eventually("the CA ConfigMap", || async {
        cms.get_opt("mesh-endpoint-ca").await.ok()?
    })
    .await;
    let ca = ca_cm.data.as_ref().expect("data")["ca.crt"].clone().into_bytes();
    assert_eq!(tls.type_.as_deref(), Some("kubernetes.io/tls"));
    // Agents that trust ca.crt accept the endpoint for its host, and for no other.
    verifies(&secret_data(&tls, "tls.crt"), &ca, "onboarding.example.com")
        .expect("the served certificate verifies");
    assert!(verifies(&secret_data(&tls, "tls.crt"), &ca, "other.example.com").is_err());
    assert!(String::from_utf8_lossy(&secret_data(&tls, "tls.key")).contains("PRIVATE KEY"));
    // The CA's key stays in its own Secret, which the endpoint does not mount.
    let ca_secret = secrets.get("mesh-endpoint-ca").await.expect("the CA Secret");
    assert_eq!(secret_data(&ca_secret, "tls.crt"), ca);
    let d = env.deployment().await;
    let pod = to_value(
        d.spec
            .as_ref()
            .expect("spec")
            .template
            .spec
            .as_ref()
            .expect("pod"),
    );
    let tls_volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "tls")
        .cloned()
        .expect("tls volume");
    assert_eq!(tls_volume["secret"]["secretName"], "mesh-endpoint-tls");
    let status = env
        .planes()
        .get(PLANE)
        .await
        .expect("plane")
        .status
        .expect("status");
    assert_eq!(status.tls_secret_name.as_deref(), Some("mesh-endpoint-tls"));
    assert_eq!(status.ca_config_map.as_deref(), Some("mesh-endpoint-ca"));

    // A new host: a new certificate for both hosts, from the same CA; the pods roll.
    let before = hash(&d);
    env.patch_spec(json!({"hosts": ["onboarding.example.com", "vms.example.net"]}))
        .await;
    let tls2 = eventually("a certificate for the new host", || async {
        let t = secrets.get("mesh-endpoint-tls").await.ok()?;
        verifies(&secret_data(&t, "tls.crt"), &ca, "vms.example.net")
            .ok()
            .map(|()| t)
    })
    .await;
    verifies(&secret_data(&tls2, "tls.crt"), &ca, "onboarding.example.com").expect("still the first host");
    let api = env.api::<Deployment>();
    eventually("the pods roll for the new certificate", || async {
        (hash(&api.get("mesh-endpoint").await.ok()?) != before).then_some(())
    })
    .await;

    // A Secret that no longer holds what the operator wrote is issued again.
    let foreign = gangplank_tls_dev_cert();
    secrets
        .patch(
            "mesh-endpoint-tls",
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mesh-endpoint-tls"},
                                  "data": {"tls.crt": foreign}}),
            ),
        )
        .await
        .expect("overwriting the certificate");
    eventually("the certificate issued again", || async {
        let t = secrets.get("mesh-endpoint-tls").await.ok()?;
        verifies(&secret_data(&t, "tls.crt"), &ca, "vms.example.net").ok()
    })
    .await;
    // The CA is kept: agents need not change their caBundle.
    let ca_after = cms.get("mesh-endpoint-ca").await.expect("CA ConfigMap");
    assert_eq!(ca_after.data.expect("data")["ca.crt"].as_bytes(), ca.as_slice());
}

/// A self-signed certificate that is not the operator's, base64.
fn gangplank_tls_dev_cert() -> String {
    use base64::Engine;
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["vms.example.net".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    base64::engine::general_purpose::STANDARD.encode(cert.pem())
}

async fn an_issued_certificate_is_renewed_before_it_expires_(env: &Env) {
    env.create_plane(spec_without_tls())
        .await
        .expect("creating the plane");
    let secrets = env.api::<Secret>();
    let first = eventually("the serving Secret", || async {
        secrets.get_opt("mesh-endpoint-tls").await.ok()?
    })
    .await;
    let cert = secret_data(&first, "tls.crt");
    // The certificate is as it was written, but now expires within renewBefore (720h): as if
    // 61 days had passed. The operator renews it without any change to the plane.
    let soon = time::OffsetDateTime::now_utc() + time::Duration::days(29);
    let soon = soon
        .format(&time::format_description::well_known::Rfc3339)
        .expect("time");
    secrets
        .patch(
            "mesh-endpoint-tls",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {gangplank_operator::tls::ISSUED_NOT_AFTER: soon}}}),
            ),
        )
        .await
        .expect("ageing the certificate");
    let renewed = eventually("a renewed certificate", || async {
        let t = secrets.get("mesh-endpoint-tls").await.ok()?;
        (secret_data(&t, "tls.crt") != cert).then_some(t)
    })
    .await;
    let not_after = &renewed.metadata.annotations.as_ref().expect("annotations")
        [gangplank_operator::tls::ISSUED_NOT_AFTER];
    assert!(not_after.as_str() > soon.as_str(), "renewed until {not_after}");
}

fn spec_without_tls() -> Value {
    let mut s = spec();
    s.as_object_mut().expect("object").remove("tls");
    s
}

/// cert-manager's Certificate CRD, reduced to what the operator writes (a real cert-manager
/// installs the full one).
fn cert_manager_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "certificates.cert-manager.io"},
        "spec": {"group": "cert-manager.io", "scope": "Namespaced",
                 "names": {"plural": "certificates", "singular": "certificate", "kind": "Certificate", "listKind": "CertificateList"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                                   "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                                   "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}]},
    })
}

async fn a_cert_manager_certificate_is_requested(env: &Env) {
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    let had_cert_manager = crds
        .get_opt("certificates.cert-manager.io")
        .await
        .expect("get")
        .is_some();
    let mut s = spec();
    s["tls"] = json!({"certManager": {"issuerRef": {"name": "mesh-ca", "kind": "ClusterIssuer"}}});
    env.create_plane(s).await.expect("creating the plane");
    if !had_cert_manager {
        let c = env.condition("Degraded", "True").await;
        assert_eq!(c.reason, "CertManagerMissing");
        assert!(c.message.contains("install cert-manager"), "{}", c.message);
        crds.patch(
            "certificates.cert-manager.io",
            &PatchParams::apply("gangplank-conformance").force(),
            &Patch::Apply(cert_manager_crd()),
        )
        .await
        .expect("installing the Certificate CRD");
        established(&crds, "certificates.cert-manager.io").await;
        // A change of the plane wakes the operator at once (otherwise: its 30 s recheck).
        env.planes()
            .patch(
                PLANE,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"touch": "1"}}})),
            )
            .await
            .expect("touching the plane");
    }
    let certs: Api<kube::api::DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.ns,
        &gangplank_operator::tls::certificate_resource(),
    );
    let cert = eventually("the Certificate", || async {
        certs.get_opt("mesh-endpoint").await.ok()?
    })
    .await;
    assert_subset(
        &json!({"secretName": "mesh-endpoint-tls", "dnsNames": ["onboarding.example.com"],
                "issuerRef": {"name": "mesh-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}}),
        &cert.data["spec"],
        "Certificate spec",
    );
    assert_eq!(
        cert.metadata.owner_references.as_ref().expect("owner")[0].kind,
        "OnboardingPlane"
    );
    // Until cert-manager issues it, the plane says so.
    let c = env.condition_because("Degraded", "TLSSecretMissing").await;
    assert_eq!(c.status, "True");
    assert!(
        c.message.contains("cert-manager has not issued it yet"),
        "{}",
        c.message
    );
    let before = hash(&env.deployment().await);
    // Play cert-manager: the Secret, with the issuer's CA.
    env.api::<Secret>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "mesh-endpoint-tls"}, "type": "kubernetes.io/tls",
                "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5", "ca.crt": "Y2E="},
            }))
            .expect("secret"),
        )
        .await
        .expect("creating the Secret");
    assert_eq!(env.condition("Degraded", "False").await.reason, "Reconciled");
    let cms = env.api::<ConfigMap>();
    let ca = eventually("the CA published", || async {
        cms.get_opt("mesh-endpoint-ca").await.ok()?
    })
    .await;
    assert_eq!(ca.data.expect("data")["ca.crt"], "ca");
    let api = env.api::<Deployment>();
    eventually("the pods roll for the certificate", || async {
        (hash(&api.get("mesh-endpoint").await.ok()?) != before).then_some(())
    })
    .await;
    // Deleting the plane deletes its Certificate.
    env.planes()
        .delete(PLANE, &DeleteParams::default())
        .await
        .expect("delete");
    eventually("the Certificate gone", || async {
        certs.get_opt("mesh-endpoint").await.ok()?.is_none().then_some(())
    })
    .await;
    if !had_cert_manager {
        let _ = crds
            .delete("certificates.cert-manager.io", &DeleteParams::default())
            .await;
    }
}

/// Two whole operators (CRD install, leader election, controller) on one namespace.
async fn two_operators_elect_one_leader(env: &Env) {
    use gangplank_operator::metrics::Metrics;
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;
    let start = |identity: &str| {
        let options = gangplank_operator::Options {
            namespace: Some(env.ns.clone()),
            install_crds: true,
            leader_elect: true,
            lease_namespace: env.ns.clone(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(3),
        };
        let metrics = Arc::new(Metrics::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(gangplank_operator::run(
            env.client.clone(),
            options,
            metrics.clone(),
            stop.clone(),
        ));
        (metrics, stop, task)
    };
    let (ma, stop_a, task_a) = start("operator-a");
    let (mb, stop_b, task_b) = start("operator-b");
    eventually("a leader", || async {
        (ma.is_leader() || mb.is_leader()).then_some(())
    })
    .await;
    env.create_plane(spec()).await.expect("creating the plane");
    env.condition("Progressing", "True").await;
    // For 3 s (a Lease duration), sampled every 50 ms: never two leaders, and the standby
    // reconciles nothing.
    for _ in 0..60 {
        assert!(!(ma.is_leader() && mb.is_leader()), "two leaders");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (leader, standby, stop_leader, task_leader, stop_standby, task_standby, standby_name) =
        if ma.is_leader() {
            (ma, mb, stop_a, task_a, stop_b, task_b, "operator-b")
        } else {
            (mb, ma, stop_b, task_b, stop_a, task_a, "operator-a")
        };
    assert!(leader.reconciles() > 0);
    assert_eq!(standby.reconciles(), 0, "the standby reconciled");
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(env.client.clone(), &env.ns)
        .get(gangplank_operator::election::LEASE)
        .await
        .expect("the leader Lease");
    assert_ne!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some(standby_name)
    );

    // The leader stops (a rollout): it releases the Lease, the standby takes over and
    // reconciles the next change.
    let released = tokio::time::Instant::now();
    stop_leader.cancel();
    task_leader
        .await
        .expect("join")
        .expect("the leader stops cleanly");
    assert!(!leader.is_leader());
    eventually("the standby leads", || async {
        standby.is_leader().then_some(())
    })
    .await;
    // Released, not left to expire: taken within a Lease duration (3 s).
    assert!(
        released.elapsed() < Duration::from_secs(3),
        "the standby took over after {:?}",
        released.elapsed()
    );
    env.patch_spec(json!({"replicas": 3})).await;
    let api = env.api::<Deployment>();
    eventually("3 replicas, from the new leader", || async {
        (api.get("mesh-endpoint").await.ok()?.spec?.replicas == Some(3)).then_some(())
    })
    .await;
    assert!(standby.reconciles() > 0);
    delete_plane(env).await;
    stop_standby.cancel();
    task_standby.await.expect("join").expect("stops cleanly");
}

async fn crds_are_installed_and_upgraded_at_start_up(env: &Env) {
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    // An older OnboardingPlane CRD, without the printer columns.
    let mut old = to_value(&gangplank_operator::crd());
    old["spec"]["versions"][0]["additionalPrinterColumns"] = json!([]);
    crds.patch(
        "onboardingplanes.onboarding.gangplank.dev",
        &PatchParams::apply("gangplank-conformance").force(),
        &Patch::Apply(old),
    )
    .await
    .expect("an old CRD");
    let metrics = Arc::new(gangplank_operator::metrics::Metrics::default());
    let stop = CancellationToken::new();
    let options = gangplank_operator::Options {
        namespace: Some(env.ns.clone()),
        install_crds: true,
        leader_elect: false,
        lease_namespace: env.ns.clone(),
        identity: "operator".into(),
        lease_duration: Duration::from_secs(3),
    };
    let task = tokio::spawn(gangplank_operator::run(
        env.client.clone(),
        options,
        metrics.clone(),
        stop.clone(),
    ));
    eventually("every CRD current and established", || async {
        for want in gangplank_operator::crds::all().ok()? {
            let name = want.metadata.name.clone()?;
            let got = crds.get(&name).await.ok()?;
            let established = got
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            let columns =
                |c: &CustomResourceDefinition| to_value(&c.spec.versions[0].additional_printer_columns);
            (established && columns(&got) == columns(&want)).then_some(())?;
        }
        Some(())
    })
    .await;
    eventually("ready", || async { metrics.is_ready().then_some(()) }).await;
    env.create_plane(spec()).await.expect("creating the plane");
    env.deployment().await;
    delete_plane(env).await;
    stop.cancel();
    task.await.expect("join").expect("stops cleanly");
}

/// Deletes the plane and waits until its finalizer has run (while an operator runs).
async fn delete_plane(env: &Env) {
    let planes = env.planes();
    planes
        .delete(PLANE, &DeleteParams::default())
        .await
        .expect("deleting the plane");
    eventually("the plane deleted", || async {
        planes.get_opt(PLANE).await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn plane_becomes_ready_with_every_child() {
    let env = Env::stand_in().await;
    ready_with_every_child(&env).await;
    env.stop().await;
}

#[tokio::test]
async fn spec_change_updates_children_and_rolls_the_pods() {
    let env = Env::stand_in().await;
    spec_change_updates_children(&env).await;
    env.stop().await;
}

#[tokio::test]
async fn a_deleted_or_edited_child_is_put_back() {
    let env = Env::stand_in().await;
    deleted_child_is_recreated(&env).await;
    env.stop().await;
}

#[tokio::test]
async fn a_bad_spec_is_degraded_with_what_to_change_and_creates_nothing() {
    let env = Env::stand_in().await;
    bad_spec_is_degraded_and_creates_nothing(&env).await;
    env.stop().await;
}

#[tokio::test]
async fn a_missing_tls_secret_is_degraded_until_it_is_created() {
    let env = Env::stand_in().await;
    a_missing_tls_secret_is_degraded_until_created(&env).await;
    env.stop().await;
}

#[tokio::test]
async fn deleting_the_plane_removes_its_children_and_cluster_rbac() {
    let env = Env::stand_in().await;
    deleting_the_plane_removes_its_children(&env).await;
    env.stop().await;
}

#[tokio::test]
async fn the_operator_issues_the_serving_certificate_from_its_own_ca() {
    let env = Env::stand_in().await;
    issued_certificate_is_served_and_renewed(&env).await;
    env.stop().await;
}

#[tokio::test]
async fn an_issued_certificate_is_renewed_before_it_expires() {
    let env = Env::stand_in().await;
    an_issued_certificate_is_renewed_before_it_expires_(&env).await;
    env.stop().await;
}

#[tokio::test]
async fn a_cert_manager_certificate_is_requested_when_cert_manager_is_installed() {
    let env = Env::stand_in().await;
    a_cert_manager_certificate_is_requested(&env).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operator_replicas_never_fight_one_leads() {
    let env = Env::stand_in_bare().await;
    two_operators_elect_one_leader(&env).await;
    env.stop().await;
}

#[tokio::test]
async fn the_operator_installs_and_upgrades_its_crds_at_start_up() {
    let env = Env::stand_in_bare().await;
    crds_are_installed_and_upgraded_at_start_up(&env).await;
    env.stop().await;
}

#[tokio::test]
#[ignore = "needs a real cluster: GANGPLANK_TEST_KUBECONFIG=<kubeconfig> and --ignored (README)"]
async fn real_cluster() {
    let Some(kubeconfig) = std::env::var_os("GANGPLANK_TEST_KUBECONFIG") else {
        panic!(
            "set GANGPLANK_TEST_KUBECONFIG to the kubeconfig of a cluster to run the operator suite against it"
        );
    };
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    macro_rules! run {
        ($scenario:ident, $short:literal) => {{
            let env = Env::cluster(&kubeconfig, $short, true).await;
            $scenario(&env).await;
            env.stop().await;
        }};
        (bare $scenario:ident, $short:literal) => {{
            let env = Env::cluster(&kubeconfig, $short, false).await;
            $scenario(&env).await;
            env.stop().await;
        }};
    }
    run!(ready_with_every_child, "ready");
    run!(spec_change_updates_children, "change");
    run!(deleted_child_is_recreated, "recreate");
    run!(bad_spec_is_degraded_and_creates_nothing, "invalid");
    run!(a_missing_tls_secret_is_degraded_until_created, "tls");
    run!(deleting_the_plane_removes_its_children, "delete");
    run!(issued_certificate_is_served_and_renewed, "issued");
    run!(an_issued_certificate_is_renewed_before_it_expires_, "renew");
    run!(a_cert_manager_certificate_is_requested, "certmgr");
    run!(bare two_operators_elect_one_leader, "leader");
    run!(bare crds_are_installed_and_upgraded_at_start_up, "crds");
}

/// The operator as `deploy/operator.yaml` installs it, authorised only by that manifest's RBAC
/// (its ServiceAccount's token, from TokenRequest): a real API server enforces RBAC, including
/// the escalation check on the endpoint's Role and ClusterRole, which the stand-in does not.
#[tokio::test]
#[ignore = "needs a real cluster: GANGPLANK_TEST_KUBECONFIG=<kubeconfig> and --ignored (README)"]
async fn real_cluster_the_operator_needs_only_its_manifest_rbac() {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;
    let Some(path) = std::env::var_os("GANGPLANK_TEST_KUBECONFIG") else {
        panic!("set GANGPLANK_TEST_KUBECONFIG to the kubeconfig of a cluster");
    };
    let admin_kc = kube::config::Kubeconfig::read_from(&path).expect("reading GANGPLANK_TEST_KUBECONFIG");
    let admin = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(admin_kc.clone(), &Default::default())
            .await
            .expect("config"),
    )
    .expect("client");
    // Install the manifest (server-side apply, as `kubectl apply --server-side` would).
    let settings = gangplank_operator::manifest::Settings::default();
    let discovery = kube::discovery::Discovery::new(admin.clone())
        .run()
        .await
        .expect("discovery");
    // Without the operator's Deployment: on a cluster with kubelet it would run and compete.
    let manifest: Vec<Value> = gangplank_operator::manifest::objects(&settings)
        .expect("manifest")
        .into_iter()
        .filter(|o| o["kind"] != "Deployment")
        .collect();
    for obj in &manifest {
        let obj: kube::api::DynamicObject = serde_json::from_value(obj.clone()).expect("object");
        let gvk = kube::api::GroupVersionKind::try_from(obj.types.as_ref().expect("types")).expect("gvk");
        let (ar, caps) = discovery.resolve_gvk(&gvk).expect("a served kind");
        let api: Api<kube::api::DynamicObject> = match caps.scope {
            kube::discovery::Scope::Namespaced => {
                Api::namespaced_with(admin.clone(), obj.metadata.namespace.as_deref().expect("ns"), &ar)
            }
            kube::discovery::Scope::Cluster => Api::all_with(admin.clone(), &ar),
        };
        let name = obj.metadata.name.clone().expect("name");
        api.patch(
            &name,
            &PatchParams::apply("gangplank-conformance").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("applying {name}: {e}"));
    }
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), &settings.namespace)
        .create_token_request(
            "gangplank-operator",
            &PostParams::default(),
            &serde_json::from_value::<TokenRequest>(
                json!({"spec": {"audiences": [], "expirationSeconds": 3600}}),
            )
            .expect("request"),
        )
        .await
        .expect("a token for the operator's ServiceAccount")
        .status
        .expect("status")
        .token;
    // The same cluster, as the operator's ServiceAccount.
    let mut kc = serde_json::to_value(&admin_kc).expect("kubeconfig");
    for user in kc["users"].as_array_mut().expect("users") {
        user["user"] = json!({"token": token});
    }
    let kc = kube::config::Kubeconfig::from_yaml(&serde_saphyr::to_string(&kc).expect("yaml"))
        .expect("kubeconfig");
    let operator = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("config"),
    )
    .expect("client");
    let ns = format!("gangplank-operator-rbac-{}", std::process::id());
    Api::<Namespace>::all(admin.clone())
        .patch(
            &ns,
            &PatchParams::apply("gangplank-conformance"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})),
        )
        .await
        .expect("namespace");
    let env = Env::start(admin.clone(), ns, None, false).await;
    let metrics = Arc::new(gangplank_operator::metrics::Metrics::default());
    let stop = CancellationToken::new();
    let options = gangplank_operator::Options {
        namespace: None,
        install_crds: true,
        leader_elect: true,
        lease_namespace: settings.namespace.clone(),
        identity: "conformance".into(),
        lease_duration: Duration::from_secs(15),
    };
    let task = tokio::spawn(gangplank_operator::run(
        operator,
        options,
        metrics.clone(),
        stop.clone(),
    ));
    let mut s = spec();
    s.as_object_mut().expect("object").remove("tls");
    env.create_plane(s).await.expect("creating the plane");
    env.condition("Progressing", "True").await;
    assert_eq!(env.condition("Degraded", "False").await.reason, "Reconciled");
    env.deployment().await;
    let cluster = format!("gangplank-endpoint.{}.{PLANE}", env.ns);
    Api::<ClusterRole>::all(admin.clone())
        .get(&cluster)
        .await
        .expect("the endpoint's ClusterRole");
    delete_plane(&env).await;
    stop.cancel();
    task.await.expect("join").expect("the operator stops cleanly");
    env.stop().await;
    // The operator's RBAC goes again (its namespace and the CRDs stay, as other suites use them).
    let dp = DeleteParams::default();
    let sys = &settings.namespace;
    for obj in &manifest {
        let name = obj["metadata"]["name"].as_str().expect("name");
        let _ = match obj["kind"].as_str() {
            Some("ClusterRole") => Api::<ClusterRole>::all(admin.clone())
                .delete(name, &dp)
                .await
                .map(drop),
            Some("ClusterRoleBinding") => Api::<ClusterRoleBinding>::all(admin.clone())
                .delete(name, &dp)
                .await
                .map(drop),
            Some("Role") => Api::<Role>::namespaced(admin.clone(), sys)
                .delete(name, &dp)
                .await
                .map(drop),
            Some("RoleBinding") => Api::<RoleBinding>::namespaced(admin.clone(), sys)
                .delete(name, &dp)
                .await
                .map(drop),
            Some("ServiceAccount") => Api::<ServiceAccount>::namespaced(admin.clone(), sys)
                .delete(name, &dp)
                .await
                .map(drop),
            _ => Ok(()),
        };
    }
}
