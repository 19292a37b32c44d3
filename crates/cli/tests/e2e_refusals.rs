//! Every refusal has a clear message and writes nothing: no WorkloadEntry appears and no
//! join token is spent.

mod support;

use std::time::Duration;

use gangplank_api::proto::{self, Credential, HostFacts, OnboardRequest, WorkloadGroupRef};
use gangplank_testkit::oidc::{self, Issuer};
use support::*;
use tonic::Code;

struct Case {
    what: &'static str,
    group: &'static str,
    credential: Option<Credential>,
    nonce: Option<String>,
    code: Code,
    message: &'static str,
}

fn jwt(token: String) -> Option<Credential> {
    Some(Credential {
        kind: "jwt".into(),
        payload: token.into_bytes(),
        ..Default::default()
    })
}

fn join(token: &str) -> Option<Credential> {
    Some(Credential {
        kind: "join-token".into(),
        payload: token.as_bytes().to_vec(),
        ..Default::default()
    })
}

/// The endpoint's log line that carries `reference` (waiting, bounded, for it to be written).
fn logged_with(mesh: &Mesh, reference: &str) -> String {
    gangplank_testkit::process::until(WAIT, || {
        mesh.endpoint
            .output()
            .lines()
            .find(|l| l.contains(reference))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("no endpoint log line with reference {reference}"))
}

/// Marks every use of a join token as spent, as earlier onboardings would have.
async fn spend(mesh: &Mesh, token: &str) {
    let id = token.split('.').next().unwrap();
    let key = gangplank_api::NamespacedName::new("bookinfo", id);
    let mut stored: gangplank_api::token::JoinToken = mesh.registry.get(&key).await.unwrap().unwrap();
    stored.status.used = stored.spec.uses;
    mesh.registry.put(&stored).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_unauthorised_and_malformed_requests_are_refused_and_change_nothing() {
    let issuer = Issuer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = issuer.write_ca(dir.path()).unwrap();
    let mesh = Mesh::start(Options {
        jwt: Some((issuer.url().to_string(), issuer.jwks_uri(), ca)),
        ..Options::default()
    })
    .await;
    let reg = &mesh.registry;
    reg.put(&group("bookinfo", "reviews", &[("app", "reviews")]))
        .await
        .unwrap();
    reg.put(&group("other", "ratings", &[("app", "ratings")]))
        .await
        .unwrap();
    // vm-1 may join ratings; join tokens may join ratings (but not reviews); a policy in
    // another namespace allows everything there and must not reach bookinfo.
    reg.put(&policy(
        "bookinfo",
        "allow-vm1",
        vec![jwt_subjects(issuer.url(), &["vm-1"])],
        &[("app", "ratings")],
    ))
    .await
    .unwrap();
    reg.put(&policy(
        "bookinfo",
        "tokens-to-ratings",
        vec![join_tokens()],
        &[("app", "ratings")],
    ))
    .await
    .unwrap();
    reg.put(&policy(
        "other",
        "allow-all",
        vec![join_tokens(), jwt_subjects(issuer.url(), &[])],
        &[],
    ))
    .await
    .unwrap();

    let good_token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let reviews_token = mesh.join_token("reviews", 1, Duration::from_secs(3600)).await;
    let expired_token = mesh.join_token("ratings", 1, Duration::ZERO).await;
    let used_token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    spend(&mesh, &used_token).await;
    let (id, _) = good_token.split_once('.').unwrap();
    let wrong_secret = format!("{id}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let unknown_id = format!(
        "zzzzzzzzzz.{}",
        good_token.split_once('.').map(|(_, s)| s).unwrap_or_default()
    );

    let now = oidc::now();
    let claims = |sub: &str| issuer.claims(sub, PLANE_ID);
    let mut wrong_aud = claims("vm-1");
    wrong_aud["aud"] = "another-plane".into();
    let mut expired = claims("vm-1");
    expired["exp"] = (now - 3600).into();
    expired["iat"] = (now - 7200).into();
    let mut unknown_issuer = claims("vm-1");
    unknown_issuer["iss"] = "https://idp.unknown.example".into();

    let cases = vec![
        Case {
            what: "subject not allowed",
            group: "ratings",
            credential: jwt(issuer.sign(&claims("vm-7"))),
            nonce: None,
            code: Code::PermissionDenied,
            message: "no OnboardingPolicy in namespace bookinfo allows jwt subject \"vm-7\"",
        },
        Case {
            what: "no policy for the group",
            group: "reviews",
            credential: jwt(issuer.sign(&claims("vm-1"))),
            nonce: None,
            code: Code::PermissionDenied,
            message: "to join WorkloadGroup reviews",
        },
        Case {
            what: "policy only in another namespace",
            group: "reviews",
            credential: join(&reviews_token),
            nonce: None,
            code: Code::PermissionDenied,
            message: "no OnboardingPolicy in namespace bookinfo allows join token",
        },
        Case {
            what: "bad JWT signature",
            group: "ratings",
            credential: jwt(issuer.sign_with_foreign_key(&claims("vm-1")).unwrap()),
            nonce: None,
            code: Code::Unauthenticated,
            message: "signature",
        },
        Case {
            what: "wrong audience",
            group: "ratings",
            credential: jwt(issuer.sign(&wrong_aud)),
            nonce: None,
            code: Code::Unauthenticated,
            message: "audience",
        },
        Case {
            what: "expired JWT",
            group: "ratings",
            credential: jwt(issuer.sign(&expired)),
            nonce: None,
            code: Code::Unauthenticated,
            message: "expired",
        },
        Case {
            what: "unknown issuer",
            group: "ratings",
            credential: jwt(issuer.sign(&unknown_issuer)),
            nonce: None,
            code: Code::Unauthenticated,
            message: "not configured",
        },
        Case {
            what: "alg none",
            group: "ratings",
            credential: jwt(issuer.unsigned(&claims("vm-1"))),
            nonce: None,
            code: Code::Unauthenticated,
            message: "",
        },
        Case {
            what: "unknown join token id",
            group: "ratings",
            credential: join(&unknown_id),
            nonce: None,
            code: Code::Unauthenticated,
            message: "not found in namespace bookinfo",
        },
        Case {
            what: "wrong join token secret",
            group: "ratings",
            credential: join(&wrong_secret),
            nonce: None,
            code: Code::Unauthenticated,
            message: "join token",
        },
        Case {
            what: "expired join token",
            group: "ratings",
            credential: join(&expired_token),
            nonce: None,
            code: Code::Unauthenticated,
            message: "expired",
        },
        Case {
            what: "used-up join token",
            group: "ratings",
            credential: join(&used_token),
            nonce: None,
            code: Code::Unauthenticated,
            message: "uses are spent",
        },
        Case {
            what: "join token for another group",
            group: "reviews",
            credential: join(&good_token),
            nonce: None,
            code: Code::Unauthenticated,
            message: "ratings",
        },
        Case {
            what: "unknown WorkloadGroup",
            group: "nope",
            credential: jwt(issuer.sign(&claims("vm-1"))),
            nonce: None,
            code: Code::NotFound,
            message: "WorkloadGroup bookinfo/nope not found",
        },
        Case {
            what: "no credential",
            group: "ratings",
            credential: None,
            nonce: None,
            code: Code::InvalidArgument,
            message: "credential is required",
        },
        Case {
            what: "unknown credential kind",
            group: "ratings",
            credential: Some(Credential {
                kind: "aws".into(),
                payload: b"x".to_vec(),
                ..Default::default()
            }),
            nonce: None,
            code: Code::InvalidArgument,
            message: "not accepted by this endpoint",
        },
        Case {
            what: "oversized credential",
            group: "ratings",
            credential: Some(Credential {
                kind: "jwt".into(),
                payload: vec![b'a'; 100 * 1024],
                ..Default::default()
            }),
            nonce: None,
            code: Code::InvalidArgument,
            message: "larger than",
        },
        Case {
            what: "forged nonce",
            group: "ratings",
            credential: jwt(issuer.sign(&claims("vm-1"))),
            nonce: Some("AAAA".into()),
            code: Code::FailedPrecondition,
            message: "nonce",
        },
        Case {
            what: "invalid group name",
            group: "Not_A_Name",
            credential: jwt(issuer.sign(&claims("vm-1"))),
            nonce: None,
            code: Code::InvalidArgument,
            message: "not a valid",
        },
    ];

    let before = mesh.snapshot();
    let mut client = mesh.client().await;
    let mut public: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
    for case in cases {
        let nonce = match case.nonce {
            Some(n) => n,
            None => {
                client
                    .discover(proto::DiscoverRequest {})
                    .await
                    .unwrap()
                    .into_inner()
                    .nonce
            }
        };
        let request = OnboardRequest {
            workload_group: Some(WorkloadGroupRef {
                namespace: "bookinfo".into(),
                name: case.group.into(),
            }),
            credential: case.credential,
            nonce,
            host: Some(HostFacts {
                hostname: "vm".into(),
                addresses: vec!["10.0.0.7".into()],
                ..Default::default()
            }),
        };
        let status = client.onboard(request).await.expect_err(case.what);
        assert_eq!(status.code(), case.code, "{}: {}", case.what, status.message());
        // An unauthenticated caller is told the class and a reference; the precise reason is
        // only in the endpoint's log line with that reference.
        let explained = if status.code() == Code::Unauthenticated {
            let reference = status
                .message()
                .split("(reference ")
                .nth(1)
                .and_then(|r| r.split(';').next())
                .unwrap_or_else(|| panic!("{}: no reference in {:?}", case.what, status.message()))
                .to_owned();
            public
                .entry(
                    status
                        .message()
                        .split(" (reference ")
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                )
                .or_default()
                .push(case.what);
            logged_with(&mesh, &reference)
        } else {
            status.message().to_owned()
        };
        assert!(
            explained.contains(case.message),
            "{}: {:?} lacks {:?}",
            case.what,
            explained,
            case.message
        );
        for secret in [&good_token, &expired_token, &used_token] {
            assert!(
                !status.message().contains(secret.as_str()),
                "{}: the message leaks a token",
                case.what
            );
        }
        assert_eq!(mesh.snapshot(), before, "{}: the registry changed", case.what);
    }
    // One message per class: a caller cannot tell an unknown token from a wrong secret, an
    // expired or a spent one.
    let join_token_messages: Vec<&String> = public.keys().filter(|m| m.starts_with("join token")).collect();
    assert_eq!(join_token_messages.len(), 1, "{public:#?}");
    assert_eq!(public[join_token_messages[0]].len(), 5, "{public:#?}");
    assert!(
        public.keys().all(|m| !m.contains('/')),
        "no paths reach the caller: {public:#?}"
    );
    assert!(mesh.entry_files().is_empty());
    let log = mesh.endpoint.output();
    assert!(
        !log.contains(good_token.as_str()) && !log.contains(&issuer.sign(&claims("vm-1"))[..40]),
        "tokens leaked into the log"
    );

    // The control case: the same plane accepts a good credential.
    let nonce = client
        .discover(proto::DiscoverRequest {})
        .await
        .unwrap()
        .into_inner()
        .nonce;
    let request = OnboardRequest {
        workload_group: Some(WorkloadGroupRef {
            namespace: "bookinfo".into(),
            name: "ratings".into(),
        }),
        credential: jwt(issuer.sign(&claims("vm-1"))),
        nonce,
        host: Some(HostFacts {
            hostname: "vm".into(),
            addresses: vec!["10.0.0.7".into()],
            ..Default::default()
        }),
    };
    let ok = client
        .onboard(request.clone())
        .await
        .expect("vm-1 is allowed")
        .into_inner();
    assert_eq!(ok.registration.unwrap().address, "10.0.0.7");
    let after = mesh.snapshot();

    // The very same request again (a captured credential with its nonce) is refused.
    let replay = client.onboard(request).await.expect_err("a replayed nonce");
    assert_eq!(replay.code(), Code::FailedPrecondition, "{}", replay.message());
    assert!(
        replay.message().contains("nonce was already used"),
        "{}",
        replay.message()
    );
    assert_eq!(mesh.snapshot(), after, "the replay changed the registry");
    assert_eq!(mesh.entry_files().len(), 1);
}

/// An issuer whose JWKS cannot be fetched is an outage on the endpoint's side, not a fault
/// of the VM: the agent is told UNAVAILABLE with a message that says so (and does not send
/// its operator to fix the agent's identity config), and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_outage_reaches_the_agent_as_unavailable_and_blames_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = Issuer::start().await.unwrap();
    let ca = issuer.write_ca(dir.path()).unwrap();
    let url = issuer.url().to_string();
    let token = issuer.sign(&issuer.claims("vm-1", PLANE_ID));
    let mesh = Mesh::start(Options {
        jwt: Some((url.clone(), issuer.jwks_uri(), ca)),
        ..Default::default()
    })
    .await;
    mesh.registry
        .put(&policy(
            "bookinfo",
            "allow-vm1",
            vec![jwt_subjects(&url, &["vm-1"])],
            &[("app", "ratings")],
        ))
        .await
        .unwrap();
    // The issuer goes down before the endpoint ever fetched its keys.
    assert_eq!(issuer.jwks_requests(), 0);
    drop(issuer);
    let before = mesh.snapshot();

    let mut vm = Vm::start(&mesh, "vm-1", support::Credential::JwtFile(token));
    let line = vm.agent.wait_for(r"(refused: Unavailable: .*)", WAIT);
    assert!(
        line.contains("problem on the endpoint's side, not with this VM's credential or configuration"),
        "{line}"
    );
    assert!(
        line.contains(&url),
        "the message names the unreachable issuer: {line}"
    );
    assert!(
        !line.contains("check identity in the agent configuration"),
        "the agent blames its own config: {line}"
    );
    assert!(line.contains("nothing to change on this VM"), "{line}");
    assert_eq!(mesh.snapshot(), before, "the registry changed");
    assert!(mesh.entry_files().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_rejoin_proofs_are_refused_and_write_nothing() {
    let mesh = Mesh::start(Options::default()).await;
    mesh.registry
        .put(&policy("bookinfo", "allow", vec![join_tokens()], &[]))
        .await
        .unwrap();
    let token = mesh.join_token("ratings", 1, Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir().unwrap();
    let key = gangplank_identity::bound::Key::load_or_create(&dir.path().join("vm.pem")).unwrap();
    let thief = gangplank_identity::bound::Key::load_or_create(&dir.path().join("thief.pem")).unwrap();
    let mut client = mesh.client().await;
    let joined = first_join(&mut client, &token, &key).await;
    let binding = joined.registration.unwrap().name;

    let fresh = |client: &mut gangplank_api::proto::onboarding_client::OnboardingClient<
        tonic::transport::Channel,
    >| {
        let mut client = client.clone();
        async move {
            let d = client
                .discover(proto::DiscoverRequest {})
                .await
                .unwrap()
                .into_inner();
            gangplank_identity::Challenge {
                plane_id: d.plane_id,
                nonce: d.nonce,
                ..Default::default()
            }
        }
    };
    let group = gangplank_api::NamespacedName::new("bookinfo", "ratings");
    // A rejoin an eavesdropper recorded, to be replayed.
    let old = fresh(&mut client).await;
    let recorded = key.rejoin(&old, &group, &binding).unwrap();
    client
        .onboard(onboard_request("ratings", recorded.clone(), old.nonce.clone()))
        .await
        .expect("the recorded rejoin itself succeeds");
    let before = mesh.snapshot();

    let mut cases: Vec<(&str, Credential, String, Code)> = Vec::new();
    let c = fresh(&mut client).await;
    cases.push((
        "another key naming the binding",
        thief.rejoin(&c, &group, &binding).unwrap(),
        c.nonce,
        Code::Unauthenticated,
    ));
    let c = fresh(&mut client).await;
    let mut forged = thief.rejoin(&c, &group, &binding).unwrap();
    forged.public_key = key.public_key().to_vec();
    cases.push((
        "the bound public key with another key's signature",
        forged,
        c.nonce,
        Code::Unauthenticated,
    ));
    let c = fresh(&mut client).await;
    let mut tampered = key.rejoin(&c, &group, &binding).unwrap();
    tampered.proof[0] ^= 1;
    cases.push(("a tampered signature", tampered, c.nonce, Code::Unauthenticated));
    let c = fresh(&mut client).await;
    cases.push((
        "a proof replayed with a new nonce",
        recorded.clone(),
        c.nonce,
        Code::Unauthenticated,
    ));
    cases.push((
        "a proof replayed with its own, spent nonce",
        recorded.clone(),
        old.nonce.clone(),
        Code::Unauthenticated,
    ));
    let c = fresh(&mut client).await;
    let other_group = gangplank_api::NamespacedName::new("bookinfo", "reviews");
    cases.push((
        "a proof for another group",
        key.rejoin(&c, &other_group, &binding).unwrap(),
        c.nonce,
        Code::Unauthenticated,
    ));
    let c = fresh(&mut client).await;
    cases.push((
        "a binding that does not exist",
        key.rejoin(&c, &group, "ratings-nope").unwrap(),
        c.nonce,
        Code::Unauthenticated,
    ));
    let c = fresh(&mut client).await;
    let mut garbage = key.rejoin(&c, &group, &binding).unwrap();
    garbage.payload = b"{".to_vec();
    cases.push(("a malformed payload", garbage, c.nonce, Code::Unauthenticated));

    for (what, credential, nonce, code) in cases {
        let status = client
            .onboard(onboard_request("ratings", credential, nonce))
            .await
            .expect_err(what);
        if what.contains("own, spent nonce") {
            assert_eq!(
                status.code(),
                Code::FailedPrecondition,
                "{what}: {}",
                status.message()
            );
            assert!(status.message().contains("nonce"), "{what}: {}", status.message());
        } else {
            assert_eq!(status.code(), code, "{what}: {}", status.message());
            assert!(
                status.message().starts_with("bound key not accepted"),
                "{what}: {}",
                status.message()
            );
        }
        assert_eq!(mesh.snapshot(), before, "{what}: the registry changed");
    }

    // The real key still rejoins: the same entry, no token use.
    let c = fresh(&mut client).await;
    let back = client
        .onboard(onboard_request(
            "ratings",
            key.rejoin(&c, &group, &binding).unwrap(),
            c.nonce,
        ))
        .await
        .expect("the bound key rejoins")
        .into_inner();
    let registration = back.registration.unwrap();
    assert_eq!(registration.name, binding);

    // Leave succeeds when the entry is already gone (released, swept, group deleted).
    let entry = gangplank_api::NamespacedName::new("bookinfo", &binding);
    assert!(
        mesh.registry
            .delete::<gangplank_api::istio::WorkloadEntry>(&entry)
            .await
            .unwrap()
    );
    let mut leave = tonic::Request::new(proto::LeaveRequest {});
    leave.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", registration.session).parse().unwrap(),
    );
    let left = client
        .leave(leave)
        .await
        .expect("leave with the entry gone")
        .into_inner();
    assert_eq!(left.propagation_delay_seconds, 0);
}
