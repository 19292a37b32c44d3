//! Membership across replicas (`gangplank_endpoint::membership`) against the Kubernetes API
//! stand-in: replica Leases, one sweeper at a time, entries of vanished replicas marked.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use gangplank_api::NamespacedName;
use gangplank_api::istio::{WorkloadEntry, WorkloadEntrySpec};
use gangplank_api::meta::ObjectMeta;
use gangplank_api::names::{annotation, label};
use gangplank_endpoint::membership::{Membership, Options};
use gangplank_registry::Registry;
use gangplank_testkit::kube_api::Server;
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
    for _ in 0..200 {
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
        if caught_up {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the entry cache did not catch up with {names:?} within 5 s");
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
