//! Handshakes between our client and server configs over loopback.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use gangplank_tls::{ClientOptions, ReloadingServer, client_config, dev::Ca};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Serves TLS on 127.0.0.1:0, answering each connection with the peer's first byte echoed.
async fn serve(config: rustls::ServerConfig) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let mut b = [0u8; 1];
                    if tls.read_exact(&mut b).await.is_ok() {
                        let _ = tls.write_all(&b).await;
                    }
                }
            });
        }
    });
    addr
}

/// Connects, and returns the server certificate's DER on success.
async fn handshake(
    addr: std::net::SocketAddr,
    options: &ClientOptions,
    name: &str,
) -> Result<Vec<u8>, String> {
    let config = Arc::new(client_config(options).map_err(|e| e.to_string())?);
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(name.to_string()).unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"x").await.map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    Ok(cert)
}

/// Moves a file's mtime forward, so change detection never depends on timestamp granularity.
fn touch_later(path: &std::path::Path, seconds: u64) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(std::time::SystemTime::now() + Duration::from_secs(seconds))
        .unwrap();
}

fn write_bundle(dir: &tempfile::TempDir, name: &str, pem: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

#[tokio::test]
async fn a_failed_handshake_says_whether_the_chain_the_name_or_the_dates_are_wrong() {
    use gangplank_tls::Refusal;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("test").unwrap();
    let other = Ca::generate("other").unwrap();
    let leaf = ca.issue(&["endpoint.test"], &[LOCALHOST]).unwrap();
    let expired = ca
        .issue_valid(&["endpoint.test"], &[LOCALHOST], (2020, 1, 1), (2021, 1, 1))
        .unwrap();
    let addr = serve(gangplank_tls::server_config_from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap()).await;
    let expired_addr =
        serve(gangplank_tls::server_config_from_pem(&expired.cert_pem, &expired.key_pem).unwrap()).await;
    let trusting = |pem: &str, name: &str| ClientOptions {
        ca_bundle: Some(write_bundle(&dir, name, pem)),
        ..Default::default()
    };
    let attempt = |addr, host: &'static str, options: ClientOptions| async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        gangplank_tls::handshake(tcp, host, &options)
            .await
            .expect("a client config")
    };

    let ok = attempt(addr, "127.0.0.1", trusting(ca.cert_pem(), "ca.pem"))
        .await
        .expect("trusted, for 127.0.0.1");
    assert_eq!(ok.alpn.as_deref(), Some("h2"), "the endpoint speaks HTTP/2");
    assert!(ok.protocol.starts_with("TLSv1_"), "{ok:?}");
    let sni = ClientOptions {
        sni: Some("endpoint.test".into()),
        ..trusting(ca.cert_pem(), "ca.pem")
    };
    attempt(addr, "127.0.0.1", sni)
        .await
        .expect("the SNI override is what is verified");

    match attempt(addr, "127.0.0.1", trusting(other.cert_pem(), "other.pem")).await {
        Err(Refusal::Untrusted(m)) => assert!(m.contains("trusted CA"), "{m}"),
        other => panic!("expected an untrusted chain, got {other:?}"),
    }
    let wrong_name = ClientOptions {
        sni: Some("elsewhere.test".into()),
        ..trusting(ca.cert_pem(), "ca.pem")
    };
    match attempt(addr, "127.0.0.1", wrong_name).await {
        Err(Refusal::NameMismatch(m)) => {
            assert!(m.contains("elsewhere.test") && m.contains("endpoint.test"), "{m}")
        }
        other => panic!("expected a name mismatch, got {other:?}"),
    }
    match attempt(expired_addr, "127.0.0.1", trusting(ca.cert_pem(), "ca.pem")).await {
        Err(Refusal::Expired(m)) => assert!(m.contains("expired"), "{m}"),
        other => panic!("expected an expired certificate, got {other:?}"),
    }
    // A bundle that cannot be read is the configuration's error, before any handshake.
    let tcp = TcpStream::connect(addr).await.unwrap();
    let missing = ClientOptions {
        ca_bundle: Some(dir.path().join("absent.pem")),
        ..Default::default()
    };
    assert!(
        gangplank_tls::handshake(tcp, "127.0.0.1", &missing)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn trusted_ca_connects_untrusted_ca_is_refused_insecure_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("test").unwrap();
    let other = Ca::generate("other").unwrap();
    let leaf = ca.issue(&["endpoint.test"], &[LOCALHOST]).unwrap();
    let addr = serve(gangplank_tls::server_config_from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap()).await;

    let good = ClientOptions {
        ca_bundle: Some(write_bundle(&dir, "ca.pem", ca.cert_pem())),
        ..Default::default()
    };
    handshake(addr, &good, "endpoint.test").await.expect("trusted CA");
    handshake(addr, &good, "127.0.0.1").await.expect("IP SAN");

    let err = handshake(addr, &good, "wrong.test").await.unwrap_err();
    assert!(
        err.contains("NotValidForName") || err.contains("not valid for"),
        "{err}"
    );

    let bad = ClientOptions {
        ca_bundle: Some(write_bundle(&dir, "other.pem", other.cert_pem())),
        ..Default::default()
    };
    let err = handshake(addr, &bad, "endpoint.test").await.unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("invalid peer certificate"),
        "{err}"
    );

    let insecure = ClientOptions {
        insecure_skip_verify: true,
        ..Default::default()
    };
    handshake(addr, &insecure, "anything.test")
        .await
        .expect("insecure accepts any certificate");
}

#[test]
fn a_bundle_without_certificates_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_bundle(&dir, "empty.pem", "not a certificate\n");
    let err = client_config(&ClientOptions {
        ca_bundle: Some(path.clone()),
        ..Default::default()
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("no PEM certificate"),
        "{msg}"
    );
}

#[tokio::test]
async fn reloads_a_rotated_certificate_and_keeps_the_old_one_on_a_bad_write() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("test").unwrap();
    let first = ca.issue(&["endpoint.test"], &[]).unwrap();
    let cert = write_bundle(&dir, "tls.crt", &first.cert_pem);
    let key = write_bundle(&dir, "tls.key", &first.key_pem);
    let server = ReloadingServer::load(&cert, &key).unwrap();
    let addr = serve(server.server_config().unwrap()).await;
    let options = ClientOptions {
        ca_bundle: Some(write_bundle(&dir, "ca.pem", ca.cert_pem())),
        ..Default::default()
    };
    let before = handshake(addr, &options, "endpoint.test").await.unwrap();

    // A half-written rotation: the old certificate stays in service.
    std::fs::write(&cert, "garbage").unwrap();
    touch_later(&cert, 1);
    assert!(!server.reload_if_changed());
    assert_eq!(handshake(addr, &options, "endpoint.test").await.unwrap(), before);

    let second = ca.issue(&["endpoint.test"], &[]).unwrap();
    std::fs::write(&key, &second.key_pem).unwrap();
    std::fs::write(&cert, &second.cert_pem).unwrap();
    touch_later(&cert, 2);
    assert!(server.reload_if_changed());
    let after = handshake(addr, &options, "endpoint.test").await.unwrap();
    assert_ne!(after, before, "the rotated certificate is served");
}
