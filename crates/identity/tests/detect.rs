//! Platform detection against the emulators: the one metadata service that answers wins,
//! and nothing answering is a clear error.

use std::time::Duration;

use gangplank_identity::detect::{MetadataUrls, Platform, detect};
use gangplank_testkit::cloud::{aws, azure, gcp};

/// A loopback URL where nothing listens.
fn closed() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn each_platform_is_detected_by_its_own_metadata_service() {
    let keys = aws::SigningKeys::generate(&["us-east-1"]).expect("keys");
    let imds = aws::Imds::start(aws::Instance::example(), keys)
        .await
        .expect("aws");
    let gce = gcp::MetadataServer::start(gcp::Instance::example())
        .await
        .expect("gcp");
    let az = azure::Imds::start(azure::Vm::example()).await.expect("azure");
    let t = Duration::from_millis(500);

    let only = |aws: String, gcp: String, azure: String| MetadataUrls { aws, gcp, azure };
    assert_eq!(
        detect(&only(imds.url(), closed(), closed()), t)
            .await
            .expect("aws"),
        Platform::Aws
    );
    assert_eq!(
        detect(&only(closed(), gce.url(), closed()), t)
            .await
            .expect("gcp"),
        Platform::Gcp
    );
    assert_eq!(
        detect(&only(closed(), closed(), az.url()), t)
            .await
            .expect("azure"),
        Platform::Azure
    );
    // A GCP probe sent to Azure's service (no Metadata-Flavor answer) is not mistaken for GCP.
    assert_eq!(
        detect(&only(closed(), az.url(), az.url()), t)
            .await
            .expect("azure"),
        Platform::Azure
    );

    let err = detect(&only(closed(), closed(), closed()), t)
        .await
        .expect_err("none");
    assert!(
        err.to_string()
            .contains("host: auto found no cloud metadata service"),
        "{err}"
    );
}

#[tokio::test]
async fn the_platform_provider_detects_once_and_obtains_that_platform_s_credential() {
    use gangplank_identity::detect::{Host, PlatformProvider};
    use gangplank_identity::{Challenge, Provider as _};
    let gce = gcp::MetadataServer::start(gcp::Instance::example())
        .await
        .expect("gcp");
    let dir = tempfile::tempdir().expect("tempdir");
    let urls = MetadataUrls {
        aws: closed(),
        gcp: gce.url(),
        azure: closed(),
    };
    let provider = PlatformProvider::new(Host::Auto, urls.clone(), dir.path().join("key"));
    assert_eq!(provider.kind(), "auto");
    let c = Challenge {
        plane_id: "plane-1".into(),
        nonce: "n".into(),
        ..Default::default()
    };
    let credential = provider.credential(&c).await.expect("credential");
    assert_eq!(credential.kind, gangplank_api::kind::GCP_GCE);
    assert_eq!(provider.kind(), gangplank_api::kind::GCP_GCE);

    // A fixed host never probes: AWS fixed against a GCP-only machine fails on IMDS.
    let fixed = PlatformProvider::new(
        "aws-ec2".parse::<Host>().expect("host"),
        urls,
        dir.path().join("key"),
    );
    assert_eq!(fixed.kind(), gangplank_api::kind::AWS_EC2);
    let err = fixed.credential(&c).await.expect_err("no IMDS");
    assert!(
        err.to_string().contains("EC2 instance metadata (IMDSv2)"),
        "{err}"
    );
    assert!("cloud".parse::<Host>().is_err());
}
