//! Conformance of the Kubernetes registry (`gangplank_registry::kube::Registry`).
//!
//! Every scenario runs against the Kubernetes API stand-in (`gangplank_testkit::kube_api`),
//! and, unchanged, against a real cluster when `GANGPLANK_TEST_KUBECONFIG` names a kubeconfig
//! (Istio's CRDs installed; the suite installs Gangplank's CRDs and works in fresh namespaces
//! `gangplank-conformance-*` that it deletes afterwards). Without the variable the real-cluster
//! test says `SKIPPED` on stderr and in its name; it is not a pass of the real-cluster suite.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use gangplank_api::binding::{WorkloadBinding, WorkloadBindingSpec, WorkloadBindingStatus};
use gangplank_api::istio::{WorkloadEntry, WorkloadEntrySpec};
use gangplank_api::meta::{ObjectMeta, OwnerReference};
use gangplank_api::names::{annotation, label};
use gangplank_api::token::{JoinToken, JoinTokenSpec, JoinTokenStatus};
use gangplank_api::{NamespacedName, Resource};
use gangplank_registry::kube::Registry as KubeRegistry;
use gangplank_registry::{AnnotationPatch, Error, Registry};
use gangplank_testkit::kube_api::Server;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;
use sha2::{Digest, Sha256};

/// How long a cache or the garbage collector may take to catch up.
const CATCH_UP: Duration = Duration::from_secs(30);

struct Env {
    client: kube::Client,
    registry: KubeRegistry,
    ns: String,
    /// The stand-in, when not on a real cluster.
    stand_in: Option<Server>,
}

impl Env {
    /// A stand-in with Istio's CRDs in `istio_versions` and Gangplank's CRDs installed.
    async fn stand_in(istio_versions: &[&str]) -> Self {
        let server = Server::start().await.expect("stand-in");
        server.install_istio_crds(istio_versions).expect("Istio CRDs");
        let client =
            kube::Client::try_from(kube::Config::new(server.url().parse().expect("url"))).expect("client");
        install_crds(&client).await;
        let registry = KubeRegistry::connect(client.clone()).await.expect("registry");
        Self {
            client,
            registry,
            ns: "bookinfo".into(),
            stand_in: Some(server),
        }
    }

    /// A real cluster from `GANGPLANK_TEST_KUBECONFIG`, in a fresh namespace.
    async fn cluster(kubeconfig: &str, scenario: &str) -> Self {
        let kc = kube::config::Kubeconfig::read_from(kubeconfig).expect("reading GANGPLANK_TEST_KUBECONFIG");
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("loading GANGPLANK_TEST_KUBECONFIG");
        let client = kube::Client::try_from(config).expect("client");
        install_crds(&client).await;
        let ns = namespace_for(scenario, std::process::id());
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        namespaces
            .patch(
                &ns,
                &PatchParams::apply("gangplank-conformance"),
                &Patch::Apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})),
            )
            .await
            .expect("creating the test namespace");
        let registry = KubeRegistry::connect(client.clone()).await.expect("registry");
        Self {
            client,
            registry,
            ns,
            stand_in: None,
        }
    }

    async fn cleanup(&self) {
        if self.stand_in.is_none() {
            let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.client.clone());
            let _ = namespaces.delete(&self.ns, &DeleteParams::background()).await;
        }
    }

    fn istio(&self, kind: &str, plural: &str) -> Api<DynamicObject> {
        let version = self
            .registry
            .istio_api_version()
            .rsplit('/')
            .next()
            .unwrap_or("v1")
            .to_owned();
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("networking.istio.io", &version, kind),
            plural,
        );
        Api::namespaced_with(self.client.clone(), &self.ns, &ar)
    }

    fn ours(&self, kind: &str, plural: &str) -> Api<DynamicObject> {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("onboarding.gangplank.dev", "v1alpha1", kind),
            plural,
        );
        Api::namespaced_with(self.client.clone(), &self.ns, &ar)
    }

    fn key(&self, name: &str) -> NamespacedName {
        NamespacedName::new(&self.ns, name)
    }

    /// Creates WorkloadGroup `name` and waits until the registry's cache has it; returns its uid.
    async fn group(&self, name: &str) -> String {
        let body = json!({
            "apiVersion": self.registry.istio_api_version(), "kind": "WorkloadGroup",
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"metadata": {"labels": {"app": name}}, "template": {"serviceAccount": name, "ports": {"http": 8080}}},
        });
        let created = self
            .istio("WorkloadGroup", "workloadgroups")
            .create(
                &PostParams::default(),
                &serde_json::from_value(body).expect("group"),
            )
            .await
            .expect("creating the WorkloadGroup");
        let key = self.key(name);
        eventually("the WorkloadGroup reaches the cache", || async {
            self.registry.workload_group(&key).await.expect("cache").is_some()
        })
        .await;
        created.metadata.uid.expect("uid")
    }

    /// A WorkloadEntry as the endpoint builds it.
    fn entry(&self, group: &str, group_uid: &str, vm: &str) -> WorkloadEntry {
        let labels = BTreeMap::from([
            (label::MANAGED_BY.to_owned(), label::MANAGED_BY_VALUE.to_owned()),
            (label::WORKLOAD_GROUP.to_owned(), group.to_owned()),
            ("app".to_owned(), group.to_owned()),
        ]);
        let annotations = BTreeMap::from([
            (
                annotation::IDENTITY.to_owned(),
                format!("jwt:https://idp.example/{vm}"),
            ),
            (
                annotation::CONNECTED_AT.to_owned(),
                "2026-01-01T00:00:00Z".to_owned(),
            ),
            (annotation::ENDPOINT_REPLICA.to_owned(), "endpoint-0".to_owned()),
        ]);
        WorkloadEntry::new(
            ObjectMeta {
                name: Some(format!("{group}-jwt-{vm}")),
                namespace: Some(self.ns.clone()),
                labels: Some(labels),
                annotations: Some(annotations),
                owner_references: Some(vec![OwnerReference {
                    api_version: "networking.istio.io/v1".into(),
                    kind: "WorkloadGroup".into(),
                    name: group.into(),
                    uid: group_uid.into(),
                    controller: Some(true),
                    block_owner_deletion: None,
                }]),
                ..Default::default()
            },
            WorkloadEntrySpec {
                address: "10.0.0.7".into(),
                service_account: group.into(),
                labels: BTreeMap::from([("app".to_owned(), group.to_owned())]),
                ports: BTreeMap::from([("http".to_owned(), 8080)]),
                ..Default::default()
            },
        )
    }

    fn writes(&self, resource: &str) -> Option<usize> {
        self.stand_in.as_ref().map(|s| s.write_count(resource))
    }
}

/// Installs Gangplank's CRDs with server-side apply, as `gangplank install crds | kubectl apply`.
async fn install_crds(client: &kube::Client) {
    let crds: Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = Api::all(client.clone());
    for crd in gangplank_registry::crds::all().expect("CRDs") {
        let name = crd.metadata.name.clone().expect("name");
        crds.patch(
            &name,
            &PatchParams::apply("gangplank-install").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("installing a CRD");
        eventually("the CRD is established", || async {
            crds.get(&name)
                .await
                .ok()
                .and_then(|c| c.status)
                .and_then(|s| s.conditions)
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
        })
        .await;
    }
}

/// Polls `check` until it holds or [`CATCH_UP`] passes (caches and the garbage collector are
/// asynchronous on a real cluster).
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    gangplank_testkit::process::eventually(what, CATCH_UP, Duration::from_millis(20), check).await;
}

fn sha(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn token(ns: &str, id: &str, group: &str, uses: u32, expires_at: &str) -> JoinToken {
    JoinToken {
        api_version: JoinToken::API_VERSION.into(),
        kind: JoinToken::KIND.into(),
        metadata: ObjectMeta {
            name: Some(id.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: JoinTokenSpec {
            workload_group: group.into(),
            secret_sha256: sha("s3cret"),
            expires_at: expires_at.into(),
            uses,
        },
        status: JoinTokenStatus::default(),
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// Onboarding: the entry is applied with owner, labels and annotations, passes Istio's schema
/// (the stand-in checks it), is idempotent, and costs exactly one write.
async fn onboard(env: &Env) {
    let uid = env.group("ratings").await;
    let entry = env.entry("ratings", &uid, "vm-7");
    let before = env.writes("workloadentries");
    let stored = env.registry.apply_entry(&entry).await.expect("apply");
    if let Some(before) = before {
        assert_eq!(
            env.writes("workloadentries"),
            Some(before + 1),
            "one write per onboarding"
        );
    }
    assert_eq!(stored.spec.address, "10.0.0.7");
    let owner = &stored.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(owner.uid, uid);
    assert_eq!(owner.api_version, env.registry.istio_api_version());
    assert_eq!(
        stored.metadata.annotations.as_ref().expect("annotations")[annotation::ENDPOINT_REPLICA],
        "endpoint-0"
    );

    // Applying the same entry again leaves one object with the same content.
    let again = env.registry.apply_entry(&entry).await.expect("apply again");
    assert_eq!(again.metadata.uid, stored.metadata.uid);
    assert_eq!(again.spec, stored.spec);
    // Managed entries come from a watch-backed cache, which follows the write.
    eventually("the managed-entry cache holds exactly the one entry", || async {
        let managed = env.registry.managed_entries().await.expect("managed");
        managed
            .iter()
            .filter(|e| e.metadata.namespace.as_deref() == Some(env.ns.as_str()))
            .count()
            == 1
    })
    .await;

    // Reads of groups and policies come from the caches: no API writes, and on the stand-in
    // not even a request shows up as a write.
    let writes = env.writes("workloadentries");
    for _ in 0..10 {
        env.registry
            .workload_group(&env.key("ratings"))
            .await
            .expect("group");
        env.registry.policies(&env.ns).await.expect("policies");
    }
    assert_eq!(env.writes("workloadentries"), writes);

    // An entry that breaks Istio's schema is refused (422 → Invalid) and not stored.
    let mut bad = env.entry("ratings", &uid, "vm-bad");
    bad.spec.ports.insert("http".into(), 70000);
    match env.registry.apply_entry(&bad).await {
        Err(Error::Invalid { message, .. }) => assert!(message.contains("refused"), "{message}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(env.registry.entry(&bad.key()).await.expect("read").is_none());
}

/// Renewal and health: annotations and status change without touching the rest; status
/// survives a re-apply; missing entries are NotFound.
async fn renew_and_health(env: &Env) {
    let uid = env.group("reviews").await;
    let entry = env.entry("reviews", &uid, "vm-1");
    let key = entry.key();
    env.registry.apply_entry(&entry).await.expect("apply");
    let patch = AnnotationPatch {
        set: BTreeMap::from([(annotation::SESSION.to_owned(), "session-2".to_owned())]),
        remove: vec![annotation::CONNECTED_AT.to_owned()],
    };
    env.registry.annotate_entry(&key, &patch).await.expect("annotate");
    let status = json!({"conditions": [{"type": "Healthy", "status": "True", "lastProbeTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
    env.registry
        .set_entry_status(&key, &status)
        .await
        .expect("status");
    let got = env.registry.entry(&key).await.expect("read").expect("exists");
    let annotations = got.metadata.annotations.clone().expect("annotations");
    assert_eq!(
        annotations.get(annotation::SESSION).map(String::as_str),
        Some("session-2")
    );
    assert!(!annotations.contains_key(annotation::CONNECTED_AT));
    assert_eq!(
        got.status.as_ref().expect("status")["conditions"][0]["status"],
        "True"
    );

    // Re-applying the entry keeps the status.
    let reapplied = env.registry.apply_entry(&entry).await.expect("re-apply");
    assert_eq!(
        reapplied.status.as_ref().expect("status")["conditions"][0]["type"],
        "Healthy"
    );

    let missing = env.key("reviews-jwt-nobody");
    assert!(matches!(
        env.registry.annotate_entry(&missing, &patch).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        env.registry.set_entry_status(&missing, &status).await,
        Err(Error::NotFound { .. })
    ));
}

/// Disconnect and removal: deleting is idempotent.
async fn disconnect_and_gc(env: &Env) {
    let uid = env.group("details").await;
    let entry = env.entry("details", &uid, "vm-1");
    env.registry.apply_entry(&entry).await.expect("apply");
    let patch = AnnotationPatch {
        set: BTreeMap::from([(
            annotation::DISCONNECTED_AT.to_owned(),
            "2026-01-01T00:01:00Z".to_owned(),
        )]),
        remove: vec![annotation::CONNECTED_AT.to_owned()],
    };
    env.registry
        .annotate_entry(&entry.key(), &patch)
        .await
        .expect("disconnect");
    assert!(env.registry.delete_entry(&entry.key()).await.expect("delete"));
    assert!(
        !env.registry
            .delete_entry(&entry.key())
            .await
            .expect("delete again")
    );
    assert!(env.registry.entry(&entry.key()).await.expect("read").is_none());
}

/// Deleting a WorkloadGroup removes its entries (ownerReference garbage collection).
async fn group_deletion_cascades(env: &Env) {
    let uid = env.group("productpage").await;
    let a = env.entry("productpage", &uid, "vm-a");
    let b = env.entry("productpage", &uid, "vm-b");
    env.registry.apply_entry(&a).await.expect("apply a");
    env.registry.apply_entry(&b).await.expect("apply b");
    env.istio("WorkloadGroup", "workloadgroups")
        .delete("productpage", &DeleteParams::background())
        .await
        .expect("delete group");
    eventually("the group's entries are collected", || async {
        env.registry.entry(&a.key()).await.expect("a").is_none()
            && env.registry.entry(&b.key()).await.expect("b").is_none()
    })
    .await;
    eventually("the group leaves the cache", || async {
        env.registry
            .workload_group(&env.key("productpage"))
            .await
            .expect("group")
            .is_none()
    })
    .await;
}

/// A policy created, changed or deleted in the cluster is seen by the next read, without a
/// restart.
async fn policy_changes_apply_without_restart(env: &Env) {
    let policies = env.ours("OnboardingPolicy", "onboardingpolicies");
    let body = |issuer: &str| {
        json!({
            "apiVersion": "onboarding.gangplank.dev/v1alpha1", "kind": "OnboardingPolicy",
            "metadata": {"name": "vms", "namespace": env.ns},
            "spec": {"allow": [{"workloads": [{"jwt": {"issuer": issuer}}], "onboardTo": [{"workloadGroupSelector": {"matchLabels": {"app": "ratings"}}}]}]},
        })
    };
    let issuer = |env: &Env| {
        let env_ns = env.ns.clone();
        let registry = env.registry.clone();
        async move {
            let ps = registry.policies(&env_ns).await.expect("policies");
            ps.first()
                .and_then(|p| p.spec.allow.first())
                .and_then(|r| r.workloads.first())
                .and_then(|w| w.jwt.clone())
                .map(|j| j.issuer)
        }
    };
    policies
        .patch(
            "vms",
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(body("https://one.example")),
        )
        .await
        .expect("create policy");
    eventually("the new policy is seen", || async {
        issuer(env).await.as_deref() == Some("https://one.example")
    })
    .await;
    policies
        .patch(
            "vms",
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(body("https://two.example")),
        )
        .await
        .expect("change policy");
    eventually("the changed policy is seen", || async {
        issuer(env).await.as_deref() == Some("https://two.example")
    })
    .await;

    // A policy that breaks the CRD schema is refused by the API server.
    let bad = json!({
        "apiVersion": "onboarding.gangplank.dev/v1alpha1", "kind": "OnboardingPolicy",
        "metadata": {"name": "bad", "namespace": env.ns},
        "spec": {"allow": [{"workloads": [{"jwt": {"subjects": ["x"]}}]}]},
    });
    let e = policies
        .create(&PostParams::default(), &serde_json::from_value(bad).expect("obj"))
        .await
        .unwrap_err();
    assert!(matches!(e, kube::Error::Api(ref s) if s.code == 422), "{e}");

    policies
        .delete("vms", &DeleteParams::default())
        .await
        .expect("delete policy");
    eventually("the deleted policy is gone", || async {
        issuer(env).await.is_none()
    })
    .await;
}

/// Join tokens: a token is used at most `uses` times even under concurrent use; a wrong secret,
/// an expired token and a missing token are refused without changing anything.
async fn join_tokens(env: &Env) {
    let registry = &env.registry;
    let t = token(&env.ns, "abc123", "ratings", 3, "2099-01-01T00:00:00Z");
    registry.create_join_token(&t).await.expect("create");
    assert!(matches!(
        registry.create_join_token(&t).await,
        Err(Error::Conflict { .. })
    ));
    let key = t.key();
    let now = time::OffsetDateTime::now_utc();

    // Wrong secret: refused, nothing used.
    match registry.consume_join_token(&key, &sha("guess"), now).await {
        Err(Error::TokenUnusable { reason, .. }) => assert!(reason.contains("does not match"), "{reason}"),
        other => panic!("expected TokenUnusable, got {other:?}"),
    }
    assert_eq!(
        registry
            .join_token(&key)
            .await
            .expect("read")
            .expect("exists")
            .status
            .used,
        0
    );

    // Eight concurrent uses of a three-use token: exactly three succeed.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let r = registry.clone();
            let key = key.clone();
            tokio::spawn(async move { r.consume_join_token(&key, &sha("s3cret"), now).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => ok += 1,
            Err(Error::TokenUnusable { reason, .. }) => assert!(reason.contains("no uses left"), "{reason}"),
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(ok, 3);
    let fresh = env
        .ours("JoinToken", "jointokens")
        .get("abc123")
        .await
        .expect("get");
    assert_eq!(fresh.data["status"]["used"], 3);

    // Expired and missing tokens.
    let old = token(&env.ns, "old456", "ratings", 1, "2020-01-01T00:00:00Z");
    registry.create_join_token(&old).await.expect("create old");
    match registry.consume_join_token(&old.key(), &sha("s3cret"), now).await {
        Err(Error::TokenUnusable { reason, .. }) => assert!(reason.contains("expired"), "{reason}"),
        other => panic!("expected TokenUnusable, got {other:?}"),
    }
    assert!(matches!(
        registry
            .consume_join_token(&env.key("nope"), &sha("s3cret"), now)
            .await,
        Err(Error::TokenUnusable { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Against the stand-in (CI)

#[tokio::test]
async fn stand_in_onboard() {
    onboard(&Env::stand_in(&["v1", "v1beta1"]).await).await;
}

#[tokio::test]
async fn stand_in_renew_and_health() {
    renew_and_health(&Env::stand_in(&["v1", "v1beta1"]).await).await;
}

#[tokio::test]
async fn stand_in_disconnect_and_gc() {
    disconnect_and_gc(&Env::stand_in(&["v1", "v1beta1"]).await).await;
}

#[tokio::test]
async fn stand_in_group_deletion_cascades() {
    group_deletion_cascades(&Env::stand_in(&["v1", "v1beta1"]).await).await;
}

#[tokio::test]
async fn stand_in_policy_changes_apply_without_restart() {
    policy_changes_apply_without_restart(&Env::stand_in(&["v1", "v1beta1"]).await).await;
}

#[tokio::test]
async fn stand_in_join_tokens() {
    join_tokens(&Env::stand_in(&["v1", "v1beta1"]).await).await;
}

/// A cluster whose Istio predates `networking.istio.io/v1` gets `v1beta1` objects.
#[tokio::test]
async fn stand_in_falls_back_to_v1beta1() {
    let env = Env::stand_in(&["v1beta1"]).await;
    assert_eq!(env.registry.istio_api_version(), "networking.istio.io/v1beta1");
    onboard(&env).await;
    let stored = env
        .stand_in
        .as_ref()
        .expect("stand-in")
        .object(
            "networking.istio.io",
            "workloadentries",
            "bookinfo",
            "ratings-jwt-vm-7",
        )
        .expect("stored");
    assert_eq!(stored["apiVersion"], "networking.istio.io/v1beta1");
    group_deletion_cascades(&env).await;
}

/// Without Istio's CRDs the registry refuses to start and says what to install.
#[tokio::test]
async fn stand_in_without_istio_refuses_to_start() {
    let server = Server::start().await.expect("stand-in");
    let client =
        kube::Client::try_from(kube::Config::new(server.url().parse().expect("url"))).expect("client");
    let e = KubeRegistry::connect(client).await.unwrap_err().to_string();
    assert!(e.contains("install Istio's CRDs"), "{e}");
}

/// Bindings: a full binding passes its CRD's schema, applying is idempotent, it is read fresh,
/// listed, deleted (twice is not an error), and it goes with its WorkloadGroup.
async fn bindings(env: &Env) {
    let uid = env.group("ratings").await;
    let binding = WorkloadBinding {
        api_version: WorkloadBinding::API_VERSION.into(),
        kind: WorkloadBinding::KIND.into(),
        metadata: ObjectMeta {
            name: Some("ratings-token-abc-0123456789".into()),
            namespace: Some(env.ns.clone()),
            labels: Some(BTreeMap::from([(
                label::MANAGED_BY.to_owned(),
                label::MANAGED_BY_VALUE.to_owned(),
            )])),
            owner_references: Some(vec![OwnerReference {
                api_version: "networking.istio.io/v1".into(),
                kind: "WorkloadGroup".into(),
                name: "ratings".into(),
                uid: uid.clone(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        spec: WorkloadBindingSpec {
            workload_group: "ratings".into(),
            public_key: "MCowBQYDK2VwAyEA7Ue5bEcqkc4LRO8yQL0nDPwmJTAqRp4ftRuxXKSCs5Y=".into(),
            credential_kind: "join-token".into(),
            identity: "join-token:bookinfo/abc".into(),
            facts: json!({"joinToken": {"id": "abc", "namespace": env.ns, "workloadGroup": "ratings", "key": "0123456789"}}),
            address: "10.0.0.7".into(),
            bound_at: "2026-01-01T00:00:00Z".into(),
        },
        status: WorkloadBindingStatus {
            last_joined_at: "2026-01-01T00:00:00Z".into(),
            entry_gone_since: String::new(),
        },
    };
    let key = binding.key();
    let stored = env.registry.apply_binding(&binding).await.expect("apply");
    assert_eq!(stored.spec, binding.spec);
    assert_eq!(
        stored.status, binding.status,
        "status is part of the object (no subresource)"
    );
    let again = env.registry.apply_binding(&binding).await.expect("apply again");
    assert_eq!(
        again.metadata.uid, stored.metadata.uid,
        "applying twice leaves one object"
    );
    let read = env.registry.binding(&key).await.expect("get").expect("found");
    assert_eq!(read.spec, binding.spec);
    eventually("the binding cache holds the binding", || async {
        env.registry
            .bindings()
            .await
            .expect("list")
            .iter()
            .filter(|b| b.metadata.namespace.as_deref() == Some(env.ns.as_str()))
            .count()
            == 1
    })
    .await;
    let mut gone = binding.clone();
    gone.status.entry_gone_since = "2026-01-02T00:00:00Z".into();
    let stamped = env.registry.apply_binding(&gone).await.expect("stamp");
    assert_eq!(stamped.status.entry_gone_since, "2026-01-02T00:00:00Z");
    assert!(env.registry.delete_binding(&key).await.expect("delete"));
    assert!(!env.registry.delete_binding(&key).await.expect("delete again"));
    assert!(env.registry.binding(&key).await.expect("get").is_none());

    // A malformed binding is refused by the API server (the CRD's schema).
    let mut bad = serde_json::to_value(&binding).expect("json");
    bad["spec"]["boundAt"] = json!(42);
    let refused = env
        .ours("WorkloadBinding", "workloadbindings")
        .create(
            &PostParams::default(),
            &serde_json::from_value(bad).expect("object"),
        )
        .await;
    assert!(refused.is_err(), "a binding with a numeric boundAt was accepted");

    // The group's deletion takes its bindings (owner reference, garbage collector).
    env.registry.apply_binding(&binding).await.expect("apply");
    env.istio("WorkloadGroup", "workloadgroups")
        .delete("ratings", &DeleteParams::background())
        .await
        .expect("deleting the group");
    eventually("the binding goes with its group", || async {
        env.registry.binding(&key).await.expect("get").is_none()
    })
    .await;
}

/// Entry removals: an entry deleted by anyone (here an admin, through the API) is told to a
/// follower of the registry's removals; an unmanaged entry's removal is not.
async fn entry_removals(env: &Env) {
    let uid = env.group("ratings").await;
    let entry = env.entry("ratings", &uid, "vm-7");
    let key = entry.key();
    env.registry.apply_entry(&entry).await.expect("apply");
    eventually("the entry reaches the cache", || async {
        env.registry
            .managed_entries()
            .await
            .expect("cache")
            .iter()
            .any(|e| e.key() == key)
    })
    .await;
    let mut removals = env.registry.entry_removals();
    env.istio("WorkloadEntry", "workloadentries")
        .delete(&key.name, &DeleteParams::background())
        .await
        .expect("an admin deletes the entry");
    let told = tokio::time::timeout(CATCH_UP, async {
        loop {
            match removals.recv().await {
                Ok(k) if k == key => return k,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => panic!("removals stopped: {e}"),
            }
        }
    })
    .await
    .expect("the removal is told");
    assert_eq!(told, key);
    assert!(
        !env.registry
            .managed_entries()
            .await
            .expect("cache")
            .iter()
            .any(|e| e.key() == key),
        "the cache no longer has it"
    );
}

#[tokio::test]
async fn stand_in_bindings() {
    bindings(&Env::stand_in(&["v1", "v1beta1"]).await).await;
}

#[tokio::test]
async fn stand_in_entry_removals() {
    entry_removals(&Env::stand_in(&["v1", "v1beta1"]).await).await;
}

// ---------------------------------------------------------------------------------------------
// Against a real cluster

/// The throw-away namespace of a scenario: `gangplank-conformance-<scenario>-<pid>`, with the
/// scenario cut so the name stays a DNS label (63 characters) whatever the pid.
fn namespace_for(scenario: &str, pid: u32) -> String {
    const PREFIX: &str = "gangplank-conformance-";
    let room = 63 - PREFIX.len() - 1 - pid.to_string().len();
    let scenario = scenario[..scenario.len().min(room)].trim_end_matches('-');
    format!("{PREFIX}{scenario}-{pid}")
}

/// The scenarios [`real_cluster`] runs, as their namespaces name them.
const SCENARIOS: &[&str] = &[
    "onboard",
    "renew-and-health",
    "disconnect-and-gc",
    "group-deletion-cascades",
    "policy-changes-apply-without-restart",
    "join-tokens",
    "bindings",
    "entry-removals",
];

/// A real apiserver refuses namespace names over 63 characters; with a 5-digit pid the longest
/// scenario's name used to be 64.
#[test]
fn every_scenario_namespace_is_a_dns_label_for_any_pid() {
    for scenario in SCENARIOS {
        for pid in [1, 31155, 4_194_304, u32::MAX] {
            let ns = namespace_for(scenario, pid);
            assert!(
                gangplank_api::meta::is_dns1123_label(&ns),
                "{ns} ({} characters)",
                ns.len()
            );
            assert!(ns.starts_with("gangplank-conformance-"), "{ns}");
        }
    }
    assert_eq!(
        namespace_for("onboard", 31155),
        "gangplank-conformance-onboard-31155"
    );
}

/// Needs a real cluster, so it is ignored (reported as skipped, never as passed) unless run
/// with `--ignored` and `GANGPLANK_TEST_KUBECONFIG` set (see the README).
#[tokio::test]
#[ignore = "needs a real cluster: GANGPLANK_TEST_KUBECONFIG=<kubeconfig> and --ignored (README)"]
async fn real_cluster() {
    let Some(kubeconfig) = std::env::var_os("GANGPLANK_TEST_KUBECONFIG") else {
        panic!(
            "set GANGPLANK_TEST_KUBECONFIG to the kubeconfig of a cluster with Istio's CRDs to run \
             the registry conformance suite against it"
        );
    };
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    macro_rules! run {
        ($scenario:ident) => {{
            let name = stringify!($scenario).replace('_', "-");
            assert!(SCENARIOS.contains(&name.as_str()), "add {name} to SCENARIOS");
            let env = Env::cluster(&kubeconfig, &name).await;
            $scenario(&env).await;
            env.cleanup().await;
            eprintln!("real cluster: {} passed", stringify!($scenario));
        }};
    }
    run!(onboard);
    run!(renew_and_health);
    run!(disconnect_and_gc);
    run!(group_deletion_cascades);
    run!(policy_changes_apply_without_restart);
    run!(join_tokens);
    run!(bindings);
    run!(entry_removals);
}
