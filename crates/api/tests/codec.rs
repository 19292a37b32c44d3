//! Properties of the protocol's decoder (the one the generated server and client use):
//! whatever bytes arrive as an `OnboardRequest` or an `AgentMessage`, decoding answers with a
//! message or INVALID_ARGUMENT, never a panic; and what is encoded decodes back the same.
//!
//! Cases: proptest's default (256), or `PROPTEST_CASES`. No regression files are written.

use gangplank_api::codec::decode;
use gangplank_api::proto::{
    AgentMessage, Credential, Health, HostFacts, OnboardRequest, WorkloadGroupRef, agent_message,
};
use proptest::prelude::*;
use prost::Message as _;
use tonic::Code;

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn request() -> impl Strategy<Value = OnboardRequest> {
    (
        (".{0,20}", ".{0,20}"),
        (
            ".{0,12}",
            prop::collection::vec(any::<u8>(), 0..64),
            prop::collection::vec(any::<u8>(), 0..16),
        ),
        ".{0,40}",
        (
            ".{0,20}",
            prop::collection::vec(".{0,16}", 0..4),
            prop::collection::btree_map(".{0,8}", ".{0,8}", 0..4),
        ),
    )
        .prop_map(
            |((namespace, name), (kind, payload, proof), nonce, (hostname, addresses, labels))| {
                OnboardRequest {
                    workload_group: Some(WorkloadGroupRef { namespace, name }),
                    credential: Some(Credential {
                        kind,
                        payload,
                        proof,
                        public_key: vec![],
                    }),
                    nonce,
                    host: Some(HostFacts {
                        hostname,
                        addresses,
                        labels: labels.into_iter().collect(),
                        ..Default::default()
                    }),
                }
            },
        )
}

/// Bytes that are protobuf-shaped: valid messages with some bytes changed, cut or added.
fn damaged() -> impl Strategy<Value = Vec<u8>> {
    (request(), any::<prop::sample::Index>(), any::<u8>(), 0usize..3).prop_map(|(r, at, byte, how)| {
        let mut bytes = r.encode_to_vec();
        if bytes.is_empty() {
            return vec![byte];
        }
        let i = at.index(bytes.len());
        match how {
            0 => bytes[i] = byte,
            1 => bytes.truncate(i),
            _ => bytes.insert(i, byte),
        }
        bytes
    })
}

fn check<M: prost::Message + Default>(bytes: &[u8]) -> Result<(), TestCaseError> {
    match decode::<M>(bytes) {
        Ok(_) => Ok(()),
        Err(status) => {
            prop_assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
            prop_assert!(
                status
                    .message()
                    .contains("is not a valid gangplank.onboarding.v1."),
                "{}",
                status.message()
            );
            Ok(())
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_decode_or_are_invalid_argument(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check::<OnboardRequest>(&bytes)?;
        check::<AgentMessage>(&bytes)?;
    }

    #[test]
    fn damaged_messages_decode_or_are_invalid_argument(bytes in damaged()) {
        check::<OnboardRequest>(&bytes)?;
        check::<AgentMessage>(&bytes)?;
    }

    #[test]
    fn encoded_messages_decode_back(r in request(), healthy in any::<bool>(), message in ".{0,40}") {
        let back: OnboardRequest = decode(r.encode_to_vec().as_slice()).map_err(|s| TestCaseError::fail(s.to_string()))?;
        prop_assert_eq!(back, r);
        let m = AgentMessage { kind: Some(agent_message::Kind::Health(Health { healthy, message })) };
        let back: AgentMessage = decode(m.encode_to_vec().as_slice()).map_err(|s| TestCaseError::fail(s.to_string()))?;
        prop_assert_eq!(back, m);
    }
}

#[test]
fn garbage_is_named_as_the_message_it_is_not() {
    let status = decode::<OnboardRequest>(&b"\xff\xff\xff\xff garbage"[..]).unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("the message is not a valid gangplank.onboarding.v1.OnboardRequest"),
        "{}",
        status.message()
    );
}
