//! Hostile input against a real endpoint process on the directory registry, one table row
//! per input: what is sent (a [`Call`]), the gRPC code and a message fragment it must get.
//! After every row the registry folder is byte-identical (every file hashed) and no join
//! token lost a use.
//!
//! To add a row, add a [`Row`] to [`rows`]: an Onboard row edits a valid request (which, sent
//! as is, succeeds: the last check); a Session or Leave row names its bearer. A row that
//! needs a new fixture (a group, a token, a spent session) adds it to [`Ctx`].

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use gangplank_api::names::annotation;
use gangplank_api::proto::{self, OnboardRequest};
use gangplank_api::token::JoinToken;
use gangplank_api::{NamespacedName, kind};
use gangplank_testkit::oidc::Issuer;
use sha2::{Digest, Sha256};
use support::*;
use tonic::Code;

/// What a row sends.
enum Call {
    /// Onboard with a valid request (fresh nonce, a usable join token for bookinfo/ratings,
    /// ordinary host facts) after this edit.
    Onboard(fn(&mut OnboardRequest, &Ctx)),
    /// These bytes as the Onboard message, in a well-formed gRPC frame.
    OnboardBytes(fn(&Ctx) -> Vec<u8>),
    /// A Session stream with this bearer (`None`: no `authorization`) that sends these
    /// messages.
    Session(fn(&Ctx) -> Option<String>, Vec<proto::AgentMessage>),
    /// Leave with this bearer (`None`: no `authorization`).
    Leave(fn(&Ctx) -> Option<String>),
}

struct Row {
    what: &'static str,
    call: Call,
    code: Code,
    /// In the message, or (for an UNAUTHENTICATED refusal, whose message is one per class)
    /// in the endpoint's log line that carries the message's reference.
    message: &'static str,
}

fn row(what: &'static str, call: Call, code: Code, message: &'static str) -> Row {
    Row {
        what,
        call,
        code,
        message,
    }
}

/// What the rows draw on, made before any row runs.
struct Ctx {
    /// A usable single-use join token per WorkloadGroup (`namespace/name`).
    tokens: BTreeMap<&'static str, String>,
    expired_token: String,
    spent_token: String,
    /// A nonce this endpoint issued and has already seen.
    spent_nonce: String,
    /// A nonce signed with the endpoint's own key, past its expiry.
    expired_nonce: String,
    /// A valid session of a VM that onboarded on another connection (a copy: the rows'
    /// client has no proof by that VM's key).
    copied_session: String,
}

impl Ctx {
    fn token(&self, group: &str) -> String {
        self.tokens[group].clone()
    }
}

fn host(r: &mut OnboardRequest) -> &mut proto::HostFacts {
    r.host.get_or_insert_default()
}

fn credential(r: &mut OnboardRequest) -> &mut proto::Credential {
    r.credential.get_or_insert_default()
}

fn join(r: &mut OnboardRequest, token: &str) {
    *credential(r) = proto::Credential {
        kind: kind::JOIN_TOKEN.into(),
        payload: token.as_bytes().to_vec(),
        ..Default::default()
    };
}

/// Onboard into `bookinfo/group` with that group's token.
fn into_group(r: &mut OnboardRequest, c: &Ctx, group: &'static str) {
    r.workload_group.get_or_insert_default().name = group.into();
    join(r, &c.token(&format!("bookinfo/{group}")));
}

fn label(r: &mut OnboardRequest, k: &str, v: &str) {
    host(r).labels.insert(k.into(), v.into());
}

fn address(r: &mut OnboardRequest, a: &str) {
    host(r).addresses = vec![a.into()];
}

/// The valid request every Onboard row starts from.
fn valid(c: &Ctx, nonce: String) -> OnboardRequest {
    OnboardRequest {
        workload_group: Some(proto::WorkloadGroupRef {
            namespace: "bookinfo".into(),
            name: "ratings".into(),
        }),
        credential: Some(proto::Credential {
            kind: kind::JOIN_TOKEN.into(),
            payload: c.token("bookinfo/ratings").into_bytes(),
            ..Default::default()
        }),
        nonce,
        host: Some(proto::HostFacts {
            hostname: "vm-7.example.internal".into(),
            addresses: vec!["10.0.0.7".into()],
            connected_over: "VPC".into(),
            agent_version: "0.1.0".into(),
            labels: [("tier".to_string(), "db".to_string())].into(),
        }),
    }
}

fn rows() -> Vec<Row> {
    use Call::*;
    use Code::*;
    vec![
        // Host facts: labels.
        row(
            "a label key with a space",
            Onboard(|r, _| label(r, "Bad Key", "x")),
            InvalidArgument,
            r#"host.labels["Bad Key"]: is not a Kubernetes label key"#,
        ),
        row(
            "a label key with two slashes",
            Onboard(|r, _| label(r, "a/b/c", "x")),
            InvalidArgument,
            "at most one '/'",
        ),
        row(
            "a label key with an upper-case prefix",
            Onboard(|r, _| label(r, "Example.com/x", "x")),
            InvalidArgument,
            "must be a DNS subdomain",
        ),
        row(
            "a 64-character label name",
            Onboard(|r, _| label(r, &"n".repeat(64), "x")),
            InvalidArgument,
            "at most 63 are allowed",
        ),
        row(
            "a 200 KB label value",
            Onboard(|r, _| label(r, "tier", &"v".repeat(200 * 1024))),
            InvalidArgument,
            r#"host.labels["tier"]: value"#,
        ),
        row(
            "a label value with a newline",
            Onboard(|r, _| label(r, "tier", "db\nx: y")),
            InvalidArgument,
            "is not a Kubernetes label value",
        ),
        row(
            "Istio's tlsMode label",
            Onboard(|r, _| label(r, "security.istio.io/tlsMode", "disabled")),
            InvalidArgument,
            "the prefix security.istio.io/ is reserved for Istio",
        ),
        row(
            "Istio's revision label",
            Onboard(|r, _| label(r, "istio.io/rev", "canary")),
            InvalidArgument,
            "reserved for Istio",
        ),
        row(
            "Istio's network label",
            Onboard(|r, _| label(r, "topology.istio.io/network", "evil")),
            InvalidArgument,
            "reserved for Istio",
        ),
        row(
            "Istio's canonical service label",
            Onboard(|r, _| label(r, "service.istio.io/canonical-name", "x")),
            InvalidArgument,
            "reserved for Istio",
        ),
        row(
            "Kubernetes' managed-by label",
            Onboard(|r, _| label(r, "app.kubernetes.io/managed-by", "other")),
            InvalidArgument,
            "reserved for Kubernetes",
        ),
        row(
            "a kubernetes.io label",
            Onboard(|r, _| label(r, "kubernetes.io/hostname", "x")),
            InvalidArgument,
            "reserved for Kubernetes",
        ),
        row(
            "a k8s.io label",
            Onboard(|r, _| label(r, "node-role.k8s.io/x", "y")),
            InvalidArgument,
            "reserved for Kubernetes",
        ),
        row(
            "Gangplank's workload-group label",
            Onboard(|r, _| label(r, "onboarding.gangplank.dev/workload-group", "reviews")),
            InvalidArgument,
            "reserved for Gangplank",
        ),
        row(
            "Gangplank's credential-kind label",
            Onboard(|r, _| label(r, "onboarding.gangplank.dev/credential-kind", "aws-ec2")),
            InvalidArgument,
            "reserved for Gangplank",
        ),
        row(
            "a label overriding the group's",
            Onboard(|r, _| label(r, "app", "reviews")),
            InvalidArgument,
            "would override the WorkloadGroup bookinfo/ratings's label app",
        ),
        row(
            "33 labels",
            Onboard(|r, _| host(r).labels = (0..33).map(|i| (format!("l{i}"), "v".into())).collect()),
            InvalidArgument,
            "host.labels: 33 labels, more than the 32 accepted",
        ),
        row(
            "more than 8 KiB of labels",
            Onboard(|r, _| {
                host(r).labels = (0..32)
                    .map(|i| (format!("{}.x{i}/n", "p".repeat(200)), "v".repeat(63)))
                    .collect();
            }),
            InvalidArgument,
            "more than the 8192 accepted",
        ),
        // Host facts: addresses.
        row(
            "the cloud metadata address",
            Onboard(|r, _| address(r, "169.254.169.254")),
            InvalidArgument,
            "host.addresses[0]: 169.254.169.254 is a link-local address, which WorkloadGroup bookinfo/ratings does not allow",
        ),
        row(
            "an IPv6 link-local address",
            Onboard(|r, _| address(r, "fe80::1")),
            InvalidArgument,
            "fe80::1 is a link-local address",
        ),
        row(
            "a link-local address after a good one",
            Onboard(|r, _| host(r).addresses = vec!["10.0.0.7".into(), "169.254.1.1".into()]),
            InvalidArgument,
            "host.addresses[1]: 169.254.1.1 is a link-local address",
        ),
        row(
            "loopback on a group without the opt-in",
            Onboard(|r, c| {
                into_group(r, c, "strict");
                address(r, "127.0.0.1")
            }),
            InvalidArgument,
            "127.0.0.1 is a loopback address, which WorkloadGroup bookinfo/strict does not allow",
        ),
        row(
            "IPv6 loopback on a group without the opt-in",
            Onboard(|r, c| {
                into_group(r, c, "strict");
                address(r, "::1")
            }),
            InvalidArgument,
            "::1 is a loopback address",
        ),
        row(
            "IPv4-mapped loopback on a group without the opt-in",
            Onboard(|r, c| {
                into_group(r, c, "strict");
                address(r, "::ffff:127.0.0.1")
            }),
            InvalidArgument,
            "is a loopback address",
        ),
        row(
            "the unspecified address",
            Onboard(|r, _| address(r, "0.0.0.0")),
            InvalidArgument,
            "0.0.0.0 is an unspecified address, which cannot address a VM",
        ),
        row(
            "the IPv6 unspecified address",
            Onboard(|r, _| address(r, "::")),
            InvalidArgument,
            "is an unspecified address",
        ),
        row(
            "a multicast address",
            Onboard(|r, _| address(r, "224.0.0.251")),
            InvalidArgument,
            "is a multicast address",
        ),
        row(
            "an IPv6 multicast address",
            Onboard(|r, _| address(r, "ff02::1")),
            InvalidArgument,
            "is a multicast address",
        ),
        row(
            "the broadcast address",
            Onboard(|r, _| address(r, "255.255.255.255")),
            InvalidArgument,
            "is the broadcast address",
        ),
        row(
            "an address that does not parse",
            Onboard(|r, _| address(r, "10.0.0.999")),
            InvalidArgument,
            r#"host.addresses[0]: "10.0.0.999" is not an IP address"#,
        ),
        row(
            "a host name as an address",
            Onboard(|r, _| address(r, "vm-7.example.internal")),
            InvalidArgument,
            "is not an IP address",
        ),
        row(
            "65 addresses",
            Onboard(|r, _| host(r).addresses = (0..65).map(|i| format!("10.0.1.{i}")).collect()),
            InvalidArgument,
            "host.addresses: 65 addresses, more than the 64 accepted",
        ),
        row(
            "no address",
            Onboard(|r, _| host(r).addresses.clear()),
            InvalidArgument,
            "host.addresses: the agent reported no IP address",
        ),
        // Host facts: the rest.
        row(
            "a host name with a newline",
            Onboard(|r, _| host(r).hostname = "vm-7\nrole: admin".into()),
            InvalidArgument,
            r#"host.hostname: "vm-7\nrole: admin" is not a DNS name"#,
        ),
        row(
            "a host name with a space",
            Onboard(|r, _| host(r).hostname = "vm 7".into()),
            InvalidArgument,
            "host.hostname",
        ),
        row(
            "a host name with an escape sequence",
            Onboard(|r, _| host(r).hostname = "\u{1b}[31mvm".into()),
            InvalidArgument,
            "host.hostname",
        ),
        row(
            "a 254-character host name",
            Onboard(|r, _| host(r).hostname = format!("{}.x", "a".repeat(62)).repeat(4) + "aaaa"),
            InvalidArgument,
            "longer than 253",
        ),
        row(
            "a host name label of 64 characters",
            Onboard(|r, _| host(r).hostname = format!("{}.example", "a".repeat(64))),
            InvalidArgument,
            "host.hostname",
        ),
        row(
            "an agent version with a newline",
            Onboard(|r, _| host(r).agent_version = "0.1.0\nx".into()),
            InvalidArgument,
            "host.agent_version",
        ),
        row(
            "a 65-character agent version",
            Onboard(|r, _| host(r).agent_version = "1".repeat(65)),
            InvalidArgument,
            "at most 64 printable ASCII characters",
        ),
        row(
            "an unknown connected_over",
            Onboard(|r, _| host(r).connected_over = "SATELLITE".into()),
            InvalidArgument,
            r#"host.connected_over: "SATELLITE" is not VPC or INTERNET"#,
        ),
        row(
            "a lower-case connected_over",
            Onboard(|r, _| host(r).connected_over = "vpc".into()),
            InvalidArgument,
            "host.connected_over",
        ),
        // What the WorkloadGroup makes of them.
        row(
            "a group whose address opt-in is malformed",
            Onboard(|r, c| into_group(r, c, "misconfigured")),
            FailedPrecondition,
            "annotation onboarding.gangplank.dev/allowed-addresses \"loopback,everything\"",
        ),
        row(
            "an entry larger than 64 KiB",
            Onboard(|r, c| into_group(r, c, "bloated")),
            InvalidArgument,
            "more than the 65536 accepted",
        ),
        // The message itself.
        row(
            "undecodable bytes",
            OnboardBytes(|_| b"\xff\xff\xff\xff garbage".to_vec()),
            InvalidArgument,
            "is not a valid gangplank.onboarding.v1.OnboardRequest",
        ),
        row(
            "a truncated message",
            OnboardBytes(|c| {
                let mut bytes = prost_encode(&valid(c, "n".into()));
                bytes.truncate(bytes.len() / 2);
                bytes
            }),
            InvalidArgument,
            "is not a valid gangplank.onboarding.v1.OnboardRequest",
        ),
        row(
            "no workload group",
            Onboard(|r, _| r.workload_group = None),
            InvalidArgument,
            "workload_group is required",
        ),
        row(
            "an invalid group name",
            Onboard(|r, _| r.workload_group.get_or_insert_default().name = "Not_A_Name".into()),
            InvalidArgument,
            "is not a valid namespace/name",
        ),
        row(
            "an invalid namespace",
            Onboard(|r, _| r.workload_group.get_or_insert_default().namespace = "../etc".into()),
            InvalidArgument,
            "is not a valid namespace/name",
        ),
        row(
            "no credential",
            Onboard(|r, _| r.credential = None),
            InvalidArgument,
            "credential is required",
        ),
        row(
            "an oversized credential",
            Onboard(|r, _| credential(r).payload = vec![b'a'; 100 * 1024]),
            InvalidArgument,
            "larger than 65536 bytes",
        ),
        row(
            "an oversized proof",
            Onboard(|r, _| credential(r).proof = vec![0; 65 * 1024]),
            InvalidArgument,
            "larger than 65536 bytes",
        ),
        row(
            "an unknown credential kind",
            Onboard(|r, _| credential(r).kind = "aws".into()),
            InvalidArgument,
            "credential kind \"aws\" is not accepted by this endpoint",
        ),
        row(
            "no credential kind",
            Onboard(|r, _| credential(r).kind.clear()),
            InvalidArgument,
            "is not accepted by this endpoint",
        ),
        row(
            "a WorkloadGroup that does not exist",
            Onboard(|r, c| into_group(r, c, "gone")),
            NotFound,
            "WorkloadGroup bookinfo/gone not found",
        ),
        row(
            "a group no policy lets join",
            Onboard(|r, c| {
                r.workload_group = Some(proto::WorkloadGroupRef {
                    namespace: "locked".into(),
                    name: "ratings".into(),
                });
                join(r, &c.token("locked/ratings"));
            }),
            PermissionDenied,
            "no OnboardingPolicy in namespace locked",
        ),
        // Nonces.
        row(
            "no nonce",
            Onboard(|r, _| r.nonce.clear()),
            FailedPrecondition,
            "nonce is malformed",
        ),
        row(
            "a nonce that is not base64",
            Onboard(|r, _| r.nonce = "!!!!".into()),
            FailedPrecondition,
            "nonce is malformed",
        ),
        row(
            "a forged nonce",
            Onboard(|r, _| r.nonce = B64.encode([7u8; 48])),
            FailedPrecondition,
            "nonce was not issued by this onboarding plane",
        ),
        row(
            "an expired nonce",
            Onboard(|r, c| r.nonce = c.expired_nonce.clone()),
            FailedPrecondition,
            "nonce has expired",
        ),
        row(
            "a reused nonce",
            Onboard(|r, c| r.nonce = c.spent_nonce.clone()),
            FailedPrecondition,
            "nonce was already used",
        ),
        // Join tokens.
        row(
            "a spent join token",
            Onboard(|r, c| join(r, &c.spent_token)),
            Unauthenticated,
            "uses are spent",
        ),
        row(
            "an expired join token",
            Onboard(|r, c| join(r, &c.expired_token)),
            Unauthenticated,
            "expired at",
        ),
        row(
            "an unknown join token",
            Onboard(|r, c| {
                let secret = c
                    .token("bookinfo/ratings")
                    .split_once('.')
                    .map(|(_, s)| s.to_owned())
                    .unwrap_or_default();
                join(r, &format!("zzzzzzzzzz.{secret}"));
            }),
            Unauthenticated,
            "not found in namespace bookinfo",
        ),
        row(
            "a join token with a wrong secret",
            Onboard(|r, c| {
                let id = c
                    .token("bookinfo/ratings")
                    .split_once('.')
                    .map(|(id, _)| id.to_owned())
                    .unwrap_or_default();
                join(r, &format!("{id}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"));
            }),
            Unauthenticated,
            "secret does not match",
        ),
        row(
            "a malformed join token",
            Onboard(|r, _| join(r, "no-dot-here")),
            Unauthenticated,
            "is malformed",
        ),
        row(
            "a join token that is not UTF-8",
            Onboard(|r, _| credential(r).payload = vec![0xff, 0xfe, b'.', 0xfd]),
            Unauthenticated,
            "not UTF-8",
        ),
        row(
            "a join token for another group",
            Onboard(|r, c| join(r, &c.token("bookinfo/strict"))),
            Unauthenticated,
            "was created for WorkloadGroup strict, not ratings",
        ),
        // Other credentials.
        row(
            "a jwt that is not a JWT",
            Onboard(|r, _| {
                *credential(r) = proto::Credential {
                    kind: kind::JWT.into(),
                    payload: b"not.a.jwt".to_vec(),
                    ..Default::default()
                }
            }),
            Unauthenticated,
            "jwt not accepted",
        ),
        row(
            "a rejoin whose payload is not a binding",
            Onboard(|r, _| {
                *credential(r) = proto::Credential {
                    kind: kind::BOUND_KEY.into(),
                    payload: b"{".to_vec(),
                    proof: vec![1; 64],
                    public_key: vec![2; 44],
                }
            }),
            Unauthenticated,
            "bound key not accepted",
        ),
        row(
            "a first join with a key that is not Ed25519",
            Onboard(|r, _| {
                credential(r).public_key = vec![1; 44];
                credential(r).proof = vec![2; 64];
            }),
            Unauthenticated,
            "not an Ed25519 SubjectPublicKeyInfo",
        ),
        // Session and Leave.
        row(
            "Leave without a session",
            Leave(|_| None),
            Unauthenticated,
            "missing `authorization: Bearer <session>`",
        ),
        row(
            "Leave with a forged session",
            Leave(|_| Some("eyJhbGciOiJub25lIn0.e30.".into())),
            Unauthenticated,
            "session token is not valid",
        ),
        row(
            "Leave with a session copied from another connection",
            Leave(|c| Some(c.copied_session.clone())),
            Unauthenticated,
            "issued on another connection",
        ),
        row(
            "Session with a session copied from another connection",
            Session(|c| Some(c.copied_session.clone()), vec![]),
            Unauthenticated,
            "issued on another connection",
        ),
        row(
            "Session without a session",
            Session(|_| None, vec![]),
            Unauthenticated,
            "missing `authorization: Bearer <session>`",
        ),
        row(
            "Session with a join token as its session",
            Session(
                |c| Some(c.token("bookinfo/ratings")),
                vec![proto::AgentMessage::default()],
            ),
            Unauthenticated,
            "session token is not valid",
        ),
    ]
}

fn prost_encode(m: &OnboardRequest) -> Vec<u8> {
    prost::Message::encode_to_vec(m)
}

/// Every file under the registry, by path, with the SHA-256 of its bytes.
fn fingerprint(mesh: &Mesh) -> BTreeMap<PathBuf, String> {
    let mut files = Vec::new();
    walk(&mesh.root().join("registry"), &mut files);
    files
        .into_iter()
        .map(|p| {
            let digest = Sha256::digest(std::fs::read(&p).unwrap());
            let hex = digest.iter().map(|b| format!("{b:02x}")).collect();
            (p, hex)
        })
        .collect()
}

/// Every join token with its recorded uses.
async fn token_uses(mesh: &Mesh) -> BTreeMap<String, u32> {
    mesh.registry
        .list::<JoinToken>(None)
        .await
        .unwrap()
        .into_iter()
        .map(|t| {
            let name = format!(
                "{}/{}",
                t.metadata.namespace.unwrap_or_default(),
                t.metadata.name.unwrap_or_default()
            );
            (name, t.status.used)
        })
        .collect()
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

async fn create_token(mesh: &Mesh, group: &NamespacedName, ttl: Duration) -> String {
    let (token, secret) = gangplank_identity::token::create(group, ttl, 1, time::OffsetDateTime::now_utc());
    mesh.registry.put(&token).await.unwrap();
    secret.expose().to_string()
}

/// A nonce like `fresh`, signed with the endpoint's nonce key (its state dir) but expired.
fn expired_like(mesh: &Mesh, fresh: &str) -> String {
    let secret = std::fs::read(mesh.root().join("state/nonce-key")).unwrap();
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
    let mut body = B64.decode(fresh).unwrap();
    body.truncate(32);
    let past = time::OffsetDateTime::now_utc().unix_timestamp() - 60;
    body[16..24].copy_from_slice(&past.to_be_bytes());
    let tag = aws_lc_rs::hmac::sign(&key, &body);
    body.extend_from_slice(&tag.as_ref()[..16]);
    B64.encode(body)
}

/// The fixtures: groups beside `bookinfo/ratings` (which allows loopback addresses), a policy
/// letting join tokens into every group of `bookinfo` (none in `locked`), and tokens.
async fn fixtures(mesh: &Mesh, client: &mut Client) -> Ctx {
    let reg = &mesh.registry;
    let mut strict = group("bookinfo", "strict", &[("app", "strict")]);
    strict.metadata.annotations = None;
    reg.put(&strict).await.unwrap();
    let mut misconfigured = group("bookinfo", "misconfigured", &[("app", "misconfigured")]);
    misconfigured.metadata.annotations = Some(
        [(
            annotation::ALLOWED_ADDRESSES.to_string(),
            "loopback,everything".to_string(),
        )]
        .into(),
    );
    reg.put(&misconfigured).await.unwrap();
    let mut bloated = group("bookinfo", "bloated", &[("app", "bloated")]);
    if let Some(m) = bloated.spec.metadata.as_mut() {
        m.annotations
            .insert("example.com/bloat".into(), "x".repeat(70 * 1024));
    }
    reg.put(&bloated).await.unwrap();
    reg.put(&group("locked", "ratings", &[("app", "ratings")]))
        .await
        .unwrap();
    reg.put(&policy("bookinfo", "tokens", vec![join_tokens()], &[]))
        .await
        .unwrap();

    let hour = Duration::from_secs(3600);
    let mut tokens = BTreeMap::new();
    for g in [
        "bookinfo/ratings",
        "bookinfo/strict",
        "bookinfo/misconfigured",
        "bookinfo/bloated",
        "bookinfo/gone",
        "locked/ratings",
    ] {
        tokens.insert(g, create_token(mesh, &g.parse().unwrap(), hour).await);
    }
    let ratings = NamespacedName::new("bookinfo", "ratings");
    let expired_token = create_token(mesh, &ratings, Duration::ZERO).await;
    let spent_token = create_token(mesh, &ratings, hour).await;
    let id = spent_token.split('.').next().unwrap();
    let mut stored: JoinToken = reg
        .get(&NamespacedName::new("bookinfo", id))
        .await
        .unwrap()
        .unwrap();
    stored.status.used = stored.spec.uses;
    reg.put(&stored).await.unwrap();

    let mut ctx = Ctx {
        tokens,
        expired_token,
        spent_token,
        spent_nonce: String::new(),
        expired_nonce: String::new(),
        copied_session: String::new(),
    };
    // A nonce is spent once presented, even by a request refused after the nonce check.
    ctx.spent_nonce = discover(client).await;
    let mut spend = valid(&ctx, ctx.spent_nonce.clone());
    credential(&mut spend).kind = "unknown".into();
    let refused = client
        .onboard(spend)
        .await
        .expect_err("an unknown credential kind");
    assert_eq!(refused.code(), Code::InvalidArgument, "{}", refused.message());
    ctx.expired_nonce = expired_like(mesh, &discover(client).await);
    // A VM onboards on its own connection; its session is what a thief copies.
    let mut vm = mesh.client().await;
    let key = gangplank_identity::bound::Key::generate().unwrap();
    let nonce = discover(&mut vm).await;
    let mut request = valid(&ctx, nonce.clone());
    join(&mut request, &create_token(mesh, &ratings, hour).await);
    let challenge = gangplank_identity::Challenge {
        plane_id: PLANE_ID.into(),
        nonce,
        ..Default::default()
    };
    key.attach(credential(&mut request), &challenge);
    ctx.copied_session = vm
        .onboard(request)
        .await
        .expect("the VM whose session is copied onboards")
        .into_inner()
        .registration
        .unwrap()
        .session;
    ctx
}

type Client = proto::onboarding_client::OnboardingClient<tonic::transport::Channel>;

async fn discover(client: &mut Client) -> String {
    client
        .discover(proto::DiscoverRequest {})
        .await
        .unwrap()
        .into_inner()
        .nonce
}

fn bearer<T>(message: T, session: Option<String>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(s) = session {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {s}").parse().unwrap());
    }
    request
}

/// Sends `bytes` as an Onboard message, framed as gRPC, and returns the status.
async fn onboard_bytes(mesh: &Mesh, bytes: Vec<u8>) -> tonic::Status {
    let options = gangplank_tls::ClientOptions {
        ca_bundle: Some(mesh.ca_bundle.clone()),
        ..Default::default()
    };
    let channel = gangplank_tls::channel("127.0.0.1", mesh.addr.port(), &options).unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/gangplank.onboarding.v1.Onboarding/Onboard");
    grpc.unary(tonic::Request::new(bytes), path, raw::Codec)
        .await
        .map(drop)
        .expect_err("undecodable bytes are refused")
}

/// Sends a row's call and returns the refusal.
async fn send(mesh: &Mesh, client: &mut Client, ctx: &Ctx, call: &Call) -> Result<(), tonic::Status> {
    match call {
        Call::Onboard(edit) => {
            let mut request = valid(ctx, discover(client).await);
            edit(&mut request, ctx);
            client.onboard(request).await.map(drop)
        }
        Call::OnboardBytes(bytes) => Err(onboard_bytes(mesh, bytes(ctx)).await),
        Call::Session(session, messages) => {
            let stream = futures::stream::iter(messages.clone());
            client.session(bearer(stream, session(ctx))).await.map(drop)
        }
        Call::Leave(session) => client
            .leave(bearer(proto::LeaveRequest {}, session(ctx)))
            .await
            .map(drop),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_with_the_field_named_and_change_nothing() {
    let issuer = Issuer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = issuer.write_ca(dir.path()).unwrap();
    let mesh = Mesh::start(Options {
        jwt: Some((issuer.url().to_string(), issuer.jwks_uri(), ca)),
        ..Options::default()
    })
    .await;
    let mut client = mesh.client().await;
    let mut ctx = fixtures(&mesh, &mut client).await;
    let ratings = NamespacedName::new("bookinfo", "ratings");
    let hour = Duration::from_secs(3600);

    // Every row is run and judged on its own (a fresh ratings token each, so one accepted
    // row does not change what the next one sees); all failures are reported together.
    let mut failures = Vec::new();
    for row in rows() {
        ctx.tokens
            .insert("bookinfo/ratings", create_token(&mesh, &ratings, hour).await);
        let before = fingerprint(&mesh);
        let uses = token_uses(&mesh).await;
        let mut failed = |why: String| failures.push(format!("{}: {why}", row.what));
        match send(&mesh, &mut client, &ctx, &row.call).await {
            Ok(()) => failed("accepted".into()),
            Err(status) => {
                let explained = match status.message().split("(reference ").nth(1) {
                    Some(rest) if !status.message().contains(row.message) => {
                        logged_with(&mesh, rest.split(';').next().unwrap_or_default())
                    }
                    _ => status.message().to_owned(),
                };
                if status.code() != row.code || !explained.contains(row.message) {
                    failed(format!(
                        "got {:?} {explained:?}, want {:?} with {:?}",
                        status.code(),
                        row.code,
                        row.message
                    ));
                }
                // The input is named, not echoed back (a 200 KB value must not be).
                if status.message().len() > 2048 {
                    failed(format!("a {} byte message", status.message().len()));
                }
            }
        }
        let after = fingerprint(&mesh);
        if after != before {
            let changed: Vec<_> = after
                .iter()
                .filter(|(p, h)| before.get(*p) != Some(h))
                .map(|(p, _)| p.display().to_string())
                .chain(
                    before
                        .keys()
                        .filter(|p| !after.contains_key(*p))
                        .map(|p| p.display().to_string()),
                )
                .collect();
            failed(format!("the registry changed: {changed:?}"));
        }
        if token_uses(&mesh).await != uses {
            failed("a join token use was spent".into());
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The request every row started from is accepted, loopback on the group that allows it
    // too: the rows were refused for what they changed.
    let mut ok = valid(&ctx, discover(&mut client).await);
    host(&mut ok).addresses = vec!["127.0.0.1".into()];
    let joined = client.onboard(ok).await.expect("the valid request").into_inner();
    assert_eq!(joined.registration.unwrap().address, "127.0.0.1");
    // This one and the VM whose session the copied-session rows present.
    assert_eq!(mesh.entry_files().len(), 2);
}

/// A codec that sends raw bytes as a message and reads any reply as raw bytes.
mod raw {
    use bytes::{Buf as _, BufMut as _};
    use tonic::Status;
    use tonic::codec::{DecodeBuf, EncodeBuf};

    pub struct Codec;

    pub struct Raw;

    impl tonic::codec::Codec for Codec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }

    impl tonic::codec::Encoder for Raw {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.put_slice(&item);
            Ok(())
        }
    }

    impl tonic::codec::Decoder for Raw {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
        }
    }
}
