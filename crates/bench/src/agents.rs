//! Simulated agents: each does what `gangplank-agent` does over the wire, on its own TLS
//! connection and with its own bound key — Discover, Onboard (a first-join credential and
//! the key's proof), Session (until Welcome), heartbeats at the interval Welcome gives, and
//! Leave — with none of an agent's file writing or sidecar, so one process can play
//! thousands of VMs without being the bottleneck.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use gangplank_api::proto::{self, onboarding_client::OnboardingClient};
use gangplank_identity::Challenge;
use gangplank_identity::bound::Key;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// How long one agent may take for one step before it counts as failed.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// One simulated VM.
pub struct Agent {
    index: usize,
    key: Key,
    credential: proto::Credential,
}

impl Agent {
    /// VM number `index` with a new bound key and its first-join `credential`.
    pub fn new(index: usize, credential: proto::Credential) -> Result<Self> {
        Ok(Self {
            index,
            key: Key::generate()?,
            credential,
        })
    }
}

/// What one agent saw.
#[derive(Debug)]
pub struct Joined {
    /// Discover to Welcome.
    pub latency: Duration,
    /// The session, for Leave.
    session: String,
    /// Closing it ends the Session stream.
    stream: mpsc::Sender<proto::AgentMessage>,
    heartbeat: Duration,
}

/// Runs `agents` against `addr`: each onboards (at most `concurrency` onboarding at once),
/// then sends heartbeats until `leave` turns true, then leaves. `onboarded` is told each
/// result as it happens. Returns once every agent has left (or failed).
pub async fn run(
    agents: Vec<Agent>,
    addr: SocketAddr,
    ca_bundle: &Path,
    concurrency: usize,
    onboarded: mpsc::UnboundedSender<Result<Duration, String>>,
    leave: watch::Receiver<bool>,
) -> Vec<Result<(), String>> {
    let options = gangplank_tls::ClientOptions {
        ca_bundle: Some(ca_bundle.to_owned()),
        ..Default::default()
    };
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for agent in agents {
        let (options, permits, onboarded, mut leave) =
            (options.clone(), permits.clone(), onboarded.clone(), leave.clone());
        tasks.spawn(async move {
            let channel = gangplank_tls::channel("127.0.0.1", addr.port(), &options).map_err(|e| e.to_string())?;
            let permit = permits.acquire_owned().await.map_err(|e| e.to_string())?;
            let joined = tokio::time::timeout(STEP_TIMEOUT, join(&agent, channel.clone()))
                .await
                .map_err(|_| anyhow!("no Welcome within {STEP_TIMEOUT:?}"))
                .and_then(|r| r);
            drop(permit);
            let joined = match joined {
                Ok(j) => {
                    let _ = onboarded.send(Ok(j.latency));
                    j
                }
                Err(e) => {
                    let why = format!("agent {}: {e:#}", agent.index);
                    let _ = onboarded.send(Err(why.clone()));
                    return Err(why);
                }
            };
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + joined.heartbeat, joined.heartbeat);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {
                        let beat = proto::AgentMessage { kind: Some(proto::agent_message::Kind::Heartbeat(proto::Heartbeat {})) };
                        if joined.stream.send(beat).await.is_err() {
                            return Err(format!("agent {}: the session stream closed", agent.index));
                        }
                    }
                    changed = leave.changed() => {
                        if changed.is_err() || *leave.borrow() {
                            break;
                        }
                    }
                }
            }
            drop(joined.stream);
            let mut client = OnboardingClient::new(channel);
            // As the agent does: the channel may have reconnected, so Leave proves the key.
            let mut request = tonic::Request::new(proto::LeaveRequest {});
            let proof = session_proof(&mut client, &agent.key, &joined.session)
                .await
                .map_err(|e| format!("agent {}: {e:#}", agent.index))?;
            let metadata = request.metadata_mut();
            metadata.insert("authorization", bearer(&joined.session).map_err(|e| e.to_string())?);
            for (name, value) in proof {
                metadata.insert(name, value.parse().map_err(|_| "a header value".to_string())?);
            }
            tokio::time::timeout(STEP_TIMEOUT, client.leave(request))
                .await
                .map_err(|_| format!("agent {}: Leave timed out", agent.index))?
                .map_err(|s| format!("agent {}: Leave: {}", agent.index, s.message()))?;
            Ok(())
        });
    }
    let mut out = Vec::new();
    while let Some(done) = tasks.join_next().await {
        out.push(done.unwrap_or_else(|e| Err(format!("agent task: {e}"))));
    }
    out
}

/// A nonce from Discover and the bound key's proof over it and `session`, as headers.
async fn session_proof(
    client: &mut OnboardingClient<Channel>,
    key: &Key,
    session: &str,
) -> Result<[(&'static str, String); 2]> {
    use gangplank_identity::bound::{SESSION_NONCE_HEADER, SESSION_PROOF_HEADER};
    let discovered = client.discover(proto::DiscoverRequest {}).await?.into_inner();
    let challenge = Challenge {
        plane_id: discovered.plane_id,
        nonce: discovered.nonce,
        aws_sts_url: String::new(),
    };
    let proof = key.prove_session(&challenge, session);
    Ok([
        (SESSION_NONCE_HEADER, challenge.nonce),
        (SESSION_PROOF_HEADER, proof),
    ])
}

fn bearer(session: &str) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    format!("Bearer {session}")
        .parse()
        .context("session is not ASCII")
}

/// Discover → Onboard → Session until Welcome.
async fn join(agent: &Agent, channel: Channel) -> Result<Joined> {
    let started = Instant::now();
    let mut client = OnboardingClient::new(channel);
    let discovered = client.discover(proto::DiscoverRequest {}).await?.into_inner();
    let challenge = Challenge {
        plane_id: discovered.plane_id,
        nonce: discovered.nonce.clone(),
        aws_sts_url: discovered.aws_sts_url,
    };
    let mut credential = agent.credential.clone();
    agent.key.attach(&mut credential, &challenge);
    let i = agent.index;
    let response = client
        .onboard(proto::OnboardRequest {
            workload_group: Some(crate::plane::group_ref()),
            credential: Some(credential),
            nonce: discovered.nonce,
            host: Some(proto::HostFacts {
                hostname: format!("vm-{i:05}.bench.internal"),
                // Data only: nothing is ever sent to these addresses.
                addresses: vec![format!(
                    "10.{}.{}.{}",
                    100 + (i >> 16) % 100,
                    (i >> 8) & 0xff,
                    i & 0xff
                )],
                connected_over: String::new(),
                agent_version: gangplank_api::VERSION.into(),
                labels: Default::default(),
            }),
        })
        .await
        .map_err(|s| anyhow!("Onboard: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let session = response
        .registration
        .map(|r| r.session)
        .context("Onboard answered without a registration")?;
    let (tx, rx) = mpsc::channel(4);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert("authorization", bearer(&session)?);
    let mut inbound = client
        .session(request)
        .await
        .map_err(|s| anyhow!("Session: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let welcome = loop {
        match inbound.message().await? {
            Some(proto::EndpointMessage {
                kind: Some(proto::endpoint_message::Kind::Welcome(w)),
            }) => break w,
            Some(_) => continue,
            None => anyhow::bail!("the Session stream ended before Welcome"),
        }
    };
    let latency = started.elapsed();
    // Keep reading what the endpoint sends (nothing, in a steady state) until the stream ends.
    tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    Ok(Joined {
        latency,
        session,
        stream: tx,
        heartbeat: Duration::from_secs(u64::from(welcome.heartbeat_seconds.max(1))),
    })
}
