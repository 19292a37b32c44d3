//! Boot inputs from the cluster (`gangplank_endpoint::cluster`) against the Kubernetes API
//! stand-in, and the plane built with `registry.kubernetes`.

use std::time::Duration;

use gangplank_endpoint::cluster::Cluster;
use gangplank_endpoint::mesh::Source;
use gangplank_testkit::kube_api::{Server, TOKEN_ISSUER};
use serde_json::{Value, json};

async fn stand_in() -> (Server, kube::Client) {
    let server = Server::start().await.unwrap();
    let client = kube::Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap();
    (server, client)
}

#[tokio::test]
async fn token_is_a_token_request_for_the_groups_service_account() {
    let (server, client) = stand_in().await;
    server
        .seed(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "ratings", "namespace": "bookinfo"}}))
        .unwrap();
    let source = Cluster::start(client, "istio-system", "");
    let token = source
        .token("bookinfo", "ratings", Duration::from_secs(7200))
        .await
        .unwrap();
    // issued_at is read before the call and the API server stamps the expiry during it, so a
    // second boundary may fall in between (seen once in a full run).
    let lifetime = token.expires_at - token.issued_at;
    assert!((7200..=7201).contains(&lifetime), "{lifetime}");

    let key = jsonwebtoken::DecodingKey::from_jwk(server.token_key().jwk()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["istio-ca"]);
    validation.set_issuer(&[TOKEN_ISSUER]);
    let claims = jsonwebtoken::decode::<Value>(&token.jwt, &key, &validation)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "system:serviceaccount:bookinfo:ratings");
    let writes = server.writes();
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].resource, "serviceaccounts");
    assert_eq!(writes[0].subresource.as_deref(), Some("token"));

    // A group whose service account does not exist: a clear error, no token.
    let e = source
        .token("bookinfo", "nobody", Duration::from_secs(3600))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("ServiceAccount bookinfo/nobody"), "{e}");
}

#[tokio::test]
async fn root_cert_and_mesh_config_come_from_the_configmaps() {
    let (server, client) = stand_in().await;
    server
        .seed(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio-ca-root-cert", "namespace": "bookinfo"},
            "data": {"root-cert.pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}}))
        .unwrap();
    server
        .seed(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "istio-canary", "namespace": "istio-system"},
            "data": {"mesh": "trustDomain: example.org\n"}}))
        .unwrap();
    let source = Cluster::start(client.clone(), "istio-system", "canary");
    assert_eq!(source.mesh_configmap(), "istio-canary");
    let root = source.root_cert("bookinfo").await.unwrap();
    assert!(
        String::from_utf8(root)
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----")
    );
    let mesh = source.mesh_config().await.unwrap();
    assert!(format!("{mesh:?}").contains("example.org"), "{mesh:?}");

    // Another namespace has no root certificate yet; the default revision has no ConfigMap.
    let e = source.root_cert("other").await.unwrap_err().to_string();
    assert!(
        e.contains("ConfigMap other/istio-ca-root-cert does not exist"),
        "{e}"
    );
    let e = Cluster::start(client.clone(), "istio-system", "")
        .mesh_config()
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("ConfigMap istio-system/istio does not exist"), "{e}");
    assert!(server.writes().is_empty(), "reading boot inputs writes nothing");

    // Reads come from watches on the two names, never a GET per onboarding.
    let reads = server.reads();
    assert!(
        reads
            .iter()
            .filter(|r| r.resource == "configmaps")
            .all(|r| r.verb != "get"),
        "{reads:?}"
    );
    let before = reads.len();
    for _ in 0..5 {
        source.root_cert("bookinfo").await.unwrap();
        source.mesh_config().await.unwrap();
    }
    assert_eq!(server.reads().len(), before, "{:?}", server.reads());

    // A rotated root certificate reaches the next read through the watch.
    let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> = kube::Api::namespaced(client, "bookinfo");
    let rotated = "-----BEGIN CERTIFICATE-----\nUk9UQVRFRA==\n-----END CERTIFICATE-----\n";
    api.patch(
        "istio-ca-root-cert",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"data": {"root-cert.pem": rotated}})),
    )
    .await
    .unwrap();
    gangplank_testkit::process::eventually(
        "the rotated root certificate",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async { source.root_cert("bookinfo").await.unwrap() == rotated.as_bytes() },
    )
    .await;
}

#[tokio::test]
async fn cluster_id_comes_from_the_injector_values_as_istioctl_reads_it() {
    let (server, client) = stand_in().await;
    // No injector ConfigMap: a clear error naming the setting that avoids the lookup.
    let source = Cluster::start(client.clone(), "istio-system", "canary");
    let e = source.cluster_id().await.unwrap_err().to_string();
    assert!(
        e.contains("ConfigMap istio-system/istio-sidecar-injector-canary does not exist")
            && e.contains("set mesh.clusterId"),
        "{e}"
    );

    server
        .seed(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "istio-sidecar-injector-canary", "namespace": "istio-system"},
            "data": {"values": "{\"global\":{\"multiCluster\":{\"clusterName\":\"cluster-west\"}}}"}}))
        .unwrap();
    let source = Cluster::start(client.clone(), "istio-system", "canary");
    assert_eq!(source.cluster_id().await.unwrap(), "cluster-west");

    // Values without a cluster name leave it empty, as istioctl does.
    server
        .seed(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "istio-sidecar-injector", "namespace": "istio-system"},
            "data": {"values": "{\"global\":{}}"}}))
        .unwrap();
    let source = Cluster::start(client, "istio-system", "");
    assert_eq!(source.cluster_id().await.unwrap(), "");
    assert!(server.writes().is_empty());
}
