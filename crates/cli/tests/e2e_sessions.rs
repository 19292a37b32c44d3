//! A session is bound to the VM: it works on the TLS connection it was issued on, and on
//! any other only with a fresh proof by the VM's bound key. A copied session token alone
//! opens no stream and deregisters nothing.

mod support;

use std::time::Duration;

use gangplank_api::proto::{self, onboarding_client::OnboardingClient};
use gangplank_identity::Challenge;
use gangplank_identity::bound::{Key, SESSION_NONCE_HEADER, SESSION_PROOF_HEADER};
use support::*;
use tonic::Code;
use tonic::transport::Channel;

async fn challenge(client: &mut OnboardingClient<Channel>) -> Challenge {
    let d = client
        .discover(proto::DiscoverRequest {})
        .await
        .unwrap()
        .into_inner();
    Challenge {
        plane_id: d.plane_id,
        nonce: d.nonce,
        ..Default::default()
    }
}

/// A request carrying `session`, and a nonce and proof when given.
fn with_session<T>(message: T, session: &str, proof: Option<(&str, &str)>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let metadata = request.metadata_mut();
    metadata.insert("authorization", format!("Bearer {session}").parse().unwrap());
    if let Some((nonce, proof)) = proof {
        metadata.insert(SESSION_NONCE_HEADER, nonce.parse().unwrap());
        metadata.insert(SESSION_PROOF_HEADER, proof.parse().unwrap());
    }
    request
}

/// Opens a Session stream with `request`'s headers; returns the first message's outcome.
async fn open(
    client: &mut OnboardingClient<Channel>,
    session: &str,
    proof: Option<(&str, &str)>,
) -> Result<
    (
        tokio::sync::mpsc::Sender<proto::AgentMessage>,
        tonic::Streaming<proto::EndpointMessage>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let request = with_session(tokio_stream::wrappers::ReceiverStream::new(rx), session, proof);
    let mut inbound = client.session(request).await?.into_inner();
    match tokio::time::timeout(WAIT, inbound.message()).await {
        Ok(Ok(Some(proto::EndpointMessage {
            kind: Some(proto::endpoint_message::Kind::Welcome(_)),
        }))) => Ok((tx, inbound)),
        Ok(Err(status)) => Err(status),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_session_opens_nothing_and_deletes_nothing_without_the_bound_key() {
    let mesh = Mesh::start(Options::default()).await;
    mesh.registry
        .put(&policy("bookinfo", "allow", vec![join_tokens()], &[]))
        .await
        .unwrap();
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let key = Key::generate().unwrap();
    let thief_key = Key::generate().unwrap();

    // The VM onboards and opens its stream on its own connection.
    let mut vm = mesh.client().await;
    let registration = first_join(&mut vm, &token, &key).await.registration.unwrap();
    let session = registration.session.clone();
    let (vm_stream, _vm_inbound) = open(&mut vm, &session, None)
        .await
        .expect("the session works on the connection it was issued on");
    let before = mesh.snapshot();

    // A thief with a copy of the session, on its own connection.
    let mut thief = mesh.client().await;
    let refused = |status: tonic::Status, what: &str| {
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert!(
            status.message().contains("issued on another connection"),
            "{what}: {}",
            status.message()
        );
        assert!(!status.message().contains(&session), "{what} echoes the session");
    };
    let Err(status) = open(&mut thief, &session, None).await else {
        panic!("a copied session opened a stream")
    };
    refused(status, "a stream with a copied session");
    let status = thief
        .leave(with_session(proto::LeaveRequest {}, &session, None))
        .await
        .expect_err("refused");
    refused(status, "a Leave with a copied session");

    // Proofs that are not the VM's key over a fresh nonce of this connection.
    let c = challenge(&mut thief).await;
    let forged = thief_key.prove_session(&c, &session);
    let status = thief
        .leave(with_session(
            proto::LeaveRequest {},
            &session,
            Some((&c.nonce, &forged)),
        ))
        .await
        .expect_err("refused");
    refused(status, "a Leave with another key's proof");
    let c = challenge(&mut thief).await;
    let other_session = key.prove_session(&c, "another session");
    let status = thief
        .leave(with_session(
            proto::LeaveRequest {},
            &session,
            Some((&c.nonce, &other_session)),
        ))
        .await
        .expect_err("refused");
    refused(status, "a Leave with the key's proof of another session");
    assert_eq!(mesh.snapshot(), before, "a refused session changed the registry");

    // The VM itself, after a reconnect (a new connection), moves its session with its key;
    // a replay of that proof is refused.
    let mut reconnected = mesh.client().await;
    let c = challenge(&mut reconnected).await;
    let proof = key.prove_session(&c, &session);
    let (_stream, _inbound) = open(&mut reconnected, &session, Some((&c.nonce, &proof)))
        .await
        .expect("the VM's key moves its session to a new connection");
    let status = thief
        .leave(with_session(
            proto::LeaveRequest {},
            &session,
            Some((&c.nonce, &proof)),
        ))
        .await
        .expect_err("a replayed proof is refused");
    refused(status, "a replayed proof");
    assert_eq!(mesh.entries().await.len(), 1, "the entry is still there");

    drop(vm_stream);
    let c = challenge(&mut reconnected).await;
    let proof = key.prove_session(&c, &session);
    reconnected
        .leave(with_session(
            proto::LeaveRequest {},
            &session,
            Some((&c.nonce, &proof)),
        ))
        .await
        .expect("the VM leaves with its key");
    assert!(mesh.entries().await.is_empty(), "Leave removed the entry");
}
