//! Membership across replicas (`gangplank_endpoint::membership`) against the Kubernetes API
//! stand-in: replica Leases, one sweeper at a time, entries of vanished replicas marked, a
//! replica leaving on shutdown (its Lease deleted, the sweeper Lease released) and the stale
//! Leases of dead pods deleted by the sweeper, never one renewed since it was listed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use gangplank_api::NamespacedName;
use gangplank_api::istio::{WorkloadEntry, WorkloadEntrySpec};
use gangplank_api::meta::ObjectMeta;
use gangplank_api::names::{annotation, label};
use gangplank_endpoint::membership::{LEADER_LEASE, Membership, Options, REPLICA_LEASE_PREFIX, STALE_AFTER};
use gangplank_registry::Registry;
use gangplank_testkit::kube_api::Server;
use gangplank_testkit::process::{Proc, eventually};
use k8s_openapi::api::coordination::v1::Lease;
use time::OffsetDateTime;

const LEASE: Duration = Duration::from_secs(15);

async fn setup() -> (Server, kube::Client, Arc<dyn Registry>) {
    let server = Server::start().await.unwrap();
    server.install_istio_crds(&["v1"]).unwrap();
    for crd in gangplank_registry::crds::all().unwrap() {
        server.install_crd(&serde_json::to_value(crd).unwrap()).unwrap();
    }
    let client = kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    let registry = gangplank_registry::kube::Registry::connect(client.clone())
        .await
        .unwrap();
    (server, client, Arc::new(registry))
}

fn member(client: &kube::Client, replica: &str) -> Membership {
    Membership::new(
        client.clone(),
        Options {
            namespace: "gangplank-system".into(),
            replica: replica.into(),
            lease_duration: LEASE,
        },
    )
}

fn entry(name: &str, replica: &str, disconnected: bool) -> WorkloadEntry {
    let mut annotations = BTreeMap::from([(annotation::ENDPOINT_REPLICA.to_owned(), replica.to_owned())]);
    if disconnected {
        annotations.insert(
            annotation::DISCONNECTED_AT.to_owned(),
            "2026-01-01T00:00:00Z".to_owned(),
        );
    } else {
        annotations.insert(
            annotation::CONNECTED_AT.to_owned(),
            "2026-01-01T00:00:00Z".to_owned(),
        );
    }
    WorkloadEntry::new(
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some("bookinfo".into()),
            labels: Some(BTreeMap::from([(
                label::MANAGED_BY.to_owned(),
                label::MANAGED_BY_VALUE.to_owned(),
            )])),
            annotations: Some(annotations),
            ..Default::default()
        },
        WorkloadEntrySpec {
            address: "10.0.0.1".into(),
            ..Default::default()
        },
    )
}

/// Waits (bounded) until the registry's watch-backed cache of managed entries shows what the
/// API holds for each of `names`: the sweep reads the cache, which follows writes within
/// moments.
async fn settle(registry: &dyn Registry, names: &[&str]) {
    gangplank_testkit::process::eventually(
        "the entry cache catches up with the API",
        std::time::Duration::from_secs(5),
        std::time::Duration::from_millis(25),
        || async {
            let cached = registry.managed_entries().await.unwrap();
            let mut caught_up = cached.len() == names.len();
            for name in names {
                let fresh = registry
                    .entry(&NamespacedName::new("bookinfo", *name))
                    .await
                    .unwrap()
                    .map(|e| e.metadata.resource_version);
                let seen = cached
                    .iter()
                    .find(|e| e.metadata.name.as_deref() == Some(*name))
                    .map(|e| e.metadata.resource_version.clone());
                caught_up &= fresh == seen;
            }
            caught_up
        },
    )
    .await;
}

async fn disconnected(registry: &dyn Registry, name: &str) -> bool {
    let e = registry
        .entry(&NamespacedName::new("bookinfo", name))
        .await
        .unwrap()
        .unwrap();
    let a = e.metadata.annotations.unwrap_or_default();
    a.contains_key(annotation::DISCONNECTED_AT) && !a.contains_key(annotation::CONNECTED_AT)
}

#[tokio::test]
async fn one_sweeper_marks_the_entries_of_vanished_replicas() {
    let (server, client, registry) = setup().await;
    let (a, b) = (member(&client, "endpoint-a"), member(&client, "endpoint-b"));
    for (name, replica, gone) in [
        ("vm-a", "endpoint-a", false),
        ("vm-b", "endpoint-b", false),
        ("vm-ghost", "endpoint-ghost", false),
        ("vm-left", "endpoint-a", true),
    ] {
        registry.apply_entry(&entry(name, replica, gone)).await.unwrap();
    }
    let all = ["vm-a", "vm-b", "vm-ghost", "vm-left"];
    settle(registry.as_ref(), &all).await;
    let t0 = OffsetDateTime::now_utc();
    a.renew(t0).await.unwrap();
    b.renew(t0).await.unwrap();
    assert!(a.lead(t0).await.unwrap());
    assert!(!b.lead(t0).await.unwrap(), "one sweeper at a time");
    let mut live = a.live_replicas(t0).await.unwrap();
    live.sort();
    assert_eq!(live, ["endpoint-a", "endpoint-b"]);

    // Only the entry of a replica that never had a Lease is marked.
    server.reset_writes();
    assert_eq!(a.mark_orphans(registry.as_ref(), t0).await.unwrap(), 1);
    assert!(disconnected(registry.as_ref(), "vm-ghost").await);
    assert!(!disconnected(registry.as_ref(), "vm-a").await);
    assert!(!disconnected(registry.as_ref(), "vm-b").await);
    assert_eq!(server.write_count("workloadentries"), 1, "one write per orphan");
    settle(registry.as_ref(), &all).await;

    // B stops renewing: once its Lease expired, its entries are marked, once.
    let t1 = t0 + LEASE + time::Duration::seconds(1);
    a.renew(t1).await.unwrap();
    assert!(a.lead(t1).await.unwrap());
    assert!(!b.lead(t1).await.unwrap());
    assert_eq!(a.mark_orphans(registry.as_ref(), t1).await.unwrap(), 1);
    assert!(disconnected(registry.as_ref(), "vm-b").await);
    assert!(!disconnected(registry.as_ref(), "vm-a").await);
    settle(registry.as_ref(), &all).await;
    assert_eq!(
        a.mark_orphans(registry.as_ref(), t1).await.unwrap(),
        0,
        "already marked"
    );

    // A dies too: B comes back and takes over the sweep after A's Lease expired.
    let t2 = t1 + LEASE + time::Duration::seconds(1);
    b.renew(t2).await.unwrap();
    assert!(b.lead(t2).await.unwrap());
    assert_eq!(b.mark_orphans(registry.as_ref(), t2).await.unwrap(), 1);
    assert!(disconnected(registry.as_ref(), "vm-a").await);
}

#[tokio::test]
async fn concurrent_candidates_elect_exactly_one() {
    let (_server, client, _registry) = setup().await;
    let now = OffsetDateTime::now_utc();
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let m = member(&client, &format!("endpoint-{i}"));
            tokio::spawn(async move { m.lead(now).await.unwrap() })
        })
        .collect();
    let mut leaders = 0;
    for t in tasks {
        if t.await.unwrap() {
            leaders += 1;
        }
    }
    assert_eq!(leaders, 1);
}

#[tokio::test]
async fn steady_rounds_write_no_entries() {
    let (server, client, registry) = setup().await;
    registry
        .apply_entry(&entry("vm-a", "endpoint-a", false))
        .await
        .unwrap();
    let a = member(&client, "endpoint-a");
    server.reset_writes();
    for _ in 0..5 {
        assert_eq!(a.round(registry.as_ref()).await.unwrap(), 0);
    }
    assert_eq!(server.write_count("workloadentries"), 0);
    assert!(server.writes().iter().all(|w| w.resource == "leases"));
}

/// The Lease `name` in the endpoints' namespace of the in-process tests, as stored.
fn stored(server: &Server, name: &str) -> Option<serde_json::Value> {
    server.object("coordination.k8s.io", "leases", "gangplank-system", name)
}

#[tokio::test]
async fn a_released_sweeper_lease_is_taken_at_once() {
    let (server, client, _registry) = setup().await;
    let (a, b) = (member(&client, "endpoint-a"), member(&client, "endpoint-b"));
    let t0 = OffsetDateTime::now_utc();
    assert!(a.lead(t0).await.unwrap());
    assert!(!b.lead(t0).await.unwrap());
    assert!(!b.release_sweeper(t0).await.unwrap(), "only the holder releases");
    assert_eq!(
        stored(&server, LEADER_LEASE).unwrap()["spec"]["holderIdentity"],
        "endpoint-a"
    );

    // As client-go's ReleaseOnCancel: the holder is cleared, the Lease and its count of
    // transitions stay.
    assert!(a.release_sweeper(t0).await.unwrap());
    let released = stored(&server, LEADER_LEASE).unwrap();
    assert_eq!(released["spec"]["holderIdentity"], "");
    assert_eq!(released["spec"]["leaseTransitions"], 0);
    // B takes it at the same instant, long before the 15 s A had taken it for would expire.
    assert!(b.lead(t0).await.unwrap());
    let taken = stored(&server, LEADER_LEASE).unwrap();
    assert_eq!(taken["spec"]["holderIdentity"], "endpoint-b");
    assert_eq!(taken["spec"]["leaseTransitions"], 1);
    assert!(!a.lead(t0).await.unwrap());
    assert!(!a.release_sweeper(t0).await.unwrap());
    assert_eq!(
        stored(&server, LEADER_LEASE).unwrap()["spec"]["holderIdentity"],
        "endpoint-b"
    );
}

#[tokio::test]
async fn leaving_deletes_only_the_replicas_own_lease() {
    let (server, client, _registry) = setup().await;
    let (a, b) = (member(&client, "endpoint-a"), member(&client, "endpoint-b"));
    let t0 = OffsetDateTime::now_utc();
    a.renew(t0).await.unwrap();
    b.renew(t0).await.unwrap();
    assert!(a.leave().await.unwrap());
    assert!(stored(&server, "gangplank-replica-endpoint-a").is_none());
    assert!(stored(&server, "gangplank-replica-endpoint-b").is_some());
    assert_eq!(b.live_replicas(t0).await.unwrap(), ["endpoint-b"]);
    assert!(!a.leave().await.unwrap(), "already gone");
}

#[tokio::test]
async fn stale_leases_are_deleted_only_if_unchanged_since_listed() {
    let (server, client, _registry) = setup().await;
    let (a, ghost) = (member(&client, "endpoint-a"), member(&client, "ghost"));
    let long_ago = OffsetDateTime::now_utc() - time::Duration::hours(1);
    ghost.renew(long_ago).await.unwrap();
    let now = OffsetDateTime::now_utc();
    a.renew(now).await.unwrap();
    let listed = a.replica_leases().await.unwrap();
    assert_eq!(listed.len(), 2);

    // The ghost comes back between the listing and the delete: its renewed Lease stays.
    ghost.renew(now).await.unwrap();
    assert_eq!(a.delete_stale(&listed, now).await.unwrap(), 0);
    assert!(stored(&server, "gangplank-replica-ghost").is_some());

    // Expired for less than STALE_AFTER durations: kept; for more: deleted. A's own stays.
    let ls = LEASE.as_secs() as i64;
    let soon = now + time::Duration::seconds(ls * (1 + STALE_AFTER) - 1);
    assert_eq!(
        a.delete_stale(&a.replica_leases().await.unwrap(), soon)
            .await
            .unwrap(),
        0
    );
    a.renew(soon).await.unwrap();
    let later = now + time::Duration::seconds(ls * (1 + STALE_AFTER));
    assert_eq!(
        a.delete_stale(&a.replica_leases().await.unwrap(), later)
            .await
            .unwrap(),
        1
    );
    assert!(stored(&server, "gangplank-replica-ghost").is_none());
    assert!(stored(&server, "gangplank-replica-endpoint-a").is_some());
}

/// Every call membership makes on Leases is one `API_CALLS` lists (and so one the RBAC in
/// `deploy/` grants, checked by `tests/deploy.rs`).
#[tokio::test]
async fn every_lease_call_is_in_api_calls() {
    let (server, client, registry) = setup().await;
    let (a, b, ghost) = (
        member(&client, "endpoint-a"),
        member(&client, "endpoint-b"),
        member(&client, "ghost"),
    );
    ghost
        .renew(OffsetDateTime::now_utc() - time::Duration::hours(1))
        .await
        .unwrap();
    a.round(registry.as_ref()).await.unwrap();
    b.round(registry.as_ref()).await.unwrap();
    assert!(stored(&server, "gangplank-replica-ghost").is_none());
    a.release_sweeper(OffsetDateTime::now_utc()).await.unwrap();
    a.leave().await.unwrap();
    b.round(registry.as_ref()).await.unwrap();

    let allowed: Vec<&str> = gangplank_endpoint::membership::API_CALLS
        .iter()
        .filter(|c| c.group == "coordination.k8s.io" && c.resource == "leases")
        .map(|c| c.verb)
        .collect();
    let mut made: Vec<&str> = server
        .writes()
        .iter()
        .filter(|w| w.resource == "leases")
        .map(|w| w.verb)
        .chain(
            server
                .reads()
                .iter()
                .filter(|r| r.resource == "leases")
                .map(|r| r.verb),
        )
        .collect();
    made.sort_unstable();
    made.dedup();
    assert_eq!(made, ["create", "delete", "get", "list", "update"]);
    for verb in made {
        assert!(
            allowed.contains(&verb),
            "{verb} on leases is not in membership::API_CALLS"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Real endpoint processes: a replica leaves on SIGTERM, the sweeper deletes dead pods' Leases.
// Each scenario runs against the stand-in and, ignored unless asked for, against a real
// cluster named by `GANGPLANK_TEST_KUBECONFIG` (Istio's CRDs installed; the test installs
// Gangplank's and works in a throw-away namespace `gangplank-membership-*`). The endpoints it
// starts sweep WorkloadEntries cluster-wide: use a test cluster, not one with a live plane.

/// How long an endpoint may take to start, stop, or a real cluster to catch up.
const WAIT: Duration = Duration::from_secs(30);

/// Where a scenario runs.
struct Env {
    client: kube::Client,
    kubeconfig: std::path::PathBuf,
    /// The endpoints' namespace, where the Leases live.
    ns: String,
    dir: tempfile::TempDir,
    /// The stand-in, when not on a real cluster.
    stand_in: Option<Server>,
}

impl Env {
    async fn stand_in() -> Self {
        let (server, client, _registry) = setup().await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = server.write_kubeconfig(dir.path()).unwrap();
        Self {
            client,
            kubeconfig,
            ns: "gangplank-system".into(),
            dir,
            stand_in: Some(server),
        }
    }

    /// A real cluster from `GANGPLANK_TEST_KUBECONFIG`, in a fresh namespace.
    async fn cluster(scenario: &str) -> Self {
        let Some(kubeconfig) = std::env::var_os("GANGPLANK_TEST_KUBECONFIG") else {
            panic!(
                "set GANGPLANK_TEST_KUBECONFIG to the kubeconfig of a test cluster with Istio's CRDs \
                 to run the membership scenarios against it"
            );
        };
        Self::cluster_at(kubeconfig.into(), scenario).await
    }

    /// The cluster `kubeconfig` names, in a fresh namespace for `scenario`.
    async fn cluster_at(kubeconfig: std::path::PathBuf, scenario: &str) -> Self {
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("reading GANGPLANK_TEST_KUBECONFIG");
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("loading GANGPLANK_TEST_KUBECONFIG");
        let client = kube::Client::try_from(config).expect("client");
        install_crds(&client).await;
        let ns = namespace_for(scenario, std::process::id());
        let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
        namespaces
            .patch(
                &ns,
                &kube::api::PatchParams::apply("gangplank-membership-test"),
                &kube::api::Patch::Apply(serde_json::json!({
                    "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
                })),
            )
            .await
            .expect("creating the test namespace");
        Self {
            client,
            kubeconfig,
            ns,
            dir: tempfile::tempdir().unwrap(),
            stand_in: None,
        }
    }

    async fn cleanup(&self) {
        if self.stand_in.is_none() {
            let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
                kube::Api::all(self.client.clone());
            let _ = namespaces
                .delete(&self.ns, &kube::api::DeleteParams::background())
                .await;
        }
    }

    fn leases(&self) -> kube::Api<Lease> {
        kube::Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn lease(&self, name: &str) -> Option<Lease> {
        self.leases().get_opt(name).await.expect("reading a Lease")
    }

    /// The holder of Lease `name`; `None` when it does not exist.
    async fn holder(&self, name: &str) -> Option<String> {
        self.lease(name)
            .await
            .map(|l| l.spec.and_then(|s| s.holder_identity).unwrap_or_default())
    }

    /// Starts `gangplank-endpoint` as `replica` with `registry.kubernetes` (Leases lasting
    /// `lease`) and waits until it listens.
    fn endpoint(&self, replica: &str, lease: &str) -> Proc {
        let root = self.dir.path();
        let config = root.join(format!("{replica}.yaml"));
        std::fs::write(
            &config,
            format!(
                "apiVersion: onboarding.gangplank.dev/v1alpha1
kind: EndpointConfiguration
planeId: membership
listen: 127.0.0.1:0
monitoringListen: 127.0.0.1:0
replica: {replica}
tls: {{dev: true}}
registry:
  kubernetes: {{kubeconfig: {kubeconfig}, namespace: {ns}, leaseDuration: {lease}}}
stateDir: {root}/state-{replica}
identities: {{joinTokens: true}}
workloads: {{gracePeriod: 1h}}
",
                kubeconfig = self.kubeconfig.display(),
                ns = self.ns,
                root = root.display(),
            ),
        )
        .unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gangplank-endpoint"));
        cmd.arg("--config").arg(&config).env("RUST_LOG", "info");
        let mut p = Proc::spawn(replica, cmd);
        tokio::task::block_in_place(|| p.wait_for("endpoint listening", WAIT));
        p
    }
}

async fn install_crds(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    for crd in gangplank_registry::crds::all().expect("CRDs") {
        let name = crd.metadata.name.clone().expect("name");
        crds.patch(
            &name,
            &kube::api::PatchParams::apply("gangplank-install").force(),
            &kube::api::Patch::Apply(&crd),
        )
        .await
        .expect("installing a CRD");
        eventually(
            "the CRD is established",
            WAIT,
            Duration::from_millis(100),
            || async {
                crds.get(&name)
                    .await
                    .ok()
                    .and_then(|c| c.status)
                    .and_then(|s| s.conditions)
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
            },
        )
        .await;
    }
}

/// The throw-away namespace of a scenario on a real cluster, cut so that it stays a DNS label
/// (63 characters) whatever the pid.
fn namespace_for(scenario: &str, pid: u32) -> String {
    const PREFIX: &str = "gangplank-membership-";
    let room = 63 - PREFIX.len() - 1 - pid.to_string().len();
    let scenario = scenario[..scenario.len().min(room)].trim_end_matches('-');
    format!("{PREFIX}{scenario}-{pid}")
}

/// The scenarios, as their namespaces name them.
const SCENARIOS: &[&str] = &["sigterm", "stale-leases"];

#[test]
fn every_scenario_namespace_is_a_dns_label_for_any_pid() {
    for scenario in SCENARIOS {
        for pid in [1, 31155, 4_194_304, u32::MAX] {
            let ns = namespace_for(scenario, pid);
            assert!(gangplank_api::meta::is_dns1123_label(&ns), "{ns}");
        }
    }
}

/// A Lease as another replica (alive or dead) left it, renewed at `renewed` for `seconds`.
fn replica_lease(replica: &str, renewed: OffsetDateTime, seconds: i64, labelled: bool) -> Lease {
    let labels = if labelled {
        serde_json::json!({label::MANAGED_BY: label::MANAGED_BY_VALUE})
    } else {
        serde_json::json!({})
    };
    let at = renewed
        .replace_nanosecond(renewed.microsecond() * 1000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": format!("{REPLICA_LEASE_PREFIX}{replica}"), "labels": labels},
        "spec": {"holderIdentity": replica, "leaseDurationSeconds": seconds,
            "acquireTime": at, "renewTime": at, "leaseTransitions": 0},
    }))
    .unwrap()
}

/// SIGTERM: the replica deletes its own Lease and releases the sweeper Lease, so another
/// replica becomes the sweeper at its next round instead of after the Lease expired.
async fn sigterm(env: &Env) {
    let mut a = env.endpoint("endpoint-a", "15s");
    eventually(
        "endpoint-a holds the sweeper Lease",
        WAIT,
        Duration::from_millis(50),
        || async { env.holder(LEADER_LEASE).await.as_deref() == Some("endpoint-a") },
    )
    .await;
    let b = env.endpoint("endpoint-b", "15s");
    eventually("endpoint-b's Lease", WAIT, Duration::from_millis(50), || async {
        env.lease("gangplank-replica-endpoint-b").await.is_some()
    })
    .await;

    a.signal("TERM");
    let status = tokio::task::block_in_place(|| a.wait_exit(WAIT));
    assert!(status.success(), "{status}: {}", a.output());
    // At once, not once it expired: A's Lease is gone, the sweeper Lease is free.
    assert!(
        env.lease("gangplank-replica-endpoint-a").await.is_none(),
        "endpoint-a left its Lease behind; output:\n{}",
        a.output()
    );
    let holder = env.holder(LEADER_LEASE).await.expect("the sweeper Lease");
    assert!(
        holder.is_empty() || holder == "endpoint-b",
        "the sweeper Lease is still held by {holder:?}; output:\n{}",
        a.output()
    );
    // B takes it at its next round (a third of the 15 s duration), where it used to wait for
    // A's Lease to expire (at least 10 s after the signal).
    eventually(
        "endpoint-b becomes the sweeper",
        Duration::from_secs(8),
        Duration::from_millis(50),
        || async { env.holder(LEADER_LEASE).await.as_deref() == Some("endpoint-b") },
    )
    .await;
    assert!(env.lease("gangplank-replica-endpoint-b").await.is_some());
    drop(b);
}

/// The sweeper deletes the Lease of a replica that has been gone for several Lease
/// durations, and keeps the Leases of live replicas, of recently expired ones and Leases that
/// are not Gangplank's.
async fn stale_leases(env: &Env) {
    let now = OffsetDateTime::now_utc();
    let leases = env.leases();
    let pp = kube::api::PostParams::default();
    for lease in [
        replica_lease("ghost-dead", now - time::Duration::hours(1), 15, true),
        // Expired a minute ago; stale only after several of its 60 s durations.
        replica_lease("ghost-recent", now - time::Duration::seconds(120), 60, true),
        replica_lease("ghost-live", now, 3600, true),
        replica_lease("not-ours", now - time::Duration::hours(1), 15, false),
    ] {
        leases.create(&pp, &lease).await.expect("creating a Lease");
    }
    let a = env.endpoint("endpoint-a", "3s");
    eventually(
        "the dead replica's Lease is deleted",
        Duration::from_secs(15),
        Duration::from_millis(50),
        || async { env.lease("gangplank-replica-ghost-dead").await.is_none() },
    )
    .await;
    // Two more rounds of the sweeper (its own Lease renewed twice), and the others are still there.
    let own = "gangplank-replica-endpoint-a";
    for _ in 0..2 {
        let seen = env.lease(own).await.and_then(|l| l.metadata.resource_version);
        eventually(
            "endpoint-a renews its Lease",
            WAIT,
            Duration::from_millis(50),
            || async { env.lease(own).await.and_then(|l| l.metadata.resource_version) != seen },
        )
        .await;
    }
    for kept in [
        "gangplank-replica-ghost-recent",
        "gangplank-replica-ghost-live",
        "gangplank-replica-not-ours",
    ] {
        assert!(
            env.lease(kept).await.is_some(),
            "{kept} was deleted; output:\n{}",
            a.output()
        );
    }
    assert_eq!(env.holder(LEADER_LEASE).await.as_deref(), Some("endpoint-a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deletes_the_replica_lease_and_frees_the_sweeper_lease() {
    sigterm(&Env::stand_in().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_deletes_stale_replica_leases_only() {
    stale_leases(&Env::stand_in().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real cluster: GANGPLANK_TEST_KUBECONFIG=<kubeconfig> and --ignored (README)"]
async fn real_cluster_sigterm_deletes_the_replica_lease_and_frees_the_sweeper_lease() {
    let env = Env::cluster("sigterm").await;
    sigterm(&env).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real cluster: GANGPLANK_TEST_KUBECONFIG=<kubeconfig> and --ignored (README)"]
async fn real_cluster_the_sweeper_deletes_stale_replica_leases_only() {
    let env = Env::cluster("stale-leases").await;
    stale_leases(&env).await;
    env.cleanup().await;
}
