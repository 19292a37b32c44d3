//! The floor an onboarding is compared with, measured in the same run: full TLS 1.3
//! handshakes against the same endpoint port (what every VM's connection costs at least),
//! and the signature operations one onboarding needs, timed alone in this process.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::probe;

/// What the handshake floor measured.
#[derive(Debug, Clone, Serialize)]
pub struct Handshakes {
    /// Handshakes completed.
    pub count: u64,
    /// Handshakes per second (wall clock).
    pub per_second: f64,
    /// Endpoint CPU per handshake, in milliseconds.
    pub endpoint_cpu_ms: f64,
}

/// Runs `count` full TLS handshakes (no resumption, ALPN h2, as an agent connects), at most
/// `concurrency` at once, against `addr`; measures the endpoint process `pid`'s CPU.
pub async fn handshakes(
    addr: SocketAddr,
    ca_bundle: &Path,
    pid: u32,
    count: u64,
    concurrency: usize,
) -> Result<Handshakes> {
    let mut config = gangplank_tls::client_config(&gangplank_tls::ClientOptions {
        ca_bundle: Some(ca_bundle.to_owned()),
        ..Default::default()
    })?;
    config.resumption = rustls::client::Resumption::disabled();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls_pki_types::ServerName::try_from("localhost")?.to_owned();
    let permits = Arc::new(Semaphore::new(concurrency));
    let cpu0 = probe::cpu_ns(pid)?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let permit = permits.clone().acquire_owned().await?;
        let (connector, name) = (connector.clone(), name.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let tls = tokio::time::timeout(Duration::from_secs(30), connector.connect(name, tcp))
                .await
                .context("handshake timed out")??;
            drop(tls);
            anyhow::Ok(())
        });
    }
    let mut failed = 0u64;
    while let Some(done) = tasks.join_next().await {
        if !matches!(done, Ok(Ok(()))) {
            failed += 1;
        }
    }
    let wall = started.elapsed();
    // Let the endpoint finish the connections it is closing before reading its CPU.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu = probe::cpu_ns(pid)? - cpu0;
    let ok = count - failed;
    anyhow::ensure!(ok > 0, "no TLS handshake with {addr} succeeded");
    Ok(Handshakes {
        count: ok,
        per_second: ok as f64 / wall.as_secs_f64(),
        endpoint_cpu_ms: cpu as f64 / 1e6 / ok as f64,
    })
}

/// The signature operations one onboarding needs on the endpoint, each timed alone here.
#[derive(Debug, Clone, Serialize)]
pub struct Signatures {
    /// One Ed25519 verification (the VM's proof of its bound key), µs.
    pub ed25519_verify_us: f64,
    /// One ES256 signature (a session token or a sidecar token), µs.
    pub es256_sign_us: f64,
    /// One ES256 verification, µs (what a session check cost while sessions were ES256).
    pub es256_verify_us: f64,
    /// One HS256 MAC of a session token, µs.
    pub hs256_sign_us: f64,
    /// One HS256 check of a session token (on Session and on Leave), µs.
    pub hs256_verify_us: f64,
    /// What one onboarding needs: one Ed25519 verification (the bound key's proof), one
    /// ES256 signature (the sidecar token, directory mode), one HS256 session MAC and two
    /// checks of it (Session, Leave), in milliseconds.
    pub per_onboarding_ms: f64,
}

/// Times the signature operations of one onboarding, `rounds` of each.
pub fn signatures(rounds: u32) -> Result<Signatures> {
    use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair as _};
    let vm = Ed25519KeyPair::generate().context("ed25519 key")?;
    let message = [7u8; 120];
    let proof = vm.sign(&message);
    let public = signature::UnparsedPublicKey::new(&signature::ED25519, vm.public_key().as_ref().to_vec());
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        for _ in 0..rounds {
            f();
        }
        t.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
    };
    let ed25519_verify_us = time(&mut || {
        public.verify(&message, proof.as_ref()).expect("valid proof");
    });

    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .context("p-256 key")?;
    let pair =
        signature::EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
            .context("p-256 key")?;
    let encoding = jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref());
    let point = pair.public_key().as_ref().to_vec();
    let decoding = jsonwebtoken::DecodingKey::from_ec_der(&point);
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    let claims = serde_json::json!({"sub": "bookinfo/ratings-token-0123456789-abcdef0123", "jti": "x", "aud": "gangplank-session", "exp": 4102444800u64});
    let mut token = String::new();
    let es256_sign_us = time(&mut || {
        token = jsonwebtoken::encode(&header, &claims, &encoding).expect("signs");
    });
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["gangplank-session"]);
    let es256_verify_us = time(&mut || {
        jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation).expect("verifies");
    });
    let secret = [9u8; 32];
    let (mac, unmac) = (
        jsonwebtoken::EncodingKey::from_secret(&secret),
        jsonwebtoken::DecodingKey::from_secret(&secret),
    );
    let hs256 = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    let hs256_sign_us = time(&mut || {
        token = jsonwebtoken::encode(&hs256, &claims, &mac).expect("MACs");
    });
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_audience(&["gangplank-session"]);
    let hs256_verify_us = time(&mut || {
        jsonwebtoken::decode::<serde_json::Value>(&token, &unmac, &validation).expect("checks");
    });
    Ok(Signatures {
        ed25519_verify_us,
        es256_sign_us,
        es256_verify_us,
        hs256_sign_us,
        hs256_verify_us,
        per_onboarding_ms: (ed25519_verify_us + es256_sign_us + hs256_sign_us + 2.0 * hs256_verify_us)
            / 1000.0,
    })
}
